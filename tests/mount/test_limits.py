"""The maximum file size through a real mount: EFBIG at once beyond it, everything up to it.

The mount fixture chunks by 1 MiB, so its files may hold ``max_file_size(1 MiB)`` = 16 GiB
(``model.MAX_MANIFEST_CHUNKS`` chunks).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import subprocess
from pathlib import Path

import pytest

from fastcache.coordinator.model import max_file_size

MiB = 1 << 20
LIMIT = max_file_size(MiB)
HUGE = [
    (1 << 63) - 1,  # the largest off_t: what the kernel lets through to FUSE
    7 << 60,  # truncate -s 7E (16E does not fit an off_t: truncate(1) refuses it itself)
    1 << 62,
    1 << 40,  # 1 TiB
    LIMIT + 1,
]


def errno_of(fn: object, *args: object) -> int:
    with pytest.raises(OSError) as info:
        fn(*args)  # type: ignore[operator]
    return info.value.errno or 0


@pytest.fixture
def f(workdir: Path) -> Path:
    path = workdir / "f"
    path.write_bytes(b"head")
    return path


@pytest.mark.parametrize("size", HUGE, ids=hex)
def test_truncate_beyond_the_maximum_is_efbig(f: Path, size: int) -> None:
    assert errno_of(os.truncate, f, size) == errno.EFBIG
    fd = os.open(f, os.O_RDWR)
    try:
        assert errno_of(os.ftruncate, fd, size) == errno.EFBIG
    finally:
        os.close(fd)
    assert f.read_bytes() == b"head"  # unchanged, committed or not


def test_truncate_command(f: Path) -> None:
    done = subprocess.run(["truncate", "-s", "7E", str(f)], capture_output=True, text=True)
    assert done.returncode == 1
    assert os.strerror(errno.EFBIG) in done.stderr
    assert f.stat().st_size == 4


def test_truncate_to_the_maximum(f: Path) -> None:
    os.truncate(f, LIMIT)
    st = f.stat()
    assert (st.st_size, st.st_blocks) == (LIMIT, MiB // 512)  # the first chunk; holes are free
    fd = os.open(f, os.O_RDWR)
    try:
        assert os.pread(fd, 8, 0) == b"head" + bytes(4)
        assert os.pread(fd, 2 * MiB, LIMIT - MiB - 5) == bytes(MiB + 5)  # across the last edge
        assert os.pread(fd, 10, LIMIT) == b""
        assert os.pwrite(fd, b"tail", LIMIT - 4) == 4
        assert errno_of(os.pwrite, fd, b"x", LIMIT) == errno.EFBIG
    finally:
        os.close(fd)
    with open(f, "rb") as again:
        again.seek(LIMIT - 8)
        assert again.read() == bytes(4) + b"tail"
    os.truncate(f, 3)
    assert f.read_bytes() == b"hea"


def test_write_at_the_maximum_is_efbig(f: Path) -> None:
    fd = os.open(f, os.O_RDWR)
    try:
        for offset in (LIMIT, LIMIT + 1, 1 << 62):
            assert errno_of(os.pwrite, fd, b"x" * 4096, offset) == errno.EFBIG
        # across it: cut short at the limit, as Linux does for its own limits
        assert os.pwrite(fd, b"y" * 8192, LIMIT - 4096) == 4096
        assert os.fstat(fd).st_size == LIMIT
        assert os.pread(fd, 8192, LIMIT - 4096) == b"y" * 4096
        os.ftruncate(fd, 0)
    finally:
        os.close(fd)
    assert f.stat().st_size == 0


def test_fallocate_beyond_the_maximum(f: Path) -> None:
    """FUSE 2 (llfuse 1.x) has no fallocate: the kernel answers EOPNOTSUPP for the system
    call, and glibc's posix_fallocate falls back to writing a byte per block, which the
    limit stops with EFBIG."""
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
    fd = os.open(f, os.O_RDWR)
    try:
        assert libc.fallocate(fd, 0, LIMIT, 4096) == -1
        assert ctypes.get_errno() == errno.EOPNOTSUPP
        assert libc.fallocate(fd, 0, 1 << 62, 1 << 62) == -1  # past any off_t: the kernel
        assert ctypes.get_errno() == errno.EFBIG
        assert errno_of(os.posix_fallocate, fd, LIMIT, 4096) == errno.EFBIG
    finally:
        os.close(fd)
    assert f.stat().st_size == 4
