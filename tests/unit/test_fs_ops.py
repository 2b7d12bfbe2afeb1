"""``fs.Operations`` called directly, without a mount: a real coordinator process, a real
manager on an NVMe tmp dir and the session's SeaweedFS, all on a uvloop loop in a thread.

Handlers release the llfuse lock while they wait, so the test thread holds it for each call,
as llfuse's workers do.
"""

from __future__ import annotations

import asyncio
import errno
import os
import stat
import threading
from collections.abc import Coroutine, Iterator
from contextlib import AsyncExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import llfuse
import pytest
import uvloop

from fastcache.cache.manager import DefaultCacheManager
from fastcache.config import CacheConfig, ClientConfig, S3Config
from fastcache.coordinator.client import CoordinatorClient
from fastcache.mount.metacache import MetaCache
from fastcache.mount.ops import PREFETCH_AFTER, Operations
from fastcache.tiers.cloud import CloudTier
from fastcache.tiers.nvme import NvmeTier
from tests.integration.conftest_coordinator import CoordinatorProcess, start_coordinator

T = TypeVar("T")
CHUNK = 64 * 1024
ROOT = llfuse.ROOT_INODE


class Ctx:
    """What llfuse passes as ``ctx``."""

    def __init__(self, uid: int = 0, gid: int = 0) -> None:
        self.uid, self.gid, self.pid, self.umask = uid, gid, os.getpid(), 0o022


@dataclass
class Fields:
    """What llfuse passes as ``fields`` to setattr (its own class is read-only)."""

    update_atime: bool = False
    update_mtime: bool = False
    update_mode: bool = False
    update_uid: bool = False
    update_gid: bool = False
    update_size: bool = False


class LoopThread:
    """A uvloop loop in a thread, as node.py runs it beside the FUSE workers."""

    def __init__(self) -> None:
        self.loop = uvloop.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(60)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


class Node:
    """One "client node": NVMe + S3 tiers, manager, coordinator client, Operations."""

    def __init__(self, loop: LoopThread, nvme_dir: Path, s3: S3Config, url: str) -> None:
        self.loop = loop
        cache = CacheConfig(nvme_dir=nvme_dir, nvme_capacity=256 << 20, chunk_size=CHUNK)
        self.config = ClientConfig(cache=cache, s3=s3, coordinators=(url,), attr_timeout=60.0)
        self.stack = AsyncExitStack()
        self.manager: DefaultCacheManager = loop.run(self._open())
        self.ops = Operations(self.manager, self.ns, self.config, loop.loop)

    async def _open(self) -> DefaultCacheManager:
        nvme = await NvmeTier.open(self.config.cache)
        self.stack.push_async_callback(nvme.close)
        cloud = await CloudTier.open(self.config.s3)
        self.stack.push_async_callback(cloud.close)
        self.ns = CoordinatorClient(self.config.coordinator_url)
        self.stack.push_async_callback(self.ns.close)
        manager = await DefaultCacheManager.open(self.config.cache, nvme, cloud)
        self.stack.push_async_callback(manager.close)
        return manager

    def __call__(self, method: str, *args: Any) -> Any:
        """``ops.method(*args)`` holding the llfuse lock, as a FUSE worker would."""
        with llfuse.lock:
            return getattr(self.ops, method)(*args)

    def close(self) -> None:
        self.loop.run(self.stack.aclose())


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory, s3: Any) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("fsops")
    coordinator: CoordinatorProcess = start_coordinator(root / "coordinator")
    loop = LoopThread()
    bucket = s3.s3_config()
    nodes: list[Node] = []
    try:
        nodes.append(Node(loop, root / "nvme1", bucket, coordinator.url))
        nodes.append(Node(loop, root / "nvme2", bucket, coordinator.url))
        yield {"a": nodes[0], "b": nodes[1], "coordinator": coordinator}
    finally:
        for node in nodes:
            node.close()
        loop.close()
        coordinator.kill()


@pytest.fixture
def a(env: dict[str, Any]) -> Node:
    env["a"].ops.meta.negative_ttl = env["a"].config.negative_timeout  # undo a test's opt-in
    return env["a"]


@pytest.fixture
def b(env: dict[str, Any]) -> Node:
    env["b"].ops.meta.negative_ttl = env["b"].config.negative_timeout
    return env["b"]


@pytest.fixture
def d(a: Node, request: pytest.FixtureRequest) -> int:
    """A fresh directory inode for the test."""
    return a("mkdir", ROOT, request.node.name.encode(), 0o755 | stat.S_IFDIR, Ctx()).st_ino


