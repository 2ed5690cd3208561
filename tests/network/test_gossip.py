"""The path-vector gossip engine (utesla_node/network/gossip.py): pure, fast, no sockets.

Engine scenarios run several real engines through ``bench/_gossipsim.py``: directional
links, a message queue with per-link latency and a virtual clock; every message goes through
``encode_message``/``decode_message``; a digest mismatch leads to a re-subscription, as in
the runtime.
"""
from __future__ import annotations

import random
import sys
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from utesla_node.network.gossip import (MAX_MESSAGE, GossipEngine, GossipError, Route, diff,
                                        digest, decode_message, encode_message, export_route,
                                        export_table, merge)

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from _gossipsim import Sim, distances_to, line, random_graph, ring, star  # noqa: E402

D0 = bytes(16)


def R(service, *path, version=1):
    return Route(service, path[-1], version, tuple(path))


def wire(msg) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


def build(edges, n, services, both=True, **kw):
    """A Sim of nodes n0..n{n-1}; ``services``: {node index: [names]}; links both ways."""
    sim = Sim(**kw)
    ids = [f"n{i}" for i in range(n)]
    for i, nid in enumerate(ids):
        sim.add_node(nid, services.get(i, ()))
    for a, b in edges:
        if both:
            sim.connect(ids[a], ids[b])
        else:
            sim.add_link(ids[a], ids[b])
    return sim, ids


def assert_loop_free(sim):
    for nid, e in sim.engines.items():
        for svc, cands in e.best.items():
            for _peer, r in cands:
                assert nid not in r.path, (nid, r)
                assert len(set(r.path)) == len(r.path), (nid, r)
                assert r.hops <= e.max_hops


def assert_shortest(sim, placement):
    """Every node's best route to every service has the BFS hop count (or is absent)."""
    for svc, origin in placement.items():
        dist = distances_to(sim.links, origin)
        for nid, e in sim.engines.items():
            if nid == origin:
                continue
            best = sim.best(nid, svc)
            want = dist.get(nid)
            if want is None or want > e.max_hops:
                assert best is None, (nid, svc, best)
            else:
                assert best is not None and best[1].hops == want, (nid, svc, best, want)
                assert best[1].origin == origin


# ============================================================================ Route.from_wire

def test_route_round_trip():
    r = R("files/share", "b", "c", version=7)
    assert Route.from_wire(r.to_wire()) == r
    assert Route.from_wire(msgpack.unpackb(msgpack.packb(r.to_wire()))) == r
    assert r.hops == 2 and r.origin == "c"


@pytest.mark.parametrize("obj", [
    None, "svc", {"s": 1}, (), [],
    ["svc", "a", 1],                          # too short
    ["svc", "a", 1, ["a"], "x"],              # too long
    [b"svc", "a", 1, ["a"]],                  # service not str
    ["svc", b"a", 1, ["a"]],                  # origin not str
    ["svc", "a", "1", ["a"]],                 # version not int
    ["svc", "a", 1.0, ["a"]],
    ["svc", "a", True, ["a"]],                # bool is not a version
    ["svc", "a", -1, ["a"]],
    ["svc", "a", 1 << 63, ["a"]],
    ["svc", "a", 1, ("a",)],                  # path not a list
    ["svc", "a", 1, "a"],
    ["svc", "a", 1, []],                      # empty path
    ["svc", "a", 1, ["b", 3, "a"]],           # non-str id
    ["svc", "a", 1, ["", "a"]],               # empty id
    ["svc", "a", 1, [["b"], "a"]],
])
def test_route_from_wire_rejects_bad_types(obj):
    with pytest.raises(GossipError):
        Route.from_wire(obj)


@pytest.mark.parametrize("name", [
    "", "-svc", "_svc", "/svc", "svc/", "a//b", "a b", "a.b", "../etc", "svc\n", "é",
    "x" * 65, "/".join(["a"] * 9), "a/-b", "a\x00",
])
def test_route_from_wire_rejects_bad_service_names(name):
    with pytest.raises(GossipError):
        Route.from_wire([name, "a", 1, ["a"]])


