"""The handshake (SPEC.md §4): its state table, and the transcript and keys of one run.

Two parts, kept apart on purpose:

* :data:`TRANSITIONS`, the state machine of SPEC.md §4.9 written once as a table
  ``(role, state, handshake message) -> next state``, and :func:`advance`, the one
  function that applies it.  Every handshake message, sent or received, moves a
  connection exactly one step; a message the table does not list for the current
  state is an error: the peer's (:class:`HandshakeFailed`, CLOSE 400) when the
  peer sent it, ours (:class:`LocalProtocolError`) when we would send it.
  Closing (an error, a CLOSE, the deadline) leads from any state to CLOSED and
  is not in the table, as h11 keeps its ERROR state out of its event table.
* :class:`Handshake`, the transcript and key schedule of one run (§4.3-§4.6): it
  builds and checks the handshake messages and hands the connection its
  application keys.  The connection drops it when the handshake ends, and with it
  the ephemeral secret and the shared secret (forward secrecy in memory too).
"""
from __future__ import annotations

import enum
import hashlib
import hmac
from typing import TYPE_CHECKING

from . import messages as m
from .crypto import Ephemeral, PrivateKey, PublicKey, hkdf
from .errors import AuthenticationFailed, DecodeError, HandshakeFailed, LocalProtocolError
from .frame import frame, unpack
from .record import Opener, Sealer, array_header, seal_one

if TYPE_CHECKING:  # pragma: no cover
    from .settings import Settings

__all__ = ["Role", "State", "TRANSITIONS", "AWAITS", "advance", "check_hello", "Handshake",
           "PROTOCOL_VERSION", "PROLOGUE", "MIN_WINDOW", "MIN_RECORD", "MIN_STREAMS",
           "MAX_HANDSHAKE_FRAME"]

PROTOCOL_VERSION = 1
#: Absorbed first into the transcript: binds every signature to this protocol.
PROLOGUE = b"utesla protocol 1"
_SERVER_SIG_CONTEXT = b"utesla/1 server signature\x00"
_CLIENT_SIG_CONTEXT = b"utesla/1 client signature\x00"
_HS_INFO = b"utesla/1 handshake keys"
_AP_INFO = b"utesla/1 application keys"
#: Every peer grants at least this much (SPEC.md §4.2), so a client can queue
#: requests before it has heard the node's settings.
MIN_WINDOW = 65536
MIN_STREAMS = 16
MIN_RECORD = 16384

#: Largest frame accepted while a handshake message is awaited (SPEC.md §4.1).  The
#: largest handshake message the schema allows is a ServerAuth with a 4096-byte key
#: and a 1024-byte signature: 5151 bytes as a record (tag, array header, map and
#: field headers included).  An RSA-8192 identity, the largest allowed, needs 2 117
#: (its SubjectPublicKeyInfo is 1 062 bytes, its signature 1 024); a ClientAuth at
#: most 1 566 (a 128-character name of 4-byte characters and that signature); the
#: hellos about 60.  8 KiB leaves margin over all of them, and means a peer that has
#: not authenticated anything cannot make us wait for (and buffer) a bigger frame.
MAX_HANDSHAKE_FRAME = 8192


class Role(enum.Enum):
    CLIENT = "client"
    SERVER = "server"


class State(enum.Enum):
    """Where a connection is (SPEC.md §4.9); one enum for both roles."""

    START = "start"                                  # client, before initiate()
    CLIENT_SENT_HELLO = "client sent hello"
    CLIENT_AWAIT_AUTH = "client awaits ServerAuth"   # ServerHello in: handshake keys known
    CLIENT_AWAIT_FINISHED = "client awaits ServerFinished"
    SERVER_AWAIT_HELLO = "server awaits ClientHello"
    SERVER_AWAIT_AUTH = "server awaits ClientAuth"
    SERVER_AWAIT_KEY = "server awaits the user's key"    # the application looks the user up
    ESTABLISHED = "established"
    CLOSED = "closed"


_C, _S = Role.CLIENT, Role.SERVER

#: Which side sends each handshake message.
SENDER: dict[type, Role] = {
    m.ClientHello: _C, m.ServerHello: _S, m.ServerAuth: _S, m.ClientAuth: _C,
    m.ServerFinished: _S,
}

