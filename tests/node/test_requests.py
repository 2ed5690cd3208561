"""Requests through an in-process node: multiplexing, streaming, bodies, services, errors."""
from __future__ import annotations

import asyncio
import json
import logging
import random
import re

import pytest

from helpers import REPO, wait_for
from protocol.errors import BadRequest, MethodNotAllowed, NotFound, RequestTimeout, Status

#: The example services every harness node starts with.
EXAMPLES = sorted(p.stem for p in (REPO / "complements").glob("*.py"))


# --------------------------------------------------------------------------- multiplexing

async def test_fifty_concurrent_requests_on_one_connection_all_correct(node):
    c = node.client()
    rng = random.Random(1234)
    delays = [rng.uniform(0, 0.15) for _ in range(50)]
    replies = await asyncio.wait_for(asyncio.gather(*(
        c.get("/sleepy", args={"d": d, "i": i}) for i, d in enumerate(delays))), 20)
    assert [r.text for r in replies] == [str(i) for i in range(50)]
    assert len(node.node.sessions) == 1          # all of them shared one connection


async def test_answers_arrive_as_they_finish_not_in_request_order(node):
    c = node.client()
    slow = asyncio.ensure_future(c.get("/gate", args={"name": "order"}))
    for _ in range(5):                          # later requests overtake the blocked one
        assert (await c.get("/hello_world")).text == "Hello World!"
    assert not slow.done()
    await c.get("/gate", args={"name": "order", "open": 1})
    assert (await asyncio.wait_for(slow, 5)).text == "waiting done"


# --------------------------------------------------------------------------- streaming

async def test_countdown_chunks_arrive_in_order_as_separate_chunks(node):
    c = node.client()
    async with c.stream("GET", "/countdown", args={"n": 3, "delay": 0.01}) as resp:
        assert resp.status == 200
        chunks = [chunk async for chunk in resp]
    assert chunks == [b"3\n", b"2\n", b"1\n", b"liftoff\n"]


async def test_first_chunk_arrives_before_the_handler_finishes(node):
    c = node.client()
    async with c.stream("GET", "/gate", args={"name": "stream"}) as resp:
        it = resp.__aiter__()
        assert await asyncio.wait_for(it.__anext__(), 5) == b"waiting "
        await c.get("/gate", args={"name": "stream", "open": 1})
        assert await asyncio.wait_for(it.__anext__(), 5) == b"done"


async def test_echo_round_trips_a_5_mib_body_with_flow_control(node):
    c = node.client()
    body = random.Random(5).randbytes(5 << 20)
    reply = await c.post("/echo", body, timeout=30)
    assert len(reply.body) == len(body) and reply.body == body
    # The body is far larger than one stream window: credits were granted along the way.
    assert len(body) > 4 * node.node.config.stream_window


async def test_streamed_upload_from_async_iterator(node):
    c = node.client()

    async def pieces():
        for i in range(20):
            yield bytes([i]) * 10000

    reply = await c.post("/echo", pieces())
    assert reply.body == b"".join(bytes([i]) * 10000 for i in range(20))


async def test_request_args_user_path_and_subpath_reach_the_handler(node):
    c = node.client()
    reply = await c.get("/echo/sub/x", args={"x": "1", "n": [1, 2], "d": {"k": "v"}})
    assert reply.headers.get("content-type") == "application/json"
    assert reply.json() == {"user": "alice", "args": {"x": "1", "n": [1, 2], "d": {"k": "v"}},
                            "path": "/echo/sub/x", "subpath": ["sub", "x"]}


# --------------------------------------------------------------------------- services

SUB_A = """
    class Handler:
        async def get(self):
            await self.write({"service": "a", "subpath": self.subpath})
"""
SUB_AB = """
    class Handler:
        async def get(self):
            await self.write({"service": "a/b", "subpath": self.subpath})
"""
LOWER = """
    class handler:
        async def get(self):
            await self.write('hello friend!')
"""


async def test_sub_services_and_package_init(make_node):
    h = await make_node({"a/__init__": SUB_A, "a/b": SUB_AB, "hello_friend": LOWER})
    c = h.client()
    assert (await c.get("/a")).json() == {"service": "a", "subpath": []}
    assert (await c.get("/a/b")).json() == {"service": "a/b", "subpath": []}
    assert (await c.get("/a/b/extra")).json() == {"service": "a/b", "subpath": ["extra"]}
    assert (await c.get("/a/zz/y")).json() == {"service": "a", "subpath": ["zz", "y"]}
    assert (await c.get("/hello_friend")).text == "hello friend!"   # the blog's `class handler`
    names = {s["path"] for s in (await c.get("/_node/services")).json()["services"]}
    assert {"/a", "/a/b", "/hello_friend", "/hello_world"} <= names


