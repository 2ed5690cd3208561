"""The ``helpers.NodeProcess`` test helper itself: no log handle left open, stop() idempotent."""
from __future__ import annotations

import gc
import os
import warnings
from pathlib import Path

from helpers import NodeProcess


def _open_files() -> set[str]:
    """What this process's file descriptors point to (Linux ``/proc``)."""
    paths = set()
    for fd in Path("/proc/self/fd").iterdir():
        try:
            paths.add(os.readlink(fd))
        except OSError:          # the descriptor iterdir() itself used, closed by now
            pass
    return paths


def test_node_process_closes_its_log_handle_and_stop_is_idempotent(tmp_path):
    assert NodeProcess(tmp_path).stop() == 0           # never started: nothing to stop
    gc.collect()               # what earlier tests left in reference cycles is not ours
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        node = NodeProcess(tmp_path, "--port", "0").start()
        gc.collect()                                   # an abandoned handle would warn here
    try:
        assert [str(w.message) for w in caught if w.category is ResourceWarning] == []
        log = str((tmp_path / "node.log").resolve())
        assert log not in _open_files()               # only the node holds its log open
        assert node.stop() == 0
        assert node.stop() == 0                       # again: the same code, no error
        assert node.proc.returncode == 0
        assert "stopping (SIGTERM)" in node.log()
    finally:
        if node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait()
        node.proc.stdout.close()
