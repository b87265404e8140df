"""Blank filling: every [MASK], [sMASK] and [gMASK] of every text, batched, with a KV cache.

As in GLM's own infilling, the text with its blanks is Part A, encoded once with the
bidirectional mask; then the blanks are filled one after another, left to right. Blank j is
generated after a ``<sop>`` whose position id is the blank's index in Part A and whose block
positions count 1, 2, ... until ``<eop>`` or the length limit. The tokens of earlier fills
stay in the cache, so later blanks see them as Part B context, exactly like training, where
Part B holds every earlier span.

``fill_blank_ids`` works on token ids and needs no tokenizer; ``fill_blanks`` wraps it for
text.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from glm.errors import InputError
from glm.model import GLM


@dataclass(frozen=True)
class GenerationConfig:
    """How each blank's span is generated."""

    max_new_tokens: int = 32  # per blank, <eop> excluded; also capped by the block table
    temperature: float = 0.0  # 0: greedy (argmax); otherwise sample from softmax(logits / t)
    top_k: int = 0  # sample among the k most likely tokens only (0: no limit)
    top_p: float = 1.0  # nucleus: smallest set of tokens with this much probability
    seed: int = 0  # sampling is reproducible per call

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise InputError("generation setting max_new_tokens: must be >= 1")
        if not 0 <= self.temperature < math.inf:
            raise InputError("generation setting temperature: must be a finite number >= 0")
        if self.top_k < 0:
            raise InputError("generation setting top_k: must be >= 0 (0 disables it)")
        if not 0.0 < self.top_p <= 1.0:
            raise InputError("generation setting top_p: must be in (0, 1]")


def next_tokens(logits: Tensor, cfg: GenerationConfig, generator: torch.Generator) -> Tensor:
    """(B, V) logits -> (B,) token ids: argmax, or a sample after temperature/top-k/top-p."""
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / cfg.temperature
    if cfg.top_k:
        kth = torch.topk(logits, min(cfg.top_k, logits.shape[-1]), dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already hold top_p: the first always stays.
        drop_sorted = cum - sorted_logits.softmax(dim=-1) >= cfg.top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(1)


@torch.no_grad()
def fill_blank_ids(
    model: GLM,
    part_a: Sequence[Sequence[int]],
    blank_ids: Iterable[int],
    sop_id: int,
    eop_id: int,
    cfg: GenerationConfig,
    banned_ids: Iterable[int] = (),
) -> list[list[list[int]]]:
    """Generate a span for every blank token in every row of ``part_a``.

    Returns, per row, one list of generated ids per blank in left-to-right order (``<eop>``
    not included). ``banned_ids`` (the other special tokens) are never generated.
    """
    model.eval()
    device = model.wte.weight.device
    blank_set = set(blank_ids)
    blanks = [[i for i, t in enumerate(row) if t in blank_set] for row in part_a]
    B = len(part_a)
    fills: list[list[list[int]]] = [[] for _ in range(B)]
    n_blanks = max((len(b) for b in blanks), default=0)
    if n_blanks == 0:
        return fills
    T = max(len(row) for row in part_a)
    if model.cfg.max_seq_len < T:
        raise InputError(f"text of {T} tokens exceeds the model's {model.cfg.max_seq_len}")
    # The k-th fed token of a span has block position k; the table bounds the span length.
    max_new = min(cfg.max_new_tokens, model.cfg.max_block_len - 1)

    ids = torch.zeros(B, T, dtype=torch.long, device=device)
    for i, row in enumerate(part_a):
        ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
    lengths = torch.tensor([len(row) for row in part_a], device=device)
    _, cache = model.prefill(ids, lengths, capacity=T + n_blanks * max_new)

    banned = torch.tensor(sorted(set(banned_ids) - {eop_id}), dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    for j in range(n_blanks):
        running = torch.tensor([j < len(b) for b in blanks], device=device)
        position = torch.tensor([b[j] if j < len(b) else 0 for b in blanks], device=device)
        token = torch.full((B,), sop_id, dtype=torch.long, device=device)
        for step in range(max_new):
            block = torch.full((B,), step + 1, dtype=torch.long, device=device)
            # Rows not running feed a filler that later tokens must not see: keep=False.
            logits = model.decode_step(token, position, block, cache, keep=running)
            logits[:, banned] = float("-inf")
            token = next_tokens(logits, cfg, generator)
            running = running & (token != eop_id)
            for i in running.nonzero().flatten().tolist():
                if len(fills[i]) == j:
                    fills[i].append([])
                fills[i][j].append(int(token[i]))
            if not running.any():
                break
        for i, b in enumerate(blanks):  # blanks whose first token was <eop>: an empty fill
            if j < len(b) and len(fills[i]) == j:
                fills[i].append([])
    return fills


def fill_blanks(model: GLM, tokenizer, texts: Sequence[str], cfg: GenerationConfig) -> list[str]:
    """Each text with every ``[MASK]``/``[sMASK]``/``[gMASK]`` replaced by generated text.

    A text without blanks comes back as encoded and decoded. The output never holds special
    tokens: they cannot be generated (except ``<eop>``, which ends a span) and ``decode``
    drops the rest.
    """
    rows = [tokenizer.encode_with_blanks(t) for t in texts]
    blank_ids = {tokenizer.mask_id, tokenizer.smask_id, tokenizer.gmask_id}
    fills = fill_blank_ids(
        model,
        rows,
        blank_ids,
        tokenizer.sop_id,
        tokenizer.eop_id,
        cfg,
        banned_ids=tokenizer.special_ids.values(),
    )
    out = []
    for row, row_fills in zip(rows, fills, strict=True):
        spans = iter(row_fills)
        ids = []
        for t in row:
            ids.extend(next(spans) if t in blank_ids else [t])
        out.append(tokenizer.decode(ids))
    return out
