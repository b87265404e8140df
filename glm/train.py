"""The trainer: shards + tokenizer + preset -> checkpoints, a model package and metrics.

``train(manifest_path, tokenizer_dir, out_dir, preset)`` writes into ``out_dir``::

    checkpoints/step-00000100/   model.safetensors, state.pt, checkpoint.json (last)
    final/                       a model package (glm.package.save_package)
    metrics.jsonl                one row per log interval
    train.json                   written last: the run's summary

Budget. The run length is a step count. A time budget (``time_budget_s``) is converted to
steps before training starts, from the measured time of a few probe steps on a throwaway
copy of the model, and recorded in every checkpoint; a resumed run keeps the recorded count,
so its outputs depend on its inputs and not on how fast the machine was the second time.

Checkpoints. Every ``ckpt_every`` steps, on SIGTERM and at the end, rank 0 writes a
checkpoint directory atomically (built under a temporary name, renamed into place), then
deletes all but the newest ``keep_last``. Weights are safetensors; everything else is in
``state.pt`` as plain Python types and tensors only, so it loads with
``torch.load(weights_only=True)``: optimizer state, the schedule position, the RNG states
(torch, CUDA, numpy's global generator, python's ``random``), the data cursor
(``glm.data.SampleStream.state_dict``), the preset and the metric history.
``checkpoint.json`` holds the sha256 of both files and is written last, so a checkpoint
that was truncated or altered after the fact is detected on load.

Resume (``resume=``): ``"auto"`` continues from the newest checkpoint if there is one and
starts fresh otherwise; ``"must"`` requires one; ``"never"`` deletes existing checkpoints
and starts fresh. A checkpoint that exists but does not verify is an ``IntegrityError`` in
every mode: never a silent fresh start. Resumption is exact: data order and span sampling
are counter-based (see glm/data.py) and all RNG and optimizer state is restored, so on CPU a
run killed and resumed ends bit-identical to an uninterrupted one with the same thread count.
The output directory must be the same path across retries (it is where checkpoints live).

Distributed. Under ``torchrun`` (``WORLD_SIZE`` > 1) the model is wrapped in DDP (gloo on
CPU, nccl on CUDA); each rank draws its own slice of every global batch; rank 0 writes
checkpoints, metrics and the package while the others wait at a barrier. The loss is
normalised by the number of target tokens in the whole global step, so gradient
accumulation and any world size give the gradient of the combined batch.

Fault injection (for reliability tests): ``GLM_FAULT`` names points where a run is killed
or fails (``glm/faults.py``); the trainer has ``step:N`` (after optimizer step N, before its
checkpoint) and ``ckpt-write:N`` (the checkpoint of step N half-written). Example:
``GLM_FAULT=kill@step:5`` dies before the first checkpoint of the tiny preset,
``GLM_FAULT=kill@ckpt-write:20`` during it, ``GLM_FAULT=fail-once@step:30`` fails the first
attempt only.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import logging
import math
import os
import random
import re
import shutil
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_model, save_model
from tqdm import tqdm

from glm.atomic import atomic_dir, write_bytes_atomic, write_json_atomic
from glm.config import ModelConfig, Preset, get_preset
from glm.data import SampleStream
from glm.digest import sha256_file
from glm.errors import InputError, IntegrityError, Interrupted
from glm.faults import InjectedFault as InjectedFault  # re-exported: raised by fault_point
from glm.faults import fault_point

log = logging.getLogger(__name__)

CHECKPOINT_FORMAT = 1
_STEP_DIR = re.compile(r"^step-(\d{8})$")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; raised before the optimizer step that would use it."""


class TrainingInterrupted(Interrupted):
    """SIGTERM or Ctrl-C arrived; a checkpoint of the last completed step was written first."""


# schedule and optimizer ---------------------------------------------------------------------


