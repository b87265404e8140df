"""MLflow: one tracking run per registered model, a pickle-free pyfunc, the champion gate.

``register`` is idempotent: it looks the model up by its digest tag (the evaluate stage's
key, which covers corpus, configs and code) and logs + registers only when no version
carries it. All registry writes happen under the workspace's registry lock, so two runs
never race on the gate or on sqlite.

Champion gate: a new version takes the ``champion`` alias only when its validation bits per
byte beat the champion's on the same validation bytes. When the champion was measured on a
different validation set, it is re-evaluated on this run's (re-tokenized with its own
tokenizer) before comparing. The first version is champion; any other is ``challenger``.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from unittest import mock

import mlflow
import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.models import ModelSignature
from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

from flows.workspace import Workspace, file_lock, redact_uri
from glm.errors import InputError
from glm.faults import fault_point

# MLflow's artifact progress bars would fill the console of every run.
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

ROOT = Path(__file__).resolve().parents[1]
PYFUNC_ENTRY = Path(__file__).with_name("pyfunc_model.py")
EXAMPLE_INPUT = ["In the beginning God created the [MASK] and the earth."]
# The packages the pyfunc imports at load time; pinned to what trained it.
_RUNTIME_PACKAGES = ("mlflow", "torch", "numpy", "sentencepiece", "safetensors", "pyarrow")
DIGEST_TAG = "glm_digest"


def open_registry(workspace: str | Path, tracking_uri: str | None = None) -> MlflowClient:
    """Point MLflow at the workspace's sqlite file (or the given/env URI) and return a client."""
    uri = Workspace.at(workspace).tracking_uri(tracking_uri)
    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(uri, uri)


def _no_workspace_db(ws: Workspace, tracking_uri: str | None) -> bool:
    """The registry is the workspace's own sqlite file, and it was never created."""
    db = ws.mlflow_db
    return ws.tracking_uri(tracking_uri) == f"sqlite:///{db}" and (
        not db.is_file() or db.stat().st_size == 0
    )


def require_registry(ws: Workspace, tracking_uri: str | None = None) -> None:
    """Readers (fill, eval, promote) refuse a workspace without a registry instead of
    creating an empty one."""
    if _no_workspace_db(ws, tracking_uri):
        raise InputError("no model registry here (no mlflow.db): run `glm run` first", ws.root)


def check_registry(ws: Workspace, tracking_uri: str | None = None) -> None:
    """One read of the registry, with no HTTP retries and a short timeout: an unknown scheme,
    an unreachable server or an unreadable database fails now, as one line, instead of after
    training (or after minutes of retries). The workspace's own sqlite file is only read
    when it exists: the run creates it, under its lock."""
    if _no_workspace_db(ws, tracking_uri):
        return
    uri = ws.tracking_uri(tracking_uri)
    quick = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
    try:
        with mock.patch.dict(os.environ, quick):
            MlflowClient(uri, uri).search_registered_models(max_results=1)
    except Exception as err:
        reason = redact_uri(_first_line(str(getattr(err, "message", err))))
        raise InputError(
            f"cannot use the MLflow registry: {type(err).__name__}: {reason}", redact_uri(uri)
        ) from None


def ensure_experiment(client: MlflowClient, name: str, workspace: Workspace) -> str:
    """The experiment's id; created with its artifacts inside the workspace for a sqlite store."""
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if client.tracking_uri.startswith("sqlite:"):
        location = workspace.mlflow_artifacts.as_uri()
    return client.create_experiment(name, artifact_location=location)


def find_version(client: MlflowClient, model_name: str, digest: str):
    """The newest registered version tagged with ``digest``, or None."""
    found = client.search_model_versions(
        f"name = '{model_name}' and tags.{DIGEST_TAG} = '{digest}'"
    )
    return max(found, key=lambda v: int(v.version)) if found else None


