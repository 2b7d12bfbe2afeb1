"""The coordinator's durability contract, on a real coordinator process.

- what it acknowledged survives SIGKILL, synced or not (the WAL is in the page cache);
- ``POST /api/sync`` is a token-guarded barrier, and ``/api/stats`` shows that it synced;
- a graceful stop syncs before it exits.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import pytest

from fastcache.coordinator.client import CoordinatorClient
from fastcache.coordinator.model import ROOT_INO
from fastcache.coordinator.session_client import SessionClient
from fastcache.errors import Unauthorized
from tests.integration.conftest_coordinator import REPO, CoordinatorProcess

T = TypeVar("T")
TOKEN = "durable-token"
LONG = "3600"  # a sync interval no test waits for: only barriers and stops sync


def arun(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(coro)


class Coordinator(CoordinatorProcess):
    """``CoordinatorProcess`` with extra command-line flags (here: ``--sync-interval``)."""

    def __init__(self, state_dir: Path, *args: str, token: str | None = None) -> None:
        super().__init__(state_dir, token=token)
        self.args = list(args)

    def start(self) -> Coordinator:
        cmd = [sys.executable, "-m", "fastcache", "coordinator", "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--state-dir", str(self.state_dir), *self.args]
        env = {k: v for k, v in os.environ.items() if k != "FASTCACHE_TOKEN"}
        if self.token is not None:
            env["FASTCACHE_TOKEN"] = self.token
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        self.wait_healthy()
        return self


@pytest.fixture
def lazy(tmp_path: Path) -> Iterator[Coordinator]:
    """A coordinator that never syncs on its own during a test."""
    proc = Coordinator(tmp_path / "state", "--sync-interval", LONG).start()
    try:
        yield proc
    finally:
        proc.kill()


def test_sigkill_loses_nothing_acknowledged(lazy: Coordinator) -> None:
    """Creates, links, renames and removals at concurrency 16, none of them synced, then
    SIGKILL: after a restart on the same state dir every acknowledged change is there."""
    dirs, files = 20, 400

    async def write() -> dict[str, Any]:
        async with CoordinatorClient(lazy.url) as c:
            top = await c.mkdir(ROOT_INO, "top")
            made = await asyncio.gather(*(c.mkdir(top.ino, f"d{i}") for i in range(dirs)))
            sem = asyncio.Semaphore(16)

            async def create(i: int) -> tuple[str, int]:
                async with sem:
                    parent = made[i % dirs]
                    attrs = await c.create(parent.ino, f"f{i}", mode=0o600)
                    return f"d{i % dirs}/f{i}", attrs.ino

            created = dict(await asyncio.gather(*(create(i) for i in range(files))))
            await c.rename(made[0].ino, "f0", made[1].ino, "renamed")
            await c.unlink(made[2].ino, "f2")
            stats = await c.stats()
            return {"top": top.ino, "created": created, "store": stats["store"]}

    before = arun(write())
    store = before["store"]
    assert store["syncs"] == 0 and store["unsynced_commits"] > 0  # nothing was fsynced
    assert store["transactions"] >= before_count(dirs, files)
    lazy.kill()
    assert lazy.proc is not None and lazy.proc.returncode == -9
    lazy.restart()

    expected = dict(before["created"])
    expected["d1/renamed"] = expected.pop("d0/f0")
    del expected["d2/f2"]

    async def read() -> dict[str, int]:
        found: dict[str, int] = {}
        async with CoordinatorClient(lazy.url) as c:
            top = await c.lookup(ROOT_INO, "top")
            assert top.ino == before["top"] and top.nlink == 2 + dirs
            for entry in await c.readdir(top.ino):
                for child in await c.readdir(entry.attrs.ino):
                    assert child.attrs.mode == 0o600 and child.attrs.type == "file"
                    found[f"{entry.name}/{child.name}"] = child.attrs.ino
        return found

    assert arun(read()) == expected


def before_count(dirs: int, files: int) -> int:
    """Write transactions the test above makes: top, the dirs, the files, rename, unlink."""
    return 1 + dirs + files + 2


def test_sync_barrier_needs_the_token_and_syncs(tmp_path: Path) -> None:
    proc = Coordinator(tmp_path / "state", "--sync-interval", LONG, token=TOKEN).start()
    try:

        async def body() -> None:
            async with aiohttp.ClientSession() as s:
                for headers in ({}, {"Authorization": "Bearer wrong"}):
                    async with s.post(proc.url + "/api/sync", headers=headers) as resp:
                        assert resp.status == 401
            async with CoordinatorClient(proc.url) as anonymous:
                with pytest.raises(Unauthorized):
                    await anonymous.sync()
            async with CoordinatorClient(proc.url, token=TOKEN) as c:
                await c.mkdir(ROOT_INO, "d")
                store = (await c.stats())["store"]
                assert (store["syncs"], store["barriers"]) == (0, 0)
                assert store["unsynced_commits"] >= 1
                await c.sync()
                store = (await c.stats())["store"]
                assert (store["syncs"], store["barriers"], store["unsynced_commits"]) == (1, 1, 0)
                # concurrent barriers after one more change: one more fsync at most each
                await c.mkdir(ROOT_INO, "e")
                await asyncio.gather(*(c.sync() for _ in range(8)))
                store = (await c.stats())["store"]
                # joined the one running, or found nothing left to sync: one more fsync
                assert (store["syncs"], store["barriers"], store["unsynced_commits"]) == (2, 9, 0)
                assert store["commits"] <= store["transactions"]
            async with (
                aiohttp.ClientSession(headers={"Authorization": f"Bearer {TOKEN}"}) as s,
                s.get(proc.url + "/api/openapi.json") as resp,
            ):
                doc = await resp.json()
            post = doc["paths"]["/api/sync"]["post"]
            assert "204" in post["responses"] and post.get("security") != []

        arun(body())
    finally:
        proc.kill()


def test_graceful_stop_syncs(lazy: Coordinator) -> None:
    async def write() -> None:
        async with CoordinatorClient(lazy.url) as c:
            await c.mkdir(ROOT_INO, "kept")
            assert (await c.stats())["store"]["unsynced_commits"] >= 1

    arun(write())
    assert lazy.stop() == 0
    assert "Traceback" not in lazy.log()
    assert "synced on stop" in lazy.log()
    lazy.restart()

    async def read() -> None:
        async with CoordinatorClient(lazy.url) as c:
            assert (await c.lookup(ROOT_INO, "kept")).type == "dir"

    arun(read())


def test_sigkill_during_a_create_storm_over_sessions(lazy: Coordinator) -> None:
    """Four node sessions create files and directories at concurrency 32 each; the
    coordinator is SIGKILLed while creates are in flight. After a restart every create that
    was acknowledged is there under its inode, and the namespace holds together: directory
    link counts match their subdirectories, every entry resolves, and no inode is left that
    no entry names (the store's totals equal the tree's)."""
    sessions, per_session, kill_after = 4, 400, 600
    acknowledged: dict[str, tuple[int, str]] = {}

    async def storm() -> int:
        async with CoordinatorClient(lazy.url) as c:
            top = await c.mkdir(ROOT_INO, "storm")
        clients = [await SessionClient(lazy.url, timeout=3.0).start() for _ in range(sessions)]
        enough = asyncio.Event()

        async def one(s: SessionClient, n: int, i: int) -> None:
            kind = "dir" if i % 5 == 0 else "file"
            name = f"s{n}-{i}"
            attrs = await s.create(top.ino, name, kind, 0o700 if kind == "dir" else 0o600)
            acknowledged[name] = (attrs.ino, kind)
            if len(acknowledged) >= kill_after:
                enough.set()

        async def node(s: SessionClient, n: int) -> None:
            sem = asyncio.Semaphore(32)

            async def bounded(i: int) -> None:
                async with sem:
                    await one(s, n, i)

            await asyncio.gather(*(bounded(i) for i in range(per_session)), return_exceptions=True)

        work = asyncio.gather(*(node(s, n) for n, s in enumerate(clients)))
        await enough.wait()
        lazy.kill()  # mid-storm: creates are in flight on every session
        await work
        for s in clients:
            await s.close()
        return top.ino

    top_ino = arun(storm())
    assert lazy.proc is not None and lazy.proc.returncode == -9
    assert kill_after <= len(acknowledged) < sessions * per_session, "killed mid-storm"
    lazy.restart()

    async def check() -> None:
        async with CoordinatorClient(lazy.url) as c:
            top = await c.getattr(top_ino)
            entries = await c.readdir(top_ino, limit=10_000)
            found = {e.name: (e.attrs.ino, e.attrs.type) for e in entries}
            for name, made in acknowledged.items():
                assert found.get(name) == made, f"acknowledged create {name} lost"
            subdirs = sum(1 for _, kind in found.values() if kind == "dir")
            assert top.nlink == 2 + subdirs
            for e in entries:
                attrs = await c.getattr(e.attrs.ino)
                assert attrs.nlink == (2 if attrs.type == "dir" else 1)
                if attrs.type == "dir":
                    assert await c.readdir(attrs.ino) == []
            totals = (await c.stats())["inodes"]
            assert totals.get("file", 0) == len(found) - subdirs
            assert totals.get("dir", 0) == 2 + subdirs  # the root, "storm" and the storm's

    arun(check())
