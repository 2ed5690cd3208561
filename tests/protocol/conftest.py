"""Fixtures for the sans-IO protocol suite.

The helpers themselves (``Pair``, ``shuttle``, key cache, raw record injection)
live in ``protocol_helpers.py`` so test modules and hypothesis strategies can
import them; this file turns them into fixtures.
"""
from __future__ import annotations

import pytest

from protocol_helpers import BACKEND_MATRIX, KEY_KINDS, Backends, Pair, key


@pytest.fixture(scope="session")
def keys():
    """``keys[kind, index]`` -> PrivateKey; RSA keys are generated once per session."""

    class _Keys:
        def __getitem__(self, item):
            kind, index = item if isinstance(item, tuple) else (item, 0)
            return key(kind, index)

    return _Keys()


@pytest.fixture(scope="session", autouse=True)
def _pregenerate_keys():
    """Generate every key kind up front, so no single test pays for RSA."""
    for kind in KEY_KINDS:
        key(kind, 0)
        key(kind, 1)


@pytest.fixture(params=BACKEND_MATRIX, ids=[b.id for b in BACKEND_MATRIX])
def backends(request) -> Backends:
    return request.param


@pytest.fixture
def make_pair(backends):
    """``make_pair(node="ed25519", user="ed25519", **Pair kwargs)`` over the backend matrix."""

    def _make(node: str = "ed25519", user: str = "ed25519", **kw) -> Pair:
        kw.setdefault("backends", backends)
        return Pair(key(node, 0), key(user, 1), **kw)

    return _make


@pytest.fixture
def pair() -> Pair:
    """An established Ed25519 pair with default settings and backends."""
    return Pair.established()
