"""The built-in services under ``/_node/`` (SPEC.md §6.9, docs/services.md), the
network's ones (``/_node/net/...``) included.

Each is handed what it needs by the composition root (server.py); none holds the
node.  Errors are raised, never turned into statuses here: the dispatcher does that
(utesla_node/errors.py), so refusals read the same from every built-in.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Awaitable, Callable

from protocol.errors import BadRequest, NotFound, Unauthorized

from . import auth
from .gate import Gate
from .metrics import Metrics
from .response import ResponseWriter
from .rules import BUILTIN_PREFIX, is_number
from .transport import Session, Stream

if TYPE_CHECKING:  # pragma: no cover
    from .network import Network

__all__ = ["Builtins"]


class Builtins:
    """Serves ``/_node/NAME`` requests (see the module docstring)."""

    def __init__(self, gate: Gate, authority: auth.Authority, metrics: Metrics, *,
                 local_services: Callable[[], list[str]], status: Callable[[], dict],
                 prometheus: Callable[[], Awaitable[str]], network: "Network | None" = None):
        self.gate = gate
        self.authority = authority
        self.metrics = metrics
        self.local_services = local_services
        self.node_status = status
        self.prometheus = prometheus
        self.network = network
        #: name -> (method, needs a token)
        self.table = {
            "ping": (self.ping, False),
            "token": (self.token, False),
            "token/renew": (self.renew, False),
            "token/revoke": (self.revoke, False),
            "services": (self.services, True),
            "status": (self.status, True),
            "metrics": (self.metrics_page, True),
            "net/routes": (self.net_routes, True),
            "net/status": (self.net_status, True),
        }

    def names(self) -> list[str]:
        return ["_node/" + n for n in self.table]

    async def serve(self, session: Session, stream: Stream, writer: ResponseWriter) -> None:
        req = stream.request
        name = req.path[len(BUILTIN_PREFIX):].strip("/")
        entry = self.table.get(name)
        if entry is None or (name.startswith("net/") and self.network is None):
            raise NotFound(f"no built-in service {req.path}")
        fn, needs_token = entry
        user = None
        if needs_token:
            user = await self.gate.authorize(session.peer_user, req.token, "_node/" + name)
        await fn(session, stream, writer, user)

    # -------------------------------------------------------------- tokens

    async def ping(self, session, stream, writer, user) -> None:
        await writer.write(b"pong")

    async def token(self, session, stream, writer, user) -> None:
        """Issue a token: the session proves the key, the ``password`` argument the rest."""
        args = stream.request.args or {}
        password = args.get("password")
        if not isinstance(password, str):
            raise BadRequest("argument 'password' (string) is required")
        scopes = args.get("scopes")
        if scopes is not None and (not isinstance(scopes, list)
                                   or not all(isinstance(s, str) for s in scopes)):
            raise BadRequest("argument 'scopes' must be a list of service globs")
        expire = args.get("expire")
        if expire is not None and not is_number(expire):
            raise BadRequest("argument 'expire' must be a number of seconds")
        try:
            await self.authority.check_password(session.peer_user, password,
                                                source=session.peer_address)
            token, record = await self.authority.issue_token(session.peer_user, scopes, expire)
        except auth.Unauthorized:
            self.metrics.incr("auth_failures")
            raise Unauthorized("invalid user or password") from None
        except ValueError as exc:
            raise BadRequest(str(exc)) from None
        writer.set_header("expires-at", record.expires_at)
        await writer.write(token.encode())

    async def renew(self, session, stream, writer, user) -> None:
        token = stream.request.token
        try:
            record = await self.authority.renew(token or "", session.peer_user)
        except auth.Unauthorized:
            raise Unauthorized("invalid token") from None
        self.gate.forget_token(token)
        await writer.write({"expires_at": record.expires_at})

    async def revoke(self, session, stream, writer, user) -> None:
        target = (stream.request.args or {}).get("token") or stream.request.token or ""
        try:
            done = await self.authority.revoke(target, session.peer_user)
        except auth.Unauthorized:
            raise Unauthorized("invalid token") from None
        self.gate.forget_token(target)
        await writer.write({"revoked": bool(done)})

    # -------------------------------------------------------------- views

    async def services(self, session, stream, writer, user) -> None:
        local = [{"path": "/" + n, "origin": "local", "hops": 0} for n in self.local_services()]
        remote = self.network.routes_summary() if self.network is not None else []
        await writer.write({"services": local + remote})

    async def status(self, session, stream, writer, user) -> None:
        await writer.write(self.node_status())

    async def metrics_page(self, session, stream, writer, user) -> None:
        await writer.write((await self.prometheus()).encode())

    # -------------------------------------------------------------- network

    async def net_routes(self, session, stream, writer, user) -> None:
        await self.network.serve_routes(session, stream, writer)

    async def net_status(self, session, stream, writer, user) -> None:
        await writer.write(self.network.status())
