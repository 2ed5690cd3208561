"""The handshake's state table, its frame limit, and how a handshake or a connection ends.

* the table of protocol/handshake.py is the state machine of SPEC.md §4.9, and every
  move it does not list is refused as the right side's error;
* before keys exist a peer cannot make us wait for (and buffer) a frame larger than
  the largest handshake message (SPEC.md §4.1), yet an RSA-8192 handshake fits;
* every refused handshake before keys gets one clear CLOSE from the node (§4.8);
* a CLOSE ends a record: messages before it count, nothing after it, no answers (§5.5).
"""
from __future__ import annotations

import struct

import pytest

from protocol import (ConnectionClosed, FrameError, GoAwayReceived, HandshakeCompleted,
                      HandshakeFailed, LocalProtocolError, PongReceived, PrivateKey,
                      RemoteProtocolError, RequestReceived, ResponseReceived, Role, Settings,
                      Status)
from protocol import messages as m
from protocol.crypto import TAG_LEN
from protocol.frame import HEADER, FrameBuffer, pack, unpack
from protocol.handshake import (AWAITS, MAX_HANDSHAKE_FRAME, SENDER, TRANSITIONS, State,
                                advance)

from protocol_helpers import LOW_ORDER_X25519, Pair, key, plain_frame, send_raw, to_maps

MIB = 1 << 20


def _clear_close(data: bytes) -> m.Close:
    """The one clear CLOSE frame a node sends before any key exists (SPEC.md §4.8)."""
    (length,) = HEADER.unpack_from(data)
    assert len(data) == 4 + length, "exactly one frame"
    msg = m.decode(unpack(data[4:]))
    assert isinstance(msg, m.Close), msg
    return msg


# --------------------------------------------------------------------------- the table

def _walk(role: Role, start: State) -> list[type]:
    """The messages that take ``role`` from ``start`` to ESTABLISHED, in table order."""
    path, state = [], start
    while state is not State.ESTABLISHED:
        (msg, nxt), = [(msg, nxt) for (r, s, msg), nxt in TRANSITIONS.items()
                       if r is role and s is state]
        path.append(msg)
        state = nxt
    return path


def test_the_table_is_the_handshake_of_the_spec():
    """One path per role, in the order of SPEC.md §4.1 and §4.9."""
    assert _walk(Role.CLIENT, State.START) == [m.ClientHello, m.ServerHello, m.ServerAuth,
                                               m.ServerFinished]
    assert _walk(Role.SERVER, State.SERVER_AWAIT_HELLO) == [m.ClientHello, m.ClientAuth,
                                                            m.ServerFinished]
    # The peer owes us a message exactly in the waiting states; the node's key lookup
    # and the client's start wait on the application, not on the peer.
    assert set(AWAITS) == {
        (Role.CLIENT, State.CLIENT_SENT_HELLO), (Role.CLIENT, State.CLIENT_AWAIT_AUTH),
        (Role.CLIENT, State.CLIENT_AWAIT_FINISHED), (Role.SERVER, State.SERVER_AWAIT_HELLO),
        (Role.SERVER, State.SERVER_AWAIT_AUTH)}


@pytest.mark.parametrize("role", list(Role), ids=lambda r: r.value)
@pytest.mark.parametrize("state", list(State), ids=lambda s: s.name)
@pytest.mark.parametrize("msg", [*SENDER, m.Request, m.Close], ids=lambda c: c.__name__)
def test_every_move_outside_the_table_is_refused_as_the_right_sides_error(role, state, msg):
    for sent in (False, True):
        allowed = TRANSITIONS.get((role, state, msg))
        if allowed is not None and (SENDER[msg] is role) == sent:
            assert advance(role, state, msg, sent=sent) is allowed
            continue
        # what we would send is our bug; what the peer sent is the peer's fault
        with pytest.raises(LocalProtocolError if sent else HandshakeFailed):
            advance(role, state, msg, sent=sent)


def test_a_peer_sending_our_own_hello_back_is_the_peers_error():
    server = Pair().server
    with pytest.raises(HandshakeFailed, match="expected ClientHello, got ServerHello"):
        server.receive_data(plain_frame(m.ServerHello(1, bytes(32), 1 << 16, 1 << 14, 16)))
    assert server.closed


def test_local_misuse_of_the_handshake_is_a_local_error(pair):
    fresh = Pair(initiate=False)
    with pytest.raises(LocalProtocolError, match="before initiate"):
        fresh.client.receive_data(b"\x00\x00\x00\x01x")
    fresh.client.initiate(0.0)
    with pytest.raises(LocalProtocolError, match="ClientHello"):
        fresh.client.initiate(0.0)
    with pytest.raises(LocalProtocolError, match="ServerFinished"):
        pair.server.complete_auth(pair.user_key.public)


# --------------------------------------------------------------------------- the frame limit

