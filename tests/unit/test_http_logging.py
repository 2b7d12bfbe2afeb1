"""Log levels of the HTTP boundary, on a real aiohttp server on loopback: a client's mistake
is one WARNING line, a fault of ours an ERROR with its traceback (``http.error_middleware``,
``log.ClientErrorFilter``)."""

from __future__ import annotations

import asyncio
import logging

import aiohttp
import pytest
from aiohttp import web
from aiohttp.http_exceptions import BadHttpMessage

from fastcache.errors import BadRequest, NotFound
from fastcache.log import ClientErrorFilter
from fastcache.web.middleware import error_middleware

LOGGER = "fastcache.test_http"


async def boom(request: web.Request) -> web.Response:
    raise RuntimeError("a bug of ours")


async def bad(request: web.Request) -> web.Response:
    raise BadRequest("no good\nsecond line")


async def missing(request: web.Request) -> web.Response:
    raise NotFound("no such chunk")


async def fetch_all(paths: list[str]) -> list[tuple[int, dict[str, str]]]:
    app = web.Application(middlewares=[error_middleware(logging.getLogger(LOGGER))])
    app.router.add_get("/boom", boom)
    app.router.add_get("/bad", bad)
    app.router.add_get("/missing", missing)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    answers = []
    try:
        async with aiohttp.ClientSession() as session:
            for path in paths:
                async with session.get(f"http://127.0.0.1:{port}{path}") as resp:
                    answers.append((resp.status, await resp.json()))
    finally:
        await runner.cleanup()
    return answers


def test_levels(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.DEBUG, logger=LOGGER):
        answers = asyncio.run(fetch_all(["/boom", "/bad", "/missing", "/nowhere"]))
    assert [status for status, _ in answers] == [500, 400, 404, 404]
    assert answers[0][1] == {"error": "internal error", "kind": "InternalError"}
    records = {r.getMessage().split(" from ")[0]: r for r in caplog.records if r.name == LOGGER}
    ours = records["unexpected error serving GET /boom"]
    assert ours.levelno == logging.ERROR
    assert ours.exc_info is not None and isinstance(ours.exc_info[1], RuntimeError)
    mistake = records["GET /bad"]
    assert (mistake.levelno, mistake.exc_info) == (logging.WARNING, None)
    assert mistake.getMessage().endswith(": 400 no good")  # one line
    for routine in ("GET /missing", "GET /nowhere"):
        assert records[routine].levelno == logging.DEBUG


def _record(exc: BaseException, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord(
        "aiohttp.server",
        level,
        __file__,
        1,
        "Error handling request from %s",
        ("127.0.0.1",),
        (type(exc), exc, None),
    )


def test_client_error_filter() -> None:
    keep = ClientErrorFilter()
    malformed = _record(BadHttpMessage("Invalid header:\n\n  b'X: \\x00'\n      ^"))
    assert keep.filter(malformed)
    assert (malformed.levelno, malformed.levelname, malformed.exc_info) == (
        logging.WARNING,
        "WARNING",
        None,
    )
    assert malformed.getMessage() == (
        "Error handling request from 127.0.0.1: malformed HTTP: Invalid header: b'X: \\x00'"
    )
    gone = _record(ConnectionResetError("Connection lost"))
    assert keep.filter(gone)
    assert gone.levelno == logging.WARNING
    assert gone.getMessage().endswith(": the client went away (Connection lost)")
    ours = _record(RuntimeError("a bug"))
    assert keep.filter(ours)
    assert ours.levelno == logging.ERROR and ours.exc_info is not None
    quiet = _record(BadHttpMessage("not HTTP at all"), logging.DEBUG)  # aiohttp's own DEBUG
    assert keep.filter(quiet)
    assert quiet.levelno == logging.DEBUG
