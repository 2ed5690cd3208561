"""SQLite backend: the zero-set-up default.

``sqlite3`` is a blocking library, so every call runs on a **dedicated worker thread** (a
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
  for the busy timeout; taking the lock first makes "count tokens, then insert" atomic and
  makes contention wait politely.
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
from pathlib import Path
from typing import Any, TypeVar

from .base import (
    MAX_NAME_LEN, MAX_URL_LEN, SCHEMA_VERSION, AlreadyExists, NoSuchEntry, Peer, SchemaTooNew,
    Storage, StorageError, StorageUnavailable, Token, TokenLimitReached, User, check_int32,
    check_time, encode_scopes, peer_from_row, token_from_row, user_from_row, valid_hash,
    valid_key,
)

__all__ = ["SQLiteStorage"]

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Schema statements per version.  ``open()`` applies every version above the stored one, in
#: order, inside one transaction (SQLite DDL is transactional).  Never edit a released entry;
#: append a new version instead.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
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
    2: (
        "ALTER TABLE peers ADD COLUMN proxy TEXT NOT NULL DEFAULT ''",
    ),
}
assert max(MIGRATIONS) == SCHEMA_VERSION

_META_DDL = (
    "CREATE TABLE IF NOT EXISTS meta (name TEXT NOT NULL PRIMARY KEY, value INTEGER NOT NULL)"
)

_USER_COLS = "name, password_hash, public_key, token_limit, guest, scopes, created_at"
_TOKEN_COLS = "token_hash, user_name, created_at, expires_at, scopes, revoked"
_PEER_COLS = "url, public_key, user_name, token, priority, created_at, proxy"

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


def _translate(exc: BaseException) -> BaseException:
    """Map a driver exception to the storage error tree; other exceptions pass unchanged."""
    if isinstance(exc, StorageError):
        return exc
    if isinstance(exc, sqlite3.IntegrityError):
        msg = str(exc)
        if "FOREIGN KEY" in msg:
            return NoSuchEntry(f"referenced entry does not exist ({msg})")
        if "UNIQUE" in msg or "PRIMARY KEY" in msg:
            return AlreadyExists(f"entry already exists ({msg})")
        return StorageError(f"sqlite integrity error: {msg}")
    if isinstance(exc, sqlite3.Error):
        code = getattr(exc, "sqlite_errorcode", None)
        msg = str(exc)
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
    return exc


def _translated(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``fn``, re-raising driver errors as storage errors (``from`` the original)."""
    try:
        return fn(*args, **kwargs)
    except Exception as exc:
        translated = _translate(exc)
        if translated is exc:
            raise
        raise translated from exc



