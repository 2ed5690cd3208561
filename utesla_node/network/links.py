"""Long-lived authenticated links to peer nodes (SPEC.md §9.1).

A :class:`Link` connects to one peer with the node's own key, as the account
that peer's admin created for us, pinning the peer's key.  Over the link it
keeps one gossip subscription open (``GET /_node/net/routes``: a streamed
response of length-prefixed gossip messages), pings it every heartbeat, and
carries forwarded requests.  When the link breaks its routes are withdrawn and
it reconnects with exponential backoff and jitter.

A link may go through a SOCKS5 proxy (:mod:`utesla_node.proxy`): the peer's own
(``add_network --proxy``), else the node's ``[network] proxy``.  A proxy that is down
or refuses us is a failed connection like any other: its reason in ``last_error`` and
the log, then the backoff.
"""
from __future__ import annotations

import asyncio
import json
import logging
import random
import struct
import time

from protocol.crypto import PublicKey
from protocol.errors import AuthenticationFailed, ProtocolError, Status, StatusError

from ..client import parse_url
from ..proxy import ProxyError, choose
from ..storage import Peer
from ..transport import ConnectionLost, Session, connect
from .gossip import GossipError, decode_message

__all__ = ["Link", "LEN", "cancel_and_wait"]

log = logging.getLogger("utesla.link")
LEN = struct.Struct(">I")
BACKOFF_MIN = 0.1
BACKOFF_MAX = 30.0


