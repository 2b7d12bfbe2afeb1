"""Leases and push invalidation through real mounts (DESIGN §3): a change on one node is
visible on another as soon as the call that made it returns, with nothing polled or slept.

Node B caches what it saw (a name that does not exist, attributes, an entry) under a lease;
node A changes it; the coordinator tells B (and B drops its cache and the kernel's) before
A's call returns. So B's very next call must see the change: without the push B would keep
answering from its cache for the whole lease term."""

from __future__ import annotations

import errno
import os
import stat
from collections import Counter
from pathlib import Path

import pytest

from fastcache.testing.cluster import http
from tests.mount.conftest import MountCluster


def _missing(path: Path) -> bool:
    try:
        os.stat(path)
    except OSError as exc:
        assert exc.errno == errno.ENOENT
        return True
    return False


@pytest.fixture
def dirs(two_nodes: MountCluster, request: pytest.FixtureRequest) -> tuple[Path, Path]:
    a, b = two_nodes.nodes
    name = request.node.name
    (a.mnt / name).mkdir()
    return a.mnt / name, b.mnt / name


def test_a_create_reaches_a_node_that_cached_the_name_as_missing(dirs: tuple[Path, Path]) -> None:
    on_a, on_b = dirs
    assert _missing(on_b / "new")
    assert _missing(on_b / "new")  # now answered on B from its lease, not the coordinator
    (on_a / "new").write_bytes(b"made on A")
    assert not _missing(on_b / "new")
    assert (on_b / "new").read_bytes() == b"made on A"


def test_rename_unlink_chmod_truncate_are_seen_at_once(dirs: tuple[Path, Path]) -> None:
    on_a, on_b = dirs
    (on_a / "f").write_bytes(b"x" * 1000)
    assert (on_b / "f").stat().st_size == 1000  # B caches the entry and the attributes
    assert _missing(on_b / "g")

    os.chmod(on_a / "f", 0o600)
    assert stat.S_IMODE((on_b / "f").stat().st_mode) == 0o600

    os.truncate(on_a / "f", 10)
    assert (on_b / "f").stat().st_size == 10

    os.rename(on_a / "f", on_a / "g")
    assert _missing(on_b / "f")
    assert (on_b / "g").stat().st_size == 10

    os.unlink(on_a / "g")
    assert _missing(on_b / "g")


def test_listing_after_a_change_on_another_node(dirs: tuple[Path, Path]) -> None:
    on_a, on_b = dirs
    assert sorted(os.listdir(on_b)) == []
    (on_a / "one").write_bytes(b"1")
    assert sorted(os.listdir(on_b)) == ["one"]
    os.rename(on_a / "one", on_a / "two")
    assert sorted(os.listdir(on_b)) == ["two"]


def test_the_session_survives_a_coordinator_restart(two_nodes: MountCluster) -> None:
    a, b = two_nodes.nodes
    (a.mnt / "before-restart").write_bytes(b"old")
    assert _missing(b.mnt / "made-after-restart")
    two_nodes.cluster.coordinator.kill()  # type: ignore[union-attr]
    two_nodes.cluster.start_coordinator()
    # B's leases died with its session: it must ask again, and the mount keeps working.
    (a.mnt / "made-after-restart").write_bytes(b"new")
    assert (b.mnt / "made-after-restart").read_bytes() == b"new"
    assert (b.mnt / "before-restart").read_bytes() == b"old"
    stats = http("GET", f"{two_nodes.cluster.coordinator_url}/api/stats").json()
    assert stats["sessions"]["open"] >= 2  # both nodes reconnected


def test_a_node_hears_of_changes_to_what_it_created(dirs: tuple[Path, Path]) -> None:
    """The creator leases the name and inode it made: another node's chmod and unlink of
    them reach its cache too."""
    on_a, on_b = dirs
    (on_b / "mine").write_bytes(b"made on B")
    assert (on_b / "mine").stat().st_size == 9  # answered from B's own cache
    os.chmod(on_a / "mine", 0o640)
    assert stat.S_IMODE((on_b / "mine").stat().st_mode) == 0o640
    os.unlink(on_a / "mine")
    assert _missing(on_b / "mine")


