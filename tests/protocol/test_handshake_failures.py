"""Every way a handshake can go wrong ends in a ProtocolError subclass, both ends closed.

Each failing exchange is driven to its end: the failing side's CLOSE (when it
can still send one) is delivered, and a side left waiting sees EOF.  ``shuttle``
lets any exception that is not a ProtocolError propagate, so "never a crash" is
checked by every test here.
"""
from __future__ import annotations

import pytest

from protocol import (AuthenticationFailed, AuthenticationRequested, Connection, FrameError,
                      HandshakeCompleted, HandshakeFailed, IntegrityError, LocalProtocolError,
                      ProtocolError, RemoteProtocolError, Role, Settings, Status,
                      DecodeError)
from protocol import messages as m
from protocol.connection import MIN_RECORD, MIN_STREAMS, MIN_WINDOW, PROTOCOL_VERSION
from protocol.frame import HEADER, pack, unpack

from protocol_helpers import (LOW_ORDER_X25519, Backends, Pair, drive_to_end, flip, key,
                              plain_frame, reseal, shuttle, to_maps, unseal)

HELLO_DEFAULTS = dict(window=MIN_WINDOW, max_record=1 << 20, max_streams=256)


def _client_hello(**changes) -> bytes:
    fields = dict(version=PROTOCOL_VERSION, ephemeral=bytes(range(1, 33)), **HELLO_DEFAULTS)
    fields.update(changes)
    return plain_frame(m.ClientHello(**fields))


def _server_hello(**changes) -> bytes:
    fields = dict(version=PROTOCOL_VERSION, ephemeral=bytes(range(1, 33)), **HELLO_DEFAULTS)
    fields.update(changes)
    return plain_frame(m.ServerHello(**fields))


def _clear_close(data: bytes) -> m.Close:
    """The one clear CLOSE frame a node sends before any key exists (SPEC.md §4.8)."""
    (length,) = HEADER.unpack_from(data)
    assert len(data) == 4 + length, "exactly one frame"
    msg = m.decode(unpack(data[4:]))
    assert isinstance(msg, m.Close), msg
    return msg


def _assert_failed_cleanly(pair: Pair, run) -> None:
    drive_to_end(pair, run)
    assert run.errors, "some side must have reported the failure"
    for exc in run.errors:
        assert isinstance(exc, ProtocolError), exc
    assert pair.client.closed and pair.server.closed
    assert not pair.client.established
    assert run.of_type("client", HandshakeCompleted) == []


# --------------------------------------------------------------------------- identities

@pytest.mark.parametrize("node,pinned", [("ed25519", "ed25519"), ("ed25519", "rsa2048"),
                                         ("rsa2048", "ed25519"), ("rsa2048", "rsa2048")])
def test_wrong_pinned_node_key(backends, node, pinned):
    pair = Pair(key(node, 0), key("ed25519", 1), pinned=key(pinned, 2).public,
                backends=backends)
    run = pair.shuttle(catch=True)
    assert isinstance(run.client_error, AuthenticationFailed)
    assert "pinned" in str(run.client_error)
    # The client refused before sending anything that names the user.
    assert run.of_type("server", AuthenticationRequested) == []
    assert b"alice" not in b"".join(run.c2s)
    assert isinstance(run.server_error, AuthenticationFailed)
    _assert_failed_cleanly(pair, run)
    assert not pair.server.established


def _refusal(users, user_kind="ed25519"):
    pair = Pair(key("ed25519", 0), key(user_kind, 1), users=users)
    run = pair.shuttle(catch=True)
    assert isinstance(run.server_error, AuthenticationFailed)
    assert isinstance(run.client_error, AuthenticationFailed)
    assert [type(e) for e in run.server_events] == [AuthenticationRequested]
    assert run.client_events == []
    _assert_failed_cleanly(pair, run)
    assert not pair.server.established
    return run


def test_unknown_user_is_refused():
    run = _refusal(users={"bob": key("ed25519", 1).public})
    assert run.server_error.code == Status.UNAUTHORIZED


def test_bad_signature_is_refused():
    """The user exists but is registered with another key: its signature does not verify."""
    run = _refusal(users={"alice": key("ed25519", 2).public})
    assert run.server_error.code == Status.UNAUTHORIZED


def _visible(run) -> tuple:
    """Everything the client can observe about a refusal."""
    return (type(run.client_error), str(run.client_error), run.client_error.code,
            [len(f) for f in run.s2c], [type(e) for e in run.client_events],
            type(run.server_error), str(run.server_error))


