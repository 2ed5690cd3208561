"""eager.start (a task only for a coroutine that waits) and the deadline wheel."""
from __future__ import annotations

import asyncio
import contextvars
import sys

import pytest

from utesla_node import eager
from utesla_node.timers import Deadlines

var = contextvars.ContextVar("var", default="outer")


async def test_a_coroutine_that_does_not_wait_gets_no_task_and_its_own_context():
    loop = asyncio.get_running_loop()
    seen = []

    async def quick():
        var.set("inner")
        seen.append((asyncio.current_task() is not None, var.get()))

    before = len(asyncio.all_tasks())
    assert eager.start(loop, quick()) is None
    assert seen == [(True, "inner")]                 # current_task() answers something
    assert var.get() == "outer"                      # the change stayed in its copy
    assert len(asyncio.all_tasks()) == before


async def test_a_coroutine_that_waits_goes_on_in_a_task_with_its_result():
    loop = asyncio.get_running_loop()
    steps = []

    async def slow():
        steps.append("first")
        await asyncio.sleep(0.01)
        steps.append("second")
        await asyncio.sleep(0)                        # a bare yield
        var.set("changed")
        return var.get()

    task = eager.start(loop, slow())
    assert steps == ["first"] and task is not None    # the first step ran at once
    assert await task == "changed"
    assert steps == ["first", "second"]


async def test_cancelling_the_task_reaches_the_coroutine_where_it_waits():
    loop = asyncio.get_running_loop()
    log = []

    async def waits():
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            log.append("cancelled inside")
            raise

    task = eager.start(loop, waits())
    await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert log == ["cancelled inside"]


async def test_a_wait_for_inside_is_cancelled_cleanly():
    loop = asyncio.get_running_loop()
    inner_done = asyncio.Event()

    async def inner():
        try:
            await asyncio.sleep(10)
        finally:
            inner_done.set()

    async def outer():
        await asyncio.wait_for(inner(), 10)

    task = eager.start(loop, outer())
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert inner_done.is_set()


@pytest.mark.skipif(sys.version_info < (3, 11), reason="asyncio.timeout() is new in 3.11")
async def test_asyncio_timeout_taken_in_the_first_step_works():
    loop = asyncio.get_running_loop()

    async def timed():
        try:
            async with asyncio.timeout(0.01):
                await asyncio.sleep(5)
        except TimeoutError:
            return "timed out"

    task = eager.start(loop, timed())
    assert await task == "timed out"


async def test_an_exception_in_the_first_step_is_not_raised_to_the_caller():
    loop = asyncio.get_running_loop()
    seen = []

    async def fails():
        try:
            raise ValueError("boom")
        except ValueError as exc:
            seen.append(exc)          # the dispatcher's coroutines report their own errors

    assert eager.start(loop, fails()) is None
    assert len(seen) == 1


async def test_deadlines_fire_once_in_order_and_never_early():
    loop = asyncio.get_running_loop()
    wheel = Deadlines(loop, resolution=0.01)
    fired = []
    t0 = loop.time()
    entries = [wheel.add(t0 + d, lambda d=d: fired.append((d, loop.time() - t0)))
               for d in (0.05, 0.02, 0.08)]
    wheel.cancel(entries[2])
    done = asyncio.Event()
    wheel.add(t0 + 0.1, done.set)
    await asyncio.wait_for(done.wait(), 5)
    assert [d for d, _ in fired] == [0.02, 0.05]
    assert all(at >= d for d, at in fired)
    assert len(wheel) == 0 and wheel._timer is None   # nothing left armed: an idle node


async def test_many_cancelled_deadlines_leave_nothing_behind():
    loop = asyncio.get_running_loop()
    wheel = Deadlines(loop, resolution=0.01)
    for i in range(1000):
        wheel.cancel(wheel.add(loop.time() + 30 + i * 0.001, lambda: None))
    assert len(wheel) == 0 and not wheel._buckets
    wheel.close()
