"""Request deadlines in one timer wheel, not a timer handle per request.

Nearly every request ends long before its deadline, so what matters is what a
deadline costs to set and to clear: here a set insertion and a set removal.  Entries
are kept in buckets of ``resolution`` seconds; one loop timer is armed for the
earliest non-empty bucket, so an idle node has no timer at all and a busy one has
one.  A deadline fires at most ``resolution`` late, never early.
"""
from __future__ import annotations

import asyncio
import math
import weakref
from typing import Callable

__all__ = ["Deadlines", "for_loop"]

_wheels: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Deadlines]" = \
    weakref.WeakKeyDictionary()


def for_loop(loop: asyncio.AbstractEventLoop) -> "Deadlines":
    """The wheel of ``loop`` (one per loop, made on first use)."""
    wheel = _wheels.get(loop)
    if wheel is None:
        wheel = _wheels[loop] = Deadlines(loop)
    return wheel


class _Entry:
    __slots__ = ("when", "callback", "arg", "bucket")

    def __init__(self, when: float, callback, arg, bucket: int):
        self.when = when
        self.callback = callback
        self.arg = arg
        self.bucket = bucket


class Deadlines:
    """``add(when, callback[, arg])`` calls ``callback()`` (``callback(arg)``) once the
    loop's clock passes ``when`` (``loop.time()`` seconds), unless ``cancel(entry)`` came
    first.  (``arg`` spares the caller a closure per deadline.)"""

    def __init__(self, loop: asyncio.AbstractEventLoop, resolution: float = 0.01):
        self.loop = loop
        self.resolution = resolution
        self._buckets: dict[int, set[_Entry]] = {}
        self._armed: int | None = None              # the bucket the timer is set for
        self._timer: asyncio.TimerHandle | None = None

    def __len__(self) -> int:
        return sum(len(b) for b in self._buckets.values())

    def add(self, when: float, callback: Callable, arg=_Entry) -> _Entry:
        key = math.ceil(when / self.resolution)
        entry = _Entry(when, callback, arg, key)
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = set()
            if self._armed is None or key < self._armed:
                self._arm(key)
        bucket.add(entry)
        return entry

    def cancel(self, entry: _Entry | None) -> None:
        if entry is None:
            return
        bucket = self._buckets.get(entry.bucket)
        if bucket is not None:
            bucket.discard(entry)
            if not bucket:
                del self._buckets[entry.bucket]
        entry.callback = None

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._armed = None
        self._buckets.clear()

    def _arm(self, key: int) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed = key
        self._timer = self.loop.call_at(key * self.resolution, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._armed = None
        now = self.loop.time()
        due = [k for k in self._buckets if k * self.resolution <= now]
        for key in sorted(due):
            for entry in self._buckets.pop(key, ()):
                callback, entry.callback = entry.callback, None
                if callback is not None:
                    if entry.arg is _Entry:
                        callback()
                    else:
                        callback(entry.arg)
        if self._buckets and self._armed is None:
            self._arm(min(self._buckets))