@pytest.mark.parametrize("user_kind", ["ed25519", "rsa2048"])
def test_unknown_user_and_bad_signature_look_identical_to_the_client(user_kind):
    unknown = _visible(_refusal({}, user_kind))
    wrong_same_type = _visible(_refusal({"alice": key(user_kind, 2).public}, user_kind))
    other_type = "rsa2048" if user_kind == "ed25519" else "ed25519"
    wrong_other_type = _visible(_refusal({"alice": key(other_type, 2).public}, user_kind))
    assert unknown == wrong_same_type == wrong_other_type
    assert unknown[0] is AuthenticationFailed and unknown[1] == "authentication failed"


def test_user_name_never_travels_in_clear():
    pair = Pair(user="alice-the-unique-name")
    pair.users = {"alice-the-unique-name": pair.user_key.public}
    run = pair.handshake()
    assert b"alice-the-unique-name" not in b"".join(run.c2s + run.s2c)


def test_complete_auth_without_pending_request_is_a_local_error(pair):
    with pytest.raises(LocalProtocolError):
        pair.server.complete_auth(pair.user_key.public)


def test_client_needs_user_and_pinned_key():
    with pytest.raises(LocalProtocolError):
        Connection(Role.CLIENT, identity=key(), user="alice")
    with pytest.raises(LocalProtocolError):
        Connection(Role.CLIENT, identity=key(), server_key=key().public)
    with pytest.raises(LocalProtocolError):
        Connection(Role.CLIENT, identity=key(), user="x" * 200, server_key=key().public)


# --------------------------------------------------------------------------- bit flips

#: (direction, frame index in that direction, name)
HANDSHAKE_FRAMES = [("c2s", 0, "ClientHello"), ("s2c", 0, "ServerHello"),
                    ("s2c", 1, "ServerAuth"), ("c2s", 1, "ClientAuth"),
                    ("s2c", 2, "ServerFinished")]


def _reference_frames(node_kind, user_kind) -> dict:
    pair = Pair(key(node_kind, 0), key(user_kind, 1))
    run = pair.handshake()
    return {name: getattr(run, d)[i] for d, i, name in HANDSHAKE_FRAMES}


@pytest.mark.parametrize("keys", ["ed25519", "rsa2048"])
@pytest.mark.parametrize("direction,index,name", HANDSHAKE_FRAMES,
                         ids=[n for _, _, n in HANDSHAKE_FRAMES])
def test_flipped_bit_in_each_handshake_message(keys, direction, index, name):
    """Every byte position (a different bit each time; all bits of the length prefix)."""
    size = len(_reference_frames(keys, keys)[name])
    positions = [(p, b) for p in range(4) for b in range(8)]
    step = 1 if keys == "ed25519" else 7          # RSA messages are long: sample them
    positions += [(p, p % 8) for p in range(4, size, step)]
    for pos, bit in positions:
        pair = Pair(key(keys, 0), key(keys, 1))

        def tamper(d, i, f, pos=pos, bit=bit):
            if d == direction and i == index:
                assert len(f) == size
                return flip(f, pos, bit)
            return f

        run = pair.shuttle(tamper=tamper, catch=True)
        _assert_failed_cleanly(pair, run)
        if name != "ServerFinished":       # the node finishes before sending it
            assert not pair.server.established
            assert run.of_type("server", HandshakeCompleted) == []


def test_truncated_handshake_stream_at_every_byte():
    """EOF at any point of the handshake is a FrameError for the side that sees it."""
    ref = Pair()
    run = ref.handshake()
    to_server = b"".join(run.to_server)
    to_client = b"".join(run.to_client)
    for cut in range(0, len(to_server), 3):
        server = Pair().server
        try:
            server.receive_data(to_server[:cut])
        except ProtocolError:
            assert server.closed
            continue
        with pytest.raises(ProtocolError):
            server.receive_eof()
        assert server.closed
    first_flight = len(run.to_client[0])
    for cut in range(0, first_flight, 3):
        client = Pair().client
        with pytest.raises(FrameError):        # a prefix of the node's flight, then EOF
            client.receive_data(to_client[:cut])
            client.receive_eof()
        assert client.closed


# --------------------------------------------------------------------------- replays

def test_replayed_client_auth_from_an_earlier_session_never_completes():
    old = Pair().handshake()
    captured = old.c2s[1]
    pair = Pair()
    run = pair.shuttle(tamper=lambda d, i, f: captured if (d, i) == ("c2s", 1) else f,
                       catch=True)
    assert isinstance(run.server_error, IntegrityError)
    assert run.of_type("server", AuthenticationRequested) == []
    _assert_failed_cleanly(pair, run)
    assert not pair.server.established


