"""The cache of one client node: the ``CacheManager`` protocol its users see, and
``DefaultCacheManager``, which wires the reader, the write pipeline and the write-back over
the three tiers (NVMe, peers, S3) and one set of counters.

Concurrency: every coroutine runs on one event loop. ``read_local`` may be called from any
thread (FUSE workers): it touches only thread-safe state. The manager does no blocking I/O on
the loop: the tiers run their own executors, the journal has its own thread, and large
hashes run in the default executor.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import Any, Protocol

from fastcache.cache.context import CacheContext
from fastcache.cache.pipeline import ChunkPipeline, ChunkWriter
from fastcache.cache.reader import ChunkReader
from fastcache.cache.stats import CacheStats
from fastcache.cache.writeback import WriteBack
from fastcache.chunks import Buffer, CdcParams, Manifest
from fastcache.config import CacheConfig
from fastcache.journal import Journal
from fastcache.tiers.base import LocalChunkStore, PeerRouting, TierStorage


class CacheManager(Protocol):
    """What the mount, the client API and the peer tier use. ``DefaultCacheManager``."""

    chunk_size: int
    nvme: LocalChunkStore
    cloud: TierStorage

    @property
    def cdc_params(self) -> CdcParams | None: ...
    def set_peer_tier(self, peer: PeerRouting | None) -> None: ...
    async def read_chunk(self, digest: str) -> bytes: ...
    async def read_chunk_for_peer(self, digest: str) -> bytes: ...

    read_local: Callable[[str, int, memoryview], int | None]
    recent_chunk: Callable[[str], Buffer | None]

    async def read_range(
        self, manifest: Manifest, offset: int, size: int, local_missed: bool = False
    ) -> bytes: ...
    def prefetch(self, manifest: Manifest, first_index: int, count: int) -> None: ...
    async def write_chunk(self, digest: str, data: Buffer) -> None: ...
    async def write_bytes(self, data: Buffer) -> Manifest: ...
    def writer(self) -> ChunkWriter: ...
    async def publish(self, digests: Iterable[str]) -> None: ...
    def unpublished(self, digests: Iterable[str]) -> list[str]: ...
    def note_published(self, count: int) -> None: ...
    @property
    def peer_id(self) -> str | None: ...
    async def flush(self, digests: Iterable[str], timeout: float | None = None) -> None: ...
    async def sync(self, timeout: float | None = None) -> None: ...
    def stats(self) -> dict[str, Any]: ...
    def pending_uploads(self) -> int: ...
    def pending_bytes(self) -> int: ...
    @property
    def counters(self) -> CacheStats: ...
    async def close(self) -> None: ...


class DefaultCacheManager:
    """The three-tier cache of one node. Build with ``await DefaultCacheManager.open(...)``."""

    def __init__(
        self,
        config: CacheConfig,
        nvme: LocalChunkStore,
        cloud: TierStorage,
        peer: PeerRouting | None,
        journal: Journal,
    ) -> None:
        self.config = config
        self.chunk_size = config.chunk_size
        self.nvme = nvme
        self.cloud = cloud
        self.journal = journal
        self._cdc_params = (
            CdcParams.for_average(config.chunk_size) if config.chunking == "cdc" else None
        )
        self._ctx = CacheContext(config, nvme, cloud, peer)
        self.counters = self._ctx.counters
        self.reader = ChunkReader(self._ctx)
        # The FUSE hit path, bound straight to the reader (it counts frames); any thread:
        # the chunk's bytes if it was fetched a moment ago (in memory, verified), to serve a
        # view of without a copy, else ``None``; NVMe (or memory) bytes of ``digest`` at
        # ``offset`` copied into ``out``, ``None`` on a miss.
        self.recent_chunk: Callable[[str], Buffer | None] = self.reader.recent.get
        self.read_local: Callable[[str, int, memoryview], int | None] = self.reader.read_local
        self.writeback = WriteBack(self._ctx, journal)
        self.pipeline = ChunkPipeline(
            config.chunk_size,
            self._cdc_params,
            config.upload_concurrency,
            self.writeback.write_chunk,
        )

    @classmethod
    async def open(
        cls,
        config: CacheConfig,
        nvme: LocalChunkStore,
        cloud: TierStorage,
        peer: PeerRouting | None = None,
    ) -> DefaultCacheManager:
        """Replay the journal (re-pin and re-queue pending chunks), start write-back workers."""
        loop = asyncio.get_running_loop()
        journal = await loop.run_in_executor(None, Journal.open, nvme.journal_dir)
        manager = cls(config, nvme, cloud, peer, journal)
        try:
            await manager.writeback.replay()
        except BaseException:
            journal.close()
            raise
        manager.writeback.start()
        return manager

    def set_peer_tier(self, peer: PeerRouting | None) -> None:
        self._ctx.peer = peer

    @property
    def cdc_params(self) -> CdcParams | None:
        """The FastCDC parameters when this node chunks by content, else ``None``."""
        return self._cdc_params

    @property
    def peer(self) -> PeerRouting | None:
        return self._ctx.peer

    # --- read path (ChunkReader) ---------------------------------------------------------
    async def read_chunk(self, digest: str) -> bytes:
        """The chunk's bytes from the fastest tier that has a good copy; ``DataUnavailable``."""
        return await self.reader.read_chunk(digest)

    async def read_chunk_for_peer(self, digest: str) -> bytes:
        """A peer's fetch-through request (we own ``digest``): one hop at most."""
        return await self.reader.read_chunk_for_peer(digest)

    async def read_range(
        self, manifest: Manifest, offset: int, size: int, local_missed: bool = False
    ) -> bytes:
        """Bytes ``[offset, offset + size)`` of the file (short at EOF); chunks in parallel.
        ``local_missed``: the caller missed it on ``read_local`` (one chunk) just now."""
        return await self.reader.read_range(manifest, offset, size, local_missed)

    def prefetch(self, manifest: Manifest, first_index: int, count: int) -> None:
        """Fetch and promote, in the background, the chunks not on NVMe. Loop thread only."""
        self.reader.prefetch(manifest, first_index, count)

    # --- write path (ChunkPipeline, WriteBack) -------------------------------------------
    async def write_chunk(self, digest: str, data: Buffer) -> None:
        """Store a chunk durably: NVMe (pinned, journaled, queued for S3) or peer/S3 raced."""
        await self.writeback.write_chunk(digest, data)

    async def write_bytes(self, data: Buffer) -> Manifest:
        """Split, hash and write the chunks of ``data``; the file's manifest."""
        return await self.pipeline.write_bytes(data)

    def writer(self) -> ChunkWriter:
        """A streaming writer (bounded memory) producing the same manifest as ``write_bytes``."""
        return self.pipeline.writer()

    @property
    def peer_id(self) -> str | None:
        """This node's peer id, ``None`` without a peer tier (nothing to publish then)."""
        return self.writeback.peer_id

    def unpublished(self, digests: Iterable[str]) -> list[str]:
        """Of ``digests``, those only this node holds yet (see ``WriteBack.unpublished``)."""
        return self.writeback.unpublished(digests)

    def note_published(self, count: int) -> None:
        """Count ``count`` chunks published along with a manifest commit."""
        self.writeback.note_published(count)

    async def publish(self, digests: Iterable[str]) -> None:
        """Make the chunks of ``digests`` only on this node findable by the other nodes."""
        await self.writeback.publish(digests)

    async def flush(self, digests: Iterable[str], timeout: float | None = None) -> None:
        """Return once every chunk in ``digests`` is in S3; ``TierUnavailable`` on timeout."""
        await self.writeback.flush(digests, timeout)

    async def sync(self, timeout: float | None = None) -> None:
        """Return once everything pending is in S3."""
        await self.writeback.sync(timeout)

    def pending_uploads(self) -> int:
        """Chunks acknowledged but not yet in S3."""
        return self.writeback.pending_uploads()

    def pending_bytes(self) -> int:
        """Bytes acknowledged but not yet in S3."""
        return self.writeback.pending_bytes()

    # --- observability and lifetime ------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        tier_stats = {"nvme": self.nvme.stats(), "s3": self.cloud.stats()}
        if self._ctx.peer is not None:
            tier_stats["peer"] = self._ctx.peer.stats()
        return self.counters.snapshot(
            tier_stats,
            queue_depth=self.writeback.queue_depth(),
            pending=self.writeback.pending_uploads(),
            memory_hits=self.reader.recent.hits,
        )

    async def close(self) -> None:
        """Stop workers and background tasks. Pending uploads stay journaled for next time."""
        if self._ctx.closed:
            return
        self._ctx.closed = True
        tasks = [*self.writeback.workers, *self._ctx.tasks(), *self.reader.inflight()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        self.writeback.close()