def lr_at(step: int, peak: float, max_steps: int, warmup_frac: float, min_ratio: float) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup, then cosine decay.

    A pure function of the step, so the schedule's whole state is the step counter.
    """
    warmup = int(warmup_frac * max_steps)
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, max_steps - warmup)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return peak * (min_ratio + (1.0 - min_ratio) * cosine)


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: decay on weight matrices only; none on norms, biases and embeddings.

    Embedding tables are excluded by module type (the output projection is tied to the token
    embedding, so it is excluded with it).
    """
    no_decay: set[int] = set()
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding | torch.nn.LayerNorm):
            no_decay.update(id(p) for p in module.parameters(recurse=False))
    decay, plain = [], []
    for p in model.parameters():  # parameters() yields a tied tensor once
        if not p.requires_grad:
            continue
        (plain if p.ndim < 2 or id(p) in no_decay else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": plain, "weight_decay": 0.0},
    ]


# devices and processes ----------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    """This process's place in a (possibly single-process) job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def resolve_device(device: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; an explicit cuda without a GPU is an error."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise InputError(f"device must be auto, cpu, cuda or cuda:N, not {device!r}")
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"device {device} requested but torch sees no CUDA device")
        index = torch.device(device).index
        if index is not None and index >= torch.cuda.device_count():
            raise InputError(f"device {device}: torch sees {torch.cuda.device_count()} GPU(s)")
    return torch.device(device)


def _init_distributed(device: torch.device) -> Dist:
    """Join the torchrun job described by the environment, if any."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Dist()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank, world_size, local_rank)


def _all_reduce(value: torch.Tensor, ctx: Dist, op=None) -> torch.Tensor:
    """Sum (or ``op``) a small tensor over ranks; nccl needs it on the GPU for the trip."""
    if ctx.world_size == 1:
        return value
    on = value.cuda() if dist.get_backend() == "nccl" else value
    dist.all_reduce(on, op=op or dist.ReduceOp.SUM)
    return on.to(value.device)


def _barrier(ctx: Dist) -> None:
    if ctx.world_size > 1:
        dist.barrier()


class _StopFlag:
    """Turns SIGTERM and a first Ctrl-C (SIGINT) into a flag the loop checks after each step
    (main thread only). A second Ctrl-C interrupts at once, as Python's default does."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.signal: str | None = None
        self._previous: dict = {}

    def __enter__(self) -> _StopFlag:
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                # an ignored SIGINT (a shell's background job) stays ignored
                if s == signal.SIGINT and signal.getsignal(s) == signal.SIG_IGN:
                    continue
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.signal is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal = signal.Signals(signum).name
        if signum == signal.SIGINT:
            log.warning("Ctrl-C: stopping after this step (checkpoint first); again to abort")

    def __exit__(self, *exc) -> None:
        for s, previous in self._previous.items():
            signal.signal(s, previous)


# RNG state as plain types -------------------------------------------------------------------


def _rng_state() -> dict:
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": [int(x) for x in np_state["state"]["key"]],
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "python": random.getstate(),
    }


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    s = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": s["bit_generator"],
            "state": {"key": np.asarray(s["key"], dtype=np.uint32), "pos": s["pos"]},
            "has_gauss": s["has_gauss"],
            "gauss": s["gauss"],
        }
    )
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


# checkpoints --------------------------------------------------------------------------------


