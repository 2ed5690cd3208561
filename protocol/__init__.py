"""utesla wire protocol, sans-IO (SPEC.md).

Bytes in, typed events out, bytes to send.  Nothing here touches sockets,
asyncio, databases or the clock: time is an argument.
"""
from .connection import PROLOGUE, PROTOCOL_VERSION, Connection, Role, Settings
from .crypto import KeyFormatError, PrivateKey, PublicKey, WeakKeyError
from .errors import *  # noqa: F401,F403  (the status table and exception tree)
from .errors import __all__ as _errors_all
from .events import *  # noqa: F401,F403
from .events import __all__ as _events_all

__all__ = ["Connection", "Role", "Settings", "PROTOCOL_VERSION", "PROLOGUE", "PrivateKey",
           "PublicKey", "KeyFormatError", "WeakKeyError", *_errors_all, *_events_all]
