"""A coordinator process on PostgreSQL: the server restarted under load, and the migration
of a SQLite namespace built through a real coordinator."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

from fastcache.coordinator.client import CoordinatorClient
from fastcache.coordinator.model import ROOT_INO
from fastcache.coordinator.store import sqlite_url
from fastcache.errors import Exists, TierUnavailable
from fastcache.pgserver import PostgresServer
from tests.conftest import new_database
from tests.integration.conftest_coordinator import REPO, start_coordinator

D1, D2 = "a" * 32, "b" * 32
MANIFEST = {"size": 10, "chunk_size": 8, "chunks": [D1, D2]}


def test_postgres_restart_under_load(tmp_path: Path, own_pg: PostgresServer) -> None:
    """Creates go on while PostgreSQL restarts: each one is acknowledged or answered 503
    (the coordinator waits a bounded time for the database); every acknowledged create is
    there afterwards and new ones work."""
    proc = start_coordinator(tmp_path / "state", store=own_pg.create_database("ns"))
    acked: list[str] = []
    failed: list[str] = []
    goal: list[tuple[int, asyncio.Event]] = []  # (count of acks, set when reached)

    async def load(stop: asyncio.Event) -> None:
        async with CoordinatorClient(proc.url) as c:
            i = 0
            while not stop.is_set():
                name = f"f{i}"
                i += 1
                try:
                    await c.create(ROOT_INO, name)
                except Exists:  # a create whose answer was lost, retried by the client
                    acked.append(name)
                except TierUnavailable:
                    failed.append(name)
                else:
                    acked.append(name)
                for count, reached in goal:
                    if len(acked) >= count:
                        reached.set()

    async def acks(count: int) -> None:
        reached = asyncio.Event()
        goal.append((count, reached))
        await asyncio.wait_for(reached.wait(), 120)

    async def body() -> list[str]:
        stop = asyncio.Event()
        task = asyncio.create_task(load(stop))
        await acks(20)
        await asyncio.to_thread(own_pg.restart)
        await acks(len(acked) + 20)
        stop.set()
        await task
        async with CoordinatorClient(proc.url) as c:
            await c.create(ROOT_INO, "last")
            return [e.name for e in await c.readdir(ROOT_INO, limit=10_000)]

    try:
        names = asyncio.run(body())
    finally:
        proc.kill()
    assert set(acked) <= set(names)
    assert "last" in names
    assert all(f in names or f not in acked for f in failed)


def _migrate(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastcache", "coordinator", "migrate", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def _everything(url: str) -> dict[str, Any]:
    """Every inode (attributes, manifest, xattrs) and entry, walked from the root."""
    out: dict[str, Any] = {}
    async with CoordinatorClient(url) as c:
        todo = [(ROOT_INO, "")]
        out["/"] = (await c.getattr(ROOT_INO)).to_json()
        while todo:
            ino, path = todo.pop()
            for e in await c.readdir(ino, limit=10_000):
                attrs = await c.getattr(e.attrs.ino)
                xattrs = {n: await c.getxattr(attrs.ino, n) for n in await c.listxattr(attrs.ino)}
                out[f"{path}/{e.name}"] = (e.offset, attrs.to_json(), xattrs)
                if attrs.type == "dir":
                    todo.append((attrs.ino, f"{path}/{e.name}"))
    return out


def test_migrate_sqlite_to_postgres(tmp_path: Path, pg: PostgresServer) -> None:
    source = sqlite_url(tmp_path / "state" / "coordinator.db")
    proc = start_coordinator(tmp_path / "state")

    async def build() -> None:
        async with CoordinatorClient(proc.url) as c:
            d = await c.mkdir(ROOT_INO, "dir", mode=0o700, uid=1000, gid=1000)
            sub = await c.mkdir(d.ino, "sub")
            f = await c.put_file("/dir/sub/file", MANIFEST, mode=0o640)
            await c.link(f.ino, ROOT_INO, "hardlink")
            await c.symlink(d.ino, "sym", "sub/file")
            await c.setxattr(f.ino, "user.tag", b"\x00\xffvalue")
            await c.setxattr(sub.ino, "user.empty", b"")
            await c.create(ROOT_INO, "gone")
            await c.unlink(ROOT_INO, "gone")  # a gap in the inode numbers

    try:
        asyncio.run(build())
        before = asyncio.run(_everything(proc.url))
    finally:
        proc.stop()

    target = new_database(pg)
    done = _migrate("--from", source, "--to", target)
    assert done.returncode == 0, done.stderr
    assert "copied" in done.stdout

    again = _migrate("--from", source, "--to", target)
    assert again.returncode == 2
    assert again.stderr.strip().startswith("fastcache: ") and "not empty" in again.stderr
    assert len(again.stderr.strip().splitlines()) == 1

    proc = start_coordinator(tmp_path / "pg-state", store=target)
    try:
        after = asyncio.run(_everything(proc.url))

        async def new_ones() -> tuple[int, int, int]:
            async with CoordinatorClient(proc.url) as c:
                new = await c.create(ROOT_INO, "new")
                entries = await c.readdir(ROOT_INO, limit=10_000)
                old = max(e.offset for e in entries if e.name != "new")
                return new.ino, entries[-1].offset, old

        new_ino, new_offset, old_offset = asyncio.run(new_ones())
    finally:
        proc.kill()
    assert after == before
    assert after["/hardlink"][1]["nlink"] == 2
    assert after["/hardlink"][2] == {"user.tag": b"\x00\xffvalue"}
    assert new_ino > max(v[1]["ino"] for k, v in before.items() if k != "/")  # past them all
    assert new_ino > 6  # the unlinked inode's number is not reused either
    assert new_offset > old_offset  # entry offsets go on past the copied ones


def test_migrate_refuses_bad_urls(tmp_path: Path) -> None:
    done = _migrate("--from", "mysql://x/y", "--to", "postgresql://u@127.0.0.1:1/db")
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "fastcache: bad store URL 'mysql://x/y': expected sqlite:///path.db or "
        "postgresql://user@host:port/db"
    ]