def list_checkpoints(out_dir: str | Path) -> list[Path]:
    """Complete checkpoint directories under ``out_dir/checkpoints``, oldest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and _STEP_DIR.match(p.name)]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def save_checkpoint(
    out_dir: str | Path, step: int, model: torch.nn.Module, state: dict, keep_last: int
) -> Path:
    """Write ``checkpoints/step-NNNNNNNN`` atomically, then prune to the newest ``keep_last``."""
    final = Path(out_dir) / "checkpoints" / f"step-{step:08d}"
    with atomic_dir(final) as tmp:
        save_model(model, str(tmp / "model.safetensors"))
        fault_point("ckpt-write", step, out_dir)
        torch.save(state, tmp / "state.pt")
        files = {name: sha256_file(tmp / name) for name in ("model.safetensors", "state.pt")}
        write_json_atomic(
            tmp / "checkpoint.json", {"format": CHECKPOINT_FORMAT, "step": step, "sha256": files}
        )
    for old in list_checkpoints(out_dir)[:-keep_last]:
        shutil.rmtree(old)
    return final


def load_checkpoint(path: str | Path, model: torch.nn.Module) -> dict:
    """Verify a checkpoint, load its weights into ``model`` and return its state dict.

    Raises ``IntegrityError`` naming the file when anything is missing, truncated or altered.
    """
    path = Path(path)
    meta_path = path / "checkpoint.json"
    if not meta_path.is_file():
        raise IntegrityError(f"{meta_path}: missing; the checkpoint is incomplete")
    try:
        meta = json.loads(meta_path.read_text())
        expected = meta["sha256"]
    except (ValueError, KeyError) as err:
        raise IntegrityError(f"{meta_path}: unreadable checkpoint manifest ({err})") from None
    if meta.get("format") != CHECKPOINT_FORMAT:
        raise IntegrityError(f"{meta_path}: checkpoint format {meta.get('format')} unsupported")
    for name, digest in expected.items():
        f = path / name
        if not f.is_file():
            raise IntegrityError(f"{f}: missing from checkpoint")
        if sha256_file(f) != digest:
            raise IntegrityError(f"{f}: sha256 mismatch (truncated or altered)")
    try:
        load_model(model, str(path / "model.safetensors"), strict=True)
        state = torch.load(path / "state.pt", map_location="cpu", weights_only=True)
    except Exception as err:  # a verified file that still fails to load is corrupt too
        raise IntegrityError(f"{path}: cannot load checkpoint ({err})") from err
    return state


# the run ------------------------------------------------------------------------------------


def _micro_step_inputs(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _forward_loss(model, batch: dict, device: torch.device) -> torch.Tensor:
    """Mean cross-entropy over the batch's target tokens (bf16 autocast on CUDA)."""
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else contextlib.nullcontext()
    )
    with autocast:
        _, loss = model(
            batch["input_ids"],
            batch["position_ids"],
            batch["block_position_ids"],
            batch["sep"],
            batch["lengths"],
            targets=batch["targets"],
            logits="loss",
        )
    return loss


def _train_step(
    model, optimizer, micro_batches: list[dict], lr: float, grad_clip: float, ctx: Dist, device
) -> tuple[float, float, int]:
    """One optimizer step over this rank's micro-batches. Returns (loss, grad norm, inputs).

    The loss is the mean over every target token of the global step (all micro-batches, all
    ranks), so the gradient matches one process running the combined batch.
    """
    # count tokens: target tokens of the global step, to normalise the summed loss
    counts = [int((b["targets"] != -100).sum()) for b in micro_batches]
    totals = torch.tensor([sum(counts), sum(int(b["lengths"].sum()) for b in micro_batches)])
    global_targets, global_inputs = (int(x) for x in _all_reduce(totals, ctx))
    if global_targets == 0:
        raise InputError("a training batch has no target tokens: the samples are empty")

    # forward/backward: DDP averages gradients over ranks, hence the world_size factor
    loss_sum = torch.zeros((), device=device)
    for i, (batch, n) in enumerate(zip(micro_batches, counts, strict=True)):
        last = i == len(micro_batches) - 1
        sync = contextlib.nullcontext() if last or ctx.world_size == 1 else model.no_sync()
        with sync:
            loss = _forward_loss(model, _micro_step_inputs(batch, device), device)
            weighted = loss * (n * ctx.world_size / global_targets)
            weighted.backward()
        loss_sum += loss.detach().float() * n
    loss_value = float(_all_reduce(loss_sum, ctx)) / global_targets

    # finite-loss check before the optimizer touches the weights
    if not math.isfinite(loss_value):
        optimizer.zero_grad(set_to_none=True)
        return loss_value, float("nan"), global_inputs

    # clip, step
    params = [p for g in optimizer.param_groups for p in g["params"]]
    norm = torch.nn.utils.clip_grad_norm_(params, grad_clip if grad_clip > 0 else float("inf"))
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_value, float(norm), global_inputs