def test_replaying_a_whole_earlier_client_stream_to_a_new_node_session_fails():
    old = Pair().handshake()
    server = Pair().server
    events = server.receive_data(old.c2s[0])          # the old ClientHello is still a hello
    assert events == []
    with pytest.raises(IntegrityError):
        server.receive_data(old.c2s[1])               # ... but its ClientAuth is useless
    assert server.closed and not server.established


def test_replayed_server_flight_is_refused_by_a_new_client():
    """A captured ServerHello+ServerAuth (validly signed, for the old transcript) fails."""
    old = Pair().handshake()
    client = Pair().client
    with pytest.raises(IntegrityError):
        client.receive_data(old.to_client[0])
    assert client.closed


def test_server_signature_from_another_session_is_refused():
    """Re-seal an old ServerAuth (real node key, real signature) under the new session's keys."""
    old_pair = Pair()
    old_plain = {}

    def grab(d, i, f):
        if (d, i) == ("s2c", 1):
            old_plain["auth"] = unseal(old_pair.server._handshake.sealer.key, f)
        return f

    old_pair.shuttle(tamper=grab)
    pair = Pair()

    def swap(d, i, f):
        if (d, i) == ("s2c", 1):
            return reseal(pair.server._handshake.sealer.key, old_plain["auth"])
        return f

    run = pair.shuttle(tamper=swap, catch=True)
    assert isinstance(run.client_error, AuthenticationFailed)
    assert "signature" in str(run.client_error)
    _assert_failed_cleanly(pair, run)


# --------------------------------------------------------------------------- forged records

def _forge(direction, index, plaintext_of_pair):
    """A tamper hook replacing one handshake record with a correctly sealed forgery."""

    def build(pair):
        def tamper(d, i, f):
            if (d, i) != (direction, index):
                return f
            sender = pair.client if direction == "c2s" else pair.server
            return reseal(sender._handshake.sealer.key, plaintext_of_pair(pair))
        return tamper

    return build


def _client_auth(pair, sig=None, user="alice"):
    return m.ClientAuth(user, sig if sig is not None else b"\x00" * 64)


CLIENT_AUTH_FORGERIES = {
    "empty array": (lambda p: pack([]), DecodeError),
    "two messages": (lambda p: pack(to_maps(_client_auth(p), _client_auth(p))), DecodeError),
    "bare map": (lambda p: pack(to_maps(_client_auth(p))[0]), DecodeError),
    "not msgpack": (lambda p: b"\xc1\xc1", DecodeError),
    "trailing bytes": (lambda p: pack(to_maps(_client_auth(p))) + b"\x00", DecodeError),
    "request instead": (lambda p: pack(to_maps(m.Request(1, "GET", "/"))), HandshakeFailed),
    "unknown field": (lambda p: pack([{**m.to_map(_client_auth(p)), "x": 1}]), DecodeError),
    "user not a string": (lambda p: pack([{"t": 19, "u": b"alice", "s": b""}]), DecodeError),
    "user too long": (lambda p: pack(to_maps(_client_auth(p, user="a" * 129))), DecodeError),
    "signature too long": (lambda p: pack(to_maps(_client_auth(p, sig=b"s" * 1025))),
                           DecodeError),
    # well-formed, but the signature is garbage: the generic refusal
    "zero signature": (lambda p: pack(to_maps(_client_auth(p))), AuthenticationFailed),
    "empty signature": (lambda p: pack(to_maps(_client_auth(p, sig=b""))),
                        AuthenticationFailed),
}


@pytest.mark.parametrize("case", list(CLIENT_AUTH_FORGERIES))
def test_malformed_client_auth_record(case):
    make, exc_type = CLIENT_AUTH_FORGERIES[case]
    pair = Pair()
    run = pair.shuttle(tamper=_forge("c2s", 1, make)(pair), catch=True)
    assert type(run.server_error) is exc_type, run.server_error
    # the client hears about it through a CLOSE sealed with the handshake key
    assert isinstance(run.client_error, HandshakeFailed)
    _assert_failed_cleanly(pair, run)
    assert not pair.server.established


def _server_auth(pair, **kw):
    fields = dict(public_key=pair.node_key.public.der, signature=b"\x00" * 64)
    fields.update(kw)
    return m.ServerAuth(**fields)


