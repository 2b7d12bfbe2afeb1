"""Mounting like a filesystem: ``fastcache mount`` in the foreground, the ``mount.fastcache``
helper (a daemon with a PID file and a log file), ``mount -t fastcache`` through mount(8),
and ``fastcache umount``, each against a real coordinator, SeaweedFS and FUSE.

The daemon is the helper's orphan: this test process makes itself the child subreaper
(``prctl(PR_SET_CHILD_SUBREAPER)``), so the daemon is reparented to it and its exit status
can be waited for like a child's."""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastcache.admin.mounting import helper_argv
from fastcache.testing.mounts import force_unmount, is_fuse_mount
from fastcache.testing.polling import free_port, wait_until
from tests.mount.conftest import MountCluster

PR_SET_CHILD_SUBREAPER = 36
HELPER = Path(sys.executable).parent / "mount.fastcache"
SBIN_HELPER = Path("/sbin/mount.fastcache")


def fastcache(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastcache", *args], capture_output=True, text=True, timeout=120
    )


@contextlib.contextmanager
def subreaper() -> Iterator[None]:
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0, os.strerror(ctypes.get_errno())
    try:
        yield
    finally:
        libc.prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0)


def daemon_exit_status(pid: int) -> int:
    """Wait for the reparented daemon; its exit status."""
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def stop_daemon(pid_file: Path, mnt: Path) -> None:
    """Teardown after a failure: stop a daemon still running, unmount, reap."""
    with contextlib.suppress(OSError, ValueError):
        pid = int(pid_file.read_text())
        os.kill(pid, signal.SIGTERM)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)
    force_unmount(mnt)


def node_options(mc: MountCluster, tmp: Path, name: str) -> dict[str, str]:
    env_file = tmp / f"{name}.env"
    env_file.write_text(
        f"# S3 keys for the node\nAWS_ACCESS_KEY_ID={mc.cluster.s3.access_key}\n"
        f'AWS_SECRET_ACCESS_KEY="{mc.cluster.s3.secret_key}"\n'
    )
    return {
        "nvme_dir": str(tmp / f"{name}-nvme"),
        "port": str(free_port()),
        "peer_id": name,
        "s3_endpoint": mc.cluster.s3.endpoint or "",
        "bucket": mc.cluster.s3.bucket,
        "chunk_size": "1M",
        "pid_file": str(tmp / f"{name}.pid"),
        "log_file": str(tmp / f"{name}.log"),
        "env_file": str(env_file),
    }


def use_mount(mnt: Path, other: Path | None = None) -> None:
    """Write through the mount, read it back (and through ``other`` when given)."""
    data = os.urandom(3 * (1 << 20) + 17)
    (mnt / "file").write_bytes(data)
    assert (mnt / "file").read_bytes() == data
    if other is not None:
        assert (other / "file").read_bytes() == data


def test_helper_argv_translates_mount_options() -> None:
    argv = helper_argv(
        [
            "http://c:8080",
            "/mnt/x",
            "-o",
            "rw,defaults,_netdev,x-systemd.automount,nvme_dir=/var/cache/fc,verify_cache",
            "-n",
        ]
    )
    assert argv == [
        "mount",
        "--daemon",
        "--coordinator",
        "http://c:8080",
        "--nvme-dir",
        "/var/cache/fc",
        "--verify-cache",
        "/mnt/x",
    ]
    assert helper_argv(["http://c:8080", "/mnt/x", "-f"]) is None  # mount -f: nothing to do