def _load_tokenizer_and_shards(manifest_path, tokenizer_dir):
    from glm.shards import ShardReader
    from glm.tokenizer import Tokenizer

    tokenizer = Tokenizer.load(tokenizer_dir)
    reader = ShardReader(manifest_path)
    recorded = reader.manifest.get("tokenizer_sha256")
    if recorded != tokenizer.sha256:
        raise IntegrityError(
            f"{manifest_path}: shards were tokenized with sha256 {recorded}, "
            f"but {tokenizer_dir} has {tokenizer.sha256}"
        )
    reader.verify_or_raise()
    return tokenizer, reader


def window_len(preset: Preset) -> int:
    """Source tokens per window so that a sample usually fits ``seq_len`` uncropped.

    A sample is the window plus 2 tokens per span. [gMASK] has one span; [MASK] at 15%
    coverage with mean span 3 has about 0.05 spans per token, i.e. +10%, so windows for a mix
    that includes token or sentence spans are 10% shorter. The builder crops what still does
    not fit.
    """
    seq_len, obj = preset.train.seq_len, preset.objective
    if obj.p_mask == 0 and obj.p_smask == 0:
        return seq_len - 2
    return max(1, int((seq_len - 2) / (1 + 2 * obj.mask_ratio / obj.poisson_lambda)))


def build_stream(reader, tokenizer, preset: Preset, ctx: Dist, split: str = "train"):
    """The seeded sample stream of ``split`` for this rank."""
    from glm.objectives import SampleBuilder, SpecialIds, collate

    cfg = preset.train
    builder = SampleBuilder(preset.objective, SpecialIds.from_tokenizer(tokenizer), cfg.seq_len)
    return SampleStream(
        reader.tables(split),
        builder,
        collate,
        batch_size=cfg.batch_size,
        seq_len=cfg.seq_len,
        window_len=window_len(preset),
        pad_id=tokenizer.pad_id,
        seed=cfg.seed,
        rank=ctx.rank,
        world_size=ctx.world_size,
    )


def _wrap(model: torch.nn.Module, compile: bool, ctx: Dist, device) -> torch.nn.Module:
    """The module the loop calls: optionally compiled, DDP-wrapped under torchrun."""
    if compile:
        model = torch.compile(model)
    if ctx.world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)
    return model


