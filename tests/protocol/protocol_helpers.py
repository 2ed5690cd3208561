"""Helpers for the protocol tests (in the spirit of h11's ``tests/helpers.py``).

* :func:`key` - identity keys, generated once per test session (RSA is slow).
* :class:`Pair` - an in-memory client/server pair of :class:`protocol.Connection`.
* :func:`shuttle` - moves bytes both ways until nothing moves, answering
  ``AuthenticationRequested`` from a ``user -> PublicKey`` dict, optionally
  tampering with every frame on the way (flip, drop, replace, reorder).
* raw injection helpers that reach into a connection's record sealer, so tests
  can send well-authenticated records carrying arbitrary (bad) plaintext.

This module is imported by name (``from protocol_helpers import ...``): pytest's
default import mode puts this directory on ``sys.path``.  Its name is unique in
the test tree on purpose.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Iterable

from hypothesis import HealthCheck, settings

from protocol import AuthenticationRequested, Connection, ProtocolError, Role, Settings
from protocol import messages as m
from protocol.crypto import Ephemeral, PrivateKey, PublicKey
from protocol.frame import HEADER, frame, pack
from protocol.record import REKEY_AFTER, Opener, Sealer

__all__ = [
    "PROPERTY", "KEY_KINDS", "key", "Backends", "BACKEND_MATRIX", "Run", "Pair", "shuttle", "split_frames",
    "flip", "plaintext_of", "seal_raw", "reseal", "unseal", "plain_frame", "send_raw", "send_messages", "to_maps", "drive_to_end",
    "LOW_ORDER_X25519", "SMALL_ORDER_ED25519", "ed25519_der",
]

#: Hypothesis settings for this suite (applied per test, never as a global profile):
#: deterministic, no deadline (a handshake costs milliseconds), no example database.
PROPERTY = settings(deadline=None, max_examples=60, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])

#: name -> (PrivateKey.generate kind, bits)
KEY_KINDS = {"ed25519": ("ed25519", 0), "rsa2048": ("rsa", 2048), "rsa3072": ("rsa", 3072)}


@functools.lru_cache(maxsize=None)
def key(kind: str = "ed25519", index: int = 0) -> PrivateKey:
    """The ``index``-th identity key of ``kind`` (cached for the whole session)."""
    generate_kind, bits = KEY_KINDS[kind]
    if generate_kind == "rsa":
        return PrivateKey.generate("rsa", bits)
    return PrivateKey.generate("ed25519")


# --------------------------------------------------------------------------- backends

@dataclass(frozen=True)
class Backends:
    """Which AEAD and X25519 implementation each side uses."""

    client_aead: str | None = None
    server_aead: str | None = None
    client_ephemeral: str | None = None
    server_ephemeral: str | None = None

    @property
    def id(self) -> str:
        short = {"pycryptodome": "pycd", "cryptography": "ossl", None: "default"}
        return (f"aead={short[self.client_aead]}/{short[self.server_aead]},"
                f"x25519={short[self.client_ephemeral]}/{short[self.server_ephemeral]}")


#: Every in-memory suite that takes the ``backends`` fixture runs once per entry.
BACKEND_MATRIX = [
    Backends("cryptography", "cryptography", "cryptography", "cryptography"),
    Backends("pycryptodome", "pycryptodome", "pycryptodome", "pycryptodome"),
    Backends("pycryptodome", "cryptography", "cryptography", "pycryptodome"),
    Backends("cryptography", "pycryptodome", "pycryptodome", "cryptography"),
]


# --------------------------------------------------------------------------- wire helpers

def split_frames(data: bytes) -> list[bytes]:
    """Cut a byte string produced by ``data_to_send()`` into frames (header included)."""
    out, pos = [], 0
    while pos < len(data):
        if len(data) - pos < 4:
            out.append(data[pos:])
            break
        (length,) = HEADER.unpack_from(data, pos)
        out.append(data[pos:pos + 4 + length])
        pos += 4 + length
    return out


def flip(data: bytes, position: int, bit: int = 0) -> bytes:
    """``data`` with bit ``bit`` of byte ``position`` inverted."""
    b = bytearray(data)
    b[position] ^= 1 << bit
    return bytes(b)


def to_maps(*msgs) -> list:
    """Wire maps of messages; anything else (hand-made bad maps) passes through untouched."""
    return [m.to_map(mm) if isinstance(mm, m.Message) else mm for mm in msgs]


def plaintext_of(*msgs) -> bytes:
    """The record plaintext carrying ``msgs`` (a msgpack array of maps)."""
    return pack(to_maps(*msgs))


def seal_raw(conn: Connection, plaintext: bytes) -> bytes:
    """Seal ``plaintext`` as ``conn``'s next application record (a test back door)."""
    sealer = conn._sealer if conn._sealer is not None else conn._handshake.sealer
    assert sealer is not None, "connection has no keys yet"
    return sealer.seal(plaintext)


