"""Fixtures for the large-transfer suite (issue 6): in-process nodes, networks of them,
and ``utesla-node`` subprocesses (where a test measures a node's memory).

Tests marked ``big`` move 256 MiB or more each: ``-m "not big"`` skips them.
"""
from __future__ import annotations


import pytest

from helpers import NodeHarness, NodeProcess, net, no_asyncio_errors  # noqa: F401


def pytest_configure(config):
    config.addinivalue_line("markers", "big: moves 256 MiB or more (skip with -m 'not big')")


@pytest.fixture
async def make_node(tmp_path):
    """``await make_node(**settings)``: an in-process node with the example services
    (sink, source, files, ...) and user ``alice`` holding a token."""
    made: list[NodeHarness] = []

    async def make(services: dict[str, str] | None = None, **settings) -> NodeHarness:
        settings.setdefault("request_timeout", 120.0)
        h = NodeHarness(tmp_path / f"node{len(made)}", services, **settings)
        made.append(h)
        await h.start()
        await h.add_user("alice")
        return h

    yield make
    for h in made:
        await h.stop()


@pytest.fixture
def procs():
    """NodeProcess objects appended here are killed (by their own PID) after the test."""
    started: list[NodeProcess] = []
    yield started
    for p in started:
        if p.proc is not None and p.proc.poll() is None:
            p.proc.kill()
            p.proc.wait()
        if p.proc is not None and p.proc.stdout is not None:
            p.proc.stdout.close()
