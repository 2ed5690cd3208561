"""Metrics under hostile traffic (issue 12, item 4): labels come from a bounded set.

Request series are labelled by registered local services, ``_node`` for the
built-ins, up to ``max_remote`` routed services and one ``_other`` bucket, so
requests refused before routing (400, 401, unknown service 404) add no series;
the page stays under 1 MB whatever the traffic and is written a few hundred lines
per event-loop turn; the metrics listener is handed plain callables.
"""
from __future__ import annotations

import ast
import asyncio
import secrets

from prometheus_client.parser import text_string_to_metric_families

from protocol.errors import Status
from utesla_node import metrics_http
from utesla_node.metrics import (BUILTIN, MAX_PER_FAMILY, OTHER, PAGE_LIMIT, STEP, Metrics)
from utesla_node.metrics_http import MetricsServer, health_check


def parse(page: str) -> dict[tuple, float]:
    """Samples of a page that must parse as the Prometheus text format."""
    out = {}
    for family in text_string_to_metric_families(page):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def count(samples: dict, service: str, status: int) -> float:
    return samples.get(("utesla_service_requests_total",
                        (("service", service), ("status", str(status)))), 0)


async def http_get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


# --------------------------------------------------------------------------- a real node

def made_up_path(i: int) -> str:
    """About 1 KiB of path naming no service: 8 segments of up to 127 characters."""
    return "/" + "/".join(f"m{i:06d}{k}" + "x" * 119 for k in range(8))


async def test_made_up_names_and_a_bogus_token_do_not_grow_the_metrics_page(make_node):
    h = await make_node(metrics_listen="127.0.0.1:0")
    port = h.node.metrics_server.port
    good = h.client()
    assert (await good.get("/hello_world")).text == "Hello World!"
    status, before = await http_get(port, "/metrics")
    assert status == 200
    s0 = parse(before)

    # 10,000 requests: most with a bogus token (401), some with a good token for services
    # that do not exist (404), some with a path the node refuses (400).
    bogus = h.client(token="ut1_" + "A" * 43)
    refused = {Status.UNAUTHORIZED: 0, Status.NOT_FOUND: 0, Status.BAD_REQUEST: 0}

    async def one(i: int) -> None:
        if i % 10 == 0:
            reply = await good.get(made_up_path(i), check=False)
        elif i % 10 == 1:
            reply = await good.get(f"/{'y' * 200}{i}", check=False)     # segment too long
        else:
            reply = await bogus.get(made_up_path(i), check=False)
        refused[reply.status] += 1

    for start in range(0, 10_000, 200):
        await asyncio.gather(*(one(i) for i in range(start, start + 200)))
    assert refused == {Status.UNAUTHORIZED: 8000, Status.NOT_FOUND: 1000,
                       Status.BAD_REQUEST: 1000}

    # Real counters keep counting after the flood.
    assert (await good.get("/hello_world")).text == "Hello World!"
    status, after = await http_get(port, "/metrics")
    assert status == 200
    s1 = parse(after)
    assert len(after) - len(before) < 4096, (len(before), len(after))
    assert "m000000" not in after and "yyyy" not in after
    assert s1[("utesla_requests_total", ())] - s0[("utesla_requests_total", ())] == 10_001
    assert count(s1, "hello_world", 200) - count(s0, "hello_world", 200) == 1
    assert count(s1, OTHER, 401) == 8000
    assert count(s1, OTHER, 404) == 1000
    assert count(s1, OTHER, 400) == 1000
    # The built-in page says the same, and is as small.
    builtin = (await good.get("/_node/metrics")).text
    assert abs(len(builtin) - len(after)) < 4096
    assert count(parse(builtin), "hello_world", 200) == count(s1, "hello_world", 200)


async def test_a_reloaded_service_gets_its_label_and_a_removed_one_loses_it(make_node):
    h = await make_node()
    c = h.client()
    assert (await c.get("/hello_world")).text == "Hello World!"
    h.write_service("fresh", "class Handler:\n    async def get(self):\n"
                             "        await self.write('new')\n")
    (h.folder / "complements" / "hello_world.py").unlink()
    h.node.reload_services()
    assert (await c.get("/fresh")).text == "new"
    samples = parse(await h.node.prometheus())
    assert count(samples, "fresh", 200) == 1
    assert not [k for k in samples if ("service", "hello_world") in k[1]]


# --------------------------------------------------------------------------- Metrics alone

def test_labels_come_from_local_services_built_ins_and_routes_only():
    m = Metrics(max_remote=2)
    routes: dict[str, list] = {}            # a live view, as the gossip engine's table
    m.set_known(local=["echo", "a/b"], remote=routes)
    assert m.label("/echo") == "echo"
    assert m.label("/echo/sub/path") == "echo"
    assert m.label("/a/b/c") == "a/b"
    assert m.label("/a") == OTHER               # "a" alone is not a service
    assert m.label("/_node/token") == BUILTIN
    assert m.label("/_node/net/routes") == BUILTIN
    assert m.label("/nosuch") == OTHER
    assert m.label("") == OTHER and m.label("/") == OTHER
    assert m.label("/" + "x" * 5000) == OTHER
    routes.update({"far1": [1], "far2": [1], "far3": [1]})
    assert m.label("/far1") == "far1"
    assert m.label("/far2/x") == "far2"
    assert m.label("/far3") == OTHER            # over max_remote: the "_other" bucket
    assert m.counters["metrics_overflow"] == 1
    m.request("/far3", 200, 0.01, forwarded=True)
    assert m.forwarded[(OTHER, 200)] == 1 and m.requests[(OTHER, 200)] == 1


