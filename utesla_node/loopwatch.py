"""Watching the event loop: how late it runs, and who held it up.

Everything a node does runs on one event loop, so a handler that blocks it (a
``time.sleep``, a big hash, a driver without asyncio) delays every other request of
every client.  Two parts find such handlers:

* a **ticker** on the loop, every ``interval`` seconds, measures how late it runs:
  that is the loop's lag, reported to ``observe`` (the node's
  ``utesla_loop_lag_seconds`` histogram);
* a **watchdog thread** notices when the ticker is overdue by half the threshold
  and, while the loop is still stuck, looks at what the loop's thread is running
  (its innermost frames) and asks ``identify`` which service that is.

When the ticker runs again after a lag of ``threshold`` seconds or more, it logs
one line: how long the loop was held and by which service (or which code, when no
service was on the stack), and counts a ``loop_blocked``.  One line per block, not
one per tick while it lasts.  All reporting happens on the loop; the thread only
looks.
"""
from __future__ import annotations

import asyncio
import logging
import sys
import threading
import time
from types import FrameType
from typing import Callable

__all__ = ["LoopWatch", "describe_frame"]

log = logging.getLogger("utesla.loop")

#: ``identify(frame)`` -> (service path or None, where in the code).
Identify = Callable[[FrameType], "tuple[str | None, str]"]


def describe_frame(frame: FrameType) -> tuple[str | None, str]:
    """The default ``identify``: no service, the innermost frame's place."""
    code = frame.f_code
    return None, f"{code.co_filename}:{frame.f_lineno} in {code.co_name}"


class LoopWatch:
    """The ticker and the watchdog of one event loop (see the module docstring)."""

    def __init__(self, threshold: float, *, observe: Callable[[float], None] | None = None,
                 on_block: Callable[[float, str | None], None] | None = None,
                 identify: Identify = describe_frame, interval: float | None = None):
        if threshold <= 0:
            raise ValueError("threshold must be > 0")
        self.threshold = threshold
        self.interval = interval or min(0.25, max(0.01, threshold / 2))
        self.observe = observe
        self.on_block = on_block
        self.identify = identify
        #: The latest lag measured, seconds, and the number of blocks logged.
        self.last_lag = 0.0
        self.blocks = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread: int | None = None
        self._handle: asyncio.TimerHandle | None = None
        self._beat = 0.0            # monotonic time of the latest tick
        self._due = 0.0             # when the next tick should run
        self._seen: tuple[float, str | None, str] | None = None   # (beat, service, where)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start watching the running loop (call from it)."""
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._schedule(time.monotonic())
        self._stop.clear()
        self._thread = threading.Thread(target=self._watch, name="utesla-loopwatch",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        if self._thread is not None:
            self._thread.join(timeout=2.0)
            self._thread = None

    # ------------------------------------------------------------------ on the loop

    def _schedule(self, now: float) -> None:
        self._beat = now
        self._due = now + self.interval
        self._handle = self._loop.call_later(self.interval, self._tick)

    def _tick(self) -> None:
        now = time.monotonic()
        lag = max(0.0, now - self._due)
        beat = self._beat
        self.last_lag = lag
        if self.observe is not None:
            self.observe(lag)
        if lag >= self.threshold:
            seen = self._seen if self._seen is not None and self._seen[0] == beat else None
            self._report(lag, seen)
        self._seen = None
        self._schedule(now)

    def _report(self, lag: float, seen: tuple[float, str | None, str] | None) -> None:
        self.blocks += 1
        service = seen[1] if seen else None
        if seen is None:
            log.warning("the event loop was blocked for %.2f s (the watchdog did not see "
                        "by what)", lag)
        elif service is not None:
            log.warning("the event loop was blocked for %.2f s by service %s (%s): run "
                        "blocking work with await self.run_in_thread(...) or CPU work with "
                        "await self.run_in_process(...)", lag, service, seen[2])
        else:
            log.warning("the event loop was blocked for %.2f s in %s (not in a service)",
                        lag, seen[2])
        if self.on_block is not None:
            self.on_block(lag, service)

    # ------------------------------------------------------------------ the watchdog

    def _watch(self) -> None:
        poll = max(0.005, self.threshold / 4)
        while not self._stop.wait(poll):
            beat = self._beat
            if time.monotonic() - beat < self.threshold / 2:
                continue
            seen = self._seen
            if seen is not None and seen[0] == beat and seen[1] is not None:
                continue                # this block's service is already known
            found = self._look()
            if found is not None and self._beat == beat:    # still the same block
                self._seen = (beat, *found)

    def _look(self) -> tuple[str | None, str] | None:
        # sys._current_frames is CPython's documented way to see another thread's stack.
        frame = sys._current_frames().get(self._loop_thread)
        if frame is None:
            return None
        try:
            return self.identify(frame)
        except Exception:           # never let a look kill the watchdog
            return None
        finally:
            del frame
