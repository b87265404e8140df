"""The bad-input catalogue: every kind of bad or odd input and its exact outcome.

Three outcomes:

- **error**: the run stops before any stage output exists, with one line naming what is
  wrong, the file and the place (line or byte offset); ``glm run`` exits 2 and prints no
  traceback (``ERRORS``, ``BAD_PARAMETERS``);
- **handled**: normalised as ``glm/corpus.py`` documents, counted in ``stats.json``,
  tokenized as plain text (a literal ``[MASK]`` never becomes the special id) and trained on
  (``HANDLED``);
- **documented choice**: UTF-16 with a byte order mark is an error with a hint to convert
  it; NUL bytes inside text are removed and counted, a file that is mostly NUL is binary; a
  corpus smaller than one training sequence trains (its windows repeat) as long as it has a
  validation document, and one with no validation document stops at the shard stage, before
  training; a vocabulary larger than the corpus supports is clamped with a warning.

Each error case runs through the real flow (``glm_pipeline`` on the session's Prefect
server, ``until="split"``) where the message, the file and the place are checked; a
representative few run through the ``glm`` CLI for the console contract. The messages of
the core functions are also asserted case by case in tests/test_corpus.py and
tests/test_split.py; the CLI's parameter errors in tests/test_cli.py.
"""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parents[1]
GLM = str(Path(sys.executable).with_name("glm"))


# the error catalogue --------------------------------------------------------------------------


@dataclass(frozen=True)
class Bad:
    """One kind of bad input: how to make it, and what the one-line error must say."""

    kind: str
    make: Callable[[Path], str]  # writes the input under a directory; returns the --corpus spec
    what: str  # the error's description
    file: str  # the file (or spec) the line names
    where: str | None = None  # "line N" / "byte N" where the input says it

    def __str__(self) -> str:
        return self.kind


