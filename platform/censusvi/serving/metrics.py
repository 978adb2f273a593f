"""The app's Prometheus counters, as ``GET /metrics`` shows them (one registry for the whole app:
every ingress replica reports to the one ``Metrics`` deployment that holds it)."""

from __future__ import annotations

import time
from collections import deque

LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class ServeMetrics:
    """Requests, errors, latency and cells by endpoint; cells per second; the version served."""

    WINDOW_S = 60.0  # of censusvi_cells_per_second

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        by = ["endpoint", "status"]
        self.requests = Counter(
            "censusvi_requests", "HTTP requests by endpoint and status", by, registry=self.registry
        )
        self.errors = Counter(
            "censusvi_errors", "requests answered with an error status", by, registry=self.registry
        )
        self.latency = Histogram(
            "censusvi_request_seconds",
            "request latency",
            ["endpoint"],
            registry=self.registry,
            buckets=LATENCY_BUCKETS_S,
        )
        self.cells = Counter(
            "censusvi_cells", "cells answered", ["endpoint"], registry=self.registry
        )
        self.rate = Gauge(
            "censusvi_cells_per_second",
            "cells answered per second over the last 60 s",
            registry=self.registry,
        )
        self.served = Gauge(
            "censusvi_model_version",
            "the model version being served",
            ["name"],
            registry=self.registry,
        )
        self.recent: deque[tuple[float, int]] = deque()

    def record(self, endpoint: str, status: int, seconds: float, cells: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        if status >= 400:
            self.errors.labels(endpoint, str(status)).inc()
        self.latency.labels(endpoint).observe(seconds)
        if cells:
            self.cells.labels(endpoint).inc(cells)
            self.recent.append((time.monotonic(), cells))

    def serving(self, name: str, version: str) -> None:
        """The version served now (a model directory's "local" has no number: not shown)."""
        if version.isdigit():
            self.served.clear()
            self.served.labels(name).set(int(version))

    def render(self) -> bytes:
        from prometheus_client import generate_latest

        now = time.monotonic()
        while self.recent and self.recent[0][0] < now - self.WINDOW_S:
            self.recent.popleft()
        self.rate.set(sum(c for _, c in self.recent) / self.WINDOW_S)
        return generate_latest(self.registry)
