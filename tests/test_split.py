"""The split stage: output contract, round-trip, determinism across workers and chunking,
stats of handled inputs, no partial output on bad input."""

from __future__ import annotations

import gzip
import json
import re
import signal
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq
import pytest

from glm.corpus import ReadOptions, iter_documents, resolve_corpus
from glm.errors import InputError
from glm.split import SENTENCE_SCHEMA, SplitConfig, sentence_batches, split_corpus


def _rows(out: Path) -> list[tuple[str, int, str]]:
    rows = []
    for batch in sentence_batches(out):
        rows += zip(*(batch.column(c).to_pylist() for c in SENTENCE_SCHEMA.names), strict=True)
    return rows


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


def test_bundled_corpus_round_trip(data_stages, sample_corpus):
    stats = json.loads((data_stages.sentences / "stats.json").read_text())
    lines = sum(len(p.read_text().splitlines()) for p in sample_corpus)  # one document a line
    assert stats["files"] == len(sample_corpus) and stats["documents"] == lines
    for name in stats["outputs"]:
        with ipc.open_file(pa.memory_map(str(data_stages.sentences / name))) as reader:
            assert reader.schema == SENTENCE_SCHEMA
    by_doc: dict[str, list[tuple[int, str]]] = defaultdict(list)
    rows = _rows(data_stages.sentences)
    assert len(rows) == stats["sentences"]
    for doc_id, index, text in rows:
        by_doc[doc_id].append((index, text))
    expected = {}
    for file in resolve_corpus([str(p) for p in sample_corpus]):
        for doc in iter_documents(file, ReadOptions()):
            expected[doc.doc_id] = doc.text
    assert set(by_doc) == set(expected)
    for doc_id, parts in by_doc.items():
        assert [i for i, _ in parts] == list(range(len(parts)))
        assert "".join(t for _, t in parts) == expected[doc_id]
    assert stats["text_bytes"] == sum(len(t.encode()) for t in expected.values())


def test_workers_and_chunking_do_not_change_output(tmp_path, sample_corpus):
    big = tmp_path / "big.txt"
    # several chunks of a .txt: document indices must continue across chunks
    paras = [json.loads(line)["text"] for p in sample_corpus for line in p.open()]
    big.write_text("\n\n".join(paras) + "\n")
    specs = [str(big), *map(str, sample_corpus)]
    small = SplitConfig(workers=1, chunk_bytes=16384)
    split_corpus(specs, tmp_path / "w1", small)
    split_corpus(specs, tmp_path / "w2", SplitConfig(workers=2, chunk_bytes=16384))
    assert _files(tmp_path / "w1") == _files(tmp_path / "w2")
    stats = json.loads((tmp_path / "w1" / "stats.json").read_text())
    assert stats["chunks"] > 20
    split_corpus(specs, tmp_path / "one", SplitConfig(workers=1))
    assert _rows(tmp_path / "one") == _rows(tmp_path / "w1")
    ids = [r[0] for r in _rows(tmp_path / "one") if r[0].startswith("big.txt#") and r[1] == 0]
    assert ids == [f"big.txt#{i}" for i in range(len(paras))]


def test_handled_inputs_are_counted(tmp_path):
    d = tmp_path / "corpus"
    d.mkdir()
    (d / "bom.txt").write_bytes(b"\xef\xbb\xbfHello.\r\nWorld.\rEnd.\x00\x07\n")
    (d / "long.txt").write_text("x" * 3000 + " " + "中" * 5000 + "\n")
    (d / "mixed.jsonl").write_text(
        json.dumps({"text": "中文English混合。😀 ꦲꦏ [MASK] <eop> done."}) + "\n\n"
    )
    stats = split_corpus([str(d)], tmp_path / "out", SplitConfig(workers=1))
    assert stats["documents"] == 3
    norm = stats["normalisation"]
    assert norm["bom_removed"] == 1 and norm["crlf_to_lf"] == 1 and norm["cr_to_lf"] == 1
    assert norm["nul_removed"] == 1 and norm["control_removed"] == 1
    # 3000 x, a space, 5000 中: cuts at 1024, 2048, the space (3001), then every 1024
    assert norm["sentences_capped"] == 7
    assert stats["skipped"] == {"skipped_blank_line": 1}
    rows = _rows(tmp_path / "out")
    assert max(len(t) for _, _, t in rows) <= 1024
    assert rows[0] == ("bom.txt#0", 0, "Hello.\n")


