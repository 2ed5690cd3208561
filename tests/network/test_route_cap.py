"""A peer offering more services than the routes-per-link cap (SPEC.md §9.2, §9.3).

The table is cut, never refused: both sides keep the best routes by hops, then name;
the subscriber tells its cap in the subscription and the publisher sends no more; the
link stays up, ``add_network --wait`` returns, and nothing re-subscribes in a loop.
An older publisher, which does not read the cap, sends it all: the subscriber cuts it
itself and re-subscribes with exponential backoff.
"""
from __future__ import annotations

import json
import logging
import time

from helpers import NodeProcess, fp, run_cli, wait_for
from utesla_node.network.gossip import GossipEngine

SERVICE = """class Handler:
    async def get(self):
        await self.write('{name}')
"""

#: 60 services; kept by name order, the first 50 are not s0..s49 (s50 < s6).
NAMES = [f"s{i}" for i in range(60)]
KEPT = sorted(NAMES)[:50]


def _services(folder) -> None:
    (folder / "complements").mkdir(parents=True)
    for name in NAMES:
        (folder / "complements" / f"{name}.py").write_text(SERVICE.format(name=name))


def _status(folder) -> dict:
    try:
        return json.loads((folder / "data" / "status.json").read_text())
    except (FileNotFoundError, ValueError):
        return {}


async def test_add_network_wait_succeeds_with_a_peer_over_the_cap(tmp_path):
    near, far = tmp_path / "near", tmp_path / "far"
    near.mkdir()
    _services(far)
    # Fast digests, so the window below sees many of them; a cap of 50 for 60 services.
    (near / "node.ini").write_text("[network]\nmax_routes_per_link = 50\n"
                                   "gossip_interval = 0.2\n")
    (far / "node.ini").write_text("[network]\ngossip_interval = 0.2\n")
    n_near, n_far = NodeProcess(near, "--port", "0"), NodeProcess(far, "--port", "0")
    try:
        n_near.start()
        n_far.start()
        url = f"utesla://127.0.0.1:{n_far.port}"
        run_cli("add", "-u", "near", "-p", "near-pw", "-i", "../near/keys/key.pub", cwd=far)
        token = run_cli("generate_token", url, "-u", "near", "-p", "near-pw",
                        "-s", "keys/key.pub", "-i", "../near/keys/key.pub",
                        "-I", "../near/keys/key.priv", cwd=far).stdout.strip()
        added = run_cli("add_network", url, "-s", "../far/keys/key.pub", "-p", "keys/key.pub",
                        "-P", "keys/key.priv", "-u", "near", "-t", token, "--wait",
                        "--wait-timeout", "60", cwd=near)
        assert f"link to {url} is up; 50 route(s) learned" in added.stdout, added.stdout

        # The kept routes are the deterministic set: one hop each, the first 50 by name.
        rows = json.loads(run_cli("show_services", "--json", cwd=near).stdout)
        assert sorted(r["path"] for r in rows) == sorted("/" + s for s in KEPT)
        assert all(r["hops"] == 1 for r in rows)

        # Watch a few seconds of digests (the status file is rewritten every second): the
        # link stays up, in step, on its first subscription.
        seen: list[float] = []

        def rewritten() -> bool:
            t = _status(near).get("updated")
            if t is not None and t not in seen:
                seen.append(t)
            return len(seen) >= 4

        await wait_for(rewritten, 30, interval=0.05)
        [link] = _status(near)["network"]["links"]
        assert link["state"] == "up" and link["synced"] and link["routes"] == 50
        assert link["last_error"] == ""
        assert n_near.stop() == 0 and n_far.stop() == 0
        far_log, near_log = n_far.log(), n_near.log()
        assert far_log.count("gossip subscriber near") == 1, far_log
        assert "takes at most 50 routes: it gets 50 of 60" in far_log
        assert near_log.count("offers 60 routes, over the cap of 50 per link") == 1, near_log
        assert "resubscribing" not in near_log and "dropped a gossip message" not in near_log
        for text in (far_log, near_log):
            assert "Traceback" not in text and token not in text
    finally:
        for n in (n_near, n_far):
            try:
                n.stop()
            except AssertionError:
                pass


