"""Training-step speed of GLM against a plain causal GPT of the same shape, and MFU.

One process, same dims, batch and sequence length, steps interleaved so that load from other
processes on a shared machine hits both alike. Three timed variants per round:

* ``glm``: GLM step with logits on every position (like-for-like with GPT);
* ``glm_trained``: GLM step with the output projection only where the loss needs it;
* ``gpt``: the same network with causal attention (SDPA ``is_causal=True``), plain positions
  and next-token targets everywhere.

Tokens/s counts input positions (B·T: Part A + Part B + the row's padding; both models
compute on the same B·T grid). ``glm_fill`` says what share of those positions the objective
filled with real tokens. MFU = (6·N + 12·L·d·T) · tokens/s over the fp32 matmul rate measured
in the same run.

    .venv/bin/python bench/train.py --preset small --steps 5
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F

from glm.config import get_preset
from glm.model import GLM, flops_per_token
from glm.objectives import SampleBuilder, SpecialIds, collate

SPECIAL = SpecialIds(mask=3, smask=4, gmask=5, sop=6, eop=7)
MFU_GOAL_CPU = 0.60
RATIO_GOAL = 0.95


class CausalGPT(GLM):
    """The GLM network with GPT's attention: every query sees itself and earlier keys only."""

    def make_attention(self, sep, lengths, T):
        def attend(q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

        return attend


def glm_batch(preset, batch: int, seq_len: int, seed: int = 0) -> dict:
    """A real GLM batch: long random documents through the preset's objective mix."""
    rng = np.random.default_rng(seed)
    builder = SampleBuilder(preset.objective, SPECIAL, seq_len)
    samples = []
    for _ in range(batch):
        n = 4 * seq_len
        tokens = rng.integers(8, preset.model.vocab_size, size=n)
        starts = np.cumsum(rng.integers(10, 40, size=n // 10))
        samples.append(builder.build(tokens, [0, *starts[starts < n]], rng))
    return collate(samples, pad_id=0, seq_len=seq_len)


def gpt_batch(glm: dict) -> dict:
    """The same token grid as a GPT batch: positions 0..T-1, next-token targets everywhere."""
    ids = glm["input_ids"]
    B, T = ids.shape
    return {
        "input_ids": ids,
        "position_ids": torch.arange(T).expand(B, T),
        "block_position_ids": torch.zeros_like(ids),
        "sep": torch.zeros(B, dtype=torch.long),
        "lengths": torch.full((B,), T),
        "targets": torch.roll(ids, -1, dims=1),
    }


def make_step(model, opt, b: dict, logits: str):
    """One fwd + bwd + AdamW step on a fixed batch."""
    args = [b[k] for k in ("input_ids", "position_ids", "block_position_ids", "sep", "lengths")]

    def step():
        _, loss = model(*args, targets=b["targets"], logits=logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return step


def matmul_ceiling(n: int = 2048, repeats: int = 5) -> float:
    """Best fp32 FLOP/s of an n×n matmul on this machine, now."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.matmul(a, b)
        best = min(best, time.perf_counter() - t0)
    return 2 * n**3 / best


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=None, help="default: the preset's")
    parser.add_argument("--seq-len", type=int, default=None, help="default: the preset's")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--vocab", type=int, default=8000, help="the tokenizer's vocab size")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    preset = get_preset(args.preset)
    batch = args.batch or preset.train.batch_size
    seq_len = args.seq_len or preset.train.seq_len
    cfg = replace(preset.model, vocab_size=args.vocab)
    preset = replace(preset, model=cfg)

    g_batch = glm_batch(preset, batch, seq_len)
    p_batch = gpt_batch(g_batch)
    variants = {}
    for name, cls, b, logits in (
        ("glm", GLM, g_batch, "all"),
        ("glm_trained", GLM, g_batch, "loss"),
        ("gpt", CausalGPT, p_batch, "all"),
    ):
        torch.manual_seed(0)
        model = cls(cfg, attention="sdpa").train()
        # fused: one kernel per step instead of a loop of per-tensor ops (~10% of a CPU step).
        opt = torch.optim.AdamW(
            model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, fused=True
        )
        variants[name] = make_step(model, opt, b, logits)

    ceiling_before = matmul_ceiling()
    for step in variants.values():
        for _ in range(args.warmup):
            step()
    times = {name: [] for name in variants}
    for _ in range(args.steps):
        for name, step in variants.items():
            t0 = time.perf_counter()
            loss = step()
            times[name].append(time.perf_counter() - t0)
            assert np.isfinite(loss), f"{name}: non-finite loss"
    ceiling = max(ceiling_before, matmul_ceiling())

    positions = batch * seq_len
    flops = flops_per_token(cfg, seq_len)
    result = {
        "preset": args.preset,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "batch": batch,
        "seq_len": seq_len,
        "vocab_size": cfg.vocab_size,
        "params_non_embedding": GLM(cfg).num_params(),
        "flops_per_token": flops,
        "steps": args.steps,
        "warmup": args.warmup,
        "matmul_ceiling_tflops": ceiling / 1e12,
        "glm_fill": float(g_batch["lengths"].sum()) / positions,
        "glm_loss_share": float((g_batch["targets"] != -100).sum()) / positions,
    }
    for name, ts in times.items():
        median = statistics.median(ts)
        result[f"{name}_step_s"] = median
        result[f"{name}_tokens_per_s"] = positions / median
        result[f"{name}_mfu"] = flops * positions / median / ceiling
    result["glm_over_gpt"] = result["glm_tokens_per_s"] / result["gpt_tokens_per_s"]
    result["glm_over_gpt_trained"] = result["glm_trained_tokens_per_s"] / result["gpt_tokens_per_s"]
    result["goals"] = {
        "glm_over_gpt": RATIO_GOAL,
        "glm_mfu": MFU_GOAL_CPU,
        "met_ratio": result["glm_over_gpt"] >= RATIO_GOAL,
        "met_mfu": result["glm_mfu"] >= MFU_GOAL_CPU,
    }
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