def test_the_limit_covers_every_handshake_message_the_schema_allows():
    """The largest ServerAuth and ClientAuth the decoder accepts fit, as records."""
    biggest = [m.ServerAuth(bytes(4096), bytes(1024)),
               m.ClientAuth("\U0001d11e" * m.MAX_USER, bytes(1024))]
    for msg in biggest:
        payload = 1 + len(m.encode(msg)) + TAG_LEN       # array header, map, tag
        assert payload <= MAX_HANDSHAKE_FRAME, (type(msg).__name__, payload)
    assert MAX_HANDSHAKE_FRAME <= 64 * 1024


def test_frame_buffer_refuses_an_oversized_header_before_keeping_what_follows():
    buf = FrameBuffer(MAX_HANDSHAKE_FRAME)
    buf.feed(b"\x00\x10")                               # half a header: nothing to judge yet
    with pytest.raises(FrameError) as info:
        buf.feed(b"\x00\x00" + bytes(64 * 1024))        # completes a 1 MiB header
    assert info.value.code == Status.TOO_LARGE
    assert len(buf) == 2                                # the 64 KiB behind it were not kept


def test_a_first_frame_declaring_one_mib_is_refused_on_its_four_header_bytes():
    """The node's default max_record is 1 MiB, but no ClientHello is that big."""
    server = Pair().server
    assert server.settings.max_record == MIB
    with pytest.raises(FrameError) as info:
        server.receive_data(struct.pack(">I", MIB))     # the header alone, nothing after
    assert info.value.code == Status.TOO_LARGE
    assert server.closed
    close = _clear_close(server.data_to_send())         # told at once, in clear (no keys)
    assert close.status == Status.TOO_LARGE
    # ... and the client that sent it learns why
    client = Pair().client
    client.data_to_send()
    with pytest.raises(HandshakeFailed) as got:
        client.receive_data(plain_frame(close))
    assert got.value.code == Status.TOO_LARGE


@pytest.mark.parametrize("length,refused", [(MAX_HANDSHAKE_FRAME, False),
                                            (MAX_HANDSHAKE_FRAME + 1, True)])
def test_the_limit_is_exact(length, refused):
    server = Pair().server
    if refused:
        with pytest.raises(FrameError):
            server.receive_data(struct.pack(">I", length))
        assert server.closed
    else:
        assert server.receive_data(struct.pack(">I", length) + bytes(100)) == []
        assert not server.closed                        # waits for the rest of the frame


def test_an_oversized_frame_where_client_auth_goes_gets_a_sealed_close_413():
    pair = Pair()
    pair.server.receive_data(pair.client.data_to_send())
    pair.client.receive_data(pair.server.data_to_send())
    pair.client.data_to_send()                          # the real ClientAuth, dropped
    with pytest.raises(FrameError):
        pair.server.receive_data(struct.pack(">I", MAX_HANDSHAKE_FRAME + 1))
    with pytest.raises(HandshakeFailed) as info:        # under the node's handshake key
        pair.client.receive_data(pair.server.data_to_send())
    assert info.value.code == Status.TOO_LARGE


def test_a_client_refuses_an_oversized_frame_in_place_of_the_server_hello():
    client = Pair().client
    client.data_to_send()
    with pytest.raises(FrameError) as info:
        client.receive_data(struct.pack(">I", MIB))
    assert info.value.code == Status.TOO_LARGE and client.closed
    assert client.data_to_send() == b""                 # a client without keys says nothing


def test_records_behind_the_handshake_may_be_as_large_as_max_record():
    """0.5-RTT requests behind ClientAuth, and the answers behind ServerFinished, are
    application records: the handshake limit stops at the last handshake message."""
    pair = Pair()
    body = b"q" * 12_000        # each request fits the minimum record (§4.7) ...
    sids = [pair.client.send_request("POST", "/early", body=body) for _ in range(4)]
    pair.server.receive_data(pair.client.data_to_send())
    pair.client.receive_data(pair.server.data_to_send())
    flight = pair.client.data_to_send()
    assert len(flight) > 4 * len(body)                  # ... and all four share one record
    (auth,) = pair.server.receive_data(flight)
    events = pair.server.complete_auth(pair.users[auth.user])
    assert [type(e) for e in events] == [HandshakeCompleted] + [RequestReceived] * 4
    assert all(e.body == body for e in events[1:])
    pair.server.send_response(sids[0], 200, body=b"r" * 60_000)
    flight = pair.server.data_to_send()                 # ServerFinished + the response
    events = pair.client.receive_data(flight)
    assert [type(e) for e in events] == [HandshakeCompleted, ResponseReceived]
    assert events[1].body == b"r" * 60_000


@pytest.fixture(scope="module")
def rsa8192() -> PrivateKey:
    """The largest identity key allowed (SPEC.md §3.3), made once for this module.

    Generated with OpenSSL (a few seconds; pycryptodome takes much longer) and loaded
    the way a key file is.
    """
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    pem = rsa.generate_private_key(public_exponent=65537, key_size=8192).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption())
    return PrivateKey.from_bytes(pem)


