"""Revoked credentials and the network (issue 17 item 6).

- A user removed at the entry node: its connection there is closed (CLOSE 401), the
  request it had forwarded fails with that status, and the far node stops working on it.
- A node account removed at the far node: the far node closes the link (it is a session
  like any other), the forward in flight on it ends there too (the client gets 503 naming
  the reason: its own credentials are fine, the route is gone), the link reports why
  (``show_networks``: "last error: the peer closed the link: credentials revoked: user
  removed"), and keeps saying so while reconnecting is refused.

``utesla-cli del`` runs as a real subprocess on the node's folder.
"""
from __future__ import annotations

import asyncio

import pytest

from helpers import GATE_SERVICE, routes, run_cli, settled, wait_for
from protocol.errors import Unauthorized, Unavailable
from utesla_node.revocation import REMOVED


async def cli(h, *args):
    return await asyncio.to_thread(run_cli, *args, cwd=h.folder)


async def test_user_removed_at_the_entry_node_ends_its_forwarded_request_at_the_far_node(net):
    a = await net.node("a")
    b = await net.node("b", {"gate": GATE_SERVICE}, user=None)
    await net.link(a, b, service="gate")
    alice = a.client("alice")
    waiting = asyncio.ensure_future(alice.get("/gate", args={"name": "entry"}))
    await wait_for(lambda: b.node.inflight == 1, 10)           # running at the far node

    await cli(a, "del", "alice")

    with pytest.raises(Unauthorized, match=REMOVED):
        await waiting
    await wait_for(lambda: b.node.inflight == 0, 10)           # the far node stopped
    await wait_for(lambda: settled(a), 10)
    assert a.node.network.links[b.url].up                      # the link itself is fine


async def test_node_account_removed_at_the_far_node_ends_the_link_and_says_why(net):
    a = await net.node("a")
    b = await net.node("b", {"gate": GATE_SERVICE}, user=None)
    await net.link(a, b, user="node-a", service="gate")
    link = a.node.network.links[b.url]
    alice = a.client("alice")
    waiting = asyncio.ensure_future(alice.get("/gate", args={"name": "far"}))
    await wait_for(lambda: b.node.inflight == 1, 10)

    await cli(b, "del", "node-a")

    with pytest.raises(Unavailable, match=REMOVED):            # its link went away under it
        await waiting
    await wait_for(lambda: b.node.inflight == 0, 10)           # the far node stopped
    await wait_for(lambda: not link.up and not routes(a, "gate"), 10)
    assert REMOVED in link.last_error, link.last_error
    # Reconnecting is refused, and the reason stays in view.
    await wait_for(lambda: "AuthenticationFailed" in link.last_error, 10)
    assert REMOVED in link.last_error, link.last_error

    async def shown() -> str | None:
        out = (await cli(a, "show_networks")).stdout
        return out if REMOVED in out else None
    out = await wait_for(shown, 15, interval=0.2)
    assert "last error:" in out and "the peer closed the link" in out, out
