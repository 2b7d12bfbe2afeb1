"""``GET /metrics``: metric families in Prometheus's text exposition format.

Each app hands in an async source of families, built from its counters when scraped (so the
paths that count pay nothing for it). The route is behind the cluster token like every
other one, unless the app was started with ``--metrics-public``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric

from fastcache.web.openapi import Route

METRICS_PATH = "/metrics"
FamiliesSource = Callable[[], Awaitable[Iterable[Metric]]]


class _Built:
    """A collector over families built already (the scrape built them)."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterable[Metric]:
        return self._families


def render(families: Iterable[Metric]) -> bytes:
    """The text exposition of ``families``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Built(families))
    return generate_latest(registry)


def metrics_route(source: FamiliesSource, *, public: bool) -> Route:
    """The ``/metrics`` row of an app's route table."""

    async def metrics(request: web.Request) -> web.Response:
        body = render(await source())
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    return Route(
        "GET",
        METRICS_PATH,
        metrics,
        "Prometheus metrics (text exposition format)",
        {200: None},
        public=public,
    )
