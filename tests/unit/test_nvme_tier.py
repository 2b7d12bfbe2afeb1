"""The NVMe tier on a tmp dir: round trips, the rebuilt index, LRU with pins, corruption,
error translation, O_DIRECT detection and concurrent FUSE-thread reads beside loop writes."""

from __future__ import annotations

import asyncio
import errno
import json
import os
import subprocess
import threading
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fastcache import chunks
from fastcache.chunks import digest
from fastcache.config import CacheConfig
from fastcache.errors import (
    BadRequest,
    ChunkCorrupt,
    ChunkNotFound,
    TierFull,
    TierUnavailable,
)
from fastcache.tiers.base import LocalChunkReader, TierStorage
from fastcache.tiers.nvme import NvmeTier

CS = 4096  # the smallest chunk size CacheConfig allows keeps capacities tiny


def blob(seed: int, size: int = CS) -> bytes:
    """Deterministic, seed-unique bytes: a torn or misplaced read cannot match by chance."""
    return (seed.to_bytes(4, "little") * (size // 4 + 1))[:size]


def config(root: Path, capacity: int = 64 * CS, **kw: Any) -> CacheConfig:
    return CacheConfig(nvme_dir=root, nvme_capacity=capacity, chunk_size=CS, **kw)


def run(root: Path, body: Callable[[NvmeTier], Awaitable[None]], **kw: Any) -> None:
    async def main() -> None:
        tier = await NvmeTier.open(config(root, **kw))
        try:
            await body(tier)
        finally:
            await tier.close()

    asyncio.run(main())


def read_all(tier: NvmeTier, d: str, size: int = CS) -> bytes | None:
    out = bytearray(size)
    n = tier.read_into(d, 0, memoryview(out))
    return None if n is None else bytes(out[:n])


def fs_type(path: Path) -> str:
    return subprocess.run(
        ["stat", "-f", "-c", "%T", str(path)], capture_output=True, text=True, check=True
    ).stdout.strip()


# --- basics ------------------------------------------------------------------------------
def test_round_trip_and_protocols(tmp_path: Path) -> None:
    data = blob(1, 3000)
    d = digest(data)

    async def body(tier: NvmeTier) -> None:
        assert isinstance(tier, TierStorage)
        reader: LocalChunkReader = tier
        assert tier.name == "nvme"
        assert not await tier.exists(d)
        await tier.write(d, data)
        assert await tier.exists(d)
        assert await tier.size(d) == 3000
        assert await tier.read(d) == data
        assert Path(tier.path_for(d)).read_bytes() == data
        assert tier.path_for(d).endswith(f"chunks/{d[:2]}/{d[2:4]}/{d}")
        # partial, offset and past-the-end reads on the hit path
        out = bytearray(100)
        assert reader.read_into(d, 10, memoryview(out)) == 100
        assert bytes(out) == data[10:110]
        big = bytearray(CS)
        assert tier.read_into(d, 2990, memoryview(big)) == 10
        assert bytes(big[:10]) == data[2990:]
        assert tier.read_into(d, 3000, memoryview(big)) == 0
        await tier.write(d, data)  # idempotent rewrite
        stats = tier.stats()
        assert stats["chunks"] == 1 and stats["used"] == 3000
        assert stats["bytes_written"] == 3000  # the rewrite did no I/O
        assert stats["hits"] == 4 and stats["bytes_read"] == 3000 + 100 + 10
        await tier.delete(d)
        await tier.delete(d)  # absent is fine
        assert not await tier.exists(d)
        assert tier.read_into(d, 0, memoryview(big)) is None
        with pytest.raises(ChunkNotFound):
            await tier.read(d)
        with pytest.raises(ChunkNotFound):
            await tier.size(d)
        assert tier.stats()["misses"] == 2
        assert tier.stats()["used"] == 0
        assert tier.staging_dir.is_dir() and tier.journal_dir.is_dir()
        assert tier.staging_dir == tmp_path / "staging"

    run(tmp_path, body)


def test_rejects_names_that_are_not_digests(tmp_path: Path) -> None:
    async def body(tier: NvmeTier) -> None:
        for bad in ("../../etc/passwd", "abc", "Z" * 32, ""):
            with pytest.raises(BadRequest):
                await tier.write(bad, b"x")
            with pytest.raises(BadRequest):
                await tier.read(bad)

    run(tmp_path, body)


def test_blocking_io_runs_in_the_tier_pool(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    threads: list[str] = []
    real = chunks.write_chunk_file

    def spy(path: str, data: chunks.Buffer, direct: bool, sync: bool = False) -> None:
        if "/chunks/" in path:  # not the state file, written after the pool stops at close
            threads.append(threading.current_thread().name)
        real(path, data, direct, sync)

    monkeypatch.setattr(chunks, "write_chunk_file", spy)

    async def body(tier: NvmeTier) -> None:
        await tier.write(digest(b"a"), b"a")
        assert await tier.read(digest(b"a")) == b"a"

    run(tmp_path, body)
    assert threads and all(t.startswith("nvme") for t in threads)


# --- index rebuild -----------------------------------------------------------------------
def test_index_rebuilt_at_open_in_lru_order(tmp_path: Path) -> None:
    datas = [blob(i, 1000 + i) for i in range(5)]
    names = [digest(x) for x in datas]

    async def write_all(tier: NvmeTier) -> None:
        for d, x in zip(names, datas, strict=True):
            await tier.write(d, x)

    run(tmp_path, write_all)
    # give the files a known last-use order: 3, 1, 4, 0, 2 (oldest first)
    order = [3, 1, 4, 0, 2]
    for rank, i in enumerate(order):
        t = 1_700_000_000 + rank
        os.utime(tmp_path / "chunks" / names[i][:2] / names[i][2:4] / names[i], (t, t))

    async def check(tier: NvmeTier) -> None:
        assert tier.digests() == [names[i] for i in order]
        for d, x in zip(names, datas, strict=True):
            assert await tier.size(d) == len(x)
            assert read_all(tier, d) == x
        assert tier.stats()["used"] == sum(len(x) for x in datas)

    run(tmp_path, check)


def test_stray_temp_files_and_foreign_files_at_open(tmp_path: Path) -> None:
    data = blob(7)
    d = digest(data)

    run(tmp_path, lambda tier: tier.write(d, data))
    sub = tmp_path / "chunks" / d[:2] / d[2:4]
    stray = sub / f"{d}.tmp.1234.5678"
    stray.write_bytes(b"half a chunk")
    misplaced = sub / digest(b"elsewhere")  # a digest in the wrong directory is not indexed
    misplaced.write_bytes(b"elsewhere")

    async def check(tier: NvmeTier) -> None:
        assert tier.digests() == [d]
        assert tier.stats()["used"] == CS

    run(tmp_path, check)
    assert not stray.exists()
    assert (sub / d).exists()


# --- LRU and pins ------------------------------------------------------------------------
def test_lru_evicts_least_recently_used_and_read_into_refreshes(tmp_path: Path) -> None:
    datas = [blob(i) for i in range(5)]
    a, b, c, d, e = (digest(x) for x in datas)

    async def body(tier: NvmeTier) -> None:
        for name, x in zip((a, b, c, d), datas, strict=False):
            await tier.write(name, x)
        assert read_all(tier, a) == datas[0]  # a becomes most recent: b is now oldest
        await tier.write(e, datas[4])
        assert tier.digests() == [c, d, a, e]
        assert not await tier.exists(b)
        assert not Path(tier.path_for(b)).exists()
        assert read_all(tier, b) is None
        st = tier.stats()
        assert st["evictions"] == 1 and st["used"] == 4 * CS and st["chunks"] == 4

    run(tmp_path, body, capacity=4 * CS)


def test_pinned_chunks_are_never_evicted(tmp_path: Path) -> None:
    datas = [blob(i) for i in range(6)]
    names = [digest(x) for x in datas]

    async def body(tier: NvmeTier) -> None:
        tier.pin(names[0])  # pinning may precede the write
        for name, x in zip(names[:4], datas, strict=False):
            await tier.write(name, x)
        for name in names[1:4]:
            tier.pin(name)
        assert tier.pinned() == set(names[:4])
        with pytest.raises(TierFull):
            await tier.write(names[4], datas[4])
        assert tier.digests() == names[:4]  # nothing was evicted for the failed write
        assert tier.stats()["evictions"] == 0
        tier.unpin(names[2])
        await tier.write(names[4], datas[4])
        assert not await tier.exists(names[2])
        for name in (names[0], names[1], names[3], names[4]):
            assert await tier.exists(name)
        assert tier.stats()["pinned"] == 3
        with pytest.raises(TierFull):  # larger than the whole capacity
            await tier.write(digest(b"x" * (5 * CS)), b"x" * (5 * CS))

    run(tmp_path, body, capacity=4 * CS)


# --- corruption --------------------------------------------------------------------------
def corrupt(path: str) -> None:
    with open(path, "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0xFF]))


def test_read_detects_corruption_and_deletes(tmp_path: Path) -> None:
    data = blob(3)
    d = digest(data)

    async def body(tier: NvmeTier) -> None:
        await tier.write(d, data)
        corrupt(tier.path_for(d))
        with pytest.raises(ChunkCorrupt):
            await tier.read(d)
        assert not Path(tier.path_for(d)).exists()
        assert not await tier.exists(d)
        assert tier.stats()["corrupt"] == 1 and tier.stats()["used"] == 0
        await tier.write(d, data)  # a refetch can put it back
        assert await tier.read(d) == data

    run(tmp_path, body)


def test_verify_reads_turns_corruption_into_a_miss(tmp_path: Path) -> None:
    data = blob(4)
    d = digest(data)

    async def body(tier: NvmeTier) -> None:
        assert tier.verify_reads
        await tier.write(d, data)
        out = bytearray(16)
        assert tier.read_into(d, 8, memoryview(out)) == 16
        assert bytes(out) == data[8:24]
        corrupt(tier.path_for(d))
        assert tier.read_into(d, 8, memoryview(out)) is None
        assert not Path(tier.path_for(d)).exists()
        assert d not in tier
        assert tier.stats()["corrupt"] == 1

    run(tmp_path, body, verify_cache=True)


def test_one_policy_whole_chunks_are_verified_parts_are_not(tmp_path: Path) -> None:
    """Without --verify-cache a part of a chunk is one pread, never hashed; a read of the
    whole chunk is verified whichever way it comes (``read_into`` as ``read``)."""
    data = blob(5)
    d = digest(data)

    async def body(tier: NvmeTier) -> None:
        await tier.write(d, data)
        corrupt(tier.path_for(d))
        part = bytearray(CS - 1)
        assert tier.read_into(d, 0, memoryview(part)) == CS - 1  # a part: not hashed
        assert bytes(part) != data[:-1]
        assert tier.stats()["corrupt"] == 0 and d in tier
        assert read_all(tier, d, CS + 10) is None  # whole (room to spare): checked, dropped
        assert tier.stats()["corrupt"] == 1
        assert d not in tier and not Path(tier.path_for(d)).exists()
        await tier.write(d, data)
        assert read_all(tier, d) == data

    run(tmp_path, body)


def _in_page_cache(path: str) -> bool:
    """Whether any page of ``path`` is in the page cache (``fincore``: a probe that reads
    nothing; a read with RWF_NOWAIT would start the kernel's read-ahead of what it misses)."""
    return resident_pages(path) > 0


def _drop_from_page_cache(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def test_read_whole_reads_a_chunk_through_the_page_cache_or_around_it(tmp_path: Path) -> None:
    """``read_whole`` (a sequential reader's read-ahead): the exact bytes of a chunk of any
    length (short at its end), ``None`` for a chunk not here, counted; through the page
    cache (the chunk stays there) or, ``direct``, around it (O_DIRECT: it does not)."""
    odd, full = blob(11, 3000), blob(12)

    async def body(tier: NvmeTier) -> None:
        for data in (odd, full):
            await tier.write(digest(data), data)
            path = tier.path_for(digest(data))
            for direct in (True, False):
                _drop_from_page_cache(path)
                assert bytes(tier.read_whole(digest(data), direct) or b"") == data
                assert _in_page_cache(path) == (not direct or not tier.direct), direct
        view = tier.read_whole_soon(digest(full), True).result(10)
        assert view is not None and bytes(view) == full
        assert tier.read_whole(digest(blob(13)), False) is None
        stats = tier.stats()
        assert stats["whole_reads"] == 5 and stats["misses"] == 1
        assert stats["bytes_read"] == 2 * 3000 + 3 * CS

    run(tmp_path, body)


def test_read_whole_hashes_where_a_part_would_be(tmp_path: Path) -> None:
    """One policy: the read-ahead serves parts, so it is hashed only with --verify-cache
    (or for a chunk unverified since a power cut); then a corrupt file is dropped."""
    data = blob(14)
    d = digest(data)

    async def plain(tier: NvmeTier) -> None:
        await tier.write(d, data)
        corrupt(tier.path_for(d))
        got = tier.read_whole(d, True)
        assert got is not None and bytes(got) != data  # like a pread of a part
        assert tier.stats()["corrupt"] == 0

    async def verified(tier: NvmeTier) -> None:
        await tier.write(d, data)
        corrupt(tier.path_for(d))
        assert tier.read_whole(d, False) is None
        assert tier.stats()["corrupt"] == 1 and d not in tier

    run(tmp_path / "plain", plain)
    run(tmp_path / "verified", verified, verify_cache=True)


# --- failures ----------------------------------------------------------------------------
def test_unusable_directory_is_unavailable(tmp_path: Path) -> None:
    data = blob(6)
    d = digest(data)

    async def body(tier: NvmeTier) -> None:
        # a FILE where the fan-out directory should be: ENOTDIR, even for root
        (tmp_path / "chunks" / d[:2]).write_bytes(b"")
        with pytest.raises(TierUnavailable):
            await tier.write(d, data)
        assert tier.stats()["used"] == 0 and tier.stats()["errors"] == 1
        assert tier.usage()["used"] == 0  # the reservation was released

    run(tmp_path, body)

    blocked = tmp_path / "blocked"
    blocked.mkdir()
    (blocked / "chunks").write_bytes(b"not a directory")
    with pytest.raises(TierUnavailable):
        asyncio.run(NvmeTier.open(config(blocked)))


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (errno.ENOSPC, TierFull),
        (errno.EDQUOT, TierFull),
        (errno.EIO, TierUnavailable),
        (errno.EROFS, TierUnavailable),
        (errno.EACCES, TierUnavailable),
    ],
)
def test_os_errors_are_translated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int, expected: type[Exception]
) -> None:
    real = chunks.write_chunk_file

    def failing(path: str, data: chunks.Buffer, direct: bool, sync: bool = False) -> None:
        if "/chunks/" not in path:
            return real(path, data, direct, sync)  # the state file
        raise OSError(code, os.strerror(code), path)

    monkeypatch.setattr(chunks, "write_chunk_file", failing)

    async def body(tier: NvmeTier) -> None:
        with pytest.raises(expected):
            await tier.write(digest(b"z"), b"z")
        assert tier.usage()["used"] == 0

    run(tmp_path, body)


# --- capacity clamped to the disk (a real 64 MiB tmpfs) -----------------------------------
MiB = 1 << 20


@pytest.fixture
def small_tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A fresh 64 MiB tmpfs (we are root in the test environment), unmounted afterwards."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=True)


def big_config(root: Path, **kw: Any) -> CacheConfig:
    """The defaults: 4 MiB chunks, 10G capacity (far more than the tmpfs holds)."""
    return CacheConfig(nvme_dir=root, **kw)


def temp_files(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if ".tmp." in p.name]


def test_capacity_is_clamped_and_a_small_disk_evicts(small_tmpfs: Path) -> None:
    datas = [blob(i, 4 * MiB) for i in range(24)]  # 96 MiB through a 64 MiB disk

    async def main() -> None:
        tier = await NvmeTier.open(big_config(small_tmpfs))
        try:
            assert not tier.direct  # tmpfs: buffered
            assert tier.configured_capacity == 10 << 30
            assert 48 * MiB <= tier.capacity < 64 * MiB
            for x in datas:
                await tier.write(digest(x), x)  # never ENOSPC: LRU eviction instead
            st = tier.stats()
            assert st["evictions"] > 0 and st["errors"] == 0
            assert st["used"] <= tier.capacity
            assert tier.digests()[-1] == digest(datas[-1])
            assert await tier.read(digest(datas[-1])) == datas[-1]
            assert tier.usage()["capacity"] == tier.capacity
        finally:
            await tier.close()
        assert not temp_files(small_tmpfs)
        assert (small_tmpfs / "nvme-state.json").exists()

    asyncio.run(main())


def test_pinned_chunks_fill_a_small_disk_to_tier_full(small_tmpfs: Path) -> None:
    async def main() -> None:
        tier = await NvmeTier.open(big_config(small_tmpfs))
        written: list[bytes] = []
        try:
            with pytest.raises(TierFull):
                for i in range(20):
                    x = blob(i, 4 * MiB)
                    tier.pin(digest(x))
                    await tier.write(digest(x), x)
                    written.append(x)
            assert 10 <= len(written) < 16
            assert tier.stats()["evictions"] == 0
            assert not temp_files(small_tmpfs)  # never a partial file
            for x in written:
                assert read_all(tier, digest(x), len(x)) == x
            files = [p for p in (small_tmpfs / "chunks").rglob("*") if p.is_file()]
            assert sorted(p.name for p in files) == sorted(digest(x) for x in written)
        finally:
            await tier.close()

    asyncio.run(main())


def fill_disk(root: Path, leave: int) -> Path:
    """Take all but ``leave`` bytes of the filesystem's free space with a ballast file."""
    ballast = root / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        os.posix_fallocate(fd, 0, os.statvfs(root).f_bavail * os.statvfs(root).f_frsize - leave)
    finally:
        os.close(fd)
    return ballast


def test_enospc_reclamps_evicts_and_retries(small_tmpfs: Path) -> None:
    """Something else fills the disk after open: the first ENOSPC shrinks the capacity to
    what the disk holds now, evicts unpinned LRU chunks and the write succeeds."""
    datas = [blob(i, 4 * MiB) for i in range(8)]

    async def main() -> None:
        tier = await NvmeTier.open(big_config(small_tmpfs))
        try:
            before = tier.capacity
            for x in datas[:4]:
                await tier.write(digest(x), x)
            fill_disk(small_tmpfs, 2 * MiB)  # not even room for one more chunk
            for x in datas[4:]:
                await tier.write(digest(x), x)
            assert tier.capacity < before
            st = tier.stats()
            assert st["evictions"] >= 4 and st["errors"] == 0
            assert await tier.read(digest(datas[-1])) == datas[-1]
            assert not temp_files(small_tmpfs)
        finally:
            await tier.close()

    asyncio.run(main())


def test_enospc_with_everything_pinned_is_tier_full(small_tmpfs: Path) -> None:
    async def main() -> None:
        tier = await NvmeTier.open(big_config(small_tmpfs))
        try:
            kept = [blob(i, 4 * MiB) for i in range(2)]
            for x in kept:
                tier.pin(digest(x))
                await tier.write(digest(x), x)
            fill_disk(small_tmpfs, MiB)
            x = blob(99, 4 * MiB)
            with pytest.raises(TierFull):
                await tier.write(digest(x), x)
            assert not temp_files(small_tmpfs)
            assert tier.digests() == [digest(k) for k in kept]
            assert tier.usage()["used"] == 8 * MiB  # the reservation was released
            for k in kept:
                assert await tier.read(digest(k)) == k
        finally:
            await tier.close()

    asyncio.run(main())


def test_clamp_is_logged_once_at_info(small_tmpfs: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO", logger="fastcache.client.nvme")

    async def main() -> None:
        tier = await NvmeTier.open(big_config(small_tmpfs))
        await tier.close()

    asyncio.run(main())
    clamps = [r for r in caplog.records if "clamped" in r.getMessage()]
    assert len(clamps) == 1 and clamps[0].levelname == "INFO"


def test_capacity_not_clamped_when_the_disk_has_room(tmp_path: Path) -> None:
    async def body(tier: NvmeTier) -> None:
        assert tier.capacity == tier.configured_capacity == 64 * CS

    run(tmp_path, body)


# --- O_DIRECT ----------------------------------------------------------------------------
def test_direct_io_on_disk_and_buffered_on_tmpfs(tmp_path: Path) -> None:
    seen: dict[str, bool] = {}
    data = blob(9, CS + 123)  # not a multiple of the block size
    d = digest(data)

    async def body(tier: NvmeTier) -> None:
        seen[str(tier.root)] = tier.direct
        assert tier.stats()["direct"] == tier.direct
        await tier.write(d, data)
        assert await tier.read(d) == data
        assert read_all(tier, d, len(data)) == data

    run(tmp_path / "disk", body)
    shm = Path("/dev/shm")
    if shm.is_dir() and fs_type(shm) == "tmpfs":
        import tempfile

        with tempfile.TemporaryDirectory(dir=shm) as tmp:
            run(Path(tmp), body)
            assert seen[tmp] is False
    disk_type = fs_type(tmp_path)
    if chunks.HAVE_EXT and disk_type in ("ext2/ext3", "xfs", "btrfs"):
        assert seen[str(tmp_path / "disk")] is True, disk_type


def resident_pages(path: str) -> int:
    """Pages of ``path`` in the page cache (util-linux ``fincore``)."""
    out = subprocess.run(
        ["fincore", "--noheadings", "--raw", "--output", "PAGES", path],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return int(out.split()[0])


def test_promotions_and_sealed_writes_bypass_the_page_cache_others_do_not(
    tmp_path: Path,
) -> None:
    """``promote`` (a fetched chunk) writes with O_DIRECT, from a page-aligned receive buffer
    or from plain bytes (bounced); ``write`` of a sealed chunk (``chunks.seal``: page-aligned,
    read-only) too; ``write`` of other buffers stays buffered. Nothing written direct lands
    in the page cache, everything reads back exactly, verified on a whole-chunk read."""
    size = 16 * CS + 123  # a partial last block too
    received = chunks.receive_buffer(size)
    received[:] = blob(21, size)
    plain, written, pieces = blob(22, size), blob(23, size), blob(25, size)
    sealed = chunks.seal([pieces[:1000], memoryview(pieces)[1000:]], size)
    assert sealed.readonly and sealed == pieces
    assert chunks.page_aligned(sealed) and not chunks.page_aligned(written)
    names = [digest(received), digest(plain), digest(sealed), digest(written)]

    async def body(tier: NvmeTier) -> None:
        assert tier.direct, "O_DIRECT must work on the test disk"
        await tier.promote(names[0], received)
        await tier.promote(names[1], plain)
        await tier.write(names[2], sealed)
        await tier.write(names[3], written)
        assert tier.stats()["direct_writes"] == 3
        paths = [tier.path_for(d) for d in names]
        assert [resident_pages(p) for p in paths[:3]] == [0, 0, 0]
        assert resident_pages(paths[3]) > 0
        for d, data in zip(names, (bytes(received), plain, pieces, written), strict=True):
            assert await tier.read(d) == data
            assert read_all(tier, d, size) == data

    run(tmp_path, body, capacity=256 * CS)


def test_promoted_chunks_are_verified_on_whole_reads(tmp_path: Path) -> None:
    """A promoted chunk corrupted on disk is caught by the next whole-chunk read (deleted)."""
    data = blob(24, 8 * CS)
    d = digest(data)

    async def body(tier: NvmeTier) -> None:
        await tier.promote(d, data)
        with open(tier.path_for(d), "r+b") as f:
            f.write(b"\xff")
        with pytest.raises(ChunkCorrupt):
            await tier.read(d)
        assert tier.chunk_size(d) is None and not os.path.exists(tier.path_for(d))

    run(tmp_path, body, capacity=256 * CS)


# --- concurrency -------------------------------------------------------------------------
@pytest.mark.race
def test_concurrent_thread_readers_and_loop_writers(tmp_path: Path) -> None:
    """FUSE-like reader threads hammer read_into while the loop writes and evicts:
    every answer is a miss or exactly the chunk's bytes, never a torn read or an error."""
    datas = [blob(i) for i in range(48)]
    names = [digest(x) for x in datas]
    errors: list[BaseException] = []
    hits = [0] * 4
    stop = threading.Event()
    ready: list[NvmeTier] = []

    def reader(slot: int) -> None:
        tier = ready[0]
        out = bytearray(CS)
        view = memoryview(out)
        i = slot
        try:
            while not stop.is_set():
                i = (i * 7 + 3) % len(names)
                n = tier.read_into(names[i], 0, view)
                if n is None:
                    continue
                if n != CS or out != datas[i]:
                    raise AssertionError(f"torn read of chunk {i}: {n} bytes")
                hits[slot] += 1
        except BaseException as exc:
            errors.append(exc)

    async def main() -> None:
        tier = await NvmeTier.open(config(tmp_path, capacity=16 * CS))
        ready.append(tier)
        threads = [threading.Thread(target=reader, args=(s,)) for s in range(4)]
        for t in threads:
            t.start()
        deadline = asyncio.get_running_loop().time() + 20
        rounds = 0
        try:
            # at least 3 rounds, and on until every reader has had hits (bounded)
            while rounds < 3 or (min(hits) < 50 and asyncio.get_running_loop().time() < deadline):
                rounds += 1
                await asyncio.gather(*(tier.write(n, x) for n, x in zip(names, datas, strict=True)))
                for n, x in zip(names[:8], datas, strict=False):
                    try:
                        assert await tier.read(n) == x
                    except ChunkNotFound:
                        pass  # evicted by a concurrent write: fine
                await asyncio.gather(*(tier.delete(n) for n in names[::5]))
                if errors:
                    break
        finally:
            stop.set()
            for t in threads:
                await asyncio.to_thread(t.join)
            st = tier.stats()
            await tier.close()
        assert not errors, errors
        assert min(hits) > 0, hits
        assert st["used"] <= 16 * CS
        assert st["evictions"] > 0
        assert st["used"] == sum(
            p.stat().st_size for p in (tmp_path / "chunks").rglob("*") if p.is_file()
        )

    asyncio.run(main())


# --- the hit path's descriptor cache -------------------------------------------------------
def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as exc:
        assert exc.errno == errno.EBADF
        return False
    return True


def test_hit_path_reuses_one_descriptor_per_chunk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sequential reader opens the chunk file once, not once per request."""
    data = blob(7)
    d = digest(data)
    opened: list[str] = []
    real_open = os.open

    def counting_open(path: Any, flags: int, *args: Any) -> int:
        if str(path).endswith(d):
            opened.append(str(path))
        return real_open(path, flags, *args)

    async def body(tier: NvmeTier) -> None:
        await tier.write(d, data)
        monkeypatch.setattr(os, "open", counting_open)
        got = bytearray()
        for off in range(0, CS, 512):
            out = bytearray(512)
            assert tier.read_into(d, off, memoryview(out)) == 512
            got += out
        assert bytes(got) == data
        assert len(opened) == 1

    run(tmp_path, body)


def _open_chunk_files(tier: NvmeTier) -> list[str]:
    """Names of the chunk files this process holds open (fd numbers get reused: use paths)."""
    names = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(tier.chunk_dir)):
            names.append(os.path.basename(target).removesuffix(" (deleted)"))
    return names


def test_descriptor_cache_is_bounded_and_closes_what_it_drops(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fastcache.tiers import nvme

    monkeypatch.setattr(nvme, "FD_CACHE", 32)
    blobs = [blob(100 + i) for i in range(nvme.FD_CACHE + 8)]
    names = [digest(b) for b in blobs]
    left: list[str] = []

    async def body(tier: NvmeTier) -> None:
        for b in blobs:
            await tier.write(digest(b), b)
        for b in blobs:
            out = bytearray(16)
            assert tier.read_into(digest(b), 0, memoryview(out)) == 16
            assert bytes(out) == b[:16]
        assert sorted(_open_chunk_files(tier)) == sorted(names[8:])  # the oldest were closed
        await tier.delete(names[-1])  # a deleted chunk loses its descriptor
        assert sorted(_open_chunk_files(tier)) == sorted(names[8:-1])
        assert tier.read_into(names[-1], 0, memoryview(bytearray(16))) is None
        left.append(str(tier.chunk_dir))

    run(tmp_path, body, capacity=len(blobs) * CS)
    assert not [n for n in os.listdir("/proc/self/fd") if _points_into(n, left[0])]


def _points_into(fd: str, directory: str) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith(directory)
    except OSError:
        return False


def test_eviction_during_a_read_does_not_break_the_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chunk is evicted (unlinked, uncached) while a reader is inside its pread."""
    first, second = blob(1), blob(2)
    d1 = digest(first)
    real_pread = chunks.pread_fd
    seen: list[int] = []

    async def body(tier: NvmeTier) -> None:
        await tier.write(d1, first)
        assert tier.read_into(d1, 0, memoryview(bytearray(8))) == 8  # cache the descriptor
        fd = tier._fds[d1].fd

        def evicting_pread(fd_: int, offset: int, out: memoryview) -> int:
            seen.append(fd_)
            if len(seen) == 1:  # another thread evicts the chunk right now
                tier._unlink_all(tier._reserve(digest(second), 2 * CS) or [])
                assert d1 not in tier and _fd_open(fd_)  # in use: not closed yet
            return real_pread(fd_, offset, out)

        monkeypatch.setattr(chunks, "pread_fd", evicting_pread)
        out = bytearray(CS)
        assert tier.read_into(d1, 0, memoryview(out)) == CS
        assert bytes(out) == first
        assert seen == [fd]
        assert _open_chunk_files(tier) == []  # the last reader closed it
        assert not os.path.exists(tier.path_for(d1))
        assert tier.read_into(d1, 0, memoryview(out)) is None

    run(tmp_path, body, capacity=2 * CS)


# --- power cuts: the boot id and lazy verification ----------------------------------------
def state(root: Path) -> dict[str, Any]:
    return json.loads((root / "nvme-state.json").read_text())


def simulate_power_cut(root: Path, *, clean: bool = False, boot_id: str = "another-boot") -> None:
    """What the disk holds after the machine rebooted: the record of the last open."""
    doc = {"version": 1, "boot_id": boot_id, "clean": clean, "verify": False}
    (root / "nvme-state.json").write_text(json.dumps(doc))


def chunk_path(root: Path, d: str) -> Path:
    return root / "chunks" / d[:2] / d[2:4] / d


def test_state_records_the_boot_and_a_clean_close(tmp_path: Path) -> None:
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()

    async def body(tier: NvmeTier) -> None:
        assert state(tmp_path) == {"version": 1, "boot_id": boot, "clean": False, "verify": False}
        await tier.write(digest(b"a"), b"a")

    run(tmp_path, body)
    assert state(tmp_path) == {"version": 1, "boot_id": boot, "clean": True, "verify": False}


def test_after_an_unclean_reboot_chunks_are_verified_lazily(tmp_path: Path) -> None:
    datas = [blob(i) for i in range(4)]
    a, b, c, d = (digest(x) for x in datas)

    async def write_all(tier: NvmeTier) -> None:
        for x in datas:
            await tier.write(digest(x), x)

    run(tmp_path, write_all)
    simulate_power_cut(tmp_path)
    chunk_path(tmp_path, b).write_bytes(bytes(CS))  # zeros where the data never landed
    with open(chunk_path(tmp_path, c), "r+b") as f:
        f.truncate(100)  # a short file

    async def check(tier: NvmeTier) -> None:
        assert tier.stats()["unverified"] == 4  # nothing hashed at open
        assert state(tmp_path)["verify"] is True
        assert tier.chunk_size(a) is None  # not trusted for sendfile yet
        assert read_all(tier, a) == datas[0]  # verified on first read, then trusted
        assert tier.chunk_size(a) == CS
        assert read_all(tier, b) is None  # zeros: dropped, a miss
        assert not chunk_path(tmp_path, b).exists() and b not in tier
        with pytest.raises(ChunkCorrupt):  # short: dropped by read() too
            await tier.read(c)
        assert c not in tier
        assert await tier.size(d) == CS  # size() verifies an unverified chunk
        st = tier.stats()
        assert st["unverified"] == 0 and st["corrupt"] == 2
        assert st["used"] == 2 * CS
        corrupt(tier.path_for(a))  # verified chunks are trusted: one pread, no hashing
        assert read_all(tier, a) != datas[0]

    run(tmp_path, check)
    assert state(tmp_path)["verify"] is False and state(tmp_path)["clean"] is True


def test_same_boot_or_clean_close_is_trusted(tmp_path: Path) -> None:
    data = blob(1)
    d = digest(data)
    run(tmp_path, lambda tier: tier.write(d, data))
    boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()

    async def trusted(tier: NvmeTier) -> None:
        assert tier.stats()["unverified"] == 0
        assert tier.chunk_size(d) == CS

    simulate_power_cut(tmp_path, clean=False, boot_id=boot)  # SIGKILL: page cache survived
    run(tmp_path, trusted)
    simulate_power_cut(tmp_path, clean=True)  # a reboot after a clean (synced) close
    run(tmp_path, trusted)


def test_verification_is_sticky_until_every_chunk_was_checked(tmp_path: Path) -> None:
    datas = [blob(i) for i in range(3)]
    names = [digest(x) for x in datas]

    async def write_all(tier: NvmeTier) -> None:
        for n, x in zip(names, datas, strict=True):
            await tier.write(n, x)

    run(tmp_path, write_all)
    simulate_power_cut(tmp_path)

    async def read_one(tier: NvmeTier) -> None:
        assert tier.stats()["unverified"] == 3
        assert read_all(tier, names[0]) == datas[0]

    run(tmp_path, read_one)  # closes cleanly, but two chunks are still unchecked
    assert state(tmp_path)["verify"] is True

    async def read_rest(tier: NvmeTier) -> None:
        assert tier.stats()["unverified"] == 3  # same boot, but the record says verify
        for n, x in zip(names, datas, strict=True):
            assert await tier.read(n) == x

    run(tmp_path, read_rest)
    assert state(tmp_path)["verify"] is False

    async def trusted(tier: NvmeTier) -> None:
        assert tier.stats()["unverified"] == 0

    run(tmp_path, trusted)


def test_missing_or_garbled_state_means_verify(tmp_path: Path) -> None:
    data = blob(2)
    d = digest(data)
    run(tmp_path, lambda tier: tier.write(d, data))

    async def unverified(tier: NvmeTier) -> None:
        assert tier.stats()["unverified"] == 1
        assert read_all(tier, d) == data
        assert tier.stats()["unverified"] == 0

    (tmp_path / "nvme-state.json").unlink()
    run(tmp_path, unverified)
    (tmp_path / "nvme-state.json").write_bytes(b'{"boot_id": "x", "cle')  # torn
    run(tmp_path, unverified)


def test_an_empty_cache_needs_no_verification(tmp_path: Path) -> None:
    async def body(tier: NvmeTier) -> None:
        assert tier.stats()["unverified"] == 0

    run(tmp_path, body)


def test_writing_an_unverified_chunk_replaces_the_file(tmp_path: Path) -> None:
    data = blob(3)
    d = digest(data)
    run(tmp_path, lambda tier: tier.write(d, data))
    simulate_power_cut(tmp_path)
    chunk_path(tmp_path, d).write_bytes(b"torn")

    async def body(tier: NvmeTier) -> None:
        assert tier.stats()["unverified"] == 1 and tier.stats()["used"] == 4
        await tier.write(d, data)  # a refetch: the caller's bytes replace the torn file
        assert tier.stats()["unverified"] == 0 and tier.stats()["used"] == CS
        assert chunk_path(tmp_path, d).read_bytes() == data
        assert read_all(tier, d) == data and tier.stats()["corrupt"] == 0

    run(tmp_path, body)


# --- listing -----------------------------------------------------------------------------
def test_entries_pages_in_digest_order(tmp_path: Path) -> None:
    datas = [blob(i, 100 + i) for i in range(10)]
    names = [digest(x) for x in datas]
    sizes = {digest(x): len(x) for x in datas}

    async def body(tier: NvmeTier) -> None:
        assert tier.entries(None, 5) == []
        for x in datas:
            await tier.write(digest(x), x)
        tier.pin(names[3])
        tier.pin(names[7])
        expected = [(n, sizes[n], n in (names[3], names[7])) for n in sorted(names)]
        assert tier.entries(None, 100) == expected
        got: list[tuple[str, int, bool]] = []
        after = None
        while page := tier.entries(after, 3):
            assert len(page) <= 3
            got += page
            after = page[-1][0]
        assert got == expected
        assert tier.entries(None, 0) == []
        assert tier.entries(sorted(names)[-1], 10) == []
        assert tier.entries("", 2) == expected[:2]
        read_all(tier, names[0])  # the LRU order does not change the listing
        assert tier.entries(None, 100) == expected

    run(tmp_path, body)