def _measure_step_seconds(model, preset: Preset, stream, device, ctx: Dist) -> float:
    """Seconds per optimizer step, timed on a throwaway copy so the real run is untouched.

    The copy is not compiled (compiling would dominate three steps), so with ``compile``
    the budget errs on the short side.
    """
    cfg = preset.train
    probe_raw = copy.deepcopy(model)
    probe = _wrap(probe_raw, False, ctx, device)
    opt = torch.optim.AdamW(param_groups(probe_raw, cfg.weight_decay), lr=cfg.lr)
    saved_cursor, saved_rng = stream.consumed, torch.get_rng_state()
    times = []
    for _ in range(3):  # the first step warms up allocators and kernels; not counted
        micro = [stream.next_batch() for _ in range(cfg.grad_accum)]
        t0 = time.perf_counter()
        _train_step(probe, opt, micro, cfg.lr, cfg.grad_clip, ctx, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    stream.consumed = saved_cursor
    torch.set_rng_state(saved_rng)
    seconds = torch.tensor([sum(times[1:]) / len(times[1:])])
    # every rank must agree on the step count: take the slowest
    return float(_all_reduce(seconds, ctx, dist.ReduceOp.MAX))


# Settings that change when things happen, not what is computed: free to differ on resume.
_BOOKKEEPING = {"name", "train.log_every", "train.ckpt_every", "train.keep_last", "train.compile"}


def _result_changing_fields(saved: dict, current: dict) -> list[str]:
    """Dotted names of preset fields that differ and would change the trained weights."""

    def flat(d: dict) -> dict:
        out = {}
        for k, v in d.items():
            if isinstance(v, dict):
                out.update({f"{k}.{kk}": vv for kk, vv in v.items()})
            else:
                out[k] = v
        return out

    a, b = flat(saved), flat(current)
    return sorted(k for k in a.keys() | b.keys() if k not in _BOOKKEEPING and a.get(k) != b.get(k))


def _resolve_preset(preset: Preset | str) -> Preset:
    return get_preset(preset) if isinstance(preset, str) else preset


def train(
    manifest_path: str | Path,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    preset: Preset | str,
    device: str = "auto",
    threads: int | None = None,
    resume: str = "auto",
    *,
    time_budget_s: float | None = None,
    on_checkpoint: Callable[[int, torch.nn.Module], None] | None = None,
) -> dict:
    """Train a GLM on the train shards; returns the summary also written to ``train.json``.

    ``preset`` is a ``Preset`` or its name; ``device`` is ``auto``, ``cpu`` or ``cuda``;
    ``threads`` sets torch's intra-op threads; ``resume`` is ``auto``, ``must`` or ``never``
    (module docstring). ``time_budget_s`` replaces ``preset.train.max_steps`` by the number
    of steps that fit, measured before training. ``on_checkpoint(step, model)`` is called on
    rank 0 after every checkpoint (the quality benchmark evaluates there).
    """
    from glm.model import GLM, flops_per_token
    from glm.package import save_package

    if resume not in ("auto", "must", "never"):
        raise InputError(f"resume must be auto, must or never, not {resume!r}")
    preset = _resolve_preset(preset)
    out_dir = Path(out_dir)
    dev = resolve_device(device)
    if threads:
        torch.set_num_threads(threads)
    ctx = _init_distributed(dev)
    if dev.type == "cuda":
        # under torchrun each rank takes its local GPU; alone, the one asked for (default 0)
        dev = torch.device("cuda", ctx.local_rank if ctx.world_size > 1 else dev.index or 0)
        torch.cuda.set_device(dev)
    t_start = time.perf_counter()

    tokenizer, reader = _load_tokenizer_and_shards(manifest_path, tokenizer_dir)
    cfg = preset.train
    mcfg: ModelConfig = dataclasses.replace(preset.model, vocab_size=tokenizer.vocab_size)
    if cfg.seq_len > mcfg.max_seq_len:
        raise InputError(f"seq_len {cfg.seq_len} exceeds the model's max_seq_len")
    preset = dataclasses.replace(preset, model=mcfg)

    # model, optimizer, data: everything seeded before anything draws a random number
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    raw_model = GLM(mcfg).to(dev)
    optimizer = torch.optim.AdamW(
        param_groups(raw_model, cfg.weight_decay),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
    )
    stream = build_stream(reader, tokenizer, preset, ctx)

    # resume, or start fresh
    checkpoints = list_checkpoints(out_dir)
    if resume == "must" and not checkpoints:
        raise IntegrityError(f"{out_dir / 'checkpoints'}: resume='must' but no checkpoint found")
    if resume == "never" and checkpoints and ctx.is_main:
        shutil.rmtree(out_dir / "checkpoints")
    _barrier(ctx)
    if ctx.is_main:  # leftovers of a checkpoint write that was killed halfway
        for tmp in (out_dir / "checkpoints").glob(".step-*.tmp"):
            shutil.rmtree(tmp, ignore_errors=True)
    step, tokens_seen, history = 0, 0, []
    resumed_from = None
    max_steps = cfg.max_steps
    if resume != "never" and checkpoints:
        state = load_checkpoint(checkpoints[-1], raw_model)
        changed = _result_changing_fields(state["config"]["preset"], preset.to_dict())
        if changed:
            raise InputError(
                f"{checkpoints[-1]}: written with different settings ({', '.join(changed)}); "
                "use another out_dir or resume='never'"
            )
        optimizer.load_state_dict(state["optimizer"])
        stream.load_state_dict(state["data"])
        _set_rng_state(state["rng"])
        step, tokens_seen = state["step"], state["tokens"]
        max_steps = state["schedule"]["max_steps"]
        history = list(state["metrics"])
        resumed_from = str(checkpoints[-1])
        log.info("resumed from %s (step %d of %d)", checkpoints[-1], step, max_steps)

    if time_budget_s is not None and resumed_from is None:
        per_step = _measure_step_seconds(raw_model, preset, stream, dev, ctx)
        max_steps = max(1, int(time_budget_s / per_step))
        log.info(
            "time budget %.0f s at %.3f s/step -> %d steps", time_budget_s, per_step, max_steps
        )

    model = _wrap(raw_model, cfg.compile, ctx, dev)
    n_params = sum(p.numel() for p in raw_model.parameters())
    flops = flops_per_token(mcfg, cfg.seq_len)
    peak_flops = _peak_flops(dev)
    log.info(
        "training %s: %s params, %d steps of %d x %d x %d ranks, %d windows, device %s",
        preset.name,
        f"{n_params:,}",
        max_steps,
        cfg.batch_size * cfg.grad_accum,
        cfg.seq_len,
        ctx.world_size,
        stream.n_windows,
        dev,
    )

    def checkpoint_state() -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "step": step,
            "tokens": tokens_seen,
            "optimizer": optimizer.state_dict(),
            "schedule": {
                "step": step,
                "max_steps": max_steps,
                "warmup_steps": int(cfg.warmup_frac * max_steps),
            },
            "rng": _rng_state(),
            "data": stream.state_dict(),
            "config": {"preset": preset.to_dict(), "time_budget_s": time_budget_s},
            "metrics": history,
        }

    def write_checkpoint() -> None:
        if ctx.is_main:
            path = save_checkpoint(out_dir, step, raw_model, checkpoint_state(), cfg.keep_last)
            _write_metrics(out_dir, history)
            log.info("checkpoint %s", path)
            if on_checkpoint is not None:
                on_checkpoint(step, raw_model)
        _barrier(ctx)

    model.train()
    bar = tqdm(total=max_steps, initial=step, disable=None if ctx.is_main else True, unit="step")
    t_window, tokens_window = time.perf_counter(), 0
    with _StopFlag() as asked_to_stop, bar:
        while step < max_steps:
            # gather this step's micro-batches
            micro = [stream.next_batch() for _ in range(cfg.grad_accum)]
            lr = lr_at(step, cfg.lr, max_steps, cfg.warmup_frac, cfg.min_lr_ratio)

            # forward/backward, finite check, clip, optimizer step
            loss, grad_norm, n_inputs = _train_step(
                model, optimizer, micro, lr, cfg.grad_clip, ctx, dev
            )
            if not math.isfinite(loss):
                raise NonFiniteLossError(
                    f"loss is {loss} at step {step + 1}; the optimizer step was skipped and "
                    f"the last good checkpoint is in {out_dir / 'checkpoints'}"
                )
            step += 1
            tokens_seen += n_inputs
            tokens_window += n_inputs
            bar.update(1)
            fault_point("step", step, out_dir)

            # log one line per interval
            if step % cfg.log_every == 0 or step == max_steps:
                if dev.type == "cuda":
                    torch.cuda.synchronize()
                elapsed = time.perf_counter() - t_window
                tok_s = tokens_window / elapsed
                row = {
                    "step": step,
                    "loss": round(loss, 5),
                    "lr": lr,
                    "grad_norm": round(grad_norm, 4),
                    "tokens_per_s": round(tok_s, 1),
                    "mfu": round(flops * tok_s / peak_flops, 4),
                    "tokens": tokens_seen,
                }
                history.append(row)
                if ctx.is_main:
                    log.info(
                        "step %d/%d | loss %.4f | lr %.2e | grad %.2f | %s tok/s | mfu %.1f%%",
                        step,
                        max_steps,
                        loss,
                        lr,
                        grad_norm,
                        f"{tok_s:,.0f}",
                        100 * row["mfu"],
                    )
                t_window, tokens_window = time.perf_counter(), 0

            # checkpoint on schedule, on a stop signal (agreed by every rank) and at the end
            stopping = asked_to_stop.signal is not None
            stop = _all_reduce(torch.tensor([int(stopping)]), ctx).item() > 0
            if step % cfg.ckpt_every == 0 or step == max_steps or stop:
                write_checkpoint()
            if stop:
                raise TrainingInterrupted(
                    f"{asked_to_stop.signal or 'a stop signal on another rank'} at step {step}; "
                    f"checkpoint written to {out_dir / 'checkpoints'}"
                )

    # final package, metrics, summary last
    summary = {
        "preset": preset.name,
        "steps": step,
        "max_steps": max_steps,
        "time_budget_s": time_budget_s,
        "tokens": tokens_seen,
        "final_loss": history[-1]["loss"] if history else None,
        "params": n_params,
        "world_size": ctx.world_size,
        "device": dev.type,
        "threads": torch.get_num_threads(),
        "seed": cfg.seed,
        "resumed_from": resumed_from,
        "wall_s": round(time.perf_counter() - t_start, 2),
        "data": stream.state_dict(),
    }
    if ctx.is_main:
        save_package(
            raw_model,
            tokenizer_dir,
            out_dir / "final",
            extra={"preset": preset.to_dict(), "train": summary},
        )
        _write_metrics(out_dir, history)
        write_json_atomic(out_dir / "train.json", summary)
        log.info(
            "trained %d steps, %s tokens, final loss %s in %.1f s",
            step,
            f"{tokens_seen:,}",
            summary["final_loss"],
            summary["wall_s"],
        )
    _barrier(ctx)
    return summary


