"""Prometheus metrics and a health check over plain HTTP (``[metrics] listen = host:port``).

A few lines of asyncio, no web framework: ``GET /metrics`` answers the text
exposition format, ``GET /healthz`` answers 200 only when the node says it is
healthy (503 and the reason otherwise).  One request per connection.

The server knows nothing of the node: it is handed two coroutine functions,
``render()`` (the page; :meth:`utesla_node.metrics.Metrics.prometheus` writes it a
few hundred lines per event-loop turn) and ``health()`` (None when healthy, else
why not; :func:`health_check` builds the usual one).
"""
from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

__all__ = ["MetricsServer", "health_check"]

log = logging.getLogger("utesla.metrics")
#: Seconds a client has to send its request line and headers; header lines read at most.
HEAD_TIMEOUT = 5.0
MAX_HEADERS = 100
#: Seconds the database has to answer a health check.
PING_TIMEOUT = 2.0
_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 503: "Service Unavailable",
            400: "Bad Request", 500: "Internal Server Error"}


def health_check(serving: Callable[[], bool], ping: Callable[[], Awaitable[object]],
                 timeout: float = PING_TIMEOUT) -> Callable[[], Awaitable[str | None]]:
    """A ``health()`` for :class:`MetricsServer`: healthy while ``serving()`` is true
    (the node accepts connections) and ``ping()`` (the database) answers in time."""
    async def health() -> str | None:
        if not serving():
            return "listener down"
        try:
            await asyncio.wait_for(ping(), timeout)
        except Exception as exc:  # any failure means unhealthy
            return f"database unavailable: {type(exc).__name__}"
        return None
    return health


class MetricsServer:
    """``render()`` answers ``/metrics``; ``health()`` (None = healthy, else the reason)
    answers ``/healthz``."""

    def __init__(self, listen: str, render: Callable[[], Awaitable[str]],
                 health: Callable[[], Awaitable[str | None]]):
        self.render = render
        self.health = health
        host, _, port = listen.rpartition(":")
        self.host = host.strip("[]")
        self.port = int(port)
        self.server: asyncio.base_events.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, self.host, self.port)
        self.port = self.server.sockets[0].getsockname()[1]
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()

    async def _health(self) -> tuple[int, str]:
        why = await self.health()
        return (200, "ok\n") if why is None else (503, f"{why}\n")

    @staticmethod
    async def _read_head(reader: asyncio.StreamReader) -> str:
        """The request line; the headers are read and ignored (at most MAX_HEADERS)."""
        line = await reader.readline()
        for _ in range(MAX_HEADERS):
            h = await reader.readline()
            if h in (b"\r\n", b"\n", b""):
                return line.decode("latin-1")
        raise ValueError("too many header lines")

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                # One deadline for the whole head: a client trickling header lines cannot
                # hold the connection open.
                parts = (await asyncio.wait_for(self._read_head(reader), HEAD_TIMEOUT)).split()
            except ValueError:        # a line over the reader's limit, or too many lines
                parts = []
            if len(parts) < 2:
                status, body, ctype = 400, "bad request\n", "text/plain"
            elif parts[0] != "GET":
                status, body, ctype = 405, "only GET\n", "text/plain"
            elif parts[1].split("?")[0] == "/metrics":
                status, ctype = 200, "text/plain; version=0.0.4; charset=utf-8"
                try:
                    body = await self.render()
                except Exception:
                    log.exception("rendering /metrics failed")
                    status, body, ctype = 500, "internal error\n", "text/plain"
            elif parts[1].split("?")[0] == "/healthz":
                status, body = await self._health()
                ctype = "text/plain"
            else:
                status, body, ctype = 404, "not found\n", "text/plain"
            data = body.encode()
            writer.write(f"HTTP/1.1 {status} {_REASONS[status]}\r\nContent-Type: {ctype}\r\n"
                         f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
                         + data)
            await writer.drain()
        except (asyncio.TimeoutError, ConnectionError, OSError):
            pass
        finally:
            writer.close()
