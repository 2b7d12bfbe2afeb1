"""CoordinatorService over each real store (SQLite in a temp dir, a fresh database on the
session's PostgreSQL server): every namespace and peer rule."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import threading
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from fastcache.coordinator.model import MAX_LOCATION_BATCH, ROOT_INO, InodeAttrs, hole_digest
from fastcache.coordinator.service import CoordinatorService, location_key
from fastcache.coordinator.store import Store, open_store, sqlite_url
from fastcache.coordinator.store.sqlite import _DDL, SQLiteStore
from fastcache.errors import (
    BadRequest,
    Conflict,
    Exists,
    InvalidArgument,
    InvalidName,
    IsADirectory,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotPermitted,
)

T = TypeVar("T")
Run = Callable[[Coroutine[Any, Any, T]], T]
D1, D2, D3 = "0" * 32, "1" * 32, "2" * 32


class Clock:
    """A settable wall clock: peer timeouts are tested without waiting."""

    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture
def run(loop: asyncio.AbstractEventLoop) -> Run[Any]:
    return loop.run_until_complete


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def _open(store_url: str, clock: Clock) -> CoordinatorService:
    store = await open_store(store_url, synchronous="NORMAL")
    return CoordinatorService(store, peer_timeout=10.0, clock=clock)


@pytest.fixture
def svc(store_url: str, run: Run[Any], clock: Clock) -> Iterator[CoordinatorService]:
    service = run(_open(store_url, clock))
    yield service
    run(service.close())


@pytest.fixture
def sqlite_svc(tmp_path: Path, run: Run[Any], clock: Clock) -> Iterator[CoordinatorService]:
    """For what only SQLite shows (its change counter, its own transaction control)."""
    service = run(_open(sqlite_url(tmp_path / "coordinator.db"), clock))
    yield service
    run(service.close())


def manifest(size: int, chunk_size: int = 4, chunks: list[str] | None = None) -> dict[str, Any]:
    count = -(-size // chunk_size)
    return {"size": size, "chunk_size": chunk_size, "chunks": chunks or [D1] * count}


# --- inodes and entries ------------------------------------------------------------------
def test_root_exists(svc: CoordinatorService, run: Run[Any]) -> None:
    root = run(svc.getattr(ROOT_INO))
    assert (root.type, root.mode, root.uid, root.gid, root.nlink) == ("dir", 0o755, 0, 0, 2)


def test_create_lookup_and_exists(svc: CoordinatorService, run: Run[Any]) -> None:
    f = run(svc.create(ROOT_INO, "f", "file", 0o640, 1000, 100))
    assert (f.type, f.mode, f.uid, f.gid, f.nlink, f.size, f.version) == (
        "file",
        0o640,
        1000,
        100,
        1,
        0,
        0,
    )
    assert run(svc.lookup(ROOT_INO, "f")) == f
    with pytest.raises(Exists):
        run(svc.create(ROOT_INO, "f"))
    with pytest.raises(NotFound):
        run(svc.lookup(ROOT_INO, "nope"))
    with pytest.raises(NotADirectory):
        run(svc.create(f.ino, "child"))
    with pytest.raises(NotFound):
        run(svc.create(999, "child"))
    with pytest.raises(InvalidName):
        run(svc.create(ROOT_INO, ".."))
    with pytest.raises(InvalidArgument):
        run(svc.create(ROOT_INO, "m", mode=0o10000))
    with pytest.raises(InvalidArgument):
        run(svc.create(ROOT_INO, "t", "weird"))


def test_create_special_types(svc: CoordinatorService, run: Run[Any]) -> None:
    link = run(svc.create(ROOT_INO, "l", "symlink", 0o777, target="a/b"))
    assert (link.type, link.target, link.size) == ("symlink", "a/b", 3)
    dev = run(svc.create(ROOT_INO, "dev", "chr", 0o600, rdev=0x0501))
    assert run(svc.getattr(dev.ino)).rdev == 0x0501
    for kind in ("fifo", "socket", "blk"):
        assert run(svc.create(ROOT_INO, kind, kind)).type == kind
    with pytest.raises(InvalidArgument):
        run(svc.create(ROOT_INO, "l2", "symlink"))
    with pytest.raises(InvalidArgument):
        run(svc.create(ROOT_INO, "f", "file", target="x"))


def test_dir_nlink_counts_subdirs(svc: CoordinatorService, run: Run[Any]) -> None:
    a = run(svc.mkdir(ROOT_INO, "a"))
    assert (a.nlink, run(svc.getattr(ROOT_INO)).nlink) == (2, 3)
    run(svc.mkdir(a.ino, "b"))
    run(svc.mkdir(a.ino, "c"))
    run(svc.create(a.ino, "file"))
    assert run(svc.getattr(a.ino)).nlink == 4  # 2 + two subdirs; files do not count
    run(svc.rmdir(a.ino, "b"))
    assert run(svc.getattr(a.ino)).nlink == 3
    run(svc.rename(a.ino, "c", ROOT_INO, "c"))
    assert run(svc.getattr(a.ino)).nlink == 2
    assert run(svc.getattr(ROOT_INO)).nlink == 4


def test_hard_links_and_unlink(svc: CoordinatorService, run: Run[Any]) -> None:
    d = run(svc.mkdir(ROOT_INO, "d"))
    f = run(svc.create(ROOT_INO, "f"))
    linked = run(svc.link(f.ino, d.ino, "g"))
    assert linked.nlink == 2 and linked.ctime_ns >= f.ctime_ns
    assert run(svc.lookup(d.ino, "g")).ino == f.ino
    with pytest.raises(NotPermitted):
        run(svc.link(d.ino, ROOT_INO, "dirlink"))
    with pytest.raises(Exists):
        run(svc.link(f.ino, d.ino, "g"))
    run(svc.unlink(ROOT_INO, "f"))
    assert run(svc.getattr(f.ino)).nlink == 1
    run(svc.unlink(d.ino, "g"))
    with pytest.raises(NotFound):
        run(svc.getattr(f.ino))  # nlink 0: the inode is gone
    with pytest.raises(NotFound):
        run(svc.unlink(d.ino, "g"))
    with pytest.raises(IsADirectory):
        run(svc.unlink(ROOT_INO, "d"))


def test_rmdir_rules(svc: CoordinatorService, run: Run[Any]) -> None:
    d = run(svc.mkdir(ROOT_INO, "d"))
    run(svc.create(d.ino, "f"))
    run(svc.create(ROOT_INO, "file"))
    with pytest.raises(NotEmpty):
        run(svc.rmdir(ROOT_INO, "d"))
    with pytest.raises(NotADirectory):
        run(svc.rmdir(ROOT_INO, "file"))
    with pytest.raises(NotFound):
        run(svc.rmdir(ROOT_INO, "missing"))
    run(svc.unlink(d.ino, "f"))
    run(svc.rmdir(ROOT_INO, "d"))
    with pytest.raises(NotFound):
        run(svc.getattr(d.ino))
    assert run(svc.getattr(ROOT_INO)).nlink == 2


def test_parent_times_follow_entries(svc: CoordinatorService, run: Run[Any]) -> None:
    before = run(svc.getattr(ROOT_INO))
    run(svc.create(ROOT_INO, "f"))
    after = run(svc.getattr(ROOT_INO))
    assert after.mtime_ns > before.mtime_ns and after.ctime_ns > before.ctime_ns


# --- rename ------------------------------------------------------------------------------
def test_rename_file_replaces_target(svc: CoordinatorService, run: Run[Any]) -> None:
    a = run(svc.create(ROOT_INO, "a"))
    b = run(svc.create(ROOT_INO, "b"))
    run(svc.rename(ROOT_INO, "a", ROOT_INO, "b"))
    assert run(svc.lookup(ROOT_INO, "b")).ino == a.ino
    with pytest.raises(NotFound):
        run(svc.lookup(ROOT_INO, "a"))
    with pytest.raises(NotFound):
        run(svc.getattr(b.ino))  # its only link was replaced


def test_rename_replaced_target_with_other_links_survives(
    svc: CoordinatorService, run: Run[Any]
) -> None:
    run(svc.create(ROOT_INO, "a"))
    b = run(svc.create(ROOT_INO, "b"))
    run(svc.link(b.ino, ROOT_INO, "b2"))
    run(svc.rename(ROOT_INO, "a", ROOT_INO, "b"))
    assert run(svc.getattr(b.ino)).nlink == 1


def test_rename_dir_rules(svc: CoordinatorService, run: Run[Any]) -> None:
    src = run(svc.mkdir(ROOT_INO, "src"))
    run(svc.create(src.ino, "inside"))
    empty = run(svc.mkdir(ROOT_INO, "empty"))
    full = run(svc.mkdir(ROOT_INO, "full"))
    run(svc.create(full.ino, "x"))
    run(svc.create(ROOT_INO, "file"))
    root_nlink = run(svc.getattr(ROOT_INO)).nlink  # 2 + src, empty, full
    assert root_nlink == 5
    with pytest.raises(NotADirectory):
        run(svc.rename(ROOT_INO, "src", ROOT_INO, "file"))
    with pytest.raises(IsADirectory):
        run(svc.rename(ROOT_INO, "file", ROOT_INO, "empty"))
    with pytest.raises(NotEmpty):
        run(svc.rename(ROOT_INO, "src", ROOT_INO, "full"))
    run(svc.rename(ROOT_INO, "src", ROOT_INO, "empty"))  # replaces the empty dir
    assert run(svc.lookup(ROOT_INO, "empty")).ino == src.ino
    assert run(svc.lookup(src.ino, "inside")).type == "file"
    with pytest.raises(NotFound):
        run(svc.getattr(empty.ino))
    assert run(svc.getattr(ROOT_INO)).nlink == root_nlink - 1


def test_rename_into_own_subtree(svc: CoordinatorService, run: Run[Any]) -> None:
    a = run(svc.mkdir(ROOT_INO, "a"))
    b = run(svc.mkdir(a.ino, "b"))
    c = run(svc.mkdir(b.ino, "c"))
    with pytest.raises(InvalidArgument):
        run(svc.rename(ROOT_INO, "a", c.ino, "a"))
    with pytest.raises(InvalidArgument):
        run(svc.rename(ROOT_INO, "a", a.ino, "self"))
    run(svc.rename(b.ino, "c", ROOT_INO, "c"))  # moving up is fine
    assert run(svc.lookup(ROOT_INO, "c")).ino == c.ino


def test_rename_flags(svc: CoordinatorService, run: Run[Any]) -> None:
    d = run(svc.mkdir(ROOT_INO, "d"))
    f = run(svc.create(ROOT_INO, "f"))
    g = run(svc.create(d.ino, "g"))
    with pytest.raises(Exists):
        run(svc.rename(ROOT_INO, "f", d.ino, "g", noreplace=True))
    with pytest.raises(InvalidArgument):
        run(svc.rename(ROOT_INO, "f", d.ino, "g", noreplace=True, exchange=True))
    with pytest.raises(NotFound):
        run(svc.rename(ROOT_INO, "f", d.ino, "missing", exchange=True))
    run(svc.rename(ROOT_INO, "f", d.ino, "g", exchange=True))
    assert run(svc.lookup(ROOT_INO, "f")).ino == g.ino
    assert run(svc.lookup(d.ino, "g")).ino == f.ino
    # exchanging a dir with a file across parents moves the subdir count
    sub = run(svc.mkdir(d.ino, "sub"))
    assert run(svc.getattr(d.ino)).nlink == 3
    run(svc.rename(d.ino, "sub", ROOT_INO, "f", exchange=True))
    assert run(svc.lookup(ROOT_INO, "f")).ino == sub.ino
    assert run(svc.getattr(d.ino)).nlink == 2
    assert run(svc.getattr(ROOT_INO)).nlink == 4  # d and sub


def test_rename_noops(svc: CoordinatorService, run: Run[Any]) -> None:
    f = run(svc.create(ROOT_INO, "f"))
    run(svc.link(f.ino, ROOT_INO, "f2"))
    run(svc.rename(ROOT_INO, "f", ROOT_INO, "f"))
    run(svc.rename(ROOT_INO, "f", ROOT_INO, "f2"))  # same inode: POSIX does nothing
    assert run(svc.lookup(ROOT_INO, "f")).ino == f.ino
    assert run(svc.lookup(ROOT_INO, "f2")).nlink == 2
    with pytest.raises(NotFound):
        run(svc.rename(ROOT_INO, "missing", ROOT_INO, "x"))


def test_rename_dir_is_constant_work(sqlite_svc: CoordinatorService, run: Run[Any]) -> None:
    """Moving a directory touches a fixed handful of rows, however big its subtree."""
    svc = sqlite_svc
    top = run(svc.mkdir(ROOT_INO, "top"))
    dest = run(svc.mkdir(ROOT_INO, "dest"))

    async def fill() -> None:
        for i in range(20):
            sub = await svc.mkdir(top.ino, f"d{i}")
            for j in range(25):
                await svc.create(sub.ino, f"f{j}")

    run(fill())
    store = svc.store
    assert isinstance(store, SQLiteStore)
    before = run(store.total_changes())
    run(svc.rename(ROOT_INO, "top", dest.ino, "moved"))
    touched = run(store.total_changes()) - before
    assert touched <= 4  # the entry, the moved inode, the two parents
    assert run(svc.lookup(dest.ino, "moved")).ino == top.ino
    assert len(run(svc.readdir(run(svc.lookup(top.ino, "d7")).ino))) == 25


# --- attributes and manifests ------------------------------------------------------------
def test_setattr(svc: CoordinatorService, run: Run[Any]) -> None:
    f = run(svc.create(ROOT_INO, "f"))
    chmod = run(svc.setattr(f.ino, mode=0o600, uid=5, gid=6))
    assert (chmod.mode, chmod.uid, chmod.gid) == (0o600, 5, 6)
    assert chmod.ctime_ns > f.ctime_ns and chmod.mtime_ns == f.mtime_ns
    grown = run(svc.setattr(f.ino, size=100))
    assert grown.size == 100 and grown.mtime_ns > chmod.mtime_ns
    assert grown.version == f.version  # size alone does not touch the manifest
    times = run(svc.setattr(f.ino, atime_ns=1, mtime_ns=2))
    assert (times.atime_ns, times.mtime_ns) == (1, 2) and times.ctime_ns > grown.ctime_ns
    with pytest.raises(IsADirectory):
        run(svc.setattr(ROOT_INO, size=0))
    with pytest.raises(InvalidArgument):
        run(svc.setattr(f.ino, mode=0o17777))
    with pytest.raises(NotFound):
        run(svc.setattr(12345, mode=0o600))


def test_commit_manifest_versions(svc: CoordinatorService, run: Run[Any]) -> None:
    f = run(svc.create(ROOT_INO, "f"))
    v1 = run(svc.commit_manifest(f.ino, manifest(10), 0))
    assert (v1.version, v1.size, v1.manifest) == (1, 10, manifest(10))
    assert v1.mtime_ns > f.mtime_ns
    with pytest.raises(Conflict):
        run(svc.commit_manifest(f.ino, manifest(3), 0))
    assert run(svc.getattr(f.ino)).size == 10  # the stale write changed nothing
    cdc = {"size": 7, "chunk_size": 4, "chunks": [D1, D2], "lengths": [3, 4]}
    assert run(svc.commit_manifest(f.ino, cdc, 1)).manifest == cdc
    with pytest.raises(IsADirectory):
        run(svc.commit_manifest(ROOT_INO, manifest(0), 0))


def test_concurrent_commits_one_wins(svc: CoordinatorService, run: Run[Any]) -> None:
    f = run(svc.create(ROOT_INO, "f"))

    async def race() -> list[Any]:
        return await asyncio.gather(
            *(svc.commit_manifest(f.ino, manifest(i + 1), 0) for i in range(8)),
            return_exceptions=True,
        )

    results = run(race())
    assert sum(isinstance(r, InodeAttrs) for r in results) == 1
    assert sum(isinstance(r, Conflict) for r in results) == 7


def test_bad_manifests_change_nothing(svc: CoordinatorService, run: Run[Any]) -> None:
    """Both writes run ``validate_manifest`` first (its cases: test_coordinator_model.py)."""
    f = run(svc.create(ROOT_INO, "f"))
    bad = {"size": 4, "chunk_size": 4, "chunks": [D1, D2]}
    with pytest.raises(BadRequest, match="manifest has 2 chunks"):
        run(svc.commit_manifest(f.ino, bad, 0))
    with pytest.raises(BadRequest, match="manifest has 2 chunks"):
        run(svc.put_file("/g", bad))
    assert run(svc.getattr(f.ino)) == f
    with pytest.raises(NotFound):
        run(svc.resolve("/g"))


# --- readdir -----------------------------------------------------------------------------
def test_readdir_offsets_stable_under_changes(svc: CoordinatorService, run: Run[Any]) -> None:
    for i in range(10):
        run(svc.create(ROOT_INO, f"n{i}"))
    first = run(svc.readdir(ROOT_INO, 0, 4))
    assert [e.name for e in first] == ["n0", "n1", "n2", "n3"]
    assert first[0].attrs.manifest is None
    run(svc.unlink(ROOT_INO, "n1"))  # already listed
    run(svc.unlink(ROOT_INO, "n6"))  # not listed yet
    run(svc.create(ROOT_INO, "new"))
    run(svc.rename(ROOT_INO, "n8", ROOT_INO, "n8b"))  # renamed in place keeps its cookie
    rest: list[str] = []
    offset = first[-1].offset
    while batch := run(svc.readdir(ROOT_INO, offset, 2)):
        rest += [e.name for e in batch]
        offset = batch[-1].offset
    assert rest == ["n4", "n5", "n7", "n8b", "n9", "new"]
    with pytest.raises(NotADirectory):
        run(svc.readdir(run(svc.lookup(ROOT_INO, "n0")).ino))


# --- paths -------------------------------------------------------------------------------
def test_path_helpers(svc: CoordinatorService, run: Run[Any]) -> None:
    a = run(svc.put_file("/x/y/z.txt", manifest(5), mode=0o600, uid=7, gid=8))
    assert (a.version, a.size, a.mode, a.uid) == (1, 5, 0o600, 7)
    assert run(svc.resolve("/x/y/z.txt")).ino == a.ino
    assert run(svc.resolve("x/y/")).type == "dir"
    assert run(svc.resolve("/")).ino == ROOT_INO
    b = run(svc.put_file("/x/y/z.txt", manifest(9), expected_version=1))
    assert (b.ino, b.version, b.size) == (a.ino, 2, 9)
    with pytest.raises(Conflict):
        run(svc.put_file("/x/y/z.txt", manifest(1), expected_version=1))
    with pytest.raises(Conflict):
        run(svc.put_file("/x/new", manifest(1), expected_version=3))
    with pytest.raises(NotFound):
        run(svc.put_file("/nodir/f", manifest(1), make_parents=False))
    with pytest.raises(NotADirectory):
        run(svc.put_file("/x/y/z.txt/under", manifest(1)))
    with pytest.raises(IsADirectory):
        run(svc.put_file("/x", manifest(1)))
    with pytest.raises(InvalidName):
        run(svc.resolve("/x/../etc"))
    with pytest.raises(NotEmpty):
        run(svc.delete_path("/x/y"))
    run(svc.delete_path("/x/y/z.txt"))
    run(svc.delete_path("/x/y"))
    with pytest.raises(NotFound):
        run(svc.resolve("/x/y"))
    with pytest.raises(InvalidArgument):
        run(svc.delete_path("/"))


# --- peers and locations -----------------------------------------------------------------
def test_peers_and_timeout(svc: CoordinatorService, run: Run[Any], clock: Clock) -> None:
    p = run(svc.register_peer("n1", "http://127.0.0.1:9001", 100, 5))
    assert (p.status, p.used, p.last_seen) == ("active", 5, clock.now)
    run(svc.register_peer("n2", "http://127.0.0.1:9002", 100))
    run(svc.add_location(location_key(chunk=D1), "n1"))
    run(svc.add_location(location_key(chunk=D1), "n2"))
    run(svc.add_location(location_key(path="/a/b/"), "n1"))
    assert [x.peer_id for x in run(svc.locations(f"chunk:{D1}"))] == ["n1", "n2"]
    assert [x.peer_id for x in run(svc.locations("/a/b"))] == ["n1"]

    clock.now += 6
    assert run(svc.heartbeat("n2", used=50, status="draining")).used == 50
    clock.now += 6  # n1 silent for 12 s > 10 s, n2 for 6 s
    assert [x.peer_id for x in run(svc.list_peers())] == ["n2"]
    assert [x.peer_id for x in run(svc.locations(f"chunk:{D1}"))] == ["n2"]
    with pytest.raises(NotFound):
        run(svc.heartbeat("n1"))  # timed out: it must register again
    assert run(svc.cleanup_peers()) == ["n1"]
    assert run(svc.stats())["locations"] == 1
    with pytest.raises(NotFound):
        run(svc.add_location("/a", "n1"))
    run(svc.deregister_peer("n2"))
    with pytest.raises(NotFound):
        run(svc.deregister_peer("n2"))
    assert run(svc.stats())["peers"] == {"total": 0, "live": 0}
    assert run(svc.stats())["locations"] == 0


def test_batch_locations_one_transaction(svc: CoordinatorService, run: Run[Any]) -> None:
    run(svc.register_peer("n1", "http://127.0.0.1:9001", 100))
    keys = [location_key(chunk=f"{i:032x}") for i in range(MAX_LOCATION_BATCH)]
    run(svc.add_locations([*keys, keys[0]], "n1"))  # duplicates are fine
    assert run(svc.stats())["locations"] == MAX_LOCATION_BATCH
    assert [p.peer_id for p in run(svc.locations(keys[-1]))] == ["n1"]
    run(svc.remove_locations(keys[1:], "n1"))
    assert run(svc.stats())["locations"] == 1
    with pytest.raises(NotFound):  # an unknown peer records nothing
        run(svc.add_locations(keys, "ghost"))
    with pytest.raises(BadRequest):
        run(svc.add_locations([*keys, f"chunk:{'f' * 32}"], "n1"))
    assert run(svc.stats())["locations"] == 1


def test_reregister_after_timeout_drops_stale_locations(
    svc: CoordinatorService, run: Run[Any], clock: Clock
) -> None:
    run(svc.register_peer("n1", "http://h:1", 1))
    run(svc.add_location("/f", "n1"))
    run(svc.register_peer("n1", "http://h:2", 1))  # live re-register keeps them
    assert len(run(svc.locations("/f"))) == 1
    clock.now += 11
    run(svc.register_peer("n1", "http://h:2", 1))
    assert run(svc.locations("/f")) == []


@pytest.mark.parametrize(
    "args",
    [
        ("", "http://h:1", 1),
        ("bad id", "http://h:1", 1),
        ("n", "ftp://h", 1),
        ("n", "http://h:1", -1),
    ],
)
def test_register_validates(svc: CoordinatorService, run: Run[Any], args: tuple[Any, ...]) -> None:
    with pytest.raises((BadRequest, InvalidArgument)):
        run(svc.register_peer(*args))


def test_location_key() -> None:
    assert location_key(path="a//b".replace("//", "/")) == "/a/b"
    assert location_key(chunk=D3) == f"chunk:{D3}"
    for kwargs in ({}, {"path": "/a", "chunk": D1}, {"chunk": "xyz"}):
        with pytest.raises(BadRequest):
            location_key(**kwargs)
    with pytest.raises(InvalidName):
        location_key(path="/../x")


# --- durability --------------------------------------------------------------------------
def test_restart_keeps_everything(store_url: str, run: Run[Any], clock: Clock) -> None:
    svc = run(_open(store_url, clock))
    d = run(svc.mkdir(ROOT_INO, "d"))
    f = run(svc.put_file("/d/f", manifest(6)))
    run(svc.link(f.ino, ROOT_INO, "hard"))
    run(svc.register_peer("n1", "http://h:1", 10))
    run(svc.add_location(f"chunk:{D1}", "n1"))
    before = run(svc.stats())
    run(svc.close())

    svc = run(_open(store_url, clock))
    try:
        after = run(svc.stats())
        assert after.pop("store")["commits"] == 0  # the store's counters start again
        before.pop("store")
        assert after == before
        assert run(svc.resolve("/d/f")) == run(svc.getattr(f.ino))
        assert run(svc.getattr(f.ino)).nlink == 2
        assert run(svc.getattr(f.ino)).manifest == manifest(6)
        assert run(svc.getattr(ROOT_INO)).nlink == 3
        assert [p.peer_id for p in run(svc.locations(f"chunk:{D1}"))] == ["n1"]
        run(svc.unlink(d.ino, "f"))
        run(svc.unlink(ROOT_INO, "hard"))
        new = run(svc.create(ROOT_INO, "again"))
        assert new.ino > f.ino  # inode numbers are never reused
    finally:
        run(svc.close())


def test_grace_after_restart(store_url: str, run: Run[Any], clock: Clock) -> None:
    svc = run(_open(store_url, clock))
    run(svc.register_peer("n1", "http://h:1", 10))
    run(svc.close())
    clock.now += 100  # the coordinator was down far longer than the timeout
    svc = run(_open(store_url, clock))
    try:
        run(svc.grant_grace())
        assert [p.peer_id for p in run(svc.list_peers())] == ["n1"]
        assert run(svc.heartbeat("n1")).peer_id == "n1"
    finally:
        run(svc.close())


def test_concurrent_creates_of_one_name(svc: CoordinatorService, run: Run[Any]) -> None:
    async def race() -> list[Any]:
        return await asyncio.gather(
            *(svc.create(ROOT_INO, "same") for _ in range(10)), return_exceptions=True
        )

    results = run(race())
    assert sum(isinstance(r, InodeAttrs) for r in results) == 1
    assert all(isinstance(r, Exists) for r in results if not isinstance(r, InodeAttrs))
    assert run(svc.statfs())["inodes"] == 2


# --- what the node-side metadata cache relies on ------------------------------------------
def test_every_entry_change_bumps_the_directory_version(
    svc: CoordinatorService, run: Run[Any]
) -> None:
    d = run(svc.mkdir(ROOT_INO, "v"))
    e = run(svc.mkdir(ROOT_INO, "w"))
    f, after, before = run(svc.create_entry(d.ino, "f", "file"))
    assert (before, after.version, after.ino) == (0, 1, d.ino)
    assert after == run(svc.getattr(d.ino))
    run(svc.link(f.ino, d.ino, "g"))
    run(svc.rename(d.ino, "g", e.ino, "g"))
    assert (run(svc.getattr(d.ino)).version, run(svc.getattr(e.ino)).version) == (3, 1)
    assert run(svc.unlink(e.ino, "g")).version == 2
    run(svc.mkdir(d.ino, "sub"))
    parent = run(svc.rmdir(d.ino, "sub"))
    assert (parent.version, parent.nlink) == (5, 2)
    assert run(svc.getattr(f.ino)).version == 0  # a file's version is its content's


def test_commit_records_the_holders_chunks_in_its_transaction(
    svc: CoordinatorService, run: Run[Any], clock: Clock
) -> None:
    run(svc.register_peer("n1", "http://127.0.0.1:9001", 100))
    f = run(svc.create(ROOT_INO, "held", "file"))
    attrs = run(svc.commit_manifest(f.ino, manifest(4, chunks=[D1]), 0, holder="n1", held=[D1]))
    assert attrs.version == 1
    assert [p.peer_id for p in run(svc.locations(location_key(chunk=D1)))] == ["n1"]
    with pytest.raises(Conflict):  # a refused commit records nothing either
        run(svc.commit_manifest(f.ino, manifest(4, chunks=[D2]), 0, holder="n1", held=[D2]))
    assert run(svc.locations(location_key(chunk=D2))) == []
    # an unknown holder (or one that timed out) is best effort: the commit still happens
    run(svc.commit_manifest(f.ino, manifest(4, chunks=[D2]), 1, holder="ghost", held=[D2]))
    assert run(svc.getattr(f.ino)).version == 2
    assert run(svc.locations(location_key(chunk=D2))) == []
    with pytest.raises(BadRequest):
        run(svc.commit_manifest(f.ino, manifest(4, chunks=[D2]), 2, held=[D2]))


# --- allocated blocks ------------------------------------------------------------------------
def test_commits_count_data_blocks_not_holes(svc: CoordinatorService, run: Run[Any]) -> None:
    f = run(svc.create(ROOT_INO, "sparse", "file", 0o644, 0, 0))
    cs = 65536
    doc = {"size": 2 * cs + 10, "chunk_size": cs, "chunks": [hole_digest(cs), D1, D2]}
    attrs = run(svc.commit_manifest(f.ino, doc, f.version))
    assert attrs.blocks == (cs + 4096) // 512  # one whole chunk, the 10-byte tail as 4 KiB
    listed = {e.name: e.attrs for e in run(svc.readdir(ROOT_INO))}
    assert listed["sparse"].blocks == attrs.blocks and listed["sparse"].manifest is None
    cut = run(svc.setattr(f.ino, size=100))
    assert cut.blocks == 8  # what is left of the data after a truncate


def test_a_version_1_store_gets_blocks_computed_on_open(tmp_path: Path, run: Run[Any]) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    conn.executescript(_DDL.replace("    blocks INTEGER NOT NULL DEFAULT 0,\n", ""))
    manifest = {"size": 5000, "chunk_size": 65536, "chunks": [D1]}
    conn.execute(
        "INSERT INTO inodes (ino, type, mode, uid, gid, size, atime_ns, mtime_ns, ctime_ns,"
        " nlink, version, manifest) VALUES (7, 'file', 420, 0, 0, 5000, 0, 0, 0, 1, 1, ?)",
        (json.dumps(manifest),),
    )
    conn.commit()
    conn.close()

    async def reopen() -> int:
        store = await SQLiteStore.open(path)
        try:
            attrs = await store.transact(lambda tx: tx.get_inode(7), readonly=True)
            assert attrs is not None
            return attrs.blocks
        finally:
            await store.close()

    assert run(reopen()) == 16  # 5000 bytes: two 4 KiB blocks


# --- group commit and the sync barrier ---------------------------------------------------
class Saboteur(Exception):
    pass


async def _queued_behind_a_blocker(
    store: Store, calls: list[Coroutine[Any, Any, Any]]
) -> list[Any]:
    """Hold the store's thread in one transaction while ``calls`` queue up behind it, then
    let it go: the thread finds them all queued at once. Their results or exceptions."""
    started, release = threading.Event(), threading.Event()

    def blocker(tx: Any) -> None:
        started.set()
        assert release.wait(30), "never released"

    blocked = asyncio.ensure_future(store.transact(blocker))
    assert await asyncio.to_thread(started.wait, 30)
    tasks = [asyncio.ensure_future(call) for call in calls]
    # Tasks take their first step (which queues their transaction) in creation order, and
    # this callback was scheduled after all of them: every call is queued when it runs.
    asyncio.get_running_loop().call_soon(release.set)
    await blocked
    return await asyncio.gather(*tasks, return_exceptions=True)


def test_concurrent_transactions_share_one_commit(svc: CoordinatorService, run: Run[Any]) -> None:
    store = svc.store
    d = run(svc.mkdir(ROOT_INO, "group"))
    before = store.counters()

    def call(i: int) -> Coroutine[Any, Any, Any]:
        if i == 7:
            return svc.create(987654, "x")  # NotFound: rolls back alone
        if i == 9:
            return svc.create(d.ino, "f3")  # Exists: sees f3, made earlier in the same group
        if i == 20:  # writes (a directory), then fails: the directory goes with it
            return svc.put_file("/group-new/f", manifest(1), expected_version=5)
        if i == 30:
            return svc.getattr(d.ino)  # a read among the writes
        return svc.create(d.ino, f"f{i}")

    calls = [call(i) for i in range(40)]
    results = run(_queued_behind_a_blocker(store, calls))

    assert isinstance(results[7], NotFound)
    assert isinstance(results[9], Exists)
    assert isinstance(results[20], Conflict)
    assert results[30].ino == d.ino
    failed = {7, 9, 20, 30}
    made = {i: r for i, r in enumerate(results) if i not in failed}
    assert all(isinstance(r, InodeAttrs) and r.type == "file" for r in made.values())
    assert len({r.ino for r in made.values()}) == len(made)  # each its own inode
    listed = {e.name: e.attrs.ino for e in run(svc.readdir(d.ino))}
    assert listed == {f"f{i}": r.ino for i, r in made.items()}
    assert run(svc.getattr(d.ino)).version == len(made)  # every create bumped it once
    with pytest.raises(NotFound):
        run(svc.resolve("/group-new"))

    after = store.counters()
    calls_made = len(calls) + 1  # and the blocker
    commits = after["commits"] - before["commits"]
    assert commits < calls_made
    assert commits == 2  # the blocker alone, then the 36 successful writes together
    assert after["transactions"] - before["transactions"] == len(made) + 1
    assert after["grouped"] - before["grouped"] == len(made)
    assert after["rolled_back"] - before["rolled_back"] == 3
    assert after["max_group"] == len(made)


def test_a_group_aborted_as_a_whole_runs_the_rest_alone(
    sqlite_svc: CoordinatorService, run: Run[Any]
) -> None:
    """If SQLite throws the whole transaction away (here: a function rolls it back), the
    functions that had succeeded are not reported done: they run again, alone."""
    svc = sqlite_svc
    store = svc.store
    assert isinstance(store, SQLiteStore)

    def sabotage(tx: Any) -> None:
        tx._c.execute("ROLLBACK")  # what SQLite does itself on a full disk or an I/O error
        raise Saboteur

    calls = [svc.mkdir(ROOT_INO, "a1"), store.transact(sabotage), svc.mkdir(ROOT_INO, "a2")]
    a1, sabotaged, a2 = run(_queued_behind_a_blocker(store, calls))
    assert isinstance(sabotaged, Saboteur)
    assert run(svc.lookup(ROOT_INO, "a1")).ino == a1.ino
    assert run(svc.lookup(ROOT_INO, "a2")).ino == a2.ino
    assert run(svc.getattr(ROOT_INO)).nlink == 4


def test_sync_barriers_share_one_fsync(tmp_path: Path, run: Run[Any]) -> None:
    async def body() -> None:
        store = await SQLiteStore.open(tmp_path / "c.db", sync_interval=3600)  # no timer
        svc = CoordinatorService(store)
        try:
            await svc.sync()  # nothing committed yet: nothing to do
            assert store.counters()["syncs"] == 0
            await svc.mkdir(ROOT_INO, "d")
            assert store.counters()["unsynced_commits"] == 1
            await asyncio.gather(*(svc.sync() for _ in range(10)))
            counters = store.counters()
            assert (counters["syncs"], counters["barriers"], counters["unsynced_commits"]) == (
                1,
                11,
                0,
            )
            await svc.sync()  # nothing new since: no fsync
            assert store.counters()["syncs"] == 1
            await svc.mkdir(ROOT_INO, "e")
        finally:
            await svc.close()
        assert store.counters()["unsynced_commits"] == 0  # close synced
        assert store.counters()["syncs"] == 2
        with pytest.raises(RuntimeError):
            await store.transact(lambda tx: tx.get_inode(ROOT_INO), readonly=True)

    run(body())


def test_a_commit_is_synced_within_the_interval(tmp_path: Path, run: Run[Any]) -> None:
    async def body() -> None:
        store = await SQLiteStore.open(tmp_path / "c.db", sync_interval=0)
        svc = CoordinatorService(store)
        loop = asyncio.get_running_loop()
        synced = loop.create_future()
        real = store._sync_wal

        def watched() -> None:  # the fsync, on the syncer thread: tell the test
            real()
            loop.call_soon_threadsafe(lambda: synced.done() or synced.set_result(None))

        store._sync_wal = watched  # type: ignore[method-assign]
        try:
            await svc.mkdir(ROOT_INO, "d")
            await asyncio.wait_for(synced, 30)  # no barrier asked for: the timer did it
            assert store.counters()["barriers"] == 0
            await svc.sync()  # joins that fsync, or finds it done: no second one
            assert (store.counters()["syncs"], store.counters()["unsynced_commits"]) == (1, 0)
        finally:
            await svc.close()

    run(body())


def test_cancelled_transaction_that_has_not_run_is_skipped(
    svc: CoordinatorService, run: Run[Any]
) -> None:
    store = svc.store

    async def body() -> None:
        started, release = threading.Event(), threading.Event()

        def blocker(tx: Any) -> None:
            started.set()
            assert release.wait(30)

        blocked = asyncio.ensure_future(store.transact(blocker))
        assert await asyncio.to_thread(started.wait, 30)
        doomed = asyncio.ensure_future(svc.mkdir(ROOT_INO, "never"))
        kept = asyncio.ensure_future(svc.mkdir(ROOT_INO, "kept"))
        asyncio.get_running_loop().call_soon(doomed.cancel)
        asyncio.get_running_loop().call_soon(release.set)
        await blocked
        await kept
        with pytest.raises(asyncio.CancelledError):
            await doomed

    run(body())
    assert run(svc.lookup(ROOT_INO, "kept")).type == "dir"
    with pytest.raises(NotFound):
        run(svc.lookup(ROOT_INO, "never"))
