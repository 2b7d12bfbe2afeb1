"""A process killed with a non-empty write-back queue loses nothing it acknowledged."""

from __future__ import annotations

import asyncio
import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

from fastcache.cache.manager import DefaultCacheManager
from fastcache.config import CacheConfig, S3Config
from fastcache.journal import JOURNAL_NAME, replay_file
from fastcache.seaweed import SeaweedServer
from fastcache.tiers.base import read_verified
from fastcache.tiers.cloud import CloudTier
from fastcache.tiers.nvme import NvmeTier

ROOT = Path(__file__).resolve().parents[2]
CHUNK = 64 * 1024


def read_acks(proc: subprocess.Popen[str], want: int, timeout: float = 60.0) -> list[str]:
    """``ack`` digests from the child's stdout until ``want`` of them (or ``ready``)."""
    assert proc.stdout is not None
    acked: list[str] = []
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as sel:
        sel.register(proc.stdout, selectors.EVENT_READ)
        while len(acked) < want:
            left = deadline - time.monotonic()
            assert left > 0, f"child acknowledged only {len(acked)} writes"
            if not sel.select(left):
                continue
            line = proc.stdout.readline()
            assert line, f"child exited early (rc={proc.poll()})"
            if line.startswith("ack "):
                acked.append(line.split()[1])
            elif line.strip() == "ready":
                break
    return acked


def test_killed_writer_every_acknowledged_chunk_reaches_s3(tmp_path: Path) -> None:
    server = SeaweedServer(tmp_path / "weed")
    server.start()
    bucket = "durable"
    s3cfg = S3Config(
        endpoint=server.endpoint,
        bucket=bucket,
        access_key=server.access_key,
        secret_key=server.secret_key,
    )
    nvme_dir = tmp_path / "nvme"
    try:

        async def create_bucket() -> None:
            cloud = await CloudTier.open(s3cfg)
            await cloud.close()

        asyncio.run(create_bucket())
        server.stop()  # S3 is down while the child writes: nothing can be uploaded

        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.integration._writer_proc",
                str(nvme_dir),
                server.endpoint,
                server.access_key,
                server.secret_key,
                bucket,
                "400",  # far more than are read: the kill lands mid-stream
                str(CHUNK),
            ],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            acked = read_acks(proc, want=40)
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
            assert proc.stdout is not None
            proc.stdout.close()
        assert len(acked) == 40
        # The journal on disk names every acknowledged chunk as pending.
        pending, _ = replay_file(nvme_dir / "journal" / JOURNAL_NAME)
        assert set(acked) <= pending

        server.start()
        cache = CacheConfig(nvme_dir=nvme_dir, chunk_size=CHUNK, writeback_retry_max=0.2)

        async def restart() -> None:
            nvme = await NvmeTier.open(cache)
            cloud = await CloudTier.open(s3cfg, create_bucket=False)
            try:
                manager = await DefaultCacheManager.open(cache, nvme, cloud)
                try:
                    assert manager.pending_uploads() >= len(acked)
                    await manager.sync(timeout=60)
                    assert manager.pending_uploads() == 0
                finally:
                    await manager.close()
                for name in acked:
                    assert await cloud.exists(name), name
                    data = await read_verified(cloud, name)  # the right content
                    assert len(data) == CHUNK
                    assert name not in nvme.pinned()
            finally:
                await cloud.close()
                await nvme.close()

        asyncio.run(asyncio.wait_for(restart(), 120))
        assert replay_file(nvme_dir / "journal" / JOURNAL_NAME)[0] == set()
    finally:
        server.stop()
