"""Extended attributes in CoordinatorService over each real store: Linux's limits and
errno, the permission rules, per-inode storage (links, rename, removal) and the migration."""

from __future__ import annotations

import asyncio
import errno
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from fastcache.coordinator.model import (
    ROOT_INO,
    XATTR_CREATE,
    XATTR_NAME_MAX,
    XATTR_REPLACE,
    XATTR_SIZE_MAX,
)
from fastcache.coordinator.service import CoordinatorService
from fastcache.coordinator.store import open_store
from fastcache.coordinator.store.sqlite import _DDL, SQLiteStore
from fastcache.errors import (
    Exists,
    InvalidArgument,
    NoAttribute,
    NoSpace,
    NotPermitted,
    OutOfRange,
    PermissionDenied,
    Unsupported,
    ValueTooLarge,
    errno_for,
    error_from_kind,
    error_kind,
    http_status_for,
)


@pytest.fixture
def loop() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    yield loop
    loop.close()


@pytest.fixture
def svc(store_url: str, loop: asyncio.AbstractEventLoop) -> Iterator[CoordinatorService]:
    store = loop.run_until_complete(open_store(store_url))
    service = CoordinatorService(store)
    changes: list[list[str]] = []

    async def on_change(keys: list[str]) -> None:
        changes.append(keys)

    service.on_change = on_change
    service.changes = changes  # type: ignore[attr-defined]
    yield service
    loop.run_until_complete(service.close())


@pytest.fixture
def run(loop: asyncio.AbstractEventLoop) -> Any:
    return loop.run_until_complete


def _rows(svc: CoordinatorService, run: Any, ino: int) -> list[str]:
    """What the store holds for ``ino``, read past the service."""
    return run(svc.store.transact(lambda tx: tx.list_xattrs(ino), readonly=True))


def test_set_get_list_remove(svc: CoordinatorService, run: Any) -> None:
    f = run(svc.create(ROOT_INO, "f", "file", 0o644, 0, 0))
    assert f.xattrs == 0 and run(svc.listxattr(f.ino)) == []
    svc.changes.clear()  # type: ignore[attr-defined]
    after = run(svc.setxattr(f.ino, "user.b", b"\x00\xffbinary"))
    assert after.xattrs == 1 and after.ctime_ns >= f.ctime_ns
    assert after.version == f.version  # the content's version: a writer commits against it
    assert svc.changes == [[f"attr:{f.ino}"]]  # type: ignore[attr-defined]
    run(svc.setxattr(f.ino, "user.a", b""))
    run(svc.setxattr(f.ino, "security.selinux", b"label"))
    run(svc.setxattr(f.ino, "trusted.t", b"t"))
    assert run(svc.getxattr(f.ino, "user.b")) == b"\x00\xffbinary"
    assert run(svc.getxattr(f.ino, "user.a")) == b""
    assert run(svc.listxattr(f.ino)) == ["security.selinux", "trusted.t", "user.a", "user.b"]
    assert run(svc.getattr(f.ino)).xattrs == 4
    run(svc.setxattr(f.ino, "user.b", b"replaced"))
    assert run(svc.getxattr(f.ino, "user.b")) == b"replaced"
    gone = run(svc.removexattr(f.ino, "user.b"))
    assert gone.xattrs == 3 and "user.b" not in run(svc.listxattr(f.ino))
    with pytest.raises(NoAttribute):
        run(svc.getxattr(f.ino, "user.b"))
    with pytest.raises(NoAttribute):
        run(svc.removexattr(f.ino, "user.b"))


