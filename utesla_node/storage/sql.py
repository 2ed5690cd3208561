"""The storage's SQL and its rules, written once for both backends.

Every operation is a **plan**: a generator that yields :class:`Stmt` objects and gets each one's
result back from ``yield`` (the first row, all rows, or the number of rows matched).  A plan
holds the rules (what is checked, which statements run in which order, what a result means)
and does no I/O, so SQLite runs a whole plan inside its worker thread (one call, one
transaction) while MariaDB runs the same plan on an aiomysql cursor.  A driver error is
translated by the backend and thrown into the plan at its ``yield``, where the plan may catch
it (a duplicate key becomes "user 'alice' already exists").

Statements are written with ``?`` placeholders and never hold a literal ``?`` or ``%``.
:class:`Dialect` carries what the two SQL dialects really disagree on: the placeholder, how a
``bytes`` value travels, row locks, upsert syntax, the schema DDL and the catalogue query.

Rules stated here, once:

* replacing a user (``overwrite``), their password or their key revokes their tokens in the
  same transaction: new credentials must not inherit sessions granted to the old ones;
* ``add_token`` locks the user row, counts the live tokens and inserts in one transaction, so
  concurrent issuers (several nodes sharing MariaDB) cannot overshoot the limit;
* ``delete_user`` locks the user row before touching tokens, the same order as ``add_token``,
  so the two can never deadlock each other.
"""
from __future__ import annotations

import abc
import json
import logging
from collections.abc import Awaitable, Callable, Generator, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from .base import (
    MAX_NAME_LEN, MAX_PASSWORD_HASH_LEN, MAX_PUBLIC_KEY_LEN, MAX_URL_LEN, SCHEMA_VERSION,
    AlreadyExists, NoSuchEntry, Peer, SchemaTooNew, Storage, StorageError, Token,
    TokenLimitReached, User, check_int32, check_text, check_time, valid_hash, valid_key,
)

__all__ = ["Dialect", "Stmt", "SQLStorage", "drive", "drive_async", "translated"]

log = logging.getLogger(__name__)

T = TypeVar("T")

ONE, ALL, COUNT = "one", "all", "count"

USER_COLS = ("name", "password_hash", "public_key", "token_limit", "guest", "scopes", "created_at")
TOKEN_COLS = ("token_hash", "user_name", "created_at", "expires_at", "scopes", "revoked")
PEER_COLS = ("url", "public_key", "user_name", "token", "priority", "created_at", "proxy")


@dataclass(frozen=True)
class Stmt:
    """One statement in the driver's dialect, and what the plan wants back from it."""

    sql: str
    args: tuple[Any, ...]
    want: str  # ONE: first row or None; ALL: list of rows; COUNT: rows matched


Plan = Generator[Stmt, Any, T]


@dataclass(frozen=True)
class Dialect:
    """What differs between the SQL two backends speak; everything else is in the plans."""

    name: str
    #: DDL per schema version.  Never edit a released entry; append a version.
    schema: Mapping[int, tuple[str, ...]]
    meta_ddl: str
    #: A query returning one row when the table named by its parameter exists.
    table_exists: str
    #: Tail that turns an INSERT into an upsert: ``{key}`` and ``{sets}`` are filled in ...
    upsert: str
    #: ... where each column is set to this (``{0}`` is the column name).
    upsert_value: str
    #: Appended to a SELECT to lock its rows until commit.
    lock_rows: str = ""
    param: str = "?"
    #: How a ``bytes`` parameter is written, and what travels for it.
    blob_param: str = "?"
    blob: Callable[[bytes], Any] = bytes

    def __post_init__(self) -> None:
        assert max(self.schema) == SCHEMA_VERSION

    def stmt(self, want: str, sql: str, *args: Any) -> Stmt:
        """``sql``, written with ``?``, in this dialect; ``bytes`` arguments as it takes them."""
        if self.param == "?" and self.blob_param == "?":
            return Stmt(sql, args, want)
        pieces = sql.split("?")
        if len(pieces) != len(args) + 1:
            raise ValueError(f"{len(args)} arguments for {len(pieces) - 1} placeholders: {sql}")
        parts, values = [pieces[0]], []
        for arg, piece in zip(args, pieces[1:]):
            blob = isinstance(arg, bytes)
            parts += (self.blob_param if blob else self.param, piece)
            values.append(self.blob(arg) if blob else arg)
        return Stmt("".join(parts), tuple(values), want)

    def one(self, sql: str, *args: Any) -> Stmt:
        return self.stmt(ONE, sql, *args)

    def count(self, sql: str, *args: Any) -> Stmt:
        return self.stmt(COUNT, sql, *args)

    def insert(self, table: str, cols: tuple[str, ...], overwrite: bool = False) -> str:
        """INSERT of every column; ``overwrite`` updates the row whose key (``cols[0]``) exists."""
        sql = f"INSERT INTO {table} ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})"
        if not overwrite:
            return sql
        sets = ", ".join(f"{col} = {self.upsert_value.format(col)}" for col in cols[1:])
        return f"{sql} {self.upsert.format(key=cols[0], sets=sets)}"


