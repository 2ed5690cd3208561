#!/usr/bin/env python3
"""Micro-benchmark of the sans-IO protocol layer (no sockets, no asyncio).

    .venv/bin/python bench/bench_protocol.py            # full run, well under a minute
    .venv/bin/python bench/bench_protocol.py --quick    # smoke run, a few seconds

Measures, each as the median of ``--runs`` runs (wall time from ``time.perf_counter``,
CPU time from ``time.process_time``):

* handshake CPU per side: each side's own calls are timed separately (Connection
  construction, which draws the ephemeral key, ``initiate``, ``receive_data``,
  ``complete_auth``, ``data_to_send``), for Ed25519 and RSA-3072 identities, both sides
  the same type and mixed;
* one record sealed and opened (``protocol.record.Sealer`` / ``Opener``) for 100 B and
  64 KiB plaintexts, with each AEAD backend;
* an in-memory request/response round trip (GET, 12-byte answer) on an established
  connection, with 1 request in flight and with 64 pipelined (coalesced into few records).

Prints one markdown table per group.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from protocol import Connection, PrivateKey, Role, Settings  # noqa: E402
from protocol.crypto import aead_backends  # noqa: E402
from protocol.record import Opener, Sealer  # noqa: E402

clock_wall = time.perf_counter
clock_cpu = time.process_time


class Timer:
    """Accumulates wall and CPU time over many short sections."""

    __slots__ = ("wall", "cpu", "_w", "_c")

    def __init__(self):
        self.wall = self.cpu = 0.0

    def __enter__(self):
        self._w, self._c = clock_wall(), clock_cpu()
        return self

    def __exit__(self, *exc):
        self.wall += clock_wall() - self._w
        self.cpu += clock_cpu() - self._c


def median_runs(runs: int, fn) -> tuple[float, float]:
    """``fn()`` returns (wall, cpu) per operation; median of each over ``runs`` runs."""
    walls, cpus = [], []
    for _ in range(runs):
        w, c = fn()
        walls.append(w)
        cpus.append(c)
    return statistics.median(walls), statistics.median(cpus)


def fmt_us(seconds: float) -> str:
    us = seconds * 1e6
    if us >= 1000:
        return f"{us / 1000:,.2f} ms"
    return f"{us:,.1f} µs"


# ---------------------------------------------------------------------------- handshake

def handshake_once(client_key: PrivateKey, server_key: PrivateKey, tc: Timer, ts: Timer):
    with tc:
        client = Connection(Role.CLIENT, identity=client_key, user="alice",
                            server_key=server_key.public)
        client.initiate(0.0)
        hello = client.data_to_send()
    with ts:
        server = Connection(Role.SERVER, identity=server_key)
        server.initiate(0.0)
        server.receive_data(hello)
        flight = server.data_to_send()
    with tc:
        client.receive_data(flight)
        auth = client.data_to_send()
    with ts:
        server.receive_data(auth)
        server.complete_auth(client_key.public)
        finished = server.data_to_send()
    with tc:
        client.receive_data(finished)
    if not (client.established and server.established):
        raise RuntimeError("handshake did not complete")


def bench_handshake(client_key, server_key, iterations: int, runs: int):
    handshake_once(client_key, server_key, Timer(), Timer())  # warm up
    results = {"client": ([], []), "server": ([], [])}
    for _ in range(runs):
        tc, ts = Timer(), Timer()
        for _ in range(iterations):
            handshake_once(client_key, server_key, tc, ts)
        for side, t in (("client", tc), ("server", ts)):
            results[side][0].append(t.wall / iterations)
            results[side][1].append(t.cpu / iterations)
    return {side: (statistics.median(w), statistics.median(c))
            for side, (w, c) in results.items()}


# ---------------------------------------------------------------------------- records

def bench_record(backend: str, size: int, iterations: int, runs: int):
    key = os.urandom(32)
    plaintext = os.urandom(size)
    out = {}

    def one_run():
        sealer = Sealer(key, backend, 1 << 20)
        opener = Opener(key, backend, 1 << 20)
        ts, to = Timer(), Timer()
        records = []
        with ts:
            for _ in range(iterations):
                records.append(sealer.seal(plaintext))
        with to:
            for rec in records:
                opener.open(rec[:4], rec[4:])
        return ts, to

    one_run()  # warm up
    seals, opens = ([], []), ([], [])
    for _ in range(runs):
        ts, to = one_run()
        seals[0].append(ts.wall / iterations)
        seals[1].append(ts.cpu / iterations)
        opens[0].append(to.wall / iterations)
        opens[1].append(to.cpu / iterations)
    out["seal"] = (statistics.median(seals[0]), statistics.median(seals[1]))
    out["open"] = (statistics.median(opens[0]), statistics.median(opens[1]))
    return out


# ---------------------------------------------------------------------------- round trip

def established_pair(backend: str | None):
    ck, sk = PrivateKey.generate("ed25519"), PrivateKey.generate("ed25519")
    settings = Settings(aead_backend=backend)
    client = Connection(Role.CLIENT, identity=ck, user="alice", server_key=sk.public,
                        settings=settings)
    server = Connection(Role.SERVER, identity=sk, settings=settings)
    client.initiate(0.0)
    server.initiate(0.0)
    server.receive_data(client.data_to_send())
    client.receive_data(server.data_to_send())
    server.receive_data(client.data_to_send())
    server.complete_auth(ck.public)
    client.receive_data(server.data_to_send())
    return client, server


BODY = b"Hello World!"


def bench_round_trip(backend: str | None, in_flight: int, requests: int, runs: int):
    client, server = established_pair(backend)
    rounds = max(1, requests // in_flight)

    def one_run():
        t = Timer()
        with t:
            for _ in range(rounds):
                for _ in range(in_flight):
                    client.send_request("GET", "/hello_world")
                for ev in server.receive_data(client.data_to_send()):
                    server.send_response(ev.stream_id, 200, body=BODY)
                got = client.receive_data(server.data_to_send())
                if len(got) != in_flight:
                    raise RuntimeError("lost a response")
        n = rounds * in_flight
        return t.wall / n, t.cpu / n

    one_run()  # warm up
    return median_runs(runs, one_run)


# ---------------------------------------------------------------------------- main

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description="utesla protocol micro-benchmark")
    ap.add_argument("--runs", type=int, default=5, help="runs per measurement (median)")
    ap.add_argument("--quick", action="store_true", help="few iterations: a smoke test")
    ap.add_argument("--rsa-bits", type=int, default=3072)
    args = ap.parse_args(argv)
    scale = 0.1 if args.quick else 1.0
    runs = 3 if args.quick else args.runs

    def n(x):
        return max(1, int(x * scale))

    started = clock_wall()
    backends = sorted(aead_backends())
    print(f"# utesla protocol micro-benchmark\n")
    print(f"Python {platform.python_version()} on {platform.machine()}, "
          f"{platform.system()}; AEAD backends: {', '.join(backends)}; "
          f"median of {runs} runs; CPU = process_time, wall = perf_counter.\n")

    ed_c, ed_s = PrivateKey.generate("ed25519"), PrivateKey.generate("ed25519")
    t0 = clock_wall()
    rsa_c = PrivateKey.generate("rsa", args.rsa_bits)
    rsa_s = PrivateKey.generate("rsa", args.rsa_bits)
    rsa_gen = (clock_wall() - t0) / 2
    rsa = f"RSA-{args.rsa_bits}"

    print("## Handshake, per side (each side's own calls only)\n")
    print("| client key | server key | client CPU | server CPU | client wall | server wall |")
    print("|---|---|---:|---:|---:|---:|")
    for cname, ck, sname, sk, iters in (
            ("Ed25519", ed_c, "Ed25519", ed_s, n(400)),
            (rsa, rsa_c, rsa, rsa_s, n(40)),
            ("Ed25519", ed_c, rsa, rsa_s, n(40)),
            (rsa, rsa_c, "Ed25519", ed_s, n(40))):
        r = bench_handshake(ck, sk, iters, runs)
        print(f"| {cname} | {sname} | {fmt_us(r['client'][1])} | {fmt_us(r['server'][1])} "
              f"| {fmt_us(r['client'][0])} | {fmt_us(r['server'][0])} |")
    print(f"\n({rsa} key generation, not part of any handshake: {rsa_gen:.2f} s per key.)\n")

    print("## Records: one seal, one open (protocol.record)\n")
    print("| backend | plaintext | seal CPU | open CPU | seal wall | open wall "
          "| seal+open throughput |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for backend in backends:
        for size, label, iters in ((100, "100 B", n(20000)), (65536, "64 KiB", n(400))):
            if backend == "pycryptodome":
                iters = max(1, iters // 4)
            r = bench_record(backend, size, iters, runs)
            both = r["seal"][0] + r["open"][0]
            mbps = size / both / 1e6
            print(f"| {backend} | {label} | {fmt_us(r['seal'][1])} | {fmt_us(r['open'][1])} "
                  f"| {fmt_us(r['seal'][0])} | {fmt_us(r['open'][0])} | {mbps:,.0f} MB/s |")

    print("\n## In-memory request/response (GET /hello_world, 12-byte body), both sides\n")
    print("| AEAD backend | in flight | CPU per request | wall per request | requests/s |")
    print("|---|---:|---:|---:|---:|")
    for backend in backends:
        for in_flight, total in ((1, n(4000)), (64, n(16000))):
            if backend == "pycryptodome":
                total = max(in_flight, total // 2)
            wall, cpu = bench_round_trip(backend, in_flight, total, runs)
            print(f"| {backend} | {in_flight} | {fmt_us(cpu)} | {fmt_us(wall)} "
                  f"| {1 / wall:,.0f} |")

    print(f"\nTotal benchmark time: {clock_wall() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
