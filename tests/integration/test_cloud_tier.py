"""The S3 tier against a real SeaweedFS: round trips, errors, bucket creation, an S3 that
hangs or dies and comes back, and concurrent uploads."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path
from typing import Any

import botocore.session
import pytest

from fastcache.chunks import digest
from fastcache.config import S3Config
from fastcache.errors import BadRequest, ChunkCorrupt, ChunkNotFound, TierUnavailable
from fastcache.seaweed import SeaweedServer
from fastcache.tiers.cloud import CloudTier
from tests.conftest import S3Fixture
from tests.helpers import free_port, tree_rss_bytes

MiB = 1 << 20


def raw_client(s3: S3Fixture) -> Any:
    return botocore.session.get_session().create_client(
        "s3",
        endpoint_url=s3.endpoint,
        region_name="us-east-1",
        aws_access_key_id=s3.access_key,
        aws_secret_access_key=s3.secret_key,
    )


@pytest.mark.parametrize("size", [0, 1, 4 * MiB])
def test_round_trip(s3: S3Fixture, size: int) -> None:
    data = os.urandom(size)
    d = digest(data)
    config = s3.s3_config()

    async def main() -> None:
        tier = await CloudTier.open(config)
        try:
            await tier.write(d, data)
            assert await tier.read(d) == data
            assert await tier.size(d) == size
            st = tier.stats()
            assert st["bytes_up"] == size and st["bytes_down"] == size
            assert st["put_p50_ms"] is not None and st["get_p99_ms"] is not None
        finally:
            await tier.close()

    asyncio.run(main())
    # the object is where every tool expects it
    obj = raw_client(s3).get_object(Bucket=config.bucket, Key=f"chunks/{d}")
    assert obj["Body"].read() == data


def test_a_corrupt_object_is_refused_by_read(s3: S3Fixture) -> None:
    """``read`` verifies on the thread that fetched it (``verifies_reads``)."""
    data = os.urandom(MiB)
    d = digest(data)
    config = s3.s3_config()

    async def main() -> None:
        tier = await CloudTier.open(config)  # creates the bucket
        try:
            raw_client(s3).put_object(Bucket=config.bucket, Key=f"chunks/{d}", Body=b"x" + data[1:])
            assert tier.verifies_reads
            with pytest.raises(ChunkCorrupt):
                await tier.read(d)
            await tier.write(d, data)
            assert await tier.read(d) == data
        finally:
            await tier.close()

    asyncio.run(main())


def test_exists_size_delete_missing_and_listing(s3: S3Fixture) -> None:
    datas = [os.urandom(n) for n in (10, 20, 30)]
    names = [digest(x) for x in datas]
    missing = digest(b"missing")

    async def main() -> None:
        tier = await CloudTier.open(s3.s3_config())
        try:
            for d, x in zip(names, datas, strict=True):
                await tier.write(d, memoryview(x))
            assert sorted(await tier.list_chunks()) == sorted(names)
            assert tier.last_usage() is None
            assert await tier.usage(max_age=0) == {"chunks": 3, "bytes": 60}
            assert tier.last_usage() == {"chunks": 3, "bytes": 60}
            assert await tier.exists(names[0])
            assert await tier.size(names[1]) == 20
            await tier.delete(names[0])
            assert not await tier.exists(names[0])
            with pytest.raises(ChunkNotFound):
                await tier.read(names[0])
            with pytest.raises(ChunkNotFound):
                await tier.read(missing)
            with pytest.raises(ChunkNotFound):
                await tier.size(missing)
            await tier.delete(missing)
            assert sorted(await tier.list_chunks()) == sorted(names[1:])
            with pytest.raises(BadRequest):
                await tier.read("../escape")
            assert tier.stats()["errors"] == 0  # a miss is an answer, not an error
        finally:
            await tier.close()

    asyncio.run(main())


def test_bucket_is_created_once_even_when_racing(s3: S3Fixture) -> None:
    config = s3.s3_config()
    client = raw_client(s3)
    with pytest.raises(client.exceptions.ClientError):
        client.head_bucket(Bucket=config.bucket)

    async def main() -> None:
        tiers = await asyncio.gather(*(CloudTier.open(config) for _ in range(4)))
        try:
            data = b"hello"
            await tiers[0].write(digest(data), data)
            assert await tiers[3].read(digest(data)) == data
        finally:
            for tier in tiers:
                await tier.close()

    asyncio.run(main())
    client.head_bucket(Bucket=config.bucket)


def test_wrong_credentials_are_unavailable_with_a_clear_message(s3: S3Fixture) -> None:
    config = s3.s3_config(secret_key="not-the-secret", max_attempts=1)

    async def main() -> None:
        with pytest.raises(TierUnavailable, match=r"(?i)access denied|credentials|signature"):
            await CloudTier.open(config)

    asyncio.run(main())


def test_concurrent_writes(s3: S3Fixture) -> None:
    datas = [os.urandom(64 * 1024 + i) for i in range(32)]
    names = [digest(x) for x in datas]

    async def main() -> None:
        tier = await CloudTier.open(s3.s3_config(max_concurrency=8))
        try:
            await asyncio.gather(*(tier.write(d, x) for d, x in zip(names, datas, strict=True)))
            assert sorted(await tier.list_chunks()) == sorted(names)
            got = await asyncio.gather(*(tier.read(d) for d in names))
            assert got == datas
            assert tier.stats()["requests_by_op"]["put"] == 32
        finally:
            await tier.close()

    asyncio.run(main())


def test_s3_hanging_or_down_is_unavailable_and_recovers(tmp_path: Path) -> None:
    """A frozen server (read timeouts) and a dead one (refused connections) both become
    ``TierUnavailable`` promptly; the same tier object works again once S3 is back."""
    s3_port = free_port()
    server = SeaweedServer(tmp_path / "weed", s3_port=s3_port)
    server.start()
    try:
        assert server.endpoint == f"http://127.0.0.1:{s3_port}"
        assert tree_rss_bytes(server.pid) < 1 << 30  # modest: a few hundred MiB at most
        config = S3Config(
            endpoint=server.endpoint,
            bucket="outage",
            access_key=server.access_key,
            secret_key=server.secret_key,
            max_attempts=1,
            connect_timeout=1.0,
            read_timeout=1.0,
        )
        before = os.urandom(1000)
        after = os.urandom(2000)

        async def main() -> None:
            tier = await CloudTier.open(config, retries=1, backoff=0.05)
            try:
                await tier.write(digest(before), before)

                # frozen: connections are accepted by the kernel, nothing answers
                server.pause()
                try:
                    with pytest.raises(TierUnavailable):
                        await asyncio.wait_for(tier.read(digest(before)), 30)
                finally:
                    await asyncio.to_thread(server.resume)
                assert await tier.read(digest(before)) == before

                # dead: connections are refused
                await asyncio.to_thread(server.kill)
                with pytest.raises(TierUnavailable):
                    await asyncio.wait_for(tier.read(digest(before)), 30)
                with pytest.raises(TierUnavailable):
                    await asyncio.wait_for(tier.write(digest(after), after), 30)
                st = tier.stats()
                assert st["errors"] >= 3 and st["retries"] >= 3

                await asyncio.to_thread(server.start)  # same data dir, same ports
                assert await tier.read(digest(before)) == before
                await tier.write(digest(after), after)
                assert await tier.read(digest(after)) == after
            finally:
                await tier.close()

        asyncio.run(main())
        pgid = server.pid
    finally:
        server.stop()
    server.stop()  # idempotent
    assert not server.running
    with pytest.raises(ProcessLookupError):  # no orphan left in weed's process group
        os.killpg(pgid, 0)