async def test_services_with_colliding_module_names_stay_separate(make_node):
    h = await make_node({
        "x-y": "class Handler:\n    async def get(self):\n        await self.write('dash')\n",
        "x_y": "class Handler:\n    async def get(self):\n        await self.write('under')\n",
    })
    c = h.client()
    assert (await c.get("/x-y")).text == "dash"
    assert (await c.get("/x_y")).text == "under"
    mods = {h.node.registry.services[(n,)].handler.__module__ for n in ("x-y", "x_y")}
    assert len(mods) == 2


CANARY = """
    import pathlib
    pathlib.Path(__file__).with_name("CANARY_IMPORTED").write_text("imported")
    raise SystemExit("canary imported: a path escaped complements/")

    class Handler:
        async def get(self):
            await self.write("SECRET")
"""

HOSTILE_PATHS = [
    "/../canary", "/../../canary", "/%2e%2e/canary", "/..%2fcanary", "/a\x00b",
    "/canary\x00.py", "/\uff41", "/\uff43anary", "/.hidden", "/_node_fake", "/_canary",
    "/" + "a" * 65, "/" + "/".join("abcdefghi"), "", "/", "//", "/./canary", "/complements/..",
    "/canary.py", "/CANARY/..", "/\u0441anary",  # Cyrillic es
    "canary", "../canary",                      # not starting with '/': refused by the client
    "/" + "/".join(["x" * 60] * 16),   # 976 characters, 16 segments
]


@pytest.mark.parametrize("path", HOSTILE_PATHS, ids=lambda p: repr(p)[:30])
async def test_path_tricks_are_refused_and_never_read_outside_complements(make_node, path):
    h = await make_node()
    (h.folder / "canary.py").write_text(__import__("textwrap").dedent(CANARY))
    (h.folder / "CANARY").mkdir()
    for name in (".hidden", "_node_fake", "_canary"):
        (h.folder / "complements" / f"{name}.py").write_text(
            "class Handler:\n    async def get(self):\n        await self.write('SECRET')\n")
    h.node.reload_services()
    c = h.client()
    session = await c.connect()
    try:
        stream = session.open_stream("GET", path, token=c.token)   # raw: no client-side fixing
    except BadRequest:      # the protocol refuses to send it: as good as a 400
        status, body = Status.BAD_REQUEST, b""
    else:
        status, _ = await asyncio.wait_for(stream.head, 5)
        body = await stream.read_all()
    assert status in (Status.BAD_REQUEST, Status.NOT_FOUND), (path, status, body)
    assert session.is_open
    assert b"SECRET" not in body
    assert not (h.folder / "CANARY_IMPORTED").exists()
    assert (await c.get("/hello_world")).text == "Hello World!"


async def test_loader_skips_private_hidden_and_non_ascii_files(make_node):
    h = await make_node()
    for name in (".hidden", "_private", "\uff41", "bad name", "_node"):
        (h.folder / "complements" / f"{name}.py").write_text(
            "class Handler:\n    async def get(self):\n        await self.write('SECRET')\n")
    h.node.reload_services()
    assert h.node.registry.names() == EXAMPLES
    await h.client().get("/hello_world")


# --------------------------------------------------------------------------- errors

BOOM = """
    class Handler:
        async def get(self):
            raise ZeroDivisionError("secret detail 42")
"""
HANG = """
    import asyncio

    class Handler:
        async def get(self):
            await asyncio.Event().wait()
"""


async def test_handler_exception_is_500_with_opaque_id_and_logged_traceback(make_node, info_logs):
    h = await make_node({"boom": BOOM})
    c = h.client()
    reply = await c.get("/boom", check=False)
    assert reply.status == 500
    m = re.fullmatch(r"internal error \(id ([0-9a-f]+)\)", reply.text)
    assert m, reply.text
    assert "secret detail" not in reply.text and "ZeroDivision" not in reply.text
    records = [r for r in info_logs.records if r.exc_info and m.group(1) in r.getMessage()]
    assert len(records) == 1
    rec = records[0]
    assert rec.exc_info[0] is ZeroDivisionError
    assert "secret detail 42" in info_logs.text      # the traceback went to the log
    # The connection survives.
    assert (await c.get("/hello_world")).text == "Hello World!"