@pytest.mark.parametrize("name", ["a", "hello_world", "A-1", "x" * 64, "/".join(["a"] * 8),
                                  "files/share-2"])
def test_route_from_wire_accepts_good_service_names(name):
    assert Route.from_wire([name, "a", 1, ["a"]]).service == name


def test_route_path_must_end_at_origin():
    with pytest.raises(GossipError):
        Route.from_wire(["svc", "a", 1, ["a", "b"]])
    with pytest.raises(GossipError):
        Route.from_wire(["svc", "c", 1, ["a", "b"]])
    assert Route.from_wire(["svc", "b", 1, ["a", "b"]]).origin == "b"


def test_route_path_without_duplicates():
    with pytest.raises(GossipError):
        Route.from_wire(["svc", "a", 1, ["a", "a"]])
    with pytest.raises(GossipError):
        Route.from_wire(["svc", "c", 1, ["b", "a", "b", "c"]])


def test_route_ids_bounded():
    Route.from_wire(["svc", "a" * 80, 1, ["b" * 80, "a" * 80]])
    with pytest.raises(GossipError):
        Route.from_wire(["svc", "a" * 81, 1, ["a" * 81]])
    with pytest.raises(GossipError):
        Route.from_wire(["svc", "a", 1, ["b" * 81, "a"]])


# ============================================================================ decode_message

def good_snap(n=2):
    routes = [R(f"s{i}", "b", "c") for i in range(n)]
    return {"t": "snap", "r": [r.to_wire() for r in routes],
            "d": digest({r.service: r for r in routes})}


def test_decode_valid_messages():
    snap = decode_message(encode_message(good_snap()), 10)
    assert snap["t"] == "snap" and [r.service for r in snap["r"]] == ["s0", "s1"]
    assert all(isinstance(r, Route) for r in snap["r"])
    assert decode_message(encode_message({"t": "dig", "d": D0}), 10) == {"t": "dig", "d": D0}
    upd = decode_message(encode_message({"t": "upd", "r": [R("s", "a").to_wire()],
                                         "w": ["old", "x/y"], "d": D0}), 10)
    assert upd["r"] == [R("s", "a")] and upd["w"] == ["old", "x/y"]
    empty = decode_message(encode_message({"t": "upd", "d": D0}), 10)
    assert empty["r"] == [] and empty["w"] == []


@pytest.mark.parametrize("data", [
    b"", b"\xc1", b"\xff\xff", b"\x92", b"garbage, not msgpack at all",
    wire([1, 2, 3]), wire("snap"), wire(None), wire(17),
    wire({"t": "hello", "d": D0}),                          # unknown type
    wire({"d": D0}),                                        # no type
    wire({"t": b"dig", "d": D0}),
    wire({"t": "dig"}),                                     # no digest
    wire({"t": "dig", "d": bytes(15)}),                     # bad digest length
    wire({"t": "dig", "d": bytes(17)}),
    wire({"t": "dig", "d": "0" * 16}),                      # digest not bytes
    wire({"t": "dig", "d": list(range(16))}),
    wire({"t": "dig", "d": D0}) + b"\x00",                  # trailing bytes
    wire({1: "dig", "d": D0}),                              # non-string key
    msgpack.packb({"t": "dig", "d": msgpack.ExtType(1, D0)}),  # ext type
    wire({"t": "snap", "d": D0}),                           # snapshot without routes
    wire({"t": "snap", "r": {}, "d": D0}),
    wire({"t": "snap", "r": [["s", "a", 1, ["b"]]], "d": D0}),    # bad route inside
    wire({"t": "snap", "r": [["bad name", "a", 1, ["a"]]], "d": D0}),
    wire({"t": "upd", "r": "x", "w": [], "d": D0}),
    wire({"t": "upd", "r": [], "w": "x", "d": D0}),
    wire({"t": "upd", "r": [], "w": ["../x"], "d": D0}),    # bad withdrawn name
    wire({"t": "upd", "r": [], "w": [7], "d": D0}),
    wire({"t": "dig", "d": D0, "x": "y" * 5000}),           # string over the limit
    wire({"t": "dig", "d": D0, **{f"k{i}": i for i in range(20)}}),  # map too big
])
def test_decode_rejects_malformed(data):
    with pytest.raises(GossipError):
        decode_message(data, 10)


