"""Password attempts under load (utesla_node.auth): a fair scrypt queue, limits with backoff.

Against real storage on both backends.  Order is asserted, never time: scrypt is replaced by a
gate the test opens one run at a time (oldest first), and the limiter's clock is moved by hand.
"""
from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from utesla_node import auth
from utesla_node.auth import (
    Authority, TooManyAttempts, Unauthorized, hash_password, password_limiter, set_scrypt_cost,
)
from utesla_node.config import NodeConfig
from utesla_node.storage import Storage, StorageUnavailable, User


@pytest.fixture(autouse=True)
def cheap_scrypt() -> Iterator[None]:
    set_scrypt_cost(10)
    yield
    set_scrypt_cost(15)


class Clock:
    def __init__(self, now: float = 5000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def make_authority(storage: Storage, clock: Clock | None = None, **limits: Any) -> Authority:
    return Authority(storage, limiter=password_limiter(NodeConfig(**limits),
                                                       clock=clock or time.monotonic))


async def add_users(storage: Storage, *names: str) -> None:
    for name in names:
        await storage.add_user(User(name=name, password_hash=await hash_password(f"{name}-pw"),
                                    public_key="PEM", created_at=0.0))


async def until(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Wait (event loop turns, bounded) until ``condition()`` holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


class GatedScrypt:
    """Stands in for scrypt: records each run's password as it starts, then waits until the
    test lets it finish (and computes the real thing, so passwords still match).  ``finish``
    lets the runs finish in the order they started, so what starts next is the pool's choice
    alone."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch):
        self.real = auth._scrypt
        self.cond = threading.Condition()
        self.started: list[bytes] = []
        self.finishing = 0                      # runs allowed to finish, oldest first
        self.start_signal = threading.Semaphore(0)
        monkeypatch.setattr(auth, "_scrypt", self)

    def __call__(self, password: bytes, *args: Any, **kwargs: Any) -> bytes:
        with self.cond:
            index = len(self.started)
            self.started.append(password)
            self.start_signal.release()
            assert self.cond.wait_for(lambda: index < self.finishing, timeout=60), \
                "the test never let this run finish"
        return self.real(password, *args, **kwargs)

    async def next_start(self) -> bytes:
        """Wait for the next run to start; its password."""
        assert await asyncio.to_thread(self.start_signal.acquire, True, 60)
        with self.cond:
            return self.started[-1]

    def finish(self, runs: int = 1) -> None:
        with self.cond:
            self.finishing += runs
            self.cond.notify_all()


async def test_a_flood_of_wrong_passwords_does_not_queue_another_user_behind_it(
    storage: Storage, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Bob's check takes the next free scrypt slot, ahead of Alice's 30 queued guesses."""
    await add_users(storage, "alice", "bob")
    authority = make_authority(storage, max_password_failures=1000,
                               max_password_failures_per_ip=1000)   # fairness alone here
    scrypt = GatedScrypt(monkeypatch)
    pool = auth._get_pool()
    flood = [asyncio.create_task(authority.check_password("alice", f"wrong-{i}", "10.0.0.1:1"))
             for i in range(32)]
    assert {await scrypt.next_start(), await scrypt.next_start()} <= {
        f"wrong-{i}".encode() for i in range(32)}
    await until(lambda: pool.queued("alice") == 30)
    bob = asyncio.create_task(authority.check_password("bob", "bob-pw", "10.0.0.2:1"))
    await until(lambda: pool.queued("bob") == 1)
    alice_runs_before_bob = 0
    while True:
        scrypt.finish()                           # one run ends: one slot is free
        if await scrypt.next_start() == b"bob-pw":
            break
        alice_runs_before_bob += 1
    assert alice_runs_before_bob == 0
    scrypt.finish(2)                              # bob's run, and one of alice's
    assert (await bob).name == "bob"
    scrypt.finish(32)
    results = await asyncio.gather(*flood, return_exceptions=True)
    assert all(isinstance(r, Unauthorized) for r in results)
    assert pool.busy == 0 and pool.queued() == 0


async def test_the_slots_go_round_robin_between_flooding_users(
    storage: Storage, monkeypatch: pytest.MonkeyPatch,
) -> None:
    await add_users(storage, "alice", "bob", "carol")
    authority = make_authority(storage, max_password_failures=1000,
                               max_password_failures_per_ip=1000)
    scrypt = GatedScrypt(monkeypatch)
    pool = auth._get_pool()
    tasks = [asyncio.create_task(authority.check_password("alice", f"a{i}")) for i in range(8)]
    await scrypt.next_start()
    await scrypt.next_start()
    await until(lambda: pool.queued("alice") == 6)
    tasks += [asyncio.create_task(authority.check_password(name, f"{name[0]}{i}"))
              for name in ("bob", "carol") for i in range(6)]
    await until(lambda: pool.queued() == 18)
    order = []
    for _ in range(18):
        scrypt.finish()
        order.append((await scrypt.next_start())[:1].decode())
    # Bob first (the one with nothing going), then all three by turns.
    assert order[0] == "b"
    for i in range(15):
        assert sorted(order[i:i + 3]) == ["a", "b", "c"], order
    scrypt.finish(64)
    await asyncio.gather(*tasks, return_exceptions=True)
    assert pool.busy == 0


async def test_a_cancelled_check_keeps_its_slot_until_scrypt_returns(
    storage: Storage, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Giving up on a check does not free its slot early: the thread is still computing."""
    await add_users(storage, "alice")
    authority = make_authority(storage)
    scrypt = GatedScrypt(monkeypatch)
    pool = auth._get_pool()
    first = asyncio.create_task(authority.check_password("alice", "one"))
    second = asyncio.create_task(authority.check_password("alice", "two"))
    await scrypt.next_start()
    await scrypt.next_start()
    third = asyncio.create_task(authority.check_password("alice", "three"))
    await until(lambda: pool.queued("alice") == 1)
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    assert pool.busy == 2 and pool.queued("alice") == 1
    scrypt.finish()                               # a run returns: now the third may start
    assert await scrypt.next_start() == b"three"
    scrypt.finish(2)
    for task in (second, third):
        with pytest.raises(Unauthorized):
            await task
    await until(lambda: pool.busy == 0)


async def test_a_burst_runs_only_the_limits_worth_of_guesses(
    storage: Storage, monkeypatch: pytest.MonkeyPatch,
) -> None:
    await add_users(storage, "alice")
    clock = Clock()
    authority = make_authority(storage, clock, max_password_failures=5, password_backoff=30.0)
    runs = []
    real = auth._scrypt
    monkeypatch.setattr(auth, "_scrypt", lambda pw, *a, **kw: runs.append(pw) or real(pw, *a, **kw))
    results = await asyncio.gather(
        *(authority.check_password("alice", f"wrong-{i}", "10.0.0.1:1") for i in range(32)),
        return_exceptions=True)
    kinds = collections.Counter(type(r).__name__ for r in results)
    assert kinds == {"Unauthorized": 5, "TooManyAttempts": 27}
    assert len(runs) == 5                       # the 27 others cost no scrypt run
    refused = next(r for r in results if isinstance(r, TooManyAttempts))
    assert refused.status == 429 and refused.retry_after == 30
    assert "try again in 30 s" in str(refused)
    assert authority.limiter.refused == {"user": 27}
    # Even the right password is refused during the backoff...
    with pytest.raises(TooManyAttempts):
        await authority.check_password("alice", "alice-pw", "10.0.0.2:1")
    clock.now += 30
    # ...and accepted after it; the success forgets the failures.
    assert (await authority.check_password("alice", "alice-pw", "10.0.0.2:1")).name == "alice"
    assert authority.limiter.users.failures("alice") == 0


async def test_an_address_is_refused_for_every_user_after_its_limit(storage: Storage) -> None:
    await add_users(storage, "alice", "bob", "carol")
    clock = Clock()
    authority = make_authority(storage, clock, max_password_failures=5,
                               max_password_failures_per_ip=4, password_backoff=60.0,
                               password_backoff_max=600.0)
    for name in ("alice", "bob"):
        for _ in range(2):
            with pytest.raises(Unauthorized):
                await authority.check_password(name, "wrong", "198.51.100.7:4000")
    with pytest.raises(TooManyAttempts) as refused:
        await authority.check_password("carol", "carol-pw", "198.51.100.7:4001")
    assert refused.value.kind == "address" and refused.value.retry_after == 60
    assert "from this address" in str(refused.value)
    # Carol from elsewhere is fine; so is the address once the backoff is over.
    assert (await authority.check_password("carol", "carol-pw", "198.51.100.8:1")).name == "carol"
    clock.now += 60
    assert (await authority.check_password("carol", "carol-pw", "198.51.100.7:1")).name == "carol"
    for name in ("alice", "bob"):               # the next lockout of the address is longer
        for _ in range(2):
            with pytest.raises(Unauthorized):
                await authority.check_password(name, "wrong", "198.51.100.7:4000")
    with pytest.raises(TooManyAttempts) as again:
        await authority.check_password("carol", "carol-pw", "198.51.100.7:4001")
    assert again.value.retry_after == 120
    assert authority.limiter.refused == {"address": 2}


async def test_concurrent_right_passwords_beyond_the_limit_all_succeed(storage: Storage) -> None:
    """Checks beyond what the limit leaves wait for those in flight rather than fail."""
    await add_users(storage, "alice")
    authority = make_authority(storage, max_password_failures=2)
    users = await asyncio.gather(*(authority.check_password("alice", "alice-pw", "10.0.0.1:1")
                                   for _ in range(12)))
    assert [u.name for u in users] == ["alice"] * 12
    assert not authority.limiter.running and not authority._waiters


async def test_a_database_outage_is_not_counted_as_a_failure(storage: Storage) -> None:
    await add_users(storage, "alice")
    authority = make_authority(storage, max_password_failures=1)
    await storage.close()
    for _ in range(3):
        with pytest.raises(StorageUnavailable):
            await authority.check_password("alice", "alice-pw", "10.0.0.1:1")
    assert authority.limiter.users.failures("alice") == 0
    assert not authority.limiter.running
