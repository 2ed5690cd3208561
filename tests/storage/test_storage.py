"""The storage contract, run identically on SQLite and MariaDB, plus backend-specific failures."""
from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import sqlite3
import stat
from pathlib import Path

import pytest

from utesla_node.storage import (
    SCHEMA_VERSION, AlreadyExists, NoSuchEntry, Peer, SchemaTooNew, SQLiteStorage, Storage,
    StorageUnavailable, Token, TokenLimitReached, User, open_storage, redact_url,
)

from .conftest import Backend, MariaDBBackend, SQLiteBackend

T0 = 1_700_000_000.25  # a fixed "now"; storage never reads the clock itself
DAY = 86400.0


def stored_version(backend: Backend) -> int:
    (row,) = backend.execute("SELECT value FROM meta WHERE name = 'schema_version'")
    return int(row[0])


async def must_user(storage: Storage, name: str) -> User:
    found = await storage.get_user(name)
    assert found is not None, name
    return found


def user(name: str = "alice", **kw: object) -> User:
    fields: dict[str, object] = dict(
        password_hash="scrypt$ln=10$r=8$p=1$c2FsdA$a2V5",
        public_key="-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEA\n-----END PUBLIC KEY-----\n",
        created_at=T0,
    )
    fields.update(kw)
    return User(name=name, **fields)  # type: ignore[arg-type]


def token(name: str = "alice", seed: str = "t", *, created: float = T0, ttl: float = DAY,
          scopes: tuple[str, ...] = ("*",)) -> Token:
    return Token(
        token_hash=hashlib.sha256(f"{name}/{seed}".encode()).digest(), user=name,
        created_at=created, expires_at=created + ttl, scopes=scopes,
    )


def peer(url: str = "utesla://b.example:17000", **kw: object) -> Peer:
    fields: dict[str, object] = dict(
        public_key="-----BEGIN PUBLIC KEY-----\nPEER\n-----END PUBLIC KEY-----\n",
        user="node-a", token="ut1_SECRETSECRETSECRETSECRETSECRETSECRETSECRE", priority=0,
        created_at=T0,
    )
    fields.update(kw)
    return Peer(url=url, **fields)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- users

async def test_add_get_list_delete_user(storage: Storage) -> None:
    assert await storage.get_user("alice") is None
    alice = user("alice", token_limit=3, guest=True, scopes=("hello_world", "echo/*"))
    await storage.add_user(alice)
    await storage.add_user(user("bob"))
    assert await storage.get_user("alice") == alice
    assert [u.name for u in await storage.list_users()] == ["alice", "bob"]
    assert await storage.get_user("Alice") is None  # names are case-sensitive
    assert await storage.delete_user("alice") is True
    assert await storage.delete_user("alice") is False
    assert await storage.get_user("alice") is None
    assert [u.name for u in await storage.list_users()] == ["bob"]


async def test_duplicate_user_is_refused(storage: Storage) -> None:
    await storage.add_user(user("alice"))
    with pytest.raises(AlreadyExists):
        await storage.add_user(user("alice", token_limit=5))
    assert (await must_user(storage, "alice")).token_limit == 1


async def test_trailing_space_is_a_different_user(storage: Storage) -> None:
    # MariaDB's PAD SPACE collations would call these equal; ours must not.
    await storage.add_user(user("alice"))
    await storage.add_user(user("alice "))
    assert len(await storage.list_users()) == 2


async def test_overwrite_replaces_user_and_revokes_tokens(storage: Storage) -> None:
    await storage.add_user(user("alice"))
    await storage.add_token(token("alice"), limit=0, now=T0)
    await storage.add_user(user("alice", public_key="NEW KEY", token_limit=0), overwrite=True)
    alice = await storage.get_user("alice")
    assert alice is not None and alice.public_key == "NEW KEY" and alice.token_limit == 0
    (tok,) = await storage.list_tokens("alice")
    assert tok.revoked


