"""What an unchanged rerun of ``glm run`` costs, against an empty Prefect flow.

A rerun with nothing changed runs no stage: every task is a cache hit and registration finds
its version. What is left is the price of the CLI, Prefect's ephemeral server and the
content keys (sha256 of every corpus file). The floor for that is a flow that does nothing,
started the same way: a fresh process that brings up Prefect's ephemeral server and runs an
empty ``@flow``. Both are timed as whole processes, interleaved, each with a Prefect home
that already exists (its database migrated), so neither pays a first-start cost.

    .venv/bin/python bench/rerun.py                         # bundled sample, tiny preset
    .venv/bin/python bench/rerun.py --corpus ../shared/corpora --repeats 3

Prints one JSON object: median wall seconds of both, their ratio and difference.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
# An unchanged rerun should cost little more than Prefect itself: at most 1.5x an empty flow.
RATIO_GOAL = 1.5

EMPTY_FLOW = """
from prefect import flow

@flow(name="empty")
def empty() -> None:
    pass

empty()
"""


def _env(prefect_home: Path) -> dict:
    """A clean Prefect environment: the given home, no server of the caller's."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env["PREFECT_HOME"] = str(prefect_home)
    env["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
    env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "180"
    return env


def _timed(cmd: list[str], env: dict, what: str) -> float:
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        errors = [ln for ln in done.stderr.splitlines() if ln.startswith("error:")]
        reason = errors[-1] if errors else f"exit code {done.returncode}"
        raise SystemExit(f"{done.stderr[-3000:]}\n{what} failed: {reason}")
    return wall


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", action="append", help="repeatable; default: data/*.jsonl")
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--max-steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each")
    parser.add_argument("--work", type=Path, default=None, help="default: a temporary dir")
    args = parser.parse_args(argv)
    corpus = args.corpus or [str(ROOT / "data" / "*.jsonl")]
    work = args.work or Path(tempfile.mkdtemp(prefix="glm-bench-rerun-"))
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "ws", ignore_errors=True)
    shutil.rmtree(work / "empty-prefect", ignore_errors=True)
    ws = work / "ws"
    config = work / "bench.yaml"
    config.write_text("eval: {cloze_items: 60, span_windows: 8, greedy_spans: 4}\n")

    run = [str(BIN / "glm"), "run", "--workspace", str(ws), "--preset", args.preset]
    run += ["--max-steps", str(args.max_steps), "--config", str(config)]
    for spec in corpus:
        run += ["--corpus", spec]
    empty = [sys.executable, "-c", EMPTY_FLOW]
    run_env, empty_env = _env(ws / "prefect"), _env(work / "empty-prefect")

    # untimed: the first run builds every stage; the first empty flow migrates its database
    first = _timed(run, run_env, "first glm run")
    _timed(empty, empty_env, "empty flow")
    reruns, empties = [], []
    for _ in range(args.repeats):
        reruns.append(_timed(run, run_env, "glm rerun"))
        empties.append(_timed(empty, empty_env, "empty flow"))
    last = json.loads((ws / "last_run.json").read_text())
    ran = [stage for stage, how in last["stages"].items() if how != "cached"]

    rerun_s, empty_s = statistics.median(reruns), statistics.median(empties)
    result = {
        "corpus": corpus,
        "preset": args.preset,
        "max_steps": args.max_steps,
        "repeats": args.repeats,
        "first_run_s": round(first, 2),
        "rerun_s": round(rerun_s, 2),
        "rerun_runs_s": [round(t, 2) for t in reruns],
        "empty_flow_s": round(empty_s, 2),
        "empty_flow_runs_s": [round(t, 2) for t in empties],
        "rerun_over_empty": round(rerun_s / empty_s, 3),
        "rerun_minus_empty_s": round(rerun_s - empty_s, 2),
        "rerun_stages_not_cached": ran,
        "goals": {"rerun_over_empty": RATIO_GOAL, "met": rerun_s / empty_s <= RATIO_GOAL},
    }
    if args.work is None:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
