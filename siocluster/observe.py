"""What a node tells operators: Prometheus metrics at ``/metrics``, ``/healthz``, ``/readyz``.

Nodes count in plain integers where things happen (a counter is an attribute bumped in the
hot path, at most once per batch or message, never per delivery), and `Observer` turns them
into Prometheus metric families only when scraped, in a registry of the node's own (several
nodes may share a process). ``/healthz`` answers 200 while the process serves; ``/readyz``
answers 200 when the node is ready for traffic (Redis answers, it is registered and alive,
it is not draining, its outbox is below its bound) and 503 with the failing checks else::

    observer = Observer(node)                    # node.metrics() yields its families
    response = observer.serve(environ, start_response)   # None: not one of our paths
"""

import bisect
import json
import time
from typing import Dict, Iterable, List, Optional, Sequence

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

PATHS = ("/metrics", "/healthz", "/readyz")
# seconds: from a fraction of a millisecond (a Redis round trip, a quick handler) to a minute
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
           10.0, 30.0, 60.0)


class Histogram:
    """Bucket counts of observed durations, kept in plain integers."""

    __slots__ = ("counts", "total", "count")

    def __init__(self):
        self.counts = [0] * (len(BUCKETS) + 1)
        self.total = 0.0
        self.count = 0

    def observe(self, seconds: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, seconds)] += 1
        self.total += seconds
        self.count += 1

    def buckets(self) -> List[tuple]:
        """Cumulative ``(le, count)`` pairs, as Prometheus exposes them."""
        out, running = [], 0
        for bound, count in zip([*map(str, BUCKETS), "+Inf"], self.counts):
            running += count
            out.append((bound, running))
        return out


def counter(name: str, doc: str, value: float, **labels) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def gauge(name: str, doc: str, value: float, **labels) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=list(labels))
    family.add_metric(list(labels.values()), value)
    return family


def counters(name: str, doc: str, label: str, values: Dict[str, float]) -> CounterMetricFamily:
    """One counter family with a sample per value of ``label``."""
    family = CounterMetricFamily(name, doc, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


def gauges(name: str, doc: str, label: str, values: Dict[str, float]) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


def histograms(name: str, doc: str, label: Optional[str],
               values: Dict[str, Histogram]) -> HistogramMetricFamily:
    """A histogram family, one per value of ``label`` (None: a single unlabelled one)."""
    family = HistogramMetricFamily(name, doc, labels=[label] if label else None)
    for key, histogram in sorted(values.items()):
        family.add_metric([key] if label else [], histogram.buckets(), histogram.total)
    return family


class Observer:
    """Serves a node's metrics and health. The node provides ``metrics()`` (metric
    families) and ``readiness()`` (``{check: (ok, detail)}``)."""

    def __init__(self, node):
        self.node = node
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def collect(self) -> Iterable:
        return self.node.metrics()

    def describe(self) -> Sequence:
        return []      # families are known only when collected

    def serve(self, environ, start_response) -> Optional[List[bytes]]:
        """Answer ``/metrics``, ``/healthz`` and ``/readyz``; None for any other path."""
        path = environ.get("PATH_INFO", "")
        if path not in PATHS:
            return None
        if environ.get("REQUEST_METHOD", "GET") not in ("GET", "HEAD"):
            start_response("405 Method Not Allowed", [("Allow", "GET, HEAD"),
                                                      ("Content-Type", "text/plain")])
            return [b"GET only\n"]
        if path == "/metrics":
            body = generate_latest(self.registry)
            start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
            return [body]
        if path == "/healthz":
            return _json(start_response, "200 OK", {"ok": True, "node": self.node.id})
        checks = self.node.readiness()
        ready = all(ok for ok, _ in checks.values())
        return _json(start_response, "200 OK" if ready else "503 Service Unavailable",
                     {"ready": ready, "node": self.node.id,
                      "checks": {name: {"ok": ok, "detail": detail}
                                 for name, (ok, detail) in checks.items()}})


def _json(start_response, status: str, body: dict) -> List[bytes]:
    start_response(status, [("Content-Type", "application/json"), ("Cache-Control", "no-store")])
    return [json.dumps(body).encode() + b"\n"]


def timed(call):
    """``(result, seconds)`` of ``call()``."""
    started = time.perf_counter()
    result = call()
    return result, time.perf_counter() - started
