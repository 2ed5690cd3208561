"""The path-vector gossip engine (utesla_node/network/gossip.py): pure, fast, no sockets.

Engine scenarios run several real engines through ``bench/_gossipsim.py``: directional
links, a message queue with per-link latency and a virtual clock; every message goes through
``encode_message``/``decode_message``; a digest mismatch leads to a re-subscription, as in
the runtime.
"""
from __future__ import annotations

import logging
import random
import sys
from pathlib import Path

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from utesla_node.network import gossip
from utesla_node.network.gossip import (DEFAULT_MAX_ROUTES, MAX_MESSAGE, RESYNC_MAX,
                                        GossipEngine, GossipError, Route, diff, digest,
                                        decode_message, encode_message, export_route,
                                        export_table, merge, rank, truncate)

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


def test_decode_keeps_the_best_routes_over_the_cap_whatever_their_order():
    assert len(decode_message(encode_message(good_snap(10)), 10)["r"]) == 10
    assert "cut" not in decode_message(encode_message(good_snap(10)), 10)
    # 40 routes, 1 to 4 hops: the 10 kept are the fewest hops, then by name.
    routes = [R(f"s{i:02d}", *[f"h{j}" for j in range(i % 4)], "o") for i in range(40)]
    want = sorted(routes, key=lambda r: (r.hops, r.service))[:10]
    for seed in range(5):
        shuffled = routes[:]
        random.Random(seed).shuffle(shuffled)
        snap = {"t": "snap", "r": [r.to_wire() for r in shuffled], "d": D0}
        got = decode_message(encode_message(snap), 10)
        assert sorted(got["r"], key=rank) == want
        assert got["cut"] == sorted({r.service for r in routes} - {r.service for r in want})
        upd = decode_message(encode_message({**snap, "t": "upd", "w": ["gone"]}), 10)
        assert sorted(upd["r"], key=rank) == want and upd["cut"] == got["cut"]
        assert upd["w"] == ["gone"]
    # Many more routes than the cap (the selection is made as they are read).
    many = [R(f"m{i}", "o") for i in range(5000)] + [R("a", "o")]
    got = decode_message(encode_message({"t": "snap", "r": [r.to_wire() for r in many],
                                         "d": D0}), 3)
    assert [r.service for r in sorted(got["r"], key=rank)] == ["a", "m0", "m1"]
    assert len(got["cut"]) == 4998
    # A service repeated: the later route, as a dict would keep it.
    twice = decode_message(encode_message({"t": "snap", "r": [
        R("x", "o").to_wire(), R("x", "p", "o").to_wire()], "d": D0}), 10)
    assert twice["r"] == [R("x", "p", "o")]
    # Withdrawals are not bounded by the cap (withdrawing what we do not hold is a no-op).
    assert len(decode_message(encode_message({"t": "upd", "w": ["s"] * 100, "d": D0}),
                              10)["w"]) == 100
    # The publisher's count of what it would have sent without our cap.
    assert decode_message(encode_message({**good_snap(2), "n": 7}), 2)["n"] == 7
    for bad in (-1, 1 << 32, "7", 1.5, None):
        if bad is not None:
            with pytest.raises(GossipError):
                decode_message(encode_message({**good_snap(2), "n": bad}), 2)
    with pytest.raises(GossipError):                # a path longer than any hop limit
        decode_message(encode_message({"t": "snap", "r": [
            ["s", "o", 1, [f"n{i}" for i in range(gossip.MAX_PATH)] + ["o"]]], "d": D0}), 10)


def test_decode_a_repeated_key_keeps_the_last_value_as_before():
    data = b"\x83\xa1t\xa4snap\xa1r\x91" + encode_message(R("a", "o").to_wire()) + \
        b"\xa1r\x90\xa1d\xc4\x10" + D0
    data = data.replace(b"\x83", b"\x84", 1)
    assert decode_message(data, 10)["r"] == []


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


