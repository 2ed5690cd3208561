"""Cryptographic primitives behind one small facade (SPEC.md §3).

pycryptodome is the reference implementation of everything here (keys,
signatures, X25519, HKDF and ChaCha20-Poly1305).  When the ``cryptography``
package is importable, the same constructions run through OpenSSL for the hot
paths: the record AEAD, X25519 and Ed25519.  Each of those is deterministic, so
both backends give byte-identical output; tests/protocol/test_crypto.py proves it.

Keys are validated once, when parsed: RSA below 2048 or above 8192 bits, an RSA
public exponent that is even or below 65537, and Ed25519 points of small order
are refused (pycryptodome's verify would accept signatures from the latter).
"""
from __future__ import annotations

import base64
import hashlib
import hmac as _hmac
import struct

from Crypto.Cipher import ChaCha20_Poly1305 as _PyChaCha
from Crypto.Hash import SHA256
from Crypto.Protocol import DH as _DH
from Crypto.Protocol.KDF import HKDF
from Crypto.PublicKey import ECC, RSA
from Crypto.Signature import eddsa, pss

from .errors import IntegrityError, LocalProtocolError, RemoteProtocolError

try:  # optional accelerator; same bytes out
    from cryptography.exceptions import InvalidSignature as _OsslInvalidSignature
    from cryptography.exceptions import InvalidTag as _OsslInvalidTag
    from cryptography.hazmat.primitives.asymmetric import ed25519 as _ossl_ed
    from cryptography.hazmat.primitives.asymmetric import x25519 as _ossl_x
    from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305 as _OsslChaCha
    HAVE_CRYPTOGRAPHY = True
except ImportError:  # pragma: no cover - exercised by forcing the backend in tests
    HAVE_CRYPTOGRAPHY = False

__all__ = [
    "WeakKeyError", "KeyFormatError", "PublicKey", "PrivateKey", "Ephemeral", "hkdf",
    "sha256", "aead_backends", "default_aead_backend", "AEAD_KEY_LEN", "TAG_LEN",
    "RSA_MIN_BITS", "RSA_MAX_BITS", "RSA_DEFAULT_BITS", "HAVE_CRYPTOGRAPHY",
]

RSA_MIN_BITS = 2048
RSA_MAX_BITS = 8192
RSA_DEFAULT_BITS = 3072
AEAD_KEY_LEN = 32
TAG_LEN = 16
_PSS_SALT = 32


class KeyFormatError(ValueError):
    """A key could not be parsed (not PEM/DER, wrong type, corrupt)."""


