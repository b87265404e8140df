"""What a finished run shows in Prefect's UI: the evaluation table and a link to MLflow."""

from __future__ import annotations

from prefect.artifacts import create_link_artifact, create_markdown_artifact

from flows.registry import eval_markdown
from flows.workspace import Workspace, redact_uri

# Where `mlflow ui --backend-store-uri sqlite:///WORKSPACE/mlflow.db` listens by default.
LOCAL_MLFLOW_UI = "http://127.0.0.1:5000"


def publish_evaluation(metrics: dict, model_name: str) -> None:
    create_markdown_artifact(
        eval_markdown(metrics, model_name),
        key="glm-eval",
        description="validation metrics of this run's model",
    )


def publish_mlflow_link(model: dict, tracking_uri: str | None) -> None:
    """Link to the MLflow run that holds the registered model (credentials removed)."""
    uri = redact_uri(Workspace.at(".").tracking_uri(tracking_uri))
    base = uri if uri.startswith("http") else LOCAL_MLFLOW_UI
    link = (
        f"{base.rstrip('/')}/#/experiments/{model['experiment_id']}/runs/{model['mlflow_run_id']}"
    )
    create_link_artifact(
        link,
        link_text=f"MLflow run of {model['name']} v{model['version']} ({model['alias']})",
        key="glm-mlflow-run",
        description="the MLflow run that logged and registered this model",
    )
