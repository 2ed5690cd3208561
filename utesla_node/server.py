"""The node: the composition root.  It builds the parts, wires them together, and
runs them: start, serve, reload, drain, stop.

Parts (docs/architecture.md draws them): the storage and the token
:class:`~utesla_node.auth.Authority`; the :class:`~utesla_node.gate.Gate` (user keys
and token checks); the service registry; the :class:`~utesla_node.network.Network`
(links, gossip) and its :class:`~utesla_node.network.router.Router` (forwarding); the
:class:`~utesla_node.builtins.Builtins`; the :class:`~utesla_node.dispatch.Dispatcher`,
handed all of these.  Each accepted connection becomes a
:class:`~utesla_node.transport.Session` whose requests go to the dispatcher.  No part
imports this module or holds the node.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import signal
import time

from protocol import Settings
from protocol.errors import RemoteProtocolError, Status

from . import auth, status as status_file
from .builtins import Builtins
from .config import NodeConfig
from .dispatch import Dispatcher
from .gate import Gate
from .keys import ensure_node_keys
from .loopwatch import LoopWatch
from .metrics import Metrics
from .revocation import RevocationWatcher
from .services import NodeView, ServiceRegistry, frame_service
from .storage import open_storage, redact_url
from .transport import Session
from .version import __version__
from .workers import Workers

__all__ = ["Node"]

log = logging.getLogger("utesla.node")


class Node:
    """A running utesla node (see module docstring)."""

    def __init__(self, config: NodeConfig):
        self.config = config
        self.key = None
        self.storage = None
        self.authority: auth.Authority | None = None
        self.gate: Gate | None = None
        self.registry = ServiceRegistry.empty()
        self.builtins: Builtins | None = None
        self.dispatcher: Dispatcher | None = None
        self.metrics = Metrics(max_remote=config.metrics_max_remote_services)
        self.network = None
        self.router = None
        self.sessions: set[Session] = set()
        self._per_ip: collections.Counter[str] = collections.Counter()
        self._server: asyncio.base_events.Server | None = None
        self.stopping = False
        self.started_at = time.time()
        self.address: tuple[str, int] | None = None
        self._stopped = asyncio.Event()
        self._status_task: asyncio.Task | None = None
        self.metrics_server = None
        #: Handlers' thread and process pools (``self.run_in_thread`` / ``run_in_process``).
        self.workers = Workers(config.worker_threads, config.worker_processes)
        #: The event loop's watchdog (None when ``loop_block_threshold`` is 0).
        self.loopwatch: LoopWatch | None = None
        self.revocations: RevocationWatcher | None = None

    @property
    def inflight(self) -> int:
        return self.dispatcher.inflight if self.dispatcher is not None else 0

    # -------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
        for line in cfg.warnings:
            log.warning("%s", line)
        self.key, created = await loop.run_in_executor(
            None, ensure_node_keys, cfg.keys_dir, cfg.key_type, cfg.rsa_key_length)
        if created:
            log.info("created node key pair in %s", cfg.keys_dir)
        self.storage = open_storage(cfg.database_url or None, cfg.data_dir,
                                    **({"pool_size": cfg.database_pool_size}
                                       if cfg.database_url.startswith(("mysql", "mariadb"))
                                       and "pool_size=" not in cfg.database_url else {}))
        await self.storage.open()
        log.info("database: %s", redact_url(cfg.database_url) or f"sqlite {cfg.data_dir}")
        self.authority = auth.Authority.from_config(self.storage, cfg)
        self.gate = Gate(self.storage, self.authority, self.metrics,
                         cache_ttl=cfg.token_cache_ttl, outage_grace=cfg.token_outage_grace)
        self.registry = await loop.run_in_executor(None, ServiceRegistry.load, cfg.services_dir)
        self.settings = Settings(max_record=cfg.max_record, window=cfg.stream_window,
                                 max_streams=cfg.max_streams,
                                 handshake_timeout=cfg.handshake_timeout)
        self._wire()
        self.metrics.set_known(local=self.registry.names(), remote=self.network.engine.best)
        self._server = await loop.create_server(self._new_session, cfg.host, cfg.port,
                                                backlog=1024)
        sock = self._server.sockets[0]
        self.address = sock.getsockname()[:2]
        self.started_at = time.time()
        await self.network.start()
        if cfg.metrics_listen:
            from .metrics_http import MetricsServer, health_check
            self.metrics_server = MetricsServer(
                cfg.metrics_listen, render=self.prometheus,
                health=health_check(lambda: not self.stopping and self._server.is_serving(),
                                    lambda: self.storage.ping()))
            await self.metrics_server.start()
        if cfg.loop_block_threshold > 0:
            self.loopwatch = LoopWatch(
                cfg.loop_block_threshold, identify=frame_service,
                observe=lambda lag: self.metrics.observe("loop_lag", lag),
                on_block=lambda lag, service: self.metrics.incr("loop_blocked"))
            self.loopwatch.start()
        self._status_task = loop.create_task(self._write_status_loop(), name="status file")
        self.revocations.start()

    def _wire(self) -> None:
        """Build the parts and hand each its collaborators."""
        from .network import Network
        from .network.router import Router
        cfg = self.config
        self.network = Network(cfg, self.key, self.settings, self.storage, self.metrics,
                               local_services=lambda: self.registry.names())
        self.builtins = Builtins(self.gate, self.authority, self.metrics,
                                 local_services=lambda: self.registry.names(),
                                 status=self.status_snapshot, prometheus=self.prometheus,
                                 network=self.network)
        self.dispatcher = Dispatcher(
            gate=self.gate, builtins=self.builtins, registry=lambda: self.registry,
            metrics=self.metrics, node_id=self.network.id, config=cfg,
            service_view=NodeView(cfg, self.key, self.workers))
        self.router = Router(self.network, self.dispatcher.finished, cfg.max_hops)
        self.dispatcher.router = self.router
        self.revocations = RevocationWatcher(
            self.storage, lambda: self.sessions, forget_user=self.gate.forget_user,
            interval=cfg.credential_check_interval, metrics=self.metrics)

    async def prometheus(self) -> str:
        """The metrics page: counters, gauges, per-link figures, live traffic."""
        live = {"bytes_in": sum(x.bytes_in for x in self.sessions),
                "bytes_out": sum(x.bytes_out for x in self.sessions)}
        labelled = []
        if self.network is not None:
            for link in self.network.links.values():
                lab = {"peer": link.peer.url}
                labelled.append(("link_up", "gauge", lab, int(link.up)))
                labelled.append(("link_rtt_seconds", "gauge", lab,
                                 link.rtt if link.rtt is not None else "NaN"))
                labelled.append(("link_forwarded_requests", "counter", lab, link.forwarded))
                labelled.append(("link_inflight", "gauge", lab, link.inflight))
        return await self.metrics.prometheus(self.gauges(), live, labelled)

    def gauges(self) -> dict:
        """Current values for the metrics endpoint."""
        net = self.network
        return {"connections": len(self.sessions), "requests_in_flight": self.inflight,
                "links_up": sum(1 for l in net.links.values() if l.up) if net else 0,
                "links": len(net.links) if net else 0,
                "routes": sum(len(c) for c in net.engine.best.values()) if net else 0,
                "uptime_seconds": round(time.time() - self.started_at, 3),
                **self.workers.stats()}

    def status_snapshot(self) -> dict:
        """What ``/_node/status`` answers and ``data/status.json`` holds (no secrets)."""
        return {
            "version": __version__,
            "fingerprint": self.key.public.fingerprint(),
            "address": list(self.address) if self.address else None,
            "uptime": round(time.time() - self.started_at, 3),
            "connections": len(self.sessions),
            "inflight": self.inflight,
            "counters": self.metrics.snapshot(),
            "services": self.registry.names(),
            "network": self.network.status() if self.network is not None else {},
        }

    async def _write_status_loop(self) -> None:
        """``data/status.json`` every second: what ``utesla-cli status`` and
        ``show_networks``/``show_services`` print on this machine (no secrets)."""
        loop = asyncio.get_running_loop()
        data_dir = self.config.data_dir
        while True:
            try:
                # Encoded here (the snapshot shares live state); written off the loop.
                payload = status_file.encode_status(self.status_snapshot())
                await loop.run_in_executor(None, status_file.write_status, data_dir, payload)
            except OSError as exc:  # pragma: no cover
                log.debug("cannot write the status file in %s: %s", data_dir, exc)
            await asyncio.sleep(1.0)

    def install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, lambda s=sig: loop.create_task(self.stop(s.name)))
        loop.add_signal_handler(
            signal.SIGHUP, lambda: loop.create_task(self.reload_services_async()))

    async def reload_services_async(self) -> None:
        """SIGHUP: import the services off the event loop, then swap them in."""
        try:
            registry = await asyncio.get_running_loop().run_in_executor(
                None, ServiceRegistry.load, self.config.services_dir)
        except Exception:  # pragma: no cover - load() already isolates each file
            log.exception("service reload failed; keeping the current services")
            return
        self._install_registry(registry)

    def reload_services(self) -> None:
        """Load ``complements/`` again and swap it in whole; running requests keep theirs."""
        self._install_registry(ServiceRegistry.load(self.config.services_dir))

    def _install_registry(self, registry: ServiceRegistry) -> None:
        self.registry = registry
        self.metrics.set_known(local=registry.names())
        log.info("services reloaded: %s", ", ".join(registry.names()) or "none")
        if self.network is not None:
            self.network.local_services_changed()

    async def serve_forever(self) -> None:
        await self._stopped.wait()

    async def stop(self, why: str = "stop") -> None:
        """Stop accepting, let requests finish within the grace period, then close."""
        if self.stopping:
            return
        self.stopping = True
        if self.dispatcher is not None:
            self.dispatcher.stopping = True
        log.info("stopping (%s): %d connection(s), %d request(s) in flight", why,
                 len(self.sessions), self.inflight)
        if self._server is not None:
            self._server.close()
        if self._status_task is not None:
            self._status_task.cancel()
        if self.revocations is not None:
            await self.revocations.stop()
        if self.metrics_server is not None:
            await self.metrics_server.stop()
        if self.network is not None:
            self.network.quiesce()
        for s in list(self.sessions):
            s.goaway("shutting down")
        deadline = time.monotonic() + self.config.grace_period
        # Requests in flight, forwarded ones included (the links stay up meanwhile), get
        # the grace period.  Tasks that begin during it (a forward's answer streaming)
        # are seen by the router's count.
        pending = {t for s in self.sessions for t in s.tasks}
        forwards = None
        if self.router is not None and self.router.live:
            forwards = asyncio.get_running_loop().create_task(self.router.wait_idle())
            pending.add(forwards)
        while pending:
            _, pending = await asyncio.wait(pending,
                                            timeout=max(0.0, deadline - time.monotonic()))
            pending |= {t for s in self.sessions for t in s.tasks}
            if time.monotonic() >= deadline:
                break
        if forwards is not None:
            forwards.cancel()
        for s in list(self.sessions):
            # A session whose streams all finished in the grace period ends cleanly
            # (CLOSE 200, SPEC.md §7.8); one whose requests are cut ends with 503.
            cut = bool(s.tasks or s.open_streams)
            for t in list(s.tasks):
                t.cancel()
            s.close(Status.UNAVAILABLE if cut else Status.OK, "node shutting down")
        # Handlers are cancelled: work not started is dropped, worker processes ended.
        self.workers.close()
        if self.network is not None:
            await self.network.stop()
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            except (asyncio.TimeoutError, Exception):
                pass
        if self.storage is not None:
            await self.storage.close()
        status_file.remove_status(self.config.data_dir)
        if self.loopwatch is not None:
            self.loopwatch.stop()
        self._stopped.set()
        log.info("stopped")

    # -------------------------------------------------------------- connections

    def _new_session(self) -> Session:
        """The protocol factory of the listener: one session per accepted connection."""
        cfg = self.config
        session = Session.accept(identity=self.key, settings=self.settings,
                                 on_request=self.dispatcher.serve, key_lookup=self.gate.user_key,
                                 high_water=cfg.write_high_water, idle_timeout=cfg.idle_timeout)
        session.on_request_now = self.dispatcher.accept
        session.admit = self._admit
        return session

    def _admit(self, session: Session) -> bool:
        """Admission (when the connection is made): the connection caps, then the books."""
        ip = session.peer_address or "?"
        cfg = self.config
        if (self.stopping or len(self.sessions) >= cfg.max_connections
                or self._per_ip[ip] >= cfg.max_connections_per_ip):
            self.metrics.incr("connections_refused")
            log.warning("refusing connection from %s: connection limit reached", ip)
            return False
        self.sessions.add(session)
        self._per_ip[ip] += 1
        self.metrics.incr("connections_accepted")
        t0 = time.monotonic()

        def established(_session) -> None:
            self.metrics.incr("handshakes_ok")
            self.metrics.observe("handshake", time.monotonic() - t0)

        session.on_established = established
        # Counted until the socket is gone, not only the session: a closing connection
        # may still hold its send buffer for CLOSE_LINGER seconds.
        session.lost.add_done_callback(lambda _f: self._session_ended(session, ip))
        return True

    def _session_ended(self, session: Session, ip: str) -> None:
        self.sessions.discard(session)
        self._per_ip[ip] -= 1
        if self._per_ip[ip] <= 0:
            del self._per_ip[ip]
        if session.peer_user is None:
            self.metrics.incr("handshakes_failed")
        if isinstance(session.close_reason, RemoteProtocolError) and \
                session.peer_user is not None:
            self.metrics.incr("rejected_frames")     # bad record, MAC, framing...
        self.metrics.incr("bytes_in", session.bytes_in)
        self.metrics.incr("bytes_out", session.bytes_out)