async def test_an_older_publisher_over_the_cap_is_cut_here_and_resubscribed_with_backoff(
        net, caplog):
    caplog.set_level(logging.INFO, logger="utesla")
    near = await net.node("near", max_routes_per_link=50)
    far = await net.node("far", {n: SERVICE.format(name=n) for n in NAMES})
    fid = fp(far)
    engine = near.node.network.engine
    # The far node as an older version: it sends its whole table, whatever the cap.
    pub = far.node.network.engine
    pub.subscribe = lambda sub, now, max_routes=None: GossipEngine.subscribe(pub, sub, now)
    decided: list[float] = []                      # when near chose to re-subscribe
    resubscribing = engine.resubscribing
    engine.resubscribing = lambda peer, now: (decided.append(now), resubscribing(peer, now))

    await net.link(near, far)
    await wait_for(lambda: sorted(engine.learned.get(fid, {})) == KEPT, 20)
    # Its digest never matches what we keep: re-subscriptions, each wait twice the last
    # (gossip interval 0.2 s here), never one per interval.
    await wait_for(lambda: len(decided) >= 4, 30)
    lk = next(iter(near.node.network.links.values()))
    assert lk.state == "up" and lk.synced and lk.failures == 0
    waits = [b - a for a, b in zip(decided, decided[1:])]
    for k, w in enumerate(waits):
        assert w >= 0.2 * 2 ** k - 1e-6, waits
    assert sorted(engine.learned[fid]) == KEPT
    assert caplog.text.count("offers 60 routes, over the cap of 50 per link") == 1
    assert "dropped a gossip message" not in caplog.text
    # Requests reach the kept services; the ones cut are not routed.
    client = near.client()
    assert "s50" in KEPT and "s9" not in KEPT
    assert (await client.get("/s50")).text == "s50"
    assert engine.candidates("s9") == []
    assert lk.state == "up"


async def test_a_peer_of_10506_services_at_the_default_cap(net, caplog):
    """The issue's case at full size: 10,506 routes offered, 10,000 kept, one subscription.

    (The far node's table is set on its engine: 10,506 service modules would only slow
    the test down.  A slower heartbeat gives a loaded machine room: the routes expire
    after three heartbeats of silence.)
    """
    caplog.set_level(logging.INFO, logger="utesla")
    near = await net.node("near", heartbeat_interval=1.0)
    far = await net.node("far", heartbeat_interval=1.0)
    fid = fp(far)
    engine = near.node.network.engine
    assert engine.max_routes == 10000               # the default
    names = [f"service-{i:05d}" for i in range(10506)]
    far.node.network.engine.set_local(names, time.monotonic())
    subscriptions: list[int] = []
    pub = far.node.network.engine
    subscribe = pub.subscribe
    pub.subscribe = lambda *a: (subscriptions.append(1), subscribe(*a))[1]
    digests: list[int] = []
    receive = engine.receive
    engine.receive = lambda peer, msg, now: (digests.append(msg["t"] == "dig"),
                                             receive(peer, msg, now))

    await net.link(near, far)
    lk = next(iter(near.node.network.links.values()))
    await wait_for(lambda: lk.synced and len(engine.learned.get(fid, {})) == 10000, 30)
    assert sorted(engine.learned[fid]) == names[:10000]
    await wait_for(lambda: sum(digests) >= 10, 30)   # ten digests later: still in step
    assert subscriptions == [1] and lk.state == "up" and engine.resync == set()
    assert len(engine.learned[fid]) == 10000 and engine.rejected == 0
    assert caplog.text.count("offers 10506 routes, over the cap of 10000 per link") == 1
    assert "no gossip from" not in caplog.text and "resubscribing" not in caplog.text
    status = near.node.network.status()            # what status.json shows, every second
    assert len(status["routes"]) == 10000
    [origin] = [n for n in status["graph"]["nodes"] if n["id"] == fid]
    assert origin["services"] == names[:10000]
