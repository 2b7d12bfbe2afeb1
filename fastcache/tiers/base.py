"""The one storage contract every tier (NVMe, peer, S3) implements, and helpers over it.

Tiers speak chunks only: a chunk is named by the hex xxh3-128 digest of its bytes. Each tier
turns its own failures into ``ChunkNotFound``, ``ChunkCorrupt``, ``TierUnavailable`` or
``TierFull`` inside its own module, so the cache never sees botocore, aiohttp or OSError.

Beside the contract, the two wider views the cache has of particular tiers: the NVMe tier
as its local store (``LocalChunkStore``) and the peer tier as the cluster's router
(``PeerRouting``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from fastcache.chunks import Buffer, digest
from fastcache.errors import ChunkCorrupt

HASH_OFFLOAD = 256 * 1024  # hash buffers larger than this on a thread, not on the loop


@runtime_checkable
class TierStorage(Protocol):
    """Read / write / delete / exists / size of chunks, plus stats and close."""

    name: str

    async def read(self, digest: str) -> bytes:
        """The chunk's bytes; ``ChunkNotFound`` if absent. Callers verify lower tiers."""
        ...

    async def write(self, digest: str, data: Buffer) -> None:
        """Store the chunk (idempotent: content addressing makes rewrites harmless)."""
        ...

    async def delete(self, digest: str) -> None:
        """Drop the chunk; absent is not an error."""
        ...

    async def exists(self, digest: str) -> bool: ...

    async def size(self, digest: str) -> int:
        """The chunk's length in bytes; ``ChunkNotFound`` if absent."""
        ...

    def stats(self) -> dict[str, Any]:
        """Counters for ``/api/cache/stats`` (hits, misses, bytes, errors…)."""
        ...

    async def close(self) -> None: ...


class LocalChunkReader(Protocol):
    """The NVMe hit path: synchronous, no event loop, called from FUSE worker threads."""

    def read_into(self, digest: str, offset: int, out: memoryview) -> int | None:
        """Copy chunk bytes at ``offset`` into ``out``; ``None`` on a miss."""
        ...


class LocalChunkStore(TierStorage, LocalChunkReader, Protocol):
    """The NVMe tier as the cache uses it (``NvmeTier``): the tier, its hit path, the index,
    pins that keep chunks not yet in S3 from eviction, and the directories on its disk."""

    @property
    def journal_dir(self) -> Path:
        """Where the write-back journal lives."""
        ...

    @property
    def staging_dir(self) -> Path:
        """Where the mount keeps its per-handle staging files."""
        ...

    def chunk_size(self, digest: str) -> int | None:
        """The chunk's size if the index has it (no I/O), else ``None``."""
        ...

    async def promote(self, digest: str, data: Buffer) -> None:
        """``write`` a verified chunk fetched from a lower tier (O_DIRECT where it can)."""
        ...

    def read_whole_soon(self, digest: str, direct: bool) -> Future[memoryview | None]:
        """The whole chunk read on the tier's threads (``None``: not here), around the page
        cache if ``direct``, for a sequential reader's read-ahead. Any thread."""
        ...

    def pin(self, digest: str) -> None:
        """Never evict ``digest`` (it is not yet in S3). May precede the write."""
        ...

    def unpin(self, digest: str) -> None: ...

    def usage(self) -> dict[str, int]:
        """``capacity``, ``used`` and ``free`` bytes (for statfs)."""
        ...


class PeerRouting(TierStorage, Protocol):
    """The peer tier as the cache uses it (``PeerTier``): a tier that also knows the live
    nodes, which of them owns (fetches for the cluster) a chunk, and can announce this node
    as a holder of chunks."""

    self_id: str
    # ``read`` returns only bytes it verified against the digest: not hashed a second time
    verifies_reads: bool

    @property
    def alone(self) -> bool:
        """Whether no live node but this one is known (nothing to ask, nobody to replicate to)."""
        ...

    def owner(self, digest: str) -> str | None:
        """The live node that fetches ``digest`` for the cluster; ``None`` before any list."""
        ...

    async def live_peers(self) -> dict[str, str]:
        """Live peers (id → URL), self included; the first call waits for the list."""
        ...

    async def announce(self, digests: Iterable[str]) -> int:
        """Record this node as a holder of ``digests``; how many records failed."""
        ...

    def invalidate_peers(self) -> None:
        """Forget the cached live-peer list: the next use asks the coordinator again."""
        ...

    async def read(self, digest: str, fetch_through: bool = False) -> bytes:
        """``fetch_through``: ask the chunk's owner to fetch it (from S3) for us."""
        ...

    async def write(self, digest: str, data: Buffer, pending: bool = False) -> None:
        """``pending``: the chunk is not in S3 yet; holders keep it pinned and journaled."""
        ...


def verifies_reads(tier: TierStorage) -> bool:
    """Whether ``tier.read`` verifies what it returns (the optional ``verifies_reads = True``
    of the peer and S3 tiers): then its bytes are not hashed a second time."""
    return bool(getattr(tier, "verifies_reads", False))


def verify(expected: str, data: Buffer, source: str) -> None:
    """Raise ``ChunkCorrupt`` unless ``data`` hashes to ``expected``."""
    actual = digest(data)
    if actual != expected:
        raise ChunkCorrupt(f"chunk {expected} from {source} hashes to {actual}")


async def verify_async(expected: str, data: Buffer, source: str) -> None:
    """``verify``, on a thread for buffers over ``HASH_OFFLOAD`` (keeps the loop free)."""
    if len(data) <= HASH_OFFLOAD:
        verify(expected, data, source)
    else:
        await asyncio.get_running_loop().run_in_executor(None, verify, expected, data, source)


async def read_verified(tier: TierStorage, chunk: str) -> bytes:
    """Read from ``tier`` and verify: the only way data from another node enters a cache."""
    data = await tier.read(chunk)
    verify(chunk, data, tier.name)
    return data


async def copy_chunk(chunk: str, source: TierStorage, target: TierStorage) -> int:
    """Copy one chunk between tiers, verified; returns its size."""
    data = await read_verified(source, chunk)
    await target.write(chunk, data)
    return len(data)
