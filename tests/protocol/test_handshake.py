"""Happy paths: the handshake for every key-type pair, then traffic both ways.

Every test here takes ``make_pair``, so it runs over the whole backend matrix
(AEAD: pycryptodome / cryptography, X25519: pycryptodome / cryptography, and
mixed pairs where the client and the node use different implementations).
"""
from __future__ import annotations

import pytest

from protocol import (AuthenticationRequested, ConnectionClosed, DataReceived, GoAwayReceived,
                      HandshakeCompleted, LocalProtocolError, PongReceived, RequestReceived,
                      ResponseReceived, Settings, Status, StreamReset, WindowUpdated)

from protocol_helpers import split_frames

KEY_PAIRS = [
    ("ed25519", "ed25519"),
    ("ed25519", "rsa2048"),
    ("rsa2048", "ed25519"),
    ("rsa2048", "rsa2048"),
]


def _assert_handshake(pair, run):
    assert pair.client.established and pair.server.established
    (auth,) = run.of_type("server", AuthenticationRequested)
    assert auth.user == "alice"
    (done_s,) = run.of_type("server", HandshakeCompleted)
    assert done_s.peer_user == "alice" and done_s.peer_key == pair.user_key.public
    (done_c,) = run.of_type("client", HandshakeCompleted)
    assert done_c.peer_key == pair.node_key.public and done_c.peer_user is None
    assert pair.server.peer_user == "alice"
    assert pair.client.peer_key == pair.node_key.public
    assert pair.client.get_timer() is None and pair.server.get_timer() is None


def _round_trip_both_ways(pair):
    c, s = pair.client, pair.server
    sid = c.send_request("get", "/hello_world", token="tok", args={"x": [1, 2]},
                         headers={"accept": "text/plain"})
    assert sid % 2 == 1
    run = pair.shuttle()
    (req,) = run.of_type("server", RequestReceived)
    assert (req.stream_id, req.method, req.path, req.token, req.args, req.headers, req.end) == (
        sid, "GET", "/hello_world", "tok", {"x": [1, 2]}, {"accept": "text/plain"}, True)
    s.send_response(sid, 200, headers={"content-type": "text/plain"}, body=b"Hello World!")
    run = pair.shuttle()
    (resp,) = run.of_type("client", ResponseReceived)
    assert (resp.stream_id, resp.status, resp.body, resp.end) == (sid, 200, b"Hello World!", True)
    assert resp.headers == {"content-type": "text/plain"}
    assert not c.is_open(sid) and not s.is_open(sid)

    # node -> client request, on an even stream id (SPEC.md: the server's parity).
    sid2 = s.send_request("POST", "/client/callback", body=b"ping?")
    assert sid2 % 2 == 0 and sid2 > 0
    run = pair.shuttle()
    (req2,) = run.of_type("client", RequestReceived)
    assert (req2.stream_id, req2.method, req2.path, req2.body) == (sid2, "POST",
                                                                   "/client/callback", b"ping?")
    c.send_response(sid2, 201, body=b"pong!")
    run = pair.shuttle()
    (resp2,) = run.of_type("server", ResponseReceived)
    assert (resp2.stream_id, resp2.status, resp2.body) == (sid2, 201, b"pong!")
    assert c.open_streams == 0 and s.open_streams == 0


@pytest.mark.parametrize("node,user", KEY_PAIRS, ids=[f"node={n}-user={u}" for n, u in KEY_PAIRS])
def test_handshake_and_requests_for_each_key_type_pair(make_pair, node, user):
    pair = make_pair(node, user)
    run = pair.handshake()
    _assert_handshake(pair, run)
    _round_trip_both_ways(pair)


@pytest.mark.parametrize("node,user", [("rsa3072", "ed25519"), ("ed25519", "rsa3072")],
                         ids=["node=rsa3072", "user=rsa3072"])
def test_handshake_with_rsa3072(make_pair, node, user):
    pair = make_pair(node, user)
    run = pair.handshake()
    _assert_handshake(pair, run)
    _round_trip_both_ways(pair)


def test_handshake_flight_shapes(make_pair):
    """ClientHello | ServerHello+ServerAuth | ClientAuth | ServerFinished: 3 flights, 5 frames."""
    pair = make_pair()
    run = pair.handshake()
    assert len(run.c2s) == 2 and len(run.s2c) == 3
    assert len(run.to_server) == 2 and len(run.to_client) == 2


def test_requests_queued_before_the_handshake_go_out_behind_client_auth(make_pair):
    """0.5-RTT: the client may queue requests at once; the node sees them after auth."""
    pair = make_pair()
    sids = [pair.client.send_request("GET", f"/early/{i}") for i in range(3)]
    run = pair.handshake()
    reqs = run.of_type("server", RequestReceived)
    assert [r.stream_id for r in reqs] == sids
    kinds = [type(e).__name__ for e in run.server_events]
    assert kinds.index("HandshakeCompleted") < kinds.index("RequestReceived")


