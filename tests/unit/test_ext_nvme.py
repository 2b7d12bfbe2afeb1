"""Chunk-file I/O of the compiled ``_nvme`` module (and its fallbacks in ``chunks``)."""

from __future__ import annotations

import errno
import os
import resource
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from fastcache import _nvme, chunks
from fastcache._nvme import AlignedBuffer
from tests.unit.test_chunks import releases_gil

MiB = 1 << 20
SIZES = [0, 1, 4095, 4096, 4097, 4 * MiB + 3]
DISK_FILESYSTEMS = {"ext2/ext3", "ext4", "xfs", "btrfs"}  # names `stat -f -c %T` prints


def fs_type(path: Path) -> str:
    return subprocess.run(
        ["stat", "-f", "-c", "%T", str(path)], check=True, capture_output=True, text=True
    ).stdout.strip()


def payload(size: int, seed: int = 0) -> bytes:
    return np.random.default_rng(seed + size).bytes(size)


@pytest.fixture
def disk_dir(tmp_path: Path) -> Path:
    """A directory on a disk filesystem, where O_DIRECT really bypasses the page cache."""
    kind = fs_type(tmp_path)
    if kind not in DISK_FILESYSTEMS:
        pytest.skip(f"the test temp directory is on {kind}, not a disk filesystem")
    return tmp_path


@pytest.fixture
def tmpfs_dir(tmp_path: Path) -> Iterator[Path]:
    shm = Path("/dev/shm")
    if not shm.is_dir() or fs_type(shm) != "tmpfs":
        pytest.skip("/dev/shm is not a tmpfs here")
    d = shm / f"fastcache-test-{os.getpid()}-{tmp_path.name}"
    d.mkdir()
    yield d
    for child in d.iterdir():
        child.unlink()
    d.rmdir()


def test_probe_direct_on_disk(disk_dir: Path) -> None:
    assert _nvme.probe_direct(disk_dir) is True
    assert chunks.probe_direct(str(disk_dir)) is True or not chunks.HAVE_EXT
    assert list(disk_dir.iterdir()) == []  # the probe file is gone


def test_probe_direct_on_tmpfs(tmpfs_dir: Path) -> None:
    assert _nvme.probe_direct(tmpfs_dir) is False
    assert list(tmpfs_dir.iterdir()) == []


def test_probe_direct_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(OSError) as info:
        _nvme.probe_direct(tmp_path / "missing")
    assert info.value.errno == errno.ENOENT


