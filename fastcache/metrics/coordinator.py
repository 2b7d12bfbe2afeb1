"""The coordinator's metric families: sessions, session requests per op, leases, the
store's commits and syncs, peers, and the REST requests it served (``request_timer``)."""

from __future__ import annotations

import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from aiohttp import web
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from fastcache import __version__
from fastcache.metrics.histogram import OpHistograms
from fastcache.metrics.node import counter, gauge, labelled, op_histograms
from fastcache.web.middleware import Handler

_clock = time.perf_counter_ns

if TYPE_CHECKING:
    from fastcache.coordinator.service import CoordinatorService
    from fastcache.coordinator.session import SessionHub

# store.counters() keys exported as counters, and what they count
_STORE = (
    ("transactions", "namespace transactions"),
    ("commits", "store commits (transactions grouped into one)"),
    ("syncs", "syncs to disk"),
    ("rolled_back", "transactions rolled back"),
    ("barriers", "sync barriers asked for (fsync on a node)"),
)


def route_name(method: str, path: str) -> str:
    return f"{method} {path}"


def request_timer(requests: OpHistograms) -> Any:
    """A middleware timing every request of a route in ``requests.names`` (``route_name``)."""
    index = requests.index

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        resource = request.match_info.route.resource
        i = None if resource is None else index.get(route_name(request.method, resource.canonical))
        if i is None:
            return await handler(request)
        start = _clock()
        try:
            return await handler(request)
        finally:
            requests.observe(i, _clock() - start)

    return middleware


_CLUSTER = (
    ("published", "changes sent to the other coordinators"),
    ("remote_changes", "changes received from the other coordinators"),
    ("ack_timeouts", "changes another coordinator did not ack within the lease term"),
    ("bus_lost", "times this coordinator stopped hearing itself on the bus"),
)


class CoordinatorCollector:
    """The families of one coordinator, from its service, session hub and request timer."""

    def __init__(
        self, service: CoordinatorService, hub: SessionHub, requests: OpHistograms
    ) -> None:
        self.service = service
        self.hub = hub
        self.requests = requests

    async def families(self) -> list[Metric]:
        peers = await self.service.peers_status()
        return list(self._collect(sum(live for _, live in peers), len(peers)))

    def _collect(self, live: int, recorded: int) -> Iterable[Metric]:
        yield labelled(
            GaugeMetricFamily("fastcache_coordinator_info", "this coordinator", labels=["version"]),
            [((__version__,), 1)],
        )
        yield labelled(
            GaugeMetricFamily("fastcache_coordinator_peers", "recorded nodes", labels=["state"]),
            [(("live",), live), (("dead",), recorded - live)],
        )
        sessions = self.hub.stats()
        yield gauge("fastcache_coordinator_sessions", "open metadata sessions", sessions["open"])
        yield counter(
            "fastcache_coordinator_sessions_opened", "metadata sessions opened", sessions["opened"]
        )
        yield labelled(
            CounterMetricFamily(
                "fastcache_coordinator_session_requests", "session requests per op", labels=["op"]
            ),
            [((op,), n) for op, n in sorted(sessions["ops"].items())],
        )
        yield counter(
            "fastcache_coordinator_session_errors",
            "session requests answered with an error",
            sessions["errors"],
        )
        yield counter(
            "fastcache_coordinator_pushes", "invalidations pushed to nodes", sessions["pushes"]
        )
        yield counter(
            "fastcache_coordinator_push_timeouts",
            "pushes a node did not acknowledge within the lease term",
            sessions["push_timeouts"],
        )
        yield gauge("fastcache_coordinator_leases_held", "leases held by nodes", sessions["leases"])
        yield counter(
            "fastcache_coordinator_leases_granted", "leases granted", sessions["leases_granted"]
        )
        cluster = sessions.get("cluster")
        if cluster is not None:  # several coordinators on one store (coordinator/cluster.py)
            yield gauge(
                "fastcache_coordinator_cluster_others",
                "other coordinators heard from",
                len(cluster["others"]),
            )
            yield gauge("fastcache_coordinator_leader", "1 if this one leads", cluster["leader"])
            yield gauge(
                "fastcache_coordinator_may_lease",
                "1 if it hears every change (grants leases)",
                cluster["may_lease"],
            )
            for key, what in _CLUSTER:
                yield counter(f"fastcache_coordinator_cluster_{key}", what, cluster[key])
        store = self.service.store.counters()
        for key, what in _STORE:
            yield counter(f"fastcache_coordinator_store_{key}", what, store.get(key, 0))
        yield gauge(
            "fastcache_coordinator_store_unsynced_commits",
            "commits not yet synced to disk",
            store.get("unsynced_commits", 0),
        )
        yield from op_histograms(
            "fastcache_coordinator_request", "REST request", "route", self.requests
        )
