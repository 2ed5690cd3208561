"""Property tests (hypothesis) of the sans-IO protocol.

* any sequence of application messages arrives in order with equal fields;
* any truncation of valid wire bytes yields nothing (no event, no error) until
  the rest arrives, and the rest yields exactly the events;
* random bytes, before and after the handshake, only ever raise ProtocolError;
* ``frame.unpack`` only ever raises DecodeError, ``messages.decode`` only DecodeError;
* every message type round-trips through ``messages.encode`` / ``decode``.
"""
from __future__ import annotations

import string

from hypothesis import assume, given, strategies as st

from protocol import (DataReceived, DecodeError, PongReceived, ProtocolError, RequestReceived,
                      ResponseReceived, Settings, StreamReset, WindowUpdated)
from protocol import messages as m
from protocol.frame import HEADER, pack, unpack
from protocol.record import Opener, Sealer

from protocol_helpers import PROPERTY, Pair, split_frames

# --------------------------------------------------------------------------- strategies

scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1),
                    st.floats(allow_nan=False), st.text(max_size=16), st.binary(max_size=16))
nested = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner,
                                                                max_size=3),
    max_leaves=10)
arg_maps = st.dictionaries(st.text(max_size=8), nested, max_size=4)
header_maps = st.dictionaries(st.text(max_size=64), scalars, max_size=6)
methods = st.text(alphabet=string.ascii_uppercase, min_size=1, max_size=m.MAX_METHOD)
paths = st.text(max_size=40).map(lambda s: "/" + s)
tokens = st.none() | st.text(alphabet=string.printable, max_size=m.MAX_TOKEN)
bodies = st.binary(max_size=1500)
reasons = st.text(max_size=40)
stream_ids = st.integers(0, m.MAX_STREAM_ID)
statuses = st.integers(0, 999)

client_ops = st.lists(st.one_of(
    st.tuples(st.just("request"), methods, paths, tokens, st.none() | arg_maps, header_maps,
              bodies, st.booleans()),
    st.tuples(st.just("data"), st.integers(0, 99), bodies, st.booleans()),
    st.tuples(st.just("window"), st.integers(0, 99), st.integers(1, 50_000)),
    st.tuples(st.just("ping"), st.binary(max_size=64)),
    st.tuples(st.just("reset"), st.integers(0, 99), statuses, reasons),
    st.tuples(st.just("flush")),
), min_size=3, max_size=25)

responses = st.lists(st.tuples(statuses, header_maps, bodies, st.booleans()), max_size=25)


def _apply_client_ops(pair: Pair, ops, shuttle_on_flush: bool = True):
    """Apply ``ops`` through the public API; returns the events the server must report."""
    c = pair.client
    expected_server: list = []
    expected_pongs: list = []
    sending: list[int] = []      # our streams whose request body is still open
    known: list[int] = []        # our streams the server still knows
    for op in ops:
        kind = op[0]
        if kind == "request":
            _, method, path, token, args, headers, body, end = op
            sid = c.send_request(method, path, token=token, args=args, headers=headers,
                                 body=body, end=end)
            expected_server.append(RequestReceived(sid, method, path, token, args, headers, body,
                                                   end, None))
            known.append(sid)
            if not end:
                sending.append(sid)
        elif kind == "data" and sending:
            _, pick, body, end = op
            sid = sending[pick % len(sending)]
            c.send_data(sid, body, end)
            expected_server.append(DataReceived(sid, body, end))
            if end:
                sending.remove(sid)
        elif kind == "window" and known:
            _, pick, credit = op
            sid = known[pick % len(known)]
            c.acknowledge(sid, credit, force=True)
            expected_server.append(WindowUpdated(sid, credit))
        elif kind == "ping":
            c.send_ping(op[1])
            expected_pongs.append(PongReceived(op[1]))
        elif kind == "reset" and known:
            _, pick, status, reason = op
            sid = known[pick % len(known)]
            c.reset_stream(sid, status, reason)
            expected_server.append(StreamReset(sid, status, reason))
            known.remove(sid)
            if sid in sending:
                sending.remove(sid)
        elif kind == "flush" and shuttle_on_flush:
            pair.shuttle()
    return expected_server, expected_pongs, known


