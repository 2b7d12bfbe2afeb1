"""The cloud tier's lean chunk GET against a loopback HTTP server standing in for an
S3-compatible store that answers a GET without a Content-Length (chunked): the read is
made again through botocore and returns the chunk (the real S3 tests are in
tests/integration/test_cloud_tier.py)."""

from __future__ import annotations

import asyncio
import os

from aiohttp import web

from fastcache.chunks import digest
from fastcache.config import S3Config
from fastcache.tiers.cloud import CloudTier
from tests.helpers import serve_app


def test_an_answer_without_content_length_is_read_through_botocore() -> None:
    data = os.urandom(300_000)
    name = digest(data)
    seen: list[str] = []

    async def get(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("User-Agent", ""))
        if request.match_info["key"] != name:
            raise web.HTTPNotFound()
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for at in range(0, len(data), 65536):
            await resp.write(data[at : at + 65536])
        await resp.write_eof()
        return resp

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/bucket/chunks/{key}", get)
        runner, url = await serve_app(app)
        config = S3Config(endpoint=url, bucket="bucket", access_key="ak", secret_key="sk")
        tier = await CloudTier.open(config, create_bucket=False)
        try:
            assert tier._lean is not None  # plain HTTP and keys: the lean GET is tried first
            got = await tier.read(name)
            assert bytes(got) == data
        finally:
            await tier.close()
            await runner.cleanup()
        assert len(seen) == 2 and "Botocore" in seen[1] and "Botocore" not in seen[0]

    asyncio.run(main())
