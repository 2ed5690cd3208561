"""W5 gossip at scale: the real GossipEngine over a simulated transport and virtual clock.

    .venv/bin/python bench/gossip_sim.py              # 100, 300 and 1,000 nodes (< 2 min)
    .venv/bin/python bench/gossip_sim.py --quick      # 50, 100 and 200 nodes (< 20 s)
    .venv/bin/python bench/gossip_sim.py --sizes 1000 --topologies ring

No sockets and no sleeping: ``bench/_gossipsim.py`` delivers every message through
``encode_message``/``decode_message`` after a fixed per-link latency and polls each engine at
its ``next_deadline()`` on a virtual clock.  Subscriptions go both ways on every edge.  Node
ids are shaped like real fingerprints (50 characters), so byte counts are realistic.  Bytes
are gossip messages with their 4-byte length prefix (the session's record and stream
framing is not counted).  ``max_hops`` is raised to 1024 (the default is 8) so that even the
1,000-node line, diameter 999, is fully routable.

For every topology and size it reports:

* diameter (exact, BFS from every node);
* initial convergence: virtual time until the last snapshot/update when every node starts at
  once;
* new service: hops (the farthest node's best route, i.e. gossip rounds) and virtual time
  until every node has a route to a service added at one node after convergence; target
  ``diameter × digest_interval + 1 s``;
* dead node: virtual time until no node holds any route (best or alternate) whose path
  contains a node that has just died with all its links (its own services and every route
  through it);
* "(updates)": snapshots and updates sent network-wide for that change, until quiet (a
  dead node costs about one withdrawal per link that carried its routes thanks to the
  engine's ghost flushing; without it, stale paths were explored up to ``max_hops``:
  143,089 updates and 3.6 s for a 300-node random graph);
* at rest: messages and bytes per node per virtual second over ``--rest`` seconds after
  convergence (must be digests only, one per subscription per ``digest_interval``, so
  independent of the network size).

Every converged state is checked: each node's best route to each service has exactly the
BFS shortest-path hop count.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _gossipsim import (Sim, diameter, distances_to, fingerprint_id, line,  # noqa: E402
                        random_graph, ring)


def build(topology: str, n: int, rng: random.Random):
    if topology == "line":
        return line(n)
    if topology == "ring":
        return ring(n)
    if topology == "random":
        return random_graph(n, 4.0, rng)
    raise ValueError(topology)


def check_routes(sim: Sim, ids: list[str], placement: dict[str, str]) -> None:
    """Every node's best route to every service is a shortest path (BFS, subscription edges)."""
    for svc, origin in placement.items():
        dist = distances_to(sim.links, origin)
        for nid in sim.engines:
            best = sim.best(nid, svc)
            want = dist.get(nid)
            if nid == origin:
                continue
            got = None if best is None else best[1].hops
            if got != want:
                raise AssertionError(f"{nid[:12]} {svc}: {got} hops, BFS says {want}")
            if best is None:
                continue
            route = best[1]
            if nid in route.path or len(set(route.path)) != len(route.path):
                raise AssertionError(f"{nid[:12]} {svc}: looping route {route.path}")


