"""Loading services from ``complements/`` and the handler API they see.

A service is ``complements/NAME.py`` holding ``class Handler`` (or the blog's
``class handler``) with async methods named after request methods.  ``/a/b``
reaches ``complements/a/b.py``; ``complements/a.py`` or ``complements/a/__init__.py``
serves ``/a``.  Names are checked against an ASCII allowlist *before* they touch
the filesystem, and each module loads under a private name
(``_utesla_services.<generation>.<path>``) so services cannot collide with each
other or with installed packages.

The registry is built whole and swapped in one assignment (SIGHUP reload):
requests already running keep the handler class they started with.
"""
from __future__ import annotations

import importlib.util
import itertools
import logging
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

from protocol.errors import BadRequest, NotFound

__all__ = ["Handler", "ServiceRegistry", "Service", "split_path", "SEGMENT_RE", "METHODS", "NodeView",
           "frame_service"]

log = logging.getLogger("utesla.services")

#: One path segment: ASCII letters, digits, '_', '-' and '.', starting with a letter or
#: digit, without '..'.  Service modules never have a '.' in their names (it would be
#: an import separator), so dotted segments only ever reach handlers as ``subpath``.
SEGMENT_RE = re.compile(r"(?!.*\.\.)[A-Za-z0-9][A-Za-z0-9_.-]{0,127}\Z")
MODULE_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}\Z")
MAX_SEGMENTS = 8
#: Request methods a handler may implement; anything else is 405, never getattr'd.
METHODS = frozenset({"get", "post", "put", "delete", "patch", "head", "options"})
_generation = itertools.count(1)


_split_cache: dict[str, tuple[str, ...]] = {}


def split_path(path: str) -> list[str]:
    """``/a/b/`` -> ``["a", "b"]``; refuses anything outside the allowlist (400).

    Valid paths are remembered (a bounded cache): most traffic repeats a few paths.
    """
    hit = _split_cache.get(path)
    if hit is not None:
        return list(hit)
    parts = _split_path(path)
    if len(_split_cache) >= 4096:
        _split_cache.clear()
    _split_cache[path] = tuple(parts)
    return parts


def _split_path(path: str) -> list[str]:
    if not path.startswith("/") or len(path) > 1024:
        raise BadRequest("path must start with '/' and be at most 1024 characters")
    parts = [p for p in path[1:].split("/") if p != ""]
    if len(parts) > MAX_SEGMENTS:
        raise BadRequest(f"path deeper than {MAX_SEGMENTS} segments")
    for p in parts:
        if not SEGMENT_RE.match(p):
            raise BadRequest("invalid path segment (allowed: ASCII letters, digits, '_', '-', "
                             "'.' inside a name)")
    if not parts:
        raise NotFound("no service named")
    return parts


class RequestBody:
    """The request body: ``async for chunk in self.body`` or ``await self.body.read()``."""

    __slots__ = ("_stream", "_limit")

    def __init__(self, stream, limit: int):
        self._stream = stream
        self._limit = limit

    def __aiter__(self):
        return self._stream.__aiter__()

    async def read(self) -> bytes:
        return await self._stream.read_all(self._limit)


class _FromContext:
    """A read-only view of one request attribute (instances may still shadow it)."""

    __slots__ = ("attr",)

    def __init__(self, attr: str | None = None):
        self.attr = attr

    def __set_name__(self, owner, name):
        if self.attr is None:
            self.attr = name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        return getattr(obj._ctx, self.attr)


class NodeView:
    """What a service sees of the node it runs in (``self.node``): its configuration,
    its key pair and its fingerprint, and its worker pools (``workers``, a
    :class:`utesla_node.workers.Workers`; handlers use them through
    :meth:`Handler.run_in_thread` and :meth:`Handler.run_in_process`).  One object per
    node, shared by every request, so services may also keep node-wide state on it."""

    def __init__(self, config, key, workers=None):
        self.config = config
        self.key = key
        self.fingerprint = key.public.fingerprint()
        self.workers = workers


