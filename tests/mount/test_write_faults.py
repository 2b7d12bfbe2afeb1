"""Faults on the write path (DESIGN §1): nothing acknowledged is lost when the coordinator,
S3 or the client itself dies; chunking by content works through the mount."""

from __future__ import annotations

import errno
import os
import signal
import time

import pytest

from tests.helpers import wait_until
from tests.integration.cluster import http
from tests.mount.conftest import MountCluster

MiB = 1 << 20
COMMIT_TIMEOUT = 2.0


def manifest_of(mc: MountCluster, path: str) -> dict:
    answer = http("GET", f"{mc.cluster.coordinator_url}/api/ns/resolve?path={path}")
    assert answer.status == 200, answer.body
    return answer.json()["manifest"]


def test_coordinator_killed_nothing_acknowledged_lost(cluster_factory: MountCluster) -> None:
    a = cluster_factory.add_node_with(["--commit-timeout", str(COMMIT_TIMEOUT)])
    before = {f"before-{i}": os.urandom(300_000 + i) for i in range(10)}
    for name, data in before.items():
        (a.mnt / name).write_bytes(data)  # close() returned: acknowledged
    late = os.urandom(3 * MiB + 7)
    fd = os.open(a.mnt / "closed-while-down", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, late)

    coordinator = cluster_factory.cluster.coordinator
    assert coordinator is not None
    coordinator.kill()  # SIGKILL: nothing flushed, nothing said goodbye
    start = time.monotonic()
    with pytest.raises(OSError) as failed:
        os.close(fd)  # cannot reach the coordinator: EIO after --commit-timeout, kept
    assert failed.value.errno == errno.EIO
    assert time.monotonic() - start < 60, "close() must give up within its bound"

    cluster_factory.cluster.start_coordinator()  # same port, same state dir
    b = cluster_factory.add_node()
    for name, data in before.items():
        assert (b.mnt / name).read_bytes() == data
    # The kept commit lands by itself: no remount, no new write on node A.
    wait_until(
        lambda: manifest_of(cluster_factory, "/closed-while-down")["size"] == len(late),
        60,
        message="the commit kept during the outage landed",
    )
    assert (b.mnt / "closed-while-down").read_bytes() == late


def test_kept_commit_survives_a_client_restart(cluster_factory: MountCluster) -> None:
    a = cluster_factory.add_node_with(["--commit-timeout", str(COMMIT_TIMEOUT)])
    data = os.urandom(2 * MiB + 11)
    fd = os.open(a.mnt / "owed", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, data)
    coordinator = cluster_factory.cluster.coordinator
    assert coordinator is not None
    coordinator.kill()
    with pytest.raises(OSError):
        os.close(fd)
    cluster_factory.kill_node(a)  # the client dies too: only its journal remembers
    cluster_factory.cluster.start_coordinator()
    cluster_factory.add_node_with(["--commit-timeout", str(COMMIT_TIMEOUT)], nvme=a.nvme)
    wait_until(
        lambda: manifest_of(cluster_factory, "/owed")["size"] == len(data),
        60,
        message="the journaled commit replayed after the restart",
    )
    fresh = cluster_factory.add_node()
    assert (fresh.mnt / "owed").read_bytes() == data


def test_s3_frozen_writes_land_fsync_is_bounded(cluster_factory: MountCluster, s3: object) -> None:
    server = s3.server  # type: ignore[attr-defined]
    a = cluster_factory.add_node_with(["--fsync-timeout", "3"])
    files = {f"while-frozen-{i}": os.urandom(MiB + i) for i in range(5)}
    os.kill(server.pid, signal.SIGSTOP)
    try:
        for name, data in files.items():
            (a.mnt / name).write_bytes(data)  # NVMe takes them: close() does not wait on S3
        fd = os.open(a.mnt / "while-frozen-0", os.O_RDONLY)
        try:
            with pytest.raises(OSError) as failed:
                os.fsync(fd)  # S3 cannot have it: fsync says so, within its bound
            assert failed.value.errno == errno.EIO
        finally:
            os.close(fd)
    finally:
        os.kill(server.pid, signal.SIGCONT)
    fd = os.open(a.mnt / "while-frozen-4", os.O_RDONLY)
    try:
        os.fsync(fd)  # S3 is back: now it succeeds
    finally:
        os.close(fd)
    for name in files:
        fd = os.open(a.mnt / name, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    cluster_factory.kill_node(a)
    fresh = cluster_factory.add_node()  # empty NVMe, no peer: every byte from S3
    for name, data in files.items():
        assert (fresh.mnt / name).read_bytes() == data


def test_client_killed_mid_write_keeps_every_closed_file(cluster_factory: MountCluster) -> None:
    a = cluster_factory.add_node()
    closed = {f"small-{i}": os.urandom(4096 + i) for i in range(40)}
    for name, data in closed.items():
        (a.mnt / name).write_bytes(data)
    big_old = os.urandom(3 * MiB)
    (a.mnt / "big").write_bytes(big_old)
    fd = os.open(a.mnt / "big", os.O_WRONLY)  # rewritten in place, killed before close
    for _ in range(20):
        os.write(fd, os.urandom(MiB))
    cluster_factory.kill_node(a)
    with pytest.raises(OSError):
        os.close(fd)  # the mount is gone with its process
    again = cluster_factory.add_node(nvme=a.nvme)
    for name, data in closed.items():
        assert (again.mnt / name).read_bytes() == data
    assert (again.mnt / "big").read_bytes() == big_old  # old content, never a mix
    assert sorted(p.name for p in again.mnt.iterdir()) == sorted([*closed, "big"])


def test_hole_extension_costs_nothing(cluster_factory: MountCluster) -> None:
    a = cluster_factory.add_node()
    path = a.mnt / "sparse"
    with open(path, "wb") as f:
        f.write(b"head")
        f.truncate(16 << 30)  # 16 GiB of hole: no chunk hashed, stored or uploaded
    assert path.stat().st_size == 16 << 30
    with open(path, "rb") as f:
        assert f.read(4) == b"head"
        f.seek((16 << 30) - 5)
        assert f.read() == bytes(5)
    stats = http("GET", f"{a.proc.url}/api/cache/stats").json()
    assert stats["writeback"]["pending"] + stats["writeback"]["uploaded"] <= 1


def test_cdc_through_the_mount_keeps_chunks_of_an_edited_file(
    cluster_factory: MountCluster,
) -> None:
    a = cluster_factory.add_node_with(["--chunking", "cdc"])
    data = bytearray(os.urandom(12 * MiB))
    (a.mnt / "cdc").write_bytes(data)
    first = manifest_of(cluster_factory, "/cdc")
    assert first.get("lengths"), "a CDC manifest names each chunk's length"
    with open(a.mnt / "cdc", "r+b") as f:
        f.seek(6 * MiB)
        f.write(b"an edit in the middle")
    data[6 * MiB : 6 * MiB + 21] = b"an edit in the middle"
    second = manifest_of(cluster_factory, "/cdc")
    kept = set(first["chunks"]) & set(second["chunks"])
    assert len(kept) >= len(second["chunks"]) - 3, "only the chunks around the edit change"
    fresh = cluster_factory.add_node()
    assert (fresh.mnt / "cdc").read_bytes() == bytes(data)
