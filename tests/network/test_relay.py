"""Forwarding (utesla_node/network/router.py): requests relayed without a task, and
every way a task joins in (a streamed answer, a retry, a deadline, a client leaving).

Each test checks the outcome the client sees and that the entry node's books balance
afterwards (nothing in flight, no relay pending, no stream left on the link).
"""
from __future__ import annotations

import asyncio
import re

import pytest

from helpers import (TICKER_SERVICE as TICKER, WHOAMI_SERVICE as WHOAMI, examples, fp,
                     pair, preferred_and_backup, routes, settled, wait_for)
from protocol.errors import GatewayTimeout, RequestTimeout, Status


async def test_small_gets_take_the_fast_path_and_get_their_answers(net, relays):
    a, b = await pair(net, {"whoami": WHOAMI, **examples("hello_world")})
    c = a.client()
    assert (await c.get("/whoami")).text == fp(b)          # token checked: now cached
    answers = await asyncio.gather(*(c.get("/hello_world") for _ in range(50)))
    assert [r.text for r in answers] == ["Hello World!"] * 50
    assert len(relays) >= 50
    assert {r.status for r in answers} == {200}
    await wait_for(lambda: settled(a), 5)
    counters = a.node.metrics.snapshot()
    assert counters["forwarded_requests"] >= 51


async def test_a_streamed_or_large_answer_is_handed_over_intact(net, relays):
    a, _ = await pair(net, {"ticker": TICKER, **examples("source")})
    c = a.client()
    await c.get("/ticker", args={"n": 1, "delay": 0})      # caches the token
    before = len(relays)
    async with c.stream("GET", "/ticker", args={"n": 40, "delay": 0.001}) as resp:
        got = b"".join([chunk async for chunk in resp])
    assert got == b"".join(f"tick {i}\n".encode() for i in range(40))
    big = await c.get("/source", args={"n": 3_000_000}, timeout=30)
    assert len(big.body) == 3_000_000
    assert len(relays) == before + 2                       # both began on the fast path
    await wait_for(lambda: settled(a), 5)


async def test_the_next_hop_gets_the_deadline_and_its_408_comes_back(net, relays):
    a, b = await pair(net, {"whoami": WHOAMI}, request_timeout=0.5)
    c = a.client()
    await c.get("/whoami")
    with pytest.raises(RequestTimeout) as info:
        await c.get("/whoami", args={"delay": 3}, timeout=10)
    # B's, a little before A's: what was left of A's 0.5 s, less a margin of 5%.
    limit = float(re.search(r"longer than ([0-9.]+) s", str(info.value)).group(1))
    assert 0.4 < limit <= 0.475, str(info.value)
    assert relays and relays[-1].done
    await wait_for(lambda: settled(a) and b.node.inflight == 0, 5)


async def test_a_next_hop_that_goes_silent_gets_the_entry_node_504(net, relays):
    a = await net.node("a", request_timeout=0.5, heartbeat_interval=30)
    b = await net.node("b", {"whoami": WHOAMI})
    proxy = await net.proxy(b)
    await net.link(a, b, url=proxy.url, service="whoami")
    c = a.client()
    assert (await c.get("/whoami")).text == fp(b)
    proxy.set_mode("blackhole")                              # nothing crosses any more
    with pytest.raises(GatewayTimeout) as info:
        await c.get("/whoami", timeout=10)
    assert "did not answer within 0.5 s" in str(info.value)
    assert relays and relays[-1].done
    await wait_for(lambda: settled(a), 5)


async def test_a_client_that_gives_up_cancels_the_relay_and_the_far_request(net, relays):
    a, b = await pair(net, {"whoami": WHOAMI})
    c = a.client()
    await c.get("/whoami")
    with pytest.raises(RequestTimeout):
        await c.get("/whoami", args={"delay": 3}, timeout=0.3)
    await wait_for(lambda: settled(a) and b.node.inflight == 0, 5)
    assert (await c.get("/whoami")).text == fp(b)           # the connection is fine


async def test_a_route_that_dies_unanswered_is_retried_on_a_replica(net, relays):
    a, b, c_node = await preferred_and_backup(net)          # B is preferred
    c = a.client()
    assert (await c.get("/whoami")).text == fp(b)
    pending = asyncio.ensure_future(c.get("/whoami", args={"delay": 2}, timeout=15))
    await wait_for(lambda: b.node.inflight == 1, 5)          # on its way, through B
    assert relays and not relays[-1].done
    await net.kill(b)
    reply = await pending
    assert reply.text == fp(c_node)                         # served again, elsewhere
    await wait_for(lambda: settled(a), 5)


async def test_a_stopping_node_finishes_fast_path_requests_in_flight(net, relays):
    a, b = await pair(net, {"whoami": WHOAMI}, grace_period=10)
    c = a.client()
    await c.get("/whoami")
    pending = asyncio.ensure_future(c.get("/whoami", args={"delay": 0.5}, timeout=15))
    await wait_for(lambda: a.node.router.live == 1, 5)
    await a.node.stop("test: SIGTERM")
    assert (await pending).text == fp(b)
    assert a.node.router.live == 0 and a.node.inflight == 0


async def test_what_the_fast_path_leaves_to_the_dispatcher(net, relays):
    a, b = await pair(net, {"whoami": WHOAMI, **examples("echo")})
    c = a.client()
    await c.get("/whoami")                                  # (first use: token lookup)
    n = len(relays)
    assert (await c.get("/_node/ping")).text == "pong"              # built-in
    assert (await c.get("/nowhere", check=False)).status == Status.NOT_FOUND
    assert (await c.get("/whoami", token="ut1_" + "A" * 43, check=False)).status == 401
    assert len(relays) == n
    assert (await c.get("/whoami")).text == fp(b)
    assert len(relays) == n + 1
    # A POST is forwarded from the read loop too, but never replayed on another route.
    assert (await c.post("/echo", b"posted")).body == b"posted"
    assert len(relays) == n + 2 and not relays[-1].replayable
    await wait_for(lambda: settled(a), 5)
