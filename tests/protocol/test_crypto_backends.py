"""The crypto facade: both AEAD / X25519 / Ed25519 backends agree byte for byte, and
identity keys are validated when parsed (weak keys refused)."""
from __future__ import annotations

import pytest
from Crypto.PublicKey import ECC, RSA
from Crypto.Signature import eddsa
from hypothesis import given, strategies as st

from protocol import IntegrityError, LocalProtocolError, RemoteProtocolError
from protocol.crypto import (HAVE_CRYPTOGRAPHY, Ephemeral, KeyFormatError, PrivateKey, PublicKey,
                             WeakKeyError, aead_backends, aead_class, default_aead_backend,
                             nonce)

from protocol_helpers import PROPERTY, SMALL_ORDER_ED25519, ed25519_der, key

BACKENDS = ["pycryptodome", "cryptography"]

keys32 = st.binary(min_size=32, max_size=32)
nonces = st.binary(min_size=12, max_size=12)
aads = st.binary(max_size=64)
plaintexts = st.binary(max_size=2048)


def test_both_aead_backends_are_available():
    assert HAVE_CRYPTOGRAPHY
    table = aead_backends()
    assert set(table) >= {"pycryptodome", "cryptography"}
    assert table["pycryptodome"].name == "pycryptodome"
    assert table["cryptography"].name == "cryptography"
    assert default_aead_backend() == "cryptography"
    assert aead_class(None) is table["cryptography"]
    with pytest.raises(LocalProtocolError):
        aead_class("rot13")


@PROPERTY
@given(k=keys32, n=nonces, aad=aads, pt=plaintexts)
def test_aead_backends_produce_identical_ciphertext_and_open_each_other(k, n, aad, pt):
    a = aead_backends()["pycryptodome"](k)
    b = aead_backends()["cryptography"](k)
    ct = a.seal(n, pt, aad)
    assert ct == b.seal(n, pt, aad)
    assert len(ct) == len(pt) + 16
    assert a.open(n, ct, aad) == b.open(n, ct, aad) == pt


@PROPERTY
@given(k=keys32, n=nonces, aad=aads, pt=plaintexts, data=st.data())
def test_aead_tampering_raises_integrity_error_on_both(k, n, aad, pt, data):
    ct = aead_backends()["cryptography"](k).seal(n, pt, aad)
    where = data.draw(st.sampled_from(["ciphertext", "aad", "nonce", "key", "truncate"]))
    pos = data.draw(st.integers(0, 10_000))
    bit = data.draw(st.integers(0, 7))
    kk, nn, aa, cc = k, n, aad, ct
    if where == "ciphertext":
        cc = _flip(ct, pos % len(ct), bit)
    elif where == "aad":
        aa = _flip(aad, pos % len(aad), bit) if aad else b"\x00"
    elif where == "nonce":
        nn = _flip(n, pos % 12, bit)
    elif where == "key":
        kk = _flip(k, pos % 32, bit)
    else:
        cc = ct[:pos % len(ct)]
    for name in BACKENDS:
        with pytest.raises(IntegrityError):
            aead_backends()[name](kk).open(nn, cc, aa)


def _flip(data: bytes, pos: int, bit: int) -> bytes:
    b = bytearray(data)
    b[pos] ^= 1 << bit
    return bytes(b)


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("size", [0, 1, 15])
def test_aead_open_of_data_shorter_than_a_tag(name, size):
    with pytest.raises(IntegrityError):
        aead_backends()[name](bytes(32)).open(nonce(0), b"\x00" * size, b"")


def test_nonce_layout():
    assert nonce(0) == bytes(12)
    assert nonce(1) == bytes(11) + b"\x01"
    assert nonce(2**64 - 1) == bytes(4) + b"\xff" * 8


# --------------------------------------------------------------------------- X25519

