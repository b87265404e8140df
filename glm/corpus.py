"""Corpus files: resolving paths, globs and directories, and reading documents from them.

Formats: ``.txt`` (documents are paragraphs separated by blank lines), ``.jsonl`` and
``.jsonl.gz`` (one JSON object a line, text field configurable, optional id field), and
``.parquet`` (a text column, optional id column). Everything streams: memory depends on the
chunk being read, never on the size of the corpus.

Normalisation (applied to every document before sentence splitting, so the lossless
round-trip of the split stage is against this normalised text):

- a UTF-8 byte order mark at the start of a file or document is dropped;
- CRLF and lone CR become LF;
- NUL and the other C0 control characters except ``\\n`` and ``\\t`` (and DEL) are removed;
- nothing else: no NFKC, no whitespace folding, no case change.

Each of these is counted. ``.txt`` paragraphs lose their leading and trailing whitespace;
JSONL and parquet texts are kept as they are. Invalid UTF-8 is an error naming the byte
offset unless ``on_decode_error`` is ``"replace"`` (U+FFFD, counted) or ``"skip"`` (the
document is dropped, counted). UTF-16 files are rejected with a hint to convert them: their
byte offsets and line splitting are not those of UTF-8, and converting is one ``iconv``.
"""

from __future__ import annotations

import errno
import glob
import gzip
import json
import logging
import os
import re
import stat
import zlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from glm.errors import InputError

log = logging.getLogger(__name__)

SUFFIXES = (".jsonl.gz", ".jsonl", ".txt", ".parquet")
DECODE_POLICIES = ("error", "replace", "skip")

_SNIFF_BYTES = 8192
_BINARY_MAGIC = {
    b"\x7fELF": "an ELF executable",
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"PK\x03\x04": "a zip archive",
    b"\x1f\x8b": "gzip data (name it .jsonl.gz)",
    b"%PDF": "a PDF document",
}
# C0 controls that never occur in text; \t \n \r \f \v and ESC are tolerated by the sniffer
_BINARY_CTRL = bytes(set(range(32)) - {9, 10, 11, 12, 13, 27})
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_PARAGRAPH_BREAK = re.compile(r"\n(?:[^\S\n]*\n)+")


@dataclass(frozen=True)
class CorpusFile:
    """One input file: where it is, its name inside the corpus (for doc ids), its format."""

    path: Path
    rel: str
    kind: str
    size: int


@dataclass
class ReadOptions:
    """How documents are read from corpus files."""

    # JSON key / parquet column holding the document text
    text_field: str = "text"
    # JSON key / parquet column holding the document id; absent -> "<rel>#<index>"
    id_field: str = "id"
    # invalid UTF-8: "error" (default: stop, naming the byte), "replace" or "skip"
    on_decode_error: str = "error"

    def __post_init__(self) -> None:
        if self.on_decode_error not in DECODE_POLICIES:
            raise InputError(
                f"on_decode_error must be one of {', '.join(DECODE_POLICIES)}, "
                f"not {self.on_decode_error!r}"
            )
        if not self.text_field:
            raise InputError("text_field must not be empty")


@dataclass(frozen=True)
class Document:
    """A normalised document and its id."""

    doc_id: str
    text: str


def _kind(name: str) -> str | None:
    for suffix in SUFFIXES:
        if name.endswith(suffix):
            return suffix[1:]
    return None


def _stat(path: Path) -> os.stat_result:
    try:
        return path.stat()
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise InputError("symlink loop", path) from None
        if e.errno == errno.ENOENT:
            raise InputError("path does not exist", path) from None
        raise InputError(f"cannot read: {e.strerror}", path) from None


