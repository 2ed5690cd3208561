"""Clients: :class:`Client` for scripts, and the blog-compatible :class:`UTeslaClient`.

::

    from utesla_node import Client
    async with Client("utesla://127.0.0.1:17000", user="alice", private_key="alice.priv",
                      node_key="node.pub", token="...") as node:
        reply = await node.get("/hello_world")       # reply.status, reply.body

Many requests may run concurrently on one client: they share one connection,
each on its own stream.  After the connection breaks, the next call reconnects.

A node closes the connections of a user it removed, or whose key it changed
(CLOSE 401, docs/security.md): requests in flight then fail with ``Unauthorized``
naming the reason, and so does the next call, when connecting again is refused.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
from dataclasses import dataclass, field
from typing import AsyncIterator
from urllib.parse import urlsplit

from protocol import Settings
from protocol.crypto import PrivateKey, PublicKey
from protocol.errors import (AuthenticationFailed, HandshakeFailed, BadRequest, Cancelled, ProtocolError,
                             RequestTimeout, Status, StatusError, Unauthorized, Unavailable,
                             error_for_status)
from protocol.messages import MAX_METHOD, MAX_PATH

from .keys import load_private_key, load_public_key
from . import timers, transport
from .proxy import Proxy, ProxyError, parse_proxy
from .transport import ConnectionLost, Session, Stream

__all__ = ["Client", "Reply", "ResponseStream", "UTeslaClient", "parse_url", "DEFAULT_PORT"]

DEFAULT_PORT = 17000


def parse_url(url: str) -> tuple[str, int, str]:
    """``utesla://host:port/path`` (``http://`` accepted) -> (host, port, path)."""
    if "://" not in url:
        url = "utesla://" + url
    parts = urlsplit(url)
    if parts.scheme not in ("utesla", "http", "https"):
        raise ValueError(f"unsupported URL scheme {parts.scheme!r} (use utesla://)")
    if not parts.hostname:
        raise ValueError(f"URL {url!r} has no host")
    try:
        port = parts.port or DEFAULT_PORT
    except ValueError:
        raise ValueError(f"URL {url!r} has an invalid port") from None
    return parts.hostname, port, parts.path or "/"


@dataclass
class Reply:
    """A complete answer: ``status``, ``headers`` and the whole ``body``."""

    status: int
    headers: dict = field(default_factory=dict)
    body: bytes = b""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", errors="replace")

    def json(self):
        return json.loads(self.body)

    def raise_for_status(self) -> "Reply":
        if not self.ok:
            raise error_for_status(self.status, self.text or Status(self.status).name)
        return self


class ResponseStream:
    """A response whose body is read as it arrives: ``async for chunk in resp``.

    ``timeout`` limits each wait for the next chunk (time spent by the consumer between
    chunks does not count); when it runs out the stream is reset and the read raises
    :class:`~protocol.errors.RequestTimeout`.
    """

    def __init__(self, stream: Stream, status: int, headers: dict, timeout: float | None,
                 *, limit: "_TimeLimit | None" = None):
        self._stream = stream
        self.status = status
        self.headers = headers
        self._timeout = timeout
        if limit is None:
            limit = _TimeLimit(timeout, stream=stream)
        limit.idle = True
        self._limit = limit

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._iter()

    async def _iter(self):
        stream, limit = self._stream, self._limit
        while True:
            if stream.buffered or limit.seconds is None:
                chunk = await stream.read_chunk()   # a chunk is waiting (or no limit): no timer
            else:
                with limit:
                    chunk = await stream.read_chunk()
            if not chunk:
                return
            yield chunk                              # outside the limit: the consumer's time

    async def read(self) -> bytes:
        return b"".join([c async for c in self])

    def cancel(self) -> None:
        self._stream.reset(Status.CANCELLED, "cancelled by client")


def _as_private(key) -> PrivateKey:
    return key if isinstance(key, PrivateKey) else load_private_key(key)


def _as_public(key) -> PublicKey:
    return key if isinstance(key, PublicKey) else load_public_key(key)


