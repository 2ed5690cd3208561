#!/usr/bin/env python3
"""Fuzz the framing layer and the strict message decoder.

    python fuzz/fuzz_frame.py [libFuzzer flags, e.g. -atheris_runs=100000 corpus/]

Bytes go through ``FrameBuffer`` (fed in pieces), every complete frame through
``frame.unpack`` and ``messages.decode``; the raw input also goes straight to
``unpack``/``decode``.  The only exception allowed out is a ProtocolError
(DecodeError / FrameError); anything else is a finding.  Whatever decodes must
re-encode to bytes that decode to the same message (compared as bytes, so a
NaN header value does not count as a difference).

``TestOneInput`` runs without atheris too: tests/protocol/test_fuzz_smoke.py
drives it in every CI run.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

if __name__ == "__main__":
    # Under atheris, instrument our package only (coverage feedback where it matters).
    import atheris

    with atheris.instrument_imports(include=["protocol"]):
        import protocol  # noqa: F401

from protocol import messages  # noqa: E402
from protocol.errors import DecodeError, ProtocolError  # noqa: E402
from protocol.frame import FrameBuffer, unpack  # noqa: E402

#: Small limit so the fuzzer reaches "frame too large" as easily as valid frames.
MAX_FRAME = 4096


def _check_message(obj) -> None:
    msg = messages.decode(obj)
    wire = messages.encode(msg)
    again = messages.decode(unpack(wire))
    if messages.encode(again) != wire:
        raise AssertionError(f"message does not round-trip: {msg!r}")


def _decode_payload(payload: bytes, as_record: bool) -> None:
    obj = unpack(payload, check_depth=not as_record)
    if as_record:
        # a record's plaintext: a non-empty array of message maps
        if type(obj) is not list or not obj:
            raise DecodeError("not a non-empty array")
        for item in obj:
            _check_message(item)
    else:
        _check_message(obj)


def TestOneInput(data: bytes) -> None:
    if not data:
        return
    control, body = data[0], data[1:]
    as_record = bool(control & 1)
    step = (control >> 1) or len(body) or 1

    buf = FrameBuffer(MAX_FRAME)
    try:
        for i in range(0, len(body), step):
            buf.feed(body[i:i + step])
            while True:
                got = buf.next_frame()
                if got is None:
                    break
                header, payload = got
                if len(header) != 4 or not 0 < len(payload) <= MAX_FRAME:
                    raise AssertionError("FrameBuffer returned a bad frame")
                try:
                    _decode_payload(payload, as_record)
                except DecodeError:
                    pass
    except ProtocolError:
        pass

    # the raw bytes, straight into the decoder
    try:
        _decode_payload(body, as_record)
    except DecodeError:
        pass


def seeds() -> list[bytes]:
    """Valid inputs to start from: every message type, framed and as record plaintext."""
    from protocol.frame import frame, pack

    samples = [
        messages.Request(1, "GET", "/hello_world", "tok", {"a": [1]}, {"h": 1}, b"b", False,
                         {"hops": 2}),
        messages.Response(1, 200, {"x": "y"}, b"ok", True), messages.Response(1, 200),
        messages.Data(1, b"chunk", True), messages.Window(1, 4096), messages.Reset(1, 499, "r"),
        messages.Ping(b"p"), messages.Pong(b"p"), messages.GoAway(1, "g"), messages.Close(200),
        messages.ClientHello(1, bytes(32), 65536, 1 << 20, 256),
        messages.ServerHello(1, bytes(32), 65536, 1 << 20, 256),
        messages.ServerAuth(b"k" * 44, b"s" * 64), messages.ClientAuth("alice", b"s" * 64),
        messages.ServerFinished(),
    ]
    out = []
    for msg in samples:
        out.append(b"\x00" + frame(messages.encode(msg)))
        out.append(b"\x01" + pack([messages.to_map(msg)]))
    return out


def main() -> None:
    import tempfile

    import atheris

    argv = list(sys.argv)
    if not any(not a.startswith("-") for a in argv[1:]):     # no corpus given: seed one
        corpus = tempfile.mkdtemp(prefix="utesla-fuzz-frame-")
        for i, seed in enumerate(seeds()):
            with open(os.path.join(corpus, f"seed-{i}"), "wb") as f:
                f.write(seed)
        argv.append(corpus)
    atheris.Setup(argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
