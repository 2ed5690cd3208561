"""The golden vectors of tests/vectors/ (SPEC.md Appendix B), checked three ways.

1. The reference implementation (``protocol``) run on the vectors' inputs reproduces the
   recorded wire bytes exactly, with each AEAD backend.
2. An independent derivation written from SPEC.md alone (tests/vectors/make_vectors.py:
   hand-written HKDF, ``cryptography`` primitives, hand-built message maps) reproduces
   every recorded intermediate value and wire byte.
3. The recorded records open, and the recorded signatures verify, under the recorded keys.

SPEC.md Appendix B shows the same vectors in hex: its generated blocks must equal what
make_vectors.py renders from the files, and a reader's check written against the text of
the appendix alone (no JSON, no ``protocol``) must find every value consistent.

Regenerate with ``.venv/bin/python tests/vectors/make_vectors.py`` (refuses to write when
(1) and (2) disagree; rewrites the blocks of SPEC.md too).
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import struct
import sys
from pathlib import Path

import msgpack
import pytest

VECTORS = Path(__file__).resolve().parent / "vectors"


def _load_generator():
    spec = importlib.util.spec_from_file_location("_utesla_make_vectors",
                                                  VECTORS / "make_vectors.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


gen = _load_generator()
gen._import_protocol()

from Crypto.Cipher import ChaCha20_Poly1305 as PyChaCha  # noqa: E402
from Crypto.PublicKey import ECC  # noqa: E402

from protocol import (Connection, DecodeError, IntegrityError, PrivateKey,  # noqa: E402
                      PublicKey, Role, Settings, Status)
from protocol import crypto, messages  # noqa: E402
from protocol.frame import unpack  # noqa: E402
from protocol.record import REKEY_AFTER, Opener, Sealer, next_key  # noqa: E402

BACKENDS = sorted(crypto.aead_backends())
HANDSHAKE = json.loads((VECTORS / "handshake_ed25519.json").read_text())
HANDSHAKE_RSA = json.loads((VECTORS / "handshake_rsa.json").read_text())
HANDSHAKES = {"handshake_ed25519.json": HANDSHAKE, "handshake_rsa.json": HANDSHAKE_RSA}
RECORDS = json.loads((VECTORS / "record.json").read_text())
MESSAGES = json.loads((VECTORS / "messages.json").read_text())
REKEY = json.loads((VECTORS / "rekey.json").read_text())
SPEC_TEXT = (Path(__file__).resolve().parent.parent / "SPEC.md").read_text()
h = bytes.fromhex


def _handshakes():
    return [pytest.param(v, id=k.removesuffix(".json")) for k, v in HANDSHAKES.items()]


def test_both_aead_backends_are_available():
    # The byte-identity claim of SPEC.md §3.6 is only tested when both are importable.
    assert BACKENDS == ["cryptography", "pycryptodome"]


@pytest.mark.parametrize("name", sorted(gen.FILES))
def test_files_match_generator(name):
    """The committed JSON is exactly what make_vectors.py produces today."""
    assert gen.render(gen.FILES[name]()) == (VECTORS / name).read_text(), (
        f"{name} is stale: run tests/vectors/make_vectors.py")


# ---------------------------------------------------------------------------- handshake

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hs", _handshakes())
def test_handshake_wire_bytes(hs, backend):
    ref = gen.run_connection(hs["inputs"], backend)
    assert len(ref["flights"]) == len(hs["flights"])
    for (who, data), flight in zip(ref["flights"], hs["flights"]):
        assert who == flight["from"]
        assert data.hex() == flight["data"], flight["frames"][0]["name"]
        assert [f.hex() for f in gen.split_frames(data)] == [
            fr["wire"] for fr in flight["frames"]]


@pytest.mark.parametrize("hs", _handshakes())
def test_handshake_intermediates_match_independent_derivation(hs):
    indep = gen.derive_handshake(hs["inputs"])
    assert indep["derived"] == hs["derived"]
    assert indep["flights"] == hs["flights"]


@pytest.mark.parametrize("hs", _handshakes())
def test_handshake_protocol_constants(hs):
    from protocol.connection import PROLOGUE, PROTOCOL_VERSION
    p = hs["protocol"]
    assert p["version"] == PROTOCOL_VERSION
    assert h(p["prologue"]) == PROLOGUE
    assert h(p["server_signature_context"]) == b"utesla/1 server signature\x00"
    assert h(p["client_signature_context"]) == b"utesla/1 client signature\x00"


@pytest.mark.parametrize("hs", _handshakes())
def test_identity_keys_and_fingerprints(hs):
    d, i = hs["derived"], hs["inputs"]
    for side in ("client", "server"):
        key = gen.reference_identity(i, side)
        assert key.kind == ("rsa" if f"{side}_identity_rsa" in i else "ed25519")
        assert key.public.der.hex() == d[f"{side}_identity_public_der"]
        assert key.public.fingerprint() == d[f"{side}_identity_fingerprint"]
        assert PublicKey.from_bytes(key.public.der) == key.public


@pytest.mark.parametrize("x_backend", ["cryptography", "pycryptodome"])
@pytest.mark.parametrize("hs", _handshakes())
def test_x25519_both_backends(hs, x_backend):
    d, i = hs["derived"], hs["inputs"]
    c = crypto.Ephemeral(h(i["client_ephemeral_secret"]), backend=x_backend)
    s = crypto.Ephemeral(h(i["server_ephemeral_secret"]), backend=x_backend)
    assert c.public.hex() == d["client_ephemeral_public"]
    assert s.public.hex() == d["server_ephemeral_public"]
    assert c.exchange(s.public).hex() == d["shared_secret"]
    assert s.exchange(c.public).hex() == d["shared_secret"]


@pytest.mark.parametrize("hs", _handshakes())
def test_key_schedule_with_library_hkdf(hs):
    """pycryptodome's HKDF (used by protocol/) agrees with the hand-written one."""
    d = hs["derived"]
    for hkdf in (crypto.hkdf, crypto.hkdf_reference):
        keys = hkdf(h(d["shared_secret"]), h(d["transcript_hash_hellos"]),
                    b"utesla/1 handshake keys", 64)
        assert keys.hex() == d["client_handshake_key"] + d["server_handshake_key"]
    ap = crypto.hkdf(h(d["shared_secret"]), h(d["transcript_hash_auth"]),
                     b"utesla/1 application keys", 64)
    assert ap.hex() == d["client_application_key"] + d["server_application_key"]


