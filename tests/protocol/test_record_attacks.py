"""Attacks on an established session: tampered, replayed, reordered, dropped,
truncated, foreign and malformed records, and peers that break stream rules.

Every case must end in the documented ProtocolError subclass with the victim
closed, and - when the victim still has keys - its CLOSE reaching the peer.
"""
from __future__ import annotations

import pytest

from protocol import (ConnectionClosed, DecodeError, FlowControlError, FrameError,
                      IntegrityError, LocalProtocolError, PongReceived, ProtocolError,
                      RequestReceived, ResponseReceived, Settings, Status)
from protocol import messages as m
from protocol.connection import MIN_WINDOW
from protocol.frame import DEFAULT_MAX_RECORD, HEADER, MAX_DEPTH, pack, unpack

from protocol_helpers import Pair, flip, plaintext_of, seal_raw, send_raw, split_frames


def _fails_with(pair: Pair, exc_type, plaintext: bytes, *, sender: str = "client") -> Exception:
    """Send one well-sealed record with ``plaintext``; the receiver must fail with ``exc_type``."""
    src = getattr(pair, sender)
    dst = pair.server if sender == "client" else pair.client
    with pytest.raises(ProtocolError) as info:
        send_raw(src, dst, plaintext)
    assert type(info.value) is exc_type, repr(info.value)
    assert dst.closed and dst.open_streams == 0
    # the victim still had keys: its CLOSE reaches the sender, carrying the error's code
    events = src.receive_data(dst.data_to_send())
    assert events[-1:] == [ConnectionClosed(info.value.code, str(info.value)[:m.MAX_REASON])]
    # (answers to valid messages before the bad one, e.g. a PONG, may precede the CLOSE)
    assert all(isinstance(e, PongReceived) for e in events[:-1])
    assert src.closed
    return info.value


# --------------------------------------------------------------------------- record integrity

def _one_ping_record(pair: Pair) -> bytes:
    pair.client.send_ping(b"!")
    (record,) = split_frames(pair.client.data_to_send())
    return record


@pytest.mark.parametrize("bit", range(8))
def test_flipped_bit_in_an_application_record(bit):
    """Every byte of a small record, the length prefix included, for every bit."""
    size = len(_one_ping_record(Pair.established()))
    for pos in range(size):
        pair = Pair.established()
        record = _one_ping_record(pair)
        assert len(record) == size
        try:
            events = pair.server.receive_data(flip(record, pos, bit))
        except (IntegrityError, FrameError):
            pass
        else:
            # a longer length prefix (still under the maximum): the server waits for
            # the rest, and EOF then reveals the truncation
            assert events == [] and pos < 4
            with pytest.raises(FrameError):
                pair.server.receive_eof()
        assert pair.server.closed
        assert not any(isinstance(e, PongReceived) for e in
                       pair.client.receive_data(pair.server.data_to_send()))


def test_replayed_record(pair):
    record = _one_ping_record(pair)
    pair.server.receive_data(record)
    with pytest.raises(IntegrityError):
        pair.server.receive_data(record)
    assert pair.server.closed


def test_reordered_records(pair):
    first = _one_ping_record(pair)
    second = _one_ping_record(pair)
    with pytest.raises(IntegrityError):
        pair.server.receive_data(second + first)
    assert pair.server.closed


def test_dropped_record(pair):
    _one_ping_record(pair)                     # lost on the way
    second = _one_ping_record(pair)
    with pytest.raises(IntegrityError):
        pair.server.receive_data(second)
    assert pair.server.closed


def test_record_from_another_session_with_the_same_keys():
    a, b = Pair.established(), Pair.established()
    assert a.node_key is b.node_key and a.user_key is b.user_key
    with pytest.raises(IntegrityError):
        b.server.receive_data(_one_ping_record(a))
    assert b.server.closed


def test_record_sent_back_to_its_sender_is_refused(pair):
    """Directions have separate keys: a reflected record does not open."""
    record = _one_ping_record(pair)
    with pytest.raises(IntegrityError):
        pair.client.receive_data(record)


@pytest.mark.parametrize("cut", [1, 3, 4, 5, 20])
def test_truncated_stream_mid_record(pair, cut):
    record = _one_ping_record(pair)
    assert pair.server.receive_data(record[:cut]) == []
    with pytest.raises(FrameError, match="middle"):
        pair.server.receive_eof()
    assert pair.server.closed


