"""Evaluation: its pieces score what they claim, and a whole evaluation is finite and repeatable."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from glm.config import ObjectiveConfig, get_preset
from glm.evaluate import (
    EvalConfig,
    build_cloze,
    evaluate,
    gmask_windows,
    restore_spans,
    split_answer,
    xz_conditional_bpb,
)
from glm.objectives import IGNORE_INDEX, SampleBuilder, SpecialIds
from glm.train import InjectedFault, train

SPECIAL = SpecialIds(mask=1, smask=2, gmask=3, sop=4, eop=5)
CFG = EvalConfig(device="cpu", threads=1, cloze_items=100, span_windows=16, greedy_spans=8)


@pytest.fixture(scope="module")
def trained(data_stages, tmp_path_factory):
    """A tiny model trained on the bundled sample (its default 40-step budget)."""
    out = tmp_path_factory.mktemp("trained")
    before = torch.get_num_threads()
    train(
        data_stages.manifest,
        data_stages.tokenizer,
        out,
        get_preset("tiny"),
        device="cpu",
        threads=1,
    )
    torch.set_num_threads(before)
    return out / "final"


def test_gmask_windows_score_every_token_exactly_once():
    tokens = np.arange(10, 10 + 300)
    samples = gmask_windows(tokens, seq_len=64, context_frac=0.5, special=SPECIAL)
    scored = np.concatenate([s.targets[s.targets != IGNORE_INDEX] for s in samples])
    assert scored.tolist() == tokens.tolist()
    assert all(s.length <= 64 for s in samples)
    # the first window has no context: Part A is [gMASK] alone; later ones carry 31 tokens
    assert samples[0].sep == 1 and samples[0].input_ids[0] == SPECIAL.gmask
    assert all(s.sep == 32 and s.input_ids[s.sep - 1] == SPECIAL.gmask for s in samples[1:])


def test_restore_spans_undoes_the_sample_builder():
    rng = np.random.default_rng(0)
    tokens = rng.integers(10, 100, size=80)
    builder = SampleBuilder(ObjectiveConfig(p_mask=1, p_smask=0, p_gmask=0), SPECIAL, 128)
    sample = builder.build(tokens, [0, 20, 50], rng)
    restored, ranges = restore_spans(sample, SPECIAL)
    assert restored == tokens.tolist()
    assert sum(e - s for s, e in ranges) == int((sample.targets != IGNORE_INDEX).sum()) - len(
        ranges
    )


@pytest.mark.parametrize(
    ("sentence", "expected"),
    [
        (
            "And God saw the light, that it was good.\n",
            ("And God saw the light, that it was ", "good"),
        ),
        ("兰叶春葳蕤，桂华秋皎洁。", ("兰叶春葳蕤，桂华秋", "皎洁")),
        ("Amen.", None),  # too little context
        ("In the year 1984", None),  # no final word
    ],
)
def test_split_answer_takes_the_last_word_or_two_characters(sentence, expected):
    assert split_answer(sentence) == expected


def test_xz_baseline_is_conditional_on_the_training_text():
    train_text = "In the beginning God created the heaven and the earth. " * 50
    unrelated = xz_conditional_bpb("zq" * 1000, "In the beginning God created the heaven.", 1 << 20)
    primed = xz_conditional_bpb(train_text, "In the beginning God created the heaven.", 1 << 20)
    assert primed["xz_bpb"] < unrelated["xz_bpb"]


def test_cloze_items_end_in_their_answer(data_stages):
    from glm.shards import ShardReader
    from glm.tokenizer import Tokenizer

    tok = Tokenizer.load(data_stages.tokenizer)
    docs = list(ShardReader(data_stages.manifest).documents("val"))
    items = build_cloze(tok, docs, seq_len=128, n_items=30, seed=0)
    assert len(items) >= 10
    for item in items:
        assert tok.decode(list(item.answer)).strip() == item.answer_text
        assert len(item.context) + len(item.answer) + 2 <= 128


def test_evaluation_is_finite_reproducible_and_written(trained, data_stages, tmp_path):
    first = evaluate(trained, data_stages.manifest, CFG, out_dir=tmp_path / "a")
    second = evaluate(trained, data_stages.manifest, CFG, out_dir=tmp_path / "b")
    timing = {"eval_seconds", "xz_seconds"}
    assert {k: v for k, v in first.items() if k not in timing} == {
        k: v for k, v in second.items() if k not in timing
    }
    for key in (
        "val_bpb",
        "cloze_acc",
        "unigram_cloze_acc",
        "xz_bpb",
        "unigram_bpb",
        "mask_token_acc",
        "smask_token_acc",
        "mask_exact_match",
    ):
        assert math.isfinite(first[key]), key
    assert 0 < first["val_bpb"] < 8 * 4  # a trained model is far from uniform over bytes
    assert first["val_bpb"] < first["unigram_bpb"] + 1.0
    assert first["cloze_items"] > 0 and 0 <= first["cloze_acc"] <= 1
    report = json.loads((tmp_path / "a" / "eval.json").read_text())
    assert report["metrics"]["val_bpb"] == first["val_bpb"]
    assert (tmp_path / "a" / "samples.json").is_file()


def test_eval_fault_hook(trained, data_stages, tmp_path, monkeypatch):
    monkeypatch.setenv("GLM_FAULT", "fail@eval:1")
    with pytest.raises(InjectedFault):
        evaluate(trained, data_stages.manifest, CFG, out_dir=tmp_path)
    assert not (tmp_path / "eval.json").exists()
