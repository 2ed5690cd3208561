"""Forwarding through real in-process nodes: lines, rings, stars, and the forwarding rules.

Every node listens on loopback port 0 in its own folder; links are made as
``add_network`` would make them (see :func:`helpers.link`).  Waits are on
conditions (routes present, link states), never on sleeps.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import random
import secrets

import pytest

from helpers import (INSPECT_SERVICE as INSPECT, TICKER_SERVICE as TICKER,
                     WHOAMI_SERVICE as WHOAMI, examples, fp, routes, user_key, wait_for)
from protocol.errors import Forbidden, NotFound, Status, Unauthorized


# --------------------------------------------------------------------------- a line

async def test_line_of_five_streams_and_bulk_bodies_arrive_intact(net):
    """A -> B -> C -> D -> E; the services live only on E; A's client never knows."""
    names = "ABCDE"
    nodes = [await net.node(n, {**examples("countdown", "echo"), "whoami": WHOAMI}
                            if n == "E" else None) for n in names]
    a, e = nodes[0], nodes[-1]
    await asyncio.gather(*(net.link(x, y) for x, y in zip(nodes, nodes[1:])))
    await wait_for(lambda: routes(a, "echo") and routes(a, "countdown") and routes(a, "whoami"),
                   10)
    best = routes(a, "echo")[0][1]
    assert best.hops == 4 and best.origin == fp(e)
    assert list(best.path) == [fp(n) for n in nodes[1:]]

    c = a.client()
    assert (await c.get("/whoami")).text == fp(e)

    # A stream keeps its chunks, in order, across four relays.
    async with c.stream("GET", "/countdown", args={"n": 30, "delay": 0.002}) as resp:
        assert resp.status == 200
        got = b"".join([chunk async for chunk in resp])
    assert got == b"".join(f"{i}\n".encode() for i in range(30, 0, -1)) + b"liftoff\n"

    # 2 MiB up and back down, far beyond one stream window at every hop.
    body = random.Random(2).randbytes(2 << 20)
    reply = await c.post("/echo", body, timeout=60)
    assert len(reply.body) == len(body)
    assert hashlib.sha256(reply.body).digest() == hashlib.sha256(body).digest()
    assert len(body) > 4 * a.node.config.stream_window

    # Every relay counted it; no node on the way answered from its own services.
    for n in nodes[:-1]:
        assert n.node.metrics.counters["forwarded_requests"] >= 3


# --------------------------------------------------------------------------- a ring

def ring_distance(i: int, j: int, n: int) -> int:
    d = abs(i - j) % n
    return min(d, n - d)


async def test_ring_of_six_routes_are_loop_free_and_shortest(net):
    n = 6
    nodes = [await net.node(f"R{i}", {f"svc{i}": WHOAMI}) for i in range(n)]
    await asyncio.gather(*(net.link(nodes[i], nodes[(i + d) % n])
                           for i in range(n) for d in (1, -1)))
    ids = [fp(h) for h in nodes]

    def converged() -> bool:
        for i, h in enumerate(nodes):
            for j in range(n):
                if i == j:
                    continue
                cands = routes(h, f"svc{j}")
                if not cands or cands[0][1].hops != ring_distance(i, j, n):
                    return False
        return True

    await wait_for(converged, 15)

    for i, h in enumerate(nodes):
        engine = h.node.network.engine
        neighbours = {ids[(i + 1) % n], ids[(i - 1) % n]}
        for svc, cands in engine.best.items():
            for peer, route in cands:
                assert len(set(route.path)) == len(route.path), route   # no node twice
                assert ids[i] not in route.path, route                   # never through us
                assert peer == route.path[0] and peer in neighbours
                assert route.path[-1] == route.origin
        for j in range(n):
            if i == j:
                continue
            dist = ring_distance(i, j, n)
            # The link forward() would choose sits on a shortest path to the origin.
            for _ in range(4):
                link = h.node.router.choose(f"svc{j}", set(), [])
                assert link is not None
                k = ids.index(link.peer_id)
                assert ring_distance(k, j, n) == dist - 1

    # Every node reaches every service, answered by the node that owns it.
    for i, h in enumerate(nodes):
        c = h.client()
        replies = await asyncio.gather(*(c.get(f"/svc{j}") for j in range(n)))
        assert [r.text for r in replies] == ids
    # No request ever came back to a node it had visited (that would have been a 508), and
    # each crossed as many relays as its route's hops.
    for h in nodes:
        assert not [k for k in h.node.metrics.requests if k[1] == Status.LOOP_DETECTED]
    relayed = sum(h.node.metrics.counters["forwarded_requests"] for h in nodes)
    assert relayed == sum(ring_distance(i, j, n) for i in range(n) for j in range(n))


