"""The S3 tier against a real SeaweedFS: round trips, errors, bucket creation, an S3 that
hangs or dies and comes back, concurrent uploads, and what an upload guarantees (a checksum
the server verifies, never an empty, short or consumed body, retries that re-send the
caller's buffer)."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import mmap
import os
from pathlib import Path
from typing import Any

import botocore.session
import numpy as np
import pytest
from botocore.exceptions import ConnectionClosedError

from fastcache.chunks import digest
from fastcache.config import S3Config
from fastcache.errors import (
    BadRequest,
    ChunkCorrupt,
    ChunkNotFound,
    FastcacheError,
    TierUnavailable,
)
from fastcache.seaweed import SeaweedServer
from fastcache.testing.polling import free_port
from fastcache.tiers.cloud import CloudTier
from tests.conftest import S3Fixture
from tests.helpers import tree_rss_bytes

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


def test_reads_are_signed_lean_gets_into_page_aligned_buffers(s3: S3Fixture) -> None:
    """Over plain HTTP with keys, a chunk GET is ours (fastget + SigV4): the server accepts
    its signature, the bytes equal botocore's, the body lands page-aligned (promoted with
    O_DIRECT from there); a wrong secret is refused with a clear message, not retried."""
    data = os.urandom(4 * MiB + 5)
    d = digest(data)
    config = s3.s3_config()

    async def main() -> None:
        tier = await CloudTier.open(config)
        wrong = await CloudTier.open(
            dataclasses.replace(config, secret_key="not-the-secret"), create_bucket=False
        )
        try:
            await tier.write(d, data)
            got = await tier.read(d)
            assert isinstance(got, memoryview) and got == data
            assert np.frombuffer(got, dtype=np.uint8).ctypes.data % 4096 == 0
            assert await tier._read_botocore(d) == data
            assert tier.stats()["bytes_down"] == 2 * len(data)
            with pytest.raises(TierUnavailable, match="access denied"):
                await wrong.read(d)
            assert wrong.stats()["retries"] == 0
            with pytest.raises(ChunkNotFound):
                await tier.read(digest(b"never stored"))
        finally:
            await wrong.close()
            await tier.close()

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


# --- uploads: checksums the server verifies, bodies that are never empty or consumed ---------
# Every upload test runs on both ways a PUT leaves: ours (``fastget`` + SigV4, over plain HTTP
# with static keys) and botocore's (HTTPS, credential chains). ``Sends`` watches (and may
# damage or drop) what each attempt puts on the wire, through botocore's event hooks or by
# wrapping the lean client's ``request``; the server is the real SeaweedFS either way.
PATHS = ["lean", "botocore"]


@dataclasses.dataclass
class Attempt:
    body: Any  # what is about to be sent (bytes, or botocore's body object)
    headers: dict[str, str]  # lower-case names, str values


Hook = Any  # (Attempt) -> bytes | None: a replacement body, or None; may raise to drop it


class Sends:
    """Hooks on the PUTs of ``tier``, on the path it uses."""

    def __init__(self, tier: CloudTier, path: str) -> None:
        self.tier = tier
        self.path = path
        self.hooks: list[Hook] = []
        if path == "botocore":
            tier._lean = None
            tier._client.meta.events.register("before-sign.s3.PutObject", self._before_sign)
            tier._client.meta.events.register("before-send.s3.PutObject", self._before_send)
            return
        assert tier._lean is not None, "the lean path is used over plain HTTP with keys"
        lean = tier._lean
        original = lean.request

        async def request(
            method: str, base: str, path: str, headers: Any, body: bytes = b"", **kw: Any
        ) -> Any:
            if method == "PUT":
                seen = {k.lower(): str(v) for k, v in headers.items()}
                damaged = self._damage(Attempt(body, seen))
                body = body if damaged is None else damaged
                seen["content-length"] = str(len(body))
                self._watch(Attempt(body, seen))
            return await original(method, base, path, headers, body, **kw)

        lean.request = request  # type: ignore[method-assign]

    def _damage(self, attempt: Attempt) -> bytes | None:
        replaced = None
        for hook in self.hooks:
            if getattr(hook, "damages", False):
                damaged = hook(attempt)
                replaced = replaced if damaged is None else damaged
        return replaced

    def _watch(self, attempt: Attempt) -> None:
        for hook in self.hooks:
            if not getattr(hook, "damages", False):
                hook(attempt)

    # botocore: damage before signing (Content-Length is signed), drop before sending
    def _before_sign(self, request: Any, **_: Any) -> None:
        replaced = self._damage(Attempt(request.data, _headers(request)))
        if replaced is not None:
            request.data = replaced
            del request.headers["Content-Length"]  # setting a header adds one more
            request.headers["Content-Length"] = str(len(replaced))

    def _before_send(self, request: Any, **_: Any) -> None:
        body = request.body
        if hasattr(body, "read"):
            body.read()  # what sending a stream does to it
        self._watch(Attempt(body, _headers(request)))


def _headers(request: Any) -> dict[str, str]:
    """A prepared request's headers, lower-case names, str values (botocore mixes bytes)."""
    return {
        k.lower(): v.decode() if isinstance(v, bytes) else str(v)
        for k, v in request.headers.items()
    }