def fuse_errno(node: Node, method: str, *args: Any) -> int:
    with pytest.raises(llfuse.FUSEError) as info:
        node(method, *args)
    return info.value.errno


def missing(node: Node, parent: int, name: bytes, ctx: Any) -> bool:
    """``lookup`` says there is no such name: a negative entry (inode 0) or ENOENT."""
    try:
        entry = node("lookup", parent, name, ctx)
    except llfuse.FUSEError as exc:
        return exc.errno == errno.ENOENT
    return entry.st_ino == 0


def write_file(node: Node, parent: int, name: bytes, data: bytes) -> int:
    fh, entry = node("create", parent, name, 0o644 | stat.S_IFREG, os.O_WRONLY, Ctx())
    assert node("write", fh, 0, data) == len(data)
    node("flush", fh)
    node("release", fh)
    return entry.st_ino


def read_file(node: Node, ino: int, size: int = 1 << 30) -> bytes:
    fh = node("open", ino, os.O_RDONLY, Ctx())
    try:
        return bytes(node("read", fh, 0, size))  # copy: a hit is a view of a reused buffer
    finally:
        node("release", fh)


# --- tests -----------------------------------------------------------------------------------
def test_write_then_read_on_both_nodes(a: Node, b: Node, d: int) -> None:
    data = os.urandom(3 * CHUNK + 17)
    ino = write_file(a, d, b"f", data)
    assert a("getattr", ino, Ctx()).st_size == len(data)
    assert read_file(a, ino) == data
    # Node B has nothing on NVMe: misses go through the loop to S3 (or stay pending on A).
    a.loop.run(a.manager.sync(timeout=30))
    assert read_file(b, ino) == data
    entry = b("lookup", d, b"f", Ctx())
    assert (entry.st_ino, entry.st_size) == (ino, len(data))


def test_nvme_hit_is_a_view_and_sequential_reads_prefetch(a: Node, d: int) -> None:
    data = os.urandom(2 * CHUNK)
    ino = write_file(a, d, b"hit", data)
    fh = a("open", ino, os.O_RDONLY, Ctx())
    try:
        first = a("read", fh, 0, 4096)
        assert isinstance(first, memoryview) and bytes(first) == data[:4096]
        across = a("read", fh, CHUNK - 10, 20)  # spans two chunks: the general path
        assert bytes(across) == data[CHUNK - 10 : CHUNK + 10]
        assert bytes(a("read", fh, 2 * CHUNK - 5, 100)) == data[-5:]
        assert bytes(a("read", fh, 2 * CHUNK, 100)) == b""
    finally:
        a("release", fh)


def test_random_writes_truncate_and_holes(a: Node, d: int) -> None:
    fh, entry = a("create", d, b"r", 0o644 | stat.S_IFREG, os.O_RDWR, Ctx())
    model = bytearray()

    def write(off: int, data: bytes) -> None:
        a("write", fh, off, data)
        if off > len(model):
            model.extend(bytes(off - len(model)))
        model[off : off + len(data)] = data

    write(0, b"a" * (2 * CHUNK + 100))
    a("flush", fh)
    write(CHUNK - 3, b"XYZXYZ")  # straddles a chunk border, partial on both sides
    write(5 * CHUNK + 9, b"far")  # a hole in between
    assert bytes(a("read", fh, CHUNK - 5, 10)) == bytes(model[CHUNK - 5 : CHUNK + 5])
    attr = llfuse.EntryAttributes()
    attr.st_size = CHUNK + 1
    fields = Fields(update_size=True)
    a("setattr", entry.st_ino, attr, fields, fh, Ctx())  # ftruncate: waits for the commit
    del model[CHUNK + 1 :]
    attr.st_size = 3 * CHUNK
    a("setattr", entry.st_ino, attr, fields, fh, Ctx())  # grows with zeros, not old bytes
    model.extend(bytes(3 * CHUNK - len(model)))
    assert a("getattr", entry.st_ino, Ctx()).st_size == len(model)
    a("flush", fh)
    a("release", fh)
    assert read_file(a, entry.st_ino) == bytes(model)
    committed = a.loop.run(a.ns.getattr(entry.st_ino))
    assert committed.size == len(model)


