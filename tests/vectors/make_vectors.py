#!/usr/bin/env python3
"""Generate the utesla/1 test vectors (SPEC.md Appendix B).

    .venv/bin/python tests/vectors/make_vectors.py            # (re)write the JSON files
    .venv/bin/python tests/vectors/make_vectors.py --check    # exit 1 if they would change

Two halves, kept apart on purpose:

* An **independent derivation** of every value, written from SPEC.md alone: HKDF spelled
  out with ``hmac``/``hashlib``, X25519, Ed25519 and ChaCha20-Poly1305 from the
  ``cryptography`` package, and every message map built by hand in the key order of
  SPEC.md §6.5.  Nothing in this half imports ``protocol``.
* The **reference implementation** (``protocol.Connection``, ``protocol.record.Sealer``,
  ``protocol.messages.encode``) run on the same inputs.

The script refuses to write anything unless both halves agree byte for byte, so the JSON
files hold values two implementations produced.  ``tests/test_vectors.py`` re-runs both.

All byte strings in the JSON files are lowercase hex.  Ed25519 and X25519 are
deterministic; RSA-PSS draws a random salt per signature, so the RSA handshake fixes the
salts (inputs ``client_pss_salt``, ``server_pss_salt``: the independent half encodes with
them, the reference gets them through pycryptodome's ``rand_func``).  Every file is
therefore reproducible.

The script also renders the hex blocks of SPEC.md Appendix B from the JSON files (every
value of both handshakes, the record sequences and the rekey, in the order a reader checks
them), each between an HTML comment ``BEGIN vectors:NAME`` and ``END vectors:NAME``, and
rewrites them in SPEC.md; ``--check`` fails when SPEC.md differs.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import hmac
import json
import struct
import sys
from pathlib import Path

import msgpack
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa, x25519
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent

# =====================================================================================
# Constants, copied from SPEC.md (not imported from protocol/)
# =====================================================================================

PROTOCOL_VERSION = 1
PROLOGUE = b"utesla protocol 1"
SERVER_SIG_CONTEXT = b"utesla/1 server signature\x00"
CLIENT_SIG_CONTEXT = b"utesla/1 client signature\x00"
HS_INFO = b"utesla/1 handshake keys"
AP_INFO = b"utesla/1 application keys"
REKEY_INFO = b"utesla/1 rekey"
TAG_LEN = 16
REKEY_AFTER = 1 << 20

T_REQUEST, T_RESPONSE, T_DATA, T_WINDOW, T_RESET = 1, 2, 3, 4, 5
T_PING, T_PONG, T_GOAWAY, T_CLOSE = 6, 7, 8, 9
T_CLIENT_HELLO, T_SERVER_HELLO, T_SERVER_AUTH, T_CLIENT_AUTH, T_SERVER_FINISHED = (
    16, 17, 18, 19, 20)

# =====================================================================================
# Fixed inputs
# =====================================================================================

CLIENT_IDENTITY_SEED = bytes(range(0x00, 0x20))
SERVER_IDENTITY_SEED = bytes(range(0x20, 0x40))
CLIENT_EPHEMERAL_SECRET = bytes(range(0x40, 0x60))
SERVER_EPHEMERAL_SECRET = bytes(range(0x60, 0x80))
USER = "alice"
# Settings() defaults, advertised by both sides.
WINDOW = 256 * 1024
MAX_RECORD = 1 << 20
MAX_STREAMS = 256
REQUEST = ("GET", "/hello_world")
RESPONSE = (200, b"Hello World!")

RECORD_KEY = bytes(range(0x80, 0xA0))

# The RSA handshake (handshake_rsa.json): RSA-2048 identities on both sides, made once
# with a random generator and fixed here; PSS salts and ephemerals fixed too.
RSA_E = 65537
CLIENT_RSA_P = int(
    "e00a6b11b087b1ec9faec5873c8da633af7921ca7594445718d426b68d64f44c51fd7ff91a7be9c08cff66"
    "40707a5897c2bbd78cfabe8dfdf114fda99f32ad8084b9de061eada201f522beae51d9d47f6a3d12fafdcf"
    "5fcb3130d546f0b8f555ec415bc5fef58fa048c1f04f3f3301f7ae663aa6a71f86e5d1656cbd0bc91337", 16)
CLIENT_RSA_Q = int(
    "d3a309a4fc97e79e55ad0cb9cfc8e5bfa9ee669fd1914544cdfd8e434d1d62a5b6893cd3519ae76c4162ce"
    "437c6cda6919d8f051e166de6be4cb4ba13fa0df0a7847c6274adbb228d3d1dbd99ef96bd3149579d37260"
    "4ef4d01444a120c5519f72fd783ee773d60996d2c2ecde14e0a1db199379f29da58952ce30485595efb5", 16)
SERVER_RSA_P = int(
    "dd4f9cb94c699cd93a0b5e2dd753fa6c6da66ccdbbf4c3c1fd4ac1dac88b7535a2fab52c56ef99ef2c6ad0"
    "3bc41c28b2ce8e2ed89fc9659f5b22d65c818cdd4368d51b3d49bb531dd51b78d60aba4b1f5ab97becb380"
    "7a75e9914cd32a78a4aa0c9bc6279cd42220ba3192e8cb2c955e10fd8d4657e2654730aec1e25dc39f93", 16)
SERVER_RSA_Q = int(
    "c5428347b8fe9fba98bbceb5c029f745cf749771b62f59c216ceeb3d573262bfcb1ac891ffbf839550bdb2"
    "776cbfd5c58ab5dea2a89e60c9d34a19a9a7a903570f5e9147410ceba22ecb198d35977774003093f18db8"
    "14370107562b1f54bbc2631318ef04b18b4f2c3b83ff9b085b0d481238e2cc10b0f65de4d9b66f6f5343", 16)
RSA_CLIENT_EPHEMERAL_SECRET = bytes(range(0xA0, 0xC0))
RSA_SERVER_EPHEMERAL_SECRET = bytes(range(0xC0, 0xE0))
CLIENT_PSS_SALT = bytes(range(0xE0, 0x100))
SERVER_PSS_SALT = bytes(range(0xFF, 0xDF, -1))
RSA_USER = "bob"
# The server announces the minimums of SPEC.md §4.2, the client the defaults.
MIN_SETTINGS = {"window": 65536, "max_record": 16384, "max_streams": 16}
RSA_REQUEST = ("GET", "/_node/ping")
RSA_RESPONSE = (200, b"pong")
PSS_SALT_LEN = 32

# The rekey vectors (rekey.json): one PING and its PONG at the boundary of the
# application keys of each handshake.
REKEY_OPAQUE = bytes(range(8))


# =====================================================================================
# Independent derivation (SPEC.md §2, §3, §4, §5)
# =====================================================================================

def lp(data: bytes) -> bytes:
    """SPEC.md §2: ``u32be(len(data)) || data``."""
    return struct.pack(">I", len(data)) + data


def sha256(data: bytes) -> bytes:
    return hashlib.sha256(data).digest()


def hkdf(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """RFC 5869 HKDF-SHA256 spelled out (SPEC.md §3.1)."""
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    okm, block, i = b"", b"", 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes((i,)), hashlib.sha256).digest()
        okm += block
        i += 1
    return okm[:length]


def next_key(key: bytes) -> bytes:
    """SPEC.md §5.3."""
    return hkdf(key, b"", REKEY_INFO, 32)


def nonce(counter: int) -> bytes:
    """SPEC.md §5.2: four zero bytes then the 64-bit big-endian counter."""
    return bytes(4) + counter.to_bytes(8, "big")


def seal(key: bytes, counter: int, plaintext: bytes) -> bytes:
    """SPEC.md §5.1: ``u32be(n) || ChaCha20-Poly1305(key, nonce(counter), aad=u32be(n))``."""
    header = struct.pack(">I", len(plaintext) + TAG_LEN)
    return header + ChaCha20Poly1305(key).encrypt(nonce(counter), plaintext, header)


def open_record(key: bytes, counter: int, record: bytes) -> bytes:
    header, body = record[:4], record[4:]
    if struct.unpack(">I", header)[0] != len(body):
        raise ValueError("record length prefix does not match")
    return ChaCha20Poly1305(key).decrypt(nonce(counter), body, header)


def mp(obj) -> bytes:
    """msgpack with the bin type for bytes and the shortest encodings (SPEC.md §6.1)."""
    return msgpack.packb(obj, use_bin_type=True)


def batch(*encoded: bytes) -> bytes:
    """A record plaintext: msgpack array header, then the encoded messages (SPEC.md §5.4)."""
    n = len(encoded)
    if n < 16:
        head = bytes((0x90 | n,))
    elif n < 65536:
        head = b"\xdc" + struct.pack(">H", n)
    else:
        head = b"\xdd" + struct.pack(">I", n)
    return head + b"".join(encoded)


def ed25519_key(seed: bytes) -> ed25519.Ed25519PrivateKey:
    return ed25519.Ed25519PrivateKey.from_private_bytes(seed)


def spki_der(key) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.DER,
                                         serialization.PublicFormat.SubjectPublicKeyInfo)


def mgf1(seed: bytes, length: int) -> bytes:
    """RFC 8017 B.2.1 with SHA-256."""
    out, i = b"", 0
    while len(out) < length:
        out += sha256(seed + i.to_bytes(4, "big"))
        i += 1
    return out[:length]


def pss_encode(message: bytes, salt: bytes, mod_bits: int) -> bytes:
    """RFC 8017 9.1.1 EMSA-PSS-ENCODE, SHA-256 and MGF1-SHA-256 (SPEC.md §3.3)."""
    em_bits = mod_bits - 1
    em_len = (em_bits + 7) // 8
    m_hash = sha256(message)
    h = sha256(bytes(8) + m_hash + salt)
    db = bytes(em_len - len(salt) - 32 - 2) + b"\x01" + salt
    masked = bytearray(a ^ b for a, b in zip(db, mgf1(h, em_len - 32 - 1)))
    masked[0] &= 0xFF >> (8 * em_len - em_bits)
    return bytes(masked) + h + b"\xbc"


class RsaIdentity:
    """An RSA identity from its primes; signs with a given PSS salt (RSASP1 spelled out)."""

    def __init__(self, p: int, q: int, e: int):
        self.n, self.e = p * q, e
        self.d = pow(e, -1, (p - 1) * (q - 1))
        self.public = rsa.RSAPublicNumbers(e, self.n).public_key()
        self.bits = self.n.bit_length()
        self.der = self.public.public_bytes(serialization.Encoding.DER,
                                            serialization.PublicFormat.SubjectPublicKeyInfo)

    def sign(self, message: bytes, salt: bytes) -> tuple[bytes, bytes]:
        """(encoded message EM, signature EM^d mod n)."""
        em = pss_encode(message, salt, self.bits)
        sig = pow(int.from_bytes(em, "big"), self.d, self.n)
        return em, sig.to_bytes((self.bits + 7) // 8, "big")

    def verify(self, signature: bytes, message: bytes) -> None:
        self.public.verify(signature, message,
                           padding.PSS(padding.MGF1(hashes.SHA256()), PSS_SALT_LEN),
                           hashes.SHA256())


class Identity:
    """One side's identity from the vector inputs: Ed25519 (a seed) or RSA (primes)."""

    def __init__(self, inputs: dict, side: str):
        self.side = side
        if f"{side}_identity_seed" in inputs:
            self.kind = "ed25519"
            self._ed = ed25519_key(bytes.fromhex(inputs[f"{side}_identity_seed"]))
            self.der = spki_der(self._ed)
        else:
            k = inputs[f"{side}_identity_rsa"]
            self.kind = "rsa"
            self._rsa = RsaIdentity(int(k["p"], 16), int(k["q"], 16), k["e"])
            self.salt = bytes.fromhex(inputs[f"{side}_pss_salt"])
            self.der = self._rsa.der

    def sign(self, message: bytes) -> tuple[bytes, bytes | None]:
        """(signature, the PSS-encoded message for RSA or None), verified before return."""
        if self.kind == "ed25519":
            sig, em = self._ed.sign(message), None
            self._ed.public_key().verify(sig, message)
        else:
            em, sig = self._rsa.sign(message, self.salt)
            self._rsa.verify(sig, message)
        return sig, em


