"""What the namespace references: every stored chunk of every manifest, read a page at a
time from the coordinator (``GET /api/admin/manifests``). fsck checks these against S3; gc
deletes what S3 holds beyond them. Holes are never stored, so never referenced."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from fastcache.cache.warmup import data_chunks
from fastcache.coordinator.client import CoordinatorClient


@dataclass
class Ref:
    length: int  # bytes the manifest says the chunk has
    ino: int  # one inode that references it (for the report)


async def referenced(
    client: CoordinatorClient, on_page: Callable[[int], None] | None = None
) -> dict[str, Ref]:
    """digest → ``Ref`` for every chunk some manifest lists; ``on_page(inodes so far)``."""
    refs: dict[str, Ref] = {}
    after: int | None = 0
    seen = 0
    while after is not None:
        page, after = await client.manifests(after)
        for ino, doc in page:
            for digest, length in data_chunks(doc):
                refs.setdefault(digest, Ref(length, ino))
        seen += len(page)
        if on_page is not None:
            on_page(seen)
    return refs
