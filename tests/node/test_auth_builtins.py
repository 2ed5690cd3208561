"""Tokens, scopes and the built-in services under /_node/ (in-process node)."""
from __future__ import annotations

import pytest

from helpers import user_key, wait_for
from protocol.errors import BadRequest, Forbidden, Unauthorized


async def _unauthorized_message(c, path="/hello_world", **kw) -> str:
    reply = await c.get(path, check=False, **kw)
    assert reply.status == 401, (reply.status, reply.text)
    return reply.text


async def test_bad_tokens_are_401_with_one_message(make_node):
    h = await make_node(token_cache_ttl=0)
    await h.add_user("bob")
    alice = h.client("alice")
    assert (await alice.get("/hello_world")).text == "Hello World!"
    messages = {
        "missing": await _unauthorized_message(h.client("alice", token=None)),
        "empty": await _unauthorized_message(h.client("alice", token="")),
        "garbage": await _unauthorized_message(alice, token="not-a-token"),
        "well-formed unknown": await _unauthorized_message(
            alice, token="ut1_" + "A" * 43),
        "other user's": await _unauthorized_message(alice, token=h.tokens["bob"]),
    }
    # revoke alice's own token, then it is refused too
    assert (await alice.post("/_node/token/revoke")).json() == {"revoked": True}
    messages["revoked"] = await _unauthorized_message(alice)
    assert len(set(messages.values())) == 1, messages
    # bob's token still works on bob's session
    assert (await h.client("bob").get("/hello_world")).text == "Hello World!"


async def test_revoked_token_refused_after_cache_ttl(make_node):
    h = await make_node(token_cache_ttl=0.3)
    c = h.client()
    await c.get("/hello_world")                   # cached on this session
    other = h.client()
    await other.post("/_node/token/revoke")       # revoked through another session
    # Within the TTL the first session may still serve from its cache; after it, 401.
    async def refused() -> bool:
        return (await c.get("/hello_world", check=False)).status == 401

    await wait_for(refused, timeout=5, interval=0.05)


async def test_builtins_need_token_where_documented(node):
    anon = node.client(token=None)
    assert (await anon.get("/_node/ping")).text == "pong"
    for path in ("/_node/services", "/_node/status", "/_node/metrics"):
        with pytest.raises(Unauthorized):
            await anon.get(path)


async def test_builtin_ping_services_status_metrics(node):
    c = node.client()
    assert (await c.get("/_node/ping")).text == "pong"
    services = (await c.get("/_node/services")).json()["services"]
    assert {"path": "/hello_world", "origin": "local", "hops": 0} in services
    status = (await c.get("/_node/status")).json()
    assert status["fingerprint"] == node.key.public.fingerprint()
    assert status["address"] == ["127.0.0.1", node.port]
    assert "hello_world" in status["services"]
    assert status["connections"] >= 1
    metrics = (await c.get("/_node/metrics")).text
    assert "utesla" in metrics


async def test_builtin_token_issue_with_password(make_node):
    h = await make_node()
    c = h.client(token=None)
    token = await c.generate_token("pw")
    assert token.startswith("ut1_")
    assert (await c.get("/hello_world", token=token)).text == "Hello World!"
    with pytest.raises(Unauthorized) as ei:
        await c.generate_token("wrong")
    assert "password" in str(ei.value)
    with pytest.raises(BadRequest):
        await c.post("/_node/token", args={})
    # a token narrowed by scope
    narrow = await c.generate_token("pw", scopes=["echo"])
    assert (await c.get("/echo", token=narrow)).json()["user"] == "alice"
    with pytest.raises(Forbidden):
        await c.get("/hello_world", token=narrow)


async def test_builtin_token_renew_and_revoke(make_node):
    h = await make_node(token_cache_ttl=0)
    c = h.client()
    renewed = (await c.post("/_node/token/renew")).json()
    assert renewed["expires_at"] > 0
    assert (await c.get("/hello_world")).text == "Hello World!"
    assert (await c.post("/_node/token/revoke")).json() == {"revoked": True}
    with pytest.raises(Unauthorized):
        await c.get("/hello_world")
    with pytest.raises(Unauthorized):
        await c.post("/_node/token/renew")


async def test_token_limit(make_node):
    h = await make_node()
    await h.add_user("limited", token=False, token_limit=1)
    c = h.client("limited", token=None)
    first = await c.generate_token("pw")
    with pytest.raises(Forbidden) as ei:
        await c.generate_token("pw")
    assert "limit" in str(ei.value)
    await c.post("/_node/token/revoke", token=first)
    await c.generate_token("pw")


async def test_guest_user_outside_scopes_is_403(make_node):
    h = await make_node()
    await h.add_user("guest", key=user_key(tag="guest"), guest=True, scopes=("hello_world",))
    g = h.client("guest")
    assert (await g.get("/hello_world")).text == "Hello World!"
    with pytest.raises(Forbidden) as ei:
        await g.get("/echo")
    assert ei.value.status == 403
    with pytest.raises(Forbidden):
        await g.get("/countdown")


async def test_a_cached_token_is_checked_against_each_path_not_its_first_segment(make_node):
    # The node caches what a token is (its user and scopes), never "allowed for /x": a token
    # scoped to one path under a prefix must not open a sibling path because it was just used.
    h = await make_node(token_cache_ttl=60)
    await h.add_user("carol", token=False)
    narrow = await h.client("carol", token=None).generate_token("pw", scopes=["_node/services"])
    c = h.client("carol", token=narrow)
    assert (await c.get("/_node/services")).status == 200         # now cached
    for path in ("/_node/status", "/_node/metrics", "/_node/net/routes", "/hello_world"):
        with pytest.raises(Forbidden):
            await c.get(path)
    assert (await c.get("/_node/services")).status == 200         # still allowed
    # A guest limited to one built-in: the same holds for the user's own scopes.
    await h.add_user("visitor", key=user_key(tag="visitor"), guest=True,
                     scopes=("_node/services",))
    v = h.client("visitor")
    assert (await v.get("/_node/services")).status == 200
    with pytest.raises(Forbidden):
        await v.get("/_node/status")


async def test_unknown_user_and_wrong_key_fail_the_handshake_the_same_way(make_node):
    from protocol.errors import AuthenticationFailed
    h = await make_node()
    h.keys["ghost"] = user_key(tag="ghost")
    with pytest.raises(AuthenticationFailed) as unknown:
        await h.client("ghost").get("/hello_world")
    h.keys["mallory"] = user_key(tag="mallory")
    from utesla_node.client import Client
    wrong = Client(h.url, user="alice", private_key=user_key(tag="mallory"),
                   node_key=h.key.public, token=h.tokens["alice"])
    h.clients.append(wrong)
    with pytest.raises(AuthenticationFailed) as badkey:
        await wrong.get("/hello_world")
    assert str(unknown.value) == str(badkey.value)
