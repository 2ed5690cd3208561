"""Administering a node: users, tokens, peers and the running node's state, as a library.

``utesla-cli`` is a thin shell over this module: it parses arguments, calls one method
and prints what comes back.  Scripts can do the same::

    from utesla_node import load_config
    from utesla_node.admin import Admin
    from utesla_node.keys import load_public_key

    async with Admin(load_config("node.ini")) as admin:
        await admin.add_user("alice", "correct horse", load_public_key("alice.pub"))
        for user in await admin.users():
            print(user.name, user.fingerprint)

What lives here rather than in the CLI: building ``User`` rows and hashing passwords,
picking a token by its id (a prefix of its hash), checking that a peer accepts our
account before storing it, the canonical form of a peer URL (:func:`peer_url`, the one
place it is built), and reading the running node's state (through
:mod:`utesla_node.status`).

**The database must exist.**  An admin command run in the wrong folder used to create a
new, empty SQLite database there: ``add`` said "user added" and the running node never
saw the user; ``show`` said "no users".  :class:`Admin` refuses with :class:`NoDatabase`
when the SQLite file is missing, unless made with ``create=True``.  The node creates its
database on first start.  Its admin may also register users (or peers) before that
first start, in the node's folder, as the original's instructions allow: ``utesla-cli``
creates the database for ``add`` and ``add_network`` when :func:`is_node_folder` says
the configuration plainly belongs to a node, and otherwise only with ``--create``.
MariaDB databases are made by their admin; nothing is checked for them.

Errors (the storage's own tree, :mod:`utesla_node.storage`, passes through: e.g.
``AlreadyExists``, ``StorageUnavailable``; so do the client's errors from the peer
check: ``StatusError``, ``ProtocolError``, ``OSError``)::

    AdminError
     ├── NoDatabase       no SQLite database where the configuration points (create=False)
     ├── UnknownEntry     the named user, token or peer does not exist
     ├── AmbiguousToken   a token id matches more than one token
     └── LinkNotUp        wait_for_link() gave up
    NodeNotRunning        (utesla_node.status) no fresh status file: no node runs there
"""
from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from protocol.crypto import PrivateKey, PublicKey

from .auth import hash_password, validate_scopes
from .config import NodeConfig
from .proxy import DIRECT, Proxy, choose, redact
from .status import NodeNotRunning, read_status
from .storage import (NoSuchEntry, Peer, SQLiteStorage, Storage, Token, User,
                      open_storage)

__all__ = ["Admin", "AdminError", "NoDatabase", "UnknownEntry", "AmbiguousToken", "LinkNotUp",
           "NodeNotRunning", "UserInfo", "TokenInfo", "PeerInfo", "NetworkRow", "ServiceRow",
           "is_node_folder", "peer_url", "check_peer", "remote_status", "TOKEN_ID_LEN"]

#: Hex digits of a token's hash shown as its id (``utesla-cli tokens``).
TOKEN_ID_LEN = 12


# --------------------------------------------------------------------------- errors

class AdminError(Exception):
    """Base of the errors this module raises itself."""


class NoDatabase(AdminError):
    """The configuration points at a SQLite database that does not exist yet.

    Usually the command runs in another folder than the node's, or without the node's
    ``node.ini``.  ``path`` is where the database was looked for.
    """

    def __init__(self, path: Path, detail: str):
        self.path = Path(path)
        super().__init__(f"no node database at {self.path} ({detail})")


class UnknownEntry(AdminError):
    """The user, token or peer a command names does not exist."""


class AmbiguousToken(AdminError):
    """A token id (a prefix of the hash) matches more than one token of the user."""


class LinkNotUp(AdminError):
    """:meth:`Admin.wait_for_link` ran out of time; the message says the link's last error."""


# --------------------------------------------------------------------------- results

@dataclass(frozen=True)
class UserInfo:
    """A user as shown to the admin: never the password hash."""

    name: str
    key_kind: str               # "ed25519", "rsa3072", ...; "?" for an unusable stored key
    fingerprint: str            # "(unusable key)" then
    token_limit: int            # 0 = unlimited
    guest: bool
    scopes: tuple[str, ...]
    created_at: float

    @classmethod
    def of(cls, user: User) -> "UserInfo":
        kind, fp = _describe_key(user.public_key)
        return cls(user.name, kind, fp, user.token_limit, user.guest, user.scopes,
                   user.created_at)


