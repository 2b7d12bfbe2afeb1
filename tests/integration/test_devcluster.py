"""``fastcache dev-start`` / ``dev-stop`` as a user runs them: real processes, real S3.

The clients run without mounts here (``--mount-prefix ''``); the mounted variant needs
FUSE and ``fastcache.mount``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastcache.devcluster import _alive, _mounted
from fastcache.testing.cluster import free_port_block, http
from fastcache.testing.polling import wait_until


def fastcache(*args: str, timeout: float = 150) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FASTCACHE_"))}
    return subprocess.run(
        [sys.executable, "-m", "fastcache", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


class DevCluster:
    def __init__(self, directory: Path, nodes: int, mount_prefix: str, *args: str) -> None:
        self.dir = directory
        self.nodes = nodes
        self.mount_prefix = mount_prefix
        self.args = args
        self.base = free_port_block(nodes + 2)  # a second coordinator after the clients

    def start(self) -> subprocess.CompletedProcess[str]:
        return fastcache(
            *(self.args or ("dev-start",)),
            "--dir",
            str(self.dir),
            "--base-port",
            str(self.base),
            "--nodes",
            str(self.nodes),
            "--mount-prefix",
            self.mount_prefix,
        )

    def stop(self) -> subprocess.CompletedProcess[str]:
        return fastcache("dev-stop", "--dir", str(self.dir))

    def state(self) -> dict:  # type: ignore[type-arg]
        return json.loads((self.dir / "cluster.json").read_text())

    def url(self, node: int) -> str:
        return f"http://127.0.0.1:{self.base + node}"


@pytest.fixture
def dev(tmp_path: Path) -> Iterator[DevCluster]:
    cluster = DevCluster(tmp_path / "dev", nodes=2, mount_prefix="")
    try:
        yield cluster
    finally:
        if (cluster.dir / "cluster.json").exists():
            cluster.stop()


def test_dev_start_runs_a_cluster_and_dev_stop_ends_it(dev: DevCluster) -> None:
    started = dev.start()
    assert started.returncode == 0, started.stderr
    assert dev.url(1) in started.stdout and dev.url(2) in started.stdout
    state = dev.state()
    procs = state["processes"]
    assert sorted(p["role"] for p in procs) == ["client", "client", "coordinator", "s3"]
    pids = [p["pid"] for p in procs] + [p["weed_pid"] for p in procs if p.get("weed_pid")]
    assert all(_alive(pid) for pid in pids)
    for name in ("s3", "coordinator", "client1", "client2"):
        assert (dev.dir / "logs" / f"{name}.log").exists()

    # a working cluster: written on node 1, read on node 2
    data = os.urandom(300_000)
    assert http("PUT", f"{dev.url(1)}/api/files/dev/hello.bin", data).status == 201
    assert http("GET", f"{dev.url(2)}/api/files/dev/hello.bin").body == data
    peers = http("GET", f"http://127.0.0.1:{dev.base}/api/peers").json()["peers"]
    assert {p["peer_id"] for p in peers} == {"client1", "client2"}

    # a second start refuses while this one runs, and leaves it alone
    again = dev.start()
    assert again.returncode == 1 and "already runs" in again.stderr
    assert all(_alive(pid) for pid in pids)

    stopped = dev.stop()
    assert stopped.returncode == 0, stopped.stderr
    assert not any(_alive(pid) for pid in pids)
    assert not (dev.dir / "cluster.json").exists()
    assert dev.stop().returncode == 0  # idempotent


def test_dev_start_on_postgres_runs_two_coordinators() -> None:
    """``--store postgres``: PostgreSQL under the dev dir, two coordinators sharing it, the
    clients spread over them; dev-stop stops PostgreSQL too."""
    root = Path(tempfile.mkdtemp(prefix="fastcache-devpg-"))
    root.chmod(0o755)  # the postgres user must reach the dev dir
    dev = DevCluster(root / "dev", 2, "", "dev-start", "--store", "postgres")
    try:
        started = dev.start()
        assert started.returncode == 0, started.stderr
        coordinators = [p for p in dev.state()["processes"] if p["role"] == "coordinator"]
        assert [c["url"] for c in coordinators] == [
            f"http://127.0.0.1:{dev.base}",
            f"http://127.0.0.1:{dev.base + 3}",
        ]
        assert (dev.dir / "postgres" / "data" / "postmaster.pid").exists()
        # client 1 is on coordinator A, client 2 on B: one namespace in one database
        assert http("PUT", f"{dev.url(1)}/api/files/dev/a.txt", b"from 1").status == 201
        assert http("GET", f"{dev.url(2)}/api/files/dev/a.txt").body == b"from 1"
        for c in coordinators:  # each coordinator's peer list is cached for up to 1 s

            def both(url: str = c["url"]) -> bool:
                peers = http("GET", f"{url}/api/peers").json()["peers"]
                return {p["peer_id"] for p in peers} == {"client1", "client2"}

            wait_until(both, timeout=10, interval=0.2)
        stopped = dev.stop()
        assert stopped.returncode == 0, stopped.stderr
        assert not (dev.dir / "postgres" / "data" / "postmaster.pid").exists()
    finally:
        if (dev.dir / "cluster.json").exists():
            dev.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_failed_start_stops_what_it_started(dev: DevCluster) -> None:
    # The coordinator cannot bind: its port is held, so start must fail and clean up.
    import socket

    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", dev.base))
        blocker.listen()
        result = dev.start()
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "coordinator" in result.stderr
    assert not (dev.dir / "cluster.json").exists()
    # S3 had started (its supervisor published its weed pid) and was stopped again
    info = json.loads((dev.dir / "s3-info.json").read_text())
    assert not _alive(info["weed_pid"])


@pytest.mark.skipif(not os.access("/dev/fuse", os.R_OK | os.W_OK), reason="needs /dev/fuse")
def test_dev_start_mounts_every_node(tmp_path: Path) -> None:
    import fastcache.mount.ops  # noqa: F401  (the FUSE layer must import)

    prefix = str(tmp_path / "mnt")
    dev = DevCluster(tmp_path / "dev", nodes=2, mount_prefix=prefix)
    try:
        started = dev.start()
        assert started.returncode == 0, started.stderr
        for i in (1, 2):
            assert _mounted(f"{prefix}{i}")
        Path(f"{prefix}1/hello.txt").write_bytes(b"through FUSE\n")
        assert http("GET", f"{dev.url(2)}/api/files/hello.txt").body == b"through FUSE\n"
    finally:
        stopped = dev.stop()
    assert stopped.returncode == 0
    for i in (1, 2):
        assert not _mounted(f"{prefix}{i}")