async def cancel_and_wait(task: asyncio.Task) -> BaseException | None:
    """Cancel ``task`` until it has ended; returns the exception it ended with, if any.

    One ``cancel()`` is not always enough: on Python < 3.12 ``asyncio.wait_for()``
    swallows a cancellation that lands as its inner future completes (a refused connect,
    a kicked event), and a loop around it would go on forever.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=0.5)
    return None if task.cancelled() else task.exception()


class Link:
    """One upstream peer: connection, gossip subscription, heartbeat, reconnects."""

    def __init__(self, network, peer: Peer):
        # ``network``: the Network this link belongs to (its config, key, settings,
        # metrics, engine and kick()); not imported here, the package imports us.
        self.network = network
        self.peer = peer
        self.peer_key = PublicKey.from_bytes(peer.public_key)
        self.peer_id = self.peer_key.fingerprint()
        self.host, self.port, _ = parse_url(peer.url)
        #: The SOCKS5 proxy this link goes through (None: direct).
        self.proxy = choose(peer.proxy, network.config.proxy)
        self.state = "connecting"
        self.session: Session | None = None
        self.rtt: float | None = None
        self.since: float | None = None
        self.last_error = ""
        #: The peer closed the link because it revoked our account there (its CLOSE 401
        #: reason): kept in ``last_error`` while reconnecting is refused, until the link is up.
        self.revoked = ""
        self.failures = 0
        self.synced = False        # the peer's first table arrived on this subscription
        self.token_expires_at: float | None = None    # as the peer said when we renewed
        self.renew_error = ""
        self.inflight = 0
        self.forwarded = 0
        self.added_at = time.monotonic()
        self._task: asyncio.Task | None = None
        self._resubscribe = asyncio.Event()

    @property
    def up(self) -> bool:
        return self.state == "up" and self.session is not None and self.session.is_open \
            and not self.session.going_away

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run(), name=f"link {self.peer.url}")

    async def stop(self) -> None:
        if self._task is not None:
            exc = await cancel_and_wait(self._task)
            if exc is not None:
                log.error("link to %s had stopped on an unexpected error: %r", self.peer.url,
                          exc)
        if self.session is not None:
            self.session.close(Status.OK, "link removed")
        self.state = "stopped"

    def resubscribe(self) -> None:
        self._resubscribe.set()

    async def _run(self) -> None:
        backoff = BACKOFF_MIN
        engine = self.network.engine
        while True:
            connected = False
            try:
                await self._connect()
                connected = True
                backoff = BACKOFF_MIN
                self.failures = 0
                await self._serve()
            except asyncio.CancelledError:
                raise
            except (StatusError, ProtocolError, OSError, GossipError, asyncio.TimeoutError) as exc:
                self.last_error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                closed = self.session.peer_close if connected else None
                if closed is not None and closed[0] == Status.UNAUTHORIZED:
                    self.revoked = closed[1] or "unauthorized"
                    self.last_error = f"the peer closed the link: {self.revoked}"
                elif self.revoked and isinstance(exc, AuthenticationFailed):
                    self.last_error = (f"AuthenticationFailed: {exc} (the peer closed the "
                                       f"link earlier: {self.revoked})")
                self.failures += 1
                level = logging.WARNING if self.failures <= 3 or self.failures % 50 == 0 \
                    else logging.DEBUG
                log.log(level, "link to %s (%s): %s", self.peer.url, self.peer_id[:20],
                        self.last_error)
            finally:
                if self.state == "up":
                    log.info("link to %s is down", self.peer.url)
                engine.link_down(self.peer_id, time.monotonic())
                self.network.kick()
                if self.session is not None:
                    self.session.close(Status.UNAVAILABLE, "link reset")
                self.state = "backoff"
                self.synced = False
                self.since = None
            delay = backoff * random.uniform(0.5, 1.5)
            backoff = min(backoff * 2, BACKOFF_MAX)
            await asyncio.sleep(delay)

    async def _connect(self) -> None:
        net = self.network
        cfg = net.config
        self.state = "connecting"
        try:
            session = await asyncio.wait_for(
                connect(self.host, self.port, identity=net.key, user=self.peer.user,
                        server_key=self.peer_key, settings=net.settings,
                        high_water=cfg.write_high_water, name=f"link {self.peer.url}",
                        proxy=self.proxy, proxy_timeout=cfg.handshake_timeout),
                cfg.handshake_timeout)
        except asyncio.TimeoutError:    # (before OSError: on 3.11+ it is one)
            via = f" through the proxy {self.proxy}" if self.proxy is not None else ""
            raise ConnectionLost(f"cannot connect{via}: no connection within "
                                 f"{cfg.handshake_timeout:g} s") from None
        except ProxyError as exc:
            raise ConnectionLost(str(exc)) from None
        except OSError as exc:
            raise ConnectionLost(f"cannot connect: {exc.strerror or exc}") from None
        self.session = session
        await session.wait_ready(cfg.handshake_timeout)

    async def _serve(self) -> None:
        """Keep the subscription open and the heartbeat going until the link fails."""
        loop = asyncio.get_running_loop()
        heartbeat = loop.create_task(self._heartbeat())
        renewer = loop.create_task(self._renew_token())
        try:
            while True:
                self._resubscribe.clear()
                await self._subscription()
        finally:
            heartbeat.cancel()
            renewer.cancel()

    async def _renew_token(self) -> None:
        """Keep our token at the peer alive while the link is up: renew it now, then at
        half its remaining life (at most ``token_renew_interval`` apart).  Without this a
        link would die when the token the admin gave ``add_network`` expires."""
        cfg = self.network.config
        while True:
            delay = min(cfg.token_renew_interval, 60.0)
            try:
                stream = self.session.open_stream("POST", "/_node/token/renew",
                                                  token=self.peer.token)
                status, _ = await asyncio.wait_for(stream.head, cfg.handshake_timeout)
                body = await asyncio.wait_for(stream.read_all(4096), cfg.handshake_timeout)
                if status != Status.OK:
                    raise StatusError(body.decode("utf-8", "replace")[:200], status)
                expires_at = float(json.loads(body)["expires_at"])
                self.token_expires_at = expires_at
                if self.renew_error:
                    log.info("link to %s: token renewed again", self.peer.url)
                self.renew_error = ""
                left = expires_at - time.time()
                delay = max(1.0, min(cfg.token_renew_interval, left / 2))
            except asyncio.CancelledError:
                raise
            except (StatusError, ProtocolError, ConnectionLost, asyncio.TimeoutError,
                    ValueError, KeyError, TypeError) as exc:
                why = f"{type(exc).__name__}: {exc}"
                if why != self.renew_error:
                    log.warning("link to %s: cannot renew our token there: %s", self.peer.url,
                                why)
                self.renew_error = why
            await asyncio.sleep(delay)

    async def _subscription(self) -> None:
        cfg = self.network.config
        engine = self.network.engine
        # A new subscription starts with a fresh snapshot: a mismatch seen on the old one is
        # settled by it.  Left set, it would end this subscription after its first chunk
        # whenever the snapshot spans several chunks (a resubscribe loop on large tables).
        engine.resync.discard(self.peer_id)
        # Our cap goes with the request: the peer sends at most that many routes (SPEC.md §9.3).
        stream = self.session.open_stream("GET", "/_node/net/routes", token=self.peer.token,
                                          args={"max_routes": engine.max_routes})
        status, _ = await asyncio.wait_for(stream.head, cfg.handshake_timeout)
        if status != Status.OK:
            text = (await stream.read_all(4096)).decode("utf-8", "replace")
            raise StatusError(f"peer refused the gossip subscription: {status} {text}", status)
        engine.link_up(self.peer_id, time.monotonic())
        self.synced = False
        if self.state != "up":
            log.info("link to %s is up (%s)", self.peer.url, self.peer_id[:20])
        self.state = "up"
        self.revoked = ""
        self.since = time.time()
        buf = bytearray()
        max_routes = engine.max_routes
        wait_resub = read = None
        try:
            while True:
                # Out of step with the peer (digest mismatch, a message dropped, routes
                # expired): re-subscribe once the engine's backoff allows, reading on
                # meanwhile (routes keep arriving, and silence would expire them).
                wait = None
                if self.peer_id in engine.resync:
                    wait = engine.resync_wait(self.peer_id, time.monotonic())
                    if wait <= 0:
                        log.info("gossip out of step with %s: resubscribing", self.peer.url)
                        engine.resubscribing(self.peer_id, time.monotonic())
                        stream.reset(Status.CANCELLED, "resubscribing")
                        return
                if read is None:
                    read = asyncio.ensure_future(stream.read_chunk())
                if wait_resub is None:
                    wait_resub = asyncio.ensure_future(self._resubscribe.wait())
                done, _ = await asyncio.wait({read, wait_resub}, timeout=wait,
                                             return_when=asyncio.FIRST_COMPLETED)
                if wait_resub in done:            # the pump asks: look at engine.resync again
                    self._resubscribe.clear()
                    wait_resub = None
                if read not in done:
                    continue
                chunk = read.result()
                read = None
                if not chunk:
                    raise ConnectionLost("peer ended the gossip subscription")
                buf += chunk
                while len(buf) >= 4:
                    (n,) = LEN.unpack_from(buf)
                    if n > (4 << 20):
                        raise GossipError("gossip message over 4 MiB")
                    if len(buf) < 4 + n:
                        break
                    data = bytes(buf[4:4 + n])
                    del buf[:4 + n]
                    try:
                        msg = decode_message(data, max_routes)
                    except GossipError as exc:
                        self.network.metrics.incr("gossip_rejected")
                        log.warning("dropped a gossip message from %s: %s", self.peer.url, exc)
                        engine.heard[self.peer_id] = time.monotonic()
                        engine.resync.add(self.peer_id)
                        continue
                    engine.receive(self.peer_id, msg, time.monotonic())
                    self.synced = True
                    self.network.kick()
        finally:
            for fut in (wait_resub, read):
                # Cancelled while waiting (link stopped): else the read fails when the
                # session closes and asyncio logs "Task exception was never retrieved".
                if fut is not None and not fut.done():
                    fut.cancel()

    async def _heartbeat(self) -> None:
        interval = self.network.config.heartbeat_interval
        while True:
            await asyncio.sleep(interval)
            try:
                self.rtt = await self.session.ping(timeout=max(1.0, 2 * interval))
            except (asyncio.TimeoutError, ConnectionLost, StatusError, ProtocolError):
                log.warning("link to %s: heartbeat lost, closing", self.peer.url)
                self.session.close(Status.TIMEOUT, "heartbeat timeout")
                return

    def describe(self) -> dict:
        return {"url": self.peer.url, "user": self.peer.user, "node": self.peer_id,
                "proxy": str(self.proxy) if self.proxy is not None else "",
                "priority": self.peer.priority, "added": self.peer.created_at,
                "state": self.state, "synced": self.synced,
                "since": self.since, "rtt_ms": round(self.rtt * 1000, 3) if self.rtt else None,
                "last_error": self.last_error, "inflight": self.inflight,
                "token_expires_at": self.token_expires_at, "renew_error": self.renew_error,
                "forwarded": self.forwarded,
                "routes": len(self.network.engine.learned.get(self.peer_id, {}))}
