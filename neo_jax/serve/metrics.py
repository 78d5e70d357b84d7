"""The server's Prometheus figures, served as text by `GET /metrics`, in a registry of its own.

    neo_jax_serve_requests_total{endpoint, status}   HTTP requests answered
    neo_jax_serve_request_seconds{endpoint}          latency histogram (receipt to answer)
    neo_jax_serve_batch_size                         histogram of the queries per decode call (its
                                                     _sum / _count is the mean batch size)
    neo_jax_serve_invalid_items_total                items answered that their request may not name
                                                     (the constraint keeps it 0)
    neo_jax_serve_ready                              1 once the warm-up has compiled every shape
    neo_jax_serve_compiles_after_ready               XLA compilations since then (the plan keeps it 0)
"""

from __future__ import annotations

from typing import Callable, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4  # the classic text format `text()` writes
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


class Metrics:
    def __init__(self, batch_sizes: Sequence[int], compiles_after_ready: Callable[[], int]):
        self.registry = registry = CollectorRegistry()
        self._requests = Counter("neo_jax_serve_requests", "HTTP requests answered, by endpoint and status",
                                 ["endpoint", "status"], registry=registry)
        self._latency = Histogram("neo_jax_serve_request_seconds", "HTTP request latency, receipt to answer",
                                  ["endpoint"], buckets=LATENCY_BUCKETS, registry=registry)
        self._batch = Histogram("neo_jax_serve_batch_size", "queries decoded together in one call",
                                buckets=tuple(batch_sizes), registry=registry)
        self._invalid = Counter("neo_jax_serve_invalid_items", "answered items their request may not name",
                                registry=registry)
        self._ready = Gauge("neo_jax_serve_ready", "1 once every compiled shape is warm", registry=registry)
        Gauge("neo_jax_serve_compiles_after_ready", "XLA compilations after the warm-up",
              registry=registry).set_function(compiles_after_ready)

    def observe_request(self, endpoint: str, status: int, seconds: float) -> None:
        self._requests.labels(endpoint, str(status)).inc()
        self._latency.labels(endpoint).observe(seconds)

    def observe_batch(self, queries: int, invalid_items: int) -> None:
        self._batch.observe(queries)
        self._invalid.inc(invalid_items)

    def set_ready(self) -> None:
        self._ready.set(1)

    def batches(self) -> tuple[int, int]:
        """`(decode calls, queries decoded)` so far."""
        sample = self.registry.get_sample_value
        return int(sample("neo_jax_serve_batch_size_count")), int(sample("neo_jax_serve_batch_size_sum"))

    def invalid_items(self) -> int:
        return int(self.registry.get_sample_value("neo_jax_serve_invalid_items_total"))

    def compiles_after_ready(self) -> int:
        return int(self.registry.get_sample_value("neo_jax_serve_compiles_after_ready"))

    def text(self) -> bytes:
        """The Prometheus text exposition of every figure."""
        return generate_latest(self.registry)
