"""The tokenizer stage: a sentencepiece model trained on the split sentences, and its wrapper.

Choices, and why:

- GLM's special tokens are sentencepiece *control symbols*: each has exactly one id and the
  encoder never produces them from text, so ``[MASK]`` or ``<eop>`` written in the corpus is
  tokenized as plain text and data can never inject a control token. A blank a user writes
  on purpose is parsed by ``Tokenizer.encode_with_blanks``.
- ``byte_fallback``: a character outside the vocabulary becomes its UTF-8 bytes, never
  ``<unk>``.
- identity normalisation, no dummy prefix, no whitespace folding: the split stage already
  normalised the text, and ``decode(encode(s)) == s`` must hold exactly.
- digits are split into single pieces so numbers do not eat vocabulary.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import sentencepiece as spm

from glm.atomic import atomic_dir, write_json_atomic
from glm.digest import sha256_file
from glm.errors import InputError, IntegrityError
from glm.split import sentence_batches

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPECIAL_TOKENS = ("[PAD]", "[CLS]", "[MASK]", "[sMASK]", "[gMASK]", "<sop>", "<eop>")
BLANK_TOKENS = ("[MASK]", "[sMASK]", "[gMASK]")
_BLANK_RE = re.compile("(" + "|".join(re.escape(t) for t in BLANK_TOKENS) + ")")
_TOO_SMALL = re.compile(r"Vocabulary size is smaller than required_chars\. (\d+) vs (\d+)")
_TOO_HIGH = re.compile(r"Vocabulary size too high \((\d+)\)\. Please set it to a value <= (\d+)")
# sentencepiece drops longer training sentences; the split stage caps them far below this
_MAX_SENTENCE_BYTES = 16384


@dataclass
class TokenizerConfig:
    """Settings of the sentencepiece training."""

    # target vocabulary size, clamped (with a warning) to what the corpus supports
    vocab_size: int = 8000
    # "unigram" (the default of T5/GLM-style models) or "bpe"
    model_type: str = "unigram"
    # at most this many sentences are sampled (seeded) for training: training memory stops
    # growing with the corpus here (about 250 MB of peak RSS for 100k sentences)
    input_sentence_size: int = 100_000
    # seed of the sentence sampling, so training is reproducible
    seed: int = 0
    # fraction of characters covered by the vocabulary; the rest fall back to bytes
    character_coverage: float = 0.9995
    # training threads; 0 means one per CPU core
    num_threads: int = 0

    def __post_init__(self) -> None:
        if self.model_type not in ("unigram", "bpe"):
            raise InputError(f"model_type must be unigram or bpe, not {self.model_type!r}")
        if self.vocab_size < 300:
            # 256 byte pieces + 7 specials + <unk> leave nothing to learn below this
            raise InputError(f"vocab_size must be >= 300, not {self.vocab_size}")
        if self.input_sentence_size < 1:
            raise InputError(f"input_sentence_size must be >= 1, not {self.input_sentence_size}")
        if not 0.9 <= self.character_coverage <= 1.0:
            raise InputError(
                f"character_coverage must be in [0.9, 1], not {self.character_coverage}"
            )
        if self.num_threads < 0:
            raise InputError(f"num_threads must be >= 0, not {self.num_threads}")


def _sentences(sentences_dir: Path) -> Iterator[str]:
    for batch in sentence_batches(sentences_dir):
        for text in batch.column("text").to_pylist():
            # sentencepiece reads one sentence a line: a trailing newline belongs to no piece
            text = text.rstrip("\n")
            if text:
                yield text


def _train(sentences_dir: Path, cfg: TokenizerConfig, vocab_size: int) -> bytes:
    model = io.BytesIO()
    spm.set_random_generator_seed(cfg.seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=_sentences(sentences_dir),
        model_writer=model,
        model_type=cfg.model_type,
        vocab_size=vocab_size,
        character_coverage=cfg.character_coverage,
        input_sentence_size=cfg.input_sentence_size,
        shuffle_input_sentence=True,
        max_sentence_length=_MAX_SENTENCE_BYTES,
        num_threads=cfg.num_threads or os.cpu_count() or 1,
        byte_fallback=True,
        normalization_rule_name="identity",
        add_dummy_prefix=False,
        remove_extra_whitespaces=False,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        unk_id=0,
        bos_id=-1,
        eos_id=-1,
        pad_id=-1,
        control_symbols=list(SPECIAL_TOKENS),
        minloglevel=2,
    )
    return model.getvalue()


def train_tokenizer(sentences_dir: str | Path, out_dir: str | Path, cfg: TokenizerConfig) -> dict:
    """Train sentencepiece on a split stage's sentences; write spm.model, spm.vocab and
    tokenizer.json (last). Returns the tokenizer.json content.

    A vocabulary larger than the corpus supports is clamped to the largest size
    sentencepiece accepts, with a warning.
    """
    sentences_dir = Path(sentences_dir)
    t0 = time.perf_counter()
    vocab_size = cfg.vocab_size
    try:
        model = _train(sentences_dir, cfg, vocab_size)
    except RuntimeError as e:
        small = _TOO_SMALL.search(str(e))
        if small:
            raise InputError(
                f"vocab_size {cfg.vocab_size} is smaller than the {small.group(2)} pieces needed "
                f"for character_coverage {cfg.character_coverage}; raise vocab_size or lower "
                "character_coverage"
            ) from None
        m = _TOO_HIGH.search(str(e))
        if not m:
            raise
        vocab_size = int(m.group(2))
        log.warning(
            "vocab_size %d is more than this corpus supports; clamped to %d",
            cfg.vocab_size,
            vocab_size,
        )
        model = _train(sentences_dir, cfg, vocab_size)
    seconds = time.perf_counter() - t0

    with atomic_dir(out_dir) as tmp:
        (tmp / "spm.model").write_bytes(model)
        sp = spm.SentencePieceProcessor(model_proto=model)
        with open(tmp / "spm.vocab", "w", encoding="utf-8") as f:
            for i in range(sp.get_piece_size()):
                f.write(f"{sp.id_to_piece(i)}\t{sp.get_score(i)}\n")
        info = {
            "format_version": FORMAT_VERSION,
            "vocab_size": sp.get_piece_size(),
            "requested_vocab_size": cfg.vocab_size,
            "clamped": vocab_size != cfg.vocab_size,
            "special_ids": {t: sp.piece_to_id(t) for t in SPECIAL_TOKENS},
            "unk_id": sp.unk_id(),
            "sha256": sha256_file(tmp / "spm.model"),
            "config": asdict(cfg),
        }
        write_json_atomic(tmp / "tokenizer.json", info)
    log.info(
        "trained a %s tokenizer of %d pieces in %.1f s (requested %d)",
        cfg.model_type,
        info["vocab_size"],
        seconds,
        cfg.vocab_size,
    )
    return info


class Tokenizer:
    """A trained sentencepiece model with GLM's special tokens.

    ``encode`` never produces a special id; ``encode_with_blanks`` turns blanks a user wrote
    (``[MASK]``, ``[sMASK]``, ``[gMASK]``) into their single ids; ``decode`` drops every
    special id. ``sha256`` is the digest of ``spm.model``, recorded wherever the tokenizer
    is shipped so drift is detected.
    """

    def __init__(self, model_path: str | Path, sha256: str | None = None):
        model_path = Path(model_path)
        if not model_path.is_file():
            raise IntegrityError(f"{model_path}: tokenizer model missing")
        self.sha256 = sha256_file(model_path)
        if sha256 is not None and sha256 != self.sha256:
            raise IntegrityError(
                f"{model_path}: sha256 {self.sha256[:12]} does not match the recorded {sha256[:12]}"
            )
        self.sp = spm.SentencePieceProcessor(model_file=str(model_path))
        self.vocab_size = self.sp.get_piece_size()
        self.special_ids = {t: self.sp.piece_to_id(t) for t in SPECIAL_TOKENS}
        for token, i in self.special_ids.items():
            if i == self.sp.unk_id():
                raise IntegrityError(f"{model_path}: special token {token} has no id")
        self.pad_id = self.special_ids["[PAD]"]
        self.cls_id = self.special_ids["[CLS]"]
        self.mask_id = self.special_ids["[MASK]"]
        self.smask_id = self.special_ids["[sMASK]"]
        self.gmask_id = self.special_ids["[gMASK]"]
        self.sop_id = self.special_ids["<sop>"]
        self.eop_id = self.special_ids["<eop>"]
        self._special = frozenset(self.special_ids.values())

    @classmethod
    def load(cls, directory: str | Path) -> Tokenizer:
        """Load a tokenizer directory, checking spm.model against tokenizer.json's sha256."""
        directory = Path(directory)
        meta_path = directory / "tokenizer.json"
        if not meta_path.is_file():
            raise IntegrityError(f"{meta_path}: missing; the tokenizer stage did not finish")
        meta = json.loads(meta_path.read_text())
        return cls(directory / "spm.model", sha256=meta.get("sha256"))

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; special-token strings in it are plain text."""
        return self.sp.encode(text)

    def encode_batch(self, texts: list[str], num_threads: int = 0) -> list[list[int]]:
        """Token ids of many texts, encoded by ``num_threads`` threads (0: all cores)."""
        return self.sp.encode(list(texts), num_threads=num_threads or os.cpu_count() or 1)

    def encode_with_blanks(self, text: str) -> list[int]:
        """Like ``encode``, but ``[MASK]``, ``[sMASK]`` and ``[gMASK]`` become their ids.

        The space before a blank goes with the blank, as it does in training: a masked word
        takes its leading ``▁`` with it, so "the [MASK] and" is ``▁the [MASK] ▁and``, never
        ``▁the ▁ [MASK]`` (a lone ``▁`` before a blank is something the model never saw).
        """
        parts = _BLANK_RE.split(text)
        ids: list[int] = []
        for i, part in enumerate(parts):
            if part in BLANK_TOKENS:
                ids.append(self.special_ids[part])
                continue
            if i + 1 < len(parts) and parts[i + 1] in BLANK_TOKENS and part.endswith(" "):
                part = part[:-1]
            if part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids) -> str:
        """Text of ``ids``, special ids dropped."""
        return self.sp.decode([int(i) for i in ids if int(i) not in self._special])
