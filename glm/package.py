"""Model packages: weights, config and the exact tokenizer, in one directory, verified on load.

A package is what training hands to evaluation, generation and MLflow::

    model.safetensors   the weights (the output layer is tied to ``wte``, stored once)
    config.json         {"format_version", "model": ModelConfig fields, "preset",
                         "weights_sha256", "tokenizer_sha256", ...extra}
    tokenizer/          spm.model, spm.vocab, tokenizer.json: a copy of the training tokenizer

Two failures the reference GLM let users hit are errors here: a missing or corrupt weights
file never yields a freshly initialised model, and a tokenizer whose sentencepiece model is
not the one the weights were trained with is refused (tokenizer drift).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from glm.atomic import atomic_dir
from glm.config import ModelConfig, from_dict
from glm.digest import sha256_file
from glm.errors import IntegrityError
from glm.model import GLM

FORMAT_VERSION = 1
WEIGHTS = "model.safetensors"
CONFIG = "config.json"
TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILES = ("spm.model", "spm.vocab", "tokenizer.json")


def save_package(model: GLM, tokenizer_dir: str | Path, out_dir: str | Path, extra=None) -> dict:
    """Write ``model`` and a copy of the tokenizer at ``tokenizer_dir`` into ``out_dir``.

    The directory appears atomically (built under a temporary name, renamed on success) and
    ``config.json`` records the sha256 of the weights and of ``spm.model``. ``extra`` (e.g.
    ``{"preset": "small", "step": 300}``) is merged into ``config.json``. Returns the config.
    """
    tokenizer_dir = Path(tokenizer_dir)
    for name in TOKENIZER_FILES:
        if not (tokenizer_dir / name).is_file():
            raise IntegrityError(f"tokenizer file missing: {tokenizer_dir / name}")
    # Contiguous CPU copies: safetensors stores plain buffers and the package is device-free.
    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    with atomic_dir(out_dir) as tmp:
        save_file(state, str(tmp / WEIGHTS), metadata={"format": "pt"})
        shutil.copytree(tokenizer_dir, tmp / TOKENIZER_DIR, ignore=_only(TOKENIZER_FILES))
        config = {
            "format_version": FORMAT_VERSION,
            "preset": None,
            **(extra or {}),
            "model": dataclasses.asdict(model.cfg),
            "weights_sha256": sha256_file(tmp / WEIGHTS),
            "tokenizer_sha256": sha256_file(tmp / TOKENIZER_DIR / "spm.model"),
        }
        (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return config


def _only(names):
    keep = set(names)
    return lambda _dir, entries: [e for e in entries if e not in keep]


def read_config(package_dir: str | Path) -> dict:
    """The package's ``config.json``; IntegrityError naming the file if missing or unreadable."""
    path = Path(package_dir) / CONFIG
    try:
        config = json.loads(path.read_text())
    except FileNotFoundError:
        raise IntegrityError(f"model package is missing {path}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise IntegrityError(f"{path}: not valid JSON ({err})") from None
    if config.get("format_version") != FORMAT_VERSION or "model" not in config:
        raise IntegrityError(f"{path}: not a version-{FORMAT_VERSION} model package config")
    return config


def load_model(package_dir: str | Path, device: str | torch.device = "cpu") -> GLM:
    """The package's GLM in eval mode, after checking the weights file against its digest."""
    package_dir = Path(package_dir)
    config = read_config(package_dir)
    weights = package_dir / WEIGHTS
    if not weights.is_file():
        raise IntegrityError(f"model package is missing {weights}")
    if sha256_file(weights) != config.get("weights_sha256"):
        raise IntegrityError(f"{weights}: sha256 does not match config.json (corrupt or replaced)")
    try:
        cfg = from_dict(ModelConfig, config["model"])
    except (TypeError, ValueError) as err:
        raise IntegrityError(f"{package_dir / CONFIG}: bad model config ({err})") from None
    model = GLM(cfg)
    try:
        model.load_state_dict(load_file(str(weights)), strict=True)
    except (RuntimeError, OSError) as err:  # wrong shapes or names, truncated file
        raise IntegrityError(f"{weights}: does not hold this model's weights ({err})") from None
    return model.to(device).eval()


def load_package(package_dir: str | Path, device: str | torch.device = "cpu"):
    """``(GLM, Tokenizer)`` from a package; refuses a tokenizer other than the recorded one."""
    from glm.tokenizer import Tokenizer  # sentencepiece is only needed once a package is loaded

    package_dir = Path(package_dir)
    config = read_config(package_dir)
    tok_dir = package_dir / TOKENIZER_DIR
    spm = tok_dir / "spm.model"
    if not spm.is_file():
        raise IntegrityError(f"model package is missing {spm}")
    if sha256_file(spm) != config.get("tokenizer_sha256"):
        raise IntegrityError(
            f"{spm}: sha256 differs from the tokenizer the model was trained with (config.json)"
        )
    model = load_model(package_dir, device)
    tokenizer = Tokenizer.load(tok_dir)
    if tokenizer.vocab_size != model.cfg.vocab_size:
        raise IntegrityError(
            f"{tok_dir}: vocab size {tokenizer.vocab_size} != model's {model.cfg.vocab_size}"
        )
    return model, tokenizer
