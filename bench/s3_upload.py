"""What an S3 upload costs us: ``CloudTier.write`` next to a bare parallel PUT loop.

Starts its own SeaweedFS (``fastcache.seaweed``, as the tests do), uploads ``--size`` bytes
as ``--chunk-size`` chunks with ``--concurrency`` uploads in flight, and prints, per way of
uploading, the throughput and the CPU time of this process (every thread) and of the server
per GiB. Each way gets its own bucket; every round writes the same random chunks again.

    .venv/bin/python -m bench.s3_upload --size 256M
    # the tier of another revision next to this one, in the same run:
    git show HEAD:fastcache/tiers/cloud.py > /tmp/cloud_before.py
    .venv/bin/python -m bench.s3_upload --size 256M --baseline /tmp/cloud_before.py

Ways:
- ``bare``: ``http.client`` PUTs from a thread pool, one keep-alive connection per thread,
  SigV4 over the headers only (``UNSIGNED-PAYLOAD``), no checksum: the ceiling.
- ``bare+<crc>``: the same plus the checksum header ``CloudTier`` sends (server-verified).
- ``CloudTier``: ``fastcache.tiers.cloud.CloudTier.write`` (the lean PUT over plain HTTP).
- ``baseline``: the ``CloudTier`` class of the file given with ``--baseline``.
- ``awscrt``: the AWS CRT S3 client (``--awscrt``, when ``awscrt`` is importable).

Not imported by the tests; the server it started is stopped on every way out.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import hashlib
import hmac
import http.client
import importlib.util
import io
import os
import shutil
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from fastcache.chunks import digest
from fastcache.config import S3Config
from fastcache.seaweed import SeaweedServer
from fastcache.tiers import cloud

MiB = 1 << 20
GiB = 1 << 30
REGION = "us-east-1"


def parse_size(text: str) -> int:
    units = {"K": 1 << 10, "M": MiB, "G": GiB}
    text = text.strip().upper().removesuffix("B").removesuffix("I")
    if text and text[-1] in units:
        return int(float(text[:-1]) * units[text[-1]])
    return int(text)


@dataclass
class Result:
    way: str
    seconds: float
    cpu: float  # this process, every thread
    server_cpu: float  # the weed process
    nbytes: int

    @property
    def mib_s(self) -> float:
        return self.nbytes / MiB / self.seconds

    @property
    def cpu_per_gib(self) -> float:
        return self.cpu / (self.nbytes / GiB)

    @property
    def server_cpu_per_gib(self) -> float:
        return self.server_cpu / (self.nbytes / GiB)


def process_cpu(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), in seconds."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# --- the bare loop: http.client + header-only SigV4 ----------------------------------------
class BarePut:
    """PUTs over one keep-alive ``http.client`` connection per thread."""

    def __init__(self, endpoint: str, access_key: str, secret_key: str, checksum: bool) -> None:
        parts = urlsplit(endpoint)
        self.host = parts.netloc
        self.hostname = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.access_key = access_key
        self.secret_key = secret_key
        self.checksum = checksum
        self._local = threading.local()
        self._keys: dict[str, bytes] = {}

    def _conn(self) -> http.client.HTTPConnection:
        conn: http.client.HTTPConnection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = http.client.HTTPConnection(self.hostname, self.port, timeout=60)
            self._local.conn = conn
        return conn

    def _signing_key(self, day: str) -> bytes:
        key = self._keys.get(day)
        if key is None:
            key = ("AWS4" + self.secret_key).encode()
            for part in (day, REGION, "s3", "aws4_request"):
                key = hmac.new(key, part.encode(), hashlib.sha256).digest()
            self._keys[day] = key
        return key

    def put(self, bucket: str, key: str, body: bytes) -> None:
        now = datetime.datetime.now(datetime.UTC)
        amz_date = now.strftime("%Y%m%dT%H%M%SZ")
        day = amz_date[:8]
        headers = {
            "host": self.host,
            "x-amz-content-sha256": "UNSIGNED-PAYLOAD",
            "x-amz-date": amz_date,
        }
        if self.checksum:
            name = "x-amz-" + cloud._CHECKSUM_PARAM.lower().replace("checksum", "checksum-")
            headers[name] = cloud._checksum(body)
        signed = ";".join(sorted(headers))
        canonical = "\n".join(
            [
                "PUT",
                f"/{bucket}/{key}",
                "",
                "".join(f"{k}:{headers[k]}\n" for k in sorted(headers)),
                signed,
                "UNSIGNED-PAYLOAD",
            ]
        )
        scope = f"{day}/{REGION}/s3/aws4_request"
        to_sign = "\n".join(
            ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
        )
        signature = hmac.new(self._signing_key(day), to_sign.encode(), hashlib.sha256).hexdigest()
        headers["authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={self.access_key}/{scope}, "
            f"SignedHeaders={signed}, Signature={signature}"
        )
        headers["content-length"] = str(len(body))
        conn = self._conn()
        conn.request("PUT", f"/{bucket}/{key}", body=body, headers=headers)
        resp = conn.getresponse()
        answer = resp.read()
        if resp.status != 200:
            raise RuntimeError(f"PUT {key}: {resp.status} {answer[:300]!r}")

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()


def run_bare(bare: BarePut, bucket: str, chunks: list[tuple[str, bytes]], workers: int) -> None:
    with ThreadPoolExecutor(workers, initializer=None) as pool:
        list(pool.map(lambda c: bare.put(bucket, f"chunks/{c[0]}", c[1]), chunks))
        # drop the per-thread connections while the threads still exist
        list(pool.map(lambda _: bare.close(), range(workers)))


# --- CloudTier (this one, and optionally another revision's) -------------------------------
def load_tier_class(path: str) -> Any:
    spec = importlib.util.spec_from_file_location("_bench_cloud_baseline", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.CloudTier


async def open_tier(tier_cls: Any, config: S3Config) -> Any:
    return await tier_cls.open(config)


async def run_tier(tier: Any, chunks: list[tuple[str, bytes]]) -> None:
    await asyncio.gather(*(tier.write(d, data) for d, data in chunks))


# --- awscrt --------------------------------------------------------------------------------
class CrtPut:
    """The CRT S3 client (native threads), CRC32C in a header it computes itself."""

    def __init__(self, endpoint: str, access_key: str, secret_key: str, workers: int) -> None:
        from awscrt import auth, s3

        self._s3 = s3
        self.host = urlsplit(endpoint).netloc
        creds = auth.AwsCredentialsProvider.new_static(access_key, secret_key)
        signing = s3.create_default_s3_signing_config(region=REGION, credential_provider=creds)
        self.client = s3.S3Client(
            region=REGION,
            tls_mode=s3.S3RequestTlsMode.DISABLED,
            signing_config=signing,
            max_active_connections_override=workers,
            part_size=64 * MiB,
            multipart_upload_threshold=64 * MiB,
        )

    def run(self, bucket: str, chunks: list[tuple[str, bytes]]) -> None:
        from awscrt import http as crt_http

        s3 = self._s3
        pending = []
        for d, data in chunks:
            headers = crt_http.HttpHeaders(
                [("Host", self.host), ("Content-Length", str(len(data)))]
            )
            request = crt_http.HttpRequest(
                "PUT", f"/{bucket}/chunks/{d}", headers, io.BytesIO(data)
            )
            pending.append(
                self.client.make_request(
                    type=s3.S3RequestType.PUT_OBJECT,
                    request=request,
                    checksum_config=s3.S3ChecksumConfig(
                        algorithm=s3.S3ChecksumAlgorithm.CRC32C,
                        location=s3.S3ChecksumLocation.HEADER,
                    ),
                )
            )
        for req in pending:
            req.finished_future.result(120)


# --- driver --------------------------------------------------------------------------------
def measure(way: str, weed_pid: int, nbytes: int, fn: Callable[[], None]) -> Result:
    server0 = process_cpu(weed_pid)
    cpu0 = time.process_time()
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    return Result(way, seconds, cpu, process_cpu(weed_pid) - server0, nbytes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m bench.s3_upload", description=__doc__.split("\n")[0]
    )
    ap.add_argument("--size", default="256M", help="bytes per round (default 256M)")
    ap.add_argument("--chunk-size", default="4M")
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=3, help="rounds per way; medians are shown")
    ap.add_argument("--baseline", help="a cloud.py whose CloudTier is measured too")
    ap.add_argument("--awscrt", action="store_true", help="also the awscrt S3 client")
    ap.add_argument("--workdir", help="SeaweedFS data dir (default: a temporary one, removed)")
    args = ap.parse_args(argv)

    size, chunk_size = parse_size(args.size), parse_size(args.chunk_size)
    count = max(1, size // chunk_size)
    print(f"generating {count} x {chunk_size // MiB} MiB random chunks...", file=sys.stderr)
    chunks = [(digest(b), b) for b in (os.urandom(chunk_size) for _ in range(count))]
    warm = [(digest(b), b) for b in (os.urandom(chunk_size) for _ in range(args.concurrency))]
    nbytes = count * chunk_size

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="fc-s3bench-"))
    server = SeaweedServer(workdir / "weed", volume_size_limit_mb=1024)
    try:
        server.start()
        pid = server.pid
        assert pid is not None
        results = run_all(args, server, pid, chunks, warm, nbytes)
    finally:
        server.stop()
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    print(
        f"\nS3 upload, {nbytes // MiB} MiB in {chunk_size // MiB} MiB chunks, "
        f"{args.concurrency} in flight, SeaweedFS on loopback, median of {args.rounds}; "
        f"checksum {cloud._CHECKSUM_PARAM}\n"
    )
    print("| way | MiB/s | CPU-s/GiB (client) | CPU-s/GiB (server) |")
    print("|---|---:|---:|---:|")
    for way, rounds in results.items():
        mib_s = statistics.median(r.mib_s for r in rounds)
        cpu = statistics.median(r.cpu_per_gib for r in rounds)
        server_cpu = statistics.median(r.server_cpu_per_gib for r in rounds)
        print(f"| {way} | {mib_s:.0f} | {cpu:.2f} | {server_cpu:.2f} |")
    return 0


def run_all(
    args: argparse.Namespace,
    server: SeaweedServer,
    pid: int,
    chunks: list[tuple[str, bytes]],
    warm: list[tuple[str, bytes]],
    nbytes: int,
) -> dict[str, list[Result]]:
    ways: dict[str, Callable[[], None]] = {}
    closers: list[Callable[[], None]] = []
    loop = asyncio.new_event_loop()
    closers.append(loop.close)

    def config(bucket: str) -> S3Config:
        return S3Config(
            endpoint=server.endpoint,
            bucket=bucket,
            access_key=server.access_key,
            secret_key=server.secret_key,
            max_concurrency=args.concurrency,
        )

    def tier_way(tier_cls: Any, bucket: str) -> Callable[[], None]:
        tier = loop.run_until_complete(open_tier(tier_cls, config(bucket)))
        closers.append(lambda: loop.run_until_complete(tier.close()))
        loop.run_until_complete(run_tier(tier, warm))
        return lambda: loop.run_until_complete(run_tier(tier, chunks))

    # the buckets the bare loops use are created through a tier
    for bucket in ("bench-bare", "bench-bare-crc", "bench-crt"):
        tier = loop.run_until_complete(open_tier(cloud.CloudTier, config(bucket)))
        loop.run_until_complete(tier.close())

    try:
        for name, bucket, with_crc in (
            ("bare", "bench-bare", False),
            ("bare+crc", "bench-bare-crc", True),
        ):
            bare = BarePut(server.endpoint, server.access_key, server.secret_key, with_crc)
            run_bare(bare, bucket, warm, args.concurrency)
            label = (
                name if not with_crc else "bare+" + cloud._CHECKSUM_PARAM.removeprefix("Checksum")
            )
            ways[label] = lambda b=bare, k=bucket: run_bare(b, k, chunks, args.concurrency)
        ways["CloudTier.write"] = tier_way(cloud.CloudTier, "bench-tier")
        if args.baseline:
            ways["baseline CloudTier.write"] = tier_way(
                load_tier_class(args.baseline), "bench-base"
            )
        if args.awscrt:
            try:
                crt = CrtPut(
                    server.endpoint, server.access_key, server.secret_key, args.concurrency
                )
            except ImportError:
                print("awscrt is not installed; skipped", file=sys.stderr)
            else:
                crt.run("bench-crt", warm)
                ways["awscrt S3Client"] = lambda: crt.run("bench-crt", chunks)

        results: dict[str, list[Result]] = {way: [] for way in ways}
        for r in range(args.rounds):
            for way, fn in ways.items():  # interleaved: drift hits every way alike
                res = measure(way, pid, nbytes, fn)
                results[way].append(res)
                print(
                    f"round {r + 1} {way}: {res.mib_s:.0f} MiB/s, "
                    f"{res.cpu_per_gib:.2f} CPU-s/GiB client, "
                    f"{res.server_cpu_per_gib:.2f} server",
                    file=sys.stderr,
                )
        return results
    finally:
        for close in reversed(closers):
            close()


if __name__ == "__main__":
    raise SystemExit(main())