@pytest.mark.parametrize("side", ["client", "server"])
def test_eof_without_close_after_establishment(pair, side):
    conn = getattr(pair, side)
    with pytest.raises(FrameError, match="without a CLOSE"):
        conn.receive_eof()
    assert conn.closed


def test_record_shorter_than_its_tag(pair):
    with pytest.raises(FrameError):
        pair.server.receive_data(HEADER.pack(15) + b"\x00" * 15)
    assert pair.server.closed


# --------------------------------------------------------------------------- framing

@pytest.mark.parametrize("established", [False, True], ids=["handshake", "established"])
@pytest.mark.parametrize("length", [DEFAULT_MAX_RECORD + 1, 1 << 24, 0xFFFFFFFF])
def test_oversized_length_prefix_is_refused_before_any_payload(established, length):
    pair = Pair.established() if established else Pair()
    with pytest.raises(FrameError, match="exceeds the maximum") as info:
        pair.server.receive_data(HEADER.pack(length))       # header only: no payload yet
    assert info.value.code == Status.TOO_LARGE
    assert pair.server.closed


def test_length_prefix_checked_against_our_configured_maximum():
    pair = Pair.established(server_settings=Settings(max_record=20_000))
    with pytest.raises(FrameError):
        pair.server.receive_data(HEADER.pack(20_001))
    ok = Pair.established(server_settings=Settings(max_record=20_000))
    assert ok.server.receive_data(HEADER.pack(20_000)) == []     # fine: waits for it


@pytest.mark.parametrize("established", [False, True], ids=["handshake", "established"])
def test_zero_length_prefix(established):
    pair = Pair.established() if established else Pair()
    with pytest.raises(FrameError, match="zero-length"):
        pair.server.receive_data(HEADER.pack(0) + b"junk")
    assert pair.server.closed


GARBAGE = [b"\x00\x00\x00\x05hello", b"\x00\x00\x00\x20" + bytes(range(32)),
           b"GET / HTTP/1.1\r\n\r\n", b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 64,
           b"\xff" * 64, bytes(range(256)) * 4]


@pytest.mark.parametrize("established", [False, True], ids=["handshake", "established"])
@pytest.mark.parametrize("garbage", GARBAGE, ids=lambda g: g[:6].hex())
def test_garbage_bytes(established, garbage):
    pair = Pair.established() if established else Pair()
    try:
        events = pair.server.receive_data(garbage)
    except ProtocolError:
        assert pair.server.closed
    else:
        assert events == []                  # a plausible length: waiting for more
        with pytest.raises(ProtocolError):
            pair.server.receive_eof()
        assert pair.server.closed


# --------------------------------------------------------------------------- record contents

def _nested(depth: int, leaf=1):
    value = leaf
    for i in range(depth - 1):
        value = {"k": value} if i % 2 else [value]
    return {"k": value}


def _request_map(**fields):
    base = {"t": 1, "i": 1, "m": "GET", "p": "/"}
    base.update(fields)
    return base


