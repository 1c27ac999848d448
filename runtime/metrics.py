"""Prometheus metrics: serving one agent's registry, and what every agent exports alike.

Each agent instance owns one ``CollectorRegistry`` (never prometheus_client's global one), so that
several agents in one process, as in the tests, export their own figures. ``serve_metrics``
serves it on ``/metrics`` from prometheus_client's own HTTP server (a daemon thread); the gateway
mounts ``make_asgi_app`` on its own app instead. Every metric is documented in docs/metrics.md.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, MutableMapping
from contextlib import asynccontextmanager
from typing import Any, Final

import anyio
import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    make_asgi_app,
    start_http_server,
)
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector

from moe2.runtime.endpoint import EndpointStats

log = structlog.get_logger("moe2.metrics")

# seconds: a decode step of a small model on a box like ours is 10-300 ms; prefills reach seconds
LATENCY_BUCKETS: Final = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1, 2.5, 5, 10)
SHUTDOWN_LIMIT_S: Final = 2.0


@asynccontextmanager
async def serve_metrics(
    registry: CollectorRegistry, port: int | None, host: str = "0.0.0.0"
) -> AsyncIterator[int | None]:
    """Serve ``registry`` on ``http://host:port/metrics`` while the block runs; yields the bound
    port (``port`` 0: any free one), or None and serves nothing when ``port`` is None."""
    if port is None:
        yield None
        return
    server, thread = start_http_server(port, addr=host, registry=registry)
    bound = int(server.server_address[1])
    log.info("metrics_ready", url=f"http://{host}:{bound}/metrics")
    try:
        yield bound
    finally:
        with anyio.move_on_after(SHUTDOWN_LIMIT_S, shield=True):
            await anyio.to_thread.run_sync(server.shutdown, abandon_on_cancel=True)
        server.server_close()
        thread.join(timeout=0)


class EndpointCollector(Collector):
    """The counters of ``runtime.endpoint.Endpoint`` (requests, errors by code, handling time),
    read when scraped: nothing on the hot path. ``stats`` gives the agent's current endpoints."""

    def __init__(self, stats: Callable[[], Iterable[EndpointStats]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[CounterMetricFamily]:
        requests = CounterMetricFamily(
            "moe2_endpoint_requests", "Messages an endpoint handled.", labels=["endpoint"]
        )
        errors = CounterMetricFamily(
            "moe2_endpoint_errors",
            "Errors an endpoint answered or logged, by code.",
            labels=["endpoint", "code"],
        )
        seconds = CounterMetricFamily(
            "moe2_endpoint_processing_seconds",
            "Time an endpoint spent handling messages.",
            labels=["endpoint"],
        )
        for stats in self._stats():
            requests.add_metric([stats.name], stats.requests)
            seconds.add_metric([stats.name], stats.processing_s)
            for code, n in sorted(stats.errors.items()):
                errors.add_metric([stats.name, code], n)
        yield from (requests, errors, seconds)


# --- the gateway: HTTP requests, as a pure ASGI middleware (no web framework imported here) ------

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
AsgiApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class HttpMetrics:
    """Requests by route, method and status; their duration to the last byte of the body (a
    stream's whole life); requests in flight. Paths outside ``routes`` count as ``other``."""

    def __init__(self, registry: CollectorRegistry, routes: Iterable[str]) -> None:
        self.routes = frozenset(routes)
        self.requests = Counter(
            "moe2_gateway_requests",
            "HTTP requests answered, by route, method and status.",
            ["route", "method", "status"],
            registry=registry,
        )
        self.seconds = Histogram(
            "moe2_gateway_request_seconds",
            "HTTP request duration, to the end of the response body (streams included).",
            ["route"],
            buckets=(*LATENCY_BUCKETS, 30, 60, 120),
            registry=registry,
        )
        self.in_flight = Gauge(
            "moe2_gateway_requests_in_flight",
            "HTTP requests (and open streams) being answered.",
            registry=registry,
        )


class MetricsApp:
    """prometheus_client's ASGI app for ``registry``, as an object: a web framework routes an
    object as a raw ASGI app (a function would be taken for a request handler), so ``/metrics``
    answers as it is, with no redirect to ``/metrics/`` as a mount would."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._app = make_asgi_app(registry)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)


class CountedHttp:
    """ASGI middleware that feeds :class:`HttpMetrics`: ``app.add_middleware(CountedHttp,
    metrics=...)``."""

    def __init__(self, app: AsgiApp, metrics: HttpMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        m = self.metrics
        route = scope["path"] if scope["path"] in m.routes else "other"
        status = [500]  # an app that raises before it answers: what the server will send

        async def send_counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        started = time.perf_counter()
        m.in_flight.inc()
        try:
            await self.app(scope, receive, send_counted)
        finally:
            m.in_flight.dec()
            m.seconds.labels(route).observe(time.perf_counter() - started)
            m.requests.labels(route, scope["method"], str(status[0])).inc()
