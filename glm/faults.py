"""Fault injection for reliability tests: a named point in a stage acts on ``GLM_FAULT``.

``GLM_FAULT`` is a comma-separated list of ``ACTION@POINT:N``:

- ACTION: ``kill`` (SIGKILL this process), ``killpg`` (SIGKILL the whole process group),
  ``ctrl-c`` (SIGINT to the whole process group, as a terminal's Ctrl-C sends it),
  ``termpg`` (SIGTERM to the whole process group, as systemd stops a service), ``fail``
  (raise ``InjectedFault`` every time), ``fail-once`` (raise once; a marker file in
  ``GLM_FAULT_DIR``, default the stage's output directory, lets the retry pass).
- POINT, with what N counts:

  - ``split:N``: the split stage has written its N-th sentence file (1-based), not stats.json;
  - ``shard:N``: the shard stage has written the N-th shard file of a split (train or val),
    not manifest.json;
  - ``step:N``: the trainer's optimizer step N is done, its checkpoint not yet written;
  - ``ckpt-write:N``: the checkpoint of step N is half-written (weights on disk, state not);
  - ``eval:N``: evaluation has scored N batches;
  - ``register:N``: registration has logged and registered model version N, the champion
    gate has not run yet.

Split workers run in a process pool: use ``killpg`` there, a ``kill`` would take one worker
only. Example: ``GLM_FAULT=killpg@step:5`` kills a tiny-preset ``glm run`` before its first
checkpoint. The module has no heavy imports, so any stage can call ``fault_point``.
"""

from __future__ import annotations

import logging
import os
import re
import signal
from pathlib import Path

from glm.errors import InputError

log = logging.getLogger(__name__)

FAULT_ENV = "GLM_FAULT"
FAULT_DIR_ENV = "GLM_FAULT_DIR"
_FAULT_ITEM = re.compile(r"^(kill|killpg|ctrl-c|termpg|fail|fail-once)@([a-z-]+):(\d+)$")


class InjectedFault(RuntimeError):
    """Raised by a ``fail`` or ``fail-once`` fault hook (see the module docstring)."""


def fault_point(point: str, n: int, marker_dir: str | Path) -> None:
    """Act on ``GLM_FAULT`` if it names ``point:n`` (see the module docstring)."""
    spec = os.environ.get(FAULT_ENV, "")
    for item in filter(None, (s.strip() for s in spec.split(","))):
        m = _FAULT_ITEM.match(item)
        if m is None:
            raise InputError(f"{FAULT_ENV}: cannot parse {item!r}, expected ACTION@POINT:N")
        action, where, count = m.group(1), m.group(2), int(m.group(3))
        if where != point or count != n:
            continue
        log.warning("fault injection: %s at %s:%d", action, point, n)
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        elif action == "killpg":
            os.killpg(os.getpgrp(), signal.SIGKILL)
        elif action in ("ctrl-c", "termpg"):
            os.killpg(os.getpgrp(), signal.SIGINT if action == "ctrl-c" else signal.SIGTERM)
            continue  # whatever the handlers make of it happens in the caller, as for a user
        marker = Path(os.environ.get(FAULT_DIR_ENV) or marker_dir) / f".fault-{where}-{count}"
        if action == "fail-once":
            if marker.exists():
                continue
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.touch()
        raise InjectedFault(f"injected fault {item!r}")
