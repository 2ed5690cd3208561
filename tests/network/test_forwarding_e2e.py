"""The network end to end: the blog's second scenario through the real console scripts,
and failures (crashes, restarts, replicas, cut links, hostile peers) on in-process nodes.

Every wait is on a condition with a bound; every fault is injected a bounded number of
times.  The fault proxy (``faultproxy.py``) sits between two nodes where a test needs to
cut, delay or reset a link.
"""
from __future__ import annotations

import asyncio
import json
import logging
import subprocess
import sys
import time

import pytest

from helpers import (NET_FAST, TICKER_SERVICE as TICKER, WHOAMI_SERVICE as WHOAMI,
                     NodeProcess, fp, link_state, routes, run_cli, wait_for)
from protocol.errors import NotFound, StatusError, Unavailable
from utesla_node.network.gossip import Route, digest, encode_message
from utesla_node.network.links import LEN

HELLO_FRIEND = """class handler:
    async def get(self):
        await self.write('hello friend!')
"""

#: The blog's client script; only the import line changed (and the placeholders filled in).
BLOG_CLIENT = """import asyncio
from utesla_node import client
async def main():
    UTeslaClient = client.UTeslaClient('{user}')
    await UTeslaClient.set_server_key('{server_key}')
    await UTeslaClient.set_user_keys('{public}', '{private}')
    cmd = {{
        'token' : '{token}'
    }}
    Response = await UTeslaClient.fetch(
        'http://localhost:{port}/hello_friend',
        cmd,
        method='GET'
    )
    dec_body = UTeslaClient.get_message(Response.body)
    print(dec_body)
if __name__ == '__main__':
    asyncio.run(main())
"""


# --------------------------------------------------------------------------- the blog

