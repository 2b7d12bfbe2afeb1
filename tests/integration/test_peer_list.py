"""The peer list every node fetches every few seconds: one encoded answer serves them all,
and an unchanged set of live peers is a 304 without a body (real coordinator process)."""

from __future__ import annotations

import asyncio
import urllib.error
import urllib.request

from fastcache.coordinator.client import CoordinatorClient
from tests.integration.conftest_coordinator import CoordinatorProcess


def _get(url: str, etag: str | None = None) -> tuple[int, str | None, bytes]:
    req = urllib.request.Request(url + "/api/peers")
    if etag is not None:
        req.add_header("If-None-Match", etag)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers.get("ETag"), resp.read()
    except urllib.error.HTTPError as exc:  # urllib raises for 304
        return exc.code, exc.headers.get("ETag"), exc.read()


def test_an_unchanged_peer_set_is_a_304_and_a_change_a_new_list(
    coordinator: CoordinatorProcess,
) -> None:
    async def register(peer_id: str) -> None:
        async with CoordinatorClient(coordinator.url) as c:
            await c.register_peer(peer_id, f"http://127.0.0.1:1/{peer_id}", 1 << 30)

    asyncio.run(register("a"))
    status, etag, body = _get(coordinator.url)
    assert status == 200 and etag is not None and b'"a"' in body
    status, again, body = _get(coordinator.url, etag)
    assert (status, again, body) == (304, etag, b"")
    asyncio.run(register("b"))  # the set changed: the old ETag gets the new list
    status, newer, body = _get(coordinator.url, etag)
    assert status == 200 and newer != etag and b'"b"' in body


def test_the_client_reuses_its_list_on_a_304(coordinator: CoordinatorProcess) -> None:
    async def body() -> None:
        async with CoordinatorClient(coordinator.url) as c:
            await c.register_peer("n1", "http://127.0.0.1:1", 1 << 30)
            first = await c.list_peers()
            second = await c.list_peers()  # a 304: the same peers, from the client's copy
            assert [p.peer_id for p in first] == [p.peer_id for p in second] == ["n1"]
            assert second[0] is first[0]  # not decoded again: the coordinator said 304
            await c.register_peer("n2", "http://127.0.0.1:2", 1 << 30)
            assert sorted(p.peer_id for p in await c.list_peers()) == ["n1", "n2"]

    asyncio.run(body())