def test_truncate_by_path_commits_at_once(a: Node, d: int) -> None:
    ino = write_file(a, d, b"t", b"x" * (CHUNK + 5))
    attr = llfuse.EntryAttributes()
    attr.st_size = 7
    fields = Fields(update_size=True)
    assert a("setattr", ino, attr, fields, None, Ctx()).st_size == 7
    assert a.loop.run(a.ns.getattr(ino)).size == 7
    assert read_file(a, ino) == b"x" * 7


def test_conflicting_commits_merge_per_chunk(a: Node, b: Node, d: int) -> None:
    ino = write_file(a, d, b"c", b"0" * (3 * CHUNK))
    a.loop.run(a.manager.sync(timeout=30))
    fa = a("open", ino, os.O_RDWR, Ctx())
    fb = b("open", ino, os.O_RDWR, Ctx())
    a("write", fa, 0, b"A" * CHUNK)
    b("write", fb, 2 * CHUNK, b"B" * CHUNK)
    a("release", fa)
    b("release", fb)  # stale version: re-reads A's manifest and keeps A's chunk 0
    b.loop.run(b.manager.sync(timeout=30))
    assert read_file(a, ino) == b"A" * CHUNK + b"0" * CHUNK + b"B" * CHUNK


def test_unlinked_file_stays_readable_through_its_handle(a: Node, d: int) -> None:
    data = os.urandom(CHUNK + 1)
    ino = write_file(a, d, b"u", data)
    fh = a("open", ino, os.O_RDONLY, Ctx())
    try:
        a("unlink", d, b"u", Ctx())
        assert missing(a, d, b"u", Ctx())
        assert a("getattr", ino, Ctx()).st_nlink == 0
        assert bytes(a("read", fh, 0, CHUNK + 10)) == data
    finally:
        a("release", fh)


def test_lookup_counts_and_forget(a: Node, d: int, counted: Counting) -> None:
    ino = write_file(a, d, b"l", b"1")
    a.ops.meta.forget(ino, a.ops.meta.lookups(ino))
    a("lookup", d, b"l", Ctx())
    a("lookup", d, b"l", Ctx())
    assert a.ops.meta.lookups(ino) == 2
    a("forget", [(ino, 1)])
    assert a.ops.meta.get(ino) is not None
    a("forget", [(ino, 1)])
    assert a.ops.meta.lookups(ino) == 0
    # the kernel forgot it (drop_caches): its next lookup is still answered from the cache
    counted.calls.clear()
    assert a("lookup", d, b"l", Ctx()).st_ino == ino
    assert counted.calls == []


def test_readdir_offsets_are_stable(a: Node, d: int) -> None:
    names = [f"n{i:04d}".encode() for i in range(700)]  # more than one coordinator batch
    for name in names:
        a("mknod", d, name, 0o644 | stat.S_IFREG, 0, Ctx())
    dh = a("opendir", d, Ctx())
    try:
        seen: list[tuple[bytes, int]] = []
        off = 0
        while True:
            with llfuse.lock:
                batch = [(n, nxt) for n, _, nxt in list(a.ops.readdir(dh, off))[:100]]
            if not batch:
                break
            seen += batch
            off = batch[-1][1]
        assert [n for n, _ in seen] == [b".", b"..", *names]
        a("unlink", d, names[0], Ctx())  # removing an earlier entry shifts nothing
        resume = seen[400][1]
        with llfuse.lock:
            rest = [n for n, _, _ in a.ops.readdir(dh, resume)]
        assert rest[: len(names) - 399] == names[399:]
    finally:
        a("releasedir", dh)


def test_namespace_errors_are_errnos(a: Node, d: int) -> None:
    sub = a("mkdir", d, b"sub", 0o755 | stat.S_IFDIR, Ctx()).st_ino
    write_file(a, sub, b"child", b"x")
    ctx = Ctx()
    assert missing(a, d, b"missing", ctx)
    assert fuse_errno(a, "mkdir", d, b"sub", 0o755, ctx) == errno.EEXIST
    assert fuse_errno(a, "rmdir", d, b"sub", ctx) == errno.ENOTEMPTY
    assert fuse_errno(a, "rename", d, b"sub", sub, b"inside", ctx) == errno.EINVAL
    assert fuse_errno(a, "lookup", d, b"x" * 256, ctx) == errno.ENAMETOOLONG
    assert fuse_errno(a, "getxattr", sub, b"user.x", ctx) == errno.ENODATA
    assert fuse_errno(a, "getxattr", sub, b"system.posix_acl_access", ctx) == errno.ENOTSUP
    assert fuse_errno(a, "access", sub, os.R_OK, ctx) == errno.ENOSYS
    assert fuse_errno(a, "read", 987654, 0, 10) == errno.EIO  # a bug answers, never escapes