def test_decode_rejects_oversized():
    with pytest.raises(GossipError, match="too large"):
        decode_message(b"\x00" * (MAX_MESSAGE + 1), 10)


def test_decode_enforces_route_cap():
    assert len(decode_message(encode_message(good_snap(10)), 10)["r"]) == 10
    with pytest.raises(GossipError):
        decode_message(encode_message(good_snap(11)), 10)
    routes = [R(f"s{i}", "a").to_wire() for i in range(6)]
    ok = {"t": "upd", "r": routes, "w": ["w0", "w1", "w2", "w3"], "d": D0}
    assert len(decode_message(encode_message(ok), 10)["w"]) == 4
    with pytest.raises(GossipError):
        decode_message(encode_message({**ok, "w": ok["w"] + ["w4"]}), 10)
    with pytest.raises(GossipError):       # arrays longer than the cap (+ slack) never decode
        decode_message(encode_message({"t": "upd", "r": [], "w": ["s"] * 100, "d": D0}), 10)


# ============================================================================ pure functions

def test_merge_drops_self_and_over_hops_and_orders():
    learned = {
        "p2": {"a": R("a", "p2", "x", "o"), "b": R("b", "p2", "me", "o")},
        "p1": {"a": R("a", "p1", "x", "o"), "c": R("c", "p1", "1", "2", "3", "4", "o")},
        "p0": {"a": R("a", "p0", "o"), "b": R("b", "p0", "o")},
        "p3": {"a": R("a", "p3", "y", "z", "o")},
    }
    out = merge("me", learned, max_hops=4)
    assert [p for p, _ in out["a"]] == ["p0", "p1", "p2", "p3"]   # hops, then peer id
    assert [r.hops for _, r in out["a"]] == [2, 3, 3, 4]
    assert [p for p, _ in out["b"]] == ["p0"]          # p2's route passes through us
    assert "c" not in out                              # 6 hops > 4
    assert set(merge("me", learned, 4, {"b"})) == {"b"}
    assert merge("me", learned, 4, {"nothing"}) == {}
    assert merge("me", learned, 1) == {}


def test_export_split_horizon_prefix_hop_limit():
    cands = [("x", R("svc", "x", "o", version=5)), ("y", R("svc", "y", "z", "o", version=5))]
    # normal: best route, our id prefixed
    assert export_route("me", "svc", False, 9, cands, "sub", 8) == \
        Route("svc", "o", 5, ("me", "x", "o"))
    # the subscriber is on the best path: the next candidate avoiding it
    assert export_route("me", "svc", False, 9, cands, "x", 8).path == ("me", "y", "z", "o")
    assert export_route("me", "svc", False, 9, cands, "o", 8) is None   # every path has it
    # hop limit: our route would be one hop longer
    assert export_route("me", "svc", False, 9, cands, "sub", 3).path == ("me", "x", "o")
    assert export_route("me", "svc", False, 9, cands, "sub", 2) is None
    assert export_route("me", "svc", False, 9, None, "sub", 8) is None
    # local beats any remote route
    assert export_route("me", "svc", True, 9, cands, "sub", 8) == Route("svc", "me", 9, ("me",))


def test_export_table():
    learned = {"x": {"a": R("a", "x", "o"), "b": R("b", "x")},
               "y": {"a": R("a", "y", "o"), "c": R("c", "y", "sub", "q")}}
    best = merge("me", learned, 8)
    t = export_table("me", {"l", "b"}, 3, best, "sub", 8)
    assert set(t) == {"a", "b", "l"}                    # c's only path contains sub
    assert t["l"] == Route("l", "me", 3, ("me",))
    assert t["b"] == Route("b", "me", 3, ("me",))       # local preferred over x's route
    assert t["a"].path == ("me", "x", "o")
    for sub in ("x", "y", "o", "q", "sub", "other"):
        for r in export_table("me", {"l"}, 3, best, sub, 8).values():
            assert sub not in r.path and r.path[0] == "me"
    assert export_table("me", set(), 3, best, "y", 2) == {"b": R("b", "me", "x")}
    to_x = export_table("me", set(), 3, best, "x", 8)          # x's own routes are not for x
    assert {s: r.path for s, r in to_x.items()} == {"a": ("me", "y", "o"),
                                                    "c": ("me", "y", "sub", "q")}
    assert export_table("me", set(), 0, {}, "sub", 8) == {}


