"""Warmup: fetch the whole chunks of files and trees into this node's NVMe, in parallel.

``POST /api/warmup`` (api.py) runs one ``Warmup``. ``plan`` walks the paths at the
coordinator (directories recursively; symlinks are not followed) and collects every file's
data chunks once: holes are stored nowhere, a chunk two files share is fetched once. ``run``
fetches the chunks that are not on NVMe through the cache's own read path (the chunk's
owner, the peers, S3; verified; promoted to NVMe as any fetched chunk is), ``threads`` of
them in flight, and reports progress as it goes. A chunk already on NVMe is skipped, so a
warmup cut short resumes where it stopped when run again.

The fetched bytes reach NVMe through the reader's promotion, in the background: until they
are there the reader serves them from memory, so nothing is fetched twice.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastcache.chunks import Manifest
from fastcache.coordinator.model import hole_digest
from fastcache.errors import FastcacheError

if TYPE_CHECKING:
    from fastcache.cache.manager import CacheManager
    from fastcache.coordinator.client import CoordinatorClient
    from fastcache.coordinator.model import InodeAttrs

__all__ = ["DEFAULT_THREADS", "MAX_ERRORS", "WarmProgress", "Warmup", "data_chunks"]

DEFAULT_THREADS = 16
MAX_ERRORS = 20  # failures reported by name; the rest are only counted
_LIST_PAGE = 1000
_STAT_CONCURRENCY = 16  # getattr requests in flight while walking a directory


def data_chunks(doc: dict[str, Any]) -> list[tuple[str, int]]:
    """``(digest, length)`` of a manifest's chunks that are stored somewhere (not holes)."""
    manifest = Manifest.from_json(doc)
    out = []
    for index, digest in enumerate(manifest.chunks):
        length = manifest.chunk_length(index)
        if digest != hole_digest(length):
            out.append((digest, length))
    return out


@dataclass
class WarmProgress:
    """Where a warmup stands. ``chunks``/``bytes``: what it has to look at; ``fetched_*``:
    what it had to fetch (the rest was on NVMe already, or failed)."""

    files: int = 0
    chunks: int = 0
    bytes: int = 0
    files_done: int = 0
    chunks_done: int = 0
    bytes_done: int = 0
    fetched_chunks: int = 0
    fetched_bytes: int = 0
    cached_chunks: int = 0
    failed_chunks: int = 0
    errors: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__, errors=list(self.errors))


class Warmup:
    """One warmup job on this node: ``await plan(paths)``, then ``await run(report)``."""

    def __init__(
        self,
        manager: CacheManager,
        coordinator: CoordinatorClient,
        threads: int = DEFAULT_THREADS,
        wanted: Callable[[str], bool] | None = None,
    ) -> None:
        self._manager = manager
        self._coordinator = coordinator
        self._threads = max(1, threads)
        self._wanted = wanted  # e.g. "this node owns the chunk" for a cluster-wide warmup
        self.progress = WarmProgress()
        self._lengths: dict[str, int] = {}  # digest → length, in first-seen order
        self._files_of: dict[str, list[int]] = {}  # digest → indexes into _left
        self._left: list[int] = []  # per file: chunks not done yet
        self._seen: set[int] = set()  # inodes planned (hard links count once)

    # --- planning ------------------------------------------------------------------------
    async def plan(self, paths: Iterable[str]) -> WarmProgress:
        """Walk ``paths``; ``NotFound`` if one does not exist. Returns the totals."""
        for path in paths:
            attrs = await self._coordinator.resolve(path)
            if attrs.type == "dir":
                await self._walk(attrs.ino)
            else:
                await self._add(attrs)
        return self.progress

    async def _walk(self, top: int) -> None:
        dirs = [top]
        room = asyncio.Semaphore(_STAT_CONCURRENCY)
        while dirs:
            ino = dirs.pop()
            offset = 0
            while True:
                page = await self._coordinator.readdir(ino, offset, _LIST_PAGE)
                files = []
                for entry in page:
                    if entry.attrs.type == "dir":
                        dirs.append(entry.attrs.ino)
                    elif entry.attrs.type == "file":
                        files.append(entry.attrs)
                await asyncio.gather(*(self._add(f, room) for f in files))
                if len(page) < _LIST_PAGE:
                    break
                offset = page[-1].offset

    async def _add(self, attrs: InodeAttrs, room: asyncio.Semaphore | None = None) -> None:
        if attrs.type != "file" or attrs.ino in self._seen:
            return
        self._seen.add(attrs.ino)
        doc = attrs.manifest
        if doc is None and attrs.size:  # listings and some answers carry no manifest
            async with room or contextlib.nullcontext():
                doc = (await self._coordinator.getattr(attrs.ino)).manifest
        chunks = data_chunks(doc) if doc else []
        if self._wanted is not None:
            chunks = [(d, n) for d, n in chunks if self._wanted(d)]
        index = len(self._left)
        left = 0
        for digest, length in chunks:
            holders = self._files_of.setdefault(digest, [])
            if holders and holders[-1] == index:
                continue  # the same chunk twice in one file
            holders.append(index)
            left += 1
            if digest not in self._lengths:
                self._lengths[digest] = length
                self.progress.chunks += 1
                self.progress.bytes += length
        self._left.append(left)
        self.progress.files += 1
        if left == 0:
            self.progress.files_done += 1

    # --- fetching ------------------------------------------------------------------------
    async def run(
        self,
        report: Callable[[WarmProgress], Awaitable[None]],
        interval: float = 0.25,
    ) -> WarmProgress:
        """Fetch what is missing, calling ``report`` every ``interval`` seconds meanwhile.

        Cancelling it (the client went away) stops the fetches in flight."""
        todo = iter(list(self._lengths))

        async def worker() -> None:
            for digest in todo:
                await self._one(digest)

        workers = [asyncio.ensure_future(worker()) for _ in range(self._threads)]
        done = asyncio.ensure_future(asyncio.gather(*workers))
        try:
            while not done.done():
                await asyncio.wait([done], timeout=interval)
                if not done.done():
                    await report(self.progress)
            done.result()
        finally:
            for task in (*workers, done):
                task.cancel()
            await asyncio.gather(*workers, done, return_exceptions=True)
        return self.progress

    async def _one(self, digest: str) -> None:
        p = self.progress
        length = self._lengths[digest]
        try:
            if await self._manager.nvme.exists(digest):
                p.cached_chunks += 1
            else:
                data = await self._manager.read_chunk(digest)
                p.fetched_chunks += 1
                p.fetched_bytes += len(data)
        except FastcacheError as exc:
            p.failed_chunks += 1
            if len(p.errors) < MAX_ERRORS:
                p.errors.append(f"chunk {digest}: {exc}")
        p.chunks_done += 1
        p.bytes_done += length
        for index in self._files_of[digest]:
            self._left[index] -= 1
            if self._left[index] == 0:
                p.files_done += 1