class Handler:
    """Base of every service handler (plain classes get it mixed in at load time).

    Attributes available in handler methods and in ``__init__``:
    ``args`` (dict of request arguments), ``user`` (authenticated user name),
    ``path`` (the full request path), ``subpath`` (segments after the service's
    own), ``headers`` (request headers), ``body`` (:class:`RequestBody`),
    ``method`` and ``node`` (a :class:`NodeView`: the node's config and key, for
    advanced services).
    """

    _ctx = None       # the request's RequestContext (response.py), set before __init__ runs
    args = _FromContext()
    user = _FromContext()
    path = _FromContext()
    subpath = _FromContext()
    headers = _FromContext("request_headers")
    body = _FromContext()
    method = _FromContext()
    node = _FromContext()

    def set_status(self, status: int) -> None:
        """Status of the response; only before the first byte of the body is sent."""
        self._ctx.set_status(int(status))

    def set_header(self, name: str, value) -> None:
        self._ctx.set_header(name, value)

    def write(self, data):
        """Send a piece of the answer: ``str`` (UTF-8), bytes, or a dict/list (JSON).

        May be called many times; the client receives the pieces in order.  Returns
        an awaitable: ``await self.write(...)``.
        """
        return self._ctx.write(data)

    def flush(self):
        return self._ctx.flush()

    def run_in_thread(self, fn, /, *args, **kwargs):
        """``await self.run_in_thread(fn, *args)``: run blocking work (files, a driver
        without asyncio, ``time.sleep``) in one of the node's worker threads, so other
        requests go on meanwhile; returns what ``fn`` returns (or raises what it raises).

        At most ``[server] worker_threads`` run at once; the rest wait their turn.  If
        the client leaves, the handler is cancelled at once: work that has not started
        never starts, work that has finishes and its result is dropped.
        """
        return self._ctx.node.workers.run_in_thread(fn, *args, **kwargs)

    def run_in_process(self, fn, /, *args, **kwargs):
        """``await self.run_in_process(fn, *args)``: run CPU-heavy Python (hashing,
        parsing, compressing) in one of the node's worker processes, where it holds no
        lock the event loop needs.  ``fn`` is a module-level function (this service's
        own are fine) and its arguments and result must pickle.

        At most ``[server] worker_processes`` run at once; if the client leaves, work
        that has not started is cancelled, work that has runs on and is dropped.
        """
        return self._ctx.node.workers.run_in_process(fn, *args, **kwargs)


@dataclass(frozen=True)
class Service:
    """A loaded service: its name (path segments) and the handler class to use."""

    name: tuple[str, ...]
    handler: type
    file: Path

    @property
    def path(self) -> str:
        return "/" + "/".join(self.name)

    def methods(self) -> list[str]:
        return sorted(m.upper() for m in METHODS if callable(getattr(self.handler, m, None)))

    def handler_for(self, ctx) -> "Handler":
        """A handler instance for one request, its context ``ctx`` (a
        response.RequestContext) set before its ``__init__`` runs."""
        cls = self.handler
        handler = cls.__new__(cls)
        handler._ctx = ctx
        handler.__init__()
        return handler


