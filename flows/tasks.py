"""Prefect tasks around the ``glm`` stage functions.

Every stage task follows one contract:

- it receives a ``stage`` dict (``name``, ``key``, ``out_dir``, ``workspace``, ``force``) and
  plain-JSON inputs (paths and config dicts, never objects, so a task can run anywhere);
- Prefect's cache key is the stage's content key (inputs' digests + config + code version),
  never the flow run id, so an unchanged rerun is a cache hit;
- under a per-stage lock it reuses an output directory that is already complete (its JSON
  marker exists): a lost Prefect home costs a lookup, not a retrain;
- bad input (``InputError``) and corrupt artifacts (``IntegrityError``) are never retried.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from pathlib import Path

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.keys import COMPLETE_MARKER
from flows.workspace import Workspace, file_lock
from glm.atomic import remove_stale_temps
from glm.config import Preset
from glm.errors import InputError, IntegrityError, Interrupted


def stage_cache_key(context, parameters: dict) -> str:
    """Prefect cache key: the content key, scoped to the workspace that holds the output."""
    stage = parameters["stage"]
    scope = hashlib.sha256(stage["workspace"].encode()).hexdigest()[:12]
    return f"glm-{stage['name']}-{stage['key']}-{scope}"


def retry_unless_bad_input(task, task_run, state) -> bool:
    """Retry condition: running again cannot fix bad input or a corrupt artifact, and a
    SIGTERM'd training asked to stop (it checkpointed first; a rerun resumes)."""
    exc = state.result(raise_on_failure=False)
    return not isinstance(exc, InputError | IntegrityError | Interrupted)


def is_complete(stage: str, out_dir: str | Path) -> bool:
    """True when a stage's output directory holds its final marker file."""
    return (Path(out_dir) / COMPLETE_MARKER[stage]).is_file()


def _run_stage(stage: dict, build: Callable[[Path], dict]) -> dict:
    """Reuse a complete output or build it, holding the stage's lock so that two runs on
    one workspace never build the same directory at once."""
    logger = get_run_logger()
    name, out_dir = stage["name"], Path(stage["out_dir"])
    lock = Workspace.at(stage["workspace"]).lock_path(f"{name}-{stage['key'][:16]}")
    with file_lock(lock, f"the {name} stage lock"):
        if is_complete(name, out_dir) and not stage["force"]:
            logger.info("%s: reusing complete output %s", name, out_dir)
            return {**_identity(stage), "reused": True}
        if removed := remove_stale_temps(out_dir):
            logger.info("%s: removed %d partial output(s) of a killed run", name, removed)
        summary = build(out_dir)
    logger.info("%s: wrote %s", name, out_dir)
    # Round-trip through JSON: the result is persisted with Prefect's JSON serializer.
    summary = json.loads(json.dumps(summary or {}, default=str))
    return {**_identity(stage), "reused": False, "summary": summary}


def _identity(stage: dict) -> dict:
    return {"stage": stage["name"], "key": stage["key"], "out_dir": stage["out_dir"]}


stage_task = task(
    cache_key_fn=stage_cache_key,
    cache_expiration=None,
    persist_result=True,
    result_serializer="json",
    retry_condition_fn=retry_unless_bad_input,
)


@stage_task(name="split")
def split_task(stage: dict, corpus: list[str], cfg: dict) -> dict:
    """Corpus files -> sentence table (Arrow) + stats.json."""
    from glm.split import SplitConfig, split_corpus

    return _run_stage(stage, lambda out: split_corpus(corpus, out, SplitConfig(**cfg)))


@stage_task(name="tokenizer")
def tokenizer_task(stage: dict, sentences_dir: str, cfg: dict) -> dict:
    """Sentences -> sentencepiece model with GLM's special tokens."""
    from glm.tokenizer import TokenizerConfig, train_tokenizer

    return _run_stage(
        stage, lambda out: train_tokenizer(sentences_dir, out, TokenizerConfig(**cfg))
    )


@stage_task(name="shard")
def shard_task(stage: dict, sentences_dir: str, tokenizer_dir: str, cfg: dict) -> dict:
    """Sentences + tokenizer -> train/val token shards + manifest.json with checksums."""
    from glm.shards import ShardConfig, write_shards

    return _run_stage(
        stage, lambda out: write_shards(sentences_dir, tokenizer_dir, out, ShardConfig(**cfg))
    )


@stage_task(name="train")
def train_task(stage: dict, manifest_path: str, tokenizer_dir: str, preset: dict, device: str):
    """Shards -> checkpoints, metrics.jsonl and final/ (a model package).

    Training writes into its output directory as it goes (that is what a retry resumes
    from), so unlike the data stages it is not built under a temporary name; ``train.json``
    written last marks it complete.
    """
    from glm.train import train

    def build(out: Path) -> dict:
        if stage["force"] and out.exists():
            shutil.rmtree(out)
        return train(manifest_path, tokenizer_dir, out, Preset.from_dict(preset), device=device)

    return _run_stage(stage, build)


@stage_task(name="evaluate")
def evaluate_task(stage: dict, model_dir: str, manifest_path: str, cfg: dict) -> dict:
    """Final model + validation shards -> eval.json (bits per byte, cloze, baselines)."""
    from glm.evaluate import EvalConfig, evaluate

    return _run_stage(
        stage, lambda out: evaluate(model_dir, manifest_path, EvalConfig(**cfg), out_dir=out)
    )


@task(name="register", cache_policy=NO_CACHE, retry_condition_fn=retry_unless_bad_input)
def register_task(request: dict) -> dict:
    """Log the run to MLflow and register the model, unless its digest is already there.

    Never cached by Prefect: the registry is the source of truth, so a deleted or new
    tracking database gets the version back instead of a stale cache hit.
    """
    from flows.registry import register
    from flows.workspace import redact_uri

    try:
        return register(request, get_run_logger())
    except (InputError, IntegrityError):
        raise
    except Exception as err:
        # MLflow puts the tracking URI, password included, into its error messages; this
        # message reaches Prefect's logs, the console and last_run.json.
        message = redact_uri(str(err))
        if message == str(err):
            raise
        raise RuntimeError(f"{type(err).__name__}: {message}") from None
