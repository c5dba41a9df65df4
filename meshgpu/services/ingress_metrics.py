"""What ``/metrics`` shows of this node's ingress: requests per service by status class and a
latency histogram (to the response's last byte). Plain counters on the event loop; the metric
families are built per scrape (as ``meshgpu/api/prometheus.py`` does for the rest)."""

from __future__ import annotations

from bisect import bisect_left
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx")
MAX_SERVICES = 10_000


class _Service:
    __slots__ = ("buckets", "by_class", "count", "total")

    def __init__(self) -> None:
        self.by_class = [0, 0, 0, 0, 0]
        self.buckets = [0] * (len(BUCKETS) + 1)
        self.count = 0
        self.total = 0.0


class IngressMetrics:
    def __init__(self) -> None:
        self._services: dict[tuple[str, str], _Service] = {}

    def observe(self, project: str, run: str, status: int, seconds: float) -> None:
        key = (project, run)
        s = self._services.get(key)
        if s is None:
            if len(self._services) >= MAX_SERVICES:
                self._services.pop(next(iter(self._services)))
            s = self._services[key] = _Service()
        s.by_class[min(4, max(0, status // 100 - 1))] += 1
        s.buckets[bisect_left(BUCKETS, seconds)] += 1
        s.count += 1
        s.total += seconds

    def forget(self, keep: set[tuple[str, str]]) -> None:
        for key in [k for k in self._services if k not in keep]:
            del self._services[key]

    def families(self, node: str, waiting: dict[tuple[str, str], int]) -> list[Any]:
        requests = CounterMetricFamily(
            "meshgpu_service_requests",
            "Requests this node's ingress answered for a service, by status class",
            labels=["node", "project", "service", "code"],
        )
        latency = HistogramMetricFamily(
            "meshgpu_service_request_duration_seconds",
            "Time from a request's arrival to its response's last byte, at this node's ingress",
            labels=["node", "project", "service"],
        )
        held = GaugeMetricFamily(
            "meshgpu_service_requests_waiting",
            "Requests held for a service with no ready replica (scale-from-zero activation)",
            labels=["node", "project", "service"],
        )
        for (project, run), s in sorted(self._services.items()):
            for cls, n in zip(CLASSES, s.by_class, strict=True):
                if n:
                    requests.add_metric([node, project, run, cls], n)
            cumulative, acc = [], 0
            for le, n in zip((*BUCKETS, float("inf")), s.buckets, strict=True):
                acc += n
                cumulative.append((_le(le), acc))
            latency.add_metric([node, project, run], cumulative, s.total)
        for (project, run), n in sorted(waiting.items()):
            held.add_metric([node, project, run], n)
        return [requests, latency, held]


def _le(v: float) -> str:
    return "+Inf" if v == float("inf") else repr(v)


__all__ = ["IngressMetrics"]
