"""Tier 3: S3 (any S3-compatible endpoint) through botocore, the durable copy of every chunk.

botocore is synchronous, so every call runs in one bounded thread pool sized to the
connection pool (``S3Config.max_concurrency``); the event loop only awaits. Chunks live at
``chunks/<digest>``. botocore's standard retry mode already retries 5xx and throttling;
on top of it connection-level failures (refused, timeouts, resets) get a few more tries with
exponential backoff and full jitter, awaited on the loop so no pool thread sleeps. What still
fails is translated once, here: missing → ``ChunkNotFound``, anything else →
``TierUnavailable`` (with a plain message for credentials problems).

Uploads: ``write`` takes a buffer (never a stream, so no retry can resend a consumed one),
keeps it as immutable bytes (no retry can send a buffer the caller emptied meanwhile),
checks it hashes to its name (xxh3, ~0.05 CPU-s/GiB: a truncated or empty buffer is never
stored under a digest name) and PUTs it with an explicit ``Content-Length`` and a CRC
(``x-amz-checksum-crc32``, or ``-crc32c`` when the hardware ``google-crc32c`` is installed)
computed once from the caller's buffer and re-sent unchanged by every retry. The server
verifies that checksum (SeaweedFS and AWS answer ``400 BadDigest`` on a mismatch, and store
nothing), so a body damaged or cut short on its way is refused. The SigV4 payload hash is
not computed (``UNSIGNED-PAYLOAD``): SeaweedFS does not check it, the CRC covers the body,
and SHA-256 over every byte was the largest CPU cost of an upload.

Over plain HTTP with static keys (a local S3: SeaweedFS, MinIO) chunk GETs and PUTs skip
botocore: ``_lean_request`` signs them itself (``sigv4``) and sends them on the event loop
with ``fastget``. A GET's body lands straight in a page-aligned buffer
(``chunks.receive_buffer``) that the NVMe tier then writes with O_DIRECT
(``NvmeTier.promote``); a PUT's body is handed to the transport as it is, after the check
and the CRC on a pool thread. No pool thread waits on a socket, no botocore request is
built: an upload costs half the CPU it did through botocore (``bench/s3_upload.py``). 5xx
and throttling answers and connection failures are retried as botocore's standard mode
would; an answer fastget does not speak (no Content-Length) sends the request again
through botocore. HTTPS endpoints (AWS) and credential chains stay on botocore.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import logging
import random
import re
import threading
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import botocore.session
from botocore.config import Config as BotoConfig
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    ConnectionClosedError,
    ConnectTimeoutError,
    EndpointConnectionError,
    ReadTimeoutError,
)
from botocore.handlers import convert_body_to_file_like_object

from fastcache.chunks import Buffer, is_digest, receive_buffer
from fastcache.config import S3Config
from fastcache.errors import BadRequest, ChunkNotFound, FastcacheError, TierUnavailable
from fastcache.tiers.base import verify, verify_async
from fastcache.tiers.fastget import Allocate, Body, FastGet, Payload, ProtocolError
from fastcache.tiers.sigv4 import SigV4Signer

log = logging.getLogger("fastcache.client.s3")
T = TypeVar("T")

PREFIX = "chunks/"
_NOT_FOUND = frozenset({"NoSuchKey", "404", "NotFound"})
_DENIED = frozenset(
    {"AccessDenied", "403", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden"}
)
_CONNECTION_ERRORS = (
    EndpointConnectionError,
    ConnectTimeoutError,
    ReadTimeoutError,
    ConnectionClosedError,
)
_SAMPLES = 1024  # latency samples kept per operation
# the server found that the body does not match the checksum we sent: nothing was stored
_BAD_BODY = frozenset(
    {"BadDigest", "InvalidDigest", "XAmzContentChecksumMismatch", "XAmzContentSHA256Mismatch"}
)
_RETRY_STATUS = frozenset({429, 500, 502, 503, 504})  # as botocore's standard retry mode
_ERROR_CODE = re.compile(rb"<Code>([^<]{1,64})</Code>")


def _pick_checksum() -> tuple[str, Callable[[Any], int]]:
    """The PutObject parameter and function of the cheapest checksum the server verifies:
    CRC32C where the hardware implementation is installed (~0.06 CPU-s/GiB), else zlib's
    CRC32 (~0.5 CPU-s/GiB; MD5 is ~1.8, SHA-256 ~0.75 even with SHA-NI)."""
    try:
        import google_crc32c  # type: ignore[import-not-found,unused-ignore]
    except ImportError:
        return "ChecksumCRC32", zlib.crc32
    if getattr(google_crc32c, "implementation", "") != "c":
        return "ChecksumCRC32", zlib.crc32
    return "ChecksumCRC32C", google_crc32c.value


_CHECKSUM_PARAM, _checksum_fn = _pick_checksum()
_CHECKSUM_HEADER = "x-amz-checksum-" + _CHECKSUM_PARAM.removeprefix("Checksum").lower()
_SEND_FLOOR = 1 << 20  # bytes/s a lean PUT's body is allowed, beyond the read timeout


def _checksum(body: Payload) -> str:
    """The base64 of the big-endian 32-bit CRC, as the ``x-amz-checksum-*`` headers want it."""
    if isinstance(body, memoryview):
        # google_crc32c takes no memoryview (nor any buffer that needs releasing): the
        # object under it when the view spans it whole (a sealed chunk's aligned buffer)
        base = body.obj
        body = base if memoryview(base).nbytes == body.nbytes else body.tobytes()
    return base64.b64encode(_checksum_fn(body).to_bytes(4, "big")).decode("ascii")


def _as_body(data: Buffer) -> Payload:
    """What every attempt sends: a buffer nobody changes, taken before the first await.
    ``bytes`` and read-only memoryviews (whose makers never write the memory again: a
    sealed chunk, a view of bytes) are used as they are; anything mutable (bytearray, a
    writable view, an mmap, a numpy array) is copied once, so a caller that reuses its
    buffer while a retry is pending cannot change or empty what we send: botocore builds a
    new request for each of its retries, and an emptied buffer there became a 0-byte object
    under the digest name.

    Never a stream: botocore sends a file-like body from where it stands and measures its
    length from there, so a retry of a consumed stream would store an empty object too. (An
    ``mmap`` has ``read`` as well; it is copied like any other buffer.)
    """
    if isinstance(data, bytes):
        return data
    try:
        view = memoryview(data)
    except TypeError:
        raise BadRequest(
            f"S3 uploads take a buffer (bytes, bytearray, memoryview), not {type(data).__name__}"
        ) from None
    if view.readonly and view.c_contiguous:
        return view.cast("B")  # lengths in bytes, whatever the exporter's format
    return view.tobytes()


@dataclass(slots=True)
class _Upload:
    """One ``write``: the body every attempt sends, its length, and its checksum (computed
    from the body by the first attempt, kept for the retries)."""

    body: Payload
    size: int = field(init=False)
    checksum: str | None = None

    def __post_init__(self) -> None:
        self.size = memoryview(self.body).nbytes


def _error_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code", ""))


def _status(exc: ClientError) -> int:
    return int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def _percentile(samples: list[float], q: float) -> float | None:
    if not samples:
        return None
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class CloudTier:
    """Chunks in one S3 bucket. Build with ``await CloudTier.open(config)``."""

    name = "s3"
    # ``read`` hashes what it got on the pool thread that fetched it (no second thread hop,
    # nothing on the loop) and raises ``ChunkCorrupt`` on a mismatch: the manager does not
    # hash it again.
    verifies_reads = True

    def __init__(
        self,
        config: S3Config,
        client: Any,
        pool: ThreadPoolExecutor,
        *,
        retries: int = 2,
        backoff: float = 0.2,
    ) -> None:
        self.config = config
        self.bucket = config.bucket
        self._client = client
        self._pool = pool
        self._retries = retries
        self._backoff = backoff
        self._lock = threading.Lock()
        self._requests: collections.Counter[str] = collections.Counter()
        self._errors: collections.Counter[str] = collections.Counter()
        self._bytes_up = 0
        self._bytes_down = 0
        self._retried = 0
        self._latency: dict[str, collections.deque[float]] = {
            "get": collections.deque(maxlen=_SAMPLES),
            "put": collections.deque(maxlen=_SAMPLES),
        }
        self._usage: dict[str, Any] | None = None
        self._closed = False
        # Chunk GETs over plain HTTP with static keys go through ``fastget`` (``_read_lean``)
        self._lean: FastGet | None = None
        self._signer: SigV4Signer | None = None
        self._lean_room = asyncio.Semaphore(config.max_concurrency)
        parts = urlsplit(config.endpoint or "")
        self._base_url = f"{parts.scheme}://{parts.netloc}"
        self._netloc = parts.netloc
        self._path_prefix = parts.path.rstrip("/")
        if FastGet.supports(config.endpoint or "") and config.access_key and config.secret_key:
            self._lean = FastGet()
            self._signer = SigV4Signer(config.access_key, config.secret_key, config.region)

    # --- construction --------------------------------------------------------------------
    @classmethod
    async def open(
        cls,
        config: S3Config,
        *,
        create_bucket: bool = True,
        retries: int = 2,
        backoff: float = 0.2,
    ) -> CloudTier:
        """Build the client (in the pool: botocore loads its models from disk) and make
        sure the bucket exists. ``retries``/``backoff`` bound our connection-error retries
        on top of botocore's own."""
        pool = ThreadPoolExecutor(max_workers=config.max_concurrency, thread_name_prefix="s3")
        loop = asyncio.get_running_loop()
        try:
            client = await loop.run_in_executor(pool, _make_client, config)
        except BaseException:
            pool.shutdown(wait=False)
            raise
        tier = cls(config, client, pool, retries=retries, backoff=backoff)
        if create_bucket:
            try:
                await tier._call("bucket", tier._ensure_bucket_sync)
            except BaseException:
                await tier.close()
                raise
        return tier

    def _ensure_bucket_sync(self) -> None:
        try:
            self._client.head_bucket(Bucket=self.bucket)
            return
        except ClientError as exc:
            if _error_code(exc) not in ("404", "NoSuchBucket", "NotFound"):
                raise
        kwargs: dict[str, Any] = {"Bucket": self.bucket}
        if self.config.region != "us-east-1":
            kwargs["CreateBucketConfiguration"] = {"LocationConstraint": self.config.region}
        try:
            self._client.create_bucket(**kwargs)
            log.info("created bucket %s at %s", self.bucket, self.config.endpoint or "AWS")
        except ClientError as exc:
            code = _error_code(exc)
            if code == "BucketAlreadyOwnedByYou":
                return
            if code == "BucketAlreadyExists":  # a concurrent creator; fine if we may use it
                self._client.head_bucket(Bucket=self.bucket)
                return
            raise

    # --- TierStorage ---------------------------------------------------------------------
    async def read(self, digest: str) -> bytes:
        if self._lean is not None:
            return await self._read_lean(digest)
        return await self._read_botocore(digest)

    async def _read_botocore(self, digest: str) -> bytes:
        key = self._key(digest)
        data: bytes = await self._call("get", self._get_sync, key, digest=digest)
        return data

    async def _read_lean(self, digest: str) -> bytes:
        """GET through ``fastget`` on the loop: the body lands in one page-aligned buffer,
        no pool thread, no botocore request building; verified on a thread (xxh3 releases
        the GIL). An answer fastget does not speak is read again through botocore."""
        try:
            body = await self._lean_request("get", digest, allocate=receive_buffer)
        except ProtocolError as exc:  # an answer fastget does not speak (chunked, …)
            log.debug("S3 get %s through botocore: %s", digest, exc)
            return await self._read_botocore(digest)
        with self._lock:
            self._bytes_down += len(body)
        await verify_async(digest, body, f"S3 bucket {self.bucket}")
        # page-aligned: promoted with O_DIRECT from here, never copied
        return body  # type: ignore[return-value]

    async def _lean_request(
        self,
        op: str,
        digest: str,
        body: Payload = b"",
        amz: dict[str, str] | None = None,
        allocate: Allocate = bytearray,
    ) -> Body:
        """One signed ``fastget`` request for the chunk ``digest`` (``op``: get or put) with
        botocore's standard-mode retries (5xx, throttling, connection failures); the body of
        its 200 answer. Other answers raise what ``_failure`` makes of them; an answer
        fastget does not speak raises ``ProtocolError`` (the caller goes to botocore)."""
        assert self._lean is not None and self._signer is not None
        if self._closed:
            raise TierUnavailable("S3 tier is closed")
        method = op.upper()
        path = f"{self._path_prefix}/{self.bucket}/{self._key(digest)}"
        config = self.config
        # a PUT's answer comes once its body is sent: allow it _SEND_FLOOR bytes/s
        answer_within = config.read_timeout + len(body) / _SEND_FLOOR
        attempt = 0
        while True:
            start = time.monotonic()
            with self._lock:
                self._requests[op] += 1
            try:
                async with self._lean_room:
                    status, answer = await self._lean.request(
                        method,
                        self._base_url,
                        path,
                        self._signer.headers(method, self._netloc, path, amz),
                        body,
                        connect_timeout=config.connect_timeout,
                        first_byte_timeout=answer_within,
                        read_timeout=config.read_timeout,
                        allocate=allocate,
                    )
            except ProtocolError:
                raise
            except OSError as exc:  # refused, reset, timed out, cut short
                failure: Exception = exc
                code = type(exc).__name__
            else:
                if status == 200:
                    with self._lock:
                        self._latency[op].append(time.monotonic() - start)
                    return answer
                found = _ERROR_CODE.search(answer)
                code = found.group(1).decode("ascii", "replace") if found else str(status)
                if status not in _RETRY_STATUS:
                    raise self._failure(op, code, status, digest)
                failure = TierUnavailable(f"{code} (HTTP {status})")
            if attempt + 1 >= max(config.max_attempts, self._retries + 1):
                self._count_error(code)
                raise TierUnavailable(
                    f"S3 {op} {self.bucket}/{PREFIX}{digest}: {failure}"
                ) from failure
            attempt += 1
            await self._back_off(op, failure, attempt)

    def _get_sync(self, key: str) -> bytes:
        resp = self._client.get_object(Bucket=self.bucket, Key=key)
        body = resp["Body"]
        try:
            data: bytes = body.read()
        finally:
            body.close()
        with self._lock:
            self._bytes_down += len(data)
        verify(key[len(PREFIX) :], data, f"S3 bucket {self.bucket}")
        return data

    async def write(self, digest: str, data: Buffer) -> None:
        """PUT the chunk. ``data`` is a buffer (bytes, bytearray, memoryview, mmap…), never
        read as a stream; anything but ``bytes`` is copied before the first await."""
        key = self._key(digest)
        upload = _Upload(_as_body(data))
        if self._lean is None:
            await self._call("put", self._put_sync, key, upload, digest=digest)
            return
        # checked and checksummed on a pool thread (xxh3 and CRC32C release the GIL), sent
        # from the loop: no botocore request, no pool thread waiting on the socket
        await asyncio.get_running_loop().run_in_executor(self._pool, self._prepare, key, upload)
        assert upload.checksum is not None
        try:
            await self._lean_request(
                "put", digest, upload.body, amz={_CHECKSUM_HEADER: upload.checksum}
            )
        except ProtocolError as exc:
            log.debug("S3 put %s through botocore: %s", digest, exc)
            await self._call("put", self._put_sync, key, upload, digest=digest)
            return
        with self._lock:
            self._bytes_up += upload.size

    def _prepare(self, key: str, upload: _Upload) -> None:
        """Check the body hashes to its name (a truncated or emptied buffer is never stored
        under a digest name) and compute the checksum every attempt sends."""
        if upload.checksum is None:
            where = f"the buffer given to S3 put {self.bucket}/{key}"
            verify(key[len(PREFIX) :], upload.body, where)
            upload.checksum = _checksum(upload.body)

    def _put_sync(self, key: str, upload: _Upload) -> None:
        """One PUT attempt (``_call`` may run it again): the same buffer, length and checksum."""
        self._prepare(key, upload)  # first attempt: on this pool thread, never on the loop
        body = upload.body
        self._client.put_object(
            Bucket=self.bucket,
            Key=key,
            Body=body if isinstance(body, bytes) else body.tobytes(),  # botocore: bytes
            ContentLength=upload.size,
            **{_CHECKSUM_PARAM: upload.checksum},
        )
        with self._lock:
            self._bytes_up += upload.size

    async def delete(self, digest: str) -> None:
        key = self._key(digest)
        await self._call(
            "delete", self._client.delete_object, digest=digest, Bucket=self.bucket, Key=key
        )

    async def exists(self, digest: str) -> bool:
        """One HEAD request (no body): lets the write-back skip chunks S3 already holds."""
        key = self._key(digest)
        try:
            await self._call(
                "head", self._client.head_object, digest=digest, Bucket=self.bucket, Key=key
            )
        except ChunkNotFound:
            return False
        return True

    async def size(self, digest: str) -> int:
        key = self._key(digest)
        head = await self._call(
            "head", self._client.head_object, digest=digest, Bucket=self.bucket, Key=key
        )
        return int(head["ContentLength"])

    # --- tooling ---------------------------------------------------------------------------
    async def list_chunks(self) -> list[str]:
        """Every chunk digest in the bucket (paginated listing; for tests and tooling)."""
        return [d for d, _, _ in await self._call("list", self._list_sync)]

    async def list_objects(self) -> list[tuple[str, int, float]]:
        """``(digest, size, last modified in epoch seconds)`` of every chunk (``fastcache gc``)."""
        return await self._call("list", self._list_sync)

    def _list_sync(self) -> list[tuple[str, int, float]]:
        out: list[tuple[str, int, float]] = []
        paginator = self._client.get_paginator("list_objects_v2")
        for page in paginator.paginate(Bucket=self.bucket, Prefix=PREFIX):
            for obj in page.get("Contents", ()):
                name = obj["Key"][len(PREFIX) :]
                if is_digest(name):
                    out.append((name, int(obj["Size"]), obj["LastModified"].timestamp()))
        return out

    async def usage(self, max_age: float = 60.0) -> dict[str, Any]:
        """``{"chunks", "bytes"}`` of the bucket, from a listing at most ``max_age`` s old."""
        cached = self._usage
        if cached is not None and time.monotonic() - cached["at"] < max_age:
            return {"chunks": cached["chunks"], "bytes": cached["bytes"]}
        listing = await self._call("list", self._list_sync)
        self._usage = {
            "at": time.monotonic(),
            "chunks": len(listing),
            "bytes": sum(n for _, n, _ in listing),
        }
        return {"chunks": self._usage["chunks"], "bytes": self._usage["bytes"]}

    def last_usage(self) -> dict[str, Any] | None:
        """The last ``usage()`` result without I/O (for synchronous callers such as statfs)."""
        cached = self._usage
        if cached is None:
            return None
        return {"chunks": cached["chunks"], "bytes": cached["bytes"]}

    def stats(self) -> dict[str, Any]:
        with self._lock:
            get = list(self._latency["get"])
            put = list(self._latency["put"])
            return {
                "tier": self.name,
                "bucket": self.bucket,
                "requests": sum(self._requests.values()),
                "requests_by_op": dict(self._requests),
                "errors": sum(self._errors.values()),
                "errors_by_kind": dict(self._errors),
                "retries": self._retried,
                "bytes_up": self._bytes_up,
                "bytes_down": self._bytes_down,
                "get_p50_ms": _ms(_percentile(get, 0.50)),
                "get_p99_ms": _ms(_percentile(get, 0.99)),
                "put_p50_ms": _ms(_percentile(put, 0.50)),
                "put_p99_ms": _ms(_percentile(put, 0.99)),
            }

    async def close(self) -> None:
        """Wait for calls in flight, then drop the pool and the client's connections."""
        if self._closed:
            return
        self._closed = True
        if self._lean is not None:
            self._lean.close()
        await asyncio.to_thread(self._pool.shutdown, True)
        self._client.close()

    # --- internals -----------------------------------------------------------------------
    def _key(self, digest: str) -> str:
        if not is_digest(digest):
            raise BadRequest(f"not a chunk digest: {digest!r}")
        return PREFIX + digest

    async def _call(
        self, op: str, fn: Callable[..., T], *args: Any, digest: str | None = None, **kwargs: Any
    ) -> T:
        """Run one botocore call in the pool, retrying connection errors, translating the rest."""
        if self._closed:
            raise TierUnavailable("S3 tier is closed")
        loop = asyncio.get_running_loop()
        attempt = 0
        while True:
            try:
                return await loop.run_in_executor(self._pool, self._timed, op, fn, args, kwargs)
            except _CONNECTION_ERRORS as exc:
                if attempt >= self._retries:
                    raise self._translate(op, exc, digest) from exc
                attempt += 1
                await self._back_off(op, exc, attempt)
            except (ClientError, BotoCoreError) as exc:
                raise self._translate(op, exc, digest) from exc

    async def _back_off(self, op: str, exc: Exception, attempt: int) -> None:
        """Count retry ``attempt`` and wait before it (exponential, full jitter)."""
        with self._lock:
            self._retried += 1
        delay = random.uniform(0, self._backoff * (2 ** (attempt - 1)))
        log.debug("S3 %s: %s; retry %d in %.2fs", op, exc, attempt, delay)
        await asyncio.sleep(delay)

    def _timed(
        self, op: str, fn: Callable[..., T], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> T:
        start = time.monotonic()
        with self._lock:
            self._requests[op] += 1
        result = fn(*args, **kwargs)
        samples = self._latency.get(op)
        if samples is not None:
            elapsed = time.monotonic() - start
            with self._lock:
                samples.append(elapsed)
        return result

    def _translate(self, op: str, exc: Exception, digest: str | None) -> FastcacheError:
        if isinstance(exc, ClientError):
            return self._failure(op, _error_code(exc), _status(exc), digest, exc)
        where = f"S3 {op} {self.bucket}/{PREFIX}{digest}" if digest else f"S3 {op} {self.bucket}"
        self._count_error(type(exc).__name__)
        return TierUnavailable(f"{where}: {exc}")

    def _failure(
        self, op: str, code: str, status: int, digest: str | None, exc: Exception | None = None
    ) -> FastcacheError:
        """What an S3 error answer (``code``, HTTP ``status``) means to our callers."""
        where = f"S3 {op} {self.bucket}/{PREFIX}{digest}" if digest else f"S3 {op} {self.bucket}"
        if digest is not None and (code in _NOT_FOUND or (status == 404 and not code)):
            return ChunkNotFound(f"chunk {digest} not in S3 bucket {self.bucket}")
        self._count_error(code or str(status))
        if code in _DENIED or status == 403:
            return TierUnavailable(
                f"{where}: access denied ({code}); check the S3 access key, secret key "
                f"and bucket policy"
            )
        if code == "NoSuchBucket":
            return TierUnavailable(f"{where}: bucket {self.bucket} does not exist")
        if code in _BAD_BODY:
            return TierUnavailable(
                f"{where}: S3 refused the body, it does not match its checksum ({code}); "
                f"nothing was stored"
            )
        detail = f": {exc}" if exc is not None else ""
        return TierUnavailable(f"{where}: {code or status} (HTTP {status}){detail}")

    def _count_error(self, kind: str) -> None:
        with self._lock:
            self._errors[kind] += 1


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 3)


