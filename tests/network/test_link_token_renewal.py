"""A link keeps its own token alive at the peer (links.Link._renew_token).

The token the peer's admin issued for ``add_network`` has the peer's ``token_expire``
lifetime (7 days by default); without renewal every link would die then.
"""
from __future__ import annotations

import time

from helpers import WHOAMI_SERVICE as WHOAMI, wait_for
from utesla_node.auth import token_hash


async def stored_expiry(b, token: str) -> float:
    return (await b.node.storage.get_token(token_hash(token))).expires_at


async def test_a_link_outlives_the_lifetime_of_the_token_it_was_given(net):
    a = await net.node("a")
    b = await net.node("b", {"whoami": WHOAMI}, token_expire=3)
    token = await net.link(a, b, service="whoami")
    first = await stored_expiry(b, token)
    assert first - time.time() <= 3
    (link,) = a.node.network.links.values()
    await wait_for(lambda: link.token_expires_at is not None, 5)   # renewed on connecting
    # Tokens expire with the clock: wait until the first lifetime is over.
    await wait_for(lambda: time.time() > first + 1, 10)
    assert await stored_expiry(b, token) > first + 1
    assert link.state == "up" and link.renew_error == ""
    assert link.describe()["token_expires_at"] > first
    reply = await a.client().get("/whoami")                  # forwarded with that token
    assert reply.text == b.key.public.fingerprint()


async def test_a_renewal_the_peer_refuses_is_reported_on_the_link(net):
    a = await net.node("a", token_renew_interval=0.2)
    b = await net.node("b", {"whoami": WHOAMI})
    token = await net.link(a, b, service="whoami")
    (link,) = a.node.network.links.values()
    await wait_for(lambda: link.token_expires_at is not None, 5)
    assert await b.node.storage.revoke_token(token_hash(token))   # the peer's admin revokes
    await wait_for(lambda: link.renew_error != "", 5)
    assert "401" in link.renew_error or "invalid" in link.renew_error, link.renew_error
    assert token not in link.renew_error
    assert link.describe()["renew_error"] == link.renew_error
