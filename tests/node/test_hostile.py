"""Hostile and odd clients against a running node, over raw asyncio sockets.

Whatever one connection does, the node closes it (or stops reading from it) and
keeps serving everybody else.
"""
from __future__ import annotations

import asyncio
import os
import struct
import time

import pytest

from helpers import GATE_SERVICE, wait_for
from protocol import Connection, Role, Settings
from protocol.errors import ProtocolError, Unavailable


async def _raw(node, host="127.0.0.1", local=None):
    return await asyncio.open_connection(host, node.port, local_addr=local)


async def _closed_by_node(reader: asyncio.StreamReader, timeout: float = 5.0) -> bytes:
    """Read until the node closes the connection; returns what it sent meanwhile."""
    async def read() -> bytes:
        data = b""
        while True:
            try:
                chunk = await reader.read(65536)
            except ConnectionError:
                return data
            if not chunk:
                return data
            data += chunk
    return await asyncio.wait_for(read(), timeout)     # (asyncio.timeout: 3.11+)


async def _still_serves(node):
    c = node.client()
    assert (await c.get("/hello_world")).text == "Hello World!"
    await c.close()


def _client_hello(node, user="alice") -> tuple[Connection, bytes]:
    conn = Connection(Role.CLIENT, identity=node.keys[user], user=user,
                      server_key=node.key.public)
    conn.initiate(time.monotonic())
    return conn, conn.data_to_send()


@pytest.mark.parametrize("garbage", [
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",            # length prefix reads as ~1.2 GB
    b"\x00\x00\x00\x20" + os.urandom(32),             # a frame of random bytes
    b"\x00\x00\x00\x00",                              # zero-length frame
    b"\x00\x00\x00\x03\x93\x01\x02",                  # msgpack, but not a ClientHello
    os.urandom(4096),
], ids=["http", "random-frame", "zero-length", "wrong-message", "random"])
async def test_garbage_bytes_close_the_connection_node_serves_on(node, garbage):
    reader, writer = await _raw(node)
    writer.write(garbage)
    await _closed_by_node(reader)
    writer.close()
    await _still_serves(node)
    await wait_for(lambda: len(node.node.sessions) == 0, 5)


async def test_oversized_length_prefix_closed_at_once(make_node):
    h = await make_node(handshake_timeout=30)
    for prefix in (b"\xff\xff\xff\xff", struct.pack(">I", h.node.config.max_record + 1)):
        reader, writer = await _raw(h)
        t0 = time.monotonic()
        writer.write(prefix + b"\x00" * 16)
        await _closed_by_node(reader, timeout=5)
        assert time.monotonic() - t0 < 5          # not waiting for the handshake timeout
        writer.close()
    await _still_serves(h)