def _write(path: Path, data: bytes | str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return str(path)


def _jsonl(*rows) -> bytes:
    return b"".join((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n" for r in rows)


def _loop(d: Path) -> str:
    link = d / "loop.txt"
    link.symlink_to(link)
    return str(link)


def _empty_dir(d: Path) -> str:
    (d / "emptydir").mkdir()
    return str(d / "emptydir")


def _gzip_truncated(d: Path) -> str:
    blob = gzip.compress(_jsonl(*({"text": f"Document number {i}."} for i in range(2000))))
    return _write(d / "cut.jsonl.gz", blob[: len(blob) // 2])


def _parquet(d: Path, name: str, table: pa.Table) -> str:
    pq.write_table(table, d / name)
    return str(d / name)


# a bad byte deep in a .txt larger than one split chunk (1 MiB): the offset is the file's
_BIG_PREFIX = ("The quick brown fox jumps over the lazy dog.\n\n" * 50_000).encode()
_JSONL_PREFIX = _jsonl({"text": "first"}, {"text": "second"})

ERRORS = [
    Bad("empty file", lambda d: _write(d / "empty.txt", b""), "corpus has no text", "empty.txt"),
    Bad(
        "whitespace-only file",
        lambda d: _write(d / "blank.txt", " \n\t\n   \n\n"),
        "corpus has no text",
        "blank.txt",
    ),
    Bad(
        "whitespace-only jsonl texts",
        lambda d: _write(d / "blank.jsonl", _jsonl({"text": "  "}, {"text": "\n\t"})),
        "corpus has no text",
        "blank.jsonl",
    ),
    Bad("empty directory", _empty_dir, "empty directory", "emptydir"),
    Bad(
        "directory without corpus files",
        lambda d: str(Path(_write(d / "docs" / "README.md", "hi")).parent),
        "directory has no corpus files",
        "docs",
    ),
    Bad("missing path", lambda d: str(d / "missing.jsonl"), "path does not exist", "missing.jsonl"),
    Bad("glob matching nothing", lambda d: str(d / "*.nothing"), "glob matches no files", "*"),
    Bad("symlink loop", _loop, "symlink loop", "loop.txt"),
    Bad(
        "binary file (PNG named .txt)",
        lambda d: _write(d / "pic.txt", b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4),
        "binary file (a PNG image), not text",
        "pic.txt",
        "byte 0",
    ),
    Bad(
        "binary file (no magic)",
        lambda d: _write(d / "noise.jsonl", bytes(range(256)) * 16),
        "binary file, not text",
        "noise.jsonl",
    ),
    Bad(
        "gzip data named .txt",
        lambda d: _write(d / "packed.txt", gzip.compress(b"hello world\n" * 100)),
        "gzip data (name it .jsonl.gz)",
        "packed.txt",
        "byte 0",
    ),
    Bad(
        "invalid UTF-8 deep in a multi-chunk .txt",
        lambda d: _write(d / "big.txt", _BIG_PREFIX + b"Caf\xe9 au lait.\n"),
        "invalid UTF-8 (byte 0xE9)",
        "big.txt",
        f"byte {len(_BIG_PREFIX) + 3}",
    ),
    Bad(
        "invalid UTF-8 in a JSONL line",
        lambda d: _write(d / "latin1.jsonl", _JSONL_PREFIX + b'{"text": "na\xefve"}\n'),
        "invalid UTF-8 (byte 0xEF)",
        "latin1.jsonl",
        f"byte {len(_JSONL_PREFIX) + 12}",
    ),
    Bad(
        "malformed JSONL line",
        lambda d: _write(d / "bad.jsonl", _jsonl({"text": "a"}, {"text": "b"}, b'{"text": "c",}')),
        "malformed JSON",
        "bad.jsonl",
        "line 3",
    ),
    Bad(
        "JSONL line that is not an object",
        lambda d: _write(d / "array.jsonl", _jsonl(["just", "a", "list"])),
        "expected a JSON object, got list",
        "array.jsonl",
        "line 1",
    ),
    Bad(
        "JSONL text that is a number",
        lambda d: _write(d / "num.jsonl", _jsonl({"text": "ok"}, {"text": 42})),
        "text field 'text' is int, not a string",
        "num.jsonl",
        "line 2",
    ),
    Bad(
        "JSONL text that is null",
        lambda d: _write(d / "null.jsonl", _jsonl({"text": None})),
        "text field 'text' is NoneType, not a string",
        "null.jsonl",
        "line 1",
    ),
    Bad(
        "JSONL without the text field",
        lambda d: _write(d / "body.jsonl", _jsonl({"text": "ok"}, {"body": "where is text"})),
        "missing text field 'text'",
        "body.jsonl",
        "line 2",
    ),
    Bad(
        "JSONL id of the wrong type",
        lambda d: _write(d / "ids.jsonl", _jsonl({"text": "ok", "id": {"nested": 1}})),
        "id field 'id' is dict, not a string or integer",
        "ids.jsonl",
        "line 1",
    ),
    Bad("truncated gzip", _gzip_truncated, "truncated gzip", "cut.jsonl.gz", "after line"),
    Bad(
        "malformed line inside gzip",
        lambda d: _write(d / "inner.jsonl.gz", gzip.compress(_jsonl({"text": "a"}, b"{oops"))),
        "malformed JSON",
        "inner.jsonl.gz",
        "line 2",
    ),
    Bad(
        "plain text named .jsonl.gz",
        lambda d: _write(d / "plain.jsonl.gz", _jsonl({"text": "a"})),
        "not gzip data",
        "plain.jsonl.gz",
        "byte 0",
    ),
    Bad(
        "parquet without the text column",
        lambda d: _parquet(d, "cols.parquet", pa.table({"body": ["a", "b"]})),
        "parquet file has no column 'text' (columns: body)",
        "cols.parquet",
    ),
    Bad(
        "parquet text column of integers",
        lambda d: _parquet(d, "ints.parquet", pa.table({"text": [1, 2]})),
        "parquet column 'text' is int64, not a string",
        "ints.parquet",
    ),
    Bad(
        "not a parquet file",
        lambda d: _write(d / "fake.parquet", "text,id\nhello,1\n"),
        "not a parquet file (no PAR1 magic)",
        "fake.parquet",
        "byte 0",
    ),
    Bad(
        "unknown extension",
        lambda d: _write(d / "notes.docx", "some text"),
        "unknown file extension",
        "notes.docx",
    ),
    # documented choices that end in an error
    Bad(
        "UTF-16 with a byte order mark",
        lambda d: _write(d / "u16.txt", "Hello, world.\n".encode("utf-16")),
        "UTF-16 text (byte order mark FF FE) is not supported; convert it to UTF-8",
        "u16.txt",
        "byte 0",
    ),
    Bad(
        "file that is mostly NUL bytes",
        lambda d: _write(d / "zeros.txt", b"text" + bytes(4096)),
        "binary file, not text",
        "zeros.txt",
    ),
]


def _params(ws: Path, corpus: list[str], **extra):
    from flows.params import PipelineParams

    values = {
        "corpus": corpus,
        "workspace": str(ws),
        "preset": "tiny",
        "until": "split",
        "retries": 0,
        "tracking_uri": f"sqlite:///{ws / 'mlflow.db'}",
    }
    return PipelineParams.model_validate(values | extra)


def _stage_outputs(ws: Path) -> list[Path]:
    """Anything a stage left under WORKSPACE/stages: output dirs, temp dirs, files."""
    return [p for p in (ws / "stages").glob("*/*")] if (ws / "stages").exists() else []


@pytest.mark.parametrize("case", ERRORS, ids=str)
def test_error_through_the_flow(case: Bad, prefect_api, tmp_path):
    from flows.pipeline import glm_pipeline
    from glm.errors import InputError

    (tmp_path / "in").mkdir()
    spec = case.make(tmp_path / "in")
    ws = tmp_path / "ws"
    with pytest.raises(InputError) as info:
        glm_pipeline(_params(ws, [spec]))
    err = info.value
    message = str(err)
    assert "\n" not in message
    assert case.what in message
    assert case.file in (err.path or ""), message
    if case.where:
        assert (err.where or "").startswith(case.where), message
    assert _stage_outputs(ws) == []


@pytest.mark.parametrize("case", ERRORS, ids=str)
def test_preflight_finds_it_before_any_stage(case: Bad, tmp_path):
    # `glm run` reads the corpus once before Prefect starts: the same one line, no output
    from glm.corpus import resolve_corpus
    from glm.errors import InputError
    from glm.shards import check_corpus
    from glm.split import SplitConfig

    (tmp_path / "in").mkdir()
    spec = case.make(tmp_path / "in")
    with pytest.raises(InputError) as info:
        check_corpus(resolve_corpus([spec]), SplitConfig(), val_modulus=20)
    err = info.value
    assert case.what in str(err) and case.file in (err.path or ""), str(err)
    if case.where:
        assert (err.where or "").startswith(case.where), str(err)


def test_the_catalogue_is_complete():
    # issue #5: at least 25 kinds of bad or odd input, each with its exact outcome
    assert len(ERRORS) + len(HANDLED) >= 25
    assert len({c.kind for c in ERRORS}) == len(ERRORS)


# invalid parameters ----------------------------------------------------------------------------

BAD_PARAMETERS = [
    ({"max_steps": -5}, "max_steps"),
    ({"max_steps": 0}, "max_steps"),
    ({"preset": "huge"}, "unknown preset 'huge'"),
    ({"until": "deploy"}, "until"),
    ({"force": ["everything"]}, "force"),
    ({"retries": -1}, "retries"),
    ({"retry_backoff_s": -2.0}, "retry_backoff_s"),
    ({"on_decode_error": "ignore"}, "on_decode_error"),
    ({"epochs": 3}, "epochs"),
    ({"corpus": []}, "corpus"),
    ({"corpus": ["  "]}, "empty corpus path"),
    ({"tokenizer": {"vocab_size": 10}}, "tokenizer.vocab_size must be >= 300"),
    ({"tokenizer": {"vocab_sise": 900}}, "tokenizer.vocab_sise: unknown setting; known: "),
    ({"split": {"workers": -1}}, "split.workers must be >= 0"),
    ({"train": {"batch_size": 0}}, "train."),
    ({"shard": {"val_modulus": 1}}, "shard.val_modulus must be >= 2"),
    ({"device": "tpu"}, "device: must be auto, cpu, cuda or cuda:N, not 'tpu'"),
    ({"train": {"batch_size": 2.5}}, "train.batch_size: expected int, got 2.5"),
    ({"model": {"n_layer": "4"}}, "model.n_layer: expected int, got '4'"),
    ({"train": {"lr": "fast"}}, "train.lr: expected float, got 'fast'"),
    ({"eval": {"cloze_items": True}}, "eval.cloze_items: expected int, got True"),
    ({"eval": {"cloze_items": -5}}, "eval.cloze_items: must be >= 0"),
]


def test_a_single_corpus_path_needs_no_list():
    from flows.params import PipelineParams

    assert PipelineParams.model_validate({"corpus": "data/a.txt"}).corpus == ["data/a.txt"]


@pytest.mark.parametrize(("overrides", "named"), BAD_PARAMETERS, ids=lambda v: str(v))
def test_invalid_parameters_fail_before_anything_runs(overrides, named, tmp_path):
    from pydantic import ValidationError

    from flows.params import PipelineParams, describe_validation_error

    values = {"corpus": [str(ROOT / "data")], "workspace": str(tmp_path / "ws")} | overrides
    with pytest.raises(ValidationError) as info:
        PipelineParams.model_validate(values)
    line = describe_validation_error(info.value)
    assert named in line and "\n" not in line
    assert not (tmp_path / "ws").exists()


# handled inputs ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Odd:
    """Odd input that must be handled: a document, its id, its normalised text, its count."""

    kind: str
    doc_id: str
    raw: bytes  # the document as it sits in its file
    text: str  # what the split stage must make of it
    counts: dict  # normalisation counters it adds

    def __str__(self) -> str:
        return self.kind


def _zh_without_punctuation(n_bytes: int) -> str:
    lines = (ROOT / "data" / "zh-classics.jsonl").read_text().splitlines()
    rows = [json.loads(line)["text"] for line in lines]
    chars = [c for c in "".join(rows) if "\u4e00" <= c <= "\u9fff"]
    text = "".join(chars)
    return (text * (n_bytes // len(text.encode()) + 1))[: n_bytes // 3]


_ZH = _zh_without_punctuation(50_000)
_EMOJI = "Emoji 😀 👩‍👩‍👧 🧬 and rare scripts: 𐌰𐌱𐌲 (Gothic), 𒀀𒀁 (Cuneiform), ⵣⵉⵏ (Tifinagh)."
_MIXED = "我在学习Python和MachineLearning然后去吃饭了。Then我们went home好的OK。"
_LITERAL = "Write [MASK] or <eop> literally, even [gMASK] and <sop>[sMASK][PAD]."


def _line(text: str, doc_id: str) -> bytes:
    return json.dumps({"id": doc_id, "text": text}, ensure_ascii=False).encode() + b"\n"


HANDLED = [
    Odd(
        "UTF-8 BOM in a .txt",
        "bom.txt#0",
        b"\xef\xbb\xbfA file that starts with a byte order mark.\n",
        "A file that starts with a byte order mark.",
        {"bom_removed": 1},
    ),
    Odd(
        "UTF-8 BOM in a .jsonl",
        "bom-jsonl",
        b"\xef\xbb\xbf" + _line("A JSONL file with a byte order mark.", "bom-jsonl"),
        "A JSONL file with a byte order mark.",
        {"bom_removed": 1},
    ),
    Odd(
        "CRLF line ends",
        "crlf.txt#0",
        b"Windows line one.\r\nWindows line two.\r\n",
        "Windows line one.\nWindows line two.",
        {"crlf_to_lf": 2},
    ),
    Odd(
        "lone CR",
        "lone-cr",
        _line("Old Mac line one.\rOld Mac line two.", "lone-cr"),
        "Old Mac line one.\nOld Mac line two.",
        {"cr_to_lf": 1},
    ),
    Odd(
        "control characters",
        "control",
        _line("A bell\x07, an escape\x1b[0m and a vertical tab\x0b here.", "control"),
        "A bell, an escape[0m and a vertical tab here.",
        {"control_removed": 3},
    ),
    Odd(
        "NUL bytes inside text",
        "nul",
        _line("Text with a NUL\x00 byte inside.", "nul"),
        "Text with a NUL byte inside.",
        {"nul_removed": 1},
    ),
    Odd(
        "50 KB Chinese paragraph without punctuation",
        "zh-50k",
        _line(_ZH, "zh-50k"),
        _ZH,
        {},
    ),
    Odd("emoji and rare scripts", "emoji", _line(_EMOJI, "emoji"), _EMOJI, {}),
    Odd(
        "Chinese and English mixed without spaces",
        "mixed-zh-en",
        _line(_MIXED, "mixed-zh-en"),
        _MIXED,
        {},
    ),
    Odd(
        "literal [MASK] and <eop> in text",
        "literal",
        _line(_LITERAL, "literal"),
        _LITERAL,
        {},
    ),
]


def _handled_corpus(root: Path, extra: list[tuple[str, bytes]] = ()) -> list[str]:
    """One file per handled case (each .txt holds one document), plus zh-classics for a
    validation set; returns the corpus specs."""
    root.mkdir(parents=True, exist_ok=True)
    jsonl = b""
    for odd in HANDLED:
        if odd.doc_id.endswith("#0"):
            (root / odd.doc_id[:-2]).write_bytes(odd.raw)
        elif odd.raw.startswith(b"\xef\xbb\xbf"):
            (root / "bom.jsonl").write_bytes(odd.raw)
        else:
            jsonl += odd.raw
    (root / "odd.jsonl").write_bytes(jsonl)
    for name, data in extra:
        (root / name).write_bytes(data)
    return [str(root), str(ROOT / "data" / "zh-classics.jsonl")]


def _check_handled(stats: dict, tokenizer_dir: Path, manifest: Path) -> dict:
    """Counts in stats.json, every odd document in the training shards, decoded exactly,
    and no special token id anywhere in the data. Returns the documents by id."""
    from glm.shards import ShardReader
    from glm.tokenizer import Tokenizer

    expected: dict[str, int] = {}
    for odd in HANDLED:
        for key, n in odd.counts.items():
            expected[key] = expected.get(key, 0) + n
    for key, n in expected.items():
        assert stats["normalisation"].get(key) == n, (key, stats["normalisation"])
    assert stats["normalisation"].get("sentences_capped", 0) > 0  # the 50 KB paragraph

    tok = Tokenizer.load(tokenizer_dir)
    reader = ShardReader(manifest)
    docs = {d.doc_id: d for d in reader.documents("train")}
    specials = set(tok.special_ids.values())
    for split in ("train", "val"):
        for doc in reader.documents(split):
            assert not specials & set(doc.tokens.tolist()), doc.doc_id
    for odd in HANDLED:
        assert odd.doc_id in docs, f"{odd.kind}: {odd.doc_id} not in the training shards"
        doc = docs[odd.doc_id]
        assert tok.decode(doc.tokens.tolist()) == odd.text, odd.kind
        assert doc.text_bytes == len(odd.text.encode())
    return docs


def test_handled_inputs_through_the_data_stages(tmp_path):
    from glm.shards import ShardConfig, write_shards
    from glm.split import SplitConfig, split_corpus
    from glm.tokenizer import TokenizerConfig, train_tokenizer

    specs = _handled_corpus(tmp_path / "in")
    stats = split_corpus(specs, tmp_path / "sentences", SplitConfig(workers=1))
    train_tokenizer(tmp_path / "sentences", tmp_path / "tok", TokenizerConfig(vocab_size=4000))
    write_shards(tmp_path / "sentences", tmp_path / "tok", tmp_path / "shards", ShardConfig())
    docs = _check_handled(stats, tmp_path / "tok", tmp_path / "shards" / "manifest.json")

    from glm.tokenizer import Tokenizer

    tok = Tokenizer.load(tmp_path / "tok")
    literal = docs["literal"].tokens.tolist()
    assert tok.mask_id not in literal and tok.eop_id not in literal
    # the same characters written by a user of the fill API are blanks: one id each
    assert tok.mask_id in tok.encode_with_blanks("Write [MASK] here")


@pytest.mark.slow
def test_handled_inputs_are_trained_on_through_the_flow(prefect_api, tmp_path):
    # the whole flow to evaluation, with a 10 MB single line added: every odd document is in
    # the training shards the trainer read, training and evaluation finish with finite loss
    from flows.pipeline import glm_pipeline

    words = b"lorem ipsum dolor sit amet consectetur adipiscing elit sed do eiusmod "
    ten_mb = (words * (10_000_000 // len(words) + 1))[:10_000_000]
    specs = _handled_corpus(tmp_path / "in", [("one-line.txt", ten_mb)])
    ws = tmp_path / "ws"
    summary = glm_pipeline(
        _params(
            ws,
            specs,
            until="evaluate",
            max_steps=6,
            tokenizer={"vocab_size": 4000},
            eval={"cloze_items": 20, "span_windows": 4, "greedy_spans": 2},
        )
    )
    dirs = {k: Path(v) for k, v in summary["stage_dirs"].items()}
    stats = json.loads((dirs["split"] / "stats.json").read_text())
    assert stats["normalisation"]["sentences_capped"] >= 10_000_000 // 1024
    docs = _check_handled(stats, dirs["tokenizer"], dirs["shard"] / "manifest.json")
    assert "one-line.txt#0" in docs
    trained = json.loads((dirs["train"] / "train.json").read_text())
    assert trained["steps"] == 6 and trained["final_loss"] < 20
    assert summary["metrics"]["val_bpb"] > 0


# documented choices that are not errors -----------------------------------------------------


def _ids(n: int, val: bool) -> list[str]:
    from glm.shards import is_validation

    found, i = [], 0
    while len(found) < n:
        if is_validation(f"doc-{i}") == val:
            found.append(f"doc-{i}")
        i += 1
    return found


@pytest.mark.slow
def test_a_corpus_smaller_than_one_sequence_with_a_huge_vocab_trains(prefect_api, tmp_path):
    # two sentences of a few tokens each: 128-token sequences cannot be filled, so windows
    # repeat; vocab_size 8000 is clamped to what 60 characters support, with a warning
    from flows.pipeline import glm_pipeline

    (train_id,), (val_id,) = _ids(1, val=False), _ids(1, val=True)
    corpus = tmp_path / "small.jsonl"
    corpus.write_bytes(
        _jsonl(
            {"id": train_id, "text": "A tiny corpus. It has two sentences."},
            {"id": val_id, "text": "And one for validation."},
        )
    )
    summary = glm_pipeline(
        _params(
            tmp_path / "ws",
            [str(corpus)],
            until="evaluate",
            max_steps=3,
            tokenizer={"vocab_size": 8000},
            eval={"cloze_items": 4, "span_windows": 1, "greedy_spans": 1},
        )
    )
    dirs = {k: Path(v) for k, v in summary["stage_dirs"].items()}
    tok = json.loads((dirs["tokenizer"] / "tokenizer.json").read_text())
    assert tok["clamped"] and tok["requested_vocab_size"] == 8000 and tok["vocab_size"] < 1000
    manifest = json.loads((dirs["shard"] / "manifest.json").read_text())
    assert manifest["stats"]["train"]["tokens"] < 128
    trained = json.loads((dirs["train"] / "train.json").read_text())
    assert trained["steps"] == 3
    assert summary["metrics"]["val_bpb"] > 0


def test_a_corpus_without_a_validation_document_stops_before_training(prefect_api, tmp_path):
    from flows.pipeline import glm_pipeline
    from glm.errors import InputError

    corpus = tmp_path / "train-only.jsonl"
    rows = [{"id": i, "text": f"Sentence number {i} of a corpus."} for i in _ids(5, val=False)]
    corpus.write_bytes(_jsonl(*rows))
    ws = tmp_path / "ws"
    with pytest.raises(InputError, match="no validation documents: none of the 5 documents"):
        glm_pipeline(_params(ws, [str(corpus)], until="train", tokenizer={"vocab_size": 300}))
    assert not list(ws.glob("stages/shard/*")) and not list(ws.glob("stages/train/*"))


# the console contract, through the CLI ---------------------------------------------------


def _cli(args: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    merged = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    merged.update(env or {})
    return subprocess.run(
        [GLM, *args], env=merged, capture_output=True, text=True, timeout=300, check=False
    )


def _by_kind(kind: str) -> Bad:
    (case,) = [c for c in ERRORS if c.kind == kind]
    return case


@pytest.mark.parametrize(
    "kind",
    [
        "symlink loop",
        "UTF-16 with a byte order mark",
        "binary file (PNG named .txt)",
        "invalid UTF-8 deep in a multi-chunk .txt",
        "truncated gzip",
        "malformed JSONL line",
        "empty file",
    ],
)
def test_cli_preflight_error_is_the_only_line(kind, tmp_path):
    # refused before Prefect starts: stderr is exactly the one line, stdout is empty, and
    # neither Prefect's home nor any stage output was created
    case = _by_kind(kind)
    (tmp_path / "in").mkdir()
    spec = case.make(tmp_path / "in")
    ws = tmp_path / "ws"
    done = _cli(["run", "--corpus", spec, "-w", str(ws), "--until", "split"])
    assert done.returncode == 2
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert case.what in lines[0] and case.file in lines[0]
    assert case.where is None or case.where in lines[0]
    assert done.stdout == ""
    assert _stage_outputs(ws) == [] and not (ws / "prefect").exists()
    logged = "".join(p.read_text() for p in (ws / "logs").glob("*.log"))
    assert "Traceback" in logged, "the details go to WORKSPACE/logs/"


def test_cli_refuses_a_corpus_without_validation_before_prefect(tmp_path):
    corpus = tmp_path / "train-only.jsonl"
    rows = [{"id": i, "text": f"Sentence number {i} of a corpus."} for i in _ids(5, val=False)]
    corpus.write_bytes(_jsonl(*rows))
    ws = tmp_path / "ws"
    done = _cli(["run", "--corpus", str(corpus), "-w", str(ws), "--until", "shard"])
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        f"error: {corpus}: no validation documents: none of the 5 documents has hash(doc id) "
        "% 20 == 0; the corpus is too small to evaluate on (add documents or lower "
        "shard.val_modulus)"
    ]
    assert not (ws / "prefect").exists()
    # the split alone does not need validation documents
    done = _cli(
        ["run", "--corpus", str(corpus), "-w", str(ws), "--until", "split", "--retries", "0"]
    )
    assert done.returncode == 0, done.stderr[-2000:]


def test_cli_refuses_cuda_without_a_gpu_before_prefect(tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without CUDA")
    ws = tmp_path / "ws"
    done = _cli(["run", "--corpus", str(ROOT / "data"), "-w", str(ws), "--device", "cuda"])
    assert done.returncode == 2
    assert done.stderr.splitlines() == [
        "error: device cuda requested but torch sees no CUDA device"
    ]
    assert not (ws / "prefect").exists()


def test_cli_failure_inside_the_flow_is_said_once(prefect_api, tmp_path):
    # A failure only the running flow can meet (here an injected one in the split stage):
    # one error line, Prefect's failure logs and tracebacks stay in WORKSPACE/logs/, and
    # the retry command is offered because running again can help.
    (tmp_path / "in").mkdir()
    spec = _write(tmp_path / "in" / "ok.txt", "In the beginning was the word.\n")
    ws = tmp_path / "ws"
    done = _cli(
        ["run", "--corpus", spec, "-w", str(ws), "--until", "split", "--retries", "0"],
        env={"PREFECT_API_URL": prefect_api, "GLM_FAULT": "fail@split:1"},
    )
    out = done.stdout + done.stderr
    assert done.returncode == 1, out
    assert "Traceback" not in out and "| ERROR" not in out
    errors = [line for line in out.splitlines() if line.startswith("error")]
    assert errors == ["error: InjectedFault: injected fault 'fail@split:1'"], out
    assert "prefect flow-run retry" in out
    assert _stage_outputs(ws) == []
    last = json.loads((ws / "last_run.json").read_text())
    assert last["status"] == "failed" and "prefect flow-run retry" in last["retry"]
    logged = "".join(p.read_text() for p in (ws / "logs").glob("*.log"))
    assert "Traceback" in logged, "the details go to WORKSPACE/logs/"


def test_cli_handled_inputs_run_and_are_counted(prefect_api, tmp_path):
    specs = _handled_corpus(tmp_path / "in")
    ws = tmp_path / "ws"
    args = ["run", "-w", str(ws), "--until", "split"]
    for spec in specs:
        args += ["--corpus", spec]
    done = _cli(args, env={"PREFECT_API_URL": prefect_api})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr
    summary = json.loads((ws / "last_run.json").read_text())
    assert summary["stages"] == {"split": "ran"}
    stats = json.loads((Path(summary["stage_dirs"]["split"]) / "stats.json").read_text())
    assert stats["normalisation"]["bom_removed"] == 2
    assert stats["normalisation"]["nul_removed"] == 1
