"""``utesla_node.admin``: the library ``utesla-cli`` is a shell over, called directly.

Users, tokens by id, peers (checked against a real node on loopback before they are
stored), the canonical peer URL, the running node's state (from status files written
with :mod:`utesla_node.status`), and the refusal to create a database by accident.
"""
from __future__ import annotations

import pytest

from helpers import NodeHarness, user_key
from protocol.errors import Unauthorized
from utesla_node import auth
from utesla_node.admin import (Admin, AmbiguousToken, LinkNotUp, NoDatabase, NodeNotRunning,
                               UnknownEntry, is_node_folder, peer_url)
from utesla_node.config import load_config
from utesla_node.status import encode_status, write_status
from utesla_node.storage import AlreadyExists


class Clock:
    """Epoch seconds the test moves by hand."""

    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def config(folder, **settings):
    cfg = load_config(None, **settings)
    cfg.base_dir = folder
    return cfg


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def admin(tmp_path, clock):
    a = Admin(config(tmp_path, token_expire=1000.0), create=True, clock=clock)
    yield a
    await a.close()


# --------------------------------------------------------------------------- users

async def test_users_are_added_listed_changed_and_removed(admin, clock):
    alice, bob = user_key(tag="alice").public, user_key("rsa", 2048, tag="bob").public
    info = await admin.add_user("alice", "pw", alice)
    assert (info.name, info.key_kind, info.fingerprint) == ("alice", "ed25519",
                                                            alice.fingerprint())
    assert (info.token_limit, info.guest, info.scopes, info.created_at) == (
        1, False, ("*",), clock.now)
    assert not hasattr(info, "password_hash")                 # never shown
    await admin.add_user("bob", "pw2", bob, token_limit=0, guest=True, scopes=["echo", "x/*"])
    assert [(u.name, u.key_kind, u.guest, u.scopes) for u in await admin.users()] == [
        ("alice", "ed25519", False, ("*",)), ("bob", "rsa2048", True, ("echo", "x/*"))]
    with pytest.raises(AlreadyExists):
        await admin.add_user("alice", "pw", alice)

    storage = await admin.storage()
    authority = auth.Authority(storage)
    assert (await authority.check_password("alice", "pw")).name == "alice"
    await admin.set_password("alice", "new")
    assert (await authority.check_password("alice", "new")).name == "alice"
    await admin.set_public_key("alice", bob)
    assert (await admin.user("alice")).fingerprint == bob.fingerprint()

    await admin.delete_user("alice")
    assert [u.name for u in await admin.users()] == ["bob"]
    for call in (admin.delete_user("alice"), admin.user("alice"),
                 admin.set_password("alice", "x"), admin.set_public_key("alice", bob),
                 admin.set_token_limit("alice", 3), admin.set_scopes("alice", ["a"])):
        with pytest.raises(UnknownEntry, match="no user 'alice'"):
            await call


@pytest.mark.parametrize("password", ["", None])
async def test_an_empty_password_is_refused_before_anything_is_stored(admin, password):
    with pytest.raises(ValueError, match="must not be empty"):
        await admin.add_user("alice", password, user_key(tag="alice").public)
    await admin.add_user("alice", "pw", user_key(tag="alice").public)
    with pytest.raises(ValueError, match="must not be empty"):
        await admin.set_password("alice", password)


@pytest.mark.parametrize("scope", ["^admin$", "a|b", "/"])
async def test_scopes_that_are_not_globs_are_refused(admin, scope):
    with pytest.raises(ValueError):
        await admin.add_user("alice", "pw", user_key(tag="alice").public, scopes=[scope])
    await admin.add_user("alice", "pw", user_key(tag="alice").public)
    with pytest.raises(ValueError):
        await admin.set_scopes("alice", [scope])
    assert await admin.users() == [await admin.user("alice")]


async def test_changing_services_or_the_token_limit_keeps_the_rest_and_revokes_tokens(admin):
    await admin.add_user("carol", "pw", user_key(tag="carol").public)
    authority = auth.Authority(await admin.storage())
    await authority.issue_token("carol")
    info = await admin.set_scopes("carol", ["hello_world"], guest=True)
    assert (info.guest, info.scopes, info.token_limit) == (True, ("hello_world",), 1)
    assert [t.state for t in await admin.tokens("carol")] == ["revoked"]
    assert (await authority.check_password("carol", "pw")).guest       # password kept
    assert (await admin.set_scopes("carol", [])).scopes == ("*",)       # guest kept, all
    assert (await admin.user("carol")).guest
    info = await admin.set_token_limit("carol", 0)
    assert (info.token_limit, info.guest, info.fingerprint) == (
        0, True, user_key(tag="carol").public.fingerprint())


# --------------------------------------------------------------------------- tokens

