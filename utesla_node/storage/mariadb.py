"""MariaDB/MySQL backend (aiomysql): for nodes that share one user database.

Rules this module keeps, learnt from the original's deadlock (a relayed request held a pooled
connection while waiting on the network, and 16 such requests exhausted a pool of 10):

* **A connection is held only for the statements of one operation.**  Every public method
  acquires a connection, runs one transaction, commits and releases it.  Nothing outside this
  module ever sees a connection, so nobody can hold one across a network wait.
* **Autocommit is off; every operation is one explicit transaction.**  ``add_token`` locks the
  user row with ``SELECT ... FOR UPDATE`` before counting, so concurrent issuers on several nodes
  cannot overshoot a token limit.  Sessions run at READ COMMITTED so the count after the lock
  sees what the previous lock holder committed.
* **A broken connection is thrown away, never reused.**  After a connection error (server
  restarted, connection killed, network cut) the connection is closed rather than rolled back,
  so the pool drops it and opens a fresh one on the next call.  Callers see
  :class:`StorageUnavailable` while the server is away and normal results once it is back.
  Idempotent reads that fail on a stale pooled connection are retried once on a fresh one.
* Strict SQL mode, InnoDB, utf8mb4 with the ``utf8mb4_nopad_bin`` collation: names compare by
  code point exactly like SQLite's BINARY collation (the PAD SPACE ``_bin`` collations would
  make ``"alice"`` and ``"alice "`` the same user).
* ``CLIENT.FOUND_ROWS``: UPDATE row counts mean "rows matched", as in SQLite, so setting a
  priority to its current value still reports that the peer exists.
"""
from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiomysql
import pymysql.err
from pymysql.constants import CLIENT

from .base import (
    MAX_NAME_LEN, MAX_URL_LEN, SCHEMA_VERSION, AlreadyExists, NoSuchEntry, Peer, SchemaTooNew,
    Storage, StorageError, StorageUnavailable, Token, TokenLimitReached, User, check_int32,
    check_time, encode_scopes, peer_from_row, token_from_row, user_from_row, valid_hash,
    valid_key,
)

__all__ = ["MariaDBStorage", "build_ssl_context"]

log = logging.getLogger(__name__)

T = TypeVar("T")
Cursor = Any  # aiomysql.Cursor; aiomysql ships no type information

_TABLE_OPTIONS = "ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_nopad_bin"