async def test_half_a_frame_then_silence_closed_at_handshake_timeout(make_node):
    h = await make_node(handshake_timeout=0.5)
    _, hello = _client_hello(h)
    reader, writer = await _raw(h)
    t0 = time.monotonic()
    writer.write(hello[:len(hello) // 2])
    await _closed_by_node(reader, timeout=5)
    elapsed = time.monotonic() - t0
    assert 0.4 <= elapsed < 5, elapsed
    writer.close()
    await _still_serves(h)


async def test_handshake_never_finished_dropped_at_handshake_timeout(make_node):
    h = await make_node(handshake_timeout=0.5)
    conn, hello = _client_hello(h)
    reader, writer = await _raw(h)
    t0 = time.monotonic()
    writer.write(hello)                            # a real ClientHello, then nothing
    got = await _closed_by_node(reader, timeout=5)
    assert got, "the node answered the hello before giving up"
    assert 0.4 <= time.monotonic() - t0 < 5
    writer.close()
    await _still_serves(h)


async def test_slowloris_dripping_the_handshake_is_dropped(make_node):
    h = await make_node(handshake_timeout=0.5)
    _, hello = _client_hello(h)
    reader, writer = await _raw(h)
    t0 = time.monotonic()
    closed = asyncio.ensure_future(_closed_by_node(reader, timeout=5))
    for b in hello:                                # one byte every 50 ms: pacing, not sync
        if closed.done():
            break
        try:
            writer.write(bytes([b]))
            await writer.drain()
        except ConnectionError:
            break
        await asyncio.sleep(0.05)
    await closed
    assert time.monotonic() - t0 < 3
    writer.close()
    await _still_serves(h)


async def test_many_idle_unauthenticated_connections_do_not_block_others(make_node):
    h = await make_node(handshake_timeout=1.0)
    conns = [await _raw(h) for _ in range(30)]
    await wait_for(lambda: len(h.node.sessions) == 30, 5)
    await _still_serves(h)
    await wait_for(lambda: len(h.node.sessions) == 0, 5)     # all dropped at the timeout
    for _, w in conns:
        w.close()


async def test_connection_limits_refuse_extra_connections(make_node):
    h = await make_node(max_connections=5, max_connections_per_ip=3, handshake_timeout=30)
    same_ip = [await _raw(h) for _ in range(3)]
    await wait_for(lambda: len(h.node.sessions) == 3, 5)
    # a 4th from the same address: refused (closed without a word)
    r4, w4 = await _raw(h)
    assert await _closed_by_node(r4, 5) == b""
    w4.close()
    # other addresses may still come, up to the total of 5
    other = [await _raw(h, local=("127.0.0.2", 0)), await _raw(h, local=("127.0.0.3", 0))]
    await wait_for(lambda: len(h.node.sessions) == 5, 5)
    r6, w6 = await _raw(h, local=("127.0.0.4", 0))
    assert await _closed_by_node(r6, 5) == b""
    w6.close()
    assert h.node.metrics.snapshot()["connections_refused"] >= 2
    # a real client is refused too while the node is full...
    with pytest.raises((Unavailable, ProtocolError)):
        await h.client(connect_timeout=5).get("/hello_world")
    # ...and served once a slot frees up
    for _, w in same_ip:
        w.close()
    await wait_for(lambda: len(h.node.sessions) <= 2, 5)
    await _still_serves(h)
    for _, w in other:
        w.close()


BIG = """
    class Handler:
        async def get(self):
            piece = b"x" * 65536
            for _ in range(int(self.args.get("n", 64))):
                await self.write(piece)
"""


async def test_client_that_never_reads_is_throttled_others_unaffected(make_node):
    high_water = 256 * 1024
    h = await make_node({"big": BIG}, write_high_water=high_water, request_timeout=20)
    # A client granting 4 MiB per stream, that stops reading at the socket.
    c = h.client(settings=Settings(window=4 << 20), timeout=30)
    session = await c.connect()
    node_session = next(iter(h.node.sessions))
    peak = 0
    write = node_session.writer.write

    def spy(data):
        nonlocal peak
        write(data)
        peak = max(peak, node_session.writer.transport.get_write_buffer_size())

    node_session.writer.write = spy
    session.writer.transport.pause_reading()
    streams = [session.open_stream("GET", "/big", token=c.token, args={"n": 64})
               for _ in range(32)]                  # 32 x 4 MiB asked for, never read
    session.flush()
    # The node fills the socket, then its own buffer up to the high-water mark, then stops.
    await wait_for(lambda: node_session.writer.transport.get_write_buffer_size() > high_water, 10)
    size = node_session.writer.transport.get_write_buffer_size()
    # Other clients are served meanwhile, on their own connections.
    for _ in range(3):
        await _still_serves(h)
    other = h.client("alice")
    replies = await asyncio.gather(*(other.get("/big", args={"n": 8}) for _ in range(4)))
    assert all(len(r.body) == 8 * 65536 for r in replies)
    bound = high_water + h.node.config.max_record      # the mark plus one record
    assert peak <= bound, (peak, bound)
    assert node_session.writer.transport.get_write_buffer_size() <= bound
    assert size <= bound
    # The node stops reading from the stalled client: a read already waiting may take
    # one more batch, after that not one byte while its answers pile up.
    read_before = node_session.bytes_in
    session.open_stream("GET", "/hello_world", token=c.token)
    session.flush()
    try:
        await wait_for(lambda: node_session.bytes_in > read_before, 1.0)
    except AssertionError:
        pass                                     # it was not even waiting on a read
    read_now = node_session.bytes_in
    for _ in range(5):
        session.open_stream("GET", "/hello_world", token=c.token)
        session.flush()
        await asyncio.sleep(0)
    await _still_serves(h)
    await _still_serves(h)
    assert node_session.bytes_in == read_now
    for s in streams:
        s.reset()
    await c.close()
    await wait_for(lambda: h.node.inflight == 0, 10)


async def test_client_disconnecting_mid_request_node_keeps_serving(node):
    # 1: mid-upload: the request head and part of the body, then the socket dies.
    c = node.client()
    session = await c.connect()
    s = session.open_stream("POST", "/echo", token=c.token, body=b"x" * 1000, end=False)
    session.flush()
    await wait_for(lambda: node.node.inflight == 1, 5)
    session.writer.transport.abort()
    await wait_for(lambda: node.node.inflight == 0, 5)
    # 2: waiting for an answer that never comes when the socket dies: the handler is
    # cancelled, not left running until the request timeout.
    c2 = node.client()
    session2 = await c2.connect()
    session2.open_stream("GET", "/gate", token=c2.token, args={"name": "abandoned"})
    session2.flush()
    await wait_for(lambda: node.node.inflight == 1, 5)
    session2.writer.transport.abort()
    await wait_for(lambda: node.node.inflight == 0, 5)
    await wait_for(lambda: len(node.node.sessions) == 0, 5)
    await _still_serves(node)
    del s


async def test_idle_timeout_closes_idle_authenticated_connection(make_node):
    h = await make_node(idle_timeout=0.5)
    c = h.client()
    await c.get("/hello_world")
    t0 = time.monotonic()
    await wait_for(lambda: not c.connected, 5)
    assert time.monotonic() - t0 >= 0.3
    await wait_for(lambda: len(h.node.sessions) == 0, 5)
    # and the client reconnects on its next call
    assert (await c.get("/hello_world")).text == "Hello World!"


async def test_idle_timeout_spares_a_connection_with_a_request_running(make_node, monkeypatch):
    from utesla_node.transport import Session
    calls = []
    original = Session._on_timer

    def counting(self):
        calls.append(self)
        return original(self)

    monkeypatch.setattr(Session, "_on_timer", counting)
    h = await make_node({"gate": GATE_SERVICE}, idle_timeout=0.3)
    c = h.client()
    slow = asyncio.ensure_future(c.get("/gate", args={"name": "busy"}))
    await wait_for(lambda: h.node.inflight == 1, 5)
    t0 = time.monotonic()
    # well past the idle timeout, with the request still running, the connection stays
    await wait_for(lambda: time.monotonic() - t0 > 0.9, 5)
    assert c.connected and not slow.done()
    # the idle timer looked again now and then; it did not spin
    assert len(calls) < 20, len(calls)
    other = h.client()
    await other.get("/gate", args={"name": "busy", "open": 1})
    assert (await slow).text == "waiting done"


async def test_stalled_client_is_dropped_for_good_after_timeouts(make_node, monkeypatch):
    """A client that never reads: its requests time out, then its connection is closed, and
    the socket is really released (not left flushing to a reader that never comes)."""
    from utesla_node import transport
    monkeypatch.setattr(transport, "CLOSE_LINGER", 0.3, raising=False)
    h = await make_node({"big": BIG}, write_high_water=256 * 1024, request_timeout=0.5,
                        idle_timeout=0.5)
    c = h.client(settings=Settings(window=4 << 20), timeout=30)
    session = await c.connect()
    node_session = next(iter(h.node.sessions))
    session.writer.transport.pause_reading()
    for _ in range(8):
        session.open_stream("GET", "/big", token=c.token, args={"n": 64})
    session.flush()
    await wait_for(lambda: node_session.writer.transport.get_write_buffer_size() > 256 * 1024, 10)
    # request timeout, then idle timeout, then the linger: gone, with its buffer
    await wait_for(lambda: h.node.inflight == 0, 10)
    await wait_for(lambda: len(h.node.sessions) == 0, 10)
    assert node_session.writer.transport.is_closing()
    assert node_session.writer.transport.get_write_buffer_size() == 0
    await _still_serves(h)
    session.writer.transport.abort()
