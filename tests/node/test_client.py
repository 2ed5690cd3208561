"""The client API: reconnects, timeouts, status -> exception mapping, pinned keys."""
from __future__ import annotations

import asyncio
import logging
import sys

import pytest

from helpers import GATE_SERVICE, user_key, wait_for
from protocol import errors
from protocol.crypto import PrivateKey
from protocol.errors import Status
from utesla_node import Client, Reply
from utesla_node.client import parse_url
from utesla_node.server import Node

STATUS_SERVICE = """
    class Handler:
        async def get(self):
            self.set_status(int(self.args["s"]))
            await self.write("status " + str(self.args["s"]))
"""


async def test_reconnects_on_next_call_after_node_side_close(node):
    c = node.client()
    assert (await c.get("/hello_world")).text == "Hello World!"
    first = c._session
    for s in list(node.node.sessions):
        s.close(Status.OK, "test closes it")
    await wait_for(lambda: not c.connected, 5)
    assert (await c.get("/hello_world")).text == "Hello World!"
    assert c._session is not first and c.connected


async def test_reconnects_after_node_restart_on_same_port(make_node):
    h = await make_node()
    c = h.client()
    assert (await c.get("/hello_world")).text == "Hello World!"
    port = h.port
    await h.node.stop("restart")
    await wait_for(lambda: not c.connected, 5)
    with pytest.raises(errors.Unavailable):
        await c.get("/hello_world")               # nothing listens: a clear 503, no hang
    h.config.port = port
    h.node = Node(h.config)
    await h.node.start()
    assert h.port == port
    assert (await c.get("/hello_world")).text == "Hello World!"


async def test_request_timeout_raises_request_timeout(node):
    c = node.client()
    with pytest.raises(errors.RequestTimeout) as ei:
        await c.get("/gate", args={"name": "never"}, timeout=0.2)
    assert ei.value.status == 408
    # the connection is fine afterwards, and the abandoned stream was reset
    assert (await c.get("/hello_world")).text == "Hello World!"
    await wait_for(lambda: node.node.inflight == 0, 15)


async def test_client_default_timeout(make_node):
    h = await make_node({"gate": "import asyncio\nclass Handler:\n    async def get(self):\n"
                                 "        await asyncio.Event().wait()\n"})
    c = h.client(timeout=0.2)
    with pytest.raises(errors.RequestTimeout):
        await c.get("/gate")


async def test_stream_timeout_between_chunks(node):
    c = node.client()
    with pytest.raises(errors.RequestTimeout):
        async with c.stream("GET", "/gate", args={"name": "never2"}, timeout=0.3) as resp:
            async for _ in resp:
                pass


@pytest.mark.parametrize("status,exc", [
    (400, errors.BadRequest), (401, errors.Unauthorized), (403, errors.Forbidden),
    (404, errors.NotFound), (405, errors.MethodNotAllowed), (408, errors.RequestTimeout),
    (413, errors.TooLarge), (499, errors.Cancelled), (500, errors.InternalError),
    (503, errors.Unavailable), (504, errors.GatewayTimeout), (508, errors.LoopDetected),
])
async def test_each_status_maps_to_its_exception(make_node, status, exc):
    h = await make_node({"status": STATUS_SERVICE})
    c = h.client()
    with pytest.raises(exc) as ei:
        await c.get("/status", args={"s": status})
    assert type(ei.value) is exc
    assert ei.value.status == status
    assert str(ei.value) == f"status {status}"
    reply = await c.get("/status", args={"s": status}, check=False)
    assert isinstance(reply, Reply)
    assert (reply.status, reply.text, reply.ok) == (status, f"status {status}", False)


async def test_unknown_status_keeps_its_number_and_2xx_is_ok(make_node):
    h = await make_node({"status": STATUS_SERVICE})
    c = h.client()
    with pytest.raises(errors.StatusError) as ei:
        await c.get("/status", args={"s": 418})
    assert ei.value.status == 418
    reply = await c.get("/status", args={"s": 201})
    assert reply.status == 201 and reply.ok