async def test_tokens_are_found_by_id_revoked_and_renewed(admin, clock):
    await admin.add_user("dave", "pw", user_key(tag="dave").public, token_limit=0)
    authority = auth.Authority(await admin.storage(), token_expire=1000.0, clock=clock)
    _, short = await authority.issue_token("dave", expire=100.0)
    clock.now += 1                                     # listed oldest first
    _, other = await authority.issue_token("dave")
    listed = await admin.tokens("dave")
    assert [(t.id, t.state) for t in listed] == [(short.token_hash.hex()[:12], "live"),
                                                 (other.token_hash.hex()[:12], "live")]
    assert await admin.tokens("nobody") == []

    clock.now += 150                                   # the short one has expired
    assert [t.state for t in await admin.tokens("dave")] == ["expired", "live"]
    renewed = await admin.renew_token("dave", short.token_hash.hex()[:8].upper())
    assert (renewed.state, renewed.created_at, renewed.expires_at) == (
        "live", clock.now, clock.now + 100.0)          # its own lifetime, from now
    capped = await admin.renew_token("dave", short.token_hash.hex()[:8], lifetime=1e9)
    assert capped.expires_at == clock.now + 1000.0     # never beyond token_expire
    with pytest.raises(ValueError):
        await admin.renew_token("dave", short.token_hash.hex()[:8], lifetime=-1)

    revoked = await admin.revoke_token("dave", short.token_hash.hex()[:10])
    assert revoked.state == "revoked"
    with pytest.raises(UnknownEntry, match="revoked"):
        await admin.renew_token("dave", short.token_hash.hex()[:10])
    assert await admin.revoke_all("dave") == 1         # only the other was still live
    with pytest.raises(UnknownEntry, match="no token of dave matches 'zz'"):
        await admin.revoke_token("dave", "zz")
    with pytest.raises(ValueError):
        await admin.revoke_token("dave", " ")


async def test_a_short_token_id_matching_several_tokens_is_refused(admin):
    await admin.add_user("erin", "pw", user_key(tag="erin").public, token_limit=0)
    authority = auth.Authority(await admin.storage())
    for _ in range(17):           # 17 tokens, 16 hex digits: two share their first digit
        await authority.issue_token("erin")
    firsts = [t.id[0] for t in await admin.tokens("erin")]
    shared = next(d for d in firsts if firsts.count(d) > 1)
    with pytest.raises(AmbiguousToken, match="more than one token of erin"):
        await admin.revoke_token("erin", shared)
    assert all(t.state == "live" for t in await admin.tokens("erin"))


# --------------------------------------------------------------------------- peers

@pytest.mark.parametrize("given,canonical", [
    ("http://localhost:17001", "utesla://localhost:17001"),
    ("utesla://LocalHost:17001/some/path", "utesla://localhost:17001"),
    ("localhost", "utesla://localhost:17000"),
    ("utesla://[::1]:17002", "utesla://[::1]:17002"),
    ("https://10.0.0.1", "utesla://10.0.0.1:17000"),
])
def test_peer_urls_have_one_canonical_form(given, canonical):
    assert peer_url(given) == canonical
    assert peer_url(canonical) == canonical


@pytest.mark.parametrize("bad", ["ftp://x:1", "utesla://:17000", "utesla://h:99999"])
def test_bad_peer_urls_are_refused(bad):
    with pytest.raises(ValueError):
        peer_url(bad)


async def test_a_peer_is_stored_only_after_it_accepted_our_account(tmp_path, admin, clock):
    peer = NodeHarness(tmp_path / "peer")
    await peer.start()
    try:
        us = user_key(tag="us")
        await peer.add_user("us", key=us)
        token = peer.tokens["us"]
        url = f"http://127.0.0.1:{peer.port}"
        with pytest.raises(Unauthorized):
            await admin.add_peer(url, node_key=us, peer_key=peer.key.public, user="us",
                                 token="ut1_" + "A" * 43)
        assert await admin.peers() == []
        added = await admin.add_peer(url, node_key=us, peer_key=peer.key.public, user="us",
                                     token=token, priority=3)
    finally:
        await peer.stop()
    canonical = f"utesla://127.0.0.1:{peer.port}"
    assert (added.url, added.user, added.priority, added.key, added.created_at) == (
        canonical, "us", 3, peer.key.public.fingerprint(), clock.now)
    assert await admin.peers() == [added]
    assert not hasattr(added, "token")
    # Other spellings of the URL name the same peer.
    assert await admin.set_priority(f"127.0.0.1:{peer.port}/x", 7) == canonical
    assert (await admin.peers())[0].priority == 7
    assert await admin.delete_peer(f"http://127.0.0.1:{peer.port}") == canonical
    for call in (admin.delete_peer(url), admin.set_priority(url, 1)):
        with pytest.raises(UnknownEntry, match=f"no network {canonical}"):
            await call


# --------------------------------------------------------------------------- the running node

def link(url, added, **fields):
    return {"url": url, "added": added, "state": "connecting", "synced": False,
            "rtt_ms": None, "routes": 0, "last_error": "", **fields}


async def store_a_peer(admin, url="utesla://127.0.0.1:9"):
    from utesla_node.storage import Peer
    peer = Peer(url=url, public_key=user_key(tag="p").public.to_pem(), user="us",
                token="ut1_" + "t" * 43, created_at=42.0)
    await (await admin.storage()).add_peer(peer)