async def test_hanging_handler_gets_408_while_other_requests_proceed(make_node):
    h = await make_node({"hang": HANG}, request_timeout=0.5)
    c = h.client()
    hung = asyncio.ensure_future(c.get("/hang", timeout=10))
    for _ in range(10):
        assert (await c.get("/hello_world")).text == "Hello World!"
    with pytest.raises(RequestTimeout) as ei:
        await asyncio.wait_for(hung, 10)
    assert ei.value.status == 408
    assert "0.5" in str(ei.value)
    await wait_for(lambda: h.node.inflight == 0, 5)
    assert (await c.get("/hello_world")).text == "Hello World!"


async def test_service_with_syntax_error_does_not_stop_the_others(make_node, info_logs):
    h = await make_node({"broken": "class Handler:\n    async def get(self)\n        pass\n",
                         "nohandler": "x = 1\n",
                         "importerr": "import no_such_module_utesla\n"})
    c = h.client()
    assert (await c.get("/hello_world")).text == "Hello World!"
    with pytest.raises(NotFound):
        await c.get("/broken")
    text = info_logs.text
    assert "/broken" in text and "SyntaxError" in text
    assert "/nohandler" in text and "/importerr" in text
    listed = {s["path"] for s in (await c.get("/_node/services")).json()["services"]}
    assert listed == {"/" + n for n in EXAMPLES}
    assert set(h.node.registry.errors) == {"broken", "nohandler", "importerr"}


@pytest.mark.parametrize("method", ["POST", "DELETE", "PUT", "FROB", "WRITE", "FLUSH",
                                    "BIND", "INIT", "NEW", "CLASS", "DICT"])
async def test_method_not_implemented_is_405(node, method):
    c = node.client()
    with pytest.raises(MethodNotAllowed) as ei:
        await c.request(method, "/hello_world")
    assert ei.value.status == 405


@pytest.mark.parametrize("method", ["_BIND", "__INIT__", "SET_STATUS", "G ET", "", "X" * 17,
                                    "G\u0415T"])
async def test_undecodable_method_or_path_is_refused_locally_connection_survives(node, method):
    c = node.client()
    await c.get("/hello_world")
    with pytest.raises(BadRequest):
        await c.request(method, "/hello_world")
    with pytest.raises(BadRequest):
        await c.get("/" + "x" * 1030)
    with pytest.raises(NotFound):
        await c.get("")                         # becomes "/": no service named
    assert c.connected
    assert (await c.get("/hello_world")).text == "Hello World!"


async def test_unknown_service_is_404(node):
    c = node.client()
    with pytest.raises(NotFound):
        await c.get("/no_such_service")
    with pytest.raises(NotFound):
        await c.get("/_node/no_such_builtin")


async def test_body_larger_than_max_body_is_413(make_node):
    h = await make_node({"slurp": """
        class Handler:
            async def post(self):
                data = await self.body.read()
                await self.write(str(len(data)))
    """}, max_body=100_000)
    c = h.client()
    assert (await c.post("/slurp", b"x" * 1000)).text == "1000"
    reply = await c.post("/slurp", b"x" * 300_000, check=False)
    assert reply.status == 413
    assert (await c.get("/hello_world")).text == "Hello World!"


async def test_handler_set_status_and_headers(make_node):
    h = await make_node({"teapot": """
        class Handler:
            async def get(self):
                self.set_status(418)
                self.set_header("X-Kind", "tea")
                await self.write({"ok": False})
    """})
    reply = await h.client().get("/teapot", check=False)
    assert reply.status == 418
    assert reply.headers["x-kind"] == "tea"
    assert json.loads(reply.body) == {"ok": False}


async def test_request_log_line_per_request(node, info_logs):
    await node.client().get("/hello_world")
    assert any(r.name == "utesla.request" and "/hello_world -> 200" in r.getMessage()
               for r in info_logs.records)
    logging.getLogger("utesla.request")  # nothing else to check


async def test_reload_then_stop_at_once_does_not_hang(make_node):
    h = await make_node()
    h.node.reload_services()
    await asyncio.wait_for(h.node.stop("right after a reload"), 10)


async def test_services_named_like_installed_modules_do_not_shadow_them(make_node):
    import json as stdlib_json
    import sys
    h = await make_node({
        "json": "class Handler:\n    async def get(self):\n        await self.write('svc json')\n",
        "asyncio": "import asyncio\nclass Handler:\n    async def get(self):\n"
                   "        await asyncio.sleep(0)\n        await self.write('svc asyncio')\n",
    })
    c = h.client()
    assert (await c.get("/json")).text == "svc json"
    assert (await c.get("/asyncio")).text == "svc asyncio"
    assert sys.modules["json"] is stdlib_json
    assert sys.modules["asyncio"] is asyncio
    assert h.node.registry.services[("json",)].handler.__module__.startswith("_utesla_services.")
