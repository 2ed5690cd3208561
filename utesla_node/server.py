"""The node: start, serve, reload, drain, stop.

``Node`` owns the listening socket, the storage, the service registry, the
token authority and (when it has peers) the network.  Each accepted
connection becomes a :class:`~utesla_node.transport.Session` whose requests go
to the :class:`~utesla_node.dispatch.Dispatcher`.
"""
from __future__ import annotations

import asyncio
import collections
import json
import logging
import os
import signal
import time
from pathlib import Path

from protocol import Connection, Role, Settings
from protocol.crypto import KeyFormatError, PublicKey
from protocol.errors import (BadRequest, Forbidden, MethodNotAllowed, NotFound, RemoteProtocolError,
                             Status,
                             StatusError, TooLarge, Unauthorized, Unavailable)

from . import __version__, auth
from .config import NodeConfig
from .dispatch import BUILTIN_PREFIX, Dispatcher, ResponseWriter
from .keys import ensure_node_keys, write_atomic
from .metrics import Metrics
from .services import ServiceRegistry
from .storage import StorageError, StorageUnavailable, TokenLimitReached, open_storage, redact_url
from .transport import Session, Stream

__all__ = ["Node"]

log = logging.getLogger("utesla.node")


class Node:
    """A running utesla node (see module docstring)."""

    def __init__(self, config: NodeConfig):
        self.config = config
        self.key = None
        self.storage = None
        self.authority: auth.Authority | None = None
        self.registry = ServiceRegistry.empty()
        self.dispatcher = Dispatcher(self)
        self.builtins = Builtins(self)
        self.metrics = Metrics()
        self.network = None
        self.sessions: set[Session] = set()
        self._per_ip: collections.Counter[str] = collections.Counter()
        self._server: asyncio.base_events.Server | None = None
        self._key_cache: dict[str, PublicKey] = {}
        self._user_keys: dict[str, tuple[float, PublicKey]] = {}
        self._token_cache: dict[tuple, tuple] = {}
        self.inflight = 0
        self.stopping = False
        self.started_at = time.time()
        self.address: tuple[str, int] | None = None
        self._stopped = asyncio.Event()
        self._status_task: asyncio.Task | None = None
        self.metrics_server = None

    # -------------------------------------------------------------- lifecycle

    async def start(self) -> None:
        cfg = self.config
        loop = asyncio.get_running_loop()
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
        self.authority = auth.Authority(self.storage, cfg.token_expire)
        self.registry = await loop.run_in_executor(None, ServiceRegistry.load, cfg.services_dir)
        self.settings = Settings(max_record=cfg.max_record, window=cfg.stream_window,
                                 max_streams=cfg.max_streams,
                                 handshake_timeout=cfg.handshake_timeout)
        self._server = await asyncio.start_server(
            self._on_connect, cfg.host, cfg.port, limit=1 << 16, backlog=1024)
        sock = self._server.sockets[0]
        self.address = sock.getsockname()[:2]
        self.started_at = time.time()
        from .network import Network
        self.network = Network(self)
        await self.network.start()
        if cfg.metrics_listen:
            from .metrics_http import MetricsServer
            self.metrics_server = MetricsServer(self, cfg.metrics_listen)
            await self.metrics_server.start()
        self._status_task = loop.create_task(self._write_status_loop(), name="status file")

    def prometheus(self) -> str:
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
        return self.metrics.prometheus(self.gauges(), live, labelled)

    def gauges(self) -> dict:
        """Current values for the metrics endpoint."""
        net = self.network
        return {"connections": len(self.sessions), "requests_in_flight": self.inflight,
                "links_up": sum(1 for l in net.links.values() if l.up) if net else 0,
                "links": len(net.links) if net else 0,
                "routes": sum(len(c) for c in net.engine.best.values()) if net else 0,
                "uptime_seconds": round(time.time() - self.started_at, 3)}

    async def _write_status_loop(self) -> None:
        """``data/status.json`` every second: what ``utesla-cli status`` and
        ``show_networks``/``show_services`` print on this machine (no secrets)."""
        path = self.config.data_dir / "status.json"
        while True:
            try:
                data = json.dumps({"updated": time.time(), "pid": os.getpid(),
                                   **self.builtins.node_status()})
                await asyncio.get_running_loop().run_in_executor(
                    None, lambda: write_atomic(path, data.encode(), 0o644, durable=False))
            except OSError as exc:  # pragma: no cover
                log.debug("cannot write %s: %s", path, exc)
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
        log.info("stopping (%s): %d connection(s), %d request(s) in flight", why,
                 len(self.sessions), self.inflight)
        if self._server is not None:
            self._server.close()
        if self._status_task is not None:
            self._status_task.cancel()
        if self.metrics_server is not None:
            await self.metrics_server.stop()
        if self.network is not None:
            self.network.quiesce()
        for s in list(self.sessions):
            s.goaway("shutting down")
        deadline = time.monotonic() + self.config.grace_period
        pending = [t for s in self.sessions for t in s.tasks]
        relays = None
        if self.network is not None and self.network.relays:
            relays = asyncio.get_running_loop().create_task(self.network.wait_relays())
            pending.append(relays)
        if pending:
            # The links stay up meanwhile: requests being forwarded finish too.
            await asyncio.wait(pending, timeout=max(0.0, deadline - time.monotonic()))
        if relays is not None:
            relays.cancel()
        for s in list(self.sessions):
            # A session whose streams all finished in the grace period ends cleanly
            # (CLOSE 200, SPEC.md §7.8); one whose requests are cut ends with 503.
            cut = bool(s.tasks or s.conn.open_streams)
            for t in list(s.tasks):
                t.cancel()
            s.close(Status.UNAVAILABLE if cut else Status.OK, "node shutting down")
        if self.network is not None:
            await self.network.stop()
        if self._server is not None:
            try:
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
            except (asyncio.TimeoutError, Exception):
                pass
        if self.storage is not None:
            await self.storage.close()
        try:
            (self.config.data_dir / "status.json").unlink()
        except OSError:
            pass
        self._stopped.set()
        log.info("stopped")

    # -------------------------------------------------------------- connections

    async def _on_connect(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        peer = writer.get_extra_info("peername")
        ip = peer[0] if peer else "?"
        cfg = self.config
        if (self.stopping or len(self.sessions) >= cfg.max_connections
                or self._per_ip[ip] >= cfg.max_connections_per_ip):
            self.metrics.incr("connections_refused")
            log.warning("refusing connection from %s: connection limit reached", ip)
            writer.close()
            return
        conn = Connection(Role.SERVER, identity=self.key, settings=self.settings)
        session = Session(reader, writer, conn, on_request=self.dispatcher,
                          key_lookup=self.lookup_user_key, high_water=cfg.write_high_water,
                          idle_timeout=cfg.idle_timeout, name=f"{ip}:{peer[1] if peer else 0}")
        if self.network is not None:
            session.on_request_now = self.network.relay_now
        self.sessions.add(session)
        self._per_ip[ip] += 1
        self.metrics.incr("connections_accepted")
        t0 = time.monotonic()

        def established(_session) -> None:
            self.metrics.incr("handshakes_ok")
            self.metrics.observe("handshake", time.monotonic() - t0)

        session.on_established = established
        try:
            await session.run()         # this task is the session's reader
        finally:
            self.sessions.discard(session)
            self._per_ip[ip] -= 1
            if self._per_ip[ip] <= 0:
                del self._per_ip[ip]
            if session.conn.peer_user is None:
                self.metrics.incr("handshakes_failed")
            if isinstance(session.close_reason, RemoteProtocolError) and \
                    session.conn.peer_user is not None:
                self.metrics.incr("rejected_frames")     # bad record, MAC, framing...
            self.metrics.incr("bytes_in", session.bytes_in)
            self.metrics.incr("bytes_out", session.bytes_out)
            try:
                await session.wait_closed()
            except Exception:  # pragma: no cover
                pass

    async def lookup_user_key(self, name: str) -> PublicKey | None:
        """The registered key of ``name`` (None when unknown); 503 when storage is down.

        Known users' keys are remembered for ``token_cache_ttl`` seconds (a key change
        or removal takes effect within that time, as for tokens), so a burst of
        connections does not queue behind the database; unknown names never are.
        """
        now = time.monotonic()
        hit = self._user_keys.get(name)
        if hit is not None and hit[0] > now:
            return hit[1]
        try:
            user = await self.storage.get_user(name)
        except StorageUnavailable as exc:
            log.warning("database unavailable during handshake: %s", exc)
            raise Unavailable("database unavailable") from exc
        if user is None:
            return None
        key = self._key_cache.get(user.public_key)
        if key is None:
            try:
                key = PublicKey.from_bytes(user.public_key)
            except KeyFormatError:
                log.error("user %r has an unusable public key in the database", name)
                return None
            if len(self._key_cache) > 4096:
                self._key_cache.clear()
            self._key_cache[user.public_key] = key
        if len(self._user_keys) > 4096:
            self._user_keys.clear()
        self._user_keys[name] = (now + self.config.token_cache_ttl, key)
        return key

    def forget_token(self, token: str | None) -> None:
        """Drop cached checks of ``token`` (after it was renewed or revoked here)."""
        for key in [k for k in self._token_cache if k[0] == token]:
            del self._token_cache[key]

    async def authorize(self, session: Session, token: str | None, service_path: str):
        """The user a request acts as; Unauthorized / Forbidden / Unavailable otherwise.

        The node remembers tokens it validated for ``token_cache_ttl`` seconds, so
        steady traffic (and a client reconnecting) costs no database round trip per
        request; revocation made elsewhere (utesla-cli, another node sharing the
        database) takes effect within that time, one made here at once.
        """
        cache = self._token_cache
        # The session's user is part of the key: a token is only ever valid on its
        # owner's sessions (§6.6), so sharing the cache across connections is safe.
        # What is cached is the token's record and user, never a decision: the scopes
        # are checked against each request's own path (a token for ``files/public``
        # must not open ``files/private`` because it was just used for the former).
        key = (token, session.peer_user)
        found = self._cached_token(key)
        if found is None:
            hit = cache.get(key)
            if hit is not None and hit[2] is not None:   # a check for this key is running
                found = await asyncio.shield(hit[2])
            else:   # not cached, stale, or expired while cached (renewed elsewhere?): ask
                found = await self._resolve_token(cache, key, token, session,
                                                  time.monotonic())
        record, user, unrestricted = found
        if not unrestricted:
            try:
                auth.Authority.allow(record, user, service_path)
            except auth.Forbidden as exc:
                raise Forbidden(str(exc)) from None
        return user

    def authorize_now(self, session: Session, token: str | None, service_path: str):
        """The user, when a fresh cached check of ``token`` allows ``service_path``; None
        when that takes a lookup or the answer is no (``authorize`` then says why)."""
        found = self._cached_token((token, session.peer_user))
        if found is None:
            return None
        record, user, unrestricted = found
        if not unrestricted:
            try:
                auth.Authority.allow(record, user, service_path)
            except auth.Forbidden:
                return None
        return user

    def _cached_token(self, key: tuple):
        """(record, user, unrestricted) of a fresh, finished cache entry whose token has
        not expired meanwhile; None otherwise."""
        hit = self._token_cache.get(key)
        if hit is None or hit[2] is not None or hit[0] <= time.monotonic():
            return None
        if hit[1][0].expires_at <= self.authority.clock():
            return None
        return hit[1]

    async def _resolve_token(self, cache: dict, key: tuple, token: str | None,
                             session: Session, now: float) -> tuple:
        # Single flight: concurrent requests with the same token wait for one lookup.
        pending = session.loop.create_future()
        if len(cache) >= 8192:
            cache.clear()
        cache[key] = (0.0, None, pending)
        try:
            found = await self.authority.resolve(token or "", session.peer_user or "")
        except BaseException as exc:
            if cache.get(key, (None, None, None))[2] is pending:
                del cache[key]
            if isinstance(exc, auth.Unauthorized):
                self.metrics.incr("auth_failures")
                err = Unauthorized(str(exc))
            elif isinstance(exc, StorageUnavailable):
                err = Unavailable("database unavailable")
            else:
                err = exc
            pending.set_exception(err)
            pending.exception()             # retrieved: waiters, if any, re-raise it
            if err is exc:
                raise
            raise err from None
        record, user = found
        found = (record, user, record.scopes == ("*",) and user.scopes == ("*",))
        if cache.get(key, (None, None, None))[2] is pending:
            # Unless forget_token() dropped the entry meanwhile (the token was revoked or
            # renewed here while we read it): then what we read must not outlive this request.
            cache[key] = (now + self.config.token_cache_ttl, found, None)
        pending.set_result(found)
        return found


class Builtins:
    """Built-in services under ``/_node/`` (SPEC.md and docs/services.md list them)."""

    def __init__(self, node: Node):
        self.node = node
        self.table = {
            "ping": (self.ping, False),
            "token": (self.token, False),
            "token/renew": (self.renew, False),
            "token/revoke": (self.revoke, False),
            "services": (self.services, True),
            "status": (self.status, True),
            "metrics": (self.metrics, True),
        }

    async def serve(self, session: Session, stream: Stream, writer: ResponseWriter) -> None:
        req = stream.request
        name = req.path[len(BUILTIN_PREFIX):].strip("/")
        entry = self.table.get(name)
        if entry is None:
            if self.node.network is not None and name.startswith("net/"):
                await self.node.network.builtin(session, stream, writer, name[4:])
                return
            raise NotFound(f"no built-in service {req.path}")
        fn, needs_token = entry
        user = None
        if needs_token:
            user = await self.node.authorize(session, req.token, "_node/" + name)
        await fn(session, stream, writer, user)

    @staticmethod
    def _args(stream: Stream) -> dict:
        return stream.request.args or {}

    async def ping(self, session, stream, writer, user) -> None:
        await writer.write(b"pong")

    async def token(self, session, stream, writer, user) -> None:
        """Issue a token: the session proves the key, the ``password`` argument the rest."""
        args = self._args(stream)
        password = args.get("password")
        if not isinstance(password, str):
            raise BadRequest("argument 'password' (string) is required")
        authority = self.node.authority
        try:
            await authority.check_password(session.peer_user, password)
            scopes = args.get("scopes")
            if scopes is not None and (not isinstance(scopes, list)
                                       or not all(isinstance(s, str) for s in scopes)):
                raise BadRequest("argument 'scopes' must be a list of service globs")
            expire = args.get("expire")
            if expire is not None and (not isinstance(expire, (int, float))
                                       or isinstance(expire, bool)):
                raise BadRequest("argument 'expire' must be a number of seconds")
            token, record = await authority.issue_token(session.peer_user, scopes, expire)
        except auth.Unauthorized:
            self.node.metrics.incr("auth_failures")
            raise Unauthorized("invalid user or password") from None
        except auth.Forbidden as exc:
            raise Forbidden(str(exc)) from None
        except TokenLimitReached:
            raise Forbidden("token limit reached: revoke a token or ask the admin for more") \
                from None
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        except StorageUnavailable as exc:
            raise Unavailable("database unavailable") from exc
        writer.set_header("expires-at", record.expires_at)
        await writer.write(token.encode())

    async def renew(self, session, stream, writer, user) -> None:
        try:
            record = await self.node.authority.renew(stream.request.token or "",
                                                     session.peer_user)
        except auth.Unauthorized:
            raise Unauthorized("invalid token") from None
        except StorageUnavailable as exc:
            raise Unavailable("database unavailable") from exc
        self.node.forget_token(stream.request.token)
        await writer.write({"expires_at": record.expires_at})

    async def revoke(self, session, stream, writer, user) -> None:
        target = self._args(stream).get("token") or stream.request.token or ""
        try:
            done = await self.node.authority.revoke(target, session.peer_user)
        except auth.Unauthorized:
            raise Unauthorized("invalid token") from None
        except StorageUnavailable as exc:
            raise Unavailable("database unavailable") from exc
        self.node.forget_token(target)
        await writer.write({"revoked": bool(done)})

    async def services(self, session, stream, writer, user) -> None:
        node = self.node
        local = [{"path": "/" + n, "origin": "local", "hops": 0} for n in node.registry.names()]
        remote = node.network.routes_summary() if node.network is not None else []
        await writer.write({"services": local + remote})

    async def status(self, session, stream, writer, user) -> None:
        await writer.write(self.node_status())

    def node_status(self) -> dict:
        node = self.node
        return {
            "version": __version__,
            "fingerprint": node.key.public.fingerprint(),
            "address": list(node.address) if node.address else None,
            "uptime": round(time.time() - node.started_at, 3),
            "connections": len(node.sessions),
            "inflight": node.inflight,
            "counters": node.metrics.snapshot(),
            "services": node.registry.names(),
            "network": node.network.status() if node.network is not None else {},
        }

    async def metrics(self, session, stream, writer, user) -> None:
        await writer.write(self.node.prometheus().encode())
