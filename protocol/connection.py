"""The sans-IO connection: bytes in, events out, bytes to send (SPEC.md §4-§7).

``Connection`` knows nothing about sockets, asyncio, databases or clocks: the
caller feeds received bytes to :meth:`Connection.receive_data`, acts on the
events it returns, calls ``send_*`` methods, and writes whatever
:meth:`Connection.data_to_send` returns.  Time is passed in as ``now``.

It ties three parts together, each in its own module: the handshake's state
table and key schedule (:mod:`protocol.handshake`), the streams and their credit
(:mod:`protocol.streams`), and the record layer that seals queued messages into
as few records as possible (:mod:`protocol.record`).  What stays here is the
message level: which message may come or go when, and the events they make.

Any :class:`~protocol.errors.ProtocolError` raised here leaves the connection
closed, with a CLOSE message queued when one can still be sent; the caller
flushes ``data_to_send()`` and drops the transport.
"""
from __future__ import annotations


from . import messages as m
from .crypto import PrivateKey, PublicKey
from .errors import (AuthenticationFailed, DecodeError, FrameError, HandshakeFailed,
                     LocalProtocolError, ProtocolError, Status)
from .events import (AuthenticationRequested, ConnectionClosed, DataReceived, Event,
                     GoAwayReceived, HandshakeCompleted, PongReceived, RequestReceived,
                     ResponseReceived, StreamReset, WindowUpdated)
from .frame import DEFAULT_MAX_RECORD, FrameBuffer, pack, unpack
from .handshake import (AWAITS, MAX_HANDSHAKE_FRAME, MIN_RECORD, MIN_STREAMS, MIN_WINDOW,
                        PROLOGUE, PROTOCOL_VERSION, Handshake, Role, State, advance,
                        check_hello)
from .record import RECORD_OVERHEAD, REKEY_AFTER, Opener, Sealer, seal_batches
from .settings import Settings
from .streams import Stream, StreamTable

__all__ = ["Role", "Settings", "Connection", "PROTOCOL_VERSION", "PROLOGUE",
           "MAX_HANDSHAKE_FRAME", "MIN_WINDOW", "MIN_STREAMS", "MIN_RECORD",
           "MESSAGE_OVERHEAD"]

#: Bytes of msgpack framing around a body in one DATA message, at most (SPEC.md §6.3).
MESSAGE_OVERHEAD = 48