#: ``(role, state, message) -> next state``: the whole handshake (SPEC.md §4.9).
#: Messages a transition sends in reply (ServerHello and ServerAuth after a
#: ClientHello, ClientAuth after a ServerAuth) are part of the step, not steps.
TRANSITIONS: dict[tuple[Role, State, type], State] = {
    (_C, State.START, m.ClientHello): State.CLIENT_SENT_HELLO,                  # sent
    (_C, State.CLIENT_SENT_HELLO, m.ServerHello): State.CLIENT_AWAIT_AUTH,
    (_C, State.CLIENT_AWAIT_AUTH, m.ServerAuth): State.CLIENT_AWAIT_FINISHED,   # + ClientAuth
    (_C, State.CLIENT_AWAIT_FINISHED, m.ServerFinished): State.ESTABLISHED,
    (_S, State.SERVER_AWAIT_HELLO, m.ClientHello): State.SERVER_AWAIT_AUTH,     # + SH, SA
    (_S, State.SERVER_AWAIT_AUTH, m.ClientAuth): State.SERVER_AWAIT_KEY,
    (_S, State.SERVER_AWAIT_KEY, m.ServerFinished): State.ESTABLISHED,          # sent
}

#: ``(role, state) -> message the peer owes us next``, read off the table.  In a
#: state not listed (START, SERVER_AWAIT_KEY, ESTABLISHED, CLOSED) no handshake
#: message is awaited from the peer.
AWAITS: dict[tuple[Role, State], type] = {
    (role, state): msg for (role, state, msg) in TRANSITIONS if SENDER[msg] is not role}

#: Handshake messages that travel as clear frames; the others are records (§4.1).
CLEAR = (m.ClientHello, m.ServerHello)


def advance(role: Role, state: State, msg: type, *, sent: bool = False) -> State:
    """The state after ``role`` receives (or, with ``sent``, sends) a ``msg`` in ``state``.

    Anything the table does not allow raises: :class:`LocalProtocolError` for a
    message we were about to send, :class:`HandshakeFailed` for one the peer sent
    (including a message only our side may send, e.g. a ServerHello to a server).
    """
    nxt = TRANSITIONS.get((role, state, msg))
    if nxt is not None and (SENDER[msg] is role) == sent:
        return nxt
    if sent:
        raise LocalProtocolError(f"cannot send {msg.__name__} in state '{state.value}'")
    expected = AWAITS.get((role, state))
    wanted = expected.__name__ if expected is not None else "nothing"
    raise HandshakeFailed(f"expected {wanted}, got {msg.__name__}")


def check_hello(hello) -> None:
    """A hello's version and settings are acceptable (SPEC.md §4.2), or HandshakeFailed."""
    if hello.version != PROTOCOL_VERSION:
        raise HandshakeFailed(f"unsupported protocol version {hello.version}")
    if (hello.max_record < MIN_RECORD or hello.window < MIN_WINDOW
            or hello.max_streams < MIN_STREAMS):
        raise HandshakeFailed("peer settings below the protocol minimums")