#: Schema statements per version, mirroring ``sqlite.MIGRATIONS``.  MariaDB commits DDL
#: implicitly, so every statement must be idempotent (``IF NOT EXISTS``): a migration interrupted
#: half-way is simply run again.  Never edit a released entry; append a new version.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        f"""CREATE TABLE IF NOT EXISTS users (
            name          VARCHAR({MAX_NAME_LEN}) NOT NULL PRIMARY KEY,
            password_hash TEXT         NOT NULL,
            public_key    TEXT         NOT NULL,
            token_limit   INT          NOT NULL DEFAULT 1,
            guest         TINYINT(1)   NOT NULL DEFAULT 0,
            scopes        TEXT         NOT NULL,
            created_at    DOUBLE       NOT NULL
        ) {_TABLE_OPTIONS}""",
        f"""CREATE TABLE IF NOT EXISTS tokens (
            token_hash VARBINARY(32) NOT NULL PRIMARY KEY,
            user_name  VARCHAR({MAX_NAME_LEN}) NOT NULL,
            created_at DOUBLE        NOT NULL,
            expires_at DOUBLE        NOT NULL,
            scopes     TEXT          NOT NULL,
            revoked    TINYINT(1)    NOT NULL DEFAULT 0,
            KEY tokens_user (user_name),
            CONSTRAINT tokens_user_fk FOREIGN KEY (user_name) REFERENCES users (name)
                ON DELETE CASCADE
        ) {_TABLE_OPTIONS}""",
        f"""CREATE TABLE IF NOT EXISTS peers (
            url        VARCHAR({MAX_URL_LEN}) NOT NULL PRIMARY KEY,
            public_key TEXT         NOT NULL,
            user_name  VARCHAR({MAX_NAME_LEN}) NOT NULL,
            token      TEXT         NOT NULL,
            priority   INT          NOT NULL DEFAULT 0,
            created_at DOUBLE       NOT NULL
        ) {_TABLE_OPTIONS}""",
    ),
    # 2: a peer's own SOCKS5 proxy (add_network --proxy); '' = the node's [network] proxy.
    2: (
        "ALTER TABLE peers ADD COLUMN IF NOT EXISTS proxy TEXT NOT NULL DEFAULT ''",
    ),
}
assert max(MIGRATIONS) == SCHEMA_VERSION

_META_DDL = (
    "CREATE TABLE IF NOT EXISTS meta (name VARCHAR(64) NOT NULL PRIMARY KEY, "
    f"value BIGINT NOT NULL) {_TABLE_OPTIONS}"
)

_USER_COLS = "name, password_hash, public_key, token_limit, guest, scopes, created_at"
_TOKEN_COLS = "token_hash, user_name, created_at, expires_at, scopes, revoked"
_PEER_COLS = "url, public_key, user_name, token, priority, created_at, proxy"

_ER_DUP_ENTRY = 1062
_ER_NO_REFERENCED_ROW = (1216, 1452)


class _StaleConnection(StorageUnavailable):
    """A pooled connection died under a statement; a retry on a fresh one may well succeed."""


def _hex(digest: bytes) -> str:
    """Token hashes travel as hex and are turned back into bytes by ``UNHEX()`` server-side.

    aiomysql 0.3.2 cannot escape ``bytes`` parameters with PyMySQL >= 1.2.3 (it calls a helper
    PyMySQL replaced by a placeholder string: aio-libs/aiomysql#1080).  Hex text avoids the
    driver's bytes path entirely, whatever the versions installed.
    """
    return bytes(digest).hex()


def _translate(exc: BaseException) -> BaseException:
    """Map a driver exception to the storage error tree; other exceptions pass unchanged."""
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, pymysql.err.IntegrityError):
        code = exc.args[0] if exc.args else None
        if code == _ER_DUP_ENTRY:
            return AlreadyExists(f"entry already exists ({exc.args[-1]})")
        if code in _ER_NO_REFERENCED_ROW:
            return NoSuchEntry(f"referenced entry does not exist ({exc.args[-1]})")
        return StorageError(f"mariadb integrity error: {exc}")
    if isinstance(exc, (pymysql.err.OperationalError, pymysql.err.InterfaceError,
                        pymysql.err.InternalError)):
        # Lost/refused/killed connections, server shutdown, access denied, lock wait timeout,
        # deadlock, read-only server, packet sequence errors: all "try again later".
        return StorageUnavailable(f"mariadb unavailable: {exc}")
    if isinstance(exc, pymysql.err.MySQLError):
        return StorageError(f"mariadb error: {exc}")
    if isinstance(exc, (OSError, asyncio.TimeoutError)):
        return StorageUnavailable(f"mariadb unavailable: {exc!r}")
    return exc


def build_ssl_context(
    ssl_ca: str | None = None,
    ssl_cert: str | None = None,
    ssl_key: str | None = None,
    ssl_verify: bool = True,
) -> ssl.SSLContext:
    """TLS context for the database connection.

    Verification is on by default (system CAs unless ``ssl_ca`` is given, and the host name
    must match); ``ssl_verify=False`` exists for test set-ups and is logged as a warning.
    """
    if ssl_key and not ssl_cert:
        raise ValueError("ssl_key given without ssl_cert")
    try:
        ctx = ssl.create_default_context(cafile=ssl_ca)
        if ssl_cert:
            ctx.load_cert_chain(ssl_cert, ssl_key)
    except (OSError, ssl.SSLError) as exc:
        raise ValueError(f"cannot load database TLS files: {exc}") from exc
    if not ssl_verify:
        log.warning("database TLS certificate verification is disabled")
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx



class MariaDBStorage(Storage):
    """:class:`Storage` on a MariaDB (or MySQL ≥ 8) database through an aiomysql pool.

    The database itself must exist; ``open()`` creates and migrates the tables.  TLS is used
    when ``tls`` is true or any ``ssl_*`` file is given.
    """

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int = 3306,
        user: str,
        password: str = "",
        database: str,
        pool_size: int = 10,
        tls: bool = False,
        ssl_ca: str | None = None,
        ssl_cert: str | None = None,
        ssl_key: str | None = None,
        ssl_verify: bool = True,
        connect_timeout: float = 10.0,
        pool_recycle: int = 3600,
    ):
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
            raise ValueError("pool_size must be a positive int")
        if not database:
            raise ValueError("a MariaDB database name is required")
        self.host = host
        self.port = port
        self.user = user
        self.database = database
        self.pool_size = pool_size
        self._password = password
        self._connect_timeout = connect_timeout
        self._pool_recycle = pool_recycle
        self._ssl: ssl.SSLContext | None = None
        if tls or ssl_ca or ssl_cert or ssl_key:
            self._ssl = build_ssl_context(ssl_ca, ssl_cert, ssl_key, ssl_verify)
        self._pool: aiomysql.Pool | None = None

    def __repr__(self) -> str:
        state = "" if self._pool else " closed"
        return f"<MariaDBStorage {self.user}@{self.host}:{self.port}/{self.database}{state}>"

    # ------------------------------------------------------------------ plumbing

    async def _tx(self, fn: Callable[[Cursor], Awaitable[T]]) -> T:
        """Acquire a connection, run ``fn(cursor)`` as one transaction, release the connection.

        On a logical failure (e.g. :class:`AlreadyExists` raised by ``fn``) the transaction is
        rolled back and the healthy connection returns to the pool.  On a connection failure or
        cancellation the connection's state is unknown, so it is closed instead; the pool then
        discards it.
        """
        pool = self._pool
        if pool is None:
            raise StorageUnavailable("storage is not open")
        try:
            conn = await pool.acquire()
        except RuntimeError as exc:  # aiomysql: "Cannot acquire connection after closing pool"
            raise StorageUnavailable("storage is closed") from exc
        except Exception as exc:
            translated = _translate(exc)
            if translated is exc:
                raise
            raise translated from exc
        try:
            async with conn.cursor() as cur:
                result = await fn(cur)
            await conn.commit()
        except BaseException as exc:
            translated = _translate(exc) if isinstance(exc, Exception) else exc
            if isinstance(translated, StorageUnavailable) or not isinstance(exc, Exception):
                conn.close()
            else:
                try:
                    await conn.rollback()
                except Exception:
                    conn.close()
            pool.release(conn)
            if isinstance(translated, StorageUnavailable) and not isinstance(exc, StorageError):
                raise _StaleConnection(str(translated)) from exc
            if translated is exc:
                raise
            raise translated from exc
        pool.release(conn)
        return result

    async def _read(self, fn: Callable[[Cursor], Awaitable[T]]) -> T:
        """:meth:`_tx` for statements that change nothing, hence safe to repeat once."""
        try:
            return await self._tx(fn)
        except _StaleConnection as exc:
            log.info("retrying a read on a fresh database connection after: %s", exc)
            return await self._tx(fn)

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        if self._pool is not None:
            return
        try:
            pool = await aiomysql.create_pool(
                minsize=1,
                maxsize=self.pool_size,
                pool_recycle=self._pool_recycle,
                host=self.host,
                port=self.port,
                user=self.user,
                password=self._password,
                db=self.database,
                charset="utf8mb4",
                autocommit=False,
                ssl=self._ssl,
                connect_timeout=self._connect_timeout,
                client_flag=CLIENT.FOUND_ROWS,
                sql_mode="'STRICT_ALL_TABLES,NO_ENGINE_SUBSTITUTION'",
                init_command="SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED",
            )
        except Exception as exc:
            translated = _translate(exc)
            if translated is exc:
                raise
            raise translated from exc
        self._pool = pool
        try:
            await self._migrate()
        except BaseException:
            await self.close()
            raise

    async def _schema_version(self, cur: Cursor) -> int | None:
        await cur.execute(
            "SELECT COUNT(*) FROM information_schema.TABLES "
            "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = 'meta'"
        )
        (has_meta,) = await cur.fetchone()
        if not has_meta:
            return None
        await cur.execute("SELECT value FROM meta WHERE name = 'schema_version'")
        row = await cur.fetchone()
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(version)
        return version

    async def _migrate(self) -> None:
        if await self._tx(self._schema_version) == SCHEMA_VERSION:
            return
        # Several nodes may start against a fresh database at once: serialise migrations with
        # a server-wide advisory lock named after the database.
        lock = f"utesla_schema.{self.database}"[:64]

        async def migrate(cur: Cursor) -> None:
            await cur.execute("SELECT GET_LOCK(%s, 60)", (lock,))
            (got,) = await cur.fetchone()
            if got != 1:
                raise StorageUnavailable("timed out waiting for another node's schema migration")
            try:
                current = await self._schema_version(cur)   # re-read under the lock
                if current is None:
                    # (Not run on an existing meta table: MariaDB would warn that it exists.)
                    await cur.execute(_META_DDL)
                    current = 0
                for version in range(current + 1, SCHEMA_VERSION + 1):
                    log.info("migrating database %s to schema version %d", self.database, version)
                    for statement in MIGRATIONS[version]:
                        await cur.execute(statement)
                await cur.execute(
                    "INSERT INTO meta (name, value) VALUES ('schema_version', %s) "
                    "ON DUPLICATE KEY UPDATE value = VALUES(value)",
                    (SCHEMA_VERSION,),
                )
            finally:
                await cur.execute("SELECT RELEASE_LOCK(%s)", (lock,))
                await cur.fetchall()

        await self._tx(migrate)

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        pool.close()
        await pool.wait_closed()

    async def ping(self) -> None:
        async def ping(cur: Cursor) -> None:
            await cur.execute("SELECT value FROM meta")
            await cur.fetchall()

        await self._read(ping)

    # ------------------------------------------------------------------ users

    async def add_user(self, user: User, overwrite: bool = False) -> None:
        values = (user.name, user.password_hash, user.public_key, user.token_limit,
                  int(user.guest), encode_scopes(user.scopes), user.created_at)
        insert = f"INSERT INTO users ({_USER_COLS}) VALUES (%s, %s, %s, %s, %s, %s, %s)"

        async def add(cur: Cursor) -> None:
            if not overwrite:
                try:
                    await cur.execute(insert, values)
                except pymysql.err.IntegrityError as exc:
                    if exc.args and exc.args[0] == _ER_DUP_ENTRY:
                        raise AlreadyExists(f"user {user.name!r} already exists") from exc
                    raise
                return
            await cur.execute(
                insert + " ON DUPLICATE KEY UPDATE password_hash = VALUES(password_hash), "
                "public_key = VALUES(public_key), token_limit = VALUES(token_limit), "
                "guest = VALUES(guest), scopes = VALUES(scopes), created_at = VALUES(created_at)",
                values,
            )
            await cur.execute("UPDATE tokens SET revoked = 1 WHERE user_name = %s", (user.name,))

        await self._tx(add)

    async def get_user(self, name: str) -> User | None:
        if not valid_key(name, MAX_NAME_LEN):
            return None

        async def get(cur: Cursor) -> tuple[Any, ...] | None:
            await cur.execute(f"SELECT {_USER_COLS} FROM users WHERE name = %s", (name,))
            row: tuple[Any, ...] | None = await cur.fetchone()
            return row

        row = await self._read(get)
        return user_from_row(row) if row else None

    async def list_users(self) -> list[User]:
        async def list_(cur: Cursor) -> list[tuple[Any, ...]]:
            await cur.execute(f"SELECT {_USER_COLS} FROM users ORDER BY name")
            return list(await cur.fetchall())

        return [user_from_row(row) for row in await self._read(list_)]

    async def delete_user(self, name: str) -> bool:
        if not valid_key(name, MAX_NAME_LEN):
            return False

        async def delete(cur: Cursor) -> bool:
            # Lock the user row first, in the same order as add_token (user, then tokens), so
            # the two can never deadlock each other.
            if not await cur.execute("SELECT name FROM users WHERE name = %s FOR UPDATE", (name,)):
                return False
            await cur.execute("DELETE FROM tokens WHERE user_name = %s", (name,))
            await cur.execute("DELETE FROM users WHERE name = %s", (name,))
            return True

        return await self._tx(delete)

    async def set_password(self, name: str, password_hash: str) -> None:
        if not isinstance(password_hash, str) or not password_hash:
            raise ValueError("password hash must be a non-empty str")
        await self._update_credential("password_hash", name, password_hash)

    async def set_public_key(self, name: str, pem: str) -> None:
        if not isinstance(pem, str) or not pem:
            raise ValueError("public key must be a non-empty str")
        await self._update_credential("public_key", name, pem)

    async def _update_credential(self, column: str, name: str, value: str) -> None:
        # ``column`` is one of two literals chosen above, never caller input.
        async def update(cur: Cursor) -> None:
            sql = f"UPDATE users SET {column} = %s WHERE name = %s"
            if not await cur.execute(sql, (value, name)):
                raise NoSuchEntry(f"no user {name!r}")
            await cur.execute("UPDATE tokens SET revoked = 1 WHERE user_name = %s", (name,))

        await self._tx(update)

    # ------------------------------------------------------------------ tokens

    async def add_token(self, token: Token, limit: int, now: float) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError("limit must be a non-negative int")
        now = check_time(now, "now")

        async def add(cur: Cursor) -> None:
            # The row lock serialises every issuer for this user, on every node sharing the DB.
            await cur.execute("SELECT name FROM users WHERE name = %s FOR UPDATE", (token.user,))
            if not await cur.fetchone():
                raise NoSuchEntry(f"no user {token.user!r}")
            if limit > 0:
                await cur.execute(
                    "SELECT COUNT(*) FROM tokens "
                    "WHERE user_name = %s AND revoked = 0 AND expires_at > %s",
                    (token.user, now),
                )
                (live,) = await cur.fetchone()
                if live >= limit:
                    raise TokenLimitReached(
                        f"user {token.user!r} already holds {live} of {limit} tokens"
                    )
            await cur.execute(
                f"INSERT INTO tokens ({_TOKEN_COLS}) VALUES (UNHEX(%s), %s, %s, %s, %s, %s)",
                (_hex(token.token_hash), token.user, token.created_at, token.expires_at,
                 encode_scopes(token.scopes), int(token.revoked)),
            )

        await self._tx(add)

    async def get_token(self, token_hash: bytes) -> Token | None:
        if not valid_hash(token_hash):
            return None

        async def get(cur: Cursor) -> tuple[Any, ...] | None:
            await cur.execute(
                f"SELECT {_TOKEN_COLS} FROM tokens WHERE token_hash = UNHEX(%s)",
                (_hex(token_hash),),
            )
            row: tuple[Any, ...] | None = await cur.fetchone()
            return row

        row = await self._read(get)
        return token_from_row(row) if row else None

    async def list_tokens(self, user: str) -> list[Token]:
        if not valid_key(user, MAX_NAME_LEN):
            return []

        async def list_(cur: Cursor) -> list[tuple[Any, ...]]:
            await cur.execute(
                f"SELECT {_TOKEN_COLS} FROM tokens WHERE user_name = %s "
                "ORDER BY created_at, token_hash",
                (user,),
            )
            return list(await cur.fetchall())

        return [token_from_row(row) for row in await self._read(list_)]

    async def _rowcount(self, sql: str, args: tuple[Any, ...]) -> int:
        async def run(cur: Cursor) -> int:
            return int(await cur.execute(sql, args))

        return await self._tx(run)

    async def revoke_token(self, token_hash: bytes) -> bool:
        if not valid_hash(token_hash):
            return False
        return await self._rowcount(
            "UPDATE tokens SET revoked = 1 WHERE token_hash = UNHEX(%s)", (_hex(token_hash),)
        ) > 0

    async def revoke_user_tokens(self, user: str) -> int:
        if not valid_key(user, MAX_NAME_LEN):
            return 0
        return await self._rowcount(
            "UPDATE tokens SET revoked = 1 WHERE user_name = %s AND revoked = 0", (user,)
        )

    async def renew_token(
        self, token_hash: bytes, expires_at: float, issued_at: float | None = None
    ) -> bool:
        if not valid_hash(token_hash):
            return False
        expires_at = check_time(expires_at, "expires_at")
        if issued_at is not None:
            issued_at = check_time(issued_at, "issued_at")
        return await self._rowcount(
            "UPDATE tokens SET expires_at = %s, created_at = COALESCE(%s, created_at) "
            "WHERE token_hash = UNHEX(%s) AND revoked = 0",
            (expires_at, issued_at, _hex(token_hash)),
        ) > 0

    async def delete_token(self, token_hash: bytes) -> bool:
        if not valid_hash(token_hash):
            return False
        return await self._rowcount(
            "DELETE FROM tokens WHERE token_hash = UNHEX(%s)", (_hex(token_hash),)
        ) > 0

    async def purge_expired(self, now: float) -> int:
        now = check_time(now, "now")
        return await self._rowcount(
            "DELETE FROM tokens WHERE revoked <> 0 OR expires_at <= %s", (now,)
        )

    # ------------------------------------------------------------------ peers

    async def add_peer(self, peer: Peer, overwrite: bool = False) -> None:
        values = (peer.url, peer.public_key, peer.user, peer.token, peer.priority, peer.created_at,
                  peer.proxy)
        insert = f"INSERT INTO peers ({_PEER_COLS}) VALUES (%s, %s, %s, %s, %s, %s, %s)"
        if overwrite:
            insert += (
                " ON DUPLICATE KEY UPDATE public_key = VALUES(public_key), "
                "user_name = VALUES(user_name), token = VALUES(token), "
                "priority = VALUES(priority), created_at = VALUES(created_at), "
                "proxy = VALUES(proxy)"
            )

        async def add(cur: Cursor) -> None:
            try:
                await cur.execute(insert, values)
            except pymysql.err.IntegrityError as exc:
                if exc.args and exc.args[0] == _ER_DUP_ENTRY:
                    raise AlreadyExists(f"peer {peer.url!r} already exists") from exc
                raise

        await self._tx(add)

    async def get_peer(self, url: str) -> Peer | None:
        if not valid_key(url, MAX_URL_LEN):
            return None

        async def get(cur: Cursor) -> tuple[Any, ...] | None:
            await cur.execute(f"SELECT {_PEER_COLS} FROM peers WHERE url = %s", (url,))
            row: tuple[Any, ...] | None = await cur.fetchone()
            return row

        row = await self._read(get)
        return peer_from_row(row) if row else None

    async def list_peers(self) -> list[Peer]:
        async def list_(cur: Cursor) -> list[tuple[Any, ...]]:
            await cur.execute(f"SELECT {_PEER_COLS} FROM peers ORDER BY priority, url")
            return list(await cur.fetchall())

        return [peer_from_row(row) for row in await self._read(list_)]

    async def delete_peer(self, url: str) -> bool:
        if not valid_key(url, MAX_URL_LEN):
            return False
        return await self._rowcount("DELETE FROM peers WHERE url = %s", (url,)) > 0

    async def set_peer_priority(self, url: str, priority: int) -> bool:
        check_int32(priority, "priority")
        if not valid_key(url, MAX_URL_LEN):
            return False
        return await self._rowcount(
            "UPDATE peers SET priority = %s WHERE url = %s", (priority, url)
        ) > 0