# --------------------------------------------------------------------------- a star

async def test_star_every_leaf_reaches_every_other_leaf_through_the_hub(net):
    hub = await net.node("hub")
    leaves = [await net.node(f"leaf{i}", {f"leaf{i}": WHOAMI}) for i in range(4)]
    await asyncio.gather(*(net.link(x, y) for leaf in leaves
                           for x, y in ((leaf, hub), (hub, leaf))))
    await wait_for(lambda: all(routes(x, f"leaf{j}") for x in leaves
                               for j in range(4) if x is not leaves[j]), 10)
    for i, leaf in enumerate(leaves):
        c = leaf.client()
        for j, other in enumerate(leaves):
            if i == j:
                continue
            assert routes(leaf, f"leaf{j}")[0][1].hops == 2
            assert (await c.get(f"/leaf{j}")).text == fp(other)
        assert (await c.get(f"/leaf{i}")).text == fp(leaf)     # its own stays local
    # The hub relayed 4 x 3 requests, and served none itself.
    assert hub.node.metrics.counters["forwarded_requests"] == 12


# --------------------------------------------------------------------------- sub-services

async def test_forwarded_sub_service_reaches_the_sub_module_on_the_far_node(net):
    a = await net.node("a")
    b = await net.node("b", {"svc": "class Handler:\n    async def get(self):\n"
                                    "        await self.write('top')\n",
                             "svc/sub": INSPECT})
    account_token = await net.link(a, b, user="node-a", service="svc/sub")
    assert routes(a, "svc")
    c = a.client()
    assert (await c.get("/svc")).text == "top"
    info = (await c.get("/svc/sub/deeper/x", args={"k": "v"})).json()
    assert info["node"] == fp(b)
    assert info["path"] == "/svc/sub/deeper/x"
    assert info["subpath"] == ["deeper", "x"]
    assert info["args"] == {"k": "v"}
    # The far node served it as the account it gave us, not as the entry node's client.
    assert info["user"] == "node-a"
    assert account_token not in (await c.get("/svc/sub")).text


# --------------------------------------------------------------------------- authorisation

async def test_entry_node_checks_the_token_before_forwarding(net):
    a = await net.node("a")
    b = await net.node("b", {"whoami": WHOAMI})
    await net.link(a, b, service="whoami")
    seen_before = sum(v for (svc, _), v in b.node.metrics.requests.items() if svc == "whoami")

    bad = a.client(token="ut1_" + "A" * 43)
    with pytest.raises(Unauthorized):
        await bad.get("/whoami")
    none = a.client(token=None)
    with pytest.raises(Unauthorized):
        await none.get("/whoami")
    # A token of alice's scoped to another service: 403 at the entry node.
    scoped, _ = await a.node.authority.issue_token("alice", ["hello_world"])
    with pytest.raises(Forbidden):
        await a.client(token=scoped).get("/whoami")

    assert a.node.metrics.counters["forwarded_requests"] == 0
    seen_after = sum(v for (svc, _), v in b.node.metrics.requests.items() if svc == "whoami")
    assert seen_after == seen_before == 0
    # And with a good token it does go through.
    assert (await a.client().get("/whoami")).text == fp(b)


async def test_far_node_applies_the_rights_of_the_account_it_gave_us(net):
    a = await net.node("a")
    b = await net.node("b", {"whoami": WHOAMI, "open": WHOAMI})
    # A guest account: it may subscribe to routes and use /open, nothing else.
    await net.link(a, b, user="guest-a", guest=True, scopes=("_node/net/*", "open"),
                   service="whoami")
    c = a.client()
    assert (await c.get("/open")).text == fp(b)
    reply = await c.get("/whoami", check=False)
    assert reply.status == Status.FORBIDDEN               # relayed from b, not invented by a
    assert "whoami" in reply.text
    with pytest.raises(Forbidden):
        await c.get("/whoami")


# --------------------------------------------------------------------------- loops and hops

async def _peer_session(b):
    """A session to ``b`` as a downstream node holds it: authenticated, subscribed to routes."""
    await b.add_user("spy", key=user_key(tag="spy"))
    client = b.client("spy")
    session = await client.connect()
    sub = session.open_stream("GET", "/_node/net/routes", token=b.tokens["spy"])
    status, _ = await asyncio.wait_for(sub.head, 5)
    assert status == Status.OK
    return session, b.tokens["spy"]


async def _send(session, path, token, envelope):
    stream = session.open_stream("GET", path, token=token, envelope=envelope)
    status, _ = await asyncio.wait_for(stream.head, 10)
    body = await asyncio.wait_for(stream.read_all(), 10)
    return status, body.decode()


