"""Typed messages and their strict msgpack schema (SPEC.md §6).

Each message is a slotted dataclass with a paired encoder and decoder.  On the
wire a message is a msgpack map with string keys; ``"t"`` holds the type number.
Decoding checks every field's type and bound, and rejects unknown keys.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from .errors import DecodeError
from .frame import _check_depth, pack

__all__ = [
    "Message", "Request", "Response", "Data", "Window", "Reset", "Ping", "Pong", "GoAway",
    "Close", "ClientHello", "ServerHello", "ServerAuth", "ClientAuth", "ServerFinished",
    "encode", "decode", "MAX_PATH", "MAX_METHOD", "MAX_TOKEN", "MAX_HEADERS", "MAX_REASON",
    "MAX_STREAM_ID", "MAX_CREDIT",
]

MAX_PATH = 1024
MAX_METHOD = 16
MAX_TOKEN = 256
MAX_HEADERS = 64
MAX_REASON = 512
MAX_USER = 128
MAX_STREAM_ID = (1 << 53) - 1
MAX_CREDIT = (1 << 31) - 1

# type numbers (SPEC.md §6.2)
T_REQUEST, T_RESPONSE, T_DATA, T_WINDOW, T_RESET = 1, 2, 3, 4, 5
T_PING, T_PONG, T_GOAWAY, T_CLOSE = 6, 7, 8, 9
T_CLIENT_HELLO, T_SERVER_HELLO, T_SERVER_AUTH, T_CLIENT_AUTH, T_SERVER_FINISHED = 16, 17, 18, 19, 20


class Message:
    """Base class of every wire message.

    Messages and events are treated as immutable records; they are plain (not
    frozen) slotted dataclasses only because a frozen dataclass's ``__init__``
    costs a ``object.__setattr__`` call per field, on the hottest path we have.
    """

    __slots__ = ()


@dataclass(slots=True)
class Request(Message):
    """Open stream ``stream_id`` with a request.  ``end`` False: body continues in Data."""

    stream_id: int
    method: str
    path: str
    token: str | None = None
    args: dict | None = None
    headers: dict = field(default_factory=dict)
    body: bytes = b""
    end: bool = True
    envelope: dict | None = None


@dataclass(slots=True)
class Response(Message):
    """The (first part of the) answer on ``stream_id``; ``end`` False: body continues."""

    stream_id: int
    status: int
    headers: dict = field(default_factory=dict)
    body: bytes = b""
    end: bool = True


@dataclass(slots=True)
class Data(Message):
    """A body chunk on ``stream_id``; ``end`` True on the last chunk of that direction."""

    stream_id: int
    body: bytes
    end: bool = False


@dataclass(slots=True)
class Window(Message):
    """Grant the peer ``credit`` more body bytes on ``stream_id``."""

    stream_id: int
    credit: int


@dataclass(slots=True)
class Reset(Message):
    """Abort ``stream_id`` in both directions."""

    stream_id: int
    status: int
    reason: str = ""


@dataclass(slots=True)
class Ping(Message):
    opaque: bytes = b""


@dataclass(slots=True)
class Pong(Message):
    opaque: bytes = b""


@dataclass(slots=True)
class GoAway(Message):
    """No new streams will be accepted; streams up to ``last_stream_id`` finish."""

    last_stream_id: int
    reason: str = ""


@dataclass(slots=True)
class Close(Message):
    """Last message of a connection; anything after it is ignored."""

    status: int
    reason: str = ""


@dataclass(slots=True)
class ClientHello(Message):
    version: int
    ephemeral: bytes
    window: int
    max_record: int
    max_streams: int


@dataclass(slots=True)
class ServerHello(Message):
    version: int
    ephemeral: bytes
    window: int
    max_record: int
    max_streams: int


@dataclass(slots=True)
class ServerAuth(Message):
    public_key: bytes
    signature: bytes


@dataclass(slots=True)
class ClientAuth(Message):
    user: str
    signature: bytes


@dataclass(slots=True)
class ServerFinished(Message):
    pass


# --------------------------------------------------------------------------- field checks

def _uint(v, name, maximum=MAX_STREAM_ID):
    if type(v) is not int or not 0 <= v <= maximum:
        raise DecodeError(f"field {name!r} must be an integer in 0..{maximum}")
    return v


def _str(v, name, maxlen, *, ascii_only=False):
    if type(v) is not str or len(v) > maxlen:
        raise DecodeError(f"field {name!r} must be a string of at most {maxlen} characters")
    if ascii_only and not v.isascii():
        raise DecodeError(f"field {name!r} must be ASCII")
    return v


def _bin(v, name, maxlen=None, exact=None):
    if type(v) is not bytes:
        raise DecodeError(f"field {name!r} must be bytes")
    if exact is not None and len(v) != exact:
        raise DecodeError(f"field {name!r} must be {exact} bytes")
    if maxlen is not None and len(v) > maxlen:
        raise DecodeError(f"field {name!r} longer than {maxlen} bytes")
    return v


def _bool(v, name):
    if type(v) is not bool:
        raise DecodeError(f"field {name!r} must be a boolean")
    return v


_SCALARS = (str, int, float, bool, bytes, type(None))


def _headers(v, name="h"):
    if type(v) is not dict or len(v) > MAX_HEADERS:
        raise DecodeError(f"field {name!r} must be a map of at most {MAX_HEADERS} entries")
    for k, item in v.items():
        # Keys must be str: record plaintext is unpacked with check_depth=False, and
        # msgpack's strict_map_key still lets bytes keys through (SPEC.md §6.1).
        if type(k) is not str or len(k) > 64 or not isinstance(item, _SCALARS):
            raise DecodeError(f"field {name!r}: header {k[:64]!r} is not a short key with a scalar value")
    return v


def _map(v, name):
    if type(v) is not dict:
        raise DecodeError(f"field {name!r} must be a map")
    _check_depth(v)
    return v


def _method(v):
    _str(v, "m", MAX_METHOD, ascii_only=True)
    if not v or not v.isalpha():
        raise DecodeError("field 'm' must be a non-empty word of letters")
    return v.upper()


def _path(v):
    _str(v, "p", MAX_PATH)
    if not v.startswith("/"):
        raise DecodeError("field 'p' must start with '/'")
    return v


# Per type: (class, required {key: checker}, optional {key: (checker, default)}, attribute names)
_SPEC: dict[int, tuple] = {
    T_REQUEST: (Request,
                {"i": _uint, "m": lambda v, n: _method(v), "p": lambda v, n: _path(v)},
                {"k": (lambda v, n: None if v is None else _str(v, n, MAX_TOKEN, ascii_only=True), None),
                 "a": (lambda v, n: None if v is None else _map(v, n), None),
                 "h": (_headers, None), "b": (_bin, b""), "f": (_bool, True),
                 "e": (lambda v, n: None if v is None else _map(v, n), None)},
                ("stream_id", "method", "path", "token", "args", "headers", "body", "end",
                 "envelope"),
                ("i", "m", "p", "k", "a", "h", "b", "f", "e")),
    T_RESPONSE: (Response, {"i": _uint, "s": lambda v, n: _uint(v, n, 999)},
                 {"h": (_headers, None), "b": (_bin, b""), "f": (_bool, True)},
                 ("stream_id", "status", "headers", "body", "end"), ("i", "s", "h", "b", "f")),
    T_DATA: (Data, {"i": _uint, "b": _bin}, {"f": (_bool, False)},
             ("stream_id", "body", "end"), ("i", "b", "f")),
    T_WINDOW: (Window, {"i": _uint, "n": lambda v, n: _uint(v, n, MAX_CREDIT)}, {},
               ("stream_id", "credit"), ("i", "n")),
    T_RESET: (Reset, {"i": _uint, "s": lambda v, n: _uint(v, n, 999)},
              {"r": (lambda v, n: _str(v, n, MAX_REASON), "")},
              ("stream_id", "status", "reason"), ("i", "s", "r")),
    T_PING: (Ping, {}, {"o": (lambda v, n: _bin(v, n, 64), b"")}, ("opaque",), ("o",)),
    T_PONG: (Pong, {}, {"o": (lambda v, n: _bin(v, n, 64), b"")}, ("opaque",), ("o",)),
    T_GOAWAY: (GoAway, {"i": _uint}, {"r": (lambda v, n: _str(v, n, MAX_REASON), "")},
               ("last_stream_id", "reason"), ("i", "r")),
    T_CLOSE: (Close, {"s": lambda v, n: _uint(v, n, 999)},
              {"r": (lambda v, n: _str(v, n, MAX_REASON), "")},
              ("status", "reason"), ("s", "r")),
    T_CLIENT_HELLO: (ClientHello,
                     {"v": lambda v, n: _uint(v, n, 255), "e": lambda v, n: _bin(v, n, exact=32),
                      "w": lambda v, n: _uint(v, n, MAX_CREDIT),
                      "r": lambda v, n: _uint(v, n, 1 << 24),
                      "n": lambda v, n: _uint(v, n, 1 << 16)}, {},
                     ("version", "ephemeral", "window", "max_record", "max_streams"),
                     ("v", "e", "w", "r", "n")),
    T_SERVER_HELLO: (ServerHello,
                     {"v": lambda v, n: _uint(v, n, 255), "e": lambda v, n: _bin(v, n, exact=32),
                      "w": lambda v, n: _uint(v, n, MAX_CREDIT),
                      "r": lambda v, n: _uint(v, n, 1 << 24),
                      "n": lambda v, n: _uint(v, n, 1 << 16)}, {},
                     ("version", "ephemeral", "window", "max_record", "max_streams"),
                     ("v", "e", "w", "r", "n")),
    T_SERVER_AUTH: (ServerAuth, {"k": lambda v, n: _bin(v, n, 4096),
                                 "s": lambda v, n: _bin(v, n, 1024)}, {},
                    ("public_key", "signature"), ("k", "s")),
    T_CLIENT_AUTH: (ClientAuth, {"u": lambda v, n: _str(v, n, MAX_USER),
                                 "s": lambda v, n: _bin(v, n, 1024)}, {},
                    ("user", "signature"), ("u", "s")),
    T_SERVER_FINISHED: (ServerFinished, {}, {}, (), ()),
}

_TYPE_OF = {spec[0]: t for t, spec in _SPEC.items()}


_DATA_KEYS = frozenset(("t", "i", "b", "f"))
_SIMPLE_REQUEST_KEYS = frozenset(("t", "i", "m", "p", "k", "b", "f"))
_RESPONSE_KEYS = frozenset(("t", "i", "s", "h", "b", "f"))


def _plain_request_fields(i, meth, path, k, b, f) -> bool:
    """The checks ``decode`` makes on a REQUEST's id, method, path, token, body and flag
    (args, headers and envelope apart): the one statement of them for both fast paths."""
    return (type(i) is int and 0 <= i <= MAX_STREAM_ID and type(meth) is str
            and 0 < len(meth) <= MAX_METHOD and meth.isascii() and meth.isalpha()
            and type(path) is str and len(path) <= MAX_PATH and path[:1] == "/"
            and (k is None or (type(k) is str and len(k) <= MAX_TOKEN and k.isascii()))
            and type(b) is bytes and type(f) is bool)


def _fast(obj: dict, t: int):
    """Hot-path decoders for DATA and plain RESPONSE maps; None falls back to the table."""
    if t == T_DATA and obj.keys() <= _DATA_KEYS:
        i, b, f = obj.get("i"), obj.get("b"), obj.get("f", False)
        if (type(i) is int and 0 <= i <= MAX_STREAM_ID and type(b) is bytes
                and type(f) is bool):
            return Data(i, b, f)
    elif t == T_REQUEST and obj.keys() <= _SIMPLE_REQUEST_KEYS:
        # No args, headers or envelope: the common request, checked inline.
        i, meth, path = obj.get("i"), obj.get("m"), obj.get("p")
        k, b, f = obj.get("k"), obj.get("b", b""), obj.get("f", True)
        if _plain_request_fields(i, meth, path, k, b, f):
            return Request(i, meth.upper(), path, k, None, {}, b, f, None)
    elif t == T_RESPONSE and obj.keys() <= _RESPONSE_KEYS and "h" not in obj:
        i, st, b, f = obj.get("i"), obj.get("s"), obj.get("b", b""), obj.get("f", True)
        if (type(i) is int and 0 <= i <= MAX_STREAM_ID and type(st) is int and 0 <= st <= 999
                and type(b) is bytes and type(f) is bool):
            return Response(i, st, {}, b, f)
    return None


def plain_request_ok(msg: Request) -> bool:
    """Whether a REQUEST with no args or headers passes :func:`decode` as the peer will
    run it, checked on the object itself (the send-side hot path; False: not sure, run
    the full check).  Its envelope, if any, must be a map within the nesting limit."""
    meth, env = msg.method, msg.envelope
    if not (_plain_request_fields(msg.stream_id, meth, msg.path, msg.token, msg.body, msg.end)
            and meth.isupper()):        # decode upper-cases: the peer would read another
        return False
    if env is not None:
        # The envelope shape nodes send: string keys, scalar values or lists of scalars.
        if type(env) is not dict or len(env) > 16:
            return False
        for key, value in env.items():
            if type(key) is not str:
                return False
            if type(value) is list:
                if not all(type(v) in _ENVELOPE_SCALARS for v in value):
                    return False
            elif type(value) not in _ENVELOPE_SCALARS:
                return False
    return True


_ENVELOPE_SCALARS = frozenset((str, int, float, bool, bytes, type(None)))


def decode(obj: Any) -> Message:
    """Validate one decoded msgpack map and build its message."""
    if type(obj) is not dict:
        raise DecodeError("a message must be a map")
    t = obj.get("t")
    if type(t) is int and t <= T_DATA:
        msg = _fast(obj, t)
        if msg is not None:
            return msg
    spec = _SPEC.get(t) if type(t) is int else None
    if spec is None:
        raise DecodeError(f"unknown message type {t!r}")
    cls, required, optional, _attrs, _keys = spec
    values = {}
    for key in obj:
        if key != "t" and key not in required and key not in optional:
            raise DecodeError(f"unknown field {key[:32]!r} in message type {t}")
    for key, check in required.items():
        if key not in obj:
            raise DecodeError(f"message type {t} lacks field {key!r}")
        values[key] = check(obj[key], key)
    for key, (check, default) in optional.items():
        if key in obj:
            values[key] = check(obj[key], key)
        else:
            values[key] = default
    if cls is Request or cls is Response:
        if values["h"] is None:
            values["h"] = {}
    return cls(*(values[k] for k in _keys))


def to_map(msg: Message) -> dict:
    """The wire map of ``msg``, leaving out optional fields at their default."""
    cls = type(msg)
    if cls is Request and msg.args is None and not msg.headers:
        out = {"t": T_REQUEST, "i": msg.stream_id, "m": msg.method, "p": msg.path}
        if msg.token is not None:
            out["k"] = msg.token
        if msg.body:
            out["b"] = msg.body
        if not msg.end:
            out["f"] = False
        if msg.envelope is not None:        # a forwarded request (SPEC.md §6.7)
            out["e"] = msg.envelope
        return out
    if cls is Data:
        return {"t": T_DATA, "i": msg.stream_id, "b": msg.body, "f": msg.end}
    if cls is Response and not msg.headers:
        out = {"t": T_RESPONSE, "i": msg.stream_id, "s": msg.status, "b": msg.body}
        if not msg.end:
            out["f"] = False
        return out
    t = _TYPE_OF[cls]
    cls, required, optional, attrs, keys = _SPEC[t]
    out: dict[str, Any] = {"t": t}
    for attr, key in zip(attrs, keys):
        value = getattr(msg, attr)
        if key in optional:
            default = optional[key][1]
            if value == default or (key == "h" and not value):
                continue
        out[key] = value
    return out


def encode(msg: Message) -> bytes:
    """Packed msgpack bytes of one message."""
    return pack(to_map(msg))