def test_names_values_and_flags_as_linux(svc: CoordinatorService, run: Any) -> None:
    f = run(svc.create(ROOT_INO, "f", "file", 0o644, 0, 0))
    refused = {
        "": OutOfRange,  # ERANGE, as setxattr(2) for an empty name
        "user." + "n" * (XATTR_NAME_MAX - 4): OutOfRange,  # 256 bytes
        "user." + "é" * 126: OutOfRange,  # 257 UTF-8 bytes, 131 characters
        "system.posix_acl_access": Unsupported,
        "system.posix_acl_default": Unsupported,
        "os2.x": Unsupported,
        "user": Unsupported,
        "user.": InvalidArgument,  # a bare prefix: EINVAL on ext4
        "user.a\0b": InvalidArgument,
        "user.\udcff": InvalidArgument,  # not UTF-8
    }
    for name, exc in refused.items():
        for call in (
            svc.getxattr(f.ino, name),
            svc.setxattr(f.ino, name, b"v"),
            svc.removexattr(f.ino, name),
        ):
            with pytest.raises(exc):
                run(call)
    longest = "user." + "n" * (XATTR_NAME_MAX - 5)
    run(svc.setxattr(f.ino, longest, b"x" * XATTR_SIZE_MAX))
    assert run(svc.getxattr(f.ino, longest)) == b"x" * XATTR_SIZE_MAX
    with pytest.raises(ValueTooLarge):
        run(svc.setxattr(f.ino, "user.big", b"x" * (XATTR_SIZE_MAX + 1)))
    with pytest.raises(NoAttribute):  # ENODATA: missing name
        run(svc.getxattr(f.ino, "user.none"))
    with pytest.raises(NoAttribute):  # XATTR_REPLACE on a missing name
        run(svc.setxattr(f.ino, "user.none", b"v", XATTR_REPLACE))
    run(svc.setxattr(f.ino, "user.c", b"1", XATTR_CREATE))
    with pytest.raises(Exists):  # XATTR_CREATE on an existing name
        run(svc.setxattr(f.ino, "user.c", b"2", XATTR_CREATE))
    run(svc.setxattr(f.ino, "user.c", b"3", XATTR_REPLACE))
    with pytest.raises(Exists):  # both flags: EEXIST if there, as ext4
        run(svc.setxattr(f.ino, "user.c", b"4", XATTR_CREATE | XATTR_REPLACE))
    with pytest.raises(NoAttribute):  # … ENODATA if not
        run(svc.setxattr(f.ino, "user.d", b"4", XATTR_CREATE | XATTR_REPLACE))
    with pytest.raises(InvalidArgument):  # an unknown flag: EINVAL
        run(svc.setxattr(f.ino, "user.c", b"4", 4))
    assert run(svc.getxattr(f.ino, "user.c")) == b"3"


def test_errno_and_http_status_of_the_xattr_errors() -> None:
    expected = {
        NoAttribute: (errno.ENODATA, 404),
        OutOfRange: (errno.ERANGE, 400),
        ValueTooLarge: (errno.E2BIG, 413),
        Unsupported: (errno.ENOTSUP, 400),
        NoSpace: (errno.ENOSPC, 507),
    }
    for cls, (code, status) in expected.items():
        exc = cls("x")
        assert (errno_for(exc), http_status_for(exc)) == (code, status)
        assert type(error_from_kind(error_kind(exc), status, "x")) is cls  # over the wire


def test_room_per_inode(svc: CoordinatorService, run: Any) -> None:
    f = run(svc.create(ROOT_INO, "f", "file", 0o644, 0, 0))
    for i in range(15):
        run(svc.setxattr(f.ino, f"user.v{i:02}", b"x" * XATTR_SIZE_MAX))
    with pytest.raises(NoSpace):  # names and values beyond 1 MiB: ENOSPC, as a full ext4
        run(svc.setxattr(f.ino, "user.v15", b"x" * XATTR_SIZE_MAX))
    assert run(svc.getattr(f.ino)).xattrs == 15 and len(_rows(svc, run, f.ino)) == 15
    g = run(svc.create(ROOT_INO, "g", "file", 0o644, 0, 0))
    name = "user." + "n" * 250  # 256 bytes listed, with its NUL: 256 of them fill 64 KiB
    for i in range(256):
        run(svc.setxattr(g.ino, f"{name[:-3]}{i:03}", b""))
    with pytest.raises(NoSpace):
        run(svc.setxattr(g.ino, "user.one-more", b""))