async def test_a_request_that_comes_back_to_a_node_is_refused_508(net):
    a = await net.node("a")
    b = await net.node("b", {"local": WHOAMI})
    c = await net.node("c", {"far": WHOAMI})
    await net.link(b, c, service="far")
    session, token = await _peer_session(b)
    b_id = fp(b)

    def env(path, hops=4):
        return {"id": secrets.token_bytes(16), "user": "someone", "path": path, "hops": hops}

    # A well-formed forwarded request: b relays it to c.
    status, body = await _send(session, "/far", token, env([fp(a)]))
    assert (status, body) == (Status.OK, fp(c))
    # The envelope's path already holds b: refused, whether b would forward it ...
    status, body = await _send(session, "/far", token, env([fp(a), b_id]))
    assert status == Status.LOOP_DETECTED, body
    # ... or serve it itself.
    status, body = await _send(session, "/local", token, env([b_id, fp(a)]))
    assert status == Status.LOOP_DETECTED, body
    # No hops left: b may not forward it any further.
    status, body = await _send(session, "/far", token, env([fp(a)], hops=0))
    assert status == Status.LOOP_DETECTED, body
    # ... but it may still answer from its own services.
    status, body = await _send(session, "/local", token, env([fp(a)], hops=0))
    assert (status, body) == (Status.OK, b_id)
    # c never saw the refused ones.
    assert sum(v for (svc, _), v in c.node.metrics.requests.items() if svc == "far") == 1


async def test_a_users_envelope_can_only_restrict_its_own_request(net):
    """SPEC §6.7: an envelope is accepted from anyone, and never widens anyone's rights."""
    a = await net.node("a", examples=True)
    b = await net.node("b", {"inspect": INSPECT})
    await net.link(a, b, user="node-a", service="inspect")
    session = await a.client().connect()
    token = a.tokens["alice"]

    def env(**kw):
        return {"id": secrets.token_bytes(16), "user": "root", "path": [], "hops": 3, **kw}

    # Claiming to be someone else changes nothing: the far node acts as the account it gave a.
    status, body = await _send(session, "/inspect", token, env())
    assert status == Status.OK, body
    assert json.loads(body)["user"] == "node-a"
    # Fewer hops, or the entry node itself on the path: refused, nothing forwarded.
    forwarded = a.node.metrics.counters["forwarded_requests"]
    assert (await _send(session, "/inspect", token, env(hops=0)))[0] == Status.LOOP_DETECTED
    assert (await _send(session, "/inspect", token, env(path=[fp(a)])))[0] == \
        Status.LOOP_DETECTED
    # A route through an excluded node is not taken: no other route, 503.
    assert (await _send(session, "/inspect", token, env(path=[fp(b)])))[0] == Status.UNAVAILABLE
    assert a.node.metrics.counters["forwarded_requests"] == forwarded
    # A malformed envelope is a bad request.
    for bad in (env(path="x"), env(path=[1, 2]), env(hops="many"), env(hops=-1),
                env(path=["n"] * 65), env(id=b"short"), env(user=5), env(ttl="soon")):
        assert (await _send(session, "/inspect", token, bad))[0] == Status.BAD_REQUEST, bad
        assert (await _send(session, "/hello_world", token, bad))[0] == Status.BAD_REQUEST
    assert (await _send(session, "/hello_world", token, env(path=[fp(a)])))[0] == \
        Status.LOOP_DETECTED
    assert (await _send(session, "/hello_world", token, env(hops=0)))[0] == Status.OK


async def test_unknown_service_is_404_from_the_entry_node(net):
    a = await net.node("a")
    b = await net.node("b", {"whoami": WHOAMI})
    await net.link(a, b, service="whoami")
    with pytest.raises(NotFound):
        await a.client().get("/nowhere")
    assert a.node.metrics.counters["forwarded_requests"] == 0


async def test_many_concurrent_forwarded_streams_share_one_link(net):
    """16+ clients at once through a forward (the original deadlocked at 16)."""
    a = await net.node("a")
    b = await net.node("b", {"ticker": TICKER})
    await net.link(a, b, service="ticker")
    clients = [a.client() for _ in range(24)]

    async def one(c):
        async with c.stream("GET", "/ticker", args={"n": 20, "delay": 0.002}) as resp:
            return b"".join([x async for x in resp])

    want = b"".join(f"tick {i}\n".encode() for i in range(20))
    got = await asyncio.wait_for(asyncio.gather(*(one(c) for c in clients)), 30)
    assert got == [want] * 24
    link = next(iter(a.node.network.links.values()))
    assert link.forwarded == 24 and link.inflight == 0
