"""``utesla_node.status``: the running node's ``data/status.json``, written and read in one place.

A reader accepts the file only while its writer lives: fresh (``updated`` within
``MAX_AGE``) and written by a process that still exists.  Anything else is
``NodeNotRunning``, naming the data folder and what was found.
"""
from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time

import pytest

from helpers import NodeHarness, wait_for
from utesla_node import status
from utesla_node.status import NodeNotRunning, encode_status, read_status, write_status

SNAPSHOT = {"version": "0.1.0", "fingerprint": "SHA256:abc", "services": ["hello_world"],
            "network": {"links": [], "routes": [], "local": ["hello_world"]}}


@pytest.fixture(scope="module")
def dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    with pytest.raises(ProcessLookupError):
        os.kill(proc.pid, 0)
    return proc.pid


def test_written_status_reads_back_with_time_and_pid(tmp_path):
    data = tmp_path / "data"
    write_status(data, encode_status(SNAPSHOT, now=1000.0))
    path = data / "status.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    raw = json.loads(path.read_text())
    assert raw == {"updated": 1000.0, "pid": os.getpid(), **SNAPSHOT}
    assert read_status(data, now=1001.0) == raw
    assert [p.name for p in data.iterdir()] == ["status.json"]      # no temporary left


def test_missing_file_means_no_node_and_names_the_folder(tmp_path):
    with pytest.raises(NodeNotRunning) as info:
        read_status(tmp_path / "data")
    msg = str(info.value)
    assert f"no node is running with data folder {tmp_path / 'data'}" in msg
    assert "data/status.json" in msg and "does not exist" in msg
    assert info.value.data_dir == tmp_path / "data"


@pytest.mark.parametrize("age,why", [(status.MAX_AGE + 0.5, "last written 6 s ago"),
                                     (-status.MAX_AGE - 60, "in the future")])
def test_a_file_not_rewritten_lately_is_no_node(tmp_path, age, why):
    write_status(tmp_path, encode_status(SNAPSHOT, now=5000.0))
    with pytest.raises(NodeNotRunning, match=why):
        read_status(tmp_path, now=5000.0 + age)
    assert read_status(tmp_path, now=5000.0 + status.MAX_AGE)["fingerprint"] == "SHA256:abc"


def test_a_fresh_file_of_an_exited_process_is_no_node(tmp_path, dead_pid):
    """A node killed a moment ago (SIGKILL skips its clean-up) left a fresh file."""
    write_status(tmp_path, encode_status(SNAPSHOT, pid=dead_pid))
    with pytest.raises(NodeNotRunning, match=f"written by process {dead_pid}, which has exited"):
        read_status(tmp_path)


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'{"updated": 1.0}',
                                     b'{"updated": "now", "pid": 1}',
                                     b'{"updated": NaN, "pid": 1}',
                                     b'{"updated": 1.0, "pid": true}',
                                     b'{"updated": 1.0, "pid": 0}'])
def test_damaged_or_foreign_files_are_no_node(tmp_path, content):
    (tmp_path / "status.json").write_bytes(content)
    with pytest.raises(NodeNotRunning):
        read_status(tmp_path, now=1.0)


def test_remove_status_is_quiet_when_the_file_is_gone(tmp_path):
    write_status(tmp_path, encode_status(SNAPSHOT))
    status.remove_status(tmp_path)
    status.remove_status(tmp_path)
    assert not (tmp_path / "status.json").exists()


async def test_a_running_node_keeps_its_status_fresh_and_removes_it_on_stop(tmp_path):
    h = NodeHarness(tmp_path / "n")
    await h.start()
    data = h.config.data_dir
    try:
        def fresh():
            try:
                return read_status(data)
            except NodeNotRunning:
                return None

        first = await wait_for(fresh, 15)
        assert first["pid"] == os.getpid()
        assert first["fingerprint"] == h.key.public.fingerprint()
        assert first["address"] == [h.config.host, h.port]
        assert "hello_world" in first["network"]["local"]
        # Rewritten (every second): a later read sees a later stamp.
        await wait_for(lambda: (fresh() or first)["updated"] > first["updated"], 15)
        assert time.time() - read_status(data)["updated"] < status.MAX_AGE
    finally:
        await h.stop()
    assert not (data / "status.json").exists()
    with pytest.raises(NodeNotRunning):
        read_status(data)
