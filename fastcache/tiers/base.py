"""The one storage contract every tier (NVMe, peer, S3) implements, and helpers over it.

Tiers speak chunks only: a chunk is named by the hex xxh3-128 digest of its bytes. Each tier
turns its own failures into ``ChunkNotFound``, ``ChunkCorrupt``, ``TierUnavailable`` or
``TierFull`` inside its own module, so the manager never sees botocore, aiohttp or OSError.
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

from fastcache.chunks import Buffer, digest
from fastcache.errors import ChunkCorrupt


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


def verify(expected: str, data: Buffer, source: str) -> None:
    """Raise ``ChunkCorrupt`` unless ``data`` hashes to ``expected``."""
    actual = digest(data)
    if actual != expected:
        raise ChunkCorrupt(f"chunk {expected} from {source} hashes to {actual}")


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