async def test_blog_second_scenario_through_the_console_scripts(tmp_path):
    first, second, user_dir = tmp_path / "first", tmp_path / "second", tmp_path / "client"
    for d in (first, second, user_dir):
        d.mkdir()
    (second / "complements").mkdir()
    (second / "complements" / "hello_friend.py").write_text(HELLO_FRIEND)
    (first / "complements").mkdir()

    outputs: list[str] = []          # every CLI output after the peer token exists

    def cli(*args, cwd, check=True):
        proc = run_cli(*args, cwd=cwd, check=check, timeout=60)
        outputs.append(proc.stdout + proc.stderr)
        return proc

    n1 = NodeProcess(first, "--port", "0")
    n2 = NodeProcess(second, "--port", "0")
    try:
        n1.start()
        n2.start()
        url1, url2 = f"utesla://127.0.0.1:{n1.port}", f"utesla://127.0.0.1:{n2.port}"
        assert (first / "keys" / "key.pub").exists() and (second / "keys" / "key.pub").exists()

        # The admin of the second node registers 'utesla' with the FIRST node's public key ...
        run_cli("add", "-u", "utesla", "-p", "friend-pw", "-i", "../first/keys/key.pub",
                cwd=second)
        # ... and a token is issued for it (the first node's keys prove the account).
        token = run_cli("generate_token", url2, "-u", "utesla", "-p", "friend-pw",
                        "-s", "keys/key.pub", "-i", "../first/keys/key.pub",
                        "-I", "../first/keys/key.priv", cwd=second).stdout.strip()
        assert token.startswith("ut1_")

        # A wrong token, or a wrong peer key: exit 1, nothing stored.
        bad = cli("add_network", url2, "-s", "../second/keys/key.pub", "-p", "keys/key.pub",
                  "-P", "keys/key.priv", "-u", "utesla", "-t", "ut1_" + "B" * 43,
                  cwd=first, check=False)
        assert bad.returncode == 1, bad.stderr
        assert bad.stderr.startswith("error:") and "Traceback" not in bad.stderr
        wrong_key = cli("add_network", url2, "-s", "keys/key.pub", "-p", "keys/key.pub",
                        "-P", "keys/key.priv", "-u", "utesla", "-t", token,
                        cwd=first, check=False)
        assert wrong_key.returncode == 1, wrong_key.stderr
        assert "Traceback" not in wrong_key.stderr
        assert json.loads(cli("show_networks", "--json", cwd=first).stdout) == []

        # The first node's admin links it to the second, exactly as the blog does.
        cli("add_network", url2, "-s", "../second/keys/key.pub", "-p", "keys/key.pub",
            "-P", "keys/key.priv", "-u", "utesla", "-t", token, cwd=first)
        t0 = time.monotonic()

        def routed() -> bool:
            """What show_services prints: the state file the running node keeps."""
            try:
                state = json.loads((first / "data" / "status.json").read_text())
            except (FileNotFoundError, ValueError):
                return False
            return any(r["path"] == "/hello_friend"
                       for r in state.get("network", {}).get("routes", []))

        # Picked up by the running node, no restart: it polls its peers table every second
        # and rewrites its state file every second (2 s by design; 1 s of slack here for a
        # loaded machine).
        await wait_for(routed, 15, interval=0.02)
        took = time.monotonic() - t0
        assert took < 3.0, took

        def listed() -> bool:
            rows = json.loads(cli("show_services", "--json", cwd=first).stdout)
            return any(r["path"] == "/hello_friend" and r["hops"] == 1 for r in rows)

        assert listed()
        services = cli("show_services", cwd=first).stdout
        assert "/hello_friend" in services and url2 in services

        # A user of the first node, with the blog's commands.
        cli("generate_keys", "-out-public-key", "alice.pub", "-out-private-key", "alice.priv",
            cwd=user_dir)
        cli("add", "-u", "alice", "-p", "alice-pw", "-i", "../client/alice.pub", cwd=first)
        alice_token = cli("generate_token", url1, "-u", "alice", "-p", "alice-pw",
                          "-s", "../first/keys/key.pub", "-i", "alice.pub", "-I", "alice.priv",
                          cwd=user_dir).stdout.strip()
        outputs.pop()                # that one prints alice's token, by design

        script = user_dir / "client.py"
        script.write_text(BLOG_CLIENT.format(user="alice", server_key="../first/keys/key.pub",
                                             public="alice.pub", private="alice.priv",
                                             token=alice_token, port=n1.port))
        run = subprocess.run([sys.executable, str(script)], cwd=user_dir, capture_output=True,
                             text=True, timeout=60)
        assert run.returncode == 0, run.stderr
        assert run.stdout == "hello friend!\n"

        # show_networks: the link is up; the token is never printed.
        def up() -> bool:
            rows = json.loads(cli("show_networks", "--json", cwd=first).stdout)
            return len(rows) == 1 and rows[0]["state"] == "up"

        await wait_for(up, 10, interval=0.05)
        table = cli("show_networks", cwd=first).stdout
        assert url2 in table and " up " in table and "utesla" in table

        # del_network: the link and its routes go away, still without a restart.
        cli("del_network", url2, cwd=first)
        await wait_for(lambda: not routed(), 10, interval=0.02)
        assert not listed()
        assert json.loads(cli("show_networks", "--json", cwd=first).stdout) == []
        gone = subprocess.run([sys.executable, str(script)], cwd=user_dir, capture_output=True,
                              text=True, timeout=60)
        assert gone.returncode == 0 and "hello friend" not in gone.stdout

        # Linked again with --wait: the command returns once the running node has the link
        # up and the peer's table, so the very next command already sees the route.
        again = cli("add_network", url2, "-s", "../second/keys/key.pub", "-p", "keys/key.pub",
                    "-P", "keys/key.priv", "-u", "utesla", "-t", token, "--wait", cwd=first)
        assert f"link to {url2} is up; 1 route(s) learned" in again.stdout, again.stdout
        assert routed() and listed()

        # --wait on a link that cannot come up (an account that may check the peer but not
        # subscribe to its routes): exit 1 after the timeout, naming the link's last error.
        run_cli("add", "-u", "narrow", "-p", "narrow-pw", "-i", "../first/keys/key.pub",
                "--guest", "--scope", "_node/net/status", cwd=second)
        narrow = run_cli("generate_token", url2, "-u", "narrow", "-p", "narrow-pw",
                         "-s", "keys/key.pub", "-i", "../first/keys/key.pub",
                         "-I", "../first/keys/key.priv", cwd=second).stdout.strip()
        stuck = cli("add_network", url2, "-s", "../second/keys/key.pub", "-p", "keys/key.pub",
                    "-P", "keys/key.priv", "-u", "narrow", "-t", narrow, "--overwrite",
                    "--wait", "--wait-timeout", "3", cwd=first, check=False)
        assert stuck.returncode == 1, stuck.stdout + stuck.stderr
        assert f"error: link to {url2} not up after 3 s" in stuck.stderr, stuck.stderr
        assert "refused the gossip subscription" in stuck.stderr, stuck.stderr
        cli("del_network", url2, cwd=first)

        for out in outputs:
            assert token not in out
        assert n1.stop() == 0 and n2.stop() == 0
        for log in (n1.log(), n2.log()):
            assert token not in log and alice_token not in log
            assert "Traceback" not in log and "never retrieved" not in log, log
    finally:
        for n in (n1, n2):
            try:
                n.stop()
            except AssertionError:
                pass