def _checksum_header(headers: Any) -> str:
    names = [k for k in headers if k.lower().startswith("x-amz-checksum-")]
    assert len(names) == 1, names
    return str(names[0]).lower()


def _dropped() -> Exception:
    return ConnectionResetError("dropped by the test")


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("damage", ["flipped", "truncated", "emptied"])
def test_the_server_refuses_a_body_that_does_not_match_its_checksum(
    s3: S3Fixture, damage: str, path: str
) -> None:
    """A body damaged between our checksum and the server (with a consistent, signed
    Content-Length) is refused by the server (400 BadDigest) and becomes a
    ``FastcacheError``; nothing is stored under the digest name. The same write then works."""
    data = os.urandom(MiB)
    d = digest(data)
    config = s3.s3_config(max_attempts=1)
    seen: list[dict[str, str]] = []
    damaging = [True]

    def corrupt(attempt: Attempt) -> bytes | None:
        if not damaging[0]:
            return None
        if damage == "flipped":
            return bytes([data[0] ^ 1]) + data[1:]
        if damage == "truncated":
            return data[: len(data) // 2]
        return b""

    corrupt.damages = True  # type: ignore[attr-defined]

    def record(attempt: Attempt) -> None:
        seen.append(attempt.headers)

    async def main() -> None:
        tier = await CloudTier.open(config)
        sends = Sends(tier, path)
        sends.hooks += [corrupt, record]
        try:
            with pytest.raises(FastcacheError, match="checksum"):
                await tier.write(d, data)
            damaging[0] = False
            assert not await tier.exists(d)
            assert tier.stats()["errors_by_kind"] == {"BadDigest": 1}
            await tier.write(d, data)
            assert await tier.read(d) == data
        finally:
            await tier.close()

    asyncio.run(main())
    headers = seen[0]
    assert int(headers["content-length"]) < len(data) or damage == "flipped"
    assert headers[_checksum_header(headers)]  # a CRC the server checks …
    assert headers["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"  # … instead of a SHA-256
    assert "expect" not in headers  # the body is a buffer, sent at once, not a stream


@pytest.mark.parametrize(
    ("path", "max_attempts"), [("lean", 1), ("botocore", 1), ("botocore", 3)]
)  # botocore: our retry, then its own
@pytest.mark.parametrize("kind", ["bytes", "bytearray", "slice", "mmap"])
def test_a_retry_resends_the_whole_buffer(
    s3: S3Fixture, kind: str, max_attempts: int, path: str
) -> None:
    """The connection drops after the first attempt has looked at (consumed, were it a
    stream) the body: the retry sends the same buffer, full length, same checksum."""
    data = os.urandom(MiB + 7)
    d = digest(data)
    config = s3.s3_config(max_attempts=max_attempts)
    attempts: list[tuple[int, str, str, bool]] = []
    holder = bytearray(b"head" + data + b"tail")
    mapped = mmap.mmap(-1, len(data))
    mapped.write(data)
    mapped.seek(0)
    given: Any = {
        "bytes": data,
        "bytearray": bytearray(data),
        "slice": memoryview(holder)[4:-4],
        "mmap": mapped,
    }[kind]

    def drop_first(attempt: Attempt) -> None:
        checksum = _checksum_header(attempt.headers)
        attempts.append(
            (
                len(memoryview(attempt.body)),
                attempt.headers["content-length"],
                f"{checksum}: {attempt.headers[checksum]}",
                hasattr(attempt.body, "read"),
            )
        )
        if len(attempts) == 1:
            raise _dropped() if path == "lean" else ConnectionClosedError(endpoint_url="s3")

    async def main() -> None:
        tier = await CloudTier.open(config, retries=1, backoff=0)
        Sends(tier, path).hooks.append(drop_first)
        try:
            await tier.write(d, given)
            assert await tier.read(d) == data
            assert tier.stats()["bytes_up"] == len(data)
        finally:
            await tier.close()

    asyncio.run(main())
    mapped.close()
    assert len(attempts) == 2
    assert attempts[0] == attempts[1] == (len(data), str(len(data)), attempts[0][2], False)


@pytest.mark.parametrize(("path", "max_attempts"), [("lean", 1), ("botocore", 1), ("botocore", 3)])
def test_a_buffer_emptied_during_a_retry_is_still_sent_whole(
    s3: S3Fixture, max_attempts: int, path: str
) -> None:
    """A caller that empties its bytearray while the upload waits for a retry: every attempt
    sends what the buffer held when ``write`` was called, so no empty (or short) object can
    land under the digest name. (botocore builds a new request for each of its retries: from
    the caller's bytearray, that was a 0-byte body.)"""
    data = os.urandom(MiB)
    d = digest(data)
    buf = bytearray(data)
    config = s3.s3_config(max_attempts=max_attempts)
    attempts: list[int] = []

    def drop_and_empty(attempt: Attempt) -> None:
        attempts.append(len(attempt.body or b""))
        if len(attempts) == 1:
            del buf[:]
            raise _dropped() if path == "lean" else ConnectionClosedError(endpoint_url="s3")

    async def main() -> None:
        tier = await CloudTier.open(config, retries=1, backoff=0)
        Sends(tier, path).hooks.append(drop_and_empty)
        try:
            await tier.write(d, buf)
            assert await tier.read(d) == data
        finally:
            await tier.close()

    asyncio.run(main())
    assert attempts == [len(data), len(data)]


@pytest.mark.parametrize("path", PATHS)
def test_only_what_hashes_to_its_name_is_uploaded(s3: S3Fixture, path: str) -> None:
    """Empty or truncated buffers under a digest name, and streams, never reach S3; a chunk
    that really is empty does."""
    data = os.urandom(MiB)
    d = digest(data)
    config = s3.s3_config()
    sent: list[int] = []

    def count(attempt: Attempt) -> None:
        sent.append(len(attempt.body or b""))

    async def main() -> None:
        tier = await CloudTier.open(config)
        Sends(tier, path).hooks.append(count)
        try:
            for wrong in (b"", data[:-1], bytearray(len(data)), memoryview(data)[1:]):
                with pytest.raises(ChunkCorrupt):
                    await tier.write(d, wrong)
            with pytest.raises(BadRequest, match="buffer"):
                await tier.write(d, io.BytesIO(data))  # type: ignore[arg-type]
            assert sent == []
            assert not await tier.exists(d)
            await tier.write(digest(b""), b"")
            assert await tier.size(digest(b"")) == 0
            assert sent == [0]
        finally:
            await tier.close()

    asyncio.run(main())


def test_exists_is_one_head_request(s3: S3Fixture) -> None:
    data = b"present"
    config = s3.s3_config()
    methods: list[str] = []

    async def main() -> None:
        tier = await CloudTier.open(config)
        try:
            await tier.write(digest(data), data)
            tier._client.meta.events.register(
                "before-send.s3", lambda request, **_: methods.append(request.method)
            )
            assert await tier.exists(digest(data))
            assert not await tier.exists(digest(b"absent"))
            assert tier.stats()["errors"] == 0
        finally:
            await tier.close()

    asyncio.run(main())
    assert methods == ["HEAD", "HEAD"]