def _sniff(path: Path, kind: str) -> None:
    """Reject binary and UTF-16 files before any work starts."""
    try:
        with open(path, "rb") as f:
            head = f.read(_SNIFF_BYTES)
    except OSError as e:
        raise InputError(f"cannot read: {e.strerror}", path) from None
    if kind == "parquet":
        if head[:4] != b"PAR1":
            raise InputError("not a parquet file (no PAR1 magic)", path, "byte 0")
        return
    if kind == "jsonl.gz":
        if head[:2] != b"\x1f\x8b":
            raise InputError("not gzip data (no gzip magic)", path, "byte 0")
        try:
            head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, _SNIFF_BYTES)
        except zlib.error as e:
            raise InputError(f"corrupt gzip: {e}", path) from None
    if head[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise InputError(
            f"UTF-16 text (byte order mark {head[:2].hex(' ').upper()}) is not supported; "
            "convert it to UTF-8 (iconv -f UTF-16 -t UTF-8)",
            path,
            "byte 0",
        )
    for magic, what in _BINARY_MAGIC.items():
        if head.startswith(magic) and not (kind == "jsonl.gz" and magic == b"\x1f\x8b"):
            raise InputError(f"binary file ({what}), not text", path, "byte 0")
    if not head:
        return
    ctrl = len(head) - len(head.translate(None, _BINARY_CTRL))
    invalid = head[: _SNIFF_BYTES - 4].decode("utf-8", "replace").count("\ufffd")
    if ctrl > 0.1 * len(head) or invalid > 0.1 * len(head):
        raise InputError(
            f"binary file, not text ({ctrl} control and {invalid} invalid UTF-8 bytes "
            f"in the first {len(head)})",
            path,
        )


def _add(found: dict[Path, CorpusFile], path: Path, root: Path, explicit: bool) -> None:
    kind = _kind(path.name)
    if kind is None:
        if explicit:
            raise InputError(
                f"unknown file extension (expected one of {', '.join(SUFFIXES)})", path
            )
        log.info("skipping %s: not a corpus file (%s)", path, ", ".join(SUFFIXES))
        return
    st = _stat(path)
    if not stat.S_ISREG(st.st_mode):  # a FIFO or device would block or never end
        raise InputError("not a regular file (a pipe, socket or device?)", path)
    resolved = path.resolve()
    if resolved in found:
        return
    _sniff(path, kind)
    rel = os.path.relpath(path, root) if root != path else path.name
    found[resolved] = CorpusFile(resolved, Path(rel).as_posix(), kind, st.st_size)


def _walk(directory: Path, found: dict[Path, CorpusFile], root: Path) -> int:
    """Add the corpus files under ``directory``; return how many were added."""
    before = len(found)
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if not name.startswith("."):
                _add(found, Path(dirpath) / name, root, explicit=False)
    return len(found) - before


def resolve_corpus(specs: list[str]) -> list[CorpusFile]:
    """Resolve files, directories (recursively) and globs into a validated, ordered list.

    Raises ``InputError`` naming the path for a path that does not exist, a symlink loop, an
    empty directory (or one with no corpus files), a glob matching nothing, an explicit file
    with an unknown extension, a binary or UTF-16 file. Files inside directories and glob
    matches with other extensions (a README) are skipped and logged. Order: specs as given,
    files inside each spec sorted by path; duplicates are kept once.
    """
    if not specs:
        raise InputError("no corpus given")
    found: dict[Path, CorpusFile] = {}
    for spec in specs:
        path = Path(spec)
        if glob.has_magic(spec):
            matches = sorted(glob.glob(spec, recursive=True))
            if not matches:
                raise InputError("glob matches no files", spec)
            root = Path(spec.split("*")[0].split("?")[0].split("[")[0] or ".")
            root = root if root.is_dir() else root.parent
            added = 0
            for match in matches:
                m = Path(match)
                if m.is_dir():
                    added += _walk(m, found, root)
                else:
                    before = len(found)
                    _add(found, m, root, explicit=False)
                    added += len(found) - before
            if not added:
                raise InputError(f"glob matches no corpus files ({', '.join(SUFFIXES)})", spec)
            continue
        if path.is_symlink() or not path.exists():
            _stat(path)
        if path.is_dir():
            if not any(path.iterdir()):
                raise InputError("empty directory", path)
            if not _walk(path, found, path):
                raise InputError(f"directory has no corpus files ({', '.join(SUFFIXES)})", path)
        else:
            _add(found, path, path.parent, explicit=True)
    files = list(found.values())
    log.debug("corpus: %d files, %.1f MB", len(files), sum(f.size for f in files) / 1e6)
    return files


def check_parquet_columns(file: CorpusFile, opts: ReadOptions) -> None:
    """Raise ``InputError`` if a parquet file lacks a string text column."""
    try:
        schema = pq.read_schema(file.path)
    except (pa.ArrowException, OSError) as e:
        raise InputError(f"unreadable parquet: {e}", file.path) from None
    if opts.text_field not in schema.names:
        raise InputError(
            f"parquet file has no column {opts.text_field!r} (columns: {', '.join(schema.names)})",
            file.path,
        )
    typ = schema.field(opts.text_field).type
    if not (pa.types.is_string(typ) or pa.types.is_large_string(typ)):
        raise InputError(f"parquet column {opts.text_field!r} is {typ}, not a string", file.path)


def normalise(text: str, counts: Counter) -> str:
    """Apply the corpus normalisation (see the module docstring), counting each change."""
    if text.startswith("\ufeff"):
        text = text[1:]
        counts["bom_removed"] += 1
    if "\r" in text:
        crlf = text.count("\r\n")
        text = text.replace("\r\n", "\n")
        counts["crlf_to_lf"] += crlf
        counts["cr_to_lf"] += text.count("\r")
        text = text.replace("\r", "\n")
    if _CONTROL.search(text):
        nul = text.count("\x00")
        stripped = _CONTROL.sub("", text)
        counts["nul_removed"] += nul
        counts["control_removed"] += len(text) - len(stripped) - nul
        text = stripped
    return text


def _decode_error(raw: bytes, err: UnicodeDecodeError, path: Path, offset: int) -> InputError:
    bad = raw[err.start : err.start + 1].hex().upper()
    return InputError(
        f"invalid UTF-8 (byte 0x{bad}); use on_decode_error=replace or skip to accept it",
        path,
        f"byte {offset + err.start}",
    )


def _apply_decode_policy(text: str, opts: ReadOptions, counts: Counter) -> str | None:
    """Resolve lone surrogates (undecodable bytes) per policy: text, or None to skip."""
    if not _SURROGATE.search(text):
        return text
    if opts.on_decode_error == "skip":
        counts["skipped_invalid_utf8"] += 1
        return None
    bad = len(_SURROGATE.findall(text))
    counts["invalid_utf8_replaced"] += bad
    return _SURROGATE.sub("\ufffd", text)


def txt_documents(
    file: CorpusFile, start: int, end: int, opts: ReadOptions, counts: Counter
) -> Iterator[str]:
    """Normalised paragraph texts of ``file[start:end]`` (which starts at a paragraph)."""
    with open(file.path, "rb") as f:
        f.seek(start)
        raw = f.read(end - start)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        if opts.on_decode_error == "error":
            raise _decode_error(raw, e, file.path, start) from None
        text = raw.decode("utf-8", "surrogateescape")
    text = normalise(text, counts)
    for para in _PARAGRAPH_BREAK.split(text):
        para = para.strip()
        if not para:
            continue
        para = _apply_decode_policy(para, opts, counts)
        if para is not None:
            yield para


def _json_document(
    line: bytes, lineno: int, offset: int, path: Path, opts: ReadOptions, counts: Counter
) -> tuple[str | None, str | None]:
    """Parse one JSONL line into (doc id or None, text or None when skipped)."""
    try:
        decoded = line.decode("utf-8")
    except UnicodeDecodeError as e:
        if opts.on_decode_error == "error":
            raise _decode_error(line, e, path, offset) from None
        decoded = line.decode("utf-8", "surrogateescape")
    try:
        obj = json.loads(decoded)
    except json.JSONDecodeError as e:
        where = f"line {lineno}"
        raise InputError(f"malformed JSON: {e.msg} (column {e.colno})", path, where) from None
    if not isinstance(obj, dict):
        raise InputError(
            f"expected a JSON object, got {type(obj).__name__}", path, f"line {lineno}"
        )
    if opts.text_field not in obj:
        raise InputError(f"missing text field {opts.text_field!r}", path, f"line {lineno}")
    text = obj[opts.text_field]
    if not isinstance(text, str):
        raise InputError(
            f"text field {opts.text_field!r} is {type(text).__name__}, not a string",
            path,
            f"line {lineno}",
        )
    doc_id = obj.get(opts.id_field)
    if doc_id is not None and not isinstance(doc_id, str | int):
        raise InputError(
            f"id field {opts.id_field!r} is {type(doc_id).__name__}, not a string or integer",
            path,
            f"line {lineno}",
        )
    text = _apply_decode_policy(text, opts, counts)
    return (None if doc_id is None else str(doc_id)), text


def jsonl_documents(
    file: CorpusFile,
    start: int,
    end: int,
    first_line: int,
    opts: ReadOptions,
    counts: Counter,
) -> Iterator[Document]:
    """Documents of ``file[start:end]`` (whole lines; ``first_line`` is the 0-based index)."""
    with open(file.path, "rb") as f:
        f.seek(start)
        raw = f.read(end - start)
    pos = 0
    lineno = first_line
    n = len(raw)
    while pos < n:
        nl = raw.find(b"\n", pos)
        stop = n if nl < 0 else nl
        line = raw[pos:stop]
        if start + pos == 0 and line.startswith(b"\xef\xbb\xbf"):
            line = line[3:]
            counts["bom_removed"] += 1
        doc = _jsonl_line(line, lineno, start + pos, file, opts, counts)
        if doc is not None:
            yield doc
        pos = stop + 1
        lineno += 1


def _jsonl_line(
    line: bytes, lineno: int, offset: int, file: CorpusFile, opts: ReadOptions, counts: Counter
) -> Document | None:
    if not line.strip():
        counts["skipped_blank_line"] += 1
        return None
    doc_id, text = _json_document(line, lineno + 1, offset, file.path, opts, counts)
    if text is None:
        return None
    text = normalise(text, counts)
    if not text.strip():
        counts["skipped_blank_document"] += 1
        return None
    return Document(doc_id if doc_id is not None else f"{file.rel}#{lineno}", text)


def gzip_documents(file: CorpusFile, opts: ReadOptions, counts: Counter) -> Iterator[Document]:
    """Documents of a ``.jsonl.gz`` file, streamed (offsets in errors are uncompressed)."""
    offset = 0
    lineno = 0
    try:
        with gzip.open(file.path, "rb") as f:
            for line in f:
                body = line.rstrip(b"\n")
                if offset == 0 and body.startswith(b"\xef\xbb\xbf"):
                    body = body[3:]
                    counts["bom_removed"] += 1
                doc = _jsonl_line(body, lineno, offset, file, opts, counts)
                if doc is not None:
                    yield doc
                offset += len(line)
                lineno += 1
    except EOFError:
        raise InputError(
            "truncated gzip (compressed stream ends early)",
            file.path,
            f"after line {lineno}, uncompressed byte {offset}",
        ) from None
    except (gzip.BadGzipFile, zlib.error) as e:
        raise InputError(f"corrupt gzip: {e}", file.path, f"after line {lineno}") from None


def parquet_documents(
    file: CorpusFile, row_groups: range, first_row: int, opts: ReadOptions, counts: Counter
) -> Iterator[Document]:
    """Documents of the given row groups of a parquet file (``first_row``: their first row)."""
    pf = pq.ParquetFile(file.path)
    has_id = opts.id_field in pf.schema_arrow.names
    columns = [opts.text_field, opts.id_field] if has_id else [opts.text_field]
    row = first_row
    for rg in row_groups:
        table = pf.read_row_group(rg, columns=columns)
        texts = table.column(opts.text_field).to_pylist()
        ids = table.column(opts.id_field).to_pylist() if has_id else [None] * len(texts)
        for doc_id, text in zip(ids, texts, strict=True):
            index = row
            row += 1
            if text is None:
                counts["skipped_null_text"] += 1
                continue
            text = normalise(text, counts)
            if not text.strip():
                counts["skipped_blank_document"] += 1
                continue
            yield Document(str(doc_id) if doc_id is not None else f"{file.rel}#{index}", text)


def iter_documents(
    file: CorpusFile, opts: ReadOptions, counts: Counter | None = None
) -> Iterator[Document]:
    """Every document of ``file`` in order (a whole-file read; the split stage uses chunks)."""
    counts = Counter() if counts is None else counts
    if file.kind == "txt":
        for index, text in enumerate(txt_documents(file, 0, file.size, opts, counts)):
            yield Document(f"{file.rel}#{index}", text)
    elif file.kind == "jsonl":
        yield from jsonl_documents(file, 0, file.size, 0, opts, counts)
    elif file.kind == "jsonl.gz":
        yield from gzip_documents(file, opts, counts)
    else:
        check_parquet_columns(file, opts)
        n = pq.ParquetFile(file.path).num_row_groups
        yield from parquet_documents(file, range(n), 0, opts, counts)
