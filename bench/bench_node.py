"""W1 (1 and 64 in flight on ONE connection) and W2 for utesla-node, with the floor
(and Pyro5, when importable) measured in the same run.  DESIGN.md §5.

    python bench/bench_node.py --quick             # D=2 s, 3 rounds: about 2 min
    python bench/bench_node.py --repeat 5          # D=5 s
    python bench/bench_node.py --profile DIR       # + cProfile of the node per workload
    python bench/bench_node.py --patch what_if.py  # run a file in the node and client
                                                   # processes first (what-if experiments)

The shared harness (../shared/bench/peers, bench/run.sh) has hello-seq and hello-c16
but no way to set the concurrency, hence this script.  Each (peer, workload) gets a
fresh server process pinned to CPU 0; this process (the client) pins itself to CPU 1.

Workloads (a call counts if it starts inside the D-second window, after --warmup):
  w1-1    one connection, 1 request in flight, back to back          req/s, p50/p99
  w1-64   one connection, 64 requests in flight (64 tasks)           req/s, p50/p99
  w2      new connection + handshake + one request + close, in turn  per second

W3 (forwarding) is the peer "forward": the same w1-1 and w1-64, sent to node A, which
has no services and is linked to node B, which has them (as add_network would link it);
every request and answer crosses A.  Both nodes are pinned to CPU 0, like the direct
node, so direct and forwarded runs get the same CPU; "srv CPU" is A's plus B's.  Its
ratio is forward / utesla (direct) of the same run; "added p50" is the difference.

Peers:
  utesla  the node (bench/_nodesetup.py: uvloop, Ed25519 user, token), its Client;
          w1-64 = 64 tasks sharing one Client (64 streams on one connection)
  floor   ../shared/bench/peers/peer_floor.py's server (asyncio streams, u32 length +
          msgpack [id, method, arg], no crypto); w1-64 = 64 tasks pipelining on ONE
          connection through a small multiplexing client here (a reader task matches
          replies to ids); w2 = TCP connect + one call + close (no security)
  pyro5   peer_pyro5.py (w1-1 only: the DESIGN target compares w1-1 with it)
  forward W3: utesla through node A to node B (w1-1 and w1-64 only)

Output: one JSON line per measurement, then markdown tables (medians of the rounds,
(x%) = (max - min) / median) with the ratios and the DESIGN targets; also written to
bench/results/node-<time>.{jsonl,md}.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from _meters import machine_busy, proc_cpu, wait_quiet  # noqa: E402
HELLO = "Hello World!"
now = time.perf_counter
FLAG_OTHER = 15.0  # % of a core used by other processes above which a number is marked †


def find_peers_dir() -> Path | None:
    for p in (os.environ.get("UTESLA_PEERS_DIR"), REPO.parent / "shared" / "bench" / "peers",
              Path("/work/shared/bench/peers")):
        if p and (Path(p) / "peer_floor.py").is_file():
            return Path(p)
    return None


# --------------------------------------------------------------------------- meters

class Meter:
    """CPU of this process (the client) and of the server process(es) ``pids``."""

    def __init__(self, pids: int | list[int]):
        self.pids = [pids] if isinstance(pids, int) else list(pids)

    def _srv(self) -> float:
        return sum(proc_cpu(p) for p in self.pids)

    def start(self):
        self.t, self.m = now(), machine_busy()
        self.c, self.s = time.process_time(), self._srv()
        self.each = [proc_cpu(p) for p in self.pids]

    def stop(self) -> dict:
        dt = now() - self.t
        each = [round(100 * (proc_cpu(p) - s0) / dt, 1) for p, s0 in zip(self.pids, self.each)]
        cli, srv = time.process_time() - self.c, self._srv() - self.s
        pct = lambda x: round(100 * x / dt, 1)
        extra = {"srv_cpu_pct_each": each} if len(each) > 1 else {}
        return {**extra, "cli_cpu_pct": pct(cli), "srv_cpu_pct": pct(srv),
                "other_cpu_pct": pct(max(0.0, machine_busy() - self.m - cli - srv))}


def lat_stats(lat: list[float]) -> dict:
    lat = sorted(lat)
    if not lat:
        return {}
    pick = lambda q: round(lat[min(len(lat) - 1, int(q * len(lat)))] * 1e6, 1)
    return {"p50_us": pick(0.50), "p99_us": pick(0.99)}


async def timed(args, server_pid: int | list[int], n: int, body, conn_for) -> dict:
    """n workers run ``await body(conn)`` back to back; calls starting in [t0, t1) count.
    ``conn_for(i)`` (awaited inside the warm-up) gives worker i its connection, or None."""
    t0 = now() + args.warmup
    t1 = t0 + args.duration
    lats: list[list[float]] = [[] for _ in range(n)]

    async def worker(i):
        c = await conn_for(i)
        lat = lats[i]
        while (s := now()) < t1:
            await body(c)
            if s >= t0:
                lat.append(now() - s)

    meter, cpu = Meter(server_pid), {}

    def sample():  # a thread: wakes on time even while a blocking call (Pyro5) runs
        time.sleep(max(0.0, t0 - now()))
        meter.start()
        time.sleep(max(0.0, t1 - now()))
        cpu.update(meter.stop())

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    await asyncio.gather(*(worker(i) for i in range(n)))
    th.join()
    calls = sum(map(len, lats))
    per_call = lambda pct: round(pct / 100 * args.duration / calls * 1e6, 1) if calls else None
    return {"calls": calls, "per_s": round(calls / args.duration, 1),
            **lat_stats([x for l in lats for x in l]), **cpu,
            "cli_cpu_us_per_call": per_call(cpu["cli_cpu_pct"]),
            "srv_cpu_us_per_call": per_call(cpu["srv_cpu_pct"])}


# --------------------------------------------------------------------------- servers

def serve_utesla(args) -> None:
    """Subprocess entry: the benchmark node; prints its ready line; stops on SIGTERM."""
    sys.path.insert(0, str(HERE))
    from _nodesetup import start_node, use_uvloop

    if args.patch:
        import runpy
        runpy.run_path(args.patch, run_name="bench_patch")
    uv = use_uvloop() if not args.no_uvloop else False
    prof = None
    if args.profile_out:
        import cProfile
        prof = cProfile.Profile()

    async def amain():
        folder = tempfile.mkdtemp(prefix="utesla-bench-", dir=args.workdir)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            node, info = await start_node(folder, log_level=args.node_log_level,
                                          grace_period=1.0, services=not args.no_services)
            import gc             # as utesla-node does once started (cli/node.py)
            gc.collect()
            gc.freeze()
            print(json.dumps({**info, "folder": folder, "uvloop": uv}), flush=True)
            if prof:
                prof.enable()
            await stop.wait()
            if prof:
                prof.disable()
                prof.dump_stats(args.profile_out)
            await node.stop("benchmark over")
        finally:
            import shutil
            shutil.rmtree(folder, ignore_errors=True)

    asyncio.run(amain())


class Server:
    """A server subprocess pinned to CPU 0; ``info`` is its JSON ready line."""

    def __init__(self, cmd: list[str], env: dict | None = None, cwd: str | None = None,
                 cpus: set[int] = frozenset({0})):
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=cwd,
                                     env={**os.environ, **(env or {})},
                                     preexec_fn=lambda: os.sched_setaffinity(0, cpus))
        line = ""
        if select.select([self.proc.stdout], [], [], 30)[0]:
            line = self.proc.stdout.readline().strip()
        if not line:
            self.stop()
            raise RuntimeError(f"server did not start: {' '.join(cmd)}")
        self.info = json.loads(line)
        self.pid = self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


# --------------------------------------------------------------------------- clients

class FloorMux:
    """A floor connection on which many tasks pipeline calls (replies matched by id)."""

    def __init__(self, reader, writer):
        import msgpack
        self.pack, self.unpack = msgpack.packb, msgpack.unpackb
        self.r, self.w, self.mid, self.waiting = reader, writer, 0, {}
        self.task = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def open(cls, port: int) -> "FloorMux":
        r, w = await asyncio.open_connection("127.0.0.1", port)
        return cls(r, w)

    async def _read(self):
        try:
            while True:
                n = int.from_bytes(await self.r.readexactly(4), "big")
                mid, result = self.unpack(await self.r.readexactly(n))
                self.waiting.pop(mid).set_result(result)
        except (asyncio.IncompleteReadError, ConnectionError) as exc:
            for f in self.waiting.values():
                if not f.done():
                    f.set_exception(ConnectionError(str(exc)))

    async def call(self, method: str, arg=None):
        self.mid += 1
        fut = asyncio.get_running_loop().create_future()
        self.waiting[self.mid] = fut
        body = self.pack([self.mid, method, arg])
        self.w.write(len(body).to_bytes(4, "big") + body)
        await self.w.drain()
        return await fut

    async def close(self):
        self.task.cancel()
        self.w.close()
        try:
            await self.w.wait_closed()
        except ConnectionError:
            pass


class UteslaPeer:
    name = "utesla"

    def __init__(self, args):
        self.args = args

    def command(self, tag: str = "", *extra: str) -> list[str]:
        cmd = [sys.executable, str(Path(__file__).resolve()), "serve-utesla",
               "--workdir", self.args.workdir, "--node-log-level", self.args.node_log_level,
               *extra]
        if self.args.no_uvloop:
            cmd.append("--no-uvloop")
        if self.args.patch:
            cmd += ["--patch", self.args.patch]
        if self.args.profile:
            os.makedirs(self.args.profile, exist_ok=True)
            cmd += ["--profile-out", os.path.join(
                self.args.profile, f"{self.name}{tag}-{self._workload}-{int(time.time())}.prof")]
        return cmd

    def start(self) -> Server:
        srv = Server(self.command())
        sys.path.insert(0, str(HERE))
        from _nodesetup import client_factory
        self.new_client = client_factory(srv.info)
        return srv

    async def connect(self):
        c = self.new_client()
        await c.connect()
        return c

    async def hello(self, c) -> str:
        return (await c.get("/hello_world")).text

    async def close(self, c):
        await c.close()

    async def w1(self, srv, n):
        shared = await self.connect()
        try:
            async def body(c):
                assert await self.hello(c) == HELLO

            async def conn(_):
                return shared
            return await timed(self.args, srv.pid, n, body, conn)
        finally:
            await self.close(shared)

    async def w2(self, srv):
        async def body(_):
            c = await self.connect()
            assert await self.hello(c) == HELLO
            await self.close(c)

        async def none(_):
            return None
        return await timed(self.args, srv.pid, 1, body, none)


class Pair:
    """Node B (services) and node A (none, linked to B): stops both; ``pid`` is both."""

    def __init__(self, a: Server, b: Server):
        self.a, self.b = a, b
        self.pid = [a.pid, b.pid]
        self.info = a.info

    def stop(self) -> None:
        self.a.stop()
        self.b.stop()


class ForwardPeer(UteslaPeer):
    """W3: the client talks to node A, which forwards every request to node B."""
    name = "forward"

    def start(self) -> Pair:
        b = Server(self.command("-B"), cpus={self.args.w3_b_cpu})
        try:
            a = Server(self.command("-A", "--no-services"))
        except BaseException:
            b.stop()
            raise
        sys.path.insert(0, str(HERE))
        from _nodesetup import client_factory
        self.new_client = client_factory(a.info)
        return Pair(a, b)

    async def ready(self, pair: Pair) -> None:
        """Link A to B through both databases (as add_network would), then wait until
        A routes /hello_world (it polls its peers table every second)."""
        sys.path.insert(0, str(HERE))
        from _nodesetup import link_nodes
        await link_nodes(Path(pair.a.info["folder"]), Path(pair.b.info["folder"]),
                         pair.b.info["port"])
        c = self.new_client()
        try:
            deadline = time.monotonic() + 30
            while True:
                reply = await c.get("/hello_world", check=False)
                if reply.status == 200:
                    return
                if time.monotonic() > deadline:
                    raise RuntimeError(f"A never routed /hello_world: {reply.status} "
                                       f"{reply.text[:200]}")
                await asyncio.sleep(0.1)
        finally:
            await c.close()


class HarnessPeer:
    """A peer of the shared harness: its server script, its own Adapter for w1-1 / w2."""

    def __init__(self, args, name, script, extra=()):
        self.args, self.name, self.script, self.extra = args, name, script, list(extra)

    def start(self) -> Server:
        peers = str(self.args.peers_dir)
        if peers not in sys.path:
            sys.path.insert(0, peers)
        import importlib
        mod = importlib.import_module(Path(self.script).stem)
        env = {"PYTHONPATH": os.pathsep.join(p for p in (peers, os.environ.get("PYTHONPATH"))
                                             if p)}
        srv = Server([sys.executable, str(self.args.peers_dir / self.script), "serve",
                      "--workdir", self.args.workdir, *self.extra], env=env, cwd=peers)
        ns = argparse.Namespace(chacha=None, uvloop=False, tls=False, workdir=self.args.workdir)
        self.adapter = mod.Adapter(ns, srv.info)
        return srv

    async def w1(self, srv, n):
        ad = self.adapter

        async def body(c):
            assert await ad.hello(c) == HELLO

        if n == 1:
            c = await ad.connect()
            try:
                async def conn(_):
                    return c
                return await timed(self.args, srv.pid, 1, body, conn)
            finally:
                await ad.close(c)
        if self.name != "floor":
            raise ValueError(f"{self.name}: w1-{n} on one connection is not implemented")
        mux = await FloorMux.open(srv.info["port"])
        try:
            async def mbody(c):
                assert await c.call("hello") == HELLO

            async def conn(_):
                return mux
            return await timed(self.args, srv.pid, n, mbody, conn)
        finally:
            await mux.close()

    async def w2(self, srv):
        ad = self.adapter

        async def body(_):
            c = await ad.connect()
            assert await ad.hello(c) == HELLO
            await ad.close(c)

        async def none(_):
            return None
        return await timed(self.args, srv.pid, 1, body, none)


# --------------------------------------------------------------------------- driver

WORKLOADS = ["w1-1", "w1-64", "w2"]


async def run_one(peer, workload: str, args) -> dict:
    peer._workload = workload
    busy = wait_quiet(args.quiet_wait)
    srv = peer.start()
    try:
        if hasattr(peer, "ready"):
            await peer.ready(srv)
        if workload == "w2":
            r = await peer.w2(srv)
        else:
            r = await peer.w1(srv, int(workload.split("-")[1]))
    finally:
        srv.stop()
    return {"peer": peer.name, "workload": workload, **r, "busy_before_pct": busy}


def merge(recs: list[dict]) -> dict:
    out = dict(recs[0])
    for k, v in recs[0].items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out[k] = statistics.median(r[k] for r in recs if r.get(k) is not None)
    vals = [r["per_s"] for r in recs]
    out["spread_pct"] = round(100 * (max(vals) - min(vals)) / out["per_s"]) if out["per_s"] else 0
    out["other_cpu_pct"] = max(r.get("other_cpu_pct", 0) for r in recs)
    out["rounds"] = len(recs)
    return out


def report(results: list[dict], head: str) -> str:
    groups: dict[tuple, list] = {}
    for r in results:
        if "error" not in r:
            groups.setdefault((r["peer"], r["workload"]), []).append(r)
    by = {k: merge(v) for k, v in groups.items()}
    g = lambda p, w: by.get((p, w))

    def rate(r):
        if not r:
            return "—"
        mark = "†" if r["other_cpu_pct"] > FLAG_OTHER else ""
        return f"{r['per_s']:,.0f}{mark} ({r['spread_pct']}%)"

    lat = lambda r: f"{r['p50_us']:.0f} / {r['p99_us']:.0f}" if r and "p50_us" in r else "—"
    cpu = lambda r: (f"{r['srv_cpu_us_per_call']:.0f} / {r['cli_cpu_us_per_call']:.0f}"
                     if r and r.get("srv_cpu_us_per_call") else "—")
    names = {"w1-1": "W1 hello, 1 in flight, 1 conn", "w1-64": "W1 hello, 64 in flight, 1 conn",
             "w2": "W2 connect+handshake+hello+close"}
    out = [head, "",
           "| workload | utesla /s | p50 / p99 µs | srv / cli CPU µs per call | floor /s "
           "| p50 / p99 µs | srv / cli CPU µs per call | utesla / floor |",
           "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for w in WORKLOADS:
        u, f = g("utesla", w), g("floor", w)
        ratio = f"{u['per_s'] / f['per_s']:.2f}" if u and f and f["per_s"] else "—"
        out.append(f"| {names[w]} | {rate(u)} | {lat(u)} | {cpu(u)} | {rate(f)} | {lat(f)} "
                   f"| {cpu(f)} | {ratio} |")
    p = g("pyro5", "w1-1")
    if p:
        out.append(f"| W1 hello, 1 in flight: pyro5 | {rate(p)} | {lat(p)} | {cpu(p)} "
                   "| | | | |")
    w3 = [(n, g("forward", f"w1-{n}"), g("utesla", f"w1-{n}")) for n in (1, 64)]
    if any(fw for _, fw, _ in w3):
        out += ["", "W3 forward: the same W1 sent to node A (no services), which forwards to "
                "node B; direct = the utesla rows above (same run).", "",
                "| workload | forwarded /s | p50 / p99 µs | srv (A+B) / cli CPU µs per call "
                "| direct /s | forwarded / direct | added p50 µs |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        for n, fw, d in w3:
            if not fw:
                continue
            ratio = f"{fw['per_s'] / d['per_s']:.2f}" if d and d["per_s"] else "—"
            added = f"{fw['p50_us'] - d['p50_us']:.0f}" if d and "p50_us" in d else "—"
            out.append(f"| W3 hello, {n} in flight, 1 conn | {rate(fw)} | {lat(fw)} | "
                       f"{cpu(fw)} | {rate(d)} | {ratio} | {added} |")
    out += ["", "DESIGN targets:", ""]

    def target(label, ok, detail):
        out.append(f"- {label}: {'MET' if ok else 'MISSED' if ok is not None else 'n/a'} "
                   f"({detail})")

    u1, u64, u2, f64 = g("utesla", "w1-1"), g("utesla", "w1-64"), g("utesla", "w2"), \
        g("floor", "w1-64")
    if u1 and p:
        target("W1 1 in flight ≥ Pyro5 sequential", u1["per_s"] >= p["per_s"],
               f"{u1['per_s']:,.0f} vs {p['per_s']:,.0f} /s = {u1['per_s'] / p['per_s']:.2f}x")
    else:
        target("W1 1 in flight ≥ Pyro5 sequential", None, "Pyro5 not measured")
    if u64 and f64:
        target("W1 64 in flight ≥ 0.6 x floor", u64["per_s"] >= 0.6 * f64["per_s"],
               f"{u64['per_s']:,.0f} vs {f64['per_s']:,.0f} /s = "
               f"{u64['per_s'] / f64['per_s']:.2f}x")
    if u2:
        target("W2 ≥ 1,000 handshakes/s (Ed25519)", u2["per_s"] >= 1000,
               f"{u2['per_s']:,.0f} /s")
    for n, fw, d in w3:
        if fw and d:
            target(f"W3 {n} in flight: forwarded ≥ 0.5 x direct",
                   fw["per_s"] >= 0.5 * d["per_s"],
                   f"{fw['per_s']:,.0f} vs {d['per_s']:,.0f} /s = "
                   f"{fw['per_s'] / d['per_s']:.2f}x; added p50 "
                   f"{fw['p50_us'] - d['p50_us']:.0f} µs")
    hit = [f"{p}/{w} ({r['other_cpu_pct']:.0f}%)" for (p, w), r in by.items()
           if r["other_cpu_pct"] > FLAG_OTHER]
    if hit:
        out.append(f"- † other processes used >{FLAG_OTHER:.0f}% of a core during: "
                   + ", ".join(hit))
    errors = [f"{r['peer']}/{r['workload']}: {r['error']}" for r in results if "error" in r]
    out += [f"- ERROR {e}" for e in errors]
    return "\n".join(out)


async def amain(args) -> list[dict]:
    wanted = args.peers.split(",")
    peers = [UteslaPeer(args)] if "utesla" in wanted else []
    if "forward" in wanted:
        peers.append(ForwardPeer(args))
    if args.peers_dir:
        if "floor" in wanted:
            peers.append(HarnessPeer(args, "floor", "peer_floor.py"))
        if "pyro5" in wanted:
            try:
                import Pyro5  # noqa: F401
                peers.append(HarnessPeer(args, "pyro5", "peer_pyro5.py"))
            except ImportError:
                print("# Pyro5 not importable: no pyro5 row (run with .peers-venv/bin/python, "
                      "which bench/run.sh creates)", file=sys.stderr)
    else:
        print("# shared/bench/peers not found: utesla only (set UTESLA_PEERS_DIR)",
              file=sys.stderr)
    workloads = args.workloads.split(",")
    results = []
    for rnd in range(args.repeat):
        for w in workloads:
            for p in peers:
                if p.name == "pyro5" and w != "w1-1" or p.name == "forward" and w == "w2":
                    continue
                for attempt in range(1 + args.retries):
                    try:
                        rec = await asyncio.wait_for(
                            run_one(p, w, args), 60 + 3 * (args.duration + args.warmup))
                    except Exception as exc:
                        rec = {"peer": p.name, "workload": w,
                               "error": f"{type(exc).__name__}: {exc}"[:300]}
                    if rec.get("other_cpu_pct", 0) <= FLAG_OTHER:
                        break
                    print(f"# {p.name}/{w}: disturbed, "
                          f"{'retrying' if attempt < args.retries else 'kept'}",
                          file=sys.stderr, flush=True)
                rec.update({"round": rnd, "attempt": attempt})
                results.append(rec)
                print(json.dumps(rec), flush=True)
    return results


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "serve-utesla":
        ap = argparse.ArgumentParser()
        ap.add_argument("role")
        ap.add_argument("--workdir", default=tempfile.gettempdir())
        ap.add_argument("--node-log-level", default="WARNING")
        ap.add_argument("--no-uvloop", action="store_true")
        ap.add_argument("--profile-out")
        ap.add_argument("--patch")
        ap.add_argument("--no-services", action="store_true")
        return serve_utesla(ap.parse_args())
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="D=2 s per phase")
    ap.add_argument("--duration", type=float, help="seconds per timed phase (default 5)")
    ap.add_argument("--warmup", type=float, default=0.5)
    ap.add_argument("--repeat", type=int, default=3, help="rounds; tables show medians")
    ap.add_argument("--retries", type=int, default=1,
                    help="reruns of a measurement disturbed by other processes (†)")
    ap.add_argument("--quiet-wait", type=float, default=10.0,
                    help="max seconds to wait for an idle machine before each measurement")
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--peers", default="utesla,forward,floor,pyro5",
                    help="which of utesla, forward (W3), floor, pyro5 to measure")
    ap.add_argument("--node-log-level", default="WARNING",
                    help="the node's log level (INFO logs one line per request)")
    ap.add_argument("--no-uvloop", action="store_true", help="node on the asyncio loop")
    ap.add_argument("--w3-b-cpu", type=int, default=0,
                    help="CPU of W3's node B (default 0, with A; 1 shares the client's)")
    ap.add_argument("--client-uvloop", action="store_true", help="clients on uvloop")
    ap.add_argument("--profile", metavar="DIR", help="cProfile the node, one file per run")
    ap.add_argument("--patch", metavar="FILE",
                    help="a Python file run in the node's process (and in this one, before "
                         "any client) to try a change without editing the package")
    ap.add_argument("--out", help="JSON lines file (default bench/results/node-<time>.jsonl)")
    args = ap.parse_args()
    args.duration = args.duration or (2.0 if args.quick else 5.0)
    if not {0, 1} <= os.sched_getaffinity(0):
        sys.exit("needs CPUs 0 and 1 (server on 0, client on 1)")
    os.sched_setaffinity(0, {1})
    args.peers_dir = find_peers_dir()
    if args.patch:
        args.patch = str(Path(args.patch).resolve())
        sys.path.insert(0, str(HERE))
        import runpy
        runpy.run_path(args.patch, run_name="bench_patch")
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    out = Path(args.out) if args.out else HERE / "results" / f"node-{stamp}.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="utesla-bench-") as tmp:
        args.workdir = tmp
        if args.client_uvloop:
            import uvloop
            results = uvloop.run(amain(args))
        else:
            results = asyncio.run(amain(args))
    meta = {"meta": {"python": sys.version.split()[0], "duration_s": args.duration,
                     "warmup_s": args.warmup, "repeat": args.repeat,
                     "node_log_level": args.node_log_level, "node_uvloop": not args.no_uvloop,
                     "client_uvloop": args.client_uvloop, "patch": args.patch,
                     "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}}
    head = (f"bench_node: D={args.duration:g} s, median of {args.repeat} round(s), "
            f"(x%) = (max-min)/median; node on {'asyncio' if args.no_uvloop else 'uvloop'}, "
            f"clients on {'uvloop' if args.client_uvloop else 'asyncio'}; node log level "
            f"{args.node_log_level}{'; patch ' + args.patch if args.patch else ''}; run took {time.monotonic() - t0:.0f} s; {meta['meta']['time']}")
    md = report(results, head)
    print("\n" + md)
    out.write_text("\n".join(json.dumps(r) for r in [meta, *results]) + "\n")
    out.with_suffix(".md").write_text(md + "\n")
    print(f"\n# written: {out} and {out.with_suffix('.md')}", file=sys.stderr)


if __name__ == "__main__":
    main()
