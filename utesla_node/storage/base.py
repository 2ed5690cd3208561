"""The storage interface shared by the SQLite and MariaDB backends.

Everything the node persists (users, access tokens, network peers) goes through the abstract
:class:`Storage` below, so the two backends can be swapped by configuration and exercised by one
test suite.  Its SQL and rules are written once in :mod:`.sql`; :mod:`.sqlite` and
:mod:`.mariadb` hold only what differs (a dialect, the schema DDL, connections, and the
translation of driver errors).  Design rules every backend follows:

* **No clock inside storage.**  Methods that depend on time take ``now`` from the caller, so the
  auth layer and the tests decide what "now" is.
* **One operation, one transaction.**  An admin operation either happens completely or not at
  all; revoking a user's tokens when their password or key changes is part of the same
  transaction as the change itself.
* **Driver errors never escape.**  ``sqlite3``/``pymysql`` exceptions are translated at the
  boundary (``raise ... from exc``) into the small tree below, so callers need not know which
  backend they talk to.  :class:`StorageUnavailable` is the only one a caller should expect in
  normal operation (it maps to the "unavailable" status); the others signal a caller mistake
  or a data conflict.
* **Values are validated before they reach the driver**, so both backends refuse the same
  inputs in the same way (SQLite would happily store a 10 kB user name that MariaDB refuses).
"""
from __future__ import annotations

import abc
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import TracebackType

from protocol.errors import Status

from ..errors import NodeError

__all__ = [
    "SCHEMA_VERSION", "MAX_NAME_LEN", "MAX_URL_LEN", "MAX_PROXY_LEN", "TOKEN_HASH_LEN",
    "StorageError", "StorageUnavailable", "AlreadyExists", "NoSuchEntry", "TokenLimitReached",
    "SchemaTooNew", "User", "Token", "Peer", "Storage",
]

#: Version of the database schema this code writes.  Bumped with every migration; a database
#: whose ``meta`` table holds a larger number was written by newer code and is refused.
SCHEMA_VERSION = 2

#: Longest user name (characters).  MariaDB indexes ``VARCHAR(255)``; SQLite is held to the same.
MAX_NAME_LEN = 255
#: Longest peer URL (characters).
MAX_URL_LEN = 512
#: Longest proxy setting of a peer (characters).
MAX_PROXY_LEN = 1024
#: Longest password hash, and longest public key PEM (MariaDB's TEXT holds 65535 bytes).
MAX_PASSWORD_HASH_LEN = 1024
MAX_PUBLIC_KEY_LEN = 65535
#: Tokens are stored only as their SHA-256.
TOKEN_HASH_LEN = 32

_INT32_MIN = -(2**31)
_INT32_MAX = 2**31 - 1


# --------------------------------------------------------------------------- errors

class StorageError(NodeError):
    """Base of every error raised by a storage backend."""


class StorageUnavailable(StorageError):
    """The database cannot be used right now (unreachable, locked, read-only, full, closed).

    Transient by nature: the same call may succeed later.  Request handlers answer with the
    "unavailable" status instead of an internal error.
    """

    status = Status.UNAVAILABLE
    public = "database unavailable"


class AlreadyExists(StorageError):
    """An entry with that key exists and ``overwrite`` was not requested."""


class NoSuchEntry(StorageError):
    """The operation needs an entry (usually a user) that does not exist."""


class TokenLimitReached(StorageError):
    """The user already holds as many live tokens as their ``token_limit`` allows."""

    status = Status.FORBIDDEN
    public = ("token limit reached: revoke a token (utesla-cli revoke) or ask the admin "
              "for a higher --token-limit")


class SchemaTooNew(StorageError):
    """The database was written by a newer utesla-node; refusing to touch it."""

    def __init__(self, found: int, known: int = SCHEMA_VERSION):
        super().__init__(
            f"the database schema version {found} is newer than this code knows ({known}); "
            "upgrade utesla-node"
        )
        self.found = found
        self.known = known


# --------------------------------------------------------------------------- records

def check_text(value: object, what: str, max_len: int) -> None:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str, not {type(value).__name__}")
    if not value:
        raise ValueError(f"{what} must not be empty")
    if len(value) > max_len:
        raise ValueError(f"{what} is longer than {max_len} characters")
    if "\x00" in value:
        raise ValueError(f"{what} must not contain NUL characters")


def check_int32(value: object, what: str, minimum: int = _INT32_MIN) -> None:
    # bool is an int subclass; True as a limit or priority is always a caller bug.
    if not isinstance(value, int) or isinstance(value, bool):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if not minimum <= value <= _INT32_MAX:
        raise ValueError(f"{what} must be between {minimum} and {_INT32_MAX}")


