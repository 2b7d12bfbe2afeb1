"""Real FUSE mounts: a coordinator process, the session's SeaweedFS and client processes
(``fastcache client --mount``), each on its own NVMe dir and mount point.

Every mount a fixture starts is unmounted at teardown, whatever the test did (a SIGKILLed
client leaves a dead mount behind: it is lazily unmounted).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fastcache.testing.cluster import Cluster, Proc
from fastcache.testing.mounts import force_unmount, is_fuse_mount
from fastcache.testing.polling import wait_until

MOUNT_TIMEOUT = 60.0


@dataclass
class Node:
    """One mounted client process."""

    proc: Proc
    mnt: Path
    nvme: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


@dataclass
class MountCluster:
    """A coordinator and mounted clients; ``close()`` stops and unmounts all of them."""

    cluster: Cluster
    root: Path
    attr_timeout: float = 0.5
    nodes: list[Node] = field(default_factory=list)
    _count: int = 0

    def add_node_with(self, flags: list[str], nvme: Path | None = None) -> Node:
        """``add_node`` with extra client flags."""
        return self.add_node(nvme, flags)

    def add_node(self, nvme: Path | None = None, flags: list[str] | None = None) -> Node:
        """Start a client mounted at a fresh mount point (a fresh NVMe dir unless given)."""
        self._count += 1
        index = self._count
        mnt = self.root / f"mnt{index}"
        mnt.mkdir(parents=True, exist_ok=True)
        nvme = nvme or self.root / f"nvme{index}"
        extra = [
            "--mount",
            str(mnt),
            "--nvme-dir",
            str(nvme),
            "--attr-timeout",
            str(self.attr_timeout),
            "--chunk-size",
            "1M",
            *(flags or []),
        ]
        proc = self.cluster.start_client(index, extra=extra)
        node = Node(proc, mnt, nvme)
        self.nodes.append(node)
        proc.wait_healthy()

        def mounted() -> bool:
            if not proc.alive():
                raise RuntimeError(f"client exited: {proc.log_tail()}")
            return is_fuse_mount(mnt)

        wait_until(mounted, MOUNT_TIMEOUT, message=f"mount at {mnt}")
        return node

    def stop_node(self, node: Node) -> int | None:
        """SIGTERM (the client unmounts itself); its exit status."""
        status = node.proc.stop()
        force_unmount(node.mnt)
        return status

    def kill_node(self, node: Node) -> None:
        """SIGKILL: nothing is flushed or unmounted by the client."""
        node.proc.kill()
        force_unmount(node.mnt)

    def close(self) -> list[int | None]:
        """Stop every node (SIGTERM) and the coordinator; the nodes' exit statuses."""
        statuses = []
        for node in self.nodes:
            try:
                statuses.append(node.proc.stop())
            finally:
                force_unmount(node.mnt)
        self.cluster.close()
        return statuses


def _start(root: Path, s3: object, nodes: int) -> MountCluster:
    cluster = Cluster(root, s3.s3_config())  # type: ignore[attr-defined]
    mc = MountCluster(cluster, root)
    try:
        cluster.start_coordinator()
        for _ in range(nodes):
            mc.add_node()
    except BaseException:
        mc.close()
        raise
    return mc


@pytest.fixture(scope="module")
def one_node(tmp_path_factory: pytest.TempPathFactory, s3: object) -> Iterator[MountCluster]:
    """One coordinator + one mounted client, shared by a module's tests."""
    mc = _start(tmp_path_factory.mktemp("mount1"), s3, 1)
    try:
        yield mc
    finally:
        statuses = mc.close()
    assert statuses == [0], "a client did not shut down cleanly (unmount and exit 0)"


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory: pytest.TempPathFactory, s3: object) -> Iterator[MountCluster]:
    """One coordinator + two mounted clients (one S3 bucket), shared by a module's tests."""
    mc = _start(tmp_path_factory.mktemp("mount2"), s3, 2)
    try:
        yield mc
    finally:
        statuses = mc.close()
    assert statuses == [0, 0], "a client did not shut down cleanly (unmount and exit 0)"


@contextlib.contextmanager
def coordinator_only(root: Path, s3: object, token: str | None = None) -> Iterator[MountCluster]:
    """A coordinator without nodes (``token``: it wants one); everything stopped after."""
    cluster = Cluster(root, s3.s3_config(), token=token)  # type: ignore[attr-defined]
    mc = MountCluster(cluster, root)
    try:
        cluster.start_coordinator()
        yield mc
    finally:
        mc.close()


@pytest.fixture
def cluster_factory(tmp_path: Path, s3: object) -> Iterator[MountCluster]:
    """A coordinator without nodes, for tests that kill and restart clients."""
    with coordinator_only(tmp_path, s3) as mc:
        yield mc


@pytest.fixture
def workdir(one_node: MountCluster, request: pytest.FixtureRequest) -> Path:
    """A fresh directory inside the shared mount, named after the test."""
    d = one_node.nodes[0].mnt / request.node.name.replace("[", "_").replace("]", "_")
    d.mkdir()
    return d
