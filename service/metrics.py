"""Prometheus metrics (prometheus-client) and the ASGI middleware that counts requests.

Each app gets its own registry, so several apps in one process (tests) do not collide.  With
several uvicorn workers, set ``PROMETHEUS_MULTIPROC_DIR`` (detector-serve does it for you) and
``/metrics`` aggregates all workers through prometheus-client's multiprocess collector.
"""

from __future__ import annotations

import os
import time

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.routing import Mount
from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["CONTENT_TYPE_LATEST", "Metrics", "MetricsMiddleware"]

_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


def _multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "detector_http_requests", "HTTP requests by route template, method and status code.",
            ["route", "method", "status"], registry=r)
        self.latency = Histogram(
            "detector_http_request_duration_seconds", "Time from request to complete response, by route.",
            ["route", "method"], buckets=_LATENCY_BUCKETS, registry=r)
        self.batch_size = Histogram(
            "detector_inference_batch_size", "Images per forward pass of the model (micro-batch size).",
            buckets=_BATCH_BUCKETS, registry=r)
        self.inference_seconds = Histogram(
            "detector_inference_duration_seconds", "Time of one forward pass plus detection, per micro-batch.",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.request_images = Histogram(
            "detector_request_images", "Images per /predict or /predict/batch request.",
            buckets=_BATCH_BUCKETS, registry=r)
        self.images = Counter("detector_images", "Images classified.", registry=r)
        self.adversarial = Counter("detector_adversarial_flags", "Images flagged adversarial.", registry=r)
        self.uncanny = Counter(
            "detector_uncanny_valley_flags", "Images flagged adversarial and in the uncanny valley (κ ≤ τ).",
            registry=r)
        self.rejected = Counter(
            "detector_rejected_uploads", "Uploads refused, by reason code.", ["reason"], registry=r)
        self.inference_failures = Counter(
            "detector_inference_failures", "Requests answered 500: the model raised on one of their images, run on its own.", registry=r)
        self.audit_write_failures = Counter(
            "detector_audit_write_failures", "Audit lines the audit file could not take (a full disk); each is "
            "on the service.audit logger all the same.", registry=r)
        self.queue = Gauge(
            "detector_queue_images", "Images waiting for the model.", registry=r, multiprocess_mode="livesum")
        self.ready = Gauge(
            "detector_ready", "1 once the bundle is loaded and warmed up.", registry=r, multiprocess_mode="livemax")

    def observe_batch(self, size: int, seconds: float) -> None:
        self.batch_size.observe(size)
        self.inference_seconds.observe(seconds)

    def observe_results(self, results) -> None:
        self.request_images.observe(len(results))
        self.images.inc(len(results))
        flagged = sum(1 for r in results if r.adversarial)
        uncanny = sum(1 for r in results if r.uncanny_valley)
        if flagged:
            self.adversarial.inc(flagged)
        if uncanny:
            self.uncanny.inc(uncanny)

    def render(self) -> bytes:
        if _multiprocess():
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
            return generate_latest(registry)
        return generate_latest(self.registry)


def route_template(scope: Scope) -> str:
    """The route a request matched, as its template (``/predict``, ``/static-offline-docs/{path}``), or
    ``<unmatched>``. FastAPI's own routes record themselves in the scope; plain Starlette routes (the
    OpenAPI document) and mounts (the docs' assets) are found by their endpoint or app."""
    route = scope.get("route")
    if getattr(route, "path", None):
        return route.path
    endpoint, router = scope.get("endpoint"), scope.get("router")
    if endpoint is not None:
        for candidate in getattr(router, "routes", ()):
            if isinstance(candidate, Mount) and candidate.app is endpoint:
                return candidate.path + "/{path}"
            if getattr(candidate, "endpoint", None) is endpoint:
                return candidate.path
    return "<unmatched>"


class MetricsMiddleware:
    """Counts every HTTP request by route template (not raw path) and times it."""

    def __init__(self, app: ASGIApp, metrics: Metrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500
        recorded = False

        def record() -> None:
            nonlocal recorded
            if not recorded:
                recorded = True
                path = route_template(scope)
                method = scope.get("method", "")
                self.metrics.requests.labels(path, method, str(status)).inc()
                self.metrics.latency.labels(path, method).observe(time.perf_counter() - start)

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.pathsend" or (
                    message["type"] == "http.response.body" and not message.get("more_body", False)):
                # Counted before the last bytes leave: a client that has its whole answer (a file
                # streamed in chunks included) finds its request in /metrics.
                record()
            await send(message)

        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            record()  # a request that ended without a complete answer counts too
