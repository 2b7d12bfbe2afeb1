"""``fastcache warmup PATH…``: pre-load files and trees into a node's NVMe.

A PATH inside a fastcache mount of this machine is warmed on the node serving that mount
(found by asking the coordinator's peers which one has it mounted); any other PATH is a
path in the namespace, warmed on ``--node``. The node does the work (``POST /api/warmup``:
whole chunks, ``--threads`` in flight); this side shows its progress. ``--cluster`` asks
every live node to fetch the chunks it owns instead, so that later misses anywhere are
served by a peer. Chunks already on NVMe are skipped: running it again resumes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastcache.admin.mounts import mount_of
from fastcache.admin.nodes import NodeApi
from fastcache.admin.progress import Bar
from fastcache.coordinator.client import CoordinatorClient
from fastcache.errors import BadRequest, FastcacheError

__all__ = ["Targets", "WarmupRun", "targets"]

_COUNTERS = (
    "files",
    "chunks",
    "bytes",
    "files_done",
    "chunks_done",
    "bytes_done",
    "fetched_chunks",
    "fetched_bytes",
    "cached_chunks",
    "failed_chunks",
)


@dataclass
class Targets:
    paths: list[str]  # in the namespace
    mountpoint: Path | None  # the local mount they came from, if any


def targets(paths: list[str]) -> Targets:
    """Namespace paths for the command's PATHs (all in one mount, or all namespace paths)."""
    out: list[str] = []
    mountpoints = set()
    for raw in paths:
        found = mount_of(Path(raw)) if Path(raw).is_absolute() or Path(raw).exists() else None
        if found is not None:
            mountpoints.add(found[0])
            out.append(found[1])
        elif raw.startswith("/"):
            out.append(raw)
        else:
            raise BadRequest(f"{raw}: not in a fastcache mount, and not a namespace path (/…)")
    if len(mountpoints) > 1:
        raise BadRequest("the PATHs are in different mounts: warm one mount at a time")
    return Targets(out, mountpoints.pop() if mountpoints else None)


async def node_for_mount(coordinator: str, token: str | None, mountpoint: Path) -> str:
    """The URL of the live node that serves ``mountpoint`` on this machine."""
    async with CoordinatorClient(coordinator, token) as client:
        peers = await client.list_peers()
    async with NodeApi(token) as api:

        async def mount(url: str) -> str | None:
            try:
                return (await api.get_json(url, "/api/health")).get("mount")
            except FastcacheError:
                return None

        found = await asyncio.gather(*(mount(p.url) for p in peers))
    urls = [p.url for p, m in zip(peers, found, strict=True) if m == str(mountpoint)]
    if not urls:
        raise BadRequest(f"no live node of {coordinator} serves {mountpoint}: give --node URL")
    local = [u for u in urls if "//127." in u or "//localhost" in u or "//[::1]" in u]
    return (local or urls)[0]


@dataclass
class WarmupRun:
    """The state of a warmup across the nodes doing it (one, or all with ``--cluster``)."""

    per_node: dict[str, dict[str, Any]] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    finished: set[str] = field(default_factory=set)
    failed_nodes: list[str] = field(default_factory=list)

    def total(self, key: str) -> int:
        """Summed over the nodes; files are every node's (each walks them all): a file is
        done when every node is done with it."""
        values = [int(doc.get(key, 0)) for doc in self.per_node.values()]
        if key == "files":
            return max(values, default=0)
        if key == "files_done":
            return min(values, default=0)
        return sum(values)

    def summary(self) -> dict[str, Any]:
        return {key: self.total(key) for key in _COUNTERS} | {
            "nodes": sorted(self.per_node),
            "errors": self.failed_nodes + self.errors,
            "failed_nodes": len(self.failed_nodes),
        }

    async def follow(
        self, api: NodeApi, url: str, paths: list[str], threads: int, owned: bool, tick: Callable
    ) -> None:
        """One node's events; with ``owned`` (``--cluster``) a node that fails is reported
        and the others go on (its chunks are not warmed), alone its error ends the run."""
        try:
            async for event in api.warmup(url, paths, threads, owned_only=owned):
                self.per_node[url] = event
                if event.get("event") == "done":
                    self.finished.add(url)
                    self.errors.extend(f"{url}: {e}" for e in event.get("errors", []))
                tick()
        except FastcacheError as exc:
            if not owned:
                raise
            self.failed_nodes.append(f"{url}: {exc}")


async def run(
    nodes: list[str],
    paths: list[str],
    *,
    token: str | None,
    threads: int,
    cluster: bool,
    bar: Bar,
    state: WarmupRun,
) -> dict[str, Any]:
    """Warm ``paths`` on ``nodes``, updating ``bar``; the summary. ``state`` stays readable
    after a Ctrl-C (the caller reports how far it got)."""

    def tick() -> None:
        files, done = state.total("files"), state.total("files_done")
        note = f"{done:,}/{files:,} files"
        bar.update(state.total("bytes_done"), state.total("bytes") or None, note)

    async with NodeApi(token) as api:
        await asyncio.gather(
            *(state.follow(api, url, paths, threads, cluster, tick) for url in nodes)
        )
    tick()
    return state.summary()


async def cluster_nodes(coordinator: str, token: str | None) -> list[str]:
    async with CoordinatorClient(coordinator, token) as client:
        return sorted(p.url for p in await client.list_peers())
