"""Limits on repeated attempts: failure backoff per key, per-key token buckets.

Bookkeeping only, no asyncio and no sockets: the clock is passed in (``time.monotonic`` by
default), so tests move time by hand and the same objects serve any caller.

* :class:`Backoff` counts failures per key (a user, an address).  ``limit`` failures within
  ``window`` seconds lock the key out for ``backoff`` seconds; each further lockout lasts twice
  as long as the one before, up to ``backoff_max`` (fail2ban's ``bantime.increment``, OpenSSH's
  ``PerSourcePenalties``).  A guesser therefore gets ``limit`` tries per lockout, and lockouts
  grow until they are ``backoff_max`` long.
* :class:`AttemptLimiter` applies two of them, per user and per source address, to a costly
  check (a password): it also counts the attempts *in flight* against what is left, since 64
  concurrent guesses would otherwise all start before the first one fails.
* :class:`TokenBuckets` is the usual rate limit (``rate`` per second, bursts of ``burst``), per
  key, for limits that are about frequency rather than failure.

Every table is bounded (``max_keys``): when one is full, keys that no longer matter are dropped
first, then the least recently touched, so no number of sources can grow memory without bound.
(Eviction can forget a locked-out key; forcing that takes ``max_keys`` other keys, each of which
had to fail on its own first.)
"""
from __future__ import annotations

import collections
import ipaddress
import math
import time
from collections.abc import Callable, Hashable
from typing import NamedTuple

__all__ = ["Backoff", "AttemptLimiter", "Verdict", "TokenBuckets", "source_key"]

Clock = Callable[[], float]


def _positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive, finite number")
    return float(value)


