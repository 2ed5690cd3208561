"""Blocking and CPU-heavy work off the event loop, for service handlers.

A handler that calls a blocking library (a file system, a driver without asyncio) or
hashes, compresses or renders for a while holds up every other request of the node:
the event loop runs one thing at a time.  :class:`Workers` gives handlers two ways
out, both bounded by ``node.ini``:

* ``await self.run_in_thread(fn, *args)``: ``[server] worker_threads`` threads, for
  blocking I/O (and C code that releases the GIL);
* ``await self.run_in_process(fn, *args)``: ``[server] worker_processes`` processes,
  for pure-Python CPU work (a thread would still hold the GIL).  ``fn``, its
  arguments and its result are pickled: ``fn`` is a module-level function (a
  service module's own functions work: a worker loads the module from its file).

Each pool takes at most its size of jobs at a time; the others wait *here*, in
asyncio, not in the executor's queue.  So when the client leaves (its request's
task is cancelled), a job that has not started is simply never started, in a thread
or a process; a job already running cannot be stopped: it finishes, its result is
dropped, and its slot frees when it does.  The handler sees ``CancelledError`` at
once either way.

Worker threads are daemon threads and worker processes are ended when the node
stops: a job stuck in a blocking call never keeps a stopping node alive.
Processes are started with ``spawn`` (not ``fork``): a worker never inherits the
node's keys, sockets or database connections, and the node's threads cannot leave
it a lock held forever.
"""
from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import importlib
import importlib.util
import logging
import multiprocessing
import pickle
import queue
import sys
import threading
import weakref
from typing import Any, Callable

__all__ = ["Workers", "WorkersClosed"]

log = logging.getLogger("utesla.workers")


class WorkersClosed(RuntimeError):
    """The node is stopping (or the pool has size 0): no new work is taken."""


class _Slots:
    """A counter of free slots with FIFO waiters; a slot is given back by whoever ends
    the job (in the loop's thread), not by the coroutine that asked for it."""

    def __init__(self, size: int):
        self.size = size
        self.free = size
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    @property
    def waiting(self) -> int:
        return sum(1 for f in self._waiters if not f.done())

    async def acquire(self) -> None:
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release()           # given to us as we were cancelled: pass it on
            raise
        finally:
            try:
                self._waiters.remove(fut)
            except ValueError:
                pass

    def release(self) -> None:
        for fut in self._waiters:
            if not fut.done():
                fut.set_result(None)     # the slot goes straight to the first waiter
                return
        self.free += 1


class _DaemonThreads(concurrent.futures.Executor):
    """A thread pool whose threads do not keep the process alive at exit.

    (``ThreadPoolExecutor`` joins its threads at exit: one handler stuck in a blocking
    call would keep a stopped node from ever exiting.)  Threads start on demand, up to
    ``size``; the caller never submits more than ``size`` jobs at once (:class:`_Slots`).
    """

    def __init__(self, size: int, name: str):
        self.size = size
        self.name = name
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._threads: list[threading.Thread] = []
        self._idle = 0
        self._lock = threading.Lock()
        self._closed = False

    def submit(self, fn, /, *args, **kwargs) -> concurrent.futures.Future:
        if self._closed:
            raise WorkersClosed("worker threads are shut down")
        fut: concurrent.futures.Future = concurrent.futures.Future()
        with self._lock:
            self._jobs.put((fut, fn, args, kwargs))
            # _idle: idle threads less the jobs queued for them.
            if self._idle <= 0 and len(self._threads) < self.size:
                t = threading.Thread(target=self._work, daemon=True,
                                     name=f"{self.name}-{len(self._threads)}")
                self._threads.append(t)
                t.start()
            else:
                self._idle -= 1
        return fut

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fut, fn, args, kwargs = job
            if fut.set_running_or_notify_cancel():
                try:
                    result = fn(*args, **kwargs)
                except BaseException as exc:   # handed to the awaiting handler
                    fut.set_exception(exc)
                else:
                    fut.set_result(result)
            del job, fut, fn, args, kwargs
            with self._lock:
                self._idle += 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        self._closed = True
        if cancel_futures:
            while True:
                try:
                    job = self._jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    job[0].cancel()
        for _ in self._threads:
            self._jobs.put(None)
        if wait:
            for t in self._threads:
                t.join()


class _RecordingContext:
    """A multiprocessing context that remembers the processes it starts, so the node can
    end its workers (``ProcessPoolExecutor`` has no public way to before 3.14)."""

    def __init__(self, ctx):
        self._ctx = ctx
        self.processes: "weakref.WeakSet" = weakref.WeakSet()

    def Process(self, *args, **kwargs):          # noqa: N802 (multiprocessing's spelling)
        p = self._ctx.Process(*args, **kwargs)
        self.processes.add(p)
        return p

    def __getattr__(self, name: str):
        return getattr(self._ctx, name)


