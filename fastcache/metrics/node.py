"""A client node's metric families, read from the counters the node keeps anyway.

Nothing here runs until ``/metrics`` is scraped: the tiers' per-thread counters are summed,
the latency rings' histograms and the FUSE handlers' ``OpHistograms`` copied, gauges read.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.metrics_core import Metric

from fastcache import __version__
from fastcache.metrics.histogram import BOUNDS, OpHistograms

if TYPE_CHECKING:
    from fastcache.api import NodeState
    from fastcache.cache.stats import Latency

TIERS = ("nvme", "peer", "s3")


def latency_buckets(latency: Latency) -> list[tuple[str, float]]:
    """A ``cache.stats.Latency``'s histogram, cumulative, as Prometheus wants it."""
    out, total = [], 0
    for bound, n in zip((*map(str, BOUNDS), "+Inf"), latency.buckets, strict=True):
        total += n
        out.append((bound, total))
    return out


def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


def labelled(
    family: CounterMetricFamily | GaugeMetricFamily, rows: Iterable[tuple[Sequence[str], float]]
) -> Metric:
    for labels, value in rows:
        family.add_metric(list(labels), value)
    return family


def op_histograms(
    prefix: str, what: str, label: str, ops: OpHistograms
) -> tuple[Metric, Metric, Metric]:
    """``<prefix>_seconds`` (histogram of the timed calls), ``<prefix>s_total`` (every call)
    and ``<prefix>_bytes_total``, labelled by operation."""
    seconds = HistogramMetricFamily(f"{prefix}_seconds", f"{what} latency", labels=[label])
    calls = CounterMetricFamily(f"{prefix}s", f"{what} calls", labels=[label])
    nbytes = CounterMetricFamily(f"{prefix}_bytes", f"{what} bytes", labels=[label])
    for name, snap in ops.snapshot().items():
        if not snap.calls:
            continue
        seconds.add_metric([name], snap.cumulative(), snap.sum_seconds)
        calls.add_metric([name], snap.calls)
        if snap.bytes:
            nbytes.add_metric([name], snap.bytes)
    return seconds, calls, nbytes


class NodeCollector:
    """The families of one client node (``NodeState``)."""

    def __init__(self, state: NodeState) -> None:
        self.state = state

    async def families(self) -> list[Metric]:
        return list(self.collect())

    def collect(self) -> Iterable[Metric]:
        state = self.state
        manager = state.manager
        doc: dict[str, Any] = manager.stats()
        tiers = doc["tiers"]
        yield labelled(
            GaugeMetricFamily("fastcache_node_info", "this node", labels=["peer_id", "version"]),
            [((state.config.peer_id, __version__), 1)],
        )
        for key, name, what in (
            ("hits", "hits", "chunk reads a tier served"),
            ("misses", "misses", "chunk reads a tier could not serve"),
            ("bytes", "read_bytes", "bytes a tier served"),
            ("errors", "errors", "tier reads that failed (I/O, timeouts, unavailable)"),
            ("corrupt", "corrupt", "copies that did not match their digest"),
        ):
            yield labelled(
                CounterMetricFamily(f"fastcache_tier_{name}", what, labels=["tier"]),
                [((t,), tiers[t].get(key, 0)) for t in TIERS if t in tiers],
            )
        yield counter(
            "fastcache_memory_hits",
            "reads served from chunks fetched moments ago (in memory)",
            doc.get("memory_hits", 0),
        )
        counters = manager.counters
        reads = HistogramMetricFamily(
            "fastcache_tier_read_seconds",
            "chunk reads a tier served (NVMe: one hit in 16 timed)",
            labels=["tier"],
        )
        reads.add_metric(
            ["nvme"],
            latency_buckets(counters.local_latency),
            counters.local_latency.total,
        )
        for role in ("peer", "s3"):
            lat = counters.tiers[role].latency
            reads.add_metric([role], latency_buckets(lat), lat.total)
        yield reads
        for name, lat, what in (
            (
                "fastcache_chunk_read_seconds",
                counters.read_latency,
                "chunk reads below the FUSE hit path (any tier)",
            ),
            (
                "fastcache_chunk_write_seconds",
                counters.write_latency,
                "chunk writes (NVMe and the write-back queue)",
            ),
        ):
            family = HistogramMetricFamily(name, what)
            family.add_metric([], latency_buckets(lat), lat.total)
            yield family
        wb = doc["writeback"]
        yield gauge(
            "fastcache_writeback_queue_depth",
            "chunks waiting for an upload worker",
            wb["queue_depth"],
        )
        yield gauge(
            "fastcache_writeback_pending_chunks",
            "chunks acknowledged, not yet in S3",
            wb["pending"],
        )
        yield gauge(
            "fastcache_writeback_pending_bytes",
            "bytes acknowledged, not yet in S3",
            manager.pending_bytes(),
        )
        yield counter("fastcache_uploaded_chunks", "chunks uploaded to S3", wb["uploaded"])
        yield counter("fastcache_upload_retries", "uploads retried", wb["failed_retries"])
        yield counter(
            "fastcache_peer_replicas", "chunks replicated to peers", wb["peer_replicated"]
        )
        nvme = state.nvme.stats()
        yield gauge("fastcache_nvme_capacity_bytes", "NVMe cache capacity", nvme["capacity"])
        yield gauge("fastcache_nvme_used_bytes", "NVMe cache bytes in use", nvme["used"])
        yield gauge("fastcache_nvme_chunks", "chunks on NVMe", nvme["chunks"])
        yield gauge("fastcache_nvme_pinned_chunks", "chunks pinned until uploaded", nvme["pinned"])
        yield counter("fastcache_nvme_evictions", "chunks evicted", nvme["evictions"])
        yield counter(
            "fastcache_nvme_written_bytes", "bytes written to NVMe", nvme["bytes_written"]
        )
        s3 = tiers.get("s3", {}).get("tier", {})
        yield labelled(
            CounterMetricFamily("fastcache_s3_requests", "S3 requests", labels=["op"]),
            [((op,), n) for op, n in sorted(s3.get("requests_by_op", {}).items())],
        )
        yield labelled(
            CounterMetricFamily("fastcache_s3_errors", "S3 errors", labels=["kind"]),
            [((k,), n) for k, n in sorted(s3.get("errors_by_kind", {}).items())],
        )
        yield labelled(
            CounterMetricFamily("fastcache_s3_bytes", "S3 traffic", labels=["direction"]),
            [(("down",), s3.get("bytes_down", 0)), (("up",), s3.get("bytes_up", 0))],
        )
        yield counter("fastcache_s3_retries", "S3 requests retried", s3.get("retries", 0))
        if state.peer is not None:
            peer = state.peer.stats()
            yield gauge(
                "fastcache_peers_alive", "live peers (this node not counted)", peer["live_peers"]
            )
            yield counter(
                "fastcache_peer_breaker_trips",
                "peer circuit breakers opened",
                peer["breaker_trips"],
            )
            yield labelled(
                CounterMetricFamily("fastcache_peer_bytes", "peer traffic", labels=["direction"]),
                [(("down",), peer.get("bytes_read", 0)), (("up",), peer.get("bytes_written", 0))],
            )
        ops = state.mount_ops
        if ops is not None:
            yield from op_histograms(
                "fastcache_fuse_op",
                "FUSE operation (reads: one in 16 timed)",
                "op",
                ops.op_times,
            )
            yield labelled(
                GaugeMetricFamily(
                    "fastcache_metadata_cached",
                    "metadata this node answers from (attributes, entries)",
                    labels=["kind"],
                ),
                [((kind,), n) for kind, n in ops.meta.sizes().items()],
            )
