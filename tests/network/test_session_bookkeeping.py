"""A finished request leaves nothing behind in the sessions that carried it.

Regression: streams a session opened (client requests, and the requests a node forwards
over its link) stayed in ``Session.streams`` after their answer ended, one entry per
request for the life of the connection: a client or a forwarding node's link grew
without bound.
"""
from __future__ import annotations

import asyncio

from helpers import examples, routes, wait_for


async def _traffic(c, n: int = 40) -> None:
    await asyncio.gather(*(c.get("/hello_world") for _ in range(n)))
    for i in range(5):
        body = bytes([i]) * (300_000 + i)               # beyond one stream window
        assert (await c.post("/echo", body, timeout=30)).body == body

    async def pieces():
        for _ in range(4):
            yield b"x" * 100_000

    assert len((await c.post("/echo", pieces(), timeout=30)).body) == 400_000
    async with c.stream("GET", "/countdown", args={"n": 5, "delay": 0}) as resp:
        assert b"".join([chunk async for chunk in resp]).endswith(b"liftoff\n")
    missing = await c.get("/no_such_service", check=False)
    assert missing.status == 404


async def test_client_and_server_sessions_forget_finished_streams(net):
    solo = await net.node("solo", examples("hello_world", "echo", "countdown"))
    c = solo.client()
    await _traffic(c)
    session = c._session
    assert session.streams == {}
    assert session.conn._streams == {}
    for s in solo.node.sessions:
        assert s.streams == {} and s.conn._streams == {}


async def test_a_forwarding_link_forgets_finished_streams(net):
    a = await net.node("a")
    b = await net.node("b", examples("hello_world", "echo", "countdown"))
    await net.link(a, b)
    await wait_for(lambda: routes(a, "echo") and routes(a, "countdown"), 10)
    c = a.client()
    await _traffic(c)
    (link,) = a.node.network.links.values()
    assert link.forwarded >= 47 and link.inflight == 0
    # What stays is the one long-lived stream the link opened on purpose: its gossip
    # subscription (GET /_node/net/routes), still open.
    (sub,) = link.session.streams.values()
    assert not sub._ended
    assert list(link.session.conn._streams) == [sub.id]
    assert c._session.streams == {}


async def test_a_node_stopping_lets_forwarded_requests_in_flight_finish(net):
    """SIGTERM's grace period covers forwarded requests too: the node keeps its links
    until what it is relaying has been answered, then stops them."""
    a = await net.node("a", grace_period=10)
    b = await net.node("b", examples("countdown"))
    await net.link(a, b)
    await wait_for(lambda: routes(a, "countdown"), 10)
    c = a.client()
    got = []
    async with c.stream("GET", "/countdown", args={"n": 20, "delay": 0.02},
                        timeout=30) as resp:
        async for chunk in resp:
            got.append(chunk)
            if len(got) == 2:
                stopping = asyncio.ensure_future(a.node.stop("test: SIGTERM"))
    await stopping
    assert b"".join(got).endswith(b"1\nliftoff\n")
    assert a.node.network.links == {}