def test_engine_receive_keeps_the_best_routes_per_peer(caplog):
    caplog.set_level(logging.INFO, logger="utesla.gossip")
    e = GossipEngine("me", max_routes=10)
    e.link_up("p", 0.0)
    # 25 routes, from an older publisher that does not honour our cap.
    e.receive("p", {"t": "upd", "r": [R(f"s{i:02d}", "p") for i in range(25)], "w": [],
                    "d": D0}, 0.0)
    assert sorted(e.learned["p"]) == [f"s{i:02d}" for i in range(10)] and e.rejected == 15
    assert "p" in e.resync                          # its digest cannot match: resync
    assert caplog.text.count("p offers 25 routes, over the cap of 10") == 1
    # A withdrawal frees a place: a new route takes it.
    e.receive("p", {"t": "upd", "r": [R("s03", "p", version=2), R("s20", "p")],
                    "w": ["s00"], "d": D0}, 0.1)
    assert sorted(e.learned["p"]) == [f"s{i:02d}" for i in range(1, 10)] + ["s20"]
    assert e.learned["p"]["s03"].version == 2 and e.rejected == 15
    # Routes cut on the wire replace what we held: withdrawn (s07).  Past the cap the
    # worst by hops, then name, goes: s05, now two hops, after every one-hop route.
    e.receive("p", {"t": "upd", "r": [R("a", "p"), R("zz", "p"), R("s05", "x", "p")],
                    "cut": ["s07"], "w": [], "d": D0}, 0.2)
    table = e.learned["p"]
    assert sorted(table) == ["a", "s01", "s02", "s03", "s04", "s06", "s08", "s09", "s20",
                             "zz"]
    assert e.rejected == 15 + 2 and set(e.best) == set(table)
    e.receive("p", {"t": "upd", "r": [R("b", "p")], "w": [], "d": D0}, 0.25)
    assert "b" in table and "zz" not in table and len(table) == 10   # same hops: by name
    assert caplog.text.count("offers") == 1         # warned once, not per message
    # A snapshot over the cap: the publisher's own count is the one told.
    e.receive("p", {"t": "snap", "r": [R(f"t{i}", "p") for i in range(10)], "n": 30,
                    "d": digest({f"t{i}": R(f"t{i}", "p") for i in range(10)})}, 0.3)
    assert "p" not in e.resync and caplog.text.count("p offers 30 routes") == 1
    e.receive("p", {"t": "snap", "r": [R(f"t{i}", "p") for i in range(10)], "n": 30,
                    "d": D0}, 0.4)
    assert caplog.text.count("offers") == 2         # the same count: no new warning
    e.receive("p", {"t": "snap", "r": [R("t1", "p")], "d": digest({"t1": R("t1", "p")})},
              0.5)
    assert "fits the cap of 10 routes again" in caplog.text and "p" not in e.over


def deliver(sub: GossipEngine, peer: str, msgs, cap: int | None = None) -> None:
    """Messages from ``peer`` to ``sub`` through the wire codec; each within the cap."""
    for msg in msgs:
        entries = len(msg.get("r", [])) + len(msg.get("w", []))
        assert entries <= (cap or sub.max_routes), msg["t"]
        sub.receive(peer, decode_message(encode_message(msg), sub.max_routes), 0.0)


def drain(pub: GossipEngine, now: float, to: str) -> list[dict]:
    """Poll ``pub`` until it has no update pending; the messages for subscriber ``to``."""
    out = []
    for k in range(50):
        t = now + k * pub.min_update_interval
        out += [m for s, m in pub.poll(t) if s == to and m["t"] != "dig"]
        if not pub._sub_pending[to]:
            return out
    raise AssertionError("updates still pending")


def should_hold(pub: GossipEngine, sub: str, cap: int) -> dict[str, Route]:
    """What ``sub`` should hold from ``pub``: the best ``cap`` of all pub could export."""
    table = export_table(pub.id, pub.local, pub.version, pub.best, sub, pub.max_hops)
    truncate(table, cap)
    return table


