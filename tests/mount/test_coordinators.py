"""Two coordinators on one PostgreSQL database, three mounted nodes spread over them (real
PostgreSQL, SeaweedFS, FUSE and processes): what one node writes another reads; a change
made through one coordinator reaches the caches of nodes on the other before it is
acknowledged; a SIGKILLed coordinator's nodes carry on through the other one."""

from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastcache.pgserver import PostgresServer
from fastcache.testing.cluster import Cluster, Proc, http
from fastcache.testing.polling import wait_until
from tests.conftest import new_database
from tests.mount.conftest import MountCluster

LEASE_TERM = "5"


def _cluster_stats(proc: Proc) -> dict[str, Any]:
    return http("GET", f"{proc.url}/api/stats", timeout=5).json()["sessions"]["cluster"]


@pytest.fixture
def spread(
    tmp_path: Path, s3: Any, pg: PostgresServer
) -> Iterator[tuple[MountCluster, list[Proc]]]:
    """Coordinators A and B on one database; node 1 and 3 on A, node 2 on B (each also
    knows the other coordinator)."""
    store = new_database(pg)
    cluster = Cluster(tmp_path, s3.s3_config(), coordinator_flags=["--store", store])
    cluster.coordinator_flags += ["--lease-term", LEASE_TERM]
    mc = MountCluster(cluster, tmp_path)
    try:
        a = cluster.start_coordinator()
        b = cluster.start_coordinator(name="coordinator-b")

        def both_lease() -> bool:  # each hears the other, and hears itself (it may lease)
            stats = [_cluster_stats(p) for p in (a, b)]
            return all(s["may_lease"] and len(s["others"]) == 1 for s in stats)

        wait_until(both_lease, 30, message="coordinators see each other")
        for first, second in ((a, b), (b, a), (a, b)):
            mc.add_node(flags=["--coordinator", f"{first.url},{second.url}"])
        yield mc, [a, b]
    finally:
        mc.close()


def test_nodes_on_two_coordinators_share_one_namespace(
    spread: tuple[MountCluster, list[Proc]],
) -> None:
    mc, (a, b) = spread
    n1, n2, n3 = mc.nodes
    data = os.urandom(3 * 1024 * 1024 + 17)  # several 1 MiB chunks and a tail
    (n1.mnt / "from-1.bin").write_bytes(data)
    assert (n3.mnt / "from-1.bin").read_bytes() == data
    assert (n2.mnt / "from-1.bin").read_bytes() == data

    # the cleanup of silent nodes runs on one coordinator only
    assert [_cluster_stats(p)["leader"] for p in (a, b)].count(True) == 1

    # node 2 (on B) caches "no such name" under its lease on the listing
    d = n2.mnt / "shared"
    d.mkdir()
    assert os.listdir(d) == []
    with pytest.raises(FileNotFoundError):
        os.stat(d / "new")
    before = _cluster_stats(b)["remote_changes"]
    (n1.mnt / "shared" / "new").write_bytes(b"made through A")  # node 1 is on A
    # acknowledged: B has pushed it to node 2 already, well inside the 5 s lease
    assert (d / "new").read_bytes() == b"made through A"
    assert os.listdir(d) == ["new"]
    assert _cluster_stats(b)["remote_changes"] > before
    assert _cluster_stats(a)["ack_timeouts"] == 0
    # the same, as an operator's Prometheus sees it
    scraped = {
        s.name: s.value
        for family in text_string_to_metric_families(http("GET", f"{a.url}/metrics").body.decode())
        for s in family.samples
    }
    assert scraped["fastcache_coordinator_cluster_others"] == 1
    assert scraped["fastcache_coordinator_may_lease"] == 1
    assert scraped["fastcache_coordinator_cluster_published_total"] > 0
    assert scraped["fastcache_coordinator_cluster_ack_timeouts_total"] == 0


def test_nodes_move_to_the_other_coordinator_when_theirs_is_killed(
    spread: tuple[MountCluster, list[Proc]],
) -> None:
    mc, (a, b) = spread
    n1, n2, n3 = mc.nodes
    kept = {f"before-{i}": os.urandom(100_000 + i) for i in range(5)}
    for name, data in kept.items():
        (n1.mnt / name).write_bytes(data)  # closed: acknowledged
    a.kill()
    # node 1 and 3 were on A: they go on through B, without a remount
    after = {f"after-{i}": os.urandom(50_000 + i) for i in range(3)}
    for name, data in after.items():
        (n1.mnt / name).write_bytes(data)
    (n3.mnt / "dir-after").mkdir()
    for node in (n1, n2, n3):
        for name, data in {**kept, **after}.items():
            assert (node.mnt / name).read_bytes() == data, (node.mnt, name)
        assert (node.mnt / "dir-after").is_dir()
    # B is the leader now, and its sessions are all three nodes'
    wait_until(lambda: _cluster_stats(b)["leader"], 30, message="B leads once A is gone")
    stats = http("GET", f"{b.url}/api/stats", timeout=5).json()["sessions"]
    assert stats["open"] == 3
    with pytest.raises(OSError) as err:
        os.rmdir(n2.mnt / "no-such-dir")
    assert err.value.errno == errno.ENOENT
