"""Blank filling: every blank filled, consistent with a full forward, batched, never specials."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from glm.config import ModelConfig
from glm.errors import InputError
from glm.generate import GenerationConfig, fill_blank_ids, fill_blanks, next_tokens
from glm.model import GLM
from glm.tokenizer import Tokenizer

PAD, CLS, MASK, SMASK, GMASK, SOP, EOP = range(7)
SPECIALS = {"pad": PAD, "cls": CLS, "mask": MASK, "smask": SMASK, "gmask": GMASK}
SPECIALS |= {"sop": SOP, "eop": EOP}
BLANKS = (MASK, SMASK, GMASK)
CFG = ModelConfig(vocab_size=40, n_layer=2, n_head=2, d_model=32, max_seq_len=64, max_block_len=16)


def model(seed: int = 0, vocab_size: int = CFG.vocab_size) -> GLM:
    torch.manual_seed(seed)
    return GLM(replace(CFG, vocab_size=vocab_size)).eval()


@pytest.fixture(scope="module")
def tok(data_stages) -> Tokenizer:
    """The real sentencepiece tokenizer trained on the bundled corpus."""
    return Tokenizer.load(data_stages.tokenizer)


def scripted(m: GLM, script: list[int]) -> GLM:
    """Make ``m`` emit ``script`` one token per decode step (the transformer still runs)."""
    tokens = iter(script)
    real = m.output_logits

    def output_logits(h):
        logits = real(h)
        return logits.index_fill(-1, torch.tensor([next(tokens)]), 1e4)

    m.output_logits = output_logits
    return m


def generate(m, rows, **cfg):
    return fill_blank_ids(m, rows, BLANKS, SOP, EOP, GenerationConfig(**cfg), SPECIALS.values())


def test_every_blank_is_filled_and_each_span_stops_at_eop():
    m = scripted(model(), [10, 11, EOP, 12, EOP, EOP])
    [fills] = generate(m, [[8, MASK, 9, SMASK, 10, GMASK]], max_new_tokens=8)
    assert fills == [[10, 11], [12], []]


def test_span_stops_at_the_length_limit():
    m = scripted(model(), [10] * 3 + [11] * 3)
    assert generate(m, [[8, MASK, 9, MASK]], max_new_tokens=3) == [[[10, 10, 10], [11, 11, 11]]]


def test_special_tokens_are_never_generated():
    m = model()
    m.wte.weight.data[MASK] *= 50  # make [MASK] (and others) dominate the raw logits
    m.wte.weight.data[SOP] *= 50
    fills = generate(m, [[8, 9, MASK, 10, MASK]], max_new_tokens=6, temperature=1.0, seed=3)
    produced = [t for span in fills[0] for t in span]
    assert produced and not set(produced) & set(SPECIALS.values())


def test_greedy_fills_agree_with_a_full_forward_over_the_filled_sequence():
    """The KV-cached fill equals teacher forcing the fills through the whole model."""
    m = model(1)
    rows = [[8, 9, MASK, 11, 12, MASK, 13], [GMASK], [20, SMASK, 21]]
    limit = 5
    fills = generate(m, rows, max_new_tokens=limit)
    for row, row_fills in zip(rows, fills, strict=True):
        blanks = [i for i, t in enumerate(row) if t in BLANKS]
        ids, pos, blk, expected = list(row), list(range(len(row))), [0] * len(row), []
        for at, fill in zip(blanks, row_fills, strict=True):
            stopped = len(fill) < limit
            fed = [SOP, *fill] if stopped else [SOP, *fill[:-1]]
            ids += fed
            pos += [at] * len(fed)
            blk += list(range(1, len(fed) + 1))
            expected += [*fill, EOP] if stopped else fill
        n, sep = len(ids), len(row)
        args = [torch.tensor([x]) for x in (ids, pos, blk)] + [
            torch.tensor([sep]),
            torch.tensor([n]),
        ]
        logits, _ = m(*args)
        logits[0, :, [PAD, CLS, MASK, SMASK, GMASK, SOP]] = float("-inf")
        assert logits[0, sep:].argmax(-1).tolist() == expected


def test_batched_equals_unbatched_under_greedy():
    m = model(2)
    rows = [[8, MASK, 9, 10, MASK], [GMASK], [11, 12, 13, 14, SMASK, 15, 16, 17], [8, 9, 10]]
    batched = generate(m, rows, max_new_tokens=6)
    single = [generate(m, [row], max_new_tokens=6)[0] for row in rows]
    assert batched == single
    assert [len(f) for f in batched] == [2, 1, 1, 0]


def test_fill_blanks_returns_text_with_every_blank_replaced(tok):
    # a trained model fills "a [MASK]" with "▁cat": the space before a blank is the span's
    cat, dog = tok.encode(" cat"), tok.encode(" dog")
    m = scripted(model(vocab_size=tok.vocab_size), [*cat, tok.eop_id, *dog, tok.eop_id])
    cfg = GenerationConfig(max_new_tokens=4)
    [out] = fill_blanks(m, tok, ["a [MASK] and a [sMASK]."], cfg)
    assert out == "a cat and a dog."


def test_fill_blanks_output_has_no_specials_when_sampling(tok):
    texts = ["In the [MASK] was", "[gMASK]", "And [MASK] said [MASK].", "天[MASK]地"]
    cfg = GenerationConfig(max_new_tokens=5, temperature=1.5, top_k=10, top_p=0.9, seed=1)
    m = model(vocab_size=tok.vocab_size)
    out = fill_blanks(m, tok, texts, cfg)
    assert len(out) == len(texts)
    specials = ("[MASK]", "[sMASK]", "[gMASK]", "<sop>", "<eop>", "[PAD]", "[CLS]")
    for text, filled in zip(texts, out, strict=True):
        assert not any(s in filled for s in specials)
        assert filled.startswith(text.split("[")[0].rstrip(" "))
    assert out == fill_blanks(m, tok, texts, cfg)  # reproducible by seed


def test_sampling_filters():
    logits = torch.tensor([[0.0, 1.0, 5.0, 2.0]])
    gen = torch.Generator().manual_seed(0)
    assert next_tokens(logits, GenerationConfig(temperature=0), gen).item() == 2
    assert next_tokens(logits, GenerationConfig(temperature=5.0, top_k=1), gen).item() == 2
    # top_p=0.5 keeps only the most likely token here (its probability alone is ~0.93).
    picks = {next_tokens(logits, GenerationConfig(temperature=1.0, top_p=0.5), gen).item()}
    picks |= {next_tokens(logits, GenerationConfig(temperature=1.0, top_p=0.5), gen).item()}
    assert picks == {2}
    with pytest.raises(InputError, match="generation setting top_p"):
        GenerationConfig(top_p=0.0)