def test_setattr_mode_owner_times_and_setgid_dirs(a: Node, d: int) -> None:
    ino = write_file(a, d, b"m", b"abc")
    attr = llfuse.EntryAttributes()
    attr.st_mode = stat.S_IFREG | 0o2750
    attr.st_uid, attr.st_gid = 42, 43
    attr.st_atime_ns, attr.st_mtime_ns = 1_000_000_001, 2_000_000_002
    fields = Fields(True, True, True, True, True)
    entry = a("setattr", ino, attr, fields, None, Ctx())
    assert (stat.S_IMODE(entry.st_mode), entry.st_uid, entry.st_gid) == (0o2750, 42, 43)
    assert (entry.st_atime_ns, entry.st_mtime_ns) == (1_000_000_001, 2_000_000_002)
    sgid = a("mkdir", d, b"sgid", 0o2775 | stat.S_IFDIR, Ctx(gid=77)).st_ino
    child = a("mkdir", sgid, b"kid", 0o755 | stat.S_IFDIR, Ctx(uid=5, gid=6))
    assert child.st_gid == 77 and child.st_mode & stat.S_ISGID and child.st_uid == 5


def test_links_symlinks_and_special_files(a: Node, d: int) -> None:
    ino = write_file(a, d, b"orig", b"data")
    assert a("link", ino, d, b"hard", Ctx()).st_nlink == 2
    a("symlink", d, b"sym", b"orig", Ctx())
    sym = a("lookup", d, b"sym", Ctx())
    assert stat.S_ISLNK(sym.st_mode) and a("readlink", sym.st_ino, Ctx()) == b"orig"
    dev = a("mknod", d, b"blk", stat.S_IFBLK | 0o600, os.makedev(8, 1), Ctx())
    assert stat.S_ISBLK(dev.st_mode) and dev.st_rdev == os.makedev(8, 1)
    assert stat.S_ISFIFO(a("mknod", d, b"fifo", stat.S_IFIFO | 0o644, 0, Ctx()).st_mode)
    a("rename", d, b"hard", d, b"orig", Ctx())  # two links to one inode: nothing happens
    assert a("getattr", ino, Ctx()).st_nlink == 2


def test_fsync_waits_for_s3_and_statfs(a: Node, d: int) -> None:
    fh, entry = a("create", d, b"s", 0o644 | stat.S_IFREG, os.O_WRONLY, Ctx())
    a("write", fh, 0, b"durable" * 1000)
    a("fsync", fh, False)
    chunks = a.loop.run(a.ns.getattr(entry.st_ino)).manifest["chunks"]
    assert chunks and all(a.loop.run(a.manager.cloud.exists(c)) for c in chunks)
    a("release", fh)
    st = a("statfs", Ctx())
    assert st.f_blocks > 0 and st.f_namemax == 255 and st.f_files > 0