BAD_PLAINTEXT = {
    # not msgpack / not strict msgpack
    "never-used byte": b"\xc1",
    "empty plaintext": b"",
    "truncated array": b"\x92\x80",
    "ext type": b"\x91\xd4\x01\x00",
    "timestamp ext": b"\x91\xd6\xff\x00\x00\x00\x01",
    "invalid utf-8": b"\x91\x81\xa1t\xa2\xff\xfe",
    "int map key": b"\x91\x81\x01\x01",
    "trailing bytes": plaintext_of(m.Ping(b"x")) + b"\x00",
    "two top-level objects": plaintext_of(m.Ping()) + plaintext_of(m.Ping()),
    # a record is a non-empty array of maps
    "empty array": pack([]),
    "bare map": pack(m.to_map(m.Ping())),
    "array of ints": pack([1, 2]),
    "nil": pack(None),
    # huge declared sizes in a tiny frame: refused without allocating
    "huge array": b"\xdd\xff\xff\xff\xff",
    "huge map": b"\xdf\xff\xff\xff\xff",
    "huge bin": b"\x91\x81\xa1b\xc6\xff\xff\xff\xff",
    "huge str": b"\x91\x81\xdb\xff\xff\xff\xff",
    "huge nested array": b"\x91\x81\xa1a\xdd\x7f\xff\xff\xff",
    # nesting
    "deep arrays": b"\x91" * 5000 + b"\xc0",
    "deep maps": b"\x91" + b"\x81\xa1k" * 5000 + b"\xc0",
    "args one level too deep": pack([_request_map(a=_nested(MAX_DEPTH + 1))]),
    "envelope one level too deep": pack([_request_map(e=_nested(MAX_DEPTH + 1))]),
    "args with bytes key": pack([_request_map(a={b"k": 1})]),
    "headers with bytes key": pack([_request_map(h={b"k": 1})]),
    # schema
    "unknown type 99": pack([{"t": 99}]),
    "type 0": pack([{"t": 0}]),
    "type missing": pack([{"i": 1}]),
    "type is a string": pack([{"t": "1", "i": 1, "m": "GET", "p": "/"}]),
    "type is a bool": pack([{"t": True}]),
    "unknown field in request": pack([_request_map(zz=1)]),
    "unknown field in data": pack([{"t": 3, "i": 1, "b": b"", "zz": 0}]),
    "bytes field name": pack([{"t": 6, b"o": b""}]),
    "missing stream id": pack([{"t": 1, "m": "GET", "p": "/"}]),
    "stream id negative": pack([_request_map(i=-1)]),
    "stream id too big": pack([_request_map(i=1 << 53)]),
    "stream id float": pack([_request_map(i=1.0)]),
    "stream id bool": pack([_request_map(i=True)]),
    "method empty": pack([_request_map(m="")]),
    "method not letters": pack([_request_map(m="GE T")]),
    "method not ascii": pack([_request_map(m="GÉT")]),
    "method too long": pack([_request_map(m="G" * 17)]),
    "method bytes": pack([_request_map(m=b"GET")]),
    "path relative": pack([_request_map(p="hello")]),
    "path too long": pack([_request_map(p="/" * 1025)]),
    "token not ascii": pack([_request_map(k="tökén")]),
    "token too long": pack([_request_map(k="t" * 257)]),
    "args a list": pack([_request_map(a=[1])]),
    "headers a list": pack([_request_map(h=[1])]),
    "header value a map": pack([_request_map(h={"x": {"y": 1}})]),
    "header key too long": pack([_request_map(h={"x" * 65: 1})]),
    "too many headers": pack([_request_map(h={f"h{i}": i for i in range(65)})]),
    "body a string": pack([_request_map(b="body")]),
    "end an int": pack([_request_map(f=1)]),
    "data body missing": pack([{"t": 3, "i": 1}]),
    "data end a string": pack([{"t": 3, "i": 1, "b": b"", "f": "yes"}]),
    "window credit too big": pack([{"t": 4, "i": 1, "n": 1 << 31}]),
    "window credit negative": pack([{"t": 4, "i": 1, "n": -1}]),
    "reset status too big": pack([{"t": 5, "i": 1, "s": 1000}]),
    "reset reason too long": pack([{"t": 5, "i": 1, "s": 400, "r": "r" * 513}]),
    "ping opaque too long": pack([{"t": 6, "o": b"o" * 65}]),
    "ping opaque a string": pack([{"t": 6, "o": "o"}]),
    "goaway id a string": pack([{"t": 8, "i": "1"}]),
    "close status a string": pack([{"t": 9, "s": "200"}]),
    "response status too big": pack([{"t": 2, "i": 1, "s": 1000}]),
    # handshake messages are not application messages
    "client hello": plaintext_of(m.ClientHello(1, bytes(32), MIN_WINDOW, 1 << 20, 256)),
    "server hello": plaintext_of(m.ServerHello(1, bytes(32), MIN_WINDOW, 1 << 20, 256)),
    "server auth": plaintext_of(m.ServerAuth(b"k", b"s")),
    "client auth": plaintext_of(m.ClientAuth("alice", b"s")),
    "server finished": plaintext_of(m.ServerFinished()),
    # a valid message followed by a bad one in the same record
    "good then bad": pack([m.to_map(m.Ping(b"1")), {"t": 99}]),
}


