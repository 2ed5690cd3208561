"""Test helpers: real nodes on loopback port 0, in-process or as subprocesses.

``NodeHarness`` owns a node's folder (keys, data, complements), starts it in the
test's event loop, registers users and hands out connected clients.  Every
node and client it creates is closed when the test ends.
"""
from __future__ import annotations

import asyncio
import logging
import os
import queue
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from protocol import Connection, HandshakeCompleted, Role
from protocol.crypto import PrivateKey
from utesla_node import auth
from utesla_node.client import Client
from utesla_node.config import load_config
from utesla_node.keys import write_key_pair
from utesla_node.server import Node
from utesla_node.storage import User

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent

# Fast scrypt for tests: the real cost is measured by the benchmark, not here.
auth.set_scrypt_cost(10)

_USER_KEYS: dict[str, PrivateKey] = {}


def user_key(kind: str = "ed25519", bits: int = 2048, tag: str = "") -> PrivateKey:
    """A cached key per (kind, bits, tag): RSA generation is slow."""
    k = (kind, bits, tag)
    if k not in _USER_KEYS:
        _USER_KEYS[k] = PrivateKey.generate(kind, bits)
    return _USER_KEYS[k]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class NodeHarness:
    """One node in ``folder``; ``await start()``, ``await add_user()``, ``client()``."""

    def __init__(self, folder: Path, services: dict[str, str] | None = None,
                 copy_examples: bool = True, **settings):
        self.folder = Path(folder)
        (self.folder / "complements").mkdir(parents=True, exist_ok=True)
        if copy_examples:
            for f in (REPO / "complements").glob("*.py"):
                (self.folder / "complements" / f.name).write_text(f.read_text())
        for name, code in (services or {}).items():
            self.write_service(name, code)
        settings.setdefault("port", 0)
        self.config = load_config(None, **settings)
        self.config.base_dir = self.folder
        self.node: Node | None = None
        self.clients: list[Client] = []
        self.tokens: dict[str, str] = {}
        self.keys: dict[str, PrivateKey] = {}

    def write_service(self, name: str, code: str) -> Path:
        path = self.folder / "complements" / f"{name}.py"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(code))
        return path

    async def start(self) -> "NodeHarness":
        self.node = Node(self.config)
        await self.node.start()
        return self

    @property
    def port(self) -> int:
        return self.node.address[1]

    @property
    def url(self) -> str:
        return f"utesla://127.0.0.1:{self.port}"

    @property
    def key(self) -> PrivateKey:
        return self.node.key

    async def add_user(self, name: str = "alice", password: str = "pw", key: PrivateKey | None = None,
                       token: bool = True, **fields) -> PrivateKey:
        key = key or user_key(tag=name)
        fields.setdefault("token_limit", 0)
        await self.node.storage.add_user(User(
            name=name, password_hash=await auth.hash_password(password),
            public_key=key.public.to_pem(), created_at=time.time(), **fields),
            overwrite=True)
        self.keys[name] = key
        if token:
            self.tokens[name], _ = await self.node.authority.issue_token(name)
        return key

    def client(self, user: str = "alice", **kw) -> Client:
        kw.setdefault("token", self.tokens.get(user))
        c = Client(self.url, user=user, private_key=self.keys[user], node_key=self.key.public,
                   **kw)
        self.clients.append(c)
        return c

    async def stop(self) -> None:
        for c in self.clients:
            await c.close()
        if self.node is not None and not self.node.stopping:
            await self.node.stop("test over")


def run_cli(*args, cwd=None, input=None, timeout=60, check=True, env=None):
    """Run ``utesla-cli`` (the installed console script) and return the CompletedProcess."""
    proc = subprocess.run([str(BIN / "utesla-cli"), *map(str, args)], cwd=cwd, input=input,
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"utesla-cli {' '.join(map(str, args))} failed "
                             f"({proc.returncode}): {proc.stderr}")
    return proc


