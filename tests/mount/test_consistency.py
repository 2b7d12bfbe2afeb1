"""Two client nodes, one coordinator, one S3: what one node closes, the other opens."""

from __future__ import annotations

import ctypes
import hashlib
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from fastcache.testing.polling import wait_until
from tests.mount.conftest import MountCluster, Node
from tests.mount.test_metrics import scrape

MiB = 1 << 20
LIBC = ctypes.CDLL(None, use_errno=True)  # mmap without the dup of Python's mmap module
LIBC.mmap.restype = ctypes.c_void_p
LIBC.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
LIBC.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]


@pytest.fixture
def pair(two_nodes: MountCluster, request: pytest.FixtureRequest) -> tuple[Path, Path]:
    """The same fresh directory as seen from node A and from node B."""
    name = request.node.name.replace("[", "_").replace("]", "_")
    a, b = (node.mnt / name for node in two_nodes.nodes)
    a.mkdir()
    wait_until(b.is_dir, 10, message="directory visible on node B")
    return a, b


def test_close_to_open_across_nodes(pair: tuple[Path, Path]) -> None:
    a, b = pair
    (a / "f").write_bytes(b"1" * (3 * MiB))
    assert (b / "f").read_bytes() == b"1" * (3 * MiB)  # B's kernel now caches these pages
    for version in (b"2", b"3"):
        (a / "f").write_bytes(version * (3 * MiB))  # same size: only the content changes
        # close() returned on A, so an open() on B sees the new bytes at once
        assert (b / "f").read_bytes() == version * (3 * MiB)


def test_stat_follows_within_attr_timeout(pair: tuple[Path, Path], two_nodes: MountCluster) -> None:
    a, b = pair
    (a / "s").write_bytes(b"x")
    assert (b / "s").stat().st_size == 1
    (a / "s").write_bytes(b"y" * 5000)
    os.chmod(a / "s", 0o600)
    timeout = 2 * two_nodes.attr_timeout + 5  # node cache + kernel cache, plus slack
    wait_until(lambda: (b / "s").stat().st_size == 5000, timeout, message="size on B")
    wait_until(lambda: (b / "s").stat().st_mode & 0o777 == 0o600, timeout, message="mode on B")
    (a / "s").rename(a / "s2")
    wait_until(lambda: not (b / "s").exists(), timeout, message="rename seen on B")
    assert (b / "s2").read_bytes() == b"y" * 5000


def test_parallel_writers_on_both_nodes(pair: tuple[Path, Path]) -> None:
    a, b = pair

    def write(i: int) -> str:
        root = a if i % 2 == 0 else b
        data = hashlib.sha256(str(i).encode()).digest() * (40_000 + 997 * i)
        (root / f"w{i}").write_bytes(data)
        return hashlib.sha256(data).hexdigest()

    with ThreadPoolExecutor(8) as pool:
        digests = list(pool.map(write, range(8)))
    for i, want in enumerate(digests):
        for root in (a, b):
            assert hashlib.sha256((root / f"w{i}").read_bytes()).hexdigest() == want
    assert sorted(os.listdir(a)) == sorted(os.listdir(b)) == sorted(f"w{i}" for i in range(8))


def test_reader_sees_all_old_or_all_new(pair: tuple[Path, Path]) -> None:
    """A reader on B keeps the content it opened while A rewrites the file over and over."""
    a, b = pair
    size = 3 * MiB + 100
    (a / "r").write_bytes(b"\x00" * size)
    stop = threading.Event()
    rewrites = []

    def rewriter() -> None:
        n = 1
        while not stop.is_set():
            (a / "r").write_bytes(bytes([n % 251]) * size)
            rewrites.append(n)
            n += 1

    thread = threading.Thread(target=rewriter)
    thread.start()
    try:
        seen = set()
        for _ in range(15):
            with open(b / "r", "rb") as f:
                first = f.read(1000)
                wait_until(lambda: len(rewrites) >= 1, 30, message="a rewrite")
                rest = f.read()
            data = first + rest
            assert len(data) == size
            assert data.count(data[:1]) == size, "a reader saw a mix of two versions"
            seen.add(data[:1])
    finally:
        stop.set()
        thread.join()
    assert len(seen) > 1  # the reader did see the file change between its opens


def test_append_on_one_node_read_on_the_other(pair: tuple[Path, Path]) -> None:
    a, b = pair
    for i in range(5):
        with open(a / "log", "ab") as f:
            f.write(f"line {i}\n".encode())
        assert (b / "log").read_bytes().splitlines()[-1] == f"line {i}".encode()


def releases(node: Node) -> float:
    """How many FUSE releases ``node`` has handled (each counted once it returned)."""
    samples = scrape(node.proc.url, token=None)
    return samples.get(("fastcache_fuse_op_seconds_count", (("op", "release"),)), 0.0)


def test_closes_during_a_rewrite_commit_nothing_half_way(
    pair: tuple[Path, Path], two_nodes: MountCluster
) -> None:
    """The kernel releases a handle after its last ``close`` returned (here: when its mapping
    goes), so a rewrite's ``open(O_TRUNC)`` may have emptied the file by then (the race
    behind the torn reads above); a reader's ``close`` may come at any time. Neither
    commits what it did not change: node B reads the old content until the rewrite closes,
    never an empty or half-written file."""
    a, b = pair
    node_a = two_nodes.nodes[0]
    old, new = b"o" * 100_000, b"n" * 100_000
    (a / "m").write_bytes(old)
    fd = os.open(a / "m", os.O_RDONLY)
    addr = LIBC.mmap(None, len(old), mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    assert addr != ctypes.c_void_p(-1).value, os.strerror(ctypes.get_errno())
    os.close(fd)  # its flush; the mapping holds the handle open
    with open(a / "m", "wb", buffering=0) as rewrite:  # emptied on node A, not committed
        before = releases(node_a)
        assert LIBC.munmap(addr, len(old)) == 0  # the mapped handle's release, alone
        wait_until(lambda: releases(node_a) > before, 30, message="the mapped handle released")
        assert (b / "m").read_bytes() == old
        rewrite.write(new[:50_000])
        os.close(os.open(a / "m", os.O_RDONLY))  # a reader's flush and release
        assert (b / "m").read_bytes() == old
        rewrite.write(new[50_000:])
    assert (b / "m").read_bytes() == new
