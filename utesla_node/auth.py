"""Passwords, access tokens and scopes: the node's authorisation logic.

No SQL and no sockets here: persistence goes through :class:`utesla_node.storage.Storage`, and
the caller supplies the identity the handshake authenticated.  What this module guarantees:

* **Passwords** are hashed with scrypt (N=2**15, r=8, p=1, 16-byte salt, 32-byte key) and stored
  as ``scrypt$ln=15$r=8$p=1$<salt b64>$<key b64>``, so the cost can be raised later without
  breaking existing hashes (:func:`needs_rehash` tells which ones are below the current cost).
  scrypt is deliberately slow, so it always runs on a small thread pool behind a semaphore per
  event loop: a burst of logins queues up instead of freezing the event loop or eating memory
  (each scrypt call needs 128 * r * N bytes = 32 MiB).
* **Unknown users and wrong passwords look the same**: same exception, same message, and an
  unknown user still costs one scrypt run (:func:`dummy_verify`), so timing does not reveal
  which names exist.
* **Tokens** are 32 random bytes shown as ``ut1_`` + URL-safe base64 (the prefix makes leaked
  tokens easy to grep for).  Only their SHA-256 is stored; a token is valid only on a session
  authenticated as its owner, until it expires or is revoked.
* **Scopes** are service globs (``fnmatch``), never regexes: the original accepted user-supplied
  regular expressions, an easy ReDoS.  Globs are checked against a small ASCII allowlist when
  they are created, and matched case-sensitively against the normalised service path.
  (``fnmatch`` turns globs into patterns that cannot backtrack catastrophically since
  Python 3.9, and the allowlist keeps character classes out.)
"""
from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import math
import secrets
import threading
import time
import weakref
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from fnmatch import fnmatchcase
from typing import NamedTuple

from Crypto.Protocol.KDF import scrypt as _scrypt

from protocol.errors import Status

from .errors import NodeError

from .storage import Storage, StorageError, Token, User

__all__ = [
    "PASSWORD_MAX", "TOKEN_PREFIX", "SCOPE_MAX_LEN", "SCOPES_MAX", "DEFAULT_TOKEN_EXPIRE",
    "INVALID_TOKEN", "Unauthorized", "Forbidden", "MalformedToken",
    "hash_password", "verify_password", "needs_rehash", "dummy_verify", "set_scrypt_cost",
    "new_token", "token_hash", "validate_scopes", "scope_allows", "normalise_path",
    "Authority",
]

log = logging.getLogger(__name__)

#: Longest accepted password, in UTF-8 bytes.
PASSWORD_MAX = 1024
#: Prefix of every token string; the version digit leaves room for another format later.
TOKEN_PREFIX = "ut1_"
#: Longest scope glob, in characters, and most globs per user or token.
SCOPE_MAX_LEN = 128
SCOPES_MAX = 32
#: Default token lifetime: one week.
DEFAULT_TOKEN_EXPIRE = 7 * 86400.0

_SCRYPT_R = 8
_SCRYPT_P = 1
_SALT_LEN = 16
_KEY_LEN = 32
_TOKEN_BYTES = 32
_TOKEN_B64_LEN = 43  # len(urlsafe_b64encode(32 bytes)) without the "=" padding
_DEFAULT_LOG2_N = 15
# Refuse to run a stored hash asking for absurd work (a corrupted or hostile row must not be
# able to make every login allocate gigabytes).
_MAX_LOG2_N = 22
_MAX_R = 32
_MAX_P = 16
_MAX_MEMORY = 1 << 30

