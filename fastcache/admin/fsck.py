"""``fastcache fsck``: every chunk a manifest lists is in S3, whole.

By default one HEAD per chunk (it exists and has the length the manifest says); with
``--verify-data`` a GET, hashed against its name. ``--repair`` puts a missing or bad chunk
back from a node that still holds it: the nodes the coordinator records as holders first,
then every live node (``GET /api/chunks/<digest>``: that node's NVMe only), each copy
verified before it is uploaded. A chunk a node has not uploaded yet (still pending after a
write) shows as missing until it has: run fsck on a quiet cluster, or repair it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fastcache.admin.nodes import NodeApi
from fastcache.admin.refs import Ref, referenced
from fastcache.coordinator.client import CoordinatorClient
from fastcache.errors import ChunkCorrupt, ChunkNotFound, FastcacheError
from fastcache.tiers.base import TierStorage, verify

__all__ = ["FsckReport", "fsck"]

MAX_LISTED = 1000  # problems listed by name in the report


@dataclass
class Problem:
    digest: str
    ino: int
    what: str  # "missing", "corrupt", "wrong size", "unreadable"
    repaired_from: str | None = None
    detail: str = ""

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class FsckReport:
    files: int = 0
    chunks: int = 0
    bytes: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def unrepaired(self) -> list[Problem]:
        return [p for p in self.problems if p.repaired_from is None]

    def to_json(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "chunks": self.chunks,
            "bytes": self.bytes,
            "problems": [p.to_json() for p in self.problems[:MAX_LISTED]],
            "problem_count": len(self.problems),
            "unrepaired": len(self.unrepaired),
        }


async def _check(cloud: TierStorage, digest: str, ref: Ref, verify_data: bool) -> Problem | None:
    try:
        if verify_data:
            data = await cloud.read(digest)  # the S3 tier verifies what it reads
            size = len(data)
        else:
            size = await cloud.size(digest)
    except ChunkNotFound:
        return Problem(digest, ref.ino, "missing")
    except ChunkCorrupt as exc:
        return Problem(digest, ref.ino, "corrupt", detail=str(exc))
    except FastcacheError as exc:
        return Problem(digest, ref.ino, "unreadable", detail=str(exc))
    if size != ref.length:
        return Problem(digest, ref.ino, "wrong size", detail=f"{size} bytes, not {ref.length}")
    return None


async def _repair(
    problem: Problem, coordinator: CoordinatorClient, nodes: NodeApi, cloud: TierStorage
) -> None:
    recorded = await coordinator.get_locations(chunk=problem.digest)
    live = await coordinator.list_peers()
    urls = list(dict.fromkeys([p.url for p in recorded] + [p.url for p in live]))
    for url in urls:
        try:
            data = await nodes.chunk(url, problem.digest)
            if data is None:
                continue
            verify(problem.digest, data, url)
            await cloud.write(problem.digest, data)
        except FastcacheError as exc:
            problem.detail = f"{problem.detail}; {exc}".lstrip("; ")
            continue
        problem.repaired_from = url
        return


async def fsck(
    coordinator: CoordinatorClient,
    cloud: TierStorage,
    *,
    token: str | None,
    verify_data: bool = False,
    repair: bool = False,
    threads: int = 16,
    on_scan: Callable[[int], None] | None = None,
    on_check: Callable[[int, int, int], None] | None = None,
) -> FsckReport:
    """Check (and with ``repair`` restore) every referenced chunk.

    ``on_scan(inodes read)`` while reading the manifests, ``on_check(chunks checked,
    chunks, problems)`` while checking."""
    refs = await referenced(coordinator, on_scan)
    report = FsckReport(
        files=len({r.ino for r in refs.values()}),
        chunks=len(refs),
        bytes=sum(r.length for r in refs.values()),
    )
    todo = iter(refs.items())
    checked = 0

    async with NodeApi(token) as nodes:

        async def worker() -> None:
            nonlocal checked
            for digest, ref in todo:
                problem = await _check(cloud, digest, ref, verify_data)
                if problem is not None:
                    if repair:
                        await _repair(problem, coordinator, nodes, cloud)
                    report.problems.append(problem)
                checked += 1
                if on_check is not None:
                    on_check(checked, len(refs), len(report.problems))

        await asyncio.gather(*(worker() for _ in range(max(1, threads))))
    return report