def register(request: dict, logger: logging.Logger | logging.LoggerAdapter) -> dict:
    """Log and register this run's model unless its digest is registered; apply the gate."""
    ws = Workspace.at(request["workspace"])
    name, digest = request["model_name"], request["digest"]
    with file_lock(ws.lock_path("registry"), "the model registry lock"):
        client = open_registry(ws.root, request.get("tracking_uri"))
        existing = None if request["force"] else find_version(client, name, digest)
        if existing is not None and "gate_reason" in existing.tags:
            logger.info("register: %s v%s already holds digest %s", name, existing.version, digest)
            return _outcome(client, existing, reused=True)
        if existing is None:
            _log_and_register(client, request, ws, logger)
            existing = find_version(client, name, digest)
            fault_point("register", int(existing.version), ws.root)  # tests: glm/faults.py
        # Reached with a fresh version, or after a retry whose first attempt registered the
        # version but died before the gate: either way the gate has not run for it yet.
        alias, reason = champion_gate(client, request, existing.version, logger)
        client.set_model_version_tag(name, existing.version, "gate_reason", reason)
        with mlflow.start_run(run_id=existing.run_id):
            mlflow.set_tags({"model_version": existing.version, "alias": alias})
            mlflow.set_tag("gate_reason", reason)
        logger.info("register: %s v%s -> %s (%s)", name, existing.version, alias, reason)
        return _outcome(client, client.get_model_version(name, existing.version), reused=False)


def _outcome(client: MlflowClient, version, reused: bool) -> dict:
    """What the flow records about a registered version."""
    return {
        "name": version.name,
        "version": int(version.version),
        "alias": _alias_of(client, version.name, version.version),
        "gate_reason": version.tags.get("gate_reason", ""),
        "mlflow_run_id": version.run_id,
        "experiment_id": client.get_run(version.run_id).info.experiment_id,
        "reused": reused,
    }


def _log_and_register(client, request: dict, ws: Workspace, logger) -> None:
    """One MLflow run: params, curves, metrics, digests, artifacts, and the pyfunc model."""
    exp_id = ensure_experiment(client, request["experiment_name"], ws)
    metrics = eval_metrics(request["eval_dir"])
    with mlflow.start_run(experiment_id=exp_id, run_name=f"glm-{request['digest'][:8]}") as run:
        mlflow.log_params(_flatten(request["params"]))
        mlflow.set_tags(
            {
                **{f"digest.{stage}": key for stage, key in request["stage_keys"].items()},
                "digest.val_set": request["val_digest"],
                "digest.tokenizer_sha256": _tokenizer_sha(request["tokenizer_dir"]),
                "digest.manifest_sha256": _sha_file(request["manifest_path"]),
                "git_commit": _git_commit(),
                DIGEST_TAG: request["digest"],
            }
        )
        steps = _log_training_curves(client, run.info.run_id, request["train_dir"])
        mlflow.log_metrics({k: float(v) for k, v in metrics.items()})
        mlflow.log_artifacts(request["tokenizer_dir"], "tokenizer")
        mlflow.log_artifact(request["manifest_path"], "data")
        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp, "eval")
            report.mkdir()
            shutil.copy(Path(request["eval_dir"], "eval.json"), report / "eval.json")
            (report / "eval.md").write_text(eval_markdown(metrics, request["model_name"]))
            samples = Path(request["eval_dir"], "samples.json")
            if samples.is_file():
                shutil.copy(samples, report / "samples.json")
            mlflow.log_artifacts(str(report), "eval")
            if steps:
                mlflow.log_figure(loss_figure(request["train_dir"]), "plots/loss_curve.png")
            code = Path(tmp, "code")
            shutil.copytree(
                ROOT / "glm", code / "glm", ignore=shutil.ignore_patterns("__pycache__")
            )
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(PYFUNC_ENTRY),
                artifacts={"package": request["package_dir"]},
                code_paths=[str(code / "glm")],
                signature=pyfunc_signature(),
                input_example=EXAMPLE_INPUT,
                pip_requirements=_pip_requirements(),
            )
        logger.info("register: logged %d training steps and %d metrics", steps, len(metrics))
        # Tags go in with the version itself: a version without its digest tag would be
        # invisible to the idempotency lookup and registered again by a retry.
        mlflow.register_model(
            info.model_uri,
            request["model_name"],
            tags={
                DIGEST_TAG: request["digest"],
                "val_digest": request["val_digest"],
                "val_bpb": str(metrics["val_bpb"]),
            },
        )


