"""``GET /metrics`` on real nodes and a real coordinator: the text parses as Prometheus
exposition, and its tier counters move when a file is read through the mount from NVMe, from
a peer and from S3; the token guards it unless ``--metrics-public``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from fastcache.testing.cluster import http
from fastcache.testing.polling import wait_until
from tests.mount.conftest import MountCluster, Node, coordinator_only
from tests.mount.test_reads import owned_block, read_direct, write_durably

TOKEN = "metrics-test-token"
CHUNK = 1 << 20  # the mount fixtures' --chunk-size
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(url: str, token: str | None = TOKEN) -> Samples:
    """Every sample of ``url``/metrics by (name, sorted labels), parsed by prometheus_client."""
    answer = http("GET", f"{url}/metrics", token=token)
    assert answer.status == 200, answer.body
    assert answer.headers["Content-Type"].startswith("text/plain; version=")
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(answer.body.decode())
        for s in family.samples
    }


def tier_hits(node: Node, tier: str) -> float:
    return scrape(node.proc.url)[("fastcache_tier_hits_total", (("tier", tier),))]


@pytest.fixture
def secured(tmp_path: Path, s3: object) -> Iterator[MountCluster]:
    """A coordinator that wants a token, without nodes yet."""
    with coordinator_only(tmp_path, s3, token=TOKEN) as mc:
        yield mc


def test_tier_counters_move_for_nvme_peer_and_s3_reads(secured: MountCluster) -> None:
    mc = secured
    names = ["client1", "client2"]
    near, far = owned_block("client1", names), owned_block("client1", names)
    writer = mc.add_node()  # client1: owns both chunks, holds them on its NVMe
    write_durably(writer, "near", near)
    write_durably(writer, "far", far)

    # NVMe hit: O_DIRECT, so the kernel's page cache cannot answer instead of the mount
    before = scrape(writer.proc.url)
    assert read_direct(writer.mnt / "near", 0, CHUNK) == near
    after = scrape(writer.proc.url)
    nvme = ("fastcache_tier_hits_total", (("tier", "nvme"),))
    assert after[nvme] > before[nvme]
    reads = ("fastcache_fuse_ops_total", (("op", "read"),))
    assert after[reads] > before.get(reads, 0)
    assert after[("fastcache_fuse_op_bytes_total", (("op", "read"),))] >= CHUNK
    assert after[("fastcache_nvme_used_bytes", ())] >= 2 * CHUNK
    assert after[("fastcache_nvme_capacity_bytes", ())] > 0
    assert after[("fastcache_writeback_pending_chunks", ())] == 0  # fsynced: all in S3
    assert after[("fastcache_s3_requests_total", (("op", "put"),))] >= 2
    opens = ("fastcache_fuse_op_seconds_count", (("op", "open"),))
    assert after[opens] >= 1
    assert (
        after[("fastcache_fuse_op_seconds_bucket", (("le", "+Inf"), ("op", "open")))]
        == (after[opens])
    )

    # peer hit: the reader asks the chunk's owner, which has it on NVMe
    reader = mc.add_node_with(["--metrics-public"])  # client2
    wait_until(lambda: scrape(reader.proc.url)[("fastcache_peers_alive", ())] == 1, 30)
    peer_before = tier_hits(reader, "peer")
    assert (reader.mnt / "near").read_bytes() == near
    assert tier_hits(reader, "peer") == peer_before + 1
    assert scrape(reader.proc.url)[("fastcache_peer_bytes_total", (("direction", "down"),))] >= (
        CHUNK
    )

    # S3 hit: the only other node has left; the chunk is in S3 alone
    mc.stop_node(writer)
    s3_before = tier_hits(reader, "s3")
    assert (reader.mnt / "far").read_bytes() == far
    assert tier_hits(reader, "s3") == s3_before + 1
    down = ("fastcache_s3_bytes_total", (("direction", "down"),))
    assert scrape(reader.proc.url)[down] >= CHUNK

    # the token: /metrics wants it like every route, unless the node has --metrics-public
    assert http("GET", f"{reader.proc.url}/metrics").status == 200
    assert http("GET", f"{reader.proc.url}/api/cache/stats").status == 401
    coordinator = mc.cluster.coordinator_url
    denied = http("GET", f"{coordinator}/metrics")
    assert denied.status == 401 and b'"error"' in denied.body
    samples = scrape(coordinator)
    assert samples[("fastcache_coordinator_peers", (("state", "live"),))] == 1
    assert samples[("fastcache_coordinator_sessions", ())] == 1  # the reader's mount
    assert samples[("fastcache_coordinator_store_commits_total", ())] > 0
    session_ops = {
        dict(labels)["op"]: n
        for (name, labels), n in samples.items()
        if name == "fastcache_coordinator_session_requests_total"
    }
    assert sum(session_ops.values()) > 0, session_ops
    register = ("fastcache_coordinator_requests_total", (("route", "POST /api/peers/register"),))
    assert samples[register] >= 2
