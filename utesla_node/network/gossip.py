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
* Each node keeps at most ``max_routes`` routes per upstream link, and says so when it
  subscribes; a publisher sends each subscriber at most that many.  Over the cap, both
  sides keep the same routes: the fewest hops, then the service name (:func:`rank`), so
  a large table is cut, never refused whole (refusing it would cost the link every
  route, and the subscriber would ask again and again for the same table).
* Re-subscriptions (after a digest mismatch) back off exponentially while they do not
  bring the tables back in step (a table the subscriber must cut never matches the
  digest of an older publisher, which does not honour the cap).

The engine is driven by the caller with the current time (``now``): the asyncio
network layer and the 1,000-node simulation (bench/gossip_sim.py) run the same
code.
"""
from __future__ import annotations

import hashlib
import itertools
import logging
import re
from dataclasses import dataclass, field

import msgpack

from ..errors import NodeError

__all__ = ["Route", "GossipEngine", "GossipError", "merge", "export_table", "diff",
           "digest", "decode_message", "encode_message", "rank", "truncate", "SERVICE_RE",
           "DEFAULT_MAX_ROUTES"]

log = logging.getLogger("utesla.gossip")

SERVICE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}(/[A-Za-z0-9][A-Za-z0-9_-]{0,63}){0,7}\Z")
NODE_ID_MAX = 80
MAX_MESSAGE = 4 << 20
#: Routes kept per upstream link, and sent to a subscriber that does not say its own cap.
DEFAULT_MAX_ROUTES = 10000
#: Estimated bytes a publisher puts in one message before starting the next (half of
#: MAX_MESSAGE: the estimate is an upper bound only for ASCII node ids).
MESSAGE_BUDGET = MAX_MESSAGE // 2
#: Longest array inside a route: its path (a node drops paths over its hop limit anyway;
#: bench/gossip_sim.py runs engines with a limit of 1,024 hops).
MAX_PATH = 4096
#: Longest wait between two re-subscriptions that keep failing to match the digest.
RESYNC_MAX = 60.0


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


def rank(route: Route) -> tuple[int, str]:
    """The order in which routes are kept when a table is over its cap: fewest hops,
    then the service name.  Publisher and subscriber both use it, so a publisher that
    cuts its table for a subscriber sends exactly what the subscriber would have kept."""
    return (len(route.path), route.service)


def truncate(table: dict[str, Route], cap: int) -> list[str]:
    """Cut ``table`` (in place) to its ``cap`` best routes by :func:`rank`; returns the
    services removed."""
    if len(table) <= cap:
        return []
    gone = [r.service for r in sorted(table.values(), key=rank)[cap:]]
    for s in gone:
        del table[s]
    return gone


def digest(table: dict[str, Route]) -> bytes:
    """Order-independent 16-byte summary of a table (anti-entropy check)."""
    acc = 0
    for r in table.values():
        h = r._wire_hash
        acc ^= r.wire_hash() if h is None else h
    return acc.to_bytes(16, "big")


def _size(text: str) -> int:
    """Upper bound of the bytes ``text`` takes in msgpack (UTF-8 is at most 4 per char)."""
    return (len(text) if text.isascii() else 4 * len(text)) + 5


def wire_size(route: Route) -> int:
    """Upper bound of a route's msgpack size (cheaper than encoding it)."""
    return 12 + _size(route.service) + _size(route.origin) + sum(map(_size, route.path))


def encode_message(msg: dict) -> bytes:
    return msgpack.packb(msg, use_bin_type=True)


