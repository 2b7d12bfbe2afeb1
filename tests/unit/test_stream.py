"""``mount.stream``: whole chunks read ahead of a sequential reader, on a real NVMe tier."""

from __future__ import annotations

import asyncio
import os
import threading
from concurrent.futures import Future
from pathlib import Path

from fastcache.chunks import Manifest, digest
from fastcache.config import CacheConfig
from fastcache.mount.stream import DEPTH, ChunkStream, StreamSlots, fits_in_memory
from fastcache.tiers.nvme import NvmeTier

CS = 4096
RAM = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def test_a_stream_reads_the_next_chunks_whole_and_frees_its_slot(tmp_path: Path) -> None:
    """The chunks ahead of the reader on NVMe are read whole (``DEPTH`` ahead), a chunk not
    there is left to the fetches (``None``); closing drops the read-ahead and gives the slot
    back. A file that fits in memory is read through the page cache, a larger one around
    it."""
    pieces = [os.urandom(CS) for _ in range(5)]
    names = [digest(p) for p in pieces]

    async def main() -> None:
        tier = await NvmeTier.open(
            CacheConfig(nvme_dir=tmp_path, nvme_capacity=64 * CS, chunk_size=CS)
        )
        try:
            for name, piece in zip(names, pieces, strict=True):
                if name != names[3]:  # chunk 3 is not on NVMe
                    await tier.write(name, piece)
            manifest = Manifest(size=5 * CS, chunk_size=CS, chunks=names)
            slots = StreamSlots(CS)
            assert slots.take()
            stream = ChunkStream(manifest, tier, slots)
            assert not stream.direct
            assert stream.chunk(0) is None  # not read ahead: the reader's own pread
            assert tier.stats()["whole_reads"] <= DEPTH
            for i in (1, 2, 4):
                got = stream.chunk(i)
                assert got is not None and bytes(got) == pieces[i]
            assert stream.chunk(3) is None
            assert tier.stats()["whole_reads"] == 3
            stream.close()
            assert stream.chunk(4) is None  # closed: nothing read ahead any more
            for _ in range(slots.limit):  # every slot free again
                assert slots.take()
            assert not slots.take()
        finally:
            await tier.close()

    asyncio.run(main())
    assert fits_in_memory(RAM // 8) and not fits_in_memory(RAM // 2)
    big = Manifest(size=RAM, chunk_size=CS, chunks=names)
    assert ChunkStream(
        big, NvmeTier(CacheConfig(nvme_dir=tmp_path, chunk_size=CS)), StreamSlots(CS)
    ).direct


class _Awaited(Future[memoryview | None]):
    """A read that never finishes on its own and tells when someone waits for it."""

    def __init__(self) -> None:
        super().__init__()
        self.awaited = threading.Event()

    def result(self, timeout: float | None = None) -> memoryview | None:
        self.awaited.set()
        return super().result(timeout)


class _SlowTier:
    """An NVMe tier whose whole-chunk reads never finish on their own."""

    def __init__(self) -> None:
        self.started: list[_Awaited] = []

    def chunk_size(self, digest: str) -> int | None:
        return CS

    def read_whole_soon(self, digest: str, direct: bool) -> Future[memoryview | None]:
        future = _Awaited()
        self.started.append(future)
        return future


def test_a_reader_waiting_on_a_stream_closed_under_it_reads_on_without_an_error() -> None:
    """Another request of the same handle seeks and closes the stream while this one waits
    for a chunk read ahead: it gets ``None`` (and reads the chunk file itself), not EIO."""
    tier = _SlowTier()
    manifest = Manifest(size=4 * CS, chunk_size=CS, chunks=[digest(bytes([i])) for i in range(4)])
    slots = StreamSlots(CS)
    assert slots.take()
    stream = ChunkStream(manifest, tier, slots)  # type: ignore[arg-type]
    assert stream.chunk(0) is None and len(tier.started) == DEPTH
    result: dict[str, object] = {}
    waiting = threading.Thread(target=lambda: result.update(got=stream.chunk(1)))
    waiting.start()
    assert tier.started[0].awaited.wait(10)
    stream.close()
    waiting.join(10)
    assert not waiting.is_alive() and result == {"got": None}
