"""Revoked credentials end the sessions they opened (issue 17 item 6).

``utesla-cli del`` and ``utesla-cli set-key`` run as real subprocesses on the folder of
an in-process node (the CLI only writes the database; the node must notice by itself).
The removed or re-keyed user's open connection is closed by the node with CLOSE 401,
its request in flight fails with ``Unauthorized`` naming the reason, and so does its
next request; other users' connections are untouched.  ``passwd`` ends no session: it
revokes the tokens, which stop working on the open connection within
``token_cache_ttl``, and a new token can be had on that same connection.

Before the watcher, the deleted user's connection stayed open and its next request
(token still cached) was answered 200: every test here failed on that tree.
"""
from __future__ import annotations

import asyncio

import pytest

from helpers import GATE_SERVICE, run_cli, user_key, wait_for
from protocol.errors import Unauthorized
from utesla_node.client import Client
from utesla_node.revocation import KEY_CHANGED, REMOVED

HELLO = "Hello World!"


async def cli(h, *args, input=None):
    """``utesla-cli ARGS`` in the node's folder, off the event loop (the node keeps running)."""
    return await asyncio.to_thread(run_cli, *args, cwd=h.folder, input=input)


@pytest.fixture
async def node(make_node):
    h = await make_node({"gate": GATE_SERVICE})
    await h.add_user("bob")
    return h


async def connected(h, user: str) -> tuple[Client, object]:
    """A client of ``user`` with one answered request, and its session."""
    c = h.client(user)
    assert (await c.get("/hello_world")).text == HELLO
    return c, await c.connect()


async def test_cli_del_closes_the_users_connection_and_its_next_request_fails_401(node):
    alice, _ = await connected(node, "alice")
    bob, bob_session = await connected(node, "bob")
    waiting = asyncio.ensure_future(alice.get("/gate", args={"name": "del"}))
    await wait_for(lambda: node.node.inflight == 1)

    out = await cli(node, "del", "alice")
    assert "user alice removed" in out.stdout

    await wait_for(lambda: not alice.connected, 10)
    with pytest.raises(Unauthorized, match=REMOVED):          # the request in flight
        await waiting
    with pytest.raises(Unauthorized) as next_request:
        await alice.get("/hello_world")
    assert next_request.value.status == 401
    assert REMOVED in str(next_request.value), next_request.value
    await wait_for(lambda: node.node.inflight == 0)            # its handler was stopped

    # Bob's connection is the same one, and works.
    assert bob.connected and await bob.connect() is bob_session
    assert (await bob.get("/hello_world")).text == HELLO
    assert node.node.metrics.counters["sessions_revoked"] == 1


async def test_cli_set_key_closes_connections_of_the_old_key_only(node, tmp_path):
    alice, _ = await connected(node, "alice")
    bob, bob_session = await connected(node, "bob")
    new_key = user_key(tag="alice-new")
    (tmp_path / "alice-new.pub").write_text(new_key.public.to_pem())

    out = await cli(node, "set-key", "-u", "alice", "-i", tmp_path / "alice-new.pub")
    assert "its tokens are revoked" in out.stdout

    await wait_for(lambda: not alice.connected, 10)
    with pytest.raises(Unauthorized) as next_request:
        await alice.get("/hello_world")
    assert next_request.value.status == 401
    assert KEY_CHANGED in str(next_request.value), next_request.value

    # The new key connects, gets a token with the password, and keeps its connection.
    fresh = Client(node.url, user="alice", private_key=new_key, node_key=node.key.public)
    node.clients.append(fresh)
    fresh.token = await fresh.generate_token("pw")
    assert (await fresh.get("/hello_world")).text == HELLO
    session = await fresh.connect()
    assert await node.node.revocations.check() == 0           # a look closes neither
    assert fresh.connected and await fresh.connect() is session
    assert bob.connected and await bob.connect() is bob_session
    assert node.node.metrics.counters["sessions_revoked"] == 1


async def test_cli_passwd_keeps_the_connection_and_revokes_its_tokens(node):
    alice, session = await connected(node, "alice")

    await cli(node, "passwd", "-u", "alice", "-p", "-", input="new-pass\n")

    async def refused() -> bool:
        reply = await alice.get("/hello_world", check=False)
        return reply.status == 401
    await wait_for(refused, 10, interval=0.05)                 # within token_cache_ttl
    # The same connection: a password change is not a key change (as in OpenSSH).
    assert await alice.connect() is session
    assert await node.node.revocations.check() == 0
    assert alice.connected and await alice.connect() is session
    alice.token = await alice.generate_token("new-pass")
    assert (await alice.get("/hello_world")).text == HELLO
    assert await alice.connect() is session


async def test_a_reconnection_with_a_stale_cached_key_is_closed_too(make_node, tmp_path):
    # The gate trusts a key it read for token_cache_ttl: a connection made with the old key
    # right after set-key may pass the handshake, but the next look closes it.
    h = await make_node(token_cache_ttl=60.0, credential_check_interval=60.0)
    old, _ = await connected(h, "alice")
    new_key = user_key(tag="alice-new")
    (tmp_path / "alice-new.pub").write_text(new_key.public.to_pem())
    await cli(h, "set-key", "-u", "alice", "-i", tmp_path / "alice-new.pub")

    again = h.client("alice", token=None)
    await again.get("/_node/ping")                 # the cached old key lets it in ...
    assert await h.node.revocations.check() == 2   # ... until the next look
    await wait_for(lambda: not old.connected and not again.connected, 10)
    with pytest.raises(Unauthorized, match=KEY_CHANGED):
        await again.get("/_node/ping")             # the gate's cache was dropped too