class Connection:
    """One end of a utesla session.

    Client: ``Connection(Role.CLIENT, identity=user_key, user="alice", server_key=pinned)``
    then :meth:`initiate`.  Server: ``Connection(Role.SERVER, identity=node_key)``; answer
    :class:`AuthenticationRequested` with :meth:`complete_auth`.
    """

    def __init__(self, role: Role, *, identity: PrivateKey, settings: Settings | None = None,
                 user: str | None = None, server_key: PublicKey | None = None,
                 ephemeral_secret: bytes | None = None):
        self.role = role
        self.settings = settings or Settings()
        if role is Role.CLIENT:
            if not user or server_key is None:
                raise LocalProtocolError("a client needs a user name and the node's pinned key")
            if len(user.encode()) > m.MAX_USER:
                raise LocalProtocolError("user name too long")
        #: The handshake in progress; None once it has ended (its secrets go with it).
        self._handshake: Handshake | None = Handshake(
            role, identity, self.settings, user=user, pinned=server_key,
            ephemeral_secret=ephemeral_secret)
        self._frames = FrameBuffer(self.settings.max_record)
        self._state = State.START
        self._enter(State.START if role is Role.CLIENT else State.SERVER_AWAIT_HELLO)
        # Application keys (ours to seal, the peer's to open), set as the handshake ends.
        self._sealer: Sealer | None = None
        self._opener: Opener | None = None
        self._out: list[bytes] = []           # encoded application messages not yet sealed
        self._wire: list[bytes] = []          # bytes ready for the transport
        self._stream_table = StreamTable(
            client=role is Role.CLIENT, window=self.settings.window,
            max_streams=self.settings.max_streams, peer_window=MIN_WINDOW,
            peer_max_streams=MIN_STREAMS)
        self._peer_max_record = MIN_RECORD
        self._deadline: float | None = None
        self._goaway_sent = False
        self._goaway_received = False
        self._close_received = False
        self.peer_key: PublicKey | None = None
        self.peer_user: str | None = None

    # ------------------------------------------------------------------ state

    def _enter(self, state: State) -> None:
        """Every state change goes through here (the handshake's come from ``advance``).

        While a handshake message is awaited, no frame may be larger than the
        largest handshake message: a peer that has proven nothing cannot make us
        wait for, and buffer, a megabyte (SPEC.md §4.1).
        """
        self._state = state
        if (self.role, state) in AWAITS:
            self._frames.max_size = min(MAX_HANDSHAKE_FRAME, self.settings.max_record)
        else:
            self._frames.max_size = self.settings.max_record
        if state is State.CLOSED or state is State.ESTABLISHED:
            self._handshake = None

    # ------------------------------------------------------------------ properties

    @property
    def established(self) -> bool:
        return self._state is State.ESTABLISHED

    @property
    def closed(self) -> bool:
        return self._state is State.CLOSED

    @property
    def can_send(self) -> bool:
        """Application messages may be queued.

        A client may queue requests from the start: they go out right behind its
        ClientAuth, under the application key (0.5-RTT requests, SPEC.md §4.7).
        """
        if self.role is Role.CLIENT:
            return self._state is not State.CLOSED
        return self._state is State.ESTABLISHED

    @property
    def open_streams(self) -> int:
        return len(self._stream_table)

    @property
    def stream_ids(self) -> list[int]:
        """Ids of the streams open in either direction, oldest first."""
        return list(self._stream_table.by_id)

    @property
    def _streams(self) -> dict[int, Stream]:
        # Read by utesla_node's tests (tests/network); ``stream_ids`` is the public form.
        return self._stream_table.by_id

    @property
    def peer_max_record(self) -> int:
        return self._peer_max_record

    @property
    def stream_slots(self) -> int:
        """Streams we may still open before reaching the peer's ``max_streams``."""
        return self._stream_table.slots

    @property
    def queued_bytes(self) -> int:
        """Encoded application messages queued and not yet sealed into records."""
        return sum(map(len, self._out))

    @property
    def queued_messages(self) -> int:
        """Application messages queued and not yet sealed into records."""
        return len(self._out)

    @property
    def peer_window(self) -> int:
        """Initial credit the peer grants each stream (body bytes before a WINDOW)."""
        return self._stream_table.peer_window

    @property
    def max_chunk(self) -> int:
        """Largest body one message may carry towards the peer."""
        return self._peer_max_record - RECORD_OVERHEAD - MESSAGE_OVERHEAD

    def send_credit(self, stream_id: int) -> int:
        """Body bytes we may still send on ``stream_id`` (0 for unknown streams)."""
        return self._stream_table.send_credit(stream_id)

    def is_open(self, stream_id: int) -> bool:
        return stream_id in self._stream_table

    # ------------------------------------------------------------------ timers

    def initiate(self, now: float) -> None:
        """Client: queue the ClientHello.  Server: start the handshake clock."""
        self._deadline = now + self.settings.handshake_timeout
        if self.role is Role.SERVER:
            return
        nxt = advance(self.role, self._state, m.ClientHello, sent=True)
        self._wire.append(self._handshake.client_hello())
        self._enter(nxt)

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must next be called, or None."""
        if self._state is State.ESTABLISHED or self._state is State.CLOSED:
            return None
        return self._deadline

    def handle_timer(self, now: float) -> None:
        """Call at :meth:`get_timer`'s time: past the deadline the handshake fails (408).

        The CLOSE 408 goes out like any handshake CLOSE (SPEC.md §4.8): sealed when we
        have a handshake key, in clear from a server still awaiting the ClientHello;
        the caller flushes :meth:`data_to_send` and drops the transport.
        """
        if self._deadline is not None and now >= self._deadline and self._state not in (
                State.ESTABLISHED, State.CLOSED):
            self._fail(HandshakeFailed("handshake timed out", code=Status.TIMEOUT))

    # ------------------------------------------------------------------ receiving

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the transport; returns the events they complete."""
        state = self._state
        if state is State.CLOSED:
            return []
        if state is State.START:
            raise LocalProtocolError("receive_data() before initiate()")
        try:
            self._frames.feed(data)
            if state is State.SERVER_AWAIT_KEY and \
                    len(self._frames) > 2 * self.settings.max_record:
                # Bytes pipelined behind ClientAuth wait for the key lookup; bounded.
                raise FrameError("too much data before authentication completed")
        except ProtocolError as exc:
            self._fail(exc)
        return self._drain()

    def receive_eof(self) -> list[Event]:
        """The transport closed.  Without a CLOSE first, that is a truncation."""
        if self._state is State.CLOSED:
            return []
        if self._state is State.ESTABLISHED and not self._frames:
            exc = FrameError("connection closed without a CLOSE message", code=Status.BAD_REQUEST)
        else:
            exc = FrameError("connection closed in the middle of a record or handshake",
                             code=Status.BAD_REQUEST)
        self._enter(State.CLOSED)
        self._stream_table.clear()
        raise exc

    def _drain(self) -> list[Event]:
        """Process every complete frame the current state can take.

        Draining stops where no frame is awaited: closed, or a server waiting for
        the application's key lookup (later records stay buffered, unopened, §4.7).
        """
        events: list[Event] = []
        try:
            while self._state is State.ESTABLISHED or (self.role, self._state) in AWAITS:
                got = self._frames.next_frame()
                if got is None:
                    break
                if self._state is State.ESTABLISHED:
                    self._on_records(self._opener.open(*got), events)
                else:
                    self._on_handshake_frame(got[0], got[1], events)
        except ProtocolError as exc:
            self._fail(exc)
        return events

    # ------------------------------------------------------------------ handshake (§4)

    def _on_handshake_frame(self, header: bytes, payload: bytes, events: list[Event]) -> None:
        """One handshake message from the peer: check it against the table, act, move on."""
        msg, raw = self._handshake.read(AWAITS[self.role, self._state], header, payload)
        nxt = advance(self.role, self._state, type(msg))
        self._HANDSHAKE_HANDLERS[type(msg)](self, msg, raw, events)
        self._enter(nxt)

    def _on_client_hello(self, msg: m.ClientHello, raw: bytes, events: list[Event]) -> None:
        self._learn_peer_settings(msg)
        self._wire.append(self._handshake.server_flight(raw, msg))

    def _on_server_hello(self, msg: m.ServerHello, raw: bytes, events: list[Event]) -> None:
        self._learn_peer_settings(msg)
        self._handshake.server_hello(raw, msg)

    def _on_server_auth(self, msg: m.ServerAuth, raw: bytes, events: list[Event]) -> None:
        client_auth, self._sealer = self._handshake.server_auth(raw, msg)
        self._wire.append(client_auth)      # queued 0.5-RTT records follow it (§4.7)
        self.peer_key = self._handshake.peer_key

    def _on_client_auth(self, msg: m.ClientAuth, raw: bytes, events: list[Event]) -> None:
        self._handshake.client_auth(raw, msg)
        events.append(AuthenticationRequested(msg.user))

    def _on_server_finished(self, msg: m.ServerFinished, raw: bytes,
                            events: list[Event]) -> None:
        self._opener = self._handshake.server_finished()
        events.append(HandshakeCompleted(self.peer_key, None))

    _HANDSHAKE_HANDLERS = {
        m.ClientHello: _on_client_hello, m.ServerHello: _on_server_hello,
        m.ServerAuth: _on_server_auth, m.ClientAuth: _on_client_auth,
        m.ServerFinished: _on_server_finished,
    }

    def _learn_peer_settings(self, hello) -> None:
        check_hello(hello)
        self._stream_table.learn_peer(hello.window, hello.max_streams)
        self._peer_max_record = hello.max_record

    def complete_auth(self, key: PublicKey | None) -> list[Event]:
        """Server: the claimed user's registered key, or None when there is no such user.

        Unknown user and bad signature end the same way (one generic refusal, SPEC.md
        §4.6), and an unknown user still costs a signature check so timing does not
        differ much.
        """
        nxt = advance(self.role, self._state, m.ServerFinished, sent=True)
        hs = self._handshake
        if not hs.verify_client(key):
            self._wire.append(hs.close_frame(m.encode(
                m.Close(Status.UNAUTHORIZED, "authentication failed"))))
            self._enter(State.CLOSED)
            self._stream_table.clear()
            raise AuthenticationFailed("authentication failed")
        self.peer_key = key
        self.peer_user = hs.claimed_user
        finished, self._sealer, self._opener = hs.server_finished_flight()
        self._wire.append(finished)
        self._enter(nxt)
        events: list[Event] = [HandshakeCompleted(key, self.peer_user)]
        events.extend(self._drain())
        return events

    # ------------------------------------------------------------------ records (§5, §6)

    def _on_records(self, plaintext: bytes, events: list[Event]) -> None:
        batch = unpack(plaintext, check_depth=False)
        if type(batch) is not list or not batch:
            raise DecodeError("a record carries a non-empty array of messages")
        decode = m.decode
        for obj in batch:
            msg = decode(obj)
            handler = self._HANDLERS.get(type(msg))
            if handler is None:
                raise DecodeError(f"{type(msg).__name__} is not allowed after the handshake")
            handler(self, msg, events)
            if self._state is State.CLOSED:
                return      # a CLOSE ends the record too: what follows it is ignored (§5.5)

    def _on_request(self, msg: m.Request, events: list[Event]) -> None:
        sid = msg.stream_id
        s = self._stream_table.open_remote(sid, len(msg.body), msg.end,
                                           refuse=self._goaway_sent)
        if s is None:
            self._queue(m.Reset(sid, Status.UNAVAILABLE,
                                "going away" if self._goaway_sent else "too many streams"))
            return
        events.append(RequestReceived(sid, msg.method, msg.path, msg.token, msg.args,
                                      msg.headers, msg.body, msg.end, msg.envelope))

    def _on_response(self, msg: m.Response, events: list[Event]) -> None:
        if self._stream_table.response(msg.stream_id, len(msg.body), msg.end):
            events.append(ResponseReceived(msg.stream_id, msg.status, msg.headers, msg.body,
                                           msg.end))

    def _on_data(self, msg: m.Data, events: list[Event]) -> None:
        if self._stream_table.data(msg.stream_id, len(msg.body), msg.end):
            events.append(DataReceived(msg.stream_id, msg.body, msg.end))

    def _on_window(self, msg: m.Window, events: list[Event]) -> None:
        if self._stream_table.window_update(msg.stream_id, msg.credit):
            events.append(WindowUpdated(msg.stream_id, msg.credit))

    def _on_reset(self, msg: m.Reset, events: list[Event]) -> None:
        if self._stream_table.drop(msg.stream_id):
            events.append(StreamReset(msg.stream_id, msg.status, msg.reason))

    def _on_ping(self, msg: m.Ping, events: list[Event]) -> None:
        self._queue(m.Pong(msg.opaque))

    def _on_pong(self, msg: m.Pong, events: list[Event]) -> None:
        events.append(PongReceived(msg.opaque))

    def _on_goaway(self, msg: m.GoAway, events: list[Event]) -> None:
        self._goaway_received = True
        events.append(GoAwayReceived(msg.last_stream_id, msg.reason))

    def _on_close(self, msg: m.Close, events: list[Event]) -> None:
        # The peer has stopped reading: nothing more is sent, not even the answers
        # (PONG, WINDOW, RESET) to messages that came before its CLOSE (SPEC.md §5.5).
        self._close_received = True
        self._enter(State.CLOSED)
        self._stream_table.clear()
        self._out.clear()
        events.append(ConnectionClosed(msg.status, msg.reason))

    _HANDLERS = {
        m.Request: _on_request, m.Response: _on_response, m.Data: _on_data,
        m.Window: _on_window, m.Reset: _on_reset, m.Ping: _on_ping, m.Pong: _on_pong,
        m.GoAway: _on_goaway, m.Close: _on_close,
    }

    # ------------------------------------------------------------------ sending

    def _queue(self, msg: m.Message) -> None:
        if self._state is State.CLOSED:
            raise LocalProtocolError("connection is closed")
        self._out.append(self._fits(m.encode(msg)))

    def _fits(self, data: bytes) -> bytes:
        # Refuse what could never be sealed now, before anything is sent: failing
        # later in _flush would leave earlier messages queued after their record
        # went out (sent twice).  The peer's limit only grows from MIN_RECORD.
        if len(data) > self._peer_max_record - RECORD_OVERHEAD:
            raise LocalProtocolError("a message larger than the peer's record limit")
        return data

    def _checked(self, msg: m.Message) -> bytes:
        """Encode a caller-built REQUEST/RESPONSE, checked as the peer will check it.

        The peer answers a message it cannot decode by closing the connection and
        every stream on it, so a bad path, method, token, header or status from one
        caller is refused here, as our error, before any state changes (SPEC.md §6).
        """
        if type(msg) is m.Response and not msg.headers:
            # The common answer: nothing in it the peer could refuse but the status.
            if not 0 <= msg.status <= 999:
                raise LocalProtocolError(f"status {msg.status} out of range 0..999")
            return self._fits(pack(m.to_map(msg)))
        if (type(msg) is m.Request and msg.args is None and not msg.headers
                and m.plain_request_ok(msg)):
            # A plain request (a forwarded one carries only an envelope): its fields
            # checked in place instead of a decode of its own wire map.
            try:
                return self._fits(pack(m.to_map(msg)))
            except (TypeError, ValueError) as exc:  # an envelope value msgpack refuses
                raise LocalProtocolError(f"cannot encode the message: {exc}") from None
        try:
            wire = m.to_map(msg)
            m.decode(wire)
            data = pack(wire)
        except DecodeError as exc:
            raise LocalProtocolError(f"refusing to send an invalid message: {exc}") from None
        except (TypeError, ValueError) as exc:      # msgpack cannot encode a value
            raise LocalProtocolError(f"cannot encode the message: {exc}") from None
        return self._fits(data)

    def _check_sendable(self) -> None:
        if not self.can_send:
            raise LocalProtocolError(
                "connection is closed" if self.closed else "handshake not complete")

    def send_request(self, method: str, path: str, *, token: str | None = None,
                     args: dict | None = None, headers: dict | None = None,
                     body: bytes = b"", end: bool = True,
                     envelope: dict | None = None) -> int:
        """Open a stream with a request; returns its stream id."""
        self._check_sendable()
        table = self._stream_table
        if self._goaway_received:
            raise LocalProtocolError("peer is going away: no new streams")
        if not table.slots:
            raise LocalProtocolError("too many open streams for the peer's limit")
        if len(body) > table.peer_window:
            raise LocalProtocolError("request body exceeds the peer's initial window")
        data = self._checked(m.Request(table.next_id, method.upper(), path, token, args,
                                       headers or {}, bytes(body), end, envelope))
        self._out.append(data)
        return table.open_local(len(body), end)

    def send_response(self, stream_id: int, status: int, *, headers: dict | None = None,
                      body: bytes = b"", end: bool = True) -> None:
        self._check_sendable()
        table = self._stream_table
        if not table.is_peers(stream_id):
            raise LocalProtocolError("responses go on streams the peer opened")
        st = table.get(stream_id)
        if st is not None and st.head:
            raise LocalProtocolError(f"stream {stream_id} already has its response")
        data = self._checked(m.Response(stream_id, int(status), headers or {}, bytes(body),
                                        end))
        table.consume(stream_id, len(body), end, self.max_chunk).head = True
        self._out.append(data)

    def send_data(self, stream_id: int, data: bytes, end: bool = False) -> None:
        self._check_sendable()
        table = self._stream_table
        st = table.get(stream_id)
        if st is not None and not st.head and table.is_peers(stream_id):
            raise LocalProtocolError(f"stream {stream_id}: DATA before the response")
        table.consume(stream_id, len(data), end, self.max_chunk)
        self._queue(m.Data(stream_id, bytes(data), end))

    def acknowledge(self, stream_id: int, size: int, *, force: bool = False) -> bool:
        """The application consumed ``size`` body bytes of ``stream_id``: return credit.

        WINDOW messages are batched: one goes out once a quarter of the window has
        been consumed (or at once with ``force``).  True when one was queued now
        (the caller may want to flush).
        """
        if self._state is State.CLOSED:
            return False
        credit = self._stream_table.acknowledge(stream_id, size, force)
        if credit:
            self._queue(m.Window(stream_id, credit))
        return bool(credit)

    def reset_stream(self, stream_id: int, status: int = Status.CANCELLED,
                     reason: str = "") -> None:
        """Abort a stream both ways; late bytes from the peer for it are dropped."""
        if self._stream_table.drop(stream_id) and self.can_send:
            self._queue(m.Reset(stream_id, int(status), reason[:m.MAX_REASON]))

    def send_ping(self, opaque: bytes = b"") -> None:
        self._check_sendable()
        if len(opaque) > 64:        # the peer's decoder refuses more (SPEC.md §6.2)
            raise LocalProtocolError("ping payload longer than 64 bytes")
        self._queue(m.Ping(bytes(opaque)))

    def send_goaway(self, reason: str = "") -> None:
        """Refuse new streams from the peer; existing ones finish."""
        self._check_sendable()
        if not self._goaway_sent:
            self._goaway_sent = True
            self._queue(m.GoAway(self._stream_table.last_peer_id, reason[:m.MAX_REASON]))

    def close(self, status: int = Status.OK, reason: str = "") -> None:
        """Queue a CLOSE (when keys allow it) and stop; ``data_to_send`` has the last bytes.

        Everything queued before goes out first, in the same records when it fits
        (SPEC.md §7.8).  During the handshake the CLOSE goes out as
        :meth:`Handshake.close_frame <protocol.handshake.Handshake.close_frame>` says.
        """
        if self._state is State.CLOSED:
            return
        close = m.encode(m.Close(int(status), reason[:m.MAX_REASON]))
        if self._sealer is not None:
            self._out.append(close)
            self._flush()
        elif self._handshake is not None:
            wire = self._handshake.close_frame(close)
            if wire is not None:
                self._wire.append(wire)
        self._enter(State.CLOSED)
        self._stream_table.clear()

    def _fail(self, exc: ProtocolError) -> None:
        """Close after an error, telling the peer when we still can, then re-raise."""
        if self._state is not State.CLOSED and not self._close_received:
            code = exc.code if not isinstance(exc, AuthenticationFailed) else Status.UNAUTHORIZED
            reason = "authentication failed" if isinstance(exc, AuthenticationFailed) else str(exc)
            try:
                self.close(code, reason)
            except ProtocolError:  # pragma: no cover - best effort
                pass
        self._out.clear()
        if self._state is not State.CLOSED:
            self._enter(State.CLOSED)
        self._stream_table.clear()
        raise exc

    def _flush(self) -> None:
        """Seal queued messages into as few records as the peer's limit allows (§5.4)."""
        if self._out and self._sealer is not None:
            self._wire.extend(seal_batches(self._sealer, self._out,
                                           self._peer_max_record - RECORD_OVERHEAD))
            self._out.clear()

    def data_to_send(self) -> bytes:
        """Everything to write now, coalesced; empty when there is nothing."""
        if self._out and self._sealer is not None:
            self._flush()
        if not self._wire:
            return b""
        data = b"".join(self._wire) if len(self._wire) > 1 else self._wire[0]
        self._wire.clear()
        return data
