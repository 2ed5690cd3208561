"""The gate: who a connection is and what a request may reach.

One object answers the two questions every request asks, with caches in front of
the database so that steady traffic costs no database round trip:

- :meth:`Gate.user_key`: the registered key of a user name (the handshake's lookup);
- :meth:`Gate.authorize`: the user a request acts as, given its token and path
  (``authorize_now``: the same, answered from the cache only, for callers that
  cannot wait).

What is cached is a token's record and user, never a decision: scopes are checked
against each request's own path (a token for ``files/public`` must not open
``files/private`` because it was just used for the former).  Entries live
``cache_ttl`` seconds; a revocation made elsewhere (utesla-cli, another node sharing
the database) takes effect within that time, one made here (``forget_token``) at once.

While the database is unreachable, an entry verified less than ``cache_ttl +
outage_grace`` seconds ago keeps answering (SPEC.md and docs/security.md state the
trade-off: a revocation made elsewhere during the outage is seen when the database
returns).  Entries never outlive their token's own expiry.
"""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from protocol.crypto import KeyFormatError, PublicKey
from protocol.errors import Unavailable

from . import auth
from .metrics import Metrics
from .storage import Storage, StorageUnavailable, Token, User

__all__ = ["Gate"]

log = logging.getLogger("utesla.node")
#: Entries kept at most, per cache (cleared whole when full: a flood of made-up names
#: must not grow memory, and the next lookups simply go to the database).
CACHE_MAX = 8192


class _Entry:
    """A cached token check: ``found`` (record, user, unrestricted) once resolved;
    ``pending`` while a lookup runs (concurrent requests wait for that one)."""

    __slots__ = ("fresh_until", "verified_at", "found", "pending")

    def __init__(self, fresh_until: float, verified_at: float, found, pending):
        self.fresh_until = fresh_until
        self.verified_at = verified_at
        self.found = found
        self.pending = pending