def decode_message(data: bytes, max_routes: int) -> dict:
    """Strictly decode one gossip message (SPEC.md §9.3).

    A message may carry more routes than ``max_routes``: the best by :func:`rank` are
    kept (at most ``max_routes``; the services of the others are listed under ``"cut"``:
    an update's cut routes replace what we held, so those are withdrawn).  The routes are
    read one at a time, so memory stays bounded by the cap, not by the message.
    ``"n"``, when the publisher sends it, is how many routes it would have sent without
    our cap.
    """
    if len(data) > MAX_MESSAGE:
        raise GossipError("gossip message too large")
    up = msgpack.Unpacker(raw=False, strict_map_key=True, max_ext_len=0,
                          max_array_len=MAX_PATH, max_map_len=16, max_str_len=4096,
                          max_bin_len=64)
    obj: dict = {}
    try:
        up.feed(data)
        entries = up.read_map_header()
        if entries > 16:
            raise GossipError("gossip message map over 16 entries")
        for _ in range(entries):
            key = up.unpack()
            if type(key) is not str:
                raise GossipError("gossip message keys must be strings")
            if key == "r":
                obj["r"] = _read_routes(up, max_routes)
            elif key == "w":
                obj["w"] = [up.unpack() for _ in range(up.read_array_header())]
            else:
                obj[key] = up.unpack()
        if up.tell() != len(data):
            raise GossipError("trailing bytes after the gossip message")
    except GossipError:
        raise
    except Exception as exc:
        raise GossipError(f"undecodable gossip message: {exc}") from None
    if obj.get("t") not in ("snap", "upd", "dig"):
        raise GossipError("unknown gossip message")
    d = obj.get("d")
    if type(d) is not bytes or len(d) != 16:
        raise GossipError("gossip message without a valid digest")
    msg = {"t": obj["t"], "d": d}
    if obj["t"] == "dig":
        return msg
    if "r" not in obj and obj["t"] == "snap":
        raise GossipError("snapshot without routes")
    msg["r"], cut = obj.get("r", ([], []))
    if cut:
        msg["cut"] = cut
    if obj["t"] == "snap":
        n = obj.get("n")
        if n is not None:
            if type(n) is not int or not 0 <= n < (1 << 32):
                raise GossipError("snapshot count n out of range")
            msg["n"] = n
    else:
        gone = obj.get("w", [])
        if not all(type(s) is str and SERVICE_RE.match(s) for s in gone):
            raise GossipError("invalid withdrawn service name")
        msg["w"] = gone
    return msg


def _read_routes(up: msgpack.Unpacker, cap: int) -> tuple[list[Route], list[str]]:
    """The routes array of a message: (the ``cap`` best by :func:`rank`, the services cut)."""
    kept: dict[str, Route] = {}
    cut: set[str] = set()
    for _ in range(up.read_array_header()):
        r = Route.from_wire(up.unpack())
        kept[r.service] = r            # a repeated service: the later route, as a dict would
        cut.discard(r.service)
        if len(kept) >= 2 * cap + 64:  # sort now and then, not per route
            cut.update(truncate(kept, cap))
    cut.update(truncate(kept, cap))
    return list(kept.values()), sorted(cut)


# --------------------------------------------------------------------------- the engine