@pytest.mark.parametrize("change", ["password", "public_key"])
async def test_credential_change_revokes_tokens(storage: Storage, change: str) -> None:
    await storage.add_user(user("alice"))
    await storage.add_user(user("bob"))
    await storage.add_token(token("alice"), limit=0, now=T0)
    await storage.add_token(token("bob"), limit=0, now=T0)
    if change == "password":
        await storage.set_password("alice", "scrypt$new")
        assert (await must_user(storage, "alice")).password_hash == "scrypt$new"
    else:
        await storage.set_public_key("alice", "NEW PEM")
        assert (await must_user(storage, "alice")).public_key == "NEW PEM"
    assert [t.revoked for t in await storage.list_tokens("alice")] == [True]
    assert [t.revoked for t in await storage.list_tokens("bob")] == [False]


@pytest.mark.parametrize("change", ["password", "public_key"])
async def test_credential_change_refuses_what_a_user_record_refuses(
    storage: Storage, change: str
) -> None:
    # A value User() would refuse must not reach the table: reading the user back would fail.
    await storage.add_user(user("alice"))
    await storage.add_token(token("alice"), limit=0, now=T0)
    set_it = storage.set_password if change == "password" else storage.set_public_key
    for bad in ("", "x" * 70_000, "nul\x00byte"):
        with pytest.raises(ValueError):
            await set_it("alice", bad)
    with pytest.raises(TypeError):
        await set_it("alice", b"bytes")  # type: ignore[arg-type]
    assert await must_user(storage, "alice") == user("alice")
    assert [t.revoked for t in await storage.list_tokens("alice")] == [False]


async def test_duplicates_name_the_entry(storage: Storage) -> None:
    await storage.add_user(user("alice"))
    with pytest.raises(AlreadyExists, match="user 'alice' already exists"):
        await storage.add_user(user("alice"))
    await storage.add_peer(peer("utesla://b:1"))
    with pytest.raises(AlreadyExists, match="peer 'utesla://b:1' already exists"):
        await storage.add_peer(peer("utesla://b:1"))


async def test_unknown_user_raises_no_such_entry(storage: Storage) -> None:
    with pytest.raises(NoSuchEntry):
        await storage.set_password("ghost", "x")
    with pytest.raises(NoSuchEntry):
        await storage.set_public_key("ghost", "x")
    with pytest.raises(NoSuchEntry):
        await storage.add_token(token("ghost"), limit=0, now=T0)


async def test_setting_the_same_value_still_finds_the_user(storage: Storage) -> None:
    # MariaDB reports *changed* rows unless asked otherwise; "unchanged" must not read as "unknown".
    await storage.add_user(user("alice"))
    await storage.set_password("alice", user().password_hash)


async def test_unicode_names_round_trip(storage: Storage) -> None:
    names = ["ñandú", "Ωμέγα", "用户", "emoji-😀", "a" * 255]
    for name in names:
        await storage.add_user(user(name))
        await storage.add_token(token(name), limit=1, now=T0)
    for name in names:
        assert (await must_user(storage, name)).name == name
        assert [t.user for t in await storage.list_tokens(name)] == [name]
    assert [u.name for u in await storage.list_users()] == sorted(names)


async def test_user_keys_answers_the_current_key_of_each_registered_name(
        storage: Storage) -> None:
    # The revocation watcher's one read: registered names with their key, others left out.
    await storage.add_user(user("alice", public_key="ALICE PEM"))
    await storage.add_user(user("bob", public_key="BOB PEM"))
    await storage.add_user(user("alice ", public_key="SPACE PEM"))
    assert await storage.user_keys([]) == {}
    assert await storage.user_keys(["alice", "bob", "carol", "Alice", "alice", "x" * 1000,
                                    ""]) == {"alice": "ALICE PEM", "bob": "BOB PEM"}
    assert await storage.user_keys({"alice "}) == {"alice ": "SPACE PEM"}
    await storage.set_public_key("alice", "NEW PEM")
    await storage.delete_user("bob")
    assert await storage.user_keys(("alice", "bob")) == {"alice": "NEW PEM"}


async def test_user_keys_reads_more_names_than_one_statement_holds(storage: Storage) -> None:
    # 1,200 names: three IN lists (SQLite's oldest limit is 999 variables per statement).
    names = [f"user{i:04d}" for i in range(1200)]
    registered = names[::97] + names[-1:]
    for name in registered:
        await storage.add_user(user(name, public_key=f"PEM of {name}"))
    assert await storage.user_keys(names) == {n: f"PEM of {n}" for n in registered}


