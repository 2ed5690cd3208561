"""Forwarding: requests for services this node lacks go to a node that has them
(SPEC.md §9.4).

:class:`Router` picks routes; :class:`Forward` carries one forwarded request from
start to end: route choice, envelope, deadline, retry of idempotent requests on
another route, the small-answer shortcut, the request's log line and metrics.  It
is driven by callbacks from the two sessions it joins (the answer's head arriving on
the link, a stream failing, its one timer) and needs no task for the common case, a
request whose body came whole and whose answer comes in one message.  Two drivers
add a task only where something must wait:

- a request body still streaming in: a pump task feeds it to the link, with credit;
- an answer that streams (or does not fit the client's credit at once): a relay
  task passes it on chunk by chunk.

Either way the same object decides what happens, so the cases cannot drift apart.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import random
import secrets
import time
from typing import TYPE_CHECKING, Callable

from protocol.errors import LoopDetected, NotFound, Status, StatusError, Unavailable

from ..rules import REPLAYABLE, next_envelope
from ..transport import ConnectionLost, Session, Stream
from .links import Link

if TYPE_CHECKING:  # pragma: no cover
    from . import Network

__all__ = ["Router", "Forward"]

log = logging.getLogger("utesla.request")

#: ``report(session, stream, status, sent, t0, forwarded)``: the dispatcher's books.
Report = Callable[[Session, Stream, int, int, float, bool], None]


class Router:
    """Route choice and the forwards in flight (see the module docstring)."""

    def __init__(self, network: "Network", report: Report, max_hops: int):
        self.network = network
        self.report = report
        self.max_hops = max_hops
        self.live = 0                              # forwards in flight
        self._idle: asyncio.Future | None = None
        self._rid_prefix = secrets.token_bytes(8)
        self._rid_counter = itertools.count()

    # -------------------------------------------------------------- routes

    def service_for(self, parts: list[str]) -> str | None:
        """The longest prefix of ``parts`` some route offers."""
        best = self.network.engine.best
        for n in range(len(parts), 0, -1):
            name = "/".join(parts[:n])
            if best.get(name):
                return name
        return None

    def choose(self, service: str, exclude: set[str], visited: list[str]) -> Link | None:
        """A live link towards ``service``: fewest hops, then the peer's priority, then
        the less loaded of two picked at random (power of two choices)."""
        by_peer = self.network.links_by_peer()
        best_hops = None
        pool: list[Link] = []
        for peer, route in self.network.engine.candidates(service):
            link = by_peer.get(peer)
            if (link is None or not link.up or peer in exclude
                    or (visited and any(n in visited for n in route.path))):
                continue
            if best_hops is None:
                best_hops = route.hops
            if route.hops != best_hops:
                break
            pool.append(link)
        if not pool:
            return None
        top = min(l.peer.priority for l in pool)
        pool = [l for l in pool if l.peer.priority == top]
        if len(pool) == 1:
            return pool[0]
        a, b = random.sample(pool, 2)
        return a if a.inflight <= b.inflight else b

    def request_id(self) -> bytes:
        """16 bytes unique to this request: a random per-process prefix and a counter
        (ids trace a request across nodes; they are not secrets)."""
        return self._rid_prefix + next(self._rid_counter).to_bytes(8, "big")

    # -------------------------------------------------------------- forwarding

    def forward(self, session: Session, stream: Stream, parts: list[str], user: str,
                visited: list[str], hops: int, t0: float, deadline: float,
                now: bool = False) -> bool:
        """Start forwarding ``stream``'s request.  True: a :class:`Forward` carries it
        from here and reports its end.  ``now`` (called from a read loop): False when
        there is only an error to report (the dispatcher's task does that); otherwise
        such errors are raised (404 no route to the service, 508 hop limit, 503 no
        live route)."""
        req = stream.request
        service = self.service_for(parts)
        if service is None:
            if now:
                return False
            raise NotFound(f"no service {req.path} in this node or its network")
        if hops <= 0:
            if now:
                return False
            raise LoopDetected("hop limit reached")
        link = self.choose(service, set(), visited)
        if link is None:
            if now:
                return False
            raise Unavailable(f"service /{service}: no live route")
        fwd = Forward(self, session, stream, service, user, visited, hops, t0, deadline)
        self.live += 1
        fwd.send(link)
        return True

    async def settle(self, parts: list[str], since: float, deadline: float,
                     limit: float = 2.0) -> None:
        """A service unknown here while links are still coming up (the blog runs
        ``add_network`` and the client right after): wait for the first tables, at most
        ``limit`` seconds and within the request's deadline, before answering 404.  The
        peers table is read again unless a read began after ``since`` (the request's
        arrival)."""
        net = self.network
        await net.refresh_peers(since)
        until = min(deadline, time.monotonic() + limit)
        while self.service_for(parts) is None and net.settling():
            left = until - time.monotonic()
            if left <= 0:
                return
            await net.wait_change(left)

    def _ended(self) -> None:
        self.live -= 1
        if not self.live and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    async def wait_idle(self) -> None:
        """Until no forward is in flight (a stopping node's grace period)."""
        while self.live:
            self._idle = asyncio.get_running_loop().create_future()
            await self._idle


class Forward:
    """One forwarded request, from its first route to its end (see the module docstring)."""

    __slots__ = ("router", "session", "src", "service", "user", "visited", "hops", "t0",
                 "deadline", "timer", "tried", "link", "out", "pump", "relay", "done",
                 "envelope", "last_failure", "slot_wait")

    def __init__(self, router: Router, session: Session, src: Stream, service: str,
                 user: str, visited: list[str], hops: int, t0: float, deadline: float):
        self.router = router
        self.session = session
        self.src = src
        self.service = service
        self.user = user
        self.visited = visited
        self.hops = hops
        self.t0 = t0
        self.deadline = deadline
        self.tried: set[str] = set()
        self.link: Link | None = None
        self.out: Stream | None = None
        self.pump: asyncio.Task | None = None     # driver: the request body streams in
        self.relay: asyncio.Task | None = None    # driver: the answer streams back
        self.done = False
        self.last_failure = ""
        self.slot_wait: asyncio.Future | None = None   # waiting for the link's stream limit
        self.envelope = None
        src.relay = self
        self.timer = session.loop.call_at(
            session.loop.time() + max(0.0, deadline - time.monotonic()), self.timed_out)

    @property
    def replayable(self) -> bool:
        req = self.src.request
        return req.end and req.method in REPLAYABLE

    # -------------------------------------------------------------- sending

    def send(self, link: Link) -> None:
        """Open the request on ``link``: with its whole body when it came whole and fits
        the first message, else with a pump task for the body."""
        req, src = self.src.request, self.src
        self.tried.add(link.peer_id)
        self.link = link
        lsession = link.session
        if lsession.is_open and not lsession.stream_slots:
            # The peer's limit of streams on this link is reached: wait for a free one,
            # within the deadline (the timer ends the wait), instead of failing at once.
            self.slot_wait = fut = lsession.slot_waiter()
            fut.add_done_callback(lambda f, link=link: self._slot_ready(link, f))
            return
        # The next hop gets what is left of the deadline now (a retry: less than before).
        router = self.router
        self.envelope = next_envelope(req.envelope, self.envelope["id"] if self.envelope
                                      else router.request_id(), self.user, self.visited,
                                      router.network.id, self.hops, router.max_hops,
                                      self.deadline - time.monotonic())
        body = src.peek_body()
        whole = body is not None and len(body) <= lsession.first_body_limit
        try:
            out = lsession.open_stream(req.method, req.path, token=link.peer.token,
                                       args=req.args, headers=req.headers,
                                       body=body if whole else b"", end=whole,
                                       envelope=self.envelope, head=False)
        except (ConnectionLost, StatusError) as exc:
            self._route_failed(link, exc)
            return
        self.out = out
        out.relay = self
        link.inflight += 1
        link.forwarded += 1
        self.router.network.metrics.incr("forwarded_requests")
        if not whole:
            self.pump = self._drive(self._pump_body(out, link.peer.url))

    def _slot_ready(self, link: Link, fut: asyncio.Future) -> None:
        if self.slot_wait is fut:
            self.slot_wait = None
        if fut.cancelled():
            return
        if self.done:
            link.session.pass_slot()
            return
        self.send(link)

    def _drive(self, coro) -> asyncio.Task:
        """Run a driver task on the client's session (cancelled with it, waited for by
        a stopping node)."""
        task = self.session.spawn(coro)
        task.add_done_callback(self._driver_done)
        return task

    def _driver_done(self, task: asyncio.Task) -> None:
        # A done callback, not only the driver's own handlers: a task cancelled before
        # its first step (the client's reset read in the same loop turn as the answer's
        # head) runs none of them, and would leave the link's count and the far request.
        if not self.done and task.cancelled():
            self._end(Status.CANCELLED, 0, drop="the client went away")

    async def _pump_body(self, out: Stream, url: str) -> None:
        """Driver: stream the client's request body on to the next hop."""
        src = self.src
        try:
            async for chunk in src:
                await out.send_body(chunk)
            await out.end()
        except (StatusError, ConnectionLost) as exc:
            if getattr(exc, "status", None) == Status.OK:
                return          # RESET 200: the next hop has answered and needs no more body
            out.reset(Status.CANCELLED, f"request body broken: {exc}")
            if not self.done and self.relay is None:
                self._answer_error(Unavailable(f"forwarding the body to {url} failed: {exc}"))

    # -------------------------------------------------------------- events

    def answered(self, stream: Stream, status: int, headers: dict) -> None:
        """The answer's head arrived on ``out`` (from the link session's read loop)."""
        if self.done or stream is not self.out:
            return
        session, src = self.session, self.src
        if not session.stream_open(src):                  # the client is gone meanwhile
            self._end(Status.CANCELLED, 0, drop="the client went away")
            return
        body = stream.peek_body()
        if body is not None and session.respond_now(src, status, headers, body, end=True):
            stream.discard_body()
            self._end(status, len(body))
            return
        self.relay = self._drive(self._relay_answer(status, headers))

    async def _relay_answer(self, status: int, headers: dict) -> None:
        """Driver: pass a streamed (or, for the client's credit now, too large) answer."""
        out, src, session = self.out, self.src, self.session
        sent = 0
        try:
            first = out.take_body()
            if first is not None:                 # it came whole, only too big for now
                await session.respond(src, status, headers, first, end=True)
                sent = len(first)
            else:
                await session.respond(src, status, headers, b"", end=False)
                while True:
                    try:
                        chunk = await out.read_chunk()
                    except StatusError as exc:
                        src.reset(Status.UNAVAILABLE,
                                  f"link to {self.link.peer.url} failed mid-answer: {exc}")
                        status = Status.UNAVAILABLE
                        break
                    if not chunk:
                        await src.end()
                        break
                    sent += len(chunk)
                    await src.send_body(chunk)
        except (ConnectionLost, StatusError):         # the client's side went away
            status = Status.CANCELLED
        except asyncio.CancelledError:
            if not self.done:                         # the session ended under us
                self._end(Status.CANCELLED, sent, drop="the client went away")
            raise
        if not self.done:
            self._end(status, sent, drop="forwarding ended")

    def failed(self, stream: Stream, exc: BaseException) -> None:
        """``stream`` broke (from ``Stream._fail``: a reset, a session that ended)."""
        if self.done:
            return
        try:
            if stream is self.src:
                # The client reset the stream or went away: nobody wants the answer.
                self._end(Status.CANCELLED, 0, drop="the client went away")
            elif stream is self.out and self.relay is None:
                self._unhook_out()
                self._route_failed(self.link, exc)
            # Failing mid-answer: the relay task reads the error and ends the request.
        except Exception:  # pragma: no cover - called from transport internals
            log.exception("forward failure handling")

    def timed_out(self) -> None:
        self.timer = None
        if self.done:
            return
        path = self.src.request.path
        timeout = self.deadline - self.t0
        exc = StatusError(f"the node serving {path} did not answer within {timeout:g} s",
                          Status.GATEWAY_TIMEOUT)
        if self.relay is not None:                    # the answer had started
            self.src.reset(exc.status, str(exc))
            self._end(exc.status, 0, drop="deadline")
        else:
            self._answer_error(exc, drop="deadline")

    # -------------------------------------------------------------- outcomes

    def _route_failed(self, link: Link, exc: BaseException) -> None:
        """No answer came back over ``link``: another route for an idempotent request
        (within what is left of the deadline), else 503."""
        if link is not None and self.link is link and self.out is not None:
            link.inflight -= 1
            self.out = None
        self.last_failure = f"{link.peer.url}: {exc}"
        log.warning("forward of %s via %s failed before any answer: %s",
                    self.src.request.path, link.peer.url, exc)
        if self.pump is not None or not self.replayable:
            self._answer_error(Unavailable(f"link to {link.peer.url} failed: {exc}"))
            return
        nxt = self.router.choose(self.service, self.tried, self.visited)
        if nxt is None:
            self._answer_error(Unavailable(f"service /{self.service}: every route failed "
                                           f"(last: {self.last_failure})"))
            return
        self.send(nxt)

    def _answer_error(self, exc: StatusError, drop: str = "forwarding ended") -> None:
        body = str(exc).encode()
        status = exc.status
        if not self.session.respond_now(self.src, status, {}, body, end=True):
            status, body = Status.CANCELLED, b""
        self._end(status, len(body), drop=drop)

    def _unhook_out(self) -> None:
        if self.out is not None:
            self.out.relay = None

    def _end(self, status: int, sent: int, drop: str | None = None) -> None:
        """The request is over here: timer, links' books, the far request abandoned
        (``drop``: why), drivers stopped, and the dispatcher told."""
        if self.done:
            return
        self.done = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.slot_wait is not None:
            self.slot_wait.cancel()
            self.slot_wait = None
        self.src.relay = None
        out = self.out
        if out is not None:
            out.relay = None
            self.link.inflight -= 1
            self.out = None
            if drop is not None:
                out.abandon(drop)
        self.src.discard_body()
        for task in (self.pump, self.relay):
            if task is not None and task is not asyncio.current_task() and not task.done():
                task.cancel()
        self.router._ended()
        self.router.report(self.session, self.src, status, sent, self.t0, True)