def check_time(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{what} must be a number of seconds, not {type(value).__name__}")
    if not math.isfinite(value):
        raise ValueError(f"{what} must be finite")
    return float(value)


def _freeze_scopes(obj: object, scopes: object) -> None:
    """Store ``scopes`` as a tuple of str on a frozen dataclass (lists are a common slip)."""
    if isinstance(scopes, (str, bytes)) or not isinstance(scopes, Iterable):
        raise TypeError("scopes must be a sequence of str")
    items = tuple(scopes)
    if not all(isinstance(s, str) for s in items):
        raise TypeError("scopes must be a sequence of str")
    object.__setattr__(obj, "scopes", items)


@dataclass(frozen=True)
class User:
    """A registered user.

    ``guest`` users may only reach services matching ``scopes``; ordinary users reach every
    service (their tokens may still be narrowed).  ``token_limit`` caps how many live tokens the
    user can hold at once; 0 means unlimited.
    """

    name: str
    password_hash: str
    public_key: str
    token_limit: int = 1
    guest: bool = False
    scopes: tuple[str, ...] = ("*",)
    created_at: float = 0.0

    def __post_init__(self) -> None:
        check_text(self.name, "user name", MAX_NAME_LEN)
        check_text(self.password_hash, "password hash", MAX_PASSWORD_HASH_LEN)
        check_text(self.public_key, "public key", MAX_PUBLIC_KEY_LEN)
        check_int32(self.token_limit, "token_limit", minimum=0)
        object.__setattr__(self, "guest", bool(self.guest))
        _freeze_scopes(self, self.scopes)
        object.__setattr__(self, "created_at", check_time(self.created_at, "created_at"))


@dataclass(frozen=True)
class Token:
    """An access token as stored: only the SHA-256 of the secret is ever kept."""

    token_hash: bytes
    user: str
    created_at: float
    expires_at: float
    scopes: tuple[str, ...] = ("*",)
    revoked: bool = False

    def __post_init__(self) -> None:
        if not valid_hash(self.token_hash):
            raise ValueError(f"token_hash must be {TOKEN_HASH_LEN} bytes")
        object.__setattr__(self, "token_hash", bytes(self.token_hash))
        check_text(self.user, "user name", MAX_NAME_LEN)
        object.__setattr__(self, "created_at", check_time(self.created_at, "created_at"))
        object.__setattr__(self, "expires_at", check_time(self.expires_at, "expires_at"))
        _freeze_scopes(self, self.scopes)
        object.__setattr__(self, "revoked", bool(self.revoked))

    def is_live(self, now: float) -> bool:
        """True when the token is neither revoked nor expired at ``now`` (expiry is exclusive)."""
        return not self.revoked and now < self.expires_at


@dataclass(frozen=True)
class Peer:
    """Another node we link to, with the account that node's admin created for us.

    ``token`` is a secret we present to the peer, so it is kept out of ``repr`` (and thereby out
    of logs and tracebacks).  Lower ``priority`` values are preferred by convention of the
    router; storage only orders by it.  ``proxy`` is the SOCKS5 proxy the link goes through
    (``add_network --proxy``; schema version 2): empty for the node's ``[network] proxy``,
    ``direct`` for none; it may hold the proxy's password, so it is kept out of ``repr`` too.
    """

    url: str
    public_key: str
    user: str
    token: str = field(repr=False)
    priority: int = 0
    created_at: float = 0.0
    proxy: str = field(default="", repr=False)

    def __post_init__(self) -> None:
        check_text(self.url, "peer url", MAX_URL_LEN)
        check_text(self.public_key, "public key", MAX_PUBLIC_KEY_LEN)
        check_text(self.user, "peer user name", MAX_NAME_LEN)
        check_text(self.token, "peer token", 1024)
        check_int32(self.priority, "priority")
        object.__setattr__(self, "created_at", check_time(self.created_at, "created_at"))
        if self.proxy:
            check_text(self.proxy, "peer proxy", MAX_PROXY_LEN)
        elif not isinstance(self.proxy, str):
            raise TypeError(f"peer proxy must be a str, not {type(self.proxy).__name__}")


# --------------------------------------------------------------------------- checks for backends

def valid_key(value: object, max_len: int) -> bool:
    """Whether ``value`` could be a stored key at all.

    Look-ups with an impossible key (too long, wrong type) simply find nothing instead of
    reaching the driver, where MariaDB and SQLite would disagree about what happens.
    """
    return isinstance(value, str) and 0 < len(value) <= max_len and "\x00" not in value


def valid_hash(value: object) -> bool:
    return isinstance(value, (bytes, bytearray)) and len(value) == TOKEN_HASH_LEN


# --------------------------------------------------------------------------- the interface

class Storage(abc.ABC):
    """Asynchronous persistence for users, tokens and peers.

    A storage is created closed; ``await open()`` connects and creates or migrates the schema.
    It can be used as ``async with storage:`` which opens and closes it.  All methods may raise
    :class:`StorageUnavailable`; the others are documented per method.
    """

    async def __aenter__(self) -> Storage:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- lifecycle

    @abc.abstractmethod
    async def open(self) -> None:
        """Connect and bring the schema to :data:`SCHEMA_VERSION`.

        Idempotent on an up-to-date database.  Raises :class:`SchemaTooNew` when the database
        was written by newer code (nothing is modified then).
        """

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections and threads.  Later calls raise :class:`StorageUnavailable`."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Cheap round trip to the database; raises :class:`StorageUnavailable` if it fails."""

    # -- users

    @abc.abstractmethod
    async def add_user(self, user: User, overwrite: bool = False) -> None:
        """Insert ``user``.

        If the name exists: :class:`AlreadyExists`, unless ``overwrite``, in which case the
        record is replaced and every token of that user is revoked (new credentials must not
        inherit sessions granted to the old ones).
        """

    @abc.abstractmethod
    async def get_user(self, name: str) -> User | None:
        """The user called ``name`` (exact, case-sensitive match), or None."""

    @abc.abstractmethod
    async def user_keys(self, names: Iterable[str]) -> dict[str, str]:
        """``{name: public key PEM}`` of those of ``names`` that are registered, read in one
        transaction (a node's check of its open sessions: a name missing from the answer
        was removed, a different key was changed).  Impossible names find nothing."""

    @abc.abstractmethod
    async def list_users(self) -> list[User]:
        """All users, ordered by name (code point order on both backends)."""

    @abc.abstractmethod
    async def delete_user(self, name: str) -> bool:
        """Delete the user and all their tokens.  False if there was no such user."""

    @abc.abstractmethod
    async def set_password(self, name: str, password_hash: str) -> None:
        """Replace the password hash and revoke the user's tokens.

        :class:`NoSuchEntry` if there is no such user.
        """

    @abc.abstractmethod
    async def set_public_key(self, name: str, pem: str) -> None:
        """Replace the public key and revoke the user's tokens.

        :class:`NoSuchEntry` if there is no such user.
        """

    # -- tokens

    @abc.abstractmethod
    async def add_token(self, token: Token, limit: int, now: float) -> None:
        """Store ``token`` unless its user already holds ``limit`` live tokens at ``now``.

        Counting and inserting are one transaction serialised per user, so concurrent issuers
        cannot overshoot the limit.  ``limit`` 0 means unlimited.  Raises
        :class:`TokenLimitReached`, :class:`NoSuchEntry` (unknown user) or
        :class:`AlreadyExists` (hash collision; practically a caller bug).
        """

    @abc.abstractmethod
    async def get_token(self, token_hash: bytes) -> Token | None:
        """The stored token with that hash, including revoked and expired ones, or None."""

    @abc.abstractmethod
    async def list_tokens(self, user: str) -> list[Token]:
        """All stored tokens of ``user`` (live, expired and revoked), oldest first."""

    @abc.abstractmethod
    async def revoke_token(self, token_hash: bytes) -> bool:
        """Mark the token revoked.  True if it exists (revoking twice is harmless)."""

    @abc.abstractmethod
    async def revoke_user_tokens(self, user: str) -> int:
        """Revoke every token of ``user``; returns how many were not revoked before."""

    @abc.abstractmethod
    async def renew_token(
        self, token_hash: bytes, expires_at: float, issued_at: float | None = None
    ) -> bool:
        """Set a new expiry on a token that is not revoked.  False if unknown or revoked.

        With ``issued_at``, ``created_at`` becomes that time too: a renewal is a new issue of
        the same token, and ``expires_at - created_at`` stays the lifetime it is renewed for.
        Whether the token had already expired is the caller's business (it knows "now").
        """

    @abc.abstractmethod
    async def delete_token(self, token_hash: bytes) -> bool:
        """Delete one token outright (lazy clean-up of expired tokens).  True if it existed."""

    @abc.abstractmethod
    async def purge_expired(self, now: float) -> int:
        """Delete every token expired at ``now`` or revoked; returns how many were deleted."""

    # -- peers

    @abc.abstractmethod
    async def add_peer(self, peer: Peer, overwrite: bool = False) -> None:
        """Insert ``peer``; :class:`AlreadyExists` for a known URL unless ``overwrite``."""

    @abc.abstractmethod
    async def get_peer(self, url: str) -> Peer | None:
        """The peer registered under ``url``, or None."""

    @abc.abstractmethod
    async def list_peers(self) -> list[Peer]:
        """All peers, ordered by priority then URL."""

    @abc.abstractmethod
    async def delete_peer(self, url: str) -> bool:
        """Forget a peer.  False if there was no such peer."""

    @abc.abstractmethod
    async def set_peer_priority(self, url: str, priority: int) -> bool:
        """Change a peer's priority.  False if there is no such peer."""
