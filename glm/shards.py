"""The shard stage: sentences + tokenizer -> memory-mappable Arrow IPC token shards.

One row per document: ``doc_id: string``, ``tokens: large_list<int32>``,
``sentence_starts: large_list<int32>`` (token offset of each sentence; the first is 0) and
``text_bytes: int64`` (UTF-8 bytes of the document, for bits per byte). 64-bit list offsets
keep a shard past 2 GB safe. Files are uncompressed so a reader maps them without copying.

A document goes to validation when ``int(sha256(doc_id), 16) % val_modulus == 0``: the
split of a document never changes when the corpus grows. Every shard is written to a temp
file and renamed, inside a stage directory that itself only appears, with
``manifest.json``, once everything is written.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.ipc as ipc

from glm.atomic import atomic_dir, write_json_atomic
from glm.corpus import CorpusFile, ReadOptions, iter_documents
from glm.digest import sha256_file
from glm.errors import InputError, IntegrityError
from glm.faults import fault_point
from glm.split import no_text_error, sentence_batches
from glm.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLITS = ("train", "val")
# sentences per encode call: large calls keep sentencepiece's threads evenly loaded
_ENCODE_ROWS = 65536
SHARD_SCHEMA = pa.schema(
    [
        ("doc_id", pa.string()),
        ("tokens", pa.large_list(pa.int32())),
        ("sentence_starts", pa.large_list(pa.int32())),
        ("text_bytes", pa.int64()),
    ]
)


@dataclass
class ShardConfig:
    """Settings of the shard stage."""

    # a shard is closed once it holds at least this many tokens (16 MB of int32 ids)
    shard_tokens: int = 4_000_000
    # a document is in validation when hash(doc_id) % val_modulus == 0 (20: about 5%)
    val_modulus: int = 20
    # encode threads; 0 means one per CPU core
    num_threads: int = 0

    def __post_init__(self) -> None:
        if self.shard_tokens < 1:
            raise InputError(f"shard_tokens must be >= 1, not {self.shard_tokens}")
        if self.val_modulus < 2:
            raise InputError(f"val_modulus must be >= 2, not {self.val_modulus}")
        if self.num_threads < 0:
            raise InputError(f"num_threads must be >= 0, not {self.num_threads}")


@dataclass(frozen=True)
class Document:
    """One document of a shard; the arrays are views into the memory-mapped file."""

    doc_id: str
    tokens: np.ndarray
    sentence_starts: np.ndarray
    text_bytes: int


def is_validation(doc_id: str, val_modulus: int = 20) -> bool:
    """Whether a document belongs to the validation split (stable as the corpus grows)."""
    return int(hashlib.sha256(doc_id.encode()).hexdigest(), 16) % val_modulus == 0


def check_corpus(files: list[CorpusFile], opts: ReadOptions, val_modulus: int | None) -> dict:
    """Read every document once, as the split and shard stages will, and fail now.

    The first malformed record, a corpus without text, and a corpus whose documents all fall
    on one side of the validation rule (unless ``val_modulus`` is None) raise ``InputError``
    with the messages the stages give, so a run can refuse its input before it starts
    anything. Returns the counts.
    """
    counts = {"documents": 0, "val": 0}
    for file in files:
        for doc in iter_documents(file, opts):
            counts["documents"] += 1
            counts["val"] += val_modulus is not None and is_validation(doc.doc_id, val_modulus)
    where = files[0].path if len(files) == 1 else f"{len(files)} files"
    if counts["documents"] == 0:
        raise no_text_error(len(files), where)
    if val_modulus is not None:
        check_split_sizes(counts["documents"] - counts["val"], counts["val"], val_modulus, where)
    return counts


def check_split_sizes(train_docs: int, val_docs: int, val_modulus: int, where) -> None:
    """Training needs training documents; evaluation and the champion gate need validation
    ones: fail before training when either side is empty."""
    if train_docs == 0:
        raise InputError("no training documents: every document fell into validation", where)
    if val_docs == 0:
        raise InputError(
            f"no validation documents: none of the {train_docs} documents has "
            f"hash(doc id) % {val_modulus} == 0; the corpus is too small to evaluate on "
            "(add documents or lower shard.val_modulus)",
            where,
        )


class _ShardWriter:
    """Collects runs of documents of one split; writes a shard whenever the budget is met."""

    def __init__(self, out_dir: Path, split: str, shard_tokens: int):
        self.dir = out_dir / split
        self.split = split
        self.shard_tokens = shard_tokens
        self.entries: list[dict] = []
        self.documents = 0
        self.sentences = 0
        self._reset()

    def _reset(self) -> None:
        self.ids: list[str] = []
        self.tokens: list[np.ndarray] = []
        self.starts: list[np.ndarray] = []
        self.doc_tokens: list[np.ndarray] = []
        self.doc_sentences: list[np.ndarray] = []
        self.text_bytes: list[np.ndarray] = []
        self.n_tokens = 0

    def add_run(
        self,
        ids: list[str],
        tokens: np.ndarray,
        starts: np.ndarray,
        doc_tokens: np.ndarray,
        doc_sentences: np.ndarray,
        text_bytes: np.ndarray,
    ) -> None:
        """Add consecutive documents: their ids, flat tokens and sentence starts, and per
        document token counts, sentence counts and text bytes."""
        while ids:
            # take documents up to the one that fills the shard's budget
            room = self.shard_tokens - self.n_tokens
            cum = np.cumsum(doc_tokens)
            k = int(np.searchsorted(cum, room)) + 1 if cum[-1] >= room else len(ids)
            n_tok, n_sent = int(cum[k - 1]), int(doc_sentences[:k].sum())
            self.ids.extend(ids[:k])
            self.tokens.append(tokens[:n_tok])
            self.starts.append(starts[:n_sent])
            self.doc_tokens.append(doc_tokens[:k])
            self.doc_sentences.append(doc_sentences[:k])
            self.text_bytes.append(text_bytes[:k])
            self.n_tokens += n_tok
            self.documents += k
            self.sentences += n_sent
            if self.n_tokens >= self.shard_tokens:
                self.flush()
            ids, tokens, starts = ids[k:], tokens[n_tok:], starts[n_sent:]
            doc_tokens, doc_sentences = doc_tokens[k:], doc_sentences[k:]
            text_bytes = text_bytes[k:]

    def flush(self) -> None:
        """Write the collected documents as the next shard (temp file, fsync, rename)."""
        if not self.ids:
            return
        text_bytes = np.concatenate(self.text_bytes).astype(np.int64)
        table = pa.Table.from_arrays(
            [
                pa.array(self.ids, pa.string()),
                _large_list(np.concatenate(self.doc_tokens), np.concatenate(self.tokens)),
                _large_list(np.concatenate(self.doc_sentences), np.concatenate(self.starts)),
                pa.array(text_bytes, pa.int64()),
            ],
            schema=SHARD_SCHEMA,
        )
        name = f"shard-{len(self.entries):05d}.arrow"
        self.dir.mkdir(parents=True, exist_ok=True)
        final = self.dir / name
        tmp = self.dir / f".{name}.tmp"
        with open(tmp, "wb") as f:
            with ipc.new_file(f, SHARD_SCHEMA) as writer:
                writer.write_table(table)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
        fault_point("shard", len(self.entries) + 1, self.dir)
        self.entries.append(
            {
                "split": self.split,
                "path": f"{self.split}/{name}",
                "rows": len(self.ids),
                "tokens": self.n_tokens,
                "bytes": final.stat().st_size,
                "text_bytes": int(text_bytes.sum()),
                "sha256": sha256_file(final),
            }
        )
        self._reset()


def _large_list(lengths: np.ndarray, values: np.ndarray) -> pa.LargeListArray:
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return pa.LargeListArray.from_arrays(pa.array(offsets), pa.array(values, pa.int32()))


def _grouped(batches: Iterator[pa.RecordBatch], min_rows: int) -> Iterator[pa.RecordBatch]:
    """Merge consecutive record batches into ones of at least ``min_rows`` rows."""
    group: list[pa.RecordBatch] = []
    rows = 0
    for batch in batches:
        group.append(batch)
        rows += batch.num_rows
        if rows >= min_rows:
            yield pa.Table.from_batches(group).combine_chunks().to_batches()[0]
            group, rows = [], 0
    if group:
        yield pa.Table.from_batches(group).combine_chunks().to_batches()[0]


def _encode_batch(tok: Tokenizer, batch: pa.RecordBatch, threads: int) -> tuple:
    """Encode one record batch (whole documents) into flat arrays and document bounds."""
    ids = tok.sp.encode(batch.column("text").to_pylist(), num_threads=threads)
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
    return flat, lengths


def _route(
    batch: pa.RecordBatch,
    flat: np.ndarray,
    lengths: np.ndarray,
    writers: dict[str, _ShardWriter],
    cfg: ShardConfig,
    sentences_dir: str | Path,
) -> None:
    """Cut an encoded batch into documents and hand runs of them to the split's writer."""
    n = len(lengths)
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    first = batch.column("sentence_index").to_numpy() == 0
    # the split stage ends record batches at document ends; rely on it
    if n and not first[0]:
        raise IntegrityError(f"{sentences_dir}: a document spans two record batches")
    bounds = np.flatnonzero(first)
    row_doc = np.cumsum(first) - 1
    starts = (offsets[:-1] - offsets[bounds][row_doc]).astype(np.int32)
    doc_tokens = np.diff(offsets[np.append(bounds, n)])
    doc_sentences = np.diff(np.append(bounds, n))
    row_bytes = pc.binary_length(batch.column("text")).to_numpy()
    text_bytes = np.add.reduceat(row_bytes, bounds) if n else row_bytes
    doc_ids = batch.column("doc_id").take(pa.array(bounds)).to_pylist()
    is_val = [is_validation(d, cfg.val_modulus) for d in doc_ids]
    # hand over runs of consecutive documents of one split: slices, not copies
    doc = 0
    for val, group in itertools.groupby(is_val):
        k = len(list(group))
        a, b = doc, doc + k
        rows = (bounds[a], bounds[b] if b < len(bounds) else n)
        writers["val" if val else "train"].add_run(
            doc_ids[a:b],
            flat[offsets[rows[0]] : offsets[rows[1]]],
            starts[rows[0] : rows[1]],
            doc_tokens[a:b],
            doc_sentences[a:b],
            text_bytes[a:b],
        )
        doc = b


