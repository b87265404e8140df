"""prefect.yaml against a real local Prefect server: deploy it and run it once on a worker.

Slow (a server, a deploy and a worker process): run by ``make test-slow``.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PREFECT = str(Path(sys.executable).with_name("prefect"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _prefect(*args: str, env: dict, timeout: int = 300) -> str:
    done = subprocess.run(
        [PREFECT, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert done.returncode == 0, f"prefect {' '.join(args)}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.mark.slow
def test_deployment_runs_on_a_process_worker(tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env |= {
        "PREFECT_HOME": str(tmp_path / "prefect"),
        "PREFECT_API_URL": f"http://127.0.0.1:{port}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_UI_ENABLED": "false",
    }
    (tmp_path / "prefect").mkdir()
    with open(tmp_path / "server.log", "w") as log:
        server = subprocess.Popen(
            [PREFECT, "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{env['PREFECT_API_URL']}/health", timeout=5):
                    break
            except OSError:
                assert server.poll() is None, (tmp_path / "server.log").read_text()[-3000:]
                assert time.monotonic() < deadline, "Prefect server did not start"
                time.sleep(1)

        _prefect("work-pool", "create", "process", "--type", "process", env=env)
        _prefect("--no-prompt", "deploy", "--name", "glm-retrain", env=env)
        url = f"{env['PREFECT_API_URL']}/deployments/name/glm-pipeline/glm-retrain"
        with urllib.request.urlopen(url, timeout=30) as response:
            deployment = json.loads(response.read())
        assert [s["schedule"]["cron"] for s in deployment["schedules"]] == ["0 2 * * *"]
        limit = deployment.get("global_concurrency_limit") or {}
        assert deployment.get("concurrency_limit") == 1 or limit.get("limit") == 1
        assert deployment["work_pool_name"] == "process"

        ws = tmp_path / "ws"
        run_params = {
            "params": {
                "corpus": [str(ROOT / "data" / "*.jsonl")],
                "workspace": str(ws),
                "preset": "tiny",
                "max_steps": 10,
                "tokenizer": {"vocab_size": 3000},
                "eval": {"cloze_items": 40, "span_windows": 4, "greedy_spans": 2},
                "retries": 0,
            }
        }
        _prefect(
            "deployment",
            "run",
            "glm-pipeline/glm-retrain",
            "--params",
            json.dumps(run_params),
            env=env,
        )
        _prefect("worker", "start", "--pool", "process", "--run-once", env=env, timeout=600)

        summary = json.loads((ws / "last_run.json").read_text())
        assert summary["status"] == "completed"
        assert set(summary["stages"].values()) == {"ran"}
        assert summary["model"]["alias"] == "champion"
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=60)
