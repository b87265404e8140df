"""Stage keys: what each stage's output depends on, as one content digest per stage.

``key(stage) = sha256(upstream keys, the stage's own config, the source of the stage's own
glm modules)``; the split stage's upstream is the corpus itself (each file's path and
sha256). The chain means a change anywhere reruns that stage and everything after it and
nothing before it, and the source digest (not the git commit) keeps unrelated commits from
invalidating every cache.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
from dataclasses import dataclass

from flows.params import PipelineParams
from glm.digest import sha256_file, sha256_json, source_digest

# The glm modules whose code decides each stage's output.
STAGE_MODULES = {
    "split": ("glm.corpus", "glm.sentences", "glm.split"),
    "tokenizer": ("glm.tokenizer",),
    "shard": ("glm.shards",),
    "train": ("glm.train", "glm.data", "glm.model", "glm.objectives", "glm.package"),
    "evaluate": ("glm.evaluate", "glm.generate"),
}


# The file each stage writes last: a directory without it is incomplete by definition.
COMPLETE_MARKER = {
    "split": "stats.json",
    "tokenizer": "tokenizer.json",
    "shard": "manifest.json",
    "train": "train.json",
    "evaluate": "eval.json",
}


@dataclass(frozen=True)
class StagePlan:
    """Keys and configs for one run, computed before any stage runs."""

    corpus_specs: list[str]  # the --corpus specs, made absolute (tasks may run elsewhere)
    corpus_files: list[dict]  # [{"path", "rel", "sha256"}] of every resolved corpus file
    configs: dict[str, dict]  # stage -> the config dict its task receives
    keys: dict[str, str]  # stage -> content key (its directory name under stages/)


def code_version(stage: str) -> str:
    """Digest of the source of the modules that implement ``stage``."""
    return source_digest(importlib.import_module(m) for m in STAGE_MODULES[stage])


def plan_stages(params: PipelineParams, corpus_files: list) -> StagePlan:
    """Build every stage's key from the corpus digests, the configs and the code."""
    files = [
        {"path": str(f.path), "rel": f.rel, "sha256": sha256_file(f.path)} for f in corpus_files
    ]
    configs = {
        "split": dataclasses.asdict(params.stage_config("split")),
        "tokenizer": dataclasses.asdict(params.stage_config("tokenizer")),
        "shard": dataclasses.asdict(params.stage_config("shard")),
        "train": params.resolved_preset().to_dict(),
        "evaluate": dataclasses.asdict(params.stage_config("eval")),
    }
    upstream = {
        # Names inside the corpus (they become doc ids) and bytes; not where it lies on disk.
        "split": {"corpus": [{"rel": f["rel"], "sha256": f["sha256"]} for f in files]},
        "tokenizer": {"split": None},
        "shard": {"split": None, "tokenizer": None},
        "train": {"shard": None, "tokenizer": None},
        "evaluate": {"train": None, "shard": None},
    }
    keys: dict[str, str] = {}
    for stage, deps in upstream.items():
        inputs = {dep: (value if value is not None else keys[dep]) for dep, value in deps.items()}
        keys[stage] = sha256_json(
            {
                "stage": stage,
                "inputs": inputs,
                "config": configs[stage],
                "code": code_version(stage),
            }
        )[:32]
    specs = [os.path.abspath(os.path.expanduser(s)) for s in params.corpus]
    return StagePlan(corpus_specs=specs, corpus_files=files, configs=configs, keys=keys)