# --------------------------------------------------------------------------- crashes

async def test_far_node_killed_mid_stream_gives_a_clear_error_not_a_hang(net):
    a = await net.node("a", examples=True)
    b = await net.node("b", {"ticker": TICKER})
    c = await net.node("c", {"whoami": WHOAMI})
    await net.link(a, b, service="ticker")
    await net.link(a, c, service="whoami")
    client = a.client()

    received = []
    with pytest.raises(StatusError) as info:
        async with client.stream("GET", "/ticker", args={"n": 2000, "delay": 0.005},
                                 timeout=10) as resp:
            async for chunk in resp:
                received.append(chunk)
                if len(received) == 5:
                    await net.kill(b)          # while the answer is flowing
    assert isinstance(info.value, Unavailable), repr(info.value)
    assert 5 <= len(received) < 2000
    assert "fail" in str(info.value) or "lost" in str(info.value), str(info.value)

    # The entry node withdraws the dead node's routes, and keeps serving everything else.
    await wait_for(lambda: not routes(a, "ticker"), 5)
    assert (await client.get("/whoami")).text == fp(c)
    assert (await client.get("/hello_world")).text == "Hello World!"
    with pytest.raises((NotFound, Unavailable)):
        await client.get("/ticker", args={"n": 1})


async def test_node_restarted_on_the_same_port_and_folder_comes_back(net):
    a = await net.node("a")
    b = await net.node("b", {"whoami": WHOAMI})
    await net.link(a, b, service="whoami")
    client = a.client()
    before = (await client.get("/whoami")).text
    port = b.port
    await net.kill(b)
    await wait_for(lambda: not routes(a, "whoami"), 5)

    b2 = await net.restart(b)                     # same keys, same database, same port
    assert b2.port == port and fp(b2) == before
    await wait_for(lambda: routes(a, "whoami"), 15)
    assert link_state(a, f"utesla://127.0.0.1:{port}") == "up"
    assert (await client.get("/whoami")).text == before


# --------------------------------------------------------------------------- replicas

async def test_replicas_share_the_load_and_fail_over(net):
    a = await net.node("a")
    b = await net.node("b", {"who": WHOAMI})
    c = await net.node("c", {"who": WHOAMI})
    await net.link(a, b)
    await net.link(a, c)
    await wait_for(lambda: len(routes(a, "who")) == 2, 10)
    client = a.client()

    # Sequential and concurrent requests both spread over the two replicas.
    seen = [(await client.get("/who")).text for _ in range(30)]
    seen += [r.text for r in await asyncio.gather(*(client.get("/who") for _ in range(30)))]
    counts = {fp(b): seen.count(fp(b)), fp(c): seen.count(fp(c))}
    assert sum(counts.values()) == 60 and min(counts.values()) >= 5, counts

    # c dies while requests are waiting on it: each is retried on b (GET is replayable).
    pending = [asyncio.ensure_future(client.get("/who", args={"delay": 0.5}))
               for _ in range(20)]
    await wait_for(lambda: c.node.inflight > 0 and b.node.inflight > 0, 5)
    await net.kill(c)
    answers = [r.text for r in await asyncio.wait_for(asyncio.gather(*pending), 15)]
    # Those that had reached c before it died were answered by b, not failed.
    assert answers == [fp(b)] * 20

    # And afterwards, every request succeeds on the survivor.
    after = await asyncio.gather(*(client.get("/who") for _ in range(20)))
    assert {r.text for r in after} == {fp(b)}
    await wait_for(lambda: len(routes(a, "who")) == 1, 5)


