"""Faults: SIGKILL at every stage, corrupt shards, lost state. The pipeline must recover.

Kills are injected with ``GLM_FAULT=killpg@POINT:N`` (glm/faults.py), never by timing: the
whole process group of a real ``glm run`` dies at a named point (before the first
checkpoint, between checkpoints, mid-checkpoint, mid-evaluation, mid-registration, while
splitting, while sharding). Then the same command runs again and must finish, with nothing
half-written taken as complete and, after a training kill, final weights bit-identical to
an uninterrupted run's. The CLI runs use the session's Prefect server except where the
point is Prefect's own server (it must die with the group) or its lost home.

Two runs at once on one workspace are tested in tests/test_flow.py
(``test_concurrent_cli_runs_share_one_workspace``).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from glm.digest import sha256_file

ROOT = Path(__file__).resolve().parents[1]
GLM = str(Path(sys.executable).with_name("glm"))
CORPUS = str(ROOT / "data" / "*.jsonl")
STEPS = 12  # checkpoints every 5 steps (see CONFIG): at 5, 10 and the end
CONFIG = (
    "tokenizer: {vocab_size: 3000}\n"
    "train: {ckpt_every: 5}\n"
    "eval: {cloze_items: 20, span_windows: 4, greedy_spans: 2}\n"
)
DATA_STAGES = ("split", "tokenizer", "shard")
FOREGROUND = (
    "import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
    "os.execv(sys.argv[1], sys.argv[1:])"
)
MARKERS = {
    "split": "stats.json",
    "tokenizer": "tokenizer.json",
    "shard": "manifest.json",
    "train": "train.json",
    "evaluate": "eval.json",
}


def glm_run(
    ws: Path,
    *args: str,
    api: str | None,
    fault: str | None = None,
    until: str = "register",
) -> subprocess.CompletedProcess:
    """``glm run`` on the bundled corpus as its own process group (as a shell would start it).

    ``api``: the session's Prefect server, or None for an ephemeral server of its own with
    its home in WORKSPACE/prefect.
    """
    config = ws.parent / f"{ws.name}.yaml"
    config.write_text(CONFIG)
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "GLM_FAULT")}
    env["PREFECT_HOME"] = str(ws / "prefect")
    env.pop("PREFECT_API_URL", None)
    if api:
        env["PREFECT_API_URL"] = api
    if fault:
        env["GLM_FAULT"] = fault
    # As a terminal starts it: SIGINT at its default even when this test runs as a shell's
    # background job (which starts with SIGINT ignored, and Python keeps it ignored).
    cmd = [sys.executable, "-c", FOREGROUND, GLM]
    cmd += ["run", "--corpus", CORPUS, "-w", str(ws), "--preset", "tiny"]
    cmd += ["--max-steps", str(STEPS), "--config", str(config), "--until", until, *args]
    proc = subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    return subprocess.CompletedProcess(cmd, proc.returncode, out.decode(), "")


def assert_ok(done: subprocess.CompletedProcess) -> dict:
    assert done.returncode == 0, done.stdout[-4000:]
    ws = Path(done.args[done.args.index("-w") + 1])
    summary = json.loads((ws / "last_run.json").read_text())
    assert summary["status"] == "completed"
    return summary


def assert_killed(done: subprocess.CompletedProcess) -> None:
    assert done.returncode == -signal.SIGKILL, done.stdout[-4000:]


def stage_dir(ws: Path, stage: str) -> Path | None:
    """The one output directory of ``stage`` (hidden temp directories are not outputs)."""
    found = [p for p in (ws / "stages" / stage).glob("[!.]*")]
    assert len(found) <= 1, found
    return found[0] if found else None


def assert_nothing_half_written(ws: Path) -> None:
    """Stage outputs built under a temp name are complete when present; every checkpoint
    directory verifies; every finished shard set verifies."""
    from glm.shards import ShardReader

    for stage in DATA_STAGES:
        out = stage_dir(ws, stage)
        assert out is None or (out / MARKERS[stage]).is_file(), f"{out} is incomplete"
    shard = stage_dir(ws, "shard")
    if shard is not None:
        assert ShardReader(shard / "manifest.json").verify() == []
    done = subprocess.run([GLM, "verify", str(ws)], capture_output=True, text=True, check=False)
    if (ws / "stages").is_dir():
        assert done.returncode == 0, done.stdout + done.stderr
    train = stage_dir(ws, "train")
    if train is not None:
        for ckpt in (train / "checkpoints").glob("step-*"):
            assert (ckpt / "checkpoint.json").is_file(), f"{ckpt} is half-written"


def final_weights(ws: Path) -> str:
    return sha256_file(stage_dir(ws, "train") / "final" / "model.safetensors")


def seed_data_stages(src: Path, dst: Path, stages=DATA_STAGES) -> None:
    """Copy finished data stages: a new workspace reuses them by digest, as a rerun would."""
    for stage in stages:
        out = stage_dir(src, stage)
        shutil.copytree(out, dst / "stages" / stage / out.name)


def processes_with_home(home: Path) -> list[int]:
    """Live processes whose environment has PREFECT_HOME=``home`` (e.g. a Prefect server)."""
    needle = f"PREFECT_HOME={home}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            env = (proc / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if needle in env:
            found.append(int(proc.name))
    return found


@dataclass(frozen=True)
class Reference:
    ws: Path
    summary: dict
    weights: str


@pytest.fixture(scope="module")
def reference(prefect_api, tmp_path_factory) -> Reference:
    """An uninterrupted run: the weights every killed-and-rerun training must reproduce."""
    ws = tmp_path_factory.mktemp("reference") / "ws"
    summary = assert_ok(glm_run(ws, api=prefect_api))
    assert summary["stages"] == dict.fromkeys([*MARKERS, "register"], "ran")
    return Reference(ws, summary, final_weights(ws))


# corrupt shards (fast) -------------------------------------------------------------------


def test_corrupt_shards_stop_training_and_verify_names_each_file(data_stages, tmp_path):
    from glm.errors import IntegrityError
    from glm.train import train

    ws = tmp_path / "ws"
    for stage, src in (
        ("split", data_stages.sentences),
        ("tokenizer", data_stages.tokenizer),
        ("shard", data_stages.shards),
    ):
        shutil.copytree(src, ws / "stages" / stage / "k")
    shards = ws / "stages" / "shard" / "k"
    manifest = json.loads((shards / "manifest.json").read_text())
    flipped, truncated = (shards / e["path"] for e in manifest["shards"][:2])
    data = bytearray(flipped.read_bytes())
    data[len(data) // 3] ^= 0x01
    flipped.write_bytes(bytes(data))
    with open(truncated, "r+b") as f:
        f.truncate(truncated.stat().st_size - 100)

    out = ws / "stages" / "train" / "k"
    with pytest.raises(IntegrityError) as info:
        train(shards / "manifest.json", ws / "stages" / "tokenizer" / "k", out, "tiny")
    assert str(flipped) in str(info.value) and str(truncated) in str(info.value)
    assert not list(out.glob("checkpoints/step-*"))

    done = subprocess.run([GLM, "verify", str(ws)], capture_output=True, text=True, check=False)
    assert done.returncode == 3
    bad = [line for line in done.stdout.splitlines() if line.startswith("bad:")]
    assert len(bad) == 2, done.stdout
    assert any(str(flipped) in line and "checksum mismatch" in line for line in bad)
    assert any(str(truncated) in line and "truncated" in line for line in bad)


# SIGKILL during the data stages ------------------------------------------------------------


@pytest.mark.slow
def test_sigkill_while_splitting(reference, prefect_api, tmp_path):
    ws = tmp_path / "ws"
    assert_killed(glm_run(ws, api=prefect_api, fault="killpg@split:1", until="shard"))
    assert stage_dir(ws, "split") is None
    assert_nothing_half_written(ws)

    summary = assert_ok(glm_run(ws, api=prefect_api, until="shard"))
    assert summary["stages"] == dict.fromkeys(DATA_STAGES, "ran")
    assert_nothing_half_written(ws)
    # the rerun's output is the uninterrupted run's, file for file
    for stage in DATA_STAGES:
        mine, ref = stage_dir(ws, stage), stage_dir(reference.ws, stage)
        assert mine.name == ref.name
        for f in ref.rglob("*.arrow"):
            assert sha256_file(mine / f.relative_to(ref)) == sha256_file(f), f.name


@pytest.mark.slow
def test_sigkill_while_sharding(reference, prefect_api, tmp_path):
    ws = tmp_path / "ws"
    seed_data_stages(reference.ws, ws, ("split", "tokenizer"))
    assert_killed(glm_run(ws, api=prefect_api, fault="killpg@shard:1", until="shard"))
    assert stage_dir(ws, "shard") is None
    # killed after a shard file was written: only the stage's temp directory holds it
    assert list((ws / "stages" / "shard").glob(".*/train/shard-00000.arrow"))
    assert_nothing_half_written(ws)

    summary = assert_ok(glm_run(ws, api=prefect_api, until="shard"))
    assert summary["stages"] == {"split": "cached", "tokenizer": "cached", "shard": "ran"}
    assert_nothing_half_written(ws)
    manifest = json.loads((stage_dir(ws, "shard") / "manifest.json").read_text())
    ref = json.loads((stage_dir(reference.ws, "shard") / "manifest.json").read_text())
    assert [e["sha256"] for e in manifest["shards"]] == [e["sha256"] for e in ref["shards"]]


# SIGKILL during training, evaluation and registration --------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "fault",
    [
        "killpg@step:3",  # before the first checkpoint
        "killpg@step:7",  # between the checkpoints of steps 5 and 10
        "killpg@ckpt-write:10",  # weights of step 10 on disk, its state not yet
        "killpg@eval:1",  # evaluation has scored one batch
    ],
)
def test_sigkill_then_rerun_matches_the_uninterrupted_run(fault, reference, prefect_api, tmp_path):
    ws = tmp_path / "ws"
    seed_data_stages(reference.ws, ws)
    assert_killed(glm_run(ws, api=prefect_api, fault=fault))
    assert_nothing_half_written(ws)
    train_dir = stage_dir(ws, "train")
    assert (train_dir is not None and (train_dir / "train.json").is_file()) == (
        fault == "killpg@eval:1"
    )
    evaluated = stage_dir(ws, "evaluate")
    assert evaluated is None or not (evaluated / "eval.json").exists()

    summary = assert_ok(glm_run(ws, api=prefect_api))
    assert_nothing_half_written(ws)
    assert final_weights(ws) == reference.weights
    train = json.loads((stage_dir(ws, "train") / "train.json").read_text())
    if fault in ("killpg@step:7", "killpg@ckpt-write:10"):
        assert train["resumed_from"].endswith("step-00000005")
    assert summary["metrics"]["val_bpb"] == reference.summary["metrics"]["val_bpb"]
    assert summary["model"]["version"] == 1 and summary["model"]["alias"] == "champion"


@pytest.mark.slow
def test_sigkill_during_registration_takes_prefects_server_down_too(reference, tmp_path):
    # An ephemeral Prefect server of its own: it is a child of the killed run and must not
    # outlive it. The version registered before the kill gets its gate on the rerun; it is
    # not registered twice.
    ws = tmp_path / "ws"
    seed_data_stages(reference.ws, ws, (*DATA_STAGES, "train", "evaluate"))
    killed = glm_run(ws, api=None, fault="killpg@register:1")
    assert_killed(killed)
    assert "Starting temporary server" in killed.stdout
    deadline = time.monotonic() + 30
    while processes_with_home(ws / "prefect") and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_with_home(ws / "prefect") == [], "Prefect's server outlived the run"

    from flows.registry import open_registry

    summary = assert_ok(glm_run(ws, api=None))
    assert summary["stages"]["register"] == "ran"
    client = open_registry(ws, f"sqlite:///{ws / 'mlflow.db'}")
    versions = client.search_model_versions("name = 'glm'")
    assert [int(v.version) for v in versions] == [1]
    assert summary["model"]["alias"] == "champion"
    assert "first version" in summary["model"]["gate_reason"]


def flow_run_states(prefect_home: Path) -> list[str]:
    """The state of every flow run in a Prefect home's database (read directly)."""
    import sqlite3

    with contextlib.closing(sqlite3.connect(prefect_home / "prefect.db")) as db:
        return [row[0] for row in db.execute("SELECT state_type FROM flow_run")]


