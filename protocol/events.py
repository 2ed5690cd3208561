"""Events a :class:`~protocol.connection.Connection` reports (named in the past tense)."""
from __future__ import annotations

from dataclasses import dataclass, field

from .crypto import PublicKey

__all__ = [
    "Event", "AuthenticationRequested", "HandshakeCompleted", "RequestReceived",
    "ResponseReceived", "DataReceived", "WindowUpdated", "StreamReset", "PongReceived",
    "GoAwayReceived", "ConnectionClosed",
]


class Event:
    __slots__ = ()


@dataclass(slots=True)
class AuthenticationRequested(Event):
    """Server side: the client claims ``user``; answer with ``Connection.complete_auth``."""

    user: str


@dataclass(slots=True)
class HandshakeCompleted(Event):
    """Keys are established; ``peer_user`` is the authenticated user (None on the client)."""

    peer_key: PublicKey
    peer_user: str | None = None


@dataclass(slots=True)
class RequestReceived(Event):
    stream_id: int
    method: str
    path: str
    token: str | None
    args: dict | None
    headers: dict
    body: bytes
    end: bool
    envelope: dict | None = None


@dataclass(slots=True)
class ResponseReceived(Event):
    stream_id: int
    status: int
    headers: dict
    body: bytes
    end: bool


@dataclass(slots=True)
class DataReceived(Event):
    stream_id: int
    data: bytes
    end: bool


@dataclass(slots=True)
class WindowUpdated(Event):
    stream_id: int
    credit: int


@dataclass(slots=True)
class StreamReset(Event):
    """The peer aborted ``stream_id`` (or we could not accept it: see ``local``)."""

    stream_id: int
    status: int
    reason: str = ""
    local: bool = False


@dataclass(slots=True)
class PongReceived(Event):
    opaque: bytes


@dataclass(slots=True)
class GoAwayReceived(Event):
    last_stream_id: int
    reason: str = ""


@dataclass(slots=True)
class ConnectionClosed(Event):
    status: int
    reason: str = ""
    details: dict = field(default_factory=dict)
