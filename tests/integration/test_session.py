"""The metadata session (``/api/session``) against real coordinator processes: push
invalidation before acknowledgement, a frozen holder, bad frames, reconnection."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import msgspec
import pytest

from fastcache.coordinator.client import CoordinatorClient
from fastcache.coordinator.model import ROOT_INO
from fastcache.coordinator.session_client import SessionClient
from fastcache.errors import Exists, NotEmpty, NotFound, TierUnavailable, Unauthorized
from fastcache.testing.polling import wait_until
from tests.conftest import STORES, new_database
from tests.integration.conftest_coordinator import REPO, CoordinatorProcess

T = TypeVar("T")
TOKEN = "session-token"
TERM = 2.0
D1, D2 = "a" * 32, "b" * 32


def arun(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class LeasedCoordinator(CoordinatorProcess):
    """A coordinator process started with ``--lease-term``."""

    def __init__(self, state_dir: Path, lease_term: float, **kw: Any) -> None:
        super().__init__(state_dir, flags=["--lease-term", str(lease_term)], **kw)
        self.lease_term = lease_term


@pytest.fixture(scope="module", params=STORES)
def coord(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LeasedCoordinator]:
    """The session suite runs on each store. A coordinator on PostgreSQL grants leases once
    it hears itself on the bus between coordinators (``cluster.py``): wait for that."""
    store = None if request.param == "sqlite" else new_database(request.getfixturevalue("pg"))
    state = tmp_path_factory.mktemp("session") / "state"
    proc = LeasedCoordinator(state, TERM, token=TOKEN, store=store)
    proc.start()
    try:
        if store is not None:
            wait_until(lambda: _may_lease(proc.url), 30, message="coordinator may lease")
        yield proc
    finally:
        proc.kill()


def _may_lease(url: str) -> bool:
    return bool(arun(_stats(url))["sessions"]["cluster"]["may_lease"])


def _client(url: str, events: list[Any] | None = None, who: str = "A") -> SessionClient:
    def invalidated(keys: list[str]) -> None:
        if events is not None:
            events.append((who, "invalidated", sorted(keys)))

    return SessionClient(url, TOKEN, on_invalidate=invalidated)


async def _stats(url: str) -> dict[str, Any]:
    async with CoordinatorClient(url, TOKEN) as c:
        return await c.stats()


# --- push invalidation: the holder is told before the change is acknowledged -------------
async def _case(case: str, a: SessionClient, b: Any, d: int, events: list[Any]) -> list[str]:
    """A caches something under ``d``, B changes it; the keys A must have been told."""
    if case == "create":  # a negative lookup
        leased = await a.lookup_leased(d, "new")
        assert leased.value is None and leased.valid
        await b.create(d, "new")
        return [f"entry:{d}:new"]
    if case == "listing":
        leased = await a.readdir_leased(d)
        assert leased.value == [] and leased.valid
        await b.mkdir(d, "sub")
        return [f"list:{d}"]
    f = await b.create(d, "f")
    if case == "rename":
        assert (await a.lookup_leased(d, "f")).value.ino == f.ino
        assert (await a.lookup_leased(d, "g")).value is None
        await b.rename(d, "f", d, "g")
        return [f"attr:{f.ino}", f"entry:{d}:f", f"entry:{d}:g"]
    if case == "unlink":
        assert (await a.lookup_leased(d, "f")).valid
        await b.unlink(d, "f")
        return [f"attr:{f.ino}", f"entry:{d}:f"]
    if case == "setattr":
        assert (await a.getattr_leased(f.ino)).valid
        await b.setattr(f.ino, mode=0o600)
        return [f"attr:{f.ino}"]
    if case == "commit_manifest":
        assert (await a.getattr_leased(f.ino)).value.size == 0
        await b.commit_manifest(f.ino, {"size": 5, "chunk_size": 4, "chunks": [D1, D2]}, 0)
        return [f"attr:{f.ino}"]
    raise AssertionError(case)


CASES = ["create", "listing", "rename", "unlink", "setattr", "commit_manifest"]


@pytest.mark.parametrize("via", ["session", "rest"])
@pytest.mark.parametrize("case", CASES)
def test_holder_is_told_before_the_change_returns(
    coord: LeasedCoordinator, case: str, via: str
) -> None:
    async def body() -> None:
        events: list[Any] = []
        async with (
            _client(coord.url, events, "A") as a,
            _client(coord.url, events, "B") as b_session,
            CoordinatorClient(coord.url, TOKEN) as rest,
        ):
            d = (await b_session.mkdir(ROOT_INO, f"{case}-{via}")).ino
            events.clear()
            b: Any = b_session if via == "session" else rest
            expected = await _case(case, a, b, d, events)
            events.append(("B", "returned"))
            # A heard of every key it cached and B changed, before B's call returned
            assert events[-1] == ("B", "returned")
            if via == "rest":  # B's session leased the directory it made: it is told too
                events[:-1] = [e for e in events[:-1] if e[0] != "B"]
            told = sorted({k for who, what, *keys in events[:-1] for k in keys[0]})
            assert [e[:2] for e in events[:-1]] == [("A", "invalidated")] * (len(events) - 1)
            assert set(expected) <= set(told), (expected, told)
            # B never hears about its own changes over the session
            assert all(who == "A" for who, *_ in events[:-1])
            # and the next question gets the new answer
            if case == "create":
                assert (await a.lookup_leased(d, "new")).value is not None
            if case == "rename":
                assert (await a.lookup_leased(d, "f")).value is None

    arun(body())


def test_session_answers_like_rest(coord: LeasedCoordinator) -> None:
    async def body() -> None:
        async with _client(coord.url) as s, CoordinatorClient(coord.url, TOKEN) as r:
            d = (await s.mkdir(ROOT_INO, "same")).ino
            attrs, parent, before = await s.create_entry(d, "x")
            assert parent is not None and parent.version == before + 1
            assert await r.lookup(d, "x") == await s.lookup(d, "x")
            assert await r.getattr(attrs.ino) == await s.getattr(attrs.ino)
            assert await r.readdir(d) == await s.readdir(d)
            with pytest.raises(Exists):
                await s.create(d, "x")
            with pytest.raises(NotEmpty):
                await s.rmdir(ROOT_INO, "same")
            link = await s.link(attrs.ino, d, "y")
            assert link.nlink == 2
            sym = await s.symlink(d, "l", "/target")
            assert sym.target == "/target"
            p, v = await s.remove_entry(d, "y", is_dir=False)
            assert p is not None and p.version == v + 1
            await s.unlink(d, "l")
            await s.unlink(d, "x")
            await s.rmdir(ROOT_INO, "same")
            with pytest.raises(NotFound):
                await s.lookup(ROOT_INO, "same")
            assert (await s.statfs())["max_name"] == 255
            await s.sync()
            assert (await s.statfs()) == await r.statfs()

    arun(body())


# --- a frozen holder ---------------------------------------------------------------------
HOLDER = """
import asyncio, sys
from fastcache.coordinator.session_client import SessionClient

