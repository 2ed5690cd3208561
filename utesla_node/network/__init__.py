"""The network: peer links, gossip of service tables, transparent forwarding.

``Network`` ties the pure :class:`~utesla_node.network.gossip.GossipEngine` to
the node: it keeps a :class:`~utesla_node.network.links.Link` per row of the
peers table (re-read every second, so ``utesla-cli add_network`` takes effect
on a running node without a restart), serves gossip subscriptions to
downstream nodes, and forwards requests for services this node lacks
(SPEC.md §9.4).
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import random
import secrets
import time
from typing import TYPE_CHECKING

from protocol.errors import (BadRequest, GatewayTimeout, LoopDetected, NotFound, Status,
                             StatusError, Unavailable, error_for_status)

from ..dispatch import BUILTIN_PREFIX, request_timeout
from ..services import split_path
from ..storage import StorageError
from ..transport import ConnectionLost, Session, Stream
from .gossip import GossipEngine, Route, encode_message
from .links import LEN, Link, cancel_and_wait
from .relay import REPLAYABLE, Relay

if TYPE_CHECKING:  # pragma: no cover
    from ..dispatch import ResponseWriter
    from ..server import Node

__all__ = ["Network", "Link", "GossipEngine", "Route"]

log = logging.getLogger("utesla.network")
PEERS_POLL = 1.0
ROUTES_PATH = "/_node/net/routes"


class Network:
    """A node's view of, and place in, the network (see the module docstring)."""

    def __init__(self, node: "Node"):
        self.node = node
        cfg = node.config
        self.id = node.key.public.fingerprint()
        self.engine = GossipEngine(self.id, max_hops=cfg.max_hops,
                                   digest_interval=cfg.gossip_interval,
                                   route_ttl=max(4 * cfg.gossip_interval,
                                                 3 * cfg.heartbeat_interval))
        self.links: dict[str, Link] = {}          # url -> link
        self.subscribers: dict[str, asyncio.Queue] = {}
        self._kick = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.relays = 0                           # requests on the fast path (relay.py)
        self.relays_idle: asyncio.Future | None = None
        #: Dispatcher tasks relays handed over to (a stopping node waits for them too).
        self.handovers: set[asyncio.Task] = set()

    # -------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        self.engine.set_local(self.node.registry.names(), time.monotonic())
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

    def local_services_changed(self) -> None:
        self.engine.set_local(self.node.registry.names(), time.monotonic())
        self.kick()

    # -------------------------------------------------------------- peers table

    async def _watch_peers(self) -> None:
        while True:
            await asyncio.sleep(PEERS_POLL)
            try:
                await self._sync_peers()
            except StorageError as exc:
                log.debug("cannot read the peers table: %s", exc)

    async def _sync_peers(self) -> None:
        peers = {p.url: p for p in await self.node.storage.list_peers()}
        for url, link in list(self.links.items()):
            p = peers.get(url)
            if p is None or (p.public_key, p.user, p.token) != (
                    link.peer.public_key, link.peer.user, link.peer.token):
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
        old = self.subscribers.pop(sub, None)
        if old is not None:
            old.put_nowait(None)
        queue: asyncio.Queue = asyncio.Queue()
        self.subscribers[sub] = queue
        snap = self.engine.subscribe(sub, time.monotonic())
        log.info("gossip subscriber %s (%s) with %d route(s)", session.peer_user, sub[:20],
                 len(snap["r"]))
        try:
            data = encode_message(snap)
            await writer.write(LEN.pack(len(data)) + data)
            await writer.flush()
            quiet = 6 * self.node.config.heartbeat_interval
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

    async def builtin(self, session: Session, stream: Stream, writer: "ResponseWriter",
                      name: str) -> None:
        await self.node.authorize(session, stream.request.token, "_node/net/" + name)
        if name == "routes":
            await self.serve_routes(session, stream, writer)
        elif name == "status":
            await writer.write(self.status())
        else:
            raise NotFound(f"no built-in service /_node/net/{name}")

    # -------------------------------------------------------------- views

    def routes_summary(self) -> list[dict]:
        out = []
        by_peer = self._links_by_peer()
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
        nodes: dict[str, dict] = {self.id: {"id": self.id, "hops": 0, "self": True,
                                            "services": sorted(self.engine.local)}}
        edges: set[tuple[str, str]] = set()
        urls = {link.peer_id: link.peer.url for link in self.links.values()}
        for link in self.links.values():
            nodes.setdefault(link.peer_id, {"id": link.peer_id, "hops": 1, "services": []})
            edges.add((self.id, link.peer_id))
        for svc, cands in self.engine.best.items():
            for _peer, r in cands:
                prev = self.id
                for i, n in enumerate(r.path):
                    entry = nodes.setdefault(n, {"id": n, "hops": i + 1, "services": []})
                    entry["hops"] = min(entry["hops"], i + 1)
                    edges.add((prev, n))
                    prev = n
                origin = nodes[r.origin]
                if svc not in origin["services"]:
                    origin["services"].append(svc)
        for n in nodes.values():
            n["services"].sort()
            if n["id"] in urls:
                n["url"] = urls[n["id"]]
        return {"nodes": sorted(nodes.values(), key=lambda n: (n["hops"], n["id"])),
                "edges": [{"from": a, "to": b} for a, b in sorted(edges)]}

    # -------------------------------------------------------------- forwarding

    def _links_by_peer(self) -> dict[str, Link]:
        """peer id -> link; rebuilt after the links change (see _links_changed), not per
        request."""
        if self._by_peer is None:
            self._by_peer = {l.peer_id: l for l in self.links.values()}
        return self._by_peer

    def _links_changed(self) -> None:
        self._by_peer = None

    _by_peer: dict[str, Link] | None = None

    def _choose(self, service: str, exclude: set[str], visited: list[str]) -> Link | None:
        by_peer = self._links_by_peer()
        best_hops = None
        pool: list[Link] = []
        for peer, route in self.engine.candidates(service):
            link = by_peer.get(peer)
            if (link is None or not link.up or peer in exclude
                    or (visited and any(n in visited for n in route.path))):
                continue
            if best_hops is None:
                best_hops = route.hops
            if route.hops != best_hops:
                break
            pool.append(link)
        if not pool:
            return None
        top = min(l.peer.priority for l in pool)
        pool = [l for l in pool if l.peer.priority == top]
        if len(pool) == 1:
            return pool[0]
        a, b = random.sample(pool, 2)        # power of two choices on in-flight load
        return a if a.inflight <= b.inflight else b

    def _service_for(self, parts: list[str]) -> str | None:
        for n in range(len(parts), 0, -1):
            name = "/".join(parts[:n])
            if self.engine.best.get(name):
                return name
        return None

    def check_envelope(self, envelope: dict | None) -> tuple[list[str], int]:
        """A received envelope's (path, hops left); SPEC.md §6.7.

        400 when malformed; 508 when this node is already on its path, whether the
        request would be served here or forwarded (the dispatcher calls this for local
        services too).
        """
        env = envelope or {}
        visited = env.get("path", [])
        hops = env.get("hops", self.node.config.max_hops)
        rid, user, ttl = env.get("id"), env.get("user"), env.get("ttl")
        if (not isinstance(visited, list) or len(visited) > 64
                or not all(isinstance(v, str) and 0 < len(v) <= 80 for v in visited)
                or type(hops) is not int or hops < 0
                or (rid is not None and not (isinstance(rid, bytes) and len(rid) == 16))
                or (user is not None and not (isinstance(user, str) and len(user) <= 255))
                or (ttl is not None and (isinstance(ttl, bool)
                                         or not isinstance(ttl, (int, float))))):
            raise BadRequest("malformed forwarding envelope")
        if self.id in visited:
            raise LoopDetected("forwarding loop: this node is already on the request's path")
        return visited, hops

    async def wait_relays(self) -> None:
        """Until no request is on the fast path, nor in a task one handed over to (a
        stopping node's grace period: those tasks began after it listed the running ones)."""
        while self.relays or self.handovers:
            if self.relays:
                self.relays_idle = asyncio.get_running_loop().create_future()
                await self.relays_idle
            else:
                await asyncio.wait(set(self.handovers))

    def handed_over(self, task: asyncio.Task) -> None:
        self.handovers.add(task)
        task.add_done_callback(self.handovers.discard)

    def relay_now(self, session: Session, stream: Stream) -> bool:
        """Forward ``stream``'s request at once, without a task, if it is the common
        case (see relay.py); False leaves it to the dispatcher."""
        req = stream.request
        node = self.node
        if (not req.end or req.method not in REPLAYABLE or node.stopping
                or req.path.startswith(BUILTIN_PREFIX)):
            return False
        try:
            parts = split_path(req.path)
            if node.registry.resolve(parts) is not None:
                return False                          # served here
            user = node.authorize_now(session, req.token, "/".join(parts))
            if user is None:
                return False
            visited, hops = self.check_envelope(req.envelope)
        except StatusError:
            return False                              # the dispatcher reports it
        service = self._service_for(parts)
        if service is None or hops <= 0:
            return False
        link = self._choose(service, (), visited)
        if link is None:
            return False
        out_conn = link.session.conn
        body = b"".join(stream._chunks) if stream._chunks else b""
        if len(body) > min(out_conn.peer_window, out_conn.max_chunk):
            return False
        timeout = request_timeout(node.config, req.envelope)
        envelope = self._envelope(req.envelope, user, visited, hops, timeout)
        try:
            out = link.session.open_stream(req.method, req.path, token=link.peer.token,
                                           args=req.args, headers=req.headers, body=body,
                                           end=True, envelope=envelope, head=False)
        except (ConnectionLost, StatusError):
            return False
        node.metrics.incr("forwarded_requests")
        Relay(self, session, stream, link, out, timeout, time.monotonic())
        return True

    def _envelope(self, env: dict | None, user, visited: list[str], hops: int,
                  left: float | None) -> dict:
        """The envelope for the next hop (SPEC.md §6.7)."""
        envelope = {"id": (env.get("id") if env else None) or self._request_id(),
                    "user": (env.get("user") if env else None) or user.name,
                    "path": visited + [self.id], "hops": min(hops, self.node.config.max_hops) - 1}
        if left is not None:
            # The next hop gives up a little before we do, so its 408 reaches the client.
            envelope["ttl"] = max(0.001, left - min(0.25, left * 0.05))
        return envelope

    async def forward(self, session: Session, stream: Stream, writer: "ResponseWriter",
                      parts: list[str], user) -> None:
        """Relay a request to the best node offering the service, both bodies streamed."""
        req = stream.request
        visited, hops = self.check_envelope(req.envelope)
        if hops <= 0:
            raise LoopDetected("hop limit reached")
        service = self._service_for(parts)
        if service is None:
            raise NotFound(f"no service {req.path} in this node or its network")
        left = None if stream.deadline is None else stream.deadline - time.monotonic()
        envelope = self._envelope(req.envelope, user, visited, hops, left)
        tried: set[str] = set()
        writer.forwarded = True
        replayable = req.end and req.method in ("GET", "HEAD", "OPTIONS")
        while True:
            link = self._choose(service, tried, visited)
            if link is None:
                if tried:
                    raise Unavailable(f"service /{service}: every route failed "
                                      f"(last: {self._last_failure})")
                raise Unavailable(f"service /{service}: no live route")
            tried.add(link.peer_id)
            try:
                await self._relay(link, stream, writer, envelope)
                return
            except _RetryableFailure as exc:
                self._last_failure = f"{link.peer.url}: {exc}"
                log.warning("forward of %s via %s failed before any answer: %s", req.path,
                            link.peer.url, exc)
                if not replayable:
                    raise Unavailable(f"link to {link.peer.url} failed: {exc}") from None

    _last_failure = ""
    _rid_prefix = secrets.token_bytes(8)
    _rid_counter = itertools.count()

    def _request_id(self) -> bytes:
        """16 bytes unique to this request: a random per-process prefix and a counter
        (ids trace a request across nodes; they are not secrets)."""
        return self._rid_prefix + next(self._rid_counter).to_bytes(8, "big")

    async def _relay(self, link: Link, stream: Stream, writer: "ResponseWriter",
                     envelope: dict) -> None:
        req = stream.request
        session = link.session
        first = b""
        if req.end:
            first = b"".join(stream._chunks)
        if len(first) > min(session.conn.peer_window, session.conn.max_chunk):
            first = b""
            end = False
        else:
            end = req.end
        link.inflight += 1
        link.forwarded += 1
        self.node.metrics.incr("forwarded_requests")
        pump = out = None
        try:
            try:
                out = session.open_stream(req.method, req.path, token=link.peer.token,
                                          args=req.args, headers=req.headers, body=first,
                                          end=end, envelope=envelope)
            except (ConnectionLost, StatusError) as exc:
                raise _RetryableFailure(str(exc)) from None
            if not end:
                pump = asyncio.get_running_loop().create_task(self._pump_body(stream, out, link.peer.url))
            try:
                status, headers = await out.head
            except StatusError as exc:
                # No answer byte came back (the link broke, or the peer closed or reset
                # the stream): another route may serve a replayable request.
                raise _RetryableFailure(str(exc)) from None
            if req.end:
                stream._chunks.clear()
            await self._relay_answer(link, out, writer, status, headers)
        except BaseException:
            if pump is not None:
                pump.cancel()
            raise
        finally:
            link.inflight -= 1
            if out is not None:
                out.abandon("forwarding ended")

    @staticmethod
    async def _relay_answer(link: Link, out: Stream, writer: "ResponseWriter", status: int,
                            headers: dict) -> None:
        """Pass the answer arriving on ``out`` (its head already in) to ``writer``."""
        writer.status = status
        writer.headers = dict(headers)
        if out._ended and out._error is None:
            # The whole answer came with its head (the usual small one): it leaves
            # as one response when the dispatcher finishes, no chunk loop.
            body = b"".join(out._chunks)
            out._chunks.clear()
            out.buffered = 0
            if body:
                writer.sent += len(body)
                writer._stash = body
            return
        while True:
            try:
                chunk = await out.read_chunk()
            except StatusError as exc:
                raise Unavailable(f"link to {link.peer.url} failed mid-answer: {exc}") \
                    from None
            if not chunk:
                break
            await writer.write(chunk)

    @staticmethod
    async def _pump_body(src: Stream, dst: Stream, url: str) -> None:
        """Stream the client's request body on to the next hop (``url``)."""
        try:
            async for chunk in src:
                await dst.send_body(chunk)
            await dst.end()
        except (StatusError, ConnectionLost) as exc:
            if getattr(exc, "status", None) == Status.OK:
                # RESET 200 from the next hop: its answer is complete and it wants no
                # more body (SPEC.md §7.5).  Stop sending; the answer is still being
                # relayed, and the client hears the same once it is (request_done).
                return
            dst.reset(Status.CANCELLED, f"request body broken: {exc}")
            src.reset(Status.UNAVAILABLE, f"forwarding the body to {url} failed: {exc}")


class _RetryableFailure(Exception):
    """The link failed before any response byte came back."""
