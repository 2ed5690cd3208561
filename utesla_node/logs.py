"""Logging set-up: one line per event, text (coloured on a terminal) or JSON.

Repeated lines are rate-limited (issue 12: a flood of failed handshakes and
refused connections wrote 14,016 lines in 20 s).  Lines are grouped by kind:
logger, level and message template (``"handshake with %s failed: %s"``, before
its arguments are filled in).  Of each kind, at most ``repeat_limit`` lines are
written per ``repeat_interval`` seconds; the others are counted, and one line
says how many were left out when that interval ends (or, at the latest, when the
node stops)::

    WARNING utesla.node: 1234 similar lines suppressed in the last 60 s: 'refusing connection from %s: connection limit reached'

The request log of answered requests (``utesla.request`` lines with a status
below 400) is never limited: it records traffic an authenticated user asked
for.  Its failures (401, 404, ...) are limited like any other kind.

:class:`RepeatLimiter` decides, with the clock passed in; :class:`RepeatLimitHandler`
wraps the handler that writes, and wakes itself to write the summaries of an
interval that ended with no line after it.
"""
from __future__ import annotations

import json
import logging
import sys
import threading
import time
from dataclasses import dataclass

__all__ = ["configure", "RepeatLimiter", "RepeatLimitHandler", "Suppressed"]

_COLOURS = {"DEBUG": "\033[2m", "INFO": "", "WARNING": "\033[33m", "ERROR": "\033[31m",
            "CRITICAL": "\033[1;31m"}
#: Kinds of line tracked at once; past it the oldest interval is closed early (messages
#: built with f-strings make a kind per line).
MAX_KINDS = 1024
#: The request log, whose lines of answered requests are never limited.
ACCESS_LOGGER = "utesla.request"


class _TextFormatter(logging.Formatter):
    def __init__(self, colour: bool):
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        self.colour = colour

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        if self.colour:
            c = _COLOURS.get(record.levelname, "")
            if c:
                line = f"{c}{line}\033[0m"
        return line


class _JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"time": round(record.created, 6), "level": record.levelname,
               "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            out["traceback"] = self.formatException(record.exc_info)
        return json.dumps(out)


# --------------------------------------------------------------------------- rate limit

Kind = tuple[str, int, str]          # (logger, level, message template)


@dataclass(frozen=True)
class Suppressed:
    """Lines of one kind left out during one interval."""

    kind: Kind
    count: int
    seconds: float

    def record(self) -> logging.LogRecord:
        name, level, template = self.kind
        return logging.LogRecord(
            name, level, __file__, 0,
            "%d similar lines suppressed in the last %.3g s: %r",
            (self.count, self.seconds, template[:200]), None)


class _Window:
    __slots__ = ("start", "written", "suppressed")

    def __init__(self, start: float):
        self.start = start
        self.written = 1
        self.suppressed = 0


class RepeatLimiter:
    """At most ``limit`` lines of a kind per ``interval`` seconds (sans I/O: ``now`` is
    passed in).  Each kind's interval starts at its first line."""

    def __init__(self, limit: int, interval: float):
        if limit < 1 or not interval > 0:
            raise ValueError("limit must be >= 1 and interval > 0")
        self.limit = limit
        self.interval = interval
        self._windows: dict[Kind, _Window] = {}
        self._next_due: float | None = None   # earliest end of an interval owing a summary

    def admit(self, kind: Kind, now: float) -> tuple[bool, list[Suppressed]]:
        """Whether a line of ``kind`` is written now, and the summaries owed before it
        (intervals over by ``now`` that left lines out)."""
        owed = self.due(now)
        w = self._windows.get(kind)
        if w is not None and now >= w.start + self.interval:
            owed += self._close(kind, now)
            w = None
        if w is None:
            if len(self._windows) >= MAX_KINDS:
                owed += self._close(next(iter(self._windows)), now)
            self._windows[kind] = _Window(now)
            return True, owed
        if w.written < self.limit:
            w.written += 1
            return True, owed
        if not w.suppressed:
            end = w.start + self.interval
            self._next_due = end if self._next_due is None else min(self._next_due, end)
        w.suppressed += 1
        return False, owed

    def due(self, now: float) -> list[Suppressed]:
        """Close the intervals over by ``now`` that left lines out: their summaries."""
        if self._next_due is None or now < self._next_due:
            return []
        owed: list[Suppressed] = []
        for kind in [k for k, w in self._windows.items()
                     if w.suppressed and now >= w.start + self.interval]:
            owed += self._close(kind, now)
        ends = [w.start + self.interval for w in self._windows.values() if w.suppressed]
        self._next_due = min(ends) if ends else None
        return owed

    def next_due(self) -> float | None:
        """When the earliest interval with lines left out ends (None: none has; it may
        be early, never late)."""
        return self._next_due

    def close_all(self, now: float) -> list[Suppressed]:
        """The summaries of every interval still open (the node is stopping)."""
        owed: list[Suppressed] = []
        for kind in list(self._windows):
            owed += self._close(kind, now)
        self._next_due = None
        return owed

    def _close(self, kind: Kind, now: float) -> list[Suppressed]:
        w = self._windows.pop(kind)
        if not w.suppressed:
            return []
        return [Suppressed(kind, w.suppressed, min(now - w.start, self.interval))]