def write_shards(
    sentences_dir: str | Path, tokenizer_dir: str | Path, out_dir: str | Path, cfg: ShardConfig
) -> dict:
    """Tokenize the split stage's sentences and write train/val shards + manifest.json (last).

    Returns the manifest.
    """
    t0 = time.perf_counter()
    tok = Tokenizer.load(tokenizer_dir)
    threads = cfg.num_threads or os.cpu_count() or 1
    with atomic_dir(out_dir) as tmp, ThreadPoolExecutor(1) as encoder:
        writers = {s: _ShardWriter(tmp, s, cfg.shard_tokens) for s in SPLITS}
        # encode group k+1 (sentencepiece releases the GIL) while group k is written
        pending = None
        for batch in _grouped(sentence_batches(sentences_dir), _ENCODE_ROWS):
            job = (batch, encoder.submit(_encode_batch, tok, batch, threads))
            if pending is not None:
                _route(pending[0], *pending[1].result(), writers, cfg, sentences_dir)
            pending = job
        if pending is not None:
            _route(pending[0], *pending[1].result(), writers, cfg, sentences_dir)
        for w in writers.values():
            w.flush()

        entries = writers["train"].entries + writers["val"].entries
        stats = {
            s: {
                "documents": w.documents,
                "sentences": w.sentences,
                "tokens": sum(e["tokens"] for e in w.entries),
                "text_bytes": sum(e["text_bytes"] for e in w.entries),
                "shards": len(w.entries),
            }
            for s, w in writers.items()
        }
        train_docs, val_docs = stats["train"]["documents"], stats["val"]["documents"]
        check_split_sizes(train_docs, val_docs, cfg.val_modulus, sentences_dir)
        manifest = {
            "format_version": FORMAT_VERSION,
            "tokenizer_sha256": tok.sha256,
            "vocab_size": tok.vocab_size,
            "shards": entries,
            "stats": stats,
            "config": {k: v for k, v in asdict(cfg).items() if k != "num_threads"},
        }
        write_json_atomic(tmp / "manifest.json", manifest)
    dt = time.perf_counter() - t0
    text_mb = (stats["train"]["text_bytes"] + stats["val"]["text_bytes"]) / 1e6
    log.info(
        "sharded %d train / %d val docs, %d / %d tokens, into %d shards in %.1f s (%.1f MB/s)",
        stats["train"]["documents"],
        stats["val"]["documents"],
        stats["train"]["tokens"],
        stats["val"]["tokens"],
        len(entries),
        dt,
        text_mb / max(dt, 1e-9),
    )
    return manifest