def running(admin, clock, links=(), routes=(), local=("hello_world",)):
    """A status file as a live node writes it (our pid, stamped by the test's clock)."""
    write_status(admin.config.data_dir, encode_status(
        {"services": list(local),
         "network": {"links": list(links), "routes": list(routes), "local": list(local)}},
        now=clock.now))


async def test_networks_join_peers_with_the_running_nodes_links(admin, clock):
    await store_a_peer(admin)
    await store_a_peer(admin, "utesla://127.0.0.1:10")
    with pytest.raises(NodeNotRunning):
        await admin.networks()
    running(admin, clock, links=[link("utesla://127.0.0.1:9", 42.0, state="up", rtt_ms=0.7,
                                      routes=2, token_expires_at=99.0)])
    rows = {r.url: r for r in await admin.networks()}
    up, new = rows["utesla://127.0.0.1:9"], rows["utesla://127.0.0.1:10"]
    assert (up.state, up.rtt_ms, up.routes, up.token_expires_at) == ("up", 0.7, 2, 99.0)
    assert (new.state, new.rtt_ms, new.routes) == ("pending", None, None)
    assert list(up.as_dict()) == ["url", "user", "priority", "key", "state", "rtt_ms",
                                  "routes", "last_error", "token_expires_at", "renew_error",
                                  "proxy"]


async def test_services_come_from_the_running_node(admin, clock):
    with pytest.raises(NodeNotRunning):
        admin.services()
    route = {"path": "/far", "origin": "SHA256:o", "next_hop": "utesla://h:1", "hops": 2,
             "replicas": 1, "routes": 3}
    running(admin, clock, routes=[route], local=["echo", "hello_world"])
    rows = admin.services()
    assert [r.as_dict() for r in rows] == [
        {"path": "/echo", "origin": "local", "next_hop": "-", "hops": 0, "replicas": 1},
        {"path": "/hello_world", "origin": "local", "next_hop": "-", "hops": 0, "replicas": 1},
        route]


async def test_wait_for_link_returns_when_the_new_entry_is_up(admin, clock):
    await store_a_peer(admin)
    peer = (await admin.peers())[0]
    url = peer.url
    # An older entry for the same URL being up does not count: only the one stored at 42.0.
    running(admin, clock, links=[link(url, 41.0, state="up", synced=True),
                                 link(url, 42.0, state="up", synced=True, routes=4)])
    row = await admin.wait_for_link(peer, timeout=30)
    assert (row.url, row.state, row.routes) == (url, "up", 4)


async def test_wait_for_link_names_the_last_error_when_it_gives_up(admin, clock):
    await store_a_peer(admin)
    peer = (await admin.peers())[0]
    running(admin, clock, links=[link(peer.url, 42.0, state="backoff",
                                      last_error="refused the gossip subscription")])
    with pytest.raises(LinkNotUp, match=r"not up after 0.2 s \(refused the gossip"):
        await admin.wait_for_link(peer, timeout=0.2, poll=0.01)
    running(admin, clock, links=[])
    with pytest.raises(LinkNotUp, match=r"\(state not started\)"):
        await admin.wait_for_link(peer, timeout=0.05, poll=0.01)
    clock.now += 60                                    # the node stopped writing
    with pytest.raises(NodeNotRunning):
        await admin.wait_for_link(peer, timeout=30)


# --------------------------------------------------------------------------- the database

async def test_a_missing_database_is_refused_without_creating_anything(tmp_path):
    cfg = config(tmp_path / "stray")
    (tmp_path / "stray").mkdir()
    admin = Admin(cfg)
    with pytest.raises(NoDatabase, match="no node database at .*stray/data \\(no such folder"):
        admin.require_database()
    with pytest.raises(NoDatabase):
        await admin.users()
    assert list((tmp_path / "stray").iterdir()) == []
    (tmp_path / "stray" / "data").mkdir()
    with pytest.raises(NoDatabase, match="utesla.db \\(no such file\\)") as info:
        await admin.users()
    assert info.value.path == tmp_path / "stray" / "data" / "utesla.db"
    assert list((tmp_path / "stray" / "data").iterdir()) == []
    # The node's state needs no database.
    with pytest.raises(NodeNotRunning):
        admin.services()
    async with Admin(cfg, create=True) as creating:
        assert await creating.users() == []
    async with Admin(cfg) as again:                    # it exists now
        assert await again.users() == []


def test_what_counts_as_a_nodes_folder(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    assert not is_node_folder(config(folder))
    (folder / "complements").mkdir()
    assert is_node_folder(config(folder))
    (folder / "complements").rmdir()
    (folder / "keys").mkdir()
    (folder / "keys" / "key.pub").write_text("")
    assert not is_node_folder(config(folder))          # a public key alone: anyone's
    (folder / "keys" / "key.priv").write_text("")
    assert is_node_folder(config(folder))
    (folder / "bare.ini").write_text("")
    assert is_node_folder(load_config(folder / "bare.ini"))
