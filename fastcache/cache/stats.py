"""What the cache counts: hits and misses per tier, latency rings, event counters, and the
``/api/cache/stats`` document built from them. FUSE threads count without a lock (per
thread, summed when read); the event counters are bumped on the loop thread only."""

from __future__ import annotations

from bisect import bisect_left
from collections import deque
from typing import Any

from fastcache.metrics.histogram import BOUNDS
from fastcache.tiers.counters import PerThread

LATENCY_SAMPLES = 2048

COUNTS = (
    "uploaded",
    "upload_retries",
    "peer_replicated",
    "peer_replica_failures",
    "promotions",
    "promotions_full",
    "promotions_failed",
    "corrupt_chunks",
    "nvme_write_failures",
    "writes_nvme",
    "writes_peer",
    "writes_s3",
    "lost_chunks",
    "holes",
    "writes_deduplicated",
    "recovered",
    "prefetches",
    "fetch_through_served",
    "hedged_to_s3",
    "published",
    "publish_failures",
)


HITS, MISSES, BYTES, ERRORS, CORRUPT = range(5)  # slots of ``TierCounters.counts``


class TierCounters:
    """Hits, misses and bytes served by one tier. FUSE threads count NVMe hits: each thread
    counts in its own list (``PerThread``, no lock); ``snapshot`` sums them. The hit path
    bumps its list directly (``local.counts[HITS] += 1``)."""

    __slots__ = ("counts", "latency", "local")

    def __init__(self) -> None:
        self.counts = PerThread("hits", "misses", "bytes", "errors", "corrupt")
        self.local = self.counts.local
        self.latency = Latency()  # reads served by this tier (peer, S3: every one)

    def hit(self, nbytes: int) -> None:
        mine = self.counts.mine()
        mine[HITS] += 1
        mine[BYTES] += nbytes

    def miss(self, error: bool = False, corrupt: bool = False) -> None:
        mine = self.counts.mine()
        mine[MISSES] += 1
        mine[ERRORS] += error
        mine[CORRUPT] += corrupt

    def snapshot(self) -> dict[str, int]:
        return self.counts.totals()


class Latency:
    """A bounded ring of latency samples (seconds); percentiles on demand. Also a histogram
    over ``metrics.histogram.BOUNDS`` (``buckets``, not cumulative, and ``total`` seconds)
    for ``/metrics``."""

    def __init__(self, size: int = LATENCY_SAMPLES) -> None:
        self._samples: deque[float] = deque(maxlen=size)  # append is thread-safe
        self.count = 0
        self.buckets = [0] * (len(BOUNDS) + 1)
        self.total = 0.0

    def add(self, seconds: float) -> None:
        self._samples.append(seconds)
        self.count += 1
        self.buckets[bisect_left(BOUNDS, seconds)] += 1
        self.total += seconds

    def snapshot(self) -> dict[str, float | int]:
        samples = sorted(self._samples)
        out: dict[str, float | int] = {"count": self.count}
        for name, q in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99)):
            if samples:
                out[f"{name}_ms"] = samples[min(len(samples) - 1, int(q * len(samples)))] * 1e3
            else:
                out[f"{name}_ms"] = 0.0
        return out


class CacheStats:
    """The counters of one cache, shared by its reader and its write-back."""

    def __init__(self) -> None:
        self.tiers = {"nvme": TierCounters(), "peer": TierCounters(), "s3": TierCounters()}
        self.read_latency = Latency()
        self.local_latency = Latency()
        self.write_latency = Latency()
        self.counts = dict.fromkeys(COUNTS, 0)

    def snapshot(
        self,
        tier_stats: dict[str, dict[str, Any]],
        queue_depth: int,
        pending: int,
        memory_hits: int,
    ) -> dict[str, Any]:
        """The stats document; ``tier_stats`` holds each present tier's own ``stats()``."""
        counts = dict(self.counts)
        tiers: dict[str, Any] = {role: c.snapshot() for role, c in self.tiers.items()}
        for role, own in tier_stats.items():
            tiers[role]["tier"] = own
        # NVMe reads are counted once, by the tier (its hit path is too hot to count twice);
        # the reader adds only what the tier cannot see: errors and corrupt copies.
        nvme = tiers["nvme"]
        own = tier_stats.get("nvme", {})
        nvme["hits"] += own.get("hits", 0)
        nvme["misses"] += own.get("misses", 0)
        nvme["bytes"] += own.get("bytes_read", 0)
        return {
            "tiers": tiers,
            "latency": {
                "read": self.read_latency.snapshot(),
                "read_local": self.local_latency.snapshot(),
                "write": self.write_latency.snapshot(),
            },
            "writeback": {
                "queue_depth": queue_depth,
                "pending": pending,
                "uploaded": counts["uploaded"],
                "failed_retries": counts["upload_retries"],
                "peer_replicated": counts["peer_replicated"],
                "peer_failures": counts["peer_replica_failures"],
                "lost": counts["lost_chunks"],
                "published": counts["published"],
                "publish_failures": counts["publish_failures"],
            },
            "writes": {
                "nvme": counts["writes_nvme"],
                "peer": counts["writes_peer"],
                "s3": counts["writes_s3"],
                "nvme_failures": counts["nvme_write_failures"],
            },
            "promotions": counts["promotions"],
            "promotions_full": counts["promotions_full"],
            "promotions_failed": counts["promotions_failed"],
            "prefetches": counts["prefetches"],
            "memory_hits": memory_hits,
            "fetch_through_served": counts["fetch_through_served"],
            "hedged_to_s3": counts["hedged_to_s3"],
            "corrupt_chunks": counts["corrupt_chunks"],
        }
