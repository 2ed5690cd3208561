"""Forwarding without a task per request: the fast path of SPEC.md §9.4.

Most forwarded requests are small, idempotent and answered in one message (a GET and
its whole reply).  The general path (``Network.forward`` in a dispatcher task) costs
them a task, a response writer and several event-loop turns, more than the relaying
itself.  Here :meth:`Network.relay_now` sends such a request on from the read loop of
the client's session, and :class:`Relay` passes the answer back from the read loop of
the link's session: callbacks and one timer, no task.

Only what is certain goes this way; everything else is handed to the general path,
which then behaves exactly as if it had had the request from the start:

- not eligible (a body still coming, a method that is not idempotent, a token not in
  the node's cache, a loop or hop limit to report, no live route...): the dispatcher
  serves it, as for any request;
- the route failed before any answer came: the dispatcher serves it from the start
  (GET/HEAD/OPTIONS with its whole body: replaying is safe; it tries other routes);
- the answer streams, or does not fit the client's credit at once: a dispatcher task
  takes over with the answer's head and relays the rest.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import time
from typing import TYPE_CHECKING

from protocol.errors import LocalProtocolError, Status

from ..transport import SMALL_HEAD, Session, Stream

if TYPE_CHECKING:  # pragma: no cover
    from . import Network
    from .links import Link

__all__ = ["Relay", "REPLAYABLE"]

log = logging.getLogger("utesla.request")
#: Methods a node may send again on another route when the first failed unanswered.
REPLAYABLE = frozenset({"GET", "HEAD", "OPTIONS"})


class Relay:
    """One request relayed from a client's stream (``src``) to a link's stream (``out``)."""

    __slots__ = ("net", "session", "src", "link", "out", "timer", "t0", "deadline", "done")

    def __init__(self, net: "Network", session: Session, src: Stream, link: "Link",
                 out: Stream, timeout: float, t0: float):
        self.net = net
        self.session = session
        self.src = src
        self.link = link
        self.out = out
        self.t0 = t0
        self.deadline = t0 + timeout
        self.done = False
        self.timer = session.loop.call_later(timeout, self.timed_out)
        src.relay = out.relay = self
        net.relays += 1
        net.node.inflight += 1
        link.inflight += 1
        link.forwarded += 1

    # -------------------------------------------------------------- outcomes

    def answered(self, stream: Stream, status: int, headers: dict) -> None:
        """The answer's head arrived on ``out`` (from the link session's read loop)."""
        if self.done or stream is not self.out:
            return
        out, src, conn = self.out, self.src, self.session.conn
        if not conn.is_open(src.id):                 # the client is gone meanwhile
            self._end(Status.CANCELLED, 0, drop="the client went away")
            return
        if out._ended and out._error is None:
            body = b"".join(out._chunks) if out._chunks else b""
            if len(body) <= min(SMALL_HEAD, conn.max_chunk, conn.send_credit(src.id)):
                out._chunks.clear()
                out.buffered = 0
                try:
                    conn.send_response(src.id, status, headers=headers, body=body, end=True)
                except LocalProtocolError:           # the client's stream went away
                    status, body = Status.CANCELLED, b""
                self.session.schedule_flush()
                self._end(status, len(body))
                return
        self._hand_over(status, headers)

    def failed(self, stream: Stream, exc: BaseException) -> None:
        """``stream`` broke (from ``Stream._fail``: a reset, a session that ended)."""
        if self.done:
            return
        try:
            if stream is self.out:
                # No answer came back: the dispatcher serves the request from the start
                # (idempotent, whole body here), on another route if this one is gone,
                # within what is left of the deadline (not a fresh one).
                log.debug("relay of %s via %s failed unanswered (%s): general path",
                          self.src.request.path, self.link.peer.url, exc)
                self._settle(keep_body=True)
                if self.session.conn.is_open(self.src.id) and self.src._error is None:
                    self._spawn()
                else:
                    self.session.request_done(self.src, lone=False)
            else:
                # The client reset the stream or went away: nobody wants the answer.
                self._end(Status.CANCELLED, 0, drop="the client went away")
        except Exception:  # pragma: no cover - called from transport internals
            log.exception("relay failure handling")

    def timed_out(self) -> None:
        if self.done:
            return
        self.timer = None
        timeout = self.deadline - self.t0
        path = self.src.request.path
        body = f"the node serving {path} did not answer within {timeout:g} s".encode()
        conn, sid = self.session.conn, self.src.id
        status = Status.GATEWAY_TIMEOUT
        if conn.is_open(sid):
            try:
                conn.send_response(sid, status, body=body, end=True)
            except LocalProtocolError:
                status = Status.CANCELLED
            self.session.schedule_flush()
        self._end(status, len(body), drop="deadline")

    # -------------------------------------------------------------- hand-over

    def _hand_over(self, status: int, headers: dict) -> None:
        """A streamed (or, for the client's credit now, too large) answer: a dispatcher
        task relays it from here, with what is left of the deadline."""
        net, link, out = self.net, self.link, self.out
        self._settle(keep_link=True)

        async def rest(session, stream, writer) -> None:
            writer.forwarded = True
            await net._relay_answer(link, out, writer, status, headers)

        def ended(_task) -> None:
            # A done callback, not a ``finally`` in rest(): it runs even for a task
            # cancelled before its first step (the client's reset read in the same loop
            # turn as the answer's head), which would leave the link's count and the
            # far request behind.
            link.inflight -= 1
            out.abandon("forwarding ended")

        self._spawn(rest).add_done_callback(ended)

    def _spawn(self, serve=None) -> asyncio.Task:
        """The dispatcher takes the request over in a task (``serve``: from the answer's
        head on; None: from the start), within what is left of the deadline; a stopping
        node waits for it like for a relay."""
        left = max(0.001, self.deadline - time.monotonic())
        task = self.session.spawn_request(self.src, functools.partial(
            self.net.node.dispatcher, serve=serve, timeout=left))
        self.net.handed_over(task)
        return task

    # -------------------------------------------------------------- bookkeeping

    def _settle(self, keep_link: bool = False, keep_body: bool = False) -> None:
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.src.relay = self.out.relay = None
        if not keep_body:
            self.src._chunks.clear()
            self.src.buffered = 0
        net = self.net
        net.node.inflight -= 1
        if not keep_link:
            self.link.inflight -= 1
        net.relays -= 1
        if not net.relays and net.relays_idle is not None and not net.relays_idle.done():
            net.relays_idle.set_result(None)

    def _end(self, status: int, sent: int, drop: str | None = None) -> None:
        """The request is over here: books, log, and the client's stream freed; ``drop``:
        the far request is abandoned, for that reason."""
        self._settle()
        if drop is not None:
            self.out.abandon(drop)
        self._log(status, sent)
        self.session.request_done(self.src, lone=False)

    def _log(self, status: int, sent: int) -> None:
        elapsed = time.monotonic() - self.t0
        req = self.src.request
        self.net.node.metrics.request(req.path, status, elapsed, True)
        if log.isEnabledFor(logging.INFO):
            log.info("%s %s %s -> %d %dB %.1fms", self.session.peer_user, req.method,
                     req.path, status, sent, elapsed * 1000)
