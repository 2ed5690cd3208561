"""RESET 200 "response complete" (SPEC.md §7.5) across a forwarding node.

A far handler that answers without reading a large request body ends its stream with
RESET 200 after the answer.  The entry node, still pumping the client's body to it, must
take that as "no more body needed", not as a broken link: the client gets the whole answer
and then RESET 200 itself (no RESET 503 "forwarding the body failed").
"""
from __future__ import annotations

import asyncio

import pytest

from helpers import RawClient, pair, settled, wait_for
from protocol.events import DataReceived, ResponseReceived, StreamReset

IGNORE_BODY = """
    import asyncio

    class Handler:
        async def post(self):
            # Long enough for the entry node to fill this node's window and wait for
            # credit that never comes: the RESET 200 then finds it mid-send.
            await asyncio.sleep(float(self.args.get("delay", 0)))
            await self.write("answered without reading" * int(self.args.get("times", 1)))
"""


@pytest.mark.parametrize("delay,times", [(0, 1), (0.5, 1), (0.5, 100_000)],
                         ids=["at-once", "after-the-window-filled", "large-answer"])
async def test_a_far_answer_that_ignores_the_body_ends_with_reset_200(net, delay, times):
    a, b = await pair(net, {"ignore": IGNORE_BODY})
    c = await RawClient(a).connect()
    total = 4 * 1024 * 1024           # far past every window: the entry node's pump waits
    sid = c.conn.send_request("POST", "/ignore", token=a.tokens["alice"], end=False,
                              args={"delay": delay, "times": times})
    c.flush()
    sent = 0

    async def upload_until_reset() -> StreamReset:
        """Send body as credit comes (as any client would) until the stream is reset."""
        nonlocal sent
        while True:
            for ev in c.events:
                if isinstance(ev, StreamReset) and ev.stream_id == sid:
                    return ev
            n = min(c.conn.send_credit(sid), total - sent, 65536) \
                if c.conn.is_open(sid) else 0
            if n > 0:
                c.conn.send_data(sid, b"x" * n, end=sent + n == total)
                sent += n
                c.flush()
                continue
            data = await c.reader.read(65536)
            assert data, f"connection ended; events: {c.events}"
            events = c.conn.receive_data(data)
            for ev in events:           # the answer is read as it comes: credit back
                body = getattr(ev, "data", getattr(ev, "body", b""))
                if isinstance(ev, (ResponseReceived, DataReceived)) and body:
                    c.conn.acknowledge(sid, len(body))
            c.events += events
            c.flush()

    reset = await asyncio.wait_for(upload_until_reset(), 30)
    assert (reset.status, reset.reason) == (200, "response complete"), reset
    [head] = [e for e in c.events if isinstance(e, ResponseReceived) and e.stream_id == sid]
    body = head.body + b"".join(e.data for e in c.events
                                if isinstance(e, DataReceived) and e.stream_id == sid)
    assert (head.status, body) == (200, b"answered without reading" * times)
    assert sent < total                               # told to stop, it stopped
    c.close()
    await wait_for(lambda: settled(a) and b.node.inflight == 0, 10)


async def test_reset_200_from_afar_does_not_cut_an_answer_still_being_relayed(net):
    """The far node's RESET 200 arrives while the entry node still holds part of the
    answer (the client has not read it yet): the entry node keeps relaying it, and the
    client gets it whole, then RESET 200."""
    a, b = await pair(net, {"ignore": IGNORE_BODY})
    c = await RawClient(a).connect()
    times = 17_000                  # 400 kB: more than the client's window of 256 kiB
    sid = c.conn.send_request("POST", "/ignore", token=a.tokens["alice"], end=False,
                              args={"delay": 0.2, "times": times})
    c.flush()
    links = list(a.node.network.links.values())

    async def read_some() -> None:
        """Send what body credit allows (the entry node passes it on until the far
        node's window is full), then read once."""
        n = min(c.conn.send_credit(sid), 65536) if c.conn.is_open(sid) else 0
        if n:
            c.conn.send_data(sid, b"x" * n)
        c.flush()
        data = await c.reader.read(65536)
        assert data, f"connection ended; events: {c.events}"
        c.events += c.conn.receive_data(data)
        c.flush()

    # Read without returning credit until the far node is done and the entry node has
    # had its RESET 200: the entry node then holds the rest of the answer.
    async def far_done() -> bool:
        if b.node.inflight == 0 and all(len(l.session.streams) <= 1 for l in links):
            return True
        try:
            await asyncio.wait_for(read_some(), 0.05)
        except asyncio.TimeoutError:
            pass
        return False
    await wait_for(far_done, 20)
    assert not any(isinstance(e, StreamReset) for e in c.events), c.events

    async def read_all() -> StreamReset:
        while True:
            for ev in c.events:
                if isinstance(ev, StreamReset):
                    return ev
            consumed = sum(len(e.body if isinstance(e, ResponseReceived) else e.data)
                           for e in c.events
                           if isinstance(e, (ResponseReceived, DataReceived)))
            c.conn.acknowledge(sid, consumed - read_all.acked, force=True)
            read_all.acked = consumed
            c.flush()
            await read_some()
    read_all.acked = 0
    reset = await asyncio.wait_for(read_all(), 20)
    [head] = [e for e in c.events if isinstance(e, ResponseReceived)]
    body = head.body + b"".join(e.data for e in c.events if isinstance(e, DataReceived))
    assert (reset.status, reset.reason) == (200, "response complete")
    assert body == b"answered without reading" * times
    c.close()
    await wait_for(lambda: settled(a) and b.node.inflight == 0, 10)
