"""What close() acknowledged survives a SIGKILLed client; big files cross nodes intact."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from fastcache.testing.mounts import force_unmount
from fastcache.testing.polling import wait_until
from tests.mount.conftest import MountCluster

MiB = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(4 * MiB):
            h.update(block)
    return h.hexdigest()


def test_sigkill_after_close_loses_nothing(cluster_factory: MountCluster) -> None:
    a = cluster_factory.add_node()
    payload = os.urandom(5 * MiB + 321)
    (a.mnt / "precious").write_bytes(payload)  # close() returned: acknowledged
    cluster_factory.kill_node(a)

    # The same node restarts on its NVMe dir: the journal re-queues the uploads.
    again = cluster_factory.add_node(nvme=a.nvme)
    fd = os.open(again.mnt / "precious", os.O_RDONLY)
    try:
        os.fsync(fd)  # returns once every chunk of the file is in S3
    finally:
        os.close(fd)
    assert (again.mnt / "precious").read_bytes() == payload
    cluster_factory.kill_node(again)  # nothing of it may be needed any more

    # A node with an empty NVMe dir (and no live peer) can only read it from S3.
    fresh = cluster_factory.add_node()
    assert (fresh.mnt / "precious").read_bytes() == payload


def test_fsync_puts_the_file_in_s3(cluster_factory: MountCluster) -> None:
    a = cluster_factory.add_node()
    payload = os.urandom(2 * MiB + 5)
    with open(a.mnt / "synced", "wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    cluster_factory.kill_node(a)
    fresh = cluster_factory.add_node()
    assert (fresh.mnt / "synced").read_bytes() == payload


def test_sigterm_commits_files_still_open(cluster_factory: MountCluster) -> None:
    a = cluster_factory.add_node()
    b = cluster_factory.add_node()
    fd = os.open(a.mnt / "open-at-exit", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        os.write(fd, b"written but never closed")
        a.proc.signal(15)  # unmount() must commit open handles before it unmounts
        wait_until(
            lambda: (b.mnt / "open-at-exit").stat().st_size == 24,
            60,
            message="the open file committed by the stopping node",
        )
    finally:
        try:
            os.close(fd)  # the mount was lazily unmounted: this lets the FUSE loop end
        except OSError:
            pass
    assert a.proc.popen is not None
    assert a.proc.popen.wait(60) == 0
    force_unmount(a.mnt)
    # The chunks wait in A's journal (A stopped before uploading them): A comes back.
    cluster_factory.add_node(nvme=a.nvme)
    assert (b.mnt / "open-at-exit").read_bytes() == b"written but never closed"


def test_large_file_copied_with_cp(two_nodes: MountCluster, tmp_path: Path) -> None:
    src = tmp_path / "big.bin"
    with open(src, "wb") as f:
        for _ in range(64):
            f.write(os.urandom(4 * MiB))  # 256 MiB
    a, b = two_nodes.nodes
    dst = a.mnt / "big.bin"
    subprocess.run(["cp", str(src), str(dst)], check=True)
    want = sha256_file(src)
    assert sha256_file(b.mnt / "big.bin") == want
    assert (b.mnt / "big.bin").stat().st_size == 256 * MiB
    shutil.copyfile(b.mnt / "big.bin", tmp_path / "back.bin")
    assert sha256_file(tmp_path / "back.bin") == want
