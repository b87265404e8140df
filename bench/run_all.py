"""Every benchmark of the project in one run, written as one table with each goal beside it.

Runs, one after the other on the same machine (nothing else should be running):

- ``bench/data.py`` on the corpus: split MB/s on 1 and 2 cores and the speed-up, the shard
  stage against a bare sentencepiece encode of the same sentences, peak RSS of the data
  stages at 1x and 10x the corpus;
- ``bench/train.py``: GLM against a causal GPT of the same shape, step for step, and CPU MFU
  against the matmul ceiling measured in the same process;
- ``bench/rerun.py``: an unchanged ``glm run`` rerun against an empty Prefect flow;
- quality: the newest ``bench/results/quality-*.json`` of ``bench/quality.py`` (a 30-minute
  training run) is reused and the table says so; ``--quality-minutes M`` runs it instead.

Each script runs as a subprocess and ends by printing one JSON object; a failed script
becomes a row marked ``failed`` with its last error line, and the others still run.

    .venv/bin/python bench/run_all.py                       # make bench: ../shared/corpora
    .venv/bin/python bench/run_all.py --corpus data --quick # smoke test, a few minutes

Writes ``bench/results/bench-<time>.{md,json}`` and copies them to ``bench.{md,json}`` there.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("bench.run_all")

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
CORPORA = ROOT.parent / "shared" / "corpora"
RESULTS = BENCH / "results"


@dataclass
class Row:
    """One line of the table: a figure, its goal, and whether the goal is met."""

    section: str
    name: str
    value: str
    goal: str = ""
    met: bool | None = None
    note: str = ""

    def cells(self) -> list[str]:
        met = {True: "yes", False: "**no**", None: ""}[self.met]
        return [self.section, self.name, self.value, self.goal, met, self.note]


def run_script(name: str, args: list[str], timeout_s: float) -> tuple[dict | None, str, float]:
    """Run ``bench/<name>`` and return (its final JSON object or None, error line, seconds)."""
    cmd = [sys.executable, str(BENCH / name), *args]
    log.info("running %s", " ".join(cmd[1:]))
    t0 = time.perf_counter()
    try:
        done = subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired:
        return None, f"timed out after {timeout_s:.0f} s", time.perf_counter() - t0
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        return None, f"exit {done.returncode}: {lines[-1]}", wall
    result = last_json_object(done.stdout)
    if result is None:
        return None, "printed no JSON object", wall
    log.info("%s done in %.0f s", name, wall)
    return result, "", wall


def last_json_object(text: str) -> dict | None:
    """The last top-level JSON object in ``text`` (scripts may log before printing it)."""
    decoder = json.JSONDecoder()
    found = None
    for start in (i for i, ch in enumerate(text) if ch == "{"):
        if found is not None and start < found[1]:
            continue  # inside the object already found
        try:
            obj, end = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            continue
        if isinstance(obj, dict):
            found = (obj, end)
    return found[0] if found else None


def _failed(section: str, name: str, error: str) -> Row:
    return Row(section, name, "failed", note=error)


def data_rows(result: dict | None, error: str) -> list[Row]:
    """Split speed and scaling, shard stage vs bare encode, data-stage memory."""
    s = "data (bench/data.py)"
    if result is None:
        return [_failed(s, "split, shard, peak RSS", error)]
    goals = result["goals"]
    speedup, shard_ratio, growth = (
        result["split_speedup_2w"],
        result["shard_vs_bare_encode"],
        result["rss_growth_10x"],
    )
    big = f"one {result['split_big_file_mb']:.0f} MB file"
    return [
        Row(s, "split MB/s, 1 core", f"{result['split_mb_s_1w']:.2f}", note=big),
        Row(s, "split MB/s, 2 cores", f"{result['split_mb_s_2w']:.2f}", note=big),
        Row(
            s,
            "split speed-up, 2 cores / 1",
            f"{speedup:.2f}x",
            f">= {goals['split_speedup_2w']}x",
            speedup >= goals["split_speedup_2w"],
        ),
        Row(s, "tokenizer training", f"{result['tokenizer_train_s']:.1f} s"),
        Row(
            s,
            "shard stage / bare spm encode",
            f"{shard_ratio:.2f}",
            f">= {goals['shard_vs_bare_encode']}",
            shard_ratio >= goals["shard_vs_bare_encode"],
            f"{result['shard_mb_s']:.2f} vs {result['bare_encode_mb_s']:.2f} MB/s",
        ),
        Row(
            s,
            "data-stage peak RSS, 10x / 1x corpus",
            f"{growth:.2f}x",
            f"<= {goals['rss_growth_10x']}x",
            growth <= goals["rss_growth_10x"],
            f"{result['peak_rss_mb_1x']:.0f} MB at 1x, {result['peak_rss_mb_10x']:.0f} MB at 10x",
        ),
    ]


def train_rows(result: dict | None, error: str) -> list[Row]:
    """GLM vs causal GPT step ratios and MFU against the measured matmul ceiling."""
    s = "train step (bench/train.py)"
    if result is None:
        return [_failed(s, "GLM vs GPT, MFU", error)]
    goals = result.get("goals", {})
    shape = (
        f"{result['preset']}, {result['batch']}x{result['seq_len']}, {result['threads']} threads"
    )
    ratio_goal, mfu_goal = goals.get("glm_over_gpt", 0.95), goals.get("glm_mfu", 0.60)
    ceiling = result["matmul_ceiling_tflops"] * 1e3
    return [
        Row(
            s,
            "GLM / GPT tokens/s (logits everywhere)",
            f"{result['glm_over_gpt']:.3f}",
            f">= {ratio_goal}",
            result["glm_over_gpt"] >= ratio_goal,
            shape,
        ),
        Row(
            s,
            "GLM / GPT tokens/s (logits where the loss is)",
            f"{result['glm_over_gpt_trained']:.3f}",
            "",
            None,
            f"loss on {result['glm_loss_share']:.0%} of positions",
        ),
        Row(
            s,
            "GLM MFU vs matmul ceiling",
            f"{result['glm_mfu']:.1%}",
            f">= {mfu_goal:.0%}",
            result["glm_mfu"] >= mfu_goal,
            f"ceiling {ceiling:.0f} GFLOP/s fp32, GPT {result['gpt_mfu']:.1%}",
        ),
    ]


def rerun_rows(result: dict | None, error: str) -> list[Row]:
    s = "orchestration (bench/rerun.py)"
    if result is None:
        return [_failed(s, "unchanged rerun vs empty flow", error)]
    goal = result["goals"]["rerun_over_empty"]
    note = f"{result['rerun_s']:.1f} s vs {result['empty_flow_s']:.1f} s"
    if result["rerun_stages_not_cached"]:
        note += f"; NOT cached: {', '.join(result['rerun_stages_not_cached'])}"
    return [
        Row(
            s,
            "unchanged `glm run` rerun / empty Prefect flow",
            f"{result['rerun_over_empty']:.2f}x",
            f"<= {goal}x, all stages cached",
            result["goals"]["met"] and not result["rerun_stages_not_cached"],
            note,
        )
    ]


def quality_rows(result: dict | None, source: str) -> list[Row]:
    s = "quality (bench/quality.py)"
    if result is None:
        return [_failed(s, "val bpb vs xz", source)]
    bpb, xz = result["final_val_bpb"], result["xz_bpb"]
    char = result.get("char_gpt_bpb", 1.50)
    return [
        Row(
            s,
            "val bits/byte vs xz -9e conditional",
            f"{bpb:.3f} vs {xz:.3f}",
            "below xz",
            bpb < xz,
            source,
        ),
        Row(
            s,
            "val bits/byte vs char-level GPT",
            f"{bpb:.3f} vs {char:.2f}",
            "below",
            bpb < char,
            f"{result['steps']} steps, {result['train_minutes']} min, {result['params']:,} params",
        ),
    ]


def latest_quality(results_dir: Path) -> tuple[dict | None, str]:
    """The newest quality result of about 30 training minutes (any length if there is none),
    from this machine's results or the reference committed in docs/results, and its source."""
    found = sorted(
        [*results_dir.glob("quality-*.json"), *(ROOT / "docs" / "results").glob("quality-*.json")],
        key=lambda p: p.stat().st_mtime,
    )
    preferred = [p for p in found if json.loads(p.read_text()).get("train_minutes", 0) >= 29]
    pick = (preferred or found)[-1] if found else None
    if pick is None:
        return None, "no bench/results/quality-*.json yet: run bench/quality.py --minutes 30"
    result = json.loads(pick.read_text())
    stamp = dt.datetime.fromtimestamp(pick.stat().st_mtime).strftime("%Y-%m-%d %H:%M")
    return result, f"reused {pick.relative_to(ROOT)} ({stamp}), not retrained in this run"


