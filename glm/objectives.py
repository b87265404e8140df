"""GLM's blank-infilling objective: choose spans, build Part A / Part B, 2D positions, batches.

Everything here is a small pure function over numpy arrays with an explicit
``np.random.Generator``, so a sample depends only on (document, seed). Continued pretraining
on new data needs only this module: a document is a token array plus the token offsets where
its sentences start (the shard format), and ``SampleBuilder.build`` turns it into one sample.

A sample, for source tokens ``x1 .. x6`` with spans ``(x3 x4)`` and ``(x6)``::

    Part A (context)               Part B (spans, shuffled; here span 2 comes first)
    input   x1 x2 [M] x5 [M]  |  <sop> x6   <sop> x3   x4
    target  -  -  -   -  -    |  x6   <eop> x3    x4  <eop>
    pos     0  1  2   3  4    |  4    4     2     2    2
    block   0  0  0   0  0    |  1    2     1     2    3

``sep`` is the length of Part A (5 here). The model attends bidirectionally within Part A and
causally within Part B (see glm/model.py).

The two position ids (the part of GLM users found least clear):

* ``position_ids`` says *where* a token belongs in the text. Part A tokens use their own index
  in Part A. Every Part B token uses the index of the mask token its span replaced, so all
  tokens of a span share one position: the place the span is to be written.
* ``block_position_ids`` says *how far into its span* a token is: 0 for every Part A token,
  1 for a span's ``<sop>``, 2 for its first real token, and so on. It counts from the start
  of the span, never from its end, so the model is not told how long the span is and must
  decide itself when to emit ``<eop>``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from glm.config import ObjectiveConfig

IGNORE_INDEX = -100  # targets with this value carry no loss (PyTorch's cross-entropy default)
OBJECTIVES = ("mask", "smask", "gmask")  # token, sentence and document level
MAX_SENTENCE_COVERAGE = 0.5  # [sMASK] never hides more than this share of a window
MAX_CROP_WASTE = 0.125  # a window ends on a sentence boundary if that drops at most this share

Span = tuple[int, int]  # [start, end) token offsets into the source window


@dataclass(frozen=True)
class SpecialIds:
    """The token ids the objective needs, taken from the tokenizer (``tokenizer.json``)."""

    mask: int  # [MASK]: token-level spans
    smask: int  # [sMASK]: sentence-level spans
    gmask: int  # [gMASK]: document-level suffix
    sop: int  # <sop>: first input token of every Part B span
    eop: int  # <eop>: last target token of every Part B span

    @classmethod
    def from_tokenizer(cls, tok) -> SpecialIds:
        """Read the ids off a ``glm.tokenizer.Tokenizer`` (or anything with the same names)."""
        return cls(tok.mask_id, tok.smask_id, tok.gmask_id, tok.sop_id, tok.eop_id)

    def mask_for(self, objective: str) -> int:
        """The mask token that tells the model which objective it faces."""
        return {"mask": self.mask, "smask": self.smask, "gmask": self.gmask}[objective]


@dataclass
class Sample:
    """One training sequence: Part A followed by Part B, unpadded (numpy int64 arrays)."""

    input_ids: np.ndarray  # (length,)
    position_ids: np.ndarray  # (length,) where each token belongs in Part A
    block_position_ids: np.ndarray  # (length,) 0 in Part A, 1.. inside each span
    targets: np.ndarray  # (length,) IGNORE_INDEX in Part A, next span token / <eop> in Part B
    sep: int  # length of Part A
    length: int  # length of Part A + Part B
    objective: str  # "mask", "smask" or "gmask": lets evaluation report loss per objective


# ---------------------------------------------------------------------------------------------
# Span sampling: three ways to choose what to hide. Each returns sorted, disjoint [start, end).


def coverage_target(n: int, ratio: float) -> int:
    """Tokens the token/sentence objectives must hide in a text of ``n`` tokens (at least 1)."""
    return max(1, math.ceil(ratio * n))


def sample_token_spans(
    n: int,
    rng: np.random.Generator,
    ratio: float = 0.15,
    poisson_lambda: float = 3.0,
    max_span_len: int = 39,
) -> list[Span]:
    """Token-level [MASK] spans: Poisson lengths until ``ratio`` of ``n`` tokens is covered.

    Lengths are drawn from Poisson(``poisson_lambda``) clipped to 1..``max_span_len``; drawing
    stops at the first total that reaches the target, so coverage is at least the target and
    at most target + max_span_len - 1. The spans are then laid out in random order with at
    least one unmasked token between neighbours: two spans that touched would be
    indistinguishable from one longer span in Part A.
    """
    if n <= 0:
        return []
    target = coverage_target(n, ratio)
    lengths: list[int] = []
    covered = 0
    while covered < target:
        # Room left: every span after the first needs a one-token gap before it.
        room = n - covered - len(lengths)
        if room <= 0:
            break
        length = int(np.clip(rng.poisson(poisson_lambda), 1, max_span_len))
        lengths.append(min(length, room))
        covered += lengths[-1]
    rng.shuffle(lengths)
    return _place_spans(n, lengths, rng)


def _place_spans(n: int, lengths: Sequence[int], rng: np.random.Generator) -> list[Span]:
    """Lay spans of the given lengths over ``n`` tokens, uniformly, never touching.

    The ``n - sum(lengths)`` unmasked tokens form m + 1 gaps (before, between, after the m
    spans); the m - 1 inner gaps need at least one token each. A uniform composition of the
    remaining free tokens into m + 1 parts is m "bars" chosen among free + m slots.
    """
    m = len(lengths)
    if m == 0:
        return []
    free = n - sum(lengths) - (m - 1)
    assert free >= 0, "spans do not fit"
    bars = np.sort(rng.choice(free + m, size=m, replace=False))
    gaps = np.diff(np.concatenate([[-1], bars])) - 1  # (m,) free tokens before each span
    spans = []
    pos = 0
    for i, (gap, length) in enumerate(zip(gaps, lengths, strict=True)):
        pos += int(gap) + (1 if i > 0 else 0)
        spans.append((pos, pos + length))
        pos += length
    return spans


def sample_sentence_spans(
    n: int,
    sentence_starts: Sequence[int],
    rng: np.random.Generator,
    ratio: float = 0.15,
) -> list[Span]:
    """Sentence-level [sMASK] spans: whole sentences, in random order, until ``ratio`` covered.

    A sentence that would push coverage past ``MAX_SENTENCE_COVERAGE`` is skipped, so a text of
    one or two long sentences is not hidden entirely. Returns ``[]`` when no choice of whole
    sentences reaches the target under that cap; the caller then falls back to token spans.
    """
    bounds = sentence_bounds(n, sentence_starts)
    target = coverage_target(n, ratio)
    limit = max(target, int(MAX_SENTENCE_COVERAGE * n))
    chosen: list[Span] = []
    covered = 0
    for i in rng.permutation(len(bounds)):
        start, end = bounds[i]
        if covered + (end - start) > limit:
            continue
        chosen.append((start, end))
        covered += end - start
        if covered >= target:
            return sorted(chosen)
    return []


def sentence_bounds(n: int, sentence_starts: Sequence[int]) -> list[Span]:
    """Turn sentence start offsets into non-empty [start, end) sentences covering 0..n."""
    starts = sorted({0, *(int(s) for s in sentence_starts if 0 < s < n)})
    return list(zip(starts, [*starts[1:], n], strict=True))


def sample_document_span(
    n: int, rng: np.random.Generator, min_frac: float = 0.5, max_frac: float = 1.0
) -> list[Span]:
    """Document-level [gMASK]: one suffix whose length is uniform in [min_frac, max_frac]·n."""
    lo = max(1, math.ceil(min_frac * n))
    hi = max(lo, math.floor(max_frac * n))
    length = int(rng.integers(lo, hi + 1))
    return [(n - length, n)]


# ---------------------------------------------------------------------------------------------
# Building one sample from chosen spans.


def build_sample(
    tokens: np.ndarray,
    spans: Sequence[Span],
    mask_id: int,
    sop_id: int,
    eop_id: int,
    rng: np.random.Generator,
    objective: str = "mask",
) -> Sample:
    """Part A (spans replaced by ``mask_id``) + Part B (spans shuffled), with 2D positions.

    ``spans`` must be sorted and disjoint. Part B feeds each span as ``<sop> + span`` and
    predicts ``span + <eop>``, so the total length is ``len(tokens) + 2 * len(spans)``.
    """
    tokens = np.asarray(tokens, dtype=np.int64)
    part_a, mask_positions = _part_a(tokens, spans, mask_id)
    sep = len(part_a)

    inputs, targets, positions, blocks = [part_a], [np.full(sep, IGNORE_INDEX)], [], []
    positions.append(np.arange(sep))
    blocks.append(np.zeros(sep, dtype=np.int64))
    for i in rng.permutation(len(spans)):
        start, end = spans[i]
        span = tokens[start:end]
        inputs.append(np.concatenate([[sop_id], span]))
        targets.append(np.concatenate([span, [eop_id]]))
        positions.append(np.full(len(span) + 1, mask_positions[i]))
        blocks.append(np.arange(1, len(span) + 2))

    input_ids = np.concatenate(inputs).astype(np.int64)
    return Sample(
        input_ids=input_ids,
        position_ids=np.concatenate(positions).astype(np.int64),
        block_position_ids=np.concatenate(blocks).astype(np.int64),
        targets=np.concatenate(targets).astype(np.int64),
        sep=sep,
        length=len(input_ids),
        objective=objective,
    )


def _part_a(tokens: np.ndarray, spans: Sequence[Span], mask_id: int) -> tuple[np.ndarray, list]:
    """The text with each span replaced by one mask token, and where each mask landed."""
    pieces, mask_positions = [], []
    prev, length = 0, 0
    for start, end in spans:
        pieces.append(tokens[prev:start])
        length += start - prev
        mask_positions.append(length)
        pieces.append(np.array([mask_id], dtype=np.int64))
        length += 1
        prev = end
    pieces.append(tokens[prev:])
    return np.concatenate(pieces).astype(np.int64), mask_positions


# ---------------------------------------------------------------------------------------------
# From a document of any length to a sample that fits ``seq_len``.


def choose_window(
    n: int, sentence_starts: Sequence[int], width: int, rng: np.random.Generator
) -> Span:
    """A random [start, end) of at most ``width`` tokens, on sentence boundaries where possible.

    The window starts at a random sentence start from which ``width`` tokens remain (or
    anywhere, if the text has no such sentence start) and ends at the last sentence boundary
    inside it, unless that would leave more than ``MAX_CROP_WASTE`` of the row as padding.
    """
    if n <= width:
        return 0, n
    starts = np.array(sorted({0, *(int(s) for s in sentence_starts if 0 < s < n)}))
    fitting = starts[starts + width <= n]
    start = int(rng.choice(fitting)) if len(fitting) else int(rng.integers(0, n - width + 1))
    end = start + width
    inner = starts[(starts >= end - int(MAX_CROP_WASTE * width)) & (starts <= end)]
    if len(inner) and end < n:
        end = int(inner[-1])
    return start, end


class SampleBuilder:
    """Turns a document into one blank-infilling sample of at most ``seq_len`` tokens.

    Per sample it picks the objective with probabilities ``cfg.p_mask / p_smask / p_gmask``
    (defaults 0.4 / 0.2 / 0.4: see ``glm.config.ObjectiveConfig``). Documents longer than fit
    are cropped to a random window (sentence-aligned where possible); the window is shrunk
    until Part A + Part B = window + 2·spans fits in ``seq_len``. Short documents are not
    packed together: the rest of the row is padding in ``collate``.
    """

    def __init__(self, cfg: ObjectiveConfig, special: SpecialIds, seq_len: int):
        if seq_len < 4:
            raise ValueError(f"seq_len: must be >= 4, got {seq_len}")
        self.cfg = cfg
        self.special = special
        self.seq_len = seq_len
        self._probs = np.array([cfg.p_mask, cfg.p_smask, cfg.p_gmask])

    def pick_objective(self, rng: np.random.Generator) -> str:
        """Draw "mask", "smask" or "gmask" with the configured probabilities."""
        return OBJECTIVES[int(rng.choice(3, p=self._probs))]

    def build(
        self, tokens: np.ndarray, sentence_starts: Sequence[int], rng: np.random.Generator
    ) -> Sample:
        """One sample from one document: objective, window, spans, Part A + Part B."""
        tokens = np.asarray(tokens, dtype=np.int64)
        if len(tokens) == 0:
            raise ValueError("cannot build a sample from an empty document")
        objective = self.pick_objective(rng)
        # Start from the widest window that could fit (one span: 2 extra tokens) and shrink by
        # the overflow until the spans drawn for it fit; each round loses at least one token.
        width = min(len(tokens), self.seq_len - 2)
        while True:
            start, end = choose_window(len(tokens), sentence_starts, width, rng)
            window = tokens[start:end]
            local_starts = [s - start for s in sentence_starts if start <= s < end]
            objective_used, spans = self._spans(objective, len(window), local_starts, rng)
            overflow = len(window) + 2 * len(spans) - self.seq_len
            if overflow <= 0:
                break
            width = len(window) - overflow
        mask_id = self.special.mask_for(objective_used)
        sp = self.special
        return build_sample(window, spans, mask_id, sp.sop, sp.eop, rng, objective_used)

    def _spans(
        self, objective: str, n: int, sentence_starts: Sequence[int], rng: np.random.Generator
    ) -> tuple[str, list[Span]]:
        cfg = self.cfg
        if objective == "gmask":
            return objective, sample_document_span(n, rng, cfg.gmask_min, cfg.gmask_max)
        if objective == "smask":
            spans = sample_sentence_spans(n, sentence_starts, rng, cfg.mask_ratio)
            if spans:
                return objective, spans
            # Too few sentences to hide 15% without hiding most of the text: token spans.
        spans = sample_token_spans(n, rng, cfg.mask_ratio, cfg.poisson_lambda, cfg.max_span_len)
        return "mask", spans


# ---------------------------------------------------------------------------------------------
# Batching.


def collate(samples: Sequence[Sample], pad_id: int, seq_len: int) -> dict[str, torch.Tensor]:
    """Pad samples to ``seq_len`` and stack them into the model's inputs.

    Returns ``input_ids, position_ids, block_position_ids, targets`` as (B, seq_len) int64 and
    ``sep, lengths`` as (B,) int64. Padding is ``pad_id`` / position 0 / block 0 / no loss;
    the model never attends to it (keys at or after ``lengths`` are masked). A fixed width
    keeps shapes static, which compiled kernels prefer.
    """
    batch = len(samples)
    out = {
        "input_ids": np.full((batch, seq_len), pad_id, dtype=np.int64),
        "position_ids": np.zeros((batch, seq_len), dtype=np.int64),
        "block_position_ids": np.zeros((batch, seq_len), dtype=np.int64),
        "targets": np.full((batch, seq_len), IGNORE_INDEX, dtype=np.int64),
    }
    for i, s in enumerate(samples):
        if s.length > seq_len:
            raise ValueError(f"sample {i} has {s.length} tokens, more than seq_len={seq_len}")
        out["input_ids"][i, : s.length] = s.input_ids
        out["position_ids"][i, : s.length] = s.position_ids
        out["block_position_ids"][i, : s.length] = s.block_position_ids
        out["targets"][i, : s.length] = s.targets
    tensors = {k: torch.from_numpy(v) for k, v in out.items()}
    tensors["sep"] = torch.tensor([s.sep for s in samples], dtype=torch.int64)
    tensors["lengths"] = torch.tensor([s.length for s in samples], dtype=torch.int64)
    return tensors