class WeakKeyError(KeyFormatError):
    """A key parsed but is unacceptable: too small, too large, or of small order."""


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def hkdf(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """HKDF-SHA256 (RFC 5869), extract then expand.

    Written on the standard library's HMAC (OpenSSL): ~15 µs a call where
    pycryptodome's ``HKDF`` takes ~180 µs, and a handshake makes two calls per
    side.  :func:`hkdf_reference` is pycryptodome's, and the tests check that
    both agree (and the Wycheproof HKDF vectors).
    """
    if length > 255 * 32:
        raise ValueError("HKDF-SHA256 output is at most 8160 bytes")
    prk = _hmac.digest(salt or bytes(32), ikm, "sha256")       # one-shot C HMAC
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = _hmac.digest(prk, block + info + bytes((counter,)), "sha256")
        out += block
        counter += 1
    return out[:length]


def hkdf_reference(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """pycryptodome's HKDF-SHA256, the reference :func:`hkdf` is tested against."""
    return HKDF(ikm, length, salt, SHA256, 1, info)


# --------------------------------------------------------------------------- identity keys

def _strip_text(data: bytes) -> bytes:
    """Strip the whitespace around PEM / OpenSSH text, never around binary DER.

    DER always opens with a SEQUENCE tag (0x30); its last byte is key material
    and may well be a "whitespace" byte (0x09-0x0d, 0x20), which ``strip()``
    would cut off (about 1 Ed25519 key in 43).
    """
    return data if data[:1] == b"\x30" else data.strip()


def _check_rsa(key: RSA.RsaKey) -> None:
    bits = key.size_in_bits()
    if bits < RSA_MIN_BITS:
        raise WeakKeyError(f"RSA key of {bits} bits is too weak (minimum {RSA_MIN_BITS})")
    if bits > RSA_MAX_BITS:
        raise WeakKeyError(f"RSA key of {bits} bits is too large (maximum {RSA_MAX_BITS})")
    if key.e < 65537 or key.e % 2 == 0:
        raise WeakKeyError(f"RSA public exponent {key.e} is not acceptable")


_ED25519_ORDER = 2**252 + 27742317777372353535851937790883648493


def _check_ed25519(key: ECC.EccKey) -> None:
    if (key.pointQ * 8).is_point_at_infinity():
        raise WeakKeyError("Ed25519 public key is a point of small order")
    # Mixed-order points (a torsion component added) verify some signatures that a
    # prime-order key would not; every honestly generated key is in the prime subgroup.
    if not (key.pointQ * _ED25519_ORDER).is_point_at_infinity():
        raise WeakKeyError("Ed25519 public key is not in the prime-order subgroup")


class PublicKey:
    """A long-term identity public key: Ed25519 or RSA (PSS, SHA-256)."""

    __slots__ = ("kind", "_key", "der", "_fast")

    def __init__(self, key):
        if isinstance(key, RSA.RsaKey):
            _check_rsa(key)
            self.kind = "rsa"
        elif isinstance(key, ECC.EccKey) and key.curve.lower() in ("ed25519",):
            _check_ed25519(key)
            self.kind = "ed25519"
        else:
            raise KeyFormatError("unsupported key type (expected Ed25519 or RSA)")
        if key.has_private():
            key = key.public_key()
        self._key = key
        self.der = key.export_key(format="DER")
        self._fast = None
        if HAVE_CRYPTOGRAPHY and self.kind == "ed25519":
            self._fast = _ossl_ed.Ed25519PublicKey.from_public_bytes(
                key.export_key(format="raw"))

    @classmethod
    def from_bytes(cls, data: bytes | str) -> "PublicKey":
        """Parse PEM text or DER bytes (SubjectPublicKeyInfo or PKCS#1 for RSA)."""
        if isinstance(data, str):
            data = data.encode()
        if not data or len(data) > 16384:
            raise KeyFormatError("public key is empty or implausibly large")
        stripped = _strip_text(data)
        errors = []
        for loader in (ECC.import_key, RSA.import_key):
            try:
                key = loader(stripped)
            except (ValueError, IndexError, TypeError) as exc:
                errors.append(exc)
                continue
            if key.has_private():
                raise KeyFormatError("expected a public key, got a private key")
            return cls(key)
        raise KeyFormatError("not an Ed25519 or RSA public key in PEM or DER form")

    def to_pem(self) -> str:
        pem = self._key.export_key(format="PEM")
        pem = pem.decode() if isinstance(pem, bytes) else pem
        return pem.rstrip("\n") + "\n"

    @property
    def bits(self) -> int:
        return self._key.size_in_bits() if self.kind == "rsa" else 255

    def fingerprint(self) -> str:
        """``SHA256:<base64>`` of the DER encoding, as OpenSSH prints fingerprints."""
        return "SHA256:" + base64.b64encode(sha256(self.der)).decode().rstrip("=")

    def verify(self, message: bytes, signature: bytes) -> bool:
        """True when ``signature`` is valid for ``message``; never raises on bad input."""
        if not isinstance(signature, (bytes, bytearray)):
            return False
        if self.kind == "ed25519":
            if len(signature) != 64:
                return False
            if self._fast is not None:
                try:
                    self._fast.verify(signature, message)
                    return True
                except _OsslInvalidSignature:
                    return False
            try:
                eddsa.new(self._key, "rfc8032").verify(message, signature)
                return True
            except ValueError:
                return False
        if len(signature) != (self.bits + 7) // 8:
            return False
        try:
            pss.new(self._key, salt_bytes=_PSS_SALT).verify(SHA256.new(message), signature)
            return True
        except (ValueError, TypeError):
            return False

    def __eq__(self, other) -> bool:
        return isinstance(other, PublicKey) and other.der == self.der

    def __hash__(self) -> int:
        return hash(self.der)

    def __repr__(self) -> str:
        return f"PublicKey({self.kind}, {self.fingerprint()})"


class PrivateKey:
    """A long-term identity private key.  Its repr never shows secret material."""

    __slots__ = ("kind", "_key", "public", "_fast")

    def __init__(self, key):
        if not key.has_private():
            raise KeyFormatError("expected a private key")
        self.public = PublicKey(key.public_key())
        self.kind = self.public.kind
        self._key = key
        self._fast = None
        if HAVE_CRYPTOGRAPHY and self.kind == "ed25519":
            self._fast = _ossl_ed.Ed25519PrivateKey.from_private_bytes(key.seed)

    @classmethod
    def generate(cls, kind: str = "ed25519", bits: int = RSA_DEFAULT_BITS) -> "PrivateKey":
        if kind == "ed25519":
            return cls(ECC.generate(curve="ed25519"))
        if kind == "rsa":
            if not RSA_MIN_BITS <= bits <= RSA_MAX_BITS:
                raise WeakKeyError(f"RSA size must be {RSA_MIN_BITS}..{RSA_MAX_BITS} bits")
            return cls(RSA.generate(bits))
        raise KeyFormatError(f"unknown key type {kind!r} (ed25519 or rsa)")

    @classmethod
    def from_bytes(cls, data: bytes | str) -> "PrivateKey":
        if isinstance(data, str):
            data = data.encode()
        for loader in (ECC.import_key, RSA.import_key):
            try:
                key = loader(_strip_text(data))
            except (ValueError, IndexError, TypeError):
                continue
            return cls(key)
        raise KeyFormatError("not an Ed25519 or RSA private key in PEM or DER form")

    def to_pem(self) -> str:
        if self.kind == "rsa":
            pem = self._key.export_key(format="PEM", pkcs=8)
        else:
            pem = self._key.export_key(format="PEM")
        pem = pem.decode() if isinstance(pem, bytes) else pem
        return pem.rstrip("\n") + "\n"

    def sign(self, message: bytes) -> bytes:
        if self._fast is not None:
            return self._fast.sign(message)
        if self.kind == "ed25519":
            return eddsa.new(self._key, "rfc8032").sign(message)
        return pss.new(self._key, salt_bytes=_PSS_SALT).sign(SHA256.new(message))

    def __repr__(self) -> str:
        return f"PrivateKey({self.kind}, {self.public.fingerprint()})"


# --------------------------------------------------------------------------- X25519

class Ephemeral:
    """An ephemeral X25519 key pair used for exactly one handshake."""

    __slots__ = ("public", "_priv", "_fast")

    def __init__(self, secret: bytes | None = None, *, backend: str | None = None):
        use_fast = HAVE_CRYPTOGRAPHY if backend is None else backend == "cryptography"
        if use_fast:
            self._fast = (_ossl_x.X25519PrivateKey.from_private_bytes(secret)
                          if secret is not None else _ossl_x.X25519PrivateKey.generate())
            self._priv = None
            self.public = self._fast.public_key().public_bytes_raw()
        else:
            self._fast = None
            self._priv = (_DH.import_x25519_private_key(secret) if secret is not None
                          else ECC.generate(curve="X25519"))
            self.public = self._priv.public_key().export_key(format="raw")

    def exchange(self, peer_public: bytes) -> bytes:
        """X25519(our secret, peer public); an all-zero result (low-order peer key) fails."""
        if not isinstance(peer_public, bytes) or len(peer_public) != 32:
            raise RemoteProtocolError("ephemeral key must be 32 bytes")
        try:
            if self._fast is not None:
                shared = self._fast.exchange(_ossl_x.X25519PublicKey.from_public_bytes(peer_public))
            else:
                shared = _DH.key_agreement(
                    static_priv=self._priv,
                    static_pub=_DH.import_x25519_public_key(peer_public),
                    kdf=lambda z: z)
        except ValueError as exc:
            raise RemoteProtocolError("ephemeral key of small order") from exc
        if shared == bytes(32):
            raise RemoteProtocolError("ephemeral key of small order")
        return shared


# --------------------------------------------------------------------------- AEAD backends

class _PycryptodomeAead:
    """ChaCha20-Poly1305 (RFC 8439) from pycryptodome: one cipher object per record."""

    name = "pycryptodome"
    __slots__ = ("_key",)

    def __init__(self, key: bytes):
        self._key = key

    def seal(self, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        c = _PyChaCha.new(key=self._key, nonce=nonce)
        c.update(aad)
        ct, tag = c.encrypt_and_digest(plaintext)
        return ct + tag

    def open(self, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        if len(data) < TAG_LEN:
            raise IntegrityError("record shorter than its tag")
        c = _PyChaCha.new(key=self._key, nonce=nonce)
        c.update(aad)
        try:
            return c.decrypt_and_verify(data[:-TAG_LEN], data[-TAG_LEN:])
        except ValueError as exc:
            raise IntegrityError("record failed authentication") from exc


class _CryptographyAead:
    """The same construction through OpenSSL (the ``cryptography`` package)."""

    name = "cryptography"
    __slots__ = ("_aead",)

    def __init__(self, key: bytes):
        self._aead = _OsslChaCha(key)

    def seal(self, nonce: bytes, plaintext: bytes, aad: bytes) -> bytes:
        return self._aead.encrypt(nonce, plaintext, aad)

    def open(self, nonce: bytes, data: bytes, aad: bytes) -> bytes:
        try:
            return self._aead.decrypt(nonce, data, aad)
        except _OsslInvalidTag as exc:
            raise IntegrityError("record failed authentication") from exc


def aead_backends() -> dict[str, type]:
    """Name -> AEAD class, for every backend importable here."""
    table: dict[str, type] = {"pycryptodome": _PycryptodomeAead}
    if HAVE_CRYPTOGRAPHY:
        table["cryptography"] = _CryptographyAead
    return table


def default_aead_backend() -> str:
    return "cryptography" if HAVE_CRYPTOGRAPHY else "pycryptodome"


def aead_class(name: str | None):
    table = aead_backends()
    name = name or default_aead_backend()
    try:
        return table[name]
    except KeyError:
        raise LocalProtocolError(f"AEAD backend {name!r} is not available") from None


def nonce(counter: int) -> bytes:
    """96-bit nonce: 4 zero bytes then the 64-bit big-endian record counter."""
    return _NONCE.pack(0, counter)


_NONCE = struct.Struct(">IQ")
