"""Tokenizer: special tokens as single ids both ways, no injection from data, lossless
round-trip, byte fallback, vocab clamp, digest checks."""

from __future__ import annotations

import json
import logging
import shutil

import pytest

from glm.errors import InputError, IntegrityError
from glm.split import SplitConfig, sentence_batches, split_corpus
from glm.tokenizer import SPECIAL_TOKENS, Tokenizer, TokenizerConfig, train_tokenizer


@pytest.fixture(scope="module")
def tok(data_stages) -> Tokenizer:
    return Tokenizer.load(data_stages.tokenizer)


def test_specials_have_one_id_each(tok, data_stages):
    ids = [tok.special_ids[t] for t in SPECIAL_TOKENS]
    assert len(set(ids)) == len(SPECIAL_TOKENS)
    assert 0 not in ids  # 0 is <unk>
    assert [tok.pad_id, tok.cls_id, tok.mask_id, tok.smask_id, tok.gmask_id] == ids[:5]
    assert [tok.sop_id, tok.eop_id] == ids[5:]
    meta = json.loads((data_stages.tokenizer / "tokenizer.json").read_text())
    assert meta["special_ids"] == tok.special_ids
    assert meta["sha256"] == tok.sha256
    assert meta["vocab_size"] == tok.vocab_size == 2000


@pytest.mark.parametrize("literal", ["[MASK]", "<eop>", "[gMASK]", "<sop>", "[PAD]"])
def test_literal_specials_in_text_are_plain_text(tok, literal):
    text = f"data says {literal} here"
    ids = tok.encode(text)
    assert not set(ids) & set(tok.special_ids.values())
    assert tok.decode(ids) == text


def test_blanks_written_by_a_user_become_single_ids(tok):
    ids = tok.encode_with_blanks("x[gMASK]y")
    assert ids == tok.encode("x") + [tok.gmask_id] + tok.encode("y")
    ids = tok.encode_with_blanks("The [MASK] sat on the [sMASK] mat.")
    assert ids.count(tok.mask_id) == 1 and ids.count(tok.smask_id) == 1
    # the space before a blank belongs to the blank (a masked word carries its own "▁"),
    # the one after it to the next word
    before = ids[: ids.index(tok.mask_id)]
    assert before == tok.encode("The")
    # <eop> is not a blank a user writes: it stays text
    assert tok.eop_id not in tok.encode_with_blanks("end <eop>")
    assert tok.decode(ids) == "The sat on the mat."


def test_round_trip_and_no_unk(tok, data_stages):
    texts = []
    for batch in sentence_batches(data_stages.sentences):
        texts += batch.column("text").to_pylist()
    texts += [
        "  two leading spaces, trailing  \n",
        "tab\there\n\nblank line",
        "emoji 😀🎉 and rare scripts ꦲꦏꦫ 𓀀 ᠮᠣᠩ",
        "中文English混合没有空格123456",
    ]
    encoded = tok.encode_batch(texts, num_threads=2)
    assert encoded == [tok.encode(t) for t in texts]
    for text, ids in zip(texts, encoded, strict=True):
        assert 0 not in ids, text
        assert tok.decode(ids) == text


def test_decode_drops_specials(tok):
    ids = [tok.cls_id, *tok.encode("hello"), tok.eop_id, tok.pad_id]
    assert tok.decode(ids) == "hello"


def test_vocab_clamped_on_a_tiny_corpus(tmp_path, caplog):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("\n\n".join(f"Line {i}: the cat sat on mat number {i}." for i in range(20)))
    split_corpus([str(corpus)], tmp_path / "s", SplitConfig(workers=1))
    with caplog.at_level(logging.WARNING, logger="glm.tokenizer"):
        info = train_tokenizer(tmp_path / "s", tmp_path / "t", TokenizerConfig(vocab_size=8000))
    assert info["clamped"] and info["requested_vocab_size"] == 8000
    assert 256 + len(SPECIAL_TOKENS) < info["vocab_size"] < 8000
    assert any("clamped to" in r.message for r in caplog.records)
    tok = Tokenizer.load(tmp_path / "t")
    assert tok.vocab_size == info["vocab_size"]
    assert tok.decode(tok.encode("Line 7: a new 狗.")) == "Line 7: a new 狗."


def test_long_lines_and_determinism(tmp_path):
    corpus = tmp_path / "long.txt"
    # 60 KB without punctuation (capped by the split stage), plus ordinary text
    corpus.write_text("无标点的长段落" * 9000 + "\n\n" + "Short sentence. Another one.\n" * 30)
    split_corpus([str(corpus)], tmp_path / "s", SplitConfig(workers=1))
    cfg = TokenizerConfig(vocab_size=400, seed=3)
    a = train_tokenizer(tmp_path / "s", tmp_path / "a", cfg)
    b = train_tokenizer(tmp_path / "s", tmp_path / "b", cfg)
    assert a["sha256"] == b["sha256"]
    bpe = train_tokenizer(tmp_path / "s", tmp_path / "bpe", TokenizerConfig(400, "bpe"))
    assert bpe["sha256"] != a["sha256"]
    bpe_tok = Tokenizer.load(tmp_path / "bpe")
    assert bpe_tok.decode(bpe_tok.encode("无标点 x")) == "无标点 x"


def test_vocab_too_small_for_coverage(data_stages, tmp_path):
    with pytest.raises(InputError, match="vocab_size 300 is smaller than the"):
        train_tokenizer(data_stages.sentences, tmp_path / "t", TokenizerConfig(vocab_size=300))
    assert not (tmp_path / "t").exists()


def test_bad_config():
    with pytest.raises(InputError, match="model_type must be unigram or bpe"):
        TokenizerConfig(model_type="wordpiece")
    with pytest.raises(InputError, match="vocab_size must be >= 300"):
        TokenizerConfig(vocab_size=10)


def test_load_checks_the_digest(data_stages, tmp_path):
    copy = tmp_path / "tok"
    shutil.copytree(data_stages.tokenizer, copy)
    blob = bytearray((copy / "spm.model").read_bytes())
    blob[-1] ^= 1
    (copy / "spm.model").write_bytes(bytes(blob))
    with pytest.raises(IntegrityError, match="does not match the recorded"):
        Tokenizer.load(copy)
    (copy / "tokenizer.json").unlink()
    with pytest.raises(IntegrityError, match="tokenizer.json: missing"):
        Tokenizer.load(copy)