def _write_metrics(out_dir: Path, history: list[dict]) -> None:
    lines = "".join(json.dumps(row, sort_keys=True) + "\n" for row in history)
    write_bytes_atomic(out_dir / "metrics.jsonl", lines.encode())


def _peak_flops(device: torch.device) -> float:
    """Measured dense matmul throughput (FLOP/s): the MFU denominator on this machine.

    The best of several ~0.1 s trials: a single short timing on a busy machine undercounts
    the ceiling and reports an MFU above 100%.
    """
    n = 4096 if device.type == "cuda" else 1024
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    # ones, not randn: the global RNG must not move, or a resumed run would drift
    a = torch.ones(n, n, device=device, dtype=dtype)
    b = torch.ones(n, n, device=device, dtype=dtype)
    a @ b  # warm-up
    best = 0.0
    for _ in range(5):
        reps, t0 = 0, time.perf_counter()
        while True:
            a @ b
            reps += 1
            if device.type == "cuda":
                torch.cuda.synchronize()
            elapsed = time.perf_counter() - t0
            if elapsed > 0.1:
                break
        best = max(best, 2 * n**3 * reps / elapsed)
    return best


def main(argv: list[str] | None = None) -> None:
    """Command line for one training run, the entry point under ``torchrun``::

        torchrun --standalone --nproc-per-node 8 -m glm.train \\
            --manifest WS/stages/shard/KEY/manifest.json --tokenizer WS/stages/tokenizer/KEY \\
            --out runs/base --preset base --device cuda

    ``--preset`` is a preset name or a JSON file holding ``Preset.to_dict()`` output.
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python -m glm.train", description=main.__doc__)
    parser.add_argument("--manifest", required=True, help="shard manifest.json")
    parser.add_argument("--tokenizer", required=True, help="tokenizer stage directory")
    parser.add_argument("--out", required=True, help="run directory (checkpoints, final/)")
    parser.add_argument("--preset", default="small", help="preset name or JSON file")
    parser.add_argument("--max-steps", type=int, default=None, help="override the step budget")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="CPU threads per process")
    parser.add_argument("--resume", default="auto", choices=["auto", "must", "never"])
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    if args.preset.endswith(".json"):
        preset = Preset.from_dict(json.loads(Path(args.preset).read_text()))
    else:
        preset = get_preset(args.preset)
    if args.max_steps is not None:
        preset = dataclasses.replace(
            preset, train=dataclasses.replace(preset.train, max_steps=args.max_steps)
        )
    train(args.manifest, args.tokenizer, args.out, preset, args.device, args.threads, args.resume)


if __name__ == "__main__":
    main()