async def main():
    async with SessionClient(sys.argv[1], sys.argv[2]) as c:
        leased = await c.lookup_leased(int(sys.argv[3]), "late")
        assert leased.value is None and leased.valid
        print("leased", flush=True)
        await asyncio.sleep(600)

asyncio.run(main())
"""


def test_frozen_holder_delays_a_change_at_most_the_lease_term(coord: LeasedCoordinator) -> None:
    async def body() -> None:
        async with _client(coord.url) as b:
            d = (await b.mkdir(ROOT_INO, "frozen")).ino
            env = {**os.environ, "PYTHONPATH": str(REPO)}
            holder = subprocess.Popen(
                [sys.executable, "-c", HOLDER, coord.url, TOKEN, str(d)],
                stdout=subprocess.PIPE,
                env=env,
            )
            try:
                assert holder.stdout is not None
                line = await asyncio.to_thread(holder.stdout.readline)
                assert line.strip() == b"leased"
                holder.send_signal(signal.SIGSTOP)
                before = (await _stats(coord.url))["sessions"]["push_timeouts"]
                start = time.monotonic()
                await b.create(d, "late")  # waits for the frozen holder's lease to run out
                elapsed = time.monotonic() - start
                assert elapsed < TERM + 5.0
                assert (await _stats(coord.url))["sessions"]["push_timeouts"] == before + 1
                # the holder's lease was dropped: the next change does not wait again
                start = time.monotonic()
                await b.unlink(d, "late")
                assert time.monotonic() - start < TERM
            finally:
                holder.send_signal(signal.SIGCONT)
                holder.kill()
                holder.wait()

    arun(body())


# --- bad frames ----------------------------------------------------------------------------
async def _raw(url: str) -> tuple[aiohttp.ClientSession, aiohttp.ClientWebSocketResponse]:
    http = aiohttp.ClientSession()
    ws = await http.ws_connect(
        url + "/api/session", headers={"Authorization": f"Bearer {TOKEN}"}, max_msg_size=0
    )
    return http, ws


async def _answer(ws: aiohttp.ClientWebSocketResponse) -> dict[str, Any]:
    msg = await ws.receive(timeout=10)
    assert msg.type is aiohttp.WSMsgType.BINARY, msg
    return msgspec.msgpack.decode(msg.data)


async def _closed(ws: aiohttp.ClientWebSocketResponse) -> tuple[int | None, str]:
    msg = await ws.receive(timeout=10)
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED), msg
    return ws.close_code, str(msg.extra or "")


def test_bad_frames(coord: LeasedCoordinator) -> None:
    enc = msgspec.msgpack.encode

    async def body() -> None:
        async with _client(coord.url) as bystander:
            await bystander.lookup_leased(ROOT_INO, "bystander")
            # missing or wrong token: 401 JSON before any upgrade
            async with aiohttp.ClientSession() as http:
                for headers in ({}, {"Authorization": "Bearer nope"}):
                    async with http.get(coord.url + "/api/session", headers=headers) as resp:
                        assert resp.status == 401
                        assert (await resp.json())["kind"] == "Unauthorized"
            with pytest.raises(Unauthorized):
                async with SessionClient(coord.url, "nope", timeout=3):
                    pass

            # malformed requests: error frames, the session lives on
            http, ws = await _raw(coord.url)
            try:
                await ws.send_bytes(
                    enc({"id": 1, "op": "lookup", "args": {"parent": "x", "name": "n"}})
                )
                assert await _answer(ws) == {
                    "id": 1,
                    "error": "args.parent must be an integer",
                    "kind": "BadRequest",
                }
                await ws.send_bytes(enc({"id": 2, "op": "format_disk", "args": {}}))
                doc = await _answer(ws)
                assert (
                    doc["id"] == 2 and doc["kind"] == "BadRequest" and "unknown op" in doc["error"]
                )
                await ws.send_bytes(enc({"op": "statfs", "args": {}}))
                doc = await _answer(ws)
                assert doc["id"] is None and doc["kind"] == "BadRequest"
                await ws.send_bytes(enc([1, 2, 3]))
                assert (await _answer(ws))["id"] is None
                await ws.send_bytes(enc({"id": 3, "op": "lookup", "args": [1]}))
                assert (await _answer(ws))["kind"] == "BadRequest"
                await ws.send_bytes(enc({"id": 4, "op": "getattr", "args": {"ino": 2**64 - 1}}))
                assert (await _answer(ws))["kind"] == "BadRequest"
                await ws.send_bytes(
                    enc({"id": 5, "op": "lookup", "args": {"parent": 1, "name": "zz"}})
                )
                doc = await _answer(ws)
                assert doc["kind"] == "NotFound" and doc["lease"] == TERM
                await ws.send_bytes(enc({"id": 6, "op": "statfs", "args": {}}))
                doc = await _answer(ws)
                assert doc["id"] == 6 and doc["ok"]["max_name"] == 255
            finally:
                await ws.close()
                await http.close()

            # what cannot be parsed closes the session with a code and a reason
            cases: list[tuple[str, Any, int, str]] = [
                ("bytes", b"\xc1\xff\x00garbage", 1007, "not msgpack"),
                ("str", "hello", 1003, "binary"),
                ("bytes", b"\x00" * (2 << 20), 1009, "larger than"),
            ]
            for kind, payload, code, reason in cases:
                http, ws = await _raw(coord.url)
                try:
                    if kind == "bytes":
                        await ws.send_bytes(payload)
                    else:
                        await ws.send_str(payload)
                    got_code, got_reason = await _closed(ws)
                    assert got_code == code and reason in got_reason, (got_code, got_reason)
                finally:
                    await http.close()

            # the coordinator is healthy and the other session still works
            assert (await bystander.lookup_leased(ROOT_INO, "bystander")).value is None
            await bystander.mkdir(ROOT_INO, "after-bad-frames")
            stats = (await _stats(coord.url))["sessions"]
            assert stats["closed_bad"] >= 3 and stats["bad_frames"] >= 3
            assert stats["open"] >= 1 and stats["frames_in"] > stats["bad_frames"]
        assert "Traceback" not in coord.log()

    arun(body())


# --- reconnection ----------------------------------------------------------------------------
def test_reconnects_after_the_coordinator_restarts(tmp_path: Path) -> None:
    coord = LeasedCoordinator(tmp_path / "state", TERM, token=TOKEN)
    coord.start()

    async def body() -> None:
        resets: list[float] = []
        client = SessionClient(coord.url, TOKEN, timeout=20, backoff_max=0.5)
        client.on_reset = lambda: resets.append(time.monotonic())
        async with client:
            d = (await client.mkdir(ROOT_INO, "before")).ino
            assert (await client.lookup_leased(d, "x")).valid
            await asyncio.to_thread(coord.stop)
            await asyncio.sleep(0)  # the reader sees the close
            for _ in range(100):
                if resets:
                    break
                await asyncio.sleep(0.05)
            assert len(resets) == 1 and not client.connected
            with pytest.raises(TierUnavailable):
                client.timeout = 0.3
                await client.getattr(d)
            client.timeout = 20
            pending = asyncio.create_task(client.lookup(ROOT_INO, "before"))
            await asyncio.to_thread(coord.restart)
            assert (await pending).ino == d  # waited for the reconnection
            await client.create(d, "x")
            assert client.connects == 2

    try:
        arun(body())
    finally:
        coord.kill()
