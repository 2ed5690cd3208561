"""Token checks per second on each storage backend, and the cost of one password check.

    python bench/bench_storage.py                    # 3 rounds, 3 s per token workload: ~1 min
    python bench/bench_storage.py --rounds 1 --duration 5 --backends sqlite

What is measured (one process; the event loop is uvloop when importable, as in utesla-node):

* **Token checks**: ``Authority.check_token`` on a live token -- what a node does for every
  request whose token is not in its cache (``get_token`` + ``get_user``, scopes, expiry).
  Called directly, so the node's token cache (``token_cache_ttl``) is *not* in the way.
  Sequentially (one task, back to back: checks/s and p50/p99 latency) and from 32 concurrent
  tasks (checks/s), for ``--duration`` seconds each.
* **Password checks**: ``Authority.check_password`` against a hash made at the production
  scrypt cost (ln=15, r=8, p=1: 32 MiB per run): median wall and CPU time of ``--runs``
  sequential checks, then 8 concurrent checks: their wall time, checks/s and the largest
  number of scrypt runs seen in flight at once (the semaphore allows 2).

Backends: SQLite in a temporary file (WAL, as the node opens it), and MariaDB in a database
created for the run and dropped after it, on the server at ``UTESLA_TEST_MYSQL_URL``
(default ``mysql://root@127.0.0.1:3306/``).  An unreachable MariaDB is reported and skipped.
Output: markdown tables on standard output: medians of ``--rounds`` rounds (the backends
interleaved) with their spread, (max - min) / median.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from protocol.crypto import PrivateKey  # noqa: E402
from utesla_node import auth  # noqa: E402
from utesla_node.storage import User, open_storage  # noqa: E402

MYSQL_URL = os.environ.get("UTESLA_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/")
PASSWORD = "correct horse battery staple"
SERVICE = "hello_world"
now = time.perf_counter


# --------------------------------------------------------------------------- backends

class MariaDB:
    """A database created for this run on the test server, dropped by ``drop()``."""

    def __init__(self, url: str):
        import pymysql

        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 3306
        self.user = unquote(parts.username or "root")
        self.password = unquote(parts.password or "")
        self.admin = pymysql.connect(host=self.host, port=self.port, user=self.user,
                                     password=self.password, autocommit=True,
                                     connect_timeout=5)
        self.database = f"utesla_bench_{secrets.token_hex(4)}"
        with self.admin.cursor() as cur:
            cur.execute("SELECT VERSION()")
            self.version = cur.fetchone()[0]
            cur.execute(f"CREATE DATABASE `{self.database}` CHARACTER SET utf8mb4")

    def storage(self):
        from utesla_node.storage.mariadb import MariaDBStorage

        return MariaDBStorage(host=self.host, port=self.port, user=self.user,
                              password=self.password, database=self.database)

    def drop(self) -> None:
        with self.admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{self.database}`")
        self.admin.close()


# --------------------------------------------------------------------------- workloads

async def token_checks_sequential(authority: auth.Authority, token: str,
                                  duration: float) -> dict:
    lat: list[float] = []
    end = now() + duration
    t0 = now()
    while True:
        a = now()
        if a >= end:
            break
        await authority.check_token(token, "alice", SERVICE)
        lat.append(now() - a)
    elapsed = now() - t0
    lat.sort()
    return {"n": len(lat), "rate": len(lat) / elapsed,
            "p50_us": lat[len(lat) // 2] * 1e6, "p99_us": lat[int(len(lat) * 0.99)] * 1e6}


async def token_checks_concurrent(authority: auth.Authority, token: str, duration: float,
                                  tasks: int) -> dict:
    end = now() + duration
    counts = [0] * tasks

    async def worker(i: int) -> None:
        while now() < end:
            await authority.check_token(token, "alice", SERVICE)
            counts[i] += 1

    t0 = now()
    await asyncio.gather(*(worker(i) for i in range(tasks)))
    elapsed = now() - t0
    return {"n": sum(counts), "rate": sum(counts) / elapsed}


class ScryptProbe:
    """Wraps the scrypt function auth calls, to see how many runs overlap."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.active = 0
        self.peak = 0
        self.real = auth._scrypt

    def __enter__(self) -> "ScryptProbe":
        def probe(*args, **kwargs):
            with self.lock:
                self.active += 1
                self.peak = max(self.peak, self.active)
            try:
                return self.real(*args, **kwargs)
            finally:
                with self.lock:
                    self.active -= 1

        auth._scrypt = probe
        return self

    def __exit__(self, *exc) -> None:
        auth._scrypt = self.real


async def password_checks(authority: auth.Authority, runs: int, concurrent: int) -> dict:
    await authority.check_password("alice", PASSWORD)            # warm-up (executor, pages)
    walls, cpus = [], []
    for _ in range(runs):
        w, c = now(), time.process_time()   # process CPU: scrypt runs on an executor thread
        await authority.check_password("alice", PASSWORD)
        walls.append(now() - w)
        cpus.append(time.process_time() - c)
    with ScryptProbe() as probe:
        t0 = now()
        await asyncio.gather(*(authority.check_password("alice", PASSWORD)
                               for _ in range(concurrent)))
        wall = now() - t0
    return {"wall_ms": statistics.median(walls) * 1e3, "cpu_ms": statistics.median(cpus) * 1e3,
            "conc_wall_s": wall, "conc_rate": concurrent / wall, "peak": probe.peak}


