"""Statuses and number fields the node sends and accepts, as SPEC.md settles them.

Seen from a raw ``protocol.Connection`` over a socket, so each test reads the exact RESET
and CLOSE statuses, which the high-level client folds into exceptions:

- a handler that answers without reading the request body: RESET 200 after the answer
  (SPEC.md §7.5), not 499, which means "cancelled by its opener";
- a draining node whose streams all finished: CLOSE 200 (§7.7, §7.8); one that had to
  cut a request after its grace period: CLOSE 503;
- every "number" field takes an integer or a float (§6.7 ``ttl``, §6.8 ``expire``).
"""
from __future__ import annotations

import time

from helpers import RawClient
from protocol.events import (ConnectionClosed, DataReceived, GoAwayReceived,
                             ResponseReceived, StreamReset)

IGNORE_BODY = """
    class Handler:
        async def post(self):
            await self.write("answered without reading")
"""

HANG = """
    import asyncio

    class Handler:
        async def get(self):
            await self.write("started ")
            await self.flush()
            await asyncio.Event().wait()
"""


async def test_answer_without_reading_the_body_resets_with_200(make_node):
    h = await make_node({"ignore": IGNORE_BODY})
    c = await RawClient(h).connect()
    sid = c.conn.send_request("POST", "/ignore", token=h.tokens["alice"], body=b"x" * 1000,
                              end=False)                  # the body would go on
    c.flush()
    resp = await c.until(lambda e: isinstance(e, ResponseReceived))
    assert (resp.stream_id, resp.status) == (sid, 200)
    reset = await c.until(lambda e: isinstance(e, StreamReset))
    # The answer stands; the RESET only says "stop sending the body".
    assert (reset.stream_id, reset.status, reset.reason) == (sid, 200, "response complete")
    body = b"".join(e.body if isinstance(e, ResponseReceived) else e.data for e in c.events
                    if isinstance(e, (ResponseReceived, DataReceived)) and e.stream_id == sid)
    assert body == b"answered without reading"
    c.close()


async def test_clean_drain_closes_with_200(make_node):
    h = await make_node({"hang": HANG}, grace_period=30)
    c = await RawClient(h).connect()
    sid = c.conn.send_request("GET", "/hello_world", token=h.tokens["alice"])
    c.flush()
    resp = await c.until(lambda e: isinstance(e, ResponseReceived) and e.stream_id == sid)
    assert resp.status == 200
    await h.node.stop("test")                     # nothing in flight: no grace period used
    close = await c.until(lambda e: isinstance(e, ConnectionClosed))
    assert (close.status, close.reason) == (200, "node shutting down")
    assert any(isinstance(e, GoAwayReceived) for e in c.events)
    c.close()


async def test_drain_that_cuts_a_request_closes_with_503(make_node):
    h = await make_node({"hang": HANG}, grace_period=0.3)
    c = await RawClient(h).connect()
    sid = c.conn.send_request("GET", "/hang", token=h.tokens["alice"])
    c.flush()
    await c.until(lambda e: isinstance(e, ResponseReceived) and e.stream_id == sid)
    await h.node.stop("test")
    close = await c.until(lambda e: isinstance(e, ConnectionClosed))
    assert (close.status, close.reason) == (503, "node shutting down")
    c.close()


async def test_number_fields_take_integers_and_floats(make_node):
    h = await make_node()
    c = await RawClient(h).connect()

    async def status(path: str, **kw) -> tuple[int, dict]:
        sid = c.conn.send_request("GET", path, **kw)
        c.flush()
        resp = await c.until(lambda e: isinstance(e, ResponseReceived) and e.stream_id == sid)
        return resp.status, resp.headers

    # §6.8 expire: integer or float seconds; the answer's expires-at is a number.
    for expire in (600, 600.5):
        st, headers = await status("/_node/token", args={"password": "pw", "expire": expire})
        assert st == 200, (expire, st)
        assert isinstance(headers["expires-at"], (int, float))
        assert not isinstance(headers["expires-at"], bool)
        assert headers["expires-at"] - time.time() <= 601
    assert (await status("/_node/token", args={"password": "pw", "expire": True}))[0] == 400
    # §6.7 ttl: integer or float seconds.
    token = h.tokens["alice"]
    for ttl in (5, 5.0, 0.5):
        env = {"path": [], "hops": 3, "ttl": ttl}
        assert (await status("/hello_world", token=token, envelope=env))[0] == 200, ttl
    assert (await status("/hello_world", token=token,
                         envelope={"path": [], "hops": 3, "ttl": "5"}))[0] == 400
    c.close()
