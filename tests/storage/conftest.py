"""Fixtures that run one test suite against both storage backends.

``backend`` is parametrised over SQLite and MariaDB and gives each test a private database:
a file under ``tmp_path``, or a freshly created MariaDB database that is dropped afterwards.
Tests reach the database behind the storage's back through the backend object (raw SQL, raw
bytes), which is how they simulate newer schemas and look for leaked secrets.

MariaDB is found at ``UTESLA_TEST_MYSQL_URL`` (default ``mysql://root@127.0.0.1:3306/``).  When
it cannot be reached the MariaDB half of the suite is skipped, except under ``CI=true``, where
a missing database must fail the run instead of silently halving it.
"""
from __future__ import annotations

import itertools
import os
import secrets
import sqlite3
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pymysql
import pytest

from utesla_node.storage import Storage, redact_url
from utesla_node.storage.sqlite import SQLiteStorage

MYSQL_URL = os.environ.get("UTESLA_TEST_MYSQL_URL", "mysql://root@127.0.0.1:3306/")
TABLES = ("tokens", "users", "peers", "meta")


class Backend:
    """One private database, plus raw access to it for white-box checks."""

    kind: str

    def make(self, **opts: Any) -> Storage:
        """A new, unopened storage on this database."""
        raise NotImplementedError

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run one statement (``?`` placeholders) on a separate connection and commit."""
        raise NotImplementedError

    def raw_bytes(self) -> bytes:
        """Every byte the database holds for our tables, for "is this secret stored?" checks."""
        raise NotImplementedError


class SQLiteBackend(Backend):
    kind = "sqlite"

    def __init__(self, path: Path):
        self.path = path

    def make(self, **opts: Any) -> Storage:
        return SQLiteStorage(self.path, **opts)

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            return conn.execute(sql, params).fetchall()
        finally:
            conn.close()

    def raw_bytes(self) -> bytes:
        # The file itself plus the WAL, where recent commits live until a checkpoint.
        data = b""
        for suffix in ("", "-wal"):
            path = Path(str(self.path) + suffix)
            if path.exists():
                data += path.read_bytes()
        return data


class MariaDBServer:
    """The test server: an admin connection that creates and drops per-test databases."""

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 3306
        self.user = unquote(parts.username or "root")
        self.password = unquote(parts.password or "")
        self.prefix = f"utesla_test_{secrets.token_hex(4)}_"
        self._counter = itertools.count()
        self.admin = self.connect()

    def connect(self, database: str | None = None) -> pymysql.connections.Connection:
        return pymysql.connect(
            host=self.host, port=self.port, user=self.user, password=self.password,
            database=database, autocommit=True, charset="utf8mb4", connect_timeout=5,
        )

    def create_database(self) -> str:
        name = f"{self.prefix}{next(self._counter)}"
        with self.admin.cursor() as cur:
            cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4")
        return name

    def drop_database(self, name: str) -> None:
        with self.admin.cursor() as cur:
            cur.execute(f"DROP DATABASE IF EXISTS `{name}`")

    def connection_ids(self, database: str) -> list[int]:
        """Server-side ids of every connection currently using ``database``."""
        with self.admin.cursor() as cur:
            cur.execute(
                "SELECT ID FROM information_schema.PROCESSLIST "
                "WHERE DB = %s AND ID <> CONNECTION_ID()",
                (database,),
            )
            return [row[0] for row in cur.fetchall()]

    def kill(self, connection_id: int) -> None:
        with self.admin.cursor() as cur:
            cur.execute("KILL %s", (connection_id,))

    def close(self) -> None:
        with self.admin.cursor() as cur:
            cur.execute("SHOW DATABASES LIKE %s", (self.prefix.replace("_", r"\_") + "%",))
            leftovers = [row[0] for row in cur.fetchall()]
        for name in leftovers:
            self.drop_database(name)
        self.admin.close()


class MariaDBBackend(Backend):
    kind = "mariadb"

    def __init__(self, server: MariaDBServer, database: str):
        self.server = server
        self.database = database

    def make(self, **opts: Any) -> Storage:
        from utesla_node.storage.mariadb import MariaDBStorage

        kwargs: dict[str, Any] = dict(
            host=self.server.host, port=self.server.port, user=self.server.user,
            password=self.server.password, database=self.database, connect_timeout=5,
        )
        kwargs.update(opts)
        return MariaDBStorage(**kwargs)

    def execute(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        conn = self.server.connect(self.database)
        try:
            with conn.cursor() as cur:
                cur.execute(sql.replace("?", "%s"), params)
                return list(cur.fetchall())
        finally:
            conn.close()

    def raw_bytes(self) -> bytes:
        data = []
        for table in TABLES:
            for row in self.execute(f"SELECT * FROM {table}"):
                for value in row:
                    if isinstance(value, (bytes, bytearray)):
                        data.append(bytes(value))
                    else:
                        data.append(str(value).encode("utf-8"))
        return b"\n".join(data)


@pytest.fixture(scope="session")
def mariadb_server() -> Iterator[MariaDBServer]:
    try:
        server = MariaDBServer(MYSQL_URL)
    except (pymysql.MySQLError, OSError) as exc:
        reason = f"MariaDB unreachable at {redact_url(MYSQL_URL)}: {exc}"
        if os.environ.get("CI") == "true":
            pytest.fail(reason + " (CI=true: the MariaDB suite must run)", pytrace=False)
        pytest.skip(reason)
    yield server
    server.close()


@pytest.fixture(params=["sqlite", "mariadb"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    if request.param == "sqlite":
        yield SQLiteBackend(tmp_path / "utesla.db")
        return
    server: MariaDBServer = request.getfixturevalue("mariadb_server")
    database = server.create_database()
    try:
        yield MariaDBBackend(server, database)
    finally:
        server.drop_database(database)


@pytest.fixture
def sqlite_backend(tmp_path: Path) -> SQLiteBackend:
    """For SQLite-only tests (locks, file modes)."""
    return SQLiteBackend(tmp_path / "utesla.db")


@pytest.fixture
def mariadb_backend(mariadb_server: MariaDBServer) -> Iterator[MariaDBBackend]:
    """For MariaDB-only tests (killed connections, outages)."""
    database = mariadb_server.create_database()
    try:
        yield MariaDBBackend(mariadb_server, database)
    finally:
        mariadb_server.drop_database(database)


@pytest.fixture
async def storage(backend: Backend) -> AsyncIterator[Storage]:
    """An opened storage on a fresh database, parametrised over both backends."""
    store = backend.make()
    await store.open()
    try:
        yield store
    finally:
        await store.close()
