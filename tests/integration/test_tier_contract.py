"""One contract, every tier: the five operations of ``TierStorage`` behave the same on NVMe
(tmp dir) and S3 (the session's real SeaweedFS).

To add a tier, register a factory in ``TIER_FACTORIES``: a function of the pytest request
and a tmp dir that returns an async context manager yielding an open tier. It runs inside
the test's event loop, so tiers that need a loop (aiohttp sessions) can be built there.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from pathlib import Path

import pytest

from fastcache.chunks import digest
from fastcache.config import CacheConfig
from fastcache.errors import ChunkNotFound
from fastcache.tiers.base import TierStorage, copy_chunk, read_verified
from fastcache.tiers.cloud import CloudTier
from fastcache.tiers.nvme import NvmeTier

OpenTier = Callable[[], AbstractAsyncContextManager[TierStorage]]


def _nvme(request: pytest.FixtureRequest, tmp_path: Path) -> OpenTier:
    @contextlib.asynccontextmanager
    async def open_tier() -> AsyncIterator[TierStorage]:
        tier = await NvmeTier.open(CacheConfig(nvme_dir=tmp_path / "nvme", nvme_capacity=64 << 20))
        try:
            yield tier
        finally:
            await tier.close()

    return open_tier


def _s3(request: pytest.FixtureRequest, tmp_path: Path) -> OpenTier:
    s3 = request.getfixturevalue("s3")  # started only when an S3 case runs
    config = s3.s3_config()

    @contextlib.asynccontextmanager
    async def open_tier() -> AsyncIterator[TierStorage]:
        tier = await CloudTier.open(config)
        try:
            yield tier
        finally:
            await tier.close()

    return open_tier


TIER_FACTORIES: dict[str, Callable[[pytest.FixtureRequest, Path], OpenTier]] = {
    "nvme": _nvme,
    "s3": _s3,
}


@pytest.fixture(params=sorted(TIER_FACTORIES))
def open_tier(request: pytest.FixtureRequest, tmp_path: Path) -> OpenTier:
    return TIER_FACTORIES[request.param](request, tmp_path)


def run(open_tier: OpenTier, body: Callable[[TierStorage], Awaitable[None]]) -> None:
    async def main() -> None:
        async with open_tier() as tier:
            await body(tier)

    asyncio.run(main())


@pytest.mark.parametrize("size", [0, 1, 100_003])
def test_write_read_round_trip(open_tier: OpenTier, size: int) -> None:
    data = os.urandom(size)
    d = digest(data)

    async def body(tier: TierStorage) -> None:
        assert isinstance(tier, TierStorage) and tier.name
        await tier.write(d, data)
        assert await tier.read(d) == data
        assert await read_verified(tier, d) == data

    run(open_tier, body)


def test_exists_and_size(open_tier: OpenTier) -> None:
    data = os.urandom(5000)
    d = digest(data)

    async def body(tier: TierStorage) -> None:
        assert not await tier.exists(d)
        await tier.write(d, data)
        assert await tier.exists(d)
        assert await tier.size(d) == 5000

    run(open_tier, body)


def test_delete(open_tier: OpenTier) -> None:
    data = os.urandom(777)
    d = digest(data)

    async def body(tier: TierStorage) -> None:
        await tier.write(d, data)
        await tier.delete(d)
        assert not await tier.exists(d)
        with pytest.raises(ChunkNotFound):
            await tier.read(d)
        await tier.delete(d)  # deleting an absent chunk is not an error

    run(open_tier, body)


def test_rewrite_is_idempotent(open_tier: OpenTier) -> None:
    data = os.urandom(3000)
    d = digest(data)

    async def body(tier: TierStorage) -> None:
        await tier.write(d, data)
        await tier.write(d, bytearray(data))
        await tier.write(d, memoryview(data))
        assert await tier.read(d) == data
        assert await tier.size(d) == 3000

    run(open_tier, body)


def test_missing_chunk(open_tier: OpenTier) -> None:
    d = digest(b"never written " + os.urandom(8))

    async def body(tier: TierStorage) -> None:
        assert not await tier.exists(d)
        with pytest.raises(ChunkNotFound):
            await tier.read(d)
        with pytest.raises(ChunkNotFound):
            await tier.size(d)
        assert isinstance(tier.stats(), dict)

    run(open_tier, body)


def test_copy_between_two_instances(open_tier: OpenTier) -> None:
    """``copy_chunk`` over the protocol: from one instance of the tier to another."""
    data = os.urandom(4096)
    d = digest(data)

    async def main() -> None:
        async with open_tier() as source, open_tier() as target:
            await source.write(d, data)
            assert await copy_chunk(d, source, target) == 4096
            assert await target.read(d) == data

    asyncio.run(main())
