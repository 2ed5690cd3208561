"""W4 (bulk) and W6 (idle connections) of DESIGN.md §5 for utesla-node, with the no-crypto
floor's bulk figure measured in the same run.

    python bench/bench_bulk.py           # full: 1 GiB x3, 4 GiB, 10,000 connections (3-5 min)
    python bench/bench_bulk.py --quick   # 256 MiB x1, no 4 GiB, 2,000 connections (~35 s)
    python bench/bench_bulk.py --quick --big --conns 10000     # mix and match
    python bench/bench_bulk.py --profile DIR   # + py-spy profiles of the node (W4 direct)
    python bench/bench_bulk.py --client-window 1048576 --node-window 1048576   # what-ifs;
    python bench/bench_bulk.py --patch what_if.py   # and a file run first in every process

Processes: every node is a real ``utesla-node`` (uvloop) started in a temporary folder and
pinned to CPU 0 (``--node-cpus``); this process is the client and pins itself to CPU 1
(``--client-cpus``) once the floor has been measured.  Everything is on 127.0.0.1.

W4 bulk: ``/sink`` (reads the body, hashes it, answers its size and SHA-256) and
``/source`` (streams n bytes of a fixed pattern) from complements/.  "up" = POST /sink with
the body from an async generator of 256 KiB pieces; "down" = GET /source read chunk by chunk
(counted, not hashed: the tests check the bytes).  Directly on node B, and through node A
(no services, linked to B: every byte is decrypted and re-encrypted once more).  MB/s =
10^6 B / s, median of ``--reps``; node RSS sampled every 50 ms (VmRSS of each node process;
its VmHWM is reset before each transfer where the kernel allows it); "growth" = peak - the
RSS measured just before.  The 4 GiB transfers (``--big``) sample every 100 ms and check
DESIGN's target: the node's RSS never more than 64 MiB above its idle size.

W6 idle: ``--conns`` authenticated connections to a fresh node (handshake + one
GET /hello_world each, then idle), opened ``--concurrency`` at a time; RSS per connection =
(RSS with N open - idle RSS) / N, target <= 20 KiB.  This process raises its open-file limit
to the hard limit first (and says so when that is too low for N).

Floor: ``../shared/bench/peers/run.py --peers floor --workloads bulk,stream`` (``--quick`` in
quick mode), run from here; its bulk figure ("MB/s each way" of 1 MiB echo calls) is the
divisor of the ratio; DESIGN's target: direct throughput >= 0.5 x floor bulk.

Output: markdown tables on stdout (JSON lines with ``--out``); also written to
bench/results/bulk-<time>.{jsonl,md} unless ``--no-save``.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import select
import shutil
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
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO))

from protocol import Settings  # noqa: E402
from protocol.crypto import PrivateKey  # noqa: E402
from utesla_node import auth  # noqa: E402
from utesla_node.client import Client  # noqa: E402
from utesla_node.keys import load_public_key  # noqa: E402
from utesla_node.storage import Peer, User, open_storage  # noqa: E402
from utesla_node.cli.node import raise_nofile  # noqa: E402
from utesla_node import transport  # noqa: E402
from utesla_node.transport import Session  # noqa: E402

sys.path.insert(0, str(HERE))
from _meters import machine_busy, proc_cpu, proc_field, wait_quiet  # noqa: E402

BIN = Path(sys.executable).parent
MiB = 1 << 20
GiB = 1 << 30
FLAG_OTHER = 15.0   # % of a core used by other processes: above it a figure is marked †
USER = "bench"
PIECE = 256 * 1024


def log(msg: str) -> None:
    print(f"# {msg}", file=sys.stderr, flush=True)


def find_peers_dir() -> Path | None:
    for p in (os.environ.get("UTESLA_PEERS_DIR"), REPO.parent / "shared" / "bench" / "peers",
              Path("/work/shared/bench/peers")):
        if p and (Path(p) / "run.py").is_file():
            return Path(p)
    return None


# --------------------------------------------------------------------------- /proc

def self_cpu() -> float:
    t = os.times()
    return t.user + t.system


class RssSampler:
    """A thread sampling VmRSS of some processes every ``interval`` s (works while the
    event loop is busy)."""

    def __init__(self, pids: list[int], interval: float = 0.05):
        self.pids = pids
        self.interval = interval
        self.peak = {pid: 0 for pid in pids}
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            for pid in self.pids:
                try:
                    self.peak[pid] = max(self.peak[pid], proc_field(pid, "VmRSS"))
                except (OSError, KeyError):
                    pass
            self.samples += 1
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


class Usage:
    """CPU of the nodes, of this process and of everything else over a window."""

    def __init__(self, pids: list[int]):
        self.pids = pids

    def __enter__(self) -> "Usage":
        self.t0 = time.perf_counter()
        self.node0 = sum(proc_cpu(p) for p in self.pids)
        self.self0 = self_cpu()
        self.busy0 = machine_busy()
        return self

    def __exit__(self, *exc) -> None:
        dt = max(time.perf_counter() - self.t0, 1e-9)
        node = sum(proc_cpu(p) for p in self.pids) - self.node0
        mine = self_cpu() - self.self0
        busy = machine_busy() - self.busy0
        self.elapsed = dt
        self.node_pct = 100 * node / dt
        self.client_pct = 100 * mine / dt
        self.other_pct = max(0.0, 100 * (busy - node - mine) / dt)


# --------------------------------------------------------------------------- nodes

PATCHED_NODE = ("import runpy, sys; runpy.run_path(sys.argv.pop(1)); "
                "from utesla_node.cli.node import main; sys.argv[0] = 'utesla-node'; main()")


class NodeProc:
    """``utesla-node`` in its own folder, pinned to ``cpus``; ``services`` from complements/."""

    def __init__(self, root: Path, name: str, services: tuple[str, ...], cpus: set[int],
                 patch: str | None = None, **ini):
        self.folder = root / name
        self.patch = patch
        self.name = name
        self.cpus = cpus
        (self.folder / "complements").mkdir(parents=True)
        for s in services:
            shutil.copy(REPO / "complements" / f"{s}.py", self.folder / "complements")
        server = {"request_timeout": 3600, "idle_timeout": 3600, "handshake_timeout": 60,
                  **ini}
        text = "[server]\n" + "".join(f"{k} = {v}\n" for k, v in server.items())
        text += "[logging]\nlevel = WARNING\n[network]\ngossip_interval = 0.5\n" \
                "heartbeat_interval = 2\n"
        (self.folder / "node.ini").write_text(text)
        self.proc: subprocess.Popen | None = None
        self.port = 0

    def start(self, timeout: float = 60.0) -> "NodeProc":
        cpus = self.cpus
        cmd = [str(BIN / "utesla-node")]
        if self.patch:          # a what-if experiment: run the file first, then the node
            cmd = [sys.executable, "-c", PATCHED_NODE, str(Path(self.patch).resolve())]
        self.proc = subprocess.Popen(
            cmd + ["--port", "0"], cwd=self.folder, stdout=subprocess.PIPE,
            stderr=open(self.folder / "node.log", "ab"), text=True,
            preexec_fn=lambda: os.sched_setaffinity(0, cpus))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not select.select([self.proc.stdout], [], [], 1.0)[0]:
                continue
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"node {self.name} exited: {self.log()[-2000:]}")
            if "listening on utesla://" in line:
                self.port = int(line.rsplit(":", 1)[1])
                return self
        raise RuntimeError(f"node {self.name} did not start within {timeout:g} s")

    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"utesla://127.0.0.1:{self.port}"

    def log(self) -> str:
        try:
            return (self.folder / "node.log").read_text()
        except OSError:
            return ""

    def rss(self) -> int:
        return proc_field(self.pid, "VmRSS")

    def hwm(self) -> int:
        return proc_field(self.pid, "VmHWM")

    def reset_hwm(self) -> bool:
        try:
            with open(f"/proc/{self.pid}/clear_refs", "w") as f:
                f.write("5")
            return True
        except OSError:
            return False

    def public_key_pem(self) -> str:
        return (self.folder / "keys" / "key.pub").read_text()

    async def storage(self):
        st = open_storage(None, self.folder / "data")
        await st.open()
        return st

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc.stdout.close()


async def provision(node: NodeProc, key: PrivateKey) -> str:
    """Register the bench user (straight into the node's database) and issue it a token."""
    st = await node.storage()
    try:
        await st.add_user(User(name=USER, password_hash=await auth.hash_password("unused"),
                               public_key=key.public.to_pem(), token_limit=0,
                               created_at=time.time()), overwrite=True)
        token, _ = await auth.Authority(st, 7 * 86400.0).issue_token(USER)
    finally:
        await st.close()
    return token


async def link(near: NodeProc, far: NodeProc) -> None:
    """Make ``near`` a subscriber of ``far`` (as ``utesla-cli add_network`` would)."""
    name = "node-" + near.name
    st = await far.storage()
    try:
        await st.add_user(User(name=name, password_hash=await auth.hash_password("unused"),
                               public_key=near.public_key_pem(), token_limit=0,
                               created_at=time.time()), overwrite=True)
        token, _ = await auth.Authority(st, 7 * 86400.0).issue_token(name)
    finally:
        await st.close()
    st = await near.storage()
    try:
        await st.add_peer(Peer(url=far.url, public_key=far.public_key_pem(), user=name,
                               token=token, created_at=time.time()), overwrite=True)
    finally:
        await st.close()


def client_for(node: NodeProc, key: PrivateKey, token: str, **kw) -> Client:
    return Client(node.url, user=USER, private_key=key,
                  node_key=load_public_key(node.folder / "keys" / "key.pub"), token=token,
                  timeout=None, **kw)


async def wait_route(client: Client, service: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        services = (await client.get("/_node/services")).json()["services"]
        if any(s["path"] == service for s in services):
            return
        await asyncio.sleep(0.1)
    raise RuntimeError(f"{service} not routed within {timeout:g} s")


# --------------------------------------------------------------------------- W4

BLOCK = os.urandom(PIECE)


async def _pieces(n: int):
    left = n
    while left > 0:
        chunk = BLOCK if left >= PIECE else BLOCK[:left]
        left -= len(chunk)
        yield chunk


async def up(client: Client, n: int) -> int:
    reply = await client.post("/sink", body=_pieces(n))
    got = reply.json()["bytes"]
    if got != n:
        raise RuntimeError(f"/sink received {got} bytes of {n}")
    return got


async def down(client: Client, n: int) -> int:
    size = 0
    async with client.stream("GET", "/source", args={"n": n}) as resp:
        async for chunk in resp:
            size += len(chunk)
    if size != n:
        raise RuntimeError(f"/source sent {size} bytes of {n}")
    return size


async def transfer(kind: str, client: Client, n: int, nodes: list[NodeProc],
                   interval: float = 0.05, quiet: float = 0.0) -> dict:
    """One transfer, timed, with the nodes' RSS sampled and their CPU measured."""
    busy = await asyncio.to_thread(wait_quiet, quiet) if quiet else None
    before = {nd.pid: nd.rss() for nd in nodes}
    hwm_reset = all([nd.reset_hwm() for nd in nodes])
    with RssSampler([nd.pid for nd in nodes], interval) as rs, \
            Usage([nd.pid for nd in nodes]) as use:
        await (up if kind == "up" else down)(client, n)
    rec = {"mb_s": n / use.elapsed / 1e6, "seconds": use.elapsed,
           "node_cpu_pct": use.node_pct, "client_cpu_pct": use.client_pct,
           "other_cpu_pct": use.other_pct, "samples": rs.samples}
    for nd in nodes:
        peak = max(rs.peak[nd.pid], nd.hwm() if hwm_reset else 0)
        rec[f"{nd.name}_rss_before_mib"] = before[nd.pid] / MiB
        rec[f"{nd.name}_peak_rss_mib"] = peak / MiB
        rec[f"{nd.name}_growth_mib"] = (peak - before[nd.pid]) / MiB
    rec["hwm_reset"] = hwm_reset
    rec["busy_before_pct"] = busy
    return rec


async def w4(args, key, root: Path, results: list) -> None:
    ini = {"stream_window": args.node_window} if args.node_window else {}
    far = NodeProc(root, "B", ("sink", "source", "hello_world"), args.node_cpus, args.patch,
                   **ini).start()
    near = NodeProc(root, "A", ("hello_world",), args.node_cpus, args.patch, **ini).start()
    nodes = [far, near]
    try:
        token = await provision(far, key)
        ntoken = await provision(near, key)
        await link(near, far)
        kw = {"settings": Settings(window=args.client_window)} if args.client_window else {}
        direct = client_for(far, key, token, **kw)
        forward = client_for(near, key, ntoken, **kw)
        await wait_route(forward, "/source")
        await wait_route(forward, "/sink")
        # Warm-up: every path once (connections, handshakes, imports, first buffers).
        for c in (direct, forward):
            await up(c, 8 * MiB)
            await down(c, 8 * MiB)
        idle = {nd.name: nd.rss() for nd in nodes}
        log(f"idle RSS: B {idle['B'] / MiB:.1f} MiB, A {idle['A'] / MiB:.1f} MiB")
        size = args.size
        for route, client, involved in (("direct", direct, [far]),
                                        ("forward", forward, [near, far])):
            for kind in ("up", "down"):
                for rep in range(args.reps):
                    rec = await transfer(kind, client, size, involved, quiet=args.quiet_wait)
                    rec.update({"workload": "w4", "route": route, "kind": kind, "rep": rep,
                                "bytes": size, "idle_B_mib": idle["B"] / MiB,
                                "idle_A_mib": idle["A"] / MiB})
                    emit(results, rec, args)
                    log(f"W4 {route} {kind} {size / MiB:.0f} MiB: {rec['mb_s']:.0f} MB/s, node "
                        f"CPU {rec['node_cpu_pct']:.0f}%, client CPU "
                        f"{rec['client_cpu_pct']:.0f}%, other {rec['other_cpu_pct']:.0f}%")
        if args.big:
            for kind in ("down", "up"):
                rss_idle = far.rss()
                rec = await transfer(kind, direct, args.big_size, [far], interval=0.1,
                                     quiet=args.quiet_wait)
                rec.update({"workload": "w4-big", "route": "direct", "kind": kind,
                            "bytes": args.big_size, "idle_B_mib": rss_idle / MiB,
                            "idle_start_B_mib": idle["B"] / MiB})
                emit(results, rec, args)
                log(f"W4 {args.big_size / GiB:.0f} GiB {kind}: {rec['mb_s']:.0f} MB/s, node RSS "
                    f"+{rec['B_growth_mib']:.1f} MiB over {rss_idle / MiB:.1f} MiB")
        if args.profile:
            await profile_w4(args, direct, far)
        await direct.close()
        await forward.close()
    finally:
        for nd in nodes:
            nd.stop()


async def profile_w4(args, client: Client, node: NodeProc) -> None:
    """py-spy profiles of the node during a direct upload and a direct download: collapsed
    stacks (``node-KIND.txt``, for flamegraph.pl or speedscope) and the top functions."""
    spy = BIN / "py-spy"
    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    for kind in ("up", "down"):
        dest = out / f"node-{kind}.txt"
        proc = subprocess.Popen([str(spy), "record", "-p", str(node.pid), "-o", str(dest),
                                 "-f", "raw", "-r", "250", "--nonblocking"],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        await asyncio.sleep(1.0)              # py-spy attaches
        await (up if kind == "up" else down)(client, args.size)
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log(f"profile of the node during {kind}: {dest}")
        try:
            print(summarize_profile(dest.read_text(), f"node during {kind}"), file=sys.stderr)
        except OSError:
            pass


def summarize_profile(collapsed: str, title: str, top: int = 18) -> str:
    """Self and inclusive shares of the hottest functions in py-spy's collapsed stacks."""
    self_t: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in collapsed.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f.split(" (")[0] + " (" + f.rsplit("/", 1)[-1].split(":")[0] + ")"
                  if "(" in f else f for f in stack.split(";")]
        self_t[frames[-1]] = self_t.get(frames[-1], 0) + n
        for f in set(frames):
            incl[f] = incl.get(f, 0) + n
    if not total:
        return f"{title}: no samples"
    lines = [f"{title}: {total} samples", "  self%  incl%  function"]
    for f, n in sorted(self_t.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"  {100 * n / total:5.1f}  {100 * incl[f] / total:5.1f}  {f}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- W6

def usable_connections(wanted: int) -> int:
    """How many of ``wanted`` connections the open-file limit allows, after raising it
    to the hard limit as utesla-node does (64 descriptors kept for the rest)."""
    soft = raise_nofile(wanted)
    if soft < wanted + 64:
        log(f"open-file limit {soft} is below {wanted} connections + 64: "
            f"opening {max(0, soft - 64)}")
    return max(0, min(wanted, soft - 64))


async def open_idle(node: NodeProc, key: PrivateKey, token: str) -> Session:
    """One authenticated connection that has served one request, then stays idle."""
    session = await transport.connect(
        "127.0.0.1", node.port, identity=key, user=USER,
        server_key=load_public_key(node.folder / "keys" / "key.pub"), name="w6")
    try:
        await session.wait_ready(60)
        s = session.open_stream("GET", "/hello_world", token=token)
        status, _ = await asyncio.wait_for(s.head, 60)
        body = await asyncio.wait_for(s.read_all(), 60)
        if status != 200 or body != b"Hello World!":
            raise RuntimeError(f"unexpected answer {status} {body[:60]!r}")
    except BaseException:
        session.close()
        raise
    return session


async def settle(node: NodeProc, quiet: float = 0.3, limit: float = 10.0) -> None:
    """Wait (bounded) until the node stops using CPU: the last handshakes are done."""
    deadline = time.monotonic() + limit
    last = proc_cpu(node.pid)
    while time.monotonic() < deadline:
        await asyncio.sleep(quiet)
        now = proc_cpu(node.pid)
        if now - last < 0.02:
            return
        last = now


async def w6(args, key, root: Path, results: list) -> None:
    n = usable_connections(args.conns)
    node = NodeProc(root, "C", ("hello_world",), args.node_cpus, args.patch,
                    max_connections=n + 200, max_connections_per_ip=n + 200).start()
    try:
        token = await provision(node, key)
        sem = asyncio.Semaphore(args.concurrency)

        async def one():
            async with sem:
                return await open_idle(node, key, token)

        # Warm-up: connections made and closed, so one-time costs are in "idle".
        warm = await asyncio.gather(*(one() for _ in range(min(200, n))))
        for s in warm:
            s.close()
        await asyncio.gather(*(s.wait_closed() for s in warm), return_exceptions=True)
        await settle(node)
        idle = node.rss()
        log(f"W6: node idle RSS {idle / MiB:.1f} MiB; opening {n} connections, "
            f"{args.concurrency} at a time")
        sessions: list[Session] = []
        points = [(0, idle)]
        t0 = time.perf_counter()
        batch = max(1, n // 10)
        while len(sessions) < n:
            k = min(batch, n - len(sessions))
            got = await asyncio.gather(*(one() for _ in range(k)), return_exceptions=True)
            errors = [g for g in got if isinstance(g, BaseException)]
            sessions += [g for g in got if not isinstance(g, BaseException)]
            if errors:
                raise RuntimeError(f"{len(errors)} connection(s) failed: {errors[0]!r}")
            await settle(node)
            points.append((len(sessions), node.rss()))
            log(f"W6: {len(sessions)} open, node RSS {points[-1][1] / MiB:.1f} MiB")
        opened = time.perf_counter() - t0
        full = points[-1][1]
        per = (full - idle) / n
        # The slope of RSS over the count (least squares) is less sensitive to the first
        # allocations of the arena than the two end points alone.
        xs, ys = [p[0] for p in points], [p[1] for p in points]
        mx, my = statistics.fmean(xs), statistics.fmean(ys)
        slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / \
            max(1e-9, sum((x - mx) ** 2 for x in xs))
        open_now = len(sessions)
        for s in sessions:
            s.close()
        await asyncio.gather(*(s.wait_closed() for s in sessions), return_exceptions=True)
        await settle(node)
        after = node.rss()
        rec = {"workload": "w6", "conns": n, "wanted": args.conns, "idle_rss_mib": idle / MiB,
               "open_rss_mib": full / MiB, "per_conn_kib": per / 1024,
               "slope_kib": slope / 1024, "after_close_rss_mib": after / MiB,
               "open_seconds": opened, "conns_per_s": n / opened, "open_at_end": open_now,
               "hwm_mib": node.hwm() / MiB}
        emit(results, rec, args)
    finally:
        node.stop()


# --------------------------------------------------------------------------- floor

def floor(args) -> dict:
    peers = find_peers_dir()
    if peers is None:
        log("../shared/bench/peers not found: no floor figure")
        return {"error": "peers harness not found"}
    with tempfile.NamedTemporaryFile(suffix=".jsonl", delete=False) as f:
        out = f.name
    cmd = [sys.executable, str(peers / "run.py"), "--peers", "floor", "--workloads",
           "bulk,stream", "--out", out, "--quiet-wait", str(args.quiet_wait),
           "--retries", "0" if args.quick else "1"]
    if args.quick:
        cmd.append("--quick")
    log("floor: " + " ".join(cmd[1:]))
    all_cpus = os.sched_getaffinity(0)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                              preexec_fn=lambda: os.sched_setaffinity(0, all_cpus))
        recs = [json.loads(line) for line in Path(out).read_text().splitlines() if line.strip()]
    except (subprocess.TimeoutExpired, OSError, ValueError) as exc:
        return {"error": f"floor run failed: {exc}"}
    finally:
        try:
            os.unlink(out)
        except OSError:
            pass
    res = {"workload": "floor"}
    for r in recs:
        if r.get("peer") == "floor" and "mb_s_each_way" in r:
            res[f"{r['workload']}_mb_s"] = r["mb_s_each_way"]
            res[f"{r['workload']}_other_cpu_pct"] = r.get("other_cpu_pct", 0)
            res[f"{r['workload']}_srv_peak_rss_mib"] = r.get("srv_peak_rss_mib")
    if "bulk_mb_s" not in res:
        res["error"] = f"no floor bulk figure (exit {proc.returncode}): {proc.stderr[-300:]}"
    return res


# --------------------------------------------------------------------------- report

def emit(results: list, rec: dict, args) -> None:
    results.append(rec)
    print(json.dumps(rec), flush=True)


def _mark(recs: list[dict]) -> str:
    return "†" if any(r.get("other_cpu_pct", 0) > FLAG_OTHER for r in recs) else ""


def report(results: list[dict], args, head: str) -> str:
    fl = next((r for r in results if r.get("workload") == "floor"), {})
    floor_bulk = fl.get("bulk_mb_s")
    out = [head, ""]
    if floor_bulk:
        out.append(f"Floor (no crypto, same run): bulk **{floor_bulk:.0f} MB/s** each way, "
                   f"stream {fl.get('stream_mb_s', 0):.0f} MB/s each way"
                   + (" †" if fl.get("bulk_other_cpu_pct", 0) > FLAG_OTHER else ""))
    else:
        out.append(f"Floor: not measured ({fl.get('error', 'skipped')})")
    groups: dict[tuple, list] = {}
    for r in results:
        if r.get("workload") in ("w4", "w4-big"):
            groups.setdefault((r["workload"], r["route"], r["kind"]), []).append(r)
    if groups:
        out += ["", "W4 bulk (node(s) on CPU %s, client on CPU %s; MB/s per node CPU-s = what "
                "the node(s) would move with a whole core to themselves):" % (
                    ",".join(map(str, sorted(args.node_cpus))),
                    ",".join(map(str, sorted(args.client_cpus)))),
                "", "| transfer | size | MB/s (median; min-max) | x floor bulk | node CPU % "
                "| client CPU % | MB/s per node CPU-s | node peak RSS MiB | RSS growth MiB |",
                "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    direct_rates = []
    big_growth = []
    for (w, route, kind), recs in groups.items():
        rates = [r["mb_s"] for r in recs]
        med = statistics.median(rates)
        if w == "w4" and route == "direct":
            direct_rates.append(med)
        names = ["B"] if route == "direct" else ["A", "B"]
        peak = " / ".join(f"{n} {max(r[f'{n}_peak_rss_mib'] for r in recs):.1f}" for n in names)
        growth = " / ".join(f"{n} +{max(r[f'{n}_growth_mib'] for r in recs):.1f}" for n in names)
        if w == "w4-big":       # against the idle size measured before any transfer
            g = max(r["B_peak_rss_mib"] - r["idle_start_B_mib"] for r in recs)
            big_growth.append((kind, g))
            growth = f"B +{g:.1f} over idle {recs[0]['idle_start_B_mib']:.1f}"
        ratio = f"{med / floor_bulk:.2f}" if floor_bulk else "—"
        size = recs[0]["bytes"]
        size_s = f"{size / GiB:g} GiB" if size >= GiB else f"{size / MiB:g} MiB"
        via = "direct (B)" if route == "direct" else "forward (A -> B)"
        out.append(f"| {kind} {via} | {size_s} x{len(recs)} | {med:.0f}{_mark(recs)} "
                   f"({min(rates):.0f}-{max(rates):.0f}) | {ratio} "
                   f"| {statistics.median(r['node_cpu_pct'] for r in recs):.0f} "
                   f"| {statistics.median(r['client_cpu_pct'] for r in recs):.0f} "
                   f"| {statistics.median(r['mb_s'] * 100 / max(r['node_cpu_pct'], 1e-9) for r in recs):.0f} "
                   f"| {peak} | {growth} |")
    w6r = next((r for r in results if r.get("workload") == "w6"), None)
    if w6r:
        note = "" if w6r["conns"] == w6r["wanted"] else \
            f" (wanted {w6r['wanted']}: the open-file limit allows {w6r['conns']})"
        out += ["", f"W6 idle connections{note}:", "",
                "| connections | node idle RSS MiB | RSS with N open MiB | per connection KiB "
                "| slope KiB/conn | after closing MiB | opened per s |",
                "|---:|---:|---:|---:|---:|---:|---:|",
                f"| {w6r['conns']:,} | {w6r['idle_rss_mib']:.1f} | {w6r['open_rss_mib']:.1f} "
                f"| {w6r['per_conn_kib']:.1f} | {w6r['slope_kib']:.1f} "
                f"| {w6r['after_close_rss_mib']:.1f} | {w6r['conns_per_s']:.0f} |"]
    # Targets.
    out += ["", "Targets (DESIGN / issue 6):", ""]
    if direct_rates and floor_bulk:
        worst = min(direct_rates)
        out.append(f"- direct throughput >= 0.5 x floor bulk ({0.5 * floor_bulk:.0f} MB/s): "
                   f"slowest direction {worst:.0f} MB/s = {worst / floor_bulk:.2f} x: "
                   f"{'MET' if worst >= 0.5 * floor_bulk else 'MISSED'}")
    for kind, g in big_growth:
        out.append(f"- node RSS <= idle + 64 MiB during a {args.big_size / GiB:g} GiB {kind}: "
                   f"+{g:.1f} MiB: {'MET' if g <= 64 else 'MISSED'}")
    if not big_growth:
        out.append("- node RSS during a 4 GiB transfer: not run (--big)")
    if w6r:
        out.append(f"- <= 20 KiB per idle connection: {w6r['per_conn_kib']:.1f} KiB "
                   f"({w6r['conns']:,} connections): "
                   f"{'MET' if w6r['per_conn_kib'] <= 20 else 'MISSED'}")
    if any(_mark([r]) for r in results):
        out.append(f"- † other processes used > {FLAG_OTHER:.0f}% of a core during that "
                   "measurement: treat it with care")
    return "\n".join(out)


# --------------------------------------------------------------------------- main

def parse_cpus(text: str) -> set[int]:
    return {int(c) for c in text.split(",") if c.strip()}


async def run(args) -> list[dict]:
    results: list[dict] = []
    auth.set_scrypt_cost(10)        # passwords are never used here
    key = PrivateKey.generate("ed25519")
    with tempfile.TemporaryDirectory(prefix="bench-bulk-") as tmp:
        root = Path(tmp)
        if "w4" in args.workloads:
            await w4(args, key, root, results)
        if "w6" in args.workloads:
            await w6(args, key, root, results)
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="256 MiB x1, no 4 GiB, 2,000 connections, floor --quick")
    ap.add_argument("--size-mib", type=int, help="W4 transfer size (default 1024; quick 256)")
    ap.add_argument("--reps", type=int, help="W4 transfers per case (default 3; quick 1)")
    ap.add_argument("--big", action=argparse.BooleanOptionalAction, default=None,
                    help="the 4 GiB transfers (default: on, off with --quick)")
    ap.add_argument("--big-gib", type=float, default=4.0)
    ap.add_argument("--conns", type=int, help="W6 connections (default 10000; quick 2000)")
    ap.add_argument("--concurrency", type=int, default=64, help="W6 handshakes at once")
    ap.add_argument("--workloads", default="floor,w4,w6")
    ap.add_argument("--node-cpus", type=parse_cpus, default={0})
    ap.add_argument("--client-cpus", type=parse_cpus, default={1})
    ap.add_argument("--quiet-wait", type=float, default=None,
                    help="longest wait for an idle machine before each measurement, s "
                         "(default 5; quick 2)")
    ap.add_argument("--client-window", type=int, default=0,
                    help="the client's per-stream window, bytes (default: the protocol's)")
    ap.add_argument("--node-window", type=int, default=0,
                    help="the nodes' stream_window, bytes (default: the node's)")
    ap.add_argument("--patch", metavar="FILE",
                    help="a Python file run first in the nodes and in this process (what-if "
                         "experiments: monkeypatch something, measure, compare)")
    ap.add_argument("--profile", metavar="DIR", help="py-spy flame graphs of the node (W4)")
    ap.add_argument("--out", help="also write the JSON lines here")
    ap.add_argument("--no-save", action="store_true",
                    help="do not write bench/results/bulk-<time>.{jsonl,md}")
    args = ap.parse_args()
    args.size = (args.size_mib or (256 if args.quick else 1024)) * MiB
    args.reps = args.reps or (1 if args.quick else 3)
    args.big = (not args.quick) if args.big is None else args.big
    args.big_size = int(args.big_gib * GiB)
    args.conns = args.conns or (2000 if args.quick else 10000)
    args.quiet_wait = args.quiet_wait if args.quiet_wait is not None else \
        (2.0 if args.quick else 5.0)
    args.workloads = set(args.workloads.split(","))
    if args.patch:
        import runpy
        runpy.run_path(args.patch)
    t0 = time.monotonic()
    results: list[dict] = []
    if "floor" in args.workloads:
        fl = floor(args)
        emit(results, fl, args)
    os.sched_setaffinity(0, args.client_cpus)
    try:
        import uvloop
        results += uvloop.run(run(args))
    except ImportError:
        results += asyncio.run(run(args))
    head = (f"bench_bulk.py{' --quick' if args.quick else ''}: W4 {args.size / MiB:g} MiB x "
            f"{args.reps}{', ' + format(args.big_size / GiB, 'g') + ' GiB' if args.big else ''}"
            f", W6 {args.conns:,} connections; {time.strftime('%Y-%m-%dT%H:%M:%S%z')}, "
            f"{os.cpu_count()} CPUs; run took {time.monotonic() - t0:.0f} s")
    text = report(results, args, head)
    print("\n" + text)
    lines = "\n".join(json.dumps(r) for r in results) + "\n"
    if args.out:
        Path(args.out).write_text(lines)
    if not args.no_save:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        (HERE / "results").mkdir(exist_ok=True)
        (HERE / "results" / f"bulk-{stamp}.jsonl").write_text(lines)
        (HERE / "results" / f"bulk-{stamp}.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