class NodeProcess:
    """``utesla-node`` as a subprocess in ``folder``; waits for its 'listening' line.

    ``program`` replaces the ``utesla-node`` command (a list: executable and its first
    arguments), for testing this helper with a child that misbehaves.
    """

    def __init__(self, folder: Path, *args, env=None, program: list | None = None):
        self.folder = Path(folder)
        self.args = args
        self.env = env
        self.program = [str(p) for p in program] if program else [str(BIN / "utesla-node")]
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.lines: list[str] = []
        #: What the node printed after its start-up lines, read when stop() closed the pipe.
        self.output = ""

    def start(self, timeout: float = 30.0) -> "NodeProcess":
        """Start the child and wait, at most ``timeout`` seconds whatever it does, for its
        'listening' line and the line after it (the node key).

        The child's stdout is read by a thread that stops after those lines, so this wait
        can give up on a child that prints nothing, or half a line, and never exits (a
        ``readline()`` here would block past any limit); such a child is killed.  Once
        this returns, ``proc.stdout`` is the caller's alone.
        """
        # The child gets its own descriptor for the log: ours is closed once it is spawned
        # (also when spawning fails), so no handle outlives start().
        with open(self.folder / "node.log", "ab") as log:
            self.proc = subprocess.Popen(
                [*self.program, *map(str, self.args)], cwd=self.folder,
                stdout=subprocess.PIPE, stderr=log, text=True,
                env={**os.environ, **(self.env or {})})
        lines: queue.SimpleQueue = queue.SimpleQueue()
        reader = threading.Thread(target=_read_banner, args=(self.proc.stdout, lines),
                                  name=f"NodeProcess {self.folder.name} stdout", daemon=True)
        reader.start()
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                self.proc.kill()          # its stdout closes: the reader sees the end
                self.proc.wait()
                reader.join(5)
                raise AssertionError(f"node did not start within {timeout:g} s (killed); "
                                     f"it printed {self.lines!r}; log: {self.log()}") from None
            if line is None:
                reader.join()
                raise AssertionError(f"node exited early: {self.log()}")
            self.lines.append(line)
            if self.port is not None:     # the line after 'listening': the node key
                reader.join()             # it stopped reading there: proc.stdout is ours
                return self
            if "listening on utesla://" in line:
                self.port = int(line.rsplit(":", 1)[1])

    def log(self) -> str:
        try:
            return (self.folder / "node.log").read_text()
        except FileNotFoundError:
            return ""

    def stop(self, sig=15, timeout: float = 30.0) -> int:
        """Signal the node and return its exit code; again, the same code (idempotent).

        The node's stdout pipe is read to its end (into ``output``) and closed, also when
        the node does not stop in time and is killed: an open pipe would outlive the test
        (Python 3.13 reports it as an unclosed file when it is collected).
        """
        if self.proc is None:
            return 0
        try:
            if self.proc.poll() is None:
                self.proc.send_signal(sig)
                try:
                    self.proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
                    raise AssertionError("node did not stop in time") from None
        finally:
            self._close_stdout()
        return self.proc.returncode

    def _close_stdout(self) -> None:
        out = self.proc.stdout
        if out is not None and not out.closed:
            try:
                self.output += out.read()      # the node has exited: read() meets EOF
            finally:
                out.close()


def _read_banner(stdout, lines: "queue.SimpleQueue") -> None:
    """Thread body for :meth:`NodeProcess.start`: pass each line of ``stdout`` on, up to
    the one after the 'listening' line; ``None`` at end of file."""
    listening = False
    for line in iter(stdout.readline, ""):
        lines.put(line)
        if listening:
            return
        listening = "listening on utesla://" in line
    lines.put(None)


async def wait_for(predicate, timeout: float = 10.0, interval: float = 0.01):
    """Poll ``predicate`` (sync or async) until true; a condition, not a sleep-as-sync."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not met within %.1f s" % timeout)
        await asyncio.sleep(interval)


# --------------------------------------------------------------------------- networks

def link_state(a: "NodeHarness", b_url: str) -> str | None:
    """The state of ``a``'s link to the peer at ``b_url`` (None when there is no link)."""
    link = a.node.network.links.get(b_url) if a.node and a.node.network else None
    return link.state if link is not None else None


async def link(a: "NodeHarness", b: "NodeHarness", *, user: str | None = None,
               url: str | None = None, priority: int = 0, service: str | None = None,
               wait: bool = True, timeout: float = 10.0, **user_fields) -> str:
    """Make ``a`` a subscriber of ``b``, as ``utesla-cli add_network`` would.

    Registers on ``b`` a user for ``a``'s node key (``token_limit`` 0 unless given), issues
    it a token, and adds a peer row on ``a`` pointing to ``b`` (or to ``url``, e.g. a
    proxy).  With ``wait`` it returns once the link is up and, if ``service`` is given,
    once ``a`` routes it.  Returns the token ``b`` issued.
    """
    from utesla_node.storage import Peer
    user = user or "node-" + "".join(ch for ch in a.key.public.fingerprint()[7:]
                                       if ch.isalnum())[:16]
    await b.add_user(user, key=a.key, **user_fields)
    token = b.tokens[user]
    url = url or b.url
    await a.node.storage.add_peer(Peer(url=url, public_key=b.key.public.to_pem(), user=user,
                                       token=token, priority=priority, created_at=time.time()),
                                  overwrite=True)
    if wait:
        await wait_for(lambda: link_state(a, url) == "up", timeout)
        if service is not None:
            await wait_for(lambda: routes(a, service), timeout)
    return token


