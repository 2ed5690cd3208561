"""The one place asyncio meets the sans-IO protocol.

A :class:`Session` is an :class:`asyncio.Protocol` that owns a
:class:`protocol.Connection`: ``data_received`` feeds the connection and turns its
events into per-stream objects at once (no reader task, no stream buffer in
between), and whatever the connection has to send goes out in *one* ``write()``
per event-loop turn (coalescing; TCP_NODELAY is set, so nothing waits for Nagle).
Everything above it (server, client, peer links) deals in :class:`Stream` objects
and never sees bytes on the wire, nor the ``Connection``.

Back-pressure: when the transport's write buffer passes ``high_water`` the
transport pauses us (``pause_writing``): the session stops reading from the peer
(``pause_reading``) until it drains, and writers of body chunks wait too;
per-stream credits (SPEC.md §7) keep any one stream from buffering more than its
window.
"""
from __future__ import annotations

import asyncio
import collections
import functools
import logging
import time
from typing import Awaitable, Callable

from protocol import Connection, Role
from protocol.crypto import PublicKey
from protocol.errors import (AuthenticationFailed, BadRequest, Cancelled, LocalProtocolError,
                             ProtocolError, Status, StatusError, Unavailable,
                             error_for_status)
from protocol.events import (AuthenticationRequested, ConnectionClosed, DataReceived,
                             GoAwayReceived, HandshakeCompleted, PongReceived,
                             RequestReceived, ResponseReceived, StreamReset, WindowUpdated)

from .proxy import Proxy, open_socket

__all__ = ["Session", "Stream", "ConnectionLost", "READ_SIZE"]

log = logging.getLogger("utesla.transport")
READ_SIZE = 256 * 1024
#: A response head with at most this much body is sent without waiting for the backlog.
SMALL_HEAD = 16384
#: Seconds a closed connection may spend flushing its last bytes before it is cut.
CLOSE_LINGER = 5.0
#: Largest body piece per DATA message (records of several such pieces cost copies and
#: cache misses, and the peer can only start on a record once all of it has arrived).
BODY_PIECE = 256 * 1024
#: A body piece at least this large is sealed and written at once, not at the turn's end.
FLUSH_NOW = 65536


class ConnectionLost(Unavailable):
    """The session ended before this stream finished."""