async def test_impossible_keys_find_nothing(storage: Storage) -> None:
    assert await storage.get_user("x" * 1000) is None
    assert await storage.get_user("") is None
    assert await storage.get_token(b"short") is None
    assert await storage.delete_user("x" * 1000) is False
    with pytest.raises(ValueError):
        user("x" * 256)


# --------------------------------------------------------------------------- tokens

async def test_token_round_trip(storage: Storage) -> None:
    await storage.add_user(user("alice"))
    tok = token("alice", scopes=("hello_world", "echo/*"))
    await storage.add_token(tok, limit=1, now=T0)
    assert await storage.get_token(tok.token_hash) == tok
    assert await storage.list_tokens("alice") == [tok]
    assert await storage.list_tokens("nobody") == []
    with pytest.raises(AlreadyExists):
        await storage.add_token(tok, limit=0, now=T0)


async def test_token_limit_default_is_one(storage: Storage) -> None:
    await storage.add_user(user("alice"))
    await storage.add_token(token("alice", "1"), limit=1, now=T0)
    with pytest.raises(TokenLimitReached):
        await storage.add_token(token("alice", "2"), limit=1, now=T0)
    assert len(await storage.list_tokens("alice")) == 1


async def test_token_limit_zero_is_unlimited(storage: Storage) -> None:
    await storage.add_user(user("alice", token_limit=0))
    for i in range(5):
        await storage.add_token(token("alice", str(i)), limit=0, now=T0)
    assert len(await storage.list_tokens("alice")) == 5


async def test_expired_and_revoked_tokens_do_not_count(storage: Storage) -> None:
    await storage.add_user(user("alice"))
    first = token("alice", "1", ttl=60)
    await storage.add_token(first, limit=1, now=T0)
    # Expiry is exclusive: at exactly expires_at the token is dead.
    await storage.add_token(token("alice", "2"), limit=1, now=first.expires_at)
    with pytest.raises(TokenLimitReached):
        await storage.add_token(token("alice", "3"), limit=1, now=first.expires_at)
    # Storage has no clock, so "not yet revoked" includes the expired one.
    assert await storage.revoke_user_tokens("alice") == 2
    assert await storage.revoke_user_tokens("alice") == 0
    await storage.add_token(token("alice", "3"), limit=1, now=first.expires_at)


async def test_concurrent_issuers_cannot_exceed_the_limit(storage: Storage) -> None:
    await storage.add_user(user("alice", token_limit=3))
    results = await asyncio.gather(
        *(storage.add_token(token("alice", str(i)), limit=3, now=T0) for i in range(12)),
        return_exceptions=True,
    )
    assert sum(r is None for r in results) == 3
    assert all(isinstance(r, TokenLimitReached) for r in results if r is not None)
    assert len(await storage.list_tokens("alice")) == 3


@pytest.mark.parametrize("bad", ["1", None, True, float("nan"), float("inf")])
async def test_now_must_be_a_finite_number(storage: Storage, bad: object) -> None:
    # Storage has no clock, so a wrong "now" would silently count or purge the wrong tokens.
    await storage.add_user(user("alice", token_limit=0))
    error = ValueError if isinstance(bad, float) else TypeError
    with pytest.raises(error):
        await storage.add_token(token("alice"), limit=1, now=bad)  # type: ignore[arg-type]
    with pytest.raises(error):
        await storage.purge_expired(bad)  # type: ignore[arg-type]
    with pytest.raises(error):
        await storage.renew_token(token("alice").token_hash, bad)  # type: ignore[arg-type]
    assert await storage.list_tokens("alice") == []


async def test_tokens_are_listed_oldest_first(storage: Storage) -> None:
    await storage.add_user(user("alice", token_limit=0))
    made = [token("alice", str(i), created=T0 + (i % 3)) for i in range(7)]
    for tok in made:
        await storage.add_token(tok, limit=0, now=T0)
    listed = await storage.list_tokens("alice")
    assert listed == sorted(made, key=lambda t: (t.created_at, t.token_hash))


