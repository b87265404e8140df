"""Model packages: round trip, and loud failures on missing, corrupt or mismatched files."""

from __future__ import annotations

import json

import pytest
import torch

from glm.config import ModelConfig
from glm.errors import IntegrityError
from glm.model import GLM
from glm.package import load_model, read_config, save_package

CFG = ModelConfig(vocab_size=50, n_layer=1, n_head=2, d_model=16, max_seq_len=32, max_block_len=32)


@pytest.fixture
def tokenizer_dir(tmp_path):
    """Stand-in tokenizer files: packaging copies and hashes them, it does not parse them."""
    d = tmp_path / "tok"
    d.mkdir()
    (d / "spm.model").write_bytes(b"sentencepiece model bytes")
    (d / "spm.vocab").write_text("a\t0\n")
    (d / "tokenizer.json").write_text("{}")
    (d / "unrelated.tmp").write_text("not shipped")
    return d


def saved(tmp_path, tokenizer_dir):
    torch.manual_seed(0)
    model = GLM(CFG)
    save_package(model, tokenizer_dir, tmp_path / "pkg", extra={"preset": "tiny", "step": 7})
    return model, tmp_path / "pkg"


def test_round_trip_keeps_weights_config_and_tokenizer(tmp_path, tokenizer_dir):
    model, pkg = saved(tmp_path, tokenizer_dir)
    loaded = load_model(pkg)
    assert loaded.cfg == CFG and not loaded.training
    for (name, a), (_, b) in zip(
        model.state_dict().items(), loaded.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    config = read_config(pkg)
    assert config["preset"] == "tiny" and config["step"] == 7
    assert sorted(p.name for p in (pkg / "tokenizer").iterdir()) == [
        "spm.model",
        "spm.vocab",
        "tokenizer.json",
    ]


def test_missing_weights_is_an_error_not_a_fresh_model(tmp_path, tokenizer_dir):
    _, pkg = saved(tmp_path, tokenizer_dir)
    (pkg / "model.safetensors").unlink()
    with pytest.raises(IntegrityError, match="model.safetensors"):
        load_model(pkg)


def test_corrupt_weights_are_detected(tmp_path, tokenizer_dir):
    _, pkg = saved(tmp_path, tokenizer_dir)
    data = bytearray((pkg / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (pkg / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256"):
        load_model(pkg)


def test_missing_or_broken_config_is_named(tmp_path, tokenizer_dir):
    _, pkg = saved(tmp_path, tokenizer_dir)
    (pkg / "config.json").write_text("{not json")
    with pytest.raises(IntegrityError, match="config.json"):
        load_model(pkg)
    (pkg / "config.json").unlink()
    with pytest.raises(IntegrityError, match="config.json"):
        load_model(pkg)


def test_missing_tokenizer_file_refuses_to_save(tmp_path, tokenizer_dir):
    (tokenizer_dir / "spm.model").unlink()
    with pytest.raises(IntegrityError, match="spm.model"):
        save_package(GLM(CFG), tokenizer_dir, tmp_path / "pkg")
    assert not (tmp_path / "pkg").exists()


def test_load_package_refuses_a_swapped_tokenizer(tmp_path, tokenizer_dir):
    pytest.importorskip("glm.tokenizer")
    from glm.package import load_package

    _, pkg = saved(tmp_path, tokenizer_dir)
    (pkg / "tokenizer" / "spm.model").write_bytes(b"another tokenizer")
    with pytest.raises(IntegrityError, match="spm.model"):
        load_package(pkg)
    config = json.loads((pkg / "config.json").read_text())
    assert config["tokenizer_sha256"] != "" and config["weights_sha256"] != ""
