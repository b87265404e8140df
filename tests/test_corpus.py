"""Corpus resolution, formats, normalisation and every bad input's exact error."""

from __future__ import annotations

import gzip
import json
import os
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from glm.corpus import ReadOptions, iter_documents, normalise, resolve_corpus
from glm.errors import InputError


def _jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    return path


def _docs(path: Path, **opts) -> tuple[list, Counter]:
    counts = Counter()
    (file,) = resolve_corpus([str(path)])
    return [(d.doc_id, d.text) for d in iter_documents(file, ReadOptions(**opts), counts)], counts


# resolving paths


def test_resolve_files_dirs_and_globs(tmp_path, sample_corpus):
    (tmp_path / "a" / "b").mkdir(parents=True)
    (tmp_path / "a" / "x.txt").write_text("one\n")
    (tmp_path / "a" / "b" / "y.jsonl").write_text('{"text": "two"}\n')
    (tmp_path / "a" / "README.md").write_text("not corpus\n")
    files = resolve_corpus([str(tmp_path / "a")])
    assert [(f.rel, f.kind) for f in files] == [("x.txt", "txt"), ("b/y.jsonl", "jsonl")]
    files = resolve_corpus([str(tmp_path / "a" / "**" / "*.jsonl")])
    assert [f.rel for f in files] == ["b/y.jsonl"]
    files = resolve_corpus([str(p) for p in sample_corpus] + [str(sample_corpus[0])])
    assert [f.rel for f in files] == [p.name for p in sample_corpus]  # duplicate kept once


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda d: d / "missing.jsonl", "path does not exist"),
        (lambda d: _loop(d), "symlink loop"),
        (lambda d: _mkdir(d / "empty"), "empty directory"),
        (lambda d: _mkfile(d / "only" / "notes.md", "x"), "directory has no corpus files"),
        (lambda d: _mkfile(d / "data.csv", "a,b\n"), "unknown file extension"),
        (lambda d: str(d / "*.nothing"), "glob matches no files"),
        (lambda d: _mkfile(d / "pic.txt", b"\x89PNG\r\n\x1a\n" + bytes(200)), "binary file"),
        (lambda d: _mkfile(d / "rand.txt", bytes(range(256)) * 8), "binary file"),
        (
            lambda d: _mkfile(d / "u16.txt", "hello\n".encode("utf-16")),
            "UTF-16 text (byte order mark FF FE) is not supported",
        ),
        (lambda d: _mkfile(d / "plain.jsonl.gz", b'{"text": "x"}\n'), "not gzip data"),
        (lambda d: _mkfile(d / "fake.parquet", b"text"), "not a parquet file"),
    ],
)
def test_resolve_errors_name_the_path(tmp_path, setup, message):
    spec = setup(tmp_path)
    path = str(spec if isinstance(spec, str) else spec)
    with pytest.raises(InputError) as e:
        resolve_corpus([path])
    assert message in str(e.value)
    named = path if "only" not in path else str(Path(path).parent)
    assert str(e.value).startswith(named)
    assert "\n" not in str(e.value)


def _mkdir(path: Path) -> Path:
    path.mkdir()
    return path


def _mkfile(path: Path, data) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    (path.write_bytes if isinstance(data, bytes) else path.write_text)(data)
    if path.name == "notes.md":
        return path.parent
    return path


def _loop(d: Path) -> Path:
    os.symlink(d / "loop-b.txt", d / "loop-a.txt")
    os.symlink(d / "loop-a.txt", d / "loop-b.txt")
    return d / "loop-a.txt"


# formats and ids


def test_txt_paragraphs_and_ids(tmp_path):
    path = tmp_path / "doc.txt"
    path.write_text("First doc line one.\nline two.\n\n  \n\nSecond doc.\n\n\n")
    docs, _ = _docs(path)
    assert docs == [("doc.txt#0", "First doc line one.\nline two."), ("doc.txt#1", "Second doc.")]


def test_jsonl_id_field_fallback_and_custom_fields(tmp_path):
    path = _jsonl(
        tmp_path / "c.jsonl", [{"id": "a", "text": "x"}, {"text": "y"}, {"id": 7, "text": "z"}]
    )
    assert _docs(path)[0] == [("a", "x"), ("c.jsonl#1", "y"), ("7", "z")]
    path = _jsonl(tmp_path / "d.jsonl", [{"key": "k1", "body": "hello"}])
    assert _docs(path, text_field="body", id_field="key")[0] == [("k1", "hello")]


def test_jsonl_blank_lines_and_blank_documents_are_counted(tmp_path):
    path = tmp_path / "b.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "  \\n "}\n{"text": "b"}\n')
    docs, counts = _docs(path)
    assert docs == [("b.jsonl#0", "a"), ("b.jsonl#3", "b")]
    assert counts["skipped_blank_line"] == 1
    assert counts["skipped_blank_document"] == 1


