"""Benchmark of the data stages on a real corpus (default: ../shared/corpora).

Measures, in one run:

- split MB/s on one big file (the corpus's JSONL files concatenated four times) with 1 and
  2 workers, and the speed-up (goal >= 1.7);
- tokenizer training seconds (default config) on the corpus's sentences;
- shard-stage MB/s and its ratio to a bare ``sentencepiece.encode(..., num_threads=all)`` over
  the same sentences (goal >= 0.8);
- peak RSS of split + tokenizer + shards, each run in a child process, on the corpus and on
  the corpus repeated 10 times (goal: growth <= 1.2).

The 1-minute load average before and after is recorded: on a shared machine other work
competes for the cores, and the 2-worker speed-up cannot exceed the cores left free.

Ends by printing one JSON object with every figure and its goal.

    python bench/data.py [CORPUS_PATH ...] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from glm.corpus import resolve_corpus
from glm.shards import ShardConfig, write_shards
from glm.split import SplitConfig, sentence_batches, split_corpus
from glm.tokenizer import Tokenizer, TokenizerConfig, train_tokenizer

DEFAULT_CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpora"
GOALS = {"split_speedup_2w": 1.7, "shard_vs_bare_encode": 0.8, "rss_growth_10x": 1.2}


def _stages(specs: list[str], work: Path) -> dict:
    """Run split -> tokenizer -> shards; return wall seconds of each."""
    times = {}
    t = time.perf_counter()
    split_corpus(specs, work / "sentences", SplitConfig())
    times["split_s"] = time.perf_counter() - t
    t = time.perf_counter()
    train_tokenizer(work / "sentences", work / "tokenizer", TokenizerConfig())
    times["tokenizer_s"] = time.perf_counter() - t
    t = time.perf_counter()
    write_shards(work / "sentences", work / "tokenizer", work / "shards", ShardConfig())
    times["shards_s"] = time.perf_counter() - t
    return times


def _child_main(specs: list[str], work: Path) -> None:
    """Entry of the child process measured for peak RSS."""
    times = _stages(specs, work)
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    kids = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps(times | {"peak_rss_kb": max(own, kids)}))


def _measure_rss(specs: list[str], work: Path) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--child", str(work), *specs],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _cpu_seconds() -> float:
    """CPU seconds used so far by this process and its finished children (pool workers)."""
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _best_of(n: int, fn) -> float:
    best = float("inf")
    for _ in range(n):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("corpus", nargs="*", default=[str(DEFAULT_CORPUS)])
    parser.add_argument("--keep", help="work directory to keep (default: a temp dir)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child_main(args.corpus, Path(args.child))
        return

    work = Path(args.keep or tempfile.mkdtemp(prefix="glm-bench-data-"))
    work.mkdir(parents=True, exist_ok=True)
    files = resolve_corpus(args.corpus)
    corpus_bytes = sum(f.size for f in files)
    threads = os.cpu_count() or 1
    result: dict = {
        "corpus_mb": round(corpus_bytes / 1e6, 2),
        "cpu_count": threads,
        "load_avg_before": os.getloadavg()[0],
    }

    # split: one big file, 1 vs 2 workers
    big = work / "big.jsonl"
    with open(big, "wb") as out:
        for _ in range(4):
            for f in files:
                if f.kind == "jsonl":
                    out.write(f.path.read_bytes())
    big_mb = big.stat().st_size / 1e6
    for workers in (1, 2):
        cpu0 = _cpu_seconds()
        seconds = _best_of(
            1, lambda w=workers: split_corpus([str(big)], work / f"big-{w}", SplitConfig(workers=w))
        )
        cpu = _cpu_seconds() - cpu0
        result[f"split_mb_s_{workers}w"] = round(big_mb / seconds, 2)
        # cores actually obtained: below the worker count when other work shares the machine
        result[f"split_cores_used_{workers}w"] = round(cpu / seconds, 2)
        result[f"split_cpu_s_{workers}w"] = round(cpu, 2)
        print(
            f"split {big_mb:.1f} MB with {workers} worker(s): {seconds:.1f} s, {cpu:.1f} CPU s",
            flush=True,
        )
    result["split_big_file_mb"] = round(big_mb, 1)
    result["split_speedup_2w"] = round(result["split_mb_s_2w"] / result["split_mb_s_1w"], 2)

    # tokenizer and shards on the corpus itself
    split_corpus(args.corpus, work / "sentences", SplitConfig())
    t = time.perf_counter()
    train_tokenizer(work / "sentences", work / "tokenizer", TokenizerConfig())
    result["tokenizer_train_s"] = round(time.perf_counter() - t, 2)
    print(f"tokenizer: {result['tokenizer_train_s']} s", flush=True)

    texts: list[str] = []
    for batch in sentence_batches(work / "sentences"):
        texts += batch.column("text").to_pylist()
    text_mb = sum(len(s.encode()) for s in texts) / 1e6
    sp = Tokenizer.load(work / "tokenizer").sp
    bare = _best_of(3, lambda: sp.encode(texts, num_threads=threads))
    shard = _best_of(
        3,
        lambda: write_shards(
            work / "sentences", work / "tokenizer", work / "shards", ShardConfig()
        ),
    )
    result["bare_encode_mb_s"] = round(text_mb / bare, 2)
    result["shard_mb_s"] = round(text_mb / shard, 2)
    result["shard_vs_bare_encode"] = round(bare / shard, 2)
    print(f"shards {shard:.2f} s vs bare encode {bare:.2f} s over {text_mb:.1f} MB", flush=True)
    texts.clear()

    # peak RSS of the three stages: corpus and corpus x10, each in a fresh child
    ten = work / "corpus-x10"
    ten.mkdir(exist_ok=True)
    for i in range(10):
        for f in files:
            shutil.copyfile(f.path, ten / f"{i:02d}-{Path(f.rel).name}")
    one = _measure_rss(args.corpus, work / "rss-1x")
    tenx = _measure_rss([str(ten)], work / "rss-10x")
    result["peak_rss_mb_1x"] = round(one["peak_rss_kb"] / 1024, 1)
    result["peak_rss_mb_10x"] = round(tenx["peak_rss_kb"] / 1024, 1)
    result["rss_growth_10x"] = round(tenx["peak_rss_kb"] / one["peak_rss_kb"], 2)
    result["stages_s_1x"] = {k: round(v, 2) for k, v in one.items() if k.endswith("_s")}
    result["stages_s_10x"] = {k: round(v, 2) for k, v in tenx.items() if k.endswith("_s")}
    print(f"peak RSS: {result['peak_rss_mb_1x']} MB (1x), {result['peak_rss_mb_10x']} MB (10x)")

    result["load_avg_after"] = os.getloadavg()[0]
    result["goals"] = GOALS
    result["meets"] = {
        "split_speedup_2w": result["split_speedup_2w"] >= GOALS["split_speedup_2w"],
        "shard_vs_bare_encode": result["shard_vs_bare_encode"] >= GOALS["shard_vs_bare_encode"],
        "rss_growth_10x": result["rss_growth_10x"] <= GOALS["rss_growth_10x"],
    }
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
