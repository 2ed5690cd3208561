"""A service asked for while a new link is still coming up waits for the peer's first
table (bounded), instead of a 404 (issue 13 item 3: the blog runs add_network and then
the client at once)."""
from __future__ import annotations

from protocol.errors import NotFound
import pytest

from helpers import WHOAMI_SERVICE as WHOAMI, fp, link, settled, wait_for


async def test_a_request_right_after_add_network_waits_for_the_first_table(net):
    a = await net.node("a")
    b = await net.node("b", {"whoami": WHOAMI})
    c = a.client()
    await c.get("/_node/ping")
    # The peer row is written, as add_network does, and the client asks at once: the node
    # has not even read the peers table yet.
    await link(a, b, wait=False)
    reply = await c.get("/whoami", timeout=10)
    assert reply.text == fp(b)
    await wait_for(lambda: settled(a), 5)


async def test_an_unknown_service_with_every_link_settled_is_404_at_once(net, monkeypatch):
    a = await net.node("a")
    b = await net.node("b", {"whoami": WHOAMI})
    await link(a, b, service="whoami")
    waits = []
    original = type(a.node.network).wait_change

    async def counting(self, timeout):
        waits.append(timeout)
        return await original(self, timeout)

    monkeypatch.setattr(type(a.node.network), "wait_change", counting)
    with pytest.raises(NotFound):
        await a.client().get("/nowhere", timeout=10)
    assert waits == []                 # nothing was settling: answered without waiting
