"""Blocking work in services: worker threads and processes, and the loop watchdog.

Handlers hand blocking calls to ``self.run_in_thread`` and CPU work to
``self.run_in_process``; other requests go on meanwhile.  When the client leaves, the
handler is cancelled at once: work that had not started never starts, work that had
runs on and its result is dropped.  A handler that blocks the loop itself is named in
the log, with how long, and shows in ``utesla_loop_lag_seconds``.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import re
import textwrap
import threading
import time

import pytest

from helpers import NodeProcess, folder_config, register_user, wait_for
from utesla_node.client import Client
from utesla_node.workers import Workers, WorkersClosed

THREADED = """
    def wait_for_release(view, tag):
        view.started.append(tag)
        released = view.release.wait(60)
        view.finished.append(tag)
        return f"{tag} done" if released else "never released"

    class Handler:
        async def get(self):
            tag = self.args["tag"]
            try:
                await self.write(await self.run_in_thread(wait_for_release, self.node, tag))
            except BaseException:
                self.node.cancelled.append(tag)
                raise
"""

PROCESSES = """
    import hashlib
    import os
    import time
    from pathlib import Path

    def digest(n):
        return os.getpid(), hashlib.sha256(b"x" * n).hexdigest()

    def hold(folder, tag):
        Path(folder, f"started-{tag}").write_text(str(os.getpid()))
        deadline = time.monotonic() + 60
        while not Path(folder, "release").exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return f"{tag} done"

    class Handler:
        async def get(self):
            what = self.args.get("what")
            if what == "digest":
                pid, hexdigest = await self.run_in_process(digest, int(self.args["n"]))
                await self.write({"pid": pid, "sha256": hexdigest})
            elif what == "lambda":
                try:
                    await self.run_in_process(lambda: 1)
                except TypeError as exc:
                    await self.write(str(exc))
            else:
                tag = self.args["tag"]
                try:
                    await self.write(await self.run_in_process(hold, self.args["folder"], tag))
                except BaseException:
                    self.node.cancelled.append(tag)
                    raise
"""

SLEEPER = """
    import time

    class Handler:
        async def get(self):
            if self.args.get("thread"):
                await self.run_in_thread(time.sleep, 1.0)
            else:
                time.sleep(1.0)
            await self.write("slept")
"""


def view_of(h):
    """The NodeView the node's handlers see as ``self.node``."""
    return h.node.dispatcher.service_view


# --------------------------------------------------------------------------- threads

async def test_a_blocking_call_in_a_thread_leaves_the_node_answering(make_node):
    h = await make_node({"threaded": THREADED})
    view = view_of(h)
    view.release, view.started, view.finished, view.cancelled = threading.Event(), [], [], []
    c = h.client()
    slow = asyncio.ensure_future(c.get("/threaded", args={"tag": "a"}))
    await wait_for(lambda: view.started == ["a"], 10)
    for _ in range(20):                            # the loop is free while the thread blocks
        assert (await c.get("/hello_world")).text == "Hello World!"
    assert not slow.done() and h.node.workers.busy["thread"] == 1
    view.release.set()
    assert (await slow).text == "a done"
    assert view.cancelled == []


async def test_a_client_leaving_cancels_the_handler_and_work_not_started(make_node):
    h = await make_node({"threaded": THREADED}, worker_threads=1)
    view = view_of(h)
    view.release, view.started, view.finished, view.cancelled = threading.Event(), [], [], []
    workers = h.node.workers
    c = h.client()
    a = asyncio.ensure_future(c.get("/threaded", args={"tag": "a"}))
    await wait_for(lambda: view.started == ["a"], 10)
    b = asyncio.ensure_future(c.get("/threaded", args={"tag": "b"}))
    await wait_for(lambda: workers.stats()["worker_threads_waiting"] == 1, 10)

    a.cancel()                                   # the client gives up on both
    b.cancel()
    await wait_for(lambda: sorted(view.cancelled) == ["a", "b"], 10)
    # a's thread is still blocked (its result will be dropped); b never started.
    assert view.started == ["a"] and view.finished == []
    assert workers.busy["thread"] == 1 and workers.stats()["worker_threads_waiting"] == 0

    view.release.set()
    await wait_for(lambda: view.finished == ["a"] and workers.busy["thread"] == 0, 10)
    assert (await c.get("/threaded", args={"tag": "c"})).text == "c done"
    assert view.started == ["a", "c"]            # b's work never ran