def fingerprint(der: bytes) -> str:
    import base64
    return "SHA256:" + base64.b64encode(sha256(der)).decode().rstrip("=")


def x25519_public(secret: bytes) -> bytes:
    return x25519.X25519PrivateKey.from_private_bytes(secret).public_key().public_bytes_raw()


def x25519_shared(secret: bytes, peer_public: bytes) -> bytes:
    return x25519.X25519PrivateKey.from_private_bytes(secret).exchange(
        x25519.X25519PublicKey.from_public_bytes(peer_public))


def derive_handshake(inputs: dict) -> dict:
    """Every value of the example session of SPEC.md Appendix A, from SPEC.md alone.

    ``inputs`` holds hex strings (the "inputs" object of handshake_ed25519.json).
    Returns a dict of hex strings: derived values, message plaintexts and wire records.
    """
    h = bytes.fromhex
    c_id, s_id = Identity(inputs, "client"), Identity(inputs, "server")
    c_eph = h(inputs["client_ephemeral_secret"])
    s_eph = h(inputs["server_ephemeral_secret"])
    user = inputs["user"].encode("utf-8")
    cs, ss = inputs["client_settings"], inputs["server_settings"]
    method, path = inputs["request"]["method"], inputs["request"]["path"]
    status, body = inputs["response"]["status"], h(inputs["response"]["body"])

    c_der, s_der = c_id.der, s_id.der
    c_eph_pub, s_eph_pub = x25519_public(c_eph), x25519_public(s_eph)
    shared = x25519_shared(c_eph, s_eph_pub)
    assert shared == x25519_shared(s_eph, c_eph_pub)

    # §4.1 messages 1 and 2: clear frames
    client_hello = mp({"t": T_CLIENT_HELLO, "v": PROTOCOL_VERSION, "e": c_eph_pub,
                       "w": cs["window"], "r": cs["max_record"], "n": cs["max_streams"]})
    server_hello = mp({"t": T_SERVER_HELLO, "v": PROTOCOL_VERSION, "e": s_eph_pub,
                       "w": ss["window"], "r": ss["max_record"], "n": ss["max_streams"]})
    transcript = PROLOGUE + lp(client_hello) + lp(server_hello)
    th_hellos = sha256(transcript)
    hs = hkdf(shared, th_hellos, HS_INFO, 64)
    c_hs, s_hs = hs[:32], hs[32:]

    # §4.4 ServerAuth
    server_sig_hash = sha256(transcript + lp(s_der))
    server_signed = SERVER_SIG_CONTEXT + server_sig_hash
    server_sig, server_em = s_id.sign(server_signed)
    server_auth = batch(mp({"t": T_SERVER_AUTH, "k": s_der, "s": server_sig}))
    transcript += lp(server_auth)

    # §4.5 ClientAuth
    client_sig_hash = sha256(transcript + lp(user))
    client_signed = CLIENT_SIG_CONTEXT + client_sig_hash
    client_sig, client_em = c_id.sign(client_signed)
    client_auth = batch(mp({"t": T_CLIENT_AUTH, "u": inputs["user"], "s": client_sig}))
    transcript += lp(client_auth)
    th_auth = sha256(transcript)
    ap = hkdf(shared, th_auth, AP_INFO, 64)
    c_ap, s_ap = ap[:32], ap[32:]

    # application messages (§4.7, §6)
    request = batch(mp({"t": T_REQUEST, "i": 1, "m": method, "p": path}))
    server_finished = batch(mp({"t": T_SERVER_FINISHED}))
    response = batch(mp({"t": T_RESPONSE, "i": 1, "s": status, "b": body}))
    close = batch(mp({"t": T_CLOSE, "s": 200}))

    def rec(name, key_name, key, counter, plaintext):
        return {"name": name, "kind": "record", "key": key_name, "counter": counter,
                "nonce": nonce(counter).hex(), "plaintext": plaintext.hex(),
                "wire": seal(key, counter, plaintext).hex()}

    def clear(name, payload):
        return {"name": name, "kind": "clear", "plaintext": payload.hex(),
                "wire": lp(payload).hex()}

    flights = [
        {"from": "client", "frames": [clear("ClientHello", client_hello)]},
        {"from": "server", "frames": [clear("ServerHello", server_hello),
                                      rec("ServerAuth", "server_handshake_key", s_hs, 0,
                                          server_auth)]},
        {"from": "client", "frames": [rec("ClientAuth", "client_handshake_key", c_hs, 0,
                                          client_auth),
                                      rec("Request (0.5-RTT)", "client_application_key",
                                          c_ap, 0, request)]},
        {"from": "server", "frames": [rec("ServerFinished", "server_handshake_key", s_hs, 1,
                                          server_finished)]},
        {"from": "server", "frames": [rec("Response", "server_application_key", s_ap, 0,
                                          response)]},
        {"from": "client", "frames": [rec("Close", "client_application_key", c_ap, 1,
                                          close)]},
    ]
    for fl in flights:
        fl["data"] = "".join(fr["wire"] for fr in fl["frames"])

    rsa_keys = {}
    for side, ident in (("client", c_id), ("server", s_id)):
        if ident.kind == "rsa":
            rsa_keys[f"{side}_identity_rsa_n"] = f"{ident._rsa.n:x}"
            rsa_keys[f"{side}_identity_rsa_d"] = f"{ident._rsa.d:x}"
    derived = {
        **rsa_keys,
        "client_identity_public_der": c_der.hex(),
        "client_identity_fingerprint": fingerprint(c_der),
        "server_identity_public_der": s_der.hex(),
        "server_identity_fingerprint": fingerprint(s_der),
        "client_ephemeral_public": c_eph_pub.hex(),
        "server_ephemeral_public": s_eph_pub.hex(),
        "shared_secret": shared.hex(),
        "transcript_hash_hellos": th_hellos.hex(),
        "client_handshake_key": c_hs.hex(),
        "server_handshake_key": s_hs.hex(),
        "server_signature_hash": server_sig_hash.hex(),
        "server_signed_message": server_signed.hex(),
        **({"server_pss_encoded": server_em.hex()} if server_em else {}),
        "server_signature": server_sig.hex(),
        "client_signature_hash": client_sig_hash.hex(),
        "client_signed_message": client_signed.hex(),
        **({"client_pss_encoded": client_em.hex()} if client_em else {}),
        "client_signature": client_sig.hex(),
        "transcript_hash_auth": th_auth.hex(),
        "client_application_key": c_ap.hex(),
        "server_application_key": s_ap.hex(),
        "transcript_input": transcript.hex(),
    }
    return {"derived": derived, "flights": flights}