async def test_issuers_on_two_storages_cannot_exceed_the_limit(backend: Backend) -> None:
    # Two nodes (or a node and utesla-cli) on one database: the limit holds across connections.
    async with backend.make() as one, backend.make() as two:
        await one.add_user(user("alice", token_limit=2))
        results = await asyncio.gather(
            *((one, two)[i % 2].add_token(token("alice", str(i)), limit=2, now=T0)
              for i in range(10)),
            return_exceptions=True,
        )
        assert sum(r is None for r in results) == 2
        assert all(isinstance(r, TokenLimitReached) for r in results if r is not None)
        assert len(await two.list_tokens("alice")) == 2


async def test_delete_user_racing_add_token_leaves_no_orphans(backend: Backend) -> None:
    # delete_user takes the user row before the tokens, as add_token does: no deadlock, and
    # a token is either refused (NoSuchEntry) or deleted with its user.
    async with backend.make() as one, backend.make() as two:
        for round_ in range(3):
            await one.add_user(user("alice", token_limit=0))
            results = await asyncio.gather(
                *(two.add_token(token("alice", f"{round_}/{i}"), limit=0, now=T0)
                  for i in range(6)),
                one.delete_user("alice"),
                return_exceptions=True,
            )
            assert results[-1] is True
            assert all(r is None or isinstance(r, NoSuchEntry) for r in results[:-1])
            assert await two.get_user("alice") is None
            assert await two.list_tokens("alice") == []
            assert backend.execute("SELECT COUNT(*) FROM tokens") == [(0,)]


async def test_cancelled_operations_leave_the_storage_usable(storage: Storage) -> None:
    await storage.add_user(user("alice", token_limit=0))
    made = [token("alice", str(i)) for i in range(5)]
    tasks = [asyncio.create_task(storage.add_token(t, limit=0, now=T0)) for t in made]
    await asyncio.sleep(0)  # one turn: the operations are under way, not finished
    for task in tasks:
        task.cancel()
    done = await asyncio.gather(*tasks, return_exceptions=True)
    after = token("alice", "after")
    await storage.add_token(after, limit=0, now=T0)  # SQLite: queued behind the cancelled ones
    # A cancelled operation may still have completed, but whole: each token is stored
    # exactly as given or not at all, and the storage carries on.
    kept = set(await storage.list_tokens("alice"))
    assert after in kept and kept <= {after, *made}
    assert {t for t, r in zip(made, done) if r is None} <= kept
    await storage.ping()


async def test_revoke_renew_delete_purge(storage: Storage) -> None:
    await storage.add_user(user("alice", token_limit=0))
    live, revoked = token("alice", "live"), token("alice", "rev")
    expired = token("alice", "old", ttl=10)
    for tok in (live, revoked, expired):
        await storage.add_token(tok, limit=0, now=T0)

    assert await storage.revoke_token(revoked.token_hash) is True
    assert await storage.revoke_token(revoked.token_hash) is True  # still exists
    assert await storage.revoke_token(hashlib.sha256(b"nope").digest()) is False
    revoked_now = await storage.get_token(revoked.token_hash)
    assert revoked_now is not None and revoked_now.revoked

    assert await storage.renew_token(live.token_hash, T0 + 5 * DAY) is True
    assert await storage.renew_token(live.token_hash, T0 + 5 * DAY) is True  # same value
    renewed = await storage.get_token(live.token_hash)
    assert renewed is not None and renewed.expires_at == T0 + 5 * DAY
    assert await storage.renew_token(revoked.token_hash, T0 + 5 * DAY) is False  # no resurrection
    assert await storage.renew_token(hashlib.sha256(b"nope").digest(), T0) is False

    assert await storage.purge_expired(T0 + 100) == 2  # the revoked one and the expired one
    assert [t.token_hash for t in await storage.list_tokens("alice")] == [live.token_hash]
    assert await storage.purge_expired(T0 + 100) == 0

    assert await storage.delete_token(live.token_hash) is True
    assert await storage.delete_token(live.token_hash) is False


