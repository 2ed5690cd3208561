"""Forwarding past a link's stream limit (issue 17 item 2).

A link is one connection, and the peer caps the streams open on it at once (its
``max_streams``, 256 by default, 16 at the least).  A forwarded request that finds every
stream of the link busy should wait its turn within its deadline, as a client does on
its own connection (``Client._open``); today it gets 503 at once.
"""
from __future__ import annotations

import asyncio

import pytest

from helpers import routes, settled, wait_for

#: Holds every request until it is opened (``?open=1``); GET and POST alike, so the
#: replayable and the non-replayable forwarding paths are both exercised.
HOLD_SERVICE = """
    import asyncio

    OPEN = asyncio.Event()

    class Handler:
        async def get(self):
            if self.args.get("open"):
                OPEN.set()
                await self.write("opened")
                return
            await asyncio.wait_for(OPEN.wait(), 60)
            await self.write("done")

        post = get
"""

#: The least a node may allow (protocol.connection.MIN_STREAMS): keeps the test small.
MAX_STREAMS = 16


async def _full_link(net, method: str = "GET"):
    """Entry node ``a`` linked to ``b`` (which allows MAX_STREAMS streams at once), and a
    client of ``a`` whose held requests take every stream of the link.
    Returns (a, b, client, held request tasks)."""
    a = await net.node("a")
    b = await net.node("b", {"hold": HOLD_SERVICE}, max_streams=MAX_STREAMS)
    await net.link(a, b)
    await wait_for(lambda: routes(a, "hold"), 10)
    await wait_for(lambda: settled(a), 10)          # only the gossip subscription is open
    link = a.node.network.links[b.url]
    count = link.session.conn.stream_slots
    assert 0 < count < MAX_STREAMS
    c = a.client()
    held = [asyncio.create_task(c.request(method, "/hold", timeout=60, check=False))
            for _ in range(count)]
    await wait_for(lambda: b.node.inflight == count, 15)
    assert link.session.conn.stream_slots == 0      # the link is full
    return a, b, c, held


async def _release(b, held) -> None:
    assert (await b.client().get("/hold", args={"open": 1})).text == "opened"
    replies = await asyncio.wait_for(asyncio.gather(*held), 30)
    assert [(r.status, r.text) for r in replies] == [(200, "done")] * len(held)


def _received(h, n: int) -> bool:
    """``h`` has ``n`` requests open from its clients (each stream registered as its
    REQUEST arrives, before any forwarding of it)."""
    return sum(len(s.streams) for s in h.node.sessions) == n


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_forwarded_request_waits_for_a_free_stream_on_the_link(net, method):
    a, b, c, held = await _full_link(net, method)
    waiting = asyncio.create_task(c.request(method, "/hold", timeout=60, check=False))
    # Once the entry node has the request, free the link's streams.  Today the request
    # has failed by then (503 with no wait); it should get its turn instead.
    await wait_for(lambda: waiting.done() or _received(a, len(held) + 1), 15)
    await _release(b, held + [waiting])
    await wait_for(lambda: settled(a), 10)


async def test_a_forwarded_request_waiting_for_the_link_times_out_at_its_deadline(net):
    a, b, c, held = await _full_link(net)
    # Requests arriving from now on get 1 s at the entry node (the held ones keep theirs).
    a.node.config.request_timeout = 1.0
    late = await asyncio.wait_for(c.get("/hold", timeout=60, check=False), 30)
    link_stayed_full = not any(t.done() for t in held)
    await _release(b, held)
    await wait_for(lambda: settled(a), 10)
    # Its deadline ran out while it waited: a timeout, not "unavailable".
    assert late.status in (408, 504), (late.status, late.text)
    assert link_stayed_full