def test_many_concurrent_streams_answered_out_of_order(make_pair):
    pair = make_pair()
    pair.handshake()
    c, s = pair.client, pair.server
    sids = [c.send_request("GET", f"/item/{i}", args={"i": i}) for i in range(40)]
    assert len(set(sids)) == 40 and sids == sorted(sids)
    run = pair.shuttle()
    reqs = run.of_type("server", RequestReceived)
    assert [r.stream_id for r in reqs] == sids
    for r in reversed(reqs):        # answer in reverse order, interleaving two halves
        s.send_response(r.stream_id, 200, body=str(r.args["i"]).encode(), end=False)
    for r in reqs:
        s.send_data(r.stream_id, b"!", end=True)
    run = pair.shuttle()
    bodies: dict[int, bytes] = {}
    for e in run.client_events:
        if isinstance(e, (ResponseReceived, DataReceived)):
            bodies[e.stream_id] = bodies.get(e.stream_id, b"") + (
                e.body if isinstance(e, ResponseReceived) else e.data)
    assert bodies == {sid: f"{i}!".encode() for i, sid in enumerate(sids)}
    assert c.open_streams == 0 and s.open_streams == 0


def _pump(pair, sender_role: str, sid: int, body: bytes, chunk: int) -> tuple[bytes, list]:
    """Stream ``body`` on ``sid`` under flow control; the receiver acknowledges as it reads."""
    sender = getattr(pair, sender_role)
    receiver_role = "server" if sender_role == "client" else "client"
    receiver = getattr(pair, receiver_role)
    received = bytearray()
    windows: list = []
    pos, ended = 0, False
    for _ in range(10_000):
        credit = sender.send_credit(sid)
        while pos < len(body) and credit > 0:
            n = min(chunk, credit, len(body) - pos, sender.max_chunk)
            sender.send_data(sid, body[pos:pos + n], end=pos + n == len(body))
            pos += n
            credit -= n
        if not body and not ended and pos == 0:
            sender.send_data(sid, b"", end=True)
            pos = -1
        run = pair.shuttle()
        windows += run.of_type(sender_role, WindowUpdated)
        for e in run.events(receiver_role):
            if isinstance(e, DataReceived) and e.stream_id == sid:
                received += e.data
                receiver.acknowledge(sid, len(e.data))
                ended = e.end
        if ended:
            return bytes(received), windows
        windows += pair.shuttle().of_type(sender_role, WindowUpdated)
    raise AssertionError("stream never finished")


@pytest.mark.parametrize("size", [0, 1, 65_535, 65_536, 300_001])
def test_streamed_bodies_with_data_and_window_credits(make_pair, size):
    small = Settings(window=65_536)
    pair = make_pair(settings=small)
    pair.handshake()
    c, s = pair.client, pair.server
    upload = bytes(i % 251 for i in range(size))
    sid = c.send_request("PUT", "/upload", end=False)
    run = pair.shuttle()
    (req,) = run.of_type("server", RequestReceived)
    assert req.end is False and req.body == b""
    got, windows = _pump(pair, "client", sid, upload, chunk=9_000)
    assert got == upload
    # a body larger than the window can only have gone through thanks to WINDOW credits
    assert (sum(w.credit for w in windows) > 0) == (size > 65_536)

    # and the answer streams back the same way
    s.send_response(sid, 200, body=b"", end=False)
    run = pair.shuttle()
    (resp,) = run.of_type("client", ResponseReceived)
    assert resp.end is False
    got, _ = _pump(pair, "server", sid, upload[::-1], chunk=12_345)
    assert got == upload[::-1]
    assert not c.is_open(sid) and not s.is_open(sid)


def test_request_body_in_the_request_message_counts_against_the_window(make_pair):
    pair = make_pair(settings=Settings(window=65_536))
    pair.handshake()
    sid = pair.client.send_request("POST", "/x", body=b"a" * 60_000, end=False)
    assert pair.client.send_credit(sid) == 65_536 - 60_000
    run = pair.shuttle()
    (req,) = run.of_type("server", RequestReceived)
    assert len(req.body) == 60_000
    with pytest.raises(LocalProtocolError):
        pair.client.send_data(sid, b"b" * 6_000)     # over the remaining credit
    pair.client.send_data(sid, b"b" * 5_536, end=True)
    run = pair.shuttle()
    (data,) = run.of_type("server", DataReceived)
    assert data.end and len(data.data) == 5_536


@pytest.mark.parametrize("opaque", [b"", b"\x00", bytes(range(64))])
def test_ping_pong(make_pair, opaque):
    pair = make_pair()
    pair.handshake()
    pair.client.send_ping(opaque)
    pair.server.send_ping(opaque[::-1])
    run = pair.shuttle()
    assert run.of_type("client", PongReceived) == [PongReceived(opaque)]
    assert run.of_type("server", PongReceived) == [PongReceived(opaque[::-1])]