def test_publisher_sends_a_subscriber_at_most_its_cap_the_best_by_hops_then_name():
    pub = GossipEngine("me", min_update_interval=0.02)
    pub.link_up("p", 0.0)
    pub.receive("p", {"t": "upd", "r": [R("a", "p"), R("b", "p", "o"), R("c", "p")],
                      "w": [], "d": D0}, 0.0)
    pub.set_local({"y", "z"}, 0.0)
    sub = GossipEngine("sub", max_routes=3)
    snap = pub.subscribe("sub", 0.0, 3)
    # Local routes are one hop, p's two or three: y, z, then a (2 hops) before c (by name).
    assert sorted(r[0] for r in snap["r"]) == ["a", "y", "z"] and snap["n"] == 5
    deliver(sub, "me", [snap])
    assert sub.resync == set() and sorted(sub.learned["me"]) == ["a", "y", "z"]
    # A held route withdrawn: the next best (c) takes its place.
    pub.receive("p", {"t": "upd", "r": [], "w": ["a"], "d": D0}, 1.0)
    deliver(sub, "me", drain(pub, 1.0, "sub"))
    assert sorted(sub.learned["me"]) == ["c", "y", "z"] and sub.resync == set()
    # A better route arrives: the worst held one (c) makes way.
    pub.receive("p", {"t": "upd", "r": [R("a", "p")], "w": [], "d": D0}, 2.0)
    deliver(sub, "me", drain(pub, 2.0, "sub"))
    assert sorted(sub.learned["me"]) == ["a", "y", "z"] and sub.resync == set()
    # A worse one changes nothing it holds (no message at all).
    pub.receive("p", {"t": "upd", "r": [R("zzz", "p", "q")], "w": [], "d": D0}, 3.0)
    assert drain(pub, 3.0, "sub") == []
    # A held route gets longer and ranks past one left out: they swap.
    pub.set_local({"z"}, 4.0)                   # y goes: a, c, z
    deliver(sub, "me", drain(pub, 4.0, "sub"))
    assert sorted(sub.learned["me"]) == ["a", "c", "z"]
    pub.receive("p", {"t": "upd", "r": [R("a", "p", "x", "o")], "w": [], "d": D0}, 5.0)
    deliver(sub, "me", drain(pub, 5.0, "sub"))
    assert sorted(sub.learned["me"]) == ["b", "c", "z"]     # b (3 hops) before a (4 hops)
    assert sub.learned["me"] == should_hold(pub, "sub", 3) and sub.resync == set()
    # Everything fits again: no cut, and the next snapshot says nothing of one.
    pub.receive("p", {"t": "upd", "r": [], "w": ["a", "b", "zzz"], "d": D0}, 6.0)
    deliver(sub, "me", drain(pub, 6.0, "sub"))
    assert sorted(sub.learned["me"]) == ["c", "z"] and "sub" not in pub._sub_bound
    assert "n" not in pub.subscribe("sub", 7.0, 3)


def test_a_subscriber_that_does_not_say_gets_the_default_cap():
    pub = GossipEngine("me")
    pub.set_local({f"s{i:05d}" for i in range(DEFAULT_MAX_ROUTES + 6)}, 0.0)
    snap = pub.subscribe("old", 0.0)
    assert len(snap["r"]) == DEFAULT_MAX_ROUTES and snap["n"] == DEFAULT_MAX_ROUTES + 6
    assert max(r[0] for r in snap["r"]) == f"s{DEFAULT_MAX_ROUTES - 1:05d}"
    with pytest.raises(ValueError):
        pub.subscribe("bad", 0.0, 0)


def test_a_table_too_large_for_one_message_goes_on_in_updates(monkeypatch):
    monkeypatch.setattr(gossip, "MESSAGE_BUDGET", 1000)
    pub = GossipEngine("me", min_update_interval=0.02)
    pub.set_local({f"svc-{i:03d}" for i in range(100)}, 0.0)
    sub = GossipEngine("sub", max_routes=60)
    snap = pub.subscribe("sub", 0.0, 60)
    assert 0 < len(snap["r"]) < 60 and snap["n"] == 100
    assert pub.next_deadline() <= 0.0               # the rest is due at once
    deliver(sub, "me", [snap])
    assert sub.resync == set()                      # each part carries its own digest
    parts = drain(pub, 0.0, "sub")
    assert len(parts) >= 2 and all(len(encode_message(m)) <= 1000 for m in parts)
    assert len(encode_message(snap)) <= 1000
    for m in parts:
        deliver(sub, "me", [m])
        assert sub.resync == set()
    assert sorted(sub.learned["me"]) == [f"svc-{i:03d}" for i in range(60)]
    # An update of the whole table (a new version) is split by the subscriber's cap too:
    # withdrawals first, so it never holds more than its cap in between.
    monkeypatch.setattr(gossip, "MESSAGE_BUDGET", 1 << 20)
    pub.set_local({f"new-{i:03d}" for i in range(100)}, 1.0)
    msgs = drain(pub, 1.0, "sub")
    assert len(msgs) == 2 and msgs[0]["w"] and len(msgs[0]["w"]) + len(msgs[0]["r"]) == 60
    for m in msgs:
        deliver(sub, "me", [m], cap=60)
        assert sub.resync == set() and len(sub.learned["me"]) <= 60
    assert sorted(sub.learned["me"]) == [f"new-{i:03d}" for i in range(60)]