async def test_renew_with_issued_at_moves_created_at(storage: Storage) -> None:
    # What keeps a renewed token's lifetime (expires_at - created_at) from growing.
    await storage.add_user(user("alice", token_limit=0))
    tok = token("alice", "t")
    await storage.add_token(tok, limit=0, now=T0)
    assert await storage.renew_token(tok.token_hash, T0 + 2 * DAY, issued_at=T0 + DAY) is True
    renewed = await storage.get_token(tok.token_hash)
    assert (renewed.created_at, renewed.expires_at) == (T0 + DAY, T0 + 2 * DAY)
    assert await storage.renew_token(tok.token_hash, T0 + 3 * DAY) is True    # created_at kept
    renewed = await storage.get_token(tok.token_hash)
    assert (renewed.created_at, renewed.expires_at) == (T0 + DAY, T0 + 3 * DAY)


async def test_delete_user_deletes_tokens(storage: Storage) -> None:
    await storage.add_user(user("alice"))
    tok = token("alice")
    await storage.add_token(tok, limit=1, now=T0)
    await storage.delete_user("alice")
    assert await storage.get_token(tok.token_hash) is None
    # A new user of the same name starts clean, without the old user's tokens.
    await storage.add_user(user("alice"))
    assert await storage.list_tokens("alice") == []


# --------------------------------------------------------------------------- peers

async def test_peers_crud(storage: Storage) -> None:
    b = peer("utesla://b:17000", priority=5)
    c = peer("utesla://c:17000", priority=1)
    await storage.add_peer(b)
    await storage.add_peer(c)
    assert await storage.get_peer("utesla://b:17000") == b
    assert await storage.get_peer("utesla://zzz:1") is None
    assert [p.url for p in await storage.list_peers()] == ["utesla://c:17000", "utesla://b:17000"]
    with pytest.raises(AlreadyExists):
        await storage.add_peer(peer("utesla://b:17000"))
    await storage.add_peer(peer("utesla://b:17000", token="ut1_other", priority=0), overwrite=True)
    replaced = await storage.get_peer("utesla://b:17000")
    assert replaced is not None and replaced.token == "ut1_other"
    assert await storage.set_peer_priority("utesla://b:17000", 9) is True
    assert await storage.set_peer_priority("utesla://b:17000", 9) is True  # unchanged but found
    assert await storage.set_peer_priority("utesla://nope:1", 9) is False
    assert [p.url for p in await storage.list_peers()] == ["utesla://c:17000", "utesla://b:17000"]
    assert await storage.delete_peer("utesla://b:17000") is True
    assert await storage.delete_peer("utesla://b:17000") is False
    assert [p.url for p in await storage.list_peers()] == ["utesla://c:17000"]


def test_records_normalise_and_validate() -> None:
    u = user(scopes=(s for s in ["a", "b"]))  # any iterable; stored as a tuple
    assert u.scopes == ("a", "b")
    with pytest.raises(TypeError):
        user(scopes="abc")
    with pytest.raises(ValueError):
        user(token_limit=-1)
    with pytest.raises(ValueError):
        Token(token_hash=b"x" * 31, user="a", created_at=0, expires_at=1)
    with pytest.raises(ValueError):
        Token(token_hash=b"x" * 32, user="a", created_at=0, expires_at=float("inf"))
    with pytest.raises(ValueError):
        peer(priority=2**31)


def test_peer_repr_hides_token() -> None:
    p = peer(token="ut1_VERYSECRET")
    assert "VERYSECRET" not in repr(p)
    assert "VERYSECRET" not in str(p)
    assert "utesla://" in repr(p)


def test_peer_repr_hides_its_proxy_password() -> None:
    p = peer(proxy="socks5h://me:PROXYSECRET@127.0.0.1:9050")
    assert "PROXYSECRET" not in repr(p)
    with pytest.raises(ValueError, match="peer proxy"):
        peer(proxy="socks5h://" + "x" * 1100)


