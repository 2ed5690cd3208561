"""The AEAD record layer: rekeying, nonce uniqueness, coalescing, record limits."""
from __future__ import annotations

import pytest

from protocol import (IntegrityError, LocalProtocolError, PongReceived, RequestReceived,
                      ResponseReceived, Settings)
from protocol import crypto, record
from protocol.connection import MIN_RECORD
from protocol.frame import HEADER, unpack
from protocol.record import Sealer

from protocol_helpers import Pair, split_frames, unseal


def _exchange(pair: Pair, n: int) -> None:
    """``n`` request/response round trips, each request and each response its own record."""
    for i in range(n):
        sid = pair.client.send_request("GET", f"/r/{i}")
        run = pair.shuttle()
        (req,) = run.of_type("server", RequestReceived)
        pair.server.send_response(sid, 200, body=str(i).encode())
        run = pair.shuttle()
        (resp,) = run.of_type("client", ResponseReceived)
        assert resp.body == str(i).encode()


def test_rekey_after_n_records_changes_the_key_and_traffic_flows(backends):
    pair = Pair.established(settings=Settings(rekey_after=4), backends=backends)
    keys_before = (pair.client._sealer.key, pair.server._sealer.key)
    c_sealer, s_opener = pair.client._sealer, pair.server._opener
    base = (c_sealer.epoch, c_sealer.counter)
    _exchange(pair, 50)
    assert c_sealer.epoch > 0 and s_opener.epoch > 0
    assert pair.server._sealer.epoch > 0 and pair.client._opener.epoch > 0
    assert (pair.client._sealer.key, pair.server._sealer.key) != keys_before
    assert pair.client._sealer.key != keys_before[0] and pair.server._sealer.key != keys_before[1]
    # exactly one key update per 4 records, and both ends of a direction agree
    sent = base[0] * 4 + base[1] + 50
    assert (c_sealer.epoch, c_sealer.counter) == divmod(sent, 4)
    assert (s_opener.epoch, s_opener.counter) == (c_sealer.epoch, c_sealer.counter)
    assert s_opener.key == c_sealer.key


def test_rekey_chain_is_hkdf_of_the_previous_key():
    pair = Pair.established(settings=Settings(rekey_after=2))
    k0 = pair.client._sealer.key
    _exchange(pair, 2)       # 2 client records after the handshake: one update
    assert pair.client._sealer.epoch == 1
    assert pair.client._sealer.key == record.next_key(k0) == crypto.hkdf(
        k0, b"", b"utesla/1 rekey", 32)


def test_rekey_after_every_record():
    pair = Pair.established(settings=Settings(rekey_after=1))
    _exchange(pair, 10)
    assert pair.client._sealer.counter == 0 and pair.client._sealer.epoch >= 10


def test_rekey_setting_must_match_on_both_sides():
    """rekey_after is not negotiated: a mismatch surfaces as an IntegrityError."""
    pair = Pair(client_settings=Settings(rekey_after=4), server_settings=Settings(rekey_after=5))
    with pytest.raises(IntegrityError):
        pair.handshake()
        _exchange(pair, 10)


def test_rekey_after_is_bounded():
    with pytest.raises(LocalProtocolError):
        Sealer(bytes(32), None, 0)
    with pytest.raises(LocalProtocolError):
        Sealer(bytes(32), None, record.REKEY_AFTER + 1)


def test_no_key_and_nonce_pair_is_ever_used_twice(monkeypatch):
    """Log every AEAD seal of a whole session (handshake and both directions, many rekeys)."""
    seals: list[tuple[bytes, bytes]] = []
    positions: list[tuple[int, int, int]] = []

    def recording_class(name):
        real = crypto.aead_class(name)

        class Recording:
            def __init__(self, key):
                self._key, self._real = key, real(key)

            def seal(self, nonce, plaintext, aad):
                seals.append((self._key, nonce))
                return self._real.seal(nonce, plaintext, aad)

            def open(self, nonce, data, aad):
                return self._real.open(nonce, data, aad)

        return Recording

    original_seal = Sealer.seal

    keep_alive = []          # so that id() of a dropped sealer is never reused

    def seal(self, plaintext):
        keep_alive.append(self)
        positions.append((id(self), self.epoch, self.counter))
        return original_seal(self, plaintext)

    monkeypatch.setattr(record, "aead_class", recording_class)
    monkeypatch.setattr(Sealer, "seal", seal)
    pair = Pair.established(settings=Settings(rekey_after=3))
    _exchange(pair, 40)
    for _ in range(5):
        pair.client.send_ping()
        pair.server.send_ping()
        pair.shuttle()
    pair.client.close()
    pair.shuttle()
    assert len(seals) > 90
    assert len(set(seals)) == len(seals)
    assert len(set(positions)) == len(positions)
    # within one sealer, (epoch, counter) strictly increases
    by_sealer: dict[int, list] = {}
    for sealer_id, epoch, counter in positions:
        by_sealer.setdefault(sealer_id, []).append((epoch, counter))
    for seq in by_sealer.values():
        assert seq == sorted(seq) and len(set(seq)) == len(seq)
    # nonces are the 96-bit counter: 4 zero bytes then 64-bit big-endian
    assert all(len(n) == 12 and n[:4] == bytes(4) for _, n in seals)