# --------------------------------------------------------------------------- running plans

def drive(plan: Plan[T], execute: Callable[[Stmt], Any]) -> T:
    """Run ``plan`` to its end, feeding it what ``execute`` returns or raises."""
    result: Any = None
    error: Exception | None = None
    while True:
        try:
            stmt = plan.send(result) if error is None else plan.throw(error)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        try:
            result, error = execute(stmt), None
        except Exception as exc:
            result, error = None, exc


async def drive_async(plan: Plan[T], execute: Callable[[Stmt], Awaitable[Any]]) -> T:
    """:func:`drive` for a driver whose statements are awaited."""
    result: Any = None
    error: Exception | None = None
    while True:
        try:
            stmt = plan.send(result) if error is None else plan.throw(error)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]
        try:
            result, error = await execute(stmt), None
        except Exception as exc:
            result, error = None, exc


@contextmanager
def translated(translate: Callable[[Exception], StorageError | None]) -> Iterator[None]:
    """Re-raise a driver exception as the storage error ``translate`` names, ``from`` it.

    ``translate`` returns None for exceptions that are not the driver's; they pass unchanged.
    """
    try:
        yield
    except StorageError:
        raise
    except Exception as exc:
        error = translate(exc)
        if error is None:
            raise
        raise error from exc


# --------------------------------------------------------------------------- rows

def encode_scopes(scopes: tuple[str, ...]) -> str:
    """Scopes for a TEXT column (JSON keeps it unambiguous whatever the globs hold)."""
    return json.dumps(list(scopes), separators=(",", ":"))


