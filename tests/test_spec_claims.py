"""Claims of SPEC.md that issue 16 settled, checked against the reference ``protocol``.

- §5.3: the last key epoch is 2^32 - 1; its record with counter rekey_after - 1 (the one
  after which a 2^32-th update would be due) is never sealed, and a receiver fails on it.
- §5.4: the frame limit counts the record's array header: a record whose header, messages
  and tag add up to exactly the receiver's max_record is accepted; one byte more is 413.
- §6.1: invalid UTF-8 is refused wherever a string is (field, map key, nested argument),
  including surrogates and overlong forms, never repaired.
"""
from __future__ import annotations

import struct
import time

import msgpack
import pytest

from protocol import Connection, DecodeError, PrivateKey, Role, Settings
from protocol.errors import FrameError, LocalProtocolError, RemoteProtocolError
from protocol.events import DataReceived
from protocol.frame import unpack
from protocol.record import MAX_EPOCH, Opener, Sealer

KEY = bytes(range(32))


def test_max_epoch_is_the_last_key_index():
    assert MAX_EPOCH == 2**32 - 1
    rekey_after = 4              # the boundary works the same for any interval
    sealer, opener = Sealer(KEY, None, rekey_after), Opener(KEY, None, rekey_after)
    sealer.epoch = opener.epoch = MAX_EPOCH - 1       # jump to the last update
    sealer.counter = opener.counter = rekey_after - 1
    wire = sealer.seal(b"\x91\x81\xa1t\x06")           # the 2^32 - 1-th update follows
    opener.open(wire[:4], wire[4:])
    assert sealer.epoch == opener.epoch == MAX_EPOCH and sealer.counter == 0
    for _ in range(rekey_after - 1):                   # counters 0 .. rekey_after - 2
        wire = sealer.seal(b"\x91\x81\xa1t\x06")
        opener.open(wire[:4], wire[4:])
    # Counter rekey_after - 1 of the last epoch: the sender refuses to seal it...
    last_key, counter = sealer.key, sealer.counter
    with pytest.raises(LocalProtocolError):
        sealer.seal(b"\x91\x81\xa1t\x06")
    # ... and a receiver that gets it anyway (sealed by hand) fails the connection, 400.
    twin = Sealer(last_key, None, rekey_after + 1)
    twin.counter = counter
    wire = twin.seal(b"\x91\x81\xa1t\x06")
    with pytest.raises(RemoteProtocolError) as info:
        opener.open(wire[:4], wire[4:])
    assert info.value.code == 400


def _pair(server_max_record: int):
    c_key, s_key = PrivateKey.generate("ed25519"), PrivateKey.generate("ed25519")
    client = Connection(Role.CLIENT, identity=c_key, user="u", server_key=s_key.public)
    server = Connection(Role.SERVER, identity=s_key,
                        settings=Settings(max_record=server_max_record))
    now = time.monotonic()
    client.initiate(now)
    server.initiate(now)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    server.complete_auth(c_key.public)
    client.receive_data(server.data_to_send())
    assert client.established and server.established
    return client, server


def _data_record(client: Connection, sid: int, body_len: int) -> bytes:
    """A record holding one DATA message, sealed with the client's next key and counter."""
    msg = msgpack.packb({"t": 3, "i": sid, "b": b"x" * body_len, "f": False},
                        use_bin_type=True)
    return client._sealer.seal(b"\x91" + msg)


@pytest.mark.parametrize("extra", [0, 1], ids=["exactly-max_record", "one-byte-over"])
def test_record_limit_counts_the_array_header(extra):
    limit = 16384
    client, server = _pair(limit)
    sid = client.send_request("POST", "/x", end=False)
    server.receive_data(client.data_to_send())
    # header (1) + DATA map + tag (16) == limit + extra
    overhead = len(msgpack.packb({"t": 3, "i": sid, "b": b"x" * 16000, "f": False},
                                 use_bin_type=True)) - 16000
    record = _data_record(client, sid, limit - 16 - 1 - overhead + extra)
    assert struct.unpack(">I", record[:4])[0] == limit + extra
    if extra:
        with pytest.raises(FrameError) as info:
            server.receive_data(record)
        assert info.value.code == 413
    else:
        [ev] = server.receive_data(record)
        assert isinstance(ev, DataReceived) and len(ev.data) == limit - 17 - overhead


def _str(raw: bytes) -> bytes:
    return bytes((0xA0 | len(raw),)) + raw


@pytest.mark.parametrize("raw", [
    b"\xed\xa0\x80",            # an encoded surrogate, U+D800
    b"\xc0\xaf",                # an overlong "/"
    b"\xf4\x90\x80\x80",        # above U+10FFFF
    b"\xff",
], ids=["surrogate", "overlong", "above-10ffff", "ff"])
@pytest.mark.parametrize("where", ["field", "map-key", "nested-arg"])
def test_invalid_utf8_is_refused_everywhere(raw, where):
    if where == "field":        # RESET reason
        plaintext = b"\x91\x84" + _str(b"t") + b"\x05" + _str(b"i") + b"\x01" + \
            _str(b"s") + b"\xcc\xc8" + _str(b"r") + _str(raw)
    elif where == "map-key":    # a key of the args map
        plaintext = b"\x91\x85" + _str(b"t") + b"\x01" + _str(b"i") + b"\x01" + \
            _str(b"m") + _str(b"GET") + _str(b"p") + _str(b"/") + _str(b"a") + \
            b"\x81" + _str(raw) + b"\x01"
    else:                       # a string two levels down in args
        plaintext = b"\x91\x85" + _str(b"t") + b"\x01" + _str(b"i") + b"\x01" + \
            _str(b"m") + _str(b"GET") + _str(b"p") + _str(b"/") + _str(b"a") + \
            b"\x81" + _str(b"k") + b"\x91" + _str(raw)
    # The same bytes with valid UTF-8 decode: only the bad string is at fault.
    from protocol import messages
    [ok] = unpack(plaintext.replace(_str(raw), _str(b"ok")), check_depth=False)
    messages.decode(ok)
    with pytest.raises(DecodeError):
        [obj] = unpack(plaintext, check_depth=False)
        messages.decode(obj)


def test_x25519_import_prefixes_of_section_3_4():
    """The SPKI and PKCS#8 prefixes §3.4 gives for libraries that need them."""
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import x25519
    secret = bytes(range(32))
    key = x25519.X25519PrivateKey.from_private_bytes(secret)
    raw = key.public_key().public_bytes_raw()
    spki = key.public_key().public_bytes(ser.Encoding.DER, ser.PublicFormat.SubjectPublicKeyInfo)
    assert spki == bytes.fromhex("302a300506032b656e032100") + raw
    pkcs8 = key.private_bytes(ser.Encoding.DER, ser.PrivateFormat.PKCS8, ser.NoEncryption())
    assert pkcs8 == bytes.fromhex("302e020100300506032b656e04220420") + secret
    assert ser.load_der_public_key(spki).public_bytes_raw() == raw
