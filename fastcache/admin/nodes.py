"""A small HTTP client of the client nodes' REST API, for the operator tools.

One ``ClientSession`` for a command's whole run; an error answer comes back as the domain
error the node raised, a node that cannot be reached as ``TierUnavailable``.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson

from fastcache.errors import TierUnavailable, error_from_kind, error_from_status

PROBE_TIMEOUT = 3.0  # a status probe of one node
CHUNK_TIMEOUT = 60.0  # one chunk from a node's NVMe


class NodeApi:
    def __init__(self, token: str | None = None) -> None:
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._session: aiohttp.ClientSession | None = None

    async def __aenter__(self) -> NodeApi:
        self._session = aiohttp.ClientSession(headers=self._headers)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._session is not None:
            await self._session.close()

    @property
    def session(self) -> aiohttp.ClientSession:
        assert self._session is not None, "use NodeApi as an async context manager"
        return self._session

    @staticmethod
    def _error(url: str, status: int, raw: bytes) -> Exception:
        try:
            doc = orjson.loads(raw)
        except ValueError:
            doc = None
        if isinstance(doc, dict) and isinstance(doc.get("error"), str):
            return error_from_kind(doc.get("kind"), status, f"{url}: {doc['error']}")
        return error_from_status(status, f"{url}: HTTP {status}")

    async def get_json(self, base: str, path: str, timeout: float = PROBE_TIMEOUT) -> Any:
        return orjson.loads(await self.get(base, path, timeout))

    async def get_text(self, base: str, path: str, timeout: float = PROBE_TIMEOUT) -> str:
        return (await self.get(base, path, timeout)).decode()

    async def get(self, base: str, path: str, timeout: float = PROBE_TIMEOUT) -> bytes:
        """The body of a 2xx answer; the node's error otherwise."""
        url = base.rstrip("/") + path
        try:
            async with self.session.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                raw = await resp.read()
                if resp.status >= 400:
                    raise self._error(url, resp.status, raw)
                return raw
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise TierUnavailable(f"{url}: {exc or type(exc).__name__}") from exc

    async def chunk(self, base: str, digest: str) -> bytes | None:
        """The chunk from that node's NVMe only (never fetched through); ``None`` if absent."""
        url = f"{base.rstrip('/')}/api/chunks/{digest}"
        try:
            async with self.session.get(
                url, timeout=aiohttp.ClientTimeout(total=CHUNK_TIMEOUT)
            ) as resp:
                raw = await resp.read()
                if resp.status == 404:
                    return None
                if resp.status >= 400:
                    raise self._error(url, resp.status, raw)
                return raw
        except (TimeoutError, aiohttp.ClientError) as exc:
            raise TierUnavailable(f"{url}: {exc or type(exc).__name__}") from exc

    async def warmup(
        self, base: str, paths: list[str], threads: int, owned_only: bool = False
    ) -> AsyncIterator[dict[str, Any]]:
        """``POST /api/warmup``: its events (plan, progress…, done) as they arrive."""
        url = base.rstrip("/") + "/api/warmup"
        body = {"paths": paths, "threads": threads, "owned_only": owned_only}
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
        try:
            async with self.session.post(url, json=body, timeout=timeout) as resp:
                if resp.status >= 400:
                    raise self._error(url, resp.status, await resp.read())
                async for line in resp.content:
                    if line.strip():
                        yield orjson.loads(line)
        except aiohttp.ClientError as exc:
            raise TierUnavailable(f"{url}: {exc or type(exc).__name__}") from exc