async def prepare(storage, password_hash: str) -> tuple[auth.Authority, str]:
    """Open ``storage``, register alice (production-cost hash) and issue her a live token."""
    await storage.open()
    key = PrivateKey.generate("ed25519").public.to_pem()
    await storage.add_user(User(name="alice", password_hash=password_hash, public_key=key,
                                token_limit=0, created_at=time.time()), overwrite=True)
    authority = auth.Authority(storage)
    token, _ = await authority.issue_token("alice")
    for _ in range(200):                                          # warm-up
        await authority.check_token(token, "alice", SERVICE)
    return authority, token


async def main_async(args) -> list[dict]:
    auth.set_scrypt_cost(15)                                      # the production default
    password_hash = await auth.hash_password(PASSWORD)
    assert password_hash.startswith("scrypt$ln=15$"), password_hash
    backends: list[tuple[str, object]] = []
    cleanup = []
    if "sqlite" in args.backends:
        tmp = tempfile.TemporaryDirectory(prefix="utesla-bench-")
        cleanup.append(tmp.cleanup)
        backends.append((f"SQLite {sqlite3.sqlite_version} (WAL, file)",
                         open_storage("", Path(tmp.name) / "data")))
    if "mariadb" in args.backends:
        try:
            db = MariaDB(MYSQL_URL)
        except Exception as exc:  # noqa: BLE001 - report and go on
            print(f"# MariaDB skipped: unreachable at {MYSQL_URL}: {exc}", file=sys.stderr)
        else:
            cleanup.append(db.drop)
            backends.append((f"MariaDB {db.version.split('-')[0]} (aiomysql, pool 10, "
                             "loopback TCP)", db.storage()))
    results: list[dict] = []
    try:
        prepared = [(name, store, *await prepare(store, password_hash))
                    for name, store in backends]
        runs: dict[str, list[dict]] = {name: [] for name, _ in backends}
        # Rounds interleave the backends, so a burst of load elsewhere on the machine does
        # not land on one backend only; the table shows medians and their spread.
        for _ in range(args.rounds):
            for name, _store, authority, token in prepared:
                runs[name].append({
                    "seq": await token_checks_sequential(authority, token, args.duration),
                    "conc": await token_checks_concurrent(authority, token, args.duration,
                                                          args.tasks),
                    "pw": await password_checks(authority, args.runs,
                                                args.concurrent_passwords),
                })
        for name, _ in backends:
            results.append({"backend": name, "runs": runs[name]})
    finally:
        for _name, store in backends:
            await store.close()
        for fn in cleanup:
            fn()
    return results


def med(runs: list[dict], part: str, key: str) -> tuple[float, float]:
    """Median over the rounds and the spread (max - min) / median."""
    values = [r[part][key] for r in runs]
    m = statistics.median(values)
    return m, ((max(values) - min(values)) / m if m else 0.0)


def table(results: list[dict], args) -> str:
    def cell(runs, part, key, fmt):
        m, spread = med(runs, part, key)
        return f"{format(m, fmt)} ({spread:.0%})" if args.rounds > 1 else format(m, fmt)

    lines = [
        f"Token checks: `Authority.check_token` on a live token, no node cache; "
        f"{args.duration:g} s per workload; median of {args.rounds} rounds "
        "((max - min) / median).",
        "",
        f"| backend | sequential checks/s | p50 µs | p99 µs | {args.tasks} tasks checks/s |",
        "|---|---:|---:|---:|---:|",
    ]
    for r in results:
        runs = r["runs"]
        lines.append(f"| {r['backend']} | {cell(runs, 'seq', 'rate', ',.0f')} | "
                     f"{cell(runs, 'seq', 'p50_us', ',.0f')} | "
                     f"{cell(runs, 'seq', 'p99_us', ',.0f')} | "
                     f"{cell(runs, 'conc', 'rate', ',.0f')} |")
    lines += [
        "",
        f"Password checks: `Authority.check_password`, scrypt ln=15 r=8 p=1; per round the "
        f"median of {args.runs} sequential runs, then {args.concurrent_passwords} at once "
        f"(semaphore: {auth._HASH_CONCURRENCY}); median of {args.rounds} rounds.",
        "",
        f"| backend | wall ms | CPU ms | {args.concurrent_passwords} concurrent: "
        "wall s | checks/s | peak scrypt in flight |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        runs = r["runs"]
        peak = max(run["pw"]["peak"] for run in runs)
        lines.append(f"| {r['backend']} | {cell(runs, 'pw', 'wall_ms', '.1f')} | "
                     f"{cell(runs, 'pw', 'cpu_ms', '.1f')} | "
                     f"{cell(runs, 'pw', 'conc_wall_s', '.2f')} | "
                     f"{cell(runs, 'pw', 'conc_rate', '.1f')} | {peak} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--duration", type=float, default=3.0, help="seconds per token workload")
    ap.add_argument("--rounds", type=int, default=3, help="rounds, backends interleaved")
    ap.add_argument("--tasks", type=int, default=32, help="concurrent token-check tasks")
    ap.add_argument("--runs", type=int, default=10, help="sequential password checks")
    ap.add_argument("--concurrent-passwords", type=int, default=8)
    ap.add_argument("--backends", default="sqlite,mariadb",
                    help="comma-separated: sqlite, mariadb")
    ap.add_argument("--no-uvloop", action="store_true")
    args = ap.parse_args()
    args.backends = {b.strip() for b in args.backends.split(",") if b.strip()}

    runner = asyncio.run
    loop_name = "asyncio"
    if not args.no_uvloop:
        try:
            import uvloop

            runner, loop_name = uvloop.run, "uvloop"
        except ImportError:
            pass
    load = os.getloadavg()
    print(f"# python {sys.version.split()[0]}, {loop_name}, {os.cpu_count()} CPUs, "
          f"load average {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}", file=sys.stderr)
    results = runner(main_async(args))
    print(table(results, args))


if __name__ == "__main__":
    main()