class ShardReader:
    """Reads a shard stage through its manifest: memory-mapped tables, documents, checks."""

    def __init__(self, manifest_path: str | Path):
        self.path = Path(manifest_path)
        if not self.path.is_file():
            raise IntegrityError(f"{self.path}: manifest missing; the shard stage did not finish")
        self.root = self.path.parent
        self.manifest = json.loads(self.path.read_text())
        version = self.manifest.get("format_version")
        if version != FORMAT_VERSION:
            raise IntegrityError(
                f"{self.path}: format_version {version}, this code reads {FORMAT_VERSION}"
            )

    def shards(self, split: str | None = None) -> list[dict]:
        """Manifest entries of ``split`` (all when None)."""
        return [e for e in self.manifest["shards"] if split is None or e["split"] == split]

    def tables(self, split: str) -> list[pa.Table]:
        """The shards of ``split`` as memory-mapped tables (no copy of the token data)."""
        tables = []
        for entry in self.shards(split):
            path = self.root / entry["path"]
            if not path.is_file():
                raise IntegrityError(f"{path}: shard missing")
            try:
                tables.append(ipc.open_file(pa.memory_map(str(path))).read_all())
            except pa.ArrowInvalid as e:
                raise IntegrityError(f"{path}: unreadable shard ({e})") from None
        return tables

    def documents(self, split: str) -> Iterator[Document]:
        """Every document of ``split``, in shard order, as zero-copy numpy views."""
        for table in self.tables(split):
            for batch in table.to_batches():
                ids = batch.column("doc_id").to_pylist()
                tok_col, st_col = batch.column("tokens"), batch.column("sentence_starts")
                tok_off, tok_val = tok_col.offsets.to_numpy(), tok_col.values.to_numpy()
                st_off, st_val = st_col.offsets.to_numpy(), st_col.values.to_numpy()
                text_bytes = batch.column("text_bytes").to_numpy()
                for i, doc_id in enumerate(ids):
                    yield Document(
                        doc_id,
                        tok_val[tok_off[i] : tok_off[i + 1]],
                        st_val[st_off[i] : st_off[i + 1]],
                        int(text_bytes[i]),
                    )

    def verify(self, split: str | None = None) -> list[str]:
        """Check every shard's presence, size and sha256; one problem line per bad file."""
        problems = []
        for entry in self.shards(split):
            path = self.root / entry["path"]
            if not path.is_file():
                problems.append(f"{path}: missing")
                continue
            size = path.stat().st_size
            if size != entry["bytes"]:
                what = "truncated" if size < entry["bytes"] else "size mismatch"
                problems.append(f"{path}: {what} ({size} bytes, manifest says {entry['bytes']})")
                continue
            digest = sha256_file(path)
            if digest != entry["sha256"]:
                problems.append(
                    f"{path}: checksum mismatch (sha256 {digest[:12]}, "
                    f"manifest says {entry['sha256'][:12]})"
                )
        return problems

    def verify_or_raise(self, split: str | None = None) -> None:
        """Raise ``IntegrityError`` naming every bad shard file, if any."""
        problems = self.verify(split)
        if problems:
            raise IntegrityError("; ".join(problems))
