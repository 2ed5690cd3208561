"""Request dispatch: path -> built-in, local handler or network route.

The dispatcher is handed its collaborators (gate, built-ins, the service registry,
the router) by the composition root and owns each request's life: its deadline, the
count of requests in flight, the log line and the metrics, and the answer when it
fails.  It is the one place where exceptions become wire statuses
(:func:`utesla_node.errors.status_error`): a :class:`StatusError` or a node error
with a status becomes that status and message; anything else becomes 500 with an
opaque error id for the client and the full traceback, under that id, in the log.

Two entries: :meth:`Dispatcher.accept` is called from the session's read loop and
forwards a request at once, without a task, when nothing has to wait (a token
already in the gate's cache, a route to a node that has the service); everything
else is served by :meth:`Dispatcher.serve` in a task.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
import time
from typing import TYPE_CHECKING, Callable

from protocol.errors import (MethodNotAllowed, NotFound, RequestTimeout,
                             Status, StatusError)

from . import eager
from .builtins import Builtins
from .errors import status_error
from .gate import Gate
from .metrics import Metrics
from .response import RequestContext, ResponseWriter
from .rules import BUILTIN_PREFIX, LONG_LIVED, check_envelope, request_timeout
from .services import METHODS, ServiceRegistry, split_path
from . import timers
from .timers import Deadlines
from .transport import ConnectionLost, Session, Stream

if TYPE_CHECKING:  # pragma: no cover
    from .network.router import Router

__all__ = ["Dispatcher"]

log = logging.getLogger("utesla.request")


def _expired(writer: ResponseWriter) -> None:
    """A request's deadline passed: its task (if it has one) is cancelled; ``_run`` sees
    ``timed_out`` and answers 408."""
    writer.timed_out = True
    task = writer.stream.task
    if task is not None:
        task.cancel()


class Dispatcher:
    """Serves request streams from start to finish (see module docstring)."""

    def __init__(self, *, gate: Gate, builtins: Builtins, registry: Callable[[], ServiceRegistry],
                 metrics: Metrics, node_id: str, config, service_view=None,
                 router: "Router | None" = None):
        self.gate = gate
        self.builtins = builtins
        self.registry = registry
        self.metrics = metrics
        self.node_id = node_id
        #: The node's configuration: request_timeout, max_body, max_hops (read per request).
        self.config = config
        #: What handlers see as ``self.node`` (services.Handler): a read-only view.
        self.service_view = service_view
        self.router = router
        self.inflight = 0
        self.stopping = False
        self.deadlines: Deadlines | None = None     # made on the first request (its loop)

    # -------------------------------------------------------------- books

    def finished(self, session: Session, stream: Stream, status: int, sent: int, t0: float,
                 forwarded: bool, counted: bool = True, lone: bool = False) -> None:
        """A request is over: metrics, log line, in-flight count, its stream freed."""
        req = stream.request
        if counted:
            self.inflight -= 1
        elapsed = time.monotonic() - t0
        self.metrics.request(req.path, status, elapsed, forwarded)
        if log.isEnabledFor(logging.INFO):
            log.info("%s %s %s -> %d %dB %.1fms", session.peer_user, req.method, req.path,
                     status, sent, elapsed * 1000)
        session.request_done(stream, lone=lone)

    # -------------------------------------------------------------- from the read loop

    def accept(self, session: Session, stream: Stream) -> bool:
        """Take ``stream``'s request from the read loop when its token is in the gate's
        cache: a local handler runs at once (a task only if it waits), a remote service
        is forwarded at once.  False leaves it to :meth:`serve` in a task, which checks
        everything itself and reports what is wrong."""
        req = stream.request
        if self.stopping or req.path.startswith(BUILTIN_PREFIX):
            return False
        try:
            parts = split_path(req.path)
            user = self.gate.authorize_now(session.peer_user, req.token, "/".join(parts))
            if user is None:
                return False
            visited, hops = check_envelope(req.envelope, self.node_id, self.config.max_hops)
        except StatusError:
            return False                                    # serve() reports it
        resolved = self.registry().resolve(parts)
        t0 = time.monotonic()
        timeout = request_timeout(self.config.request_timeout, req.envelope)
        if resolved is None:
            router = self.router
            if router is None:
                return False
            self.inflight += 1
            if router.forward(session, stream, parts, user.name, visited, hops, t0,
                              t0 + timeout, now=True):
                return True
            self.inflight -= 1
            return False
        service, rest = resolved
        method = req.method.lower()
        if method not in METHODS or not callable(getattr(service.handler, method, None)):
            return False                                    # serve() says 405
        writer = ResponseWriter(session, stream, defer_kick=True)
        self.inflight += 1
        entry = self._deadline(session, stream, writer, timeout)
        task = eager.start(session.loop, self._run(
            session, stream, writer, t0, timeout, entry, self._call_handler,
            (writer, service, rest, user.name, method)))
        if task is not None:                                # it waits: a task goes on
            stream.task = task
            session.tasks.add(task)
            task.add_done_callback(session.tasks.discard)
            writer.suspended()
        return True

    # -------------------------------------------------------------- in a task

    async def serve(self, session: Session, stream: Stream) -> bool:
        """Serve ``stream`` in the current task (:meth:`accept` declined it); True when
        a forward took it over (it reports the end itself)."""
        req = stream.request
        t0 = time.monotonic()
        writer = ResponseWriter(session, stream)
        timeout = request_timeout(self.config.request_timeout, req.envelope)
        long_lived = req.path in LONG_LIVED
        entry = None
        if not long_lived:
            self.inflight += 1
            entry = self._deadline(session, stream, writer, timeout)
        return await self._run(session, stream, writer, t0, timeout, entry, self._route,
                               (session, stream, writer, t0, t0 + timeout), not long_lived,
                               lone=True)

    def _deadline(self, session: Session, stream: Stream, writer: ResponseWriter,
                  timeout: float):
        """The request's deadline, in the loop's timer wheel: the task serving it (there
        is one whenever a deadline can pass: running code is never interrupted) is
        cancelled and answers 408."""
        stream.deadline = time.monotonic() + timeout
        wheel = self.deadlines
        if wheel is None:
            wheel = self.deadlines = timers.for_loop(session.loop)
        return wheel.add(session.loop.time() + timeout, _expired, writer)

    async def _run(self, session: Session, stream: Stream, writer: ResponseWriter, t0: float,
                   timeout: float, entry, work, args: tuple, counted: bool = True,
                   lone: bool = False) -> bool:
        """``await work(*args)`` and answer: a request's life and the one place its
        errors become its answer.  True when a forward took the request over."""
        handed_over = False
        try:
            try:
                handed_over = await work(*args)
                if not handed_over:
                    await writer.finish()
            except asyncio.CancelledError:
                if not writer.timed_out:
                    if self.stopping:
                        raise StatusError("the node is shutting down", Status.UNAVAILABLE)
                    raise
                raise RequestTimeout(f"request took longer than {timeout:g} s") from None
        except ConnectionLost:              # the client went away: nobody to answer
            writer.status = Status.CANCELLED
        except asyncio.CancelledError:
            writer.status = Status.CANCELLED
            raise
        except Exception as exc:
            await self._report(session, writer, exc)
        finally:
            if entry is not None:
                self.deadlines.cancel(entry)
            if not handed_over:
                self.finished(session, stream, writer.status, writer.sent, t0, False,
                              counted=counted, lone=lone)
        return handed_over

    async def _call_handler(self, writer: ResponseWriter, service, rest: list[str],
                            user: str, method: str) -> bool:
        handler = service.handler_for(
            RequestContext(writer, user, rest, self.service_view, self.config.max_body))
        await getattr(handler, method)()
        return False

    async def _report(self, session: Session, writer: ResponseWriter, exc: Exception) -> None:
        err = status_error(exc)
        if err is None:
            req = writer.stream.request
            error_id = secrets.token_hex(6)
            log.error("error %s in %s %s (user %s)", error_id, req.method, req.path,
                      session.peer_user, exc_info=exc)
            err = StatusError(f"internal error (id {error_id})", Status.INTERNAL)
        elif err is not exc:
            log.debug("%s: %s -> %d", writer.stream.request.path, exc, err.status)
        writer.status = err.status
        try:
            await writer.fail(err)
        except (ConnectionLost, StatusError):
            pass

    async def _route(self, session: Session, stream: Stream, writer: ResponseWriter,
                     t0: float, deadline: float) -> bool:
        req = stream.request
        if req.path.startswith(BUILTIN_PREFIX):
            await self.builtins.serve(session, stream, writer)
            return False
        parts = split_path(req.path)
        user = await self.gate.authorize(session.peer_user, req.token, "/".join(parts))
        visited, hops = check_envelope(req.envelope, self.node_id, self.config.max_hops)  # 400, 508
        resolved = self.registry().resolve(parts)
        if resolved is None:
            router = self.router
            if router is None:
                raise NotFound(f"no service {req.path}")
            if router.service_for(parts) is None:
                await router.settle(parts, t0, deadline)   # links still coming up?
            return router.forward(session, stream, parts, user.name, visited, hops, t0,
                                  deadline)
        service, rest = resolved
        method = req.method.lower()
        if method not in METHODS or not callable(getattr(service.handler, method, None)):
            raise MethodNotAllowed(f"{req.method} not allowed on {service.path}")
        return await self._call_handler(writer, service, rest, user.name, method)
