"""Run a coroutine now, and give it a task only if it has to wait.

Most requests are answered without waiting for anything (a handler that writes and
returns): a task for each would cost its creation, a trip through the event loop's
ready queue and its bookkeeping, more than the request itself.  :func:`start` runs
the coroutine's first step at once, inside the caller's loop turn; only a coroutine
that suspends gets a task, which continues it from where it stopped.

This is what Python 3.12's eager tasks do (``asyncio.eager_task_factory``), and on
3.12 and later that is what is used.  On 3.10 and 3.11 the same is done here:

- the first step runs in a copy of the current context (as a task's would), with
  :func:`asyncio.current_task` answering a :class:`_Pending` stand-in that forwards
  ``cancel``/``uncancel``/``cancelling`` to the task made if the coroutine suspends
  (``asyncio.timeout()`` taken in the first step still works);
- the task continues the coroutine by waiting for the future it suspended on, then
  resuming it; cancelling the task cancels that future, so the coroutine sees the
  cancellation where it waits, exactly as in an ordinary task.
"""
from __future__ import annotations

import asyncio
import contextvars
import sys
import types
from typing import Coroutine

__all__ = ["start"]

_EAGER_NATIVE = sys.version_info >= (3, 12)


def start(loop: asyncio.AbstractEventLoop, coro: Coroutine, name: str | None = None
          ) -> asyncio.Task | None:
    """Run ``coro`` until it finishes or first waits.  None: it finished (its result,
    or exception, is discarded: the caller's coroutine handles its own errors); else
    the task that continues it."""
    if _EAGER_NATIVE:
        task = asyncio.Task(coro, loop=loop, name=name, eager_start=True)
        if task.done():
            if not task.cancelled():
                task.exception()            # retrieved: the coroutine reported it
            return None
        return task
    return _start_compat(loop, coro, name)


class _Pending:
    """What ``current_task()`` returns during the first step (3.10/3.11): cancelling it
    before the coroutine suspends is remembered and applied to the task then."""

    __slots__ = ("task", "cancels", "msg")

    def __init__(self):
        self.task: asyncio.Task | None = None
        self.cancels = 0
        self.msg = None

    def cancel(self, msg=None) -> bool:
        if self.task is not None:
            return self.task.cancel(msg)
        self.cancels += 1
        self.msg = msg
        return True

    def uncancel(self) -> int:
        if self.task is not None:
            return self.task.uncancel()
        if self.cancels:
            self.cancels -= 1
        return self.cancels

    def cancelling(self) -> int:
        if self.task is not None:
            return self.task.cancelling()
        return self.cancels

    def done(self) -> bool:
        return self.task.done() if self.task is not None else False

    def get_loop(self):
        return self.task.get_loop() if self.task is not None else asyncio.get_event_loop()

    def add_done_callback(self, fn, *, context=None) -> None:
        if self.task is None:
            raise RuntimeError("eager first step: no task yet")
        self.task.add_done_callback(fn, context=context)


def _first_step(loop, coro, pending: _Pending):
    current = asyncio.tasks._current_tasks   # the registry current_task() reads
    previous = current.get(loop)
    current[loop] = pending
    try:
        return coro.send(None)
    finally:
        if previous is None:
            current.pop(loop, None)
        else:
            current[loop] = previous


def _start_compat(loop, coro, name):
    ctx = contextvars.copy_context()
    pending = _Pending()
    try:
        yielded = ctx.run(_first_step, loop, coro, pending)
    except StopIteration:
        return None
    except BaseException:
        return None                          # the coroutine reported its own error
    task = ctx.run(loop.create_task, _continue(coro, yielded), name=name)
    pending.task = task
    if pending.cancels:
        task.cancel(pending.msg)
    return task


@types.coroutine
def _yield_now():
    yield                                    # a bare yield: one trip through the loop


async def _continue(coro: Coroutine, yielded):
    """Drive ``coro`` on from the future it suspended on (``yielded``; None for a bare
    yield, as in ``asyncio.sleep(0)``)."""
    while True:
        throw = None
        try:
            if yielded is None:
                await _yield_now()
            else:
                # What a task does with the future a coroutine yields to it: take the
                # "blocking" mark (else awaiting it again here is an error).
                yielded._asyncio_future_blocking = False
                await yielded
        except asyncio.CancelledError as exc:
            # The future was cancelled (by our task's cancel(), or its owner): the
            # coroutine sees it where it waits.  Our task was cancelled while the
            # future could not be: throw it in.
            if yielded is None or not yielded.cancelled():
                throw = exc
        except BaseException:
            pass                 # the future's own error: the coroutine reads it itself
        try:
            if throw is not None:
                yielded = coro.throw(throw)
            else:
                yielded = coro.send(None)
        except StopIteration as stop:
            return stop.value
