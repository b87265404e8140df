"""Pipeline parameters: one pydantic model, validated before any stage runs.

A config file (YAML or TOML) has the same shape as ``PipelineParams``: top-level fields
(``corpus``, ``preset``, ``max_steps``, ...) and one table per stage whose keys override that
stage's dataclass defaults::

    preset: small
    corpus: [data/*.jsonl]
    tokenizer: {vocab_size: 4000}
    train: {max_steps: 200, batch_size: 8}

Every stage table is checked against its dataclass here, so an unknown key or a bad value
fails with the field named (``tokenizer.vocab_size: must be positive``) before the flow starts.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import tomllib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from flows.workspace import STAGES
from glm.config import PRESETS, Preset, from_dict, get_preset
from glm.errors import InputError

Stage = Literal["split", "tokenizer", "shard", "train", "evaluate", "register"]
SECTIONS = ("split", "tokenizer", "shard", "model", "train", "objective", "eval")


def _config_class(section: str) -> type:
    """A stage's config dataclass, imported late: each lives in its own stage module."""
    module, name = {
        "split": ("glm.split", "SplitConfig"),
        "tokenizer": ("glm.tokenizer", "TokenizerConfig"),
        "shard": ("glm.shards", "ShardConfig"),
        "eval": ("glm.evaluate", "EvalConfig"),
    }[section]
    return getattr(importlib.import_module(module), name)


class PipelineParams(BaseModel):
    """Everything a pipeline run depends on. Same parameters + same corpus = same outputs."""

    model_config = ConfigDict(extra="forbid")

    corpus: list[str] = Field(min_length=1, description="files, directories or globs")
    workspace: str = Field("workspace", description="where every piece of state lives")
    preset: str = Field("small", description="named model/train bundle: tiny, small, base")
    max_steps: int | None = Field(None, gt=0, description="training budget; preset's if unset")
    seed: int | None = Field(None, description="training seed (init, data order, spans)")
    on_decode_error: Literal["error", "replace", "skip"] | None = None
    device: str = Field("auto", description="auto, cpu, cuda or cuda:N")
    model_name: str = Field("glm", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    experiment_name: str = "glm"
    tracking_uri: str | None = Field(None, description="MLflow; default WORKSPACE/mlflow.db")
    until: Stage = Field("register", description="last stage to run")
    force: list[Stage] = Field(default_factory=list, description="rerun these and downstream")
    retries: int = Field(2, ge=0, le=10, description="task retries after a transient failure")
    retry_backoff_s: float = Field(10.0, ge=0, description="first retry delay; doubles after")
    split: dict[str, Any] = Field(default_factory=dict)
    tokenizer: dict[str, Any] = Field(default_factory=dict)
    shard: dict[str, Any] = Field(default_factory=dict)
    model: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    objective: dict[str, Any] = Field(default_factory=dict)
    eval: dict[str, Any] = Field(default_factory=dict)

    @field_validator("preset")
    @classmethod
    def _known_preset(cls, name: str) -> str:
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return name

    @field_validator("device")
    @classmethod
    def _known_device(cls, device: str) -> str:
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", device):
            raise ValueError(f"must be auto, cpu, cuda or cuda:N, not {device!r}")
        return device

    @field_validator("corpus", mode="before")
    @classmethod
    def _one_path_is_a_list(cls, specs: Any) -> Any:
        # `corpus: data/bible.txt` in a config file means the one-item list
        return [specs] if isinstance(specs, str) else specs

    @field_validator("corpus")
    @classmethod
    def _no_blank_paths(cls, specs: list[str]) -> list[str]:
        if any(not s.strip() for s in specs):
            raise ValueError("empty corpus path")
        return specs

    @model_validator(mode="after")
    def _stage_configs_valid(self) -> PipelineParams:
        # Build every stage config now: a typo in a config file must not surface as a crash
        # in the fourth stage twenty minutes later.
        self.resolved_preset()
        for section in ("split", "tokenizer", "shard", "eval"):
            try:
                self.stage_config(section)
            except (TypeError, ValueError, InputError) as err:
                raise ValueError(f"{section}.{_strip_class(err)}") from None
        return self

    def stage_config(self, section: str):
        """The dataclass for one config section, with this run's overrides applied."""
        if section in ("model", "train", "objective"):
            return getattr(self.resolved_preset(), section)
        overrides = dict(getattr(self, section))
        if section == "split" and self.on_decode_error is not None:
            overrides["on_decode_error"] = self.on_decode_error
        return from_dict(_config_class(section), overrides)

    def resolved_preset(self) -> Preset:
        """The named preset with the ``model``/``train``/``objective`` tables and flags applied."""
        base = get_preset(self.preset)
        train = dict(self.train)
        if self.max_steps is not None:
            train["max_steps"] = self.max_steps
        if self.seed is not None:
            train["seed"] = self.seed
        parts = {}
        for section, current in (
            ("model", base.model),
            ("train", base.train),
            ("objective", base.objective),
        ):
            overrides = train if section == "train" else getattr(self, section)
            merged = {**dataclasses.asdict(current), **overrides}
            try:
                parts[section] = from_dict(type(current), merged)
            except (TypeError, ValueError) as err:
                raise ValueError(f"{section}.{_strip_class(err)}") from None
        return dataclasses.replace(base, **parts)

    def forced(self, stage: str) -> bool:
        """True when ``stage`` or anything upstream of it was named in ``--force``."""
        return any(STAGES.index(f) <= STAGES.index(stage) for f in self.force)


def _strip_class(err: Exception) -> str:
    # from_dict says "TokenizerConfig: x: unknown setting; known: ..."; __post_init__ says
    # "vocab_size: must be positive". Either way the section prefix names the table.
    msg = str(err)
    return re.sub(r"^[A-Z]\w*Config: ", "", msg) if msg else type(err).__name__


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML (.yaml/.yml) or TOML (.toml) config file into a dict of parameters."""
    path = Path(path)
    if not path.is_file():
        raise InputError("config file does not exist", path)
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text) or {}
        elif path.suffix == ".toml":
            data = tomllib.loads(text)
        else:
            raise InputError("config file must end in .yaml, .yml or .toml", path)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"line {mark.line + 1}" if mark else None
        raise InputError(f"invalid YAML: {getattr(err, 'problem', err)}", path, where) from None
    except tomllib.TOMLDecodeError as err:
        raise InputError(f"invalid TOML: {err}", path) from None
    if not isinstance(data, dict):
        raise InputError("config file must hold a mapping of parameters", path)
    return data


def describe_validation_error(err) -> str:
    """One line per pydantic error, each naming the parameter: ``max_steps: must be > 0``."""
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"])
        msg = e["msg"].removeprefix("Value error, ")
        lines.append(f"{field}: {msg}" if field else msg)
    return "; ".join(lines)
