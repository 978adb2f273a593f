"""The app's Prometheus metrics, as ``GET /metrics`` shows them.

Each ingress replica records its own requests through ``ray.serve.metrics`` (no deployment hop per
request). Ray's metrics agent on every node exports them as ``ray_censusvi_*``, tagged with the
application, deployment and replica: that is what a cluster's Prometheus scrapes. ``GET /metrics``
reads those exports from every alive node, keeps this application's series and sums them across
replicas and nodes under the names below (Ray reports every ``RAY_metrics_report_interval_ms``,
10 s by default, so a request shows there within about that long).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Iterable

LATENCY_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
WINDOW_S = 60.0  # of censusvi_cells_per_second
REFRESH_S = 1.0  # a replica re-sets its gauges this often: Ray drops a gauge not set for 2 reports
RAY_PREFIX = "ray_"  # Ray's exporter prefixes application metrics with it
APPLICATION_TAG = "application"  # Ray Serve's tag on metrics recorded inside a replica

# name -> (type, help, tag keys, how replicas combine): the names GET /metrics answers with.
METRICS = {
    "censusvi_requests": (
        "counter",
        "HTTP requests by endpoint and status",
        ("endpoint", "status"),
        sum,
    ),
    "censusvi_errors": (
        "counter",
        "requests answered with an error status",
        ("endpoint", "status"),
        sum,
    ),
    "censusvi_request_seconds": ("histogram", "request latency", ("endpoint",), sum),
    "censusvi_cells": ("counter", "cells answered", ("endpoint",), sum),
    "censusvi_cells_per_second": (
        "gauge",
        "cells answered per second over the last 60 s",
        (),
        sum,
    ),
    # replicas switch within one registry poll of each other: the newest is the one served
    "censusvi_model_version": ("gauge", "the model version being served", ("name",), max),
}


class ReplicaMetrics:
    """One ingress replica's recorders (``ray.serve.metrics``: needs a Serve replica or a Ray
    worker) and its 60 s window of answered cells, refreshed on a daemon thread."""

    def __init__(self) -> None:
        from ray.serve import metrics as m

        kinds = {"counter": m.Counter, "gauge": m.Gauge}
        self.m = {}
        for name, (kind, text, tags, _) in METRICS.items():
            if kind == "histogram":
                self.m[name] = m.Histogram(
                    name, text, boundaries=list(LATENCY_BUCKETS_S), tag_keys=tags
                )
            else:
                self.m[name] = kinds[kind](name, text, tag_keys=tags)
        self.recent: deque[tuple[float, int]] = deque()
        self.lock = threading.Lock()
        self.version: tuple[str, int] | None = None
        self.rate()
        threading.Thread(target=self._refresh, name="censusvi-metrics", daemon=True).start()

    def record(self, endpoint: str, status: int, seconds: float, cells: int) -> None:
        tags = {"endpoint": endpoint, "status": str(status)}
        self.m["censusvi_requests"].inc(1, tags)
        if status >= 400:
            self.m["censusvi_errors"].inc(1, tags)
        self.m["censusvi_request_seconds"].observe(seconds, {"endpoint": endpoint})
        if cells:
            self.m["censusvi_cells"].inc(cells, {"endpoint": endpoint})
            with self.lock:
                self.recent.append((time.monotonic(), cells))
            self.rate()

    def serving(self, name: str, version: str) -> None:
        """The version served now (a model directory's "local" has no number: not shown)."""
        if version.isdigit():
            self.version = (name, int(version))
            self.m["censusvi_model_version"].set(int(version), {"name": name})

    def rate(self) -> float:
        """Cells answered per second over the last ``WINDOW_S``, set on the gauge."""
        with self.lock:
            now = time.monotonic()
            while self.recent and self.recent[0][0] < now - WINDOW_S:
                self.recent.popleft()
            value = sum(c for _, c in self.recent) / WINDOW_S
        self.m["censusvi_cells_per_second"].set(value)
        return value

    def _refresh(self) -> None:
        while True:
            time.sleep(REFRESH_S)
            self.rate()
            if self.version:
                name, version = self.version
                self.m["censusvi_model_version"].set(version, {"name": name})


def combine(exports: Iterable[str], application: str) -> bytes:
    """Prometheus text of ``METRICS`` summed over every replica of ``application`` in ``exports``
    (the text of Ray's per-node metrics exports); Ray's own tags are dropped."""
    from prometheus_client import generate_latest
    from prometheus_client.metrics_core import Metric
    from prometheus_client.parser import text_string_to_metric_families

    values: dict[str, dict[tuple, list[float]]] = {name: {} for name in METRICS}
    for text in exports:
        for family in text_string_to_metric_families(text):
            name = family.name.removeprefix(RAY_PREFIX)
            if not family.name.startswith(RAY_PREFIX) or name not in METRICS:
                continue
            keep = (*METRICS[name][2], "le")
            for s in family.samples:
                if s.labels.get(APPLICATION_TAG) != application:
                    continue
                labels = tuple((k, s.labels[k]) for k in keep if k in s.labels)
                key = (s.name.removeprefix(RAY_PREFIX), labels)
                values[name].setdefault(key, []).append(s.value)

    class Combined:
        def collect(self):
            for name, (kind, text, _, how) in METRICS.items():
                metric = Metric(name, text, kind)
                for (sample, labels), found in sorted(values[name].items(), key=_bucket_order):
                    metric.add_sample(sample, dict(labels), float(how(found)))
                yield metric

    return generate_latest(Combined())


def _bucket_order(item: tuple) -> tuple:
    """Series by name and labels, histogram buckets by their bound (``+Inf`` last)."""
    (sample, labels), _ = item
    rest = tuple(kv for kv in labels if kv[0] != "le")
    le = dict(labels).get("le")
    return sample, rest, float(le) if le is not None else 0.0


def node_exports(timeout_s: float = 5.0) -> tuple[list[str], list[str]]:
    """The metrics text of every alive node's Ray exporter, and a line per node that did not
    answer (a node without ``ray[default]``'s agent, or one going away)."""
    import ray
    import requests

    texts, missing = [], []
    for node in ray.nodes():
        if not node.get("Alive") or not node.get("MetricsExportPort"):
            continue
        where = f"{node['NodeManagerAddress']}:{node['MetricsExportPort']}"
        try:
            r = requests.get(f"http://{where}/metrics", timeout=timeout_s)
            r.raise_for_status()
            texts.append(r.text)
        except requests.RequestException as e:
            missing.append(f"{where}: {' '.join(str(e).split())}")
    return texts, missing
