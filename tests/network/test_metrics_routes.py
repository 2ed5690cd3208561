"""Metrics of forwarded requests: routed services get labels of their own, up to
``[metrics] max_remote_services``; the rest are counted under ``_other`` (issue 12)."""
from __future__ import annotations

from helpers import WHOAMI_SERVICE, fp, routes, wait_for
from utesla_node.metrics import OTHER


async def test_routed_services_get_labels_up_to_the_configured_number(net):
    a = await net.node("a", metrics_max_remote_services=2)
    names = ["svc1", "svc2", "svc3", "svc4"]
    b = await net.node("b", {n: WHOAMI_SERVICE for n in names})
    await net.link(a, b, service="svc1")
    await wait_for(lambda: all(routes(a, n) for n in names), 10)
    c = a.client()
    for n in names:
        for _ in range(2):
            assert (await c.get(f"/{n}")).text == fp(b)
    forwarded = a.node.metrics.forwarded
    labelled = sorted(svc for (svc, status) in forwarded if svc != OTHER)
    assert labelled == ["svc1", "svc2"]                 # the first two that saw traffic
    assert forwarded[("svc1", 200)] == forwarded[("svc2", 200)] == 2
    assert forwarded[(OTHER, 200)] == 4
    assert sum(a.node.metrics.requests.values()) == 8
    # b serves them itself: each has its own label there.
    assert sorted(svc for (svc, _) in b.node.metrics.requests if svc != "_node") == names
    page = await a.node.prometheus()
    assert 'service="svc3"' not in page and 'service="svc1"' in page
