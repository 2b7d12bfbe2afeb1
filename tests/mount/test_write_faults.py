"""Faults on the write path (DESIGN §1): nothing acknowledged is lost when the coordinator,
S3 or the client itself dies; chunking by content works through the mount."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastcache.testing.cluster import http
from fastcache.testing.mounts import force_unmount
from fastcache.testing.polling import wait_until
from tests.mount.conftest import MountCluster

MiB = 1 << 20
COMMIT_TIMEOUT = 2.0


def manifest_of(mc: MountCluster, path: str) -> dict:
    answer = http("GET", f"{mc.cluster.coordinator_url}/api/ns/resolve?path={path}")
    assert answer.status == 200, answer.body
    return answer.json()["manifest"]


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass  # EIO or a dead mount: what matters is that the client stops


def _fuse_waiting(mnt: Path) -> int:
    """Requests the kernel sent to this mount's process and that are not answered yet."""
    connections = Path("/sys/fs/fuse/connections")
    if not any(connections.iterdir()):  # fusectl not mounted yet (we are root)
        subprocess.run(["mount", "-t", "fusectl", "fusectl", str(connections)], check=False)
    minor = os.minor(os.stat(mnt).st_dev)
    return int((connections / str(minor) / "waiting").read_text())


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


@pytest.fixture
def small_nvme(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A 24 MiB tmpfs: far smaller than what the test writes."""
    path = tmp_path_factory.mktemp("small-nvme")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=24m", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def test_full_nvme_with_s3_frozen_and_writer_killed(
    cluster_factory: MountCluster, s3: object, small_nvme: Path
) -> None:
    """NVMe far too small, S3 frozen: the chunks that do not fit go to a peer, which keeps
    them pinned and journaled; the writer is SIGKILLed after its closes returned. After a
    restart every acknowledged file is intact, on the writer and on a fresh node."""
    server = s3.server  # type: ignore[attr-defined]
    a = cluster_factory.add_node(nvme=small_nvme)
    b = cluster_factory.add_node()
    wait_until(
        lambda: len(http("GET", f"{a.proc.url}/api/peers").json()["peers"]) >= 2,
        30,
        message="both nodes registered",
    )
    files = {f"f{i}": os.urandom(5 * MiB + i) for i in range(16)}  # 80 MiB into 24 MiB
    big = os.urandom(40 * MiB + 3)
    os.kill(server.pid, signal.SIGSTOP)
    try:
        for name, data in files.items():
            (a.mnt / name).write_bytes(data)
        (a.mnt / "one-big-file").write_bytes(big)
        cluster_factory.kill_node(a)
    finally:
        os.kill(server.pid, signal.SIGCONT)
    files["one-big-file"] = big
    again = cluster_factory.add_node(nvme=small_nvme)
    for name, data in files.items():
        assert (again.mnt / name).read_bytes() == data
    fresh = cluster_factory.add_node()
    for name, data in files.items():
        assert (fresh.mnt / name).read_bytes() == data
    assert b.proc.alive()


def test_sigterm_during_a_stuck_commit_stops_the_client(cluster_factory: MountCluster) -> None:
    """The coordinator frozen mid-commit: SIGTERM still stops the client (bounded), and the
    commit it could not make is replayed by the next start."""
    a = cluster_factory.add_node_with(["--commit-timeout", "30"])
    data = os.urandom(MiB + 1)
    fd = os.open(a.mnt / "stuck", os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, data)
    coordinator = cluster_factory.cluster.coordinator
    assert coordinator is not None
    coordinator.signal(signal.SIGSTOP)
    try:
        closer = threading.Thread(target=_close_quietly, args=(fd,))
        closer.start()
        wait_until(lambda: _fuse_waiting(a.mnt) >= 1, 30, message="close() waiting in FUSE")
        a.proc.signal(signal.SIGTERM)
        assert a.proc.popen is not None
        status = a.proc.popen.wait(90)  # far less than the commit's own 30 s + retries
        closer.join(30)
    finally:
        coordinator.signal(signal.SIGCONT)
    force_unmount(a.mnt)
    assert status == 0
    cluster_factory.add_node(nvme=a.nvme)
    wait_until(
        lambda: manifest_of(cluster_factory, "/stuck")["size"] == len(data),
        60,
        message="the commit replayed by the next start",
    )