class Client:
    """An authenticated connection to one node (see the module docstring)."""

    def __init__(self, url: str, *, user: str, private_key, node_key, token: str | None = None,
                 timeout: float | None = 30.0, connect_timeout: float = 10.0,
                 settings: Settings | None = None, proxy: "str | Proxy | None" = None):
        self.host, self.port, _ = parse_url(url)
        #: The SOCKS5 proxy to connect through (``socks5h://[user:pass@]host:port``, or a
        #: :class:`~utesla_node.proxy.Proxy`); None or "direct": connect directly.
        self.proxy = proxy if isinstance(proxy, Proxy) or proxy is None else parse_proxy(proxy)
        self.user = user
        self.private_key = _as_private(private_key)
        self.node_key = _as_public(node_key)
        self.token = token
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.settings = settings or Settings()
        self._session: Session | None = None
        self._connecting: asyncio.Lock | None = None
        #: Why the node ended the last session we dropped, if it revoked our credentials.
        self._revoked: str | None = None

    async def __aenter__(self) -> "Client":
        await self.connect()
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        return self._session is not None and self._session.is_open

    async def connect(self) -> Session:
        """Connect and authenticate (idempotent; reconnects after a broken connection)."""
        session = await self._begin()
        await self._ready(session)
        return session

    async def _begin(self) -> Session:
        """The session, its handshake at least begun: requests may be queued on it at once
        and go out right behind our ClientAuth (0.5-RTT requests, SPEC.md §4.7), one flight
        instead of two.  :meth:`_ready` then waits for, and reports on, the handshake."""
        session = self._session
        if session is not None and session.is_open and not session.going_away:
            return session          # the common case, without taking the lock
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            session = self._session
            if session is not None and session.is_open and not session.going_away:
                return session
            if session is not None and not session.is_open:
                session.close()
                self._revoked = _revocation(session)
            # A session that is going away keeps serving its in-flight requests until
            # the node closes it; new requests go to a fresh connection.
            self._session = None
            try:
                session = await asyncio.wait_for(
                    transport.connect(self.host, self.port, identity=self.private_key,
                                      user=self.user, server_key=self.node_key,
                                      settings=self.settings, proxy=self.proxy),
                    self.connect_timeout)
            except (OSError, asyncio.TimeoutError) as exc:
                via = f" through the proxy {self.proxy}" if self.proxy is not None \
                    and not isinstance(exc, ProxyError) else ""
                raise Unavailable(f"cannot connect to {self.host}:{self.port}{via}: "
                                  f"{exc or 'timed out'}") from None
            self._session = session
            return session

    async def _ready(self, session: Session) -> None:
        """Wait for ``session``'s handshake; its failure as the error a caller reads."""
        ready = session.ready
        if ready.done() and not ready.cancelled() and ready.exception() is None:
            return
        try:
            await session.wait_ready(self.connect_timeout)
        except asyncio.TimeoutError:
            session.close(Status.TIMEOUT, "handshake timed out")
            self._forget(session)
            raise Unavailable(f"handshake with {self.host}:{self.port} timed out") from None
        except ConnectionLost as exc:
            self._forget(session)
            raise Unavailable(f"{self.host}:{self.port} closed the connection during "
                              f"the handshake ({exc})") from None
        except HandshakeFailed as exc:
            self._forget(session)
            if isinstance(exc, AuthenticationFailed) and self._revoked:
                raise self._refused_after_revocation() from None
            if isinstance(exc, AuthenticationFailed) or exc.code != Status.UNAVAILABLE:
                raise
            raise Unavailable(f"{self.host}:{self.port} cannot authenticate anyone right "
                              f"now (its database is unavailable)") from None

    def _forget(self, session: Session) -> None:
        if self._session is session:
            self._session = None

    def _refused_after_revocation(self) -> Unauthorized:
        """The node refuses to authenticate us after it closed our session because it
        revoked our credentials: say that, not only "authentication failed"."""
        return Unauthorized(f"{self.host}:{self.port} closed this user's connection "
                            f"({self._revoked}) and refuses to authenticate it again")

    async def close(self) -> None:
        if self._session is not None:
            session, self._session = self._session, None
            session.close(Status.OK, "client closing")
            with contextlib.suppress(Exception):
                await asyncio.wait_for(session.wait_closed(), 2.0)

    # -------------------------------------------------------------- requests

    async def _open(self, method: str, path: str, args, body, headers, token,
                    limit: "_TimeLimit", envelope=None) -> Stream:
        """Send the request; ``limit`` (the request's time limit) covers any wait for a
        stream slot and is bound to the stream opened, which its expiry resets."""
        if not path.startswith("/"):
            path = "/" + path
        _check_request_line(method, path)
        session = await self._begin()
        if isinstance(body, str):
            body = body.encode()
        early = not session.established
        if early and (body or session.streams):
            # 0.5-RTT only for one request without a body: the node's window and stream
            # limit are not known before its hello.
            await self._ready(session)
            early = False
        first, rest = b"", None
        if isinstance(body, (bytes, bytearray, memoryview)):
            chunk = session.first_body_limit
            first, rest = bytes(body[:chunk]), bytes(body[chunk:])
        elif body is not None and not hasattr(body, "__aiter__") and not hasattr(body, "read"):
            raise TypeError("body must be bytes, str, a file object or an async iterable")
        streaming = rest is None
        end = not streaming and not rest
        token = self.token if token is None else (token or None)
        if not session.stream_slots:
            await limit.wait_stream_slot(session)    # the node's stream limit: queue here
        try:
            stream = session.open_stream(method, path, token=token, args=args,
                                         headers=headers, body=first, end=end,
                                         envelope=envelope)
        except ConnectionLost:
            session = await self.connect()     # the old one went away: one fresh try
            stream = session.open_stream(method, path, token=token, args=args,
                                         headers=headers, body=first, end=end,
                                         envelope=envelope)
        if early:
            try:
                await self._ready(session)      # the request went out behind ClientAuth
            except BaseException:
                stream.reset(Status.CANCELLED, "handshake failed")
                raise
        limit.stream = stream
        if not end:
            asyncio.get_running_loop().create_task(self._upload(stream, rest if not streaming
                                                                else body))
        return stream

    @staticmethod
    async def _upload(stream: Stream, body) -> None:
        """Send the rest of a request body; failures surface on the response side."""
        try:
            if isinstance(body, (bytes, bytearray)):
                await stream.send_body(body, end=True)
            elif hasattr(body, "__aiter__"):
                async for chunk in body:
                    if isinstance(chunk, str):
                        chunk = chunk.encode()
                    await stream.send_body(chunk)
                await stream.end()
            else:  # a binary file object
                loop = asyncio.get_running_loop()
                while True:
                    chunk = await loop.run_in_executor(None, body.read, 256 * 1024)
                    if not chunk:
                        break
                    await stream.send_body(chunk)
                await stream.end()
        except (StatusError, ProtocolError):
            pass  # the stream was reset or the connection lost: the reader sees why

    async def request(self, method: str, path: str, *, args: dict | None = None,
                      body=b"", headers: dict | None = None, token: str | None = None,
                      timeout: float | None = ..., check: bool = True) -> Reply:
        """Send a request and read the whole answer.

        With ``check`` (the default) a non-2xx status raises its exception
        (:class:`~protocol.errors.NotFound`, ``Unauthorized``, ...).  ``timeout`` (default:
        the client's) covers, as one deadline, any wait for a free stream slot on the
        connection and the whole answer; :class:`RequestTimeout` when it runs out.
        """
        timeout = self.timeout if timeout is ... else timeout
        limit = _TimeLimit(timeout, method, path)
        stream = await self._open(method, path, args, body, headers, token, limit)
        try:
            with limit:                                  # one timer: the hot path
                status, resp_headers = await stream.head
                data = await stream.read_all()
        except BaseException:
            stream.reset(Status.CANCELLED, "client gave up")  # a no-op after a timeout
            raise
        reply = Reply(status, resp_headers, data)
        return reply.raise_for_status() if check else reply

    async def get(self, path: str, **kw) -> Reply:
        return await self.request("GET", path, **kw)

    async def post(self, path: str, body=b"", **kw) -> Reply:
        return await self.request("POST", path, body=body, **kw)

    async def put(self, path: str, body=b"", **kw) -> Reply:
        return await self.request("PUT", path, body=body, **kw)

    async def delete(self, path: str, **kw) -> Reply:
        return await self.request("DELETE", path, **kw)

    @contextlib.asynccontextmanager
    async def stream(self, method: str, path: str, *, args: dict | None = None, body=b"",
                     headers: dict | None = None, token: str | None = None,
                     timeout: float | None = ..., check: bool = True):
        """``async with client.stream("GET", "/big") as resp: async for chunk in resp``.

        ``timeout`` limits, as one deadline, the wait for a free stream slot (when the
        node's per-connection stream limit is reached) and for the head (and, with
        ``check``, for the body of an error answer); then each wait for a chunk.
        """
        timeout = self.timeout if timeout is ... else timeout
        limit = _TimeLimit(timeout, method, path)
        stream = await self._open(method, path, args, body, headers, token, limit)
        try:
            with limit:
                status, resp_headers = await stream.head
                error = check and not 200 <= status < 300
                if error:
                    text = (await stream.read_all(65536)).decode("utf-8", "replace")
            if error:
                raise error_for_status(status, text)
            yield ResponseStream(stream, status, resp_headers, timeout, limit=limit)
        finally:
            if not stream.at_end:
                stream.reset(Status.CANCELLED, "client closed the stream")

    async def ping(self) -> float:
        session = await self.connect()
        return await session.ping()

    async def generate_token(self, password: str, *, scopes: list[str] | None = None,
                             expire: float | None = None) -> str:
        """Ask the node for a token (the session proves the key; ``password`` the rest)."""
        args: dict = {"password": password}
        if scopes is not None:
            args["scopes"] = list(scopes)
        if expire is not None:
            args["expire"] = expire
        reply = await self.request("POST", "/_node/token", args=args, token=None)
        return reply.text