def decode_scopes(text: str) -> tuple[str, ...]:
    """Inverse of :func:`encode_scopes`; a damaged value is a storage error, not a crash."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError) as exc:
        raise StorageError(f"corrupt scopes column: {text!r}") from exc
    if not isinstance(value, list) or not all(isinstance(s, str) for s in value):
        raise StorageError(f"corrupt scopes column: {text!r}")
    return tuple(value)


# Each record's values in the order of its *_COLS, and back.

def user_values(u: User) -> tuple[Any, ...]:
    return (u.name, u.password_hash, u.public_key, u.token_limit, int(u.guest),
            encode_scopes(u.scopes), u.created_at)


def user_from_row(row: tuple[Any, ...]) -> User:
    return User(name=row[0], password_hash=row[1], public_key=row[2], token_limit=row[3],
                guest=bool(row[4]), scopes=decode_scopes(row[5]), created_at=row[6])


def token_values(t: Token) -> tuple[Any, ...]:
    return (t.token_hash, t.user, t.created_at, t.expires_at, encode_scopes(t.scopes),
            int(t.revoked))


def token_from_row(row: tuple[Any, ...]) -> Token:
    return Token(token_hash=bytes(row[0]), user=row[1], created_at=row[2], expires_at=row[3],
                 scopes=decode_scopes(row[4]), revoked=bool(row[5]))


def peer_values(p: Peer) -> tuple[Any, ...]:
    return (p.url, p.public_key, p.user, p.token, p.priority, p.created_at, p.proxy)


def peer_from_row(row: tuple[Any, ...]) -> Peer:
    return Peer(url=row[0], public_key=row[1], user=row[2], token=row[3], priority=row[4],
                created_at=row[5], proxy=row[6])


_USERS = f"SELECT {', '.join(USER_COLS)} FROM users"
_TOKENS = f"SELECT {', '.join(TOKEN_COLS)} FROM tokens"
_PEERS = f"SELECT {', '.join(PEER_COLS)} FROM peers"


# --------------------------------------------------------------------------- plans

def schema_version(d: Dialect) -> Plan[int | None]:
    """The stored schema version; None for an empty database.  Refuses a newer one."""
    if not (yield d.one(d.table_exists, "meta")):
        return None
    row = yield d.one("SELECT value FROM meta WHERE name = 'schema_version'")
    version = int(row[0]) if row else 0
    if version > SCHEMA_VERSION:
        raise SchemaTooNew(version)
    return version


def migrate(d: Dialect, where: str) -> Plan[None]:
    """Bring the schema to :data:`SCHEMA_VERSION`; the caller holds the migration lock."""
    current = yield from schema_version(d)         # re-read under the lock
    if current is None:
        # (Not run on an existing meta table: MariaDB would warn that it exists.)
        yield d.count(d.meta_ddl)
        current = 0
    for version in range(current + 1, SCHEMA_VERSION + 1):
        log.info("migrating %s database %s to schema version %d", d.name, where, version)
        for statement in d.schema[version]:
            yield d.count(statement)
    yield d.count(d.insert("meta", ("name", "value"), overwrite=True),
                  "schema_version", SCHEMA_VERSION)


def _query(d: Dialect, want: str, sql: str, *args: Any) -> Plan[Any]:
    return (yield d.stmt(want, sql, *args))


def _put(d: Dialect, table: str, cols: tuple[str, ...], values: tuple[Any, ...],
         overwrite: bool, what: str) -> Plan[None]:
    try:
        yield d.count(d.insert(table, cols, overwrite), *values)
    except AlreadyExists as exc:
        raise AlreadyExists(f"{what} already exists") from exc


def _revoke_all(d: Dialect, name: str) -> Plan[int]:
    return (yield d.count(
        "UPDATE tokens SET revoked = 1 WHERE user_name = ? AND revoked = 0", name))


def _lock_user(d: Dialect, name: str) -> Plan[bool]:
    """Whether the user exists; MariaDB also locks the row (SQLite holds the write lock)."""
    return bool((yield d.one("SELECT name FROM users WHERE name = ?" + d.lock_rows, name)))


def _add_user(d: Dialect, user: User, overwrite: bool) -> Plan[None]:
    yield from _put(d, "users", USER_COLS, user_values(user), overwrite, f"user {user.name!r}")
    if overwrite:
        yield from _revoke_all(d, user.name)


def _set_credential(d: Dialect, column: str, name: str, value: str) -> Plan[None]:
    # ``column`` is one of two literals chosen by the caller, never caller input.
    if not (yield d.count(f"UPDATE users SET {column} = ? WHERE name = ?", value, name)):
        raise NoSuchEntry(f"no user {name!r}")
    yield from _revoke_all(d, name)


def _delete_user(d: Dialect, name: str) -> Plan[bool]:
    if not (yield from _lock_user(d, name)):
        return False
    yield d.count("DELETE FROM tokens WHERE user_name = ?", name)
    yield d.count("DELETE FROM users WHERE name = ?", name)
    return True


#: Names per ``IN (...)`` list: under SQLite's oldest variable limit (999), and a statement
#: MariaDB parses quickly.
IN_BATCH = 500


def _user_keys(d: Dialect, names: tuple[str, ...]) -> Plan[dict[str, str]]:
    found: dict[str, str] = {}
    for i in range(0, len(names), IN_BATCH):
        batch = names[i:i + IN_BATCH]
        rows = yield d.stmt(ALL, "SELECT name, public_key FROM users WHERE name IN "
                                 f"({', '.join('?' * len(batch))})", *batch)
        found.update((row[0], row[1]) for row in rows)
    return found


def _add_token(d: Dialect, token: Token, limit: int, now: float) -> Plan[None]:
    if not (yield from _lock_user(d, token.user)):
        raise NoSuchEntry(f"no user {token.user!r}")
    if limit > 0:
        (live,) = yield d.one(
            "SELECT COUNT(*) FROM tokens WHERE user_name = ? AND revoked = 0 AND expires_at > ?",
            token.user, now)
        if live >= limit:
            raise TokenLimitReached(f"user {token.user!r} already holds {live} of {limit} tokens")
    yield from _put(d, "tokens", TOKEN_COLS, token_values(token), False, "token")


class SQLStorage(Storage):
    """Every :class:`Storage` operation as a plan; a backend only says how plans run."""

    dialect: Dialect

    @abc.abstractmethod
    async def _run(self, write: bool, plan: Callable[..., Plan[T]], *args: Any) -> T:
        """Run ``plan(self.dialect, *args)`` as one transaction.

        ``write`` is false for plans that change nothing, which a backend may run on a reader
        connection or repeat once on a fresh connection.
        """

    async def _read(self, want: str, sql: str, *args: Any) -> Any:
        return await self._run(False, _query, want, sql, *args)

    async def _change(self, sql: str, *args: Any) -> int:
        return int(await self._run(True, _query, COUNT, sql, *args))

    async def ping(self) -> None:
        # Reads a table, not just "SELECT 1", which SQLite answers without touching the file.
        await self._read(ALL, "SELECT value FROM meta")

    # -- users

    async def add_user(self, user: User, overwrite: bool = False) -> None:
        await self._run(True, _add_user, user, overwrite)

    async def get_user(self, name: str) -> User | None:
        if not valid_key(name, MAX_NAME_LEN):
            return None
        row = await self._read(ONE, f"{_USERS} WHERE name = ?", name)
        return user_from_row(row) if row else None

    async def user_keys(self, names: Iterable[str]) -> dict[str, str]:
        wanted = tuple(sorted({n for n in names if valid_key(n, MAX_NAME_LEN)}))
        if not wanted:
            return {}
        return await self._run(False, _user_keys, wanted)

    async def list_users(self) -> list[User]:
        return [user_from_row(row) for row in await self._read(ALL, f"{_USERS} ORDER BY name")]

    async def delete_user(self, name: str) -> bool:
        if not valid_key(name, MAX_NAME_LEN):
            return False
        return await self._run(True, _delete_user, name)

    async def set_password(self, name: str, password_hash: str) -> None:
        check_text(password_hash, "password hash", MAX_PASSWORD_HASH_LEN)
        await self._run(True, _set_credential, "password_hash", name, password_hash)

    async def set_public_key(self, name: str, pem: str) -> None:
        check_text(pem, "public key", MAX_PUBLIC_KEY_LEN)
        await self._run(True, _set_credential, "public_key", name, pem)

    # -- tokens

    async def add_token(self, token: Token, limit: int, now: float) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError("limit must be a non-negative int")
        await self._run(True, _add_token, token, limit, check_time(now, "now"))

    async def get_token(self, token_hash: bytes) -> Token | None:
        if not valid_hash(token_hash):
            return None
        row = await self._read(ONE, f"{_TOKENS} WHERE token_hash = ?", bytes(token_hash))
        return token_from_row(row) if row else None

    async def list_tokens(self, user: str) -> list[Token]:
        if not valid_key(user, MAX_NAME_LEN):
            return []
        rows = await self._read(
            ALL, f"{_TOKENS} WHERE user_name = ? ORDER BY created_at, token_hash", user)
        return [token_from_row(row) for row in rows]

    async def revoke_token(self, token_hash: bytes) -> bool:
        if not valid_hash(token_hash):
            return False
        return await self._change(
            "UPDATE tokens SET revoked = 1 WHERE token_hash = ?", bytes(token_hash)) > 0

    async def revoke_user_tokens(self, user: str) -> int:
        if not valid_key(user, MAX_NAME_LEN):
            return 0
        return await self._run(True, _revoke_all, user)

    async def renew_token(
        self, token_hash: bytes, expires_at: float, issued_at: float | None = None
    ) -> bool:
        if not valid_hash(token_hash):
            return False
        expires_at = check_time(expires_at, "expires_at")
        if issued_at is not None:
            issued_at = check_time(issued_at, "issued_at")
        return await self._change(
            "UPDATE tokens SET expires_at = ?, created_at = COALESCE(?, created_at) "
            "WHERE token_hash = ? AND revoked = 0", expires_at, issued_at, bytes(token_hash)) > 0

    async def delete_token(self, token_hash: bytes) -> bool:
        if not valid_hash(token_hash):
            return False
        return await self._change("DELETE FROM tokens WHERE token_hash = ?", bytes(token_hash)) > 0

    async def purge_expired(self, now: float) -> int:
        return await self._change(
            "DELETE FROM tokens WHERE revoked <> 0 OR expires_at <= ?", check_time(now, "now"))

    # -- peers

    async def add_peer(self, peer: Peer, overwrite: bool = False) -> None:
        await self._run(True, _put, "peers", PEER_COLS, peer_values(peer), overwrite,
                        f"peer {peer.url!r}")

    async def get_peer(self, url: str) -> Peer | None:
        if not valid_key(url, MAX_URL_LEN):
            return None
        row = await self._read(ONE, f"{_PEERS} WHERE url = ?", url)
        return peer_from_row(row) if row else None

    async def list_peers(self) -> list[Peer]:
        return [peer_from_row(r) for r in await self._read(ALL, f"{_PEERS} ORDER BY priority, url")]

    async def delete_peer(self, url: str) -> bool:
        if not valid_key(url, MAX_URL_LEN):
            return False
        return await self._change("DELETE FROM peers WHERE url = ?", url) > 0

    async def set_peer_priority(self, url: str, priority: int) -> bool:
        check_int32(priority, "priority")
        if not valid_key(url, MAX_URL_LEN):
            return False
        return await self._change("UPDATE peers SET priority = ? WHERE url = ?", priority, url) > 0