@st.composite
def churn(draw):
    cap = draw(st.integers(1, 4))
    names = [f"s{i}" for i in range(6)]
    steps = draw(st.lists(st.one_of(
        st.tuples(st.just("local"), st.sets(st.sampled_from(names), max_size=4)),
        st.tuples(st.just("learn"), st.sampled_from(["p", "q"]), st.sampled_from(names),
                  st.integers(1, 4)),
        st.tuples(st.just("withdraw"), st.sampled_from(["p", "q"]), st.sampled_from(names)),
        st.tuples(st.just("down"), st.sampled_from(["p", "q"])),
    ), min_size=1, max_size=25))
    return cap, steps


@settings(max_examples=300, deadline=None)
@given(churn())
def test_property_a_capped_subscriber_always_holds_the_best_routes_in_step(case):
    """Whatever changes at the publisher, once its updates are out the subscriber holds
    exactly the best ``cap`` routes (by hops, then name) of all the publisher could
    export to it, the digests agree, and no message carries more than ``cap`` entries."""
    cap, steps = case
    pub = GossipEngine("me", min_update_interval=0.02)
    sub = GossipEngine("sub", max_routes=cap)
    deliver(sub, "me", [pub.subscribe("sub", 0.0, cap)])
    now = 0.0
    for step in steps:
        now += 1.0
        if step[0] == "local":
            pub.set_local(step[1], now)
        elif step[0] == "learn":
            _, peer, svc, hops = step
            path = [peer] + [f"{peer}{k}" for k in range(hops - 1)]
            pub.link_up(peer, now)
            pub.receive(peer, {"t": "upd", "r": [Route(svc, path[-1], 1, tuple(path))],
                               "w": [], "d": D0}, now)
        elif step[0] == "withdraw":
            pub.receive(step[1], {"t": "upd", "r": [], "w": [step[2]], "d": D0}, now)
        else:
            pub.link_down(step[1], now)
        for k in range(3):                          # ghost flushing, then the update
            deliver(sub, "me", [m for s, m in pub.poll(now + k * 0.01) if s == "sub"], cap)
        deliver(sub, "me", drain(pub, now + 0.03, "sub"), cap)
        assert sub.learned["me"] == should_hold(pub, "sub", cap)
        assert sub.resync == set() and sub.rejected == 0


def test_resubscription_backoff_doubles_until_in_step():
    e = GossipEngine("me", digest_interval=0.5)
    assert e.resync_wait("p", 0.0) == 0.0           # the first at once
    t, waits = 0.0, []
    for _ in range(10):
        e.resubscribing("p", t)
        w = e.resync_wait("p", t)
        waits.append(w)
        assert e.resync_wait("p", t + w) == 0.0
        t += w
    assert waits == [min(0.5 * 2 ** k, RESYNC_MAX) for k in range(10)]
    # In step again (a digest matches): the waits start over from resync_min.
    e.resubscribing("p", t)
    assert e.resync_wait("p", t) == RESYNC_MAX
    e.link_up("p", t)
    e.receive("p", {"t": "dig", "d": D0}, t + 0.1)
    assert e.resync_wait("p", t + 0.2) == pytest.approx(0.3)    # still one per 0.5 s
    e.resubscribing("p", t + 0.5)
    assert e.resync_wait("p", t + 0.5) == 0.5
    e.resubscribing("p", t + 1.0)
    assert e.resync_wait("p", t + 1.0) == 1.0
    assert GossipEngine("x", digest_interval=5.0).resync_min == 1.0


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
    assert sim.run_for(0.01, stop=lambda: sim.decode_errors == 4)
    assert b in sim.engines[a].resync
    assert sim.best(a, "from_b") and sim.best(a, "from_c")    # nothing lost meanwhile
    sim.settle()
    assert sim.resubscriptions >= 1 and sim.engines[a].resync == set()
    assert sim.best(a, "from_b")[1].path == (b,) and sim.best(a, "from_c")[1].path == (c,)
    assert sim.engines[a].rejected == 0


