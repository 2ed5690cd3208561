"""Gossip of service tables as a path vector (SPEC.md §9), with no I/O.

Every node runs one :class:`GossipEngine`.  Links are directional, as in the
original: when node A adds node B as a peer, A *subscribes* to B and learns
the routes B exports to it; B learns nothing from A unless B also adds A.

* A route names a service, its origin node, the origin's table version and the
  path of node ids from the announcing neighbour to the origin.  A node drops
  any route whose path contains itself (so loops cannot form), caps path length
  at ``max_hops``, and exports to each subscriber only its best route per
  service, prefixed with its own id, leaving out routes whose path already
  contains that subscriber (split horizon).
* Changes go out as incremental updates (upserts + withdrawals) at most once
  per ``min_update_interval`` per subscriber, except that a route which got
  longer or vanished meanwhile is withdrawn at once ("ghost flushing": without
  it, a dead node's stale paths are explored one interval per hop, up to
  ``max_hops``, with a storm of updates); a periodic digest of what the
  subscriber should hold lets it detect drift and ask for a fresh snapshot
  (anti-entropy).  At rest each link carries one digest per interval, whatever
  the size of the network.
* A link that is down, or silent for ``route_ttl``, has all its routes withdrawn.

The engine is driven by the caller with the current time (``now``): the asyncio
network layer and the 1,000-node simulation (bench/gossip_sim.py) run the same
code.
"""
from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field

import msgpack

from ..errors import NodeError

__all__ = ["Route", "GossipEngine", "GossipError", "merge", "export_table", "diff",
           "digest", "decode_message", "encode_message", "SERVICE_RE"]

log = logging.getLogger("utesla.gossip")

SERVICE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}(/[A-Za-z0-9][A-Za-z0-9_-]{0,63}){0,7}\Z")
NODE_ID_MAX = 80
MAX_MESSAGE = 4 << 20


class GossipError(NodeError, ValueError):
    """A malformed or oversized announcement (dropped and logged; the link stays up)."""


@dataclass(frozen=True, slots=True)
class Route:
    """``service`` is reachable at ``origin`` (table ``version``) through ``path``.

    ``path[0]`` is the neighbour that announced it, ``path[-1]`` the origin.
    """

    service: str
    origin: str
    version: int
    path: tuple[str, ...]
    # Cache of wire_hash() (routes are immutable); not part of equality, hash or repr.
    _wire_hash: int | None = field(default=None, init=False, repr=False, compare=False,
                                   hash=False)

    def wire_hash(self) -> int:
        """128-bit BLAKE2b of the route's msgpack encoding (the unit :func:`digest` XORs)."""
        h = self._wire_hash
        if h is None:
            h = int.from_bytes(hashlib.blake2b(msgpack.packb(self.to_wire()),
                                               digest_size=16).digest(), "big")
            object.__setattr__(self, "_wire_hash", h)
        return h

    @property
    def hops(self) -> int:
        return len(self.path)

    def to_wire(self) -> list:
        return [self.service, self.origin, self.version, list(self.path)]

    @classmethod
    def from_wire(cls, obj) -> "Route":
        if (type(obj) is not list or len(obj) != 4 or type(obj[0]) is not str
                or type(obj[1]) is not str or type(obj[2]) is not int or type(obj[3]) is not list):
            raise GossipError("route must be [service, origin, version, path]")
        service, origin, version, path = obj
        if not SERVICE_RE.match(service):
            raise GossipError(f"invalid service name {service[:80]!r}")
        # (map/set/min/max keep the per-id checks in C: paths can be long)
        if not path or set(map(type, path)) != {str} or \
                not 0 < min(map(len, path)) <= max(map(len, path)) <= NODE_ID_MAX:
            raise GossipError("route path must be a non-empty list of node ids")
        if path[-1] != origin or not 0 <= version < (1 << 63):
            raise GossipError("route path must end at its origin; version out of range")
        if len(set(path)) != len(path):
            raise GossipError("route path visits a node twice")
        return cls(service, origin, version, tuple(path))


# --------------------------------------------------------------------------- pure functions

def merge(self_id: str, learned: dict[str, dict[str, Route]], max_hops: int,
          services: set[str] | None = None) -> dict[str, list[tuple[str, Route]]]:
    """Candidate routes per service from every upstream link, best first.

    Drops routes through ourselves and routes over the hop limit.  Order: fewest
    hops, then the peer id (priority and load are applied at forwarding time).
    ``services`` restricts the work to those names (incremental recomputation).
    """
    out: dict[str, list[tuple[str, Route]]] = {}
    for peer, table in learned.items():
        items = table.items() if services is None else (
            (s, table[s]) for s in services if s in table)
        for svc, route in items:
            if route.hops > max_hops or self_id in route.path:
                continue
            out.setdefault(svc, []).append((peer, route))
    for cands in out.values():
        cands.sort(key=lambda pr: (pr[1].hops, pr[0]))
    return out