@PROPERTY
@given(ops=client_ops, answers=responses)
def test_any_message_sequence_arrives_in_order_with_equal_fields(ops, answers):
    pair = Pair.established()
    seen_server: list = []
    seen_client: list = []
    original = pair.shuttle

    def recording_shuttle(**kw):
        run = original(**kw)
        seen_server.extend(run.server_events)
        seen_client.extend(run.client_events)
        return run

    pair.shuttle = recording_shuttle
    expected_server, expected_pongs, known = _apply_client_ops(pair, ops)
    pair.shuttle()
    assert seen_server == expected_server
    assert seen_client == expected_pongs

    # and the other way: the node answers every stream the client still has
    expected_client = []
    for sid, (status, headers, body, end) in zip(known, answers):
        pair.server.send_response(sid, status, headers=headers, body=body, end=end)
        expected_client.append(ResponseReceived(sid, status, headers, body, end))
    seen_client.clear()
    pair.shuttle()
    assert seen_client == expected_client
    assert not pair.client.closed and not pair.server.closed


# --------------------------------------------------------------------------- truncation

_SECRETS = (bytes(range(32)), bytes(range(32, 64)))


def _deterministic_pair() -> Pair:
    """Ed25519 signatures are deterministic: with fixed ephemerals, so is every byte."""
    return Pair(secrets=_SECRETS)


@PROPERTY
@given(ops=client_ops, cuts=st.lists(st.integers(0, 200_000), max_size=12))
def test_truncated_wire_yields_nothing_until_the_rest_arrives(ops, cuts):
    a, b = _deterministic_pair(), _deterministic_pair()
    a.handshake()
    b.handshake()
    ops = [op for op in ops if op[0] != "flush"]
    _apply_client_ops(a, ops, shuttle_on_flush=False)
    _apply_client_ops(b, ops, shuttle_on_flush=False)
    wire = a.client.data_to_send()
    assert wire == b.client.data_to_send()
    assume(wire)
    frames = split_frames(wire)
    per_record = [a.server.receive_data(f) for f in frames]
    ends, pos = [], 0
    for f in frames:
        pos += len(f)
        ends.append(pos)
    got: list = []
    fed = 0
    for cut in sorted({c % len(wire) for c in cuts}) + [len(wire)]:
        got += b.server.receive_data(wire[fed:cut])
        fed = cut
        complete = sum(1 for e in ends if e <= cut)
        assert got == [e for events in per_record[:complete] for e in events]
    assert not b.server.closed


@PROPERTY
@given(cuts=st.lists(st.integers(0, 10_000), max_size=8), chunk=st.integers(1, 64))
def test_handshake_bytes_in_any_pieces_give_the_same_session(cuts, chunk):
    whole = _deterministic_pair()
    ref = whole.handshake()
    pieces = _deterministic_pair()
    run = pieces.shuttle(chunk=chunk)
    assert pieces.client.established and pieces.server.established
    assert run.c2s == ref.c2s and run.s2c == ref.s2c
    assert [type(e) for e in run.server_events] == [type(e) for e in ref.server_events]
    # a prefix of the node's first flight never produces an event or an error
    flight = ref.to_client[0]
    client = _deterministic_pair().client
    client.data_to_send()
    fed = 0
    for cut in sorted({c % len(flight) for c in cuts}):
        assert client.receive_data(flight[fed:cut]) == []
        fed = cut
    assert client.receive_data(flight[fed:]) == []       # complete, but no event yet
    assert not client.closed


# --------------------------------------------------------------------------- random input

