"""SQLite backend: the zero-set-up default.  Its SQL and rules are in :mod:`.sql`.

``sqlite3`` is a blocking library, so every plan runs on a **dedicated worker thread** (a
one-worker executor) that owns its connection: one for writes, strictly ordered, and one for
reads (``:memory:`` has only the first: a second connection would be another database).  The
event loop only awaits futures; a slow disk or a lock held by ``utesla-cli`` in another process
never stalls request handling, and a write waiting out the busy timeout for such a lock does
not hold up the token checks queued behind it, since WAL lets them read meanwhile.

Settings, and why:

* ``journal_mode=WAL``: readers (token checks) proceed while an admin command writes.
* ``busy_timeout``: a write waits this long for another process's lock before giving up with
  :class:`StorageUnavailable`, instead of failing at once.
* ``foreign_keys=ON``: tokens cannot outlive their user even if a bug skips the explicit delete.
* Write transactions start with ``BEGIN IMMEDIATE``, taking the write lock up front.  A
  deferred transaction that reads and then writes can fail with SQLITE_BUSY *without* waiting
  for the busy timeout; taking the lock first makes "count tokens, then insert" atomic (SQLite
  has no row locks: this lock is what ``FOR UPDATE`` is on MariaDB) and makes contention wait
  politely.  A whole transaction is one worker call, so cancelling the awaiting task can never
  leave it half-done or open.
* A new database file is created with mode 0600: it holds password hashes and peer secrets.
  SQLite gives its ``-wal``/``-shm`` side files the same permissions.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import os
import sqlite3
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from .base import (
    SCHEMA_VERSION, AlreadyExists, NoSuchEntry, StorageError, StorageUnavailable, check_int32,
)
from .sql import (
    ALL, ONE, Dialect, Plan, SQLStorage, Stmt, drive, migrate, schema_version, translated,
)

__all__ = ["SQLiteStorage"]

log = logging.getLogger(__name__)

T = TypeVar("T")

DIALECT = Dialect(
    name="sqlite",
    # SQLite DDL is transactional: open() applies the missing versions in one transaction.
    schema={1: (
        """CREATE TABLE IF NOT EXISTS users (
            name          TEXT    NOT NULL PRIMARY KEY,
            password_hash TEXT    NOT NULL,
            public_key    TEXT    NOT NULL,
            token_limit   INTEGER NOT NULL DEFAULT 1,
            guest         INTEGER NOT NULL DEFAULT 0,
            scopes        TEXT    NOT NULL,
            created_at    REAL    NOT NULL
        )""",
        """CREATE TABLE IF NOT EXISTS tokens (
            token_hash BLOB    NOT NULL PRIMARY KEY,
            user_name  TEXT    NOT NULL REFERENCES users(name) ON DELETE CASCADE,
            created_at REAL    NOT NULL,
            expires_at REAL    NOT NULL,
            scopes     TEXT    NOT NULL,
            revoked    INTEGER NOT NULL DEFAULT 0
        )""",
        "CREATE INDEX IF NOT EXISTS tokens_user ON tokens(user_name)",
        """CREATE TABLE IF NOT EXISTS peers (
            url        TEXT    NOT NULL PRIMARY KEY,
            public_key TEXT    NOT NULL,
            user_name  TEXT    NOT NULL,
            token      TEXT    NOT NULL,
            priority   INTEGER NOT NULL DEFAULT 0,
            created_at REAL    NOT NULL
        )""",
    ),
        # 2: a peer's own SOCKS5 proxy (add_network --proxy); '' = the node's [network] proxy.
        2: ("ALTER TABLE peers ADD COLUMN proxy TEXT NOT NULL DEFAULT ''",)},
    meta_ddl="CREATE TABLE IF NOT EXISTS meta (name TEXT NOT NULL PRIMARY KEY, "
             "value INTEGER NOT NULL)",
    table_exists="SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = ?",
    upsert="ON CONFLICT({key}) DO UPDATE SET {sets}",
    upsert_value="excluded.{0}",
)

# Primary result codes (extended code & 0xff) meaning "the database cannot be used right now".
_UNAVAILABLE_CODES = {
    5,   # SQLITE_BUSY       another connection holds the lock past busy_timeout
    6,   # SQLITE_LOCKED
    7,   # SQLITE_NOMEM
    8,   # SQLITE_READONLY   file or directory not writable, read-only mount
    10,  # SQLITE_IOERR      disk I/O error
    13,  # SQLITE_FULL
    14,  # SQLITE_CANTOPEN
    15,  # SQLITE_PROTOCOL   WAL lock protocol race
}
# Fallback for Python 3.10, whose exceptions carry no sqlite_errorcode.
_UNAVAILABLE_WORDS = (
    "locked", "busy", "readonly", "read-only", "unable to open", "disk i/o", "full",
    "closed database", "out of memory",
)


def _translate(exc: Exception) -> StorageError | None:
    """The storage error for a driver exception; None for any other exception."""
    msg = str(exc)
    if isinstance(exc, sqlite3.IntegrityError):
        if "FOREIGN KEY" in msg:
            return NoSuchEntry(f"referenced entry does not exist ({msg})")
        if "UNIQUE" in msg or "PRIMARY KEY" in msg:
            return AlreadyExists(f"entry already exists ({msg})")
        return StorageError(f"sqlite integrity error: {msg}")
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        if code is not None:
            unavailable = (code & 0xFF) in _UNAVAILABLE_CODES
        else:
            unavailable = any(word in msg.lower() for word in _UNAVAILABLE_WORDS)
        if unavailable or (isinstance(exc, sqlite3.ProgrammingError) and "closed" in msg):
            return StorageUnavailable(f"sqlite database unavailable: {msg}")
        return StorageError(f"sqlite error: {msg}")
    if isinstance(exc, OSError):
        # Creating the file (or its directory being missing) fails before SQLite is involved.
        return StorageUnavailable(f"sqlite database unavailable: {exc}")
    return None


def _execute(conn: sqlite3.Connection, stmt: Stmt) -> Any:
    with translated(_translate):
        cur = conn.execute(stmt.sql, stmt.args)
        if stmt.want == ONE:
            return cur.fetchone()
        return cur.fetchall() if stmt.want == ALL else cur.rowcount


def _drive(conn: sqlite3.Connection, plan: Plan[T]) -> T:
    return drive(plan, functools.partial(_execute, conn))


def _in_transaction(conn: sqlite3.Connection, plan: Plan[T]) -> T:
    """Run ``plan`` inside ``BEGIN IMMEDIATE`` ... ``COMMIT``; any failure rolls it all back."""
    with translated(_translate):
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = _drive(conn, plan)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:  # pragma: no cover - the original error matters more
                    log.exception("sqlite rollback failed")
            raise
    return result


class SQLiteStorage(SQLStorage):
    """:class:`Storage` on a local SQLite file (``":memory:"`` works too, for throw-away use).

    ``busy_timeout_ms`` bounds how long a write waits for another process's lock before
    raising :class:`StorageUnavailable`.
    """

    dialect = DIALECT

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout_ms: int = 5000):
        check_int32(busy_timeout_ms, "busy_timeout_ms", minimum=0)
        self.path = str(path)
        self.busy_timeout_ms = busy_timeout_ms
        self._executor: ThreadPoolExecutor | None = None
        self._conn: sqlite3.Connection | None = None
        self._reader: ThreadPoolExecutor | None = None
        self._reader_conn: sqlite3.Connection | None = None

    def __repr__(self) -> str:
        return f"<SQLiteStorage {self.path!r}{'' if self._executor else ' closed'}>"

    async def _run(self, write: bool, plan: Callable[..., Plan[T]], *args: Any) -> T:
        # Reads go to the reader connection when there is one.
        reader = not write and self._reader is not None
        executor = self._reader if reader else self._executor
        if executor is None:
            raise StorageUnavailable("storage is not open")
        call = functools.partial(self._call, reader, write, plan(self.dialect, *args))
        try:
            return await asyncio.get_running_loop().run_in_executor(executor, call)
        except RuntimeError as exc:
            # The executor was shut down by a concurrent close().
            if executor is not (self._reader if reader else self._executor):
                raise StorageUnavailable("storage is closed") from exc
            raise

    def _call(self, reader: bool, write: bool, plan: Plan[T]) -> T:
        conn = self._reader_conn if reader else self._conn
        if conn is None:
            raise StorageUnavailable("storage is closed")
        return _in_transaction(conn, plan) if write else _drive(conn, plan)

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        if self._executor is not None:
            return
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="utesla-sqlite")
        loop = asyncio.get_running_loop()
        try:
            self._conn = await loop.run_in_executor(executor, self._connect, False)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        if self.path != ":memory:":
            # Opened after the writer has checked and migrated the schema.
            reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="utesla-sqlite-read")
            try:
                self._reader_conn = await loop.run_in_executor(reader, self._connect, True)
            except BaseException:
                reader.shutdown(wait=False)
                await loop.run_in_executor(executor, self._close_conn, False)
                executor.shutdown(wait=False)
                raise
            self._reader = reader
        self._executor = executor

    def _connect(self, reader: bool) -> sqlite3.Connection:
        with translated(_translate):
            if not reader and self.path != ":memory:" and not os.path.exists(self.path):
                try:
                    os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                except FileExistsError:
                    pass
            conn = sqlite3.connect(
                self.path, timeout=self.busy_timeout_ms / 1000,
                isolation_level=None,  # we issue BEGIN/COMMIT ourselves
                check_same_thread=False,  # created here, used only by this executor's thread
            )
            try:
                conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
                if reader:
                    conn.execute("PRAGMA query_only = ON")
                else:
                    self._setup(conn)
            except BaseException:
                conn.close()
                raise
        return conn

    def _setup(self, conn: sqlite3.Connection) -> None:
        conn.execute("PRAGMA foreign_keys = ON")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal" and self.path != ":memory:":
            log.warning("sqlite database %s is in %s journal mode, not WAL", self.path, mode)
        # Fast path: an up-to-date database needs no write lock, so opening works while
        # another process is writing, and on a database we can only read.
        if _drive(conn, schema_version(self.dialect)) != SCHEMA_VERSION:
            _in_transaction(conn, migrate(self.dialect, self.path))

    async def close(self) -> None:
        executor, self._executor = self._executor, None
        reader, self._reader = self._reader, None
        if executor is None:
            return
        loop = asyncio.get_running_loop()
        try:
            # Queued behind any operation still running, so those finish first.
            if reader is not None:
                try:
                    await loop.run_in_executor(reader, self._close_conn, True)
                finally:
                    reader.shutdown(wait=False)
            await loop.run_in_executor(executor, self._close_conn, False)
        finally:
            executor.shutdown(wait=False)

    def _close_conn(self, reader: bool) -> None:
        if reader:
            conn, self._reader_conn = self._reader_conn, None
        else:
            conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
