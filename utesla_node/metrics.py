"""Counters and latency histograms, exported as JSON and Prometheus text.

Request series are labelled by service, and the label comes only from a bounded
set, never from what a client typed: the local services (``set_known(local=...)``,
pushed when services load or reload), ``_node`` for the built-ins, the routed
remote services (``set_known(remote=...)``; at most ``max_remote`` of them get a
label, the first ones that see traffic) and one ``_other`` bucket for everything
else (made-up names, malformed paths, and whatever a full budget turns away).
Names starting with ``_`` are never services, so the two fixed labels cannot
collide with one.  (Labelled from the raw first path segment, 10,000 requests
with made-up names grew the page to 200 MB; see issue 12.)

Every labelled series is charged an estimate of the bytes it adds to the page,
against :data:`REQUEST_BUDGET`; per-link samples are capped per family and in
bytes as the page is written.  With the fixed families that keeps the page under
:data:`PAGE_LIMIT` however much traffic there is, and past the budget the totals
(``requests_total``, the ``_other`` series) go on counting.

The page is written by a coroutine that gives the event loop a turn every
:data:`STEP` lines, each histogram copied whole before it is written, so a
scrape never holds up requests for the whole page.
"""
from __future__ import annotations

import asyncio
import bisect
import collections
from collections.abc import Container, Iterable, Iterator

__all__ = ["Metrics", "BUCKETS", "BUILTIN", "OTHER", "PAGE_LIMIT"]

#: Latency histogram bucket bounds, seconds.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
           10.0, 30.0)
