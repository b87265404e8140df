"""Evaluation on the validation shards: bits per byte, span accuracy, cloze, baselines.

``evaluate(model_dir, manifest_path, cfg)`` loads a model package and scores the val split:

1. **Bits per byte with [gMASK]** (``val_bpb``). Each held-out document is scored left to
   right as Part B of document-level samples: the first window has Part A = ``[gMASK]``
   alone and Part B = ``<sop>`` + up to ``seq_len - 2`` tokens; later windows put the
   preceding ``context_frac`` of a window into Part A (``context + [gMASK]``) and score the
   next tokens, so every token is scored exactly once, with context. Total NLL in bits over
   the documents' UTF-8 bytes (``text_bytes`` in the shards), so tokenizers compare.
   ``<eop>`` is not scored: the bytes carry no document boundary.
2. **[MASK] / [sMASK] span accuracy**, teacher-forced per target token (``<eop>`` included),
   on sentence-aligned windows of val documents with the objective forced; plus the loss per
   objective and a greedy exact-span match on a fixed subset (``glm.generate.fill_blanks``
   fills the blanked text; a span counts when the generated text equals the original).
3. **Cloze** (``cloze_acc``), LAMBADA-style, from held-out sentences: the answer is the
   sentence's last word (Chinese: its last two characters before the final punctuation),
   the context is the document up to it (as much as fits). The preceding sentences are Part
   A (``context [gMASK]``); the sentence itself is the continuation in Part B, fed as
   ``<sop> head answer``, and the model must rank every answer token first (argmax). The
   head of the sentence sits in Part B rather than Part A because a small GLM reads a
   blank's first token off Part A only weakly (after 1,000 steps on the KJV it nearly always
   answered with its most common first token there: 0 of 400 items), while within Part B it
   is a plain left-to-right language model. The question stays "the last word, given all
   the text before it"; it is asked where the model's left-to-right skill lives.
4. **Baselines on the same bytes**: ``xz_bpb`` is xz (lzma preset 9 | EXTREME) conditional
   on the training text: ``bits(xz(train + val)) - bits(xz(train))`` over the val text's
   bytes, where the train text is the decoded train documents (the last
   ``xz_train_cap_bytes`` of it) and each text joins its documents with blank lines;
   ``unigram_bpb`` is an add-one smoothed unigram over the train token counts, and
   ``unigram_cloze_acc`` is its cloze accuracy (it always ranks the most frequent token first).

Everything is seeded, so two evaluations of one model give the same numbers. Writes
``eval.json`` (metrics + details) and ``samples.json`` (cloze and fill examples) into
``out_dir`` when given. The fault hook ``GLM_FAULT=kill@eval:N`` (see glm/train.py) fires
after the N-th scoring batch.
"""

from __future__ import annotations

import dataclasses
import logging
import lzma
import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from glm.atomic import write_json_atomic
from glm.config import ObjectiveConfig
from glm.data import split_windows
from glm.errors import IntegrityError
from glm.objectives import IGNORE_INDEX, Sample, SampleBuilder, SpecialIds, build_sample, collate
from glm.train import fault_point, resolve_device

log = logging.getLogger(__name__)

_FINAL_PUNCT = "。！？；：，、.!?;:,\"'”’」』）)》 \n\t"
_CJK = re.compile(r"[\u3400-\u9fff\uf900-\ufaff]")
_LAST_WORD = re.compile(r"([^\W\d_]+(?:['’][^\W\d_]+)?)\W*$")