def export_route(self_id: str, svc: str, local: bool, version: int,
                 candidates: list[tuple[str, Route]] | None, subscriber: str,
                 max_hops: int) -> Route | None:
    """The one route for ``svc`` we tell ``subscriber`` about, or None."""
    if local:
        return Route(svc, self_id, version, (self_id,))
    for _peer, r in candidates or ():
        if subscriber in r.path or r.hops + 1 > max_hops:
            continue  # split horizon; hop limit
        return Route(svc, r.origin, r.version, (self_id,) + r.path)
    return None


def export_table(self_id: str, local: set[str], version: int,
                 best: dict[str, list[tuple[str, Route]]], subscriber: str,
                 max_hops: int) -> dict[str, Route]:
    """The whole table ``subscriber`` should hold from us."""
    out = {}
    for svc in set(local) | set(best):
        r = export_route(self_id, svc, svc in local, version, best.get(svc), subscriber, max_hops)
        if r is not None:
            out[svc] = r
    return out


def diff(old: dict[str, Route], new: dict[str, Route]) -> tuple[list[Route], list[str]]:
    """(routes to upsert, services to withdraw) turning ``old`` into ``new``."""
    upserts = [r for s, r in new.items() if old.get(s) != r]
    withdrawals = [s for s in old if s not in new]
    return upserts, withdrawals


def digest(table: dict[str, Route]) -> bytes:
    """Order-independent 16-byte summary of a table (anti-entropy check)."""
    acc = 0
    for r in table.values():
        h = r._wire_hash
        acc ^= r.wire_hash() if h is None else h
    return acc.to_bytes(16, "big")


def encode_message(msg: dict) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


def decode_message(data: bytes, max_routes: int) -> dict:
    """Strictly decode one gossip message (SPEC.md §9.3)."""
    if len(data) > MAX_MESSAGE:
        raise GossipError("gossip message too large")
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, max_ext_len=0,
                              max_array_len=max_routes + 16, max_map_len=16,
                              max_str_len=4096, max_bin_len=64)
    except Exception as exc:
        raise GossipError(f"undecodable gossip message: {exc}") from None
    if type(obj) is not dict or obj.get("t") not in ("snap", "upd", "dig"):
        raise GossipError("unknown gossip message")
    d = obj.get("d")
    if type(d) is not bytes or len(d) != 16:
        raise GossipError("gossip message without a valid digest")
    msg = {"t": obj["t"], "d": d}
    if obj["t"] == "snap":
        routes = obj.get("r")
        if type(routes) is not list or len(routes) > max_routes:
            raise GossipError("snapshot routes missing or over the per-peer cap")
        msg["r"] = [Route.from_wire(x) for x in routes]
    elif obj["t"] == "upd":
        routes, gone = obj.get("r", []), obj.get("w", [])
        if type(routes) is not list or type(gone) is not list or \
                len(routes) + len(gone) > max_routes:
            raise GossipError("update malformed or over the per-peer cap")
        if not all(type(s) is str and SERVICE_RE.match(s) for s in gone):
            raise GossipError("invalid withdrawn service name")
        msg["r"] = [Route.from_wire(x) for x in routes]
        msg["w"] = gone
    return msg


# --------------------------------------------------------------------------- the engine

