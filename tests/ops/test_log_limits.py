"""Repeated log lines are rate-limited (issue 12, item 7).

Of each kind of line (logger, level, message template) at most ``repeat_limit``
are written per ``repeat_interval``; one "N similar lines suppressed" line counts
the rest when the interval ends, before the next line of that kind, or when the
node stops.  The request log of answered requests is never limited.
"""
from __future__ import annotations

import asyncio
import io
import logging
import re

import pytest

from helpers import NodeProcess, wait_for
from utesla_node.logs import RepeatLimiter, RepeatLimitHandler, configure

SUMMARY = re.compile(r"(\d+) similar lines suppressed in the last ([\d.e+]+) s: '(.*)'$")


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(name: str, level: int, msg: str, *args) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def make_handler(limit=3, interval=10.0, **kw) -> tuple[RepeatLimitHandler, io.StringIO, Clock]:
    out = io.StringIO()
    inner = logging.StreamHandler(out)
    inner.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    clock = kw.pop("clock", Clock())
    return RepeatLimitHandler(inner, limit, interval, clock=clock, **kw), out, clock


def summaries(text: str) -> list[tuple[int, str]]:
    return [(int(m[1]), m[3]) for line in text.splitlines() if (m := SUMMARY.search(line))]


# --------------------------------------------------------------------------- the limiter

def test_limiter_writes_a_few_lines_per_interval_then_a_count_of_the_rest():
    lim = RepeatLimiter(3, 10.0)
    kind = ("utesla.node", logging.WARNING, "refusing connection from %s")
    other = ("utesla.transport", logging.INFO, "handshake with %s failed: %s")
    passed = [lim.admit(kind, 0.0 + i * 0.01)[0] for i in range(100)]
    assert passed == [True] * 3 + [False] * 97
    assert lim.admit(other, 1.0) == (True, [])        # kinds are counted apart
    assert lim.next_due() == 10.0
    assert lim.due(9.99) == []
    ok, owed = lim.admit(kind, 10.5)                   # the next line after the interval
    assert ok
    assert [(s.kind, s.count, s.seconds) for s in owed] == [(kind, 97, 10.0)]
    assert lim.next_due() is None
    # A new interval began with that line: two more pass, then suppression again.
    assert [lim.admit(kind, 11.0)[0] for _ in range(3)] == [True, True, False]
    assert [(s.count) for s in lim.close_all(12.0)] == [1]


def test_limiter_owes_a_summary_when_the_interval_ends_even_with_no_line_of_that_kind():
    lim = RepeatLimiter(1, 5.0)
    kind = ("a", logging.WARNING, "x %s")
    for _ in range(10):
        lim.admit(kind, 0.0)
    ok, owed = lim.admit(("b", logging.INFO, "y"), 6.0)   # any later line brings it out
    assert ok and [(s.kind, s.count) for s in owed] == [(kind, 9)]


def test_limiter_refuses_nonsense_settings():
    with pytest.raises(ValueError):
        RepeatLimiter(0, 1.0)
    with pytest.raises(ValueError):
        RepeatLimiter(1, 0.0)


# --------------------------------------------------------------------------- the handler

def test_handler_floods_are_bounded_and_summarised_answered_requests_never_are():
    h, out, clock = make_handler(limit=3, interval=10.0, timers=False)
    for i in range(1000):
        h.handle(record("utesla.transport", logging.INFO, "handshake with %s failed: %s",
                        f"127.0.0.1:{i}", "bad message"))
        h.handle(record("utesla.request", logging.INFO, "%s %s %s -> %d %dB %.1fms",
                        "alice", "GET", "/x", 200, 5, 0.1))
        h.handle(record("utesla.request", logging.INFO, "%s %s %s -> %d %dB %.1fms",
                        "alice", "GET", "/nosuch", 404, 0, 0.1))
    text = out.getvalue()
    assert text.count("handshake with") == 3
    assert text.count("-> 200") == 1000                  # the traffic record stays whole
    assert text.count("-> 404") == 3
    assert summaries(text) == []                          # the interval has not ended
    clock.now += 10.0
    h.handle(record("utesla.transport", logging.INFO, "handshake with %s failed: %s",
                    "127.0.0.1:1", "bad message"))
    lines = out.getvalue().splitlines()
    found = summaries(out.getvalue())
    assert sorted(found) == [(997, "%s %s %s -> %d %dB %.1fms"),
                             (997, "handshake with %s failed: %s")]
    assert lines[-1].endswith("bad message")              # the summaries came first
    assert "INFO utesla.transport: 997 similar lines suppressed" in out.getvalue()


