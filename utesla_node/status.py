"""The running node's status file, ``<data>/status.json``: its only writer and reader.

A node rewrites the file every second with what ``/_node/status`` answers (no secrets),
plus ``updated`` (epoch seconds) and ``pid``.  ``utesla-cli status``, ``show_networks``,
``show_services`` and ``add_network --wait`` read it on the same machine, so they need
no token and no connection to the node.

The file outlives its writer when the node is killed (SIGKILL, power loss, a crash that
skips :meth:`~utesla_node.server.Node.stop`).  A reader must then say that no node is
running rather than show what a dead node last saw, so :func:`read_status` accepts the
file only when it is fresh (rewritten within :data:`MAX_AGE` seconds) *and* its writer's
process still exists; otherwise it raises :class:`NodeNotRunning`, naming the data
folder and why.  Both tests are needed: a fresh file of a node killed a moment ago has a
dead pid; a pid can be reused by another process long after the node died, when the file
is old.
"""
from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from .keys import write_atomic

__all__ = ["STATUS_FILE", "MAX_AGE", "NodeNotRunning", "encode_status", "write_status",
           "remove_status", "read_status"]

#: The file's name inside the node's data folder.
STATUS_FILE = "status.json"

#: Oldest ``updated`` a reader accepts, seconds.  The node writes every second; the
#: margin covers a busy machine (the write runs in a thread pool behind other work).
MAX_AGE = 5.0


class NodeNotRunning(Exception):
    """No live node keeps the status file of ``data_dir`` (``reason`` says what was found)."""

    def __init__(self, data_dir: Path, reason: str):
        self.data_dir = Path(data_dir)
        self.reason = reason
        super().__init__(f"no node is running with data folder {self.data_dir} "
                         f"(no fresh {self.data_dir.name}/{STATUS_FILE}: {reason})")


def encode_status(snapshot: dict, *, now: float | None = None, pid: int | None = None) -> bytes:
    """The file's bytes for ``snapshot`` (``Builtins.node_status()``), stamped with the
    time and our pid.  Call it on the event loop: the snapshot may still share lists and
    dicts with live node state, which must not change while it is encoded."""
    stamped = {"updated": time.time() if now is None else now,
               "pid": os.getpid() if pid is None else pid, **snapshot}
    return json.dumps(stamped).encode()


def write_status(data_dir: Path, payload: bytes) -> None:
    """Replace the status file with ``payload`` (from :func:`encode_status`).

    Atomic (readers see the old file or the new one, never a mix) but not durable: the
    file is rewritten every second and worthless after a restart, so it is not fsynced.
    Blocking: the node runs it in a worker thread.
    """
    write_atomic(Path(data_dir) / STATUS_FILE, payload, 0o644, durable=False)


def remove_status(data_dir: Path) -> None:
    """Delete the status file on a clean stop (a missing file is fine)."""
    try:
        (Path(data_dir) / STATUS_FILE).unlink()
    except OSError:
        pass


def read_status(data_dir: Path, *, now: float | None = None, max_age: float = MAX_AGE) -> dict:
    """The status of the node running with ``data_dir``; :class:`NodeNotRunning` when no
    node writes it any more (missing, stale, or its process gone).

    Other ``OSError`` (permission denied: the node runs as another user) propagates: that
    node may well be running, and the message should say what is really wrong.
    """
    data_dir = Path(data_dir)
    try:
        raw = (data_dir / STATUS_FILE).read_bytes()
    except FileNotFoundError:
        raise NodeNotRunning(data_dir, "the file does not exist") from None
    try:
        state = json.loads(raw)
    except ValueError:
        raise NodeNotRunning(data_dir, "the file is not JSON") from None
    updated = state.get("updated") if isinstance(state, dict) else None
    pid = state.get("pid") if isinstance(state, dict) else None
    if not _number(updated) or not isinstance(pid, int) or isinstance(pid, bool):
        raise NodeNotRunning(data_dir, "the file has no 'updated' time or 'pid'")
    age = (time.time() if now is None else now) - updated
    if age > max_age:
        raise NodeNotRunning(data_dir, f"last written {age:.0f} s ago")
    if age < -max_age:
        raise NodeNotRunning(data_dir, f"written {-age:.0f} s in the future (clock changed?)")
    if not _alive(pid):
        raise NodeNotRunning(data_dir, f"written by process {pid}, which has exited")
    return state


def _number(value: object) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value))


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists (signal 0 checks without sending anything)."""
    if pid <= 0:
        return False            # 0 and negatives address process groups, not a process
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True             # it exists, under another user (a node run by systemd)
    except OSError:
        return False
    return True