@dataclass(frozen=True)
class TokenInfo:
    """A stored token, by id (the first hex digits of its hash): never the token."""

    id: str
    user: str
    state: str                  # "live", "expired" or "revoked"
    created_at: float
    expires_at: float
    scopes: tuple[str, ...]

    @classmethod
    def of(cls, token: Token, now: float) -> "TokenInfo":
        state = "revoked" if token.revoked else ("live" if token.is_live(now) else "expired")
        return cls(token.token_hash.hex()[:TOKEN_ID_LEN], token.user, state, token.created_at,
                   token.expires_at, token.scopes)


@dataclass(frozen=True)
class PeerInfo:
    """A stored peer: never its token."""

    url: str
    user: str
    priority: int
    key: str                    # the peer's key fingerprint
    created_at: float
    proxy: str = ""             # its own proxy, password hidden; "" = [network] proxy

    @classmethod
    def of(cls, peer: Peer) -> "PeerInfo":
        return cls(peer.url, peer.user, peer.priority, _describe_key(peer.public_key)[1],
                   peer.created_at, redact(peer.proxy))


@dataclass(frozen=True)
class NetworkRow:
    """A stored peer with its link as the running node reports it (``show_networks``).
    Fields, in this order, are the keys of ``show_networks --json``."""

    url: str
    user: str
    priority: int
    key: str
    state: str                  # "up", "connecting", "backoff", ...; "pending" before
    rtt_ms: float | None        # the node has picked the peer up (within 2 s)
    routes: int | None
    last_error: str
    token_expires_at: float | None
    renew_error: str
    proxy: str = ""             # the peer's own proxy (password hidden); "" = [network] proxy

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ServiceRow:
    """A service the running node can reach: its own (``origin`` "local") or learned."""

    path: str
    origin: str
    next_hop: str
    hops: int
    replicas: int
    routes: int | None = None   # candidate routes (learned services only)

    def as_dict(self) -> dict:
        d = asdict(self)
        if d["routes"] is None:
            del d["routes"]
        return d


def _describe_key(pem: str) -> tuple[str, str]:
    """(kind, fingerprint) of a stored public key; a damaged one is shown, not fatal."""
    try:
        key = PublicKey.from_bytes(pem)
    except Exception:
        return "?", "(unusable key)"
    return (key.kind if key.kind == "ed25519" else f"rsa{key.bits}"), key.fingerprint()


# --------------------------------------------------------------------------- helpers

def is_node_folder(config: NodeConfig) -> bool:
    """Whether ``config`` plainly belongs to a node, so a missing database may be created
    for it: it was read from a node.ini, or the node's services folder (``complements``)
    or private key (``keys/key.priv``) exists.  A folder with none of them (the user's
    key folder, a home directory) is the wrong folder, not a node before its first start.
    """
    return (config.source is not None or config.services_dir.is_dir()
            or (config.keys_dir / "key.priv").is_file())


# --------------------------------------------------------------------------- peers, off-line

def peer_url(url: str) -> str:
    """The canonical form peers are stored and matched under: ``utesla://host:port``.

    ``http://`` and a missing scheme are accepted, the default port filled in, a path
    dropped, the host lower-cased, an IPv6 address bracketed.  Every command that names
    a peer goes through here, so ``add_network http://localhost:17001`` and
    ``del_network utesla://LOCALHOST:17001/`` name the same peer.
    """
    from .client import parse_url
    host, port, _ = parse_url(url)
    if ":" in host:
        host = f"[{host}]"
    return f"utesla://{host}:{port}"


async def check_peer(url: str, *, node_key: PrivateKey, peer_key: PublicKey, user: str,
                     token: str, timeout: float = 15.0, proxy: Proxy | None = None) -> None:
    """Prove the peer answers at ``url``, holds ``peer_key``, and accepts our account and
    token (``GET /_node/net/status``, what the link itself needs); raises the client's
    error otherwise (``AuthenticationFailed``, ``Unauthorized``, ``OSError``, ...).
    ``proxy``: the SOCKS5 proxy the link will go through."""
    from .client import Client
    async with Client(peer_url(url), user=user, private_key=node_key, node_key=peer_key,
                      token=token, timeout=timeout, proxy=proxy) as c:
        await c.get("/_node/net/status")


