"""The sans-IO connection: bytes in, events out, bytes to send (SPEC.md §4-§7).

``Connection`` knows nothing about sockets, asyncio, databases or clocks: the
caller feeds received bytes to :meth:`Connection.receive_data`, acts on the
events it returns, calls ``send_*`` methods, and writes whatever
:meth:`Connection.data_to_send` returns.  Time is passed in as ``now``.

Any :class:`~protocol.errors.ProtocolError` raised here leaves the connection
closed, with a CLOSE message queued when one can still be sent; the caller
flushes ``data_to_send()`` and drops the transport.
"""
from __future__ import annotations

import enum
import hashlib
import hmac
import struct
from dataclasses import dataclass

from . import messages as m
from .crypto import Ephemeral, PrivateKey, PublicKey, TAG_LEN, hkdf
from .errors import (AuthenticationFailed, DecodeError, FlowControlError, FrameError,
                     HandshakeFailed, LocalProtocolError, ProtocolError, RemoteProtocolError,
                     Status)
from .events import (AuthenticationRequested, ConnectionClosed, DataReceived, Event,
                     GoAwayReceived, HandshakeCompleted, PongReceived, RequestReceived,
                     ResponseReceived, StreamReset, WindowUpdated)
from .frame import DEFAULT_MAX_RECORD, FrameBuffer, frame, pack, unpack
from .record import REKEY_AFTER, Opener, Sealer

__all__ = ["Role", "Settings", "Connection", "PROTOCOL_VERSION", "PROLOGUE"]

PROTOCOL_VERSION = 1
#: Absorbed first into the transcript: binds every signature to this protocol.
PROLOGUE = b"utesla protocol 1"
_SERVER_SIG_CONTEXT = b"utesla/1 server signature\x00"
_CLIENT_SIG_CONTEXT = b"utesla/1 client signature\x00"
_HS_INFO = b"utesla/1 handshake keys"
_AP_INFO = b"utesla/1 application keys"
#: Bytes of msgpack framing around a body in one DATA message, at most (SPEC.md §6.3).
MESSAGE_OVERHEAD = 48
_RECORD_OVERHEAD = 5 + TAG_LEN      # array header + tag
#: Every peer grants at least this much (SPEC.md §4.2), so a client can queue
#: requests before it has heard the node's settings.
MIN_WINDOW = 65536
MIN_STREAMS = 16
MIN_RECORD = 16384


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class _State(enum.Enum):
    START = 0
    CLIENT_SENT_HELLO = 1
    CLIENT_AWAIT_FINISHED = 2
    SERVER_AWAIT_HELLO = 3
    SERVER_AWAIT_AUTH = 4
    SERVER_AWAIT_KEY = 5
    ESTABLISHED = 6
    CLOSED = 7


@dataclass(frozen=True)
class Settings:
    """What this side accepts and how it behaves; the peer learns the first three."""

    #: Largest record (ciphertext + tag) this side accepts.
    max_record: int = DEFAULT_MAX_RECORD
    #: Initial credit per stream: body bytes the peer may send before a WINDOW.
    window: int = 256 * 1024
    #: Streams the peer may have open towards us at once.
    max_streams: int = 256
    #: Records per key before the implicit key update; both sides must agree.
    rekey_after: int = REKEY_AFTER
    #: Seconds from start until the handshake must have completed.
    handshake_timeout: float = 10.0
    #: "cryptography", "pycryptodome" or None for the fastest available.
    aead_backend: str | None = None


class _Stream:
    __slots__ = ("id", "send_credit", "recv_credit", "unacked", "local_open", "remote_open",
                 "head")

    def __init__(self, stream_id: int, send_credit: int, recv_credit: int):
        self.id = stream_id
        self.send_credit = send_credit
        self.recv_credit = recv_credit
        self.unacked = 0
        self.local_open = True
        self.remote_open = True
        # The RESPONSE of this stream went out (peer's stream) or came in (ours): a
        # response body (DATA) may only follow it, and there is exactly one (§7.2).
        self.head = False


_ARRAY16 = struct.Struct(">BH")
_ARRAY32 = struct.Struct(">BI")