@pytest.mark.parametrize("hs", _handshakes())
def test_transcript_hashes(hs):
    d = hs["derived"]
    frames = [fr for fl in hs["flights"] for fr in fl["frames"]]
    by = {fr["name"]: h(fr["plaintext"]) for fr in frames}
    t = (b"utesla protocol 1" + gen.lp(by["ClientHello"]) + gen.lp(by["ServerHello"]))
    assert hashlib.sha256(t).hexdigest() == d["transcript_hash_hellos"]
    assert hashlib.sha256(t + gen.lp(h(d["server_identity_public_der"]))).hexdigest() == \
        d["server_signature_hash"]
    t += gen.lp(by["ServerAuth"])
    user = hs["inputs"]["user"].encode()
    assert hashlib.sha256(t + gen.lp(user)).hexdigest() == d["client_signature_hash"]
    t += gen.lp(by["ClientAuth"])
    assert t.hex() == d["transcript_input"]
    assert hashlib.sha256(t).hexdigest() == d["transcript_hash_auth"]


@pytest.mark.parametrize("hs", _handshakes())
def test_signatures_verify(hs):
    d = hs["derived"]
    server = PublicKey.from_bytes(h(d["server_identity_public_der"]))
    client = PublicKey.from_bytes(h(d["client_identity_public_der"]))
    assert server.verify(h(d["server_signed_message"]), h(d["server_signature"]))
    assert client.verify(h(d["client_signed_message"]), h(d["client_signature"]))
    assert not server.verify(h(d["client_signed_message"]), h(d["client_signature"]))
    assert h(d["server_signed_message"]) == (b"utesla/1 server signature\x00"
                                              + h(d["server_signature_hash"]))
    assert h(d["client_signed_message"]) == (b"utesla/1 client signature\x00"
                                              + h(d["client_signature_hash"]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hs", _handshakes())
def test_handshake_records_open_with_recorded_keys(hs, backend):
    d = hs["derived"]
    aead = crypto.aead_class(backend)
    for flight in hs["flights"]:
        for fr in flight["frames"]:
            wire = h(fr["wire"])
            (n,) = struct.unpack(">I", wire[:4])
            assert n == len(wire) - 4
            if fr["kind"] == "clear":
                assert wire[4:].hex() == fr["plaintext"]
                continue
            pt = aead(h(d[fr["key"]])).open(h(fr["nonce"]), wire[4:], wire[:4])
            assert pt.hex() == fr["plaintext"]
            # a record plaintext is an array of message maps (SPEC.md §5.4)
            batch = unpack(pt)
            assert type(batch) is list and batch
            for obj in batch:
                messages.decode(obj)


@pytest.mark.parametrize("hs", _handshakes())
def test_handshake_plaintexts_carry_the_recorded_signatures(hs):
    d = hs["derived"]
    frames = {fr["name"]: fr for fl in hs["flights"] for fr in fl["frames"]}
    [sa] = msgpack.unpackb(h(frames["ServerAuth"]["plaintext"]))
    assert sa == {"t": 18, "k": h(d["server_identity_public_der"]),
                  "s": h(d["server_signature"])}
    [ca] = msgpack.unpackb(h(frames["ClientAuth"]["plaintext"]))
    assert ca == {"t": 19, "u": hs["inputs"]["user"], "s": h(d["client_signature"])}


def test_rsa_handshake_shape():
    """handshake_rsa.json is what B.4 says: RSA-2048 both sides, PSS with the fixed salts
    (the reference's verify accepts them; any salt would), server at the minimums."""
    i, d = HANDSHAKE_RSA["inputs"], HANDSHAKE_RSA["derived"]
    assert i["server_settings"] == {"window": 65536, "max_record": 16384, "max_streams": 16}
    for side in ("client", "server"):
        key = PublicKey.from_bytes(h(d[f"{side}_identity_public_der"]))
        assert (key.kind, key.bits) == ("rsa", 2048)
        assert len(h(d[f"{side}_signature"])) == 256
        em = h(d[f"{side}_pss_encoded"])
        assert em[-1] == 0xBC and len(em) == 256
        # the salt sits at the end of the unmasked DB (RFC 8017 9.1.1 step 8)
        masked, digest = em[:256 - 33], em[256 - 33:-1]
        db = bytes(a ^ b for a, b in zip(masked, gen.mgf1(digest, len(masked))))
        assert db[-32:].hex() == i[f"{side}_pss_salt"] and db[-33] == 1


# ---------------------------------------------------------------------------- rekey

def _directions():
    return [pytest.param(hs["handshake"], d, id=f"{hs['handshake'][:-5]}-{d['from']}")
            for hs in REKEY["handshakes"] for d in hs["directions"]]


def test_rekey_covers_both_handshakes():
    assert [hs["handshake"] for hs in REKEY["handshakes"]] == list(HANDSHAKES)
    assert REKEY["rekey_after"] == REKEY_AFTER


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fname,direction", _directions())
def test_rekey_vectors(fname, direction, backend):
    """The reference Sealer/Opener cross the boundary at counter 2^20 - 1 as recorded."""
    d = HANDSHAKES[fname]["derived"]
    assert direction["initial_key"] == d[direction["key"]]
    got = gen.reference_rekey(direction, backend)
    assert [w.hex() for w in got] == [r["record"] for r in direction["records"]]


@pytest.mark.parametrize("fname,direction", _directions())
def test_rekey_vectors_independent(fname, direction):
    key0 = h(direction["initial_key"])
    assert next_key(key0).hex() == direction["next_key"] == gen.next_key(key0).hex()
    assert [(r["epoch"], r["counter"]) for r in direction["records"]] == [
        (0, REKEY_AFTER - 1), (1, 0)]
    for r in direction["records"]:
        assert r["key"] == (direction["initial_key"] if r["epoch"] == 0
                            else direction["next_key"])
        assert r["nonce"] == (bytes(4) + r["counter"].to_bytes(8, "big")).hex()
        assert gen.seal(h(r["key"]), r["counter"], h(r["plaintext"])).hex() == r["record"]
        [msg] = unpack(h(r["plaintext"]))
        assert msg["t"] == (6 if direction["from"] == "client" else 7)


# ---------------------------------------------------------------------------- SPEC.md

def test_spec_appendix_b_blocks_are_the_vector_files():
    """SPEC.md's hex is exactly what make_vectors.py renders from the JSON files."""
    want = gen.render_blocks()
    got = gen.spec_blocks(SPEC_TEXT)
    for name in want:
        assert got[name] == want[name], (
            f"SPEC.md Appendix B block {name!r} differs from tests/vectors: run "
            f"tests/vectors/make_vectors.py")


def _spec_values(name: str) -> dict:
    """The values of one generated block, parsed from SPEC.md's text only."""
    block = gen.spec_blocks(SPEC_TEXT)[name]
    body = block.split("```text\n", 1)[1].rsplit("\n```", 1)[0]
    values: dict = {}
    label = None
    for line in body.split("\n"):
        if line.startswith("    ") and label is not None:
            values[label] += bytes.fromhex(line.strip())
            continue
        label = None
        if not line or line.startswith("#"):
            continue
        m = re.fullmatch(r"(\S+) \((\d+) bytes\)", line)
        if m:
            label = m.group(1)
            assert label not in values, label
            values[label] = b""
            values[f"{label}:length"] = int(m.group(2))
            continue
        m = re.fullmatch(r"(\S+) = (.+)", line)
        assert m, f"unparsed line in block {name}: {line!r}"
        values[m.group(1)] = m.group(2)
    for key in [k for k in values if k.endswith(":length")]:
        assert len(values[key[:-7]]) == values.pop(key), key
    return values


def _reader_identity(v: dict, side: str):
    """(DER SPKI, sign(message) -> (signature, EM or None)) from the appendix's inputs."""
    from cryptography.hazmat.primitives import serialization as ser
    from cryptography.hazmat.primitives.asymmetric import ed25519
    if f"{side}_identity_seed" in v:
        key = ed25519.Ed25519PrivateKey.from_private_bytes(v[f"{side}_identity_seed"])
        der = key.public_key().public_bytes(ser.Encoding.DER,
                                            ser.PublicFormat.SubjectPublicKeyInfo)
        return der, lambda msg: (key.sign(msg), None)
    p = int.from_bytes(v[f"{side}_identity_rsa_p"], "big")
    q = int.from_bytes(v[f"{side}_identity_rsa_q"], "big")
    e = int(v[f"{side}_identity_rsa_e"])
    n, d = p * q, int.from_bytes(v[f"{side}_identity_rsa_d"], "big")
    assert n == int.from_bytes(v[f"{side}_identity_rsa_n"], "big")
    assert e * d % ((p - 1) * (q - 1)) == 1
    from cryptography.hazmat.primitives.asymmetric import rsa
    der = rsa.RSAPublicNumbers(e, n).public_key().public_bytes(
        ser.Encoding.DER, ser.PublicFormat.SubjectPublicKeyInfo)
    salt = v[f"{side}_pss_salt"]

    def sign(msg):
        em = gen.pss_encode(msg, salt, n.bit_length())
        return pow(int.from_bytes(em, "big"), d, n).to_bytes(256, "big"), em
    return der, sign


@pytest.mark.parametrize("name", ["handshake_ed25519", "handshake_rsa"])
def test_a_reader_verifies_the_handshake_from_spec_md_alone(name):
    """Every value of the appendix block, re-derived in order from its inputs (§3-§5)."""
    import base64
    from cryptography.hazmat.primitives.asymmetric import x25519
    v = _spec_values(name)
    lp, sha = gen.lp, (lambda b: hashlib.sha256(b).digest())
    ders = {}
    for side in ("client", "server"):
        der, sign = _reader_identity(v, side)
        assert der == v[f"{side}_identity_public_der"]
        assert v[f"{side}_identity_fingerprint"] == "SHA256:" + base64.b64encode(
            sha(der)).decode().rstrip("=")
        ders[side] = (der, sign)
    pubs = {}
    for side in ("client", "server"):
        secret = x25519.X25519PrivateKey.from_private_bytes(v[f"{side}_ephemeral_secret"])
        pubs[side] = secret
        assert secret.public_key().public_bytes_raw() == v[f"{side}_ephemeral_public"]
    shared = pubs["client"].exchange(pubs["server"].public_key())
    assert shared == pubs["server"].exchange(pubs["client"].public_key()) == v["shared_secret"]

    def settings(text):
        w, r, n = (int(x.split()[1]) for x in text.split(", "))
        return w, r, n

    for side, t in (("client", 16), ("server", 17)):
        hello = f"{side.capitalize()}Hello"
        w, r, n = settings(v[f"{side}_settings"])
        assert msgpack.unpackb(v[f"{hello}.payload"]) == {
            "t": t, "v": 1, "e": v[f"{side}_ephemeral_public"], "w": w, "r": r, "n": n}
        assert v[f"{hello}.frame"] == lp(v[f"{hello}.payload"])
    transcript = b"utesla protocol 1" + lp(v["ClientHello.payload"]) + lp(v["ServerHello.payload"])
    assert sha(transcript) == v["transcript_hash_hellos"]
    keys = gen.hkdf(shared, sha(transcript), b"utesla/1 handshake keys", 64)
    assert (keys[:32], keys[32:]) == (v["client_handshake_key"], v["server_handshake_key"])

    def record(label, key, counter):
        assert v[f"{label}.nonce"] == bytes(4) + counter.to_bytes(8, "big")
        assert v[f"{label}.frame"] == gen.seal(key, counter, v[f"{label}.plaintext"])
        return msgpack.unpackb(v[f"{label}.plaintext"])

    def signature(side, hashed):
        assert sha(hashed) == v[f"{side}_signature_hash"]
        signed = f"utesla/1 {side} signature".encode() + b"\x00" + sha(hashed)
        assert signed == v[f"{side}_signed_message"]
        sig, em = ders[side][1](signed)
        assert sig == v[f"{side}_signature"]
        if em is not None:
            assert em == v[f"{side}_pss_encoded"]
        assert PublicKey.from_bytes(ders[side][0]).verify(signed, sig)

    signature("server", transcript + lp(ders["server"][0]))
    assert record("ServerAuth", v["server_handshake_key"], 0) == [
        {"t": 18, "k": ders["server"][0], "s": v["server_signature"]}]
    transcript += lp(v["ServerAuth.plaintext"])
    user = json.loads(v["user"])
    signature("client", transcript + lp(user.encode()))
    assert record("ClientAuth", v["client_handshake_key"], 0) == [
        {"t": 19, "u": user, "s": v["client_signature"]}]
    transcript += lp(v["ClientAuth.plaintext"])
    assert transcript == v["transcript_input"]
    assert sha(transcript) == v["transcript_hash_auth"]
    keys = gen.hkdf(shared, sha(transcript), b"utesla/1 application keys", 64)
    assert (keys[:32], keys[32:]) == (v["client_application_key"],
                                      v["server_application_key"])
    method, path = v["request"].split(",")[0].split()
    assert record("Request", keys[:32], 0) == [{"t": 1, "i": 1, "m": method, "p": path}]
    assert record("ServerFinished", v["server_handshake_key"], 1) == [{"t": 20}]
    status, body = v["response"].split(", body ")
    assert record("Response", keys[32:], 0) == [
        {"t": 2, "i": 1, "s": int(status), "b": json.loads(body).encode()}]
    assert record("Close", keys[:32], 1) == [{"t": 9, "s": 200}]


def test_a_reader_verifies_the_rekey_from_spec_md_alone():
    rekey = _spec_values("rekey")
    for name in ("handshake_ed25519", "handshake_rsa"):
        hs = _spec_values(name)
        for side, t in (("client", 6), ("server", 7)):
            label = f"{name}.{side}"
            k0 = rekey[f"{label}.epoch0_key"]
            assert k0 == hs[f"{side}_application_key"]
            k1 = gen.hkdf(k0, b"", b"utesla/1 rekey", 32)
            assert k1 == rekey[f"{label}.epoch1_key"]
            for key, epoch, counter in ((k0, 0, (1 << 20) - 1), (k1, 1, 0)):
                rl = f"{label}.e{epoch}c{counter}"
                assert rekey[f"{rl}.nonce"] == bytes(4) + counter.to_bytes(8, "big")
                assert rekey[f"{rl}.frame"] == gen.seal(key, counter, rekey[f"{rl}.plaintext"])
                assert msgpack.unpackb(rekey[f"{rl}.plaintext"]) == [
                    {"t": t, "o": bytes(range(8))}]


def test_a_reader_verifies_the_record_sequences_from_spec_md_alone():
    v = _spec_values("record")
    for name, pairs in (("default", [(0, 0), (0, 1), (0, 2)]),
                        ("rekey_after_2", [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0)])):
        key = v[f"{name}.initial_key"]
        for epoch, counter in pairs:
            rl = f"{name}.e{epoch}c{counter}"
            if epoch and not counter:
                key = gen.hkdf(key, b"", b"utesla/1 rekey", 32)
                assert key == v[f"{rl}.key"]
            assert v[f"{rl}.frame"] == gen.seal(key, counter, v[f"{rl}.plaintext"])
            assert v[f"{rl}.nonce"] == bytes(4) + counter.to_bytes(8, "big")


# ---------------------------------------------------------------------------- records

def _sequences():
    return [pytest.param(seq, id=seq["name"]) for seq in RECORDS["sequences"]]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("seq", _sequences())
def test_record_vectors(seq, backend):
    key = h(seq["initial_key"])
    sealer = Sealer(key, backend, seq["rekey_after"])
    opener = Opener(key, backend, seq["rekey_after"])
    for r in seq["records"]:
        assert sealer.epoch == r["epoch"] and sealer.counter == r["counter"]
        assert sealer.key.hex() == r["key"]
        wire = sealer.seal(h(r["plaintext"]))
        assert wire.hex() == r["record"]
        assert wire[:4].hex() == r["aad"]
        assert opener.open(wire[:4], wire[4:]).hex() == r["plaintext"]


@pytest.mark.parametrize("seq", _sequences())
def test_record_vectors_independent(seq):
    key = h(seq["initial_key"])
    for r in seq["records"]:
        assert r["nonce"] == (bytes(4) + r["counter"].to_bytes(8, "big")).hex()
        assert gen.seal(h(r["key"]), r["counter"], h(r["plaintext"])).hex() == r["record"]
        # pycryptodome directly, as a third implementation of RFC 8439
        c = PyChaCha.new(key=h(r["key"]), nonce=h(r["nonce"]))
        c.update(h(r["aad"]))
        ct, tag = c.encrypt_and_digest(h(r["plaintext"]))
        assert (h(r["aad"]) + ct + tag).hex() == r["record"]
    epochs = {r["epoch"]: r["key"] for r in seq["records"]}
    for epoch in sorted(epochs):
        assert epochs[epoch] == key.hex()
        key = next_key(key)
        assert key == gen.next_key(h(epochs[epoch]))


def test_rekey_sequence_shape():
    seq = {s["name"]: s for s in RECORDS["sequences"]}
    assert seq["default"]["rekey_after"] == REKEY_AFTER
    assert [r["counter"] for r in seq["default"]["records"]] == [0, 1, 2]
    assert [(r["epoch"], r["counter"]) for r in seq["rekey_after_2"]["records"]] == [
        (0, 0), (0, 1), (1, 0), (1, 1), (2, 0)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_record_out_of_order_fails(backend):
    seq = RECORDS["sequences"][0]
    opener = Opener(h(seq["initial_key"]), backend, seq["rekey_after"])
    second = h(seq["records"][1]["record"])
    with pytest.raises(IntegrityError):
        opener.open(second[:4], second[4:])


# ---------------------------------------------------------------------------- messages

@pytest.mark.parametrize("case", MESSAGES["valid"], ids=lambda c: c["name"])
def test_message_encoding(case):
    msg = gen.reference_message(case["message"], case["fields"])
    encoded = messages.encode(msg)
    assert encoded.hex() == case["encoded"]
    assert msgpack.unpackb(encoded)["t"] == case["type"]
    assert messages.decode(unpack(encoded)) == msg


def _established(backend):
    """A client/server pair after the vectors' handshake (no 0.5-RTT request)."""
    i = HANDSHAKE["inputs"]
    c_id = PrivateKey(ECC.construct(curve="ed25519", seed=h(i["client_identity_seed"])))
    s_id = PrivateKey(ECC.construct(curve="ed25519", seed=h(i["server_identity_seed"])))
    client = Connection(Role.CLIENT, identity=c_id, user=i["user"], server_key=s_id.public,
                        settings=Settings(aead_backend=backend),
                        ephemeral_secret=h(i["client_ephemeral_secret"]))
    server = Connection(Role.SERVER, identity=s_id, settings=Settings(aead_backend=backend),
                        ephemeral_secret=h(i["server_ephemeral_secret"]))
    client.initiate(0.0)
    server.initiate(0.0)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    server.complete_auth(c_id.public)
    client.receive_data(server.data_to_send())
    assert client.established and server.established
    return client, server


def _invalid_params():
    out = []
    for case in MESSAGES["invalid"]:
        marks = ()
        if "known_bug" in case:
            marks = pytest.mark.xfail(reason="protocol/ bug: " + case["known_bug"],
                                      strict=False)
        out.append(pytest.param(case, id=case["name"], marks=marks))
    return out


@pytest.mark.parametrize("case", _invalid_params())
def test_invalid_record_plaintext_closes_connection(case):
    """Sealed with the client's application key (counter 0), each is a connection error."""
    d = HANDSHAKE["derived"]
    client, server = _established(BACKENDS[0])
    record = gen.seal(h(d["client_application_key"]), 0, h(case["record_plaintext"]))
    with pytest.raises(DecodeError):
        server.receive_data(record)
    assert server.closed
    # the server's last words: CLOSE 400 under its application key, counter 0
    [close] = unpack(gen.open_record(h(d["server_application_key"]), 0,
                                     server.data_to_send()))
    assert close["t"] == 9 and close["s"] == Status.BAD_REQUEST