_SCOPE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-./*?")
_TOKEN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")

_INVALID_CREDENTIALS = "invalid user name or password"
INVALID_TOKEN = "invalid or expired token"


# --------------------------------------------------------------------------- exceptions

class AuthError(NodeError):
    """Base of the token and password checks' refusals."""


class Unauthorized(AuthError):
    """Credentials or token are not acceptable.

    Deliberately one exception with one message per kind of check, whatever the reason
    (unknown, wrong, expired, revoked, someone else's), so that answers leak nothing; the
    precise reason is only logged at debug level.
    """

    status = Status.UNAUTHORIZED


class Forbidden(AuthError):
    """The caller is authenticated, but its token or guest scopes do not cover the service."""

    status = Status.FORBIDDEN


class MalformedToken(ValueError):
    """A string that cannot be a token at all (wrong prefix, length or alphabet).

    :func:`token_hash` raises it rather than returning None so that a bad token can never be
    looked up by accident; :class:`Authority` turns it into :class:`Unauthorized`.
    """


# --------------------------------------------------------------------------- password hashing

_log2_n = _DEFAULT_LOG2_N
_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()
_semaphores: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Semaphore] = (
    weakref.WeakKeyDictionary()
)
_HASH_CONCURRENCY = 2


def set_scrypt_cost(log2_n: int) -> None:
    """Set the scrypt cost for new hashes (N = 2**log2_n; default 15).

    Tests lower it to 10 to stay fast.  Existing hashes keep verifying with the parameters
    stored beside them.
    """
    global _log2_n
    if isinstance(log2_n, bool) or not isinstance(log2_n, int) or not 1 <= log2_n <= _MAX_LOG2_N:
        raise ValueError(f"scrypt log2(N) must be an int in 1..{_MAX_LOG2_N}")
    _log2_n = log2_n


def _get_executor() -> ThreadPoolExecutor:
    # Created on first use so that merely importing this module starts no threads.
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(
                max_workers=_HASH_CONCURRENCY, thread_name_prefix="utesla-scrypt"
            )
        return _executor


def _get_semaphore() -> asyncio.Semaphore:
    """The hashing semaphore of the running loop.

    An asyncio primitive belongs to one loop, and test suites (or a CLI calling
    ``asyncio.run`` twice) use several; one semaphore per loop, forgotten with its loop.
    """
    loop = asyncio.get_running_loop()
    with _executor_lock:
        sem = _semaphores.get(loop)
        if sem is None:
            sem = _semaphores[loop] = asyncio.Semaphore(_HASH_CONCURRENCY)
        return sem


async def _run_scrypt(
    password: bytes, salt: bytes, log2_n: int, r: int, p: int, key_len: int
) -> bytes:
    async with _get_semaphore():
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            _get_executor(), lambda: _scrypt(password, salt, key_len, N=1 << log2_n, r=r, p=p)
        )


def _password_bytes(password: str) -> bytes:
    if not isinstance(password, str):
        raise TypeError("password must be a str")
    data = password.encode("utf-8")
    if len(data) > PASSWORD_MAX:
        raise ValueError(f"password is longer than {PASSWORD_MAX} bytes")
    return data


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii").rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)


class _Params(NamedTuple):
    log2_n: int
    r: int
    p: int
    salt: bytes
    key: bytes


def _parse_hash(stored: str) -> _Params | None:
    """Split a stored hash into its parts; None if it is not one this code can verify."""
    if not isinstance(stored, str):
        return None
    fields = stored.split("$")
    if len(fields) != 6 or fields[0] != "scrypt":
        return None
    try:
        values: dict[str, int] = {}
        for field_ in fields[1:4]:
            name, _, number = field_.partition("=")
            if not number.isdigit() or len(number) > 3:
                return None
            values[name] = int(number)
        params = _Params(
            values["ln"], values["r"], values["p"], _unb64(fields[4]), _unb64(fields[5])
        )
    except (KeyError, ValueError, binascii.Error):
        return None
    if not 1 <= params.log2_n <= _MAX_LOG2_N:
        return None
    if not (1 <= params.r <= _MAX_R and 1 <= params.p <= _MAX_P):
        return None
    if 128 * params.r * (1 << params.log2_n) > _MAX_MEMORY:
        return None
    if len(params.salt) < 8 or not 16 <= len(params.key) <= 64:
        return None  # nothing hash_password ever wrote: a damaged or forged row
    return params


async def hash_password(password: str) -> str:
    """Hash ``password`` with a fresh salt at the current cost; the result embeds the params.

    Raises ``ValueError`` if the password exceeds :data:`PASSWORD_MAX` bytes.  The password is
    used exactly as given (no Unicode normalisation), so it must be typed the same way.
    """
    data = _password_bytes(password)
    salt = secrets.token_bytes(_SALT_LEN)
    log2_n = _log2_n
    key = await _run_scrypt(data, salt, log2_n, _SCRYPT_R, _SCRYPT_P, _KEY_LEN)
    return f"scrypt$ln={log2_n}$r={_SCRYPT_R}$p={_SCRYPT_P}${_b64(salt)}${_b64(key)}"


async def verify_password(password: str, stored: str) -> bool:
    """Whether ``password`` matches ``stored`` (constant-time comparison of the derived keys).

    A stored value this code cannot parse, or whose parameters are out of bounds, never
    matches (and is logged): refusing a login is the safe outcome of a damaged row.  Raises
    ``ValueError`` for an over-long password.
    """
    data = _password_bytes(password)
    params = _parse_hash(stored)
    if params is None:
        log.warning("unusable password hash in storage (not scrypt$ln=..$r=..$p=..$salt$key)")
        return False
    key = await _run_scrypt(data, params.salt, params.log2_n, params.r, params.p, len(params.key))
    return hmac.compare_digest(key, params.key)


def needs_rehash(stored: str) -> bool:
    """True if ``stored`` is weaker than what :func:`hash_password` produces now (or unusable).

    Rehashing means storing a new hash, which revokes the user's tokens, so it belongs to
    moments like a password change, not to every login.
    """
    params = _parse_hash(stored)
    if params is None:
        return True
    return (
        params.log2_n < _log2_n or params.r < _SCRYPT_R or params.p < _SCRYPT_P
        or len(params.salt) < _SALT_LEN or len(params.key) < _KEY_LEN
    )


_DUMMY_SALT = b"utesla-dummy-slt"  # 16 bytes; what matters is the work, not the value


async def dummy_verify(password: str) -> None:
    """Spend the time of a real verification, for users that do not exist.

    Runs scrypt at the current cost, through the same executor and semaphore as real checks,
    so "unknown user" and "wrong password" are indistinguishable by timing and by load.
    Over-long passwords are truncated rather than refused: the caller fails the login anyway.
    """
    data = password.encode("utf-8", "replace")[:PASSWORD_MAX] if isinstance(password, str) else b""
    await _run_scrypt(data, _DUMMY_SALT, _log2_n, _SCRYPT_R, _SCRYPT_P, _KEY_LEN)


# --------------------------------------------------------------------------- tokens

def new_token() -> str:
    """A fresh token string: ``ut1_`` + 43 URL-safe base64 characters (32 random bytes)."""
    raw = secrets.token_bytes(_TOKEN_BYTES)
    return TOKEN_PREFIX + base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def _token_bytes(token: str) -> bytes:
    if not isinstance(token, str) or len(token) != len(TOKEN_PREFIX) + _TOKEN_B64_LEN:
        raise MalformedToken("malformed token")
    if not token.startswith(TOKEN_PREFIX):
        raise MalformedToken("malformed token")
    body = token[len(TOKEN_PREFIX):]
    if not set(body) <= _TOKEN_CHARS:
        raise MalformedToken("malformed token")
    raw = base64.urlsafe_b64decode(body + "=")
    # Base64 ignores the low bits of the last character, so several strings decode to the same
    # bytes; accept only the canonical one, making the string <-> token mapping one-to-one.
    if base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=") != body:
        raise MalformedToken("malformed token")
    return raw


def token_hash(token: str) -> bytes:
    """The 32-byte SHA-256 under which ``token`` is stored.

    Raises :class:`MalformedToken` (a ``ValueError``) for anything :func:`new_token` could not
    have produced, so garbage never reaches the database.
    """
    return hashlib.sha256(_token_bytes(token)).digest()


# --------------------------------------------------------------------------- scopes

def validate_scopes(scopes: Iterable[str]) -> tuple[str, ...]:
    """Check scope globs and return them normalised (leading ``/`` removed, duplicates dropped).

    Allowed characters: ASCII letters, digits and ``_-./*?``; at most :data:`SCOPE_MAX_LEN`
    characters each and :data:`SCOPES_MAX` globs.  Anything regex-like (``^$|()[]{}+\\``)
    is refused with ``ValueError``.  An empty tuple is valid: it allows nothing.
    """
    if isinstance(scopes, str):
        raise TypeError("scopes must be a sequence of globs, not one str")
    result: list[str] = []
    for scope in scopes:
        if not isinstance(scope, str):
            raise TypeError("each scope must be a str")
        if len(scope) > SCOPE_MAX_LEN:
            raise ValueError(f"scope {scope[:20]!r}... is longer than {SCOPE_MAX_LEN} characters")
        bad = sorted(set(scope) - _SCOPE_CHARS)
        if bad:
            raise ValueError(
                f"scope {scope!r} contains {''.join(bad)!r}; scopes are globs of letters, "
                "digits and _-./*? (not regular expressions)"
            )
        glob = _normalise_glob(scope)
        if not glob:
            raise ValueError(f"scope {scope!r} is empty")
        if glob not in result:
            result.append(glob)
    if len(result) > SCOPES_MAX:
        raise ValueError(f"at most {SCOPES_MAX} scopes are allowed")
    return tuple(result)


def _normalise_glob(glob: str) -> str:
    """``/svc//sub/`` -> ``svc/sub``: globs are compared with normalised paths."""
    return "/".join(segment for segment in glob.split("/") if segment)


def normalise_path(service_path: str) -> str | None:
    """``/svc//sub/./x/`` -> ``svc/sub/x``; None for a path that climbs (``..``).

    Scopes are matched on this form so that spelling variants of one path cannot slip past a
    glob, and ``svc/../admin`` can never match ``svc``.
    """
    segments = []
    for segment in service_path.split("/"):
        if segment in ("", "."):
            continue
        if segment == "..":
            return None
        segments.append(segment)
    return "/".join(segments)


def scope_allows(scopes: tuple[str, ...], service_path: str) -> bool:
    """Whether any glob in ``scopes`` allows ``service_path``.

    ``svc`` allows ``svc`` and everything under ``svc/``; ``hello*`` allows ``hello_world``
    and its sub-paths; ``*`` allows everything.  Matching is case-sensitive (``fnmatchcase``)
    because service names are.
    """
    path = normalise_path(service_path) if isinstance(service_path, str) else None
    if path is None:
        return False
    for glob in scopes:
        glob = _normalise_glob(glob)
        if not glob:
            continue
        if glob == "*" or fnmatchcase(path, glob) or fnmatchcase(path, glob + "/*"):
            return True
    return False


def _covered(requested: str, allowed: tuple[str, ...]) -> bool:
    """Conservatively, whether every path ``requested`` matches is matched by ``allowed``.

    Deciding glob inclusion in general is hard; we accept the cases that are certainly safe:
    an identical glob, an allowed ``*``, or a wildcard-free request the allowed globs cover.
    """
    if "*" in allowed or requested in allowed:
        return True
    if "*" not in requested and "?" not in requested:
        return scope_allows(allowed, requested)
    return False


# --------------------------------------------------------------------------- the authority

class Authority:
    """Issues and checks tokens and passwords against a :class:`Storage`.

    ``clock`` returns the current time in epoch seconds; tests pass a fake one.  Storage errors
    (notably :class:`~utesla_node.storage.StorageUnavailable`) propagate unchanged so the
    caller answers "unavailable" rather than "unauthorized".
    """

    def __init__(
        self,
        storage: Storage,
        token_expire: float = DEFAULT_TOKEN_EXPIRE,
        clock: Callable[[], float] = time.time,
    ):
        self.storage = storage
        self.token_expire = self._check_lifetime(token_expire)
        self.clock = clock

    @staticmethod
    def _check_lifetime(seconds: float) -> float:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise TypeError("token lifetime must be a number of seconds")
        if not (math.isfinite(seconds) and seconds > 0):
            raise ValueError("token lifetime must be a positive, finite number of seconds")
        return float(seconds)

    async def check_password(self, user_name: str, password: str) -> User:
        """The user, if ``password`` is theirs; otherwise :class:`Unauthorized`.

        Unknown users cost one scrypt run as well, and every failure carries the same message.
        """
        try:
            _password_bytes(password)
        except (TypeError, ValueError):
            log.debug("password check failed for %r: over-long or not text", user_name)
            raise Unauthorized(_INVALID_CREDENTIALS) from None
        user = await self.storage.get_user(user_name)
        if user is None:
            await dummy_verify(password)
            log.debug("password check failed: no user %r", user_name)
            raise Unauthorized(_INVALID_CREDENTIALS)
        if not await verify_password(password, user.password_hash):
            log.debug("password check failed: wrong password for %r", user_name)
            raise Unauthorized(_INVALID_CREDENTIALS)
        return user

    async def issue_token(
        self,
        user_name: str,
        scopes: Iterable[str] | None = None,
        expire: float | None = None,
    ) -> tuple[str, Token]:
        """Create a token for ``user_name`` (already authenticated by the caller).

        ``scopes`` default to the user's own for guests and to ``("*",)`` otherwise.  A guest's
        requested scopes are intersected with its own: globs it may not have are dropped, and
        :class:`Forbidden` is raised if none remain.  ``expire`` may shorten the lifetime
        (seconds); it never exceeds the configured ``token_expire``.

        Raises :class:`~utesla_node.storage.TokenLimitReached` when the user already holds
        ``token_limit`` live tokens, ``ValueError`` for bad scopes or lifetimes, and
        :class:`Unauthorized` if the user no longer exists.
        """
        lifetime = self.token_expire
        if expire is not None:
            lifetime = min(lifetime, self._check_lifetime(expire))
        user = await self.storage.get_user(user_name)
        if user is None:
            raise Unauthorized(_INVALID_CREDENTIALS)
        if scopes is None:
            granted = user.scopes if user.guest else ("*",)
        else:
            granted = validate_scopes(scopes)
            if not granted:
                raise ValueError("a token needs at least one scope")
            if user.guest:
                wanted = granted
                granted = tuple(s for s in wanted if _covered(s, user.scopes))
                if wanted and not granted:
                    raise Forbidden("none of the requested scopes is within the user's scopes")
        now = self.clock()
        token = new_token()
        record = Token(
            token_hash=token_hash(token), user=user.name, created_at=now,
            expires_at=now + lifetime, scopes=granted, revoked=False,
        )
        await self.storage.add_token(record, limit=user.token_limit, now=now)
        return token, record

    async def _live_token(self, token: str, session_user: str) -> Token:
        """The stored, live token ``token`` of ``session_user``, or :class:`Unauthorized`."""
        if not token:
            log.debug("token check failed: no token")
            raise Unauthorized(INVALID_TOKEN)
        try:
            digest = token_hash(token)
        except MalformedToken:
            log.debug("token check failed: malformed token")
            raise Unauthorized(INVALID_TOKEN) from None
        record = await self.storage.get_token(digest)
        if record is None:
            log.debug("token check failed: unknown token")
            raise Unauthorized(INVALID_TOKEN)
        if record.user != session_user:
            # Tokens are bound to the key that authenticated the session: a stolen token is
            # useless without its owner's private key.
            log.warning("token of user %r presented on a session of %r", record.user, session_user)
            raise Unauthorized(INVALID_TOKEN)
        if record.revoked:
            log.debug("token check failed: revoked token of %r", record.user)
            raise Unauthorized(INVALID_TOKEN)
        if self.clock() >= record.expires_at:
            log.debug("token check failed: expired token of %r", record.user)
            try:
                await self.storage.delete_token(digest)
            except StorageError as exc:  # clean-up is best effort; the answer stands
                log.debug("could not delete expired token: %s", exc)
            raise Unauthorized(INVALID_TOKEN)
        return record

    async def check_token(self, token: str, session_user: str, service_path: str) -> User:
        """The user ``token`` lets ``session_user`` act as for ``service_path``.

        :class:`Unauthorized` for a missing, malformed, unknown, expired, revoked or foreign
        token (one message for all); :class:`Forbidden` when the token's scopes, or the
        user's own scopes (``*`` unless the admin limited them), do not allow the path.
        """
        record, user = await self.resolve(token, session_user)
        self.allow(record, user, service_path)
        return user

    async def resolve(self, token: str, session_user: str) -> tuple[Token, User]:
        """The live token record and its user (the storage part of :meth:`check_token`);
        :class:`Unauthorized` as there.  What it returns may be cached for a short while:
        the decision for each path is :meth:`allow`'s, made every time."""
        record = await self._live_token(token, session_user)
        user = await self.storage.get_user(record.user)
        if user is None:
            raise Unauthorized(INVALID_TOKEN)
        return record, user

    @staticmethod
    def allow(record: Token, user: User, service_path: str) -> None:
        """:class:`Forbidden` unless both the token's scopes and the user's own (``*`` for
        ordinary users) allow ``service_path``.  Pure; no storage."""
        if not scope_allows(record.scopes, service_path):
            raise Forbidden(f"token does not allow {service_path!r}")
        if not scope_allows(user.scopes, service_path):
            raise Forbidden(f"user {user.name!r} may not use {service_path!r}")

    async def renew(self, token: str, session_user: str) -> Token:
        """Issue a live token of ``session_user`` again: valid from now for its lifetime.

        That is ``token_expire`` seconds for a token issued with the full lifetime, and never
        more than the token was issued for: renewing needs only the token and the key, so it
        must not turn a token asked for with a short ``expire`` into a long one.  The lifetime
        is ``expires_at - created_at``, so the renewal moves ``created_at`` to now as well
        (otherwise each renewal would lengthen the next).
        """
        record = await self._live_token(token, session_user)
        lifetime = min(self.token_expire, record.expires_at - record.created_at)
        now = self.clock()
        expires_at = now + lifetime
        if not await self.storage.renew_token(record.token_hash, expires_at, issued_at=now):
            raise Unauthorized(INVALID_TOKEN)  # revoked or deleted meanwhile
        return replace(record, created_at=now, expires_at=expires_at)

    async def revoke(self, token: str, session_user: str) -> bool:
        """Revoke a token of ``session_user``.

        True if this call revoked it; False if it was already revoked or expired (nothing left
        to do).  :class:`Unauthorized` if it is malformed, unknown or someone else's.
        """
        if not token:
            raise Unauthorized(INVALID_TOKEN)
        try:
            digest = token_hash(token)
        except MalformedToken:
            raise Unauthorized(INVALID_TOKEN) from None
        record = await self.storage.get_token(digest)
        if record is None or record.user != session_user:
            raise Unauthorized(INVALID_TOKEN)
        if not record.is_live(self.clock()):
            return False
        return await self.storage.revoke_token(digest)
