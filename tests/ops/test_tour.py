"""The operator's tour, through the real console scripts.

Three ``utesla-node`` processes in their own folders, linked in a line A -> B -> C with
``utesla-cli add`` + ``generate_token`` + ``add_network`` (the blog's second scenario, twice),
each offering its own service.  On the middle node B:

- ``utesla-cli status --json`` and ``graph --format json`` (from B's folder, and by URL as a
  user of B) show exactly the topology: B's fingerprint, one link up to C, the route to C's
  service one hop away, B's own service; the graph holds B and C, the edge B -> C, and each
  service where it lives.  (A subscribes to B, so it is downstream of B and not in B's graph;
  A's own graph shows the whole line.)
- The Prometheus endpoint (``[metrics] listen``) parses with ``prometheus_client``'s parser,
  and its counters move by exactly the requests the test makes through B; the built-in
  ``/_node/metrics`` agrees with it; ``/healthz`` answers 200, and nothing once B is stopped.

A second test runs ``/healthz`` against an in-process node whose database, then listener,
goes away: 503 with the reason.
"""
from __future__ import annotations

import asyncio
import json
import re
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from helpers import NodeHarness, NodeProcess, run_cli, wait_for
from protocol.errors import NotFound
from utesla_node import Client

INI = """[network]
gossip_interval = 0.3
heartbeat_interval = 0.5
"""


def service(text: str) -> str:
    return f"class Handler:\n    async def get(self):\n        await self.write({text!r})\n"