def _revocation(session: Session) -> str | None:
    """The reason the node gave when it closed ``session`` because it revoked the
    credentials the session was opened with (CLOSE 401, SPEC.md §8); else None."""
    closed = session.peer_close
    if closed is not None and closed[0] == Status.UNAUTHORIZED:
        return closed[1] or "unauthorized"
    return None


def _check_request_line(method: str, path: str) -> None:
    """Refuse here what the node would refuse as a protocol error (SPEC.md §6).

    A method or path the peer cannot decode would otherwise close the whole
    connection, failing every other request in flight on it.
    """
    if (not isinstance(method, str) or not method or len(method) > MAX_METHOD
            or not method.isascii() or not method.isalpha()):
        raise BadRequest(f"invalid method {method!r}: one word of ASCII letters, "
                         f"at most {MAX_METHOD}")
    if not isinstance(path, str) or len(path) > MAX_PATH:
        raise BadRequest(f"path longer than {MAX_PATH} characters")


class _TimeLimit:
    """The client's one timeout mechanism (``request()``, ``stream()``, each chunk wait).

    ``with limit: <awaits>``: while the block runs, one loop timer is armed (``seconds``
    ``None``: no limit).  A request's limit is one deadline, fixed when it is first
    entered: it covers the wait for a stream slot (:meth:`wait_stream_slot`) and then
    the wait for the answer, so queueing behind the node's stream limit never adds a
    second timeout.  An ``idle`` limit (a ResponseStream's, "no data for") starts afresh
    at each entry, once per chunk wait.

    If the timer fires while a slot is awaited, the wait ends and raises
    :class:`RequestTimeout` naming it.  Once the limit is bound to its ``stream``, the
    timer resets the stream (the node stops working on it; the pending read wakes with
    the reset's ``Cancelled``) and the block raises :class:`RequestTimeout` instead; so
    does a block whose awaited result arrived in the very loop turn the timer fired.
    Other errors (a lost connection, a cancelled task) pass through unchanged.

    No task, no await and no cancellation of the caller's task on the hot path: arming
    costs one timer handle, and an outer ``asyncio.timeout()`` or ``TaskGroup`` never sees
    a stray cancellation.  (Waiting for a slot, the rare path, runs the session's wait in
    a task of its own, so that the timer can end it without touching the caller's.)
    """

    __slots__ = ("stream", "seconds", "method", "path", "idle", "expired", "deadline",
                 "_handle", "_woken")

    def __init__(self, seconds: float | None, method: str = "", path: str = "", *,
                 stream: Stream | None = None):
        self.stream = stream
        self.seconds = seconds
        self.method = method
        self.path = path
        self.idle = False          # True: limits each wait for a chunk ("no data for")
        self.expired = False
        self.deadline: float | None = None      # loop time; set at the first entry
        self._handle: asyncio.TimerHandle | None = None
        self._woken: asyncio.Future | None = None   # set while a stream slot is awaited

    def __enter__(self) -> "_TimeLimit":
        if self.seconds is not None:
            loop = asyncio.get_running_loop()
            if self.deadline is None or self.idle:
                self.deadline = loop.time() + self.seconds
            self._handle = timers.for_loop(loop).add(self.deadline, _TimeLimit._expire, self)
        return self

    def __exit__(self, typ, exc, tb) -> bool:
        handle = self._handle
        if handle is not None:
            self._handle = None
            timers.for_loop(asyncio.get_running_loop()).cancel(handle)
        if self.expired and (typ is None or issubclass(typ, Cancelled)):
            raise RequestTimeout(self.message()) from None
        return False

    def _expire(self) -> None:
        self._handle = None
        self.expired = True
        if self.stream is not None:
            self.stream.reset(Status.CANCELLED, f"client timed out after {self.seconds:g} s")
        elif self._woken is not None and not self._woken.done():
            self._woken.set_result(None)

    async def wait_stream_slot(self, session: Session) -> None:
        """Wait, within this limit, until the node's stream limit lets one more stream open.

        Returns with a free slot (or a closed session: opening then says why); raises
        :class:`RequestTimeout` if the limit runs out first.  The caller opens its stream
        in the same loop turn, before another opener can take the slot.
        """
        loop = asyncio.get_running_loop()
        with self:
            while session.is_open and not session.stream_slots and not self.expired:
                woken = self._woken = loop.create_future()
                waiter = loop.create_task(session.wait_stream_slot())
                waiter.add_done_callback(lambda _, f=woken: f.done() or f.set_result(None))
                try:
                    await woken     # a slot, a closed session, or the timer: whichever first
                finally:
                    self._woken = None
                    if not waiter.done():
                        waiter.cancel()
            if self.expired:
                raise RequestTimeout(self.message(
                    f"no free stream slot within {self.seconds:g} s (every stream the node "
                    f"allows at once on this connection is busy)"))

    def message(self, what: str | None = None) -> str:
        if what is None:
            what = (f"no data for {self.seconds:g} s" if self.idle
                    else f"no answer within {self.seconds:g} s")
        prefix = f"{self.method} {self.path}: " if self.method else ""
        return prefix + what