@dataclass(frozen=True)
class EvalConfig:
    """What to score and how much of it (defaults fit the bundled sample in seconds)."""

    device: str = "auto"  # auto, cpu or cuda
    threads: int | None = None  # torch intra-op threads; None leaves torch's default
    seq_len: int | None = None  # window length; None: the model's max_seq_len
    batch_size: int = 16  # windows per forward pass
    context_frac: float = 0.5  # share of a long-document window that is context (Part A)
    max_docs: int | None = None  # cap on val documents for bpb; None scores them all
    span_windows: int = 64  # val windows per objective for teacher-forced span accuracy
    greedy_spans: int = 32  # spans per objective filled greedily (one blank per text)
    cloze_items: int = 400  # cloze questions drawn (seeded) from the val sentences
    xz_train_cap_bytes: int = 16 << 20  # xz context: the last this-many bytes of train text
    seed: int = 0  # fixes window choice, span sampling and cloze selection

    def __post_init__(self) -> None:
        if not 0.0 <= self.context_frac < 1.0:
            raise ValueError("context_frac: must be in [0, 1)")
        if self.batch_size < 1:
            raise ValueError("batch_size: must be >= 1")
        for name in ("span_windows", "greedy_spans", "cloze_items", "xz_train_cap_bytes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0")
        for name in ("threads", "seq_len", "max_docs"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1 or null")


# scoring ------------------------------------------------------------------------------------


@dataclass
class Scored:
    """Per-sample totals over the scored (target != -100) positions."""

    nll_nats: float
    tokens: int
    correct: int

    @property
    def all_correct(self) -> bool:
        return self.correct == self.tokens


class Scorer:
    """Runs batches of samples through the model; counts batches for the fault hook."""

    def __init__(self, model, pad_id: int, seq_len: int, batch_size: int, device, marker_dir):
        self.model = model
        self.pad_id = pad_id
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.device = device
        self.marker_dir = marker_dir
        self.batches = 0

    @torch.no_grad()
    def score(self, samples: list[Sample]) -> list[Scored]:
        out: list[Scored] = []
        for i in range(0, len(samples), self.batch_size):
            chunk = samples[i : i + self.batch_size]
            batch = {
                k: v.to(self.device) for k, v in collate(chunk, self.pad_id, self.seq_len).items()
            }
            logits, _ = self.model(
                batch["input_ids"],
                batch["position_ids"],
                batch["block_position_ids"],
                batch["sep"],
                batch["lengths"],
            )  # (B, T, V)
            targets = batch["targets"]
            keep = targets != IGNORE_INDEX
            safe = targets.clamp(min=0)
            nll = F.cross_entropy(logits.float().transpose(1, 2), safe, reduction="none")
            correct = (logits.argmax(-1) == targets) & keep
            nll = (nll * keep).sum(1).double().cpu()
            n = keep.sum(1).cpu()
            c = correct.sum(1).cpu()
            out.extend(Scored(float(a), int(b), int(d)) for a, b, d in zip(nll, n, c, strict=True))
            self.batches += 1
            fault_point("eval", self.batches, self.marker_dir)
        return out


def gmask_windows(
    tokens: np.ndarray, seq_len: int, context_frac: float, special: SpecialIds
) -> list[Sample]:
    """Document-level samples that score every token of ``tokens`` exactly once.

    Window 1: Part A = [gMASK], Part B = <sop> + the first ``seq_len - 2`` tokens. Each later
    window: Part A = the previous ``context`` tokens + [gMASK], Part B = the next ``stride``
    tokens, with context + stride = seq_len - 2. Only the document tokens are targets.
    """
    width = seq_len - 2  # room for [gMASK] and <sop>
    context = int(context_frac * width)
    stride = width - context
    rng = np.random.default_rng(0)  # one span: the order of Part B is fixed anyway
    samples = []
    pos = 0
    while pos < len(tokens):
        ctx = tokens[max(0, pos - context) : pos]
        end = min(len(tokens), pos + (width if pos == 0 else stride))
        window = np.concatenate([ctx, tokens[pos:end]])
        s = build_sample(
            window, [(len(ctx), len(window))], special.gmask, special.sop, special.eop, rng
        )
        s.targets[-1] = IGNORE_INDEX  # <eop>: not part of the text's bytes
        samples.append(s)
        pos = end
    return samples


def bits_per_byte(scorer: Scorer, docs: list, special: SpecialIds, context_frac: float) -> dict:
    """[gMASK] bits per byte over whole documents (see the module docstring, item 1)."""
    samples = [
        s
        for d in docs
        for s in gmask_windows(np.asarray(d.tokens), scorer.seq_len, context_frac, special)
    ]
    scored = scorer.score(samples)
    nats = sum(s.nll_nats for s in scored)
    tokens = sum(s.tokens for s in scored)
    n_bytes = sum(int(d.text_bytes) for d in docs)
    return {
        "val_bpb": nats / math.log(2) / n_bytes,
        "val_loss": nats / tokens,
        "val_tokens": tokens,
        "val_bytes": n_bytes,
        "val_docs": len(docs),
    }


# spans --------------------------------------------------------------------------------------


def _forced_builder(objective: str, seq_len: int, special: SpecialIds) -> SampleBuilder:
    probs = {"p_mask": 0.0, "p_smask": 0.0, "p_gmask": 0.0, f"p_{objective}": 1.0}
    return SampleBuilder(ObjectiveConfig(**probs), special, seq_len)


def _val_windows(docs: list, width: int) -> list[tuple[np.ndarray, np.ndarray]]:
    windows = []
    for d in docs:
        tokens, starts = np.asarray(d.tokens), np.asarray(d.sentence_starts)
        for s, e in split_windows(len(tokens), starts, width):
            rel = starts[(starts > s) & (starts < e)] - s
            windows.append((tokens[s:e], np.concatenate([[0], rel]).astype(np.int64)))
    return windows


def span_accuracy(scorer: Scorer, docs: list, special: SpecialIds, cfg: EvalConfig) -> dict:
    """Teacher-forced per-token accuracy and loss of [MASK] and [sMASK] spans."""
    windows = _val_windows(docs, int((scorer.seq_len - 2) / 1.1))
    pick = np.random.default_rng([cfg.seed, 1]).permutation(len(windows))[: cfg.span_windows]
    metrics: dict = {}
    samples_by_objective: dict[str, list[Sample]] = {}
    for k, objective in enumerate(("mask", "smask")):
        builder = _forced_builder(objective, scorer.seq_len, special)
        built = [
            builder.build(*windows[i], np.random.default_rng([cfg.seed, 2, k, int(i)]))
            for i in pick
        ]
        # too few sentences for [sMASK] makes the builder fall back to [MASK]: keep them apart
        built = [s for s in built if s.objective == objective]
        scored = scorer.score(built)
        tokens = sum(s.tokens for s in scored)
        metrics[f"{objective}_samples"] = len(built)
        metrics[f"{objective}_token_acc"] = (
            sum(s.correct for s in scored) / tokens if tokens else float("nan")
        )
        metrics[f"{objective}_loss"] = (
            sum(s.nll_nats for s in scored) / tokens if tokens else float("nan")
        )
        samples_by_objective[objective] = built
    return metrics, samples_by_objective


def restore_spans(sample: Sample, special: SpecialIds) -> tuple[list[int], list[tuple]]:
    """Put a sample's Part B spans back into Part A: (original tokens, span ranges in them)."""
    spans_by_position: dict[int, list[int]] = {}
    b = sample.sep
    while b < sample.length:  # each span: <sop> (block position 1) then its tokens
        start, b = b, b + 1
        while b < sample.length and sample.block_position_ids[b] != 1:
            b += 1
        spans_by_position[int(sample.position_ids[start])] = sample.input_ids[start + 1 : b]
    masks = (special.mask, special.smask, special.gmask)
    tokens: list[int] = []
    ranges = []
    for i, tok in enumerate(sample.input_ids[: sample.sep]):
        if int(tok) in masks:
            span = spans_by_position[i].tolist()
            ranges.append((len(tokens), len(tokens) + len(span)))
            tokens.extend(span)
        else:
            tokens.append(int(tok))
    return tokens, ranges


def greedy_exact_match(model, tokenizer, samples: dict, cfg: EvalConfig) -> tuple[dict, list]:
    """Share of spans that ``fill_blanks`` reproduces exactly, one blank per text.

    Each span of the first samples becomes its own question (the text with only that span
    blanked), up to ``cfg.greedy_spans`` per objective; a hit is a filled text equal to the
    original text.
    """
    from glm.generate import GenerationConfig, fill_blanks

    special = SpecialIds.from_tokenizer(tokenizer)
    metrics, examples = {}, []
    for objective, blank in (("mask", "[MASK]"), ("smask", "[sMASK]")):
        questions = []  # (blanked text, original text, span length)
        for sample in samples[objective]:
            tokens, ranges = restore_spans(sample, special)
            for s, e in ranges:
                before, span, after = (
                    tokenizer.decode(tokens[:s]),
                    tokenizer.decode(tokens[s:e]),
                    tokenizer.decode(tokens[e:]),
                )
                questions.append((before + blank + after, before + span + after, e - s))
        questions = questions[: cfg.greedy_spans]
        if not questions:
            metrics[f"{objective}_exact_match"] = float("nan")
            continue
        longest = max(n for _, _, n in questions)
        gen = GenerationConfig(max_new_tokens=longest + 8, temperature=0.0, seed=cfg.seed)
        filled = fill_blanks(model, tokenizer, [q for q, _, _ in questions], gen)
        hits = [f == original for f, (_, original, _) in zip(filled, questions, strict=True)]
        metrics[f"{objective}_exact_match"] = sum(hits) / len(hits)
        metrics[f"{objective}_exact_spans"] = len(hits)
        examples += [
            {"objective": objective, "input": q, "filled": f, "original": o}
            for (q, o, _), f in list(zip(questions, filled, strict=True))[:3]
        ]
    return metrics, examples


# cloze --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClozeItem:
    """One question: ``context`` (the preceding sentences: Part A before [gMASK]), ``head``
    (the sentence up to its last word: Part B, not scored) and the ``answer`` ids."""

    context: tuple[int, ...]
    head: tuple[int, ...]
    answer: tuple[int, ...]
    answer_text: str
    sentence: str


def split_answer(sentence: str) -> tuple[str, str] | None:
    """(text before the answer, answer) of a sentence, or None when it has no clear answer.

    English and other spaced scripts: the last word (letters, optionally with an apostrophe),
    at least two letters. Chinese: the last two CJK characters before the final punctuation.
    """
    core = sentence.rstrip(_FINAL_PUNCT)
    if len(core) < 3:
        return None
    if _CJK.match(core[-1]):
        if not (_CJK.match(core[-2]) and len(core) > 4):
            return None
        return core[:-2], core[-2:]
    m = _LAST_WORD.search(core)
    if m is None or len(m.group(1)) < 2 or m.start(1) < 8:
        return None
    return core[: m.start(1)], m.group(1)


def _tokens_for(tokenizer, prefix: str, answer: str) -> tuple[list[int], list[int]] | None:
    """Token ids of ``prefix`` and ``answer`` as they appear when the two are encoded together.

    The split must fall on a token boundary; a token that straddles it (rare with
    sentencepiece, whose pieces start at spaces) drops the item.
    """
    ids = tokenizer.encode(prefix + answer)
    for k in range(len(ids) - 1, 0, -1):
        head = tokenizer.decode(ids[:k])
        if len(head) <= len(prefix):
            if head.rstrip() == prefix.rstrip() and tokenizer.decode(ids[k:]).strip() == answer:
                return ids[:k], ids[k:]
            return None
    return None


def build_cloze(tokenizer, docs: list, seq_len: int, n_items: int, seed: int) -> list[ClozeItem]:
    """Seeded cloze questions from the val documents' sentences (see ``split_answer``)."""
    candidates = []
    for di, d in enumerate(docs):
        starts = list(np.asarray(d.sentence_starts)) + [len(d.tokens)]
        for si in range(len(starts) - 1):
            candidates.append((di, si, int(starts[si]), int(starts[si + 1])))
    order = np.random.default_rng([seed, 3]).permutation(len(candidates))
    items: list[ClozeItem] = []
    for idx in order:
        if len(items) >= n_items:
            break
        di, _, s, e = candidates[idx]
        tokens = np.asarray(docs[di].tokens)
        sentence = tokenizer.decode(tokens[s:e].tolist())
        parts = split_answer(sentence)
        if parts is None:
            continue
        pair = _tokens_for(tokenizer, parts[0], parts[1])
        if pair is None:
            continue
        head, answer = pair
        room = seq_len - len(head) - len(answer) - 3  # [gMASK], <sop> and one spare
        if room < 0 or not head:
            continue
        context = tokens[max(0, s - room) : s].tolist()
        items.append(ClozeItem(tuple(context), tuple(head), tuple(answer), parts[1], sentence))
    return items


def cloze_samples(items: list[ClozeItem], special: SpecialIds) -> list[Sample]:
    """``context [gMASK] | <sop> head answer``: only the answer tokens are targets."""
    rng = np.random.default_rng(0)
    samples = []
    for item in items:
        window = np.asarray(item.context + item.head + item.answer, dtype=np.int64)
        span = [(len(item.context), len(window))]
        s = build_sample(window, span, special.gmask, special.sop, special.eop, rng)
        # Part B targets are head + answer + <eop>; score the answer alone
        first_b = s.sep
        s.targets[first_b : first_b + len(item.head)] = IGNORE_INDEX
        s.targets[-1] = IGNORE_INDEX
        samples.append(s)
    return samples


# baselines ----------------------------------------------------------------------------------


def _joined_text(tokenizer, docs: Iterable) -> str:
    """The documents' text (decoded from the shards) joined with blank lines."""
    return "\n\n".join(tokenizer.decode(np.asarray(d.tokens).tolist()) for d in docs)


def xz_conditional_bpb(train_text: str, val_text: str, cap_bytes: int) -> dict:
    """Bits per byte of ``val_text`` for xz -9e primed with (the tail of) ``train_text``."""
    train = train_text.encode()[-cap_bytes:]
    val = val_text.encode()
    preset = 9 | lzma.PRESET_EXTREME
    t0 = time.perf_counter()
    base = len(lzma.compress(train, preset=preset))
    both = len(lzma.compress(train + b"\n\n" + val, preset=preset))
    return {
        "xz_bpb": 8 * (both - base) / len(val),
        "xz_val_bytes": len(val),
        "xz_train_bytes": len(train),
        "xz_seconds": round(time.perf_counter() - t0, 2),
    }


def unigram_log2_probs(train_tables, vocab_size: int) -> np.ndarray:
    """log2 of add-one smoothed unigram probabilities from the train shards' token counts."""
    counts = np.ones(vocab_size, dtype=np.float64)
    for table in train_tables:
        column = table.column("tokens")
        for chunk in column.chunks:
            values = chunk.values.to_numpy(zero_copy_only=False)
            counts += np.bincount(values, minlength=vocab_size)[:vocab_size]
    return np.log2(counts / counts.sum())


# the stage ----------------------------------------------------------------------------------


def evaluate(
    model_dir: str | Path,
    manifest_path: str | Path,
    cfg: EvalConfig | None = None,
    out_dir: str | Path | None = None,
) -> dict:
    """Score a model package on the val split; returns a flat dict of metrics.

    Writes ``eval.json`` (last) and ``samples.json`` into ``out_dir`` when given. Raises
    ``IntegrityError`` when the shards were tokenized with another tokenizer than the
    package's.
    """
    from glm.package import load_package
    from glm.shards import ShardReader

    cfg = cfg or EvalConfig()
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    model, tokenizer = load_package(model_dir, device=str(device))
    model.eval()
    reader = ShardReader(manifest_path)
    if reader.manifest.get("tokenizer_sha256") != tokenizer.sha256:
        raise IntegrityError(
            f"{manifest_path}: shards were tokenized with another tokenizer than {model_dir}'s"
        )
    reader.verify_or_raise()
    seq_len = min(cfg.seq_len or model.cfg.max_seq_len, model.cfg.max_seq_len)
    seq_len = min(seq_len, model.cfg.max_block_len)  # a whole Part B must fit block positions
    special = SpecialIds.from_tokenizer(tokenizer)
    marker_dir = out_dir if out_dir is not None else model_dir
    scorer = Scorer(model, tokenizer.pad_id, seq_len, cfg.batch_size, device, marker_dir)

    docs = list(reader.documents("val"))
    if not docs:
        raise IntegrityError(f"{manifest_path}: the val split has no documents")
    bpb_docs = docs[: cfg.max_docs] if cfg.max_docs else docs
    metrics: dict = {}

    # (1) language modelling: [gMASK] bits per byte
    metrics.update(bits_per_byte(scorer, bpb_docs, special, cfg.context_frac))

    # (2) [MASK] / [sMASK] spans: teacher-forced, then greedy on a subset
    span_metrics, span_samples = span_accuracy(scorer, docs, special, cfg)
    metrics.update(span_metrics)
    greedy, fill_examples = greedy_exact_match(model, tokenizer, span_samples, cfg)
    metrics.update(greedy)

    # (3) cloze: every answer token must be the argmax
    items = build_cloze(tokenizer, docs, seq_len, cfg.cloze_items, cfg.seed)
    cloze_scored = scorer.score(cloze_samples(items, special))
    metrics["cloze_items"] = len(items)
    metrics["cloze_acc"] = (
        sum(s.all_correct for s in cloze_scored) / len(items) if items else float("nan")
    )

    # (4) baselines on the same bytes
    log2p = unigram_log2_probs(reader.tables("train"), tokenizer.vocab_size)
    val_tokens = np.concatenate([np.asarray(d.tokens) for d in bpb_docs])
    metrics["unigram_bpb"] = float(-log2p[val_tokens].sum() / metrics["val_bytes"])
    top = int(np.argmax(log2p))
    metrics["unigram_cloze_acc"] = (
        sum(all(t == top for t in item.answer) for item in items) / len(items)
        if items
        else float("nan")
    )
    train_text = _joined_text(tokenizer, reader.documents("train"))
    metrics.update(
        xz_conditional_bpb(train_text, _joined_text(tokenizer, bpb_docs), cfg.xz_train_cap_bytes)
    )
    metrics["eval_seconds"] = round(time.perf_counter() - t0, 2)

    log.info(
        "val %.4f bpb (xz %.4f, unigram %.4f) | cloze %.3f (unigram %.3f) on %d items | "
        "[MASK] acc %.3f, [sMASK] acc %.3f | %.1f s",
        metrics["val_bpb"],
        metrics["xz_bpb"],
        metrics["unigram_bpb"],
        metrics["cloze_acc"],
        metrics["unigram_cloze_acc"],
        len(items),
        metrics["mask_token_acc"],
        metrics["smask_token_acc"],
        metrics["eval_seconds"],
    )
    if out_dir is not None:
        out_dir = Path(out_dir)
        cloze_examples = [
            {
                "sentence": item.sentence,
                "answer": item.answer_text,
                "correct": s.all_correct,
            }
            for item, s in list(zip(items, cloze_scored, strict=True))[:20]
        ]
        write_json_atomic(
            out_dir / "samples.json", {"cloze": cloze_examples, "fills": fill_examples}
        )
        report = {
            "metrics": metrics,
            "config": dataclasses.asdict(cfg),
            "model_dir": str(model_dir),
        }
        write_json_atomic(out_dir / "eval.json", report)
    return metrics
