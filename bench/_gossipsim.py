"""A tiny discrete-event driver for the real :class:`GossipEngine` (no sockets, no sleeping).

Shared by ``tests/network/test_gossip.py`` and ``bench/gossip_sim.py``.  It models what
``utesla_node/network/__init__.py`` and ``links.py`` do around the engine:

* a *link* ``(down, up)`` means node ``down`` subscribes to node ``up`` and learns what
  ``up`` exports to it: opening it calls ``up.subscribe(down)`` (the snapshot is sent) and
  ``down.link_up(up)``; closing it calls ``up.unsubscribe(down)`` and ``down.link_down(up)``;
* every message goes through ``encode_message``/``decode_message`` (sizes are counted) and
  arrives after the link's latency, in order; a message that fails to decode is dropped,
  its sender counts as heard and is marked for resync, as ``Link._subscription`` does;
* a subscription tells the publisher the subscriber's ``max_routes``, as the runtime's
  request args do;
* when a node puts an upstream in ``engine.resync`` the link is re-subscribed
  (``unsubscribe`` + ``subscribe`` → a fresh snapshot) once ``engine.resync_wait()``
  allows (plus ``resub_delay``, 0 by default), if the upstream is still out of step then;
  messages still in flight on the old subscription are discarded, as the runtime resets
  the old stream;
* each node is polled at its ``engine.next_deadline()`` on a virtual clock.
"""
from __future__ import annotations

import base64
import hashlib
import heapq
import itertools
import random
from collections import Counter, deque

from utesla_node.network.gossip import GossipEngine, GossipError, decode_message, encode_message

__all__ = ["Sim", "line", "ring", "star", "random_graph", "bfs", "distances_to", "diameter",
           "fingerprint_id"]

LEN_PREFIX = 4          # each gossip message travels behind a 4-byte length (links.LEN)
_EPS = 1e-9             # a poll that is due "now" but not yet by float rounding


def fingerprint_id(i: int) -> str:
    """A node id shaped like a real one (``SHA256:<43 base64 chars>``, 50 characters)."""
    h = hashlib.sha256(str(i).encode()).digest()
    return "SHA256:" + base64.b64encode(h).decode().rstrip("=")


