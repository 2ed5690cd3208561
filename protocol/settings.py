"""A connection's settings: what this side accepts and how it behaves (SPEC.md §4.3).

In a module of its own so that the connection and the handshake both read it
without importing each other.
"""
from __future__ import annotations

from dataclasses import dataclass

from .frame import DEFAULT_MAX_RECORD
from .record import REKEY_AFTER

__all__ = ["Settings"]


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
