"""The main job: raw corpus in, an MLflow-registered GLM out.

split -> tokenizer -> shard -> train -> evaluate -> register. Every key is computed before
any work starts (content digests of the corpus, configs and stage code), every stage is a
retried, content-cached Prefect task writing under WORKSPACE/stages/<stage>/<key>/, and the
run ends with WORKSPACE/last_run.json. ``glm run`` is the CLI for it; prefect.yaml deploys it.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from flows.keys import plan_stages
from flows.params import PipelineParams
from flows.publish import publish_evaluation, publish_mlflow_link
from flows.registry import eval_metrics
from flows.runner import StageRunner
from flows.tasks import (
    evaluate_task,
    register_task,
    shard_task,
    split_task,
    tokenizer_task,
    train_task,
)
from flows.workspace import Workspace
from glm.corpus import resolve_corpus


@flow(name="glm-pipeline", log_prints=False)
def glm_pipeline(params: PipelineParams) -> dict:
    """Train, evaluate and register a GLM on ``params.corpus``; returns the run summary."""
    ws = Workspace.at(params.workspace)
    files = resolve_corpus(params.corpus)
    size_mb = sum(f.size for f in files) / 1e6
    get_run_logger().info("corpus: %d files, %.1f MB; workspace %s", len(files), size_mb, ws.root)
    plan = plan_stages(params, files)
    stages, cfg = StageRunner(params, plan, ws), plan.configs

    split = stages.run("split", split_task, corpus=plan.corpus_specs, cfg=cfg["split"])
    if stages.stop_after("split"):
        return stages.finish()
    tok = stages.run(
        "tokenizer", tokenizer_task, sentences_dir=split["out_dir"], cfg=cfg["tokenizer"]
    )
    if stages.stop_after("tokenizer"):
        return stages.finish()
    shards = stages.run(
        "shard",
        shard_task,
        sentences_dir=split["out_dir"],
        tokenizer_dir=tok["out_dir"],
        cfg=cfg["shard"],
    )
    manifest = f"{shards['out_dir']}/manifest.json"
    if stages.stop_after("shard"):
        return stages.finish()
    trained = stages.run(
        "train",
        train_task,
        manifest_path=manifest,
        tokenizer_dir=tok["out_dir"],
        preset=cfg["train"],
        device=params.device,
    )
    if stages.stop_after("train"):
        return stages.finish()
    evaluated = stages.run(
        "evaluate",
        evaluate_task,
        model_dir=f"{trained['out_dir']}/final",
        manifest_path=manifest,
        cfg=cfg["evaluate"],
    )
    metrics = eval_metrics(evaluated["out_dir"])
    publish_evaluation(metrics, params.model_name)
    if stages.stop_after("evaluate"):
        return stages.finish(metrics)

    request = stages.register_request(split, tok, manifest, trained, evaluated)
    model = register_task.with_options(
        retries=params.retries, retry_delay_seconds=stages.backoff()
    )(request)
    stages.record("register", cached=model["reused"])
    publish_mlflow_link(model, request["tracking_uri"])
    return stages.finish(metrics, model)
