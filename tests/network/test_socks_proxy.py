"""Links and clients through a real SOCKS5 proxy (Debian's dante, started per test).

Node A reaches node B only through ``danted`` on loopback: the link comes up and
forwards requests, and dante's own log shows the connection it made to B.  With the
proxy down the link says why and backs off; with a user name and password (dante's
``username`` method, against a system account made for the test, as root) it works,
and a wrong password is a clear error that never shows the password.
"""
from __future__ import annotations

import asyncio
import json
import logging
import time

import pytest

from dante_server import Dante, system_user
from helpers import (NET_FAST, WHOAMI_SERVICE as WHOAMI, NodeProcess, fp, link_state, routes,
                     run_cli, user_key, wait_for)
from protocol.errors import Unavailable
from utesla_node.client import Client
from utesla_node.network.links import BACKOFF_MIN
from utesla_node.proxy import DIRECT, Proxy, ProxyError, choose, parse_proxy, redact


# --------------------------------------------------------------------------- proxy URLs

def test_proxy_urls_parse_and_never_show_their_password():
    p = parse_proxy("socks5h://me:s%40cret@127.0.0.1:9050")
    assert (p.host, p.port, p.username, p.password, p.remote_dns) == (
        "127.0.0.1", 9050, "me", "s@cret", True)
    assert "cret" not in repr(p) and "cret" not in str(p)
    assert str(p) == "socks5h://me:***@127.0.0.1:9050"
    assert parse_proxy("socks5://[::1]:1080").remote_dns is False
    assert str(parse_proxy("socks5://[::1]:1080")) == "socks5://[::1]:1080"
    assert parse_proxy("") is None and parse_proxy(None) is None
    assert parse_proxy(" Direct ") is None
    assert redact("socks5h://u:pw@h:1") == "socks5h://u:***@h:1"
    assert redact("socks5h://h:1") == "socks5h://h:1"


@pytest.mark.parametrize("text,words", [
    ("http://u:TOPSECRET@h:1", "unsupported scheme 'http'"),
    ("socks5h://u:TOPSECRET@h", "names no port"),
    ("socks5h://u:TOPSECRET@:1080", "names no host"),
    ("socks5h://u:TOPSECRET@h:99999", "not a URL"),
    ("socks5h://u:TOPSECRET@h:1/path", "no path"),
    ("socks5h://:TOPSECRET@h:1", "user name must be 1 to 255 bytes"),
    ("127.0.0.1:9050", "unsupported scheme"),
])
def test_a_bad_proxy_is_refused_in_words_without_its_password(text, words):
    with pytest.raises(ValueError) as info:
        parse_proxy(text)
    assert words in str(info.value)
    assert "TOPSECRET" not in str(info.value)


def test_a_peer_proxy_wins_over_the_nodes_and_direct_means_none():
    node = "socks5h://127.0.0.1:9050"
    assert choose("", node) == parse_proxy(node)
    assert choose("socks5://127.0.0.1:1", node) == Proxy("127.0.0.1", 1, remote_dns=False)
    assert choose(DIRECT, node) is None
    assert choose("", "") is None


# --------------------------------------------------------------------------- fixtures

@pytest.fixture
def dante(tmp_path):
    servers: list[Dante] = []

    async def start(method: str = "none", name: str = "dante") -> Dante:
        d = Dante(tmp_path / name, method)
        servers.append(d)
        return await asyncio.to_thread(d.start)

    yield start
    for d in servers:
        d.stop()


async def _two_nodes(net, proxy: str):
    """A (whose links go through ``proxy``) and B (with /whoami); A not yet linked."""
    b = await net.node("B", {"whoami": WHOAMI})
    a = await net.node("A", proxy=proxy)
    return a, b


# --------------------------------------------------------------------------- through dante

async def test_a_link_through_dante_forwards_requests_and_dante_saw_it(net, dante):
    d = await dante()
    a, b = await _two_nodes(net, d.url)
    await net.link(a, b, service="whoami", timeout=20)
    link = a.node.network.links[b.url]
    assert str(link.proxy) == d.url
    assert (await a.client().get("/whoami")).text == fp(b)
    # The connection to B went through dante: its log has the connect it made to B's port.
    await wait_for(lambda: d.connections_to(b.port), 10)
    assert link_state(a, b.url) == "up"