class Stream:
    """One request/response exchange on a session, seen from our side.

    Incoming body chunks queue here (bounded by the window we granted); outgoing
    chunks wait for credit.  ``head`` resolves with (status, headers) for streams
    we opened.
    """

    __slots__ = ("session", "id", "incoming", "_chunks", "_waiter", "_ended", "_error",
                 "_credit", "head", "request", "_sent_end", "buffered", "deadline",
                 "task", "relay", "__weakref__")

    def __init__(self, session: "Session", stream_id: int, incoming: bool):
        self.session = session
        self.id = stream_id
        self.incoming = incoming
        self._chunks: collections.deque[bytes] = collections.deque()
        self._waiter: asyncio.Future | None = None
        self._ended = False
        self._error: BaseException | None = None
        self._credit: asyncio.Future | None = None
        self.head: asyncio.Future | None = None
        self.request: RequestReceived | None = None
        self._sent_end = False
        self.buffered = 0
        #: The task serving an incoming request (cancelled when the peer resets it).
        self.task: asyncio.Task | None = None
        self.deadline: float | None = None   # monotonic time the request must end by
        #: Set on both streams of a request relayed without a task (network.Relay):
        #: told of the answer (``answered``) and of failures (``failed``).
        self.relay = None

    # -------------------------------------------------------------- receiving side

    def _feed(self, data: bytes, end: bool) -> None:
        if data:
            self._chunks.append(data)
            self.buffered += len(data)
        if end:
            self._ended = True
        self._wake()

    def _fail(self, exc: BaseException) -> None:
        if self._error is None:
            self._error = exc
        if self.head is not None and not self.head.done():
            self.head.set_exception(exc)
            self.head.exception()  # mark retrieved: the reader may have gone
        self._wake()
        if self._credit is not None and not self._credit.done():
            self._credit.set_result(None)
        if self.relay is not None:
            self.relay.failed(self, exc)

    def _wake(self) -> None:
        w = self._waiter
        if w is not None and not w.done():
            w.set_result(None)

    @property
    def at_end(self) -> bool:
        return self._ended and not self._chunks

    @property
    def complete(self) -> bool:
        """The whole body has arrived, without error (it may still be unread)."""
        return self._ended and self._error is None

    def peek_body(self) -> bytes | None:
        """The whole body if it has all arrived (left in place, unread); else None."""
        if not self._ended or self._error is not None:
            return None
        chunks = self._chunks
        return b"".join(chunks) if chunks else b""

    def discard_body(self) -> None:
        """Drop what is buffered (the stream is ending; no credit is returned for it)."""
        self._chunks.clear()
        self.buffered = 0

    def take_body(self) -> bytes | None:
        """The whole body, consumed, if it has all arrived without error; else None."""
        body = self.peek_body()
        if body is not None:
            self.discard_body()
        return body

    async def read_chunk(self) -> bytes:
        """Next body chunk, or b"" at the end.  Raises the stream's error if it broke."""
        while not self._chunks:
            if self._ended:
                return b""
            if self._error is not None:
                raise self._error
            self._waiter = self.session.loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunk = self._chunks.popleft()
        self.buffered -= len(chunk)
        self.session.acknowledge(self.id, len(chunk))
        return chunk

    async def read_all(self, limit: int | None = None) -> bytes:
        if self._ended and self._error is None and not self._waiter:
            # All of it is here (the usual small answer): no chunk loop.  No credit goes
            # back: the peer has ended the stream.
            size = self.buffered
            if limit is not None and size > limit:
                from protocol.errors import TooLarge
                raise TooLarge(f"body larger than {limit} bytes")
            return self.take_body()
        parts, size = [], 0
        while True:
            chunk = await self.read_chunk()
            if not chunk:
                return b"".join(parts)
            size += len(chunk)
            if limit is not None and size > limit:
                from protocol.errors import TooLarge
                raise TooLarge(f"body larger than {limit} bytes")
            parts.append(chunk)

    def __aiter__(self):
        return self

    async def __anext__(self) -> bytes:
        chunk = await self.read_chunk()
        if not chunk:
            raise StopAsyncIteration
        return chunk

    # -------------------------------------------------------------- sending side

    async def _wait_credit(self) -> int:
        conn = self.session.conn
        while True:
            if self._error is not None:
                raise self._error
            credit = conn.send_credit(self.id)
            if credit > 0:
                return credit
            if not conn.is_open(self.id):
                raise self._error or ConnectionLost("stream closed")
            self._credit = self.session.loop.create_future()
            try:
                await self._credit
            finally:
                self._credit = None

    async def send_body(self, data: bytes, end: bool = False) -> None:
        """Send ``data`` as DATA messages, waiting for credit and for the socket to drain."""
        session = self.session
        view = memoryview(data)
        max_chunk = session.conn.max_chunk
        while True:
            if not view and not end:
                return
            credit = await self._wait_credit() if view else 0
            if view:
                await session.drain_if_needed()
            # Pieces of at most half the peer's window: while it reads one, the credit it
            # returns lets the next go, so both sides work at once instead of in turns.
            n = min(len(view), credit, max_chunk,
                    max(16384, min(BODY_PIECE, session.conn.peer_window // 2)))
            last = end and n == len(view)
            try:
                session.conn.send_data(self.id, view[:n], last)
            except LocalProtocolError as exc:
                raise self._error or ConnectionLost(str(exc)) from exc
            view = view[n:]
            if n >= FLUSH_NOW:
                session.flush()     # a record of its own, written now: the peer starts on it
            else:
                session.schedule_flush()
            if last:
                self._sent_end = True
                if self._ended and not self.incoming:
                    session.forget(self.id)         # the answer had ended already
                return

    async def end(self) -> None:
        if not self._sent_end:
            await self.send_body(b"", end=True)

    def abandon(self, reason: str) -> None:
        """Reset a stream we opened unless its answer has ended or it is already closed
        (the far side should stop working on a request nobody waits for any more)."""
        if not self.at_end and self.session.conn.is_open(self.id):
            self.reset(Status.CANCELLED, reason)

    def reset(self, status: int = Status.CANCELLED, reason: str = "") -> None:
        """Abort the stream both ways (a no-op once it is finished)."""
        self.session.conn.reset_stream(self.id, status, reason)
        self.session.forget(self.id)
        self._fail(Cancelled(reason or "stream reset"))
        self.session.schedule_flush()
        if self.session._slot_waiters:
            self.session._wake_slot_waiters()


RequestHandler = Callable[["Session", Stream], Awaitable[None]]
KeyLookup = Callable[[str], Awaitable["PublicKey | None"]]


class _Writer:
    """The write side as the rest of the code (and tests) see it: the transport, and a
    ``write`` that may be wrapped (a test measuring the buffer replaces it)."""

    __slots__ = ("transport", "write")

    def __init__(self, transport: asyncio.Transport):
        self.transport = transport
        self.write = transport.write

    def get_extra_info(self, name: str, default=None):
        return self.transport.get_extra_info(name, default)

    def is_closing(self) -> bool:
        return self.transport.is_closing()


async def connect(host: str, port: int, *, identity, user: str, server_key: PublicKey,
                  settings=None, high_water: int = 1 << 20, name: str = "",
                  proxy: "Proxy | None" = None, proxy_timeout: float | None = None
                  ) -> "Session":
    """Open a TCP connection and begin a client session's handshake on it (a user's, or
    a node's link to a peer); ``await session.wait_ready()`` for the keys.  OSError
    when the connection cannot be made (:class:`~utesla_node.proxy.ProxyError`, one of
    them, when ``proxy`` cannot be used).

    ``proxy``: a SOCKS5 proxy (:mod:`utesla_node.proxy`) to reach ``host:port``
    through; the socket it returns carries the same session as a direct one."""
    loop = asyncio.get_running_loop()

    def factory() -> Session:
        conn = Connection(Role.CLIENT, identity=identity, user=user, server_key=server_key,
                          settings=settings)
        return Session(conn, high_water=high_water, name=name or f"{host}:{port}")

    if proxy is None:
        _, session = await loop.create_connection(factory, host, port)
    else:
        sock = await open_socket(proxy, host, port, proxy_timeout)
        try:
            _, session = await loop.create_connection(factory, sock=sock)
        except BaseException:
            sock.close()
            raise
    session._keeper = loop.create_task(_keep(session), name=f"session {session.name}")
    return session


async def _keep(session: "Session") -> None:
    """A client session's one task: it ends with the session, and when it is cancelled
    instead (the program's ``asyncio.run()`` ending with the connection still open, as
    the blog's script does) it closes the connection cleanly on the way out."""
    try:
        await asyncio.shield(session.closed)
    except asyncio.CancelledError:
        session.close(Status.OK, "client exiting")
        raise


class Session(asyncio.Protocol):
    """A protocol connection driven by asyncio (client, server or peer link)."""

    def __init__(self, conn: Connection, *, on_request: RequestHandler | None = None,
                 key_lookup: KeyLookup | None = None, high_water: int = 1 << 20,
                 idle_timeout: float | None = None, name: str = ""):
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.writer: _Writer | None = None
        self.conn = conn
        self.on_request = on_request
        #: Tried first for each request: True when it took care of it without a task.
        self.on_request_now: Callable[["Session", Stream], bool] | None = None
        self.key_lookup = key_lookup
        self.high_water = high_water
        self.idle_timeout = idle_timeout
        self.name = name
        self.streams: dict[int, Stream] = {}
        self.tasks: set[asyncio.Task] = set()
        self.ready: asyncio.Future = self.loop.create_future()
        self.closed: asyncio.Future = self.loop.create_future()
        self.going_away = False
        self.last_activity = time.monotonic()
        self.bytes_in = 0
        self.bytes_out = 0
        self.close_reason: BaseException | None = None
        #: (status, reason) of the CLOSE the peer sent; None while it sent none.
        self.peer_close: tuple[int, str] | None = None
        self._flush_handle: asyncio.Handle | None = None
        self._pongs: collections.deque[asyncio.Future] = collections.deque()
        self._slot_waiters: collections.deque[asyncio.Future] = collections.deque()
        self.on_established: Callable[["Session"], None] | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._write_paused = False
        self._drain_waiters: list[asyncio.Future] = []
        #: Resolves when the socket is gone (``closed`` resolves when the session ends;
        #: a closing socket may still be flushing, for at most CLOSE_LINGER seconds).
        self.lost: asyncio.Future = self.loop.create_future()
        self._keeper: asyncio.Task | None = None
        self._authenticating = False    # a key lookup is running: events wait for it
        self._reading = False           # inside data_received: it flushes when done
        #: Called when the connection is made: False refuses it (the server's admission).
        self.admit: Callable[["Session"], bool] | None = None
        # asyncio and uvloop set TCP_NODELAY on TCP transports already (checked); each
        # flush is one write() call, so nothing waits for Nagle.

    @classmethod
    def accept(cls, *, identity, settings, **kwargs) -> "Session":
        """A server session (a protocol factory's product) for an accepted connection."""
        return cls(Connection(Role.SERVER, identity=identity, settings=settings), **kwargs)

    # -------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.Transport) -> None:
        self.transport = transport
        self.writer = _Writer(transport)
        # The transport pauses us past high_water (pause_writing), resumes below a quarter.
        transport.set_write_buffer_limits(high=self.high_water, low=self.high_water // 4)
        if not self.name:
            peer = transport.get_extra_info("peername")
            self.name = f"{peer[0]}:{peer[1]}" if peer else "?"
        if self.admit is not None and not self.admit(self):
            self.transport = None           # never started: nothing to close but this
            self.ready.cancel()
            self.closed.set_result(ConnectionLost("refused"))
            transport.close()
            return
        self.start()

    def pause_writing(self) -> None:
        self._write_paused = True
        if self.transport is not None and not self.transport.is_closing():
            self.transport.pause_reading()      # the peer waits while we cannot write

    def resume_writing(self) -> None:
        self._write_paused = False
        if self.transport is not None and not self.transport.is_closing():
            if not self._authenticating:
                self.transport.resume_reading()
        self._wake_drainers()

    def _wake_drainers(self) -> None:
        waiters, self._drain_waiters = self._drain_waiters, []
        for f in waiters:
            if not f.done():
                f.set_result(None)

    def data_received(self, data: bytes) -> None:
        self.bytes_in += len(data)
        self.last_activity = time.monotonic()
        self._reading = True        # what is answered meanwhile goes in the flush below
        try:
            events = self.conn.receive_data(data)
            if events:
                self._handle_events(events)
                if self._slot_waiters:
                    self._wake_slot_waiters()
        except ProtocolError as exc:
            self._reading = False
            self._terminate(exc)
            return
        finally:
            self._reading = False
        self.flush()
        if self.conn.closed:
            self._terminate(self.close_reason or ConnectionLost("connection closed"))

    def eof_received(self) -> bool:
        try:
            events = self.conn.receive_eof()
            if events:
                self._handle_events(events)
        except ProtocolError as exc:
            self._terminate(exc)
            return False
        self._terminate(self.close_reason or ConnectionLost("connection closed by peer"))
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if self.transport is None:          # refused at admission: never a session
            if not self.lost.done():
                self.lost.set_result(None)
            return
        if exc is not None and not isinstance(exc, ConnectionLost):
            exc = ConnectionLost(f"connection lost: {exc}")
        self._terminate(exc or self.close_reason or ConnectionLost("connection closed"))
        self._wake_drainers()
        if not self.lost.done():
            self.lost.set_result(None)

    @property
    def peer_address(self) -> str | None:
        """The peer's IP address (None before the connection is made)."""
        if self.transport is None:
            return None
        peer = self.transport.get_extra_info("peername")
        return peer[0] if peer else None

    # -------------------------------------------------------------- lifecycle

    @property
    def established(self) -> bool:
        """The handshake has completed."""
        return self.conn.established

    @property
    def open_streams(self) -> int:
        """Streams open on the connection (either side's)."""
        return self.conn.open_streams

    @property
    def stream_slots(self) -> int:
        """Streams we may still open under the peer's limit."""
        return self.conn.stream_slots

    @property
    def first_body_limit(self) -> int:
        """Most body bytes a request may carry in its first message."""
        conn = self.conn
        return min(conn.peer_window, conn.max_chunk)

    def stream_open(self, stream: Stream) -> bool:
        """``stream`` can still carry messages (not reset, not ended both ways)."""
        return self.conn.is_open(stream.id)

    def over_high_water(self) -> bool:
        return self._write_paused or self.transport.get_write_buffer_size() > self.high_water

    @property
    def peer_user(self) -> str | None:
        return self.conn.peer_user

    @property
    def peer_key(self) -> PublicKey | None:
        return self.conn.peer_key

    @property
    def is_open(self) -> bool:
        return not self.closed.done() and not self.conn.closed

    def start(self) -> None:
        """Begin the handshake (once connected); ``ready`` resolves when keys are set."""
        self.conn.initiate(time.monotonic())
        self._arm_timer()
        self.flush()

    async def wait_ready(self, timeout: float | None = None) -> None:
        """Until the handshake has completed (its failure raised); asyncio.TimeoutError
        after ``timeout`` seconds.  The protocol's own handshake timer fails ``ready`` too;
        ``timeout`` may be shorter.

        Not ``asyncio.wait_for``: on Python < 3.12 it can swallow the caller's
        cancellation when ``ready`` completes in the same loop turn.
        """
        ready = self.ready
        if not ready.done():
            waiter = self.loop.create_future()

            def wake(_f=None, exc=None) -> None:
                if not waiter.done():
                    if exc is None:
                        waiter.set_result(None)
                    else:
                        waiter.set_exception(exc)

            ready.add_done_callback(wake)
            timer = None if timeout is None else self.loop.call_later(
                timeout, wake, None, asyncio.TimeoutError())
            try:
                await waiter
            finally:
                ready.remove_done_callback(wake)
                if timer is not None:
                    timer.cancel()
        return ready.result()

    def _arm_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.conn.get_timer()
        if deadline is None and self.idle_timeout:
            deadline = self.last_activity + self.idle_timeout
        if deadline is not None:
            delay = max(0.0, deadline - time.monotonic())
            self._timer = self.loop.call_later(delay, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        now = time.monotonic()
        if not self.conn.established:
            try:
                self.conn.handle_timer(now)
            except ProtocolError as exc:
                self._terminate(exc)
                return
        elif self.idle_timeout and now - self.last_activity >= self.idle_timeout:
            if not self.streams:
                self.close(Status.TIMEOUT, "idle timeout")
                return
            # Quiet, but requests are running: look again one idle period from now
            # (re-arming from last_activity would fire at once, again and again).
            self._timer = self.loop.call_later(self.idle_timeout, self._on_timer)
            return
        self._arm_timer()

    def _handle_events(self, events) -> None:
        for n, ev in enumerate(events):
            t = type(ev)
            if t is DataReceived:
                s = self.streams.get(ev.stream_id)
                if s is not None:
                    s._feed(ev.data, ev.end)
                    if ev.end and s._sent_end and not s.incoming:
                        del self.streams[ev.stream_id]      # done both ways
            elif t is ResponseReceived:
                s = self.streams.get(ev.stream_id)
                if s is not None:
                    if s.head is not None and not s.head.done():
                        s.head.set_result((ev.status, ev.headers))
                    s._feed(ev.body, ev.end)
                    if ev.end and s._sent_end:
                        # Done both ways: whoever reads the answer holds the stream; the
                        # session must not (one entry per request made, else).
                        del self.streams[ev.stream_id]
                    if s.relay is not None:
                        s.relay.answered(s, ev.status, ev.headers)
            elif t is RequestReceived:
                self._on_request(ev)
            elif t is WindowUpdated:
                s = self.streams.get(ev.stream_id)
                if s is not None and s._credit is not None and not s._credit.done():
                    s._credit.set_result(None)
            elif t is StreamReset:
                s = self.streams.pop(ev.stream_id, None)
                if s is not None:
                    s._fail(error_for_status(ev.status, ev.reason or "stream reset by peer"))
                    if s.task is not None:
                        s.task.cancel()     # nobody wants the answer any more
            elif t is AuthenticationRequested:
                # The key lookup may wait (the database): reading stops meanwhile, and
                # the events after this one are handled once it is done.
                self._authenticating = True
                self.transport.pause_reading()
                self.spawn(self._authenticate(ev.user, events[n + 1:]))
                return
            elif t is HandshakeCompleted:
                self._arm_timer()
                if self.on_established is not None:
                    self.on_established(self)
                if not self.ready.done():
                    self.ready.set_result(ev)
            elif t is PongReceived:
                if self._pongs:
                    f = self._pongs.popleft()
                    if not f.done():
                        f.set_result(time.monotonic())
            elif t is GoAwayReceived:
                self.going_away = True
            elif t is ConnectionClosed:
                self.peer_close = (ev.status, ev.reason or "")
                if ev.status not in (Status.OK,):
                    self.close_reason = error_for_status(
                        ev.status, f"peer closed the connection: {ev.reason or ev.status}")
                else:
                    self.close_reason = ConnectionLost(
                        f"peer closed the connection{': ' + ev.reason if ev.reason else ''}")

    async def _authenticate(self, user: str, rest: list) -> None:
        try:
            try:
                key = await self.key_lookup(user) if self.key_lookup else None
            except StatusError as exc:
                self.conn.close(exc.status, "service unavailable")
                self.flush()
                raise AuthenticationFailed("key lookup failed") from exc
            more = self.conn.complete_auth(key)
            self._authenticating = False
            self._handle_events(more + rest)
            self.flush()
            if self.conn.closed:
                self._terminate(self.close_reason or ConnectionLost("connection closed"))
            elif not self._write_paused and not self.transport.is_closing():
                self.transport.resume_reading()
        except ProtocolError as exc:
            self._terminate(exc)

    def _on_request(self, ev: RequestReceived) -> None:
        s = Stream(self, ev.stream_id, incoming=True)
        s.request = ev
        if ev.body or ev.end:
            s._feed(ev.body, ev.end)
        self.streams[ev.stream_id] = s
        if self.on_request is None:
            self.conn.reset_stream(ev.stream_id, Status.NOT_FOUND, "no requests accepted here")
            self.streams.pop(ev.stream_id, None)
            return
        if self.on_request_now is not None and self.on_request_now(self, s):
            return                  # taken care of without a task (a relayed request)
        self.spawn_request(s)

    def spawn_request(self, s: Stream, serve: Callable[["Session", Stream], Awaitable[None]]
                      | None = None) -> asyncio.Task:
        """Serve incoming stream ``s`` in a task of its own: ``on_request``, or ``serve``."""
        task = self.spawn((serve or self.on_request)(self, s), s)
        task.add_done_callback(functools.partial(self._request_task_done, s))
        return task

    def _request_task_done(self, s: Stream, task: asyncio.Task) -> None:
        # A done callback, not a ``finally``: it also runs for a task cancelled before its
        # first step.  A serve() that returns True handed the stream on (a forward in
        # flight): whoever took it calls request_done.
        if task.cancelled() or task.exception() is not None or task.result() is not True:
            self.request_done(s)

    def spawn(self, coro, stream: Stream | None = None) -> asyncio.Task:
        """Run ``coro`` as one of this session's tasks (cancelled when the session ends,
        waited for by a stopping node); ``stream``: the request it serves."""
        task = self.loop.create_task(coro)
        if stream is not None:
            stream.task = task
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    def respond_now(self, stream: Stream, status: int, headers: dict | None = None,
                    body: bytes = b"", end: bool = True) -> bool:
        """Send the response head with all of ``body`` at once, if the stream is open and
        ``body`` fits the peer's credit and one message; False (nothing sent) otherwise."""
        conn = self.conn
        sid = stream.id
        if not conn.is_open(sid) or len(body) > min(conn.send_credit(sid),
                                                    self._head_room(headers)):
            return False
        try:
            conn.send_response(sid, status, headers=headers, body=body, end=end)
        except LocalProtocolError:
            return False
        stream._sent_end = end
        self.schedule_flush()
        return True

    def _head_room(self, headers: dict | None) -> int:
        """Body bytes a response head may carry beside ``headers`` in one message."""
        room = self.conn.max_chunk
        if headers:
            room -= 64 + sum(len(str(k)) + len(str(v)) + 8 for k, v in headers.items())
        return max(0, room)

    def request_done(self, s: Stream, lone: bool = True) -> None:
        """An incoming request has been answered (or given up): free its stream.
        ``lone=False``: never write at once (answers relayed in a batch go together)."""
        self.streams.pop(s.id, None)
        if self.conn.is_open(s.id) and not self.conn.closed:
            # Answered without reading the whole request body: tell the peer to stop
            # sending, and free the stream; RESET 200 says the answer stands (SPEC.md
            # §7.5; 499 would mean the opener cancelled).  Not answered at all: 500.
            self.conn.reset_stream(s.id, *((Status.OK, "response complete") if s._sent_end
                                           else (Status.INTERNAL, "stream ended by the node")))
            self.schedule_flush()
        if lone and len(self.tasks) <= 1 and self._flush_handle is not None:
            # The only request in flight is done: nothing else could join this
            # write, so send it now rather than one event-loop turn later.
            self.flush()

    # -------------------------------------------------------------- sending

    def flush(self) -> None:
        if self._flush_handle is not None:
            self._flush_handle.cancel()
            self._flush_handle = None
        data = self.conn.data_to_send()
        if data and self.writer is not None and not self.transport.is_closing():
            self.bytes_out += len(data)
            self.writer.write(data)

    def _flush_soon(self) -> None:
        self._flush_handle = None
        self.flush()

    #: Messages queued before a write goes out without waiting for the end of the turn.
    FLUSH_BATCH = 16

    def schedule_flush(self) -> None:
        """Flush at the end of this loop turn: everything queued meanwhile goes in one write.

        Once ``FLUSH_BATCH`` messages wait, they go at once: the peer starts on them
        while we produce the rest, instead of the two sides taking turns (measured:
        about twice the throughput with 64 requests in flight).
        """
        if self.conn.queued_messages >= self.FLUSH_BATCH:
            self.flush()
        elif self._flush_handle is None and not self._reading:
            self._flush_handle = self.loop.call_soon(self._flush_soon)

    async def drain(self) -> None:
        """Wait until the transport takes writes again (below its low-water mark)."""
        if self.transport is None or self.transport.is_closing():
            raise self.close_reason or ConnectionLost("connection closed")
        if not self._write_paused:
            return
        fut = self.loop.create_future()
        self._drain_waiters.append(fut)
        await fut
        if self.closed.done():
            raise self.close_reason or ConnectionLost("connection closed")

    def backlog(self) -> int:
        """Bytes waiting to go out: in the transport's buffer and queued, not yet sealed."""
        return self.transport.get_write_buffer_size() + self.conn.queued_bytes

    async def drain_if_needed(self) -> None:
        """Wait while this connection's backlog is over the high-water mark.

        Checked *before* each body chunk is queued, so however many streams write
        at once, the buffer never grows past the mark by more than one chunk each
        round (they wake one at a time under the drain lock).
        """
        while self.backlog() > self.high_water:
            self.flush()
            if not self._write_paused:
                # What is queued is sealed now and the transport took it under its mark:
                # wait a turn for the socket rather than spin.
                await asyncio.sleep(0)
            else:
                await self.drain()
            if self.conn.closed or self.closed.done():
                raise self.close_reason or ConnectionLost("connection closed")

    def acknowledge(self, stream_id: int, size: int) -> None:
        if not self.conn.closed and self.conn.acknowledge(stream_id, size):
            self.schedule_flush()         # a WINDOW was queued

    def forget(self, stream_id: int) -> None:
        self.streams.pop(stream_id, None)

    async def wait_stream_slot(self) -> None:
        """Wait until the peer's stream limit lets us open another stream."""
        while self.is_open and not self.conn.stream_slots:
            fut = self.loop.create_future()
            self._slot_waiters.append(fut)
            try:
                await fut
            except asyncio.CancelledError:
                if fut.done() and not fut.cancelled():
                    # Woken for a slot, but cancelled before taking it: pass it on.
                    self._wake_slot_waiters()
                raise

    def slot_waiter(self) -> asyncio.Future:
        """A future resolved when the peer's stream limit may let one more stream open (or
        the session closed): for callers that wait by callback, not in a task.  Cancel it
        to stop waiting."""
        fut = self.loop.create_future()
        self._slot_waiters.append(fut)
        if not self.is_open:
            self._wake_slot_waiters()
        return fut

    def pass_slot(self) -> None:
        """A waiter woken for a free stream slot will not use it: wake the next one."""
        self._wake_slot_waiters()

    def _wake_slot_waiters(self) -> None:
        n = self.conn.stream_slots if self.is_open else len(self._slot_waiters)
        while self._slot_waiters and n > 0:
            fut = self._slot_waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                n -= 1

    def open_stream(self, method: str, path: str, *, token: str | None = None,
                    args: dict | None = None, headers: dict | None = None,
                    body: bytes = b"", end: bool = True,
                    envelope: dict | None = None, head: bool = True) -> Stream:
        """Send a request; the returned stream's ``head`` resolves with the response
        (``head=False``: no future, for a caller told through ``Stream.relay``)."""
        if not self.is_open:
            raise self.close_reason or ConnectionLost("connection is closed")
        if self.going_away:
            raise ConnectionLost("the node is going away")
        try:
            sid = self.conn.send_request(method, path, token=token, args=args, headers=headers,
                                         body=body, end=end, envelope=envelope)
        except LocalProtocolError as exc:
            if self.conn.closed or self.going_away:
                raise ConnectionLost(str(exc)) from exc
            # The request itself cannot be sent (invalid field, too many streams): the
            # connection is fine, and reconnecting would not help.
            raise BadRequest(str(exc)) from exc
        s = Stream(self, sid, incoming=False)
        if head:
            s.head = self.loop.create_future()
        s._sent_end = end
        self.streams[sid] = s
        if len(self.streams) == 1 and self.conn.established:
            self.flush()        # the only request in flight: nothing could join its write
        else:
            self.schedule_flush()
        return s

    async def respond(self, stream: Stream, status: int, headers: dict | None = None,
                      body: bytes = b"", end: bool = True) -> None:
        """Send the response head (with as much of the body as credit allows).

        A head carrying a large body waits for the backlog like any body chunk does
        (else every stream's first write would pile up past the high-water mark);
        small ones, such as error answers, never wait.
        """
        if len(body) > SMALL_HEAD:
            await self.drain_if_needed()
        n = min(len(body), self.conn.send_credit(stream.id), self._head_room(headers))
        last = end and n == len(body)
        try:
            self.conn.send_response(stream.id, status, headers=headers, body=body[:n], end=last)
        except LocalProtocolError as exc:       # the stream or connection is gone
            raise stream._error or ConnectionLost(str(exc)) from None
        stream._sent_end = last
        self.schedule_flush()
        if n < len(body) or (end and not last):
            await stream.send_body(body[n:], end=end)

    async def ping(self, timeout: float = 5.0) -> float:
        """Round-trip time to the peer, in seconds."""
        try:
            self.conn.send_ping(b"")
        except LocalProtocolError as exc:      # closed under us: as open_stream() says it
            raise self.close_reason or ConnectionLost(str(exc)) from None
        fut = self.loop.create_future()
        self._pongs.append(fut)
        t0 = time.monotonic()
        self.flush()
        t1 = await asyncio.wait_for(fut, timeout)
        return t1 - t0

    def goaway(self, reason: str = "") -> None:
        if self.conn.established:
            self.conn.send_goaway(reason)
            self.flush()

    def close(self, status: int = Status.OK, reason: str = "") -> None:
        """Send CLOSE and shut the transport; every open stream fails."""
        try:
            self.conn.close(status, reason)
        except ProtocolError:  # pragma: no cover
            pass
        self.flush()
        self._terminate(self.close_reason or ConnectionLost(reason or "connection closed"))

    def _terminate(self, exc: BaseException) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.close_reason is None:
            self.close_reason = exc
        self._wake_slot_waiters()          # they see the closed session and give up
        try:
            self.flush()  # a CLOSE the protocol queued on its way down
        except Exception:  # pragma: no cover - best effort
            pass
        if not self.ready.done():
            self._log_failed_handshake(exc)
            self.ready.set_exception(exc)
            self.ready.exception()
        streams, self.streams = self.streams, {}
        for s in streams.values():
            s._fail(exc if isinstance(exc, StatusError) else ConnectionLost(str(exc)))
        for f in self._pongs:
            if not f.done():
                f.set_exception(ConnectionLost("connection closed"))
                f.exception()
        self._pongs.clear()
        transport = self.transport
        if transport is not None and not transport.is_closing():
            transport.close()
            if transport.get_write_buffer_size():
                # close() flushes first; a peer that never reads would keep the socket
                # (and its buffer, and its place in the connection count) forever.
                self.loop.call_later(CLOSE_LINGER, transport.abort)
        # The peer is gone: requests still running for it can no longer be answered.
        for task in list(self.tasks):
            task.cancel()
        if not self.closed.done():
            self.closed.set_result(exc)

    def _log_failed_handshake(self, exc: BaseException) -> None:
        if self.conn.role is not Role.SERVER:
            log.debug("handshake with %s failed: %s", self.name, exc)
        elif isinstance(exc, AuthenticationFailed):
            log.warning("handshake with %s failed: %s", self.name, exc)
        else:
            log.info("handshake with %s failed: %s", self.name, exc)

    async def wait_closed(self) -> None:
        await asyncio.shield(self.closed)
        await asyncio.shield(self.lost)