@PROPERTY
@given(a=keys32, b=keys32)
def test_x25519_backends_agree(a, b):
    pub = {}
    shared = {}
    for name in BACKENDS:
        ea, eb = Ephemeral(a, backend=name), Ephemeral(b, backend=name)
        pub[name] = (ea.public, eb.public)
        shared[name] = ea.exchange(eb.public)
        assert shared[name] == eb.exchange(ea.public)
    assert pub["pycryptodome"] == pub["cryptography"]
    assert shared["pycryptodome"] == shared["cryptography"]
    # and across backends
    assert Ephemeral(a, backend="pycryptodome").exchange(
        Ephemeral(b, backend="cryptography").public) == shared["cryptography"]


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("bad", [b"", b"\x01" * 31, b"\x01" * 33, "not bytes"])
def test_x25519_peer_key_of_wrong_size(name, bad):
    with pytest.raises(RemoteProtocolError):
        Ephemeral(backend=name).exchange(bad)


def test_fresh_ephemerals_differ():
    assert len({Ephemeral().public for _ in range(20)}) == 20


# --------------------------------------------------------------------------- signatures

@PROPERTY
@given(message=st.binary(max_size=512))
def test_ed25519_signatures_identical_from_both_paths(message):
    k = key("ed25519", 0)
    assert k._fast is not None
    reference = eddsa.new(k._key, "rfc8032").sign(message)
    assert k.sign(message) == reference
    assert k.public.verify(message, reference)
    slow = PublicKey(k.public._key)
    slow._fast = None
    assert slow.verify(message, reference)
    assert not slow.verify(message + b"!", reference)


@pytest.mark.parametrize("kind", ["ed25519", "rsa2048", "rsa3072"])
def test_sign_and_verify(kind):
    k = key(kind, 0)
    sig = k.sign(b"transcript")
    assert k.public.verify(b"transcript", sig)
    assert not k.public.verify(b"transcript.", sig)
    assert not key(kind, 1).public.verify(b"transcript", sig)
    assert not k.public.verify(b"transcript", sig[:-1])
    assert not k.public.verify(b"transcript", sig + b"\x00")
    assert not k.public.verify(b"transcript", b"")
    assert not k.public.verify(b"transcript", "not bytes")
    assert not k.public.verify(b"transcript", bytes(len(sig)))
    assert not k.public.verify(b"transcript", b"\xff" * len(sig))


# --------------------------------------------------------------------------- key parsing

@pytest.mark.parametrize("raw", SMALL_ORDER_ED25519, ids=lambda r: r.hex()[:8] + r.hex()[-2:])
def test_small_order_ed25519_identity_keys_are_refused(raw):
    with pytest.raises(WeakKeyError, match="small order"):
        PublicKey.from_bytes(ed25519_der(raw))