def test_diff():
    a1, a2, b, c = R("a", "x"), R("a", "y", "x"), R("b", "x"), R("c", "x")
    assert diff({}, {}) == ([], [])
    assert diff({"a": a1, "b": b}, {"a": a1, "b": b}) == ([], [])
    up, gone = diff({"a": a1, "b": b}, {"a": a2, "c": c})
    assert sorted(up, key=lambda r: r.service) == [a2, c] and gone == ["b"]
    assert diff({"a": a1}, {}) == ([], ["a"])
    assert diff({}, {"a": a1}) == ([a1], [])
    assert diff({"a": a1}, {"a": R("a", "x", version=2)}) == ([R("a", "x", version=2)], [])


def test_digest_order_independent_and_sensitive():
    routes = [R(f"s{i}", "p", f"o{i}", version=i + 1) for i in range(20)]
    t1 = {r.service: r for r in routes}
    shuffled = routes[:]
    random.Random(4).shuffle(shuffled)
    t2 = {r.service: r for r in shuffled}
    assert list(t1) != list(t2) and digest(t1) == digest(t2)
    assert len(digest(t1)) == 16 and digest({}) == D0
    variants = [
        {**t1, "s0": R("s0", "p", "o0", version=2)},         # version
        {**t1, "s0": R("s0", "q", "o0", version=1)},         # path
        {**t1, "s0": R("s0", "q", "p", "o0", version=1)},    # longer path
        {k: v for k, v in t1.items() if k != "s3"},          # route missing
        {**t1, "extra": R("extra", "p")},                    # route added
    ]
    seen = {digest(t1)}
    for v in variants:
        seen.add(digest(v))
    assert len(seen) == len(variants) + 1
    # the cached per-route hash does not leak into equality, hashing or repr
    r = R("s", "a")
    r.wire_hash()
    assert r == R("s", "a") and hash(r) == hash(R("s", "a")) and "wire" not in repr(r)


def test_engine_subscribe_snapshot_and_digest():
    e = GossipEngine("me", max_hops=8)
    e.set_local({"b", "a"}, 5.0)
    assert e.version == 5000
    snap = e.subscribe("sub", 5.0)
    assert snap["t"] == "snap" and sorted(r[0] for r in snap["r"]) == ["a", "b"]
    assert snap["d"] == digest({r[0]: Route.from_wire(r) for r in snap["r"]})
    assert e.poll(5.0) == [] and e.next_deadline() == pytest.approx(6.0)
    assert e.poll(6.0) == [("sub", {"t": "dig", "d": snap["d"]})]
    e.set_local({"b", "a"}, 6.5)                   # unchanged: no new version, no update
    assert e.version == 5000 and e.poll(6.5) == []
    e.set_local({"a"}, 8.0)                        # b withdrawn, a re-announced (new version)
    [(sub, upd)] = e.poll(8.0)
    assert sub == "sub" and upd["t"] == "upd" and upd["w"] == ["b"]
    assert [r[0] for r in upd["r"]] == ["a"] and upd["r"][0][2] == 8000
    e.unsubscribe("sub")
    assert e.poll(100.0) == [] and e.next_deadline() is None