def routes(a: "NodeHarness", service: str) -> list:
    """``a``'s candidate routes for ``service`` (``[(next hop id, Route), ...]``)."""
    return a.node.network.engine.candidates(service.strip("/"))


#: Network timings for tests: failures show within a second or two, and it stays quiet.
NET_FAST = {"gossip_interval": 0.2, "heartbeat_interval": 0.3, "handshake_timeout": 2.0}

#: Answers with the fingerprint of the node that ran it (who served a forwarded request);
#: ``delay`` (seconds, at most 5) first.
WHOAMI_SERVICE = """
    import asyncio

    class Handler:
        async def get(self):
            delay = float(self.args.get("delay", 0))
            if delay:
                await asyncio.sleep(min(delay, 5))
            await self.write(self.node.key.public.fingerprint())
"""

#: Streams ``n`` numbered lines ``delay`` seconds apart (bounded: n <= 2000, delay <= 0.2).
TICKER_SERVICE = """
    import asyncio

    class Handler:
        async def get(self):
            n = min(int(self.args.get("n", 10)), 2000)
            delay = min(float(self.args.get("delay", 0.01)), 0.2)
            for i in range(n):
                await self.write(f"tick {i}\\n")
                await self.flush()
                await asyncio.sleep(delay)
"""

#: What a handler saw: user, path, subpath, arguments, and which node ran it.
INSPECT_SERVICE = """
    class Handler:
        async def get(self):
            await self.write({"user": self.user, "path": self.path, "subpath": self.subpath,
                              "args": self.args, "node": self.node.key.public.fingerprint()})
"""


class RawClient:
    """A ``protocol.Connection`` driven over a socket by hand, collecting every event: for
    tests that must see the exact RESET and CLOSE statuses a node sends, which the
    high-level client folds into exceptions (or, after a complete answer, ignores)."""

    def __init__(self, harness, user: str = "alice"):
        self.h = harness
        self.conn = Connection(Role.CLIENT, identity=harness.keys[user], user=user,
                               server_key=harness.key.public)
        self.events: list = []

    async def connect(self) -> "RawClient":
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.h.port)
        self.conn.initiate(time.monotonic())
        self.flush()
        await self.until(lambda e: isinstance(e, HandshakeCompleted))
        return self

    def flush(self) -> None:
        data = self.conn.data_to_send()
        if data:
            self.writer.write(data)

    async def until(self, match, timeout: float = 20.0):
        """Read until an event ``match``es (returned); fails at EOF or after ``timeout``."""
        async def read():
            while True:
                for ev in self.events:
                    if match(ev):
                        return ev
                data = await self.reader.read(65536)
                if not data:
                    raise AssertionError(f"connection ended; events: {self.events}")
                self.events += self.conn.receive_data(data)
                self.flush()
        return await asyncio.wait_for(read(), timeout)

    def close(self) -> None:
        self.writer.close()


def abort_connection(writer: asyncio.StreamWriter) -> None:
    """Drop a TCP connection with a reset (SO_LINGER 0), as a crashed host's kernel would."""
    import struct
    sock = writer.get_extra_info("socket")
    if sock is not None:
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except OSError:
            pass
    writer.transport.abort()