def handshake_inputs() -> dict:
    settings = {"window": WINDOW, "max_record": MAX_RECORD, "max_streams": MAX_STREAMS}
    return {
        "client_identity_seed": CLIENT_IDENTITY_SEED.hex(),
        "server_identity_seed": SERVER_IDENTITY_SEED.hex(),
        "client_ephemeral_secret": CLIENT_EPHEMERAL_SECRET.hex(),
        "server_ephemeral_secret": SERVER_EPHEMERAL_SECRET.hex(),
        "user": USER,
        "client_settings": dict(settings),
        "server_settings": dict(settings),
        "request": {"method": REQUEST[0], "path": REQUEST[1]},
        "response": {"status": RESPONSE[0], "body": RESPONSE[1].hex()},
        "now": 0.0,
    }


def rsa_handshake_inputs() -> dict:
    def key(p, q):
        return {"p": f"{p:x}", "q": f"{q:x}", "e": RSA_E}
    return {
        "client_identity_rsa": key(CLIENT_RSA_P, CLIENT_RSA_Q),
        "server_identity_rsa": key(SERVER_RSA_P, SERVER_RSA_Q),
        "client_pss_salt": CLIENT_PSS_SALT.hex(),
        "server_pss_salt": SERVER_PSS_SALT.hex(),
        "client_ephemeral_secret": RSA_CLIENT_EPHEMERAL_SECRET.hex(),
        "server_ephemeral_secret": RSA_SERVER_EPHEMERAL_SECRET.hex(),
        "user": RSA_USER,
        "client_settings": {"window": WINDOW, "max_record": MAX_RECORD,
                            "max_streams": MAX_STREAMS},
        "server_settings": dict(MIN_SETTINGS),
        "request": {"method": RSA_REQUEST[0], "path": RSA_REQUEST[1]},
        "response": {"status": RSA_RESPONSE[0], "body": RSA_RESPONSE[1].hex()},
        "now": 0.0,
    }


# ------------------------------------------------------------------------ record vectors

def record_sequences() -> list[dict]:
    """Plaintexts sealed in order under RECORD_KEY, with and without a rekey."""
    plaintexts = [
        batch(mp({"t": T_PING})),
        batch(mp({"t": T_DATA, "i": 1, "b": b"hello", "f": False})),
        batch(mp({"t": T_DATA, "i": 1, "b": b"world", "f": True}),
              mp({"t": T_WINDOW, "i": 2, "n": 65536})),
        batch(mp({"t": T_RESPONSE, "i": 2, "s": 200, "b": b"ok"})),
        batch(mp({"t": T_CLOSE, "s": 200})),
    ]
    out = []
    for name, rekey_after, count in (("default", REKEY_AFTER, 3), ("rekey_after_2", 2, 5)):
        key, counter, epoch, records = RECORD_KEY, 0, 0, []
        for pt in plaintexts[:count]:
            records.append({"epoch": epoch, "counter": counter, "key": key.hex(),
                            "nonce": nonce(counter).hex(),
                            "aad": struct.pack(">I", len(pt) + TAG_LEN).hex(),
                            "plaintext": pt.hex(), "record": seal(key, counter, pt).hex()})
            counter += 1
            if counter >= rekey_after:
                key, counter, epoch = next_key(key), 0, epoch + 1
        out.append({"name": name, "rekey_after": rekey_after, "initial_key": RECORD_KEY.hex(),
                    "records": records})
    return out