class GossipEngine:
    """One node's routing state (see the module docstring)."""

    def __init__(self, node_id: str, *, max_hops: int = 8, max_routes: int = 10000,
                 digest_interval: float = 1.0, route_ttl: float | None = None,
                 min_update_interval: float = 0.02):
        self.id = node_id
        self.max_hops = max_hops
        self.max_routes = max_routes
        self.digest_interval = digest_interval
        self.route_ttl = route_ttl if route_ttl is not None else 4 * digest_interval
        self.min_update_interval = min_update_interval
        self.local: set[str] = set()
        self.version = 0
        self.learned: dict[str, dict[str, Route]] = {}   # upstream peer -> its routes
        self.heard: dict[str, float] = {}
        self.best: dict[str, list[tuple[str, Route]]] = {}
        self.subs: dict[str, dict[str, Route]] = {}      # subscriber -> what it holds
        self._sub_pending: dict[str, set[str]] = {}
        self._sub_last: dict[str, float] = {}
        self._sub_digest_at: dict[str, float] = {}
        self.resync: set[str] = set()                    # upstreams to re-subscribe to
        self._flush_at: float | None = None              # see poll(): ghost flushing
        self.rejected = 0
        self.changes = 0

    # -------------------------------------------------------------- local services

    def set_local(self, services, now: float) -> None:
        new = set(services)
        if new == self.local and self.version:
            return
        changed = new ^ self.local
        self.local = new
        self.version = max(self.version + 1, int(now * 1000))
        # Every local route carries the version: all of them change for subscribers.
        self._touch(changed | new, now)

    # -------------------------------------------------------------- upstream links

    def link_up(self, peer: str, now: float) -> None:
        self.learned.setdefault(peer, {})
        self.heard[peer] = now

    def link_down(self, peer: str, now: float) -> None:
        table = self.learned.pop(peer, None)
        self.heard.pop(peer, None)
        self.resync.discard(peer)
        if table:
            self._touch(set(table), now)

    def receive(self, peer: str, msg: dict, now: float) -> None:
        """Apply a decoded gossip message from upstream ``peer``."""
        table = self.learned.setdefault(peer, {})
        self.heard[peer] = now
        kind = msg["t"]
        if kind == "snap":
            new = {}
            for r in msg["r"]:
                new[r.service] = r
            touched = set(table) | set(new)
            self.learned[peer] = table = new
            self._touch(touched, now)
        elif kind == "upd":
            touched = set()
            for r in msg["r"]:
                if r.service not in table and len(table) >= self.max_routes:
                    self.rejected += 1
                    continue
                table[r.service] = r
                touched.add(r.service)
            for s in msg["w"]:
                if table.pop(s, None) is not None:
                    touched.add(s)
            self._touch(touched, now)
        if digest(table) != msg["d"]:
            self.resync.add(peer)
        else:
            self.resync.discard(peer)

    # -------------------------------------------------------------- downstream subscribers

    def subscribe(self, sub: str, now: float) -> dict:
        """A new subscriber: returns the snapshot message to send it first."""
        table = export_table(self.id, self.local, self.version, self.best, sub, self.max_hops)
        self.subs[sub] = table
        self._sub_pending[sub] = set()
        self._sub_last[sub] = now
        self._sub_digest_at[sub] = now
        return {"t": "snap", "r": [r.to_wire() for r in table.values()], "d": digest(table)}

    def unsubscribe(self, sub: str) -> None:
        for d in (self.subs, self._sub_pending, self._sub_last, self._sub_digest_at):
            d.pop(sub, None)

    # -------------------------------------------------------------- recomputation

    def _touch(self, services: set[str], now: float) -> None:
        if not services:
            return
        self.changes += 1
        if self._flush_at is None:
            self._flush_at = now
        fresh = merge(self.id, self.learned, self.max_hops, services)
        for s in services:
            if s in fresh:
                self.best[s] = fresh[s]
            else:
                self.best.pop(s, None)
        for pending in self._sub_pending.values():
            pending |= services

    def candidates(self, service: str) -> list[tuple[str, Route]]:
        return self.best.get(service, [])

    def poll(self, now: float) -> list[tuple[str, dict]]:
        """Messages due now: batched updates, periodic digests; and route expiry."""
        for peer, t in list(self.heard.items()):
            if now - t > self.route_ttl:
                log.warning("no gossip from %s for %.1f s: withdrawing its routes", peer,
                            now - t)
                self.link_down(peer, now)
                self.resync.add(peer)
        out: list[tuple[str, dict]] = []
        flush, self._flush_at = self._flush_at is not None, None
        for sub, pending in self._sub_pending.items():
            if pending and now - self._sub_last[sub] < self.min_update_interval and flush:
                # Ghost flushing: a route the subscriber holds got longer or went away
                # while its update must wait.  Withdraw it now (the new route follows when
                # due), so stale paths through a dead node are chased out at link speed
                # instead of being explored one min_update_interval per hop.
                held = self.subs[sub]
                gone = []
                for s in pending:
                    old = held.get(s)
                    if old is not None:
                        r = export_route(self.id, s, s in self.local, self.version,
                                         self.best.get(s), sub, self.max_hops)
                        if r is None or r.hops > old.hops:
                            del held[s]
                            gone.append(s)
                if gone:
                    self._sub_digest_at[sub] = now
                    out.append((sub, {"t": "upd", "r": [], "w": gone, "d": digest(held)}))
                    continue
            elif pending and now - self._sub_last[sub] >= self.min_update_interval:
                held = self.subs[sub]
                upserts, gone = [], []
                for s in pending:
                    r = export_route(self.id, s, s in self.local, self.version,
                                     self.best.get(s), sub, self.max_hops)
                    old = held.get(s)
                    if r is None:
                        if old is not None:
                            del held[s]
                            gone.append(s)
                    elif r != old:
                        held[s] = r
                        upserts.append(r)
                pending.clear()
                self._sub_last[sub] = now
                if upserts or gone:
                    self._sub_digest_at[sub] = now
                    out.append((sub, {"t": "upd", "r": [r.to_wire() for r in upserts],
                                      "w": gone, "d": digest(held)}))
                    continue
            if now - self._sub_digest_at[sub] >= self.digest_interval:
                self._sub_digest_at[sub] = now
                out.append((sub, {"t": "dig", "d": digest(self.subs[sub])}))
        return out

    def next_deadline(self) -> float | None:
        """Earliest time :meth:`poll` has something to do (for the caller's timer)."""
        times = [t + self.route_ttl for t in self.heard.values()]
        if self._flush_at is not None and self._sub_pending:
            times.append(self._flush_at)
        for sub, pending in self._sub_pending.items():
            times.append(self._sub_last[sub] + self.min_update_interval if pending
                         else self._sub_digest_at[sub] + self.digest_interval)
        return min(times) if times else None

    def routes(self) -> list[tuple[str, str, Route]]:
        """(service, next hop, route) for every known remote route, best first."""
        return [(svc, peer, r) for svc, cands in sorted(self.best.items())
                for peer, r in cands]
