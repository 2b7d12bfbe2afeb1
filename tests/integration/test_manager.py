"""DefaultCacheManager over a real NvmeTier (tmp dir) and a real CloudTier (SeaweedFS)."""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from fastcache.cache.manager import DefaultCacheManager
from fastcache.chunks import Manifest
from fastcache.config import CacheConfig, MiB, S3Config
from fastcache.seaweed import SeaweedServer
from fastcache.tiers.cloud import CloudTier
from fastcache.tiers.nvme import NvmeTier
from tests.helpers import rss_bytes

T = TypeVar("T")
CHUNK = 64 * 1024


def run(coro: Coroutine[Any, Any, T], timeout: float = 120) -> T:
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def until(predicate: Callable[[], object], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.01)


@dataclass
class Stack:
    nvme: NvmeTier
    cloud: CloudTier
    manager: DefaultCacheManager


def cache_config(nvme_dir: Path, **overrides: Any) -> CacheConfig:
    values: dict[str, Any] = {
        "nvme_dir": nvme_dir,
        "chunk_size": CHUNK,
        "nvme_capacity": 1 << 30,
        "upload_concurrency": 4,
        "fetch_concurrency": 8,
        "writeback_retry_max": 0.2,
    }
    values.update(overrides)
    return CacheConfig(**values)


@asynccontextmanager
async def stack(
    cache: CacheConfig, s3: S3Config, create_bucket: bool = True
) -> AsyncIterator[Stack]:
    nvme = await NvmeTier.open(cache)
    try:
        cloud = await CloudTier.open(s3, create_bucket=create_bucket)
        try:
            manager = await DefaultCacheManager.open(cache, nvme, cloud)
            try:
                yield Stack(nvme, cloud, manager)
            finally:
                await manager.close()
        finally:
            await cloud.close()
    finally:
        await nvme.close()