async def test_a_peer_keeps_its_proxy(storage: Storage) -> None:
    """Schema version 2: add_network --proxy is stored per peer, and replaced with it."""
    await storage.add_peer(peer("utesla://b:17000", proxy="socks5h://u:p@127.0.0.1:9050"))
    await storage.add_peer(peer("utesla://c:17000"))
    got = {p.url: p.proxy for p in await storage.list_peers()}
    assert got == {"utesla://b:17000": "socks5h://u:p@127.0.0.1:9050", "utesla://c:17000": ""}
    await storage.add_peer(peer("utesla://b:17000", proxy="direct"), overwrite=True)
    await storage.add_peer(peer("utesla://c:17000", proxy="socks5://127.0.0.1:1080"),
                           overwrite=True)
    assert (await storage.get_peer("utesla://b:17000")).proxy == "direct"
    assert (await storage.get_peer("utesla://c:17000")).proxy == "socks5://127.0.0.1:1080"


# --------------------------------------------------------------------------- schema and lifecycle

async def test_reopen_existing_database(backend: Backend) -> None:
    first = backend.make()
    await first.open()
    await first.add_user(user("alice"))
    await first.close()
    for _ in range(2):  # migrations are idempotent; data survives
        again = backend.make()
        await again.open()
        assert (await again.get_user("alice")) is not None
        await again.ping()
        await again.close()
    assert stored_version(backend) == SCHEMA_VERSION


async def test_a_version_1_database_is_migrated_with_its_peers(backend: Backend) -> None:
    """A database written before peers had a proxy (schema 1) opens: the column is added,
    the stored peers keep everything and read back with no proxy of their own."""
    if backend.kind == "sqlite":
        from utesla_node.storage.sqlite import DIALECT
    else:
        from utesla_node.storage.mariadb import DIALECT
    for statement in (*DIALECT.schema[1], DIALECT.meta_ddl):
        backend.execute(statement)
    backend.execute("INSERT INTO meta (name, value) VALUES ('schema_version', 1)")
    backend.execute(
        "INSERT INTO peers (url, public_key, user_name, token, priority, created_at) "
        "VALUES (?, ?, ?, ?, ?, ?)",
        ("utesla://old:17000", "-----BEGIN PUBLIC KEY-----\nOLD\n", "node-a", "ut1_OLD", 3, T0))
    store = backend.make()
    await store.open()
    try:
        old = await store.get_peer("utesla://old:17000")
        assert old == peer("utesla://old:17000", public_key="-----BEGIN PUBLIC KEY-----\nOLD\n",
                           token="ut1_OLD", priority=3)
        assert old.proxy == ""
        await store.add_peer(peer("utesla://new:17000", proxy="socks5h://127.0.0.1:9050"))
        assert (await store.get_peer("utesla://new:17000")).proxy == "socks5h://127.0.0.1:9050"
    finally:
        await store.close()
    assert stored_version(backend) == SCHEMA_VERSION == 2
    again = backend.make()              # and a migrated database opens as it is
    await again.open()
    assert len(await again.list_peers()) == 2
    await again.close()


async def test_newer_schema_is_refused(backend: Backend) -> None:
    store = backend.make()
    await store.open()
    await store.close()
    backend.execute(
        "UPDATE meta SET value = ? WHERE name = 'schema_version'", (SCHEMA_VERSION + 1,)
    )
    newer = backend.make()
    with pytest.raises(SchemaTooNew) as info:
        await newer.open()
    message = str(info.value)
    assert f"version {SCHEMA_VERSION + 1}" in message and f"({SCHEMA_VERSION})" in message
    assert "upgrade utesla-node" in message
    # Refusing leaves the database untouched and the storage closed.
    assert stored_version(backend) == SCHEMA_VERSION + 1
    with pytest.raises(StorageUnavailable):
        await newer.get_user("alice")


async def test_closed_storage_is_unavailable(backend: Backend) -> None:
    store = backend.make()
    with pytest.raises(StorageUnavailable):
        await store.get_user("alice")  # never opened
    async with store:
        await store.ping()
    with pytest.raises(StorageUnavailable):
        await store.add_user(user("alice"))
    await store.close()  # closing twice is harmless


# --------------------------------------------------------------------------- SQLite specifics