class Net:
    """A small network of in-process nodes, each in its own folder under ``root``.

    ``node(name, services, **settings)`` starts one with :data:`NET_FAST` timings (settings
    are :class:`utesla_node.config.NodeConfig` fields) and user ``alice`` holding a token;
    ``link(a, b)`` is :func:`link`; ``kill(h)`` crashes a node (RST on every connection);
    ``restart(h)`` brings its folder back up on the same port; ``proxy(h)`` puts a
    ``faultproxy.FaultProxy`` in front of it.  ``close()`` stops everything.
    """

    def __init__(self, root: Path):
        self.root = Path(root)
        self.nodes: list[NodeHarness] = []
        self.proxies: list = []

    async def node(self, name: str, services: dict[str, str] | None = None, *,
                   examples: bool = False, user: str | None = "alice",
                   **settings) -> NodeHarness:
        for k, v in NET_FAST.items():
            settings.setdefault(k, v)
        h = NodeHarness(self.root / name, services, copy_examples=examples, **settings)
        h.name = name
        self.nodes.append(h)
        await h.start()
        if user:
            await h.add_user(user)
        return h

    async def restart(self, h: NodeHarness, **settings) -> NodeHarness:
        """The same folder (keys, database, services) on the same port."""
        for k, v in NET_FAST.items():
            settings.setdefault(k, v)
        settings.setdefault("port", h.port)
        new = NodeHarness(h.folder, copy_examples=False, **settings)
        new.name = h.name
        new.keys, new.tokens = dict(h.keys), dict(h.tokens)
        self.nodes.append(new)
        await new.start()
        return new

    async def link(self, a: NodeHarness, b: NodeHarness, **kw) -> str:
        return await link(a, b, **kw)

    async def proxy(self, target: NodeHarness, **kw):
        from faultproxy import FaultProxy     # tests/network/faultproxy.py
        p = await FaultProxy(target.port, **kw).start()
        self.proxies.append(p)
        return p

    async def kill(self, h: NodeHarness) -> None:
        """Crash ``h``: every connection reset at once, nothing said to anyone; then clean up."""
        node = h.node
        if node._server is not None:
            node._server.close()              # refuse new connections from now on
        for s in list(node.sessions):
            abort_connection(s.writer)
        if node.network is not None:
            for lk in node.network.links.values():
                if lk.session is not None:
                    abort_connection(lk.session.writer)
        node.config.grace_period = 0.1
        await node.stop("killed by the test")

    async def close(self) -> None:
        for p in self.proxies:
            try:
                await p.stop()
            except Exception:
                pass
        for h in reversed(self.nodes):
            try:
                await asyncio.wait_for(h.stop(), 15)
            except Exception:
                pass


async def register_user(config, name: str, password: str = "pw", key: PrivateKey | None = None,
                        **fields) -> PrivateKey:
    """Add a user straight into the database of a node's config (a running node sees it)."""
    from utesla_node.storage import open_storage
    key = key or user_key(tag=name)
    fields.setdefault("token_limit", 0)
    storage = open_storage(config.database_url or None, config.data_dir)
    await storage.open()
    try:
        await storage.add_user(User(
            name=name, password_hash=await auth.hash_password(password),
            public_key=key.public.to_pem(), created_at=time.time(), **fields), overwrite=True)
    finally:
        await storage.close()
    return key


def folder_config(folder: Path, *args) -> "object":
    """The configuration ``utesla-node`` would use when run in ``folder`` with ``args``
    (only ``--config FILE`` is understood)."""
    folder = Path(folder)
    path = None
    if "--config" in args:
        path = folder / args[args.index("--config") + 1]
    elif (folder / "node.ini").is_file():
        path = folder / "node.ini"
    cfg = load_config(path)
    if path is None:
        cfg.base_dir = folder
    return cfg


#: Services several tests use (besides the examples copied from complements/).
GATE_SERVICE = """
    import asyncio

    GATES = {}

    def gate(name):
        return GATES.setdefault(name, asyncio.Event())

    class Handler:
        async def get(self):
            name = self.args.get("name", "g")
            if self.args.get("open"):
                gate(name).set()
                await self.write("opened")
                return
            await self.write("waiting ")
            await self.flush()
            await asyncio.wait_for(gate(name).wait(), float(self.args.get("max", 10)))
            await self.write("done")
"""

SLEEPY_SERVICE = """
    import asyncio

    class Handler:
        async def get(self):
            await asyncio.sleep(float(self.args["d"]))
            await self.write(str(self.args["i"]))
"""


# --------------------------------------------------------------------------- large transfers