# --------------------------------------------------------------------------- cut links

async def test_link_cut_by_a_blackhole_is_detected_and_heals(net):
    a = await net.node("a", examples=True)
    b = await net.node("b", {"whoami": WHOAMI})
    proxy = await net.proxy(b)
    await net.link(a, b, url=proxy.url, service="whoami")
    client = a.client()
    assert (await client.get("/whoami")).text == fp(b)

    # Latency alone does not break the link.
    proxy.set_mode("delay", 40)
    t0 = time.monotonic()
    assert (await client.get("/whoami")).text == fp(b)
    assert time.monotonic() - t0 >= 0.08           # two crossings, 40 ms each
    proxy.set_mode("pass")

    # Cut: nothing crosses any more.  Heartbeats notice, routes are withdrawn.
    t_cut = time.monotonic()
    proxy.set_mode("blackhole")
    await wait_for(lambda: link_state(a, proxy.url) != "up", 5)
    await wait_for(lambda: not routes(a, "whoami"), 5)
    detected = time.monotonic() - t_cut
    assert detected < 4.0, detected
    with pytest.raises((NotFound, Unavailable)):
        await client.get("/whoami")
    assert (await client.get("/hello_world")).text == "Hello World!"   # a itself is fine

    # Heal: the link comes back by itself (backoff) and so do the routes.
    accepted = proxy.accepted
    proxy.set_mode("pass")
    await wait_for(lambda: link_state(a, proxy.url) == "up" and routes(a, "whoami"), 15)
    assert proxy.accepted > accepted
    assert (await client.get("/whoami")).text == fp(b)


async def test_link_reset_and_refused_then_reconnects(net):
    a = await net.node("a")
    b = await net.node("b", {"whoami": WHOAMI})
    proxy = await net.proxy(b)
    await net.link(a, b, url=proxy.url, service="whoami")
    lk = a.node.network.links[proxy.url]

    # RST on the open link, and every new connection closed at once: the link keeps
    # trying (a bounded number of times here), never reports 'up', withdraws routes.
    proxy.set_mode("reset")
    await wait_for(lambda: lk.state != "up" and not routes(a, "whoami"), 5)
    proxy.set_mode("drop")
    tries = proxy.accepted
    await wait_for(lambda: proxy.accepted >= tries + 2 and lk.failures >= 2, 10)
    assert lk.state != "up" and lk.last_error

    proxy.set_mode("pass")
    await wait_for(lambda: lk.state == "up" and routes(a, "whoami"), 15)
    assert lk.failures == 0
    assert (await a.client().get("/whoami")).text == fp(b)


# --------------------------------------------------------------------------- hostile peers

def _frame(obj) -> bytes:
    data = obj if isinstance(obj, bytes) else encode_message(obj)
    return LEN.pack(len(data)) + data


