"""The workspace: one directory that holds every piece of state a pipeline run leaves behind.

```
WORKSPACE/stages/<stage>/<key>/   content-addressed stage outputs
WORKSPACE/mlflow.db, mlartifacts/ MLflow tracking (sqlite) and artifacts
WORKSPACE/prefect/                PREFECT_HOME
WORKSPACE/logs/                   full logs (tracebacks land here, not on the console)
WORKSPACE/locks/                  fcntl lock files that serialise concurrent runs
WORKSPACE/last_run.json           summary of the last run
```

Nothing here imports Prefect or MLflow, so the CLI can set their environment up first.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

STAGES = ("split", "tokenizer", "shard", "train", "evaluate", "register")


@dataclass(frozen=True)
class Workspace:
    """Paths inside one workspace directory (always absolute, so runs can change cwd)."""

    root: Path

    @classmethod
    def at(cls, path: str | Path) -> Workspace:
        return cls(Path(path).expanduser().resolve())

    def stage_dir(self, stage: str, key: str) -> Path:
        return self.root / "stages" / stage / key

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def prefect_home(self) -> Path:
        return self.root / "prefect"

    @property
    def mlflow_db(self) -> Path:
        return self.root / "mlflow.db"

    @property
    def mlflow_artifacts(self) -> Path:
        return self.root / "mlartifacts"

    @property
    def last_run(self) -> Path:
        return self.root / "last_run.json"

    def lock_path(self, name: str) -> Path:
        return self.root / "locks" / f"{name}.lock"

    def tracking_uri(self, override: str | None = None) -> str:
        """An explicit URI, else ``MLFLOW_TRACKING_URI``, else this workspace's sqlite file."""
        return override or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{self.mlflow_db}"


@contextlib.contextmanager
def file_lock(path: Path, what: str) -> Iterator[None]:
    """Hold an exclusive ``fcntl`` lock on ``path`` (created if missing) for the block.

    The kernel drops the lock when the holder dies, so a killed run never leaves a stale lock.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "?"
            log.info("waiting for %s (held by pid %s: %s)", what, holder, path)
            start = time.monotonic()
            fcntl.flock(f, fcntl.LOCK_EX)
            log.info("got %s after %.1f s", what, time.monotonic() - start)
        f.seek(0)
        f.truncate()
        f.write(str(os.getpid()))
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


_CREDENTIALS = re.compile(r"(?<=://)[^/@\s]+@")


def redact_uri(uri: str) -> str:
    """``scheme://user:secret@host/..`` -> ``scheme://***@host/..``: never log a password."""
    return _CREDENTIALS.sub("***@", uri)