# --------------------------------------------------------------------------- the blog's API

@dataclass
class _BlogResponse:
    status: int
    headers: dict
    body: bytes


class UTeslaClient:
    """The original's client API, so the blog's script runs with only its import changed.

    ::

        UTeslaClient = client.UTeslaClient('user')
        await UTeslaClient.set_server_key('node.pub')
        await UTeslaClient.set_user_keys('user.pub', 'user.priv')
        Response = await UTeslaClient.fetch('http://localhost:17000/hello_world',
                                            {'token': '...'}, method='GET')
        print(UTeslaClient.get_message(Response.body))
    """

    def __init__(self, user: str):
        self.user = user
        self._node_key: PublicKey | None = None
        self._priv: PrivateKey | None = None
        self._clients: dict[tuple[str, int], Client] = {}

    async def set_server_key(self, path) -> None:
        self._node_key = await asyncio.get_running_loop().run_in_executor(
            None, load_public_key, path)

    async def set_user_keys(self, public_path, private_path) -> None:
        loop = asyncio.get_running_loop()
        priv = await loop.run_in_executor(None, load_private_key, private_path)
        pub = await loop.run_in_executor(None, load_public_key, public_path)
        if pub != priv.public:
            raise ValueError(f"{public_path} is not the public half of {private_path}")
        self._priv = priv

    async def fetch(self, url: str, cmd: dict | None = None, method: str = "GET",
                    body=b"", timeout: float | None = 30.0) -> _BlogResponse:
        """One request; ``cmd['token']`` is the token, the other entries are arguments."""
        if self._node_key is None or self._priv is None:
            raise RuntimeError("call set_server_key() and set_user_keys() first")
        host, port, path = parse_url(url)
        args = dict(cmd or {})
        token = args.pop("token", None)
        client = self._clients.get((host, port))
        if client is None:
            client = Client(f"utesla://{host}:{port}", user=self.user, private_key=self._priv,
                            node_key=self._node_key, timeout=timeout)
            self._clients[(host, port)] = client
        reply = await client.request(method, path, args=args or None, token=token, body=body,
                                     check=False)
        return _BlogResponse(reply.status, reply.headers, reply.body)

    @staticmethod
    def get_message(body: bytes):
        """The body as text (bytes that are not UTF-8 are returned unchanged)."""
        try:
            return body.decode("utf-8")
        except UnicodeDecodeError:
            return body

    async def close(self) -> None:
        for c in self._clients.values():
            await c.close()
        self._clients.clear()

    def __del__(self):  # the blog's script never closes: do not warn about it
        self._clients.clear()