# ------------------------------------------------------------------------ rekey vectors

def rekey_directions(handshake: dict) -> list[dict]:
    """The implicit rekey (SPEC.md §5.3) of both application keys of ``handshake``.

    Per direction: the last record under the key of epoch 0 (counter REKEY_AFTER - 1),
    the key of epoch 1, and the first record under it (counter 0).  The client sends a
    PING, the server the PONG, the same plaintext on both sides of the boundary.
    """
    d = handshake["derived"]
    out = []
    for side, msg in (("client", {"t": T_PING, "o": REKEY_OPAQUE}),
                      ("server", {"t": T_PONG, "o": REKEY_OPAQUE})):
        key0 = bytes.fromhex(d[f"{side}_application_key"])
        key1 = next_key(key0)
        pt = batch(mp(msg))
        records = []
        for epoch, key, counter in ((0, key0, REKEY_AFTER - 1), (1, key1, 0)):
            records.append({"epoch": epoch, "counter": counter, "key": key.hex(),
                            "nonce": nonce(counter).hex(), "plaintext": pt.hex(),
                            "record": seal(key, counter, pt).hex()})
        out.append({"from": side, "key": f"{side}_application_key", "initial_key": key0.hex(),
                    "next_key": key1.hex(), "records": records})
    return out


# ------------------------------------------------------------------------ message vectors

