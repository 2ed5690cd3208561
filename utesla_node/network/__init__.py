"""The network: peer links and the gossip of service tables.

``Network`` ties the pure :class:`~utesla_node.network.gossip.GossipEngine` to
the node: it keeps a :class:`~utesla_node.network.links.Link` per row of the
peers table (re-read every second, so ``utesla-cli add_network`` takes effect
on a running node without a restart) and serves gossip subscriptions to
downstream nodes.  Forwarding over the links is :mod:`.router`'s.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Callable

from protocol.errors import BadRequest, Status

from ..config import NodeConfig
from ..metrics import Metrics
from ..storage import Storage, StorageError
from ..transport import Session, Stream
from .gossip import GossipEngine, Route, encode_message
from .links import LEN, Link, cancel_and_wait

if TYPE_CHECKING:  # pragma: no cover
    from protocol import Settings
    from protocol.crypto import PrivateKey

    from ..response import ResponseWriter

__all__ = ["Network", "Link", "GossipEngine", "Route"]

log = logging.getLogger("utesla.network")
PEERS_POLL = 1.0
ROUTES_PATH = "/_node/net/routes"


class Network:
    """A node's view of, and place in, the network (see the module docstring)."""

    def __init__(self, config: NodeConfig, key: "PrivateKey", settings: "Settings",
                 storage: Storage, metrics: Metrics, local_services: Callable[[], list[str]]):
        cfg = self.config = config
        self.key = key
        self.settings = settings
        self.storage = storage
        self.metrics = metrics
        self.local_services = local_services
        self.id = key.public.fingerprint()
        self.engine = GossipEngine(self.id, max_hops=cfg.max_hops,
                                   max_routes=cfg.max_routes_per_link,
                                   digest_interval=cfg.gossip_interval,
                                   route_ttl=max(4 * cfg.gossip_interval,
                                                 3 * cfg.heartbeat_interval))
        self.links: dict[str, Link] = {}          # url -> link
        self.subscribers: dict[str, asyncio.Queue] = {}
        self._kick = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    # -------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self.engine.set_local(self.local_services(), time.monotonic())
        loop = asyncio.get_running_loop()
        await self._sync_peers()
        self._tasks = [loop.create_task(self._pump(), name="gossip pump"),
                       loop.create_task(self._watch_peers(), name="peers watcher")]

    def quiesce(self) -> None:
        """First step of a node's stop: end the gossip subscriptions we serve (they
        never end by themselves, and the grace period waits for requests), keep the
        links: requests being forwarded over them finish."""
        for q in self.subscribers.values():
            q.put_nowait(None)

    async def stop(self) -> None:
        for t in self._tasks:
            t.cancel()
        if self._peers_read is not None:
            self._tasks.append(self._peers_read)     # cancelled and awaited below
            self._peers_read.cancel()
        for q in self.subscribers.values():
            q.put_nowait(None)
        await asyncio.gather(*(link.stop() for link in self.links.values()),
                             return_exceptions=True)
        self.links.clear()
        self._links_changed()
        for t in self._tasks:
            await cancel_and_wait(t)      # a cancel lost inside wait_for() must not hang us

    def kick(self) -> None:
        self._kick.set()
        waiters, self._change_waiters = self._change_waiters, []
        for f in waiters:
            if not f.done():
                f.set_result(None)

    _change_waiters: list = []
    #: The peers table read in flight (one at a time), and when it and the last finished
    #: one started (time.monotonic()).
    _peers_read: "asyncio.Future | None" = None
    _peers_read_started = 0.0
    _peers_read_done = -1.0
    #: A link this young that has not received its peer's first table is "settling".
    SETTLING = 5.0

    def settling(self) -> bool:
        """Some link came up (or was added) a moment ago and has not received its peer's
        first table yet: a service missing now may be known in a second."""
        now = time.monotonic()
        return any(not l.synced and now - l.added_at < self.SETTLING
                   for l in self.links.values())

    async def wait_change(self, timeout: float) -> None:
        """Until the routes may have changed (a table came in), at most ``timeout`` s."""
        fut = asyncio.get_running_loop().create_future()
        if self._change_waiters is Network._change_waiters:
            self._change_waiters = []
        self._change_waiters.append(fut)
        try:
            await asyncio.wait_for(fut, timeout)
        except asyncio.TimeoutError:
            pass

    async def refresh_peers(self, since: float) -> None:
        """Make sure the peers table was read after ``since`` (time.monotonic()): a peer
        added a moment ago by ``utesla-cli add_network`` gets its link without waiting
        for the next poll.  One read at a time, shared by everyone who asked meanwhile,
        so a burst of requests costs one read, not one each."""
        while self._peers_read_done < since:
            fut = self._peers_read
            if fut is None:
                fut = self._peers_read = asyncio.ensure_future(self._read_peers())
            started = self._peers_read_started
            await asyncio.shield(fut)
            if started >= since:
                return

    async def _read_peers(self) -> None:
        """One read of the peers table (see refresh_peers); errors are logged, not raised."""
        started = self._peers_read_started = time.monotonic()
        try:
            await self._sync_peers()
        except StorageError as exc:
            log.debug("cannot read the peers table: %s", exc)
        finally:
            self._peers_read = None
            self._peers_read_done = started

    def local_services_changed(self) -> None:
        self.engine.set_local(self.local_services(), time.monotonic())
        self.kick()

    # -------------------------------------------------------------- peers table

    async def _watch_peers(self) -> None:
        while True:
            await asyncio.sleep(PEERS_POLL)
            await self.refresh_peers(time.monotonic())

    async def _sync_peers(self) -> None:
        peers = {p.url: p for p in await self.storage.list_peers()}
        for url, link in list(self.links.items()):
            p = peers.get(url)
            if p is None or (p.public_key, p.user, p.token, p.proxy) != (
                    link.peer.public_key, link.peer.user, link.peer.token, link.peer.proxy):
                log.info("peer %s %s", url, "removed" if p is None else "changed")
                del self.links[url]
                self._links_changed()
                await link.stop()
            elif p.priority != link.peer.priority:
                link.peer = p
        for url, p in peers.items():
            if url not in self.links:
                try:
                    link = Link(self, p)
                except Exception as exc:  # a corrupt row must not stop the others
                    log.error("peer %s unusable: %s", url, exc)
                    continue
                if link.peer_id == self.id:
                    log.error("peer %s has this node's own key: ignored", url)
                    continue
                self.links[url] = link
                self._links_changed()
                link.start()
                log.info("peer %s added (%s)", url, link.peer_id[:20])

    # -------------------------------------------------------------- gossip pump

    async def _pump(self) -> None:
        engine = self.engine
        while True:
            now = time.monotonic()
            for sub, msg in engine.poll(now):
                q = self.subscribers.get(sub)
                if q is not None:
                    q.put_nowait(msg)
            for peer in list(engine.resync):
                for link in self.links.values():
                    if link.peer_id == peer and link.up:
                        link.resubscribe()
            deadline = engine.next_deadline()
            timeout = 1.0 if deadline is None else max(0.005, min(1.0, deadline - time.monotonic()))
            self._kick.clear()
            try:
                await asyncio.wait_for(self._kick.wait(), timeout)
            except asyncio.TimeoutError:
                pass

    async def serve_routes(self, session: Session, stream: Stream,
                           writer: "ResponseWriter") -> None:
        """A downstream node subscribes: snapshot first, then updates and digests."""
        sub = session.peer_key.fingerprint()
        # The routes it keeps per link (SPEC.md §9.3); an older node does not say.
        cap = (stream.request.args or {}).get("max_routes")
        if cap is not None and (type(cap) is not int or not 1 <= cap < (1 << 32)):
            raise BadRequest("max_routes must be an integer from 1 to 2^32 - 1")
        old = self.subscribers.pop(sub, None)
        if old is not None:
            old.put_nowait(None)
        queue: asyncio.Queue = asyncio.Queue()
        self.subscribers[sub] = queue
        snap = self.engine.subscribe(sub, time.monotonic(), cap)
        self.kick()                       # a table too large for one message goes on in updates
        log.info("gossip subscriber %s (%s) with %d route(s)", session.peer_user, sub[:20],
                 len(snap["r"]))
        try:
            data = encode_message(snap)
            await writer.write(LEN.pack(len(data)) + data)
            await writer.flush()
            quiet = 6 * self.config.heartbeat_interval
            while True:
                try:
                    msg = await asyncio.wait_for(queue.get(), quiet)
                except asyncio.TimeoutError:
                    # Subscribers ping every heartbeat; silence means it is gone (a cut
                    # cable sends no FIN): end the session instead of holding it forever.
                    if time.monotonic() - session.last_activity > quiet:
                        log.warning("gossip subscriber %s silent for %.0f s: closing",
                                    session.peer_user, quiet)
                        session.close(Status.TIMEOUT, "subscriber silent")
                        return
                    continue
                if msg is None:
                    return
                data = encode_message(msg)
                await writer.write(LEN.pack(len(data)) + data)
                await writer.flush()
        finally:
            if self.subscribers.get(sub) is queue:
                del self.subscribers[sub]
                self.engine.unsubscribe(sub)

    # -------------------------------------------------------------- views

    def routes_summary(self) -> list[dict]:
        out = []
        by_peer = self.links_by_peer()
        for svc, cands in sorted(self.engine.best.items()):
            if svc in self.engine.local:
                continue
            best = cands[0]
            link = by_peer.get(best[0])
            out.append({"path": "/" + svc, "origin": best[1].origin,
                        "next_hop": link.peer.url if link else best[0], "hops": best[1].hops,
                        "replicas": len({r.origin for _, r in cands}),
                        "routes": len(cands)})
        return out

    def status(self) -> dict:
        return {"node": self.id, "links": [l.describe() for l in self.links.values()],
                "subscribers": len(self.subscribers), "routes": self.routes_summary(),
                "local": sorted(self.engine.local), "graph": self.graph()}

    def graph(self) -> dict:
        """The network as this node sees it: nodes (with hop distance and services) and
        the directed links gossip flows over (A -> B: A subscribes to B)."""
        # (Services gathered in sets: a list's membership test made this quadratic, over a
        # second per call with a peer of 10,000 services.)
        nodes: dict[str, dict] = {self.id: {"id": self.id, "hops": 0, "self": True,
                                            "services": set(self.engine.local)}}
        edges: set[tuple[str, str]] = set()
        urls = {link.peer_id: link.peer.url for link in self.links.values()}
        for link in self.links.values():
            nodes.setdefault(link.peer_id, {"id": link.peer_id, "hops": 1, "services": set()})
            edges.add((self.id, link.peer_id))
        for svc, cands in self.engine.best.items():
            for _peer, r in cands:
                prev = self.id
                for i, n in enumerate(r.path):
                    entry = nodes.setdefault(n, {"id": n, "hops": i + 1, "services": set()})
                    entry["hops"] = min(entry["hops"], i + 1)
                    edges.add((prev, n))
                    prev = n
                nodes[r.origin]["services"].add(svc)
        for n in nodes.values():
            n["services"] = sorted(n["services"])
            if n["id"] in urls:
                n["url"] = urls[n["id"]]
        return {"nodes": sorted(nodes.values(), key=lambda n: (n["hops"], n["id"])),
                "edges": [{"from": a, "to": b} for a, b in sorted(edges)]}

    # -------------------------------------------------------------- links by peer

    def links_by_peer(self) -> dict[str, Link]:
        """peer id -> link; rebuilt after the links change (see _links_changed), not per
        request."""
        if self._by_peer is None:
            self._by_peer = {l.peer_id: l for l in self.links.values()}
        return self._by_peer

    def _links_changed(self) -> None:
        self._by_peer = None

    _by_peer: dict[str, Link] | None = None
