"""Fixtures for the network suite: several real in-process nodes on loopback port 0.

``net`` is a :class:`helpers.Net`: ``await net.node(name, services, **settings)`` starts a
node in its own folder with short gossip and heartbeat intervals, ``await net.link(a, b)``
makes ``a`` a subscriber of ``b`` as ``add_network`` would, ``await net.kill(h)`` crashes a
node, ``await net.proxy(h)`` puts a fault-injecting proxy in front of one.  Everything is
stopped when the test ends.

Test modules import what they share from ``helpers`` (never from this file: every test
folder's conftest is a module named ``conftest``, and only one of them can be imported
under that name at a time).
"""
from __future__ import annotations

from helpers import net, no_asyncio_errors, relays  # noqa: F401
