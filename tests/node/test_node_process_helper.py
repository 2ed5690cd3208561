"""The ``helpers.NodeProcess`` test helper itself: no log handle left open, stop() idempotent,
start() bounded in time whatever the child does."""
from __future__ import annotations

import gc
import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

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
    gc.collect()      # what earlier tests left to the collector warns now, not below
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        node = NodeProcess(tmp_path, "--port", "0").start()
        gc.collect()                                   # an abandoned handle would warn here
    try:
        assert [str(w.message) for w in caught if w.category is ResourceWarning] == []
        log = str((tmp_path / "node.log").resolve())
        assert log not in _open_files()               # only the node holds its log open
        assert node.stop() == 0
        assert node.proc.stdout.closed                # stop() closes the pipe it read
        assert node.stop() == 0                       # again: the same code, no error
        assert node.proc.returncode == 0
        assert "stopping (SIGTERM)" in node.log()
    finally:
        if node.proc.poll() is None:
            node.proc.kill()
            node.proc.wait()
        node.proc.stdout.close()


#: Children that never print the two lines start() waits for, and never exit.
SILENT_CHILDREN = {
    "prints-nothing": "",
    "half-a-line": "sys.stdout.write('utesla-node starting'); sys.stdout.flush()",
    "no-key-line": "print('utesla-node listening on utesla://127.0.0.1:1', flush=True)",
}


@pytest.mark.parametrize("prints", SILENT_CHILDREN.values(), ids=SILENT_CHILDREN.keys())
def test_start_gives_up_at_its_time_limit_on_a_child_that_never_starts(tmp_path, prints):
    """Issue 17 item 5: start() used to block in readline() for as long as the child
    stayed silent.  (The worker thread and its bound only keep the test from hanging.)"""
    script = tmp_path / "silent.py"
    script.write_text(f"import sys, time\n{prints}\nwhile True:\n    time.sleep(3600)\n")
    node = NodeProcess(tmp_path, program=[sys.executable, script])
    with ThreadPoolExecutor(1) as pool:
        started = pool.submit(node.start, 1.0)
        try:
            with pytest.raises(AssertionError, match=r"node did not start within 1 s \(killed\)"):
                started.result(timeout=30)
            assert node.proc.poll() is not None           # the silent child was killed
        finally:
            if node.proc is not None and node.proc.poll() is None:
                node.proc.kill()
                node.proc.wait()
    node.proc.stdout.close()