class Workers:
    """The node's thread and process pools for handlers (see the module docstring)."""

    def __init__(self, threads: int, processes: int, *, start_method: str = "spawn"):
        if threads < 1 or processes < 0:
            raise ValueError("worker_threads must be >= 1 and worker_processes >= 0")
        self._thread_pool = _DaemonThreads(threads, "utesla-worker")
        self._thread_slots = _Slots(threads)
        self._processes = processes
        self._process_slots = _Slots(processes)
        self._start_method = start_method
        self._process_pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._context: _RecordingContext | None = None
        self.closed = False
        #: Jobs running now, per pool (started and not finished, abandoned ones included).
        self.busy = {"thread": 0, "process": 0}

    # ------------------------------------------------------------------ the API

    async def run_in_thread(self, fn: Callable[..., Any], /, *args, **kwargs) -> Any:
        """``fn(*args, **kwargs)`` in a worker thread; its result (or exception)."""
        return await self._run("thread", self._thread_slots, self._submit_thread,
                               fn, args, kwargs)

    async def run_in_process(self, fn: Callable[..., Any], /, *args, **kwargs) -> Any:
        """``fn(*args, **kwargs)`` in a worker process; its result (or exception).
        ``fn`` and its arguments must pickle (a module-level function)."""
        if self._processes == 0:
            raise WorkersClosed("no worker processes: [server] worker_processes = 0")
        # Pickled here, before waiting for a slot: a function that cannot go to another
        # process is the caller's error, said now and in words that name it.
        payload = _pack(fn, args, kwargs)
        return await self._run("process", self._process_slots, self._submit_process,
                               _call_packed, (payload,), {})

    def stats(self) -> dict:
        """Gauges for the metrics page."""
        return {"worker_threads_busy": self.busy["thread"],
                "worker_threads_waiting": self._thread_slots.waiting,
                "worker_processes_busy": self.busy["process"],
                "worker_processes_waiting": self._process_slots.waiting}

    # ------------------------------------------------------------------ the work

    async def _run(self, kind: str, slots: _Slots, submit, fn, args, kwargs) -> Any:
        if self.closed:
            raise WorkersClosed("the node is stopping")
        await slots.acquire()
        loop = asyncio.get_running_loop()
        try:
            if self.closed:
                raise WorkersClosed("the node is stopping")
            cfut = submit(fn, args, kwargs)
        except BaseException:
            slots.release()
            raise
        self.busy[kind] += 1

        def finished(_f) -> None:
            self.busy[kind] -= 1
            slots.release()

        def from_worker(f: concurrent.futures.Future) -> None:
            try:
                loop.call_soon_threadsafe(finished, f)
            except RuntimeError:            # the loop is closed: nothing left to free
                pass

        cfut.add_done_callback(from_worker)
        # Cancelling the awaiting handler cancels ``cfut`` if it has not started (it was
        # just submitted to a free worker, so in practice it has), else drops its result.
        return await asyncio.wrap_future(cfut)

    def _submit_thread(self, fn, args, kwargs) -> concurrent.futures.Future:
        return self._thread_pool.submit(fn, *args, **kwargs)

    def _submit_process(self, fn, args, kwargs) -> concurrent.futures.Future:
        pool = self._process_pool
        if pool is None:
            self._context = _RecordingContext(multiprocessing.get_context(self._start_method))
            pool = self._process_pool = concurrent.futures.ProcessPoolExecutor(
                self._processes, mp_context=self._context, initializer=_worker_started)
        try:
            return pool.submit(fn, *args, **kwargs)
        except concurrent.futures.BrokenExecutor:
            # A worker died (killed, out of memory): the pool is unusable; start anew.
            log.warning("a worker process died; starting a new process pool")
            self._discard_process_pool()
            return self._submit_process(fn, args, kwargs)

    def _discard_process_pool(self) -> None:
        pool, ctx = self._process_pool, self._context
        self._process_pool = self._context = None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        if ctx is not None:
            for p in list(ctx.processes):
                if p.is_alive():
                    try:
                        p.terminate()
                    except ProcessLookupError:   # it ended meanwhile (3.10 raises then)
                        pass

    def close(self) -> None:
        """Take no more work; cancel what has not started; end the worker processes
        (jobs still running there are lost) and let the daemon threads go."""
        self.closed = True
        self._thread_pool.shutdown(wait=False, cancel_futures=True)
        self._discard_process_pool()


# --------------------------------------------------------------------------- in the worker

def _worker_started() -> None:
    """A worker process leaves SIGINT to the node: Ctrl-C in a terminal reaches the whole
    process group, and the node stops its workers itself."""
    import signal
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def _pack(fn, args, kwargs) -> tuple[str | None, str | None, bytes]:
    """(module, file, pickle of the call).  A function of a module the worker cannot
    import by name (a service, loaded under a private name from ``complements/``) is
    found again by loading that file under the same name before unpickling."""
    module = getattr(fn, "__module__", None)
    mod = sys.modules.get(module) if module else None
    file = getattr(mod, "__file__", None)
    try:
        payload = pickle.dumps((fn, args, kwargs), protocol=pickle.HIGHEST_PROTOCOL)
    except (pickle.PicklingError, TypeError, AttributeError) as exc:
        raise TypeError(f"run_in_process() needs a module-level function and arguments that "
                        f"pickle: {exc}") from None
    return module, file, payload


def _call_packed(packed: tuple[str | None, str | None, bytes]) -> Any:
    module, file, payload = packed
    if module and module not in sys.modules and file:
        try:
            importlib.import_module(module)
        except ImportError:
            _load_file(module, file)
    fn, args, kwargs = pickle.loads(payload)
    return fn(*args, **kwargs)


def _load_file(module: str, file: str) -> None:
    """Import ``file`` as ``module`` (its parents as empty packages, as the node has)."""
    import types
    parts = module.split(".")
    for i in range(1, len(parts)):
        parent = ".".join(parts[:i])
        if parent not in sys.modules:
            pkg = types.ModuleType(parent)
            pkg.__path__ = []
            sys.modules[parent] = pkg
    spec = importlib.util.spec_from_file_location(module, file)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {file} as {module}")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[module] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(module, None)
        raise