# --------------------------------------------------------------------------- processes

async def test_cpu_work_runs_in_another_process(make_node):
    h = await make_node({"cpu": PROCESSES}, worker_processes=1)
    c = h.client(timeout=60)
    reply = (await c.get("/cpu", args={"what": "digest", "n": 1 << 20})).json()
    assert reply["sha256"] == hashlib.sha256(b"x" * (1 << 20)).hexdigest()
    assert reply["pid"] != os.getpid()
    # What cannot go to another process is said in words, before anything waits.
    text = (await c.get("/cpu", args={"what": "lambda"})).text
    assert "run_in_process() needs a module-level function" in text


async def test_process_work_not_started_is_cancelled_when_the_client_leaves(make_node,
                                                                             tmp_path):
    h = await make_node({"cpu": PROCESSES}, worker_processes=1)
    view = view_of(h)
    view.cancelled = []
    workers = h.node.workers
    folder = tmp_path / "signals"
    folder.mkdir()
    c = h.client(timeout=90)
    args = {"folder": str(folder)}
    a = asyncio.ensure_future(c.get("/cpu", args={**args, "tag": "a"}))
    await wait_for(lambda: (folder / "started-a").exists(), 60)       # a process start
    b = asyncio.ensure_future(c.get("/cpu", args={**args, "tag": "b"}))
    await wait_for(lambda: workers.stats()["worker_processes_waiting"] == 1, 10)
    a.cancel()
    b.cancel()
    await wait_for(lambda: sorted(view.cancelled) == ["a", "b"], 10)
    assert workers.busy["process"] == 1           # a runs on in its process

    (folder / "release").touch()
    await wait_for(lambda: workers.busy["process"] == 0, 60)
    assert (await c.get("/cpu", args={**args, "tag": "c"})).text == "c done"
    assert sorted(p.name for p in folder.iterdir()) == ["release", "started-a", "started-c"]


def alive(pid: int) -> bool:
    """Whether process ``pid`` exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except FileNotFoundError:
        return False


async def test_a_stopping_node_ends_its_worker_processes(make_node, tmp_path):
    h = await make_node({"cpu": PROCESSES}, worker_processes=1, grace_period=0.5)
    folder = tmp_path / "signals"
    folder.mkdir()
    stuck = asyncio.ensure_future(h.client(timeout=90).get(
        "/cpu", args={"folder": str(folder), "tag": "a"}))
    await wait_for(lambda: (folder / "started-a").exists()
                   and (folder / "started-a").read_text(), 60)
    pid = int((folder / "started-a").read_text())
    assert alive(pid)
    await h.stop()                               # never released: the job is abandoned
    await wait_for(lambda: not alive(pid), 30)
    with pytest.raises(Exception):
        await stuck


STUCK = """
    import time

    class Handler:
        async def get(self):
            await self.run_in_thread(time.sleep, 3600)