def test_engine_receive_caps_routes_per_peer():
    e = GossipEngine("me", max_routes=10)
    e.link_up("p", 0.0)
    e.receive("p", {"t": "upd", "r": [R(f"s{i}", "p") for i in range(25)], "w": [],
                    "d": D0}, 0.0)
    assert len(e.learned["p"]) == 10 and e.rejected == 15
    assert "p" in e.resync                          # its digest cannot match: resync
    e.receive("p", {"t": "upd", "r": [R("s3", "p", version=2)], "w": ["s0"], "d": D0}, 0.1)
    assert len(e.learned["p"]) == 9 and e.learned["p"]["s3"].version == 2  # known: replaced
    e.receive("p", {"t": "upd", "r": [R("new", "p"), R("new2", "p")], "w": [], "d": D0}, 0.2)
    assert len(e.learned["p"]) == 10 and e.rejected == 16


def test_ghost_flushing_withdraws_a_worse_route_at_once():
    e = GossipEngine("me", min_update_interval=0.02)
    for peer in ("p", "q"):
        e.link_up(peer, 0.0)
    e.receive("p", {"t": "upd", "r": [R("svc", "p", "o"), R("other", "p")], "w": [],
                    "d": D0}, 0.0)
    e.receive("q", {"t": "upd", "r": [R("svc", "q", "x", "o")], "w": [], "d": D0}, 0.0)
    snap = e.subscribe("sub", 0.0)
    assert {r[0]: r[3] for r in snap["r"]} == {"svc": ["me", "p", "o"], "other": ["me", "p"]}
    e.poll(0.0)
    # p loses its route while the subscriber's next update must wait until 0.02:
    # the longer route is not announced yet, but the stale one is withdrawn now.
    e.receive("p", {"t": "upd", "r": [], "w": ["svc"], "d": D0}, 0.01)
    assert e.next_deadline() <= 0.01
    [(sub, msg)] = e.poll(0.01)
    assert sub == "sub" and msg == {"t": "upd", "r": [], "w": ["svc"], "d": digest(
        {"other": Route("other", "p", 1, ("me", "p"))})}
    assert e.poll(0.015) == []
    [(sub, msg)] = e.poll(0.02)                     # the new route, when due
    assert msg["t"] == "upd" and msg["w"] == [] and [r[3] for r in msg["r"]] == \
        [["me", "q", "x", "o"]]
    # a route that gets *shorter* while rate-limited simply waits
    e.receive("p", {"t": "upd", "r": [R("svc", "p", "o")], "w": [], "d": D0}, 0.025)
    assert e.poll(0.025) == []
    [(sub, msg)] = e.poll(0.04)
    assert [r[3] for r in msg["r"]] == [["me", "p", "o"]] and msg["w"] == []


def test_dead_node_does_not_cause_path_exploration():
    # With a generous hop limit, stale paths to a dead node used to be explored one
    # min_update_interval per hop up to max_hops (thousands of updates for seconds).
    edges = random_graph(60, 4.0, random.Random(7))
    sim, ids = build(edges, 60, {7: ["victim"], 20: ["a"], 40: ["b"]}, max_hops=64)
    sim.settle()
    sim.reset_stats()
    t0 = sim.now
    sim.kill(ids[7])
    assert sim.run(t0 + 10, stop=lambda: not _routes_via(sim, ids[7]))
    assert sim.now - t0 < 0.05
    sim.settle()
    assert sim.kinds["upd"] < 4 * len(sim.links)
    assert_shortest(sim, {"a": ids[20], "b": ids[40]})


# ============================================================================ engine scenarios

def test_two_engines():
    sim, (a, b) = build([], 2, {1: ["hello"]})
    sim.add_link(a, b)                              # a subscribes to b only
    sim.settle()
    assert sim.best(a, "hello")[1] == Route("hello", b, sim.engines[b].version, (b,))
    assert sim.engines[b].best == {}                # b learns nothing from a
    assert sim.engines[a].resync == set()
    sim.set_services(b, ["hello", "bye"])
    sim.run_for(0.1)
    assert set(sim.engines[a].best) == {"hello", "bye"}
    sim.set_services(b, [])
    sim.run_for(0.1)
    assert sim.engines[a].best == {} and sim.engines[a].learned[b] == {}
    assert sim.kinds["upd"] == 2 and sim.decode_errors == 0