def test_ten_megabyte_single_line(tmp_path):
    path = tmp_path / "line.txt"
    path.write_text("word " * 2_000_000 + "\n")
    stats = split_corpus([str(path)], tmp_path / "out", SplitConfig(workers=1))
    assert stats["documents"] == 1
    assert stats["sentences"] > 9000
    assert stats["normalisation"]["sentences_capped"] == stats["sentences"] - 1


def test_decode_policy_in_stats(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "bad \xff"}\n')
    stats = split_corpus([str(path)], tmp_path / "r", SplitConfig(on_decode_error="replace"))
    assert stats["normalisation"]["invalid_utf8_replaced"] == 1 and stats["documents"] == 2
    stats = split_corpus([str(path)], tmp_path / "s", SplitConfig(on_decode_error="skip"))
    assert stats["skipped"]["skipped_invalid_utf8"] == 1 and stats["documents"] == 1


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({"empty.txt": b""}, "corpus has no text: 1 file(s)"),
        ({"ws.txt": b"  \n\n\t\n"}, "corpus has no text"),
        ({"a.jsonl": b'{"text": "  "}\n', "b.txt": b"\n"}, "corpus has no text: 2 file(s)"),
        ({"bad.jsonl": b'{"text": "fine"}\n{"text": 1}\n'}, "is int, not a string"),
        ({"u.txt": b"ok\n\n\xfe\n"}, "invalid UTF-8"),
    ],
)
def test_bad_corpus_leaves_no_output(tmp_path, files, message):
    d = tmp_path / "corpus"
    d.mkdir()
    for name, data in files.items():
        (d / name).write_bytes(data)
    out = tmp_path / "out"
    with pytest.raises(InputError, match=re.escape(message)):
        split_corpus([str(d)], out, SplitConfig(workers=1))
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus"]


def test_invalid_config():
    with pytest.raises(InputError, match="chunk_bytes must be >= 4096"):
        SplitConfig(chunk_bytes=10)
    with pytest.raises(InputError, match="workers must be >= 0"):
        SplitConfig(workers=-1)


def test_reading_an_unfinished_stage_fails(tmp_path):
    (tmp_path / "sentences-00000.arrow").write_bytes(b"")
    with pytest.raises(Exception, match="stats.json: missing"):
        next(sentence_batches(tmp_path))


def test_workers_are_not_recorded(data_stages):
    # the output must not depend on the number of workers, so neither does stats.json
    stats = json.loads((data_stages.sentences / "stats.json").read_text())
    assert set(stats["config"]) == {
        "text_field",
        "id_field",
        "on_decode_error",
        "chunk_bytes",
        "max_sentence_chars",
    }


_KILLED_SPLIT = """
import sys, time
import glm.split as split

def stall(path, obj):
    # every sentence file is written; only stats.json is missing: the worst moment to die
    print("WRITING", flush=True)
    time.sleep(120)

split.write_json_atomic = stall
split.split_corpus(sys.argv[2:], sys.argv[1], split.SplitConfig(workers=1))
"""


def test_split_killed_before_stats_leaves_no_output(tmp_path, sample_corpus):
    out = tmp_path / "stage" / "sentences"
    specs = [str(p) for p in sample_corpus]
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_SPLIT, str(out), *specs], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline().strip() == "WRITING"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert not out.exists()
    leftovers = [p.name for p in (tmp_path / "stage").rglob("*") if p.is_file()]
    assert "sentences-00000.arrow" in leftovers and "stats.json" not in leftovers
    stats = split_corpus(specs, out, SplitConfig(workers=1))
    assert json.loads((out / "stats.json").read_text()) == stats


def test_gzip_and_parquet_through_the_stage(tmp_path):
    texts = [f"Row {i} says hello. 第{i}行。" for i in range(3000)]
    pq.write_table(pa.table({"text": texts}), tmp_path / "p.parquet", row_group_size=500)
    with gzip.open(tmp_path / "g.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps({"text": t}) + "\n" for t in texts[:10])
    cfg = SplitConfig(workers=2, chunk_bytes=4096)
    stats = split_corpus([str(tmp_path / "*.*")], tmp_path / "out", cfg)
    assert stats["documents"] == 3010 and stats["chunks"] > 3
    rows = _rows(tmp_path / "out")
    firsts = [(d, t) for d, i, t in rows if i == 0]
    assert firsts[:2] == [
        ("g.jsonl.gz#0", "Row 0 says hello. "),
        ("g.jsonl.gz#1", "Row 1 says hello. "),
    ]
    assert firsts[10:] == [(f"p.parquet#{i}", f"Row {i} says hello. ") for i in range(3000)]