def markdown(rows: list[Row], meta: dict) -> str:
    head = ["section", "measure", "figure", "goal", "met", "notes"]
    lines = [
        f"# Benchmarks, {meta['finished_at']}",
        "",
        f"Corpus `{meta['corpus']}` ({meta['corpus_mb']:.1f} MB), {meta['cpus']} CPUs, "
        f"commit `{meta['git_commit'][:10]}`, {meta['wall_s'] / 60:.1f} minutes in all.",
        "",
        "| " + " | ".join(head) + " |",
        "| " + " | ".join("---" for _ in head) + " |",
    ]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def _corpus_mb(corpus: Path) -> float:
    files = [corpus] if corpus.is_file() else [p for p in corpus.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6


def _git_commit() -> str:
    done = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "HEAD"], capture_output=True)
    return done.stdout.decode().strip() or "unknown"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--corpus", type=Path, default=CORPORA, help="file or directory")
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument("--quick", action="store_true", help="few steps/repeats: a smoke test")
    parser.add_argument("--train-preset", default="small")
    parser.add_argument(
        "--quality-minutes", type=float, default=None, help="run bench/quality.py instead of reuse"
    )
    parser.add_argument("--skip", action="append", default=[], help="data, train, rerun, quality")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    corpus = args.corpus.resolve()
    if not corpus.exists():
        raise SystemExit(f"error: {corpus}: corpus does not exist")
    t0 = time.perf_counter()
    rows: list[Row] = []
    raw: dict[str, dict | None] = {}
    walls: dict[str, float] = {}

    if "data" not in args.skip:
        raw["data"], err, walls["data"] = run_script("data.py", [str(corpus)], 40 * 60)
        rows += data_rows(raw["data"], err)
    if "train" not in args.skip:
        steps = ["--steps", "2", "--warmup", "1"] if args.quick else ["--steps", "15"]
        train_args = ["--preset", args.train_preset, *steps]
        raw["train"], err, walls["train"] = run_script("train.py", train_args, 15 * 60)
        rows += train_rows(raw["train"], err)
    if "rerun" not in args.skip:
        rerun_corpus = corpus if corpus.is_file() else corpus / "*.jsonl"
        rerun_args = ["--corpus", str(rerun_corpus), "--repeats", "1" if args.quick else "3"]
        raw["rerun"], err, walls["rerun"] = run_script("rerun.py", rerun_args, 15 * 60)
        rows += rerun_rows(raw["rerun"], err)
    if "quality" not in args.skip:
        if args.quality_minutes is not None:
            q_args = ["--minutes", str(args.quality_minutes), "--results", str(args.results)]
            budget = args.quality_minutes * 60 * 2 + 600
            raw["quality"], err, walls["quality"] = run_script("quality.py", q_args, budget)
            source = err or f"trained in this run ({args.quality_minutes} min budget)"
        else:
            raw["quality"], source = latest_quality(args.results)
        rows += quality_rows(raw["quality"], source)

    finished = dt.datetime.now()
    meta = {
        "finished_at": finished.strftime("%Y-%m-%d %H:%M"),
        "corpus": str(corpus),
        "corpus_mb": _corpus_mb(corpus),
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
        "git_commit": _git_commit(),
        "quick": args.quick,
        "wall_s": round(time.perf_counter() - t0, 1),
        "script_wall_s": {k: round(v, 1) for k, v in walls.items()},
    }
    report = {"meta": meta, "rows": [r.__dict__ for r in rows], "raw": raw}
    table = markdown(rows, meta)
    args.results.mkdir(parents=True, exist_ok=True)
    stem = args.results / f"bench-{finished.strftime('%Y%m%d-%H%M')}"
    stem.with_suffix(".md").write_text(table)
    stem.with_suffix(".json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    shutil.copy(stem.with_suffix(".md"), args.results / "bench.md")
    shutil.copy(stem.with_suffix(".json"), args.results / "bench.json")
    print(table)
    log.info("wrote %s.md and .json", stem)
    return report


if __name__ == "__main__":
    main()