@PROPERTY
@given(data=st.binary(max_size=400), established=st.booleans(), eof=st.booleans())
def test_random_bytes_to_a_server_only_raise_protocol_errors(data, established, eof):
    pair = Pair.established() if established else Pair()
    try:
        pair.server.receive_data(data)
        if eof:
            pair.server.receive_eof()
    except ProtocolError:
        assert pair.server.closed


@PROPERTY
@given(length=st.integers(0, 2**32 - 1), payload=st.binary(max_size=300),
       established=st.booleans())
def test_random_frames_to_a_client_only_raise_protocol_errors(length, payload, established):
    pair = Pair.established() if established else Pair()
    if not established:
        pair.client.data_to_send()
    try:
        pair.client.receive_data(HEADER.pack(length) + payload)
        pair.client.receive_eof()
    except ProtocolError:
        assert pair.client.closed


@PROPERTY
@given(data=st.binary(max_size=300))
def test_random_record_plaintext_only_raises_protocol_errors(data):
    """Past the AEAD: arbitrary plaintext in a correctly sealed record."""
    pair = Pair.established()
    from protocol_helpers import send_raw
    try:
        send_raw(pair.client, pair.server, data)
    except ProtocolError:
        assert pair.server.closed


@PROPERTY
@given(data=st.binary(max_size=200))
def test_unpack_of_random_bytes_only_raises_decode_error(data):
    try:
        unpack(data)
    except DecodeError:
        pass


msgpack_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.one_of(st.text(max_size=4), st.sampled_from(["t", "i", "b", "f", "m", "p", "s"])),
        inner, max_size=5),
    max_leaves=20)


@PROPERTY
@given(obj=msgpack_values, t=st.integers(-1, 21) | st.none())
def test_decode_of_random_maps_only_raises_decode_error(obj, t):
    if isinstance(obj, dict) and t is not None:
        obj = {**obj, "t": t}
    try:
        msg = m.decode(unpack(pack(obj)))
    except DecodeError:
        return
    assert isinstance(msg, m.Message)
    assert m.decode(unpack(m.encode(msg))) == msg


# --------------------------------------------------------------------------- round trips

messages_strategy = st.one_of(
    st.builds(m.Request, stream_ids, methods, st.text(max_size=m.MAX_PATH - 1).map(
        lambda s: "/" + s), tokens, st.none() | arg_maps, header_maps, bodies, st.booleans(),
        st.none() | arg_maps),
    st.builds(m.Response, stream_ids, statuses, header_maps, bodies, st.booleans()),
    st.builds(m.Data, stream_ids, bodies, st.booleans()),
    st.builds(m.Window, stream_ids, st.integers(0, m.MAX_CREDIT)),
    st.builds(m.Reset, stream_ids, statuses, st.text(max_size=m.MAX_REASON)),
    st.builds(m.Ping, st.binary(max_size=64)),
    st.builds(m.Pong, st.binary(max_size=64)),
    st.builds(m.GoAway, stream_ids, st.text(max_size=m.MAX_REASON)),
    st.builds(m.Close, statuses, st.text(max_size=m.MAX_REASON)),
    st.builds(m.ClientHello, st.integers(0, 255), st.binary(min_size=32, max_size=32),
              st.integers(0, m.MAX_CREDIT), st.integers(0, 1 << 24), st.integers(0, 1 << 16)),
    st.builds(m.ServerHello, st.integers(0, 255), st.binary(min_size=32, max_size=32),
              st.integers(0, m.MAX_CREDIT), st.integers(0, 1 << 24), st.integers(0, 1 << 16)),
    st.builds(m.ServerAuth, st.binary(max_size=4096), st.binary(max_size=1024)),
    st.builds(m.ClientAuth, st.text(max_size=128), st.binary(max_size=1024)),
    st.just(m.ServerFinished()),
)


