"""Length-prefixed frames and the strict msgpack codec (SPEC.md §2, §6).

Every frame on the wire is ``uint32 big-endian length || payload``.  The length is
checked against the receiver's maximum *before* anything is allocated for the
payload, so a peer cannot make us reserve memory by announcing a huge frame.
"""
from __future__ import annotations

import struct

import msgpack

from .errors import DecodeError, FrameError, LocalProtocolError

__all__ = ["HEADER", "DEFAULT_MAX_RECORD", "MAX_DEPTH", "FrameBuffer", "pack", "unpack",
           "frame"]

HEADER = struct.Struct(">I")
#: Default maximum size of one frame's payload (ciphertext including its tag).
DEFAULT_MAX_RECORD = 1 << 20
#: Largest maximum any side may configure (SPEC.md §2): keeps buffers sane.
ABSOLUTE_MAX_RECORD = 16 << 20
#: Maximum container nesting accepted by :func:`unpack` (SPEC.md §6.1).
MAX_DEPTH = 16


def frame(payload: bytes) -> bytes:
    """Prefix ``payload`` with its length."""
    return HEADER.pack(len(payload)) + payload


class FrameBuffer:
    """Accumulates received bytes and yields complete frames.

    ``next_frame()`` returns ``(header, payload)`` or ``None`` for "need more data".
    ``max_size`` may change between frames: the connection lowers it to
    :data:`~protocol.handshake.MAX_HANDSHAKE_FRAME` while it waits for a
    handshake message.
    """

    __slots__ = ("_buf", "_pos", "max_size")

    def __init__(self, max_size: int = DEFAULT_MAX_RECORD):
        if not 0 < max_size <= ABSOLUTE_MAX_RECORD:
            raise LocalProtocolError(f"max record size must be in 1..{ABSOLUTE_MAX_RECORD}")
        self._buf = bytearray()
        self._pos = 0
        self.max_size = max_size

    def feed(self, data: bytes) -> None:
        """Append received bytes.

        When ``data`` completes the length prefix of the frame at the head, that
        length is checked before ``data`` is kept: a peer announcing an oversized
        frame is refused on its four header bytes, not after we have buffered what
        followed them (SPEC.md §2).
        """
        have = len(self._buf) - self._pos
        if have < 4 <= have + len(data):
            head = bytes(self._buf[self._pos:]) + bytes(data[:4 - have])
            self._check(HEADER.unpack(head)[0])
        self._buf += data

    def _check(self, length: int) -> None:
        if length == 0:
            raise FrameError("zero-length frame", code=400)
        if length > self.max_size:
            raise FrameError(f"frame of {length} bytes exceeds the maximum of {self.max_size}")

    def __len__(self) -> int:
        return len(self._buf) - self._pos

    def next_frame(self) -> tuple[bytes, bytes] | None:
        buf, pos = self._buf, self._pos
        if len(buf) - pos < 4:
            return None
        (length,) = HEADER.unpack_from(buf, pos)
        self._check(length)     # before waiting for (or allocating) the payload: SPEC.md §2
        end = pos + 4 + length
        if len(buf) < end:
            return None
        header = bytes(buf[pos:pos + 4])
        payload = bytes(buf[pos + 4:end])
        if end == len(buf):
            buf.clear()
            self._pos = 0
        elif end > 65536 and end * 2 > len(buf):
            del buf[:end]
            self._pos = 0
        else:
            self._pos = end
        return header, payload


# --------------------------------------------------------------------------- strict msgpack

def _no_ext(code: int, data: bytes):
    raise DecodeError(f"msgpack extension type {code} is not allowed")


_packer = msgpack.Packer(use_bin_type=True, autoreset=True)


def pack(obj) -> bytes:
    """Encode with the canonical options every peer uses (bin type for bytes).

    One module-level Packer: ``packb`` would build a new one per call.  Packing
    runs in C under the GIL, so sharing it between threads is safe.
    """
    return _packer.pack(obj)


def unpack(data: bytes, *, max_len: int | None = None, check_depth: bool = True):
    """Decode exactly one msgpack object from ``data``, strictly.

    Rejects: extension types, non-string map keys, invalid UTF-8, trailing bytes,
    nesting deeper than :data:`MAX_DEPTH` (``check_depth=False`` leaves that to the
    message schema, which checks the few fields that may nest), and any declared length larger than the
    input could possibly hold (a "huge array in a tiny frame" is refused before
    the decoder allocates for it).
    """
    n = len(data)
    limit = n if max_len is None else min(n, max_len)
    try:
        obj = msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True,
            max_str_len=limit, max_bin_len=limit, max_array_len=limit,
            max_map_len=limit // 2, max_ext_len=0, ext_hook=_no_ext,
        )
    except DecodeError:
        raise
    except msgpack.ExtraData as exc:
        raise DecodeError("trailing bytes after message") from exc
    except (ValueError, TypeError, msgpack.UnpackException, RecursionError) as exc:
        raise DecodeError(f"invalid msgpack: {exc}") from exc
    if check_depth:
        _check_depth(obj)
    return obj


def _check_depth(obj) -> None:
    stack = [(obj, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            if depth > MAX_DEPTH:
                raise DecodeError(f"nesting deeper than {MAX_DEPTH}")
            for k, v in item.items():
                if not isinstance(k, str):
                    raise DecodeError("map keys must be strings")
                if isinstance(v, (dict, list)):
                    stack.append((v, depth + 1))
        elif isinstance(item, list):
            if depth > MAX_DEPTH:
                raise DecodeError(f"nesting deeper than {MAX_DEPTH}")
            for v in item:
                if isinstance(v, (dict, list)):
                    stack.append((v, depth + 1))
