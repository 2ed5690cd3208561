"""Passwords, tokens and scopes (utesla_node.auth), against real storage on both backends."""
from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from utesla_node import auth
from utesla_node.auth import (
    PASSWORD_MAX, Authority, Forbidden, MalformedToken, Unauthorized, dummy_verify,
    hash_password, needs_rehash, new_token, scope_allows, set_scrypt_cost, token_hash,
    validate_scopes, verify_password,
)
from utesla_node.storage import Storage, StorageUnavailable, Token, TokenLimitReached, User

from .conftest import Backend

T0 = 1_700_000_000.0
WEEK = 7 * 86400.0


@pytest.fixture(autouse=True)
def cheap_scrypt() -> Iterator[None]:
    """N = 2**10 keeps the suite fast; the default cost is restored afterwards."""
    set_scrypt_cost(10)
    yield
    set_scrypt_cost(15)


class Clock:
    def __init__(self, now: float = T0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def authority(storage: Storage, clock: Clock) -> Authority:
    return Authority(storage, token_expire=WEEK, clock=clock)


async def add_user(storage: Storage, name: str = "alice", password: str = "correct horse",
                   **kw: object) -> User:
    new = User(name=name, password_hash=await hash_password(password), public_key="PEM",
               created_at=T0, **kw)  # type: ignore[arg-type]
    await storage.add_user(new)
    return new


# --------------------------------------------------------------------------- passwords

async def test_hash_and_verify() -> None:
    stored = await hash_password("correct horse")
    assert stored.startswith("scrypt$ln=10$r=8$p=1$")
    salt, key = stored.split("$")[4:]
    assert len(base64.b64decode(salt + "==")) == 16 and len(base64.b64decode(key + "=")) == 32
    assert await verify_password("correct horse", stored)
    assert not await verify_password("correct horsE", stored)
    assert not await verify_password("", stored)
    assert await hash_password("correct horse") != stored  # fresh salt each time


async def test_unicode_password() -> None:
    stored = await hash_password("contraseña ✓")
    assert await verify_password("contraseña ✓", stored)
    assert not await verify_password("contrasena ✓", stored)


async def test_password_length_limit_is_in_bytes() -> None:
    await hash_password("x" * PASSWORD_MAX)
    with pytest.raises(ValueError):
        await hash_password("x" * (PASSWORD_MAX + 1))
    with pytest.raises(ValueError):
        await hash_password("é" * (PASSWORD_MAX // 2 + 1))  # 2 bytes each in UTF-8
    with pytest.raises(ValueError):
        await verify_password("x" * (PASSWORD_MAX + 1), await hash_password("x"))


async def test_params_are_stored_and_needs_rehash() -> None:
    weak = await hash_password("pw")
    assert not needs_rehash(weak)
    set_scrypt_cost(11)
    assert needs_rehash(weak)
    strong = await hash_password("pw")
    assert strong.startswith("scrypt$ln=11$")
    # Old hashes still verify with the parameters stored beside them.
    assert await verify_password("pw", weak) and await verify_password("pw", strong)
    set_scrypt_cost(10)
    assert not needs_rehash(strong)  # stronger than current is fine
    assert needs_rehash("plaintext") and needs_rehash("scrypt$ln=10$r=1$p=1$AAAA$AAAA")


@pytest.mark.parametrize("stored", [
    "", "garbage", "scrypt$ln=10$r=8$p=1$!!!$AAAA", "scrypt$ln=99$r=8$p=1$AAAA$AAAA",
    "scrypt$ln=22$r=32$p=1$AAAA$AAAA",  # would need 16 GiB: refused, not attempted
    "scrypt$r=8$ln=10$p=1$AAAA$AAAA", "bcrypt$2b$12$xxxxxxxx",
    "scrypt$ln=10$r=8$p=1$AAAAAAAAAAAAAAAAAAAAAA$AAAA",  # 3-byte key: forged, not ours
])
async def test_unusable_stored_hash_never_matches(stored: str) -> None:
    assert await verify_password("pw", stored) is False


def test_scrypt_cost_bounds() -> None:
    for bad in (0, 23, 10.0, True):
        with pytest.raises(ValueError):
            set_scrypt_cost(bad)  # type: ignore[arg-type]


async def test_scrypt_runs_off_the_event_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[str] = []
    real = auth._scrypt

    def spy(*args: Any, **kwargs: Any) -> bytes:
        threads.append(threading.current_thread().name)
        result: bytes = real(*args, **kwargs)
        return result

    monkeypatch.setattr(auth, "_scrypt", spy)
    await verify_password("pw", await hash_password("pw"))
    await dummy_verify("pw")
    assert len(threads) == 3
    assert all(name.startswith("utesla-scrypt") for name in threads)


async def test_hashing_concurrency_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    lock = threading.Lock()
    active = 0
    peak = 0
    two_running = threading.Event()
    release = threading.Event()

    def blocking_scrypt(*args: object, **kwargs: object) -> bytes:
        nonlocal active, peak
        with lock:
            active += 1
            peak = max(peak, active)
            if active == 2:
                two_running.set()
        release.wait(10)
        with lock:
            active -= 1
        return bytes(32)

    monkeypatch.setattr(auth, "_scrypt", blocking_scrypt)
    tasks = [asyncio.create_task(hash_password("pw")) for _ in range(6)]
    assert await asyncio.to_thread(two_running.wait, 10)
    # The others wait in the fair queue, in the event loop, not in the executor's queue.
    pool = auth._get_pool()
    assert pool.busy == 2 and pool.queued() == 4
    release.set()
    await asyncio.gather(*tasks)
    assert peak == 2


def test_hashing_works_across_event_loops() -> None:
    # A semaphore is bound to one loop; each loop must get its own.
    stored = asyncio.run(hash_password("pw"))
    assert asyncio.run(verify_password("pw", stored))


# --------------------------------------------------------------------------- token strings

def test_token_format_and_hash() -> None:
    first, second = new_token(), new_token()
    assert first.startswith("ut1_") and len(first) == 4 + 43
    assert set(first[4:]) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    assert first != second
    assert len(token_hash(first)) == 32
    assert token_hash(first) != token_hash(second)
    assert token_hash(first) == token_hash(first)


def _non_canonical(token: str) -> str:
    # The last base64 character carries 2 unused bits; flipping one decodes to the same bytes.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    return token[:-1] + alphabet[alphabet.index(token[-1]) ^ 1]


@pytest.mark.parametrize("bad", [
    "", "ut1_", "ut2_" + "A" * 43, "ut1_" + "A" * 42, "ut1_" + "A" * 44, "ut1_" + "+" * 43,
    "ut1_" + "A" * 42 + "=", " " + new_token()[1:], new_token().upper(), None, 42,
])
def test_malformed_tokens(bad: object) -> None:
    with pytest.raises(MalformedToken):
        token_hash(bad)  # type: ignore[arg-type]


def test_non_canonical_token_is_malformed() -> None:
    token = new_token()
    with pytest.raises(MalformedToken):
        token_hash(_non_canonical(token))
    assert issubclass(MalformedToken, ValueError)


# --------------------------------------------------------------------------- scopes

def test_scope_matching() -> None:
    assert scope_allows(("*",), "/anything/at/all")
    assert scope_allows(("*",), "/")
    assert scope_allows(("hello_world",), "/hello_world")
    assert scope_allows(("hello_world",), "hello_world/sub/deeper")
    assert scope_allows(("hello_world",), "//hello_world/./sub/")
    assert not scope_allows(("hello_world",), "/hello_worldx")
    assert not scope_allows(("hello_world",), "/Hello_World")  # case-sensitive
    assert not scope_allows(("hello_world",), "/hello_world/../admin")
    assert not scope_allows(("hello_world",), "/admin")
    assert scope_allows(("hello*",), "/hello_world/sub")
    assert scope_allows(("echo?",), "/echo2") and not scope_allows(("echo?",), "/echo22")
    assert scope_allows(("a", "b/c"), "/b/c/d") and not scope_allows(("a", "b/c"), "/b")
    assert not scope_allows((), "/hello_world")
    assert scope_allows(("svc/",), "/svc/x")  # stored globs are normalised like paths
    assert not scope_allows(("/",), "/svc")


def test_scope_validation() -> None:
    assert validate_scopes(["/hello_world", "echo/*", "hello_world/"]) == ("hello_world", "echo/*")
    assert validate_scopes(["a//b/"]) == ("a/b",)
    assert validate_scopes([]) == ()
    assert validate_scopes(["a" * 128]) == ("a" * 128,)


@pytest.mark.parametrize("bad", [
    ["^hello$"], ["hello|world"], ["(a)"], ["[a-z]*"], ["a+"], ["\\d"], ["a{2}"], ["a b"],
    ["é"], [""], ["/"], ["a" * 129], [f"s{i}" for i in range(33)],
])
def test_scope_validation_rejects(bad: list[str]) -> None:
    with pytest.raises(ValueError):
        validate_scopes(bad)


def test_scope_validation_types() -> None:
    with pytest.raises(TypeError):
        validate_scopes("hello_world")
    with pytest.raises(TypeError):
        validate_scopes([1])  # type: ignore[list-item]


# --------------------------------------------------------------------------- Authority: passwords

async def test_check_password(authority: Authority, storage: Storage) -> None:
    await add_user(storage, "alice", "correct horse")
    user = await authority.check_password("alice", "correct horse")
    assert user.name == "alice"


async def test_unknown_user_and_wrong_password_look_the_same(
    authority: Authority, storage: Storage, monkeypatch: pytest.MonkeyPatch,
) -> None:
    await add_user(storage, "alice", "correct horse")
    dummies: list[str] = []
    real_dummy = auth.dummy_verify

    async def counting_dummy(password: str, **kw: Any) -> None:
        dummies.append(password)
        await real_dummy(password, **kw)

    monkeypatch.setattr(auth, "dummy_verify", counting_dummy)
    with pytest.raises(Unauthorized) as wrong:
        await authority.check_password("alice", "wrong")
    assert dummies == []
    with pytest.raises(Unauthorized) as unknown:
        await authority.check_password("mallory", "wrong")
    assert dummies == ["wrong"]  # the unknown user still paid for one scrypt run
    assert str(wrong.value) == str(unknown.value)
    with pytest.raises(Unauthorized) as too_long:
        await authority.check_password("alice", "x" * (PASSWORD_MAX + 1))
    assert str(too_long.value) == str(wrong.value)


# --------------------------------------------------------------------------- Authority: tokens

async def test_issue_and_check_token(authority: Authority, storage: Storage) -> None:
    await add_user(storage)
    token, record = await authority.issue_token("alice")
    assert token.startswith("ut1_")
    assert record.user == "alice" and record.scopes == ("*",)
    assert record.created_at == T0 and record.expires_at == T0 + WEEK
    assert await storage.get_token(token_hash(token)) == record
    user = await authority.check_token(token, "alice", "/hello_world")
    assert user.name == "alice"


async def test_token_is_stored_only_as_hash(authority: Authority, storage: Storage,
                                            backend: Backend) -> None:
    await add_user(storage)
    token, record = await authority.issue_token("alice")
    dump = backend.raw_bytes()
    assert record.token_hash in dump  # the dump really holds the tokens table...
    assert token.encode() not in dump  # ...but never the token itself
    assert token[4:].encode() not in dump
    assert base64.urlsafe_b64decode(token[4:] + "=") not in dump


async def test_bad_tokens_are_unauthorized_with_one_message(
    authority: Authority, storage: Storage,
) -> None:
    await add_user(storage, "alice")
    await add_user(storage, "bob")
    token, _ = await authority.issue_token("alice")
    messages = set()
    for candidate, session in [
        (None, "alice"), ("", "alice"), ("garbage", "alice"), (new_token(), "alice"),
        (token, "bob"),  # someone else's token: bound to the session's user
        (token[:-1] + ("A" if token[-1] != "A" else "E"), "alice"),
    ]:
        with pytest.raises(Unauthorized) as info:
            await authority.check_token(candidate, session, "/x")  # type: ignore[arg-type]
        messages.add(str(info.value))
    assert len(messages) == 1
    await authority.check_token(token, "alice", "/hello_world")  # still fine for its owner


async def test_expired_token_is_refused_and_deleted(
    authority: Authority, storage: Storage, clock: Clock,
) -> None:
    await add_user(storage)
    token, record = await authority.issue_token("alice", expire=60)
    clock.now = T0 + 59.999
    await authority.check_token(token, "alice", "/x")
    clock.now = T0 + 60
    with pytest.raises(Unauthorized):
        await authority.check_token(token, "alice", "/x")
    assert await storage.get_token(record.token_hash) is None  # lazily cleaned up
    # An expired token no longer counts against the limit of 1.
    await authority.issue_token("alice")


async def test_revoked_token(authority: Authority, storage: Storage, clock: Clock) -> None:
    await add_user(storage, "alice")
    await add_user(storage, "bob")
    token, _ = await authority.issue_token("alice")
    with pytest.raises(Unauthorized):
        await authority.revoke(token, "bob")
    with pytest.raises(Unauthorized):
        await authority.revoke("garbage", "alice")
    assert await authority.revoke(token, "alice") is True
    assert await authority.revoke(token, "alice") is False
    with pytest.raises(Unauthorized):
        await authority.check_token(token, "alice", "/x")
    with pytest.raises(Unauthorized):
        await authority.renew(token, "alice")


async def test_credential_change_invalidates_tokens(authority: Authority, storage: Storage) -> None:
    await add_user(storage)
    token, _ = await authority.issue_token("alice")
    await storage.set_public_key("alice", "NEW PEM")
    with pytest.raises(Unauthorized):
        await authority.check_token(token, "alice", "/x")


async def test_deleted_user_token(authority: Authority, storage: Storage) -> None:
    await add_user(storage)
    token, _ = await authority.issue_token("alice")
    await storage.delete_user("alice")
    with pytest.raises(Unauthorized):
        await authority.check_token(token, "alice", "/x")
    with pytest.raises(Unauthorized):
        await authority.issue_token("alice")


async def test_renew(authority: Authority, storage: Storage, clock: Clock) -> None:
    await add_user(storage)
    token, _ = await authority.issue_token("alice")
    clock.now = T0 + WEEK - 1
    renewed = await authority.renew(token, "alice")
    assert renewed.expires_at == clock.now + WEEK
    assert await storage.get_token(renewed.token_hash) == renewed
    clock.now = T0 + WEEK + 10  # past the original expiry, within the renewed one
    await authority.check_token(token, "alice", "/x")
    with pytest.raises(Unauthorized):
        await authority.renew(token, "bob")
    clock.now = renewed.expires_at
    with pytest.raises(Unauthorized):  # too late: expired tokens cannot be renewed
        await authority.renew(token, "alice")


async def test_token_limit(authority: Authority, storage: Storage) -> None:
    await add_user(storage, "alice")  # default limit: 1
    await add_user(storage, "bob", token_limit=0)  # unlimited
    await add_user(storage, "carol", token_limit=2)
    await authority.issue_token("alice")
    with pytest.raises(TokenLimitReached):
        await authority.issue_token("alice")
    for _ in range(5):
        await authority.issue_token("bob")
    first, _ = await authority.issue_token("carol")
    await authority.issue_token("carol")
    with pytest.raises(TokenLimitReached):
        await authority.issue_token("carol")
    await authority.revoke(first, "carol")  # revoking frees a slot
    await authority.issue_token("carol")


async def test_requested_lifetime_is_capped(authority: Authority, storage: Storage) -> None:
    await add_user(storage, token_limit=0)
    _, short = await authority.issue_token("alice", expire=60)
    assert short.expires_at == T0 + 60
    _, capped = await authority.issue_token("alice", expire=100 * WEEK)
    assert capped.expires_at == T0 + WEEK  # the node's token_expire is a ceiling
    for bad in (0, -5, float("nan")):
        with pytest.raises(ValueError):
            await authority.issue_token("alice", expire=bad)


async def test_token_scopes(authority: Authority, storage: Storage) -> None:
    await add_user(storage)
    token, record = await authority.issue_token("alice", scopes=["/echo", "hello*"])
    assert record.scopes == ("echo", "hello*")
    await authority.check_token(token, "alice", "/echo/sub")
    await authority.check_token(token, "alice", "/hello_world")
    with pytest.raises(Forbidden):
        await authority.check_token(token, "alice", "/admin")
    with pytest.raises(ValueError):
        await authority.issue_token("alice", scopes=["^.*$"])
    with pytest.raises(ValueError):
        await authority.issue_token("alice", scopes=[])


async def test_guest_scopes(authority: Authority, storage: Storage) -> None:
    await add_user(storage, "guest", guest=True, token_limit=0, scopes=("hello_world", "echo"))
    token, record = await authority.issue_token("guest")
    assert record.scopes == ("hello_world", "echo")
    await authority.check_token(token, "guest", "/hello_world")
    await authority.check_token(token, "guest", "/hello_world/sub")
    for path in ("/admin", "/hello_world/../admin", "/hello_worldx"):
        with pytest.raises(Forbidden):
            await authority.check_token(token, "guest", path)

    # A guest cannot widen its reach: wider globs are dropped from the request...
    narrowed, record = await authority.issue_token(
        "guest", scopes=["*", "hello_world/sub", "admin"]
    )
    assert record.scopes == ("hello_world/sub",)
    await authority.check_token(narrowed, "guest", "/hello_world/sub/x")
    with pytest.raises(Forbidden):
        await authority.check_token(narrowed, "guest", "/echo")
    # ...and a request with nothing left is refused outright.
    with pytest.raises(Forbidden):
        await authority.issue_token("guest", scopes=["*"])

    # Even a wide token stored by other means cannot take a guest beyond its own scopes.
    wide = new_token()
    await storage.add_token(
        Token(token_hash(wide), "guest", T0, T0 + WEEK, scopes=("*",)), limit=0, now=T0
    )
    await authority.check_token(wide, "guest", "/echo")
    with pytest.raises(Forbidden):
        await authority.check_token(wide, "guest", "/admin")


async def test_storage_unavailable_propagates(authority: Authority, storage: Storage) -> None:
    await add_user(storage)
    token, _ = await authority.issue_token("alice")
    await storage.close()
    with pytest.raises(StorageUnavailable):
        await authority.check_token(token, "alice", "/x")
    with pytest.raises(StorageUnavailable):
        await authority.check_password("alice", "correct horse")
    with pytest.raises(StorageUnavailable):
        await authority.issue_token("alice")


def test_authority_rejects_bad_lifetimes() -> None:
    for bad in (0, -1, float("inf"), float("nan")):
        with pytest.raises(ValueError):
            Authority(None, token_expire=bad)  # type: ignore[arg-type]


async def test_renew_keeps_a_shortened_lifetime(
    authority: Authority, storage: Storage, clock: Clock
) -> None:
    # Renewing needs only the token and the key: it must not lengthen a token issued with a
    # short ``expire`` to the full ``token_expire``.
    await add_user(storage)
    token, record = await authority.issue_token("alice", expire=60)
    assert record.expires_at == T0 + 60
    clock.now = T0 + 50
    renewed = await authority.renew(token, "alice")
    assert renewed.expires_at == clock.now + 60
    assert (await storage.get_token(renewed.token_hash)).expires_at == clock.now + 60
    # Renewing again and again never lets the lifetime grow (the renewal is the new issue).
    for _ in range(5):
        clock.now = renewed.expires_at - 1
        renewed = await authority.renew(token, "alice")
        assert renewed.expires_at == clock.now + 60
        assert await storage.get_token(renewed.token_hash) == renewed
