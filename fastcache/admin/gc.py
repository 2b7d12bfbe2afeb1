"""``fastcache gc``: the chunks in S3 that no manifest references.

The bucket is listed first, then every manifest read: a chunk uploaded after the listing
is not a candidate, and a manifest committed before the scan ends protects its chunks. A
chunk younger than the grace period is kept whatever it looks like: its file may still be
being written (chunks are uploaded before their manifest is committed). Without ``delete``
nothing is removed: the report lists what would be. Holes are never stored.

One window remains: a node that writes a chunk S3 already holds skips the upload, so a
manifest committed during the run could reference an orphan older than the grace period
that this run then deletes. Run gc when no writer reuses long-deleted data, or with a grace
period longer than any write takes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastcache.admin.refs import referenced
from fastcache.coordinator.client import CoordinatorClient
from fastcache.errors import ChunkNotFound, FastcacheError
from fastcache.tiers.cloud import CloudTier

__all__ = ["GcReport", "gc"]

MAX_LISTED = 1000


@dataclass
class GcReport:
    objects: int = 0  # chunks in the bucket
    referenced: int = 0
    orphans: list[tuple[str, int, float]] = field(default_factory=list)  # past the grace
    young: int = 0  # unreferenced but within the grace period: kept
    deleted: int = 0
    deleted_bytes: int = 0
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {
            "objects": self.objects,
            "referenced": self.referenced,
            "orphans": [
                {"digest": d, "size": n, "age": round(time.time() - t, 1)}
                for d, n, t in self.orphans[:MAX_LISTED]
            ],
            "orphan_count": len(self.orphans),
            "orphan_bytes": sum(n for _, n, _ in self.orphans),
            "young_kept": self.young,
            "deleted": self.deleted,
            "deleted_bytes": self.deleted_bytes,
            "errors": self.errors[:MAX_LISTED],
        }


async def gc(
    coordinator: CoordinatorClient,
    cloud: CloudTier,
    *,
    grace: float,
    delete: bool = False,
    threads: int = 16,
    on_scan: Callable[[int], None] | None = None,
    on_delete: Callable[[int, int], None] | None = None,
) -> GcReport:
    """Find (and with ``delete`` remove) unreferenced chunks older than ``grace`` seconds."""
    listing = await cloud.list_objects()
    refs = await referenced(coordinator, on_scan)
    now = time.time()
    report = GcReport(objects=len(listing), referenced=len(refs))
    for digest, size, modified in listing:
        if digest in refs:
            continue
        if now - modified < grace:
            report.young += 1
        else:
            report.orphans.append((digest, size, modified))
    if not delete:
        return report
    todo = iter(report.orphans)
    done = 0

    async def worker() -> None:
        nonlocal done
        for digest, size, _ in todo:
            try:
                await cloud.delete(digest)
                report.deleted += 1
                report.deleted_bytes += size
            except ChunkNotFound:
                pass  # gone already (another gc)
            except FastcacheError as exc:
                report.errors.append(f"{digest}: {exc}")
            done += 1
            if on_delete is not None:
                on_delete(done, len(report.orphans))

    await asyncio.gather(*(worker() for _ in range(max(1, threads))))
    return report