def test_gzip_and_parquet(tmp_path):
    gz = tmp_path / "g.jsonl.gz"
    with gzip.open(gz, "wt", encoding="utf-8") as f:
        f.write('{"text": "中文。"}\n{"id": "q", "text": "two"}\n')
    assert _docs(gz)[0] == [("g.jsonl.gz#0", "中文。"), ("q", "two")]
    pq_path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"text": ["r0", None, "r2"]}), pq_path, row_group_size=2)
    docs, counts = _docs(pq_path)
    assert docs == [("p.parquet#0", "r0"), ("p.parquet#2", "r2")]
    assert counts["skipped_null_text"] == 1


# normalisation


def test_normalisation_is_counted():
    counts = Counter()
    text = normalise("\ufeffa\r\nb\rc\x00d\x07e\tf\x1b\n", counts)
    assert text == "a\nb\ncde\tf\n"
    assert counts == Counter(
        bom_removed=1, crlf_to_lf=1, cr_to_lf=1, nul_removed=1, control_removed=2
    )


def test_bom_crlf_in_files(tmp_path):
    path = tmp_path / "w.txt"
    path.write_bytes(b"\xef\xbb\xbfline one\r\nline two\r\n\r\nnext\rdoc\r")
    docs, counts = _docs(path)
    assert docs == [("w.txt#0", "line one\nline two"), ("w.txt#1", "next\ndoc")]
    assert counts["bom_removed"] == 1 and counts["crlf_to_lf"] == 3 and counts["cr_to_lf"] == 2
    path = tmp_path / "b.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"text": "x"}\r\n')
    assert _docs(path)[0] == [("b.jsonl#0", "x")]


# bad content: exact message and location


@pytest.mark.parametrize(
    ("name", "data", "message", "where"),
    [
        ("bad.jsonl", b'{"text": "ok"}\n{"text": "oops"\n', "malformed JSON", "line 2"),
        ("list.jsonl", b'{"text": "ok"}\n[1, 2]\n', "expected a JSON object, got list", "line 2"),
        ("num.jsonl", b'{"text": 42}\n', "text field 'text' is int, not a string", "line 1"),
        ("none.jsonl", b'{"text": "a"}\n{"body": "b"}\n', "missing text field 'text'", "line 2"),
        ("id.jsonl", b'{"text": "a", "id": [1]}\n', "id field 'id' is list", "line 1"),
        ("utf.txt", b"good text\n\nbad \xff here\n", "invalid UTF-8 (byte 0xFF)", "byte 15"),
        (
            "utf.jsonl",
            b'{"text": "a"}\n{"text": "b\xc3("}\n',
            "invalid UTF-8 (byte 0xC3)",
            "byte 25",
        ),
    ],
)
def test_bad_content_errors(tmp_path, name, data, message, where):
    path = tmp_path / name
    path.write_bytes(data)
    with pytest.raises(InputError) as e:
        _docs(path)
    assert message in str(e.value)
    assert str(e.value).startswith(f"{path}:{where}: ")


def test_truncated_gzip(tmp_path):
    blob = gzip.compress(b"".join(b'{"text": "line %d"}\n' % i for i in range(2000)))
    path = tmp_path / "t.jsonl.gz"
    path.write_bytes(blob[: len(blob) // 2])
    with pytest.raises(InputError) as e:
        _docs(path)
    assert str(e.value).startswith(f"{path}:after line ")
    assert "truncated gzip" in str(e.value)


def test_parquet_without_the_column(tmp_path):
    path = tmp_path / "p.parquet"
    pq.write_table(pa.table({"body": ["x"]}), path)
    with pytest.raises(InputError, match=r"no column 'text' \(columns: body\)") as e:
        _docs(path)
    assert str(e.value).startswith(str(path))


@pytest.mark.parametrize("kind", ["txt", "jsonl"])
def test_decode_error_policies(tmp_path, kind):
    path = tmp_path / f"d.{kind}"
    if kind == "txt":
        path.write_bytes(b"fine doc\n\nbad \xff\xfe doc\n\nlast\n")
    else:
        path.write_bytes(b'{"text": "fine doc"}\n{"text": "bad \xff\xfe doc"}\n{"text": "last"}\n')
    docs, counts = _docs(path, on_decode_error="replace")
    assert [t for _, t in docs] == ["fine doc", "bad \ufffd\ufffd doc", "last"]
    assert counts["invalid_utf8_replaced"] == 2
    docs, counts = _docs(path, on_decode_error="skip")
    assert [t for _, t in docs] == ["fine doc", "last"]
    assert counts["skipped_invalid_utf8"] == 1


def test_invalid_options():
    with pytest.raises(InputError, match="on_decode_error must be one of error, replace, skip"):
        ReadOptions(on_decode_error="ignore")


def test_a_fifo_in_a_corpus_directory_is_refused_not_read(tmp_path):
    """Opening a FIFO blocks until a writer appears: it must be refused before any read."""
    (tmp_path / "ok.txt").write_text("Some text.\n")
    os.mkfifo(tmp_path / "pipe.txt")
    with pytest.raises(InputError, match="not a regular file") as err:
        resolve_corpus([str(tmp_path)])
    assert "pipe.txt" in str(err.value)
