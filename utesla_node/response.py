"""Answering a request: the response writer, and the request context handlers see.

:class:`ResponseWriter` turns ``write()`` calls into a RESPONSE and DATA messages on
one stream, through the session's public methods only.  :class:`RequestContext` is
what a service handler reads (``self.args``, ``self.user``, ``self.body``...) and the
``write``/``set_status`` it calls; it holds a writer, it is not one.
"""
from __future__ import annotations

import asyncio
import json

from protocol.errors import Status, StatusError

from .services import RequestBody
from .transport import Session, Stream

__all__ = ["ResponseWriter", "RequestContext"]

#: A first write at most this large is held to the end of the loop turn, so a handler
#: that writes once and returns answers in a single message.
FIRST_WRITE_DEFER = 16384


class ResponseWriter:
    """Turns a handler's ``write()`` calls into RESPONSE + DATA messages.

    The first small write is held until the end of the event-loop turn, so a handler
    that writes once and returns answers in a single message, while a handler that
    keeps writing still streams without delay.
    """

    __slots__ = ("session", "stream", "status", "headers", "started", "finished", "_stash",
                 "_kick", "sent", "forwarded", "timed_out", "_defer")

    def __init__(self, session: Session, stream: Stream, defer_kick: bool = False):
        self.session = session
        self.stream = stream
        self.status = Status.OK
        self.headers: dict = {}
        self.started = False
        self.finished = False
        self._stash: bytes | None = None
        self._kick: asyncio.Handle | None = None
        self.sent = 0
        self.forwarded = False          # set when another node is answering (§9.4)
        self.timed_out = False          # set by the request's deadline
        #: Run eagerly (dispatch.accept): the first write waits for the handler to return
        #: or to suspend (``suspended()``), not for a loop turn: no callback to schedule.
        self._defer = defer_kick

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

    def _cancel_kick(self) -> None:
        if self._kick is not None:
            self._kick.cancel()
            self._kick = None

    def _send_stash(self) -> None:
        self._cancel_kick()
        if self._stash is not None and not self.started:
            session, stream = self.session, self.stream
            if session.respond_now(stream, self.status, self.headers, self._stash, end=False):
                self._stash = None
                self.started = True
            elif not session.stream_open(stream):
                self._stash = None      # the client went away: the next write learns it
                self.started = True
            # else: it does not fit one message (small records, large headers): the next
            # write or finish() sends it in pieces.

    async def write(self, data) -> None:
        """Send ``data``: bytes as they are, str as UTF-8, a dict or list as JSON."""
        if self.finished:
            raise RuntimeError("write() after the response finished")
        if not isinstance(data, bytes):
            data = self._encode(data)
        if not data:
            return
        self.sent += len(data)
        if self.session.over_high_water():
            await self.session.drain_if_needed()   # back-pressure for first writes too
        if not self.started and self._stash is None and len(data) <= FIRST_WRITE_DEFER:
            self._stash = data
            if not self._defer:
                self._kick = self.session.loop.call_soon(self._send_stash)
            return
        self._send_stash()
        if not self.started:
            self.started = True
            if self._stash is not None:
                data, self._stash = self._stash + data, None
            await self.session.respond(self.stream, self.status, self.headers, data, end=False)
        else:
            await self.stream.send_body(data)

    def suspended(self) -> None:
        """The handler run eagerly has to wait: what it wrote goes now, and later first
        writes are held for a loop turn as usual."""
        self._defer = False
        self._send_stash()

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
        self._cancel_kick()
        if not self.started:
            self.started = True
            body, self._stash = self._stash or b"", None
            await self.session.respond(self.stream, self.status, self.headers, body, end=True)
        else:
            await self.stream.end()

    async def fail(self, exc: StatusError) -> None:
        """Report ``exc``: as the response if none started, else by resetting the stream."""
        self.finished = True
        self._cancel_kick()
        if not self.session.stream_open(self.stream):
            return
        if not self.started:
            self.started = True
            self._stash = None
            body = str(exc).encode()
            self.sent += len(body)
            await self.session.respond(self.stream, exc.status, {}, body, end=True)
        else:
            self.stream.reset(exc.status, str(exc))


class RequestContext:
    """What a service handler sees of its request (``services.Handler`` reads these
    through its ``_ctx``), and the writer its ``write()`` calls go to."""

    __slots__ = ("writer", "args", "user", "path", "subpath", "method", "node", "_max_body",
                 "_body")

    def __init__(self, writer: ResponseWriter, user: str, subpath: list[str], node,
                 max_body: int):
        req = writer.stream.request
        self.writer = writer
        self.args = req.args or {}
        self.user = user
        self.path = req.path
        self.subpath = subpath
        self.method = req.method
        self.node = node
        self._max_body = max_body
        self._body: RequestBody | None = None

    @property
    def request_headers(self) -> dict:
        return self.writer.stream.request.headers

    @property
    def body(self) -> RequestBody:
        if self._body is None:
            self._body = RequestBody(self.writer.stream, self._max_body)
        return self._body

    def set_status(self, status: int) -> None:
        self.writer.set_status(status)

    def set_header(self, name: str, value) -> None:
        self.writer.set_header(name, value)

    def write(self, data):
        return self.writer.write(data)

    def flush(self):
        return self.writer.flush()
