"""Blocking work in services: other requests' latency while a service hashes 200 MB.

    python bench/bench_workers.py                  # 3 phases of 6 s each, about 30 s
    python bench/bench_workers.py --seconds 10 --mb 400

A node (its own process, uvloop, ``[server] worker_processes = 2``) serves
``/hello_world`` and ``/hash``, which SHA-256es ``--mb`` MiB (200 by default) either
in the node's process pool (``await self.run_in_process(...)``), in a worker thread,
or right on the event loop (what a handler without the API does).  This process runs
``--clients`` connections sending ``GET /hello_world`` back to back, and one more
connection asking for hashes one after another, and reports the hello latencies of
each phase:

    idle      no hashing: the floor
    process   hashing in the process pool          (issue 14: p99 under 50 ms)
    thread    hashing in a worker thread (hashlib releases the GIL on big buffers)
    loop      hashing on the event loop: every request waits for the hash

Bounded: each phase lasts ``--seconds``; at most one hash runs at a time.  Nothing is
asserted: this is a measurement (DESIGN.md §5), printed as a table and written to
bench/results/workers-<time>.md.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

HASH_SERVICE = '''
import hashlib

BLOCK = bytes(range(256)) * 4096          # 1 MiB


def digest(mib):
    h = hashlib.sha256()
    for _ in range(mib):
        h.update(BLOCK)
    return h.hexdigest()


class Handler:
    async def get(self):
        mib = min(int(self.args.get("mb", 200)), 4096)
        where = self.args.get("where", "process")
        if where == "process":
            await self.write(await self.run_in_process(digest, mib))
        elif where == "thread":
            await self.write(await self.run_in_thread(digest, mib))
        else:
            await self.write(digest(mib))
'''


# --------------------------------------------------------------------------- the node

async def serve(folder: Path, processes: int) -> None:
    from _nodesetup import start_node, use_uvloop  # noqa: F401 (policy set by caller)
    services = folder / "complements"
    services.mkdir(parents=True, exist_ok=True)
    (services / "hash.py").write_text(HASH_SERVICE)
    node, info = await start_node(folder, worker_processes=processes,
                                  loop_block_threshold=0.1)
    print(json.dumps(info), flush=True)
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.read)      # until the parent closes stdin
    page = await node.prometheus()
    lag = [line for line in page.splitlines() if line.startswith(("utesla_loop_lag_seconds_count",
                                                                  "utesla_loop_blocked"))]
    print(json.dumps({"metrics": lag}), flush=True)
    await node.stop("bench over")


# --------------------------------------------------------------------------- the client

async def phase(new_client, where: str | None, seconds: float, clients: int,
                mib: int) -> dict:
    latencies: list[float] = []
    hashes: list[float] = []
    stop = time.monotonic() + seconds
    conns = [new_client() for _ in range(clients)]
    hasher = new_client(timeout=600)
    for c in (*conns, hasher):
        await c.connect()
        await c.get("/hello_world")                       # warm

    async def hello(c) -> None:
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            await c.get("/hello_world")
            latencies.append(time.perf_counter() - t0)

    async def hash_loop() -> None:
        while time.monotonic() < stop:
            t0 = time.perf_counter()
            await hasher.get("/hash", args={"where": where, "mb": mib})
            hashes.append(time.perf_counter() - t0)

    tasks = [hello(c) for c in conns]
    if where is not None:
        tasks.append(hash_loop())
    await asyncio.gather(*tasks)
    for c in (*conns, hasher):
        await c.close()
    lat = sorted(latencies)
    q = statistics.quantiles(lat, n=100) if len(lat) >= 100 else [float("nan")] * 99
    return {"phase": where or "idle", "requests": len(lat),
            "p50_ms": round(statistics.median(lat) * 1000, 2),
            "p99_ms": round(q[98] * 1000, 2), "max_ms": round(lat[-1] * 1000, 2),
            "hashes": len(hashes),
            "hash_s": round(statistics.median(hashes), 2) if hashes else None}


async def main(args) -> None:
    from _nodesetup import client_factory
    with tempfile.TemporaryDirectory(prefix="utesla-bench-workers-") as tmp:
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", tmp, "--processes", str(args.processes)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        try:
            info = json.loads(server.stdout.readline())
            factory = client_factory(info)
            results = []
            for where in (None, "process", "thread", "loop"):
                if where and where not in args.phases:
                    continue
                r = await phase(lambda **kw: factory_with(factory, info, kw), where,
                                args.seconds, args.clients, args.mb)
                print(json.dumps(r), flush=True)
                results.append(r)
        finally:
            server.stdin.close()
            tail = server.stdout.read()
            server.wait(30)
    lines = [f"# bench_workers: hello latency while /hash SHA-256es {args.mb} MiB",
             "", f"{os.cpu_count()} CPUs, {args.clients} hello connections, "
             f"{args.seconds:g} s per phase, node with {args.processes} worker processes", "",
             "| phase | requests | p50 ms | p99 ms | max ms | hashes | s per hash |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['phase']} | {r['requests']} | {r['p50_ms']} | {r['p99_ms']} | "
                     f"{r['max_ms']} | {r['hashes']} | {r['hash_s']} |")
    for line in tail.splitlines():
        try:
            lines += ["", "node: " + ", ".join(json.loads(line)["metrics"])]
        except (ValueError, KeyError):
            pass
    text = "\n".join(lines) + "\n"
    print(text)
    out = HERE / "results" / time.strftime("workers-%Y%m%d-%H%M%S.md")
    out.parent.mkdir(exist_ok=True)
    out.write_text(text)


def factory_with(factory, info, kw):
    """A client from ``factory``, with per-client keyword arguments (the hasher's timeout)."""
    if not kw:
        return factory()
    from _nodesetup import client_factory
    return client_factory(info, **kw)()


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=6.0)
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--mb", type=int, default=200)
    ap.add_argument("--processes", type=int, default=2)
    ap.add_argument("--phases", nargs="*", default=["process", "thread", "loop"])
    ap.add_argument("--serve", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    from _nodesetup import use_uvloop
    use_uvloop()
    if a.serve:
        asyncio.run(serve(Path(a.serve), a.processes))
    else:
        asyncio.run(main(a))