def _count(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int")
    if value < 1:
        raise ValueError(f"{name} must be at least 1")
    return value


class _Entry:
    __slots__ = ("fails", "start", "until", "level", "last")

    def __init__(self, now: float):
        self.fails = 0          # failures in the window that began at ``start``
        self.start = now
        self.until = 0.0        # locked out before this time
        self.level = 0          # lockouts so far: the next lasts backoff * 2**level
        self.last = now         # time of the last failure


class Backoff:
    """Failures per key; too many in a window lock the key out (see the module docstring).

    A key is forgotten, its lockout level with it, once it has been quiet (not locked, no
    failure) for ``max(window, backoff_max)`` seconds, or at once by :meth:`reset` (a success).
    """

    def __init__(self, limit: int, window: float, backoff: float, backoff_max: float, *,
                 clock: Clock = time.monotonic, max_keys: int = 65536):
        self.limit = _count("limit", limit)
        self.window = _positive("window", window)
        self.backoff = _positive("backoff", backoff)
        self.backoff_max = _positive("backoff_max", backoff_max)
        if self.backoff_max < self.backoff:
            raise ValueError("backoff_max must be at least backoff")
        self.max_keys = _count("max_keys", max_keys)
        self.clock = clock
        self._forget_after = max(self.window, self.backoff_max)
        # Insertion order is recency order: a failure moves its key to the end.
        self._entries: dict[Hashable, _Entry] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def retry_after(self, key: Hashable) -> float:
        """Seconds until ``key`` may try again; 0.0 when it may now."""
        entry = self._entries.get(key)
        if entry is None:
            return 0.0
        return max(0.0, entry.until - self.clock())

    def failures(self, key: Hashable) -> int:
        """Failures of ``key`` in its current window (those before a lockout do not count)."""
        entry = self._entries.get(key)
        if entry is None or self.clock() - entry.start >= self.window:
            return 0
        return entry.fails

    def failed(self, key: Hashable) -> float:
        """Record a failure of ``key``; the lockout it starts (seconds), or 0.0 if none."""
        now = self.clock()
        entry = self._entries.pop(key, None)
        if entry is None:
            self._make_room(now)
            entry = _Entry(now)
        self._entries[key] = entry
        if now - entry.start >= self.window:
            entry.fails, entry.start = 0, now
        entry.fails += 1
        entry.last = now
        if entry.fails < self.limit:
            return 0.0
        lockout = min(self.backoff * 2.0 ** min(entry.level, 64), self.backoff_max)
        entry.level += 1
        entry.until = now + lockout
        # The count starts again when the lockout ends: failures of attempts that were
        # already running when it began count towards the next lockout, not this one.
        entry.fails, entry.start = 0, entry.until
        return lockout

    def reset(self, key: Hashable) -> None:
        """Forget ``key``: its failures, lockout and level (a success)."""
        self._entries.pop(key, None)

    def _quiet(self, entry: _Entry, now: float) -> bool:
        return now >= entry.until and now - max(entry.last, entry.until) >= self._forget_after

    def _make_room(self, now: float) -> None:
        if len(self._entries) < self.max_keys:
            return
        for key in [k for k, e in self._entries.items() if self._quiet(e, now)]:
            del self._entries[key]
        # Still full: drop the least recently failed eighth at once, so that a table kept
        # full is scanned once per max_keys / 8 new keys, not on every one.
        excess = len(self._entries) - self.max_keys * 7 // 8
        for key in list(self._entries)[:max(0, excess)]:
            del self._entries[key]


class Verdict(NamedTuple):
    """What :meth:`AttemptLimiter.admit` decided.

    ``action`` is ``"go"`` (admitted: report the outcome with :meth:`AttemptLimiter.done`),
    ``"wait"`` (the attempts in flight use up what is left: wait until one of ``key`` ends,
    then ask again) or ``"refuse"`` (``key`` is locked out for ``retry_after`` seconds).
    ``key`` is ``("user", name)`` or ``("address", source key)``.
    """

    action: str
    key: tuple[str, str] | None = None
    retry_after: float = 0.0


GO = Verdict("go")


def source_key(source: str | None) -> str | None:
    """The key an attempt from ``source`` is limited under: its address without the port.

    ``source`` is ``host:port`` as a session names its peer (``1.2.3.4:5678``, ``::1:5678``;
    ``[::1]:5678`` works too), or a bare IPv4 address.  IPv6 addresses are limited per /64,
    the block one customer usually holds, since a single host can pick any address in it;
    IPv4-mapped IPv6 addresses count as the IPv4 address.  Anything else (a Unix socket
    name) is used as it is, cut to 64 characters.
    """
    if source is None:
        return None
    text = str(source)
    host, sep, port = text.rpartition(":")
    candidates = (host.strip("[]"), text) if sep and port.isdigit() else (text,)
    for candidate in candidates:
        try:
            address = ipaddress.ip_address(candidate)
        except ValueError:
            continue
        if isinstance(address, ipaddress.IPv6Address):
            if address.ipv4_mapped is not None:
                return str(address.ipv4_mapped)
            return str(ipaddress.IPv6Network((address, 64), strict=False))
        return str(address)
    return text[:64]


class AttemptLimiter:
    """Attempts at a costly check, limited per user and per source address.

    An attempt first asks :meth:`admit`.  It is refused at once while its user or its address
    is locked out; it waits while failures plus attempts in flight have used up what that user
    (or address) has left, so a burst cannot run more guesses than the limit allows; otherwise
    it goes, and must report its outcome to :meth:`done`.

    A success forgets the user's failures, not the address's: one's own correct password must
    not wipe out failures made, from the same address, guessing someone else's.

    ``refused`` counts refusals by kind (``"user"``, ``"address"``) for the metrics;
    ``on_refused(kind)``, if set, is called on each one as well.
    """

    def __init__(self, users: Backoff, addresses: Backoff):
        self.users = users
        self.addresses = addresses
        self.running: collections.Counter[tuple[str, str]] = collections.Counter()
        self.refused: collections.Counter[str] = collections.Counter()
        self.on_refused: Callable[[str], None] | None = None

    def _keys(self, user: str, source: str | None):
        yield ("user", user), self.users
        address = source_key(source)
        if address is not None:
            yield ("address", address), self.addresses

    def admit(self, user: str, source: str | None = None) -> Verdict:
        """Decide on one attempt by ``user`` from ``source`` (see the class docstring)."""
        keys = list(self._keys(user, source))
        for key, table in keys:
            wait = table.retry_after(key[1])
            if wait > 0:
                self.refused[key[0]] += 1
                if self.on_refused is not None:
                    self.on_refused(key[0])
                return Verdict("refuse", key, wait)
        for key, table in keys:
            if table.failures(key[1]) + self.running[key] >= table.limit:
                return Verdict("wait", key)
        for key, _ in keys:
            self.running[key] += 1
        return GO

    def done(self, user: str, source: str | None, ok: bool | None) -> list[tuple[str, str]]:
        """An admitted attempt ended: ``ok`` True (success), False (failure) or None (no
        answer, e.g. the database was down: nothing is counted).  Returns the keys whose
        waiting attempts should ask again."""
        keys = list(self._keys(user, source))
        for key, table in keys:
            self.running[key] -= 1
            if self.running[key] <= 0:
                del self.running[key]
            if ok is False:
                table.failed(key[1])
        if ok:
            self.users.reset(user)
        return [key for key, _ in keys]


class TokenBuckets:
    """One token bucket per key: ``burst`` tokens, refilled at ``rate`` per second.

    :meth:`take` spends one token of ``key`` and returns 0.0, or returns how many seconds
    until one is available (and spends nothing).  A key whose bucket is full again holds no
    information and is the first to go when the table is full.
    """

    def __init__(self, rate: float, burst: int, *, clock: Clock = time.monotonic,
                 max_keys: int = 65536):
        self.rate = _positive("rate", rate)
        self.burst = _count("burst", burst)
        self.max_keys = _count("max_keys", max_keys)
        self.clock = clock
        self._buckets: dict[Hashable, tuple[float, float]] = {}  # key -> (tokens, at)

    def __len__(self) -> int:
        return len(self._buckets)

    def _level(self, key: Hashable, now: float) -> float:
        tokens, at = self._buckets.get(key, (float(self.burst), now))
        return min(float(self.burst), tokens + (now - at) * self.rate)

    def take(self, key: Hashable) -> float:
        now = self.clock()
        tokens = self._level(key, now)
        if tokens < 1.0:
            return (1.0 - tokens) / self.rate
        if key not in self._buckets and len(self._buckets) >= self.max_keys:
            self._make_room(now)
        self._buckets.pop(key, None)
        self._buckets[key] = (tokens - 1.0, now)
        return 0.0

    def _make_room(self, now: float) -> None:
        for key in [k for k in self._buckets if self._level(k, now) >= self.burst]:
            del self._buckets[key]
        excess = len(self._buckets) - self.max_keys * 7 // 8
        for key in list(self._buckets)[:max(0, excess)]:
            del self._buckets[key]
