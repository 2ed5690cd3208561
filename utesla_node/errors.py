"""The node's errors, rooted in the protocol's tree, and the one rule that turns any
exception into what a client is told.

::

    UteslaError                              protocol/errors.py
     ├── ProtocolError ...                   the connection cannot continue (protocol)
     ├── StatusError ...                     one request failed with a wire status (protocol)
     └── NodeError                           a failure inside the node; ``status`` says what
          │                                  the client sees, ``public`` the words it reads
          ├── ConfigError        (config.py)     a bad node.ini value; never reaches a client
          ├── KeyFileError       (keys.py)       a key file missing or unusable
          ├── GossipError        (network/gossip.py)  a malformed announcement; link stays up
          ├── AuthError          (auth.py)
          │    ├── Unauthorized  401             credentials or token not acceptable
          │    └── Forbidden     403             authenticated, but not allowed there
          └── StorageError       (storage/)
               ├── StorageUnavailable   503 "database unavailable" (details only logged)
               ├── TokenLimitReached    403
               ├── AlreadyExists, NoSuchEntry, SchemaTooNew

Raising code only raises.  :func:`status_error` is the one place an exception becomes a
:class:`StatusError` for the wire (the dispatcher calls it for every request, the
transport for the handshake's key lookup); anything it does not know becomes a 500 whose
details stay in the node's log under an opaque error id.
"""
from __future__ import annotations

from protocol.errors import Status, StatusError, UteslaError

__all__ = ["NodeError", "status_error"]


class NodeError(UteslaError):
    """Base of the node-side errors (see the module docstring).

    ``status``: the wire status a request that hit this error ends with (None: an
    internal error, 500).  ``public``: the text the client reads instead of ``str(self)``
    (which may name hosts, files or SQL, and is only logged).
    """

    status: int | None = None
    public: str | None = None


def status_error(exc: BaseException) -> StatusError | None:
    """What the client is told about ``exc``: a :class:`StatusError`, or None for an
    internal error (the caller logs it and answers 500 with an error id)."""
    if isinstance(exc, StatusError):
        return exc
    if isinstance(exc, NodeError) and exc.status is not None:
        return StatusError(exc.public or str(exc), exc.status)
    return None


#: Re-exported for modules that only need the table.
__all__ += ["Status", "StatusError"]