class GossipEngine:
    """One node's routing state (see the module docstring)."""

    def __init__(self, node_id: str, *, max_hops: int = 8,
                 max_routes: int = DEFAULT_MAX_ROUTES, digest_interval: float = 1.0,
                 route_ttl: float | None = None, min_update_interval: float = 0.02):
        self.id = node_id
        self.max_hops = max_hops
        self.max_routes = max_routes          # per upstream link; told to each upstream
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
        self._sub_cap: dict[str, int] = {}               # subscriber -> the cap it told us
        # subscriber -> rank of the worst route it should hold, while what we could export
        # to it is over its cap (every route left out ranks after it).
        self._sub_bound: dict[str, tuple[int, str]] = {}
        self.resync: set[str] = set()                    # upstreams to re-subscribe to
        self.resync_min = min(1.0, digest_interval)      # first wait between re-subscriptions
        self._resync_at: dict[str, float] = {}           # upstream -> last re-subscription
        self._resync_gap: dict[str, float] = {}          # upstream -> wait after it
        self.over: dict[str, int] = {}                   # upstream -> routes offered over our cap
        self._flush_at: float | None = None              # see poll(): ghost flushing
        self.rejected = 0                                # routes we dropped for the cap
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
        # (The re-subscription backoff and the over-cap note stay: a link that comes
        # back to the same table must not start them over.)
        table = self.learned.pop(peer, None)
        self.heard.pop(peer, None)
        self.resync.discard(peer)
        if table:
            self._touch(set(table), now)

    def receive(self, peer: str, msg: dict, now: float) -> None:
        """Apply a decoded gossip message from upstream ``peer``.

        Past ``max_routes`` the table keeps the best routes by :func:`rank`
        (:func:`decode_message` has already cut what arrived over the wire); its digest
        then differs from the publisher's, which asks for a re-subscription (with
        backoff, see :meth:`resync_wait`): only a fresh snapshot can tell which routes
        left out should now be in.
        """
        table = self.learned.setdefault(peer, {})
        self.heard[peer] = now
        kind = msg["t"]
        cut = msg.get("cut", ())
        if kind == "snap":
            new = {r.service: r for r in msg["r"]}
            dropped = truncate(new, self.max_routes)
            touched = set(table) | set(new)
            self.learned[peer] = table = new
            self._touch(touched, now)
            offered = max(msg.get("n", 0), len(new) + len(cut) + len(dropped))
            self._note_cap(peer, len(cut) + len(dropped), offered, len(new), True)
        elif kind == "upd":
            touched = set()
            # Withdrawn, and replaced by a route we cut: either way not held any more.
            for s in itertools.chain(msg["w"], cut):
                if table.pop(s, None) is not None:
                    touched.add(s)
            for r in msg["r"]:
                table[r.service] = r
                touched.add(r.service)
            offered = len(table) + len(cut)
            dropped = truncate(table, self.max_routes)
            touched.update(dropped)
            self._touch(touched, now)
            self._note_cap(peer, len(cut) + len(dropped), offered, len(table), False)
        if digest(table) != msg["d"]:
            self.resync.add(peer)
        else:
            self.resync.discard(peer)
            self._resync_gap.pop(peer, None)     # in step: the backoff starts over

    def _note_cap(self, peer: str, dropped: int, offered: int, kept: int, snap: bool) -> None:
        """Count routes dropped for the cap; warn once per change of what ``peer`` offers
        over it (a snapshot says how many; an update only that it is over)."""
        self.rejected += dropped
        if offered > kept:
            if peer not in self.over or (snap and self.over[peer] != offered):
                log.warning("%s offers %d routes, over the cap of %d per link: keeping the "
                            "%d with the fewest hops (then by name)", peer, offered,
                            self.max_routes, kept)
                self.over[peer] = offered
        elif snap and self.over.pop(peer, None) is not None:
            log.info("the table of %s fits the cap of %d routes again (%d)", peer,
                     self.max_routes, kept)

    # -------------------------------------------------------------- re-subscriptions

    def resync_wait(self, peer: str, now: float) -> float:
        """Seconds before ``peer``'s link may re-subscribe (0: now).

        The first re-subscription is at once; while they do not bring the digests in
        step, each waits twice as long as the one before, from ``resync_min`` (the
        gossip interval, at most 1 s) up to RESYNC_MAX.  A matching digest starts over.
        """
        at = self._resync_at.get(peer)
        if at is None:
            return 0.0
        return max(0.0, at + self._resync_gap.get(peer, self.resync_min) - now)

    def resubscribing(self, peer: str, now: float) -> None:
        """The link to ``peer`` re-subscribes now (see :meth:`resync_wait`)."""
        gap = self._resync_gap.get(peer)
        self._resync_gap[peer] = self.resync_min if gap is None else min(2 * gap, RESYNC_MAX)
        self._resync_at[peer] = now

    # -------------------------------------------------------------- downstream subscribers

    def subscribe(self, sub: str, now: float, max_routes: int | None = None) -> dict:
        """A new subscriber, which holds at most ``max_routes`` routes (the default cap
        when it does not say): returns the snapshot message to send it first.

        Over the cap it gets the best by :func:`rank`, and ``n`` says how many there
        were.  A table too large for one message starts in the snapshot and goes on in
        updates (the next :meth:`poll`), each with the digest of what it holds by then.
        """
        cap = DEFAULT_MAX_ROUTES if max_routes is None else max_routes
        if cap < 1:
            raise ValueError("a subscriber's cap is at least 1 route")
        table = export_table(self.id, self.local, self.version, self.best, sub, self.max_hops)
        offered = len(table)
        self._sub_cap[sub] = cap
        self._sub_bound.pop(sub, None)
        if truncate(table, cap):
            self._sub_bound[sub] = max(map(rank, table.values()))
            log.info("subscriber %s takes at most %d routes: it gets %d of %d (the fewest "
                     "hops, then by name)", sub, cap, len(table), offered)
        held: dict[str, Route] = {}
        size = 0
        for svc, r in table.items():
            size += wire_size(r)
            if size > MESSAGE_BUDGET and held:
                break
            held[svc] = r
        rest = set(table).difference(held) if len(held) < len(table) else set()
        self.subs[sub] = held
        self._sub_pending[sub] = rest
        self._sub_last[sub] = now - self.min_update_interval if rest else now
        self._sub_digest_at[sub] = now
        msg = {"t": "snap", "r": [r.to_wire() for r in held.values()], "d": digest(held)}
        if offered > len(table):
            msg["n"] = offered
        return msg

    def unsubscribe(self, sub: str) -> None:
        for d in (self.subs, self._sub_pending, self._sub_last, self._sub_digest_at,
                  self._sub_cap, self._sub_bound):
            d.pop(sub, None)

    def _export(self, svc: str, sub: str) -> Route | None:
        return export_route(self.id, svc, svc in self.local, self.version, self.best.get(svc),
                            sub, self.max_hops)

    def _changes(self, sub: str, pending: set[str]) -> tuple[list[Route], list[str]]:
        """(upserts, withdrawals) bringing ``sub`` up to date on ``pending`` services,
        within its cap: it holds the best routes by :func:`rank` of all we could export
        to it, exactly the set :meth:`subscribe` would send it now."""
        held = self.subs[sub]
        cap = self._sub_cap[sub]
        fresh = {s: self._export(s, sub) for s in pending}
        bound = self._sub_bound.get(sub)
        if bound is None:
            # All we export to it fits (the usual case): only the pending ones change.
            upserts = [r for s, r in fresh.items() if r is not None and r != held.get(s)]
            gone = [s for s, r in fresh.items() if r is None and s in held]
            grows = sum(1 for r in upserts if r.service not in held)
            if len(held) + grows - len(gone) <= cap:
                return upserts, gone
        target = {s: r for s, r in held.items() if s not in fresh}
        target.update((s, r) for s, r in fresh.items() if r is not None)
        # Past the cap.  (From the fitting case, ``target`` is all we export to it.)
        # While over, every route left out ranks after ``bound``: the best of what it
        # holds and what changed is the answer, unless we need one ranked after
        # ``bound`` (a route left out could beat it); then everything is looked at again.
        truncate(target, cap)
        if bound is not None and (len(target) < cap or max(map(rank, target.values())) > bound):
            target = export_table(self.id, self.local, self.version, self.best, sub,
                                  self.max_hops)
            if not truncate(target, cap):
                self._sub_bound.pop(sub, None)
                return diff(held, target)
        self._sub_bound[sub] = max(map(rank, target.values()))
        return diff(held, target)

    def _emit(self, sub: str, upserts: list[Route], gone: list[str]) -> list[tuple[str, dict]]:
        """Apply the changes to what ``sub`` holds; the update messages telling it.

        Withdrawals go first, so it never holds more than its cap in between; each message
        has at most ``cap`` entries (an older subscriber refuses more) and about
        MESSAGE_BUDGET bytes, and the digest of what ``sub`` holds once it is applied.
        """
        held = self.subs[sub]
        limit = self._sub_cap[sub]
        out: list[tuple[str, dict]] = []
        routes: list[list] = []
        names: list[str] = []
        size = 0
        for i, item in enumerate(itertools.chain(gone, upserts)):
            if i < len(gone):
                del held[item]
                names.append(item)
                size += _size(item)
            else:
                held[item.service] = item
                routes.append(item.to_wire())
                size += wire_size(item)
            if len(routes) + len(names) >= limit or size >= MESSAGE_BUDGET:
                out.append((sub, {"t": "upd", "r": routes, "w": names, "d": digest(held)}))
                routes, names, size = [], [], 0
        if routes or names:
            out.append((sub, {"t": "upd", "r": routes, "w": names, "d": digest(held)}))
        return out

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
                        r = self._export(s, sub)
                        if r is None or r.hops > old.hops:
                            gone.append(s)
                if gone:
                    self._sub_digest_at[sub] = now
                    out += self._emit(sub, [], gone)
                    continue
            elif pending and now - self._sub_last[sub] >= self.min_update_interval:
                upserts, gone = self._changes(sub, pending)
                pending.clear()
                self._sub_last[sub] = now
                if upserts or gone:
                    self._sub_digest_at[sub] = now
                    out += self._emit(sub, upserts, gone)
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
