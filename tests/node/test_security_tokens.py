"""Adversarial checks of token renewal, revocation and the node's token cache."""
from __future__ import annotations

import asyncio
import time

import pytest

from protocol.errors import BadRequest, Unauthorized


async def test_renew_never_extends_a_token_past_the_lifetime_it_was_issued_with(make_node):
    # `generate_token --expire 60` asks for a one-minute token; renewing it (which needs only
    # the token and the key, not the password) must not turn it into a week-long one.
    h = await make_node(token_cache_ttl=0)
    await h.add_user("dave", token=False)
    short = await h.client("dave", token=None).generate_token("pw", expire=60)
    c = h.client("dave", token=short)
    before = time.time()
    renewed = (await c.post("/_node/token/renew")).json()["expires_at"]
    assert before + 59 <= renewed <= time.time() + 60 + 1
    record = (await h.node.storage.list_tokens("dave"))[0]
    assert record.expires_at == renewed
    # A token issued with the full lifetime still renews to the full lifetime.
    full = h.client()
    renewed = (await full.post("/_node/token/renew")).json()["expires_at"]
    assert renewed >= time.time() + h.node.config.token_expire - 5


async def test_a_revocation_made_here_is_not_undone_by_a_check_already_in_flight(make_node):
    # A request's token lookup reads the token (still live), then the token is revoked here,
    # then the lookup completes: that one request may pass (it was checked before the
    # revocation), but the live record must not land in the cache, where it would keep the
    # revoked token working for token_cache_ttl although the node answered "revoked".
    h = await make_node(token_cache_ttl=600)
    storage = h.node.storage
    original = storage.get_token
    read_done = asyncio.Event()
    release = asyncio.Event()
    calls = 0

    async def get_token(digest):
        nonlocal calls
        calls += 1
        record = await original(digest)
        if calls == 1:                   # the request's lookup: read, then hold the answer
            read_done.set()
            await release.wait()
        return record

    storage.get_token = get_token
    c = h.client()
    first = asyncio.ensure_future(c.get("/hello_world", check=False))
    await asyncio.wait_for(read_done.wait(), 10)
    assert (await h.client().post("/_node/token/revoke")).json() == {"revoked": True}
    release.set()
    assert (await first).status in (200, 401)
    with pytest.raises(Unauthorized):
        await c.get("/hello_world")


async def test_a_non_numeric_expire_is_a_bad_request_not_an_internal_error(make_node):
    h = await make_node()
    c = h.client(token=None)
    for expire in (True, False):
        with pytest.raises(BadRequest):
            await c.post("/_node/token", args={"password": "pw", "expire": expire})
