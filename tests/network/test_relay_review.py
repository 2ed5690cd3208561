"""Forwarding (network/router.py) under races: an answer that starts streaming while the
node stops, and a relay task cancelled before it ever ran.
"""
from __future__ import annotations

import asyncio
import re
import time

import pytest

from helpers import (TICKER_SERVICE as TICKER, WHOAMI_SERVICE as WHOAMI, abort_connection,
                     pair, preferred_and_backup, settled, wait_for)
from protocol.errors import RequestTimeout
from utesla_node.network import router as router_mod

#: Answers only after a pause, then streams: the relay hands over when the head comes.
LATE_TICKER = """
    import asyncio

    class Handler:
        async def get(self):
            await asyncio.sleep(float(self.args.get("wait", 0.5)))
            for i in range(int(self.args.get("n", 5))):
                await self.write(f"tick {i}\\n")
                await self.flush()
                await asyncio.sleep(0.05)
"""


async def test_a_stopping_node_lets_a_handed_over_answer_finish(net, relays):
    a, b = await pair(net, {"late": LATE_TICKER}, grace_period=10)
    c = a.client()
    await c.get("/late", args={"wait": 0, "n": 1})           # caches the token

    async def fetch():
        async with c.stream("GET", "/late", args={"wait": 0.5, "n": 5}) as resp:
            return b"".join([chunk async for chunk in resp])

    pending = asyncio.ensure_future(fetch())
    await wait_for(lambda: a.node.router.live == 1, 5)      # forwarded, unanswered
    await a.node.stop("test: SIGTERM")                       # the head comes meanwhile
    assert await pending == b"".join(f"tick {i}\n".encode() for i in range(5))


async def test_a_hand_over_cancelled_before_it_ran_frees_the_link(net, relays, monkeypatch):
    a, b = await pair(net, {"ticker": TICKER})
    c = a.client()
    await c.get("/ticker", args={"n": 1, "delay": 0})        # caches the token
    answered = router_mod.Forward.answered
    cancelled = []

    def and_the_client_resets(self, *args):
        answered(self, *args)
        # What happens when the client's RESET comes in the same loop turn as the
        # answer's head: the relay task is cancelled before its first step.
        if self.relay is not None:
            self.relay.cancel()
            cancelled.append(self)

    monkeypatch.setattr(router_mod.Forward, "answered", and_the_client_resets)
    with pytest.raises(Exception):
        async with c.stream("GET", "/ticker", args={"n": 2000, "delay": 0.2},
                            timeout=5) as resp:
            async for _ in resp:
                pass
    assert cancelled
    # The link is free again and the far request is cancelled, not left streaming.
    await wait_for(lambda: settled(a) and b.node.inflight == 0, 5)


async def test_a_retry_after_a_late_link_failure_keeps_the_entry_deadline(net, relays):
    a, b, _ = await preferred_and_backup(net, request_timeout=2)   # B is preferred
    c = a.client()
    await c.get("/whoami")
    t0 = time.monotonic()
    pending = asyncio.ensure_future(c.get("/whoami", args={"delay": 5}, timeout=15))
    await wait_for(lambda: b.node.inflight == 1, 5)          # relayed through B
    assert relays and not relays[-1].done
    await asyncio.sleep(1.0)        # the scenario: the route dies late in the deadline
    await net.kill(b)
    with pytest.raises(RequestTimeout) as info:
        await pending
    # C was given what was left of A's 2 s, not a fresh 2 s (1.9 s for C).
    limit = float(re.search(r"longer than ([0-9.]+) s", str(info.value)).group(1))
    assert limit < 1.5, str(info.value)
    assert time.monotonic() - t0 < 2.6
    await wait_for(lambda: settled(a), 5)


HEADED = """
    class Handler:
        async def get(self):
            self.set_status(203)
            self.set_header("x-kind", "headed")
            await self.write("body")

        async def head(self):
            self.set_status(204)
            self.set_header("x-kind", "head only")
"""


async def test_head_and_headers_come_back_as_the_far_node_sent_them(net, relays):
    a, b = await pair(net, {"headed": HEADED})
    c = a.client()
    await c.get("/headed")                                   # caches the token
    n = len(relays)
    got = await c.get("/headed", check=False)
    head = await c.request("HEAD", "/headed", check=False)
    assert len(relays) == n + 2                              # both on the fast path
    direct = b.client()
    want = await direct.get("/headed", check=False)
    want_head = await direct.request("HEAD", "/headed", check=False)
    assert (got.status, got.headers, got.body) == (want.status, want.headers, want.body)
    assert (head.status, head.headers, head.body) == \
        (want_head.status, want_head.headers, want_head.body)
    await wait_for(lambda: settled(a), 5)


async def test_a_client_dropping_its_connection_cancels_every_pending_relay(net, relays):
    a, b = await pair(net, {"whoami": WHOAMI})
    c = a.client()
    await c.get("/whoami")
    n = len(relays)
    pending = [asyncio.ensure_future(c.get("/whoami", args={"delay": 3}, timeout=15))
               for _ in range(5)]
    await wait_for(lambda: a.node.router.live == 5 and b.node.inflight == 5, 5)
    assert len(relays) == n + 5
    abort_connection(c._session.writer)                      # the client's host is gone
    for p in pending:
        with pytest.raises(Exception):
            await p
    await wait_for(lambda: settled(a) and b.node.inflight == 0, 5)
    assert all(r.done for r in relays)
