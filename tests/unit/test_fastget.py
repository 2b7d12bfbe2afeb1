"""The lean peer GET client: bodies, keep-alive reuse, and every malformed or cut-short
answer failing as a connection error (never a short or wrong body)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web

from fastcache.tiers.fastget import FastGet
from tests.helpers import serve_app

BODY = os.urandom(3 * 1024 * 1024 + 17)


def _with_server(
    routes: dict[str, Callable[[web.Request], Awaitable[web.StreamResponse]]],
    body: Callable[[FastGet, str], Awaitable[None]],
) -> None:
    async def main() -> None:
        app = web.Application()
        for path, handler in routes.items():
            app.router.add_get(path, handler)
        runner, url = await serve_app(app)
        client = FastGet()
        try:
            await asyncio.wait_for(body(client, url), 60)
        finally:
            client.close()
            await runner.cleanup()

    asyncio.run(main())


def _get(client: FastGet, url: str, path: str) -> Awaitable[tuple[int, bytearray]]:
    return client.request(  # type: ignore[return-value]
        "GET",
        url,
        path,
        {"X-Test": "1"},
        connect_timeout=5,
        first_byte_timeout=5,
        read_timeout=5,
    )


def test_bodies_arrive_whole_over_one_kept_alive_connection() -> None:
    transports: set[tuple[str, int]] = set()

    async def big(request: web.Request) -> web.StreamResponse:
        transports.add(request.transport.get_extra_info("peername"))  # type: ignore[union-attr]
        assert request.headers["X-Test"] == "1"
        return web.Response(body=BODY)

    async def missing(request: web.Request) -> web.StreamResponse:
        transports.add(request.transport.get_extra_info("peername"))  # type: ignore[union-attr]
        raise web.HTTPNotFound()

    async def body(client: FastGet, url: str) -> None:
        statuses: list[int] = []
        for path in ("/big", "/missing", "/big", "/big"):
            status, data = await _get(client, url, path)
            statuses.append(status)
            if status == 200:
                assert data == BODY
        assert statuses == [200, 404, 200, 200]
        assert len(transports) == 1

    _with_server({"/big": big, "/missing": missing}, body)


def _raw_handler(payload: bytes) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    """A handler that writes ``payload`` on the socket as the whole answer, then closes."""

    async def handler(request: web.Request) -> web.StreamResponse:
        assert request.transport is not None
        request.transport.write(payload)
        request.transport.close()
        await asyncio.sleep(0.05)  # the connection is gone: aiohttp gives up on it
        return web.Response()

    return handler


@pytest.mark.parametrize(
    "payload",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 10,  # cut short
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\n\r\nno length",
        b"garbage\r\n\r\n",
    ],
)
def test_a_bad_answer_is_a_connection_error(payload: bytes) -> None:
    async def good(request: web.Request) -> web.StreamResponse:
        return web.Response(body=b"fine")

    async def body(client: FastGet, url: str) -> None:
        with pytest.raises(ConnectionError):
            await _get(client, url, "/bad")
        assert await _get(client, url, "/good") == (200, bytearray(b"fine"))

    _with_server({"/bad": _raw_handler(payload), "/good": good}, body)


def test_a_cancelled_get_does_not_leave_its_connection_for_reuse() -> None:
    started = asyncio.Event()
    release = asyncio.Event()
    transports: list[tuple[str, int]] = []

    async def slow(request: web.Request) -> web.StreamResponse:
        transports.append(request.transport.get_extra_info("peername"))  # type: ignore[union-attr]
        started.set()
        await release.wait()
        return web.Response(body=b"late")

    async def fast(request: web.Request) -> web.StreamResponse:
        transports.append(request.transport.get_extra_info("peername"))  # type: ignore[union-attr]
        return web.Response(body=b"now")

    async def body(client: FastGet, url: str) -> None:
        task = asyncio.ensure_future(_get(client, url, "/slow"))
        await started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()
        assert await _get(client, url, "/fast") == (200, bytearray(b"now"))
        assert len(set(transports)) == 2  # the late answer could not be read as this one

    _with_server({"/slow": slow, "/fast": fast}, body)
