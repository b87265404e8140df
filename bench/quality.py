"""Quality run: train on the KJV for a wall-time budget, plot val bits per byte against minutes.

The split is the pipeline's own (``glm/shards.py``): a chapter is validation when
``int(sha256(id), 16) % 20 == 0`` (63 chapters, 219,829 bytes joined with blank lines).
Reference points on those bytes: xz -9e conditional on the training text, 1.69 bpb; a 3.2 M
parameter character-level GPT trained 33 minutes on this machine, 1.50 bpb.

The time budget is turned into a step count before training starts (``glm.train``); val
bpb is measured every ``--eval-every`` minutes of training (evaluation time is not counted
as training time) and once more on the final model package with the full ``evaluate``
(which also measures the xz and unigram baselines on the same bytes).

    .venv/bin/python bench/quality.py --minutes 30      # the run (takes the machine)
    .venv/bin/python bench/quality.py --minutes 2       # smoke check

Writes ``bench/results/quality-<minutes>min.json`` and ``.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import time
from pathlib import Path

import torch

from glm.config import ModelConfig, ObjectiveConfig, Preset, TrainConfig
from glm.evaluate import EvalConfig, Scorer, bits_per_byte, evaluate
from glm.objectives import SpecialIds

log = logging.getLogger("bench.quality")

ROOT = Path(__file__).resolve().parents[1]
KJV = ROOT.parent / "shared" / "corpora" / "kjv.jsonl"

# ~4.8 M non-embedding parameters: the largest that sees the training text a few times in
# 30 minutes on 2 cores. A gMASK-heavy mix puts the loss on most tokens and is what bits per
# byte measures; a little [MASK]/[sMASK] keeps the model a blank filler.
QUALITY = Preset(
    "quality",
    ModelConfig(n_layer=6, n_head=8, d_model=256, max_seq_len=256, max_block_len=256),
    TrainConfig(
        max_steps=1,  # replaced by the time budget
        batch_size=16,
        seq_len=256,
        lr=2e-3,
        warmup_frac=0.03,
        ckpt_every=25,
        keep_last=1,
        log_every=25,
    ),
    ObjectiveConfig(p_mask=0.1, p_smask=0.1, p_gmask=0.8),
)
VOCAB_SIZE = 4096  # BPE over English only: ~4 bytes a token, a small output layer


def prepare_data(work: Path, corpus: Path) -> tuple[Path, Path]:
    """split -> tokenizer -> shards, reusing what an earlier run of this script built."""
    from glm.shards import ShardConfig, write_shards
    from glm.split import SplitConfig, split_corpus
    from glm.tokenizer import TokenizerConfig, train_tokenizer

    sentences, tokenizer, shards = work / "sentences", work / "tokenizer", work / "shards"
    if not (sentences / "stats.json").exists():
        split_corpus([str(corpus)], sentences, SplitConfig())
    if not (tokenizer / "tokenizer.json").exists():
        train_tokenizer(sentences, tokenizer, TokenizerConfig(vocab_size=VOCAB_SIZE))
    if not (shards / "manifest.json").exists():
        write_shards(sentences, tokenizer, shards, ShardConfig())
    return shards / "manifest.json", tokenizer


def plot(curve: list[dict], xz_bpb: float, path: Path, title: str) -> None:
    """Val bpb against training minutes, with the two reference lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2))
    ax.plot([p["minutes"] for p in curve], [p["val_bpb"] for p in curve], "o-", label="GLM")
    ax.axhline(xz_bpb, color="grey", ls="--", label=f"xz -9e conditional ({xz_bpb:.2f})")
    ax.axhline(1.50, color="tab:red", ls=":", label="char-level GPT, 33 min (1.50)")
    ax.set_xlabel("training minutes (evaluation excluded)")
    ax.set_ylabel("validation bits per byte")
    ax.set_title(title)
    ax.set_ylim(bottom=min(1.4, *(p["val_bpb"] for p in curve)) - 0.1)  # keep both references
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=30.0, help="training wall-time budget")
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="a fixed step budget instead of --minutes (for a shared, loaded machine, where a "
        "timed probe would undercount)",
    )
    parser.add_argument("--eval-every", type=float, default=3.0, help="minutes between evals")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--corpus", type=Path, default=KJV)
    parser.add_argument("--work", type=Path, default=ROOT / "workspace" / "bench-quality")
    parser.add_argument("--results", type=Path, default=ROOT / "bench" / "results")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)

    from glm.shards import ShardReader
    from glm.tokenizer import Tokenizer
    from glm.train import train

    t0 = time.perf_counter()
    manifest, tokenizer_dir = prepare_data(args.work, args.corpus)
    data_s = time.perf_counter() - t0
    tokenizer = Tokenizer.load(tokenizer_dir)
    val_docs = list(ShardReader(manifest).documents("val"))
    special = SpecialIds.from_tokenizer(tokenizer)
    seq_len = QUALITY.train.seq_len

    tag = f"{args.steps}steps" if args.steps else f"{args.minutes:g}min"
    run_dir = args.work / f"train-{tag}"
    curve: list[dict] = []
    clock = {"train_s": 0.0, "since": time.perf_counter(), "last_eval": -1e9}

    def on_checkpoint(step: int, model: torch.nn.Module) -> None:
        # training time is wall time minus the time spent in these evaluations
        now = time.perf_counter()
        clock["train_s"] += now - clock["since"]
        if clock["train_s"] - clock["last_eval"] >= 60 * args.eval_every:
            model.eval()
            scorer = Scorer(model, tokenizer.pad_id, seq_len, 32, torch.device("cpu"), run_dir)
            bpb = bits_per_byte(scorer, val_docs, special, context_frac=0.5)["val_bpb"]
            model.train()
            minutes = clock["train_s"] / 60
            curve.append({"minutes": round(minutes, 2), "step": step, "val_bpb": bpb})
            log.info("%.1f min, step %d: val %.4f bpb", minutes, step, bpb)
            clock["last_eval"] = clock["train_s"]
        clock["since"] = time.perf_counter()

    preset = dataclasses.replace(
        QUALITY, train=dataclasses.replace(QUALITY.train, max_steps=args.steps or 1)
    )
    summary = train(
        manifest,
        tokenizer_dir,
        run_dir,
        preset,
        device="cpu",
        threads=args.threads,
        resume="never",
        time_budget_s=None if args.steps else 60 * args.minutes,
        on_checkpoint=on_checkpoint,
    )
    # the full evaluation of the package; its bpb ends the curve unless the last callback did
    final = evaluate(
        run_dir / "final",
        manifest,
        EvalConfig(device="cpu", threads=args.threads, batch_size=32, seq_len=seq_len),
        out_dir=run_dir / "eval",
    )
    if not curve or curve[-1]["step"] != summary["steps"]:
        minutes = round(clock["train_s"] / 60, 2)
        curve.append({"minutes": minutes, "step": summary["steps"], "val_bpb": final["val_bpb"]})

    result = {
        "corpus": str(args.corpus),
        "budget_minutes": None if args.steps else args.minutes,
        "budget_steps": args.steps,
        "train_minutes": round(clock["train_s"] / 60, 2),
        "preset": dataclasses.asdict(preset.model)
        | {"name": preset.name, "train": dataclasses.asdict(preset.train)},
        "objective_mix": dataclasses.asdict(QUALITY.objective),
        "vocab_size": tokenizer.vocab_size,
        "params": summary["params"],
        "steps": summary["steps"],
        "tokens_seen": summary["tokens"],
        "final_loss": summary["final_loss"],
        "curve": curve,
        "final_val_bpb": final["val_bpb"],
        "xz_bpb": final["xz_bpb"],
        "unigram_bpb": final["unigram_bpb"],
        "char_gpt_bpb": 1.50,
        "val_bytes": final["val_bytes"],
        "val_docs": final["val_docs"],
        "cloze_acc": final["cloze_acc"],
        "unigram_cloze_acc": final["unigram_cloze_acc"],
        "beats_xz": final["val_bpb"] < final["xz_bpb"],
        "beats_char_gpt": final["val_bpb"] < 1.50,
        "data_prep_s": round(data_s, 1),
        "wall_s": round(time.perf_counter() - t0, 1),
    }
    args.results.mkdir(parents=True, exist_ok=True)
    out_json = args.results / f"quality-{tag}.json"
    out_json.write_text(json.dumps(result, indent=2) + "\n")
    plot(curve, final["xz_bpb"], args.results / f"quality-{tag}.png", f"GLM on KJV, {tag}")
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}, indent=2))


if __name__ == "__main__":
    main()