def _make_client(config: S3Config) -> Any:
    boto_config = BotoConfig(
        region_name=config.region,
        max_pool_connections=config.max_concurrency,
        retries={"max_attempts": config.max_attempts, "mode": "standard"},
        connect_timeout=config.connect_timeout,
        read_timeout=config.read_timeout,
        # UNSIGNED-PAYLOAD also over http: no SHA-256 over every byte; ``write`` sends a CRC
        # the server checks instead (S3SigV4Auth honours this flag whatever the scheme)
        s3={"addressing_style": "path", "payload_signing_enabled": False},
        # ``write`` computes its own checksum header once per chunk (botocore would add a
        # CRC trailer, recomputed per attempt); chunks are verified by xxh3 on read
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    session = botocore.session.get_session()
    client = session.create_client(
        "s3",
        endpoint_url=config.endpoint,
        region_name=config.region,
        aws_access_key_id=config.access_key,
        aws_secret_access_key=config.secret_key,
        config=boto_config,
    )
    # A PutObject body stays the caller's buffer. botocore would wrap bytes in a BytesIO and
    # send it as a stream: an ``Expect: 100-continue`` round trip, then 128 KiB reads (each
    # a copy) and sends. Bytes go out in one ``sendall``, and a retry (botocore's or ours)
    # re-sends the same object, with nothing to rewind.
    client.meta.events.unregister(
        "before-parameter-build.s3.PutObject", convert_body_to_file_like_object
    )
    return client