def champion_gate(client, request: dict, version: str, logger) -> tuple[str, str]:
    """Give ``version`` the champion alias if it beats the champion on the same bytes."""
    name = request["model_name"]
    new_bpb = float(client.get_model_version(name, version).tags["val_bpb"])
    try:
        champion = client.get_model_version_by_alias(name, "champion")
    except MlflowException:
        champion = None
    if champion is None:
        client.set_registered_model_alias(name, "champion", version)
        return "champion", f"first version of {name!r}: champion by default"
    where = "on the same validation bytes"
    if champion.tags.get("val_digest") == request["val_digest"] and "val_bpb" in champion.tags:
        old_bpb = float(champion.tags["val_bpb"])
    else:
        logger.info("register: re-evaluating champion v%s on this run's val set", champion.version)
        old_bpb = reevaluate(client, name, champion.version, request)
        where = "re-evaluated on this run's validation set"
    if new_bpb < old_bpb:
        client.set_registered_model_alias(name, "champion", version)
        return "champion", (
            f"val_bpb {new_bpb:.4f} beats champion v{champion.version}'s {old_bpb:.4f} ({where})"
        )
    client.set_registered_model_alias(name, "challenger", version)
    return "challenger", (
        f"val_bpb {new_bpb:.4f} does not beat champion v{champion.version}'s {old_bpb:.4f} "
        f"({where})"
    )


def reevaluate(client, name: str, version: str, request: dict) -> float:
    """Champion's val bpb on this run's validation documents, tokenized its own way."""
    from glm.evaluate import EvalConfig, evaluate
    from glm.shards import ShardConfig, write_shards

    with tempfile.TemporaryDirectory(dir=Workspace.at(request["workspace"]).root) as tmp:
        package = model_package(f"models:/{name}/{version}", Path(tmp, "model"))
        write_shards(
            request["sentences_dir"],
            package / "tokenizer",
            Path(tmp, "shards"),
            ShardConfig(**request["shard_cfg"]),
        )
        result = evaluate(
            package,
            Path(tmp, "shards", "manifest.json"),
            EvalConfig(**request["eval_cfg"]),
            out_dir=Path(tmp, "eval"),
        )
    return float(result["val_bpb"])


def model_package(uri: str, dst: Path) -> Path:
    """Download a registered/logged model and return its glm package directory."""
    try:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(dst)))
    except MlflowException as err:
        raise InputError(_first_line(err.message), uri) from None
    return package_in_model_dir(local)


def _first_line(message: str) -> str:
    return message.strip().splitlines()[0] if message.strip() else "not found"


def package_in_model_dir(model_dir: Path) -> Path:
    """The glm package inside an MLflow model directory (its ``package`` artifact)."""
    meta = yaml.safe_load((model_dir / "MLmodel").read_text())
    return model_dir / meta["flavors"]["python_function"]["artifacts"]["package"]["path"]


