"""Shared fixtures. Prefect and MLflow state never touch ~: everything lives in tmp dirs."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"

_STATE = Path(tempfile.mkdtemp(prefix="glm-tests-"))
os.environ.setdefault("PREFECT_HOME", str(_STATE / "prefect"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{_STATE / 'mlflow.db'}")


@pytest.fixture(scope="session")
def sample_corpus() -> list[Path]:
    """The bundled real corpus: English (KJV Genesis) and Chinese (poems, sayings)."""
    return sorted(DATA.glob("*.jsonl"))
