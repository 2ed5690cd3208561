"""The AEAD record layer (SPEC.md §5).

A record is ``uint32 length || ChaCha20-Poly1305(key, nonce, aad=length, plaintext)``
where the nonce is the per-direction record counter (never sent: a replayed,
reordered, dropped or foreign record fails authentication), and the length
prefix is the associated data (so it cannot be altered either).  After
``rekey_after`` records a direction's key is replaced by
``HKDF(ikm=key, salt="", info="utesla/1 rekey")`` and its counter restarts at 0,
so no counter ever wraps and no key seals more than ``rekey_after`` records.
"""
from __future__ import annotations

from .crypto import TAG_LEN, aead_class, hkdf, nonce
from .errors import FrameError, LocalProtocolError, RemoteProtocolError
from .frame import HEADER

__all__ = ["REKEY_AFTER", "MAX_EPOCH", "Sealer", "Opener", "next_key"]

#: Records sealed under one key before the implicit key update (SPEC.md §5.3).
REKEY_AFTER = 1 << 20
#: A direction that would need more key updates than this is closed instead.
MAX_EPOCH = (1 << 32) - 1
_REKEY_INFO = b"utesla/1 rekey"


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