@pytest.mark.parametrize("case", list(BAD_PLAINTEXT))
def test_malformed_record_plaintext_is_a_decode_error(pair, case):
    _fails_with(pair, DecodeError, BAD_PLAINTEXT[case])


@pytest.mark.parametrize("case", ["huge array", "deep arrays", "unknown type 99",
                                  "header value a map", "client hello"])
def test_malformed_record_plaintext_towards_the_client(pair, case):
    _fails_with(pair, DecodeError, BAD_PLAINTEXT[case], sender="server")


@pytest.mark.parametrize("depth", [1, 2, MAX_DEPTH - 1, MAX_DEPTH])
def test_nesting_up_to_the_limit_is_accepted(pair, depth):
    args = _nested(depth)
    events = send_raw(pair.client, pair.server, pack([_request_map(a=args, e=args)]))
    (req,) = events
    assert isinstance(req, RequestReceived) and req.args == args and req.envelope == args


def test_method_is_case_insensitive_on_the_wire(pair):
    (req,) = send_raw(pair.client, pair.server, pack([_request_map(m="pOsT")]))
    assert req.method == "POST"


# --------------------------------------------------------------------------- stream rules

def _open_upload(pair: Pair, end: bool = False) -> int:
    sid = pair.client.send_request("PUT", "/upload", end=end)
    pair.shuttle()
    return sid


def test_data_beyond_the_window_in_one_message():
    pair = Pair.established(server_settings=Settings(window=MIN_WINDOW))
    sid = _open_upload(pair)
    exc = _fails_with(pair, FlowControlError, plaintext_of(m.Data(sid, b"x" * (MIN_WINDOW + 1))))
    assert "credit" in str(exc)


def test_data_beyond_the_window_across_messages_and_records():
    pair = Pair.established(server_settings=Settings(window=MIN_WINDOW))
    sid = _open_upload(pair)
    chunk = b"y" * 16_000
    for _ in range(4):        # 64,000 of 65,536 bytes: fine
        events = send_raw(pair.client, pair.server, plaintext_of(m.Data(sid, chunk)))
        assert len(events) == 1
    _fails_with(pair, FlowControlError, plaintext_of(m.Data(sid, chunk)))


def test_window_credit_makes_room_again():
    pair = Pair.established(server_settings=Settings(window=MIN_WINDOW))
    sid = _open_upload(pair)
    pair.client.send_data(sid, b"z" * MIN_WINDOW)
    pair.shuttle()
    assert pair.client.send_credit(sid) == 0
    pair.server.acknowledge(sid, MIN_WINDOW)
    pair.shuttle()
    assert pair.client.send_credit(sid) == MIN_WINDOW
    send_raw(pair.client, pair.server, plaintext_of(m.Data(sid, b"z" * MIN_WINDOW)))
    _fails_with(pair, FlowControlError, plaintext_of(m.Data(sid, b"z")))


def test_request_body_larger_than_the_initial_window():
    pair = Pair.established(server_settings=Settings(window=MIN_WINDOW))
    _fails_with(pair, FlowControlError,
                plaintext_of(m.Request(1, "POST", "/", body=b"b" * (MIN_WINDOW + 1))))


def test_response_body_beyond_the_clients_window():
    pair = Pair.established(client_settings=Settings(window=MIN_WINDOW))
    sid = pair.client.send_request("GET", "/big")
    pair.shuttle()
    _fails_with(pair, FlowControlError,
                plaintext_of(m.Response(sid, 200, body=b"r" * (MIN_WINDOW + 1))), sender="server")


def test_local_send_beyond_credit_is_a_local_error():
    pair = Pair.established(server_settings=Settings(window=MIN_WINDOW))
    sid = _open_upload(pair)
    with pytest.raises(LocalProtocolError, match="credit"):
        pair.client.send_data(sid, b"x" * (MIN_WINDOW + 1))
    assert not pair.client.closed         # API misuse is refused, not fatal


@pytest.mark.parametrize("sid", [3, 99, 1 << 40])
def test_data_on_a_stream_never_opened(pair, sid):
    _fails_with(pair, FlowControlError, plaintext_of(m.Data(sid, b"?")))


def test_data_on_a_never_opened_stream_of_our_own_parity(pair):
    """The server never opened stream 2: a client sending Data there is lying."""
    _fails_with(pair, FlowControlError, plaintext_of(m.Data(2, b"?")))


