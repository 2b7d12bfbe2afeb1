"""Child process of test_durability: writes chunks through a manager, then waits to be killed.

Usage: ``python -m tests.integration._writer_proc NVME_DIR ENDPOINT ACCESS SECRET BUCKET N SIZE``

Opens an NvmeTier on NVME_DIR and a CloudTier on ENDPOINT (which may be down: the bucket is
not checked), writes N distinct chunks of SIZE bytes with ``write_chunk`` and prints
``ack <digest>`` after each acknowledged write (flushed at once), then ``ready`` and blocks
forever. The parent SIGKILLs it at some point; whatever it printed must reach S3 later.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from fastcache.cache.manager import DefaultCacheManager
from fastcache.chunks import digest
from fastcache.config import CacheConfig, S3Config
from fastcache.tiers.cloud import CloudTier
from fastcache.tiers.nvme import NvmeTier


async def main(argv: list[str]) -> None:
    nvme_dir, endpoint, access, secret, bucket, count, size = argv
    cache = CacheConfig(
        nvme_dir=Path(nvme_dir),
        chunk_size=max(4096, int(size)),
        upload_concurrency=4,
        writeback_retry_max=0.5,
    )
    s3 = S3Config(
        endpoint=endpoint,
        bucket=bucket,
        access_key=access,
        secret_key=secret,
        max_attempts=1,
        connect_timeout=1.0,
        read_timeout=5.0,
    )
    nvme = await NvmeTier.open(cache)
    cloud = await CloudTier.open(s3, create_bucket=False, retries=0)
    manager = await DefaultCacheManager.open(cache, nvme, cloud)
    for i in range(int(count)):
        data = i.to_bytes(8, "little") + os.urandom(int(size) - 8)
        name = digest(data)
        await manager.write_chunk(name, data)
        sys.stdout.write(f"ack {name}\n")
        sys.stdout.flush()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1:]))
