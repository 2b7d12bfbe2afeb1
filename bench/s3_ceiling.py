"""The S3 PUT ceiling: what the S3 server accepts with no filesystem in the way.

A bare loop of parallel PUTs (``PUT_JOBS`` in flight, ``PUT_SIZE`` bodies) with botocore,
the client fastcache itself uses, made as cheap as it can correctly be: no payload hash
(``UNSIGNED-PAYLOAD``, the request itself is still SigV4-signed), no CRC trailer, bodies
made and every connection opened before the clock starts. Reported as MiB/s beside
"seq write, fsync at end", so the write path can be read as a fraction of the server's
ceiling; the loop's own CPU time (this process's) per GiB is recorded too.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from bench.workloads import PUT_JOBS, PUT_SIZE, GiB, MiB


@dataclass(frozen=True)
class PutResult:
    bytes: int
    seconds: float
    cpu_seconds: float  # this process's CPU time (all threads) over the timed loop

    @property
    def mib_s(self) -> float:
        return self.bytes / MiB / max(self.seconds, 1e-6)

    @property
    def cpu_per_gib(self) -> float:
        return self.cpu_seconds / (self.bytes / GiB) if self.bytes else 0.0


def make_client(
    endpoint: str, access_key: str, secret_key: str, region: str, jobs: int = PUT_JOBS
) -> Any:
    import botocore.config
    import botocore.session

    config = botocore.config.Config(
        region_name=region,
        max_pool_connections=jobs,
        retries={"max_attempts": 3, "mode": "standard"},
        connect_timeout=10,
        read_timeout=120,
        s3={"addressing_style": "path", "payload_signing_enabled": False},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return botocore.session.get_session().create_client(
        "s3",
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=config,
    )


def put_ceiling(
    client: Any,
    bucket: str,
    total_bytes: int,
    *,
    jobs: int = PUT_JOBS,
    body_size: int = PUT_SIZE,
    time_limit: float = 300.0,
    prefix: str = "ceiling",
) -> PutResult:
    """PUT ``total_bytes`` (rounded up to whole bodies) with ``jobs`` PUTs in flight;
    stops early past ``time_limit`` (the rate of what was done is reported)."""
    count = max(1, -(-total_bytes // body_size))
    pool = os.urandom(body_size + 4096 * 8)
    bodies = [pool[k * 4096 : k * 4096 + body_size] for k in range(8)]  # all distinct
    lock = threading.Lock()
    state = {"next": 0, "done": 0}

    def worker() -> None:
        while True:
            with lock:
                i = state["next"]
                if i >= count or time.monotonic() > deadline:
                    return
                state["next"] = i + 1
            client.put_object(Bucket=bucket, Key=f"{prefix}/{i:06d}", Body=bodies[i % 8])
            with lock:
                state["done"] += 1

    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="s3put") as ex:
        # warm-up, not timed: every connection of the pool opened, the bucket's first
        # volumes allocated by the server
        warm = [
            ex.submit(client.put_object, Bucket=bucket, Key=f"{prefix}/warmup-{k}", Body=body)
            for k, body in zip(range(jobs), itertools.cycle(bodies), strict=False)
        ]
        for f in warm:
            f.result()
        deadline = time.monotonic() + time_limit
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        futures = [ex.submit(worker) for _ in range(jobs)]
        for f in futures:
            f.result()  # a failed PUT (after botocore's retries) fails the measurement
        seconds = time.perf_counter() - t0
        cpu = time.process_time() - cpu0
    return PutResult(state["done"] * body_size, seconds, cpu)