def test_data_after_the_end_of_the_stream(pair):
    sid = _open_upload(pair)
    send_raw(pair.client, pair.server, plaintext_of(m.Data(sid, b"last", end=True)))
    exc = _fails_with(pair, FlowControlError, plaintext_of(m.Data(sid, b"more")))
    assert "after its end" in str(exc)


def test_late_data_on_a_reset_stream_is_dropped(pair):
    sid = _open_upload(pair)
    pair.server.reset_stream(sid)
    assert send_raw(pair.client, pair.server, plaintext_of(m.Data(sid, b"late"))) == []
    assert not pair.server.closed


def test_request_reusing_a_stream_id(pair):
    sid = _open_upload(pair, end=True)
    exc = _fails_with(pair, FlowControlError, plaintext_of(m.Request(sid, "GET", "/again")))
    assert "not a new stream" in str(exc)


def test_request_with_a_lower_stream_id(pair):
    send_raw(pair.client, pair.server, plaintext_of(m.Request(9, "GET", "/")))
    _fails_with(pair, FlowControlError, plaintext_of(m.Request(7, "GET", "/")))


@pytest.mark.parametrize("sid", [0, 2, 100])
def test_request_with_wrong_parity_from_the_client(pair, sid):
    _fails_with(pair, FlowControlError, plaintext_of(m.Request(sid, "GET", "/")))


@pytest.mark.parametrize("sid", [0, 1, 7])
def test_request_with_wrong_parity_from_the_server(pair, sid):
    _fails_with(pair, FlowControlError, plaintext_of(m.Request(sid, "GET", "/")),
                sender="server")


def test_response_on_a_stream_the_peer_opened(pair):
    sid = pair.server.send_request("GET", "/to-client")
    pair.shuttle()
    # the client answers correctly ... but the server may not "answer" its own stream
    pair.client.send_response(sid, 200, end=False)
    pair.shuttle()
    send_raw(pair.client, pair.server, plaintext_of(m.Request(1, "GET", "/", end=False)))
    _fails_with(pair, FlowControlError, plaintext_of(m.Response(1, 200)), sender="server")


def test_window_credit_overflow(pair):
    sid = _open_upload(pair)
    _fails_with(pair, FlowControlError, plaintext_of(m.Window(sid, m.MAX_CREDIT)),
                sender="server")


def test_too_many_streams_are_reset_not_fatal():
    pair = Pair.established(server_settings=Settings(max_streams=16))
    # (raw records: the client API itself would not exceed the node's limit)
    events = []
    for sid in range(1, 35, 2):                    # 17 requests; the 17th is refused
        events += send_raw(pair.client, pair.server,
                           plaintext_of(m.Request(sid, "GET", "/", end=False)))
    assert [e.stream_id for e in events] == list(range(1, 33, 2))
    queued = [m.decode(unpack(item)) for item in pair.server._out]
    assert queued == [m.Reset(33, Status.UNAVAILABLE, "too many streams")]
    assert pair.server.open_streams == 16 and not pair.server.closed
    # late data for the refused stream is dropped, not fatal
    assert send_raw(pair.client, pair.server, plaintext_of(m.Data(33, b"late"))) == []


def test_client_api_respects_the_nodes_stream_limit():
    pair = Pair.established(server_settings=Settings(max_streams=16))
    for _ in range(16):
        pair.client.send_request("GET", "/", end=False)
    with pytest.raises(LocalProtocolError, match="too many"):
        pair.client.send_request("GET", "/one-too-many")
    assert not pair.client.closed


def test_after_an_error_the_connection_stays_closed(pair):
    record = _one_ping_record(pair)
    with pytest.raises(IntegrityError):
        pair.server.receive_data(flip(record, 10))
    assert pair.server.receive_data(record) == []
    assert pair.server.receive_eof() == []
    with pytest.raises(LocalProtocolError):
        pair.server.send_ping()


def test_seal_raw_helper_stays_in_step_with_the_connection(pair):
    """Sanity check of the back door the tests above use."""
    pair.client.send_ping(b"a")
    events = pair.server.receive_data(pair.client.data_to_send()
                                      + seal_raw(pair.client, plaintext_of(m.Ping(b"b"))))
    assert events == []
    pair.client.send_ping(b"c")
    run = pair.shuttle()
    assert [e.opaque for e in run.of_type("client", PongReceived)] == [b"a", b"b", b"c"]