async def test_peer_announcing_garbage_and_floods_is_contained(net, caplog):
    caplog.set_level(logging.WARNING, logger="utesla.link")
    a = await net.node("a", examples=True)
    f = await net.node("f", {"fakesvc": WHOAMI})
    fid = fp(f)
    engine = a.node.network.engine
    engine.max_routes = cap = 1000          # the per-peer cap (10 000 by default)
    calls: list[int] = []                    # routes a held from f at each new subscription
    stop = asyncio.Event()
    # Long names (8 segments of 64 characters): a full table no longer fits in one stream
    # window, so the snapshot reaches a in several chunks.
    long = "/".join(["x" * 60] * 7)

    def route(svc: str) -> Route:
        return Route(svc, fid, 1, (fid,))

    async def hostile_serve_routes(session, stream, writer):
        """f's routes stream, replaced: a different kind of abuse per subscription."""
        calls.append(len(engine.learned.get(fid, {})))
        n = len(calls)
        if n == 1:       # a snapshot over the per-peer cap (and a bad digest): cut
            big = [route(f"s{i}").to_wire() for i in range(cap + 1)]
            await writer.write(_frame({"t": "snap", "r": big, "d": bytes(16)}))
        elif n == 2:     # malformed messages of every kind, in one burst
            d = bytes(16)
            junk = [
                b"\xc1",                                               # not msgpack
                encode_message([1, 2, 3]),                             # not a map
                {"t": "nope", "d": d},                                 # unknown kind
                {"t": "snap", "r": [], "d": b"short"},                 # bad digest
                {"t": "snap", "r": [["bad name!", fid, 1, [fid]]], "d": d},
                {"t": "snap", "r": [["svc", fid, 1, ["someone-else"]]], "d": d},
                {"t": "snap", "r": [["svc", fid, 1, [fid, fid]]], "d": d},
                {"t": "upd", "r": [], "w": ["../etc"], "d": d},
                {"t": "snap", "r": [["svc", fid, -1, [fid]]], "d": d},
                encode_message({"t": "dig", "d": d}) + b"trailing",
            ]
            await writer.write(b"".join(_frame(j) for j in junk))
        elif n == 3:     # a full (valid) table in several chunks, then a flood past the cap
            table = {r.service: r for r in (route(f"t{i}/{long}") for i in range(cap))}
            snap = _frame({"t": "snap", "r": [r.to_wire() for r in table.values()],
                           "d": digest(table)})
            assert len(snap) > 2 * a.node.config.stream_window
            await writer.write(snap)
            batch = [route(f"u{i}") for i in range(300)]
            table.update({r.service: r for r in batch})
            await writer.write(_frame({"t": "upd", "r": [r.to_wire() for r in batch],
                                       "w": [], "d": digest(table)}))
        else:            # well-behaved from now on
            table = {"fakesvc": route("fakesvc")}
            await writer.write(_frame({"t": "snap", "r": [r.to_wire() for r in table.values()],
                                       "d": digest(table)}))
            for _ in range(600):                     # bounded: a minute at most
                await writer.flush()
                try:
                    await asyncio.wait_for(stop.wait(), NET_FAST["gossip_interval"])
                    return
                except asyncio.TimeoutError:
                    pass
                await writer.write(_frame({"t": "dig", "d": digest(table)}))
            return
        await writer.flush()
        await asyncio.wait_for(stop.wait(), 30)     # hold the stream; a re-subscribes

    f.node.network.serve_routes = hostile_serve_routes
    try:
        await net.link(a, f, wait=False)
        await wait_for(lambda: len(calls) >= 4 and routes(a, "fakesvc"), 30)
        lk = next(iter(a.node.network.links.values()))
        assert lk.state == "up"
        # The over-cap snapshot was cut to the cap, not refused; the multi-chunk snapshot
        # was taken whole, the flood past the cap was cut.
        assert calls[1] == cap and calls[3] == cap, calls
        assert "offers 1001 routes, over the cap of 1000" in caplog.text
        assert engine.rejected >= 1 + 300
        assert all(len(t) <= cap for t in engine.learned.values())
        # The junk was counted and logged, one line each.
        assert a.node.metrics.counters["gossip_rejected"] >= 10
        assert caplog.text.count("dropped a gossip message") >= 10
        # The flood is gone (the fresh snapshot replaced it) and requests work.
        await wait_for(lambda: len(engine.learned.get(fid, {})) == 1, 5)
        client = a.client()
        assert (await client.get("/fakesvc")).text == fid
        assert (await client.get("/hello_world")).text == "Hello World!"
        assert lk.state == "up"
    finally:
        stop.set()
