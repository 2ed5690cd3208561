"""Status codes and the exception tree of the utesla protocol (SPEC.md §8).

Every error the protocol or the node can report is one class here, carrying its
wire status code.  Errors are converted to responses in exactly one place
(``utesla_node.dispatch``); everything else only raises.

::

    UteslaError
     ├── ProtocolError                 the connection cannot continue; it is closed
     │    ├── LocalProtocolError       *we* broke the protocol (API misuse on our side)
     │    └── RemoteProtocolError      the *peer* broke it (bad bytes, bad MAC, ...)
     │         ├── FrameError          length prefix zero, oversized, truncated at close
     │         ├── DecodeError         not strict msgpack, wrong schema, trailing bytes
     │         ├── IntegrityError      AEAD authentication failed (tamper, replay, reorder)
     │         ├── FlowControlError    peer sent more than the credit we granted
     │         └── HandshakeFailed     handshake could not complete
     │              └── AuthenticationFailed   the one generic refusal (SPEC.md §4.6)
     └── StatusError                   one request failed; the connection lives on
          ├── BadRequest 400, Unauthorized 401, Forbidden 403, NotFound 404,
          ├── MethodNotAllowed 405, RequestTimeout 408, TooLarge 413, Cancelled 499,
          └── InternalError 500, Unavailable 503, GatewayTimeout 504, LoopDetected 508
"""
from __future__ import annotations

from enum import IntEnum

__all__ = [
    "Status", "UteslaError", "ProtocolError", "LocalProtocolError", "RemoteProtocolError",
    "FrameError", "DecodeError", "IntegrityError", "FlowControlError", "HandshakeFailed",
    "AuthenticationFailed", "StatusError", "BadRequest", "Unauthorized", "Forbidden",
    "NotFound", "MethodNotAllowed", "RequestTimeout", "TooLarge", "InternalError",
    "Unavailable", "GatewayTimeout", "LoopDetected", "Cancelled", "error_for_status",
]


class Status(IntEnum):
    """The status table (SPEC.md §8).  Numbers follow HTTP where a meaning matches."""

    OK = 200
    BAD_REQUEST = 400
    UNAUTHORIZED = 401
    FORBIDDEN = 403
    NOT_FOUND = 404
    METHOD_NOT_ALLOWED = 405
    TIMEOUT = 408
    TOO_LARGE = 413
    CANCELLED = 499
    INTERNAL = 500
    UNAVAILABLE = 503
    GATEWAY_TIMEOUT = 504
    LOOP_DETECTED = 508


class UteslaError(Exception):
    """Base of every error raised by utesla."""


# --------------------------------------------------------------------------- connection level

class ProtocolError(UteslaError):
    """The connection is unusable and has been closed.

    ``code`` is the status sent in the CLOSE message, when one can still be sent.
    """

    code: int = Status.BAD_REQUEST

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code


class LocalProtocolError(ProtocolError):
    """We tried to do something the protocol forbids (a bug on our side)."""

    code = Status.INTERNAL


class RemoteProtocolError(ProtocolError):
    """The peer sent something the protocol forbids."""


class FrameError(RemoteProtocolError):
    """Bad length prefix: zero, over the maximum, or a stream cut inside a record."""

    code = Status.TOO_LARGE


class DecodeError(RemoteProtocolError):
    """A record's plaintext (or a handshake message) is not a valid message."""


class IntegrityError(RemoteProtocolError):
    """A record failed AEAD authentication: tampered, replayed, reordered or foreign."""


class FlowControlError(RemoteProtocolError):
    """The peer sent body bytes beyond the credit it was given, or broke stream rules."""


class HandshakeFailed(RemoteProtocolError):
    """The handshake could not complete (timeout, bad message, version mismatch)."""


class AuthenticationFailed(HandshakeFailed):
    """Identity not accepted.

    A wrong user name, a key that does not match it and a bad signature all yield
    this same error with the same message, so a peer cannot tell them apart.
    On the client it also reports a node whose key is not the pinned one.
    """

    code = Status.UNAUTHORIZED


# --------------------------------------------------------------------------- request level

class StatusError(UteslaError):
    """One request failed with ``status``; the connection stays open."""

    status: int = Status.INTERNAL

    def __init__(self, message: str = "", status: int | None = None):
        if status is not None:
            self.status = status
        if not message:
            try:
                message = Status(self.status).name.lower().replace("_", " ")
            except ValueError:               # a status outside the table (a handler's 418)
                message = f"status {self.status}"
        super().__init__(message)

    @property
    def message(self) -> str:
        return str(self)


class BadRequest(StatusError):
    status = Status.BAD_REQUEST


class Unauthorized(StatusError):
    status = Status.UNAUTHORIZED


class Forbidden(StatusError):
    status = Status.FORBIDDEN


class NotFound(StatusError):
    status = Status.NOT_FOUND


class MethodNotAllowed(StatusError):
    status = Status.METHOD_NOT_ALLOWED


class RequestTimeout(StatusError):
    status = Status.TIMEOUT


class TooLarge(StatusError):
    status = Status.TOO_LARGE


class Cancelled(StatusError):
    status = Status.CANCELLED


class InternalError(StatusError):
    status = Status.INTERNAL


class Unavailable(StatusError):
    status = Status.UNAVAILABLE


class GatewayTimeout(StatusError):
    status = Status.GATEWAY_TIMEOUT


class LoopDetected(StatusError):
    status = Status.LOOP_DETECTED


_BY_STATUS: dict[int, type[StatusError]] = {
    cls.status: cls
    for cls in (BadRequest, Unauthorized, Forbidden, NotFound, MethodNotAllowed,
                RequestTimeout, TooLarge, Cancelled, InternalError, Unavailable,
                GatewayTimeout, LoopDetected)
}


def error_for_status(status: int, message: str = "") -> StatusError:
    """The exception instance for a non-OK wire status (unknown codes keep their number)."""
    cls = _BY_STATUS.get(status, StatusError)
    return cls(message, status=status)
