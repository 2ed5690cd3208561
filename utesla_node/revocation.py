"""Ending the sessions of revoked credentials.

A connection is authenticated once, by its handshake, with the key registered for its
user at that moment.  When the admin removes the user (``utesla-cli del``) or gives it a
new key (``set-key``, ``add --overwrite``), the tokens are revoked in the same
transaction, but a session is not a token: without this module it would stay
authenticated until it closes.  OpenSSH and NATS drop such sessions; so does the node.

The change is made by another process (``utesla-cli`` writes the database; with MariaDB
several nodes share it), so the node cannot be told: it looks.  Every ``interval``
seconds the :class:`RevocationWatcher` reads, in one storage call
(:meth:`Storage.user_keys`), the current keys of the users that have open sessions, and
closes each session whose user is gone or whose key is no longer the one it proved,
with ``CLOSE 401 "credentials revoked: user removed"`` (or ``"... key changed"``).
Requests in flight on it end with that status; the client reports it on its next
request.  Node accounts are users like any other: a peer whose account is removed
loses its link the same way, and the forwards it carried are reset.

A password change is not a key change and ends no session (as in OpenSSH): it revokes
the user's tokens, which requests on the session stop passing within
``token_cache_ttl``, and the user may ask for a new token on the same connection with
the new password.

While the database cannot be read the watcher closes nothing (as the gate keeps
answering from its caches for ``token_outage_grace``) and looks again once it can.
"""
from __future__ import annotations

import asyncio
import logging
from typing import Callable, Iterable

from protocol.crypto import KeyFormatError, PublicKey
from protocol.errors import Status

from .metrics import Metrics
from .storage import Storage, StorageUnavailable
from .transport import Session

__all__ = ["RevocationWatcher", "REMOVED", "KEY_CHANGED"]

log = logging.getLogger("utesla.node")

#: The CLOSE reasons a session of revoked credentials gets (status 401).
REMOVED = "credentials revoked: user removed"
KEY_CHANGED = "credentials revoked: key changed"
#: Parsed keys kept, by PEM text (cleared whole when full).
CACHE_MAX = 8192


class RevocationWatcher:
    """Closes the sessions of removed users and of changed keys (see the module docstring).

    ``sessions`` returns the node's current sessions; ``forget_user`` drops what the gate
    caches about a user (its key, its token checks) before that user's sessions close, so
    that a reconnection is judged against the database, not against the cache.
    """

    def __init__(self, storage: Storage, sessions: Callable[[], Iterable[Session]], *,
                 forget_user: Callable[[str], None], interval: float,
                 metrics: Metrics | None = None):
        self.storage = storage
        self.sessions = sessions
        self.forget_user = forget_user
        self.interval = interval
        self.metrics = metrics
        self._der_by_pem: dict[str, bytes | None] = {}
        self._task: asyncio.Task | None = None
        self._unavailable = False

    def start(self) -> None:
        """Begin looking every ``interval`` seconds (an interval of 0: never)."""
        if self.interval > 0 and self._task is None:
            self._task = asyncio.get_running_loop().create_task(
                self._run(), name="revocation watcher")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
            except asyncio.CancelledError:
                raise
            except Exception:  # pragma: no cover - a bug here must not stop the watch
                log.exception("checking open sessions against revoked credentials failed")

    async def check(self) -> int:
        """One look: close the sessions of revoked credentials; returns how many."""
        # Only sessions authenticated before the read are judged by it: one that completes
        # its handshake meanwhile may hold a key newer than what the read saw.
        judged = [s for s in self.sessions() if s.is_open and s.peer_user is not None]
        if not judged:
            return 0
        try:
            current = await self.storage.user_keys({s.peer_user for s in judged})
        except StorageUnavailable as exc:
            if not self._unavailable:
                log.warning("cannot check open sessions for revoked credentials (%s); "
                            "trying again every %g s", exc, self.interval)
            self._unavailable = True
            return 0
        if self._unavailable:
            log.info("checking open sessions for revoked credentials again")
            self._unavailable = False
        closed = 0
        forgotten: set[str] = set()
        for session in judged:
            name = session.peer_user
            pem = current.get(name)
            if pem is None:
                reason = REMOVED
            elif self._der(pem) == session.peer_key.der:
                continue
            else:
                reason = KEY_CHANGED
            if name not in forgotten:
                self.forget_user(name)
                forgotten.add(name)
            if not session.is_open:
                continue
            log.info("closing the connection of %r from %s: %s", name,
                     session.peer_address or "?", reason)
            session.close(Status.UNAUTHORIZED, reason)
            closed += 1
        if closed and self.metrics is not None:
            self.metrics.incr("sessions_revoked", closed)
        return closed

    def _der(self, pem: str) -> bytes | None:
        """The DER form of a stored key (None when it does not parse: no session matches)."""
        try:
            return self._der_by_pem[pem]
        except KeyError:
            pass
        try:
            der = PublicKey.from_bytes(pem).der
        except KeyFormatError:
            der = None
        if len(self._der_by_pem) >= CACHE_MAX:
            self._der_by_pem.clear()
        self._der_by_pem[pem] = der
        return der
