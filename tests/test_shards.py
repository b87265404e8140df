"""Shards: contents match the sentences, manifest and checksums, validation split rule,
memory mapping, verification of damaged files, and atomic writes under SIGKILL."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import signal
import subprocess
import sys
from collections import defaultdict

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import pytest

from glm.digest import sha256_file
from glm.errors import IntegrityError
from glm.shards import SHARD_SCHEMA, ShardConfig, ShardReader, is_validation, write_shards
from glm.split import sentence_batches
from glm.tokenizer import Tokenizer


@pytest.fixture(scope="module")
def reader(data_stages) -> ShardReader:
    return ShardReader(data_stages.manifest)


def test_manifest(reader, data_stages):
    m = reader.manifest
    assert m["format_version"] == 1
    assert m["tokenizer_sha256"] == Tokenizer.load(data_stages.tokenizer).sha256
    assert {e["split"] for e in m["shards"]} == {"train", "val"}
    for e in m["shards"]:
        path = data_stages.shards / e["path"]
        assert re.fullmatch(r"(train|val)/shard-\d{5}\.arrow", e["path"])
        assert e["bytes"] == path.stat().st_size
        assert e["sha256"] == sha256_file(path)
        with ipc.open_file(pa.memory_map(str(path))) as f:
            assert f.schema == SHARD_SCHEMA
            table = f.read_all()
        assert e["rows"] == table.num_rows
        assert e["tokens"] == len(table.column("tokens").combine_chunks().values)
        assert e["text_bytes"] == sum(table.column("text_bytes").to_pylist())
    train = reader.shards("train")
    # 65,536-token budget: every shard but the last of a split is at least that big
    assert len(train) >= 2 and all(e["tokens"] >= 65536 for e in train[:-1])
    split_stats = json.loads((data_stages.sentences / "stats.json").read_text())
    documents = m["stats"]["train"]["documents"] + m["stats"]["val"]["documents"]
    assert documents == split_stats["documents"]
    assert reader.verify() == []


def test_documents_match_the_sentences(reader, data_stages):
    tok = Tokenizer.load(data_stages.tokenizer)
    sentences = defaultdict(list)
    for batch in sentence_batches(data_stages.sentences):
        ids, texts = batch.column("doc_id").to_pylist(), batch.column("text").to_pylist()
        for doc_id, text in zip(ids, texts, strict=True):
            sentences[doc_id].append(text)
    seen = set()
    for split in ("train", "val"):
        for doc in reader.documents(split):
            assert (split == "val") == is_validation(doc.doc_id)
            expected = sentences[doc.doc_id]
            encoded = [tok.encode(s) for s in expected]
            assert doc.tokens.dtype == np.int32 and doc.sentence_starts.dtype == np.int32
            assert doc.tokens.tolist() == [i for ids in encoded for i in ids]
            assert (
                doc.sentence_starts.tolist()
                == np.cumsum([0] + [len(e) for e in encoded[:-1]]).tolist()
            )
            assert doc.text_bytes == len("".join(expected).encode())
            assert tok.decode(doc.tokens) == "".join(expected)
            seen.add(doc.doc_id)
    assert seen == set(sentences)


def test_validation_rule_is_the_documented_hash():
    for doc_id in ["kjv/Genesis 1", "tang300/0", "x.txt#12", "中文"]:
        expected = int(hashlib.sha256(doc_id.encode()).hexdigest(), 16) % 20 == 0
        assert is_validation(doc_id) == expected
    # about 5% of many ids
    share = np.mean([is_validation(f"doc-{i}") for i in range(4000)])
    assert 0.04 < share < 0.06


def test_tables_are_memory_mapped(reader):
    before = pa.total_allocated_bytes()
    tables = reader.tables("train")
    tokens = sum(len(t.column("tokens").chunk(0).values) for t in tables)
    assert tokens > 100_000
    # reading allocates nothing on the heap for the token data: it stays in the mapped file
    assert pa.total_allocated_bytes() - before < 4 * tokens // 10


def test_verify_reports_every_bad_file(data_stages, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(data_stages.shards, copy)
    r = ShardReader(copy / "manifest.json")
    train = r.shards("train")
    flipped, truncated, missing = (
        copy / e["path"] for e in (train[0], train[1], r.shards("val")[0])
    )
    blob = bytearray(flipped.read_bytes())
    blob[len(blob) // 2] ^= 0xFF
    flipped.write_bytes(bytes(blob))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    missing.unlink()
    problems = r.verify()
    assert len(problems) == 3
    assert problems[0].startswith(f"{flipped}: checksum mismatch")
    assert problems[1].startswith(f"{truncated}: truncated")
    assert problems[2] == f"{missing}: missing"
    assert r.verify("val") == [problems[2]]
    with pytest.raises(IntegrityError) as e:
        r.verify_or_raise()
    assert str(flipped) in str(e.value) and str(truncated) in str(e.value)
    with pytest.raises(IntegrityError, match="shard missing"):
        r.tables("val")


def test_missing_manifest_is_an_integrity_error(tmp_path):
    with pytest.raises(IntegrityError, match="manifest missing"):
        ShardReader(tmp_path / "manifest.json")


_KILLED_WRITER = """
import os, sys, time
import glm.shards as shards

real_replace = os.replace

def stall(src, dst):
    # the shard is fully written under its temp name: the worst moment to die
    if str(dst).endswith(".arrow"):
        print("WRITING", flush=True)
        time.sleep(120)
    real_replace(src, dst)

shards.os.replace = stall
cfg = shards.ShardConfig(shard_tokens=20000)
shards.write_shards(sys.argv[1], sys.argv[2], sys.argv[3], cfg)
"""


def test_writer_killed_mid_shard_leaves_nothing_complete(data_stages, tmp_path):
    out = tmp_path / "stage" / "shards"
    proc = subprocess.Popen(
        [sys.executable, "-c", _KILLED_WRITER, data_stages.sentences, data_stages.tokenizer, out],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline().strip() == "WRITING"
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists()
    leftovers = [p for p in (tmp_path / "stage").rglob("*") if p.is_file()]
    assert leftovers, "the killed writer had started a shard"
    assert not [p for p in leftovers if re.fullmatch(r"shard-\d{5}\.arrow", p.name)]
    assert not [p for p in leftovers if p.name == "manifest.json"]
    # a rerun completes and verifies
    manifest = write_shards(
        data_stages.sentences, data_stages.tokenizer, out, ShardConfig(shard_tokens=20000)
    )
    assert ShardReader(out / "manifest.json").verify() == []
    assert json.loads((out / "manifest.json").read_text()) == manifest