def proc_status(pid: int, field: str = "VmRSS") -> int:
    """A size field of ``/proc/PID/status`` (``VmRSS``, ``VmHWM``, ...) in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


class SlowReaderProxy:
    """A TCP relay to ``127.0.0.1:target_port`` that reads what the node sends slowly.

    Client -> node bytes pass at once; node -> client bytes are read in pieces of at most
    ``piece`` bytes, at most ``rate`` bytes a second (None: no limit), and not at all
    while :meth:`pause` is in force.  The relay buffers at most a couple of pieces per
    connection (small StreamReader limits), so to the node it is a slow reader, and the
    node's own buffering is what a test measures.
    """

    def __init__(self, target_port: int, *, rate: float | None = None, piece: int = 16384):
        self.target_port = target_port
        self.rate = rate
        self.piece = piece
        self.relayed = 0                       # node -> client bytes passed on
        self._open = asyncio.Event()
        self._open.set()
        self._server: asyncio.base_events.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> "SlowReaderProxy":
        self._server = await asyncio.start_server(self._on_connect, "127.0.0.1", 0,
                                                  limit=self.piece)
        return self

    @property
    def port(self) -> int:
        return self._server.sockets[0].getsockname()[1]

    @property
    def url(self) -> str:
        return f"utesla://127.0.0.1:{self.port}"

    def pause(self) -> None:
        self._open.clear()

    def resume(self) -> None:
        self._open.set()

    async def _on_connect(self, creader, cwriter) -> None:
        try:
            nreader, nwriter = await asyncio.open_connection("127.0.0.1", self.target_port,
                                                             limit=self.piece)
        except OSError:
            cwriter.close()
            return
        self._writers += [cwriter, nwriter]
        for coro in (self._pipe(creader, nwriter, slow=False),
                     self._pipe(nreader, cwriter, slow=True)):
            t = asyncio.get_running_loop().create_task(coro)
            self._tasks.add(t)
            t.add_done_callback(self._tasks.discard)

    async def _pipe(self, reader, writer, slow: bool) -> None:
        try:
            while True:
                if slow:
                    await self._open.wait()
                data = await reader.read(self.piece if slow else 1 << 16)
                if not data:
                    break
                writer.write(data)
                await writer.drain()
                if slow:
                    self.relayed += len(data)
                    if self.rate:
                        await asyncio.sleep(len(data) / self.rate)   # the rate limit itself
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in self._writers:
            w.transport.abort()
        for t in list(self._tasks):
            t.cancel()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=5)


# --------------------------------------------------------------------------- shared fixtures
def examples(*names: str) -> dict[str, str]:
    """Services from the project's complements/, by name: {name: source}."""
    return {n: (REPO / "complements" / f"{n}.py").read_text() for n in names}


def fp(h: "NodeHarness") -> str:
    """A node's id (its key's fingerprint): what WHOAMI_SERVICE answers."""
    return h.key.public.fingerprint()


async def pair(net: "Net", services: dict[str, str], **settings):
    """Node ``a`` (no services; ``settings``) linked to node ``b`` (``services``), once
    ``a`` routes every one of them."""
    a = await net.node("a", **settings)
    b = await net.node("b", services)
    await net.link(a, b)
    await wait_for(lambda: all(routes(a, s) for s in services), 10)
    return a, b


async def preferred_and_backup(net: "Net", **settings):
    """Node ``a`` linked to two WHOAMI replicas: ``b`` preferred (priority 0) and ``c``
    (priority 5); returns (a, b, c) once ``a`` knows both routes."""
    a = await net.node("a", **settings)
    b = await net.node("b", {"whoami": WHOAMI_SERVICE})
    c = await net.node("c", {"whoami": WHOAMI_SERVICE})
    await net.link(a, b, priority=0)
    await net.link(a, c, priority=5)
    await wait_for(lambda: len(routes(a, "whoami")) == 2, 10)
    return a, b, c


def settled(entry: "NodeHarness") -> bool:
    """The entry node's forwarding books balance: nothing in flight, no relay pending,
    nothing left on its links but their gossip subscriptions."""
    net = entry.node.network
    links = list(net.links.values())
    return (entry.node.inflight == 0 and entry.node.router.live == 0
            and all(l.inflight == 0 for l in links)
            and all(len(l.session.streams) <= 1 for l in links if l.session))


# Imported by tests/network/conftest.py and tests/transfer/conftest.py.

@pytest.fixture
def relays(monkeypatch):
    """Every network.router.Forward started from a session's read loop (the request
    forwarded without a dispatcher task), in order."""
    from utesla_node.network import router as router_mod
    made = []
    forward = router_mod.Router.forward
    init = router_mod.Forward.__init__
    taskless = []

    def spy_forward(self, *args, now=False, **kw):
        taskless.append(now)
        try:
            return forward(self, *args, now=now, **kw)
        finally:
            taskless.pop()

    def spy(self, *args, **kw):
        init(self, *args, **kw)
        if taskless and taskless[-1]:
            made.append(self)

    monkeypatch.setattr(router_mod.Router, "forward", spy_forward)
    monkeypatch.setattr(router_mod.Forward, "__init__", spy)
    return made


@pytest.fixture(autouse=True)
def no_asyncio_errors(caplog):
    """Fail a test whose nodes left asyncio errors behind (a task exception never
    retrieved, a callback that raised): they are bugs even when the test passed."""
    yield
    bad = [r for when in ("setup", "call", "teardown") for r in caplog.get_records(when)
           if r.name == "asyncio" and r.levelno >= logging.ERROR]
    assert not bad, "\n".join(r.getMessage() for r in bad)


@pytest.fixture
async def net(tmp_path):
    """A :class:`Net` of nodes in ``tmp_path``, all stopped when the test ends."""
    n = Net(tmp_path)
    try:
        yield n
    finally:
        await n.close()