def test_line_of_five():
    sim, ids = build(line(5), 5, {0: ["svc"]})
    sim.settle()
    assert [sim.best(n, "svc")[1].hops for n in ids[1:]] == [1, 2, 3, 4]
    assert sim.best(ids[4], "svc")[1].path == tuple(reversed(ids[:4]))
    assert sim.best(ids[4], "svc")[0] == ids[3]
    assert_loop_free(sim)
    # one way only: nothing flows against the subscriptions
    sim2, ids2 = build(line(5), 5, {4: ["svc"]}, both=False)   # n0->n1->...->n4
    sim2.settle()
    assert [sim2.best(n, "svc")[1].hops for n in ids2[:4]] == [4, 3, 2, 1]
    sim3, ids3 = build(line(5), 5, {0: ["svc"]}, both=False)
    sim3.settle()
    assert all(sim3.best(n, "svc") is None for n in ids3)


def test_ring_of_six_loop_free_and_shortest():
    services = {0: ["s0"], 2: ["s2"], 3: ["s3", "shared"], 5: ["shared"]}
    sim, ids = build(ring(6), 6, services)
    sim.settle()
    assert_loop_free(sim)
    assert_shortest(sim, {"s0": ids[0], "s2": ids[2], "s3": ids[3]})
    assert sim.best(ids[3], "s0")[1].hops == 3
    assert len(sim.engines[ids[1]].best["s0"]) == 2            # both ways round the ring
    # two replicas: each node's best goes to the nearest one
    for i in (0, 1, 2, 4):
        best = sim.best(ids[i], "shared")[1]
        assert best.hops == min(abs(i - 3), abs(i - 5), 6 - abs(i - 5), 6 - abs(i - 3))
    assert {r.origin for _, r in sim.engines[ids[4]].best["shared"]} == {ids[3], ids[5]}


def test_star():
    sim, ids = build(star(6), 6, {3: ["svc"], 0: ["hub"]})
    sim.settle()
    for i in (1, 2, 4, 5):
        assert sim.best(ids[i], "svc")[1].path == (ids[0], ids[3])
        assert sim.best(ids[i], "hub")[1].path == (ids[0],)
    assert sim.best(ids[0], "svc")[1].path == (ids[3],)
    assert_loop_free(sim)


def _routes_via(sim, victim):
    return [(nid, svc) for nid, e in sim.engines.items() for svc, cands in e.best.items()
            for _, r in cands if victim in r.path]


@pytest.mark.parametrize("topology", ["line", "ring", "mesh"])
def test_node_removed_then_readded(topology):
    n = 8
    edges = {"line": line(n), "ring": ring(n),
             "mesh": ring(n) + [(0, 4), (2, 6), (1, 5)]}[topology]
    services = {3: ["victim"], 0: ["zero"], 6: ["six"]}
    sim, ids = build(edges, n, services)
    sim.settle()
    placement = {"victim": ids[3], "zero": ids[0], "six": ids[6]}
    assert_shortest(sim, placement)
    victim = ids[3]
    assert _routes_via(sim, victim)
    links = sim.kill(victim)
    t0 = sim.now
    done = sim.run(t0 + 10, stop=lambda: not _routes_via(sim, victim))
    assert done and sim.now - t0 < 1.0              # withdrawn everywhere, quickly
    sim.settle()
    assert not _routes_via(sim, victim)
    assert all("victim" not in e.best for e in sim.engines.values())
    del placement["victim"]
    assert_shortest(sim, placement)
    assert_loop_free(sim)
    # back again, with its links: its routes come back everywhere
    sim.add_node(victim, ["victim"])
    for down, up in links:
        sim.add_link(down, up)
    t0 = sim.now
    assert sim.run(t0 + 10, stop=lambda: all(
        sim.best(nid, "victim") for nid in ids if nid != victim))
    assert sim.now - t0 < 1.0
    sim.settle()
    placement["victim"] = victim
    assert_shortest(sim, placement)
    assert_loop_free(sim)


