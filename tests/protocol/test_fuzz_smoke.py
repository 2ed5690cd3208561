"""Run the atheris harnesses in fuzz/ without atheris, on random and structured inputs,
so they are exercised (and kept importable) in every CI run; then, only when atheris
is installed, a short real fuzzing run of each."""
from __future__ import annotations

import importlib.util
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from protocol import messages as m
from protocol.frame import frame, pack

ROOT = Path(__file__).resolve().parents[2]
FUZZ = ROOT / "fuzz"
HARNESSES = ["fuzz_frame", "fuzz_handshake"]


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"_utesla_{name}", FUZZ / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SAMPLES = [
    m.Request(1, "GET", "/hello_world", "tok", {"a": [1, {"b": None}]}, {"h": 1.5}, b"body",
              False, {"hops": 3}),
    m.Request(3, "POST", "/", body=b"x" * 40),
    m.Response(1, 200, {}, b"Hello World!", True),
    m.Response(1, 404, {"x": "y"}, b"", False),
    m.Data(1, b"chunk", False), m.Data(3, b"", True),
    m.Window(1, 65536), m.Reset(1, 499, "cancelled"),
    m.Ping(b"12345678"), m.Pong(b""), m.GoAway(7, "bye"), m.Close(200, "done"),
    m.ClientHello(1, bytes(range(32)), 65536, 1 << 20, 256),
    m.ServerHello(1, bytes(range(32)), 65536, 1 << 20, 256),
    m.ServerAuth(b"\x30" * 44, b"s" * 64), m.ClientAuth("alice", b"s" * 64),
    m.ServerFinished(),
]
ENCODED = [m.encode(s) for s in SAMPLES]


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        if op == 0 and b:                                   # flip a bit
            i = rng.randrange(len(b))
            b[i] ^= 1 << rng.randrange(8)
        elif op == 1 and b:                                 # truncate
            del b[rng.randrange(len(b)):]
        elif op == 2:                                       # insert random bytes
            i = rng.randint(0, len(b))
            b[i:i] = rng.randbytes(rng.randint(1, 8))
        elif op == 3 and b:                                 # set an "interesting" byte
            b[rng.randrange(len(b))] = rng.choice([0x00, 0x7f, 0x80, 0xc0, 0xc1, 0xc4, 0xd4,
                                                   0xdc, 0xdd, 0xde, 0xdf, 0xff])
        elif op == 4:                                       # splice another sample
            b += rng.choice(ENCODED)
        else:                                               # duplicate a slice
            if b:
                i = rng.randrange(len(b))
                b += b[i:i + rng.randint(1, 16)]
    return bytes(b)


def _record_plaintext(rng: random.Random) -> bytes:
    items = [m.to_map(rng.choice(SAMPLES)) for _ in range(rng.randint(1, 4))]
    return pack(items)


def _frame_inputs(rng: random.Random, n: int):
    for i in range(n):
        control = rng.randrange(256)
        kind = i % 4
        if kind == 0:
            body = rng.randbytes(rng.randint(0, 200))
        elif kind == 1:   # valid frames of valid messages
            body = b"".join(frame(rng.choice(ENCODED)) for _ in range(rng.randint(1, 4)))
            control &= ~1
        elif kind == 2:   # valid record plaintexts
            body = _record_plaintext(rng)
            control |= 1
        else:             # mutated versions of either
            base = (b"".join(frame(rng.choice(ENCODED)) for _ in range(rng.randint(1, 3)))
                    if rng.random() < 0.5 else _record_plaintext(rng))
            body = _mutate(rng, base)
        yield bytes([control]) + body


def _handshake_inputs(rng: random.Random, n: int, hello: bytes):
    for i in range(n):
        target = i % 8
        step = rng.choice([0, 1, 3, 7, 64, 255])
        if target in (0, 1, 3):
            base = rng.choice([hello, frame(rng.choice(ENCODED)), rng.randbytes(40)])
        else:
            base = _record_plaintext(rng) if rng.random() < 0.7 else pack(
                [m.to_map(rng.choice(SAMPLES))])
        body = base if rng.random() < 0.3 else _mutate(rng, base)
        yield bytes([target, step]) + body


@pytest.fixture(scope="module")
def harnesses():
    return {name: _load(name) for name in HARNESSES}


def test_fuzz_frame_harness_on_random_and_structured_inputs(harnesses):
    one = harnesses["fuzz_frame"].TestOneInput
    rng = random.Random(20_241_126)
    count = 0
    for data in _frame_inputs(rng, 4000):
        one(data)
        count += 1
    for data in (b"", b"\x00", b"\x01\xdd\xff\xff\xff\xff", b"\x00\x00\x00\x00\x00",
                 b"\x01" + b"\x91" * 3000 + b"\xc0"):
        one(data)
    assert count == 4000


def test_fuzz_handshake_harness_on_random_and_structured_inputs(harnesses):
    module = harnesses["fuzz_handshake"]
    client = module._client()
    client.initiate(0.0)
    hello = client.data_to_send()
    rng = random.Random(11_26)
    count = 0
    for data in _handshake_inputs(rng, 1500, hello):
        module.TestOneInput(data)
        count += 1
    for target in range(module.TARGETS):       # the empty input at every stage
        module.TestOneInput(bytes([target, 0]))
    assert count == 1500


def test_fuzz_handshake_harness_reaches_every_stage(harnesses):
    """Sanity check: a valid plaintext at each sealed stage gets past the AEAD."""
    module = harnesses["fuzz_handshake"]
    client, server = module._established()
    assert client.established and server.established
    module.TestOneInput(bytes([2, 0]) + pack([m.to_map(m.ClientAuth("alice", b"s" * 64))]))
    module.TestOneInput(bytes([6, 0]) + pack([m.to_map(m.Ping(b"p"))]))


def _atheris_available() -> bool:
    return importlib.util.find_spec("atheris") is not None


@pytest.mark.skipif(not _atheris_available(),
                    reason="atheris is not installed (optional: pip install '.[fuzz]')")
@pytest.mark.parametrize("name,runs", [("fuzz_frame", 5000), ("fuzz_handshake", 500)])
def test_short_atheris_run(name, runs, tmp_path):
    """A real coverage-guided run, bounded in runs and in time (~10 s at most)."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    module = _load(name)
    for i, seed in enumerate(module.seeds()):
        (corpus / f"seed-{i}").write_bytes(seed)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run(
        [sys.executable, str(FUZZ / f"{name}.py"), f"-atheris_runs={runs}",
         "-max_total_time=10", "-rss_limit_mb=2048", f"-artifact_prefix={tmp_path}/",
         str(corpus)],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=90)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Done" in proc.stderr
    assert not list(tmp_path.glob("crash-*"))