@pytest.mark.slow
@pytest.mark.parametrize(
    ("fault", "said"),
    [
        ("ctrl-c@step:7", "interrupted: SIGINT at step 7; checkpoint written to "),
        ("ctrl-c@eval:1", "interrupted (Ctrl-C); "),
        ("termpg@step:7", "interrupted: SIGTERM at step 7; checkpoint written to "),
        ("termpg@eval:1", "interrupted (SIGTERM); "),
    ],
)
def test_ctrl_c_stops_the_run_and_the_same_command_resumes(fault, said, reference, tmp_path):
    # A terminal's Ctrl-C (and systemd's SIGTERM) reaches the whole process group, Prefect's
    # temporary server included. The run stops at once with exit 130 and one line, the
    # server lives long enough to record the run's end (no run is left "RUNNING"), nothing
    # outlives the run, and the same command then finishes with the uninterrupted run's
    # weights.
    ws = tmp_path / "ws"
    seed_data_stages(reference.ws, ws)
    stopped = glm_run(ws, api=None, fault=fault)
    assert stopped.returncode == 130, stopped.stdout[-4000:]
    errors = [line for line in stopped.stdout.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith(f"error: {said}"), stopped.stdout[-4000:]
    assert errors[0].endswith("run the same command again to resume")
    assert "Traceback" not in stopped.stdout and "ConnectError" not in stopped.stdout
    assert flow_run_states(ws / "prefect") in (["FAILED"], ["CRASHED"])
    assert processes_with_home(ws / "prefect") == [], "Prefect's server outlived the run"
    assert_nothing_half_written(ws)

    summary = assert_ok(glm_run(ws, api=None))
    assert final_weights(ws) == reference.weights
    train = json.loads((stage_dir(ws, "train") / "train.json").read_text())
    if "step" in fault:
        assert train["resumed_from"].endswith("step-00000007")
    assert summary["model"]["version"] == 1 and summary["model"]["alias"] == "champion"


# lost state between runs --------------------------------------------------------------------


@pytest.mark.slow
def test_deleted_mlflow_database_is_recreated_and_the_model_registered_again(
    reference, prefect_api, tmp_path
):
    ws = tmp_path / "ws"
    shutil.copytree(reference.ws, ws, ignore=shutil.ignore_patterns("mlflow.db", "mlartifacts"))
    summary = assert_ok(glm_run(ws, api=prefect_api))
    assert summary["stages"] == {**dict.fromkeys(MARKERS, "cached"), "register": "ran"}
    assert (ws / "mlflow.db").is_file()
    assert summary["model"]["version"] == 1 and summary["model"]["alias"] == "champion"
    assert summary["metrics"] == reference.summary["metrics"]


@pytest.mark.slow
def test_deleted_prefect_home_is_recreated_and_outputs_reused(reference, tmp_path):
    ws = tmp_path / "ws"
    shutil.copytree(reference.ws, ws, ignore=shutil.ignore_patterns("prefect"))
    # the copied registry points at the reference's artifacts; what matters is the lookup
    summary = assert_ok(glm_run(ws, api=None))
    assert summary["stages"] == dict.fromkeys([*MARKERS, "register"], "cached")
    assert (ws / "prefect").is_dir() and list((ws / "prefect").glob("*.db"))
    assert summary["model"]["version"] == 1
