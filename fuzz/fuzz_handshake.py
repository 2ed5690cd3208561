#!/usr/bin/env python3
"""Fuzz the connection state machine at every stage of the handshake and after it.

    python fuzz/fuzz_handshake.py [libFuzzer flags, e.g. -atheris_runs=20000 corpus/]

The first input byte picks a target, the second how the rest is cut into pieces:

    0  server, as the first bytes of a connection (ClientHello position)
    1  server, after a real ClientHello (raw bytes where the sealed ClientAuth goes)
    2  server, after a real ClientHello: input sealed with the real client handshake
       key, i.e. arbitrary ClientAuth *plaintext*; auth is answered from a registry
    3  client, after its real ClientHello (ServerHello position, raw)
    4  client, after a real ServerHello: input sealed with the node's handshake key
       (arbitrary ServerAuth plaintext)
    5  client, after a real ServerAuth: arbitrary ServerFinished plaintext, sealed
    6  established server: arbitrary application-record plaintext, sealed
    7  established client: the same towards the client

Only ProtocolError may escape ``receive_data`` / ``complete_auth`` /
``receive_eof``; after one, the connection must report ``closed``.  Anything
else is a finding.  ``TestOneInput`` runs without atheris (tests/protocol/
test_fuzz_smoke.py drives it in CI).
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

from Crypto.PublicKey import ECC  # noqa: E402

from protocol import AuthenticationRequested, Connection, Role, Settings  # noqa: E402
from protocol.crypto import PrivateKey  # noqa: E402
from protocol.errors import ProtocolError  # noqa: E402
from protocol.frame import HEADER  # noqa: E402
from protocol.record import REKEY_AFTER, Sealer  # noqa: E402

# Fixed keys and ephemerals: every run is reproducible from its input alone.
NODE = PrivateKey(ECC.construct(curve="ed25519", seed=bytes(range(32))))
USER = PrivateKey(ECC.construct(curve="ed25519", seed=bytes(range(32, 64))))
REGISTRY = {"alice": USER.public, "bob": NODE.public}
SETTINGS = Settings(max_record=1 << 16, window=1 << 16, max_streams=16)
_C_EPH, _S_EPH = bytes(range(64, 96)), bytes(range(96, 128))
TARGETS = 8


def _client() -> Connection:
    return Connection(Role.CLIENT, identity=USER, user="alice", server_key=NODE.public,
                      settings=SETTINGS, ephemeral_secret=_C_EPH)


def _server() -> Connection:
    return Connection(Role.SERVER, identity=NODE, settings=SETTINGS, ephemeral_secret=_S_EPH)


def _first_frame(data: bytes) -> bytes:
    (length,) = HEADER.unpack_from(data)
    return data[:4 + length]


def _seal(key: bytes, plaintext: bytes, counter: int = 0) -> bytes:
    sealer = Sealer(key, None, REKEY_AFTER)
    sealer.counter = counter
    return sealer.seal(plaintext)


def _feed(conn: Connection, data: bytes, step: int) -> None:
    """Feed ``data`` in pieces; answer auth requests; finish with EOF."""
    try:
        for i in range(0, len(data), step):
            events = conn.receive_data(data[i:i + step])
            for ev in events:
                if isinstance(ev, AuthenticationRequested):
                    conn.complete_auth(REGISTRY.get(ev.user))
        conn.data_to_send()
        conn.receive_eof()
    except ProtocolError:
        if not conn.closed:
            raise AssertionError("a ProtocolError left the connection open") from None
        conn.data_to_send()       # flushing the CLOSE must not fail either


def _established() -> tuple[Connection, Connection]:
    client, server = _client(), _server()
    client.initiate(0.0)
    server.initiate(0.0)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    for ev in server.receive_data(client.data_to_send()):
        if isinstance(ev, AuthenticationRequested):
            server.complete_auth(REGISTRY[ev.user])
    client.receive_data(server.data_to_send())
    assert client.established and server.established
    return client, server


def TestOneInput(data: bytes) -> None:
    if len(data) < 2:
        return
    target, step, body = data[0] % TARGETS, data[1] or len(data), data[2:]

    if target == 0:
        server = _server()
        server.initiate(0.0)
        _feed(server, body, step)
    elif target in (1, 2):
        client, server = _client(), _server()
        client.initiate(0.0)
        server.initiate(0.0)
        server.receive_data(client.data_to_send())
        if target == 2:
            body = _seal(server._handshake.opener.key, body)
        _feed(server, body, step)
    elif target in (3, 4, 5):
        client, server = _client(), _server()
        client.initiate(0.0)
        server.receive_data(client.data_to_send())
        flight = server.data_to_send()
        if target == 3:
            pass
        elif target == 4:
            client.receive_data(_first_frame(flight))           # ServerHello only
            body = _seal(client._handshake.opener.key, body)
        else:
            client.receive_data(flight)                         # ServerHello + ServerAuth
            body = _seal(client._handshake.opener.key, body, counter=1)   # the next node record
        _feed(client, body, step)
    else:
        client, server = _established()
        if target == 6:
            _feed(server, client._sealer.seal(body), step)
        else:
            _feed(client, server._sealer.seal(body), step)


def seeds() -> list[bytes]:
    """One valid input per target, so the fuzzer starts past the easy rejections."""
    from protocol import messages as m
    from protocol.frame import pack

    def plain(*msgs) -> bytes:
        return pack([m.to_map(x) for x in msgs])

    client, server = _client(), _server()
    client.initiate(0.0)
    hello = client.data_to_send()
    server.receive_data(hello)
    flight = server.data_to_send()
    return [
        b"\x00\x00" + hello,
        b"\x01\x00" + bytes(40),
        b"\x02\x00" + plain(m.ClientAuth("alice", bytes(64))),
        b"\x03\x00" + flight,
        b"\x04\x00" + plain(m.ServerAuth(NODE.public.der, bytes(64))),
        b"\x05\x00" + plain(m.ServerFinished()),
        b"\x06\x00" + plain(m.Request(1, "GET", "/x", end=False), m.Data(1, b"d", True),
                            m.Ping(b"p")),
        b"\x07\x00" + plain(m.Request(2, "GET", "/y"), m.Response(1, 200), m.Window(1, 9)),
    ]


def main() -> None:
    import tempfile

    import atheris

    argv = list(sys.argv)
    if not any(not a.startswith("-") for a in argv[1:]):     # no corpus given: seed one
        corpus = tempfile.mkdtemp(prefix="utesla-fuzz-handshake-")
        for i, seed in enumerate(seeds()):
            with open(os.path.join(corpus, f"seed-{i}"), "wb") as f:
                f.write(seed)
        argv.append(corpus)
    atheris.Setup(argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
