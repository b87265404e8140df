"""Invariants of the blank-infilling objective, checked over many seeds."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from glm.config import ObjectiveConfig
from glm.objectives import (
    IGNORE_INDEX,
    SampleBuilder,
    SpecialIds,
    build_sample,
    choose_window,
    collate,
    sample_document_span,
    sample_sentence_spans,
    sample_token_spans,
)

SPECIAL = SpecialIds(mask=1, smask=2, gmask=3, sop=4, eop=5)
MASKS = {SPECIAL.mask, SPECIAL.smask, SPECIAL.gmask}
SEEDS = range(200)


def document(rng: np.random.Generator, n: int) -> tuple[np.ndarray, list[int]]:
    """Random ids above the special range, and sentence starts every 3..30 tokens."""
    tokens = rng.integers(10, 1000, size=n)
    starts = [0]
    while starts[-1] < n:
        starts.append(starts[-1] + int(rng.integers(3, 31)))
    return tokens, [s for s in starts if s < n]


def spans_of(sample) -> list[tuple[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
    """Split Part B into (mask position, inputs, targets, positions, blocks) per span."""
    b = slice(sample.sep, sample.length)
    ids, tg = sample.input_ids[b], sample.targets[b]
    pos, blk = sample.position_ids[b], sample.block_position_ids[b]
    starts = np.flatnonzero(ids == SPECIAL.sop)
    ends = [*starts[1:], len(ids)]
    return [
        (pos[s], ids[s:e], tg[s:e], pos[s:e], blk[s:e]) for s, e in zip(starts, ends, strict=True)
    ]


def reconstruct(sample) -> np.ndarray:
    """Put every Part B span back in place of its mask token in Part A."""
    part_a = sample.input_ids[: sample.sep]
    fills = {int(mask_pos): inputs[1:] for mask_pos, inputs, *_ in spans_of(sample)}
    out = []
    for i, tok in enumerate(part_a):
        out.extend(fills.get(i, [tok]))
    return np.array(out)


def check_sample(sample, source: np.ndarray) -> None:
    """Every structural invariant of one sample built from ``source``."""
    sep, n = sample.sep, sample.length
    for arr in (sample.input_ids, sample.position_ids, sample.block_position_ids, sample.targets):
        assert arr.shape == (n,) and arr.dtype == np.int64
    # Part A: its own positions, block 0, no loss; mask tokens only where spans were cut.
    np.testing.assert_array_equal(sample.position_ids[:sep], np.arange(sep))
    assert (sample.block_position_ids[:sep] == 0).all()
    assert (sample.targets[:sep] == IGNORE_INDEX).all()
    mask_positions = np.flatnonzero(np.isin(sample.input_ids[:sep], list(MASKS)))
    spans = spans_of(sample)
    assert sorted(int(s[0]) for s in spans) == list(mask_positions)
    for mask_pos, inputs, targets, positions, blocks in spans:
        # Part B: <sop> + span in, span + <eop> out: targets are inputs shifted by one.
        assert inputs[0] == SPECIAL.sop and targets[-1] == SPECIAL.eop
        np.testing.assert_array_equal(targets[:-1], inputs[1:])
        assert (positions == mask_pos).all()
        np.testing.assert_array_equal(blocks, np.arange(1, len(inputs) + 1))
        assert not np.isin(inputs[1:], [*MASKS, SPECIAL.sop, SPECIAL.eop]).any()
    assert n == len(source) + 2 * len(spans)
    np.testing.assert_array_equal(reconstruct(sample), source)


@pytest.mark.parametrize("n", [1, 2, 7, 40, 300])
def test_token_spans_cover_at_least_target_and_never_touch(n):
    for seed in SEEDS:
        spans = sample_token_spans(n, np.random.default_rng(seed))
        covered = sum(e - s for s, e in spans)
        target = max(1, math.ceil(0.15 * n))
        assert target <= covered < target + 39
        assert all(0 <= s < e <= n for s, e in spans)
        assert all(
            e1 < s2 for (_, e1), (s2, _) in zip(spans[:-1], spans[1:], strict=True)
        )  # a gap between


def test_token_span_lengths_follow_poisson_3():
    lengths = [
        e - s for seed in SEEDS for s, e in sample_token_spans(1000, np.random.default_rng(seed))
    ]
    # Clipping zeros up to 1 lifts the mean of Poisson(3) slightly (to 3 + P(0) ~ 3.05).
    assert 2.8 < np.mean(lengths) < 3.3
    assert max(lengths) <= 39 and min(lengths) >= 1


def test_sentence_spans_are_whole_sentences_covering_target():
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        tokens, starts = document(rng, 200)
        spans = sample_sentence_spans(200, starts, rng)
        bounds = set(zip(starts, [*starts[1:], 200], strict=True))
        assert spans and all(span in bounds for span in spans)
        covered = sum(e - s for s, e in spans)
        assert 30 <= covered <= 100


def test_sentence_spans_give_up_rather_than_hide_most_of_a_short_text():
    assert sample_sentence_spans(20, [0], np.random.default_rng(0)) == []


@pytest.mark.parametrize("n", [1, 2, 10, 333])
def test_document_span_is_one_suffix_of_half_to_all(n):
    for seed in SEEDS:
        [(start, end)] = sample_document_span(n, np.random.default_rng(seed))
        assert end == n and math.ceil(0.5 * n) <= end - start <= n


def test_build_sample_matches_the_worked_example():
    tokens = np.array([11, 12, 13, 14, 15, 16])
    sample = build_sample(tokens, [(2, 4), (5, 6)], 1, 4, 5, np.random.default_rng(0))
    assert sample.sep == 5
    np.testing.assert_array_equal(sample.input_ids[:5], [11, 12, 1, 15, 1])
    check_sample(sample, tokens)


@pytest.mark.parametrize("seq_len", [16, 64, 256])
def test_builder_samples_fit_and_reconstruct_their_window(seq_len):
    builder = SampleBuilder(ObjectiveConfig(), SPECIAL, seq_len)
    seen = set()
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        tokens, starts = document(rng, int(rng.integers(1, 3 * seq_len)))
        sample = builder.build(tokens, starts, np.random.default_rng(seed))
        assert sample.length <= seq_len
        seen.add(sample.objective)
        # The source window is the reconstruction; it must be a contiguous slice of the doc.
        window = reconstruct(sample)
        hits = [
            i
            for i in range(len(tokens) - len(window) + 1)
            if (tokens[i : i + len(window)] == window).all()
        ]
        assert hits, "reconstruction is not a window of the document"
        check_sample(sample, window)
        mask_id = SPECIAL.mask_for(sample.objective)
        assert set(sample.input_ids[: sample.sep]) & MASKS <= {mask_id}
    assert seen == {"mask", "smask", "gmask"}


def test_builder_uses_most_of_the_row_on_long_documents():
    builder = SampleBuilder(ObjectiveConfig(), SPECIAL, 256)
    fill = []
    for seed in range(50):
        rng = np.random.default_rng(seed)
        tokens, starts = document(rng, 2000)
        fill.append(builder.build(tokens, starts, rng).length / 256)
    assert np.mean(fill) > 0.85


def test_builder_respects_the_objective_mix():
    cfg = ObjectiveConfig(p_mask=0.0, p_smask=0.0, p_gmask=1.0)
    builder = SampleBuilder(cfg, SPECIAL, 64)
    tokens, starts = document(np.random.default_rng(0), 100)
    for seed in range(20):
        assert builder.build(tokens, starts, np.random.default_rng(seed)).objective == "gmask"


def test_builder_is_deterministic_by_seed():
    builder = SampleBuilder(ObjectiveConfig(), SPECIAL, 64)
    tokens, starts = document(np.random.default_rng(1), 500)
    a = builder.build(tokens, starts, np.random.default_rng(7))
    b = builder.build(tokens, starts, np.random.default_rng(7))
    c = builder.build(tokens, starts, np.random.default_rng(8))
    np.testing.assert_array_equal(a.input_ids, b.input_ids)
    np.testing.assert_array_equal(a.position_ids, b.position_ids)
    assert not np.array_equal(a.input_ids, c.input_ids)


def test_window_starts_on_a_sentence_and_fits():
    for seed in SEEDS:
        rng = np.random.default_rng(seed)
        tokens, starts = document(rng, 500)
        start, end = choose_window(500, starts, 100, rng)
        assert start in starts and 0 < end - start <= 100


def test_collate_pads_to_seq_len():
    builder = SampleBuilder(ObjectiveConfig(), SPECIAL, 32)
    rng = np.random.default_rng(0)
    samples = [builder.build(*document(rng, n), rng) for n in (5, 20, 80)]
    batch = collate(samples, pad_id=0, seq_len=32)
    for key in ("input_ids", "position_ids", "block_position_ids", "targets"):
        assert batch[key].shape == (3, 32) and batch[key].dtype == torch.int64
    assert batch["sep"].tolist() == [s.sep for s in samples]
    assert batch["lengths"].tolist() == [s.length for s in samples]
    for i, s in enumerate(samples):
        assert (batch["input_ids"][i, s.length :] == 0).all()
        assert (batch["targets"][i, s.length :] == IGNORE_INDEX).all()
        np.testing.assert_array_equal(batch["targets"][i, : s.length].numpy(), s.targets)
    with pytest.raises(ValueError, match="seq_len"):
        collate(samples, pad_id=0, seq_len=8)