def test_goaway_lets_open_streams_finish_and_refuses_new_ones(make_pair):
    pair = make_pair()
    pair.handshake()
    c, s = pair.client, pair.server
    first = c.send_request("GET", "/slow")
    pair.shuttle()
    s.send_goaway("maintenance")
    late = c.send_request("GET", "/crossed")     # crosses the GOAWAY on the wire
    run = pair.shuttle()
    (ga,) = run.of_type("client", GoAwayReceived)
    assert (ga.last_stream_id, ga.reason) == (first, "maintenance")
    (reset,) = run.of_type("client", StreamReset)
    assert (reset.stream_id, reset.status) == (late, Status.UNAVAILABLE)
    with pytest.raises(LocalProtocolError):
        c.send_request("GET", "/refused")
    s.send_response(first, 200, body=b"done")
    run = pair.shuttle()
    (resp,) = run.of_type("client", ResponseReceived)
    assert (resp.stream_id, resp.body) == (first, b"done")


def test_reset_stream_aborts_both_ways_and_drops_late_bytes(make_pair):
    pair = make_pair()
    pair.handshake()
    c, s = pair.client, pair.server
    sid = c.send_request("GET", "/stream")
    pair.shuttle()
    s.send_response(sid, 200, body=b"part", end=False)
    c.reset_stream(sid, Status.CANCELLED, "not interested")
    run = pair.shuttle()
    (reset,) = run.of_type("server", StreamReset)
    assert (reset.stream_id, reset.status, reset.reason) == (sid, Status.CANCELLED,
                                                             "not interested")
    # the client dropped the response that crossed its reset: no event, no error
    assert run.of_type("client", ResponseReceived) == []
    assert not c.is_open(sid) and not s.is_open(sid)


@pytest.mark.parametrize("closer", ["client", "server"])
def test_close_is_delivered_and_eof_after_it_is_clean(make_pair, closer):
    pair = make_pair()
    pair.handshake()
    sid = pair.client.send_request("GET", "/pending")
    pair.shuttle()
    local = getattr(pair, closer)
    remote = pair.server if closer == "client" else pair.client
    local.close(Status.OK, "bye")
    assert local.closed
    run = pair.shuttle()
    other = "server" if closer == "client" else "client"
    assert run.of_type(other, ConnectionClosed) == [ConnectionClosed(Status.OK, "bye")]
    assert remote.closed and not remote.is_open(sid)
    assert remote.receive_eof() == [] and local.receive_eof() == []
    assert remote.receive_data(b"anything after close is ignored") == []
    with pytest.raises(LocalProtocolError):
        local.send_request("GET", "/after-close")


def test_records_after_close_in_the_same_flight_are_ignored(make_pair):
    pair = make_pair()
    pair.handshake()
    pair.client.send_request("GET", "/a")
    pair.client.close(Status.OK, "done")
    data = pair.client.data_to_send()
    assert len(split_frames(data)) == 1           # request and close share one record
    events = pair.server.receive_data(data)
    assert [type(e).__name__ for e in events] == ["RequestReceived", "ConnectionClosed"]


def test_the_backend_matrix_is_really_in_use(make_pair, backends):
    pair = make_pair()
    for role in ("client", "server"):
        wanted_x = getattr(backends, f"{role}_ephemeral")
        ephemeral = getattr(pair, role)._handshake.ephemeral
        assert (ephemeral._fast is not None) == (wanted_x == "cryptography")
    pair.handshake()
    for role in ("client", "server"):
        conn = getattr(pair, role)
        wanted_aead = getattr(backends, f"{role}_aead")
        assert conn._sealer._cls.name == wanted_aead
        assert conn._opener._cls.name == wanted_aead


def _pure_pycryptodome(private):
    """The same identity key with the OpenSSL fast paths switched off."""
    from protocol.crypto import PrivateKey, PublicKey
    slow = PrivateKey(private._key)
    slow._fast = None
    slow.public._fast = None
    pinned = PublicKey(private.public._key)
    pinned._fast = None
    return slow, pinned


def test_handshake_with_no_openssl_path_at_all():
    """Everything through pycryptodome: AEAD, X25519, Ed25519 signing and verifying."""
    from protocol_helpers import Backends, Pair, key
    node, node_pub = _pure_pycryptodome(key("ed25519", 0))
    user, user_pub = _pure_pycryptodome(key("ed25519", 1))
    pair = Pair(node, user, pinned=node_pub, users={"alice": user_pub},
                backends=Backends("pycryptodome", "pycryptodome", "pycryptodome",
                                  "pycryptodome"))
    run = pair.handshake()
    _assert_handshake(pair, run)
    _round_trip_both_ways(pair)


def test_ephemeral_secrets_are_dropped_once_established(make_pair):
    pair = make_pair()
    pair.handshake()
    for conn in (pair.client, pair.server):
        assert conn._handshake is None      # with it the ephemeral and shared secrets
