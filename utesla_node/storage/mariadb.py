"""MariaDB/MySQL backend (aiomysql): for nodes that share one user database.

Its SQL and rules are in :mod:`.sql`; this module runs them on a pool.  Rules it keeps, learnt
from the original's deadlock (a relayed request held a pooled connection while waiting on the
network, and 16 such requests exhausted a pool of 10):

* **A connection is held only for the statements of one operation.**  Every operation acquires
  a connection, runs one plan as one transaction, commits and releases it.  Nothing outside this
  module ever sees a connection, so nobody can hold one across a network wait.
* **Autocommit is off; every operation is one explicit transaction.**  ``add_token`` locks the
  user row with ``SELECT ... FOR UPDATE`` before counting, so concurrent issuers on several nodes
  cannot overshoot a token limit.  Sessions run at READ COMMITTED so the count after the lock
  sees what the previous lock holder committed.
* **A broken connection is thrown away, never reused.**  After a connection error (server
  restarted, connection killed, network cut) the connection is closed rather than rolled back,
  so the pool drops it and opens a fresh one on the next call.  Callers see
  :class:`StorageUnavailable` while the server is away and normal results once it is back.
  Reads that fail on a stale pooled connection are retried once on a fresh one.
* Strict SQL mode, InnoDB, utf8mb4 with the ``utf8mb4_nopad_bin`` collation: names compare by
  code point exactly like SQLite's BINARY collation (the PAD SPACE ``_bin`` collations would
  make ``"alice"`` and ``"alice "`` the same user).
* ``CLIENT.FOUND_ROWS``: UPDATE row counts mean "rows matched", as in SQLite, so setting a
  priority to its current value still reports that the peer exists.
* Token hashes travel as hex text turned back into bytes by ``UNHEX()`` server-side: aiomysql
  0.3.2 cannot escape ``bytes`` parameters with PyMySQL >= 1.2.3 (it calls a helper PyMySQL
  replaced: aio-libs/aiomysql#1080), so the driver's bytes path is never used.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import ssl
from collections.abc import Callable
from typing import Any, TypeVar

import aiomysql
import pymysql.err
from pymysql.constants import CLIENT

from .base import (
    MAX_NAME_LEN, MAX_URL_LEN, SCHEMA_VERSION, AlreadyExists, NoSuchEntry, StorageError,
    StorageUnavailable,
)
from .sql import (
    ALL, ONE, Dialect, Plan, SQLStorage, Stmt, drive_async, migrate, schema_version, translated,
)

__all__ = ["MariaDBStorage", "build_ssl_context"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_TABLE_OPTIONS = "ENGINE=InnoDB DEFAULT CHARSET=utf8mb4 COLLATE=utf8mb4_nopad_bin"

DIALECT = Dialect(
    name="mariadb",
    # MariaDB commits DDL implicitly, so every statement must be idempotent (IF NOT EXISTS): a
    # migration interrupted half-way is simply run again.
    schema={1: (
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
        2: ("ALTER TABLE peers ADD COLUMN IF NOT EXISTS proxy TEXT NOT NULL DEFAULT ''",)},
    meta_ddl="CREATE TABLE IF NOT EXISTS meta (name VARCHAR(64) NOT NULL PRIMARY KEY, "
             f"value BIGINT NOT NULL) {_TABLE_OPTIONS}",
    table_exists="SELECT 1 FROM information_schema.TABLES "
                 "WHERE TABLE_SCHEMA = DATABASE() AND TABLE_NAME = ?",
    upsert="ON DUPLICATE KEY UPDATE {sets}",
    upsert_value="VALUES({0})",
    lock_rows=" FOR UPDATE",
    param="%s",
    blob_param="UNHEX(%s)",
    blob=bytes.hex,
)

_ER_DUP_ENTRY = 1062
_ER_NO_REFERENCED_ROW = (1216, 1452)


class _StaleConnection(StorageUnavailable):
    """A pooled connection died under a statement; a retry on a fresh one may well succeed."""


def _translate(
    exc: Exception, unavailable: type[StorageUnavailable] = StorageUnavailable
) -> StorageError | None:
    """The storage error for a driver exception; None for any other exception."""
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
        return unavailable(f"mariadb unavailable: {exc}")
    if isinstance(exc, pymysql.err.MySQLError):
        return StorageError(f"mariadb error: {exc}")
    if isinstance(exc, (OSError, asyncio.TimeoutError)):
        return unavailable(f"mariadb unavailable: {exc!r}")
    return None


# Errors on a connection in use: "unavailable" means that connection is gone.
_translate_in_use = functools.partial(_translate, unavailable=_StaleConnection)


async def _execute(cur: Any, stmt: Stmt) -> Any:
    with translated(_translate_in_use):
        count = await cur.execute(stmt.sql, stmt.args or None)
        if stmt.want == ONE:
            return await cur.fetchone()
        return list(await cur.fetchall()) if stmt.want == ALL else count


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


class MariaDBStorage(SQLStorage):
    """:class:`Storage` on a MariaDB (or MySQL ≥ 8) database through an aiomysql pool.

    The database itself must exist; ``open()`` creates and migrates the tables.  TLS is used
    when ``tls`` is true or any ``ssl_*`` file is given.
    """

    dialect = DIALECT

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

    async def _run(self, write: bool, plan: Callable[..., Plan[T]], *args: Any) -> T:
        try:
            return await self._tx(plan, *args)
        except _StaleConnection as exc:
            if write:  # it may have been committed before the connection died
                raise
            log.info("retrying a read on a fresh database connection after: %s", exc)
            return await self._tx(plan, *args)

    async def _tx(self, plan: Callable[..., Plan[T]], *args: Any) -> T:
        """Acquire a connection, run ``plan`` as one transaction, release the connection.

        On a logical failure (e.g. :class:`AlreadyExists` raised by the plan) the transaction
        is rolled back and the healthy connection returns to the pool.  On a connection failure
        or cancellation the connection's state is unknown, so it is closed instead; the pool
        then discards it.
        """
        pool = self._pool
        if pool is None:
            raise StorageUnavailable("storage is not open")
        with translated(_translate):
            try:
                conn = await pool.acquire()
            except RuntimeError as exc:  # aiomysql: "Cannot acquire connection after closing pool"
                raise StorageUnavailable("storage is closed") from exc
        try:
            with translated(_translate_in_use):
                async with conn.cursor() as cur:
                    execute = functools.partial(_execute, cur)
                    result = await drive_async(plan(self.dialect, *args), execute)
                await conn.commit()
        except BaseException as exc:
            if isinstance(exc, StorageUnavailable) or not isinstance(exc, Exception):
                conn.close()
            else:
                try:
                    await conn.rollback()
                except Exception:
                    conn.close()
            raise
        finally:
            pool.release(conn)
        return result

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        if self._pool is not None:
            return
        with translated(_translate):
            self._pool = await aiomysql.create_pool(
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
        try:
            if await self._tx(schema_version) != SCHEMA_VERSION:
                await self._tx(self._locked_migrate)
        except BaseException:
            await self.close()
            raise

    def _locked_migrate(self, d: Dialect) -> Plan[None]:
        # Several nodes may start against a fresh database at once: serialise migrations with
        # a server-wide advisory lock named after the database.  It is released after an error
        # too, since a rollback keeps it (closing the connection, as cancelling does, frees it).
        lock = f"utesla_schema.{self.database}"[:64]
        (got,) = yield d.one("SELECT GET_LOCK(?, 60)", lock)
        if got != 1:
            raise StorageUnavailable("timed out waiting for another node's schema migration")
        release = d.stmt(ALL, "SELECT RELEASE_LOCK(?)", lock)
        try:
            yield from migrate(d, self.database)
        except Exception:
            yield release
            raise
        yield release

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is None:
            return
        pool.close()
        await pool.wait_closed()
