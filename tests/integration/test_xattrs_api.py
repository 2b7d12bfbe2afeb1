"""Extended attributes over REST and the metadata session against a real coordinator process:
the same answers and errors on both paths, push invalidation of ``attr:<ino>``, HTTP statuses,
the OpenAPI document, and a restart."""

from __future__ import annotations

import asyncio
import base64
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from fastcache.coordinator.client import CoordinatorClient
from fastcache.coordinator.model import ROOT_INO, XATTR_CREATE, XATTR_REPLACE, XATTR_SIZE_MAX
from fastcache.coordinator.session_client import SessionClient
from fastcache.errors import (
    BadRequest,
    Exists,
    InvalidArgument,
    NoAttribute,
    NotPermitted,
    OutOfRange,
    PermissionDenied,
    Unsupported,
    ValueTooLarge,
)
from tests.integration.conftest_coordinator import CoordinatorProcess, start_coordinator

TOKEN = "xattr-token"
BINARY = bytes(range(256)) * 3


@pytest.fixture(scope="module")
def coord(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoordinatorProcess]:
    proc = start_coordinator(tmp_path_factory.mktemp("xattrs") / "state", token=TOKEN)
    try:
        yield proc
    finally:
        proc.kill()


def _clients(url: str, events: list[Any] | None = None) -> tuple[SessionClient, CoordinatorClient]:
    def invalidated(keys: list[str]) -> None:
        if events is not None:
            events.append(("invalidated", sorted(keys)))

    return SessionClient(url, TOKEN, on_invalidate=invalidated), CoordinatorClient(url, TOKEN)


async def _error(call: Any) -> type[BaseException]:
    try:
        await call
    except Exception as exc:
        return type(exc)
    raise AssertionError("no error")


@pytest.mark.parametrize("via", ["session", "rest"])
def test_both_paths_answer_alike(coord: CoordinatorProcess, via: str) -> None:
    async def body() -> None:
        session, rest = _clients(coord.url)
        async with session, rest:
            ns: Any = session if via == "session" else rest
            other: Any = rest if via == "session" else session
            f = await ns.create(ROOT_INO, f"alike-{via}", "file", 0o640, 1000, 100)
            after = await ns.setxattr(f.ino, "user.bin", BINARY)
            assert after.xattrs == 1 and after.ino == f.ino
            assert await other.getxattr(f.ino, "user.bin") == BINARY
            await ns.setxattr(f.ino, "user.empty", b"", XATTR_CREATE)
            await ns.setxattr(f.ino, "trusted.t", b"t")
            assert await ns.listxattr(f.ino) == ["trusted.t", "user.bin", "user.empty"]
            assert await ns.listxattr(f.ino, uid=1000, gids=[100]) == ["user.bin", "user.empty"]
            assert await other.getxattr(f.ino, "user.empty") == b""
            assert (await other.getattr(f.ino)).xattrs == 3
            gone = await ns.removexattr(f.ino, "user.empty")
            assert gone.xattrs == 2
            refused = {
                NoAttribute: ns.getxattr(f.ino, "user.empty"),
                OutOfRange: ns.getxattr(f.ino, "user." + "n" * 251),
                Unsupported: ns.getxattr(f.ino, "system.posix_acl_access"),
                ValueTooLarge: ns.setxattr(f.ino, "user.big", b"x" * (XATTR_SIZE_MAX + 1)),
                Exists: ns.setxattr(f.ino, "user.bin", b"", XATTR_CREATE),
                InvalidArgument: ns.setxattr(f.ino, "user.", b""),
                PermissionDenied: ns.setxattr(f.ino, "user.bin", b"", uid=2000, gids=[100]),
                NotPermitted: ns.setxattr(f.ino, "trusted.t", b"", uid=1000, gids=[100]),
            }
            for cls, call in refused.items():
                assert await _error(call) is cls, cls
            assert await _error(ns.removexattr(f.ino, "user.none")) is NoAttribute
            assert await _error(ns.setxattr(f.ino, "user.none", b"", XATTR_REPLACE)) is NoAttribute
            assert await _error(ns.setxattr(f.ino, "user.x", b"", 4)) is BadRequest
            assert await ns.getxattr(f.ino, "user.bin", uid=1000, gids=[1000]) == BINARY

    asyncio.run(body())