SERVER_AUTH_FORGERIES = {
    "empty array": (lambda p: pack([]), DecodeError),
    "two messages": (lambda p: pack(to_maps(_server_auth(p), _server_auth(p))), DecodeError),
    "not msgpack": (lambda p: b"\x92", DecodeError),
    "finished too early": (lambda p: pack(to_maps(m.ServerFinished())), HandshakeFailed),
    "other node key": (lambda p: pack(to_maps(_server_auth(
        p, public_key=key("ed25519", 2).public.der))), AuthenticationFailed),
    "zero signature": (lambda p: pack(to_maps(_server_auth(p))), AuthenticationFailed),
    "signature by another key": (lambda p: pack(to_maps(_server_auth(
        p, signature=key("ed25519", 2).sign(b"anything")))), AuthenticationFailed),
    "truncated signature": (lambda p: pack(to_maps(_server_auth(p, signature=b"\x01" * 63))),
                            AuthenticationFailed),
    "close unauthorized": (lambda p: pack(to_maps(m.Close(401, "no"))), AuthenticationFailed),
    "close other": (lambda p: pack(to_maps(m.Close(503, "busy"))), HandshakeFailed),
}


@pytest.mark.parametrize("case", list(SERVER_AUTH_FORGERIES))
def test_malformed_server_auth_record(case):
    make, exc_type = SERVER_AUTH_FORGERIES[case]
    pair = Pair()
    run = pair.shuttle(tamper=_forge("s2c", 1, make)(pair), catch=True)
    assert type(run.client_error) is exc_type, run.client_error
    _assert_failed_cleanly(pair, run)
    assert not pair.server.established


@pytest.mark.parametrize("case", ["empty", "two finished", "server auth again", "request"])
def test_malformed_server_finished_record(case):
    plain = {"empty": pack([]),
             "two finished": pack(to_maps(m.ServerFinished(), m.ServerFinished())),
             "server auth again": pack(to_maps(m.ServerAuth(b"k", b"s"))),
             "request": pack(to_maps(m.Request(2, "GET", "/")))}[case]

    pair = Pair()
    hs_key = {}

    def tamper(d, i, f):
        if (d, i) == ("s2c", 1):      # the node drops its handshake keys once finished
            hs_key["s"] = pair.server._handshake.sealer.key
        if (d, i) == ("s2c", 2):      # ServerFinished is the node's second handshake record
            return reseal(hs_key["s"], plain, counter=1)
        return f

    run = pair.shuttle(tamper=tamper, catch=True)
    assert isinstance(run.client_error, (DecodeError, HandshakeFailed))
    _assert_failed_cleanly(pair, run)


# --------------------------------------------------------------------------- ephemeral keys

@pytest.mark.parametrize("point", LOW_ORDER_X25519, ids=lambda p: p.hex()[:6] + p.hex()[-2:])
@pytest.mark.parametrize("x25519", ["pycryptodome", "cryptography"])
def test_low_order_ephemeral_in_client_hello(point, x25519):
    server = Pair(backends=Backends(server_ephemeral=x25519)).server
    with pytest.raises(RemoteProtocolError, match="small order"):
        server.receive_data(_client_hello(ephemeral=point))
    assert server.closed
    # no keys yet: the node says why in a clear CLOSE 400, like any refused hello (§4.8)
    assert _clear_close(server.data_to_send()) == m.Close(400, "ephemeral key of small order")


@pytest.mark.parametrize("point", LOW_ORDER_X25519, ids=lambda p: p.hex()[:6] + p.hex()[-2:])
@pytest.mark.parametrize("x25519", ["pycryptodome", "cryptography"])
def test_low_order_ephemeral_in_server_hello(point, x25519):
    client = Pair(backends=Backends(client_ephemeral=x25519)).client
    client.data_to_send()
    with pytest.raises(RemoteProtocolError, match="small order"):
        client.receive_data(_server_hello(ephemeral=point))
    assert client.closed


def test_ephemeral_of_wrong_length_is_a_decode_error():
    server = Pair().server
    with pytest.raises(DecodeError):
        server.receive_data(plain_frame({"t": 16, "v": 1, "e": b"\x09" * 31, "w": MIN_WINDOW,
                                         "r": MIN_RECORD, "n": MIN_STREAMS}))
    assert server.closed


# --------------------------------------------------------------------------- versions, settings

@pytest.mark.parametrize("version", [0, 2, 255])
def test_unsupported_protocol_version_from_client(version):
    pair = Pair()

    def tamper(d, i, f):
        if (d, i) == ("c2s", 0):
            hello = unpack(f[4:])
            hello["v"] = version
            return plain_frame(hello)
        return f

    run = pair.shuttle(tamper=tamper, catch=True)
    assert isinstance(run.server_error, HandshakeFailed)
    assert f"unsupported protocol version {version}" in str(run.server_error)
    # the node explains in clear text (no keys yet) and the client reports it
    assert isinstance(run.client_error, HandshakeFailed)
    assert "unsupported protocol version" in str(run.client_error)
    assert run.client_error.code == Status.BAD_REQUEST
    _assert_failed_cleanly(pair, run)


