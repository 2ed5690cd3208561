"""The forwarding fast path (relay.py) under races: a hand-over to the general path while
the node stops, and a hand-over task cancelled before it ever ran.
"""
from __future__ import annotations

import asyncio

import pytest

from helpers import TICKER_SERVICE as TICKER, routes, wait_for
from utesla_node.network import relay as relay_mod

from test_relay import pair, relays, settled  # noqa: F401  (fixture)

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
    await wait_for(lambda: a.node.network.relays == 1, 5)   # on the fast path, unanswered
    await a.node.stop("test: SIGTERM")                       # the head comes meanwhile
    assert await pending == b"".join(f"tick {i}\n".encode() for i in range(5))


async def test_a_hand_over_cancelled_before_it_ran_frees_the_link(net, relays, monkeypatch):
    a, b = await pair(net, {"ticker": TICKER})
    c = a.client()
    await c.get("/ticker", args={"n": 1, "delay": 0})        # caches the token
    hand_over = relay_mod.Relay._hand_over

    def and_the_client_resets(self, *args):
        hand_over(self, *args)
        # What Session._handle_events does for the client's RESET when it comes in the
        # same loop turn as the answer's head: the task is cancelled before its first step.
        self.src.task.cancel()

    monkeypatch.setattr(relay_mod.Relay, "_hand_over", and_the_client_resets)
    with pytest.raises(Exception):
        async with c.stream("GET", "/ticker", args={"n": 2000, "delay": 0.2},
                            timeout=5) as resp:
            async for _ in resp:
                pass
    # The link is free again and the far request is cancelled, not left streaming.
    await wait_for(lambda: settled(a) and b.node.inflight == 0, 5)