def read_state(folder: Path) -> dict:
    """The running node's state file, as ``status``/``graph`` read it ({} if not there yet)."""
    try:
        return json.loads((folder / "data" / "status.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


def routes_of(st: dict) -> dict[str, dict]:
    return {r["path"]: r for r in st.get("network", {}).get("routes", [])}


def http_get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


class Scrape:
    """One parsed ``/metrics`` answer."""

    def __init__(self, text: str):
        self.text = text
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.values: dict[tuple, float] = {}
        for f in self.families.values():
            for s in f.samples:
                key = (s.name, tuple(sorted(s.labels.items())))
                assert key not in self.values, f"duplicate sample {key}"
                self.values[key] = s.value

    def __call__(self, name: str, **labels) -> float:
        """A sample's value; counters that never moved are absent, i.e. 0."""
        return self.values.get((name, tuple(sorted(labels.items()))), 0)


def scrape(port: int) -> Scrape:
    status, text = http_get(port, "/metrics")
    assert status == 200, text
    return Scrape(text)


async def test_three_nodes_in_a_line_status_graph_and_metrics(tmp_path):
    folders = {n: tmp_path / n for n in "abc"}
    names = {"a": "alpha", "b": "bravo", "c": "charlie"}
    for n, folder in folders.items():
        (folder / "complements").mkdir(parents=True)
        (folder / "complements" / f"{names[n]}.py").write_text(service(names[n]))
        # B's metrics listen on a port the kernel picks (no race for a "free" port); the
        # node logs the address it got.
        extra = "\n[metrics]\nlisten = 127.0.0.1:0\n" if n == "b" else ""
        (folder / "node.ini").write_text(INI + extra)
    user_dir = tmp_path / "alice"
    user_dir.mkdir()
    a, b, c = (NodeProcess(folders[n], "--port", "0") for n in "abc")
    procs = [a, b, c]
    try:
        for p in procs:
            p.start()
        url = {n: f"utesla://127.0.0.1:{p.port}" for n, p in zip("abc", procs)}
        # "node key SHA256:... (ed25519) in keys/key.pub", printed after the address.
        fp = {n: p.lines[-1].split()[2] for n, p in zip("abc", procs)}
        assert fp["b"] == run_cli("fingerprint", "keys/key.pub", cwd=folders["b"]).stdout.strip()
        assert all(v.startswith("SHA256:") for v in fp.values()) and len(set(fp.values())) == 3
        found = re.search(r"metrics on http://127\.0\.0\.1:(\d+)/metrics", b.log())
        assert found, b.log()
        metrics_port = int(found.group(1))

        def link(down: str, up: str) -> str:
            """``down`` subscribes to ``up``, as the README's two-node quick start does."""
            account, password = f"node-{down}", f"{down} to {up} secret"
            run_cli("add", "-u", account, "-p", "-", "-i", f"../{down}/keys/key.pub",
                    cwd=folders[up], input=password + "\n")
            token = run_cli("generate_token", url[up], "-u", account, "-p", "-",
                            "-s", "keys/key.pub", "-i", f"../{down}/keys/key.pub",
                            "-I", f"../{down}/keys/key.priv", cwd=folders[up],
                            input=password + "\n").stdout.strip()
            run_cli("add_network", url[up], "-s", f"../{up}/keys/key.pub", "-u", account,
                    "-t", "-", cwd=folders[down], input=token + "\n")
            return token

        def alice() -> str:
            """A user of B, with the blog's commands: keys, account, token."""
            run_cli("generate_keys", "-out-public-key", "alice.pub", "-out-private-key",
                    "alice.priv", cwd=user_dir)
            run_cli("add", "-u", "alice", "-p", "-", "-i", "../alice/alice.pub",
                    "--token-limit", "0", cwd=folders["b"], input="alice pw\n")
            return run_cli("generate_token", url["b"], "-u", "alice", "-p", "-",
                           "-s", "../b/keys/key.pub", "-i", "alice.pub", "-I", "alice.priv",
                           cwd=user_dir, input="alice pw\n").stdout.strip()

        # Independent admin work runs side by side (each command is a process).
        token, *peer_tokens = await asyncio.gather(asyncio.to_thread(alice),
                                           asyncio.to_thread(link, "b", "c"),
                                           asyncio.to_thread(link, "a", "b"))

        def settled() -> bool:
            sb, sa = read_state(folders["b"]), read_state(folders["a"])
            links = sb.get("network", {}).get("links", [])
            ra = routes_of(sa)
            return (len(links) == 1 and links[0]["state"] == "up"
                    and links[0]["rtt_ms"] is not None
                    and routes_of(sb).get("/charlie", {}).get("hops") == 1
                    and sb["network"].get("subscribers") == 1
                    and ra.get("/bravo", {}).get("hops") == 1
                    and ra.get("/charlie", {}).get("hops") == 2)

        await wait_for(settled, 20, interval=0.05)

        # ---------------------------------------------------------------- status, locally
        def in_b(*args):
            return asyncio.to_thread(lambda: run_cli(*args, cwd=folders["b"]).stdout)

        st_json, table, g_json, dot, mermaid, ga_json = await asyncio.gather(
            in_b("status", "--json"), in_b("status"), in_b("graph", "--format", "json"),
            in_b("graph"), in_b("graph", "--format", "mermaid"),
            asyncio.to_thread(lambda: run_cli("graph", "--format", "json",
                                              cwd=folders["a"]).stdout))
        st = json.loads(st_json)
        assert st["fingerprint"] == fp["b"]
        assert st["address"] == ["127.0.0.1", b.port]
        assert st["services"] == ["bravo"]
        assert st["version"] and st["uptime"] > 0
        net = st["network"]
        assert net["node"] == fp["b"] and net["local"] == ["bravo"]
        assert net["subscribers"] == 1                     # A
        [lk] = net["links"]
        assert (lk["url"], lk["node"], lk["state"], lk["user"]) == (url["c"], fp["c"], "up",
                                                                     "node-b")
        assert lk["rtt_ms"] > 0 and lk["routes"] == 1
        assert net["routes"] == [{"path": "/charlie", "origin": fp["c"], "next_hop": url["c"],
                                  "hops": 1, "replicas": 1, "routes": 1}]
        for out in (st_json, table, g_json, dot, mermaid, ga_json):
            assert not any(tok in out for tok in [token, *peer_tokens])

        assert fp["b"] in table and f"utesla://127.0.0.1:{b.port}" in table
        assert re.search(rf"{re.escape(url['c'])}\s+up\s+rtt [0-9.]+ ms\s+routes 1", table), table
        assert re.search(rf"/charlie\s+hops 1\s+via {re.escape(url['c'])}", table), table
        assert "1 local, 1 remote" in table

        # ---------------------------------------------------------------- graph, locally
        g = json.loads(g_json)
        assert g == {
            "nodes": [{"id": fp["b"], "hops": 0, "self": True, "services": ["bravo"]},
                      {"id": fp["c"], "hops": 1, "services": ["charlie"], "url": url["c"]}],
            "edges": [{"from": fp["b"], "to": fp["c"]}]}
        assert dot.startswith("digraph") and f'"{fp["b"]}" -> "{fp["c"]}";' in dot
        assert dot.count(" -> ") == 1 and "/charlie" in dot and "/bravo" in dot
        assert mermaid.splitlines()[0] == "graph LR" and mermaid.count("-->") == 1

        # The head of the line sees all of it: A -> B -> C, each service where it lives.
        ga = json.loads(ga_json)
        assert {n["id"]: (n["hops"], n["services"]) for n in ga["nodes"]} == {
            fp["a"]: (0, ["alpha"]), fp["b"]: (1, ["bravo"]), fp["c"]: (2, ["charlie"])}
        assert ga["edges"] == sorted([{"from": fp["a"], "to": fp["b"]},
                                      {"from": fp["b"], "to": fp["c"]}],
                                     key=lambda e: (e["from"], e["to"]))

        # ---------------------------------------------------------------- by URL, as a user
        as_alice = ["-u", "alice", "-I", "alice.priv", "-s", "../b/keys/key.pub", "-t", token]

        def as_user(*args, check=True):
            return asyncio.to_thread(run_cli, *args, cwd=user_dir, check=check)

        rst_out, rg_out, bad = await asyncio.gather(
            as_user("status", url["b"], "--json", *as_alice),
            as_user("graph", url["b"], "--format", "json", *as_alice),
            as_user("status", url["b"], check=False))
        rst = json.loads(rst_out.stdout)
        assert rst["fingerprint"] == fp["b"] and rst["services"] == ["bravo"]
        assert [(l["url"], l["state"]) for l in rst["network"]["links"]] == [(url["c"], "up")]
        assert [(r["path"], r["hops"], r["origin"]) for r in rst["network"]["routes"]] == \
            [("/charlie", 1, fp["c"])]
        assert json.loads(rg_out.stdout) == g
        # Without credentials, a URL is refused with one line, not a traceback.
        assert bad.returncode == 1 and bad.stderr.startswith("error:"), bad.stderr

        # ---------------------------------------------------------------- Prometheus
        def quiet() -> Scrape | None:
            """A scrape once only A's link is open (the CLI's connections are closed); its
            gossip subscription stays open but is not counted as a request in flight."""
            s = scrape(metrics_port)
            return s if s("utesla_connections") == 1 and s("utesla_requests_in_flight") == 0 \
                else None

        before = await wait_for(quiet, 10, interval=0.05)
        fams = before.families
        assert fams["utesla_requests"].type == "counter"
        assert fams["utesla_service_requests"].type == "counter"
        assert fams["utesla_service_seconds"].type == "histogram"
        assert fams["utesla_connections"].type == "gauge"
        assert before("utesla_links") == 1 and before("utesla_links_up") == 1
        assert before("utesla_uptime_seconds") > 0

        # Exactly these requests through B: 7 to B's service, 3 forwarded to C's, 2 that
        # find nothing anywhere (404).  Some on one connection, some from the console script.
        async with Client(url["b"], user="alice", private_key=user_dir / "alice.priv",
                          node_key=folders["b"] / "keys" / "key.pub", token=token) as client:
            for _ in range(5):
                assert (await client.get("/bravo")).text == "bravo"
            for _ in range(2):
                assert (await client.get("/charlie")).text == "charlie"
            for _ in range(2):
                with pytest.raises(NotFound):
                    await client.get("/nosuch")
        calls = await asyncio.gather(*(as_user("call", url["b"] + path, *as_alice)
                                       for path in ("/bravo", "/bravo", "/charlie")))
        assert [c.stdout for c in calls] == ["bravo", "bravo", "charlie"]

        after = await wait_for(quiet, 10, interval=0.05)

        def moved(name: str, **labels) -> float:
            return after(name, **labels) - before(name, **labels)

        log_b = b.log
        assert moved("utesla_requests_total") == 12, log_b()
        assert moved("utesla_requests_failed_total") == 2
        assert moved("utesla_forwarded_requests_total") == 3
        assert moved("utesla_service_requests_total", service="bravo", status="200") == 7
        assert moved("utesla_service_requests_total", service="charlie", status="200") == 3
        # A name that is neither a service nor a route has no series of its own (a client
        # could make up any number of them): it is counted in the one "_other" bucket.
        assert moved("utesla_service_requests_total", service="_other", status="404") == 2
        assert not [k for k in after.values if ("service", "nosuch") in k[1]]
        assert moved("utesla_service_requests_total", service="_node", status="200") == 0
        assert moved("utesla_service_seconds_count", service="bravo") == 7
        assert moved("utesla_service_seconds_count", service="charlie") == 3
        assert moved("utesla_service_seconds_bucket", service="bravo", le="+Inf") == 7
        assert moved("utesla_service_seconds_sum", service="charlie") > 0
        assert moved("utesla_connections_accepted_total") == 4     # 1 client + 3 CLI calls
        assert moved("utesla_handshakes_ok_total") == 4
        assert moved("utesla_handshakes_failed_total") == 0
        assert moved("utesla_auth_failures_total") == 0
        buckets = [v for (name, labels), v in after.values.items()
                   if name == "utesla_service_seconds_bucket" and ("service", "bravo") in labels]
        assert len(buckets) >= 10 and max(buckets) == after("utesla_service_seconds_count",
                                                            service="bravo")

        # The built-in /_node/metrics says the same (it counts itself once it has answered).
        async with Client(url["b"], user="alice", private_key=user_dir / "alice.priv",
                          node_key=folders["b"] / "keys" / "key.pub", token=token) as client:
            builtin = Scrape((await client.get("/_node/metrics")).text)
        assert builtin("utesla_requests_total") == after("utesla_requests_total")
        assert builtin("utesla_service_requests_total", service="bravo", status="200") == \
            after("utesla_service_requests_total", service="bravo", status="200")
        last = await wait_for(quiet, 10, interval=0.05)
        assert last("utesla_requests_total") - after("utesla_requests_total") == 1
        assert last("utesla_service_requests_total", service="_node", status="200") - \
            after("utesla_service_requests_total", service="_node", status="200") == 1

        # ---------------------------------------------------------------- health
        assert http_get(metrics_port, "/healthz") == (200, "ok\n")
        assert http_get(metrics_port, "/nothing")[0] == 404
        assert b.stop() == 0
        with pytest.raises(urllib.error.URLError) as refused:
            http_get(metrics_port, "/healthz")
        assert isinstance(refused.value.reason, ConnectionRefusedError), refused.value

        # A notices: its link to B goes down and the routes through B are withdrawn.
        def withdrawn() -> bool:
            sa = read_state(folders["a"])
            links = sa.get("network", {}).get("links", [])
            return bool(links) and links[0]["state"] != "up" and not routes_of(sa)

        await wait_for(withdrawn, 15, interval=0.05)
        assert a.stop() == 0 and c.stop() == 0
        for p in procs:
            log = p.log()
            assert "Traceback" not in log and "never retrieved" not in log, log
    finally:
        for p in procs:
            try:
                p.stop()
            except AssertionError:
                pass


async def _http(port: int, path: str, method: str = "GET", headers: str = "") -> tuple[int, str]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"{method} {path} HTTP/1.1\r\nHost: localhost\r\n{headers}\r\n".encode())
    data = await asyncio.wait_for(reader.read(), 10)
    writer.close()
    head, _, body = data.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


async def test_healthz_turns_503_when_the_database_or_the_listener_goes(tmp_path, caplog):
    h = NodeHarness(tmp_path / "n", copy_examples=False, metrics_listen="127.0.0.1:0")
    await h.start()
    try:
        port = h.node.metrics_server.port
        assert await _http(port, "/healthz") == (200, "ok\n")
        assert (await _http(port, "/healthz", "POST"))[0] == 405
        Scrape((await _http(port, "/metrics"))[1])            # parses
        # Garbage is answered 400, quietly: a request line over the reader's limit, and
        # an endless head.
        assert (await _http(port, "/" + "x" * 100_000))[0] == 400
        assert (await _http(port, "/healthz", headers="X-A: b\r\n" * 500))[0] == 400
        assert not [r for r in caplog.records if r.name == "asyncio"], caplog.text

        # The database goes away (its connection closed under the node): 503, and why.
        await h.node.storage.close()
        status, body = await _http(port, "/healthz")
        assert status == 503 and body.startswith("database unavailable"), (status, body)
        # It comes back: 200 again.
        await h.node.storage.open()
        assert await _http(port, "/healthz") == (200, "ok\n")

        # The node's own listener closes (as when it starts to stop): 503.
        h.node._server.close()
        await wait_for(lambda: not h.node._server.is_serving(), 5)
        assert await _http(port, "/healthz") == (503, "listener down\n")
    finally:
        await h.stop()
