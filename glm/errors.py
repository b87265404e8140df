"""Errors that the pipeline reports to users as one line, without a traceback."""

from __future__ import annotations

from pathlib import Path


class InputError(Exception):
    """Bad input the user has to fix (a missing file, malformed data, invalid parameters).

    Never retried by the orchestration layer: running again cannot fix it. ``str(err)`` is a
    single line naming what is wrong, which file and where (line or byte offset).
    """

    def __init__(self, what: str, path: str | Path | None = None, where: str | None = None):
        self.what = what
        self.path = str(path) if path is not None else None
        self.where = where
        parts = [p for p in (self.path, self.where) if p]
        location = ":".join(parts)
        super().__init__(f"{location}: {what}" if location else what)


class IntegrityError(Exception):
    """A stored artifact (shard, checkpoint, manifest) is missing, truncated or corrupt."""


class Interrupted(Exception):
    """The run was asked to stop (SIGTERM) and saved its state first: resume by rerunning.

    Never retried automatically: the signal was a request to stop, not a transient fault.
    """
