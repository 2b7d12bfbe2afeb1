"""Tier 2 against tier 3: fetching 4 MiB chunks from a peer node vs from S3, same run.

A real node process (with a coordinator) holds the chunks on its NVMe; SeaweedFS on
loopback holds the same chunks in S3. Both paths verify what they fetch, as the manager
does. Figures (MB/s and the peer/S3 ratio) go to ``extra_info``; nothing here fails on
timing.
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import uvloop

from fastcache.chunks import digest
from fastcache.config import S3Config
from fastcache.seaweed import SeaweedServer
from fastcache.testing.cluster import Cluster, http
from fastcache.tiers.base import read_verified
from fastcache.tiers.cloud import CloudTier
from fastcache.tiers.peer import PeerAddr, PeerTier, make_session

CHUNK = 4 << 20
COUNT = 16  # chunks fetched per round
PARALLEL = 4  # fetches in flight, like the manager's read-ahead
ROUNDS = 5
TOKEN = "bench-token"


class _OnePeer:
    def __init__(self, peer: PeerAddr) -> None:
        self.peer = peer

    async def live_peers(self) -> list[PeerAddr]:
        return [self.peer]

    async def chunk_holders(self, digest: str) -> list[PeerAddr]:
        return []

    async def add_chunk_holders(self, digest: str, peer_ids: list[str]) -> None:
        return None

    async def add_holdings(self, peer_id: str, digests: list[str]) -> None:
        return None


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, S3Config, list[str]]]:
    root: Path = tmp_path_factory.mktemp("peer-fetch")
    server = SeaweedServer(root / "s3").start()
    s3 = S3Config(
        endpoint=server.endpoint,
        bucket="bench-peer-fetch",
        access_key=server.access_key,
        secret_key=server.secret_key,
    )
    cluster = Cluster(root, s3, token=TOKEN)
    try:
        node = cluster.start(1).clients[0]
        chunks = [os.urandom(CHUNK) for _ in range(COUNT)]
        names = [digest(c) for c in chunks]

        async def to_s3() -> None:
            cloud = await CloudTier.open(s3)
            try:
                await asyncio.gather(
                    *(cloud.write(n, c) for n, c in zip(names, chunks, strict=True))
                )
            finally:
                await cloud.close()

        asyncio.run(to_s3())
        for name, data in zip(names, chunks, strict=True):
            assert http("PUT", f"{node.url}/api/chunks/{name}", data, token=TOKEN).status == 201
        yield node.url, s3, names
    finally:
        cluster.close()
        server.stop()


async def _fetch_all(read, names: list[str]) -> int:  # type: ignore[no-untyped-def]
    room = asyncio.Semaphore(PARALLEL)
    total = 0

    async def one(name: str) -> None:
        nonlocal total
        async with room:
            data = await read(name)
        total += len(data)

    await asyncio.gather(*(one(n) for n in names))
    return total


def test_peer_vs_s3_fetch(benchmark, setup) -> None:  # type: ignore[no-untyped-def]
    url, s3, names = setup
    loop = uvloop.new_event_loop()
    try:
        session = loop.run_until_complete(_session())
        peer = PeerTier("bench", _OnePeer(PeerAddr("node", url)), session, token=TOKEN)
        cloud = loop.run_until_complete(CloudTier.open(s3))
        nbytes = COUNT * CHUNK

        def from_peer() -> int:
            return loop.run_until_complete(_fetch_all(peer.read, names))

        def from_s3() -> int:
            return loop.run_until_complete(_fetch_all(lambda n: read_verified(cloud, n), names))

        assert from_peer() == nbytes and from_s3() == nbytes  # warm-up, and a sanity check
        s3_times = []
        for _ in range(ROUNDS):
            start = time.perf_counter()
            from_s3()
            s3_times.append(time.perf_counter() - start)
        benchmark.pedantic(from_peer, rounds=ROUNDS, iterations=1)
        stats = getattr(benchmark, "stats", None)
        peer_median = stats.stats.median if stats is not None else float("nan")
        s3_median = statistics.median(s3_times)
        peer_mbs = nbytes / peer_median / 1e6
        s3_mbs = nbytes / s3_median / 1e6
        benchmark.extra_info.update(
            {
                "chunk_bytes": CHUNK,
                "chunks_per_round": COUNT,
                "parallel": PARALLEL,
                "peer_mb_per_s": round(peer_mbs, 1),
                "s3_mb_per_s": round(s3_mbs, 1),
                "peer_over_s3": round(peer_mbs / s3_mbs, 2),
            }
        )
        print(f"\npeer {peer_mbs:.0f} MB/s, S3 {s3_mbs:.0f} MB/s, ratio {peer_mbs / s3_mbs:.2f}x")
        loop.run_until_complete(peer.close())
        loop.run_until_complete(cloud.close())
        loop.run_until_complete(session.close())
    finally:
        loop.close()


async def _session() -> aiohttp.ClientSession:
    return make_session()  # a session needs a running loop
