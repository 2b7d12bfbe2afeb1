"""A coordinator and three client processes on loopback, real SeaweedFS behind them.

Peer reads, surviving a dead node, a coordinator restart, and a frozen node dropping out of
(and coming back into) the peer list.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import pytest

from fastcache.chunks import digest
from fastcache.seaweed import SeaweedServer
from fastcache.testing.cluster import Cluster, Proc, http, wait_for
from fastcache.testing.mounts import force_unmount, is_fuse_mount
from fastcache.tiers.cloud import CloudTier
from fastcache.tiers.peer import rank_peers, replicas_for

TOKEN = "cluster-test-token"
MiB = 1 << 20


@pytest.fixture
def cluster(tmp_path: Path, s3) -> Iterator[Cluster]:  # type: ignore[no-untyped-def]
    c = Cluster(tmp_path, s3.s3_config(), token=TOKEN, peer_timeout=2.0, heartbeat_interval=0.5)
    try:
        yield c
    finally:
        c.close()


def put(url: str, path: str, data: bytes) -> dict:  # type: ignore[type-arg]
    answer = http("PUT", f"{url}/api/files{path}", data, token=TOKEN)
    assert answer.status == 201, answer.body
    return answer.json()


def get(url: str, path: str) -> bytes:
    answer = http("GET", f"{url}/api/files{path}", token=TOKEN)
    assert answer.status == 200, answer.body[:300]
    return answer.body


def tier_stats(url: str) -> dict:  # type: ignore[type-arg]
    return http("GET", f"{url}/api/cache/stats", token=TOKEN).json()["tiers"]


def pending_uploads(url: str) -> int:
    return int(http("GET", f"{url}/api/cache", token=TOKEN).json()["pending_uploads"])


FILES = {
    "/data/big.bin": os.urandom(9 * MiB + 123),  # three chunks, the last one short
    "/data/small.txt": b"hello, peers\n",
    "/empty": b"",
}


def test_peer_read_then_node_loss(cluster: Cluster) -> None:
    # Node 2 joins only after node 1's write-back replicated everything to node 3 and S3,
    # so its NVMe is empty and the peer tier has to serve it (replication 3 would otherwise
    # have pushed copies onto node 2 already).
    cluster.start_coordinator()
    n1, n3 = cluster.start_client(1), cluster.start_client(3)
    for proc in (n1, n3):
        proc.wait_healthy()
    cluster.wait_peers({"client1", "client3"})
    for path, data in FILES.items():
        answer = put(n1.url, path, data)
        assert answer["size"] == len(data)
    wait_for(lambda: pending_uploads(n1.url) == 0, message="node 1 uploads done")
    n2 = cluster.start_client(2)
    n2.wait_healthy()
    cluster.wait_peers({"client1", "client2", "client3"})
    for path, data in FILES.items():
        assert get(n2.url, path) == data
    tiers = tier_stats(n2.url)
    chunks = 4  # 3 + 1; the empty file has none
    assert tiers["peer"]["hits"] == chunks, tiers
    assert tiers["s3"]["hits"] == 0, tiers
    assert tiers["nvme"]["hits"] == 0, tiers
    assert tiers["peer"]["tier"]["bytes_read"] == sum(len(d) for d in FILES.values())
    # node 1 records where the file lives
    where = http(
        "GET", f"{cluster.coordinator_url}/api/files/location?path=/data/big.bin", token=TOKEN
    ).json()
    assert "client1" in {p["peer_id"] for p in where["peers"]}

    # Losing node 1 loses nothing: replicas and S3 have it all.
    n1.kill()
    for proc in (n2, n3):
        for path, data in FILES.items():
            assert get(proc.url, path) == data
    cluster.wait_peers({"client2", "client3"})


def test_coordinator_restart_keeps_namespace_locations_and_peers(cluster: Cluster) -> None:
    cluster.start(3)
    n1, n2, _ = (c.url for c in cluster.clients)
    data = os.urandom(5 * MiB)
    put(n1, "/kept/file.bin", data)
    before = time.time()
    assert cluster.coordinator is not None
    cluster.coordinator.kill()
    assert http("GET", f"{n2}/api/peers", token=TOKEN).status == 503  # coordinator down
    cluster.start_coordinator()  # same port, same state dir

    # the clients heartbeat (re-registering if they must) into the new coordinator
    def all_back() -> bool:
        answer = http("GET", f"{cluster.coordinator_url}/api/peers", token=TOKEN)
        peers = answer.json()["peers"] if answer.status == 200 else []
        return {p["peer_id"] for p in peers} == {"client1", "client2", "client3"} and all(
            p["last_seen"] > before for p in peers
        )

    wait_for(all_back, message="peers heartbeating into the restarted coordinator")
    assert get(n2, "/kept/file.bin") == data
    where = http(
        "GET", f"{cluster.coordinator_url}/api/files/location?path=/kept/file.bin", token=TOKEN
    ).json()
    assert "client1" in {p["peer_id"] for p in where["peers"]}
    size = http("GET", f"{n1}/api/files/kept/file.bin/size", token=TOKEN).json()
    assert size["size"] == len(data)


def test_frozen_node_drops_out_and_comes_back(cluster: Cluster) -> None:
    cluster.start(3)
    n1 = cluster.clients[0].url
    frozen = cluster.clients[2]
    frozen.signal(signal.SIGSTOP)
    try:
        cluster.wait_peers({"client1", "client2"}, timeout=20)
        listed = http("GET", f"{n1}/api/peers", token=TOKEN).json()["peers"]
        assert "client3" not in {p["peer_id"] for p in listed}
        assert http("GET", f"{n1}/api/peers/client3", token=TOKEN).status == 404
        # the cluster keeps working without it
        put(n1, "/while-frozen", b"x" * 1000)
        assert get(cluster.clients[1].url, "/while-frozen") == b"x" * 1000
    finally:
        frozen.signal(signal.SIGCONT)
    cluster.wait_peers({"client1", "client2", "client3"}, timeout=20)
    assert http("GET", f"{n1}/api/peers/client3", token=TOKEN).json()["peer_id"] == "client3"


def test_sigterm_is_a_clean_shutdown_that_deregisters(cluster: Cluster) -> None:
    cluster.start(2)
    n1, n2 = cluster.clients
    put(n1.url, "/before-stop", b"kept")
    assert n1.stop() == 0
    log = (cluster.root / "logs" / "coordinator.log").read_text()
    assert "peer client1 deregistered" in log  # said goodbye, not timed out
    assert cluster.peers() == {"client2"}
    # its NVMe and journal survive for the next start; the data is readable meanwhile
    assert get(n2.url, "/before-stop") == b"kept"
    restarted = cluster.start_client(1)
    restarted.wait_healthy()
    cluster.wait_peers({"client1", "client2"})
    assert get(restarted.url, "/before-stop") == b"kept"


def _file_needing_publish(
    nodes: list[str], writer: str, chunk: int, count: int
) -> tuple[bytes, str]:
    """File bytes (``count`` chunks) with a chunk whose rendezvous replica set, seen from some
    reader, leaves the writer out; and that reader."""
    readers = [n for n in nodes if n != writer]
    while True:
        data = os.urandom(chunk * count + 1000)
        for start in range(0, len(data), chunk):
            d = digest(data[start : start + chunk])
            for reader in readers:
                if writer not in replicas_for(d, nodes, reader, 3):
                    return data, reader


def _start_unuploading_writer(
    cluster: Cluster, tmp_path: Path, chunk: int, extra: list[str] | None = None
) -> tuple[Proc, list[Proc]]:
    """A writer that cannot reach its S3 and replicates nothing (its chunks stay only on its
    NVMe) and four readers, all healthy and in each other's peer lists."""
    assert cluster.s3.access_key and cluster.s3.secret_key
    dead_s3 = SeaweedServer(
        tmp_path / "writer-s3",
        access_key=cluster.s3.access_key,
        secret_key=cluster.s3.secret_key,
    ).start()
    try:
        cluster.start_coordinator()
        writer = cluster.start_client(
            1,
            extra=[
                *("--s3-endpoint", dead_s3.endpoint),
                *("--replication", "0", "--chunk-size", str(chunk)),
                *("--shutdown-sync-timeout", "0"),
                *(extra or []),
            ],
        )
        readers = [cluster.start_client(i) for i in range(2, 6)]
        for proc in (writer, *readers):
            proc.wait_healthy()
        cluster.wait_peers({p.name for p in (writer, *readers)})
    finally:
        dead_s3.stop()  # the writer's write-back can never finish
    return writer, readers


