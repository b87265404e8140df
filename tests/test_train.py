"""The trainer and its data stream: learning, exact resume, checkpoints, faults, DDP."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from glm.config import get_preset
from glm.data import SampleStream, split_windows
from glm.errors import IntegrityError
from glm.model import GLM
from glm.train import (
    Dist,
    InjectedFault,
    NonFiniteLossError,
    TrainingInterrupted,
    _train_step,
    build_stream,
    list_checkpoints,
    param_groups,
    train,
)

ROOT = Path(__file__).resolve().parents[1]
TINY = get_preset("tiny")  # 40 steps, checkpoints at 20 and 40, keep_last 2

# A training in a fresh interpreter through the module's command line (``python -m glm.train``,
# the torchrun entry point): the way a killed or distributed run really starts.


def run_subprocess(data_stages, out: Path, preset=TINY, env=None, torchrun: int = 0):
    out.parent.mkdir(parents=True, exist_ok=True)
    preset_file = out.parent / f"{out.name}-preset.json"
    preset_file.write_text(json.dumps(preset.to_dict()))
    launcher = [sys.executable]
    if torchrun:
        launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={torchrun}"]
    cmd = [*launcher, "-m", "glm.train", "--manifest", str(data_stages.manifest)]
    cmd += ["--tokenizer", str(data_stages.tokenizer), "--out", str(out)]
    cmd += ["--preset", str(preset_file), "--device", "cpu", "--threads", "1"]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, env=full_env, capture_output=True, text=True, timeout=900, cwd=ROOT)


def weights(out: Path) -> bytes:
    return (out / "final" / "model.safetensors").read_bytes()


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Every run compared bit for bit uses one thread; it is also fastest on 2 shared cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def reference(data_stages, tmp_path_factory) -> Path:
    """An uninterrupted tiny run (in this process, one thread, like every run compared to it)."""
    out = tmp_path_factory.mktemp("reference")
    train(data_stages.manifest, data_stages.tokenizer, out, TINY, device="cpu", threads=1)
    return out


# the data stream ----------------------------------------------------------------------------


def test_split_windows_cover_every_token_once_at_sentence_starts():
    starts = np.array([0, 5, 9, 30, 33])
    windows = split_windows(40, starts, 10)
    covered = [t for s, e in windows for t in range(s, e)]
    assert covered == list(range(40))
    assert all(e - s <= 10 for s, e in windows)
    # 0..9 holds two whole sentences; 9..30 is one long sentence, cut hard; its tail (29..30)
    # shares a window with the next sentence; 33..40 would not fit there
    assert windows == [(0, 9), (9, 19), (19, 29), (29, 33), (33, 40)]


def test_stream_resumes_exactly_from_its_cursor(data_stages):
    from glm.shards import ShardReader
    from glm.tokenizer import Tokenizer

    reader, tok = ShardReader(data_stages.manifest), Tokenizer.load(data_stages.tokenizer)
    a = build_stream(reader, tok, TINY, Dist())
    batches = [a.next_batch() for _ in range(3)]
    b = build_stream(reader, tok, TINY, Dist())
    b.next_batch()
    cursor = json.loads(json.dumps(b.state_dict()))  # plain JSON types survive a round trip
    c = build_stream(reader, tok, TINY, Dist())
    c.load_state_dict(cursor)
    for expected in batches[1:]:
        got = c.next_batch()
        assert all(torch.equal(got[k], expected[k]) for k in expected)
    with pytest.raises(IntegrityError, match="seed"):
        build_stream(reader, tok, TINY, Dist()).load_state_dict({**cursor, "seed": 1})


def test_ranks_take_disjoint_slices_whose_union_is_the_single_process_batch(data_stages):
    from glm.shards import ShardReader
    from glm.tokenizer import Tokenizer

    reader, tok = ShardReader(data_stages.manifest), Tokenizer.load(data_stages.tokenizer)
    half = dataclasses.replace(TINY, train=dataclasses.replace(TINY.train, batch_size=4))
    single = build_stream(reader, tok, TINY, Dist()).next_batch()["input_ids"]
    ranks = [build_stream(reader, tok, half, Dist(r, 2)).next_batch()["input_ids"] for r in (0, 1)]
    rows = {tuple(r.tolist()) for r in torch.cat(ranks)}
    assert rows == {tuple(r.tolist()) for r in single}
    assert SampleStream.__doc__  # the slicing rule is documented where it is implemented


# learning -----------------------------------------------------------------------------------


def test_tiny_model_overfits_one_batch(data_stages):
    from glm.shards import ShardReader
    from glm.tokenizer import Tokenizer

    tok = Tokenizer.load(data_stages.tokenizer)
    stream = build_stream(ShardReader(data_stages.manifest), tok, TINY, Dist())
    batch = stream.next_batch()
    torch.manual_seed(0)
    model = GLM(dataclasses.replace(TINY.model, vocab_size=tok.vocab_size))
    opt = torch.optim.AdamW(param_groups(model, 0.0), lr=3e-3)
    losses = [
        _train_step(model, opt, [batch], 3e-3, 1.0, Dist(), torch.device("cpu"))[0]
        for _ in range(40)
    ]
    assert losses[-1] < 0.25 * losses[0], losses[::10]


def test_training_run_learns_and_writes_its_outputs(reference):
    rows = [json.loads(line) for line in (reference / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [10, 20, 30, 40]
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert all(np.isfinite(r["loss"]) and r["tokens_per_s"] > 0 for r in rows)
    summary = json.loads((reference / "train.json").read_text())
    assert summary["steps"] == summary["max_steps"] == 40
    assert (reference / "final" / "config.json").is_file()
    assert [p.name for p in list_checkpoints(reference)] == ["step-00000020", "step-00000040"]


def test_checkpoint_state_loads_with_weights_only(reference):
    ckpt = list_checkpoints(reference)[-1]
    state = torch.load(ckpt / "state.pt", weights_only=True)
    assert state["step"] == 40
    assert state["data"]["consumed"] == 40 * TINY.train.batch_size
    assert isinstance(state["rng"]["torch"], torch.Tensor)
    assert set(state["optimizer"]) == {"state", "param_groups"}
    tensors = load_file(ckpt / "model.safetensors")
    assert torch.equal(
        tensors["wte.weight"], load_file(reference / "final/model.safetensors")["wte.weight"]
    )


def test_non_finite_loss_stops_before_the_optimizer_step(data_stages, tmp_path, monkeypatch):
    import glm.train as train_module

    real = train_module._forward_loss
    monkeypatch.setattr(train_module, "_forward_loss", lambda *a: real(*a) * float("nan"))
    with pytest.raises(NonFiniteLossError, match="at step 1"):
        train(data_stages.manifest, data_stages.tokenizer, tmp_path, TINY, device="cpu", threads=1)


def test_time_budget_becomes_a_recorded_step_count(data_stages, tmp_path):
    summary = train(
        data_stages.manifest, data_stages.tokenizer, tmp_path, TINY, "cpu", 1, time_budget_s=0.5
    )
    assert summary["steps"] == summary["max_steps"] >= 1
    assert summary["time_budget_s"] == 0.5
    state = torch.load(list_checkpoints(tmp_path)[-1] / "state.pt", weights_only=True)
    assert state["schedule"]["max_steps"] == summary["max_steps"]


# exact resume and faults --------------------------------------------------------------------


@pytest.mark.parametrize(
    "fault",
    ["kill@step:7", "kill@step:27", "kill@ckpt-write:20"],
    ids=["before-1st", "between", "ckpt-write"],
)
def test_sigkill_then_resume_is_bit_identical(data_stages, reference, tmp_path, fault):
    out = tmp_path / "run"
    killed = run_subprocess(data_stages, out, env={"GLM_FAULT": fault})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert not (out / "final").exists()
    train(data_stages.manifest, data_stages.tokenizer, out, TINY, device="cpu", threads=1)
    assert weights(out) == weights(reference)
    assert not list((out / "checkpoints").glob(".*"))  # the half-written one was cleaned up


def test_fail_once_fails_the_first_attempt_only(data_stages, reference, tmp_path, monkeypatch):
    monkeypatch.setenv("GLM_FAULT", "fail-once@step:30")
    with pytest.raises(InjectedFault):
        train(data_stages.manifest, data_stages.tokenizer, tmp_path, TINY, device="cpu", threads=1)
    train(data_stages.manifest, data_stages.tokenizer, tmp_path, TINY, device="cpu", threads=1)
    assert weights(tmp_path) == weights(reference)


def test_sigterm_checkpoints_then_resume_matches_and_keep_last_prunes(
    data_stages, reference, tmp_path
):
    def terminate_at_20(step, model):
        if step == 20:
            os.kill(os.getpid(), signal.SIGTERM)  # handled after step 21 completes

    with pytest.raises(TrainingInterrupted, match="step 21"):
        train(
            data_stages.manifest,
            data_stages.tokenizer,
            tmp_path,
            TINY,
            "cpu",
            1,
            on_checkpoint=terminate_at_20,
        )
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000020", "step-00000021"]
    summary = train(
        data_stages.manifest, data_stages.tokenizer, tmp_path, TINY, device="cpu", threads=1
    )
    assert summary["resumed_from"].endswith("step-00000021")
    assert weights(tmp_path) == weights(reference)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-00000021", "step-00000040"]


def test_missing_or_corrupt_checkpoint_is_an_integrity_error(data_stages, reference, tmp_path):
    with pytest.raises(IntegrityError, match="no checkpoint"):
        train(
            data_stages.manifest, data_stages.tokenizer, tmp_path / "empty", TINY, "cpu", 1, "must"
        )

    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(reference, broken)
    latest = list_checkpoints(broken)[-1] / "model.safetensors"
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated
    with pytest.raises(IntegrityError, match="model.safetensors"):
        train(data_stages.manifest, data_stages.tokenizer, broken, TINY, device="cpu", threads=1)
    (latest.parent / "checkpoint.json").unlink()
    with pytest.raises(IntegrityError, match="checkpoint.json"):
        train(data_stages.manifest, data_stages.tokenizer, broken, TINY, device="cpu", threads=1)


# distributed --------------------------------------------------------------------------------


def test_two_process_ddp_step_matches_one_process_on_the_combined_batch(data_stages, tmp_path):
    two_steps = dataclasses.replace(TINY.train, max_steps=2, batch_size=8)
    single = dataclasses.replace(TINY, train=two_steps)
    per_rank = dataclasses.replace(TINY, train=dataclasses.replace(two_steps, batch_size=4))
    train(data_stages.manifest, data_stages.tokenizer, tmp_path / "single", single, "cpu", 1)
    ddp = run_subprocess(data_stages, tmp_path / "ddp", per_rank, torchrun=2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    a = load_file(tmp_path / "single" / "final" / "model.safetensors")
    b = load_file(tmp_path / "ddp" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)
    summary = json.loads((tmp_path / "ddp" / "train.json").read_text())
    assert summary["world_size"] == 2
    # and the step moved the weights, so the comparison is not vacuous
    fresh = load_file(list_checkpoints(tmp_path / "single")[-1] / "model.safetensors")
    assert torch.equal(fresh["wte.weight"], a["wte.weight"])
    torch.manual_seed(TINY.train.seed)
    init = GLM(dataclasses.replace(TINY.model, vocab_size=a["wte.weight"].shape[0]))
    assert not torch.equal(init.wte.weight, a["wte.weight"])


def test_stop_flag_takes_sigterm_and_ctrl_c_but_leaves_an_ignored_sigint_ignored():
    from glm.train import _StopFlag

    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)  # a shell's background job
    try:
        with _StopFlag():
            assert signal.getsignal(signal.SIGINT) == signal.SIG_IGN
            assert signal.getsignal(signal.SIGTERM) != signal.SIG_DFL
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with _StopFlag() as flag:
            os.kill(os.getpid(), signal.SIGINT)  # the first Ctrl-C only asks to stop
            time.sleep(0.01)
            assert flag.signal == "SIGINT"
            with pytest.raises(KeyboardInterrupt):  # the second aborts
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.01)
        assert signal.getsignal(signal.SIGINT) == signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