@pytest.mark.parametrize("via", ["session", "rest"])
@pytest.mark.parametrize("change", ["set", "remove"])
def test_a_holder_is_told_before_the_change_returns(
    coord: CoordinatorProcess, via: str, change: str
) -> None:
    async def body() -> None:
        events: list[Any] = []
        a, _ = _clients(coord.url, events)
        b, rest = _clients(coord.url)
        async with a, b, rest:
            f = await b.create(ROOT_INO, f"told-{change}-{via}")
            await b.setxattr(f.ino, "user.k", b"old")
            leased = await a.getattr_leased(f.ino)
            assert leased.valid and leased.value.xattrs == 1
            events.clear()
            ns: Any = b if via == "session" else rest
            if change == "set":
                await ns.setxattr(f.ino, "user.k", b"new")
            else:
                await ns.removexattr(f.ino, "user.k")
            events.append(("returned",))
            assert events == [("invalidated", [f"attr:{f.ino}"]), ("returned",)]
            assert (await a.getattr_leased(f.ino)).value.xattrs == (1 if change == "set" else 0)

    asyncio.run(body())


def test_rest_statuses_and_openapi(coord: CoordinatorProcess) -> None:
    async def body() -> None:
        headers = {"Authorization": f"Bearer {TOKEN}"}
        async with CoordinatorClient(coord.url, TOKEN) as rest, aiohttp.ClientSession() as http:
            f = await rest.create(ROOT_INO, "statuses")
            url = f"{coord.url}/api/ns/inodes/{f.ino}/xattrs"

            async def put(doc: dict[str, Any]) -> int:
                async with http.put(url, json=doc, headers=headers) as resp:
                    return resp.status

            async def get(params: dict[str, str]) -> tuple[int, Any]:
                async with http.get(url, params=params, headers=headers) as resp:
                    return resp.status, await resp.json()

            value = base64.b64encode(b"v").decode()
            assert await put({"name": "user.k", "value": value}) == 200
            assert await get({"name": "user.k"}) == (200, {"name": "user.k", "value": value})
            assert await get({}) == (200, {"names": ["user.k"]})
            assert (await get({"name": "user.none"}))[0] == 404  # ENODATA
            acl = await get({"name": "system.posix_acl_access"})  # ENOTSUP
            assert acl[0] == 400 and acl[1]["kind"] == "Unsupported"
            assert (await get({"name": ""}))[0] == 400  # ERANGE
            big = base64.b64encode(b"x" * (XATTR_SIZE_MAX + 1)).decode()
            assert await put({"name": "user.big", "value": big}) == 413  # E2BIG
            assert await put({"name": "user.k", "value": "not base64!"}) == 400
            assert await put({"name": "user.k", "value": value, "flags": 1}) == 409  # EEXIST
            async with http.delete(url, params={"name": "user.k"}, headers=headers) as resp:
                assert resp.status == 200 and (await resp.json())["xattrs"] == 0
            async with http.get(f"{coord.url}/api/openapi.json", headers=headers) as resp:
                doc = await resp.json()
            ops = doc["paths"]["/api/ns/inodes/{ino}/xattrs"]
            assert sorted(ops) == ["delete", "get", "put"]
            assert "413" in ops["put"]["responses"] and "404" in ops["get"]["responses"]

    asyncio.run(body())


def test_kept_across_a_coordinator_restart(tmp_path: Path) -> None:
    proc = start_coordinator(tmp_path / "state", token=TOKEN)
    try:

        async def write() -> int:
            async with SessionClient(proc.url, TOKEN) as ns:
                f = await ns.create(ROOT_INO, "kept")
                await ns.setxattr(f.ino, "user.k", BINARY)
                await ns.setxattr(f.ino, "security.s", b"label")
                return f.ino

        ino = asyncio.run(write())
        proc.kill()  # SIGKILL: an acknowledged change is committed already
        proc.restart()

        async def read() -> tuple[list[str], bytes, int | None]:
            async with CoordinatorClient(proc.url, TOKEN) as ns:
                names = await ns.listxattr(ino)
                return names, await ns.getxattr(ino, "user.k"), (await ns.getattr(ino)).xattrs

        assert asyncio.run(read()) == (["security.s", "user.k"], BINARY, 2)
    finally:
        proc.kill()
