"""A fault-injecting TCP proxy for link tests (asyncio, 127.0.0.1, port 0).

Put it between two nodes (the peer row's URL points at ``proxy.url``) and switch
its mode while the test runs::

    proxy = await FaultProxy(b.port).start()
    ...
    proxy.set_mode("blackhole")     # the link goes silent: heartbeats must notice
    proxy.set_mode("pass")          # healed: the link reconnects with backoff

Modes (apply to connections already open as well as to new ones, unless noted):

``pass``        forward bytes both ways.
``delay``       forward bytes ``delay_ms`` milliseconds late (order kept; latency, not
                a throughput cap).
``drop``        close *new* connections at once (open ones keep passing bytes).
``blackhole``   accept and read, forward nothing: no bytes and no EOF cross the proxy.
``reset``       abort every open connection with a TCP RST (SO_LINGER 0, then
                ``transport.abort()``), and abort new ones as they arrive.

``accepted`` counts connections taken, ``forwarded`` bytes that crossed, so a test
can wait on conditions instead of sleeping.
"""
from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time

__all__ = ["FaultProxy", "MODES"]

MODES = ("pass", "delay", "drop", "blackhole", "reset")


def _abort(writer: asyncio.StreamWriter) -> None:
    """Close with RST: linger 0 makes close() send a reset instead of a FIN."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class _Pair:
    """One proxied connection: client side and upstream side, two pumps."""

    def __init__(self, proxy: "FaultProxy", cw: asyncio.StreamWriter,
                 uw: asyncio.StreamWriter):
        self.proxy = proxy
        self.writers = (cw, uw)
        self.tasks: list[asyncio.Task] = []
        self.done = asyncio.Event()

    def abort(self) -> None:
        for w in self.writers:
            _abort(w)
        for t in self.tasks:
            t.cancel()

    def close(self) -> None:
        for w in self.writers:
            if not w.is_closing():
                w.close()
        for t in self.tasks:
            t.cancel()

    async def pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        proxy = self.proxy
        queue: asyncio.Queue = asyncio.Queue()
        sender = asyncio.get_running_loop().create_task(self._send(queue, writer))
        try:
            while True:
                data = await reader.read(65536)
                mode = proxy.mode
                if mode == "blackhole":
                    if not data:
                        return          # swallow the EOF too: nothing crosses
                    continue
                if not data:
                    queue.put_nowait((time.monotonic(), None))
                    break
                due = time.monotonic() + (proxy.delay_ms / 1000 if mode == "delay" else 0)
                queue.put_nowait((due, data))
            await sender
        except (ConnectionError, OSError):
            pass
        finally:
            sender.cancel()

    async def _send(self, queue: asyncio.Queue, writer: asyncio.StreamWriter) -> None:
        while True:
            due, data = await queue.get()
            wait = due - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)      # delay mode: hold the bytes until due
            if self.proxy.mode == "blackhole":
                continue
            if data is None:
                with contextlib.suppress(OSError, RuntimeError):
                    if writer.can_write_eof():
                        writer.write_eof()
                return
            writer.write(data)
            self.proxy.forwarded += len(data)
            try:
                await writer.drain()
            except (ConnectionError, OSError):
                return


class FaultProxy:
    """See the module docstring."""

    def __init__(self, target_port: int, target_host: str = "127.0.0.1", mode: str = "pass",
                 delay_ms: float = 0):
        self.target = (target_host, target_port)
        self.mode = "pass"
        self.delay_ms = 0.0
        self.set_mode(mode, delay_ms)
        self.pairs: set[_Pair] = set()
        self.accepted = 0
        self.forwarded = 0
        self._server: asyncio.base_events.Server | None = None
        self._handlers: set[asyncio.Task] = set()
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"utesla://127.0.0.1:{self.port}"

    async def start(self) -> "FaultProxy":
        self._server = await asyncio.start_server(self._on_connect, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    def set_mode(self, mode: str, delay_ms: float | None = None) -> None:
        if mode not in MODES:
            raise ValueError(f"mode must be one of {', '.join(MODES)}")
        if delay_ms is not None:
            if delay_ms < 0:
                raise ValueError("delay_ms must be >= 0")
            self.delay_ms = float(delay_ms)
        self.mode = mode
        if mode == "reset":
            for pair in list(self.pairs):
                pair.abort()
            self.pairs.clear()

    async def _on_connect(self, reader: asyncio.StreamReader,
                          writer: asyncio.StreamWriter) -> None:
        self._handlers.add(asyncio.current_task())
        try:
            self.accepted += 1
            if self.mode == "drop":
                writer.close()
                return
            if self.mode == "reset":
                _abort(writer)
                return
            try:
                ureader, uwriter = await asyncio.open_connection(*self.target)
            except OSError:
                _abort(writer)
                return
            pair = _Pair(self, writer, uwriter)
            self.pairs.add(pair)
            loop = asyncio.get_running_loop()
            pair.tasks = [loop.create_task(pair.pump(reader, uwriter)),
                          loop.create_task(pair.pump(ureader, writer))]
            try:
                await asyncio.gather(*pair.tasks, return_exceptions=True)
            finally:
                self.pairs.discard(pair)
                pair.close()
        finally:
            self._handlers.discard(asyncio.current_task())

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for pair in list(self.pairs):
            pair.abort()
        self.pairs.clear()
        # The handlers end by themselves once their pumps are gone (cancelling one would make
        # asyncio's start_server callback log the CancelledError as an error).
        if self._handlers:
            await asyncio.wait(list(self._handlers), timeout=5)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2.0)
