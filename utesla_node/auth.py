"""Passwords, access tokens and scopes: the node's authorisation logic.

No SQL and no sockets here: persistence goes through :class:`utesla_node.storage.Storage`, and
the caller supplies the identity the handshake authenticated.  What this module guarantees:

* **Passwords** are hashed with scrypt (N=2**15, r=8, p=1, 16-byte salt, 32-byte key) and stored
  as ``scrypt$ln=15$r=8$p=1$<salt b64>$<key b64>``, so the cost can be raised later without
  breaking existing hashes (:func:`needs_rehash` tells which ones are below the current cost).
  scrypt is deliberately slow, so it always runs on a small thread pool, two runs at a time:
  a burst of logins queues up instead of freezing the event loop or eating memory (each scrypt
  call needs 128 * r * N bytes = 32 MiB).  The queue is fair across users: a free slot goes to
  the waiting user with the fewest runs going, round-robin among equals, so one user's flood
  delays another's login by about one scrypt run, not by the length of the flood.
* **Password attempts are limited** per user and per source address
  (:class:`~utesla_node.ratelimit.AttemptLimiter`): after too many failures the user or the
  address is refused at once, with :class:`TooManyAttempts` (status 429) saying when to try
  again, for a backoff that doubles with each lockout; a success forgets the user's failures.
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
import collections
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

from protocol.errors import Status, StatusError

from .config import NodeConfig
from .errors import NodeError
from .ratelimit import AttemptLimiter, Backoff
from .storage import Storage, StorageError, Token, User

__all__ = [
    "PASSWORD_MAX", "TOKEN_PREFIX", "SCOPE_MAX_LEN", "SCOPES_MAX", "DEFAULT_TOKEN_EXPIRE",
    "INVALID_TOKEN", "Unauthorized", "Forbidden", "MalformedToken", "TooManyAttempts",
    "hash_password", "verify_password", "needs_rehash", "dummy_verify", "set_scrypt_cost",
    "new_token", "token_hash", "validate_scopes", "scope_allows", "normalise_path",
    "Authority", "password_limiter",
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


class TooManyAttempts(StatusError):
    """Password attempts refused at once: the user or the address is locked out for a while.

    Status 429 (HTTP's Too Many Requests); ``retry_after`` is the whole number of seconds to
    wait, also given in the message, since an error response carries no headers.  A
    :class:`~protocol.errors.StatusError` so that it reaches the client as it is.
    """

    status = 429

    def __init__(self, kind: str, retry_after: float):
        self.kind = kind
        self.retry_after = max(1, math.ceil(retry_after))
        who = "for this user" if kind == "user" else "from this address"
        super().__init__(f"too many failed password attempts {who}: "
                         f"try again in {self.retry_after} s")


class MalformedToken(ValueError):
    """A string that cannot be a token at all (wrong prefix, length or alphabet).

    :func:`token_hash` raises it rather than returning None so that a bad token can never be
    looked up by accident; :class:`Authority` turns it into :class:`Unauthorized`.
    """


# --------------------------------------------------------------------------- password hashing

_log2_n = _DEFAULT_LOG2_N
_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()
_pools: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _FairPool] = (
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


class _FairPool:
    """``slots`` scrypt runs at a time, shared fairly between owners (users).

    Each owner has its own queue.  A free slot goes to the waiting owner with the fewest runs
    going, the longest-waiting of those first (round-robin: an owner served goes to the back).
    So a user arriving behind another's flood of 64 attempts gets the next free slot, not the
    65th.  A slot is held until the scrypt call itself returns, even if the caller gave up
    meanwhile: the thread keeps computing, and releasing early would let more runs pile up in
    the executor's own first-come queue than there are threads.

    One per event loop (asyncio futures belong to one loop), forgotten with its loop.
    """

    def __init__(self, slots: int):
        self.slots = slots
        self.busy = 0
        self.running: collections.Counter[str] = collections.Counter()
        # Insertion order is the round-robin order.
        self.waiting: dict[str, collections.deque[asyncio.Future]] = {}
        #: Runs granted so far (tests and benchmarks read it).
        self.started = 0

    def queued(self, owner: str | None = None) -> int:
        """Runs waiting for a slot: ``owner``'s, or everyone's."""
        if owner is not None:
            return len(self.waiting.get(owner, ()))
        return sum(len(q) for q in self.waiting.values())

    async def acquire(self, owner: str) -> None:
        fut = asyncio.get_running_loop().create_future()
        self.waiting.setdefault(owner, collections.deque()).append(fut)
        self._pump()
        try:
            await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():
                self.release(owner)          # granted, but its caller is gone
            else:
                queue = self.waiting.get(owner)
                if queue is not None and fut in queue:
                    queue.remove(fut)
                    if not queue:
                        del self.waiting[owner]
            raise

    def release(self, owner: str) -> None:
        self.busy -= 1
        self.running[owner] -= 1
        if self.running[owner] <= 0:
            del self.running[owner]
        self._pump()

    def _pump(self) -> None:
        while self.busy < self.slots and self.waiting:
            # min() keeps the first of equals, in round-robin order.
            owner = min(self.waiting, key=self.running.__getitem__)
            queue = self.waiting.pop(owner)
            fut = queue.popleft()
            if queue:
                self.waiting[owner] = queue  # to the back of the round
            self.busy += 1
            self.running[owner] += 1
            self.started += 1
            fut.set_result(None)


def _get_pool() -> _FairPool:
    """The scrypt pool of the running loop."""
    loop = asyncio.get_running_loop()
    with _executor_lock:
        pool = _pools.get(loop)
        if pool is None:
            pool = _pools[loop] = _FairPool(_HASH_CONCURRENCY)
        return pool


def _release_soon(loop: asyncio.AbstractEventLoop, pool: _FairPool, owner: str) -> None:
    """Give the slot back on the pool's loop (called from the scrypt thread)."""
    try:
        loop.call_soon_threadsafe(pool.release, owner)
    except RuntimeError:  # the loop is closed: so is its pool
        pass


async def _run_scrypt(
    password: bytes, salt: bytes, log2_n: int, r: int, p: int, key_len: int, owner: str = ""
) -> bytes:
    pool = _get_pool()
    await pool.acquire(owner)
    loop = asyncio.get_running_loop()
    try:
        job = _get_executor().submit(_scrypt, password, salt, key_len, N=1 << log2_n, r=r, p=p)
    except BaseException:
        pool.release(owner)
        raise
    job.add_done_callback(lambda _: _release_soon(loop, pool, owner))
    return await asyncio.wrap_future(job)


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


async def verify_password(password: str, stored: str, *, owner: str = "") -> bool:
    """Whether ``password`` matches ``stored`` (constant-time comparison of the derived keys).

    A stored value this code cannot parse, or whose parameters are out of bounds, never
    matches (and is logged): refusing a login is the safe outcome of a damaged row.  Raises
    ``ValueError`` for an over-long password.  ``owner`` (the user name) is whose queue the
    scrypt run waits in: the pool is shared fairly between owners.
    """
    data = _password_bytes(password)
    params = _parse_hash(stored)
    if params is None:
        log.warning("unusable password hash in storage (not scrypt$ln=..$r=..$p=..$salt$key)")
        return False
    key = await _run_scrypt(data, params.salt, params.log2_n, params.r, params.p, len(params.key),
                            owner)
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


async def dummy_verify(password: str, *, owner: str = "") -> None:
    """Spend the time of a real verification, for users that do not exist.

    Runs scrypt at the current cost, through the same executor and fair queue (as ``owner``)
    as real checks, so "unknown user" and "wrong password" are indistinguishable by timing and
    by load.
    Over-long passwords are truncated rather than refused: the caller fails the login anyway.
    """
    data = password.encode("utf-8", "replace")[:PASSWORD_MAX] if isinstance(password, str) else b""
    await _run_scrypt(data, _DUMMY_SALT, _log2_n, _SCRYPT_R, _SCRYPT_P, _KEY_LEN, owner)


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

def password_limiter(config: NodeConfig | None = None,
                     clock: Callable[[], float] = time.monotonic) -> AttemptLimiter:
    """The password limiter configured by ``config`` (None: the defaults).

    Per user, ``max_password_failures`` failures within ``password_failure_window`` seconds
    lock the user out; per source address, ``max_password_failures_per_ip`` do.  Lockouts
    start at ``password_backoff`` seconds and double up to ``password_backoff_max``.
    """
    cfg = config if config is not None else NodeConfig()
    window, first, most = cfg.password_failure_window, cfg.password_backoff, \
        cfg.password_backoff_max
    return AttemptLimiter(
        Backoff(cfg.max_password_failures, window, first, most, clock=clock),
        Backoff(cfg.max_password_failures_per_ip, window, first, most, clock=clock))


class Authority:
    """Issues and checks tokens and passwords against a :class:`Storage`.

    ``clock`` returns the current time in epoch seconds; tests pass a fake one.  Storage errors
    (notably :class:`~utesla_node.storage.StorageUnavailable`) propagate unchanged so the
    caller answers "unavailable" rather than "unauthorized".  ``limiter`` limits password
    attempts (:func:`password_limiter`, with the default limits, when not given); its
    ``refused`` counts and ``on_refused`` hook are there for the metrics.
    """

    def __init__(
        self,
        storage: Storage,
        token_expire: float = DEFAULT_TOKEN_EXPIRE,
        clock: Callable[[], float] = time.time,
        limiter: AttemptLimiter | None = None,
    ):
        self.storage = storage
        self.token_expire = self._check_lifetime(token_expire)
        self.clock = clock
        self.limiter = limiter if limiter is not None else password_limiter()
        # Attempts waiting for one in flight of the same user or address to end.
        self._waiters: dict[tuple[str, str], list[asyncio.Future]] = {}

    @classmethod
    def from_config(cls, storage: Storage, config: NodeConfig) -> Authority:
        """The node's authority: token lifetime and password limits from ``config``."""
        return cls(storage, config.token_expire, limiter=password_limiter(config))

    @staticmethod
    def _check_lifetime(seconds: float) -> float:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise TypeError("token lifetime must be a number of seconds")
        if not (math.isfinite(seconds) and seconds > 0):
            raise ValueError("token lifetime must be a positive, finite number of seconds")
        return float(seconds)

    async def check_password(self, user_name: str, password: str,
                             source: str | None = None) -> User:
        """The user, if ``password`` is theirs; otherwise :class:`Unauthorized`.

        Unknown users cost one scrypt run as well, and every failure carries the same message.
        ``source`` is the client's address (``host:port`` as the session names its peer; None:
        not limited per address).  While the user or the address is locked out after too many
        failures, the attempt is refused at once with :class:`TooManyAttempts`, before any
        scrypt run; while its attempts in flight use up what the limit leaves, it waits.
        """
        await self._admit(user_name, source)
        ok = None
        try:
            user = await self._verify(user_name, password)
            ok = True
            return user
        except Unauthorized:
            ok = False
            raise
        finally:
            for key in self.limiter.done(user_name, source, ok):
                for waiter in self._waiters.pop(key, ()):
                    if not waiter.done():
                        waiter.set_result(None)

    async def _admit(self, user_name: str, source: str | None) -> None:
        while True:
            verdict = self.limiter.admit(user_name, source)
            if verdict.action == "go":
                return
            if verdict.action == "refuse":
                log.debug("password attempt of %r refused: %s locked out", user_name,
                          verdict.key[0])
                raise TooManyAttempts(verdict.key[0], verdict.retry_after)
            # Attempts in flight hold what is left of the limit: wait for one to end (its
            # outcome decides whether this one may go, or is refused).
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.setdefault(verdict.key, []).append(waiter)
            await waiter

    async def _verify(self, user_name: str, password: str) -> User:
        try:
            _password_bytes(password)
        except (TypeError, ValueError):
            log.debug("password check failed for %r: over-long or not text", user_name)
            raise Unauthorized(_INVALID_CREDENTIALS) from None
        user = await self.storage.get_user(user_name)
        if user is None:
            await dummy_verify(password, owner=user_name)
            log.debug("password check failed: no user %r", user_name)
            raise Unauthorized(_INVALID_CREDENTIALS)
        if not await verify_password(password, user.password_hash, owner=user_name):
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