def _session_requests(cluster: MountCluster) -> int:
    stats = http("GET", f"{cluster.cluster.coordinator_url}/api/stats").json()
    return int(stats["sessions"]["requests"])


def _session_ops(cluster: MountCluster) -> Counter[str]:
    """Session requests so far, by op."""
    stats = http("GET", f"{cluster.cluster.coordinator_url}/api/stats").json()
    return Counter(stats["sessions"]["ops"])


def test_names_created_in_a_new_directory_need_no_lookup_round_trip(
    cluster_factory: MountCluster,
) -> None:
    """A directory this node made comes with a lease on its (empty) listing, renewed by each
    create there: the kernel's lookup of every name about to be made (``mkdir``, ``tar -x``)
    is answered on the node, one round trip per create, however long the creating goes on
    (a lease term of 1 s here: unrenewed, it would run out twice over). Another
    node's create there still reaches it before that create returns."""
    cluster = cluster_factory.cluster
    assert cluster.coordinator is not None
    cluster.coordinator.kill()
    cluster.coordinator_flags = ["--lease-term", "1"]
    cluster.start_coordinator()
    a = cluster_factory.add_node()
    b = cluster_factory.add_node()
    made = a.mnt / "local-names"
    made.mkdir()
    names = [f"d{i}" for i in range(3000)]  # more than one listing batch (512), > 2 s
    before = _session_requests(cluster_factory)
    for name in names:
        (made / name).mkdir()
    sent = _session_requests(cluster_factory) - before
    assert sent < len(names) + 100, f"{sent} requests for {len(names)} mkdirs: lookups went out"
    assert _missing(made / "from-b")  # answered from A's listing
    (b.mnt / "local-names" / "from-b").write_bytes(b"made on B")
    assert (made / "from-b").read_bytes() == b"made on B"
    assert sorted(os.listdir(made)) == sorted([*names, "from-b"])


def test_renames_in_a_leased_directory_keep_its_listing(two_nodes: MountCluster) -> None:
    """rsync's pattern (write a temporary name, rename it over the final one) in a directory
    this node holds the listing of: its own rename keeps the listing (the entries follow
    the rename), so the next names' lookups still cost nothing; another node sees the
    renamed files at once."""
    a, b = two_nodes.nodes
    d = a.mnt / "renames"
    d.mkdir()
    count = 100
    before = _session_ops(two_nodes)
    for i in range(count):
        tmp = d / f".f{i}.tmp"
        tmp.write_bytes(b"x")
        os.rename(tmp, d / f"f{i}")
    sent = _session_ops(two_nodes) - before
    assert sent["create"] == sent["rename_entry"] == count
    # nothing asked about names or the directory: the lease on its listing answered
    assert sent["lookup"] + sent["readdir"] + sent["getattr"] <= 2, sent
    assert sorted(os.listdir(b.mnt / "renames")) == sorted(f"f{i}" for i in range(count))
    assert _missing(d / ".f0.tmp")
    assert (b.mnt / "renames" / "f7").read_bytes() == b"x"


def test_reopen_keeps_cached_pages_until_another_node_changes_the_file(
    dirs: tuple[Path, Path],
) -> None:
    """Node B reads a file twice (its kernel keeps the pages across the reopen); node A
    rewrites it in place, same size, and closes; B's next open drops the stale pages: the
    new bytes, never a mix of old and new."""
    on_a, on_b = dirs
    old = os.urandom(3 << 20)
    (on_a / "f").write_bytes(old)
    assert (on_b / "f").read_bytes() == old
    assert (on_b / "f").read_bytes() == old  # served from B's page cache
    new = bytes(b ^ 0xFF for b in old[: 1 << 20]) + old[1 << 20 :]
    with open(on_a / "f", "r+b") as f:
        f.write(new[: 1 << 20])
    assert (on_b / "f").read_bytes() == new
