"""Opening a file the node holds a lease on costs no round trip (small-file read-back), and
the file another node rewrote is still what the next open reads.

Two real nodes, one real coordinator (leases long enough that a slow machine never sees one
run out mid-test: the counts below must not depend on timing) and a real S3; the requests
are counted by the coordinator's own session stats."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastcache.coordinator.service import LISTED_MANIFEST_MAX
from fastcache.testing.cluster import Cluster, http
from tests.mount.conftest import MountCluster

LEASE_TERM = "60"


def read_direct(path: Path, size: int) -> bytes:
    """Open, read ``size`` bytes with O_DIRECT (the mount answers, not the page cache), close."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        return os.pread(fd, size, 0)
    finally:
        os.close(fd)


@pytest.fixture(scope="module")
def leased(tmp_path_factory: pytest.TempPathFactory, s3: object) -> Iterator[MountCluster]:
    """A coordinator granting long leases and two mounted nodes; all stopped after."""
    root = tmp_path_factory.mktemp("leased")
    cluster = Cluster(
        root,
        s3.s3_config(),  # type: ignore[attr-defined]
        coordinator_flags=["--lease-term", LEASE_TERM],
    )
    mc = MountCluster(cluster, root)
    try:
        cluster.start_coordinator()
        mc.add_node()
        mc.add_node()
        yield mc
    finally:
        statuses = mc.close()
    assert statuses == [0, 0], "a client did not shut down cleanly (unmount and exit 0)"


def session_ops(mc: MountCluster) -> Counter[str]:
    """The coordinator's session requests so far, by op."""
    answer = http("GET", f"{mc.cluster.coordinator_url}/api/stats")
    assert answer.status == 200, answer.body
    return Counter(answer.json()["sessions"]["ops"])


def test_reopening_a_leased_file_asks_nothing_and_sees_another_nodes_rewrite(
    leased: MountCluster,
) -> None:
    """Open, read 4 KiB, close, 20 times on node B: its lease on the file's attributes
    (manifest included) answers every open; node A rewrites the file (same size) and
    closes; B's next open reads the new bytes, never the old ones or a mix."""
    a, b = leased.nodes
    old = os.urandom(4096)
    (a.mnt / "reopened").write_bytes(old)
    assert (b.mnt / "reopened").read_bytes() == old  # B now holds a lease on it
    before = session_ops(leased)
    for _ in range(20):
        assert read_direct(b.mnt / "reopened", 4096) == old
    sent = session_ops(leased) - before
    assert sent["getattr"] + sent["lookup"] + sent["readdir"] == 0, sent
    new = bytes(x ^ 0xFF for x in old)
    with open(a.mnt / "reopened", "r+b") as f:
        f.write(new)
    assert read_direct(b.mnt / "reopened", 4096) == new
    assert (b.mnt / "reopened").read_bytes() == new


def test_reading_back_small_files_a_node_wrote_asks_nothing(leased: MountCluster) -> None:
    """The small-file read-back: write 4 KiB files, list the directory, open and read each
    one again. The writer keeps its commit's answer on the lease it took at create, and the
    listing's rows of the same versions keep it: no getattr or lookup per file (one each
    before). Another node's rewrite is still what the writer reads next."""
    a, b = leased.nodes
    d = a.mnt / "written-back"
    d.mkdir()
    files = {f"f{i}": os.urandom(4096) for i in range(20)}
    before = session_ops(leased)
    for name, data in files.items():
        with open(d / name, "wb", buffering=0) as f:
            f.write(data)
    assert sorted(os.listdir(d)) == sorted(files)
    for name, data in files.items():
        assert read_direct(d / name, 4096) == data
    sent = session_ops(leased) - before
    assert sent["create"] == len(files)
    assert sent["getattr"] + sent["lookup"] == 0, sent
    new = os.urandom(4096)
    (b.mnt / "written-back" / "f3").write_bytes(new)
    assert read_direct(d / "f3", 4096) == new
    assert (d / "f3").read_bytes() == new


def test_reading_back_small_files_another_node_wrote_asks_nothing_after_a_listing(
    leased: MountCluster,
) -> None:
    """Node B lists a directory of node A's files, then opens and reads each: the listing
    brought the small files' manifests on a lease (readdirplus), so none of their opens asks
    (one getattr each before); a file larger than ``LISTED_MANIFEST_MAX`` still asks for its
    manifest at open. A's rewrite of a listed file is what B reads next."""
    a, b = leased.nodes
    small = {f"s{i}": os.urandom(4096) for i in range(20)}
    large = os.urandom(LISTED_MANIFEST_MAX + 1)
    (a.mnt / "listed").mkdir()
    for name, data in small.items():
        (a.mnt / "listed" / name).write_bytes(data)
    (a.mnt / "listed" / "large").write_bytes(large)
    d = b.mnt / "listed"
    assert sorted(os.listdir(d)) == sorted([*small, "large"])
    before = session_ops(leased)
    for name, data in small.items():
        assert read_direct(d / name, 4096) == data
    sent = session_ops(leased) - before
    assert sent["getattr"] + sent["lookup"] == 0, sent
    assert read_direct(d / "large", len(large)) == large
    assert (session_ops(leased) - before)["getattr"] == 1
    new = os.urandom(4096)
    (a.mnt / "listed" / "s7").write_bytes(new)
    assert read_direct(d / "s7", 4096) == new