# --------------------------------------------------------------------------- response order (§7.2)

def test_second_response_on_a_stream(pair):
    sid = pair.client.send_request("GET", "/once")
    pair.shuttle()
    pair.server.send_response(sid, 200, end=False)
    pair.shuttle()
    exc = _fails_with(pair, FlowControlError, plaintext_of(m.Response(sid, 200)),
                      sender="server")
    assert "second response" in str(exc)


def test_response_body_before_the_response(pair):
    sid = pair.client.send_request("GET", "/body-first")
    pair.shuttle()
    exc = _fails_with(pair, FlowControlError, plaintext_of(m.Data(sid, b"early")),
                      sender="server")
    assert "before the response" in str(exc)


def test_local_response_order_is_enforced(pair):
    sid = pair.client.send_request("GET", "/x")
    pair.shuttle()
    with pytest.raises(LocalProtocolError):
        pair.server.send_data(sid, b"body before head")
    pair.server.send_response(sid, 200, end=False)
    with pytest.raises(LocalProtocolError):
        pair.server.send_response(sid, 200)
    with pytest.raises(LocalProtocolError):
        pair.client.send_response(sid, 200)        # not the client's to answer
    pair.server.send_data(sid, b"fine", end=True)
    run = pair.shuttle()
    assert [type(e).__name__ for e in run.client_events] == ["ResponseReceived",
                                                             "DataReceived"]


def test_nothing_is_sent_after_the_peers_close(pair):
    pair.client.send_ping(b"answer me?")
    pair.client.close(Status.OK, "bye")
    events = pair.server.receive_data(pair.client.data_to_send())
    assert [type(e).__name__ for e in events] == ["ConnectionClosed"]
    assert pair.server.data_to_send() == b""      # no PONG after the peer's CLOSE


BAD_LOCAL_REQUESTS = {
    "relative path": dict(path="no-slash"),
    "method with a space": dict(method="GET ME"),
    "empty method": dict(method=""),
    "non-ascii token": dict(token="tøken"),
    "long header key": dict(headers={"x" * 65: 1}),
    "header value a list": dict(headers={"x": [1]}),
    "header bytes key": dict(headers={b"x": 1}),
    "args too deep": dict(args=_nested(MAX_DEPTH + 1)),
    "args not a map": dict(args=[1, 2]),
    "args with a set": dict(args={"x": {1, 2}}),
    "args with an object": dict(args={"x": object()}),
    "args with a surrogate": dict(args={"x": "\udcff"}),
}


@pytest.mark.parametrize("case", list(BAD_LOCAL_REQUESTS))
def test_invalid_local_request_is_refused_without_hurting_other_streams(pair, case):
    """Regression: such a request used to go out, and the peer closed the whole connection."""
    in_flight = pair.client.send_request("GET", "/in-flight")
    kw = dict(method="GET", path="/")
    kw.update(BAD_LOCAL_REQUESTS[case])
    with pytest.raises(LocalProtocolError):
        pair.client.send_request(kw.pop("method"), kw.pop("path"), **kw)
    after = pair.client.send_request("GET", "/after")
    run = pair.shuttle()
    assert [e.stream_id for e in run.of_type("server", RequestReceived)] == [in_flight, after]
    assert after == in_flight + 2
    assert not pair.client.closed and not pair.server.closed


@pytest.mark.parametrize("kw", [dict(status=1000), dict(status=-1),
                                dict(headers={"x": {"nested": 1}}), dict(headers={1: 1}),
                                dict(headers={"x": {1}})],
                         ids=["status 1000", "status -1", "nested header", "int header key",
                              "set header"])
def test_invalid_local_response_is_refused_and_the_stream_can_still_answer(pair, kw):
    sid = pair.client.send_request("GET", "/x")
    pair.shuttle()
    args = dict(status=200)
    args.update(kw)
    with pytest.raises(LocalProtocolError):
        pair.server.send_response(sid, args.pop("status"), **args)
    pair.server.send_response(sid, 500, body=b"sorry")
    run = pair.shuttle()
    (resp,) = run.of_type("client", ResponseReceived)
    assert (resp.status, resp.body) == (500, b"sorry")