@pytest.mark.parametrize("who", ["node", "user", "both"])
def test_an_rsa8192_handshake_fits_under_the_limit(rsa8192, who):
    node = rsa8192 if who in ("node", "both") else key("ed25519", 0)
    user = rsa8192 if who in ("user", "both") else key("ed25519", 1)
    pair = Pair(node, user)
    run = pair.handshake(chunk=1000)                    # and in pieces, as TCP may cut it
    assert pair.server.peer_user == "alice" and pair.client.peer_key == node.public
    biggest = max(len(f) - 4 for f in run.c2s + run.s2c)
    assert 1024 < biggest <= MAX_HANDSHAKE_FRAME        # an 8192-bit signature went by
    sid = pair.client.send_request("GET", "/after")
    pair.shuttle()
    pair.server.send_response(sid, 200, body=b"ok")
    assert pair.shuttle().of_type("client", ResponseReceived)[0].body == b"ok"


# --------------------------------------------------------------------------- refusals (§4.8)

def _first_hello(pair: Pair) -> dict:
    return unpack(pair.client.data_to_send()[4:])


REFUSED_HELLOS = {
    "unknown key": lambda hello: plain_frame({**hello, "x": 1}),
    "bad version": lambda hello: plain_frame({**hello, "v": 2}),
    "settings below the minimums": lambda hello: plain_frame({**hello, "w": 1}),
    "missing field": lambda hello: plain_frame({k: v for k, v in hello.items() if k != "e"}),
    "low-order ephemeral": lambda hello: plain_frame({**hello, "e": LOW_ORDER_X25519[0]}),
    "not msgpack": lambda hello: struct.pack(">I", 3) + b"\xc1\xc1\xc1",
    "a request": lambda hello: plain_frame(m.Request(1, "GET", "/")),
}


@pytest.mark.parametrize("case", list(REFUSED_HELLOS))
def test_every_refused_client_hello_gets_one_clear_close_400(case):
    """Schema, version, settings, key or type: one answer, in clear, status 400."""
    pair = Pair()
    bad = REFUSED_HELLOS[case](_first_hello(pair))
    with pytest.raises(RemoteProtocolError) as info:
        pair.server.receive_data(bad)
    assert pair.server.closed
    close = _clear_close(pair.server.data_to_send())
    assert close.status == Status.BAD_REQUEST and close.reason == str(info.value)
    with pytest.raises(HandshakeFailed) as seen:        # the client reports the node's reason
        pair.client.receive_data(plain_frame(close))
    assert seen.value.code == Status.BAD_REQUEST and close.reason in str(seen.value)


def test_a_silent_peer_gets_a_clear_close_408_at_the_deadline():
    pair = Pair(settings=Settings(handshake_timeout=5.0), now=50.0)
    hello = pair.client.data_to_send()                  # ... never delivered
    assert hello and pair.server.get_timer() == 55.0
    with pytest.raises(HandshakeFailed) as info:
        pair.server.handle_timer(55.0)
    assert info.value.code == Status.TIMEOUT
    close = _clear_close(pair.server.data_to_send())
    assert (close.status, close.reason) == (Status.TIMEOUT, "handshake timed out")


def test_a_peer_stalling_after_the_hello_gets_a_sealed_close_408():
    pair = Pair(settings=Settings(handshake_timeout=5.0))
    pair.server.receive_data(pair.client.data_to_send())
    pair.client.receive_data(pair.server.data_to_send())
    pair.client.data_to_send()                          # ClientAuth never arrives
    with pytest.raises(HandshakeFailed):
        pair.server.handle_timer(5.0)
    with pytest.raises(HandshakeFailed) as info:
        pair.client.receive_data(pair.server.data_to_send())
    assert info.value.code == Status.TIMEOUT and pair.client.closed


# --------------------------------------------------------------------------- CLOSE in a record

def test_close_ends_the_record_what_came_before_counts_and_nothing_is_answered(pair):
    """[PONG, PING, GOAWAY, CLOSE, anything]: the PONG and GOAWAY are reported, the PING
    gets no PONG (the peer has stopped reading), and what follows the CLOSE - even a
    message that would not decode - is never looked at (SPEC.md §5.5)."""
    plaintext = pack(to_maps(m.Pong(b"a"), m.Ping(b"b"), m.GoAway(0, "bye"),
                             m.Close(Status.OK, "done"), {"t": 99},
                             m.Request(1, "GET", "/never")))
    events = send_raw(pair.client, pair.server, plaintext)
    assert events == [PongReceived(b"a"), GoAwayReceived(0, "bye"),
                      ConnectionClosed(Status.OK, "done")]
    assert pair.server.closed and pair.server.data_to_send() == b""


def test_a_response_coalesced_with_the_senders_close_is_delivered(pair):
    sid = pair.client.send_request("GET", "/last")
    pair.shuttle()
    pair.server.send_response(sid, 200, body=b"final answer")
    pair.server.close(Status.OK, "shutting down")
    events = pair.client.receive_data(pair.server.data_to_send())
    assert events == [ResponseReceived(sid, 200, {}, b"final answer", True),
                      ConnectionClosed(Status.OK, "shutting down")]
    assert pair.client.data_to_send() == b""

