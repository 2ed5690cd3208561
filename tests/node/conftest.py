"""Fixtures for the node suite: in-process nodes on port 0, each in its own folder.

``make_node(services=..., **settings)`` starts a :class:`helpers.NodeHarness` in the
test's event loop (settings are :class:`utesla_node.config.NodeConfig` fields, e.g.
``request_timeout=0.5``) with user ``alice`` registered and holding a token; every
node and client made is closed when the test ends.
"""
from __future__ import annotations

import logging

import pytest

from helpers import GATE_SERVICE, SLEEPY_SERVICE, NodeHarness


@pytest.fixture
async def make_node(tmp_path):
    made: list[NodeHarness] = []

    async def make(services: dict[str, str] | None = None, *, user: str = "alice",
                   **settings) -> NodeHarness:
        h = NodeHarness(tmp_path / f"node{len(made)}", services, **settings)
        made.append(h)
        await h.start()
        if user:
            await h.add_user(user)
        return h

    yield make
    for h in made:
        await h.stop()


@pytest.fixture
async def node(make_node):
    """A node with the examples, a gate and a sleepy service; alice is registered."""
    return await make_node({"gate": GATE_SERVICE, "sleepy": SLEEPY_SERVICE})


@pytest.fixture
def info_logs(caplog):
    caplog.set_level(logging.INFO)
    return caplog