def test_garbage_from_a_peer_is_dropped_and_resynced():
    sim, (a, b, c) = build([(0, 1), (0, 2)], 3, {1: ["from_b"], 2: ["from_c"]})
    sim.settle()
    for junk in (b"\xc1junk", wire({"t": "snap", "r": [["x y", "q", 1, ["q"]]], "d": D0}),
                 wire({"t": "dig", "d": b"short"}), b"\x00" * (MAX_MESSAGE + 1)):
        sim.inject(a, b, junk)
    sim.run_for(0.01)
    assert sim.decode_errors == 4
    assert b in sim.engines[a].resync
    assert sim.best(a, "from_b") and sim.best(a, "from_c")    # nothing lost meanwhile
    sim.settle()
    assert sim.resubscriptions >= 1 and sim.engines[a].resync == set()
    assert sim.best(a, "from_b")[1].path == (b,) and sim.best(a, "from_c")[1].path == (c,)
    assert sim.engines[a].rejected == 0


def test_flood_over_max_routes_is_capped():
    # 30 origins, each with one service, join hub `h` one after another; `r` subscribes to h
    # with room for 10 routes per peer.
    sim = Sim(digest_interval=0.5)
    sim.add_node("h")
    sim.add_node("r", max_routes=10)
    sim.add_node("ok", ["fine"])
    sim.add_link("r", "h")
    sim.add_link("r", "ok")
    for i in range(30):
        sim.add_node(f"o{i}", [f"svc{i}"])
        sim.add_link("h", f"o{i}")
        sim.run_for(0.05)                           # one small update each
    sim.run_for(5)
    r = sim.engines["r"]
    assert len(r.learned["h"]) <= 10
    assert r.rejected > 0
    assert sim.decode_errors > 0                    # the 31-route snapshots are refused
    assert len([s for s in r.best if s.startswith("svc")]) <= 10
    assert sim.best("r", "fine")[1].path == ("ok",)  # other peers unaffected
    assert len(sim.engines["h"].best) == 30
    assert_loop_free(sim)


def test_hop_limit():
    sim, ids = build(line(8), 8, {0: ["svc"]}, max_hops=3)
    sim.settle()
    assert [sim.best(n, "svc")[1].hops for n in ids[1:4]] == [1, 2, 3]
    assert all(sim.best(n, "svc") is None for n in ids[4:])
    assert all(not e.learned.get(ids[4], {}) for e in [sim.engines[ids[5]]])
    assert_loop_free(sim)


def test_steady_state_traffic_is_one_digest_per_subscription():
    di = 0.5
    edges = ring(7) + [(0, 3)]
    sim, ids = build(edges, 7, {0: ["a"], 4: ["b", "c"]}, digest_interval=di)
    sim.add_link(ids[5], ids[1])                    # one extra one-way subscription
    sim.settle()
    sim.reset_stats()
    span = 40.0
    sim.run_for(span)
    assert set(sim.kinds) == {"dig"}
    for nid in ids:
        subs = sim.subscriptions(nid)
        rate = sim.msgs[nid] / span
        assert abs(rate - subs / di) <= subs / span + 1e-9, (nid, rate, subs)
    assert sim.resubscriptions == 0
    per_node_bytes = {nid: sim.bytes[nid] / sim.msgs[nid] for nid in ids}
    assert max(per_node_bytes.values()) == min(per_node_bytes.values()) <= 32


def test_route_ttl_expiry_when_a_peer_goes_silent():
    sim, (a, b, c) = build([(0, 1), (1, 2)], 3, {2: ["svc"]}, digest_interval=1.0,
                           route_ttl=3.0)
    sim.settle()
    assert sim.best(a, "svc")[1].path == (b, c)
    sim.muted.add(b)                                # b's gossip is lost; links stay "up"
    t0 = sim.now
    assert sim.run(t0 + 20, stop=lambda: sim.best(a, "svc") is None)
    assert 2.0 <= sim.now - t0 <= 3.0 + 1e-6        # ttl after the last message heard
    assert sim.engines[a].learned.get(b, {}) == {}
    assert sim.best(b, "svc") is not None           # b itself still hears c
    sim.muted.discard(b)
    t0 = sim.now
    assert sim.run(t0 + 20, stop=lambda: sim.best(a, "svc") is not None)
    assert sim.best(a, "svc")[1].path == (b, c)
    assert sim.now - t0 <= 3.0 + 1.5                # the next re-subscription repairs it