async def test_real_errors_map_to_their_classes(make_node):
    h = await make_node({"status": STATUS_SERVICE,
                         "boom": "class Handler:\n    async def get(self):\n        1/0\n"})
    await h.add_user("guest", guest=True, scopes=("hello_world",))
    c = h.client()
    cases = [
        (c.get("/bad name"), errors.BadRequest),
        (c.get("/hello_world", token="ut1_" + "B" * 43), errors.Unauthorized),
        (h.client("guest").get("/echo"), errors.Forbidden),
        (c.get("/nope"), errors.NotFound),
        (c.post("/hello_world"), errors.MethodNotAllowed),
        (c.get("/boom"), errors.InternalError),
    ]
    for coro, exc in cases:
        with pytest.raises(exc):
            await coro


async def test_check_false_returns_the_reply(node):
    c = node.client()
    reply = await c.get("/nope", check=False)
    assert isinstance(reply, Reply)
    assert reply.status == 404 and not reply.ok and "nope" in reply.text
    with pytest.raises(errors.NotFound):
        reply.raise_for_status()


async def test_wrong_pinned_node_key_fails_and_node_logs_it(node, info_logs):
    c = Client(node.url, user="alice", private_key=node.keys["alice"],
               node_key=PrivateKey.generate("ed25519").public, token=node.tokens["alice"])
    node.clients.append(c)
    with pytest.raises(errors.AuthenticationFailed):
        await c.get("/hello_world")
    assert not c.connected
    await wait_for(lambda: node.node.metrics.snapshot().get("handshakes_failed", 0) >= 1, 5)
    await wait_for(lambda: any(r.name.startswith("utesla") and "handshake" in r.getMessage()
                               and r.levelno >= logging.INFO for r in info_logs.records), 5)
    # the node is unaffected
    assert (await node.client().get("/hello_world")).text == "Hello World!"


async def test_rsa_user_and_rsa_pinned_key(make_node):
    h = await make_node()
    await h.add_user("rsa", key=user_key("rsa", 2048, tag="rsa"))
    assert (await h.client("rsa").get("/hello_world")).text == "Hello World!"


async def test_unreachable_node_is_unavailable(tmp_path):
    from helpers import free_port
    c = Client(f"utesla://127.0.0.1:{free_port()}", user="a",
               private_key=user_key(), node_key=user_key(tag="n").public, connect_timeout=2)
    with pytest.raises(errors.Unavailable):
        await c.get("/x")


def test_parse_url():
    assert parse_url("utesla://h:1/a/b") == ("h", 1, "/a/b")
    assert parse_url("http://localhost:17000/hello_world") == ("localhost", 17000,
                                                                "/hello_world")
    assert parse_url("h") == ("h", 17000, "/")
    with pytest.raises(ValueError):
        parse_url("ftp://h/x")
    with pytest.raises(ValueError):
        parse_url("utesla://h:99999/x")


async def test_concurrent_calls_share_one_connect(node):
    c = node.client()
    replies = await asyncio.gather(*(c.get("/hello_world") for _ in range(20)))
    assert {r.text for r in replies} == {"Hello World!"}
    assert len(node.node.sessions) == 1


async def test_blog_client_api_in_process(node, tmp_path):
    from utesla_node import UTeslaClient
    from utesla_node.keys import write_key_pair
    write_key_pair(node.keys["alice"], tmp_path / "a.pub", tmp_path / "a.priv")
    (tmp_path / "node.pub").write_text(node.key.public.to_pem())
    u = UTeslaClient("alice")
    await u.set_server_key(str(tmp_path / "node.pub"))
    await u.set_user_keys(str(tmp_path / "a.pub"), str(tmp_path / "a.priv"))
    resp = await u.fetch(f"http://127.0.0.1:{node.port}/echo/x", {"token": node.tokens["alice"],
                                                                 "k": "v"}, method="GET")
    assert resp.status == 200
    assert '"args": {"k": "v"}' in u.get_message(resp.body)
    bad = await u.fetch(f"http://127.0.0.1:{node.port}/hello_world", {"token": "x"})
    assert bad.status == 401
    await u.close()


