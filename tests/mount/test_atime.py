"""Access times through real mounts: ``relatime`` by default, batched to the coordinator
(reads never wait on it), ``--noatime`` to turn them off."""

from __future__ import annotations

import os
import time
from pathlib import Path

from fastcache.testing.polling import wait_until
from tests.mount.conftest import MountCluster

DAY = 24 * 3600 * 10**9


def _age(path: Path, atime_days: float, mtime_days: float) -> tuple[int, int]:
    """Set the file's times as if last read and written that many days ago."""
    now = time.time_ns()
    times = (now - int(atime_days * DAY), now - int(mtime_days * DAY))
    os.utime(path, ns=times)
    return times


def test_a_read_moves_an_old_atime_once_and_other_nodes_see_it(
    cluster_factory: MountCluster,
) -> None:
    a = cluster_factory.add_node()
    b = cluster_factory.add_node()
    path = a.mnt / "read-me"
    path.write_bytes(b"content")
    old_atime, mtime = _age(path, atime_days=2, mtime_days=3)  # a day's worth of clock
    ctime = os.stat(path).st_ctime_ns

    before_read = time.time_ns()
    assert path.read_bytes() == b"content"
    moved = os.stat(path).st_atime_ns
    assert moved >= before_read > old_atime  # this node shows it at once
    assert os.stat(path).st_mtime_ns == mtime

    # relatime: the atime is now newer than mtime and ctime and younger than a day
    assert path.read_bytes() == b"content"
    assert os.stat(path).st_atime_ns == moved

    # the batch reaches the coordinator: the other node sees it, and nothing else moved
    wait_until(lambda: os.stat(b.mnt / "read-me").st_atime_ns == moved, 20, message="atime")
    seen = os.stat(b.mnt / "read-me")
    assert (seen.st_mtime_ns, seen.st_ctime_ns) == (mtime, ctime)


def test_a_read_after_a_write_moves_the_atime(cluster_factory: MountCluster) -> None:
    """An atime older than the last write moves on the next read, however recent."""
    a = cluster_factory.add_node()
    path = a.mnt / "written"
    path.write_bytes(b"one")
    now = time.time_ns()
    os.utime(path, ns=(now - 10**9, now))  # read a second before the last write
    assert path.read_bytes() == b"one"
    assert os.stat(path).st_atime_ns >= now


def test_noatime_leaves_atimes_alone(cluster_factory: MountCluster) -> None:
    a = cluster_factory.add_node_with(["--noatime"])
    path = a.mnt / "untouched"
    path.write_bytes(b"content")
    old_atime, _ = _age(path, atime_days=2, mtime_days=3)
    assert path.read_bytes() == b"content"
    assert os.stat(path).st_atime_ns == old_atime