def test_foreground_mount_and_umount(cluster_factory: MountCluster, tmp_path: Path) -> None:
    mc = cluster_factory
    mnt = tmp_path / "fg"
    mnt.mkdir()
    opts = node_options(mc, tmp_path, "fg")
    pid_file = Path(opts["pid_file"])
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FASTCACHE_"))}
    env |= {
        "AWS_ACCESS_KEY_ID": mc.cluster.s3.access_key or "",
        "AWS_SECRET_ACCESS_KEY": mc.cluster.s3.secret_key or "",
    }
    cmd = [sys.executable, "-m", "fastcache", "mount", str(mnt), "--coordinator"]
    cmd += [mc.cluster.coordinator_url, "--nvme-dir", opts["nvme_dir"], "--port", opts["port"]]
    cmd += ["--s3-endpoint", opts["s3_endpoint"], "--bucket", opts["bucket"]]
    cmd += ["--pid-file", str(pid_file)]
    with open(tmp_path / "fg.log", "wb") as log:
        node = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_until(lambda: node.poll() is None and is_fuse_mount(mnt), 60, message="mounted")
        assert int(pid_file.read_text()) == node.pid
        use_mount(mnt)
        # a path in the mount is warmed on the node serving it (asked of the coordinator's nodes)
        warm = fastcache("warmup", str(mnt / "file"), "--coordinator", mc.cluster.coordinator_url)
        assert warm.returncode == 0, warm.stderr
        assert "warmed 1 files" in warm.stdout  # of one 4 MiB chunk, on NVMe since written
        assert "1 already cached" in warm.stdout
        done = fastcache("umount", str(mnt), "--pid-file", str(pid_file))
        assert done.returncode == 0, done.stderr
        assert node.wait(30) == 0
        assert not is_fuse_mount(mnt)
        assert not pid_file.exists()
    finally:
        if node.poll() is None:
            node.kill()
            node.wait()
        force_unmount(mnt)


def test_mount_helper_daemon_and_umount(cluster_factory: MountCluster, tmp_path: Path) -> None:
    mc = cluster_factory
    mnt = tmp_path / "helper"
    mnt.mkdir()
    opts = node_options(mc, tmp_path, "helper")
    pid_file = Path(opts["pid_file"])
    options = ",".join(["defaults", "_netdev", *(f"{k}={v}" for k, v in opts.items())])
    with subreaper():
        try:
            done = subprocess.run(
                [str(HELPER), mc.cluster.coordinator_url, str(mnt), "-o", options],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0, done.stdout + done.stderr
            assert is_fuse_mount(mnt)  # mounted when the helper returns, as mount(8) expects
            pid = int(pid_file.read_text())
            assert f"pid {pid}" in done.stdout
            use_mount(mnt)
            stopped = fastcache("umount", str(mnt), "--pid-file", str(pid_file))
            assert stopped.returncode == 0, stopped.stderr
            assert daemon_exit_status(pid) == 0
            assert not is_fuse_mount(mnt)
            assert "mounted at" in Path(opts["log_file"]).read_text()
        finally:
            stop_daemon(pid_file, mnt)


@pytest.fixture
def sbin_helper() -> Iterator[Path]:
    """/sbin/mount.fastcache → this venv's helper, for mount(8) (made here if missing)."""
    made = False
    if not SBIN_HELPER.exists():
        SBIN_HELPER.symlink_to(HELPER)
        made = True
    assert SBIN_HELPER.resolve() == HELPER.resolve(), f"{SBIN_HELPER} is not this venv's helper"
    try:
        yield SBIN_HELPER
    finally:
        if made:
            SBIN_HELPER.unlink()


def test_mount_t_fastcache_through_mount8(
    cluster_factory: MountCluster, tmp_path: Path, sbin_helper: Path
) -> None:
    mc = cluster_factory
    mnt = tmp_path / "mount8"
    mnt.mkdir()
    opts = node_options(mc, tmp_path, "mount8")
    pid_file = Path(opts["pid_file"])
    options = ",".join(["noatime", *(f"{k}={v}" for k, v in opts.items())])
    with subreaper():
        try:
            done = subprocess.run(
                ["mount", "-t", "fastcache", mc.cluster.coordinator_url, str(mnt), "-o", options],
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0, done.stdout + done.stderr
            assert is_fuse_mount(mnt)
            pid = int(pid_file.read_text())
            other = mc.add_node()  # a second node sees what was written through this mount
            use_mount(mnt, other.mnt)
            stopped = fastcache("umount", str(mnt), "--pid-file", str(pid_file))
            assert stopped.returncode == 0, stopped.stderr
            assert daemon_exit_status(pid) == 0
            assert not is_fuse_mount(mnt)
        finally:
            stop_daemon(pid_file, mnt)
