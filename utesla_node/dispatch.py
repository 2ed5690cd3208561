"""Request dispatch: path -> built-in, local handler or network route.

This is the one place errors become responses: a :class:`StatusError` becomes
its status and message; any other exception becomes 500 with an opaque error
id for the client and the full traceback, under that id, in the node's log.
"""
from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from typing import TYPE_CHECKING

from protocol.errors import (GatewayTimeout, LocalProtocolError, BadRequest, Cancelled, MethodNotAllowed, NotFound, RequestTimeout,
                             Status, StatusError, Unavailable)

from .services import METHODS, RequestBody, split_path
from .transport import ConnectionLost, Session, Stream

if TYPE_CHECKING:  # pragma: no cover
    from .server import Node

__all__ = ["Dispatcher", "ResponseWriter", "BUILTIN_PREFIX", "request_timeout"]

log = logging.getLogger("utesla.request")
#: Built-in services live under this prefix; user services cannot start with '_'.
BUILTIN_PREFIX = "/_node/"
_FIRST_WRITE_DEFER = 16384
#: Streams that stay open by design (gossip subscriptions): no request deadline.
LONG_LIVED = frozenset({"/_node/net/routes"})


def request_timeout(config, envelope: dict | None) -> float:
    """Seconds a request may take here: ``request_timeout``, or less when it came
    forwarded with the entry node's time left (``ttl`` in its envelope, SPEC.md §6.7)."""
    timeout = config.request_timeout
    ttl = envelope.get("ttl") if envelope else None
    if isinstance(ttl, (int, float)) and not isinstance(ttl, bool):
        timeout = max(0.001, min(timeout, ttl))
    return timeout


class ResponseWriter:
    """Turns a handler's ``write()`` calls into RESPONSE + DATA messages.

    The first small write is held until the end of the event-loop turn, so a
    handler that writes once and returns answers in a single message, while a
    handler that keeps writing still streams without delay.
    """

    __slots__ = ("session", "stream", "status", "headers", "started", "finished", "_stash",
                 "_kick", "sent", "args", "user", "path", "subpath", "method", "node",
                 "_body", "forwarded")

    def __init__(self, session: Session, stream: Stream):
        self.session = session
        self.stream = stream
        self.status = Status.OK
        self.headers: dict = {}
        self.started = False
        self.finished = False
        self._stash: bytes | None = None
        self._kick: asyncio.Handle | None = None
        self.sent = 0
        self._body = None
        self.forwarded = False          # set when another node is answering (§9.4)

    # What a handler sees (services.Handler reads these through its ``_ctx``).
    @property
    def request_headers(self) -> dict:
        return self.stream.request.headers

    @property
    def body(self) -> RequestBody:
        if self._body is None:
            self._body = RequestBody(self.stream, self.node.config.max_body)
        return self._body

    def set_status(self, status: int) -> None:
        if self.started:
            raise RuntimeError("set_status() after the response started")
        if not 100 <= status <= 999:
            raise ValueError("status must be 100..999")
        self.status = status

    def set_header(self, name: str, value) -> None:
        if self.started:
            raise RuntimeError("set_header() after the response started")
        self.headers[str(name).lower()[:64]] = value

    def _send_stash(self) -> None:
        if self._kick is not None:
            self._kick.cancel()
            self._kick = None
        if self._stash is not None and not self.started:
            body, self._stash = self._stash, None
            self.started = True
            try:
                self.session.conn.send_response(self.stream.id, self.status,
                                                headers=self.headers, body=body, end=False)
            except LocalProtocolError:
                return          # the client went away; the handler's next write learns it
            self.session.schedule_flush()

    async def write(self, data) -> None:
        """Send ``data``: bytes as they are, str as UTF-8, a dict or list as JSON."""
        if self.finished:
            raise RuntimeError("write() after the response finished")
        if not isinstance(data, bytes):
            data = self._encode(data)
        if not data:
            return
        self.sent += len(data)
        if self.session.writer.transport.get_write_buffer_size() > self.session.high_water:
            await self.session.drain_if_needed()   # back-pressure for first writes too
        if not self.started and self._stash is None and len(data) <= _FIRST_WRITE_DEFER:
            self._stash = data
            self._kick = self.session.loop.call_soon(self._send_stash)
            return
        self._send_stash()
        if not self.started:
            self.started = True
            await self.session.respond(self.stream, self.status, self.headers, data, end=False)
        else:
            await self.stream.send_body(data)

    def _encode(self, data) -> bytes:
        if isinstance(data, str):
            return data.encode()
        if isinstance(data, (dict, list)):
            if not self.started and self._stash is None:
                self.headers.setdefault("content-type", "application/json")
            return json.dumps(data).encode()
        if isinstance(data, (bytearray, memoryview)):
            return bytes(data)
        raise TypeError("write() takes str, bytes or a dict/list (sent as JSON)")

    async def flush(self) -> None:
        self._send_stash()
        self.session.flush()

    async def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        if self._kick is not None:
            self._kick.cancel()
            self._kick = None
        if not self.started:
            self.started = True
            body, self._stash = self._stash or b"", None
            await self.session.respond(self.stream, self.status, self.headers, body, end=True)
        else:
            await self.stream.end()

    async def fail(self, exc: StatusError) -> None:
        """Report ``exc``: as the response if none started, else by resetting the stream."""
        self.finished = True
        if self._kick is not None:
            self._kick.cancel()
            self._kick = None
        if not self.session.conn.is_open(self.stream.id):
            return
        if not self.started:
            self.started = True
            self._stash = None
            body = str(exc).encode()
            self.sent += len(body)
            await self.session.respond(self.stream, exc.status, {}, body, end=True)
        else:
            self.stream.reset(exc.status, str(exc))