async def test_with_the_proxy_down_the_link_says_so_and_backs_off(net, tmp_path, caplog):
    dead = Dante(tmp_path / "never-started")             # a free port nobody listens on
    a, b = await _two_nodes(net, dead.url)
    t0 = time.monotonic()
    await net.link(a, b, wait=False)
    await wait_for(lambda: b.url in a.node.network.links, 10)
    link = a.node.network.links[b.url]
    await wait_for(lambda: link.failures >= 2, 20)
    assert link.state in ("backoff", "connecting") and not link.up
    assert f"cannot reach the proxy {dead.url}" in link.last_error, link.last_error
    assert "refused" in link.last_error.lower()
    # Backoff: attempt n+1 comes at least BACKOFF_MIN * 2**(n-1) / 2 after attempt n, so
    # in ``elapsed`` seconds there can be no more attempts than that schedule allows
    # (a hot loop would have made thousands).
    failures = link.failures
    elapsed = time.monotonic() - t0
    allowed, waited = 1, 0.0
    while True:
        waited += BACKOFF_MIN * 2 ** (allowed - 1) * 0.5
        if waited > elapsed:
            break
        allowed += 1
    assert failures <= allowed, (failures, elapsed)
    logged = [r.getMessage() for r in caplog.records if r.name == "utesla.link"]
    assert any("cannot reach the proxy" in m for m in logged), logged

    # The proxy comes up: the link recovers by itself, through it.
    d = Dante(tmp_path / "late", port=dead.port)
    await asyncio.to_thread(d.start)
    try:
        await wait_for(lambda: link_state(a, b.url) == "up", 60)
        await wait_for(lambda: routes(a, "whoami"), 20)
        assert (await a.client().get("/whoami")).text == fp(b)
        await wait_for(lambda: d.connections_to(b.port), 10)
    finally:
        d.stop()


async def test_user_and_password_at_the_proxy(net, dante, caplog):
    with system_user() as (name, password):
        d = await dante("username")
        a, b = await _two_nodes(net, d.url_with(name, password))
        await net.link(a, b, service="whoami", timeout=20)
        assert (await a.client().get("/whoami")).text == fp(b)
        await wait_for(lambda: d.connections_to(b.port), 10)
        assert password not in json.dumps(a.node.network.links[b.url].describe())

        # A client (a script's Client, then utesla-cli) through the same proxy.
        b_key = b.key.public
        async with Client(b.url, user="alice", private_key=b.keys["alice"], node_key=b_key,
                          token=b.tokens["alice"], proxy=d.url_with(name, password)) as c:
            assert (await c.get("/whoami")).text == fp(b)
        with pytest.raises(Unavailable) as info:
            async with Client(b.url, user="alice", private_key=b.keys["alice"],
                              node_key=b_key, token=b.tokens["alice"],
                              proxy=d.url_with(name, "wrong")):
                pass
        assert "refused the user name or password" in str(info.value)
        assert "wrong" not in str(info.value)


async def test_a_wrong_proxy_password_is_a_clear_error(net, dante, caplog):
    with system_user() as (name, password):
        d = await dante("username")
        bad = "Wr0ng-" + password
        a, b = await _two_nodes(net, d.url_with(name, bad))
        await net.link(a, b, wait=False)
        await wait_for(lambda: b.url in a.node.network.links, 10)
        link = a.node.network.links[b.url]
        await wait_for(lambda: link.failures >= 1, 20)
        assert link.last_error == (f"ConnectionLost: proxy socks5h://{name}:***@127.0.0.1:"
                                   f"{d.port} refused the user name or password"), \
            link.last_error
        assert not link.up
        shown = caplog.text + json.dumps(link.describe())
        assert bad not in shown and password not in shown
        # No password at all, where one is wanted: said too.
        with pytest.raises(Unavailable, match="wants a user name and password"):
            async with Client(b.url, user="alice", private_key=b.keys["alice"],
                              node_key=b.key.public, token=b.tokens["alice"], proxy=d.url):
                pass


# --------------------------------------------------------------------------- the console scripts