# --- atomic writes -------------------------------------------------------------------------
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
@pytest.mark.parametrize("where", ["disk", "tmpfs"])
def test_write_file_atomic_round_trip(
    size: int, direct: bool, where: str, request: pytest.FixtureRequest
) -> None:
    directory: Path = request.getfixturevalue(f"{where}_dir")
    data = payload(size)
    target = directory / "chunk"
    _nvme.write_file_atomic(str(target), data, direct)
    assert target.stat().st_size == size
    assert target.read_bytes() == data
    assert _nvme.read_file(target) == data
    assert [p.name for p in directory.iterdir()] == ["chunk"]  # no temp file left
    # overwriting is atomic too, and a shorter file leaves no stale bytes
    _nvme.write_file_atomic(target, data[: size // 2], direct)
    assert target.read_bytes() == data[: size // 2]
    assert [p.name for p in directory.iterdir()] == ["chunk"]


@pytest.mark.parametrize("size", [4096, 3 * 4096, 2 * MiB + 4097])
def test_write_direct_from_aligned_and_unaligned_sources(disk_dir: Path, size: int) -> None:
    data = payload(size, seed=1)
    aligned = AlignedBuffer(size)
    memoryview(aligned)[:] = data
    _nvme.write_file_atomic(disk_dir / "aligned", aligned, True)  # written in place
    assert (disk_dir / "aligned").read_bytes() == data
    unaligned = memoryview(b"x" + data)[1:]  # bounced through the aligned scratch buffer
    _nvme.write_file_atomic(disk_dir / "unaligned", unaligned, True)
    assert (disk_dir / "unaligned").read_bytes() == data
    big = np.frombuffer(payload(9 * MiB + 5, seed=2), dtype=np.uint8)  # > scratch buffer
    _nvme.write_file_atomic(disk_dir / "big", big, True)
    assert (disk_dir / "big").read_bytes() == big.tobytes()


@pytest.mark.parametrize("direct", [True, False])
def test_write_into_missing_directory_fails_cleanly(tmp_path: Path, direct: bool) -> None:
    with pytest.raises(OSError) as info:
        _nvme.write_file_atomic(tmp_path / "missing" / "chunk", b"data", direct)
    assert info.value.errno == errno.ENOENT
    assert isinstance(info.value, FileNotFoundError)  # the NVMe tier relies on the subclass
    assert info.value.filename == str(tmp_path / "missing" / "chunk")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("direct", [True, False])
def test_failed_rename_removes_the_temp_file(tmp_path: Path, direct: bool) -> None:
    (tmp_path / "chunk").mkdir()
    (tmp_path / "chunk" / "occupied").write_bytes(b"")
    with pytest.raises(OSError) as info:
        _nvme.write_file_atomic(tmp_path / "chunk", payload(5000), direct)
    assert info.value.errno in (errno.EISDIR, errno.ENOTEMPTY)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chunk"]


def test_write_rejects_non_buffers(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        _nvme.write_file_atomic(tmp_path / "chunk", "text", False)  # type: ignore[arg-type]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("size", [0, 1, 4097])
def test_compiled_and_fallback_writes_agree(tmp_path: Path, size: int) -> None:
    data = payload(size, seed=3)
    chunks._write_chunk_file_py(str(tmp_path / "py"), data)
    _nvme.write_file_atomic(tmp_path / "c", data, False)
    assert (tmp_path / "py").read_bytes() == (tmp_path / "c").read_bytes() == data
    assert chunks._read_chunk_file_py(str(tmp_path / "c")) == _nvme.read_file(tmp_path / "py")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c", "py"]


def test_fallback_write_failure_leaves_nothing(tmp_path: Path) -> None:
    (tmp_path / "chunk").mkdir()
    (tmp_path / "chunk" / "x").write_bytes(b"")
    with pytest.raises(OSError):
        chunks._write_chunk_file_py(str(tmp_path / "chunk"), b"data")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["chunk"]


# --- reads ---------------------------------------------------------------------------------------
@pytest.fixture
def chunk_file(tmp_path: Path) -> tuple[Path, bytes]:
    data = payload(100_000, seed=4)
    path = tmp_path / "chunk"
    path.write_bytes(data)
    return path, data


@pytest.mark.parametrize(
    ("offset", "length"),
    [(0, 0), (0, 4096), (1, 4095), (12345, 50_000), (99_990, 10), (99_990, 100), (100_000, 8)],
)
def test_pread_into(chunk_file: tuple[Path, bytes], offset: int, length: int) -> None:
    path, data = chunk_file
    expected = data[offset : offset + length]
    for out in (bytearray(length), np.zeros(length, dtype=np.uint8), AlignedBuffer(length)):
        got = _nvme.pread_into(path, offset, out)
        assert got == len(expected)
        assert bytes(memoryview(out)[:got]) == expected
    view = memoryview(bytearray(length + 6))[3 : 3 + length]
    assert _nvme.pread_into(str(path), offset, view) == len(expected)
    fallback = bytearray(length)
    assert chunks._pread_into_py(str(path), offset, fallback) == len(expected)
    assert bytes(fallback[: len(expected)]) == expected


def test_pread_past_eof_and_errors(chunk_file: tuple[Path, bytes], tmp_path: Path) -> None:
    path, _ = chunk_file
    assert _nvme.pread_into(path, 10**9, bytearray(10)) == 0
    with pytest.raises(FileNotFoundError) as info:
        _nvme.pread_into(tmp_path / "missing", 0, bytearray(10))
    assert info.value.errno == errno.ENOENT
    with pytest.raises(ValueError):
        _nvme.pread_into(path, -1, bytearray(10))
    with pytest.raises((TypeError, ValueError, BufferError)):
        _nvme.pread_into(path, 0, b"read-only")  # type: ignore[arg-type]


def test_pread_fd(chunk_file: tuple[Path, bytes]) -> None:
    path, data = chunk_file
    fd = os.open(path, os.O_RDONLY)
    try:
        out = bytearray(1000)
        assert _nvme.pread_fd(fd, 500, out) == 1000
        assert bytes(out) == data[500:1500]
        assert chunks.pread_fd(fd, 99_500, out) == 500
        assert bytes(out[:500]) == data[99_500:]
        assert chunks._pread_fd_py(fd, 99_500, out) == 500
    finally:
        os.close(fd)
    with pytest.raises(OSError) as info:
        _nvme.pread_fd(fd, 0, bytearray(1))
    assert info.value.errno == errno.EBADF


@pytest.mark.parametrize("size", SIZES)
def test_read_file(tmp_path: Path, size: int) -> None:
    data = payload(size, seed=5)
    (tmp_path / "f").write_bytes(data)
    got = _nvme.read_file(tmp_path / "f")
    assert type(got) is bytes and got == data
    assert chunks.read_chunk_file(str(tmp_path / "f")) == data


def test_read_file_missing(tmp_path: Path) -> None:
    with pytest.raises(OSError) as info:
        _nvme.read_file(tmp_path / "missing")
    assert info.value.errno == errno.ENOENT


# --- aligned buffers and mappings ----------------------------------------------------------------
@pytest.mark.parametrize("size", [0, 1, 4096, 4097, 3 * MiB])
@pytest.mark.parametrize("alignment", [4096, 65536])
def test_aligned_buffer(size: int, alignment: int) -> None:
    buf = AlignedBuffer(size, alignment)
    assert len(buf) == buf.size == size and buf.alignment == alignment
    view = memoryview(buf)
    assert not view.readonly and view.nbytes == size
    assert bytes(view) == bytes(size)  # zeroed
    if size:
        array = np.frombuffer(buf, dtype=np.uint8)
        assert array.ctypes.data % alignment == 0
        assert array.ctypes.data == buf.address
        view[-1] = 7
        assert array[-1] == 7


def test_aligned_buffer_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError):
        AlignedBuffer(10, 3000)
    with pytest.raises(ValueError):
        AlignedBuffer(-1)


def test_chunks_aligned_buffer_helper() -> None:
    buf = chunks.aligned_buffer(8192)
    assert np.frombuffer(buf, dtype=np.uint8).ctypes.data % 4096 == 0
    assert len(memoryview(buf)) == 8192


def test_receive_buffers_are_reused_and_zeroed_buffers_never() -> None:
    """A freed receive buffer (``zero=False``) is handed out again to the next one of its
    size (no fresh pages to fault in); a zeroed buffer always comes back zeroed."""
    first = AlignedBuffer(4 * MiB, 4096, False)
    address = first.address
    memoryview(first)[:] = b"\x5a" * (4 * MiB)
    del first
    again = AlignedBuffer(4 * MiB, 4096, False)
    assert again.address == address
    other = AlignedBuffer(4 * MiB + 4096, 4096, False)  # another size: not that one
    assert other.address != address
    del again
    zeroed = AlignedBuffer(4 * MiB)
    assert bytes(memoryview(zeroed)) == bytes(4 * MiB)  # whatever memory it got
    held = [AlignedBuffer(MiB, 4096, False) for _ in range(20)]  # more than are kept
    addresses = {b.address for b in held}
    del held
    assert len({AlignedBuffer(MiB, 4096, False).address for _ in range(3)} & addresses) >= 1


def test_chunks_receive_buffer_is_page_aligned() -> None:
    view = chunks.receive_buffer(4 * MiB + 1)
    assert len(view) == 4 * MiB + 1 and not view.readonly
    assert np.frombuffer(view, dtype=np.uint8).ctypes.data % 4096 == 0


@pytest.mark.parametrize("size", [0, 1, 4097, 4 * MiB + 3])
def test_mmap_read(tmp_path: Path, size: int) -> None:
    data = payload(size, seed=6)
    (tmp_path / "f").write_bytes(data)
    mapped = _nvme.mmap_read(tmp_path / "f")
    assert len(mapped) == size
    view = memoryview(mapped)
    assert view.readonly and bytes(view) == data
    with pytest.raises(BufferError):
        mapped.close()  # a view is alive
    view.release()
    mapped.close()
    mapped.close()  # idempotent
    assert mapped.closed
    with pytest.raises(ValueError):
        memoryview(mapped)
    with chunks.map_chunk_file(str(tmp_path / "f")) as again:
        assert bytes(memoryview(again)) == data


def test_mmap_read_missing(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        _nvme.mmap_read(tmp_path / "missing")


def test_public_io_falls_back_without_extension(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = payload(4097, seed=9)
    monkeypatch.setattr(chunks, "_nvme", None)
    assert chunks.probe_direct(str(tmp_path)) is False
    chunks.write_chunk_file(str(tmp_path / "c"), data, True)
    assert [p.name for p in tmp_path.iterdir()] == ["c"]
    assert chunks.read_chunk_file(str(tmp_path / "c")) == data
    out = bytearray(100)
    assert chunks.pread_into(str(tmp_path / "c"), 4000, out) == 97
    assert bytes(out[:97]) == data[4000:]
    with chunks.map_chunk_file(str(tmp_path / "c")) as mapped:
        assert bytes(memoryview(mapped)) == data
    (tmp_path / "empty").write_bytes(b"")
    with chunks.map_chunk_file(str(tmp_path / "empty")) as mapped:
        assert len(mapped) == 0
    buf = chunks.aligned_buffer(8192)
    assert np.frombuffer(buf, dtype=np.uint8).ctypes.data % 4096 == 0


def test_io_releases_the_gil(tmp_path: Path) -> None:
    data = payload(32 * MiB, seed=10)
    path = tmp_path / "big"
    path.write_bytes(data)
    out = bytearray(len(data))
    assert releases_gil(lambda: _nvme.pread_into(path, 0, out))
    assert releases_gil(lambda: _nvme.write_file_atomic(tmp_path / "w", data, False), 50)


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_failure_mid_write_raises_errno_and_cleans_up(tmp_path: Path, direct: bool) -> None:
    """A write that fails half-way (here: the file-size limit, EFBIG, standing in for ENOSPC)
    surfaces the C errno and leaves no temp file."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (MiB, hard))  # Python ignores SIGXFSZ
    try:
        with pytest.raises(OSError) as info:
            _nvme.write_file_atomic(tmp_path / "chunk", payload(4 * MiB + 3), direct)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert info.value.errno == errno.EFBIG
    assert list(tmp_path.iterdir()) == []


# --- syncing is opt-in ----------------------------------------------------------------------
def _syncs_of(code: str) -> list[str]:
    """The fsync-family system calls a fresh interpreter makes running ``code``."""
    import shutil
    import sys

    if shutil.which("strace") is None:
        pytest.skip("strace is not installed")
    traced = subprocess.run(
        [
            "strace",
            "-f",
            "-qq",
            "-e",
            "trace=fsync,fdatasync,syncfs,sync",
            sys.executable,
            "-c",
            code,
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    return [line for line in traced.stderr.splitlines() if "sync(" in line]


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "buffered"])
def test_write_file_atomic_syncs_only_when_asked(tmp_path: Path, direct: bool) -> None:
    code = (
        "from fastcache import _nvme\n"
        f"_nvme.write_file_atomic({str(tmp_path / 'a')!r}, b'x' * 5000, {direct})\n"
        f"_nvme.write_file_atomic({str(tmp_path / 'b')!r}, b'x' * 5000, {direct}, False)\n"
    )
    assert _syncs_of(code) == []
    code = (
        "from fastcache import _nvme\n"
        f"_nvme.write_file_atomic({str(tmp_path / 'c')!r}, b'x' * 5000, {direct}, True)\n"
    )
    syncs = _syncs_of(code)
    assert any("fdatasync(" in s for s in syncs) and any("fsync(" in s for s in syncs)
    for name in "abc":
        assert (tmp_path / name).read_bytes() == b"x" * 5000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "c"]


@pytest.mark.parametrize("sync", [False, True])
def test_fallback_write_syncs_only_when_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, sync: bool
) -> None:
    calls: list[str] = []
    real_fdatasync, real_fsync = os.fdatasync, os.fsync
    monkeypatch.setattr(os, "fdatasync", lambda fd: (calls.append("fdatasync"), real_fdatasync(fd)))
    monkeypatch.setattr(os, "fsync", lambda fd: (calls.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr(chunks, "_nvme", None)
    chunks.write_chunk_file(str(tmp_path / "c"), b"data", False, sync=sync)
    assert (tmp_path / "c").read_bytes() == b"data"
    assert calls == (["fdatasync", "fsync"] if sync else [])
    assert [p.name for p in tmp_path.iterdir()] == ["c"]


@pytest.mark.parametrize("sync", [False, True])
def test_public_write_passes_sync_to_the_extension(tmp_path: Path, sync: bool) -> None:
    chunks.write_chunk_file(str(tmp_path / "c"), payload(4097), True, sync=sync)
    assert (tmp_path / "c").read_bytes() == payload(4097)