async def test_sqlite_file_settings(sqlite_backend: SQLiteBackend) -> None:
    backend = sqlite_backend
    async with backend.make():
        pass
    path = Path(backend.path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # password hashes and peer secrets inside
    assert backend.execute("PRAGMA journal_mode") == [("wal",)]


async def test_sqlite_locked_database_is_unavailable_then_recovers(
    sqlite_backend: SQLiteBackend,
) -> None:
    backend = sqlite_backend
    store = backend.make(busy_timeout_ms=50)
    await store.open()
    try:
        await store.add_user(user("alice"))
        locker = sqlite3.connect(backend.path, isolation_level=None)
        try:
            locker.execute("BEGIN EXCLUSIVE")
            with pytest.raises(StorageUnavailable):
                await store.add_user(user("bob"))
            with pytest.raises(StorageUnavailable):
                await store.add_token(token("alice"), limit=1, now=T0)
            assert await store.get_user("alice") is not None  # WAL: readers are not blocked
        finally:
            locker.execute("ROLLBACK")
            locker.close()
        await store.add_user(user("bob"))
        assert [u.name for u in await store.list_users()] == ["alice", "bob"]
        assert await store.get_user("bob") is not None
    finally:
        await store.close()


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="file permissions do not stop root; the lock test covers that case")
async def test_sqlite_read_only_database_is_unavailable(sqlite_backend: SQLiteBackend) -> None:
    backend = sqlite_backend
    path = Path(backend.path)
    async with backend.make() as store:
        await store.add_user(user("alice"))
    for side in (Path(f"{path}-wal"), Path(f"{path}-shm")):
        side.unlink(missing_ok=True)
    path.chmod(0o444)
    path.parent.chmod(0o555)  # no -wal/-shm can be created either
    try:
        store = backend.make()
        with pytest.raises(StorageUnavailable):
            await store.open()
            await store.add_user(user("bob"))
        await store.close()
    finally:
        path.parent.chmod(0o755)
        path.chmod(0o600)
    async with backend.make() as store:
        await store.add_user(user("bob"))


async def test_sqlite_missing_directory_is_unavailable(tmp_path: Path) -> None:
    store = SQLiteStorage(tmp_path / "no" / "such" / "dir" / "x.db")
    with pytest.raises(StorageUnavailable):
        await store.open()


async def test_sqlite_in_memory() -> None:
    async with open_storage("sqlite::memory:", "unused") as store:
        await store.add_user(user("alice"))
        assert (await store.get_user("alice")) is not None


# --------------------------------------------------------------------------- MariaDB specifics

async def test_mariadb_killed_connection_recovers(mariadb_backend: MariaDBBackend) -> None:
    db = mariadb_backend
    store = db.make(pool_size=1)
    await store.open()
    try:
        await store.add_user(user("alice"))
        ids = db.server.connection_ids(db.database)
        assert len(ids) == 1
        db.server.kill(ids[0])
        try:
            await store.add_user(user("bob"))
        except StorageUnavailable:
            await store.add_user(user("bob"))  # the call after that must succeed
        assert [u.name for u in await store.list_users()] == ["alice", "bob"]
        assert db.server.connection_ids(db.database) != ids
    finally:
        await store.close()


class _Proxy:
    """A TCP relay in front of MariaDB that the test can cut and restore, like a server restart."""

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self.port = 0
        self._server: asyncio.base_events.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        """Cut every relayed connection, then wait for the listener to be gone.

        The order matters: since Python 3.12.1 ``Server.wait_closed()`` waits until every
        connection the server accepted has closed, so awaiting it before aborting them never
        returns (issue 16: this test hung to the pytest timeout on 3.13).
        """
        assert self._server is not None
        self._server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._writers.add(up_writer)
        if self._server is None or not self._server.is_serving():
            # stop() ran while this connection was being set up: it missed these writers.
            up_writer.transport.abort()
            writer.transport.abort()
            return

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers.discard(writer)
        self._writers.discard(up_writer)
        self._tasks.discard(task)