HELLO_FRIEND = """class handler:
    async def get(self):
        await self.write('hello friend!')
"""


async def test_the_blogs_network_through_dante_with_the_console_scripts(tmp_path, dante):
    """add_network --proxy: the check and the link go through dante; utesla-cli call
    --proxy and UTESLA_PROXY reach a node through it; a dead proxy is one clear line."""
    d = await dante()
    first, second, user_dir = tmp_path / "first", tmp_path / "second", tmp_path / "client"
    for folder in (first, second, user_dir):
        folder.mkdir()
    (first / "complements").mkdir()
    (second / "complements").mkdir()
    (second / "complements" / "hello_friend.py").write_text(HELLO_FRIEND)
    n1, n2 = NodeProcess(first, "--port", "0"), NodeProcess(second, "--port", "0")
    try:
        await asyncio.to_thread(n1.start)
        await asyncio.to_thread(n2.start)
        url1, url2 = f"utesla://127.0.0.1:{n1.port}", f"utesla://127.0.0.1:{n2.port}"

        def cli(*args, cwd, check=True, env=None):
            return run_cli(*args, cwd=cwd, check=check, env=env, timeout=60)

        await asyncio.to_thread(cli, "add", "-u", "utesla", "-p", "friend-pw", "-i",
                                "../first/keys/key.pub", cwd=second)
        token = (await asyncio.to_thread(
            cli, "generate_token", url2, "-u", "utesla", "-p", "friend-pw", "-s",
            "keys/key.pub", "-i", "../first/keys/key.pub", "-I", "../first/keys/key.priv",
            "--proxy", d.url, cwd=second)).stdout.strip()
        assert token.startswith("ut1_")
        await wait_for(lambda: d.connections_to(n2.port), 10)   # generate_token went via dante

        added = await asyncio.to_thread(
            cli, "add_network", url2, "-s", "../second/keys/key.pub", "-u", "utesla",
            "-t", token, "--proxy", d.url, "--wait", "--wait-timeout", "30", cwd=first)
        assert f"through {d.url}" in added.stdout and "is up" in added.stdout
        shown = await asyncio.to_thread(cli, "show_networks", "--json", cwd=first)
        assert json.loads(shown.stdout)[0]["proxy"] == d.url
        await wait_for(lambda: len(d.connections_to(n2.port)) >= 3, 10)  # token, check, link

        await asyncio.to_thread(cli, "generate_keys", "-out-public-key", "alice.pub",
                                "-out-private-key", "alice.priv", cwd=user_dir)
        await asyncio.to_thread(cli, "add", "-u", "alice", "-p", "alice-pw", "-i",
                                "../client/alice.pub", cwd=first)
        alice = (await asyncio.to_thread(
            cli, "generate_token", url1, "-u", "alice", "-p", "alice-pw", "-s",
            "../first/keys/key.pub", "-i", "alice.pub", "-I", "alice.priv",
            cwd=user_dir)).stdout.strip()

        async def routed() -> bool:
            r = await asyncio.to_thread(cli, "call", f"{url1}/hello_friend", "-u", "alice",
                                        "-I", "alice.priv", "-s", "../first/keys/key.pub",
                                        "-t", alice, cwd=user_dir, check=False,
                                        env={"UTESLA_PROXY": d.url})
            return r.returncode == 0 and r.stdout == "hello friend!"

        await wait_for(routed, 30, interval=0.2)
        await wait_for(lambda: d.connections_to(n1.port), 10)   # the call too (UTESLA_PROXY)

        d.stop()
        dead = await asyncio.to_thread(
            cli, "call", f"{url1}/hello_friend", "-u", "alice", "-I", "alice.priv", "-s",
            "../first/keys/key.pub", "-t", alice, "--proxy", d.url, cwd=user_dir, check=False)
        assert dead.returncode == 1
        assert dead.stderr.startswith(f"error: cannot connect to 127.0.0.1:{n1.port}: cannot "
                                      f"reach the proxy {d.url}"), dead.stderr
        assert "Traceback" not in dead.stderr
    finally:
        for n in (n1, n2):
            n.stop()
            if n.proc is not None:
                n.proc.stdout.close()
