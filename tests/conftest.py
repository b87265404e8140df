"""Shared fixtures. Prefect and MLflow state never touch ~: everything lives in tmp dirs."""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT / "data"

_STATE = Path(tempfile.mkdtemp(prefix="glm-tests-"))
os.environ.setdefault("PREFECT_HOME", str(_STATE / "prefect"))
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{_STATE / 'mlflow.db'}")
# Stage logs (glm.*) and orchestration logs (flows.*) reach Prefect's run logs.
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "glm,flows")


@pytest.fixture(scope="session")
def sample_corpus() -> list[Path]:
    """The bundled real corpus: English (KJV Genesis, Exodus) and Chinese (poems, sayings)."""
    return sorted(DATA.glob("*.jsonl"))


@dataclass(frozen=True)
class DataStages:
    """Outputs of the data stages on the bundled corpus (see ``data_stages``)."""

    sentences: Path
    tokenizer: Path
    shards: Path
    manifest: Path


@pytest.fixture(scope="session")
def data_stages(sample_corpus, tmp_path_factory) -> DataStages:
    """split -> tokenizer (unigram, 2,000 pieces) -> shards (64k-token shards) of the bundled
    corpus, built once per session. Treat the directories as read-only."""
    from glm.shards import ShardConfig, write_shards
    from glm.split import SplitConfig, split_corpus
    from glm.tokenizer import TokenizerConfig, train_tokenizer

    root = tmp_path_factory.mktemp("data-stages")
    split_corpus([str(p) for p in sample_corpus], root / "sentences", SplitConfig(workers=1))
    train_tokenizer(
        root / "sentences",
        root / "tokenizer",
        TokenizerConfig(vocab_size=2000, character_coverage=0.995),
    )
    write_shards(
        root / "sentences", root / "tokenizer", root / "shards", ShardConfig(shard_tokens=65536)
    )
    return DataStages(
        root / "sentences", root / "tokenizer", root / "shards", root / "shards/manifest.json"
    )


@pytest.fixture(scope="session")
def prefect_api() -> str:
    """One Prefect test server for the whole session (each one costs ~25 s to start).

    Yields its API URL: in-process flows use it through Prefect's settings, and CLI
    subprocesses get it as PREFECT_API_URL so they do not start servers of their own.
    """
    from prefect.settings import PREFECT_API_URL
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=None):
        yield PREFECT_API_URL.value()