class SQLiteStorage(Storage):
    """:class:`Storage` on a local SQLite file (``":memory:"`` works too, for throw-away use).

    ``busy_timeout_ms`` bounds how long a write waits for another process's lock before
    raising :class:`StorageUnavailable`.
    """

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

    # ------------------------------------------------------------------ plumbing

    async def _run(self, fn: Callable[..., T], *args: Any, write: bool = False) -> T:
        """Run ``fn(conn, *args)`` on a worker thread, translating driver errors there.

        Reads go to the reader connection when there is one; ``write`` selects the writer.
        """
        reader = not write and self._reader is not None
        executor = self._reader if reader else self._executor
        if executor is None:
            raise StorageUnavailable("storage is not open")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                executor, functools.partial(self._call, reader, fn, *args)
            )
        except RuntimeError as exc:
            # The executor was shut down by a concurrent close().
            if executor is not (self._reader if reader else self._executor):
                raise StorageUnavailable("storage is closed") from exc
            raise

    def _call(self, reader: bool, fn: Callable[..., T], *args: Any) -> T:
        conn = self._reader_conn if reader else self._conn
        if conn is None:
            raise StorageUnavailable("storage is closed")
        return _translated(fn, conn, *args)

    async def _write(self, fn: Callable[..., T], *args: Any) -> T:
        """Run ``fn`` inside ``BEGIN IMMEDIATE`` ... ``COMMIT``; any failure rolls it all back.

        The whole transaction happens in one worker call, so cancelling the awaiting task can
        never leave a transaction half-done or open.
        """
        return await self._run(self._in_transaction, fn, *args, write=True)

    @staticmethod
    def _in_transaction(conn: sqlite3.Connection, fn: Callable[..., T], *args: Any) -> T:
        conn.execute("BEGIN IMMEDIATE")
        try:
            result = fn(conn, *args)
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:  # pragma: no cover - the original error matters more
                    log.exception("sqlite rollback failed")
            raise
        return result

    # ------------------------------------------------------------------ lifecycle

    async def open(self) -> None:
        if self._executor is not None:
            return
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="utesla-sqlite")
        loop = asyncio.get_running_loop()
        try:
            self._conn = await loop.run_in_executor(executor, self._open_sync)
        except BaseException:
            executor.shutdown(wait=False)
            raise
        if self.path != ":memory:":
            # Opened after the writer has checked and migrated the schema.
            reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="utesla-sqlite-read")
            try:
                self._reader_conn = await loop.run_in_executor(reader, self._open_reader)
            except BaseException:
                reader.shutdown(wait=False)
                self._close_sync()
                executor.shutdown(wait=False)
                raise
            self._reader = reader
        self._executor = executor

    def _open_sync(self) -> sqlite3.Connection:
        try:
            if self.path != ":memory:" and not os.path.exists(self.path):
                try:
                    os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
                except FileExistsError:
                    pass
        except OSError as exc:
            raise StorageUnavailable(f"cannot create sqlite database {self.path}: {exc}") from exc
        conn = _translated(
            sqlite3.connect,
            self.path,
            timeout=self.busy_timeout_ms / 1000,
            isolation_level=None,  # we issue BEGIN/COMMIT ourselves
            check_same_thread=False,  # created here, used only by this executor's thread
        )
        try:
            _translated(self._setup, conn)
        except BaseException:
            conn.close()
            raise
        return conn

    def _open_reader(self) -> sqlite3.Connection:
        conn = _translated(
            sqlite3.connect, self.path, timeout=self.busy_timeout_ms / 1000,
            isolation_level=None, check_same_thread=False,
        )
        try:
            _translated(conn.execute, f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
            _translated(conn.execute, "PRAGMA query_only = ON")
        except BaseException:
            conn.close()
            raise
        return conn

    def _setup(self, conn: sqlite3.Connection) -> None:
        conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout_ms)}")
        conn.execute("PRAGMA foreign_keys = ON")
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if mode.lower() != "wal" and self.path != ":memory:":
            log.warning("sqlite database %s is in %s journal mode, not WAL", self.path, mode)
        # Fast path: an up-to-date database needs no write lock, so opening works while
        # another process is writing, and on a database we can only read.
        if self._read_version(conn) == SCHEMA_VERSION:
            return
        self._in_transaction(conn, self._migrate)

    @staticmethod
    def _read_version(conn: sqlite3.Connection) -> int | None:
        has_meta = conn.execute(
            "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'meta'"
        ).fetchone()
        if not has_meta:
            return None
        row = conn.execute("SELECT value FROM meta WHERE name = 'schema_version'").fetchone()
        version = int(row[0]) if row else 0
        if version > SCHEMA_VERSION:
            raise SchemaTooNew(version)
        return version

    def _migrate(self, conn: sqlite3.Connection) -> None:
        conn.execute(_META_DDL)
        current = self._read_version(conn) or 0  # re-read under the write lock
        for version in range(current + 1, SCHEMA_VERSION + 1):
            log.info("migrating sqlite database %s to schema version %d", self.path, version)
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
        conn.execute(
            "INSERT INTO meta (name, value) VALUES ('schema_version', ?) "
            "ON CONFLICT(name) DO UPDATE SET value = excluded.value",
            (SCHEMA_VERSION,),
        )

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
                    await loop.run_in_executor(reader, self._close_reader_sync)
                finally:
                    reader.shutdown(wait=False)
            await loop.run_in_executor(executor, self._close_sync)
        finally:
            executor.shutdown(wait=False)

    def _close_reader_sync(self) -> None:
        conn, self._reader_conn = self._reader_conn, None
        if conn is not None:
            conn.close()

    def _close_sync(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()

    async def ping(self) -> None:
        # Reads the file (not just "SELECT 1", which SQLite answers without touching disk).
        await self._run(lambda conn: conn.execute("SELECT value FROM meta").fetchall())

    # ------------------------------------------------------------------ users

    async def add_user(self, user: User, overwrite: bool = False) -> None:
        await self._write(self._add_user, user, overwrite)

    @staticmethod
    def _add_user(conn: sqlite3.Connection, user: User, overwrite: bool) -> None:
        exists = conn.execute("SELECT 1 FROM users WHERE name = ?", (user.name,)).fetchone()
        values = (user.password_hash, user.public_key, user.token_limit, int(user.guest),
                  encode_scopes(user.scopes), user.created_at, user.name)
        if exists:
            if not overwrite:
                raise AlreadyExists(f"user {user.name!r} already exists")
            conn.execute(
                "UPDATE users SET password_hash = ?, public_key = ?, token_limit = ?, guest = ?, "
                "scopes = ?, created_at = ? WHERE name = ?",
                values,
            )
            conn.execute("UPDATE tokens SET revoked = 1 WHERE user_name = ?", (user.name,))
        else:
            conn.execute(
                "INSERT INTO users (password_hash, public_key, token_limit, guest, scopes, "
                "created_at, name) VALUES (?, ?, ?, ?, ?, ?, ?)",
                values,
            )

    async def get_user(self, name: str) -> User | None:
        if not valid_key(name, MAX_NAME_LEN):
            return None
        row = await self._run(
            lambda conn: conn.execute(
                f"SELECT {_USER_COLS} FROM users WHERE name = ?", (name,)
            ).fetchone()
        )
        return user_from_row(row) if row else None

    async def list_users(self) -> list[User]:
        rows = await self._run(
            lambda conn: conn.execute(f"SELECT {_USER_COLS} FROM users ORDER BY name").fetchall()
        )
        return [user_from_row(row) for row in rows]

    async def delete_user(self, name: str) -> bool:
        if not valid_key(name, MAX_NAME_LEN):
            return False

        def delete(conn: sqlite3.Connection) -> bool:
            conn.execute("DELETE FROM tokens WHERE user_name = ?", (name,))
            return conn.execute("DELETE FROM users WHERE name = ?", (name,)).rowcount > 0

        return await self._write(delete)

    async def set_password(self, name: str, password_hash: str) -> None:
        if not isinstance(password_hash, str) or not password_hash:
            raise ValueError("password hash must be a non-empty str")
        await self._write(self._update_credential, "password_hash", name, password_hash)

    async def set_public_key(self, name: str, pem: str) -> None:
        if not isinstance(pem, str) or not pem:
            raise ValueError("public key must be a non-empty str")
        await self._write(self._update_credential, "public_key", name, pem)

    @staticmethod
    def _update_credential(conn: sqlite3.Connection, column: str, name: str, value: str) -> None:
        # ``column`` is one of two literals chosen above, never caller input.
        cur = conn.execute(f"UPDATE users SET {column} = ? WHERE name = ?", (value, name))
        if cur.rowcount == 0:
            raise NoSuchEntry(f"no user {name!r}")
        conn.execute("UPDATE tokens SET revoked = 1 WHERE user_name = ?", (name,))

    # ------------------------------------------------------------------ tokens

    async def add_token(self, token: Token, limit: int, now: float) -> None:
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise ValueError("limit must be a non-negative int")
        await self._write(self._add_token, token, limit, float(now))

    @staticmethod
    def _add_token(conn: sqlite3.Connection, token: Token, limit: int, now: float) -> None:
        if not conn.execute("SELECT 1 FROM users WHERE name = ?", (token.user,)).fetchone():
            raise NoSuchEntry(f"no user {token.user!r}")
        if limit > 0:
            (live,) = conn.execute(
                "SELECT COUNT(*) FROM tokens "
                "WHERE user_name = ? AND revoked = 0 AND expires_at > ?",
                (token.user, now),
            ).fetchone()
            if live >= limit:
                raise TokenLimitReached(
                    f"user {token.user!r} already holds {live} of {limit} tokens"
                )
        conn.execute(
            f"INSERT INTO tokens ({_TOKEN_COLS}) VALUES (?, ?, ?, ?, ?, ?)",
            (token.token_hash, token.user, token.created_at, token.expires_at,
             encode_scopes(token.scopes), int(token.revoked)),
        )

    async def get_token(self, token_hash: bytes) -> Token | None:
        if not valid_hash(token_hash):
            return None
        row = await self._run(
            lambda conn: conn.execute(
                f"SELECT {_TOKEN_COLS} FROM tokens WHERE token_hash = ?", (bytes(token_hash),)
            ).fetchone()
        )
        return token_from_row(row) if row else None

    async def list_tokens(self, user: str) -> list[Token]:
        if not valid_key(user, MAX_NAME_LEN):
            return []
        rows = await self._run(
            lambda conn: conn.execute(
                f"SELECT {_TOKEN_COLS} FROM tokens WHERE user_name = ? "
                "ORDER BY created_at, token_hash",
                (user,),
            ).fetchall()
        )
        return [token_from_row(row) for row in rows]

    async def revoke_token(self, token_hash: bytes) -> bool:
        if not valid_hash(token_hash):
            return False
        return await self._write(
            lambda conn: conn.execute(
                "UPDATE tokens SET revoked = 1 WHERE token_hash = ?", (bytes(token_hash),)
            ).rowcount > 0
        )

    async def revoke_user_tokens(self, user: str) -> int:
        if not valid_key(user, MAX_NAME_LEN):
            return 0
        return await self._write(
            lambda conn: conn.execute(
                "UPDATE tokens SET revoked = 1 WHERE user_name = ? AND revoked = 0", (user,)
            ).rowcount
        )

    async def renew_token(
        self, token_hash: bytes, expires_at: float, issued_at: float | None = None
    ) -> bool:
        if not valid_hash(token_hash):
            return False
        expires_at = check_time(expires_at, "expires_at")
        if issued_at is not None:
            issued_at = check_time(issued_at, "issued_at")
        return await self._write(
            lambda conn: conn.execute(
                "UPDATE tokens SET expires_at = ?, created_at = COALESCE(?, created_at) "
                "WHERE token_hash = ? AND revoked = 0",
                (expires_at, issued_at, bytes(token_hash)),
            ).rowcount > 0
        )

    async def delete_token(self, token_hash: bytes) -> bool:
        if not valid_hash(token_hash):
            return False
        return await self._write(
            lambda conn: conn.execute(
                "DELETE FROM tokens WHERE token_hash = ?", (bytes(token_hash),)
            ).rowcount > 0
        )

    async def purge_expired(self, now: float) -> int:
        now = float(now)
        return await self._write(
            lambda conn: conn.execute(
                "DELETE FROM tokens WHERE revoked <> 0 OR expires_at <= ?", (now,)
            ).rowcount
        )

    # ------------------------------------------------------------------ peers

    async def add_peer(self, peer: Peer, overwrite: bool = False) -> None:
        await self._write(self._add_peer, peer, overwrite)

    @staticmethod
    def _add_peer(conn: sqlite3.Connection, peer: Peer, overwrite: bool) -> None:
        values = (peer.public_key, peer.user, peer.token, peer.priority, peer.created_at,
                  peer.proxy, peer.url)
        if conn.execute("SELECT 1 FROM peers WHERE url = ?", (peer.url,)).fetchone():
            if not overwrite:
                raise AlreadyExists(f"peer {peer.url!r} already exists")
            conn.execute(
                "UPDATE peers SET public_key = ?, user_name = ?, token = ?, priority = ?, "
                "created_at = ?, proxy = ? WHERE url = ?",
                values,
            )
        else:
            conn.execute(
                "INSERT INTO peers (public_key, user_name, token, priority, created_at, proxy, "
                "url) VALUES (?, ?, ?, ?, ?, ?, ?)",
                values,
            )

    async def get_peer(self, url: str) -> Peer | None:
        if not valid_key(url, MAX_URL_LEN):
            return None
        row = await self._run(
            lambda conn: conn.execute(
                f"SELECT {_PEER_COLS} FROM peers WHERE url = ?", (url,)
            ).fetchone()
        )
        return peer_from_row(row) if row else None

    async def list_peers(self) -> list[Peer]:
        rows = await self._run(
            lambda conn: conn.execute(
                f"SELECT {_PEER_COLS} FROM peers ORDER BY priority, url"
            ).fetchall()
        )
        return [peer_from_row(row) for row in rows]

    async def delete_peer(self, url: str) -> bool:
        if not valid_key(url, MAX_URL_LEN):
            return False
        return await self._write(
            lambda conn: conn.execute("DELETE FROM peers WHERE url = ?", (url,)).rowcount > 0
        )

    async def set_peer_priority(self, url: str, priority: int) -> bool:
        check_int32(priority, "priority")
        if not valid_key(url, MAX_URL_LEN):
            return False
        return await self._write(
            lambda conn: conn.execute(
                "UPDATE peers SET priority = ? WHERE url = ?", (priority, url)
            ).rowcount > 0
        )


def default_path(data_dir: str | os.PathLike[str]) -> Path:
    """Where the embedded database lives inside a node's data directory."""
    return Path(data_dir) / "utesla.db"