class Handshake:
    """The transcript and keys of one handshake run, for one role (SPEC.md §4.3-§4.6).

    The connection calls one method per handshake message, in the order the state
    table allows; each returns the bytes to send in reply and the keys that come
    into use.  Nothing here changes the connection's state.
    """

    def __init__(self, role: Role, identity: PrivateKey, settings: "Settings", *,
                 user: str | None = None, pinned: PublicKey | None = None,
                 ephemeral_secret: bytes | None = None):
        self.role = role
        self.settings = settings
        self._identity = identity
        self._user = user
        self._pinned = pinned
        self.ephemeral = Ephemeral(ephemeral_secret)
        self._shared: bytes | None = None
        self._transcript = hashlib.sha256(PROLOGUE)
        #: Our handshake key (CLOSE during the handshake is sealed with it) and the peer's.
        self.sealer: Sealer | None = None
        self.opener: Opener | None = None
        self._peer_app_key: bytes | None = None     # client: s_ap, used on ServerFinished
        self._sig_input = b""                       # server: what the client signed
        self._client_sig = b""
        #: Server: the user the ClientAuth names, until its key is checked.
        self.claimed_user: str | None = None
        #: Client: the node's key, once its ServerAuth has been verified against it.
        self.peer_key: PublicKey | None = None

    # ------------------------------------------------------------------ helpers

    def _absorb(self, payload: bytes) -> None:
        self._transcript.update(frame(payload))

    def _hash_with(self, extra: bytes) -> bytes:
        h = self._transcript.copy()
        h.update(frame(extra))
        return h.digest()

    def _derive(self, info: bytes) -> tuple[bytes, bytes]:
        okm = hkdf(self._shared, self._transcript.digest(), info, 64)
        return okm[:32], okm[32:]

    def _hello(self, cls: type) -> bytes:
        s = self.settings
        return m.encode(cls(PROTOCOL_VERSION, self.ephemeral.public, s.window, s.max_record,
                            s.max_streams))

    def _sealer(self, key: bytes) -> Sealer:
        return Sealer(key, self.settings.aead_backend, self.settings.rekey_after)

    def _opener(self, key: bytes) -> Opener:
        return Opener(key, self.settings.aead_backend, self.settings.rekey_after)

    # ------------------------------------------------------------------ reading

    def read(self, expected: type, header: bytes, payload: bytes) -> tuple[m.Message, bytes]:
        """Decode the frame that should carry ``expected``: ``(message, bytes to absorb)``.

        Hellos come as clear frames, the rest as handshake records holding exactly
        one message.  A CLOSE in their place ends the handshake (status 401 in a
        record: the generic refusal, §4.6).  Whether the message is the one the
        state awaits is for :func:`advance` to say.
        """
        if expected in CLEAR:
            msg = m.decode(unpack(payload))
            if isinstance(msg, m.Close):
                raise HandshakeFailed(f"peer refused the handshake: {msg.status} {msg.reason}",
                                      code=msg.status)
            return msg, payload
        plaintext = self.opener.open(header, payload)
        obj = unpack(plaintext)
        if type(obj) is not list or len(obj) != 1:
            raise DecodeError("a handshake record carries exactly one message")
        msg = m.decode(obj[0])
        if isinstance(msg, m.Close):
            if msg.status == 401:
                raise AuthenticationFailed("authentication failed")
            raise HandshakeFailed(f"peer refused the handshake: {msg.status} {msg.reason}",
                                  code=msg.status)
        return msg, plaintext

    def close_frame(self, close: bytes) -> bytes | None:
        """The wire form of an encoded CLOSE sent during the handshake (SPEC.md §4.8).

        Under our handshake key once we have one; before that the server sends it
        as a clear frame (nothing secret can be in it, and the client learns why it
        was refused), while the client, which has not heard a proven node yet, sends
        nothing.
        """
        if self.sealer is not None:
            return seal_one(self.sealer, close)
        if self.role is Role.SERVER:
            return frame(close)
        return None

    # ------------------------------------------------------------------ client side

    def client_hello(self) -> bytes:
        """The ClientHello frame."""
        hello = self._hello(m.ClientHello)
        self._absorb(hello)
        return frame(hello)

    def server_hello(self, payload: bytes, hello: m.ServerHello) -> None:
        """Agree on the shared secret; the handshake keys come into use."""
        self._absorb(payload)
        self._shared = self.ephemeral.exchange(hello.ephemeral)
        c_hs, s_hs = self._derive(_HS_INFO)
        self.sealer = self._sealer(c_hs)
        self.opener = self._opener(s_hs)

    def server_auth(self, plaintext: bytes, auth: m.ServerAuth) -> tuple[bytes, Sealer]:
        """Check the node (§4.4) and answer: ``(ClientAuth record, our application sealer)``."""
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
        record = array_header(1) + m.encode(m.ClientAuth(self._user, signature))
        self._absorb(record)
        client_auth = self.sealer.seal(record)
        c_ap, s_ap = self._derive(_AP_INFO)
        self._peer_app_key = s_ap
        return client_auth, self._sealer(c_ap)

    def server_finished(self) -> Opener:
        """The node accepted us: its application opener."""
        return self._opener(self._peer_app_key)

    # ------------------------------------------------------------------ server side

    def server_flight(self, payload: bytes, hello: m.ClientHello) -> bytes:
        """Answer a ClientHello: the ServerHello frame and the ServerAuth record (§4.4)."""
        self._absorb(payload)
        self._shared = self.ephemeral.exchange(hello.ephemeral)
        reply = self._hello(m.ServerHello)
        self._absorb(reply)
        c_hs, s_hs = self._derive(_HS_INFO)
        self.sealer = self._sealer(s_hs)
        self.opener = self._opener(c_hs)
        der = self._identity.public.der
        signature = self._identity.sign(_SERVER_SIG_CONTEXT + self._hash_with(der))
        auth = array_header(1) + m.encode(m.ServerAuth(der, signature))
        self._absorb(auth)
        return frame(reply) + self.sealer.seal(auth)

    def client_auth(self, plaintext: bytes, auth: m.ClientAuth) -> None:
        """Keep what the client signed; the application looks the user's key up."""
        self._sig_input = _CLIENT_SIG_CONTEXT + self._hash_with(auth.user.encode())
        self._client_sig = auth.signature
        self._absorb(plaintext)
        self.claimed_user = auth.user

    def verify_client(self, key: PublicKey | None) -> bool:
        """Does ``key`` (None: no such user) verify the client's signature (§4.5, §4.6)?

        An unknown user still costs one verification, with our own key standing
        in, so the time taken does not tell whether the name exists.
        """
        if key is None:
            self._identity.public.verify(self._sig_input, self._client_sig)
            return False
        return key.verify(self._sig_input, self._client_sig)

    def server_finished_flight(self) -> tuple[bytes, Sealer, Opener]:
        """Accept the client: ``(ServerFinished record, our sealer, its opener)``."""
        c_ap, s_ap = self._derive(_AP_INFO)
        finished = seal_one(self.sealer, m.encode(m.ServerFinished()))
        return finished, self._sealer(s_ap), self._opener(c_ap)