def _tag(value):
    """JSON form of a field value: bytes become {"$hex": ...}, recursively."""
    if isinstance(value, bytes):
        return {"$hex": value.hex()}
    if isinstance(value, dict):
        return {k: _tag(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_tag(v) for v in value]
    return value


def untag(value):
    if isinstance(value, dict):
        if set(value) == {"$hex"}:
            return bytes.fromhex(value["$hex"])
        return {k: untag(v) for k, v in value.items()}
    if isinstance(value, list):
        return [untag(v) for v in value]
    return value


ENVELOPE = {
    "id": bytes(range(0xC0, 0xD0)),
    "user": "alice",
    "path": ["SHA256:" + "A" * 43],
    "hops": 7,
    "deadline": 1700000000.5,
}

# (vector name, message class name, fields (attribute names), the wire map written by hand
# in the key order of SPEC.md §6.5)
MESSAGE_CASES = [
    ("request_minimal", "Request", {"stream_id": 1, "method": "GET", "path": "/hello_world"},
     {"t": 1, "i": 1, "m": "GET", "p": "/hello_world"}),
    ("request_full", "Request",
     {"stream_id": 3, "method": "POST", "path": "/files/upload", "token": "ut1_" + "x" * 43,
      "args": {"name": "a.txt", "sizes": [1, 2, {"deep": True}]},
      "headers": {"content-type": "text/plain", "n": 5}, "body": b"first chunk",
      "end": False, "envelope": None},
     {"t": 1, "i": 3, "m": "POST", "p": "/files/upload", "k": "ut1_" + "x" * 43,
      "a": {"name": "a.txt", "sizes": [1, 2, {"deep": True}]},
      "h": {"content-type": "text/plain", "n": 5}, "b": b"first chunk", "f": False}),
    ("request_forwarded", "Request",
     {"stream_id": 2, "method": "GET", "path": "/hello_world/sub", "token": None,
      "args": None, "headers": {}, "body": b"", "end": True, "envelope": ENVELOPE},
     {"t": 1, "i": 2, "m": "GET", "p": "/hello_world/sub", "e": ENVELOPE}),
    ("response_minimal", "Response", {"stream_id": 1, "status": 200, "body": b"Hello World!"},
     {"t": 2, "i": 1, "s": 200, "b": b"Hello World!"}),
    ("response_empty_streaming", "Response",
     {"stream_id": 1, "status": 200, "body": b"", "end": False},
     {"t": 2, "i": 1, "s": 200, "b": b"", "f": False}),
    ("response_headers", "Response",
     {"stream_id": 5, "status": 404, "headers": {"error": "not found"}, "body": b"",
      "end": True},
     {"t": 2, "i": 5, "s": 404, "h": {"error": "not found"}}),
    ("data", "Data", {"stream_id": 1, "body": b"chunk", "end": False},
     {"t": 3, "i": 1, "b": b"chunk", "f": False}),
    ("data_end", "Data", {"stream_id": 1, "body": b"", "end": True},
     {"t": 3, "i": 1, "b": b"", "f": True}),
    ("window", "Window", {"stream_id": 1, "credit": 65536},
     {"t": 4, "i": 1, "n": 65536}),
    ("reset", "Reset", {"stream_id": 7, "status": 499, "reason": "cancelled by user"},
     {"t": 5, "i": 7, "s": 499, "r": "cancelled by user"}),
    ("reset_no_reason", "Reset", {"stream_id": 2, "status": 503},
     {"t": 5, "i": 2, "s": 503}),
    ("ping_empty", "Ping", {}, {"t": 6}),
    ("ping", "Ping", {"opaque": bytes(range(8))}, {"t": 6, "o": bytes(range(8))}),
    ("pong", "Pong", {"opaque": bytes(range(8))}, {"t": 7, "o": bytes(range(8))}),
    ("goaway", "GoAway", {"last_stream_id": 41, "reason": "shutting down"},
     {"t": 8, "i": 41, "r": "shutting down"}),
    ("close_ok", "Close", {"status": 200}, {"t": 9, "s": 200}),
    ("close_error", "Close", {"status": 400, "reason": "record failed authentication"},
     {"t": 9, "s": 400, "r": "record failed authentication"}),
    ("client_hello", "ClientHello",
     {"version": 1, "ephemeral": bytes(range(32)), "window": WINDOW, "max_record": MAX_RECORD,
      "max_streams": MAX_STREAMS},
     {"t": 16, "v": 1, "e": bytes(range(32)), "w": WINDOW, "r": MAX_RECORD,
      "n": MAX_STREAMS}),
    ("server_hello", "ServerHello",
     {"version": 1, "ephemeral": bytes(range(32, 64)), "window": 65536, "max_record": 16384,
      "max_streams": 16},
     {"t": 17, "v": 1, "e": bytes(range(32, 64)), "w": 65536, "r": 16384, "n": 16}),
    ("server_auth", "ServerAuth",
     {"public_key": bytes(44), "signature": bytes(64)},
     {"t": 18, "k": bytes(44), "s": bytes(64)}),
    ("client_auth", "ClientAuth", {"user": "alice", "signature": bytes(64)},
     {"t": 19, "u": "alice", "s": bytes(64)}),
    ("server_finished", "ServerFinished", {}, {"t": 20}),
]

# Record plaintexts a receiver must refuse with DecodeError (SPEC.md §6.1, §6.4).
# "known_bug" marks cases the reference implementation accepts today (see SPEC.md
# Appendix B.4); tests/test_vectors.py expects them to fail as xfail.
_OK = mp({"t": 6})


def _raw_str(s: bytes) -> bytes:
    return bytes((0xA0 | len(s),)) + s


INVALID_CASES = [
    ("not_an_array", mp({"t": 6}), None),
    ("empty_array", b"\x90", None),
    ("trailing_bytes", batch(_OK) + b"\xc0", None),
    ("ext_type", b"\x91\x83" + _raw_str(b"t") + b"\x03" + _raw_str(b"i") + b"\x01" +
     _raw_str(b"b") + b"\xd4\x01\x00", None),
    ("integer_map_key", b"\x91\x82" + _raw_str(b"t") + b"\x06" + b"\x01\x02", None),
    ("bytes_map_key", b"\x91\x81\xc4\x01t\x06", None),
    ("unknown_field", batch(mp({"t": 6, "x": 1})), None),
    ("unknown_type", batch(mp({"t": 99})), None),
    ("missing_type", batch(mp({"i": 1})), None),
    ("missing_required_field", batch(mp({"t": 4, "i": 1})), None),
    ("invalid_utf8", b"\x91\x82" + _raw_str(b"t") + b"\x05" + b"\xa1\xff", None),
    ("stream_id_negative", batch(mp({"t": 3, "i": -1, "b": b""})), None),
    ("stream_id_too_large", batch(mp({"t": 3, "i": 1 << 53, "b": b""})), None),
    ("stream_id_not_int", batch(mp({"t": 3, "i": "1", "b": b""})), None),
    ("body_as_string", batch(mp({"t": 3, "i": 1, "b": "text"})), None),
    ("end_as_int", batch(mp({"t": 3, "i": 1, "b": b"", "f": 1})), None),
    ("status_too_large", batch(mp({"t": 2, "i": 1, "s": 1000})), None),
    ("path_without_slash", batch(mp({"t": 1, "i": 1, "m": "GET", "p": "hello"})), None),
    ("method_not_letters", batch(mp({"t": 1, "i": 1, "m": "GET2", "p": "/"})), None),
    ("method_too_long", batch(mp({"t": 1, "i": 1, "m": "A" * 17, "p": "/"})), None),
    ("token_not_ascii", batch(mp({"t": 1, "i": 1, "m": "GET", "p": "/", "k": "\u00e9"})), None),
    ("args_too_deep", batch(mp({"t": 1, "i": 1, "m": "GET", "p": "/",
                                "a": {"x": [[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]}})), None),
    ("header_value_not_scalar", batch(mp({"t": 1, "i": 1, "m": "GET", "p": "/",
                                          "h": {"x": [1]}})), None),
    ("too_many_headers", batch(mp({"t": 1, "i": 1, "m": "GET", "p": "/",
                                   "h": {str(i): i for i in range(65)}})), None),
    ("ping_opaque_too_long", batch(mp({"t": 6, "o": bytes(65)})), None),
    ("window_credit_too_large", batch(mp({"t": 4, "i": 1, "n": 1 << 31})), None),
    ("string_length_beyond_input", b"\x91\x81\xa1t\xdb\xff\xff\xff\xff", None),
    ("header_bytes_key", batch(mp({"t": 1, "i": 1, "m": "GET", "p": "/", "h": {b"x": 1}})),
     None),
    ("type_as_float", batch(mp({"t": 3.0, "i": 1, "b": b"x"})), None),
]
INVALID_CASES = [(n, bytes(b), bug) for n, b, bug in INVALID_CASES]


# =====================================================================================
# The reference implementation, run on the same inputs
# =====================================================================================

def _import_protocol():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    import protocol  # noqa: F401
    return protocol


def split_frames(data: bytes) -> list[bytes]:
    out, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack_from(">I", data, pos)
        out.append(data[pos:pos + 4 + n])
        pos += 4 + n
    return out


def run_connection(inputs: dict, aead_backend: str | None = None) -> dict:
    """Run the reference Connection pair on ``inputs``; return the flights and events."""
    _import_protocol()
    from protocol import Settings

    c_id, s_id = reference_identity(inputs, "client"), reference_identity(inputs, "server")

    def settings(d):
        return Settings(window=d["window"], max_record=d["max_record"],
                        max_streams=d["max_streams"], aead_backend=aead_backend)

    now = inputs["now"]
    with fixed_pss_salts(inputs):
        return _run_pair(inputs, c_id, s_id, settings, now)


def _run_pair(inputs, c_id, s_id, settings, now) -> dict:
    from protocol import (AuthenticationRequested, ConnectionClosed, Connection,
                          HandshakeCompleted, RequestReceived, ResponseReceived, Role)
    h = bytes.fromhex
    client = Connection(Role.CLIENT, identity=c_id, user=inputs["user"],
                        server_key=s_id.public, settings=settings(inputs["client_settings"]),
                        ephemeral_secret=h(inputs["client_ephemeral_secret"]))
    server = Connection(Role.SERVER, identity=s_id,
                        settings=settings(inputs["server_settings"]),
                        ephemeral_secret=h(inputs["server_ephemeral_secret"]))
    flights: list[tuple[str, bytes]] = []
    events: dict[str, list] = {"client": [], "server": []}

    client.initiate(now)
    server.initiate(now)
    # queued before the handshake: leaves right behind ClientAuth (SPEC.md §4.7)
    sid = client.send_request(inputs["request"]["method"], inputs["request"]["path"])
    assert sid == 1
    flights.append(("client", client.data_to_send()))                 # ClientHello
    events["server"] += server.receive_data(flights[-1][1])
    flights.append(("server", server.data_to_send()))                 # ServerHello+Auth
    events["client"] += client.receive_data(flights[-1][1])
    flights.append(("client", client.data_to_send()))                 # ClientAuth+Request
    ev = server.receive_data(flights[-1][1])
    assert ev == [AuthenticationRequested(inputs["user"])], ev
    events["server"] += ev
    ev = server.complete_auth(c_id.public)
    events["server"] += ev
    assert isinstance(ev[0], HandshakeCompleted) and ev[0].peer_user == inputs["user"]
    assert isinstance(ev[1], RequestReceived) and ev[1].path == inputs["request"]["path"]
    flights.append(("server", server.data_to_send()))                 # ServerFinished
    events["client"] += client.receive_data(flights[-1][1])
    assert client.established
    server.send_response(sid, inputs["response"]["status"], body=h(inputs["response"]["body"]))
    flights.append(("server", server.data_to_send()))                 # Response
    ev = client.receive_data(flights[-1][1])
    events["client"] += ev
    assert ev == [ResponseReceived(sid, inputs["response"]["status"], {},
                                   h(inputs["response"]["body"]), True)], ev
    client.close()
    flights.append(("client", client.data_to_send()))                 # Close
    ev = server.receive_data(flights[-1][1])
    events["server"] += ev
    assert ev == [ConnectionClosed(200, "")], ev
    return {"flights": flights, "events": events,
            "client_public_der": c_id.public.der, "server_public_der": s_id.public.der,
            "server_fingerprint": s_id.public.fingerprint(),
            "client_fingerprint": c_id.public.fingerprint()}


def reference_identity(inputs: dict, side: str):
    """The reference's ``PrivateKey`` for one side of the vector inputs."""
    _import_protocol()
    from Crypto.PublicKey import ECC, RSA

    from protocol import PrivateKey
    if f"{side}_identity_seed" in inputs:
        seed = bytes.fromhex(inputs[f"{side}_identity_seed"])
        return PrivateKey(ECC.construct(curve="ed25519", seed=seed))
    k = inputs[f"{side}_identity_rsa"]
    p, q, e = int(k["p"], 16), int(k["q"], 16), k["e"]
    return PrivateKey(RSA.construct((p * q, e, pow(e, -1, (p - 1) * (q - 1)), p, q)))


@contextlib.contextmanager
def fixed_pss_salts(inputs: dict):
    """Give the reference's RSA-PSS the inputs' salts instead of random ones.

    ``protocol.crypto`` signs with pycryptodome's ``pss.new(key, salt_bytes=...)``; for
    the duration, that ``pss`` is a shim adding ``rand_func`` (pycryptodome's own hook
    for the salt), which returns the salt of the signing key's side.  Nothing else of the
    reference changes.
    """
    _import_protocol()
    import protocol.crypto as pc
    salts = {}
    for side in ("client", "server"):
        if f"{side}_pss_salt" in inputs:
            k = inputs[f"{side}_identity_rsa"]
            salts[int(k["p"], 16) * int(k["q"], 16)] = bytes.fromhex(inputs[f"{side}_pss_salt"])
    if not salts:
        yield
        return
    real = pc.pss

    class _Shim:
        @staticmethod
        def new(key, **kw):
            salt = salts[key.n]

            def rand(n: int) -> bytes:
                assert n == len(salt), n
                return salt
            return real.new(key, rand_func=rand, **kw)

    pc.pss = _Shim
    try:
        yield
    finally:
        pc.pss = real


def reference_rekey(direction: dict, aead_backend: str | None = None) -> list[bytes]:
    """The reference Sealer and Opener across the rekey boundary of ``direction``."""
    _import_protocol()
    from protocol.record import REKEY_AFTER as REF_REKEY_AFTER
    from protocol.record import Opener, Sealer
    assert REF_REKEY_AFTER == REKEY_AFTER
    key = bytes.fromhex(direction["initial_key"])
    sealer = Sealer(key, aead_backend, REKEY_AFTER)
    opener = Opener(key, aead_backend, REKEY_AFTER)
    # Skip to the last record of epoch 0 (sealing 2^20 - 1 records first would take
    # seconds for nothing: the key and counter are the whole state).
    sealer.counter = opener.counter = REKEY_AFTER - 1
    out = []
    for r in direction["records"]:
        assert (sealer.epoch, sealer.counter) == (r["epoch"], r["counter"])
        wire = sealer.seal(bytes.fromhex(r["plaintext"]))
        assert opener.open(wire[:4], wire[4:]).hex() == r["plaintext"]
        out.append(wire)
    assert sealer.key.hex() == direction["next_key"] == opener.key.hex()
    return out


def reference_records(seq: dict, aead_backend: str | None = None) -> list[bytes]:
    _import_protocol()
    from protocol.record import Opener, Sealer
    key = bytes.fromhex(seq["initial_key"])
    sealer = Sealer(key, aead_backend, seq["rekey_after"])
    opener = Opener(key, aead_backend, seq["rekey_after"])
    out = []
    for r in seq["records"]:
        wire = sealer.seal(bytes.fromhex(r["plaintext"]))
        assert opener.open(wire[:4], wire[4:]) == bytes.fromhex(r["plaintext"])
        out.append(wire)
    return out


def reference_message(cls_name: str, fields: dict):
    _import_protocol()
    from protocol import messages
    return getattr(messages, cls_name)(**untag(fields))


# =====================================================================================
# Build, cross-check, write
# =====================================================================================

def _backends() -> list[str]:
    _import_protocol()
    from protocol.crypto import aead_backends
    return sorted(aead_backends())


def build_handshake(inputs: dict | None = None, description: str | None = None) -> dict:
    inputs = inputs or handshake_inputs()
    indep = derive_handshake(inputs)
    for backend in _backends():
        ref = run_connection(inputs, backend)
        got = [(who, data.hex()) for who, data in ref["flights"]]
        want = [(fl["from"], fl["data"]) for fl in indep["flights"]]
        if got != want:
            for i, (g, w) in enumerate(zip(got, want)):
                if g != w:
                    raise SystemExit(f"[{backend}] flight {i} differs:\n ref   {g}\n indep {w}")
            raise SystemExit(f"[{backend}] flight count differs")
        d = indep["derived"]
        assert ref["server_public_der"].hex() == d["server_identity_public_der"]
        assert ref["client_public_der"].hex() == d["client_identity_public_der"]
        assert ref["server_fingerprint"] == d["server_identity_fingerprint"]
        assert ref["client_fingerprint"] == d["client_identity_fingerprint"]
    return {
        "description": description or (
            "utesla/1 handshake with Ed25519 identities on both sides, one "
            "0.5-RTT request (GET /hello_world), its response and a CLOSE. "
            "See SPEC.md Appendix A and B.1."),
        "protocol": {"version": PROTOCOL_VERSION, "prologue": PROLOGUE.hex(),
                     "server_signature_context": SERVER_SIG_CONTEXT.hex(),
                     "client_signature_context": CLIENT_SIG_CONTEXT.hex(),
                     "handshake_info": HS_INFO.hex(), "application_info": AP_INFO.hex()},
        "inputs": inputs,
        "derived": indep["derived"],
        "flights": indep["flights"],
    }


def build_rsa_handshake() -> dict:
    return build_handshake(rsa_handshake_inputs(), (
        "utesla/1 handshake with RSA-2048 identities on both sides (RSASSA-PSS, SHA-256, "
        "32-byte salts fixed in the inputs), the server announcing the minimum settings, "
        "one 0.5-RTT request (GET /_node/ping), its response and a CLOSE. "
        "See SPEC.md Appendix B.4."))


def build_rekey() -> dict:
    handshakes = []
    for fname, build in (("handshake_ed25519.json", build_handshake),
                         ("handshake_rsa.json", build_rsa_handshake)):
        directions = rekey_directions(build())
        for backend in _backends():
            for d in directions:
                got = [w.hex() for w in reference_rekey(d, backend)]
                if got != [r["record"] for r in d["records"]]:
                    raise SystemExit(f"[{backend}] rekey of {fname} {d['from']} differs")
        handshakes.append({"handshake": fname, "directions": directions})
    return {
        "description": "The implicit rekey (SPEC.md §5.3) of the application keys of both "
                       "handshakes: per direction, the record with counter 2^20 - 1 under "
                       "the key of epoch 0 (the key of the handshake file), the key of "
                       "epoch 1 = HKDF-SHA256(ikm=key, salt='', info='utesla/1 rekey', "
                       "L=32), and the record with counter 0 under it.  See SPEC.md "
                       "Appendix B.5.",
        "rekey_after": REKEY_AFTER,
        "rekey_info": REKEY_INFO.hex(),
        "handshakes": handshakes,
    }


def build_records() -> dict:
    seqs = record_sequences()
    for backend in _backends():
        for seq in seqs:
            got = [w.hex() for w in reference_records(seq, backend)]
            want = [r["record"] for r in seq["records"]]
            if got != want:
                raise SystemExit(f"[{backend}] record sequence {seq['name']} differs")
    return {
        "description": "Sealed records (SPEC.md §5) under fixed keys; nonce = 4 zero bytes || "
                       "u64be(counter); aad = the 4-byte length prefix; record = aad || "
                       "ciphertext || tag.  After rekey_after records the key becomes "
                       "HKDF-SHA256(ikm=key, salt='', info='utesla/1 rekey', L=32) and the "
                       "counter restarts at 0.  See SPEC.md Appendix B.2.",
        "rekey_info": REKEY_INFO.hex(),
        "sequences": seqs,
    }


def build_messages() -> dict:
    _import_protocol()
    from protocol import messages
    valid = []
    for name, cls_name, fields, wire_map in MESSAGE_CASES:
        indep = mp(wire_map)
        ref = messages.encode(reference_message(cls_name, _tag(fields)))
        if ref != indep:
            raise SystemExit(f"message {name}: reference {ref.hex()} != independent "
                             f"{indep.hex()}")
        valid.append({"name": name, "message": cls_name, "type": wire_map["t"],
                      "fields": _tag(fields), "encoded": indep.hex()})
    invalid = [{"name": n, "record_plaintext": b.hex(),
                **({"known_bug": bug} if bug else {})} for n, b, bug in INVALID_CASES]
    return {
        "description": "Encoded messages (SPEC.md §6) in the reference encoder's canonical "
                       "form (§6.5); byte values in 'fields' are written {\"$hex\": ...}. "
                       "'invalid' lists record plaintexts (§5.4) a receiver must refuse with "
                       "a DecodeError (connection closed, CLOSE 400).  See SPEC.md Appendix "
                       "B.3.",
        "valid": valid,
        "invalid": invalid,
    }


FILES = {
    "handshake_ed25519.json": build_handshake,
    "record.json": build_records,
    "messages.json": build_messages,
    "handshake_rsa.json": build_rsa_handshake,
    "rekey.json": build_rekey,
}


def render(obj) -> str:
    return json.dumps(obj, indent=2, ensure_ascii=False) + "\n"


# =====================================================================================
# SPEC.md Appendix B: the vectors in hex, in the order a reader checks them
# =====================================================================================

SPEC = ROOT / "SPEC.md"
#: Each generated block of SPEC.md sits between these two lines (``{name}``: the block).
BLOCK_BEGIN = "<!-- BEGIN vectors:{name} (generated by tests/vectors/make_vectors.py from " \
              "tests/vectors/{files}; do not edit) -->"
BLOCK_END = "<!-- END vectors:{name} -->"
HEX_LINE = 32          # bytes per line of hex


class _Block:
    """Lines of one fenced block: ``# comments``, ``label (N bytes)`` + indented hex,
    and ``label = text``.  tests/test_vectors.py parses the same format back."""

    def __init__(self):
        self.lines: list[str] = []

    def note(self, *text: str) -> None:
        if self.lines:
            self.lines.append("")
        self.lines += [f"# {t}" if t else "#" for t in text]

    def hex(self, label: str, value: str | bytes) -> None:
        data = bytes.fromhex(value) if isinstance(value, str) else value
        self.lines.append(f"{label} ({len(data)} bytes)")
        h = data.hex()
        step = 2 * HEX_LINE
        self.lines += ["    " + h[i:i + step] for i in range(0, len(h), step)] or ["    "]

    def text(self, label: str, value: str) -> None:
        self.lines.append(f"{label} = {value}")

    def render(self) -> str:
        return "```text\n" + "\n".join(self.lines) + "\n```"


def _int_bytes(hex_int: str) -> bytes:
    n = int(hex_int, 16)
    return n.to_bytes((n.bit_length() + 7) // 8, "big")


def _settings(d: dict) -> str:
    return f"w {d['window']}, r {d['max_record']}, n {d['max_streams']}"


def _frame_label(name: str) -> str:
    return name.split(" ")[0]          # "Request (0.5-RTT)" -> "Request"


def render_handshake(hs: dict) -> str:
    """Every value of one handshake file, in protocol order."""
    i, d = hs["inputs"], hs["derived"]
    frames = {_frame_label(fr["name"]): fr for fl in hs["flights"] for fr in fl["frames"]}
    rsa_sides = [side for side in ("client", "server") if f"{side}_identity_rsa" in i]
    b = _Block()

    b.note("Inputs",
           "lp(x) = u32be(len(x)) || x;  PROLOGUE = \"utesla protocol 1\";  a record frame is",
           "lp(ChaCha20-Poly1305(key, nonce = 0x00000000 || u64be(counter), aad = its own",
           "u32be length, plaintext)); a flight is its frames written back to back.")
    for side in ("client", "server"):
        if side in rsa_sides:
            k = i[f"{side}_identity_rsa"]
            b.hex(f"{side}_identity_rsa_p", _int_bytes(k["p"]))
            b.hex(f"{side}_identity_rsa_q", _int_bytes(k["q"]))
            b.text(f"{side}_identity_rsa_e", str(k["e"]))
            b.hex(f"{side}_pss_salt", i[f"{side}_pss_salt"])
        else:
            b.hex(f"{side}_identity_seed", i[f"{side}_identity_seed"])
    b.hex("client_ephemeral_secret", i["client_ephemeral_secret"])
    b.hex("server_ephemeral_secret", i["server_ephemeral_secret"])
    b.text("user", json.dumps(i["user"]))
    b.text("client_settings", _settings(i["client_settings"]))
    b.text("server_settings", _settings(i["server_settings"]))
    req, resp = i["request"], i["response"]
    b.text("request", f"{req['method']} {req['path']}, stream 1, queued before the handshake")
    b.text("response", f"{resp['status']}, body "
                       f"{json.dumps(bytes.fromhex(resp['body']).decode('ascii'))}")

    b.note("Identity keys (3.3, 3.4): DER SubjectPublicKeyInfo, fingerprint")
    for side in ("client", "server"):
        if side in rsa_sides:
            b.note(f"{side}: n = p * q; d = e^-1 mod (p - 1)(q - 1) (any valid d signs alike)")
            b.hex(f"{side}_identity_rsa_n", _int_bytes(d[f"{side}_identity_rsa_n"]))
            b.hex(f"{side}_identity_rsa_d", _int_bytes(d[f"{side}_identity_rsa_d"]))
        b.hex(f"{side}_identity_public_der", d[f"{side}_identity_public_der"])
        b.text(f"{side}_identity_fingerprint", d[f"{side}_identity_fingerprint"])

    b.note("Ephemeral keys (3.2); shared = X25519(client secret, server public)",
           "                              = X25519(server secret, client public)")
    b.hex("client_ephemeral_public", d["client_ephemeral_public"])
    b.hex("server_ephemeral_public", d["server_ephemeral_public"])
    b.hex("shared_secret", d["shared_secret"])

    def frame(label: str, what: str, flight: str = "") -> None:
        fr = frames[label]
        head = [flight] if flight else []
        if fr["kind"] == "clear":
            b.note(*head, f"{label}: {what}; clear frame = lp(payload)")
            b.hex(f"{label}.payload", fr["plaintext"])
        else:
            b.note(*head, f"{label}: {what}",
                   f"    sealed under {fr['key']}, counter {fr['counter']}")
            b.hex(f"{label}.plaintext", fr["plaintext"])
            b.hex(f"{label}.nonce", fr["nonce"])
        b.hex(f"{label}.frame", fr["wire"])

    frame("ClientHello", "{t: 16, v: 1, e, w, r, n} (4.2)", "Flight 1, client")
    frame("ServerHello", "{t: 17, v: 1, e, w, r, n} (4.2)",
          "Flight 2, server: ServerHello, ServerAuth")
    b.note("Handshake keys (4.3)",
           "transcript_hash_hellos",
           "    = SHA256(PROLOGUE || lp(ClientHello.payload) || lp(ServerHello.payload))",
           "client_handshake_key || server_handshake_key",
           "    = HKDF(shared_secret, transcript_hash_hellos, \"utesla/1 handshake keys\", 64)")
    b.hex("transcript_hash_hellos", d["transcript_hash_hellos"])
    b.hex("client_handshake_key", d["client_handshake_key"])
    b.hex("server_handshake_key", d["server_handshake_key"])

    def signature(side: str, last: str) -> None:
        ctx = f"utesla/1 {side} signature\\x00"
        b.note(f"{side.capitalize()} signature ({'4.4' if side == 'server' else '4.5'})",
               f"{side}_signature_hash = SHA256(PROLOGUE || lp(ClientHello.payload)",
               f"    || lp(ServerHello.payload) || {last})",
               f"{side}_signed_message = \"{ctx}\" || {side}_signature_hash")
        b.hex(f"{side}_signature_hash", d[f"{side}_signature_hash"])
        b.hex(f"{side}_signed_message", d[f"{side}_signed_message"])
        if f"{side}_pss_encoded" in d:
            b.note(f"RSASSA-PSS: EM = EMSA-PSS-ENCODE({side}_signed_message, salt = "
                   f"{side}_pss_salt);", f"{side}_signature = EM^d mod n")
            b.hex(f"{side}_pss_encoded", d[f"{side}_pss_encoded"])
        else:
            b.note(f"Ed25519 (RFC 8032) of {side}_signed_message")
        b.hex(f"{side}_signature", d[f"{side}_signature"])

    signature("server", "lp(server_identity_public_der)")
    frame("ServerAuth", "[{t: 18, k: server_identity_public_der, s: server_signature}]")
    b.note("Flight 3, client: ClientAuth, then the 0.5-RTT request")
    signature("client", "lp(ServerAuth.plaintext) || lp(user)")
    frame("ClientAuth", "[{t: 19, u: user, s: client_signature}]")
    b.note("Application keys (4.3)",
           "transcript_input = PROLOGUE || lp(ClientHello.payload) || lp(ServerHello.payload)",
           "                   || lp(ServerAuth.plaintext) || lp(ClientAuth.plaintext)",
           "transcript_hash_auth = SHA256(transcript_input)",
           "client_application_key || server_application_key",
           "    = HKDF(shared_secret, transcript_hash_auth, \"utesla/1 application keys\", 64)")
    b.hex("transcript_input", d["transcript_input"])
    b.hex("transcript_hash_auth", d["transcript_hash_auth"])
    b.hex("client_application_key", d["client_application_key"])
    b.hex("server_application_key", d["server_application_key"])
    frame("Request", "[REQUEST {t: 1, i: 1, m, p}], the client's first application record")
    frame("ServerFinished", "[{t: 20}]", "Flight 4, server")
    frame("Response", "[RESPONSE {t: 2, i: 1, s, b}], the server's first application record",
          "Flight 5, server")
    frame("Close", "[CLOSE {t: 9, s: 200}]", "Flight 6, client")
    return b.render()


def render_rekey(rk: dict) -> str:
    b = _Block()
    for hs in rk["handshakes"]:
        for direction in hs["directions"]:
            side = direction["from"]
            label = f"{hs['handshake'].removesuffix('.json')}.{side}"
            b.note(f"{hs['handshake']}: {direction['key']} (epoch 0) and the key after it",
                   "epoch 1 key = HKDF(ikm = epoch 0 key, salt = \"\", "
                   "\"utesla/1 rekey\", 32)")
            b.hex(f"{label}.epoch0_key", direction["initial_key"])
            b.hex(f"{label}.epoch1_key", direction["next_key"])
            for r in direction["records"]:
                rl = f"{label}.e{r['epoch']}c{r['counter']}"
                b.note(f"{'PING' if side == 'client' else 'PONG'} sealed under the key of "
                       f"epoch {r['epoch']}, counter {r['counter']}")
                b.hex(f"{rl}.plaintext", r["plaintext"])
                b.hex(f"{rl}.nonce", r["nonce"])
                b.hex(f"{rl}.frame", r["record"])
    return b.render()


def render_records(rec: dict) -> str:
    b = _Block()
    for seq in rec["sequences"]:
        b.note(f"sequence {seq['name']}: rekey_after = {seq['rekey_after']}")
        b.hex(f"{seq['name']}.initial_key", seq["initial_key"])
        for r in seq["records"]:
            rl = f"{seq['name']}.e{r['epoch']}c{r['counter']}"
            if r["epoch"] and r["counter"] == 0:
                b.note(f"key of epoch {r['epoch']} = HKDF(ikm = key of epoch "
                       f"{r['epoch'] - 1}, salt = \"\", \"utesla/1 rekey\", 32)")
                b.hex(f"{rl}.key", r["key"])
            b.hex(f"{rl}.plaintext", r["plaintext"])
            b.hex(f"{rl}.nonce", r["nonce"])
            b.hex(f"{rl}.frame", r["record"])
    return b.render()


#: block name -> (vector files it shows, renderer taking their parsed JSON)
BLOCKS = {
    "handshake_ed25519": (("handshake_ed25519.json",), render_handshake),
    "record": (("record.json",), render_records),
    "handshake_rsa": (("handshake_rsa.json",), render_handshake),
    "rekey": (("rekey.json",), render_rekey),
}


def render_blocks(folder: Path = HERE) -> dict[str, str]:
    """Each generated block of SPEC.md, markers included, from the JSON files in ``folder``."""
    out = {}
    for name, (files, fn) in BLOCKS.items():
        objs = [json.loads((folder / f).read_text()) for f in files]
        out[name] = "\n".join((BLOCK_BEGIN.format(name=name, files=", ".join(files)),
                               fn(*objs), BLOCK_END.format(name=name)))
    return out


def spec_blocks(text: str) -> dict[str, str]:
    """The generated blocks as they stand in SPEC.md's ``text``, markers included."""
    out = {}
    for name, (files, _fn) in BLOCKS.items():
        begin = BLOCK_BEGIN.format(name=name, files=", ".join(files))
        end = BLOCK_END.format(name=name)
        a = text.find(begin)
        z = text.find(end, a)
        if a < 0 or z < 0:
            raise ValueError(f"SPEC.md has no generated block {name!r}")
        out[name] = text[a:z + len(end)]
    return out


def update_spec(text: str, folder: Path = HERE) -> str:
    """``text`` with every generated block replaced by a fresh rendering."""
    for name, block in render_blocks(folder).items():
        text = text.replace(spec_blocks(text)[name], block)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--check", action="store_true",
                    help="do not write; exit 1 when a file is missing or would change")
    ap.add_argument("--out", type=Path, default=HERE, help="output folder (default: here)")
    args = ap.parse_args(argv)
    status = 0
    for fname, build in FILES.items():
        text = render(build())
        path = args.out / fname
        if args.check:
            if not path.exists() or path.read_text() != text:
                print(f"{path}: out of date")
                status = 1
            else:
                print(f"{path}: ok")
        else:
            path.write_text(text)
            print(f"wrote {path}")
    # SPEC.md Appendix B, rendered from the files just written (or checked).
    spec = SPEC.read_text()
    fresh = update_spec(spec, args.out)
    if args.check:
        print(f"{SPEC}: {'ok' if fresh == spec else 'Appendix B out of date'}")
        status |= fresh != spec
    elif args.out == HERE:
        if fresh != spec:
            SPEC.write_text(fresh)
        print(f"{'wrote' if fresh != spec else 'unchanged'} {SPEC} (Appendix B)")
    return status


if __name__ == "__main__":
    sys.exit(main())