class Gate:
    """User keys and token checks with caches (see the module docstring)."""

    def __init__(self, storage: Storage, authority: auth.Authority, metrics: Metrics, *,
                 cache_ttl: float, outage_grace: float = 0.0,
                 clock: Callable[[], float] = time.monotonic):
        self.storage = storage
        self.authority = authority
        self.metrics = metrics
        self.cache_ttl = cache_ttl
        self.outage_grace = outage_grace
        self.clock = clock
        self._keys_by_pem: dict[str, PublicKey] = {}
        self._user_keys: dict[str, tuple[float, float, PublicKey]] = {}
        self._tokens: dict[tuple, _Entry] = {}

    # -------------------------------------------------------------- user keys

    async def user_key(self, name: str) -> PublicKey | None:
        """The registered key of ``name`` (None when unknown); 503 when storage is down
        and no recent answer is at hand.  Unknown names are never cached."""
        now = self.clock()
        hit = self._user_keys.get(name)
        if hit is not None and hit[0] > now:
            return hit[2]
        try:
            user = await self.storage.get_user(name)
        except StorageUnavailable as exc:
            if hit is not None and now < hit[1] + self.cache_ttl + self.outage_grace:
                log.warning("database unavailable during handshake (%s): using the key of "
                            "%r verified %.0f s ago", exc, name, now - hit[1])
                return hit[2]
            log.warning("database unavailable during handshake: %s", exc)
            raise Unavailable("database unavailable") from exc
        if user is None:
            self._user_keys.pop(name, None)
            return None
        key = self._keys_by_pem.get(user.public_key)
        if key is None:
            try:
                key = PublicKey.from_bytes(user.public_key)
            except KeyFormatError:
                log.error("user %r has an unusable public key in the database", name)
                return None
            if len(self._keys_by_pem) >= CACHE_MAX:
                self._keys_by_pem.clear()
            self._keys_by_pem[user.public_key] = key
        if len(self._user_keys) >= CACHE_MAX:
            self._user_keys.clear()
        self._user_keys[name] = (now + self.cache_ttl, now, key)
        return key

    def forget_user(self, name: str) -> None:
        """Drop what is cached about ``name`` (its key was changed or it was removed here)."""
        self._user_keys.pop(name, None)
        for key in [k for k in self._tokens if k[1] == name]:
            del self._tokens[key]

    # -------------------------------------------------------------- tokens

    async def authorize(self, peer_user: str | None, token: str | None,
                        service_path: str) -> User:
        """The user a request on ``peer_user``'s session acts as; Unauthorized (401),
        Forbidden (403) or Unavailable (503) otherwise."""
        # The session's user is part of the key: a token is only ever valid on its
        # owner's sessions (§6.6), so sharing the cache across connections is safe.
        key = (token, peer_user)
        found = self._fresh(key)
        if found is None:
            entry = self._tokens.get(key)
            if entry is not None and entry.pending is not None:
                found = await asyncio.shield(entry.pending)     # a check is running
            else:
                found = await self._resolve(key, token, peer_user, entry)
        return self._allow(found, service_path)

    def authorize_now(self, peer_user: str | None, token: str | None,
                      service_path: str) -> User | None:
        """The user, when a fresh cached check of ``token`` allows ``service_path``;
        None when that takes a lookup or the answer is no (``authorize`` says why)."""
        found = self._fresh((token, peer_user))
        if found is None:
            return None
        try:
            return self._allow(found, service_path)
        except auth.Forbidden:
            return None

    def forget_token(self, token: str | None) -> None:
        """Drop cached checks of ``token`` (after it was renewed or revoked here)."""
        for key in [k for k in self._tokens if k[0] == token]:
            del self._tokens[key]

    @staticmethod
    def _allow(found: tuple, service_path: str) -> User:
        record, user, unrestricted = found
        if not unrestricted:
            auth.Authority.allow(record, user, service_path)     # auth.Forbidden: 403
        return user

    def _fresh(self, key: tuple):
        """(record, user, unrestricted) of a fresh, finished entry whose token has not
        expired meanwhile; None otherwise."""
        entry = self._tokens.get(key)
        if entry is None or entry.pending is not None or entry.fresh_until <= self.clock():
            return None
        if entry.found[0].expires_at <= self.authority.clock():
            return None
        return entry.found

    async def _resolve(self, key: tuple, token: str | None, peer_user: str | None,
                       stale: _Entry | None) -> tuple:
        cache = self._tokens
        now = self.clock()
        pending = asyncio.get_running_loop().create_future()
        if len(cache) >= CACHE_MAX:
            cache.clear()
        entry = _Entry(0.0, stale.verified_at if stale else 0.0,
                       stale.found if stale else None, pending)
        cache[key] = entry
        try:
            record, user = await self.authority.resolve(token or "", peer_user or "")
        except BaseException as exc:
            mine = cache.get(key) is entry
            if mine:
                del cache[key]
            found = None
            if isinstance(exc, StorageUnavailable):
                found = self._grace(entry, now, exc)
                if found is not None and mine:
                    # Fresh again for one more period (the database is asked again at
                    # most once per token_cache_ttl), never past the grace's end.
                    until = min(now + self.cache_ttl,
                                entry.verified_at + self.cache_ttl + self.outage_grace)
                    cache[key] = _Entry(until, entry.verified_at, found, None)
            if found is None:
                if isinstance(exc, auth.Unauthorized):
                    self.metrics.incr("auth_failures")
                pending.set_exception(exc)
                pending.exception()         # retrieved: waiters, if any, re-raise it
                raise
            pending.set_result(found)
            return found
        found = (record, user, record.scopes == ("*",) and user.scopes == ("*",))
        if cache.get(key) is entry:
            # Unless forget_token() dropped the entry meanwhile (the token was revoked or
            # renewed here while we read it): then what we read must not outlive this request.
            cache[key] = _Entry(now + self.cache_ttl, now, found, None)
        pending.set_result(found)
        return found

    def _grace(self, entry: _Entry, now: float, exc: BaseException):
        """The last verified answer while the database is down, if recent enough."""
        found = entry.found
        if found is None or now >= entry.verified_at + self.cache_ttl + self.outage_grace:
            return None
        if found[0].expires_at <= self.authority.clock():
            return None
        log.warning("database unavailable (%s): token of %r verified %.0f s ago still "
                    "accepted (outage grace %g s)", exc, found[1].name,
                    now - entry.verified_at, self.outage_grace)
        return found
