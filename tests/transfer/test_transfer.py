"""Large transfers (issue 6): streaming, flow control, bounded memory.

- 256 MiB up (to /sink, from an async generator) and down (from /source), directly and
  through a forward, with SHA-256 checked on both ends;
- a slow reader does not grow the sender's memory (a ``utesla-node`` subprocess's VmRSS;
  an in-process node's session backlog against its high-water mark);
- a client that vanishes mid-upload to /files leaves no partial file, and the node serves on;
- a forward hop that dies mid-stream is a clear error for the client, not a hang;
- small requests share a connection with two 256 MiB transfers without waiting behind them
  (their p50/p99 is printed: ``pytest -s``);
- ``utesla-cli call`` uploads and downloads files.

Tests marked ``big`` move 256 MiB each way or more (``-m "not big"`` skips them).  Every
wait is on a condition with a bound; the only timed pauses are the slow reader's own
pacing and the length of a measuring window.  Nodes run in-process, except where a test
measures a node process's memory.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pty
import random
import re
import shutil
import statistics
import subprocess
import time
from pathlib import Path

import pytest

from complements.source import expected_sha256
from helpers import (BIN, REPO, NodeProcess, SlowReaderProxy, abort_connection, folder_config,
                     proc_status, register_user, routes, run_cli, wait_for)
from protocol import Settings
from protocol.errors import StatusError
from utesla_node import Client
from utesla_node.keys import load_public_key, write_key_pair

MiB = 1 << 20
BIG = 256 * MiB
PIECE = 256 * 1024
_rng = random.Random(6)
#: Three different blocks in turn: a lost, repeated or reordered piece changes the hash.
BLOCKS = [_rng.randbytes(PIECE) for _ in range(3)]


class Body:
    """``n`` bytes as an async iterator of 256 KiB pieces, hashed as they are handed out."""

    def __init__(self, n: int):
        self.n = n
        self.sent = 0
        self.sha = hashlib.sha256()

    async def _gen(self):
        i = 0
        while self.sent < self.n:
            chunk = BLOCKS[i % 3][:self.n - self.sent]
            i += 1
            self.sha.update(chunk)
            self.sent += len(chunk)
            yield chunk

    def __aiter__(self):
        return self._gen()


async def download(client: Client, n: int, progress: list | None = None,
                   pause: float = 0.0) -> tuple[int, str]:
    """GET /source?n=N: (bytes received, their SHA-256); ``progress[0]`` follows along."""
    h, size = hashlib.sha256(), 0
    async with client.stream("GET", "/source", args={"n": n}) as resp:
        async for chunk in resp:
            h.update(chunk)
            size += len(chunk)
            if progress is not None:
                progress[0] = size
            if pause:
                await asyncio.sleep(pause)          # the slow reader's pace
    return size, h.hexdigest()


def _forwarded(h) -> int:
    return h.node.metrics.snapshot().get("forwarded_requests", 0)


async def _pair(net):
    """Two linked in-process nodes: ``far`` offers the examples, ``near`` offers nothing
    and forwards."""
    far = await net.node("far", examples=True, request_timeout=120.0)
    near = await net.node("near", request_timeout=120.0)
    await net.link(near, far, service="source")
    await wait_for(lambda: routes(near, "sink") and routes(near, "files"), 10)
    assert near.node.registry.resolve(["source"]) is None
    return near, far


# --------------------------------------------------------------------------- 256 MiB

async def _up_and_down(client: Client) -> None:
    body = Body(BIG)
    reply = await client.post("/sink", body=body)
    assert body.sent == BIG
    assert reply.json() == {"bytes": BIG, "sha256": body.sha.hexdigest()}
    size, digest = await download(client, BIG)
    assert size == BIG
    assert digest == expected_sha256(BIG)


@pytest.mark.big
async def test_256_mib_up_and_down_directly(make_node):
    node = await make_node()
    client = node.client(timeout=90)
    await _up_and_down(client)
    assert len(node.node.sessions) == 1


@pytest.mark.big
async def test_256_mib_up_and_down_through_a_forward(net):
    near, far = await _pair(net)
    client = near.client(timeout=90)
    await _up_and_down(client)
    assert _forwarded(near) == 2


# --------------------------------------------------------------------------- slow readers

def _node_folder(path: Path) -> Path:
    (path / "complements").mkdir(parents=True)
    for f in (REPO / "complements").glob("*.py"):
        shutil.copy(f, path / "complements" / f.name)
    return path


async def _process_client(node: NodeProcess, url: str | None = None, **kw) -> Client:
    """A client of ``alice`` (registered in the node's database) with a fresh token."""
    cfg = folder_config(node.folder)
    key = await register_user(cfg, "alice")
    node_key = load_public_key(cfg.keys_dir / "key.pub")
    c = Client(url or f"utesla://127.0.0.1:{node.port}", user="alice", private_key=key,
               node_key=node_key, **kw)
    c.token = await c.generate_token("pw")
    return c


async def _cancel(tasks: list[asyncio.Task]) -> None:
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def test_slow_reader_does_not_grow_the_node_process_memory(tmp_path, procs):
    """A ``utesla-node`` process streaming 256 MiB sources to readers far slower than it:
    its RSS stays within 40 MiB of its idle size (read from /proc, every 50 ms)."""
    node = NodeProcess(_node_folder(tmp_path / "n"), "--port", "0")
    procs.append(node)
    node.start()
    pid = node.proc.pid
    direct = await _process_client(node)
    proxy = await SlowReaderProxy(node.port, rate=4 * MiB).start()
    # The slowest reader possible short of none: 16 MiB windows on four streams let the
    # node send 64 MiB it cannot get rid of; only its own back-pressure bounds it.
    slow = Client(proxy.url, user="alice", private_key=direct.private_key,
                  node_key=direct.node_key, token=direct.token, settings=Settings(window=16 * MiB))
    tasks: list[asyncio.Task] = []
    try:
        # Warm up every path the measured phases take, then take the idle size.
        assert (await download(direct, 8 * MiB))[0] == 8 * MiB
        assert (await download(slow, 1 * MiB))[0] == 1 * MiB
        idle = proc_status(pid)
        samples: list[int] = []

        async def sample():
            while True:
                samples.append(proc_status(pid))
                await asyncio.sleep(0.05)

        sampler = asyncio.get_running_loop().create_task(sample())
        tasks.append(sampler)
        # 1: the application reads slowly (a pause between chunks) on a direct connection.
        progress = [0]
        reader = asyncio.get_running_loop().create_task(
            download(direct, BIG, progress, pause=0.02))
        tasks.append(reader)
        await wait_for(lambda: progress[0] >= 4 * MiB, 20)
        await wait_for(lambda: progress[0] >= 12 * MiB or reader.done(), 20)
        assert not reader.done()
        await _cancel([reader])
        # 2: the socket is read slowly (4 MiB/s through the proxy), then not at all.
        readers = [asyncio.get_running_loop().create_task(download(slow, BIG))
                   for _ in range(4)]
        tasks += readers
        start = proxy.relayed
        await wait_for(lambda: proxy.relayed - start >= 6 * MiB, 20)
        proxy.pause()
        stalled = len(samples)
        await wait_for(lambda: len(samples) >= stalled + 20, 10)   # a 1 s measuring window
        proxy.resume()
        await wait_for(lambda: proxy.relayed - start >= 10 * MiB, 20)
        assert not any(t.done() for t in readers)
        await _cancel(readers)
        sampler.cancel()
        peak = max(samples)
        hwm = proc_status(pid, "VmHWM")
        print(f"\nnode RSS idle {idle / MiB:.1f} MiB, peak while slow readers ran "
              f"{peak / MiB:.1f} MiB (+{(peak - idle) / MiB:.1f} MiB; VmHWM {hwm / MiB:.1f} "
              f"MiB), {len(samples)} samples")
        assert peak - idle < 40 * MiB
        # The node is fine afterwards.
        assert (await direct.get("/hello_world")).text == "Hello World!"
    finally:
        await _cancel(tasks)
        await slow.close()
        await direct.close()
        await proxy.stop()
    assert node.stop() == 0


async def test_slow_reader_holds_the_node_backlog_near_its_high_water_mark(make_node):
    """In-process: the node's write backlog for a slow reader never passes the high-water
    mark by more than a couple of records, however much credit the reader grants; and
    with the default window, a reader that pauses between chunks holds no more than the
    window it granted."""
    node = await make_node()
    high = node.config.write_high_water
    proxy = await SlowReaderProxy(node.port, rate=32 * MiB).start()
    client = Client(proxy.url, user="alice", private_key=node.keys["alice"],
                    node_key=node.key.public, token=node.tokens["alice"],
                    settings=Settings(window=16 * MiB))
    readers: list[asyncio.Task] = []
    try:
        await client.connect()
        [session] = node.node.sessions
        peak = [0, 0]                       # over the test, over this stall
        write = session.writer.write

        def spy(data):                      # the backlog after every write the node makes
            write(data)
            backlog = session.backlog()
            peak[0] = max(peak[0], backlog)
            peak[1] = max(peak[1], backlog)

        session.writer.write = spy
        for _ in range(3):                  # three rounds of: stall, catch up, give up
            proxy.pause()
            peak[1] = 0
            readers = [asyncio.get_running_loop().create_task(download(client, BIG))
                       for _ in range(4)]
            # Until the node's backlog passes the mark (from there on its writers wait).
            await wait_for(lambda: peak[1] > high, 20)
            proxy.resume()
            mark = proxy.relayed
            await wait_for(lambda: proxy.relayed - mark >= 4 * MiB, 20)   # it flows again
            assert not any(t.done() for t in readers)
            await _cancel(readers)          # streams reset: the node stops producing
            await wait_for(lambda: session.backlog() == 0, 20)            # and drains
        limit = high + 2 * session.conn.peer_max_record
        print(f"\nnode backlog peak {peak[0] / MiB:.2f} MiB (high water {high / MiB:.2f} MiB)")
        assert high < peak[0] <= limit
    finally:
        await _cancel(readers)
        await client.close()
        await proxy.stop()

    # The application-level slow reader, directly: it never holds more than its window.
    await wait_for(lambda: not node.node.sessions, 10)
    direct = node.client()
    async with direct.stream("GET", "/source", args={"n": BIG}) as resp:
        window = direct._session.conn.settings.window
        got = 0
        async for chunk in resp:
            got += len(chunk)
            assert resp._stream.buffered <= window
            if got >= 4 * MiB:
                break
            await asyncio.sleep(0.005)          # the slow reader's pace
    [session] = node.node.sessions
    assert session.backlog() <= window + session.conn.peer_max_record


# --------------------------------------------------------------------------- broken uploads

def _leftovers(share: Path, name: str) -> list[str]:
    if not share.is_dir():
        return []
    return sorted(p.name for p in share.iterdir()
                  if p.name == name or (p.name.startswith(f".{name}.") and p.name.endswith(".part")))


@pytest.mark.parametrize("how", ["reset", "eof"])
async def test_client_vanishing_mid_upload_leaves_no_partial_file(make_node, how):
    node = await make_node()
    share = node.config.share_dir
    client = node.client()
    body = Body(1 << 40)                      # more than will ever be sent
    upload = asyncio.get_running_loop().create_task(client.put("/files/big.bin", body=body))

    def part_size() -> int:
        return sum(p.stat().st_size for p in share.glob(".big.bin.*.part")) if share.is_dir() \
            else 0

    await wait_for(lambda: part_size() >= 4 * MiB, 20)      # the upload is well under way
    session = client._session
    if how == "reset":
        abort_connection(session.writer)      # as a crashed host's kernel would
    else:
        session.writer.transport.close()      # TCP FIN, no protocol CLOSE: truncation
    with pytest.raises(StatusError):
        await asyncio.wait_for(upload, 20)
    await wait_for(lambda: not node.node.sessions and node.node.inflight == 0, 10)
    assert _leftovers(share, "big.bin") == []
    # The node keeps serving, uploads included.
    again = node.client()
    assert (await again.get("/hello_world")).text == "Hello World!"
    assert (await again.put("/files/small.bin", body=b"x" * 1000)).json() == \
        {"name": "small.bin", "bytes": 1000}
    assert sorted(p.name for p in share.iterdir()) == ["small.bin"]


# --------------------------------------------------------------------------- dying hops

@pytest.mark.parametrize("direction", ["download", "upload"])
async def test_forward_hop_dying_mid_stream_is_a_clear_error(net, direction):
    near, far = await _pair(net)
    client = near.client(timeout=60)
    progress = [0]
    if direction == "download":
        task = asyncio.get_running_loop().create_task(download(client, BIG, progress))
        await wait_for(lambda: progress[0] >= 8 * MiB, 30)
    else:
        body = Body(BIG)
        task = asyncio.get_running_loop().create_task(client.post("/sink", body=body))
        await wait_for(lambda: body.sent >= 8 * MiB, 30)
    session = client._session
    await net.kill(far)
    with pytest.raises(StatusError) as info:
        await asyncio.wait_for(task, 20)
    message = str(info.value)
    print(f"\n{direction}: {type(info.value).__name__} ({info.value.status}): {message}")
    assert info.value.status == 503
    # "link to utesla://HOST:PORT failed mid-answer: connection lost: ..." or, when the
    # request body's relay notices first, "forwarding the body to utesla://HOST:PORT
    # failed: connection lost: ...": either way the failed link is named.
    assert re.search(r"(link to|forwarding the body to) utesla://127\.0\.0\.1:\d+ .*failed.*: \S",
                     message), message
    # Only that stream failed: the client's connection to the near node serves on.
    assert (await client.get("/_node/ping")).text == "pong"
    assert client._session is session
    await wait_for(lambda: near.node.inflight == 0, 10)


# --------------------------------------------------------------------------- sharing

@pytest.mark.big
async def test_small_requests_are_not_stuck_behind_big_transfers(make_node):
    node = await make_node()
    client = node.client(timeout=90)
    assert (await client.get("/hello_world")).text == "Hello World!"
    loop = asyncio.get_running_loop()
    progress = [0]
    down = loop.create_task(download(client, BIG, progress))
    body = Body(BIG)
    up = loop.create_task(client.post("/sink", body=body))
    await wait_for(lambda: progress[0] >= 8 * MiB and body.sent >= 8 * MiB, 30)
    latencies, during = [], 0
    for _ in range(200):
        t0 = time.perf_counter()
        reply = await client.get("/hello_world")
        latencies.append(time.perf_counter() - t0)
        assert reply.text == "Hello World!"
        during += not down.done() and not up.done()
    left = BIG - progress[0], BIG - body.sent
    q = statistics.quantiles(latencies, n=100)
    p50, p99 = statistics.median(latencies), q[98]
    print(f"\n200 GET /hello_world beside a 256 MiB download and a 256 MiB upload on the "
          f"same connection: p50 {p50 * 1000:.1f} ms, p99 {p99 * 1000:.1f} ms, max "
          f"{max(latencies) * 1000:.1f} ms; {during}/200 finished while both ran "
          f"({left[0] / MiB:.0f} MiB down and {left[1] / MiB:.0f} MiB up still to go)")
    assert during >= 150, "the transfers ended first: the latencies were not measured beside them"
    assert p99 < 1.0
    assert await down == (BIG, expected_sha256(BIG))
    assert (await up).json()["sha256"] == body.sha.hexdigest()
    assert len(node.node.sessions) == 1


# --------------------------------------------------------------------------- utesla-cli call

async def test_cli_call_uploads_and_downloads_files(make_node, tmp_path):
    node = await make_node()
    write_key_pair(node.keys["alice"], tmp_path / "a.pub", tmp_path / "a.priv")
    (tmp_path / "node.pub").write_text(node.key.public.to_pem())
    who = ["-u", "alice", "-I", tmp_path / "a.priv", "-s", tmp_path / "node.pub",
           "-t", node.tokens["alice"]]
    url = f"{node.url}/files/copy.bin"
    data = random.Random(7).randbytes(6 * MiB + 12345)
    (tmp_path / "in.bin").write_bytes(data)

    def cli(*args, **kw):
        return asyncio.to_thread(run_cli, "call", *args, *who, **kw)

    up = await cli(url, "-X", "PUT", "--upload", tmp_path / "in.bin")
    assert json.loads(up.stdout) == {"name": "copy.bin", "bytes": len(data)}
    assert up.stderr == ""                                  # piped: no progress
    assert (node.config.share_dir / "copy.bin").read_bytes() == data
    down = await cli(url, "-o", tmp_path / "out.bin")
    assert (down.stdout, down.stderr) == ("", "")
    assert (tmp_path / "out.bin").read_bytes() == data
    piped = await asyncio.to_thread(
        subprocess.run, [str(BIN / "utesla-cli"), "call", url, *map(str, who)],
        capture_output=True, timeout=60)
    assert (piped.returncode, piped.stderr) == (0, b"")
    assert piped.stdout == data
    missing = await cli(f"{node.url}/files/nope.bin", check=False)
    assert missing.returncode == 1 and missing.stdout == ""
    [line] = missing.stderr.splitlines()
    assert line.startswith("error:") and "nope.bin" in line and "404" in line

    # On a terminal, the same download draws a progress line.
    master, slave = pty.openpty()
    try:
        tty = await asyncio.to_thread(
            subprocess.run, [str(BIN / "utesla-cli"), "call", url, "-o",
                             str(tmp_path / "tty.bin"), *map(str, who)],
            stdout=subprocess.DEVNULL, stderr=slave, timeout=60)
        os.close(slave)
        slave = None
        shown = b""
        while True:
            try:
                more = os.read(master, 65536)
            except OSError:                     # EIO: the writer side is closed
                break
            if not more:
                break
            shown += more
    finally:
        if slave is not None:
            os.close(slave)
        os.close(master)
    assert tty.returncode == 0
    assert b"download:" in shown and b"6.0 MiB" in shown
    assert (tmp_path / "tty.bin").read_bytes() == data
