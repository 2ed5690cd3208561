"""Counters and latency histograms, exported as JSON and Prometheus text."""
from __future__ import annotations

import bisect
import collections

__all__ = ["Metrics", "BUCKETS"]

#: Latency histogram bucket bounds, seconds.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
           10.0, 30.0)


class _Histogram:
    __slots__ = ("counts", "total", "n")

    def __init__(self):
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0
        self.n = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds
        self.n += 1


class Metrics:
    """Process-wide counters; cheap enough to update on every request."""

    def __init__(self):
        self.counters: collections.Counter[str] = collections.Counter()
        self.requests: collections.Counter[tuple[str, int]] = collections.Counter()
        self.latency: dict[str, _Histogram] = collections.defaultdict(_Histogram)
        self._service: dict[str, str] = {}
        self.forwarded: collections.Counter[tuple[str, int]] = collections.Counter()
        self.other_latency: dict[str, _Histogram] = collections.defaultdict(_Histogram)

    def incr(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def observe(self, name: str, seconds: float) -> None:
        """A latency outside requests (e.g. ``handshake``)."""
        self.other_latency[name].observe(seconds)

    def request(self, path: str, status: int, seconds: float, forwarded: bool = False) -> None:
        service = self._service.get(path)
        if service is None:
            service = path.strip("/").split("/", 1)[0] or "/"
            if len(self._service) < 4096:
                self._service[path] = service
        if len(self.requests) < 10000:
            self.requests[(service, status)] += 1
            self.latency[service].observe(seconds)
            if forwarded:
                self.forwarded[(service, status)] += 1
        self.counters["requests_total"] += 1
        if status >= 400:
            self.counters["requests_failed"] += 1

    def snapshot(self) -> dict:
        return dict(self.counters)

    def prometheus(self, gauges: dict | None = None, live: dict | None = None,
                   labelled: list | None = None) -> str:
        """Text exposition format.  ``gauges``: current values; ``live``: amounts to add
        to counters (traffic of open connections); ``labelled``: (name, type, labels,
        value) samples such as per-link figures."""
        out = []
        for name, value in sorted((gauges or {}).items()):
            out.append(f"# TYPE utesla_{name} gauge")
            out.append(f"utesla_{name} {value}")
        counters = collections.Counter(self.counters)
        counters.update(live or {})
        for name, value in sorted(counters.items()):
            out.append(f"# TYPE utesla_{name} counter")
            out.append(f"utesla_{name} {value}")
        declared = set()
        for name, kind, labels, value in labelled or ():
            if name not in declared:
                declared.add(name)
                out.append(f"# TYPE utesla_{name} {kind}")
            lab = ",".join(f'{k}="{_esc(str(v))}"' for k, v in labels.items())
            out.append(f"utesla_{name}{{{lab}}} {value}")
        out.append("# TYPE utesla_forwarded_service_requests counter")
        for (svc, status), n in sorted(self.forwarded.items()):
            out.append(f'utesla_forwarded_service_requests{{service="{_esc(svc)}",'
                       f'status="{status}"}} {n}')
        for name, h in sorted(self.other_latency.items()):
            out.append(f"# TYPE utesla_{name}_seconds histogram")
            out += _histogram(f"utesla_{name}_seconds", "", h)
        out.append("# TYPE utesla_service_requests counter")
        for (svc, status), n in sorted(self.requests.items()):
            out.append(f'utesla_service_requests{{service="{_esc(svc)}",status="{status}"}} {n}')
        out.append("# TYPE utesla_service_seconds histogram")
        for svc, h in sorted(self.latency.items()):
            out += _histogram("utesla_service_seconds", f'service="{_esc(svc)}"', h)
        return "\n".join(out) + "\n"


def _histogram(name: str, labels: str, h: "_Histogram") -> list[str]:
    """Prometheus lines of one histogram: cumulative buckets, sum, count."""
    lines, acc = [], 0
    sep = "," if labels else ""
    for bound, c in zip(BUCKETS + (float("inf"),), h.counts):
        acc += c
        le = "+Inf" if bound == float("inf") else repr(bound)
        lines.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {acc}')
    tail = f"{{{labels}}}" if labels else ""
    lines.append(f"{name}_sum{tail} {h.total}")
    lines.append(f"{name}_count{tail} {h.n}")
    return lines


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