def promote(workspace: str | Path, model_name: str, version: int, tracking_uri=None) -> str:
    """Move ``champion`` to ``version`` by hand (a rollback); returns the previous champion."""
    ws = Workspace.at(workspace)
    require_registry(ws, tracking_uri)
    check_registry(ws, tracking_uri)
    with file_lock(ws.lock_path("registry"), "the model registry lock"):
        client = open_registry(ws.root, tracking_uri)
        try:
            client.get_model_version(model_name, str(version))
        except MlflowException as err:
            raise InputError(f"{model_name} v{version}: {_first_line(err.message)}") from None
        try:
            previous = client.get_model_version_by_alias(model_name, "champion").version
        except MlflowException:
            previous = "none"
        client.set_registered_model_alias(model_name, "champion", str(version))
        client.set_model_version_tag(
            model_name, str(version), "gate_reason", f"promoted by hand over v{previous}"
        )
    return previous


def pyfunc_signature() -> ModelSignature:
    """list[str] in, list[str] out; every GenerationConfig field as an optional param."""
    from glm.generate import GenerationConfig

    dtypes = {int: "long", float: "double"}
    return ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema(
            [
                ParamSpec(f.name, dtypes[type(f.default)], f.default)
                for f in dataclasses.fields(GenerationConfig)
            ]
        ),
    )


def eval_metrics(eval_dir: str | Path) -> dict:
    """The numeric metrics of an evaluate stage's eval.json (val_bpb, cloze_acc, ...)."""
    report = json.loads(Path(eval_dir, "eval.json").read_text())
    return _numbers(report["metrics"])


def eval_markdown(metrics: dict, model_name: str) -> str:
    """The evaluation table published to Prefect and MLflow."""
    rows = "\n".join(f"| {k} | {_fmt(v)} |" for k, v in sorted(metrics.items()))
    return f"# {model_name}: evaluation\n\n| metric | value |\n| --- | --- |\n{rows}\n"


def loss_figure(train_dir: str):
    """Training loss (and learning rate) against step, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _read_jsonl(Path(train_dir, "metrics.jsonl"))
    rows = [r for r in rows if "loss" in r and "step" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    if rows and "lr" in rows[0]:
        lr_ax = ax.twinx()
        lr_ax.plot([r["step"] for r in rows], [r["lr"] for r in rows], "C1--", label="lr")
        lr_ax.set_ylabel("learning rate")
    ax.set_title("GLM training loss")
    fig.tight_layout()
    return fig


def _log_training_curves(client: MlflowClient, run_id: str, train_dir: str) -> int:
    """Every numeric field of metrics.jsonl as an MLflow metric at its step."""
    rows = _read_jsonl(Path(train_dir, "metrics.jsonl"))
    batch = []
    for row in rows:
        if "step" not in row:
            continue
        stamp = int(row.get("time", 0) * 1000) or 0
        for key, value in _numbers(row).items():
            if key not in ("step", "time"):
                batch.append(Metric(f"train/{key}", float(value), stamp, int(row["step"])))
    for start in range(0, len(batch), 1000):
        client.log_batch(run_id, metrics=batch[start : start + 1000])
    return sum(1 for r in rows if "step" in r)


def _alias_of(client: MlflowClient, name: str, version: str) -> str:
    aliases = client.get_model_version(name, version).aliases
    return "champion" if "champion" in aliases else (aliases[0] if aliases else "none")


def _read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _numbers(d: dict) -> dict:
    return {k: v for k, v in d.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else f"{v:,}"


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = json.dumps(v) if isinstance(v, list) else v
    return out


def _pip_requirements() -> list[str]:
    pins = []
    for package in _RUNTIME_PACKAGES:
        version = importlib.metadata.version(package).split("+")[0]
        pins.append(f"{package}=={version}")
    return pins


def _tokenizer_sha(tokenizer_dir: str) -> str:
    return json.loads(Path(tokenizer_dir, "tokenizer.json").read_text()).get("sha256", "")


def _sha_file(path: str) -> str:
    from glm.digest import sha256_file

    return sha256_file(path)


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip()


def params_for_logging(params: dict, configs: dict) -> dict:
    """What the MLflow run records as params: top-level choices + every stage setting."""
    top = {k: v for k, v in params.items() if not isinstance(v, dict) and k != "tracking_uri"}
    return {**top, **configs}