def test_handler_close_writes_what_is_still_owed():
    h, out, clock = make_handler(limit=2, interval=3600.0, timers=False)
    for _ in range(50):
        h.handle(record("utesla.node", logging.WARNING, "refusing connection from %s", "x"))
    h.close()
    assert summaries(out.getvalue()) == [(48, "refusing connection from %s")]


async def test_handler_timer_writes_the_summary_when_the_interval_ends():
    h, out, _ = make_handler(limit=1, interval=0.2, clock=__import__("time").monotonic)
    try:
        for _ in range(20):
            h.handle(record("utesla.node", logging.WARNING, "refusing connection from %s", "x"))
        await wait_for(lambda: summaries(out.getvalue()), 10)
        assert summaries(out.getvalue()) == [(19, "refusing connection from %s")]
    finally:
        h.close()


def test_configure_installs_the_limit_and_zero_turns_it_off():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    try:
        stream = io.StringIO()
        configure("INFO", "text", stream=stream, repeat_limit=2, repeat_interval=60)
        for _ in range(10):
            logging.getLogger("utesla.test").warning("again %d", 1)
        configure("INFO", "json", stream=io.StringIO())    # closing the old one flushes it
        assert stream.getvalue().count("again 1") == 2
        assert summaries(stream.getvalue()) == [(8, "again %d")]
        stream = io.StringIO()
        configure("INFO", "text", stream=stream, repeat_limit=0)
        for _ in range(10):
            logging.getLogger("utesla.test").warning("again %d", 1)
        assert stream.getvalue().count("again 1") == 10
    finally:
        for h in list(root.handlers):
            root.removeHandler(h)
        for h in saved[0]:
            root.addHandler(h)
        root.setLevel(saved[1])


# --------------------------------------------------------------------------- a real node

async def test_a_flood_of_failed_handshakes_and_refused_connections_is_summarised(tmp_path):
    folder = tmp_path / "n"
    folder.mkdir()
    (folder / "node.ini").write_text(
        "[server]\nport = 0\nmax_connections_per_ip = 3\nhandshake_timeout = 60\n"
        "[logging]\nrepeat_limit = 5\nrepeat_interval = 3600\n")
    node = NodeProcess(folder, "--config", folder / "node.ini").start()
    held = []
    try:
        # 60 connections that send a message that is not a ClientHello: 60 failed handshakes.
        for _ in range(60):
            reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
            writer.write(b"\x00\x00\x00\x03\x93\x01\x02")
            await asyncio.wait_for(reader.read(), 10)        # the node closes it
            writer.close()
        # Three silent connections fill this address's quota; 40 more are refused.
        for _ in range(3):
            held.append(await asyncio.open_connection("127.0.0.1", node.port))

        def refused() -> int:
            return node.log().count("refusing connection from 127.0.0.1")

        for _ in range(40):
            reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
            await asyncio.wait_for(reader.read(), 10)
            writer.close()
        await wait_for(lambda: refused() == 5, 10)
    finally:
        for _, w in held:
            w.close()
        assert node.stop() == 0
    log = node.log()
    assert log.count("handshake with 127.0.0.1:") == 5, log
    assert log.count("refusing connection from 127.0.0.1") == 5, log
    found = dict((t, n) for n, t in summaries(log))
    assert set(found) == {"handshake with %s failed: %s",
                          "refusing connection from %s: connection limit reached"}, log
    assert found["refusing connection from %s: connection limit reached"] == 35
    # 60 bad messages, and the three silent connections' own ends (closed by us or by
    # the stopping node, whichever comes first).
    assert 55 <= found["handshake with %s failed: %s"] <= 58, log
    assert len(log.splitlines()) < 40, log