@pytest.mark.parametrize("raw", [
    bytes.fromhex("0100000000000000000000000000000000000000000000000000000000000080"),
    bytes.fromhex("edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
    bytes.fromhex("eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f"),
], ids=["identity-with-sign", "p", "p+1"])
def test_non_canonical_ed25519_encodings_are_refused(raw):
    with pytest.raises(KeyFormatError):
        PublicKey.from_bytes(ed25519_der(raw))


@pytest.mark.parametrize("bits", [512, 1024, 2047])
def test_rsa_below_2048_bits_is_refused(bits):
    if bits == 2047:
        # pycryptodome cannot generate odd sizes: take a 2048-bit modulus with 2047 bits.
        n = key("rsa2048", 0).public._key.n >> 1 | 1
        pub = RSA.construct((n, 65537), consistency_check=False)
    else:
        pub = RSA.generate(max(bits, 1024)).public_key() if bits >= 1024 else \
            RSA.construct(((1 << 511) | 1, 65537), consistency_check=False)
    for data in (pub.export_key("DER"), pub.export_key("PEM")):
        with pytest.raises(WeakKeyError, match="too weak"):
            PublicKey.from_bytes(data)
    with pytest.raises(WeakKeyError):
        PrivateKey.generate("rsa", 1024)


@pytest.mark.parametrize("e", [3, 17, 65536, 65538])
def test_rsa_public_exponent_must_be_odd_and_at_least_65537(e):
    n = key("rsa2048", 0).public._key.n
    pub = RSA.construct((n, e), consistency_check=False)
    with pytest.raises(WeakKeyError, match="exponent"):
        PublicKey.from_bytes(pub.export_key("DER"))


def test_rsa_above_8192_bits_is_refused():
    n = (1 << 8199) | 1
    pub = RSA.construct((n, 65537), consistency_check=False)
    with pytest.raises(WeakKeyError, match="too large"):
        PublicKey.from_bytes(pub.export_key("DER"))


@pytest.mark.parametrize("kind", ["ed25519", "rsa2048", "rsa3072"])
def test_key_round_trips(kind):
    k = key(kind, 0)
    pub = k.public
    assert PublicKey.from_bytes(pub.to_pem()) == pub
    assert PublicKey.from_bytes(pub.to_pem().encode()) == pub
    assert PublicKey.from_bytes(pub.der) == pub
    assert PublicKey.from_bytes("\n  " + pub.to_pem() + "\n\n") == pub
    again = PrivateKey.from_bytes(k.to_pem())
    assert again.public == pub and again.kind == k.kind
    assert "PRIVATE" not in repr(k) and pub.fingerprint().startswith("SHA256:")
    assert hash(pub) == hash(PublicKey.from_bytes(pub.der))


@pytest.mark.parametrize("last", [0x09, 0x0A, 0x0B, 0x0C, 0x0D, 0x20])
def test_der_ending_in_a_whitespace_byte_parses(last):
    """Regression: from_bytes() used to strip() binary DER, cutting its last byte."""
    seed = bytes(range(31)) + bytes([last])
    ecc = ECC.construct(curve="ed25519", seed=seed)
    priv = PrivateKey(ecc)
    private_der = ecc.export_key(format="DER")
    assert private_der[-1] == last
    assert PrivateKey.from_bytes(private_der).public == priv.public
    # and a public key whose raw encoding ends in that byte
    for i in range(2000):
        candidate = ECC.construct(curve="ed25519", seed=i.to_bytes(32, "big")).public_key()
        der = candidate.export_key(format="DER")
        if der[-1] == last:
            assert PublicKey.from_bytes(der) == PublicKey(candidate)
            break
    else:  # pragma: no cover - 2000 tries make this practically impossible
        pytest.fail("no key ending in that byte found")


@pytest.mark.parametrize("data", [b"", "", b"\x00" * 20000, b"not a key", b"\x30\x03\x02\x01\x01",
                                  "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n"])
def test_garbage_is_not_a_public_key(data):
    with pytest.raises(KeyFormatError):
        PublicKey.from_bytes(data)


@pytest.mark.parametrize("kind", ["ed25519", "rsa2048"])
def test_a_private_key_is_not_accepted_as_a_public_key(kind):
    with pytest.raises(KeyFormatError, match="private"):
        PublicKey.from_bytes(key(kind, 0).to_pem())


def test_unsupported_key_types():
    p256 = ECC.generate(curve="P-256")
    with pytest.raises(KeyFormatError):
        PublicKey.from_bytes(p256.public_key().export_key(format="DER"))
    with pytest.raises(KeyFormatError):
        PrivateKey.generate("dsa")
    with pytest.raises(KeyFormatError):
        PrivateKey(p256.public_key())


# --------------------------------------------------------------------------- HKDF

@PROPERTY
@given(ikm=st.binary(max_size=80), salt=st.binary(max_size=80), info=st.binary(max_size=80),
       length=st.integers(0, 255 * 32))
def test_hkdf_agrees_with_pycryptodome(ikm, salt, info, length):
    from protocol.crypto import hkdf, hkdf_reference
    if length == 0:
        assert hkdf(ikm, salt, info, 0) == b""
        return
    assert hkdf(ikm, salt, info, length) == hkdf_reference(ikm, salt, info, length)


def test_hkdf_refuses_overlong_output():
    from protocol.crypto import hkdf
    with pytest.raises(ValueError):
        hkdf(b"k", b"", b"", 255 * 32 + 1)