async def remote_status(url: str, *, user: str, private_key, node_key, token: str | None,
                        timeout: float = 15.0, proxy: "Proxy | str | None" = None) -> dict:
    """Any node's status (``/_node/status``) over the network, as one of its users."""
    from .client import Client
    async with Client(url, user=user, private_key=private_key, node_key=node_key, token=token,
                      timeout=timeout, proxy=proxy) as c:
        return (await c.get("/_node/status")).json()


# --------------------------------------------------------------------------- the admin

class Admin:
    """One node's database and running state, for administration.

    The database is opened on first use, so the methods that only read the running
    node's state (:meth:`node_status`, :meth:`services`) work without it.  Use as
    ``async with Admin(config) as admin:`` (or call :meth:`close`).  ``clock`` gives
    epoch seconds (tests pass their own).
    """

    def __init__(self, config: NodeConfig, *, create: bool = False,
                 clock: Callable[[], float] = time.time):
        self.config = config
        self.create = create
        self.clock = clock
        self._storage: Storage | None = None

    async def __aenter__(self) -> "Admin":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        if self._storage is not None:
            storage, self._storage = self._storage, None
            await storage.close()

    # ------------------------------------------------------------------ the database

    def _make_storage(self) -> Storage:
        """The (unopened) storage of the configuration; :class:`NoDatabase` when it is a
        SQLite file that does not exist and ``create`` is off.  Nothing is created then,
        not even the data folder."""
        cfg = self.config
        url = cfg.database_url or None
        if url is None and not self.create and not cfg.data_dir.is_dir():
            raise NoDatabase(cfg.data_dir, "no such folder")
        storage = open_storage(url, cfg.data_dir)
        if (isinstance(storage, SQLiteStorage) and storage.path != ":memory:"
                and not self.create and not Path(storage.path).is_file()):
            raise NoDatabase(Path(storage.path), "no such file")
        return storage

    def require_database(self) -> None:
        """Raise :class:`NoDatabase` now, before slow work (a peer check) would be wasted.
        Creates nothing (with ``create``, the database is made when first opened)."""
        if self._storage is None and not self.create:
            self._make_storage()

    async def storage(self) -> Storage:
        """The open storage (opened on first call)."""
        if self._storage is None:
            storage = self._make_storage()
            await storage.open()
            self._storage = storage
        return self._storage

    # ------------------------------------------------------------------ users

    async def add_user(self, name: str, password: str, public_key: PublicKey, *,
                       token_limit: int = 1, guest: bool = False,
                       scopes: Iterable[str] = (), overwrite: bool = False) -> UserInfo:
        """Register ``name``; ``overwrite`` replaces an existing user and revokes its
        tokens (``AlreadyExists`` otherwise).  No ``scopes``: every service."""
        _check_password(password)
        scopes = validate_scopes(scopes) if scopes else ("*",)
        user = User(name=name, password_hash=await hash_password(password),
                    public_key=public_key.to_pem(), token_limit=token_limit, guest=guest,
                    scopes=scopes, created_at=self.clock())
        await (await self.storage()).add_user(user, overwrite=overwrite)
        return UserInfo.of(user)

    async def delete_user(self, name: str) -> None:
        """Remove a user and all its tokens."""
        if not await (await self.storage()).delete_user(name):
            raise UnknownEntry(f"no user {name!r}")

    async def users(self) -> list[UserInfo]:
        """Every user, by name."""
        return [UserInfo.of(u) for u in await (await self.storage()).list_users()]

    async def user(self, name: str) -> UserInfo:
        return UserInfo.of(await self._get_user(name))

    async def set_password(self, name: str, password: str) -> None:
        """Change the password; revokes every token of the user."""
        _check_password(password)
        digest = await hash_password(password)
        try:
            await (await self.storage()).set_password(name, digest)
        except NoSuchEntry:
            raise UnknownEntry(f"no user {name!r}") from None

    async def set_public_key(self, name: str, key: PublicKey) -> None:
        """Rotate the user's key; revokes every token of the user."""
        try:
            await (await self.storage()).set_public_key(name, key.to_pem())
        except NoSuchEntry:
            raise UnknownEntry(f"no user {name!r}") from None

    async def set_scopes(self, name: str, scopes: Iterable[str], *,
                         guest: bool | None = None) -> UserInfo:
        """Set the services a user may reach (and, given ``guest``, whether only those).

        Re-registers the user as it is with the new values, which revokes its tokens:
        the storage has no partial update (its ``add_user(overwrite=True)`` is the only
        way to change these fields), and tokens granted under the old services should
        not outlive the change anyway.
        """
        scopes = validate_scopes(scopes) if scopes else ("*",)
        user = await self._get_user(name)
        changed = replace(user, scopes=scopes, guest=user.guest if guest is None else guest)
        await (await self.storage()).add_user(changed, overwrite=True)
        return UserInfo.of(changed)

    async def set_token_limit(self, name: str, limit: int) -> UserInfo:
        """Set how many live tokens the user may hold (0 = unlimited).  Revokes its
        tokens, as :meth:`set_scopes` does and for the same storage reason."""
        user = await self._get_user(name)
        changed = replace(user, token_limit=limit)
        await (await self.storage()).add_user(changed, overwrite=True)
        return UserInfo.of(changed)

    async def _get_user(self, name: str) -> User:
        user = await (await self.storage()).get_user(name)
        if user is None:
            raise UnknownEntry(f"no user {name!r}")
        return user

    # ------------------------------------------------------------------ tokens

    async def tokens(self, user: str) -> list[TokenInfo]:
        """The user's stored tokens (live, expired, revoked), oldest first."""
        now = self.clock()
        return [TokenInfo.of(t, now) for t in await (await self.storage()).list_tokens(user)]

    async def revoke_token(self, user: str, token_id: str) -> TokenInfo:
        """Revoke the one token of ``user`` whose id starts with ``token_id``."""
        token = await self._find_token(user, token_id)
        await (await self.storage()).revoke_token(token.token_hash)
        return TokenInfo.of(replace(token, revoked=True), self.clock())

    async def revoke_all(self, user: str) -> int:
        """Revoke every token of ``user``; how many were not revoked already."""
        return await (await self.storage()).revoke_user_tokens(user)

    async def renew_token(self, user: str, token_id: str,
                          lifetime: float | None = None) -> TokenInfo:
        """Make a token valid again from now, for the lifetime it was issued with (as
        ``/_node/token/renew`` does) or ``lifetime`` seconds; never beyond
        ``[crypt limits] token_expire``.  An expired token can be renewed; a revoked one
        cannot (revocation is final)."""
        token = await self._find_token(user, token_id)
        if token.revoked:
            raise UnknownEntry(f"token {token_id} of {user} is revoked; it cannot be renewed")
        span = token.expires_at - token.created_at if lifetime is None else lifetime
        if not span > 0:
            raise ValueError("the lifetime must be a positive number of seconds")
        span = min(span, self.config.token_expire)
        now = self.clock()
        if not await (await self.storage()).renew_token(token.token_hash, now + span,
                                                         issued_at=now):
            raise UnknownEntry(f"token {token_id} of {user} was revoked or deleted meanwhile")
        return TokenInfo.of(replace(token, created_at=now, expires_at=now + span), now)

    async def _find_token(self, user: str, token_id: str) -> Token:
        prefix = token_id.strip().lower()
        if not prefix:
            raise ValueError("give a token id (the first hex digits shown by `tokens`)")
        matches = [t for t in await (await self.storage()).list_tokens(user)
                   if t.token_hash.hex().startswith(prefix)]
        if not matches:
            raise UnknownEntry(f"no token of {user} matches {token_id!r}")
        if len(matches) > 1:
            raise AmbiguousToken(f"more than one token of {user} matches {token_id!r}: "
                                 "give more digits")
        return matches[0]

    # ------------------------------------------------------------------ peers

    async def add_peer(self, url: str, *, node_key: PrivateKey, peer_key: PublicKey, user: str,
                       token: str, priority: int = 0, overwrite: bool = False,
                       proxy: str = "") -> PeerInfo:
        """Store a link to the peer at ``url`` once it has proved (:func:`check_peer`)
        that it holds ``peer_key`` and accepts ``user`` and ``token``.
        A running node picks it up within 2 s.  ``created_at`` of the result tells this
        entry from one it replaces (:meth:`wait_for_link` needs it).

        ``proxy``: the peer's own SOCKS5 proxy (``socks5h://...``, or ``direct`` for
        none); empty: the node's ``[network] proxy``.  The check goes the way the link
        will go."""
        url = peer_url(url)
        proxy = (proxy or "").strip()
        via = choose(proxy, self.config.proxy)      # ValueError for a malformed proxy
        self.require_database()          # before the network round trip, not after it
        await check_peer(url, node_key=node_key, peer_key=peer_key, user=user, token=token,
                         proxy=via)
        peer = Peer(url=url, public_key=peer_key.to_pem(), user=user, token=token,
                    priority=priority, created_at=self.clock(),
                    proxy=DIRECT if proxy.lower() == DIRECT else proxy)
        await (await self.storage()).add_peer(peer, overwrite=overwrite)
        return PeerInfo.of(peer)

    async def delete_peer(self, url: str) -> str:
        """Forget a peer (a running node drops the link within 2 s); its canonical URL."""
        url = peer_url(url)
        if not await (await self.storage()).delete_peer(url):
            raise UnknownEntry(f"no network {url}")
        return url

    async def set_priority(self, url: str, priority: int) -> str:
        """Lower is preferred among equally short routes; the peer's canonical URL."""
        url = peer_url(url)
        if not await (await self.storage()).set_peer_priority(url, priority):
            raise UnknownEntry(f"no network {url}")
        return url

    async def peers(self) -> list[PeerInfo]:
        """Stored peers, by priority then URL (no node needed)."""
        return [PeerInfo.of(p) for p in await (await self.storage()).list_peers()]

    async def networks(self) -> list[NetworkRow]:
        """Stored peers with the state of their links: :class:`NodeNotRunning` when no
        node runs here (a list without states would look like links that are down)."""
        links = {l.get("url"): l for l in self.node_status().get("network", {}).get("links", [])}
        rows = []
        for p in await self.peers():
            link = links.get(p.url, {})
            rows.append(NetworkRow(
                url=p.url, user=p.user, priority=p.priority, key=p.key, proxy=p.proxy,
                state=link.get("state", "pending"), rtt_ms=link.get("rtt_ms"),
                routes=link.get("routes"), last_error=link.get("last_error") or "",
                token_expires_at=link.get("token_expires_at"),
                renew_error=link.get("renew_error") or ""))
        return rows

    # ------------------------------------------------------------------ the running node

    def node_status(self) -> dict:
        """What the node running with this configuration's data folder last wrote
        (``/_node/status`` plus ``updated`` and ``pid``); :class:`NodeNotRunning`."""
        return read_status(self.config.data_dir, now=self.clock())

    def services(self) -> list[ServiceRow]:
        """The running node's own services, then those it learned from the network."""
        state = self.node_status()
        net = state.get("network") or {}
        local = net.get("local", state.get("services", []))
        rows = [ServiceRow("/" + s, "local", "-", 0, 1) for s in local]
        rows += [ServiceRow(r["path"], r["origin"], r["next_hop"], r["hops"], r["replicas"],
                            r.get("routes")) for r in net.get("routes", [])]
        return rows

    async def wait_for_link(self, peer: PeerInfo, timeout: float,
                            poll: float = 0.1) -> NetworkRow:
        """Return once the running node has the link to ``peer`` (the entry stored at
        ``peer.created_at``, not an older one it replaces) up and the peer's table in.

        :class:`LinkNotUp` after ``timeout`` seconds, naming the link's last error;
        :class:`NodeNotRunning` if no node runs here (or it stops meanwhile).  Polls the
        status file, which the node rewrites every second: there is nothing to wait on.
        """
        deadline = time.monotonic() + timeout
        while True:
            links = self.node_status().get("network", {}).get("links", [])
            link = next((l for l in links if l.get("url") == peer.url
                         and l.get("added") == peer.created_at), {})
            if link.get("state") == "up" and link.get("synced"):
                return NetworkRow(
                    url=peer.url, user=peer.user, priority=peer.priority, key=peer.key,
                    proxy=peer.proxy,
                    state="up", rtt_ms=link.get("rtt_ms"), routes=link.get("routes", 0),
                    last_error="", token_expires_at=link.get("token_expires_at"),
                    renew_error=link.get("renew_error") or "")
            if time.monotonic() >= deadline:
                why = link.get("last_error") or f"state {link.get('state', 'not started')}"
                raise LinkNotUp(f"link to {peer.url} not up after {timeout:g} s ({why})")
            await asyncio.sleep(poll)


def _check_password(password: str) -> None:
    if not isinstance(password, str) or not password:
        raise ValueError("the password must not be empty")
