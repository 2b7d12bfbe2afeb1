"""What the cache counts: hits and misses per tier, latency rings, event counters, and the
``/api/cache/stats`` document built from them. Thread-safe where FUSE threads count."""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

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


class TierCounters:
    """Hits, misses and bytes served by one tier. Thread-safe (FUSE threads count NVMe hits)."""

    __slots__ = ("_lock", "bytes", "corrupt", "errors", "hits", "misses")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.hits = self.misses = self.bytes = self.errors = self.corrupt = 0

    def hit(self, nbytes: int) -> None:
        with self._lock:
            self.hits += 1
            self.bytes += nbytes

    def miss(self, error: bool = False, corrupt: bool = False) -> None:
        with self._lock:
            self.misses += 1
            self.errors += error
            self.corrupt += corrupt

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {
                "hits": self.hits,
                "misses": self.misses,
                "bytes": self.bytes,
                "errors": self.errors,
                "corrupt": self.corrupt,
            }


class Latency:
    """A bounded ring of latency samples (seconds); percentiles on demand."""

    def __init__(self, size: int = LATENCY_SAMPLES) -> None:
        self._samples: deque[float] = deque(maxlen=size)  # append is thread-safe
        self.count = 0

    def add(self, seconds: float) -> None:
        self._samples.append(seconds)
        self.count += 1

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
