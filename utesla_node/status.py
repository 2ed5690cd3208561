"""``data/status.json``: a running node's snapshot for admin commands on its machine.

Written by the node every second (server.py), read by ``utesla-cli``; this module is
the only one that knows the file's name and format.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from .keys import write_atomic

__all__ = ["STATUS_FILE", "write_status", "remove_status"]

STATUS_FILE = "status.json"


def write_status(data_dir: Path, snapshot: dict) -> None:
    """Replace the status file (no fsync: it is rewritten every second)."""
    data = json.dumps({"updated": time.time(), "pid": os.getpid(), **snapshot})
    write_atomic(Path(data_dir) / STATUS_FILE, data.encode(), 0o644, durable=False)


def remove_status(data_dir: Path) -> None:
    try:
        (Path(data_dir) / STATUS_FILE).unlink()
    except OSError:
        pass
