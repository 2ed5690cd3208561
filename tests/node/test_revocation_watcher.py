"""The revocation watcher alone, with a fake storage and fake sessions (issue 17 item 6).

What it must do each look: read the keys of the users with open sessions in one storage
call, close (CLOSE 401, a reason naming what happened) the sessions of removed users and
of changed keys, drop the gate's cache for those users first, and leave every other
session alone; judge no session that authenticated while it was reading; close nothing
while the database is down.  The node-level tests (real ``utesla-cli`` against a node)
are in test_revocation.py.
"""
from __future__ import annotations

import asyncio
import logging

import pytest

from helpers import user_key, wait_for
from protocol.errors import Status
from utesla_node.metrics import Metrics
from utesla_node.revocation import KEY_CHANGED, REMOVED, RevocationWatcher
from utesla_node.storage import StorageUnavailable

ALICE, BOB, CAROL = (user_key(tag=n).public for n in ("alice", "bob", "carol"))


class FakeSession:
    """What the watcher uses of a transport Session."""

    def __init__(self, user: str | None, key=None):
        self.peer_user = user
        self.peer_key = key
        self.peer_address = "127.0.0.1"
        self.is_open = True
        self.closed_with: tuple[int, str] | None = None

    def close(self, status: int, reason: str) -> None:
        assert self.is_open, "closed twice"
        self.is_open = False
        self.closed_with = (status, reason)


class FakeStorage:
    """``user_keys`` over a dict; counts calls; may fail or run code during the read."""

    def __init__(self, users: dict[str, str]):
        self.users = users
        self.calls: list[set[str]] = []
        self.fail = False
        self.during_read = None

    async def user_keys(self, names) -> dict[str, str]:
        names = set(names)
        self.calls.append(names)
        if self.fail:
            raise StorageUnavailable("database unavailable")
        snapshot = {n: self.users[n] for n in names if n in self.users}
        if self.during_read is not None:
            await asyncio.sleep(0)
            self.during_read()
        return snapshot


def watcher(storage: FakeStorage, sessions: list, interval: float = 0.5):
    forgotten: list[str] = []
    metrics = Metrics()
    w = RevocationWatcher(storage, lambda: sessions, forget_user=forgotten.append,
                          interval=interval, metrics=metrics)
    return w, forgotten, metrics


async def test_removed_user_and_changed_key_close_their_sessions_only():
    storage = FakeStorage({"alice": ALICE.to_pem(), "bob": BOB.to_pem(),
                           "carol": CAROL.to_pem()})
    alice1, alice2 = FakeSession("alice", ALICE), FakeSession("alice", ALICE)
    bob, carol = FakeSession("bob", BOB), FakeSession("carol", CAROL)
    handshaking = FakeSession(None)
    sessions = [alice1, alice2, bob, carol, handshaking]
    w, forgotten, metrics = watcher(storage, sessions)

    assert await w.check() == 0                      # nothing changed: nothing closed
    assert storage.calls == [{"alice", "bob", "carol"}]  # one read, the open users only
    assert forgotten == []

    del storage.users["alice"]                       # utesla-cli del alice
    storage.users["bob"] = CAROL.to_pem()            # utesla-cli set-key -u bob
    assert await w.check() == 3
    assert alice1.closed_with == alice2.closed_with == (Status.UNAUTHORIZED, REMOVED)
    assert bob.closed_with == (Status.UNAUTHORIZED, KEY_CHANGED)
    assert REMOVED == "credentials revoked: user removed"
    assert KEY_CHANGED == "credentials revoked: key changed"
    assert carol.is_open and handshaking.is_open
    assert sorted(forgotten) == ["alice", "bob"]     # once per user, before closing
    assert metrics.counters["sessions_revoked"] == 3

    assert await w.check() == 0                      # closed sessions are not judged again
    assert storage.calls[-1] == {"carol"}


async def test_the_same_key_written_differently_is_not_a_change():
    # Compared as keys (DER), not as text: a PEM with other line breaks is the same key.
    pem = ALICE.to_pem()
    body = "".join(pem.splitlines()[1:-1])
    storage = FakeStorage({"alice": f"-----BEGIN PUBLIC KEY-----\n{body}\n"
                                    "-----END PUBLIC KEY-----\n"})
    alice = FakeSession("alice", ALICE)
    w, forgotten, _ = watcher(storage, [alice])
    assert await w.check() == 0 and alice.is_open and forgotten == []
    storage.users["alice"] = "not a key at all"      # an unusable stored key matches nothing
    assert await w.check() == 1
    assert alice.closed_with == (Status.UNAUTHORIZED, KEY_CHANGED)


async def test_a_session_that_authenticates_during_the_read_is_not_judged_by_it():
    # The read saw the old key; a session opened meanwhile with the new one must stay open.
    storage = FakeStorage({"alice": ALICE.to_pem()})
    old = FakeSession("alice", ALICE)
    sessions = [old]
    w, _, _ = watcher(storage, sessions)
    new = FakeSession("alice", BOB)

    def set_key_then_reconnect():
        storage.users["alice"] = BOB.to_pem()
        sessions.append(new)

    storage.during_read = set_key_then_reconnect
    assert await w.check() == 0
    assert old.is_open and new.is_open
    storage.during_read = None
    assert await w.check() == 1                      # the next look sees the change
    assert old.closed_with == (Status.UNAUTHORIZED, KEY_CHANGED) and new.is_open


async def test_nothing_is_closed_while_the_database_is_down(caplog):
    caplog.set_level(logging.INFO, "utesla.node")
    storage = FakeStorage({})
    alice = FakeSession("alice", ALICE)
    w, forgotten, _ = watcher(storage, [alice])
    storage.fail = True
    assert await w.check() == 0
    assert await w.check() == 0
    assert alice.is_open and forgotten == []
    warnings = [r for r in caplog.records if "cannot check open sessions" in r.getMessage()]
    assert len(warnings) == 1                        # said once per outage, not every look
    storage.fail = False
    assert await w.check() == 1                      # back: the removal is seen
    assert alice.closed_with == (Status.UNAUTHORIZED, REMOVED)
    assert any("again" in r.getMessage() for r in caplog.records)


async def test_no_sessions_no_read():
    storage = FakeStorage({})
    w, _, _ = watcher(storage, [FakeSession(None)])
    assert await w.check() == 0
    assert storage.calls == []


async def test_the_watch_runs_every_interval_until_stopped():
    storage = FakeStorage({"alice": ALICE.to_pem()})
    alice = FakeSession("alice", ALICE)
    w, _, _ = watcher(storage, [alice], interval=0.01)
    w.start()
    task = w._task
    try:
        await wait_for(lambda: len(storage.calls) >= 3, 10)
        del storage.users["alice"]
        await wait_for(lambda: not alice.is_open, 10)
        assert alice.closed_with == (Status.UNAUTHORIZED, REMOVED)
    finally:
        await w.stop()
    assert task.done() and w._task is None


async def test_interval_zero_never_looks():
    storage = FakeStorage({})
    w, _, _ = watcher(storage, [FakeSession("alice", ALICE)], interval=0)
    w.start()
    assert w._task is None
    await w.stop()
