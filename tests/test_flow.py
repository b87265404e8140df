"""End to end: the real Prefect flow and a real MLflow sqlite registry on the tiny preset.

The tests share one workspace and run in file order, as a story: first run, rerun, config
change, forced rerun, the champion gate both ways, a fault retried, concurrent CLI runs,
then the registered model loaded by alias in another process and served over REST.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from flows.params import PipelineParams

ROOT = Path(__file__).resolve().parents[1]
GLM = str(Path(sys.executable).with_name("glm"))
STAGES = ["split", "tokenizer", "shard", "train", "evaluate", "register"]
# Enough evaluation to exercise every metric; the tiny model's scores are not the point.
EVAL = {"cloze_items": 20, "span_windows": 4, "greedy_spans": 2, "xz_train_cap_bytes": 65536}
QUESTION = "In the beginning God created the [MASK] and the earth."


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("pipeline")


def params(ws: Path, **overrides) -> PipelineParams:
    """Tiny preset, small evaluation, no retry delay: a full run in well under a minute."""
    values = {
        "corpus": [str(ROOT / "data" / "*.jsonl")],
        "workspace": str(ws),
        "preset": "tiny",
        "max_steps": 10,
        "tracking_uri": f"sqlite:///{ws / 'mlflow.db'}",
        "retry_backoff_s": 0,
        "tokenizer": {"vocab_size": 3000},
        "eval": EVAL,
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(values.get(key), dict):
            values[key] = {**values[key], **value}
        else:
            values[key] = value
    return PipelineParams.model_validate(values)


def run(ws: Path, **overrides) -> dict:
    from flows.pipeline import glm_pipeline

    summary = glm_pipeline(params(ws, **overrides))
    assert json.loads((ws / "last_run.json").read_text()) == summary
    return summary


def client(ws: Path):
    """The workspace's registry, named explicitly: the environment's MLFLOW_TRACKING_URI
    (conftest's, or whatever an earlier in-process run set) must not decide it."""
    from flows.registry import open_registry

    return open_registry(ws, f"sqlite:///{ws / 'mlflow.db'}")


def champion_version(ws: Path) -> int:
    return int(client(ws).get_model_version_by_alias("glm", "champion").version)


def cli_env(ws: Path, prefect_api: str) -> dict:
    """Environment of a CLI subprocess: the session's Prefect server, the ws registry."""
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["PREFECT_API_URL"] = prefect_api
    return env


def test_first_run_runs_every_stage(prefect_api, ws):
    summary = run(ws)
    assert summary["stages"] == dict.fromkeys(STAGES, "ran")
    assert summary["metrics"]["val_bpb"] > 0
    assert summary["model"]["version"] == 1
    assert summary["model"]["alias"] == "champion"
    assert "first version" in summary["model"]["gate_reason"]
    assert summary["mlflow_run_id"] and summary["flow_run_id"]
    for stage, out_dir in summary["stage_dirs"].items():
        assert Path(out_dir).parent == ws / "stages" / stage

    run_ = client(ws).get_run(summary["mlflow_run_id"])
    assert run_.data.params["preset"] == "tiny"
    assert "train/loss" in run_.data.metrics and "val_bpb" in run_.data.metrics
    assert run_.data.tags["git_commit"]
    assert run_.data.tags["digest.split"] == Path(summary["stage_dirs"]["split"]).name
    artifacts = {a.path for a in client(ws).list_artifacts(summary["mlflow_run_id"])}
    assert {"tokenizer", "data", "eval", "plots"} <= artifacts
    # Registered artifacts hold no pickle: safetensors, JSON, sentencepiece and code only.
    model_dir = next((ws / "mlartifacts").rglob("MLmodel")).parent
    assert not [p for p in model_dir.rglob("*") if p.suffix in (".pkl", ".pickle", ".pt")]


def test_rerun_is_all_cache_hits(prefect_api, ws):
    summary = run(ws)
    assert summary["stages"] == dict.fromkeys(STAGES, "cached")
    assert summary["model"]["version"] == 1


def test_lost_prefect_cache_reuses_stage_outputs(prefect_api, ws):
    # Prefect's result store is where its cache records live: without them, complete stage
    # outputs are still found by their content key and reused.
    import shutil

    from prefect.settings import PREFECT_LOCAL_STORAGE_PATH

    shutil.rmtree(PREFECT_LOCAL_STORAGE_PATH.value(), ignore_errors=True)
    summary = run(ws)
    assert summary["stages"] == dict.fromkeys(STAGES, "cached")


def test_vocab_change_reruns_tokenizer_onward_only(prefect_api, ws):
    summary = run(ws, tokenizer={"vocab_size": 3200})
    assert summary["stages"] == {"split": "cached", **dict.fromkeys(STAGES[1:], "ran")}
    assert summary["model"]["version"] == 2
    # Same corpus, same split: the gate compares on the same validation bytes.
    assert "same validation bytes" in summary["model"]["gate_reason"]


def test_force_train_reruns_train_evaluate_register(prefect_api, ws):
    summary = run(ws, force=["train"])
    assert summary["stages"] == {
        **dict.fromkeys(["split", "tokenizer", "shard"], "cached"),
        **dict.fromkeys(["train", "evaluate", "register"], "ran"),
    }


def test_champion_gate_both_directions(prefect_api, ws):
    from flows.registry import promote

    best = champion_version(ws)
    weak = run(ws, max_steps=2, seed=7)
    assert weak["model"]["alias"] == "challenger"
    assert "does not beat" in weak["model"]["gate_reason"]
    assert champion_version(ws) == best

    # Roll the champion back to the weak model by hand; a good model then takes it back.
    promote(ws, "glm", weak["model"]["version"])
    strong = run(ws, seed=8)
    assert strong["model"]["alias"] == "champion", strong["model"]["gate_reason"]
    assert "beats champion" in strong["model"]["gate_reason"]
    assert champion_version(ws) == strong["model"]["version"]


def test_gate_reevaluates_champion_on_another_validation_set(prefect_api, ws):
    # Another validation rule = other validation bytes: v1's figure cannot be reused as is.
    summary = run(ws, shard={"val_modulus": 7}, seed=9)
    assert "re-evaluated on this run's validation set" in summary["model"]["gate_reason"]


def test_injected_training_failure_is_retried_and_resumes(prefect_api, ws, monkeypatch):
    # Fails once right after step 15; the checkpoint of step 10 is what the retry resumes.
    monkeypatch.setenv("GLM_FAULT", "fail-once@step:15")
    summary = run(ws, seed=11, max_steps=20, train={"ckpt_every": 10}, retries=1)
    assert summary["stages"]["train"] == "ran"
    train_dir = Path(summary["stage_dirs"]["train"])
    assert (train_dir / ".fault-step-15").exists()
    steps = [json.loads(line)["step"] for line in (train_dir / "metrics.jsonl").open()]
    assert steps == sorted(set(steps)), "a resumed run continues the curve, no restart"
    resumed = json.loads((train_dir / "train.json").read_text())["resumed_from"]
    assert resumed.endswith("step-00000010")


def test_failed_run_is_retried_with_the_prefect_cli(prefect_api, ws, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(f"tokenizer: {{vocab_size: 3000}}\neval: {json.dumps(EVAL)}\n")
    cmd = [GLM, "run", "--corpus", str(ROOT / "data" / "*.jsonl"), "--workspace", str(ws)]
    cmd += ["--preset", "tiny", "--max-steps", "5", "--seed", "31", "--retries", "0"]
    env = cli_env(ws, prefect_api)
    failed = subprocess.run(
        [*cmd, "--config", str(config)],
        env={**env, "GLM_FAULT": "fail@step:3"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert failed.returncode == 1, failed.stderr[-3000:]
    last = json.loads((ws / "last_run.json").read_text())
    assert last["status"] == "failed" and last["flow_run_id"] in last["retry"]

    # The documented command, fault gone: the completed stages come from the cache.
    prefect = str(Path(sys.executable).with_name("prefect"))
    entrypoint = "flows/pipeline.py:glm_pipeline"
    retried = subprocess.run(
        [prefect, "flow-run", "retry", last["flow_run_id"], "--entrypoint", entrypoint],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert retried.returncode == 0, retried.stdout[-3000:] + retried.stderr[-3000:]
    summary = json.loads((ws / "last_run.json").read_text())
    assert summary["status"] == "completed"
    assert summary["flow_run_id"] == last["flow_run_id"]
    assert summary["stages"] == {
        **dict.fromkeys(["split", "tokenizer", "shard"], "cached"),
        **dict.fromkeys(["train", "evaluate", "register"], "ran"),
    }


def test_bad_input_is_not_retried(prefect_api, ws, tmp_path):
    from glm.errors import InputError

    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"text": broken\n')
    start = time.monotonic()
    with pytest.raises(InputError, match="bad.jsonl"):
        run(ws, corpus=[str(bad)], retries=3, retry_backoff_s=5)
    assert time.monotonic() - start < 30, "an InputError must not wait out retry delays"


def test_concurrent_cli_runs_share_one_workspace(prefect_api, ws, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(f"tokenizer: {{vocab_size: 3000}}\neval: {json.dumps(EVAL)}\n")
    before = {int(v.version) for v in client(ws).search_model_versions("name = 'glm'")}
    cmd = [GLM, "run", "--corpus", str(ROOT / "data" / "*.jsonl"), "--workspace", str(ws)]
    cmd += ["--preset", "tiny", "--max-steps", "10", "--config", str(config)]
    procs = [
        subprocess.Popen(
            [*cmd, "--seed", str(seed)],
            env=cli_env(ws, prefect_api),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for seed in (21, 22)
    ]
    outputs = [p.communicate(timeout=400)[0] for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out
        assert "database is locked" not in out
    versions = client(ws).search_model_versions("name = 'glm'")
    new = {int(v.version) for v in versions} - before
    assert len(new) == 2
    # The champion only ever moves to a better model, so whichever order the two runs took
    # the gate in, it ends at least as good as each of them (on the same validation bytes).
    champion = client(ws).get_model_version_by_alias("glm", "champion")
    for v in versions:
        if int(v.version) in new:
            assert v.tags["gate_reason"]
            if v.tags["val_digest"] == champion.tags["val_digest"]:
                assert float(champion.tags["val_bpb"]) <= float(v.tags["val_bpb"])


def test_pyfunc_loads_by_alias_in_a_fresh_process(prefect_api, ws, tmp_path):
    code = (
        "import json, mlflow\n"
        f"mlflow.set_tracking_uri('sqlite:///{ws / 'mlflow.db'}')\n"
        "m = mlflow.pyfunc.load_model('models:/glm@champion')\n"
        f"out = m.predict([{QUESTION!r}, '天地[MASK]'], params={{'max_new_tokens': 8}})\n"
        "print(json.dumps(out))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    filled = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(filled) == 2
    assert all(isinstance(t, str) and "[MASK]" not in t for t in filled)
    assert filled[0].startswith("In the beginning God created the")


def test_cli_fill_and_promote(prefect_api, ws):
    env = cli_env(ws, prefect_api)
    done = subprocess.run(
        [GLM, "fill", QUESTION, "--workspace", str(ws), "--max-new-tokens", "6"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "->" in done.stdout and "[MASK]" not in done.stdout.split("->")[1]

    current = champion_version(ws)
    done = subprocess.run(
        [GLM, "promote", "1", "--workspace", str(ws)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert champion_version(ws) == 1
    client(ws).set_registered_model_alias("glm", "champion", str(current))

    # a version or an alias that does not exist: one line naming it, exit 2
    for args, named in (
        (["promote", "99"], "glm v99"),
        (["fill", QUESTION, "--model", "models:/glm@nosuch"], "models:/glm@nosuch"),
    ):
        done = subprocess.run(
            [GLM, *args, "--workspace", str(ws)], env=env, capture_output=True, text=True
        )
        assert done.returncode == 2, done.stderr
        assert done.stderr.startswith(f"error: {named}") and "Traceback" not in done.stderr
    assert champion_version(ws) == current


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_rest_serving_answers_on_localhost(prefect_api, ws, tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{ws / 'mlflow.db'}"
    # The scoring server execs uvicorn from PATH, as in an activated virtualenv.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    mlflow_bin = str(Path(sys.executable).with_name("mlflow"))
    with open(tmp_path / "serve.log", "w") as log:
        server = subprocess.Popen(
            [mlflow_bin, "models", "serve", "-m", "models:/glm@champion"]
            + ["--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1"],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=log,
            start_new_session=True,
        )
    try:
        body = json.dumps({"inputs": [QUESTION], "params": {"max_new_tokens": 8}}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{port}/invocations",
            data=body,
            headers={"Content-Type": "application/json"},
        )
        deadline = time.monotonic() + 150
        while True:
            try:
                with urllib.request.urlopen(request, timeout=60) as response:
                    answer = json.loads(response.read())
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "serve.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "server did not answer in time"
                time.sleep(1)
        assert list(answer) == ["predictions"]
        assert len(answer["predictions"]) == 1
        assert "[MASK]" not in answer["predictions"][0]

        # a bad generation setting is the caller's mistake: 400, the setting named, no trace
        bad = json.dumps({"inputs": [QUESTION], "params": {"top_p": 5.0}}).encode()
        request = urllib.request.Request(
            request.full_url, data=bad, headers={"Content-Type": "application/json"}
        )
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(request, timeout=60)
        assert info.value.code == 400
        body = json.loads(info.value.read())
        assert "top_p" in body["message"] and "stack_trace" not in body
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


@pytest.mark.parametrize(
    ("error", "retried"),
    [
        ("InputError", False),  # bad input: running again cannot fix it
        ("IntegrityError", False),  # a corrupt artifact: same
        ("TrainingInterrupted", False),  # SIGTERM asked the run to stop; a rerun resumes
        ("RuntimeError", True),  # anything else may be transient
    ],
)
def test_retry_condition(error, retried):
    from prefect.states import Failed

    from flows.tasks import retry_unless_bad_input
    from glm import errors, train

    exc = getattr(errors, error, None) or getattr(train, error, None) or RuntimeError
    assert retry_unless_bad_input(None, None, Failed(data=exc("x"))) is retried


def test_the_pyfunc_loads_without_mlflow_type_hint_warnings():
    # a service loading models:/glm@champion should see no advice meant for model authors
    done = subprocess.run(
        [sys.executable, "-W", "default", "-c", "import flows.pyfunc_model"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )
    assert "type hint" not in done.stderr.lower(), done.stderr