async def test_mariadb_outage_is_unavailable_then_recovers(mariadb_backend: MariaDBBackend) -> None:
    db = mariadb_backend
    proxy = _Proxy(db.server.host, db.server.port)
    await proxy.start()
    store = db.make(host="127.0.0.1", port=proxy.port, pool_size=2)
    await store.open()
    try:
        await store.add_user(user("alice"))
        await proxy.stop()  # the "server" goes away, pooled connections die with it
        for _ in range(3):  # keeps failing cleanly while it is away, reads and writes alike
            with pytest.raises(StorageUnavailable):
                await store.get_user("alice")
            with pytest.raises(StorageUnavailable):
                await store.add_user(user("bob"))
            with pytest.raises(StorageUnavailable):
                await store.ping()
        await proxy.start()  # back on the same port
        assert await store.get_user("alice") is not None
        await store.add_user(user("bob"))
        await store.ping()
    finally:
        await store.close()
        await proxy.stop()


async def test_mariadb_unreachable_at_open() -> None:
    with socket.socket() as sock:  # a port that was free a moment ago: connection refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    store = open_storage(f"mysql://nobody:pw@127.0.0.1:{port}/db", "unused", connect_timeout=2)
    with pytest.raises(StorageUnavailable) as info:
        await store.open()
    assert "pw" not in str(info.value)
    with pytest.raises(StorageUnavailable):
        await store.get_user("alice")


# --------------------------------------------------------------------------- URL handling

def test_open_storage_default_sqlite(tmp_path: Path) -> None:
    data = tmp_path / "data"
    store = open_storage(None, data)
    assert isinstance(store, SQLiteStorage) and store.path == str(data / "utesla.db")
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert isinstance(open_storage("", tmp_path / "other"), SQLiteStorage)


def test_open_storage_sqlite_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store = open_storage(f"sqlite://{tmp_path}/abs.db", "unused", busy_timeout_ms=10)
    assert isinstance(store, SQLiteStorage)
    assert store.path == f"{tmp_path}/abs.db" and store.busy_timeout_ms == 10
    monkeypatch.chdir(tmp_path)
    relative = open_storage("sqlite:rel.db", "unused")
    assert isinstance(relative, SQLiteStorage) and relative.path == str(tmp_path / "rel.db")
    for bad in ("sqlite://host/x.db", "sqlite:", "sqlite:///"):
        with pytest.raises(ValueError):
            open_storage(bad, "unused")


def test_open_storage_mysql_url(monkeypatch: pytest.MonkeyPatch) -> None:
    from utesla_node.storage.mariadb import MariaDBStorage

    monkeypatch.delenv("UTESLA_DB_PASSWORD", raising=False)
    def mysql(url: str) -> MariaDBStorage:
        store = open_storage(url, "unused")
        assert isinstance(store, MariaDBStorage)
        return store

    store = mysql("mysql://us%40er:p%3Ass%2Fw@db.example:3307/utesla?pool_size=4")
    assert (store.user, store._password, store.host, store.port) == (
        "us@er", "p:ss/w", "db.example", 3307)
    assert (store.database, store.pool_size, store._ssl) == ("utesla", 4, None)
    store = mysql("mariadb://u@db/utesla")
    assert store.port == 3306 and store._password == "" and store.pool_size == 10
    monkeypatch.setenv("UTESLA_DB_PASSWORD", "from-env")
    assert mysql("mysql://u@db/utesla")._password == "from-env"
    assert mysql("mysql://u:given@db/utesla")._password == "given"
    assert mysql("mysql://u@db/utesla?ssl_verify=false&ssl=1")._ssl is not None


@pytest.mark.parametrize("url", [
    "postgres://u@h/db", "mysql://u@h/", "mysql://h/db", "mysql://u@h/db?bogus=1",
    "mysql://u@h/db?pool_size=0", "mysql://u@h/db?ssl_verify=maybe", "mysql://u@h:99999/db",
    "mysql://u@h/db?ssl_ca=/no/such/ca.pem", "just-a-path.db",
])
def test_open_storage_rejects_bad_urls(url: str) -> None:
    with pytest.raises(ValueError):
        open_storage(url, "unused")


def test_redact_url() -> None:
    assert redact_url("mysql://u:s3cret@h:3306/db?ssl=1") == "mysql://u:***@h:3306/db?ssl=1"
    assert redact_url("mysql://u@h/db") == "mysql://u@h/db"
    assert redact_url("sqlite:///x.db") == "sqlite:///x.db"
    assert redact_url(None) == ""
    assert "s3cret" not in redact_url("mysql://u:s3cret@h:99999999/db")
