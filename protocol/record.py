"""The AEAD record layer (SPEC.md §5).

A record is ``uint32 length || ChaCha20-Poly1305(key, nonce, aad=length, plaintext)``
where the nonce is the per-direction record counter (never sent: a replayed,
reordered, dropped or foreign record fails authentication), and the length
prefix is the associated data (so it cannot be altered either).  After
``rekey_after`` records a direction's key is replaced by
``HKDF(ikm=key, salt="", info="utesla/1 rekey")`` and its counter restarts at 0,
so no counter ever wraps and no key seals more than ``rekey_after`` records.

A record's plaintext is a msgpack array of encoded messages (§5.4): handshake
records hold exactly one (:func:`seal_one`); application messages are coalesced
into as few records as the peer's limit allows (:func:`seal_batches`), so a busy
connection pays one seal and one write per batch instead of per message.
"""
from __future__ import annotations

import struct

from .crypto import TAG_LEN, aead_class, hkdf, nonce
from .errors import FrameError, LocalProtocolError, RemoteProtocolError
from .frame import HEADER

__all__ = ["REKEY_AFTER", "MAX_EPOCH", "RECORD_OVERHEAD", "Sealer", "Opener", "next_key",
           "array_header", "seal_one", "seal_batches"]

#: Records sealed under one key before the implicit key update (SPEC.md §5.3).
REKEY_AFTER = 1 << 20
#: A direction that would need more key updates than this is closed instead.
MAX_EPOCH = (1 << 32) - 1
_REKEY_INFO = b"utesla/1 rekey"
#: Bytes a record adds around the messages it carries, at most: array header + tag.
RECORD_OVERHEAD = 5 + TAG_LEN


def next_key(key: bytes) -> bytes:
    return hkdf(key, b"", _REKEY_INFO, 32)


class _Direction:
    __slots__ = ("key", "counter", "epoch", "rekey_after", "_aead", "_cls")

    def __init__(self, key: bytes, backend: str | None, rekey_after: int):
        if not 0 < rekey_after <= REKEY_AFTER:
            raise LocalProtocolError("rekey_after must be in 1..REKEY_AFTER")
        self._cls = aead_class(backend)
        self.key = key
        self._aead = self._cls(key)
        self.counter = 0
        self.epoch = 0
        self.rekey_after = rekey_after

    def _advance(self) -> None:
        self.counter += 1
        if self.counter >= self.rekey_after:
            if self.epoch >= MAX_EPOCH:
                raise LocalProtocolError("record key epochs exhausted")
            self.key = next_key(self.key)
            self._aead = self._cls(self.key)
            self.counter = 0
            self.epoch += 1


class Sealer(_Direction):
    """The sending half: plaintext in, one wire record out."""

    __slots__ = ()

    def seal(self, plaintext: bytes) -> bytes:
        header = HEADER.pack(len(plaintext) + TAG_LEN)
        sealed = self._aead.seal(nonce(self.counter), plaintext, header)
        self._advance()
        return header + sealed


class Opener(_Direction):
    """The receiving half: one wire record in, plaintext out (or IntegrityError)."""

    __slots__ = ()

    def open(self, header: bytes, payload: bytes) -> bytes:
        if len(payload) < TAG_LEN:
            raise FrameError("record shorter than its authentication tag", code=400)
        plaintext = self._aead.open(nonce(self.counter), payload, header)
        try:
            self._advance()
        except LocalProtocolError as exc:
            raise RemoteProtocolError(str(exc)) from exc
        return plaintext


# --------------------------------------------------------------------------- batching (§5.4)

_ARRAY16 = struct.Struct(">BH")
_ARRAY32 = struct.Struct(">BI")


def array_header(n: int) -> bytes:
    """msgpack's header of an array of ``n`` items (the record plaintext's prefix)."""
    if n < 16:
        return bytes((0x90 | n,))
    if n < 65536:
        return _ARRAY16.pack(0xDC, n)
    return _ARRAY32.pack(0xDD, n)


def seal_one(sealer: Sealer, message: bytes) -> bytes:
    """A handshake record: exactly one encoded message (SPEC.md §4.1)."""
    return sealer.seal(array_header(1) + message)


def seal_batches(sealer: Sealer, messages: list[bytes], limit: int) -> list[bytes]:
    """Seal encoded ``messages``, in order, into as few records as ``limit`` allows.

    ``limit`` is the largest plaintext the peer accepts less the array header
    (its ``max_record`` minus :data:`RECORD_OVERHEAD`).  A message is never split
    across records, so the receiver never holds a partial one; the caller refuses
    any single message over ``limit`` before queueing it (the check here only
    guards that promise, before anything of the batch is sealed).
    """
    if max(map(len, messages), default=0) > limit:
        raise LocalProtocolError("a message larger than the peer's record limit")
    seal = sealer.seal
    records: list[bytes] = []
    batch: list[bytes] = []
    size = 0
    for item in messages:
        if batch and size + len(item) > limit:
            records.append(seal(array_header(len(batch)) + b"".join(batch)))
            batch, size = [], 0
        batch.append(item)
        size += len(item)
    if batch:
        records.append(seal(array_header(len(batch)) + b"".join(batch)))
    return records