@PROPERTY
@given(msg=messages_strategy)
def test_every_message_type_round_trips(msg):
    wire = m.encode(msg)
    assert m.decode(unpack(wire)) == msg
    assert m.decode(unpack(wire, check_depth=False)) == msg


def test_the_round_trip_strategy_covers_every_message_type():
    covered = {m.Request, m.Response, m.Data, m.Window, m.Reset, m.Ping, m.Pong, m.GoAway,
               m.Close, m.ClientHello, m.ServerHello, m.ServerAuth, m.ClientAuth,
               m.ServerFinished}
    assert covered == {spec[0] for spec in m._SPEC.values()}


@PROPERTY
@given(plaintexts=st.lists(st.binary(max_size=200), min_size=1, max_size=40),
       rekey_after=st.integers(1, 8), backend=st.sampled_from(["pycryptodome", "cryptography"]))
def test_sealer_and_opener_stay_in_step(plaintexts, rekey_after, backend):
    key = bytes(range(32))
    sealer = Sealer(key, backend, rekey_after)
    opener = Opener(key, "pycryptodome" if backend == "cryptography" else "cryptography",
                    rekey_after)
    for pt in plaintexts:
        record = sealer.seal(pt)
        (length,) = HEADER.unpack_from(record)
        assert length == len(pt) + 16 == len(record) - 4
        assert opener.open(record[:4], record[4:]) == pt
    assert (sealer.epoch, sealer.counter) == divmod(len(plaintexts), rekey_after)
    assert (opener.epoch, opener.counter) == (sealer.epoch, sealer.counter)


def test_settings_defaults_are_within_the_wire_bounds():
    s = Settings()
    assert s.window <= m.MAX_CREDIT and s.max_record <= 1 << 24 and s.max_streams <= 1 << 16


# --------------------------------------------------------------------------- send-side checks

envelope_values = st.one_of(scalars, st.lists(scalars, max_size=4),
                            st.lists(st.lists(scalars, max_size=2), max_size=2),
                            st.dictionaries(st.text(max_size=3), scalars, max_size=2),
                            st.tuples(scalars))
envelopes = st.none() | st.dictionaries(st.text(max_size=6) | st.integers(0, 3),
                                        envelope_values, max_size=6)
plain_requests = st.builds(
    m.Request, stream_ids | st.integers(-3, -1) | st.just(m.MAX_STREAM_ID + 1),
    methods | st.sampled_from(["get", "", "G3T", "GÉT", "X" * (m.MAX_METHOD + 1)]),
    st.text(max_size=40).map(lambda s: "/" + s) | st.sampled_from(["", "x", "/" * 5000]),
    tokens | st.sampled_from(["tökén", "t" * (m.MAX_TOKEN + 1)]),
    st.none(), st.just({}), bodies | st.just("str body"), st.booleans() | st.just(1),
    envelopes)


@PROPERTY
@given(msg=plain_requests)
def test_the_send_side_request_check_never_passes_what_the_peer_refuses(msg):
    """``plain_request_ok`` replaces a decode of our own wire map on the send path: it may
    say "not sure" (the full check runs), never yes to a message the peer's decode refuses
    or reads differently."""
    if not m.plain_request_ok(msg):
        return
    wire = m.encode(msg)
    assert m.decode(unpack(wire)) == msg


def test_the_send_side_request_check_takes_the_requests_a_node_forwards():
    env = {"id": b"\x01" * 16, "user": "alice", "path": ["SHA256:abc"], "hops": 7, "ttl": 1.5}
    assert m.plain_request_ok(m.Request(3, "GET", "/hello_world", "ut1_x", None, {}, b"",
                                        True, env))
    assert m.plain_request_ok(m.Request(3, "POST", "/echo", None, None, {}, b"x", False, None))
    nested = {**env, "path": [["deep"]]}
    assert not m.plain_request_ok(m.Request(3, "GET", "/x", None, None, {}, b"", True, nested))