@pytest.mark.parametrize("reply", [None, b"\x00\x00\x00\x05hello", b"HTTP/1.1 200 OK\r\n\r\n"],
                         ids=["silent", "garbage-frame", "http"])
async def test_client_against_a_server_that_is_not_a_node(reply):
    async def serve(reader, writer):
        if reply is not None:
            writer.write(reply)
        await reader.read()                    # hold the connection until the client goes
        writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    c = Client(f"utesla://127.0.0.1:{port}", user="a", private_key=user_key(),
               node_key=user_key(tag="n").public, connect_timeout=0.5)
    try:
        with pytest.raises((errors.Unavailable, errors.ProtocolError)):
            await asyncio.wait_for(c.get("/x"), 5)
        assert not c.connected
    finally:
        await c.close()
        server.close()
        await server.wait_closed()


STALL_SERVICE = """
    import asyncio

    class Handler:
        async def get(self):
            self.set_status(int(self.args.get("s", 200)))
            await self.write("first ")
            await self.flush()
            await asyncio.Event().wait()           # stalls mid-body, forever
"""


async def test_stream_stalling_mid_body_times_out_like_request(make_node):
    h = await make_node({"stall": STALL_SERVICE})
    c = h.client()
    with pytest.raises(errors.RequestTimeout) as by_request:
        await c.get("/stall", timeout=0.3)
    assert str(by_request.value) == "GET /stall: no answer within 0.3 s"
    await wait_for(lambda: h.node.inflight == 0, 15)
    async with c.stream("GET", "/stall", timeout=0.3) as resp:
        assert resp.status == 200
        chunks = resp.__aiter__()
        assert await chunks.__anext__() == b"first "
        with pytest.raises(errors.RequestTimeout) as by_stream:
            await chunks.__anext__()
        # Reset when the time ran out, not when the block ends: the node already stopped.
        await wait_for(lambda: h.node.inflight == 0, 15)
    assert type(by_stream.value) is type(by_request.value)
    assert by_stream.value.status == 408
    assert str(by_stream.value) == "GET /stall: no data for 0.3 s"
    assert (await c.get("/hello_world")).text == "Hello World!"    # the connection is fine


async def test_stream_timeout_covers_the_body_of_an_error_answer(make_node):
    h = await make_node({"stall": STALL_SERVICE})
    c = h.client()
    with pytest.raises(errors.RequestTimeout):
        async with c.stream("GET", "/stall", args={"s": 500}, timeout=0.3):
            raise AssertionError("a 500 with check=True never reaches the block")
    await wait_for(lambda: h.node.inflight == 0, 15)


async def test_stream_timeout_counts_waits_not_the_consumers_time(make_node):
    h = await make_node({"two": "class Handler:\n    async def get(self):\n"
                                "        await self.write('a')\n        await self.flush()\n"
                                "        await self.write('b')\n"})
    c = h.client()
    got = []
    async with c.stream("GET", "/two", timeout=0.2) as resp:
        async for chunk in resp:
            got.append(chunk)
            await asyncio.sleep(0.5)     # a consumer busy for longer than the timeout
    assert b"".join(got) == b"ab"


async def test_cancelling_a_request_is_not_a_timeout_and_resets_the_stream(node):
    c = node.client()
    task = asyncio.create_task(c.get("/gate", args={"name": "cancelled", "max": 60}, timeout=30))
    await wait_for(lambda: node.node.inflight == 1, 15)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_for(lambda: node.node.inflight == 0, 15)
    assert (await c.get("/hello_world")).text == "Hello World!"


