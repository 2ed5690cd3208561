"""The shared SQL layer without a database: dialect rewriting and the plan driver."""
from __future__ import annotations

import pytest

from utesla_node.storage import AlreadyExists, StorageError
from utesla_node.storage.mariadb import DIALECT as MARIADB
from utesla_node.storage.sql import ALL, COUNT, ONE, Plan, Stmt, drive, translated
from utesla_node.storage.sqlite import DIALECT as SQLITE

DIGEST = bytes(range(32))


def test_sqlite_statements_pass_through() -> None:
    stmt = SQLITE.one("SELECT x FROM tokens WHERE token_hash = ? AND user_name = ?", DIGEST, "a")
    assert stmt == Stmt("SELECT x FROM tokens WHERE token_hash = ? AND user_name = ?",
                        (DIGEST, "a"), ONE)


def test_mariadb_placeholders_and_bytes_travel_as_hex() -> None:
    stmt = MARIADB.count("UPDATE tokens SET expires_at = ?, created_at = COALESCE(?, created_at) "
                         "WHERE token_hash = ?", 5.0, None, DIGEST)
    assert stmt.sql == ("UPDATE tokens SET expires_at = %s, created_at = COALESCE(%s, created_at) "
                        "WHERE token_hash = UNHEX(%s)")
    assert stmt.args == (5.0, None, DIGEST.hex()) and stmt.want == COUNT
    assert MARIADB.stmt(ALL, "SELECT value FROM meta") == Stmt("SELECT value FROM meta", (), ALL)
    with pytest.raises(ValueError):
        MARIADB.one("SELECT ? + ?", 1)


def test_upserts() -> None:
    cols = ("url", "token", "priority")
    plain = "INSERT INTO peers (url, token, priority) VALUES (?, ?, ?)"
    assert SQLITE.insert("peers", cols) == MARIADB.insert("peers", cols) == plain
    assert SQLITE.insert("peers", cols, overwrite=True).endswith(
        "VALUES (?, ?, ?) ON CONFLICT(url) DO UPDATE SET "
        "token = excluded.token, priority = excluded.priority")
    assert MARIADB.insert("peers", cols, overwrite=True).endswith(
        "VALUES (?, ?, ?) ON DUPLICATE KEY UPDATE "
        "token = VALUES(token), priority = VALUES(priority)")


def test_driver_feeds_results_and_throws_errors_into_the_plan() -> None:
    def plan() -> Plan[list[object]]:
        seen: list[object] = [(yield SQLITE.one("first"))]
        try:
            yield SQLITE.count("duplicate")
        except AlreadyExists as exc:  # the driver's error arrives at the yield
            seen.append(str(exc))
        seen.append((yield SQLITE.count("last")))
        return seen

    def execute(stmt: Stmt) -> object:
        if stmt.sql == "duplicate":
            raise AlreadyExists("dup")
        return {"first": ("row",), "last": 3}[stmt.sql]

    assert drive(plan(), execute) == [("row",), "dup", 3]


def test_translated_maps_only_the_drivers_errors() -> None:
    def translate(exc: Exception) -> StorageError | None:
        return StorageError("mapped") if isinstance(exc, KeyError) else None

    with pytest.raises(StorageError, match="mapped") as info:
        with translated(translate):
            raise KeyError("driver")
    assert isinstance(info.value.__cause__, KeyError)
    with pytest.raises(ZeroDivisionError):
        with translated(translate):
            raise ZeroDivisionError
    with pytest.raises(AlreadyExists):  # already a storage error: passes unchanged
        with translated(translate):
            raise AlreadyExists("x")


def test_package_surface_is_unchanged() -> None:
    # Other modules import these from utesla_node.storage; the SQL layer is an internal detail.
    import utesla_node.storage as storage

    assert set(storage.__all__) == {
        "open_storage", "redact_url", "Storage", "SQLiteStorage", "MariaDBStorage", "User",
        "Token", "Peer", "SCHEMA_VERSION", "MAX_NAME_LEN", "MAX_URL_LEN", "StorageError",
        "StorageUnavailable", "AlreadyExists", "NoSuchEntry", "TokenLimitReached",
        "SchemaTooNew", "PASSWORD_ENV",
    }
    for name in storage.__all__:
        assert getattr(storage, name) is not None
    assert issubclass(storage.MariaDBStorage, storage.Storage)
    assert issubclass(storage.SQLiteStorage, storage.Storage)