async def test_labels_of_services_gone_are_dropped_at_the_next_scrape():
    m = Metrics(max_remote=1)
    routes = {"far1": [1]}
    m.set_known(local=["echo"], remote=routes)
    m.request("/echo", 200, 0.001)
    m.request("/far1", 200, 0.001, forwarded=True)
    del routes["far1"]
    routes["far2"] = [1]
    m.set_known(local=[])
    page = await m.prometheus()
    assert 'service="echo"' not in page and 'service="far1"' not in page
    m.request("/far2", 200, 0.001, forwarded=True)    # the remote slot was given back
    assert m.forwarded[("far2", 200)] == 1


async def test_the_page_stays_under_its_limit_whatever_the_traffic():
    m = Metrics(max_remote=10_000)
    # An admin's worst case: thousands of services with the longest names, every status.
    names = [f"s{i:05d}" + "z" * 120 for i in range(5000)]
    routes = {f"r{i:05d}" + "q" * 120: [1] for i in range(5000)}
    m.set_known(local=names, remote=routes)
    for i, name in enumerate(names + list(routes)):
        for status in (200, 404, 500, 100 + i % 900):
            m.request(f"/{name}/x", status, 0.001 * (i % 50), forwarded=i % 2 == 0)
    for i in range(3000):
        m.request(f"/made-up-{i}", 100 + i % 900, 0.001)
    links = [(fam, "gauge", {"peer": f"utesla://peer-{i}.example.org:17000/" + "p" * 200}, 1)
             for i in range(2000) for fam in ("link_up", "link_rtt_seconds", "link_inflight")]
    page = await m.prometheus({"connections": 3}, {"bytes_in": 5}, links)
    assert len(page.encode()) < PAGE_LIMIT, len(page)
    samples = parse(page)
    # Every request is still counted somewhere, and the totals are exact.
    assert m.counters["requests_total"] == 10_000 * 4 + 3000
    total = sum(v for (name, _), v in samples.items() if name == "utesla_service_requests_total")
    assert total == m.counters["requests_total"]
    assert m.counters["metrics_overflow"] > 0
    # Per-link families are capped, and what was left out is said.
    kept = [k for k in samples if k[0] == "utesla_link_up"]
    assert 0 < len(kept) <= MAX_PER_FAMILY
    assert samples[("utesla_metrics_omitted_samples", ())] == 6000 - sum(
        1 for k in samples if k[0] in ("utesla_link_up", "utesla_link_rtt_seconds",
                                       "utesla_link_inflight"))


async def test_the_page_is_written_over_many_event_loop_turns():
    m = Metrics()
    names = [f"svc{i}" for i in range(300)]
    m.set_known(local=names)
    for n in names:
        m.request(f"/{n}", 200, 0.01)
    turns = 0
    done = False

    async def ticker():
        nonlocal turns
        while not done:
            turns += 1
            await asyncio.sleep(0)

    task = asyncio.get_running_loop().create_task(ticker())
    await asyncio.sleep(0)
    start = turns
    page = await m.prometheus()
    done = True
    await task
    lines = page.count("\n")
    assert lines > 10 * STEP
    # The ticker ran between the pieces: the page never took the loop for itself.
    assert turns - start >= lines // STEP - 1, (turns - start, lines)


async def test_requests_keep_counting_while_a_page_is_written():
    m = Metrics()
    m.set_known(local=[f"svc{i}" for i in range(400)])
    for i in range(400):
        m.request(f"/svc{i}", 200, 0.01)

    async def traffic():
        for i in range(2000):
            m.request(f"/svc{i % 400}", 500 + i % 3, 0.02)   # new series mid-render
            if i % 50 == 0:
                await asyncio.sleep(0)

    page, _ = await asyncio.gather(m.prometheus(), traffic())
    parse(page)                                  # consistent: it still parses
    assert m.counters["requests_total"] == 2400
    after = parse(await m.prometheus())
    assert sum(v for (n, _), v in after.items() if n == "utesla_service_requests_total") == 2400


# --------------------------------------------------------------------------- the listener

def test_metrics_http_imports_nothing_of_the_node():
    tree = ast.parse(open(metrics_http.__file__).read())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            assert node.level == 0, "relative import in metrics_http"
            imported.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            imported |= {a.name.split(".")[0] for a in node.names}
    assert imported <= {"__future__", "asyncio", "logging", "collections", "typing"}, imported


async def test_metrics_server_serves_what_its_callables_say():
    state = {"why": None, "pings": 0}

    async def render() -> str:
        return "# TYPE utesla_x gauge\nutesla_x 1\n"

    async def ping():
        state["pings"] += 1
        if state["why"]:
            raise ConnectionError(state["why"])

    serving = [True]
    server = MetricsServer("127.0.0.1:0", render=render,
                           health=health_check(lambda: serving[0], ping))
    await server.start()
    try:
        assert await http_get(server.port, "/metrics") == (200, "# TYPE utesla_x gauge\n"
                                                                "utesla_x 1\n")
        assert await http_get(server.port, "/healthz") == (200, "ok\n")
        state["why"] = "gone"
        assert await http_get(server.port, "/healthz") == (
            503, "database unavailable: ConnectionError\n")
        serving[0] = False
        pings = state["pings"]
        assert await http_get(server.port, "/healthz") == (503, "listener down\n")
        assert state["pings"] == pings           # not asked once the listener is down

        async def broken() -> str:
            raise RuntimeError("boom " + secrets.token_hex(4))

        server.render = broken
        assert (await http_get(server.port, "/metrics"))[0] == 500
    finally:
        await server.stop()
