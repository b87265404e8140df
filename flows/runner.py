"""Runs one stage task with the run's retry policy and records whether it ran or was cached.

A stage counts as ``cached`` when Prefect answered from its cache (state ``Cached``) or when
the task found the stage's output directory already complete (Prefect's home was deleted,
say). ``--force STAGE`` bypasses both for that stage and every stage after it.
"""

from __future__ import annotations

import datetime as dt
import json

from prefect import get_run_logger
from prefect.runtime import flow_run

from flows.keys import StagePlan
from flows.params import PipelineParams
from flows.registry import params_for_logging
from flows.tasks import is_complete
from flows.workspace import Workspace
from glm.atomic import write_json_atomic
from glm.digest import sha256_json


class StageRunner:
    """Calls stage tasks for one flow run and collects the run's summary."""

    def __init__(self, params: PipelineParams, plan: StagePlan, workspace: Workspace):
        self.params, self.plan, self.ws = params, plan, workspace
        self.stages: dict[str, str] = {}
        self.logger = get_run_logger()

    def spec(self, name: str) -> dict:
        """The ``stage`` argument every stage task receives."""
        key = self.plan.keys[name]
        return {
            "name": name,
            "key": key,
            "out_dir": str(self.ws.stage_dir(name, key)),
            "workspace": str(self.ws.root),
            "force": self.params.forced(name),
        }

    def run(self, name: str, stage_task, **inputs) -> dict:
        """Run (or reuse) one stage; raises the task's exception if it finally failed."""
        stage = self.spec(name)
        # A cache record whose directory has gone is stale: skip it instead of trusting it.
        refresh = stage["force"] or not is_complete(name, stage["out_dir"])
        configured = stage_task.with_options(
            retries=self.params.retries,
            retry_delay_seconds=self.backoff(),
            refresh_cache=refresh,
        )
        state = configured(stage=stage, **inputs, return_state=True)
        result = state.result()
        self.record(name, cached=state.name == "Cached" or result.get("reused", False))
        return result

    def register_request(self, split, tok, manifest, trained, evaluated) -> dict:
        """Everything registration needs, as plain JSON (paths, digests, configs)."""
        p, cfg = self.params, self.plan.configs
        return {
            "workspace": str(self.ws.root),
            "tracking_uri": p.tracking_uri,
            "experiment_name": p.experiment_name,
            "model_name": p.model_name,
            "force": p.forced("register"),
            "digest": self.plan.keys["evaluate"],
            "stage_keys": self.plan.keys,
            # Same split output, shard rule and eval settings = the same validation bytes,
            # measured the same way: only then are two val_bpb figures comparable as is.
            "val_digest": sha256_json([self.plan.keys["split"], cfg["shard"], cfg["evaluate"]])[
                :32
            ],
            "sentences_dir": split["out_dir"],
            "tokenizer_dir": tok["out_dir"],
            "manifest_path": manifest,
            "train_dir": trained["out_dir"],
            "package_dir": f"{trained['out_dir']}/final",
            "eval_dir": evaluated["out_dir"],
            "shard_cfg": cfg["shard"],
            "eval_cfg": cfg["evaluate"],
            "params": params_for_logging(p.model_dump(), cfg),
        }

    def record(self, name: str, cached: bool) -> None:
        self.stages[name] = "cached" if cached else "ran"
        self.logger.info("stage %-9s %s", name, self.stages[name])

    def backoff(self) -> list[float]:
        """Exponential backoff: base, 2*base, 4*base, ... seconds."""
        return [self.params.retry_backoff_s * 2**i for i in range(self.params.retries)]

    def stop_after(self, name: str) -> bool:
        return self.params.until == name

    def finish(self, metrics: dict | None = None, model: dict | None = None) -> dict:
        """Write WORKSPACE/last_run.json and return the same summary."""
        model = dict(model or {})
        summary = {
            "status": "completed",
            "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "workspace": str(self.ws.root),
            "stages": self.stages,
            "stage_dirs": {n: self.spec(n)["out_dir"] for n in self.stages if n in self.plan.keys},
            "metrics": metrics or {},
            "model": {k: model[k] for k in ("name", "version", "alias", "gate_reason") if model}
            or None,
            "mlflow_run_id": model.get("mlflow_run_id"),
            "flow_run_id": str(flow_run.get_id()),
        }
        write_json_atomic(self.ws.last_run, summary)
        self.logger.info("summary: %s", json.dumps({"stages": self.stages}))
        return summary
