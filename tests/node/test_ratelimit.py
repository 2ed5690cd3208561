"""utesla_node.ratelimit: failure backoff, attempt limits per user and address, token buckets.

Pure bookkeeping driven by a hand-moved clock: no sleeping, no event loop.
"""
from __future__ import annotations

import pytest

from utesla_node.ratelimit import AttemptLimiter, Backoff, TokenBuckets, source_key


class Clock:
    def __init__(self, now: float = 1000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def backoff(clock: Clock, limit: int = 3, **kw) -> Backoff:
    kw.setdefault("window", 60.0)
    kw.setdefault("backoff", 10.0)
    kw.setdefault("backoff_max", 40.0)
    return Backoff(limit, clock=clock, **kw)


# --------------------------------------------------------------------------- Backoff

def test_limit_failures_lock_the_key_out_for_the_backoff(clock):
    b = backoff(clock)
    assert b.failed("alice") == 0.0 and b.failed("alice") == 0.0
    assert b.retry_after("alice") == 0.0 and b.failures("alice") == 2
    assert b.failed("alice") == 10.0
    assert b.retry_after("alice") == 10.0
    assert b.retry_after("bob") == 0.0          # keys are independent
    clock.now += 4
    assert b.retry_after("alice") == 6.0
    clock.now += 6
    assert b.retry_after("alice") == 0.0
    assert b.failures("alice") == 0             # the count started again after the lockout


def test_each_lockout_doubles_up_to_the_maximum_and_reset_forgets_it(clock):
    b = backoff(clock)
    lockouts = []
    for _ in range(5):
        for _ in range(2):
            assert b.failed("alice") == 0.0
        lockouts.append(b.failed("alice"))
        clock.now += lockouts[-1]
    assert lockouts == [10.0, 20.0, 40.0, 40.0, 40.0]
    b.reset("alice")                            # a success
    assert b.failures("alice") == 0
    for _ in range(2):
        b.failed("alice")
    assert b.failed("alice") == 10.0            # back to the first lockout


def test_failures_outside_the_window_do_not_add_up(clock):
    b = backoff(clock)
    b.failed("alice")
    b.failed("alice")
    clock.now += 60
    assert b.failures("alice") == 0
    assert b.failed("alice") == 0.0 and b.failed("alice") == 0.0
    assert b.retry_after("alice") == 0.0
    assert b.failed("alice") == 10.0


def test_a_quiet_key_is_forgotten_with_its_level(clock):
    b = backoff(clock, max_keys=4)
    for _ in range(3):
        b.failed("alice")
    assert b.retry_after("alice") == 10.0
    clock.now += 10 + 60                        # lockout over, then quiet for max(window, max)
    for key in "wxyz":                          # a full table drops quiet keys first
        b.failed(key)
    assert len(b) == 4
    for _ in range(2):
        b.failed("alice")
    assert b.failed("alice") == 10.0            # level 0 again: alice had been forgotten


def test_a_full_table_drops_quiet_keys_before_a_locked_one(clock):
    b = backoff(clock, max_keys=64, backoff=100.0, backoff_max=100.0)
    for i in range(63):
        b.failed(f"old{i}")                     # one failure each at t0
    clock.now += 50
    for _ in range(3):
        b.failed("locked")                      # locked until t0 + 150
    clock.now += 51                             # the old keys are now quiet for 100 s
    for i in range(20):
        b.failed(f"new{i}")
    assert len(b) == 21
    assert b.retry_after("locked") == pytest.approx(49.0)


def test_the_table_stays_bounded_under_a_flood_of_keys(clock):
    b = backoff(clock, max_keys=64)
    for i in range(10_000):                     # many sources, one failure each, no time
        b.failed(f"new{i}")
        assert len(b) <= 64
    assert b.failures("new9999") == 1           # the most recent ones are remembered


def test_backoff_rejects_bad_settings(clock):
    for bad in ({"limit": 0}, {"window": 0}, {"backoff": float("inf")},
                {"backoff_max": -1}, {"backoff": 50.0, "backoff_max": 40.0}):
        with pytest.raises((ValueError, TypeError)):
            backoff(clock, **bad)
    with pytest.raises(TypeError):
        backoff(clock, limit=True)


# --------------------------------------------------------------------------- AttemptLimiter

def limiter(clock: Clock, per_user: int = 3, per_address: int = 5) -> AttemptLimiter:
    return AttemptLimiter(backoff(clock, per_user), backoff(clock, per_address))


def fail(lim: AttemptLimiter, user: str, source: str | None) -> None:
    assert lim.admit(user, source).action == "go"
    lim.done(user, source, False)


def test_a_user_is_locked_out_after_its_limit_then_let_in_again(clock):
    lim = limiter(clock)
    for _ in range(3):
        fail(lim, "alice", "10.0.0.1:1000")
    verdict = lim.admit("alice", "10.0.0.2:1000")   # another address: still alice
    assert verdict.action == "refuse" and verdict.key == ("user", "alice")
    assert verdict.retry_after == 10.0
    assert lim.refused == {"user": 1}
    assert lim.admit("bob", "10.0.0.1:1001").action == "go"   # the address is not locked
    clock.now += 10
    assert lim.admit("alice", "10.0.0.1:1000").action == "go"


def test_an_address_is_locked_out_for_every_user_after_its_limit(clock):
    lim = limiter(clock)
    seen = []
    lim.on_refused = seen.append
    for i in range(5):                          # five users, one failure each, one address
        fail(lim, f"user{i}", f"192.0.2.7:{4000 + i}")
    verdict = lim.admit("carol", "192.0.2.7:5000")
    assert verdict.action == "refuse" and verdict.key == ("address", "192.0.2.7")
    assert lim.admit("carol", "192.0.2.8:5000").action == "go"   # carol elsewhere: fine
    assert lim.refused == {"address": 1} and seen == ["address"]
    clock.now += 10
    assert lim.admit("dave", "192.0.2.7:5001").action == "go"


def test_a_success_resets_the_user_but_not_the_address(clock):
    lim = limiter(clock, per_user=3, per_address=4)
    for _ in range(2):
        fail(lim, "alice", "192.0.2.7:1")
    assert lim.admit("alice", "192.0.2.7:1").action == "go"
    lim.done("alice", "192.0.2.7:1", True)
    for _ in range(2):                          # two more: alice is not locked (reset)...
        fail(lim, "alice", "192.0.2.8:1")
    assert lim.admit("alice", "192.0.2.9:1").action == "go"
    lim.done("alice", "192.0.2.9:1", None)      # no answer (database down): not counted
    assert lim.users.failures("alice") == 2
    fail(lim, "bob", "192.0.2.7:2")             # ...but 192.0.2.7 kept its two failures
    fail(lim, "bob", "192.0.2.7:2")
    assert lim.admit("zoe", "192.0.2.7:3").key == ("address", "192.0.2.7")


def test_attempts_in_flight_count_against_what_is_left(clock):
    lim = limiter(clock)
    for _ in range(3):
        assert lim.admit("alice", "10.0.0.1:1").action == "go"
    verdict = lim.admit("alice", "10.0.0.1:1")
    assert verdict.action == "wait" and verdict.key == ("user", "alice")
    woken = lim.done("alice", "10.0.0.1:1", True)   # one ends well: the others may go on
    assert ("user", "alice") in woken and ("address", "10.0.0.1") in woken
    assert lim.admit("alice", "10.0.0.1:1").action == "go"
    for _ in range(3):
        lim.done("alice", "10.0.0.1:1", False)
    assert lim.admit("alice", "10.0.0.1:1").action == "refuse"
    assert not lim.running                      # nothing leaks


def test_no_source_means_no_address_limit(clock):
    lim = limiter(clock, per_user=100, per_address=1)
    fail(lim, "alice", None)
    fail(lim, "bob", None)
    assert lim.admit("carol", None).action == "go"


@pytest.mark.parametrize("source,key", [
    ("192.0.2.1:5000", "192.0.2.1"),
    ("192.0.2.1", "192.0.2.1"),
    ("::1:5000", "::/64"),
    ("[2001:db8:1:2::7]:443", "2001:db8:1:2::/64"),
    ("2001:db8:1:2:aaaa::9:443", "2001:db8:1:2::/64"),   # same /64: one key
    ("::ffff:192.0.2.1:80", "192.0.2.1"),
    ("?:0", "?:0"),
    (None, None),
])
def test_source_key(source, key):
    assert source_key(source) == key


# --------------------------------------------------------------------------- TokenBuckets

def test_token_buckets_allow_bursts_then_the_rate(clock):
    t = TokenBuckets(rate=2.0, burst=3, clock=clock)
    assert [t.take("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert t.take("a") == pytest.approx(0.5)
    assert t.take("b") == 0.0                   # per key
    clock.now += 0.5
    assert t.take("a") == 0.0
    assert t.take("a") == pytest.approx(0.5)
    clock.now += 100
    assert [t.take("a") for _ in range(4)][:3] == [0.0, 0.0, 0.0]   # never more than burst


def test_token_buckets_stay_bounded(clock):
    t = TokenBuckets(rate=1.0, burst=1, clock=clock, max_keys=100)
    for i in range(5000):
        assert t.take(i) == 0.0
        assert len(t) <= 100
    assert t.take(4999) > 0                     # the most recent keys are remembered