def source(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


SIZES = [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 11]


@pytest.mark.parametrize("size", SIZES)
def test_round_trip(tmp_path: Path, s3: Any, size: int) -> None:
    async def main() -> None:
        async with stack(cache_config(tmp_path / "nvme"), s3.s3_config()) as st:
            m = st.manager
            src = source(size, size)
            manifest = await m.write_bytes(src)
            assert await m.read_range(manifest, 0, size + 10) == src
            w = m.writer()
            for pos in range(0, size, 5000):
                await w.write(src[pos : pos + 5000])
            assert (await w.finish()).to_json() == manifest.to_json()
            await m.sync()
            assert m.pending_uploads() == 0
            for name in manifest.chunks:
                assert await st.cloud.exists(name)
                assert name not in st.nvme.pinned()
            if size:
                mid = size // 2
                assert await m.read_range(manifest, mid, CHUNK) == src[mid : mid + CHUNK]

    run(main())


def test_emptied_nvme_reads_come_from_s3_and_are_promoted(tmp_path: Path, s3: Any) -> None:
    cache = cache_config(tmp_path / "nvme")
    s3cfg = s3.s3_config()
    src = source(5 * CHUNK + 7, 1)

    async def write() -> Manifest:
        async with stack(cache, s3cfg) as st:
            manifest = await st.manager.write_bytes(src)
            await st.manager.sync()
            return manifest

    async def read(manifest: Manifest) -> None:
        async with stack(cache, s3cfg) as st:
            assert not any(name in st.nvme for name in manifest.chunks)
            assert await st.manager.read_range(manifest, 0, len(src)) == src
            stats = st.manager.stats()
            assert stats["tiers"]["s3"]["hits"] == len(set(manifest.chunks))
            await until(lambda: all(name in st.nvme for name in manifest.chunks))
            assert await st.manager.read_range(manifest, 0, len(src)) == src
            assert st.manager.stats()["tiers"]["s3"]["hits"] == stats["tiers"]["s3"]["hits"]

    manifest = run(write())
    shutil.rmtree(tmp_path / "nvme" / "chunks")
    run(read(manifest))


def test_unwritable_nvme_writes_land_in_s3_and_read_back(tmp_path: Path, s3: Any) -> None:
    async def main() -> None:
        async with stack(cache_config(tmp_path / "nvme"), s3.s3_config()) as st:
            # A real failure, for root too: the chunks directory becomes a plain file.
            shutil.rmtree(st.nvme.chunk_dir)
            st.nvme.chunk_dir.write_bytes(b"not a directory")
            src = source(4 * CHUNK + 3, 2)
            manifest = await st.manager.write_bytes(src)
            writes = st.manager.stats()["writes"]
            assert writes["nvme"] == 0
            assert writes["s3"] == len(set(manifest.chunks))
            assert st.manager.pending_uploads() == 0  # S3 acknowledged them directly
            for name in manifest.chunks:
                assert await st.cloud.exists(name)
            assert await st.manager.read_range(manifest, 0, len(src)) == src
            await until(lambda: st.manager.stats()["promotions_failed"] >= 1)

    run(main())


def test_corrupt_chunk_on_nvme_is_refetched_from_s3(tmp_path: Path, s3: Any) -> None:
    async def main() -> None:
        async with stack(cache_config(tmp_path / "nvme"), s3.s3_config()) as st:
            src = source(3 * CHUNK, 3)
            manifest = await st.manager.write_bytes(src)
            await st.manager.sync()
            victim = manifest.chunks[1]
            path = Path(st.nvme.path_for(victim))
            raw = bytearray(path.read_bytes())
            raw[100] ^= 0x40
            path.write_bytes(raw)
            assert await st.manager.read_range(manifest, 0, len(src)) == src
            assert st.manager.stats()["corrupt_chunks"] == 1
            assert st.manager.stats()["tiers"]["s3"]["hits"] == 1
            # The good copy is promoted back over the deleted bad one.
            await until(lambda: victim in st.nvme)
            assert path.read_bytes() == src[CHUNK : 2 * CHUNK]

    run(main())


def test_s3_stopped_while_writing_then_flush_after_restart(tmp_path: Path) -> None:
    server = SeaweedServer(tmp_path / "weed")
    server.start()
    try:
        s3cfg = S3Config(
            endpoint=server.endpoint,
            bucket="stopped",
            access_key=server.access_key,
            secret_key=server.secret_key,
            max_attempts=1,
            connect_timeout=1.0,
        )
        cache = cache_config(tmp_path / "nvme")

        async def main() -> None:
            async with stack(cache, s3cfg) as st:
                m = st.manager
                server.stop()
                src = source(6 * CHUNK + 1, 4)
                manifest = await m.write_bytes(src)  # acknowledged by NVMe alone
                assert m.pending_uploads() == len(set(manifest.chunks))
                assert set(manifest.chunks) <= st.nvme.pinned()
                await until(lambda: m.stats()["writeback"]["failed_retries"] > 0)
                assert await m.read_range(manifest, 0, len(src)) == src
                await asyncio.to_thread(server.start)
                await m.flush(manifest.chunks, timeout=60)
                assert m.pending_uploads() == 0
                for name in manifest.chunks:
                    assert await st.cloud.exists(name)
                assert not set(manifest.chunks) & st.nvme.pinned()

        run(main())
    finally:
        server.stop()


def test_rss_stays_bounded_writing_and_reading_1_gib(tmp_path: Path, s3: Any) -> None:
    chunk = 4 * MiB
    total = 1 << 30
    cache = cache_config(
        tmp_path / "nvme",
        chunk_size=chunk,
        nvme_capacity=2 << 30,
        upload_concurrency=8,
        upload_memory=64 * MiB,  # what may wait in memory for S3; the bound below allows it
    )
    base = bytearray(os.urandom(chunk))

    def piece(i: int) -> bytearray:
        base[:8] = i.to_bytes(8, "little")  # distinct chunks; no dedup
        return base

    async def main() -> None:
        async with stack(cache, s3.s3_config()) as st:
            m = st.manager
            start = peak = rss_bytes()
            w = m.writer()
            for i in range(total // chunk):
                await w.write(piece(i))
                peak = max(peak, rss_bytes())
            manifest = await w.finish()
            await m.sync()
            peak = max(peak, rss_bytes())
            assert manifest.size == total
            # Read back with the NVMe copies dropped: every chunk comes from S3 and is
            # promoted, 4 MiB at a time, with the next chunks prefetched.
            for name in manifest.chunks:
                await st.nvme.delete(name)
            for i in range(total // chunk):
                m.prefetch(manifest, i + 1, 4)
                got = await m.read_range(manifest, i * chunk, chunk)
                assert got[:8] == i.to_bytes(8, "little") and got[8:] == base[8:]
                del got
                peak = max(peak, rss_bytes())
            assert m.stats()["tiers"]["s3"]["hits"] >= total // chunk // 2
            grown = peak - start
            assert grown < 256 * MiB, f"RSS grew by {grown / MiB:.0f} MiB"

    run(main(), timeout=240)


@pytest.mark.race
def test_concurrent_writers_and_readers_on_one_manager(tmp_path: Path, s3: Any) -> None:
    async def main() -> None:
        async with stack(cache_config(tmp_path / "nvme"), s3.s3_config()) as st:
            m = st.manager
            files = {seed: source(2 * CHUNK + seed * 100, seed) for seed in range(12)}
            manifests: dict[int, Manifest] = {}

            async def write(seed: int) -> None:
                manifests[seed] = await m.write_bytes(files[seed])

            async def read_all() -> None:
                for seed, manifest in list(manifests.items()):
                    assert await m.read_range(manifest, 0, manifest.size) == files[seed]

            tasks = [write(s) for s in files] + [read_all() for _ in range(6)]
            await asyncio.gather(*tasks)
            await read_all()
            await m.sync()
            for manifest in manifests.values():
                for name in manifest.chunks:
                    assert await st.cloud.exists(name)

    run(main())