def run_one(topology: str, n: int, *, services: int, seed: int, rest: float,
            digest_interval: float, latency: float, max_hops: int = 1024) -> dict:
    rng = random.Random(seed)
    edges = build(topology, n, rng)
    diam = diameter(n, edges)
    ids = [fingerprint_id(i) for i in range(n)]
    if max_hops < diam:
        raise SystemExit(f"--max-hops {max_hops} is below the {topology} {n} diameter {diam}")
    sim = Sim(latency=latency, max_hops=max_hops, digest_interval=digest_interval)
    wall = time.perf_counter()

    # Sparse placement: `services` nodes offer one service each; node 0 stays free for the
    # service added later (an end of the line: the worst case there).
    if topology == "random":
        hosts = rng.sample(range(1, n), services)
    else:
        hosts = [1 + (i * (n - 1)) // services + (n - 1) // (2 * services)
                 for i in range(services)]
    placement = {f"svc{i}": ids[h] for i, h in enumerate(hosts)}
    for i, nid in enumerate(ids):
        sim.add_node(nid)
    for svc, nid in placement.items():
        sim.set_services(nid, [svc])
    for a, b in edges:
        sim.connect(ids[a], ids[b])
    t_init = sim.settle(limit=max(60.0, 4 * diam * digest_interval))
    check_routes(sim, ids, placement)

    # At rest.
    sim.reset_stats()
    sim.run_for(rest)
    rest_msgs = sum(sim.msgs.values()) / n / rest
    rest_bytes = sum(sim.bytes.values()) / n / rest
    rest_max = max(sim.msgs[i] for i in ids) / rest
    digests_only = set(sim.kinds) <= {"dig"}
    subs_rate = sum(sim.subscriptions(i) for i in ids) / n / digest_interval

    # A new service at node 0: time until every node routes to it.
    origin = ids[0]
    missing = set(ids) - {origin}
    far = [0]

    def seen(nid: str) -> None:
        if nid in missing:
            best = sim.best(nid, "fresh")
            if best is not None:
                missing.discard(nid)
                far[0] = max(far[0], best[1].hops)

    sim.on_change = seen
    sim.reset_stats()
    t0 = sim.now
    sim.set_services(origin, ["fresh"])
    if not sim.run(t0 + 10 * diam * digest_interval + 10, stop=lambda: not missing):
        raise AssertionError(f"{len(missing)} node(s) never learned the new service")
    t_new = sim.now - t0
    sim.on_change = None
    sim.settle(limit=max(60.0, 4 * diam * digest_interval))
    new_msgs = sim.kinds["upd"] + sim.kinds["snap"]
    placement["fresh"] = origin
    check_routes(sim, ids, placement)

    # Kill the service host nearest the middle: its routes, and every route through it, go.
    victim_idx = min(hosts, key=lambda h: abs(h - n // 2))
    victim = ids[victim_idx]

    def via_victim(nid: str) -> bool:
        return any(victim in r.path for cands in sim.engines[nid].best.values()
                   for _, r in cands)

    stale = {nid for nid in ids if nid != victim and via_victim(nid)}
    had = len(stale)

    def watch(nid: str) -> None:
        if nid in sim.engines and via_victim(nid):
            stale.add(nid)
        else:
            stale.discard(nid)

    sim.on_change = watch
    sim.reset_stats()
    t0 = sim.now
    sim.kill(victim)
    if not sim.run(t0 + 10 * diam * digest_interval + 10, stop=lambda: not stale):
        raise AssertionError(f"{len(stale)} node(s) still route through the dead node")
    t_dead = sim.now - t0
    sim.on_change = None
    sim.settle(limit=max(60.0, 4 * diam * digest_interval))
    dead_msgs = sim.kinds["upd"] + sim.kinds["snap"]
    placement = {s: o for s, o in placement.items() if o != victim}
    check_routes(sim, ids, placement)

    return {"topology": topology, "n": n, "diameter": diam, "t_init": t_init,
            "new_hops": far[0], "t_new": t_new, "new_msgs": new_msgs,
            "target": diam * digest_interval + 1.0, "dead_had": had, "t_dead": t_dead,
            "dead_msgs": dead_msgs,
            "rest_msgs": rest_msgs, "rest_max": rest_max, "rest_bytes": rest_bytes,
            "subs_rate": subs_rate, "digests_only": digests_only,
            "wall": time.perf_counter() - wall}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="50, 100 and 200 nodes (< 20 s)")
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")],
                    help="comma-separated node counts (default 100,300,1000)")
    ap.add_argument("--topologies", default="line,ring,random",
                    help="comma-separated subset of line,ring,random")
    ap.add_argument("--services", type=int, default=8, help="nodes offering a service")
    ap.add_argument("--rest", type=float, default=10.0, help="virtual seconds measured at rest")
    ap.add_argument("--digest-interval", type=float, default=1.0)
    ap.add_argument("--latency", type=float, default=0.001, help="per-hop latency, seconds")
    ap.add_argument("--max-hops", type=int, default=1024,
                    help="engine hop limit (must cover the diameter; default 1024)")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    sizes = args.sizes or ([50, 100, 200] if args.quick else [100, 300, 1000])
    topologies = args.topologies.split(",")
    di = args.digest_interval

    print(f"# W5 gossip simulation: real GossipEngine, virtual clock, {args.latency * 1000:g} ms "
          f"per hop, digest_interval {di:g} s, min_update_interval 0.02 s, "
          f"max_hops {args.max_hops}, "
          f"{args.services} services, subscriptions both ways on every edge\n")
    cols = ["topology", "nodes", "diameter", "initial convergence (s)", "new service: hops",
            "new service (s)", "(updates)", "dead node gone (s)", "(updates)", "target (s)",
            "at rest msg/node/s", "(busiest node)", "at rest B/node/s", "digests only",
            "wall (s)"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "|".join("---" for _ in cols) + "|")
    results = []
    ok = True
    for topo in topologies:
        for n in sizes:
            r = run_one(topo, n, services=args.services, seed=args.seed, rest=args.rest,
                        digest_interval=di, latency=args.latency, max_hops=args.max_hops)
            results.append(r)
            print(f"| {topo} | {n} | {r['diameter']} | {r['t_init']:.3f} | {r['new_hops']} | "
                  f"{r['t_new']:.3f} | {r['new_msgs']} | {r['t_dead']:.3f} | "
                  f"{r['dead_msgs']} | {r['target']:.0f} | "
                  f"{r['rest_msgs']:.2f} | {r['rest_max']:.1f} | {r['rest_bytes']:.1f} | "
                  f"{'yes' if r['digests_only'] else 'NO'} | {r['wall']:.1f} |", flush=True)

    print("\n## Targets\n")
    for r in results:
        good = r["t_new"] <= r["target"] and r["t_dead"] <= r["target"]
        ok &= good
        print(f"- {r['topology']} {r['n']}: new service everywhere in {r['t_new']:.3f} s, "
              f"dead node's routes gone everywhere in {r['t_dead']:.3f} s, target "
              f"diameter x digest_interval + 1 s = {r['target']:.0f} s: "
              f"{'met' if good else 'MISSED'}")
    for topo in topologies:
        rows = [r for r in results if r["topology"] == topo]
        for r in rows:
            # At rest each node sends one digest per subscriber per interval: the per-node
            # rate is the mean subscription count over the interval, whatever the size.
            exact = abs(r["rest_msgs"] - r["subs_rate"]) <= 0.02 * r["subs_rate"] + 1e-9
            ok &= exact and r["digests_only"]
        rates = [r["rest_msgs"] for r in rows]
        brates = [r["rest_bytes"] for r in rows]
        flat = all(b <= a * 1.10 + 0.05 for a, b in zip(rates, rates[1:])) and \
            all(b <= a * 1.10 + 2 for a, b in zip(brates, brates[1:]))
        ok &= flat
        print(f"- {topo}: at-rest per-node rate over sizes {[r['n'] for r in rows]}: "
              f"{' -> '.join(f'{x:.2f}' for x in rates)} msg/s, "
              f"{' -> '.join(f'{x:.1f}' for x in brates)} B/s: "
              f"{'does not grow' if flat else 'GROWS'}; digests only, one per subscription "
              f"per interval: {'yes' if all(r['digests_only'] for r in rows) else 'NO'}")
    print(f"\nall targets {'met' if ok else 'NOT met'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