def _hub_with_origins(n_origins: int, cap: int, **kw):
    """Hub ``h`` learns one service from each of ``n_origins`` nodes; ``r`` subscribes to
    ``h`` with room for ``cap`` routes per peer, and to ``ok`` (one service)."""
    sim = Sim(digest_interval=0.5, **kw)
    sim.add_node("h")
    sim.add_node("r", max_routes=cap)
    sim.add_node("ok", ["fine"])
    sim.add_link("r", "h")
    sim.add_link("r", "ok")
    for i in range(n_origins):
        sim.add_node(f"o{i}", [f"svc{i}"])
        sim.add_link("h", f"o{i}")
        sim.run_for(0.05)                           # one small update each
    return sim


#: The 10 of svc0..svc29 (all two hops from r) kept by name order.
BEST_10_OF_30 = sorted(f"svc{i}" for i in range(30))[:10]


def test_flood_over_max_routes_is_cut_to_the_same_best_routes_by_the_publisher():
    sim = _hub_with_origins(30, 10)
    sim.settle()
    r, h = sim.engines["r"], sim.engines["h"]
    assert sorted(r.learned["h"]) == BEST_10_OF_30
    assert sorted(s for s in r.best if s.startswith("svc")) == BEST_10_OF_30
    assert r.rejected == 0 and sim.decode_errors == 0     # h sent no more than 10
    assert r.resync == set() and sim.resubscriptions == 0  # digests in step all along
    assert sim.best("r", "fine")[1].path == ("ok",)       # other peers unaffected
    assert len(h.best) == 30 and h.subs["r"] == r.learned["h"]
    assert_loop_free(sim)
    # Anti-entropy still works on the kept set: a corrupted table is repaired to it.
    good = dict(r.learned["h"])
    del r.learned["h"]["svc0"]
    r.learned["h"]["bogus"] = R("bogus", "h", "zz")
    assert sim.run_for(5, stop=lambda: r.learned["h"] == good)
    sim.settle()
    assert r.learned["h"] == good and sim.resubscriptions == 1 and r.resync == set()
    # A service leaving: the next best takes its place, in step, no re-subscription.
    sim.kill("o0")                                  # svc0 goes; svc18 (11th by name) comes in
    sim.settle()
    assert sorted(r.learned["h"]) == sorted(BEST_10_OF_30[1:] + ["svc18"])
    assert sim.resubscriptions == 1 and r.resync == set()


def test_an_older_publisher_over_the_cap_is_cut_and_resubscribed_with_backoff(caplog):
    """A publisher that does not honour the cap sends all 30: the subscriber keeps the same
    10 a newer one would send, warns once, and re-subscribes less and less often."""
    caplog.set_level(logging.WARNING, logger="utesla.gossip")
    sim = Sim(digest_interval=0.5)
    h = sim.add_node("h")
    old = h.subscribe
    h.subscribe = lambda sub, now, max_routes=None: old(sub, now)   # the cap unread
    sim.add_node("r", max_routes=10)
    sim.add_link("r", "h")
    r = sim.engines["r"]
    times: list[float] = []
    resubscribing = r.resubscribing
    r.resubscribing = lambda peer, now: (times.append(now), resubscribing(peer, now))
    for i in range(30):
        sim.add_node(f"o{i}", [f"svc{i}"])
        sim.add_link("h", f"o{i}")
    sim.run_for(300)
    assert sorted(r.learned["h"]) == BEST_10_OF_30
    assert sorted(s for s in r.best if s.startswith("svc")) == BEST_10_OF_30
    assert caplog.text.count("h offers 30 routes, over the cap of 10") == 1
    # Each wait twice the one before (from min(1 s, interval) = 0.5 s) up to RESYNC_MAX:
    # a dozen re-subscriptions in 300 s, not one per interval (600).
    waits = [b - a for a, b in zip(times, times[1:])]
    assert len(times) <= 14, times
    for k, w in enumerate(waits):
        assert w >= min(0.5 * 2 ** k, RESYNC_MAX) - 1e-9, (k, waits)
    assert waits[-1] == pytest.approx(RESYNC_MAX, abs=0.1)
    assert r.learned["h"]["svc0"].path == ("h", "o0")


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