class Sim:
    """Engines, directional links, a message queue with per-link latency, a virtual clock."""

    def __init__(self, *, latency: float = 0.001, resub_delay: float = 0.0,
                 **engine_kw):
        self.engine_kw = engine_kw
        self.latency = latency
        self.link_latency: dict[tuple[str, str], float] = {}
        self.resub_delay = resub_delay
        self.now = 0.0
        self.engines: dict[str, GossipEngine] = {}
        self.links: dict[tuple[str, str], int] = {}     # (down, up) -> subscription generation
        self.muted: set[str] = set()                    # nodes whose outgoing gossip is lost
        self.on_change = None                           # callback(node_id) after any change
        self._gen = itertools.count(1)
        self._seq = itertools.count()
        self._events: list = []
        self._sched: dict[str, float] = {}
        self._resub: set[tuple[str, str]] = set()       # links with a resubscription under way
        self.reset_stats()

    # ------------------------------------------------------------------ statistics

    def reset_stats(self) -> None:
        self.msgs: Counter = Counter()          # sender -> messages sent
        self.bytes: Counter = Counter()         # sender -> bytes sent (with length prefix)
        self.kinds: Counter = Counter()         # "snap"/"upd"/"dig" -> messages sent
        self.decode_errors = 0
        self.resubscriptions = 0
        self.stats_since = self.now
        self.last_change = self.now             # last time a snap or upd was sent

    # ------------------------------------------------------------------ topology

    def add_node(self, nid: str, services=(), **kw) -> GossipEngine:
        e = GossipEngine(nid, **{**self.engine_kw, **kw})
        self.engines[nid] = e
        e.set_local(services, self.now)
        self._schedule(nid)
        return e

    def set_services(self, nid: str, services) -> None:
        self.engines[nid].set_local(services, self.now)
        self._changed(nid)

    def add_link(self, down: str, up: str) -> None:
        """``down`` subscribes to ``up``."""
        if (down, up) in self.links or down == up:
            return
        self._open(down, up)

    def connect(self, a: str, b: str) -> None:
        self.add_link(a, b)
        self.add_link(b, a)

    def remove_link(self, down: str, up: str) -> None:
        if self.links.pop((down, up), None) is None:
            return
        self._resub.discard((down, up))
        self.engines[up].unsubscribe(down)
        self.engines[down].link_down(up, self.now)
        self._changed(up)
        self._changed(down)

    def kill(self, nid: str) -> list[tuple[str, str]]:
        """Every link of ``nid`` goes down and the node is gone; returns its links."""
        gone = [l for l in self.links if nid in l]
        for down, up in gone:
            self.remove_link(down, up)
        del self.engines[nid]
        self._sched.pop(nid, None)
        return gone

    def neighbours_up(self, nid: str) -> list[str]:
        return [up for (down, up) in self.links if down == nid]

    def _open(self, down: str, up: str) -> None:
        gen = next(self._gen)
        self.links[(down, up)] = gen
        snap = self.engines[up].subscribe(down, self.now, self.engines[down].max_routes)
        self.engines[down].link_up(up, self.now)
        self._send(up, down, snap, gen)
        self._changed(up)
        self._changed(down)

    # ------------------------------------------------------------------ messages

    def _send(self, src: str, dst: str, msg: dict, gen: int) -> None:
        data = encode_message(msg)
        kind = msg["t"]
        self.msgs[src] += 1
        self.bytes[src] += len(data) + LEN_PREFIX
        self.kinds[kind] += 1
        if kind != "dig":
            self.last_change = self.now
        if src in self.muted:
            if kind == "snap":
                self._resub.discard((dst, src))
            return
        at = self.now + self.link_latency.get((dst, src), self.latency)
        heapq.heappush(self._events, (at, next(self._seq), 0, (dst, src, gen, data, kind)))

    def inject(self, dst: str, src: str, data: bytes) -> None:
        """Deliver raw bytes to ``dst`` as if sent by upstream ``src`` on their link."""
        gen = self.links[(dst, src)]
        heapq.heappush(self._events, (self.now + self.latency, next(self._seq), 0,
                                      (dst, src, gen, data, "raw")))

    def _deliver(self, dst: str, src: str, gen: int, data: bytes, kind: str) -> None:
        if self.links.get((dst, src)) != gen:
            return                          # the subscription it belonged to is gone
        if kind == "snap":
            self._resub.discard((dst, src))
        e = self.engines[dst]
        try:
            msg = decode_message(data, e.max_routes)
        except GossipError:
            self.decode_errors += 1
            e.heard[src] = self.now
            e.resync.add(src)
        else:
            e.receive(src, msg, self.now)
        self._changed(dst)

    # ------------------------------------------------------------------ scheduling

    def _changed(self, nid: str, after_poll: bool = False) -> None:
        e = self.engines.get(nid)
        if e is None:
            return
        for peer in e.resync:
            link = (nid, peer)
            if link in self.links and link not in self._resub:
                self._resub.add(link)
                at = self.now + self.resub_delay + e.resync_wait(peer, self.now)
                heapq.heappush(self._events, (at, next(self._seq), 2, (link, self.links[link])))
        self._schedule(nid, after_poll)
        if self.on_change is not None:
            self.on_change(nid)

    def _schedule(self, nid: str, after_poll: bool = False) -> None:
        d = self.engines[nid].next_deadline()
        if d is None:
            return
        if d <= self.now:
            d = self.now + _EPS if after_poll else self.now
        cur = self._sched.get(nid)
        if cur is not None and cur <= d:
            return
        self._sched[nid] = d
        heapq.heappush(self._events, (d, next(self._seq), 1, nid))

    def _poll(self, nid: str, t: float) -> None:
        if self._sched.get(nid) != t:
            return                          # superseded
        del self._sched[nid]
        e = self.engines[nid]
        for sub, msg in e.poll(self.now):
            gen = self.links.get((sub, nid))
            if gen is not None:             # no subscription queue: dropped, as the runtime does
                self._send(nid, sub, msg, gen)
        self._changed(nid, after_poll=True)

    def _resubscribe(self, link: tuple[str, str], gen: int) -> None:
        if self.links.get(link) != gen:
            self._resub.discard(link)
            return
        down, up = link
        if up not in self.engines[down].resync:   # back in step meanwhile
            self._resub.discard(link)
            return
        self.resubscriptions += 1
        self.engines[down].resubscribing(up, self.now)
        self.engines[up].unsubscribe(down)
        self._open(down, up)                # the snapshot's arrival ends the resubscription

    # ------------------------------------------------------------------ running

    def step(self) -> bool:
        if not self._events:
            return False
        at, _, kind, payload = heapq.heappop(self._events)
        self.now = max(self.now, at)
        if kind == 0:
            self._deliver(*payload)
        elif kind == 1:
            if payload in self.engines:
                self._poll(payload, at)
        else:
            self._resubscribe(*payload)
        return True

    def run(self, until: float, stop=None) -> bool:
        """Process events up to virtual time ``until``; True if ``stop()`` became true."""
        ev = self._events
        while ev and ev[0][0] <= until:
            self.step()
            if stop is not None and stop():
                return True
        self.now = max(self.now, until)
        return False

    def run_for(self, duration: float, stop=None) -> bool:
        return self.run(self.now + duration, stop)

    def settle(self, limit: float = 600.0, quiet: float | None = None) -> float:
        """Run until no snapshot or update has been sent for ``quiet`` virtual seconds.

        Returns the virtual time of the last snapshot/update; raises if ``limit`` passes first.
        """
        di = self.engine_kw.get("digest_interval", 1.0)
        quiet = 2 * di if quiet is None else quiet
        end = self.now + limit
        while self.now < end:
            self.run(min(end, self.now + quiet / 2))
            if self.now - self.last_change >= quiet and not self._resub:
                return self.last_change
        raise AssertionError(f"gossip did not settle within {limit} virtual seconds")

    # ------------------------------------------------------------------ views

    def best(self, nid: str, svc: str):
        cands = self.engines[nid].best.get(svc)
        return cands[0] if cands else None

    def subscriptions(self, nid: str) -> int:
        """How many subscribers ``nid`` serves (= digests it sends per interval at rest)."""
        return sum(1 for (down, up) in self.links if up == nid)