@pytest.mark.parametrize("version", [0, 2, 255])
def test_unsupported_protocol_version_from_server(version):
    client = Pair().client
    client.data_to_send()
    with pytest.raises(HandshakeFailed, match="unsupported protocol version"):
        client.receive_data(_server_hello(version=version))
    assert client.closed


@pytest.mark.parametrize("field,value", [("window", MIN_WINDOW - 1),
                                         ("max_record", MIN_RECORD - 1),
                                         ("max_streams", MIN_STREAMS - 1)])
@pytest.mark.parametrize("side", ["client", "server"])
def test_settings_below_the_protocol_minimums(side, field, value):
    if side == "server":
        conn = Pair().server
        data = _client_hello(**{field: value})
    else:
        conn = Pair().client
        conn.data_to_send()
        data = _server_hello(**{field: value})
    with pytest.raises(HandshakeFailed, match="minimums"):
        conn.receive_data(data)
    assert conn.closed


@pytest.mark.parametrize("frame", [
    plain_frame(m.ServerHello(1, bytes(32), MIN_WINDOW, MIN_RECORD, MIN_STREAMS)),
    plain_frame(m.Request(1, "GET", "/")),
    plain_frame(m.Close(200, "")),
    plain_frame({"t": 16}),
    plain_frame([1, 2, 3]),
], ids=["server-hello", "request", "close", "hello-without-fields", "array"])
def test_wrong_first_message_from_client(frame):
    server = Pair().server
    with pytest.raises((HandshakeFailed, DecodeError)):
        server.receive_data(frame)
    assert server.closed


def test_client_hello_sent_twice_is_refused():
    pair = Pair()
    hello = pair.client.data_to_send()
    pair.server.receive_data(hello)
    with pytest.raises(IntegrityError):            # the server now expects a sealed ClientAuth
        pair.server.receive_data(hello)
    assert pair.server.closed


# --------------------------------------------------------------------------- timers

def test_handshake_timeout_on_the_server():
    pair = Pair(settings=Settings(handshake_timeout=10.0), now=100.0)
    assert pair.server.get_timer() == 110.0
    pair.server.handle_timer(109.999)
    assert not pair.server.closed
    with pytest.raises(HandshakeFailed, match="timed out") as info:
        pair.server.handle_timer(110.0)
    assert info.value.code == Status.TIMEOUT
    assert pair.server.closed and pair.server.get_timer() is None


def test_handshake_timeout_on_the_client():
    pair = Pair(settings=Settings(handshake_timeout=5.0), now=1_000.0)
    pair.client.data_to_send()
    assert pair.client.get_timer() == 1_005.0
    with pytest.raises(HandshakeFailed, match="timed out"):
        pair.client.handle_timer(2_000.0)
    assert pair.client.closed


def test_handshake_timeout_while_the_node_looks_up_the_user():
    """Timing out with keys in place: the client is told, under the handshake key."""
    pair = Pair(users=None, settings=Settings(handshake_timeout=3.0))
    run = shuttle(pair.client, pair.server, users=None)      # nobody answers the lookup
    assert run.of_type("server", AuthenticationRequested)
    with pytest.raises(HandshakeFailed):
        pair.server.handle_timer(3.0)
    with pytest.raises(HandshakeFailed) as info:
        pair.client.receive_data(pair.server.data_to_send())
    assert info.value.code == Status.TIMEOUT
    assert pair.client.closed
    with pytest.raises(LocalProtocolError):
        pair.server.complete_auth(pair.user_key.public)   # too late


def test_timer_is_inert_once_established(pair):
    assert pair.client.get_timer() is None and pair.server.get_timer() is None
    pair.client.handle_timer(1e12)
    pair.server.handle_timer(1e12)
    assert pair.client.established and pair.server.established


@pytest.mark.parametrize("stage", range(4))
def test_eof_during_handshake_is_a_frame_error(stage):
    pair = Pair(users=None)
    if stage >= 1:
        pair.server.receive_data(pair.client.data_to_send())
    if stage >= 2:
        pair.client.receive_data(pair.server.data_to_send())
    if stage >= 3:
        pair.server.receive_data(pair.client.data_to_send())   # -> awaiting the user's key
    for conn in (pair.client, pair.server):
        with pytest.raises(FrameError):
            conn.receive_eof()
        assert conn.closed
        assert conn.receive_eof() == []          # once closed, EOF is quiet