def test_unuploaded_chunks_are_readable_from_every_node(cluster: Cluster, tmp_path: Path) -> None:
    """Five nodes; the writer cannot reach its S3 and replicates nothing (replication 0), so
    its chunks are only on its NVMe when the manifest is committed. Every other node reads the
    file anyway: the writer published itself as their holder before the commit. The reader
    whose rendezvous set leaves the writer out reads first, before any other reader could
    hold a copy."""
    chunk = 256 << 10
    writer, readers = _start_unuploading_writer(cluster, tmp_path, chunk)
    names = [p.name for p in (writer, *readers)]
    data, blind = _file_needing_publish(names, writer.name, chunk, 8)
    count = -(-len(data) // chunk)
    assert put(writer.url, "/unuploaded.bin", data)["chunks"] == count
    assert pending_uploads(writer.url) == count  # only on the writer's NVMe
    writeback = http("GET", f"{writer.url}/api/cache/stats", token=TOKEN).json()["writeback"]
    assert writeback["published"] == count, writeback
    readers.sort(key=lambda p: p.name != blind)  # the blind reader first
    for proc in readers:
        assert get(proc.url, "/unuploaded.bin") == data, proc.name
    assert pending_uploads(writer.url) == count


def test_chunks_written_through_a_mount_are_published_with_the_commit(
    cluster: Cluster, tmp_path: Path
) -> None:
    """As above, the file written through the writer's FUSE mount: close() commits the
    manifest with the writer recorded as holder of its unuploaded chunks in the same
    request (no separate publish: the peer tier announced nothing), and every reader,
    the blind one first, reads the file."""
    chunk = 256 << 10
    mnt = tmp_path / "writer-mnt"
    mnt.mkdir()
    writer, readers = _start_unuploading_writer(
        cluster, tmp_path, chunk, extra=["--mount", str(mnt)]
    )
    try:
        wait_for(lambda: is_fuse_mount(mnt), 60, "the writer's mount")
        names = [p.name for p in (writer, *readers)]
        data, blind = _file_needing_publish(names, writer.name, chunk, 4)
        count = -(-len(data) // chunk)
        (mnt / "mounted.bin").write_bytes(data)  # returns after close(): committed
        assert pending_uploads(writer.url) == count  # only on the writer's NVMe
        stats = http("GET", f"{writer.url}/api/cache/stats", token=TOKEN).json()
        assert stats["writeback"]["published"] == count, stats["writeback"]
        peer = stats["tiers"]["peer"]["tier"]
        assert peer["announced"] == 0, peer  # no separate publish
        readers.sort(key=lambda p: p.name != blind)
        for proc in readers:
            assert get(proc.url, "/mounted.bin") == data, proc.name
    finally:
        writer.stop()
        force_unmount(mnt)


def test_sigterm_finishes_pending_uploads_before_exiting(cluster: Cluster, tmp_path: Path) -> None:
    """Uploads still running at SIGTERM reach S3 before the node exits: S3 is frozen while
    the file is written and thawed only once the node is shutting down, so nothing but the
    shutdown sync can have uploaded the chunks. Checked in S3 without restarting the node."""
    assert cluster.s3.access_key and cluster.s3.secret_key
    server = SeaweedServer(
        tmp_path / "slow-s3",
        access_key=cluster.s3.access_key,
        secret_key=cluster.s3.secret_key,
    ).start()
    try:
        s3 = replace(cluster.s3, endpoint=server.endpoint)
        cluster.start_coordinator()
        node = cluster.start_client(
            1,
            extra=[
                *("--s3-endpoint", server.endpoint, "--replication", "0"),
                *("--chunk-size", str(256 << 10), "--shutdown-sync-timeout", "60"),
            ],
        )
        node.wait_healthy()
        server.pause()
        data = os.urandom(3 * (256 << 10) + 77)
        count = put(node.url, "/synced.bin", data)["chunks"]
        assert pending_uploads(node.url) == count  # S3 frozen: nothing uploaded yet
        node.signal(signal.SIGTERM)
        wait_for(
            lambda: not node.alive() or "pending upload(s)" in node.log_path.read_text(),
            message="node shutting down",
        )
        server.resume()
        assert node.popen is not None
        assert node.popen.wait(90) == 0, node.log_tail()
        names = [digest(data[i : i + (256 << 10)]) for i in range(0, len(data), 256 << 10)]

        async def in_s3() -> list[bool]:
            cloud = await CloudTier.open(s3, create_bucket=False)
            try:
                return list(await asyncio.gather(*(cloud.exists(n) for n in names)))
            finally:
                await cloud.close()

        assert asyncio.run(in_s3()) == [True] * count, node.log_tail()
        assert f"all {count} pending upload(s) are in S3" in node.log_path.read_text()
    finally:
        cluster.close()
        server.stop()


def test_concurrent_cold_reads_fetch_each_chunk_from_s3_once(cluster: Cluster) -> None:
    """Cluster-wide single flight: three nodes read the same cold file at once; each chunk is
    fetched from S3 by exactly one node, its owner (the first rendezvous choice among the
    live nodes), and the others get it from the owner (fetch-through), verified."""
    chunk = 256 << 10
    extra = ["--chunk-size", str(chunk), "--replication", "0"]
    cluster.start_coordinator()
    writer = cluster.start_client(1, extra=extra)
    writer.wait_healthy()
    data = os.urandom(16 * chunk + 777)
    count = -(-len(data) // chunk)
    assert put(writer.url, "/cold.bin", data)["chunks"] == count
    wait_for(lambda: pending_uploads(writer.url) == 0, message="writer uploads done")
    writer.stop()  # deregisters: the file is now only in S3
    readers = [cluster.start_client(i, extra=extra) for i in (2, 3, 4)]
    for proc in readers:
        proc.wait_healthy()
    names = {p.name for p in readers}
    cluster.wait_peers(names)
    for proc in readers:  # every node's peer list (refreshed at heartbeats) has the others
        wait_for(
            lambda p=proc: tier_stats(p.url)["peer"]["tier"]["live_peers"] == len(names) - 1,
            message=f"{proc.name} sees its peers",
        )

    with ThreadPoolExecutor(len(readers)) as pool:
        bodies = list(pool.map(lambda p: get(p.url, "/cold.bin"), readers))
    assert all(body == data for body in bodies)

    digests = [digest(data[i : i + chunk]) for i in range(0, len(data), chunk)]
    owned = {name: 0 for name in names}
    for d in set(digests):
        owned[rank_peers(d, names)[0]] += 1
    stats = {p.name: tier_stats(p.url) for p in readers}
    s3_reads = {name: t["s3"]["hits"] for name, t in stats.items()}
    # Each chunk is read from S3 by its owner; without single flight every node would read
    # every chunk (3x). A rare extra read is tolerated (a peer request lost to a race).
    slack = 2
    assert all(s3_reads[n] <= owned[n] + slack for n in names), (s3_reads, owned)
    gets = sum(t["s3"]["tier"]["requests_by_op"].get("get", 0) for t in stats.values())
    assert len(set(digests)) <= gets <= len(set(digests)) + slack, gets
    assert sum(t["peer"]["tier"]["fetch_through"] for t in stats.values()) > 0