def _kind(record: logging.LogRecord) -> Kind | None:
    """The kind a record is limited as; None for lines never limited."""
    if record.name == ACCESS_LOGGER and record.levelno == logging.INFO:
        args = record.args
        status = args[3] if isinstance(args, tuple) and len(args) > 3 else None
        if isinstance(status, int) and status < 400:
            return None
    msg = record.msg if isinstance(record.msg, str) else repr(record.msg)
    return record.name, record.levelno, msg


class RepeatLimitHandler(logging.Handler):
    """Passes records to ``inner`` through a :class:`RepeatLimiter`.

    A summary is written before the next line once its interval is over, or by a
    timer at the end of the interval when nothing else is logged (``timers=False``:
    only the former, for tests with a fake ``clock``), and on :meth:`close`.
    """

    def __init__(self, inner: logging.Handler, limit: int, interval: float,
                 clock=time.monotonic, timers: bool = True):
        super().__init__()
        self.inner = inner
        self.limiter = RepeatLimiter(limit, interval)
        self.clock = clock
        self.timers = timers
        self._timer: threading.Timer | None = None
        self._timer_at: float | None = None

    def emit(self, record: logging.LogRecord) -> None:   # called with self.lock held
        kind = _kind(record)
        if kind is None:
            self._write(self.limiter.due(self.clock()))
            self.inner.handle(record)
            return
        ok, owed = self.limiter.admit(kind, self.clock())
        self._write(owed)
        if ok:
            self.inner.handle(record)
        else:
            self._arm()

    def _write(self, owed: list[Suppressed]) -> None:
        for s in owed:
            self.inner.handle(s.record())

    def _arm(self) -> None:
        """A timer for the earliest interval that owes a summary, unless one is set."""
        at = self.limiter.next_due()
        if not self.timers or at is None or self._timer_at == at:
            return
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = at
        self._timer = threading.Timer(max(0.0, at - self.clock()) + 0.01, self._wake)
        self._timer.daemon = True
        self._timer.start()

    def _wake(self) -> None:
        with self.lock:
            self._timer = self._timer_at = None
            self._write(self.limiter.due(self.clock()))
            self._arm()

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        with self.lock:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = self._timer_at = None
            self._write(self.limiter.close_all(self.clock()))
        self.inner.flush()
        super().close()


def configure(level: str = "INFO", fmt: str = "text", stream=None, *,
              repeat_limit: int = 20, repeat_interval: float = 60.0) -> None:
    """Log to ``stream`` (standard error) at ``level``, in ``fmt`` ("text" or "json"),
    at most ``repeat_limit`` lines of a kind per ``repeat_interval`` s (0: no limit)."""
    stream = stream or sys.stderr
    handler: logging.Handler = logging.StreamHandler(stream)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(_TextFormatter(colour=hasattr(stream, "isatty") and stream.isatty()))
    if repeat_limit:
        handler = RepeatLimitHandler(handler, repeat_limit, repeat_interval)
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
        if isinstance(h, RepeatLimitHandler):
            h.close()                   # its summaries, and its timer stopped
    root.addHandler(handler)
    root.setLevel(level)
    logging.Formatter.converter = time.gmtime