"""


async def test_a_thread_stuck_in_a_blocking_call_does_not_keep_the_node_alive(tmp_path):
    """SIGTERM: the node drains, cancels the handler, and exits, its worker thread still
    asleep (a ThreadPoolExecutor's thread would hold the exit for an hour)."""
    folder = tmp_path / "node"
    (folder / "complements").mkdir(parents=True)
    (folder / "complements" / "stuck.py").write_text(textwrap.dedent(STUCK))
    (folder / "node.ini").write_text("[server]\nport = 0\ngrace_period = 0.5\n")
    node = NodeProcess(folder, "--config", "node.ini")
    await asyncio.to_thread(node.start)
    status = folder / "data" / "status.json"

    def in_flight() -> bool:
        try:
            return json.loads(status.read_text()).get("inflight") == 1
        except (FileNotFoundError, ValueError):
            return False

    try:
        key = await register_user(folder_config(folder, "--config", "node.ini"), "alice")
        async with Client(f"utesla://127.0.0.1:{node.port}", user="alice", private_key=key,
                          node_key=folder / "keys" / "key.pub", timeout=60) as c:
            c.token = await c.generate_token("pw")
            call = asyncio.ensure_future(c.get("/stuck"))
            await wait_for(in_flight, 20)        # the handler waits on its thread
            assert await asyncio.to_thread(node.stop, 15, 30) == 0
            with pytest.raises(Exception):
                await call
    finally:
        node.stop()
        node.proc.stdout.close()


async def test_the_pools_are_bounded_and_closed_with_the_node():
    workers = Workers(threads=2, processes=0)
    gate = threading.Event()
    running = [asyncio.ensure_future(workers.run_in_thread(gate.wait, 30)) for _ in range(3)]
    await wait_for(lambda: workers.busy["thread"] == 2, 10)
    assert workers.stats()["worker_threads_waiting"] == 1
    with pytest.raises(WorkersClosed, match="worker_processes = 0"):
        await workers.run_in_process(os.getpid)
    gate.set()
    assert await asyncio.gather(*running) == [True, True, True]
    workers.close()
    with pytest.raises(WorkersClosed, match="stopping"):
        await workers.run_in_thread(time.time)


async def test_an_exception_in_a_thread_reaches_the_handler():
    workers = Workers(threads=1, processes=0)
    with pytest.raises(ZeroDivisionError):
        await workers.run_in_thread(lambda: 1 / 0)
    assert workers.busy["thread"] == 0 and await workers.run_in_thread(lambda: 7) == 7
    workers.close()


# --------------------------------------------------------------------------- the watchdog

def blocks(caplog) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "utesla.loop"]


def lag_samples(h) -> int:
    hist = h.node.metrics.other_latency.get("loop_lag")
    return hist.n if hist is not None else 0


async def test_a_service_that_blocks_the_loop_is_named_with_how_long(make_node, caplog):
    caplog.set_level(logging.WARNING, logger="utesla.loop")
    h = await make_node({"sleeper": SLEEPER}, loop_block_threshold=0.2)
    c = h.client()
    # The same sleep in a worker thread blocks nothing.
    assert (await c.get("/sleeper", args={"thread": 1})).text == "slept"
    seen = lag_samples(h)
    await wait_for(lambda: lag_samples(h) >= seen + 2, 10)       # ticks ran after it
    assert blocks(caplog) == []

    assert (await c.get("/sleeper")).text == "slept"
    await wait_for(lambda: blocks(caplog), 10)
    (record,) = blocks(caplog)
    message = record.getMessage()
    assert "by service /sleeper (" in message and "in get)" in message, message
    held = float(re.search(r"blocked for ([0-9.]+) s", message).group(1))
    assert held >= 0.8, message
    page = await h.node.prometheus()
    assert "utesla_loop_blocked 1" in page
    count = int(re.search(r"^utesla_loop_lag_seconds_count (\d+)$", page, re.M).group(1))
    under = int(re.search(r'^utesla_loop_lag_seconds_bucket\{le="0.5"\} (\d+)$', page,
                          re.M).group(1))
    assert count - under == 1                      # one tick more than 0.5 s late
    assert float(re.search(r"^utesla_loop_lag_seconds_sum ([0-9.e+-]+)$", page,
                           re.M).group(1)) >= 0.8


async def test_a_block_outside_any_service_names_the_code(make_node, caplog):
    caplog.set_level(logging.WARNING, logger="utesla.loop")
    h = await make_node(loop_block_threshold=0.2)
    seen = lag_samples(h)
    await wait_for(lambda: lag_samples(h) >= seen + 1, 10)       # the watch is running
    time.sleep(0.6)                     # this test's own code, on the node's loop
    await wait_for(lambda: blocks(caplog), 10)
    message = blocks(caplog)[0].getMessage()
    assert "test_workers.py:" in message and "(not in a service)" in message, message
