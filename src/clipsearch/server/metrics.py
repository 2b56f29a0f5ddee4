"""Prometheus metrics for ``GET /metrics``: requests, latency, batch sizes, queue depth and
embeddings made. One registry per app (prometheus-client's default registry is global, and a
process may run several apps: the tests do)."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

if TYPE_CHECKING:
    from .batching import MicroBatcher

_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "clipsearch_requests", "HTTP requests answered", ["method", "route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "clipsearch_request_seconds", "Time to answer an HTTP request", ["route"], registry=self.registry
        )
        self.batch_size = Histogram(
            "clipsearch_batch_size", "Inputs per model call", ["kind"], buckets=_BATCH_BUCKETS, registry=self.registry
        )
        self.queue_depth = Gauge(
            "clipsearch_queue_depth", "Inputs waiting for the model", ["kind"], registry=self.registry
        )
        self.embeddings = Counter("clipsearch_embeddings", "Vectors computed", ["kind"], registry=self.registry)

    def watch_batcher(self, kind: str, batcher: MicroBatcher) -> None:
        """Report ``batcher``'s batches and queue under ``kind`` (``text`` or ``image``)."""
        self.queue_depth.labels(kind).set_function(batcher.pending)
        batch_size = self.batch_size.labels(kind)
        made = self.embeddings.labels(kind)

        def observe(n: int) -> None:
            batch_size.observe(n)
            made.inc(n)

        batcher.observe = observe

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def middleware(self, request: Any, call_next: Callable[[Any], Awaitable[Any]]) -> Any:
        """Counts and times each request by its route's template (``/v1/items/{id}``), so that
        ids in paths do not make a series each."""
        started = time.perf_counter()
        status = 500
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = request.scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            self.requests.labels(request.method, template, str(status)).inc()
            self.latency.labels(template).observe(time.perf_counter() - started)