def test_permissions_as_linux(svc: CoordinatorService, run: Any) -> None:
    f = run(svc.create(ROOT_INO, "f", "file", 0o640, 1000, 100))
    run(svc.setxattr(f.ino, "user.k", b"v"))
    run(svc.setxattr(f.ino, "trusted.k", b"t"))
    run(svc.setxattr(f.ino, "security.k", b"s"))
    # the owner reads and writes; the group (any of gids) reads only; others neither
    run(svc.setxattr(f.ino, "user.k", b"o", uid=1000, gids=[1000]))
    assert run(svc.getxattr(f.ino, "user.k", uid=2000, gids=[5, 100])) == b"o"
    with pytest.raises(PermissionDenied):
        run(svc.setxattr(f.ino, "user.k", b"g", uid=2000, gids=[100]))
    with pytest.raises(PermissionDenied):
        run(svc.removexattr(f.ino, "user.k", uid=2000, gids=[100]))
    with pytest.raises(PermissionDenied):
        run(svc.getxattr(f.ino, "user.k", uid=2000, gids=[2000]))
    # listing needs no permission; trusted.* is root's alone (hidden, ENODATA, EPERM)
    assert run(svc.listxattr(f.ino, uid=2000, gids=[2000])) == ["security.k", "user.k"]
    assert run(svc.listxattr(f.ino, uid=0)) == ["security.k", "trusted.k", "user.k"]
    with pytest.raises(NoAttribute):
        run(svc.getxattr(f.ino, "trusted.k", uid=1000, gids=[100]))
    with pytest.raises(NotPermitted):
        run(svc.setxattr(f.ino, "trusted.k", b"x", uid=1000, gids=[100]))
    with pytest.raises(NotPermitted):
        run(svc.removexattr(f.ino, "trusted.k", uid=1000, gids=[100]))
    assert run(svc.getxattr(f.ino, "trusted.k", uid=0)) == b"t"
    # security.*: anyone reads it, root alone changes it
    assert run(svc.getxattr(f.ino, "security.k", uid=2000, gids=[2000])) == b"s"
    with pytest.raises(NotPermitted):
        run(svc.setxattr(f.ino, "security.k", b"x", uid=1000, gids=[100]))
    # user.* only on files and directories, for root too; a sticky directory: its owner
    link = run(svc.create(ROOT_INO, "l", "symlink", 0o777, 0, 0, target="f"))
    fifo = run(svc.create(ROOT_INO, "p", "fifo", 0o666, 0, 0))
    for ino in (link.ino, fifo.ino):
        with pytest.raises(NotPermitted):
            run(svc.setxattr(ino, "user.k", b"v"))
        with pytest.raises(NoAttribute):
            run(svc.getxattr(ino, "user.k"))
        run(svc.setxattr(ino, "trusted.k", b"v"))  # other namespaces are fine there
    tmp = run(svc.mkdir(ROOT_INO, "tmp", 0o1777, 0, 0))
    with pytest.raises(NotPermitted):
        run(svc.setxattr(tmp.ino, "user.k", b"v", uid=1000, gids=[100]))
    mine = run(svc.mkdir(ROOT_INO, "mine", 0o1777, 1000, 100))
    run(svc.setxattr(mine.ino, "user.k", b"v", uid=1000, gids=[100]))


def test_per_inode_links_rename_and_removal(svc: CoordinatorService, run: Any) -> None:
    d = run(svc.mkdir(ROOT_INO, "d", 0o755, 0, 0))
    f = run(svc.create(d.ino, "f", "file", 0o644, 0, 0))
    run(svc.setxattr(f.ino, "user.k", b"v"))
    run(svc.link(f.ino, ROOT_INO, "hard"))
    assert run(svc.getxattr(run(svc.lookup(ROOT_INO, "hard")).ino, "user.k")) == b"v"
    run(svc.rename(d.ino, "f", ROOT_INO, "moved"))
    assert run(svc.getxattr(run(svc.lookup(ROOT_INO, "moved")).ino, "user.k")) == b"v"
    run(svc.unlink(ROOT_INO, "hard"))  # one link left: kept
    assert _rows(svc, run, f.ino) == ["user.k"]
    run(svc.unlink(ROOT_INO, "moved"))  # the last link: gone with the inode
    assert _rows(svc, run, f.ino) == []
    run(svc.setxattr(d.ino, "user.dir", b"v"))
    run(svc.rmdir(ROOT_INO, "d"))
    assert _rows(svc, run, d.ino) == []
    a = run(svc.create(ROOT_INO, "a", "file", 0o644, 0, 0))
    b = run(svc.create(ROOT_INO, "b", "file", 0o644, 0, 0))
    run(svc.setxattr(b.ino, "user.b", b"v"))
    run(svc.rename(ROOT_INO, "a", ROOT_INO, "b"))  # the replaced inode goes with its own
    assert _rows(svc, run, b.ino) == [] and _rows(svc, run, a.ino) == []


def test_a_version_2_store_opens_with_xattrs(tmp_path: Path, run: Any) -> None:
    path = tmp_path / "old.db"
    conn = sqlite3.connect(path)
    old = _DDL.replace("    xattrs INTEGER NOT NULL DEFAULT 0,\n", "")
    conn.executescript(old[: old.index("CREATE TABLE IF NOT EXISTS xattrs")])
    conn.execute(
        "INSERT INTO inodes (ino, type, mode, uid, gid, size, atime_ns, mtime_ns, ctime_ns,"
        " nlink) VALUES (7, 'file', 420, 0, 0, 0, 0, 0, 0, 1)"
    )
    conn.execute("INSERT INTO entries (parent, name, ino) VALUES (1, 'old', 7)")
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()

    async def reopen() -> tuple[int | None, bytes, int]:
        svc = CoordinatorService(await SQLiteStore.open(path))
        try:
            before = (await svc.getattr(7)).xattrs
            await svc.setxattr(7, "user.k", b"v")
            return before, await svc.getxattr(7, "user.k"), (await svc.getattr(7)).xattrs or 0
        finally:
            await svc.close()

    assert run(reopen()) == (0, b"v", 1)
    version = sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0]
    assert version == 3
