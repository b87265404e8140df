"""The GLM: mask semantics by perturbation, padding, the loss fast path, KV cache, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from glm.config import ModelConfig, ObjectiveConfig, get_preset
from glm.model import GLM, count_params, dense_attention_mask, flops_per_token
from glm.objectives import SampleBuilder, SpecialIds, collate

KEYS = ("input_ids", "position_ids", "block_position_ids")
SPECIAL = SpecialIds(mask=1, smask=2, gmask=3, sop=4, eop=5)
TINY = ModelConfig(
    vocab_size=100, n_layer=2, n_head=2, d_model=32, max_seq_len=64, max_block_len=64
)


def tiny_model(seed: int = 0, **overrides) -> GLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**TINY.__dict__, **overrides})
    return GLM(cfg).eval()


def batch(seed: int = 0, size: int = 3, seq_len: int = 48, cfg=ObjectiveConfig()) -> dict:
    """A real collated batch of random documents of different lengths."""
    rng = np.random.default_rng(seed)
    builder = SampleBuilder(cfg, SPECIAL, seq_len)
    samples = []
    for _ in range(size):
        n = int(rng.integers(10, 60))
        samples.append(builder.build(rng.integers(10, 64, size=n), [0, n // 2], rng))
    return collate(samples, pad_id=0, seq_len=seq_len)


def run(model, b, **kw):
    keys = ("input_ids", "position_ids", "block_position_ids", "sep", "lengths")
    return model(*(b[k] for k in keys), **kw)


def test_mask_rule_on_a_small_case():
    mask = dense_attention_mask(torch.tensor([2]), torch.tensor([4]), 5)[0, 0].int()
    expected = [
        [1, 1, 0, 0, 0],  # Part A sees Part A only
        [1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0],  # Part B: Part A + itself and earlier
        [1, 1, 1, 1, 0],
        [1, 1, 1, 1, 1],  # padding query: valid keys and itself (never an empty row)
    ]
    assert mask.tolist() == expected


def test_changing_a_part_b_token_never_changes_earlier_logits():
    model = tiny_model()
    b = batch()
    base, _ = run(model, b)
    for i in range(3):
        sep, length = int(b["sep"][i]), int(b["lengths"][i])
        for j in range(sep, length):
            changed = {k: v.clone() for k, v in b.items()}
            changed["input_ids"][i, j] = (changed["input_ids"][i, j] + 7) % 64
            out, _ = run(model, changed)
            torch.testing.assert_close(out[i, :j], base[i, :j], rtol=0, atol=1e-6)
            assert not torch.allclose(out[i, j], base[i, j])


def test_changing_a_late_part_a_token_changes_early_part_a_logits():
    model = tiny_model()
    b = batch()
    base, _ = run(model, b)
    for i in range(3):
        sep = int(b["sep"][i])
        changed = {k: v.clone() for k, v in b.items()}
        changed["input_ids"][i, sep - 1] = (changed["input_ids"][i, sep - 1] + 7) % 64
        out, _ = run(model, changed)
        assert not torch.allclose(out[i, 0], base[i, 0])  # bidirectional within Part A
        assert not torch.allclose(out[i, sep:], base[i, sep:])  # Part B sees all of Part A


def test_padding_has_no_effect_on_valid_positions():
    model = tiny_model()
    b = batch(seq_len=48)
    wide = {k: v.clone() for k, v in b.items()}
    for key, fill in (("input_ids", 0), ("position_ids", 0), ("block_position_ids", 0)):
        wide[key] = torch.cat([b[key], torch.full((3, 16), fill)], dim=1)
    wide["targets"] = torch.cat([b["targets"], torch.full((3, 16), -100)], dim=1)
    noisy = {k: v.clone() for k, v in b.items()}
    for i, n in enumerate(b["lengths"].tolist()):
        noisy["input_ids"][i, n:] = torch.randint(6, 64, (48 - n,))
        noisy["position_ids"][i, n:] = torch.randint(0, 64, (48 - n,))
    a, loss_a = run(model, b, targets=b["targets"])
    c, loss_c = run(model, noisy, targets=b["targets"])
    w, loss_w = run(model, wide, targets=wide["targets"])
    assert torch.isfinite(a).all() and torch.isfinite(c).all()
    for i, n in enumerate(b["lengths"].tolist()):
        torch.testing.assert_close(c[i, :n], a[i, :n])
        torch.testing.assert_close(w[i, :n], a[i, :n])
    torch.testing.assert_close(loss_c, loss_a)
    torch.testing.assert_close(loss_w, loss_a)


def test_loss_logits_equal_all_logits_at_loss_positions():
    model = tiny_model()
    b = batch()
    full, loss_full = run(model, b, targets=b["targets"])
    part, loss_part = run(model, b, targets=b["targets"], logits="loss")
    keep = b["targets"] != -100
    assert part.shape == (int(keep.sum()), 100)
    torch.testing.assert_close(part, full[keep])
    torch.testing.assert_close(loss_part, loss_full)


def test_kv_cache_decode_equals_full_forward():
    model = tiny_model()
    b = batch(size=3)
    full, _ = run(model, b)
    seps, lengths = b["sep"], b["lengths"]
    part_a_len = int(seps.max())
    part_a = torch.zeros(3, part_a_len, dtype=torch.long)
    for i, s in enumerate(seps.tolist()):
        part_a[i, :s] = b["input_ids"][i, :s]
    steps = int((lengths - seps).max())
    _, cache = model.prefill(part_a, seps, capacity=part_a_len + steps)
    for t in range(steps):
        idx = torch.clamp(seps + t, max=47).view(-1, 1)
        active = seps + t < lengths
        ids, pos, blk = (b[k].gather(1, idx).squeeze(1) for k in KEYS)
        logits = model.decode_step(ids, pos, blk, cache, active)
        for i in range(3):
            if active[i]:
                torch.testing.assert_close(logits[i], full[i, idx[i, 0]], rtol=1e-4, atol=1e-5)


def test_tiny_model_overfits_a_small_batch():
    torch.manual_seed(0)
    model = GLM(TINY).train()
    b = batch(size=2, seq_len=48)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(60):
        _, loss = run(model, b, targets=b["targets"], logits="loss")
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05


def test_preset_sizes():
    small = get_preset("small").model
    assert small.vocab_size == 8000
    assert 20e6 <= count_params(small, non_embedding=False) <= 30e6
    base = get_preset("base").model
    assert (base.n_layer, base.d_model, base.n_head) == (12, 768, 12)
    assert count_params(base) == 12 * (12 * 768 * 768 + 13 * 768) + 2 * 768  # ~85 M
    tiny = GLM(TINY)
    assert tiny.num_params() == count_params(TINY)
    assert tiny.num_params(non_embedding=False) == count_params(TINY, non_embedding=False)


def test_flops_per_token_formula():
    n = count_params(TINY) + 100 * 32
    assert flops_per_token(TINY, 48) == 6 * n + 12 * 2 * 32 * 48


def test_output_projection_is_tied_to_the_input_embedding():
    model = tiny_model()
    vocab_tables = [k for k, v in model.state_dict().items() if v.shape == (100, 32)]
    assert vocab_tables == ["wte.weight"]
    captured = {}
    model.ln_f.register_forward_hook(lambda mod, inp, out: captured.setdefault("h", out))
    b = batch()
    out, _ = run(model, b)
    torch.testing.assert_close(out, captured["h"] @ model.wte.weight.T)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention path needs CUDA")
def test_flex_attention_matches_sdpa_on_cuda():
    model = tiny_model(max_seq_len=256, max_block_len=256).cuda()
    b = {k: v.cuda() for k, v in batch(size=4, seq_len=256).items()}
    model.attention = "sdpa"
    with torch.autocast("cuda", dtype=torch.bfloat16):
        ref, _ = run(model, b)
        model.attention = "flex"
        out, _ = run(model, b)
    for i, n in enumerate(b["lengths"].tolist()):
        torch.testing.assert_close(out[i, :n].float(), ref[i, :n].float(), rtol=2e-2, atol=2e-2)