class Dispatcher:
    """Serves one request stream from start to finish (see module docstring)."""

    def __init__(self, node: "Node"):
        self.node = node

    async def __call__(self, session: Session, stream: Stream, serve=None,
                       timeout: float | None = None) -> None:
        """Serve ``stream``: by path (``_serve``), or by ``serve(session, stream, writer)``
        when given (a relayed request taken over midway); ``timeout`` overrides the
        request deadline."""
        node = self.node
        req = stream.request
        t0 = time.monotonic()
        writer = ResponseWriter(session, stream)
        task = asyncio.current_task()
        timed_out = False

        def on_deadline() -> None:
            nonlocal timed_out
            timed_out = True
            task.cancel()

        if timeout is None:
            timeout = request_timeout(node.config, req.envelope)
        deadline = None
        if req.path not in LONG_LIVED:
            deadline = session.loop.call_later(timeout, on_deadline)
            stream.deadline = time.monotonic() + timeout
        long_lived = req.path in LONG_LIVED
        if not long_lived:
            node.inflight += 1
        error_id = None
        try:
            try:
                await (serve or self._serve)(session, stream, writer)
                await writer.finish()
            except asyncio.CancelledError:
                if not timed_out:
                    if node.stopping:
                        raise StatusError("the node is shutting down", Status.UNAVAILABLE)
                    raise
                if writer.forwarded:
                    raise GatewayTimeout(f"the node serving {req.path} did not answer within "
                                         f"{timeout:g} s") from None
                raise RequestTimeout(f"request took longer than {timeout:g} s") from None
        except ConnectionLost:              # the client went away: nobody to answer
            writer.status = Status.CANCELLED
        except StatusError as exc:
            writer.status = exc.status
            await self._report(writer, exc)
        except asyncio.CancelledError:
            writer.status = Status.CANCELLED
            raise
        except Exception:
            error_id = secrets.token_hex(6)
            log.exception("error %s in %s %s (user %s)", error_id, req.method, req.path,
                          session.peer_user)
            writer.status = Status.INTERNAL
            await self._report(writer, StatusError(f"internal error (id {error_id})",
                                                   Status.INTERNAL))
        finally:
            if deadline is not None:
                deadline.cancel()
            if not long_lived:
                node.inflight -= 1
            node.metrics.request(req.path, writer.status, time.monotonic() - t0,
                                 writer.forwarded)
            if log.isEnabledFor(logging.INFO):
                log.info("%s %s %s -> %d %dB %.1fms", session.peer_user, req.method, req.path,
                         writer.status, writer.sent, (time.monotonic() - t0) * 1000)

    async def _report(self, writer: ResponseWriter, exc: StatusError) -> None:
        try:
            await writer.fail(exc)
        except (ConnectionLost, StatusError):
            pass

    async def _serve(self, session: Session, stream: Stream, writer: ResponseWriter) -> None:
        node = self.node
        req = stream.request
        if req.path.startswith(BUILTIN_PREFIX):
            await node.builtins.serve(session, stream, writer)
            return
        parts = split_path(req.path)
        user = await node.authorize(session, req.token, "/".join(parts))
        if req.envelope is not None and node.network is not None:
            node.network.check_envelope(req.envelope)   # §6.7: 400 malformed, 508 looped
        resolved = node.registry.resolve(parts)
        if resolved is None:
            if node.network is not None:
                await node.network.forward(session, stream, writer, parts, user)
                return
            raise NotFound(f"no service {req.path}")
        service, rest = resolved
        method = req.method.lower()
        if method not in METHODS or not callable(getattr(service.handler, method, None)):
            raise MethodNotAllowed(f"{req.method} not allowed on {service.path}")
        writer.args = req.args or {}
        writer.user = user.name
        writer.path = req.path
        writer.subpath = rest
        writer.method = req.method
        writer.node = node
        cls = service.handler
        handler = cls.__new__(cls)
        handler._ctx = writer           # everything the handler API reads (services.Handler)
        handler.__init__()
        await getattr(handler, method)()