# ---------------------------------------------------------------------- topologies

def line(n: int) -> list[tuple[int, int]]:
    return [(i, i + 1) for i in range(n - 1)]


def ring(n: int) -> list[tuple[int, int]]:
    return [(i, (i + 1) % n) for i in range(n)]


def star(n: int) -> list[tuple[int, int]]:
    return [(0, i) for i in range(1, n)]


def random_graph(n: int, avg_degree: float, rng: random.Random) -> list[tuple[int, int]]:
    """A connected undirected graph: a random spanning tree plus random extra edges."""
    order = list(range(n))
    rng.shuffle(order)
    edges = set()
    for i in range(1, n):
        a, b = order[i], order[rng.randrange(i)]
        edges.add((min(a, b), max(a, b)))
    want = int(n * avg_degree / 2)
    while len(edges) < want:
        a, b = rng.randrange(n), rng.randrange(n)
        if a != b:
            edges.add((min(a, b), max(a, b)))
    return sorted(edges)


def bfs(adj: dict, src) -> dict:
    dist = {src: 0}
    q = deque([src])
    while q:
        u = q.popleft()
        for v in adj.get(u, ()):
            if v not in dist:
                dist[v] = dist[u] + 1
                q.append(v)
    return dist


def distances_to(links, origin) -> dict:
    """Hops from every node to ``origin`` following subscriptions (down -> up)."""
    rev: dict = {}
    for down, up in links:
        rev.setdefault(up, []).append(down)
    return bfs(rev, origin)


def diameter(n: int, edges) -> int:
    """Exact diameter of a connected undirected graph (BFS from every node)."""
    adj: dict = {i: [] for i in range(n)}
    for a, b in edges:
        adj[a].append(b)
        adj[b].append(a)
    return max(max(bfs(adj, s).values()) for s in range(n))
