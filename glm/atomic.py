"""Atomic writes: a crash never leaves a file or stage directory that looks complete."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

# mkstemp and mkdtemp create private (0600/0700) entries; outputs get the modes an ordinary
# open() or mkdir() would give, so a serving account can read what the pipeline wrote.
_UMASK = os.umask(0o022)  # reading the umask means setting it: put it straight back
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK
_DIR_MODE = 0o777 & ~_UMASK


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    """Write ``data`` to a temp file beside ``path``, fsync it, then rename over ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), _FILE_MODE)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def write_json_atomic(path: str | Path, obj) -> None:
    """Atomically write ``obj`` as indented JSON."""
    write_bytes_atomic(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def _temp_prefix(out_dir: Path) -> str:
    return f".{out_dir.name}."


def remove_stale_temps(out_dir: str | Path) -> int:
    """Delete temporary directories that a killed ``atomic_dir(out_dir)`` left behind.

    Call it only while holding the lock that serialises builders of ``out_dir``: a temp dir
    of a build still in progress looks the same. Returns the number removed.
    """
    out_dir = Path(out_dir)
    if not out_dir.parent.is_dir():
        return 0
    stale = [
        p
        for p in out_dir.parent.iterdir()
        if p.is_dir() and p.name.startswith(_temp_prefix(out_dir)) and p.name.endswith(".tmp")
    ]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return len(stale)


@contextlib.contextmanager
def atomic_dir(out_dir: str | Path) -> Iterator[Path]:
    """Build a directory under a temporary name and rename it into place on success.

    Yields the temporary path to write into. On any exception (or a kill) the final path is
    never created, so a directory at ``out_dir`` is complete by construction. An existing
    ``out_dir`` is replaced.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=_temp_prefix(out_dir), suffix=".tmp", dir=out_dir.parent))
    try:
        yield tmp
        tmp.chmod(_DIR_MODE)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
