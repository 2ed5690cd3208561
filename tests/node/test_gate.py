"""The gate's caches: scopes checked per path, and the database-outage grace (issue 12.9)."""
from __future__ import annotations

import pytest

from protocol.crypto import PrivateKey
from utesla_node import auth
from utesla_node.errors import status_error
from utesla_node.gate import Gate
from utesla_node.metrics import Metrics
from utesla_node.storage import StorageUnavailable, User, open_storage


class Switchable:
    """A storage whose reads fail with StorageUnavailable while ``down``."""

    def __init__(self, inner):
        self.inner = inner
        self.down = False
        self.reads = 0

    def __getattr__(self, name):
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        async def call(*args, **kw):
            self.reads += 1
            if self.down:
                raise StorageUnavailable("connection refused (test)")
            return await attr(*args, **kw)
        return call


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
async def world(tmp_path):
    auth.set_scrypt_cost(10)
    inner = open_storage(None, tmp_path)
    await inner.open()
    key = PrivateKey.generate()
    await inner.add_user(User(name="alice", password_hash=await auth.hash_password("pw"),
                              public_key=key.public.to_pem()))
    storage = Switchable(inner)
    authority = auth.Authority(storage)
    token, _ = await authority.issue_token("alice")
    clock = Clock()
    yield storage, authority, token, clock
    await inner.close()
    auth.set_scrypt_cost(15)


def gate(world, grace: float) -> Gate:
    storage, authority, _, clock = world
    return Gate(storage, authority, Metrics(), cache_ttl=2.0, outage_grace=grace, clock=clock)


async def test_a_verified_token_outlives_a_database_outage_within_the_grace(world):
    storage, _, token, clock = world
    g = gate(world, grace=30.0)
    assert (await g.authorize("alice", token, "hello_world")).name == "alice"
    storage.down = True
    clock.now += 10                                  # past the cache's 2 s, within grace
    assert (await g.authorize("alice", token, "hello_world")).name == "alice"
    reads = storage.reads
    assert g.authorize_now("alice", token, "hello_world") is not None   # cached again
    await g.authorize("alice", token, "hello_world")
    assert storage.reads == reads                    # not asked again within the period
    clock.now += 40                                  # past 2 + 30 s since verified
    with pytest.raises(StorageUnavailable) as info:
        await g.authorize("alice", token, "hello_world")
    assert status_error(info.value).status == 503
    assert str(status_error(info.value)) == "database unavailable"
    storage.down = False                             # back: checked again, works
    assert (await g.authorize("alice", token, "hello_world")).name == "alice"


async def test_without_grace_an_outage_refuses_once_the_cache_is_stale(world):
    storage, _, token, clock = world
    g = gate(world, grace=0.0)
    await g.authorize("alice", token, "hello_world")
    storage.down = True
    assert g.authorize_now("alice", token, "x") is not None          # still fresh
    clock.now += 3
    with pytest.raises(StorageUnavailable):
        await g.authorize("alice", token, "hello_world")


async def test_a_token_never_seen_gets_503_during_an_outage(world):
    storage, _, token, clock = world
    g = gate(world, grace=300.0)
    storage.down = True
    with pytest.raises(StorageUnavailable):
        await g.authorize("alice", token, "hello_world")


async def test_a_user_key_outlives_an_outage_within_the_grace(world):
    storage, _, _, clock = world
    g = gate(world, grace=30.0)
    key = await g.user_key("alice")
    assert key is not None
    storage.down = True
    clock.now += 10
    assert await g.user_key("alice") == key
    clock.now += 40
    with pytest.raises(Exception) as info:
        await g.user_key("alice")
    assert info.value.status == 503


async def test_a_token_revoked_here_is_refused_even_during_an_outage(world):
    storage, _, token, clock = world
    g = gate(world, grace=300.0)
    await g.authorize("alice", token, "hello_world")
    g.forget_token(token)                            # revoked on this node
    storage.down = True
    with pytest.raises(StorageUnavailable):
        await g.authorize("alice", token, "hello_world")


async def test_the_cache_serves_steady_traffic_without_reads(world):
    storage, _, token, clock = world
    g = gate(world, grace=0.0)
    await g.authorize("alice", token, "hello_world")
    reads = storage.reads
    for _ in range(50):
        await g.authorize("alice", token, "hello_world")
    assert storage.reads == reads