# --- round trips of the metadata paths ---------------------------------------------------------
class Counting:
    """Wraps the coordinator client of ``Operations``: the names of the calls it makes."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.calls: list[str] = []

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls.append(name)
            return attr(*args, **kwargs)

        return call


@pytest.fixture
def counted(a: Node) -> Iterator[Counting]:
    counting = Counting(a.ops.ns)
    a.ops.ns = counting
    try:
        yield counting
    finally:
        a.ops.ns = counting.inner


def test_a_directory_made_here_answers_lookups_and_mkdirs_in_one_round_trip(
    a: Node, b: Node, d: int, counted: Counting
) -> None:
    a.ops.meta.negative_ttl = 60.0  # opt in: --negative-timeout 60
    sub = a("mkdir", d, b"sub", 0o755 | stat.S_IFDIR, Ctx()).st_ino
    counted.calls.clear()
    for i in range(3):  # what the kernel sends for mkdir: a lookup, then the mkdir
        assert missing(a, sub, f"d{i}".encode(), Ctx())
        a("mkdir", sub, f"d{i}".encode(), 0o755 | stat.S_IFDIR, Ctx())
    a("rmdir", sub, b"d0", Ctx())
    assert a("getattr", sub, Ctx()).st_nlink == 4  # the rmdir's answer carried the parent
    assert counted.calls == ["create_entry"] * 3 + ["remove_entry"]
    # another node changes the directory: the next create here sees the version jump
    b("mkdir", sub, b"from-b", 0o755 | stat.S_IFDIR, Ctx())
    a("mkdir", sub, b"d9", 0o755 | stat.S_IFDIR, Ctx())
    counted.calls.clear()
    assert a("lookup", sub, b"from-b", Ctx()).st_mode & stat.S_IFDIR
    assert missing(a, sub, b"nothing", Ctx())
    assert counted.calls == ["lookup", "lookup"]


def test_create_of_a_name_another_node_made_meanwhile_opens_it(a: Node, b: Node, d: int) -> None:
    a.ops.meta.negative_ttl = 60.0  # opt in: --negative-timeout 60
    sub = a("mkdir", d, b"sub2", 0o755 | stat.S_IFDIR, Ctx()).st_ino
    theirs = write_file(b, sub, b"late", b"from b")
    b.loop.run(b.manager.sync(timeout=30))  # no peer tier here: a can only read it from S3
    # a still trusts its complete view of sub (for one ttl, like a kernel dentry cache) ...
    assert missing(a, sub, b"late", Ctx())
    assert (
        fuse_errno(a, "create", sub, b"late", 0o644 | stat.S_IFREG, os.O_WRONLY | os.O_EXCL, Ctx())
        == errno.EEXIST
    )
    # ... but O_CREAT without O_EXCL opens the existing file, as POSIX says
    fh, entry = a("create", sub, b"late", 0o644 | stat.S_IFREG, os.O_RDWR, Ctx())
    try:
        assert entry.st_ino == theirs
        assert bytes(a("read", fh, 0, 100)) == b"from b"
    finally:
        a("release", fh)


def test_by_default_a_name_made_on_another_node_is_found_at_once(a: Node, b: Node, d: int) -> None:
    """Without --negative-timeout, no ENOENT is answered locally: close-to-open for new names."""
    assert a.ops.meta.negative_ttl == 0.0
    sub = a("mkdir", d, b"sub3", 0o755 | stat.S_IFDIR, Ctx()).st_ino
    assert missing(a, sub, b"fresh", Ctx())
    theirs = write_file(b, sub, b"fresh", b"made on b")
    assert a("lookup", sub, b"fresh", Ctx()).st_ino == theirs


def test_listing_and_repeated_lookup_misses_fill_the_node_cache(
    a: Node, d: int, counted: Counting
) -> None:
    sizes = {f"s{i}".encode(): 100 * i + 1 for i in range(8)}
    inos = {name: write_file(a, d, name, b"z" * size) for name, size in sizes.items()}
    truth = {name: a.loop.run(counted.inner.getattr(ino)) for name, ino in inos.items()}
    blocks = {name: a("getattr", inos[name], Ctx()).st_blocks for name in sizes}

    def check_all() -> None:
        for name in sizes:
            e = a("lookup", d, name, Ctx())
            assert (e.st_ino, e.st_size, e.st_blocks) == (
                inos[name],
                truth[name].size,
                blocks[name],
            )

    a.ops.meta = MetaCache(a.ops.ttl)  # the kernel and the node forgot everything
    counted.calls.clear()
    fh = a("opendir", d, Ctx())
    try:
        assert len(list(a("readdir", fh, 0))) == 2 + len(sizes)
    finally:
        a("releasedir", fh)
    check_all()
    # the directory's own attrs (for "."), the listing; every lookup after it stays local
    assert counted.calls == ["getattr", "readdir"]

    a.ops.meta = MetaCache(a.ops.ttl)
    a.ops._misses.clear()
    counted.calls.clear()
    check_all()  # stat of every name: a few lookups, then one listing serves the rest
    assert counted.calls == ["lookup"] * (PREFETCH_AFTER - 1) + ["readdir"]


def test_creating_many_files_never_lists_the_directory(a: Node, d: int, counted: Counting) -> None:
    """A create's lookup finds nothing: that is no reason to prefetch the listing."""
    sub = a("mkdir", d, b"many", 0o755 | stat.S_IFDIR, Ctx()).st_ino
    counted.calls.clear()
    for i in range(3 * PREFETCH_AFTER):
        name = f"c{i}".encode()
        assert missing(a, sub, name, Ctx())
        a("release", a("create", sub, name, 0o644 | stat.S_IFREG, os.O_WRONLY, Ctx())[0])
    assert "readdir" not in counted.calls
    assert counted.calls.count("lookup") == 3 * PREFETCH_AFTER