@pytest.mark.skipif(sys.version_info < (3, 11),
                    reason="asyncio.timeout() and Task.cancelling() are new in Python 3.11")
async def test_a_timeout_leaves_the_callers_task_uncancelled(node):
    """The client's timeout never cancels the caller's task, so an enclosing
    asyncio.timeout() still ends with TimeoutError (not a stray CancelledError)."""
    c = node.client()
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.8):
            with pytest.raises(errors.RequestTimeout):
                await c.get("/gate", args={"name": "never3"}, timeout=0.2)
            with pytest.raises(errors.RequestTimeout):
                async with c.stream("GET", "/gate", args={"name": "never4"},
                                    timeout=0.2) as resp:
                    await resp.read()
            assert asyncio.current_task().cancelling() == 0
            await asyncio.Event().wait()                # the outer timeout ends this


# --------------------------------------------------------------------------- stream slots
# A node lets a connection have ``max_streams`` streams open at once (16 at the least);
# past that the client queues its requests (issue 17 item 3: within their time limit).

SLOTS = 16


async def _fill_stream_slots(make_node):
    """A node allowing SLOTS streams, and a client holding all of them on a closed gate."""
    h = await make_node({"gate": GATE_SERVICE}, max_streams=SLOTS)
    c = h.client()
    held = [asyncio.create_task(c.get("/gate", args={"name": "slots", "max": 60}, timeout=60))
            for _ in range(SLOTS)]
    await wait_for(lambda: h.node.inflight == SLOTS, 15)
    assert c._session.conn.stream_slots == 0
    return h, c, held


async def _release(h, held) -> None:
    await h.client().get("/gate", args={"name": "slots", "open": 1})
    assert [r.text for r in await asyncio.gather(*held)] == ["waiting done"] * SLOTS


async def test_waiting_for_a_free_stream_slot_is_covered_by_the_request_timeout(make_node):
    h, c, held = await _fill_stream_slots(make_node)
    # asyncio.wait_for only bounds the test: before the fix these waited forever.
    with pytest.raises(errors.RequestTimeout) as by_request:
        await asyncio.wait_for(c.get("/hello_world", timeout=0.3), 20)
    assert by_request.value.status == 408
    assert str(by_request.value) == (
        "GET /hello_world: no free stream slot within 0.3 s (every stream the node allows "
        "at once on this connection is busy)")

    async def stream():
        async with c.stream("POST", "/echo", body=b"x", timeout=0.3):
            raise AssertionError("no slot: the block is never entered")

    with pytest.raises(errors.RequestTimeout) as by_stream:
        await asyncio.wait_for(stream(), 20)
    assert "POST /echo: no free stream slot within 0.3 s" in str(by_stream.value)
    # The held requests are untouched, and the client serves again once they end.
    await _release(h, held)
    assert (await c.get("/hello_world")).text == "Hello World!"
    await wait_for(lambda: h.node.inflight == 0, 15)


async def test_a_request_queued_for_a_stream_slot_is_served_when_one_frees(make_node):
    h, c, held = await _fill_stream_slots(make_node)
    queued = asyncio.create_task(c.get("/hello_world", timeout=60))
    await wait_for(lambda: c._session._slot_waiters, 15)     # it is waiting its turn
    await _release(h, held)
    assert (await asyncio.wait_for(queued, 20)).text == "Hello World!"


async def test_cancelling_a_request_queued_for_a_stream_slot_is_not_a_timeout(make_node):
    h, c, held = await _fill_stream_slots(make_node)
    queued = asyncio.create_task(c.get("/hello_world", timeout=60))
    await wait_for(lambda: c._session._slot_waiters, 15)
    queued.cancel()
    with pytest.raises(asyncio.CancelledError):
        await queued
    await _release(h, held)
    assert (await c.get("/hello_world")).text == "Hello World!"
