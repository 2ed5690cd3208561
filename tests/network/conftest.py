"""Fixtures for the network suite: several real in-process nodes on loopback port 0.

``net.node(name, services, **settings)`` starts a :class:`helpers.NodeHarness` in its
own folder with short gossip and heartbeat intervals (settings are
:class:`utesla_node.config.NodeConfig` fields) and user ``alice`` holding a token;
``net.link(a, b)`` makes ``a`` a subscriber of ``b`` (see :func:`helpers.link`);
``net.kill(h)`` makes a node vanish abruptly (RST on every connection) as a crash
would.  Every node, client and proxy made is stopped when the test ends.
"""
from __future__ import annotations

import asyncio
import contextlib
import logging

import pytest

from faultproxy import FaultProxy
from helpers import NodeHarness, link
from faultproxy import _abort  # noqa: E402

#: Fast enough that failures show within a second or two, slow enough to stay quiet.
FAST = {"gossip_interval": 0.2, "heartbeat_interval": 0.3, "handshake_timeout": 2.0}

#: Answers with the fingerprint of the node that ran it (who served a forwarded request).
WHOAMI = """
    import asyncio

    class Handler:
        async def get(self):
            delay = float(self.args.get("delay", 0))
            if delay:
                await asyncio.sleep(min(delay, 5))
            await self.write(self.node.key.public.fingerprint())
"""

#: Streams ``n`` numbered lines, ``delay`` seconds apart (bounded: n <= 2000, delay <= 0.2).
TICKER = """
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

#: What a handler saw: user, path, subpath, arguments.
INSPECT = """
    class Handler:
        async def get(self):
            await self.write({"user": self.user, "path": self.path, "subpath": self.subpath,
                              "args": self.args, "node": self.node.key.public.fingerprint()})
"""

COUNTDOWN_AND_ECHO = ("countdown", "echo")


class Net:
    """A small network of in-process nodes (see the module docstring)."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.nodes: list[NodeHarness] = []
        self.proxies: list[FaultProxy] = []

    async def node(self, name: str, services: dict[str, str] | None = None, *,
                   examples: bool = False, user: str | None = "alice",
                   **settings) -> NodeHarness:
        for k, v in FAST.items():
            settings.setdefault(k, v)
        h = NodeHarness(self.tmp_path / name, services, copy_examples=examples, **settings)
        h.name = name
        self.nodes.append(h)
        await h.start()
        if user:
            await h.add_user(user)
        return h

    async def restart(self, h: NodeHarness, **settings) -> NodeHarness:
        """The same folder (keys, database) on the same port, as a fresh process would."""
        for k, v in FAST.items():
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

    async def proxy(self, target: NodeHarness, **kw) -> FaultProxy:
        p = await FaultProxy(target.port, **kw).start()
        self.proxies.append(p)
        return p

    async def kill(self, h: NodeHarness) -> None:
        """Crash ``h``: every connection reset at once, nothing said to anyone, then cleanup."""
        node = h.node
        node.stopping = True                  # refuse new connections from now on
        if node._server is not None:
            node._server.close()
        for s in list(node.sessions):
            _abort(s.writer)
        if node.network is not None:
            for lk in node.network.links.values():
                if lk.session is not None:
                    _abort(lk.session.writer)
        node.stopping = False
        node.config.grace_period = 0.1
        await node.stop("killed by the test")

    async def close(self) -> None:
        for p in self.proxies:
            with contextlib.suppress(Exception):
                await p.stop()
        for h in reversed(self.nodes):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(h.stop(), 15)


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
    n = Net(tmp_path)
    try:
        yield n
    finally:
        await n.close()


@pytest.fixture
def info_logs(caplog):
    caplog.set_level(logging.INFO)
    return caplog
