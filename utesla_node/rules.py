"""Request rules shared by the dispatcher and the router (SPEC.md §6.7, §9.4).

Plain data and pure functions, so that both sides of a forwarded request read them
from one place: the built-in prefix, which paths live long, a request's deadline,
which methods may be replayed on another route, and the forwarding envelope.
"""
from __future__ import annotations

from protocol.errors import BadRequest, LoopDetected

__all__ = ["BUILTIN_PREFIX", "LONG_LIVED", "REPLAYABLE", "request_timeout", "check_envelope",
           "next_envelope", "is_number"]

#: Built-in services live under this prefix; user services cannot start with '_'.
BUILTIN_PREFIX = "/_node/"
#: Streams that stay open by design (gossip subscriptions): no request deadline.
LONG_LIVED = frozenset({"/_node/net/routes"})
#: Methods a node may send again on another route when the first failed unanswered.
REPLAYABLE = frozenset({"GET", "HEAD", "OPTIONS"})


def is_number(value: object) -> bool:
    """An integer or a float, not a boolean (msgpack encoders write whole floats as ints)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def request_timeout(default: float, envelope: dict | None) -> float:
    """Seconds a request may take here: ``default``, or less when it came forwarded with
    the entry node's time left (``ttl`` in its envelope, SPEC.md §6.7)."""
    ttl = envelope.get("ttl") if envelope else None
    if is_number(ttl):
        return max(0.001, min(default, ttl))
    return default


def check_envelope(envelope: dict | None, node_id: str, max_hops: int) -> tuple[list[str], int]:
    """A received envelope's (path, hops left); SPEC.md §6.7.

    400 when malformed; 508 when ``node_id`` is already on its path, whether the
    request would be served here or forwarded.
    """
    env = envelope or {}
    visited = env.get("path", [])
    hops = env.get("hops", max_hops)
    rid, user, ttl = env.get("id"), env.get("user"), env.get("ttl")
    if (not isinstance(visited, list) or len(visited) > 64
            or not all(isinstance(v, str) and 0 < len(v) <= 80 for v in visited)
            or type(hops) is not int or hops < 0
            or (rid is not None and not (isinstance(rid, bytes) and len(rid) == 16))
            or (user is not None and not (isinstance(user, str) and len(user) <= 255))
            or (ttl is not None and not is_number(ttl))):
        raise BadRequest("malformed forwarding envelope")
    if node_id in visited:
        raise LoopDetected("forwarding loop: this node is already on the request's path")
    return visited, hops


def next_envelope(env: dict | None, request_id: bytes, user: str, visited: list[str],
                  node_id: str, hops: int, max_hops: int, left: float | None) -> dict:
    """The envelope for the next hop (SPEC.md §6.7)."""
    envelope = {"id": (env.get("id") if env else None) or request_id,
                "user": (env.get("user") if env else None) or user,
                "path": visited + [node_id], "hops": min(hops, max_hops) - 1}
    if left is not None:
        # The next hop gives up a little before we do, so its 408 reaches the client.
        envelope["ttl"] = max(0.001, left - min(0.25, left * 0.05))
    return envelope