def reseal(key_bytes: bytes, plaintext: bytes, counter: int = 0) -> bytes:
    """A record sealed under ``key_bytes`` at ``counter`` (to forge handshake records)."""
    sealer = Sealer(key_bytes, None, REKEY_AFTER)
    sealer.counter = counter
    return sealer.seal(plaintext)


def unseal(key_bytes: bytes, record: bytes, counter: int = 0) -> bytes:
    """The plaintext of a wire record sealed under ``key_bytes`` at ``counter``."""
    opener = Opener(key_bytes, None, REKEY_AFTER)
    opener.counter = counter
    return opener.open(record[:4], record[4:])


def plain_frame(*msgs) -> bytes:
    """A clear-text handshake frame (ClientHello / ServerHello / CLOSE before keys)."""
    (only,) = to_maps(*msgs)
    return frame(pack(only))


def send_raw(src: Connection, dst: Connection, plaintext: bytes):
    """Flush ``src``, then deliver one record with ``plaintext`` to ``dst``; returns events."""
    pending = src.data_to_send()
    return dst.receive_data(pending + seal_raw(src, plaintext))


def send_messages(src: Connection, dst: Connection, *msgs):
    return send_raw(src, dst, plaintext_of(*msgs))


# --------------------------------------------------------------------------- the pair

Tamper = Callable[[str, int, bytes], "bytes | None"]


@dataclass
class Run:
    """What happened during one :func:`shuttle`."""

    client_events: list = field(default_factory=list)
    server_events: list = field(default_factory=list)
    client_error: ProtocolError | None = None
    server_error: ProtocolError | None = None
    #: frames as each side produced them (before any tampering)
    c2s: list = field(default_factory=list)
    s2c: list = field(default_factory=list)
    #: the bytes actually delivered to each side (after tampering)
    to_server: list = field(default_factory=list)
    to_client: list = field(default_factory=list)

    def events(self, role: str) -> list:
        return self.client_events if role == "client" else self.server_events

    def of_type(self, role: str, cls) -> list:
        return [e for e in self.events(role) if isinstance(e, cls)]

    @property
    def errors(self) -> list:
        return [e for e in (self.client_error, self.server_error) if e is not None]


def _feed(conn: Connection, data: bytes, users, events: list, chunk: int | None) -> None:
    pieces: Iterable[bytes]
    if chunk:
        pieces = (data[i:i + chunk] for i in range(0, len(data), chunk))
    else:
        pieces = (data,)
    for piece in pieces:
        got = conn.receive_data(piece)
        events.extend(got)
        # Answer authentication requests the way the node does (dict lookup).
        while users is not None and got and isinstance(got[-1], AuthenticationRequested):
            got = conn.complete_auth(users.get(got[-1].user))
            events.extend(got)


def shuttle(client: Connection, server: Connection, users: dict[str, PublicKey] | None = None,
            *, tamper: Tamper | None = None, catch: bool = False, chunk: int | None = None,
            run: Run | None = None, max_rounds: int = 200) -> Run:
    """Move bytes both ways until neither side has anything to send.

    ``users`` answers ``AuthenticationRequested`` (None: leave it pending).
    ``tamper(direction, index, frame)`` sees every frame ("c2s"/"s2c", counted
    per direction over the whole run) and returns the bytes to deliver instead
    (None drops it).  With ``catch`` a :class:`ProtocolError` is recorded on the
    run and the other side still receives whatever the failing side queued (its
    CLOSE); without it the error propagates.  Any other exception propagates.
    ``chunk`` feeds received bytes in pieces of that size.
    """
    run = run or Run()
    counters = {"c2s": len(run.c2s), "s2c": len(run.s2c)}
    for _ in range(max_rounds):
        moved = False
        for src, dst, direction in ((client, server, "c2s"), (server, client, "s2c")):
            data = src.data_to_send()
            if not data:
                continue
            moved = True
            frames = split_frames(data)
            getattr(run, direction).extend(frames)
            if tamper is not None:
                kept = []
                for f in frames:
                    replaced = tamper(direction, counters[direction], f)
                    counters[direction] += 1
                    if replaced is not None:
                        kept.append(replaced)
                data = b"".join(kept)
            else:
                counters[direction] += len(frames)
            if not data:
                continue
            is_server = dst is server
            (run.to_server if is_server else run.to_client).append(data)
            events = run.server_events if is_server else run.client_events
            try:
                _feed(dst, data, users if is_server else None, events, chunk)
            except ProtocolError as exc:
                if not catch:
                    raise
                if is_server:
                    run.server_error = run.server_error or exc
                else:
                    run.client_error = run.client_error or exc
        if not moved:
            return run
    raise AssertionError("the two peers never went quiet")


