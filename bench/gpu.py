"""GPU training-step speed of GLM: FlexAttention vs dense-mask SDPA vs a causal GPT, and MFU.

Run by ``bench/gpu.sh`` on a lent GPU (``base`` preset, bf16 autocast, seq 512 and 1024).
Imports only ``glm.config``, ``glm.model`` and ``glm.objectives`` (plus the batch helpers of
``bench/train.py``), so it runs with nothing but torch and numpy installed.

Variants, all with the same dims, batch and sequence length, fused AdamW, bf16 autocast:

* ``glm_flex``: GLM, FlexAttention block mask, logits on every position;
* ``glm_flex_trained``: the same with logits only where the loss needs them;
* ``glm_sdpa``: GLM, SDPA with a dense (B, 1, T, T) boolean mask;
* ``gpt``: causal attention (SDPA ``is_causal``), next-token targets everywhere.

MFU = (6·N + 12·L·d·T) · tokens/s over the bf16 matmul rate measured in the same run. It also
checks that FlexAttention and SDPA agree on one batch. On a machine without CUDA it runs the
SDPA/GPT variants on CPU (a smoke test of this script; the figures mean nothing there).

    python -m bench.gpu --preset base --seq-lens 512 1024
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path

import torch

from bench.train import CausalGPT, glm_batch, gpt_batch
from glm.config import get_preset
from glm.model import GLM, flops_per_token

MFU_GOAL_GPU = 0.45
KEYS = ("input_ids", "position_ids", "block_position_ids", "sep", "lengths")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_ceiling(device: torch.device, dtype: torch.dtype, n: int, repeats: int = 10) -> float:
    """Best FLOP/s of an n×n matmul in ``dtype``: the denominator of MFU."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        torch.matmul(a, b)
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(10):
            torch.matmul(a, b)
        sync(device)
        best = min(best, (time.perf_counter() - t0) / 10)
    return 2 * n**3 / best


def train_step_fn(model, batch: dict, logits: str, device: torch.device, dtype):
    """A closure running one fwd + bwd + fused AdamW step under autocast."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.98), eps=1e-6, fused=True)
    args = [batch[k] for k in KEYS]

    def step():
        with torch.autocast(device.type, dtype=dtype):
            _, loss = model(*args, targets=batch["targets"], logits=logits)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step


def time_steps(step, device: torch.device, warmup: int, steps: int) -> list[float]:
    """Seconds per step, after ``warmup`` untimed steps (compilation happens there)."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        loss = step()
        sync(device)
        times.append(time.perf_counter() - t0)
        if not torch.isfinite(loss):
            raise FloatingPointError("non-finite loss")
    return times


def flex_matches_sdpa(cfg, batch: dict, device: torch.device, dtype) -> float:
    """Largest |logit difference| between the two attention paths on real positions."""
    torch.manual_seed(0)
    model = GLM(cfg, attention="sdpa").to(device).eval()
    args = [batch[k] for k in KEYS]
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype):
        ref, _ = model(*args)
        model.attention = "flex"
        out, _ = model(*args)
    valid = torch.arange(ref.shape[1], device=device) < batch["lengths"].view(-1, 1)
    return (out[valid].float() - ref[valid].float()).abs().max().item()


def bench_seq_len(preset, seq_len: int, batch_size: int, args, device, dtype, ceiling) -> dict:
    cfg = replace(
        preset.model,
        vocab_size=args.vocab,
        max_seq_len=max(preset.model.max_seq_len, seq_len),
        max_block_len=max(preset.model.max_block_len, seq_len),
    )
    preset = replace(preset, model=cfg)
    g = {k: v.to(device) for k, v in glm_batch(preset, batch_size, seq_len).items()}
    p = {k: v.to(device) for k, v in gpt_batch(g).items()}
    variants = [("glm_sdpa", GLM, "sdpa", g, "all"), ("gpt", CausalGPT, "sdpa", p, "all")]
    if device.type == "cuda":
        variants = [
            ("glm_flex", GLM, "flex", g, "all"),
            ("glm_flex_trained", GLM, "flex", g, "loss"),
            *variants,
        ]
    positions = batch_size * seq_len
    flops = flops_per_token(cfg, seq_len)
    result = {"seq_len": seq_len, "batch": batch_size, "flops_per_token": flops}
    result["glm_fill"] = float(g["lengths"].sum()) / positions
    for name, cls, attention, batch, logits in variants:
        torch.manual_seed(0)
        model = cls(cfg, attention=attention).to(device).train()
        if args.compile:
            model = torch.compile(model)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        try:
            step = train_step_fn(model, batch, logits, device, dtype)
            median = statistics.median(time_steps(step, device, args.warmup, args.steps))
        except Exception as err:  # one failing variant must not lose the others' figures
            result[f"{name}_error"] = f"{type(err).__name__}: {err}"[:500]
            continue
        result[f"{name}_step_s"] = median
        result[f"{name}_tokens_per_s"] = positions / median
        result[f"{name}_mfu"] = flops * positions / median / ceiling
        if device.type == "cuda":
            result[f"{name}_peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        del model, step
    if device.type == "cuda":
        try:
            result["flex_vs_sdpa_max_abs_logit_diff"] = flex_matches_sdpa(cfg, g, device, dtype)
        except Exception as err:
            result["flex_vs_sdpa_error"] = f"{type(err).__name__}: {err}"[:500]
    for name in ("glm_flex", "glm_flex_trained", "glm_sdpa"):
        if f"{name}_tokens_per_s" in result and "gpt_tokens_per_s" in result:
            ratio = result[f"{name}_tokens_per_s"] / result["gpt_tokens_per_s"]
            result[f"{name}_over_gpt"] = ratio
    return result


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="base")
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[512, 1024])
    parser.add_argument(
        "--tokens-per-step", type=int, default=32 * 512, help="batch = this // seq_len"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps (compilation)")
    parser.add_argument("--vocab", type=int, default=8000, help="the tokenizer's vocab size")
    parser.add_argument("--compile", action="store_true", help="torch.compile the whole model")
    parser.add_argument("--ceiling-n", type=int, default=8192, help="matmul size for the ceiling")
    parser.add_argument("--out", default=os.environ.get("OUT"), help="directory for the JSON")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    preset = get_preset(args.preset)
    ceiling = matmul_ceiling(device, dtype, args.ceiling_n if device.type == "cuda" else 512)
    report = {
        "preset": args.preset,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "dtype": "bfloat16 autocast",
        "compile_model": args.compile,
        "steps": args.steps,
        "warmup": args.warmup,
        "vocab_size": args.vocab,
        "matmul_ceiling_tflops": ceiling / 1e12,
        "mfu_goal": MFU_GOAL_GPU,
        "runs": [],
    }
    for seq_len in args.seq_lens:
        batch_size = max(1, args.tokens_per_step // seq_len)
        run = bench_seq_len(preset, seq_len, batch_size, args, device, dtype, ceiling)
        report["runs"].append(run)
        print(json.dumps(run), flush=True)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_bench.json").write_text(text + "\n")
    return report


if __name__ == "__main__":
    main()