class ServiceRegistry:
    """An immutable snapshot of the services in one folder."""

    def __init__(self, folder: Path, services: dict[tuple[str, ...], Service],
                 errors: dict[str, str]):
        self.folder = folder
        self.services = services
        self.errors = errors

    @classmethod
    def empty(cls) -> "ServiceRegistry":
        return cls(Path("."), {}, {})

    @classmethod
    def load(cls, folder: Path) -> "ServiceRegistry":
        """Import every service under ``folder``; a broken file is logged and skipped."""
        folder = Path(folder)
        gen = next(_generation)
        services: dict[tuple[str, ...], Service] = {}
        errors: dict[str, str] = {}
        if not folder.is_dir():
            log.warning("services folder %s does not exist: no services", folder)
            return cls(folder, services, errors)
        root = folder.resolve()
        for file in sorted(root.rglob("*.py")):
            rel = file.relative_to(root)
            parts = list(rel.with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            if not parts or len(parts) > MAX_SEGMENTS or not all(MODULE_RE.match(p) for p in parts):
                continue  # private helpers (_x.py), odd names: not services
            if file.is_symlink() and not file.resolve().is_relative_to(root):
                log.warning("skipping %s: symlink out of the services folder", rel)
                continue
            name = tuple(parts)
            try:
                handler = _load_handler(file, gen, name)
            except Exception as exc:  # a broken service must not stop the others
                errors["/".join(name)] = f"{type(exc).__name__}: {exc}"
                log.error("service %s not loaded from %s: %s: %s", "/" + "/".join(name), rel,
                          type(exc).__name__, exc)
                continue
            if handler is None:
                continue
            if name in services:
                log.warning("service /%s defined twice; using %s", "/".join(name), rel)
            services[name] = Service(name, handler, file)
        # Earlier generations leave sys.modules (requests still running keep their
        # classes through the registry they started with).
        for name in [n for n in sys.modules if n.startswith(f"{_NAMESPACE}.g")
                     and not n.startswith(f"{_NAMESPACE}.g{gen}.")]:
            del sys.modules[name]
        log.info("loaded %d service(s) from %s%s", len(services), folder,
                 f" ({len(errors)} failed)" if errors else "")
        return cls(folder, services, errors)

    def resolve(self, parts: list[str]) -> tuple[Service, list[str]] | None:
        """The service owning the longest prefix of ``parts``, and the rest of the path."""
        for n in range(len(parts), 0, -1):
            svc = self.services.get(tuple(parts[:n]))
            if svc is not None:
                return svc, parts[n:]
        return None

    def names(self) -> list[str]:
        return sorted("/".join(k) for k in self.services)


_NAMESPACE = "_utesla_services"
#: A global of every service module: the service's path.
_SERVICE_MARK = "__utesla_service__"


def frame_service(frame) -> tuple[str | None, str]:
    """Which service the running ``frame`` (and its callers) belongs to: (its path,
    ``file:line in function`` of the innermost service frame), or (None, the innermost
    frame's place) when no service is on the stack.  For :mod:`utesla_node.loopwatch`."""
    first = frame
    while frame is not None:
        path = frame.f_globals.get(_SERVICE_MARK)
        if path is not None:
            return path, _place(frame)
        frame = frame.f_back
    return None, _place(first)


def _place(frame) -> str:
    code = frame.f_code
    return f"{Path(code.co_filename).name}:{frame.f_lineno} in {code.co_name}"


def _module_segment(segment: str) -> str:
    """A path segment as an identifier, one-to-one: '_' -> '__', '-' -> '_d'.

    (Plain ``replace('-', '_')`` made ``/x-y`` and ``/x_y`` share one module name.)
    """
    return segment.replace("_", "__").replace("-", "_d")


def _load_handler(file: Path, gen: int, name: tuple[str, ...]) -> type | None:
    if _NAMESPACE not in sys.modules:
        sys.modules[_NAMESPACE] = types.ModuleType(_NAMESPACE)
    modname = f"{_NAMESPACE}.g{gen}.{'.'.join(map(_module_segment, name))}"
    spec = importlib.util.spec_from_file_location(modname, file)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {file}")
    module = importlib.util.module_from_spec(spec)
    # Read by frame_service(): the loop watchdog names the service that blocks the loop.
    module.__dict__[_SERVICE_MARK] = "/" + "/".join(name)
    sys.modules[modname] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(modname, None)
        raise
    cls = getattr(module, "Handler", None) or getattr(module, "handler", None)
    if cls is None:
        if file.name == "__init__.py":
            return None  # a package folder that only groups sub-services
        raise AttributeError("no class Handler (or handler) in the module")
    if not isinstance(cls, type):
        raise TypeError("Handler must be a class")
    if not any(callable(getattr(cls, m, None)) for m in METHODS):
        raise TypeError("Handler has no request methods (get, post, ...)")
    if issubclass(cls, Handler):
        return cls
    # The blog's plain classes: mix the API in, their own methods first.
    return type(cls.__name__, (cls, Handler), {"__module__": cls.__module__})