# --------------------------------------------------------------------------- coalescing

def test_queued_messages_are_coalesced_into_one_record(pair):
    c = pair.client
    sid = c.send_request("PUT", "/a", end=False)
    c.send_data(sid, b"one")
    c.send_ping(b"p")
    c.send_request("GET", "/b")
    c.send_data(sid, b"two", end=True)
    data = c.data_to_send()
    frames = split_frames(data)
    assert len(frames) == 1                            # one length prefix
    (length,) = HEADER.unpack_from(frames[0])
    assert length == len(frames[0]) - 4
    assert c.data_to_send() == b""
    events = pair.server.receive_data(data)
    assert [type(e).__name__ for e in events] == ["RequestReceived", "DataReceived",
                                                  "RequestReceived", "DataReceived"]
    assert [getattr(e, "data", None) for e in events] == [None, b"one", None, b"two"]
    assert pair.server.data_to_send()                  # the pong


def test_a_record_may_carry_many_messages_all_delivered_in_order(pair):
    sids = [pair.client.send_request("GET", f"/n/{i}", args={"i": i}) for i in range(250)]
    data = pair.client.data_to_send()
    assert len(split_frames(data)) == 1
    plain = unseal(pair.server._opener.key, data, counter=pair.server._opener.counter)
    assert len(unpack(plain)) == 250
    events = pair.server.receive_data(data)
    assert [e.stream_id for e in events] == sids
    assert [e.args["i"] for e in events] == list(range(250))


def test_coalescing_respects_the_peers_record_limit():
    pair = Pair.established(server_settings=Settings(max_record=MIN_RECORD))
    sids = [pair.client.send_request("POST", "/x", body=bytes([i]) * 1000) for i in range(60)]
    data = pair.client.data_to_send()
    frames = split_frames(data)
    assert 4 <= len(frames) <= 6
    assert all(len(f) - 4 <= MIN_RECORD for f in frames)
    events = pair.server.receive_data(data)
    assert [e.stream_id for e in events] == sids
    assert all(e.body == bytes([i]) * 1000 for i, e in enumerate(events))


def test_responses_and_pongs_coalesce_too(pair):
    for i in range(10):
        pair.client.send_request("GET", "/", end=True)
        pair.client.send_ping(bytes([i]))
    pair.server.receive_data(pair.client.data_to_send())
    for sid in range(1, 21, 2):
        pair.server.send_response(sid, 200, body=b"ok")
    data = pair.server.data_to_send()
    assert len(split_frames(data)) == 1
    events = pair.client.receive_data(data)
    assert [e.opaque for e in events if isinstance(e, PongReceived)] == [bytes([i]) for i in
                                                                          range(10)]
    assert len([e for e in events if isinstance(e, ResponseReceived)]) == 10


def test_nothing_to_send_when_idle(pair):
    assert pair.client.data_to_send() == b"" and pair.server.data_to_send() == b""


# --------------------------------------------------------------------------- record limits

def test_message_too_large_for_the_peer_is_refused_when_queued_and_nothing_is_sent_twice():
    """Regression: _flush used to seal earlier messages, then raise, leaving them queued."""
    pair = Pair.established(server_settings=Settings(max_record=MIN_RECORD, window=1 << 17))
    first = pair.client.send_request("GET", "/small")
    with pytest.raises(LocalProtocolError, match="record limit"):
        pair.client.send_request("POST", "/big", body=b"x" * (MIN_RECORD + 1))
    assert not pair.client.closed
    run = pair.shuttle()
    assert [e.stream_id for e in run.of_type("server", RequestReceived)] == [first]
    after = pair.client.send_request("GET", "/after")
    run = pair.shuttle()
    assert [e.stream_id for e in run.of_type("server", RequestReceived)] == [after]


def test_before_the_nodes_hello_the_client_assumes_the_minimum_record_size():
    pair = Pair()
    with pytest.raises(LocalProtocolError, match="record limit"):
        pair.client.send_request("POST", "/early", body=b"x" * MIN_RECORD)
    sid = pair.client.send_request("POST", "/early", body=b"x" * (MIN_RECORD - 200))
    run = pair.handshake()
    (req,) = run.of_type("server", RequestReceived)
    assert req.stream_id == sid


def test_max_chunk_fits_in_one_record():
    pair = Pair.established(server_settings=Settings(max_record=MIN_RECORD))
    sid = pair.client.send_request("PUT", "/u", end=False)
    pair.client.send_data(sid, b"d" * pair.client.max_chunk, end=True)
    frames = split_frames(pair.client.data_to_send())
    assert all(len(f) - 4 <= MIN_RECORD for f in frames)
    with pytest.raises(LocalProtocolError):
        pair.client.send_data(sid, b"d")      # stream already ended locally


def test_ping_payload_is_bounded_locally(pair):
    with pytest.raises(LocalProtocolError):
        pair.client.send_ping(b"x" * 65)
    assert not pair.client.closed