#: The label of every built-in service (``/_node/...``), and the bucket for the rest.
BUILTIN = "_node"
OTHER = "_other"
#: What the page may never exceed, bytes (the budgets below add up to less).
PAGE_LIMIT = 1 << 20
#: Bytes of page the request series may take together.  ``_other`` is let past it (its
#: series are bounded by the 1,000 possible statuses: about 160 KB at worst).
REQUEST_BUDGET = 512 * 1024
#: Per-link (labelled) samples: at most this many per family, this many bytes in all.
MAX_PER_FAMILY = 256
LABELLED_BUDGET = 192 * 1024
#: Lines written between two turns given back to the event loop.
STEP = 500
#: Most remote services that get a label of their own by default ([metrics] max_remote_services).
MAX_REMOTE = 100
#: Estimated page bytes of one line of each kind, besides the label's own characters.
_HIST_LINE = 64
_PAIR_LINE = 72
_PATH_MAX = 1024
_MAX_SEGMENTS = 8
_CACHE_MAX = 4096


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
    """Process-wide counters; cheap enough to update on every request.

    The node calls :meth:`request` once per request it answers (or relays),
    :meth:`set_known` when its services or routes change, and :meth:`prometheus`
    for a scrape.
    """

    def __init__(self, max_remote: int = MAX_REMOTE, budget: int = REQUEST_BUDGET):
        self.counters: collections.Counter[str] = collections.Counter()
        #: (service label, status) -> requests answered; and those another node answered.
        self.requests: collections.Counter[tuple[str, int]] = collections.Counter()
        self.forwarded: collections.Counter[tuple[str, int]] = collections.Counter()
        #: service label -> latency histogram; a label is admitted when this gets its key.
        self.latency: dict[str, _Histogram] = {}
        self.other_latency: dict[str, _Histogram] = collections.defaultdict(_Histogram)
        self.max_remote = max_remote
        self.budget = budget
        self._local: frozenset[str] = frozenset()
        self._remote: Container[str] = frozenset()
        self._remote_labels: set[str] = set()
        self._cost: dict[str, int] = {}       # label -> page bytes charged for it
        self._spent = 0
        self._paths: dict[str, str] = {}      # path -> its admitted label (a cache)

    # ------------------------------------------------------------- label set

    def set_known(self, *, local: Iterable[str] | None = None,
                  remote: Container[str] | None = None) -> None:
        """The services that may have a label of their own; None leaves one set as it is.

        ``local``: the names of the registered services (``"files"``, ``"a/b"``), read
        once: call again on every (re)load.  ``remote``: the names of the services with
        a route, consulted whenever a name is first seen, so a live view (the gossip
        engine's table of best routes) needs passing only once; a snapshot must be passed
        again when the routes change.  Labels of services no longer in either set are
        dropped at the next scrape (their counters start again from zero if they return).
        """
        if local is not None:
            self._local = frozenset(local)
        if remote is not None:
            self._remote = remote
        self._paths.clear()

    def label(self, path: str) -> str:
        """The service label a request for ``path`` is counted under (admitting it)."""
        hit = self._paths.get(path)
        if hit is not None:
            return hit
        if path.startswith("/_node/") or path == "/_node":
            return BUILTIN
        if len(path) > _PATH_MAX or not path.startswith("/"):
            return OTHER
        parts = [p for p in path[1:].split("/", _MAX_SEGMENTS) if p][:_MAX_SEGMENTS]
        for n in range(len(parts), 0, -1):
            name = "/".join(parts[:n])
            if name in self.latency:
                found = name
            elif name in self._local:
                found = self._admit(name, remote=False)
            elif name in self._remote:
                found = self._admit(name, remote=True)
            else:
                continue
            if found != OTHER:
                if len(self._paths) >= _CACHE_MAX:
                    self._paths.clear()
                self._paths[path] = found
            return found
        return OTHER

    def _admit(self, name: str, remote: bool) -> str:
        if remote and len(self._remote_labels) >= self.max_remote:
            self.counters["metrics_overflow"] += 1
            return OTHER
        cost = (len(BUCKETS) + 3) * (_HIST_LINE + len(_esc(name)))
        if self._spent + cost > self.budget:
            self.counters["metrics_overflow"] += 1
            return OTHER
        self._spent += cost
        self._cost[name] = cost
        self.latency[name] = _Histogram()
        if remote:
            self._remote_labels.add(name)
        return name

    def _pair(self, table: collections.Counter, label: str, status: int) -> tuple[str, int]:
        """The key to count (label, status) under in ``table``: itself if it exists or
        fits in the budget, else the ``_other`` series of that status."""
        key = (label, status)
        if key in table:
            return key
        cost = _PAIR_LINE + len(_esc(label))
        if label != OTHER and self._spent + cost > self.budget:
            self.counters["metrics_overflow"] += 1
            key = (OTHER, status)
            if key in table:
                return key
        self._spent += cost
        if key[0] in self._cost:
            self._cost[key[0]] += cost
        return key

    def _prune(self) -> None:
        """Forget the labels whose service is neither local nor routed any more."""
        gone = [name for name in self.latency if name not in (BUILTIN, OTHER)
                and name not in self._local and name not in self._remote]
        if not gone:
            return
        for name in gone:
            del self.latency[name]
            self._spent -= self._cost.pop(name, 0)
            self._remote_labels.discard(name)
        dropped = set(gone)
        for table in (self.requests, self.forwarded):
            for key in [k for k in table if k[0] in dropped]:
                del table[key]
        self._paths.clear()

    # ------------------------------------------------------------- counting

    def incr(self, name: str, n: int = 1) -> None:
        self.counters[name] += n

    def observe(self, name: str, seconds: float) -> None:
        """A latency outside requests (e.g. ``handshake``)."""
        self.other_latency[name].observe(seconds)

    def request(self, path: str, status: int, seconds: float, forwarded: bool = False) -> None:
        """One request answered with ``status`` after ``seconds`` (``forwarded``: by
        another node)."""
        self.counters["requests_total"] += 1
        if status >= 400:
            self.counters["requests_failed"] += 1
        if not 0 <= status <= 999:
            status = 0
        label = self.label(path)
        if label not in self.latency:           # _node and _other, on first use
            self.latency[label] = _Histogram()
        self.latency[label].observe(seconds)
        self.requests[self._pair(self.requests, label, status)] += 1
        if forwarded:
            self.forwarded[self._pair(self.forwarded, label, status)] += 1

    def snapshot(self) -> dict:
        return dict(self.counters)

    # ------------------------------------------------------------- the page

    async def prometheus(self, gauges: dict | None = None, live: dict | None = None,
                         labelled: list | None = None) -> str:
        """Text exposition format, written a few hundred lines per event-loop turn.

        ``gauges``: current values; ``live``: amounts to add to counters (traffic of
        open connections); ``labelled``: (name, type, labels, value) samples such as
        per-link figures, at most :data:`MAX_PER_FAMILY` per name.
        """
        self._prune()
        out: list[str] = []
        for n, line in enumerate(self._lines(gauges or {}, live or {}, list(labelled or ())),
                                 1):
            out.append(line)
            if n % STEP == 0:
                await asyncio.sleep(0)
        return "\n".join(out) + "\n"

    def _lines(self, gauges: dict, live: dict, labelled: list) -> Iterator[str]:
        """The page, line by line.  Every table is copied before its first line (requests
        keep counting while the page is written); a histogram is copied whole."""
        kept = self._labelled(labelled)
        omitted = len(labelled) - len(kept)
        gauges = {**gauges, "metrics_omitted_samples": omitted}
        for name, value in sorted(gauges.items()):
            yield f"# TYPE utesla_{name} gauge"
            yield f"utesla_{name} {value}"
        counters = collections.Counter(self.counters)
        counters.update(live)
        for name, value in sorted(counters.items()):
            yield f"# TYPE utesla_{name} counter"
            yield f"utesla_{name} {value}"
        declared = set()
        for name, kind, lab, value in kept:
            if name not in declared:
                declared.add(name)
                yield f"# TYPE utesla_{name} {kind}"
            yield f"utesla_{name}{{{lab}}} {value}"
        yield "# TYPE utesla_forwarded_service_requests counter"
        for (svc, status), n in sorted(self.forwarded.items()):
            yield f'utesla_forwarded_service_requests{{service="{_esc(svc)}",status="{status}"}} {n}'
        for name, h in sorted(self.other_latency.items()):
            yield f"# TYPE utesla_{name}_seconds histogram"
            yield from _histogram(f"utesla_{name}_seconds", "", h)
        yield "# TYPE utesla_service_requests counter"
        for (svc, status), n in sorted(self.requests.items()):
            yield f'utesla_service_requests{{service="{_esc(svc)}",status="{status}"}} {n}'
        yield "# TYPE utesla_service_seconds histogram"
        for svc, h in sorted(self.latency.items()):
            yield from _histogram("utesla_service_seconds", f'service="{_esc(svc)}"', h)

    @staticmethod
    def _labelled(samples: list) -> list[tuple[str, str, str, object]]:
        """The per-link samples that fit: MAX_PER_FAMILY per name, LABELLED_BUDGET bytes."""
        per_family: collections.Counter[str] = collections.Counter()
        kept, size = [], 0
        for name, kind, labels, value in samples:
            lab = ",".join(f'{k}="{_esc(str(v))}"' for k, v in labels.items())
            line = len(name) + len(lab) + 40
            if per_family[name] >= MAX_PER_FAMILY or size + line > LABELLED_BUDGET:
                continue
            per_family[name] += 1
            size += line
            kept.append((name, kind, lab, value))
        return kept


def _histogram(name: str, labels: str, h: "_Histogram") -> list[str]:
    """Prometheus lines of one histogram: cumulative buckets, sum, count."""
    counts, total, n = list(h.counts), h.total, h.n     # one consistent copy
    lines, acc = [], 0
    sep = "," if labels else ""
    for bound, c in zip(BUCKETS + (float("inf"),), counts):
        acc += c
        le = "+Inf" if bound == float("inf") else repr(bound)
        lines.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {acc}')
    tail = f"{{{labels}}}" if labels else ""
    lines.append(f"{name}_sum{tail} {total}")
    lines.append(f"{name}_count{tail} {n}")
    return lines


def _esc(v: str) -> str:
    return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