def drive_to_end(pair: "Pair", run: Run) -> Run:
    """Finish a failed exchange: any side still open sees EOF (a truncation)."""
    for role, conn in (("client", pair.client), ("server", pair.server)):
        if not conn.closed:
            try:
                conn.receive_eof()
            except ProtocolError as exc:
                if role == "client":
                    run.client_error = run.client_error or exc
                else:
                    run.server_error = run.server_error or exc
    return run


class Pair:
    """A client and a server :class:`Connection`, wired in memory."""

    def __init__(self, node_key: PrivateKey | None = None, user_key: PrivateKey | None = None, *,
                 user: str = "alice", users: dict | None = None,
                 pinned: PublicKey | None = None, settings: Settings | None = None,
                 client_settings: Settings | None = None,
                 server_settings: Settings | None = None,
                 backends: Backends | None = None,
                 secrets: tuple[bytes | None, bytes | None] = (None, None),
                 now: float = 0.0, initiate: bool = True):
        self.node_key = node_key or key("ed25519", 0)
        self.user_key = user_key or key("ed25519", 1)
        b = backends or Backends()
        cs = client_settings or settings or Settings()
        ss = server_settings or settings or Settings()
        if b.client_aead is not None and cs.aead_backend is None:
            cs = _replace(cs, aead_backend=b.client_aead)
        if b.server_aead is not None and ss.aead_backend is None:
            ss = _replace(ss, aead_backend=b.server_aead)
        self.client = Connection(Role.CLIENT, identity=self.user_key, settings=cs, user=user,
                                 server_key=pinned or self.node_key.public,
                                 ephemeral_secret=secrets[0])
        self.server = Connection(Role.SERVER, identity=self.node_key, settings=ss,
                                 ephemeral_secret=secrets[1])
        # The connection takes no X25519 backend option: swap the key pair for one
        # made by the wanted backend (same secret, so deterministic runs stay so).
        if b.client_ephemeral is not None:
            self.client._handshake.ephemeral = Ephemeral(secrets[0], backend=b.client_ephemeral)
        if b.server_ephemeral is not None:
            self.server._handshake.ephemeral = Ephemeral(secrets[1], backend=b.server_ephemeral)
        self.users = {user: self.user_key.public} if users is None else users
        if initiate:
            self.server.initiate(now)
            self.client.initiate(now)

    def shuttle(self, **kw) -> Run:
        return shuttle(self.client, self.server, self.users, **kw)

    def handshake(self, **kw) -> Run:
        run = self.shuttle(**kw)
        assert self.client.established and self.server.established, run
        return run

    @classmethod
    def established(cls, *args, **kw) -> "Pair":
        pair = cls(*args, **kw)
        pair.handshake()
        return pair


def _replace(settings: Settings, **changes) -> Settings:
    from dataclasses import replace
    return replace(settings, **changes)


# --------------------------------------------------------------------------- weak keys

#: X25519 public keys of small order (and their high-bit twins, which RFC 7748
#: masks to the same value): all give an all-zero shared secret.
_LOW = [
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0100000000000000000000000000000000000000000000000000000000000000",
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
]
LOW_ORDER_X25519 = [bytes.fromhex(h) for h in _LOW]
LOW_ORDER_X25519 += [p[:31] + bytes([p[31] | 0x80]) for p in LOW_ORDER_X25519]

#: The eight canonical encodings of Ed25519 points of small order (the torsion subgroup).
SMALL_ORDER_ED25519 = [bytes.fromhex(h) for h in (
    "0100000000000000000000000000000000000000000000000000000000000000",  # identity
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",  # order 2
    "0000000000000000000000000000000000000000000000000000000000000000",  # order 4
    "0000000000000000000000000000000000000000000000000000000000000080",  # order 4
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac037a",  # order 8
    "c7176a703d4dd84fba3c0b760d10670f2a2053fa2c39ccc64ec7fd7792ac03fa",  # order 8
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc05",  # order 8
    "26e8958fc2b227b045c3f489f2ef98f0d5dfac05d3c63339b13802886d53fc85",  # order 8
)]


def ed25519_der(raw: bytes) -> bytes:
    """SubjectPublicKeyInfo DER of a raw 32-byte Ed25519 public key."""
    return bytes.fromhex("302a300506032b6570032100") + raw