def test_anti_entropy_repairs_a_corrupted_table():
    sim, ids = build(line(4), 4, {0: ["s0"], 3: ["s3"]}, digest_interval=1.0)
    sim.settle()
    a, b = ids[2], ids[1]
    e = sim.engines[a]
    good = dict(e.learned[b])
    # behind its back: a route vanishes, another is rewritten
    del e.learned[b]["s0"]
    e.learned[b]["bogus"] = R("bogus", b, "zz")
    sim.reset_stats()
    t0 = sim.now
    assert sim.run(t0 + 5, stop=lambda: b in e.resync)
    assert sim.now - t0 <= 1.0 + 1e-6               # the next digest tells
    assert sim.run(t0 + 10, stop=lambda: e.learned.get(b) == good)
    assert sim.resubscriptions == 1 and sim.kinds["snap"] == 1
    sim.settle()
    assert e.resync == set() and e.learned[b] == good
    assert "bogus" not in e.best and sim.best(a, "s0")[1].hops == 2
    assert_shortest(sim, {"s0": ids[0], "s3": ids[3]})


def test_version_change_propagates():
    sim, ids = build(line(4), 4, {0: ["svc"]})
    sim.settle()
    v1 = sim.best(ids[3], "svc")[1].version
    sim.run_for(3)
    sim.set_services(ids[0], ["svc", "other"])
    sim.run_for(0.5)
    r = sim.best(ids[3], "svc")[1]
    assert r.version > v1 and r.version == sim.engines[ids[0]].version
    assert sim.best(ids[3], "other")[1].version == r.version


def test_local_service_preferred_over_remote_replica():
    sim, (a, b) = build([(0, 1)], 2, {0: ["svc"], 1: ["svc"]})
    sim.settle()
    # each exports its own local route; each also learns the other's replica
    assert sim.engines[a].learned[b]["svc"].path == (b,)
    assert sim.engines[b].learned[a]["svc"].path == (a,)


# ============================================================================ property

@st.composite
def graphs(draw):
    n = draw(st.integers(2, 12))
    links = set()
    for i in range(1, n):                           # a random spanning tree, both ways
        j = draw(st.integers(0, i - 1))
        links |= {(i, j), (j, i)}
    extra = draw(st.lists(st.tuples(st.integers(0, n - 1), st.integers(0, n - 1)),
                          max_size=2 * n))
    for a, b in extra:                              # random one-way subscriptions
        if a != b:
            links.add((a, b))
    hosts = draw(st.lists(st.integers(0, n - 1), min_size=1, max_size=4))
    max_hops = draw(st.sampled_from([3, 8]))
    latencies = draw(st.lists(st.sampled_from([0.001, 0.004, 0.03]), min_size=len(links),
                              max_size=len(links)))
    return n, sorted(links), hosts, max_hops, latencies


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(graphs())
def test_property_converged_routes_are_loop_free_shortest_paths(g):
    n, links, hosts, max_hops, latencies = g
    sim = Sim(max_hops=max_hops, digest_interval=1.0)
    ids = [f"n{i}" for i in range(n)]
    placement = {}
    services: dict[int, list[str]] = {}
    for k, h in enumerate(hosts):
        services.setdefault(h, []).append(f"svc{k}")
        placement[f"svc{k}"] = ids[h]
    for i, nid in enumerate(ids):
        sim.add_node(nid, services.get(i, ()))
    for (a, b), lat in zip(links, latencies):
        sim.link_latency[(ids[a], ids[b])] = lat
        sim.add_link(ids[a], ids[b])
    sim.settle(limit=120)
    assert_loop_free(sim)
    assert_shortest(sim, placement)
    for nid, e in sim.engines.items():
        assert e.resync == set()
        for svc, cands in e.best.items():
            best = cands[0][1]
            assert best.path[0] == cands[0][0] and best.path[-1] == placement[svc]