def _array_header(n: int) -> bytes:
    if n < 16:
        return bytes((0x90 | n,))
    if n < 65536:
        return _ARRAY16.pack(0xDC, n)
    return _ARRAY32.pack(0xDD, n)


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
        self._identity = identity
        self._user = user
        self._pinned = server_key
        if role is Role.CLIENT:
            if not user or server_key is None:
                raise LocalProtocolError("a client needs a user name and the node's pinned key")
            if len(user.encode()) > m.MAX_USER:
                raise LocalProtocolError("user name too long")
        self._ephemeral = Ephemeral(ephemeral_secret)
        self._state = _State.START if role is Role.CLIENT else _State.SERVER_AWAIT_HELLO
        self._frames = FrameBuffer(self.settings.max_record)
        self._transcript = hashlib.sha256(PROLOGUE)
        self._sealer: Sealer | None = None
        self._opener: Opener | None = None
        self._hs_sealer: Sealer | None = None
        self._shared: bytes | None = None
        self._ap_keys: tuple[bytes, bytes] | None = None
        self._out: list[bytes] = []           # encoded application messages not yet sealed
        self._wire: list[bytes] = []          # bytes ready for the transport
        self._streams: dict[int, _Stream] = {}
        self._peer_open = 0                   # streams the peer opened that are still open
        self._next_id = 1 if role is Role.CLIENT else 2
        self._last_peer_id = 0
        self._peer_window = MIN_WINDOW
        self._peer_max_record = MIN_RECORD
        self._peer_max_streams = MIN_STREAMS
        self._deadline: float | None = None
        self._claimed_user: str | None = None
        self._client_sig: bytes = b""
        self._sig_input: bytes = b""
        self._goaway_sent = False
        self._goaway_received = False
        self._close_received = False
        self.peer_key: PublicKey | None = None
        self.peer_user: str | None = None

    # ------------------------------------------------------------------ properties

    @property
    def established(self) -> bool:
        return self._state is _State.ESTABLISHED

    @property
    def closed(self) -> bool:
        return self._state is _State.CLOSED

    @property
    def can_send(self) -> bool:
        """Application messages may be queued.

        A client may queue requests from the start: they go out right behind its
        ClientAuth, under the application key (0.5-RTT requests, SPEC.md §4.7).
        """
        if self.role is Role.CLIENT:
            return self._state is not _State.CLOSED
        return self._state is _State.ESTABLISHED

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def peer_max_record(self) -> int:
        return self._peer_max_record

    @property
    def stream_slots(self) -> int:
        """Streams we may still open before reaching the peer's ``max_streams``."""
        return max(0, self._peer_max_streams - (len(self._streams) - self._peer_open))

    @property
    def queued_bytes(self) -> int:
        """Encoded application messages queued and not yet sealed into records."""
        return sum(map(len, self._out))

    @property
    def peer_window(self) -> int:
        """Initial credit the peer grants each stream (body bytes before a WINDOW)."""
        return self._peer_window

    @property
    def max_chunk(self) -> int:
        """Largest body one message may carry towards the peer."""
        return self._peer_max_record - _RECORD_OVERHEAD - MESSAGE_OVERHEAD

    def send_credit(self, stream_id: int) -> int:
        """Body bytes we may still send on ``stream_id`` (0 for unknown streams)."""
        s = self._streams.get(stream_id)
        return s.send_credit if s is not None and s.local_open else 0

    def is_open(self, stream_id: int) -> bool:
        return stream_id in self._streams

    # ------------------------------------------------------------------ timers

    def initiate(self, now: float) -> None:
        """Client: queue the ClientHello.  Server: start the handshake clock."""
        self._deadline = now + self.settings.handshake_timeout
        if self.role is Role.SERVER:
            return
        if self._state is not _State.START:
            raise LocalProtocolError("initiate() called twice")
        hello = m.encode(m.ClientHello(PROTOCOL_VERSION, self._ephemeral.public,
                                       self.settings.window, self.settings.max_record,
                                       self.settings.max_streams))
        self._absorb(hello)
        self._wire.append(frame(hello))
        self._state = _State.CLIENT_SENT_HELLO

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must next be called, or None."""
        if self._state in (_State.ESTABLISHED, _State.CLOSED):
            return None
        return self._deadline

    def handle_timer(self, now: float) -> None:
        if self._deadline is not None and now >= self._deadline and self._state not in (
                _State.ESTABLISHED, _State.CLOSED):
            self._fail(HandshakeFailed("handshake timed out", code=Status.TIMEOUT))

    # ------------------------------------------------------------------ receiving

    def receive_data(self, data: bytes) -> list[Event]:
        """Feed bytes from the transport; returns the events they complete."""
        if self._state is _State.CLOSED:
            return []
        self._frames.feed(data)
        if self._state is _State.SERVER_AWAIT_KEY and len(self._frames) > 2 * self.settings.max_record:
            # Bytes pipelined behind ClientAuth wait for the key lookup; bounded.
            self._fail(FrameError("too much data before authentication completed"))
        return self._drain()

    def receive_eof(self) -> list[Event]:
        """The transport closed.  Without a CLOSE first, that is a truncation."""
        if self._state is _State.CLOSED:
            return []
        if self._state is _State.ESTABLISHED and not self._frames:
            exc = FrameError("connection closed without a CLOSE message", code=Status.BAD_REQUEST)
        else:
            exc = FrameError("connection closed in the middle of a record or handshake",
                             code=Status.BAD_REQUEST)
        self._state = _State.CLOSED
        self._clear_streams()
        raise exc

    def _drain(self) -> list[Event]:
        events: list[Event] = []
        try:
            while self._state not in (_State.CLOSED, _State.SERVER_AWAIT_KEY):
                got = self._frames.next_frame()
                if got is None:
                    break
                self._on_frame(got[0], got[1], events)
        except ProtocolError as exc:
            self._fail(exc)
        return events

    def _on_frame(self, header: bytes, payload: bytes, events: list[Event]) -> None:
        st = self._state
        if st is _State.ESTABLISHED:
            self._on_records(self._opener.open(header, payload), events)
        elif st is _State.SERVER_AWAIT_HELLO:
            self._on_client_hello(header, payload)
        elif st is _State.CLIENT_SENT_HELLO:
            if self._opener is None:
                self._on_server_hello(header, payload)
            else:
                self._on_server_auth(self._opener.open(header, payload))
        elif st is _State.SERVER_AWAIT_AUTH:
            self._on_client_auth(self._opener.open(header, payload), events)
        elif st is _State.CLIENT_AWAIT_FINISHED:
            self._on_server_finished(self._opener.open(header, payload), events)
        else:  # pragma: no cover - guarded by _drain
            raise LocalProtocolError(f"frame in state {st}")

    # ------------------------------------------------------------------ handshake (§4)

    def _absorb(self, payload: bytes) -> None:
        self._transcript.update(frame(payload))

    def _hash_with(self, extra: bytes) -> bytes:
        h = self._transcript.copy()
        h.update(frame(extra))
        return h.digest()

    def _single(self, plaintext: bytes, cls: type) -> m.Message:
        obj = unpack(plaintext)
        if type(obj) is not list or len(obj) != 1:
            raise DecodeError("a handshake record carries exactly one message")
        msg = m.decode(obj[0])
        if isinstance(msg, m.Close):
            if msg.status == Status.UNAUTHORIZED:
                raise AuthenticationFailed("authentication failed")
            raise HandshakeFailed(f"peer refused the handshake: {msg.status} {msg.reason}",
                                  code=msg.status)
        if not isinstance(msg, cls):
            raise HandshakeFailed(f"expected {cls.__name__}, got {type(msg).__name__}")
        return msg

    def _plain(self, payload: bytes, cls: type) -> m.Message:
        msg = m.decode(unpack(payload))
        if isinstance(msg, m.Close):
            raise HandshakeFailed(f"peer refused the handshake: {msg.status} {msg.reason}",
                                  code=msg.status)
        if not isinstance(msg, cls):
            raise HandshakeFailed(f"expected {cls.__name__}, got {type(msg).__name__}")
        return msg

    def _derive(self, info: bytes) -> tuple[bytes, bytes]:
        okm = hkdf(self._shared, self._transcript.digest(), info, 64)
        return okm[:32], okm[32:]

    def _learn_peer_settings(self, hello) -> None:
        if hello.version != PROTOCOL_VERSION:
            raise HandshakeFailed(f"unsupported protocol version {hello.version}")
        if (hello.max_record < MIN_RECORD or hello.window < MIN_WINDOW
                or hello.max_streams < MIN_STREAMS):
            raise HandshakeFailed("peer settings below the protocol minimums")
        for s in self._streams.values():   # requests queued before we knew the window
            s.send_credit += hello.window - self._peer_window
        self._peer_window = hello.window
        self._peer_max_record = hello.max_record
        self._peer_max_streams = hello.max_streams

    def _on_client_hello(self, header: bytes, payload: bytes) -> None:
        try:
            hello = self._plain(payload, m.ClientHello)
            self._learn_peer_settings(hello)
        except HandshakeFailed as exc:
            # Still in clear text: tell the client why, in clear text.
            self._wire.append(frame(m.encode(m.Close(Status.BAD_REQUEST, str(exc)))))
            self._state = _State.CLOSED
            raise
        self._absorb(payload)
        self._shared = self._ephemeral.exchange(hello.ephemeral)
        reply = m.encode(m.ServerHello(PROTOCOL_VERSION, self._ephemeral.public,
                                       self.settings.window, self.settings.max_record,
                                       self.settings.max_streams))
        self._absorb(reply)
        self._wire.append(frame(reply))
        c_hs, s_hs = self._derive(_HS_INFO)
        rekey = self.settings.rekey_after
        self._hs_sealer = Sealer(s_hs, self.settings.aead_backend, rekey)
        self._opener = Opener(c_hs, self.settings.aead_backend, rekey)
        der = self._identity.public.der
        signature = self._identity.sign(_SERVER_SIG_CONTEXT + self._hash_with(der))
        auth = _array_header(1) + m.encode(m.ServerAuth(der, signature))
        self._absorb(auth)
        self._wire.append(self._hs_sealer.seal(auth))
        self._state = _State.SERVER_AWAIT_AUTH

    def _on_server_hello(self, header: bytes, payload: bytes) -> None:
        hello = self._plain(payload, m.ServerHello)
        self._learn_peer_settings(hello)
        self._absorb(payload)
        self._shared = self._ephemeral.exchange(hello.ephemeral)
        c_hs, s_hs = self._derive(_HS_INFO)
        rekey = self.settings.rekey_after
        self._hs_sealer = Sealer(c_hs, self.settings.aead_backend, rekey)
        self._opener = Opener(s_hs, self.settings.aead_backend, rekey)

    def _on_server_auth(self, plaintext: bytes) -> None:
        auth = self._single(plaintext, m.ServerAuth)
        # The pinned key is compared byte for byte before any signature work (§4.4).
        if not hmac.compare_digest(auth.public_key, self._pinned.der):
            raise AuthenticationFailed("the node's key does not match the pinned key")
        signed = _SERVER_SIG_CONTEXT + self._hash_with(auth.public_key)
        if not self._pinned.verify(signed, auth.signature):
            raise AuthenticationFailed("the node's signature is invalid")
        self._absorb(plaintext)
        self.peer_key = self._pinned
        user = self._user.encode()
        signature = self._identity.sign(_CLIENT_SIG_CONTEXT + self._hash_with(user))
        record = _array_header(1) + m.encode(m.ClientAuth(self._user, signature))
        self._absorb(record)
        self._wire.append(self._hs_sealer.seal(record))
        c_ap, s_ap = self._derive(_AP_INFO)
        self._sealer = Sealer(c_ap, self.settings.aead_backend, self.settings.rekey_after)
        self._ap_keys = (c_ap, s_ap)
        self._state = _State.CLIENT_AWAIT_FINISHED

    def _on_client_auth(self, plaintext: bytes, events: list[Event]) -> None:
        auth = self._single(plaintext, m.ClientAuth)
        self._sig_input = _CLIENT_SIG_CONTEXT + self._hash_with(auth.user.encode())
        self._client_sig = auth.signature
        self._absorb(plaintext)
        self._claimed_user = auth.user
        self._state = _State.SERVER_AWAIT_KEY
        events.append(AuthenticationRequested(auth.user))

    def complete_auth(self, key: PublicKey | None) -> list[Event]:
        """Server: the claimed user's registered key, or None when there is no such user.

        Unknown user and bad signature end the same way (one generic refusal), and
        an unknown user still costs a signature check so timing does not differ much.
        """
        if self._state is not _State.SERVER_AWAIT_KEY:
            raise LocalProtocolError("complete_auth() without a pending authentication")
        ok = key.verify(self._sig_input, self._client_sig) if key is not None else (
            self._identity.public.verify(self._sig_input, self._client_sig) and False)
        if not ok:
            self._wire.append(self._hs_sealer.seal(
                _array_header(1) + m.encode(m.Close(Status.UNAUTHORIZED,
                                                    "authentication failed"))))
            self._state = _State.CLOSED
            self._clear_streams()
            raise AuthenticationFailed("authentication failed")
        self.peer_key = key
        self.peer_user = self._claimed_user
        c_ap, s_ap = self._derive(_AP_INFO)
        self._wire.append(self._hs_sealer.seal(_array_header(1) + m.encode(m.ServerFinished())))
        self._hs_sealer = None
        self._sealer = Sealer(s_ap, self.settings.aead_backend, self.settings.rekey_after)
        self._opener = Opener(c_ap, self.settings.aead_backend, self.settings.rekey_after)
        self._state = _State.ESTABLISHED
        self._sig_input = self._client_sig = b""
        self._forget_secrets()
        events: list[Event] = [HandshakeCompleted(key, self.peer_user)]
        events.extend(self._drain())
        return events

    def _on_server_finished(self, plaintext: bytes, events: list[Event]) -> None:
        self._single(plaintext, m.ServerFinished)
        self._opener = Opener(self._ap_keys[1], self.settings.aead_backend,
                              self.settings.rekey_after)
        self._ap_keys = None
        self._hs_sealer = None
        self._state = _State.ESTABLISHED
        self._forget_secrets()
        events.append(HandshakeCompleted(self.peer_key, None))

    def _forget_secrets(self) -> None:
        """Forward secrecy in memory too: the ephemeral key and shared secret go."""
        self._ephemeral = None
        self._shared = None

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
            if self._state is _State.CLOSED:
                return

    def _peer_parity(self, stream_id: int) -> bool:
        return (stream_id % 2 == 0) == (self.role is Role.CLIENT)

    def _stream_for_body(self, stream_id: int, size: int) -> _Stream | None:
        s = self._streams.get(stream_id)
        if s is None:
            known = stream_id <= self._last_peer_id if self._peer_parity(stream_id) \
                else stream_id < self._next_id
            if not known:
                raise FlowControlError(f"body on stream {stream_id} that was never opened")
            return None  # a stream we already closed or reset: late bytes are dropped
        if not s.remote_open:
            raise FlowControlError(f"body on stream {stream_id} after its end")
        if size > s.recv_credit:
            raise FlowControlError(
                f"peer sent {size} bytes on stream {stream_id} with {s.recv_credit} of credit")
        s.recv_credit -= size
        return s

    def _drop(self, stream_id: int) -> bool:
        """Forget a stream; True if it was open."""
        if self._streams.pop(stream_id, None) is None:
            return False
        if self._peer_parity(stream_id):
            self._peer_open -= 1
        return True

    def _clear_streams(self) -> None:
        self._streams.clear()
        self._peer_open = 0

    def _finish_remote(self, s: _Stream) -> None:
        s.remote_open = False
        if not s.local_open:
            self._drop(s.id)

    def _on_request(self, msg: m.Request, events: list[Event]) -> None:
        sid = msg.stream_id
        if not self._peer_parity(sid) or sid <= self._last_peer_id or sid == 0:
            raise FlowControlError(f"stream id {sid} is not a new stream of the peer")
        self._last_peer_id = sid
        if len(msg.body) > self.settings.window:
            raise FlowControlError("request body larger than the initial window")
        if self._goaway_sent or self._peer_open >= self.settings.max_streams:
            self._queue(m.Reset(sid, Status.UNAVAILABLE,
                                "going away" if self._goaway_sent else "too many streams"))
            return
        s = _Stream(sid, self._peer_window, self.settings.window - len(msg.body))
        if msg.end:
            s.remote_open = False
        self._streams[sid] = s
        self._peer_open += 1
        events.append(RequestReceived(sid, msg.method, msg.path, msg.token, msg.args,
                                      msg.headers, msg.body, msg.end, msg.envelope))

    def _on_response(self, msg: m.Response, events: list[Event]) -> None:
        s = self._stream_for_body(msg.stream_id, len(msg.body))
        if self._peer_parity(msg.stream_id):
            raise FlowControlError("response on a stream the peer opened")
        if s is None:
            return
        if s.head:
            raise FlowControlError(f"second response on stream {msg.stream_id}")
        s.head = True
        if msg.end:
            self._finish_remote(s)
        events.append(ResponseReceived(msg.stream_id, msg.status, msg.headers, msg.body,
                                       msg.end))

    def _on_data(self, msg: m.Data, events: list[Event]) -> None:
        s = self._stream_for_body(msg.stream_id, len(msg.body))
        if s is None:
            return
        if not s.head and not self._peer_parity(msg.stream_id):
            raise FlowControlError(f"response body before the response on stream {s.id}")
        if msg.end:
            self._finish_remote(s)
        events.append(DataReceived(msg.stream_id, msg.body, msg.end))

    def _on_window(self, msg: m.Window, events: list[Event]) -> None:
        s = self._streams.get(msg.stream_id)
        if s is None:
            return
        if s.send_credit + msg.credit > m.MAX_CREDIT:
            raise FlowControlError("window credit overflow")
        s.send_credit += msg.credit
        events.append(WindowUpdated(msg.stream_id, msg.credit))

    def _on_reset(self, msg: m.Reset, events: list[Event]) -> None:
        if self._drop(msg.stream_id):
            events.append(StreamReset(msg.stream_id, msg.status, msg.reason))

    def _on_ping(self, msg: m.Ping, events: list[Event]) -> None:
        self._queue(m.Pong(msg.opaque))

    def _on_pong(self, msg: m.Pong, events: list[Event]) -> None:
        events.append(PongReceived(msg.opaque))

    def _on_goaway(self, msg: m.GoAway, events: list[Event]) -> None:
        self._goaway_received = True
        events.append(GoAwayReceived(msg.last_stream_id, msg.reason))

    def _on_close(self, msg: m.Close, events: list[Event]) -> None:
        self._close_received = True
        self._state = _State.CLOSED
        self._clear_streams()
        self._out.clear()          # nothing is sent after the peer's CLOSE (§7.7)
        events.append(ConnectionClosed(msg.status, msg.reason))

    _HANDLERS = {
        m.Request: _on_request, m.Response: _on_response, m.Data: _on_data,
        m.Window: _on_window, m.Reset: _on_reset, m.Ping: _on_ping, m.Pong: _on_pong,
        m.GoAway: _on_goaway, m.Close: _on_close,
    }

    # ------------------------------------------------------------------ sending

    def _queue(self, msg: m.Message) -> None:
        if self._state is _State.CLOSED:
            raise LocalProtocolError("connection is closed")
        self._out.append(self._fits(m.encode(msg)))

    def _fits(self, data: bytes) -> bytes:
        # Refuse what could never be sealed now, before anything is sent: failing
        # later in _flush would leave earlier messages queued after their record
        # went out (sent twice).  The peer's limit only grows from MIN_RECORD.
        if len(data) > self._peer_max_record - _RECORD_OVERHEAD:
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
        if self._goaway_received:
            raise LocalProtocolError("peer is going away: no new streams")
        if not self.stream_slots:
            raise LocalProtocolError("too many open streams for the peer's limit")
        if len(body) > self._peer_window:
            raise LocalProtocolError("request body exceeds the peer's initial window")
        sid = self._next_id
        data = self._checked(m.Request(sid, method.upper(), path, token, args, headers or {},
                                       bytes(body), end, envelope))
        self._next_id += 2
        self._out.append(data)
        s = _Stream(sid, self._peer_window - len(body), self.settings.window)
        s.local_open = not end
        self._streams[sid] = s
        return sid

    def _consume_send(self, stream_id: int, size: int, end: bool) -> _Stream:
        s = self._streams.get(stream_id)
        if s is None or not s.local_open:
            raise LocalProtocolError(f"stream {stream_id} is not open for sending")
        if size > s.send_credit:
            raise LocalProtocolError(
                f"{size} bytes exceed the {s.send_credit} bytes of credit on stream {stream_id}")
        if size > self.max_chunk:
            raise LocalProtocolError(f"chunk of {size} bytes exceeds {self.max_chunk}")
        s.send_credit -= size
        if end:
            s.local_open = False
            if not s.remote_open:
                self._drop(stream_id)
        return s

    def send_response(self, stream_id: int, status: int, *, headers: dict | None = None,
                      body: bytes = b"", end: bool = True) -> None:
        self._check_sendable()
        if not self._peer_parity(stream_id):
            raise LocalProtocolError("responses go on streams the peer opened")
        st = self._streams.get(stream_id)
        if st is not None and st.head:
            raise LocalProtocolError(f"stream {stream_id} already has its response")
        data = self._checked(m.Response(stream_id, int(status), headers or {}, bytes(body),
                                        end))
        self._consume_send(stream_id, len(body), end).head = True
        self._out.append(data)

    def send_data(self, stream_id: int, data: bytes, end: bool = False) -> None:
        self._check_sendable()
        st = self._streams.get(stream_id)
        if st is not None and not st.head and self._peer_parity(stream_id):
            raise LocalProtocolError(f"stream {stream_id}: DATA before the response")
        self._consume_send(stream_id, len(data), end)
        self._queue(m.Data(stream_id, bytes(data), end))

    def acknowledge(self, stream_id: int, size: int, *, force: bool = False) -> None:
        """The application consumed ``size`` body bytes of ``stream_id``: return credit.

        WINDOW messages are batched: one goes out once a quarter of the window has
        been consumed (or at once with ``force``).
        """
        s = self._streams.get(stream_id)
        if s is None or not s.remote_open or self._state is _State.CLOSED:
            return
        s.unacked += size
        if s.unacked >= self.settings.window // 4 or (force and s.unacked):
            s.recv_credit += s.unacked
            self._queue(m.Window(stream_id, s.unacked))
            s.unacked = 0

    def reset_stream(self, stream_id: int, status: int = Status.CANCELLED,
                     reason: str = "") -> None:
        """Abort a stream both ways; late bytes from the peer for it are dropped."""
        if self._drop(stream_id) and self.can_send:
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
            self._queue(m.GoAway(self._last_peer_id, reason[:m.MAX_REASON]))

    def close(self, status: int = Status.OK, reason: str = "") -> None:
        """Queue a CLOSE (when keys allow it) and stop; ``data_to_send`` has the last bytes."""
        if self._state is _State.CLOSED:
            return
        msg = m.Close(int(status), reason[:m.MAX_REASON])
        if self._sealer is not None:
            self._out.append(m.encode(msg))
        elif self._hs_sealer is not None:
            self._flush()
            self._wire.append(self._hs_sealer.seal(_array_header(1) + m.encode(msg)))
        self._flush()
        self._state = _State.CLOSED
        self._clear_streams()

    def _fail(self, exc: ProtocolError) -> None:
        """Close after an error, telling the peer when we still can, then re-raise."""
        if self._state is not _State.CLOSED and not self._close_received:
            code = exc.code if not isinstance(exc, AuthenticationFailed) else Status.UNAUTHORIZED
            reason = "authentication failed" if isinstance(exc, AuthenticationFailed) else str(exc)
            try:
                self.close(code, reason)
            except ProtocolError:  # pragma: no cover - best effort
                pass
        self._out.clear()
        self._state = _State.CLOSED
        self._clear_streams()
        raise exc

    def _flush(self) -> None:
        """Seal queued messages into as few records as the peer's limit allows."""
        out = self._out
        if not out or self._sealer is None:
            return
        limit = self._peer_max_record - _RECORD_OVERHEAD
        seal = self._sealer.seal
        wire = self._wire
        batch: list[bytes] = []
        size = 0
        for item in out:
            if batch and size + len(item) > limit:
                wire.append(seal(_array_header(len(batch)) + b"".join(batch)))
                batch, size = [], 0
            if len(item) > limit:
                raise LocalProtocolError("a message larger than the peer's record limit")
            batch.append(item)
            size += len(item)
        if batch:
            wire.append(seal(_array_header(len(batch)) + b"".join(batch)))
        out.clear()

    def data_to_send(self) -> bytes:
        """Everything to write now, coalesced; empty when there is nothing."""
        if self._out and self._sealer is not None:
            self._flush()
        if not self._wire:
            return b""
        data = b"".join(self._wire) if len(self._wire) > 1 else self._wire[0]
        self._wire.clear()
        return data
