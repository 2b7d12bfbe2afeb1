"""The read path through a real mount: a frozen or dead peer never stalls a read beyond the
hedge delay plus one S3 fetch; reads return exactly the bytes written around every chunk and
page boundary; a chunk file corrupted on NVMe is caught and refetched; a sequential reader
gets the chunks ahead of it read whole; a cold sequential read
from S3 (read-ahead across chunk boundaries, promotion to NVMe) is byte-exact, fetches every
chunk once, and a read-ahead fetch that fails fails no other read."""

from __future__ import annotations

import errno
import os
import signal
import threading
from pathlib import Path
from typing import Any

import botocore.session
import pytest

from fastcache.chunks import digest
from fastcache.testing.cluster import http
from fastcache.testing.polling import wait_until
from fastcache.tiers.peer import rank_peers
from tests.mount.conftest import MountCluster, Node

MiB = 1 << 20
CHUNK = MiB  # the mount fixtures' --chunk-size
# The peer tier's read timeout: a read that waited it out on a frozen peer was not hedged.
# Reads below are joined within half of it (the hedge itself is 50 ms plus one S3 fetch).
PEER_TIMEOUT = 10.0
MEMORY_CHUNKS = 24  # the chunks a node keeps in memory (RecentChunks): 16 fetches + 8
RECENT_CHUNKS = 26  # a file of more than that


def stats(node: Node) -> dict[str, Any]:
    answer = http("GET", f"{node.proc.url}/api/cache/stats")
    assert answer.status == 200, answer.body
    return answer.json()


def owned_block(owner: str, peers: list[str]) -> bytes:
    """One chunk's worth of random bytes whose chunk ``owner`` fetches for ``peers``."""
    while True:
        block = os.urandom(CHUNK)
        if rank_peers(digest(block), peers)[0] == owner:
            return block


def stopped(pid: int) -> bool:
    """Whether ``pid`` is stopped (SIGSTOP): state ``T`` in /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat[stat.rindex(")") + 2] == "T"


def read_in_thread(path: Path) -> tuple[threading.Thread, dict[str, Any]]:
    """Start reading ``path`` whole on a thread; its result lands in the dict."""
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["data"] = path.read_bytes()
        except OSError as exc:
            result["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def write_durably(node: Node, name: str, data: bytes) -> None:
    """Write ``name`` on ``node`` and fsync it (its chunks are in S3 when this returns)."""
    path = node.mnt / name
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def peer_stats(node: Node) -> dict[str, Any]:
    return stats(node)["tiers"]["peer"]["tier"]


def test_frozen_or_dead_owner_never_stalls_a_read(cluster_factory: MountCluster) -> None:
    """A reader whose chunk's owner is frozen (SIGSTOP) hedges to S3 instead of waiting out
    the peer timeout; once the owner is dead (SIGKILL) too."""
    mc = cluster_factory
    peers = ["client2", "client3"]  # the owner-to-be and the reader, started below
    frozen_data = owned_block("client2", peers)
    dead_data = owned_block("client2", peers)
    writer = mc.add_node()  # client1: writes both files to S3, then leaves
    write_durably(writer, "frozen", frozen_data)
    write_durably(writer, "dead", dead_data)
    mc.stop_node(writer)  # deregisters: no node holds the chunks now, S3 does
    owner = mc.add_node()  # client2
    reader = mc.add_node()  # client3: the owner is already registered when it starts
    wait_until(lambda: peer_stats(reader)["live_peers"] == 1, 30, message="reader sees owner")

    def read_hedged(path: Path, expected: bytes) -> tuple[dict[str, Any], dict[str, Any]]:
        """Read ``path`` on the reader; its peer-tier stats after and before."""
        before = stats(reader)
        thread, result = read_in_thread(path)
        thread.join(PEER_TIMEOUT / 2)
        assert not thread.is_alive(), "the read waited on the silent owner"
        assert result.get("data") == expected, result.get("error")
        now = stats(reader)
        assert now["tiers"]["s3"]["hits"] == before["tiers"]["s3"]["hits"] + 1
        return now["tiers"]["peer"]["tier"], before["tiers"]["peer"]["tier"]

    owner.proc.signal(signal.SIGSTOP)
    try:
        peer_now, peer_before = read_hedged(reader.mnt / "frozen", frozen_data)
        assert stopped(owner.pid)  # served while the owner was still frozen
        assert peer_now["fetch_through"] == peer_before["fetch_through"] + 1
        assert peer_now["silent"] == peer_before["silent"] + 1  # nobody else to ask ...
        assert stats(reader)["hedged_to_s3"] == 1  # ... so S3 raced the frozen owner
    finally:
        mc.kill_node(owner)  # dead now (SIGKILL works on a stopped process)
    peer_now, peer_before = read_hedged(reader.mnt / "dead", dead_data)
    assert peer_now["silent"] == peer_before["silent"]  # refused at once: nothing to wait on
    assert stats(reader)["hedged_to_s3"] == 1


def manifest_of(mc: MountCluster, path: str) -> dict[str, Any]:
    answer = http("GET", f"{mc.cluster.coordinator_url}/api/ns/resolve?path={path}")
    assert answer.status == 200, answer.body
    return answer.json()["manifest"]


def read_direct(path: Path, offset: int, size: int) -> bytes:
    """``size`` bytes at ``offset`` with O_DIRECT: the kernel asks the mount for exactly
    this range (no page cache, no read-ahead rounding)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        return os.pread(fd, size, offset)
    finally:
        os.close(fd)


def nvme_stats(node: Node) -> dict[str, Any]:
    return stats(node)["tiers"]["nvme"]["tier"]


def test_hits_return_the_bytes_written_around_every_boundary(one_node: MountCluster) -> None:
    """NVMe hits through FUSE and through the client API, at page and chunk boundaries."""
    node = one_node.nodes[0]
    data = os.urandom(2 * CHUNK + 4097)
    write_durably(node, "bounds", data)
    path = node.mnt / "bounds"
    size = len(data)
    offsets = [0, 1, 4095, 4096, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK, size - 1]
    sizes = [1, 4095, 4096, 4097, 128 << 10, CHUNK - 1, CHUNK, CHUNK + 1]
    before = stats(node)
    for off in offsets:
        for n in sizes:
            assert read_direct(path, off, n) == data[off : off + n], (off, n)
            answer = http(
                "GET",
                f"{node.proc.url}/api/files/bounds",
                headers={"Range": f"bytes={off}-{off + n - 1}"},
            )
            assert answer.status == 206 and answer.body == data[off : off + n], (off, n)
    assert read_direct(path, size, 10) == b""
    after = stats(node)
    assert after["tiers"]["nvme"]["hits"] > before["tiers"]["nvme"]["hits"]
    assert after["tiers"]["s3"]["hits"] == before["tiers"]["s3"]["hits"]  # all from NVMe
    assert after["tiers"]["peer"]["hits"] == before["tiers"]["peer"]["hits"]


def corrupt_chunk_of(mc: MountCluster, node: Node, name: str) -> str:
    """Flip a byte of the (only) chunk of ``/name`` in ``node``'s NVMe, in place."""
    (chunk,) = manifest_of(mc, f"/{name}")["chunks"]
    path = node.nvme / "chunks" / chunk[:2] / chunk[2:4] / chunk
    with open(path, "r+b") as f:
        first = f.read(1)
        f.seek(0)
        f.write(bytes([first[0] ^ 0xFF]))
    return chunk


def test_a_chunk_corrupted_on_nvme_is_caught_on_a_whole_chunk_read(
    one_node: MountCluster,
) -> None:
    """One policy on every path: a read of a whole chunk is verified, through FUSE (a small
    file) as through the client API; the bad file is dropped and the chunk refetched."""
    node = one_node.nodes[0]
    small, other = os.urandom(10_000), os.urandom(20_000)
    write_durably(node, "small", small)  # its chunks are in S3 too
    write_durably(node, "other", other)
    for name, data, read in (
        ("small", small, lambda: read_direct(node.mnt / "small", 0, 1 << 20)),
        ("other", other, lambda: http("GET", f"{node.proc.url}/api/files/other").body),
    ):
        before = stats(node)
        chunk = corrupt_chunk_of(one_node, node, name)
        assert read() == data
        after = stats(node)
        assert nvme_stats(node)["corrupt"] == before["tiers"]["nvme"]["tier"]["corrupt"] + 1
        assert after["tiers"]["s3"]["hits"] == before["tiers"]["s3"]["hits"] + 1  # refetched
        stored = node.nvme / "chunks" / chunk[:2] / chunk[2:4] / chunk
        wait_until(
            lambda f=stored, d=data: f.exists() and f.read_bytes() == d, 30, message="promoted"
        )
        assert read() == data
        assert nvme_stats(node)["corrupt"] == before["tiers"]["nvme"]["tier"]["corrupt"] + 1


def test_a_sequential_reader_gets_the_next_chunks_read_whole(one_node: MountCluster) -> None:
    """Read-ahead for chunks already on NVMe: once a reader through the mount has gone
    1 MiB in order, the chunks ahead of it are read whole (one O_DIRECT read each) and its
    128 KiB requests served from those buffers, byte-exact; a seek drops that read-ahead
    and the reads stay exact; a closed handle frees its place for the next reader."""
    node = one_node.nodes[0]
    data = os.urandom(6 * CHUNK + 5000)  # the last chunk short: not a multiple of a block
    write_durably(node, "sequential", data)
    path = node.mnt / "sequential"
    step = 128 << 10
    before = nvme_stats(node)["whole_reads"]
    assert read_sequentially(path, len(data), step) == data
    # the stream starts in chunk 1 (after 8 requests) and reads chunks 2..6 ahead
    assert nvme_stats(node)["whole_reads"] == before + 5
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        order = [*range(0, 3 * CHUNK, step), 5 * CHUNK, CHUNK - step, 6 * CHUNK, 2 * CHUNK]
        for off in order:  # in order into chunk 2, then seeks back and forth
            assert os.pread(fd, step, off) == data[off : off + step], off
    finally:
        os.close(fd)
    # more readers, one after the other, than the node has room for at once: each closed
    # handle gave its place back, so the last one still gets its chunks read ahead (2..5:
    # two ahead of chunk 3, where it stops)
    for _ in range(70):
        before = nvme_stats(node)["whole_reads"]
        assert read_sequentially(path, 4 * CHUNK, step) == data[: 4 * CHUNK]
    assert nvme_stats(node)["whole_reads"] == before + 4


def cold_reader(mc: MountCluster, files: dict[str, bytes]) -> Node:
    """A node that has never read ``files``: a writer stores them in S3 and leaves, so the
    new node is alone and fetches from S3."""
    writer = mc.add_node()
    for name, data in files.items():
        write_durably(writer, name, data)
    mc.stop_node(writer)
    return mc.add_node()


def read_sequentially(path: Path, size: int, step: int) -> bytes:
    """``path`` read front to back with O_DIRECT ``pread``s of ``step`` bytes."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        return b"".join(os.pread(fd, step, off) for off in range(0, size, step))
    finally:
        os.close(fd)


def test_a_cold_sequential_read_is_exact_and_promotes_every_chunk_once(
    cluster_factory: MountCluster,
) -> None:
    """From S3 with read-ahead: reads that straddle chunk boundaries (96 KiB steps) get the
    exact bytes, each chunk is fetched once (read-ahead and reads share the fetch), every
    chunk lands on NVMe as fetched (verified once, written from the receive buffer), and a
    promoted chunk corrupted on disk is caught by a whole-chunk read and refetched."""
    mc = cluster_factory
    # more chunks than the reader keeps in memory, so some are read back from NVMe at the end
    data = os.urandom(RECENT_CHUNKS * CHUNK + 1000)
    reader = cold_reader(mc, {"cold": data})
    before = stats(reader)
    assert read_sequentially(reader.mnt / "cold", len(data), 96 << 10) == data
    after = stats(reader)
    assert after["tiers"]["s3"]["hits"] - before["tiers"]["s3"]["hits"] == RECENT_CHUNKS + 1
    assert after["prefetches"] > before["prefetches"]  # read ahead, not one chunk at a time
    assert after["memory_hits"] > before["memory_hits"]  # served from the fetched bytes
    names = manifest_of(mc, "/cold")["chunks"]
    files = [reader.nvme / "chunks" / c[:2] / c[2:4] / c for c in names]
    pieces = [data[i * CHUNK : (i + 1) * CHUNK] for i in range(len(names))]
    wait_until(
        lambda: all(f.exists() and f.read_bytes() == p for f, p in zip(files, pieces, strict=True)),
        30,
        message="every chunk promoted",
    )
    # every chunk file corrupted: those read back from NVMe (not memory) are caught
    corrupt = nvme_stats(reader)["corrupt"]
    for f, piece in zip(files, pieces, strict=True):
        with open(f, "r+b") as out:
            out.write(bytes([piece[0] ^ 0xFF]))
    answer = http("GET", f"{reader.proc.url}/api/files/cold")
    assert answer.status == 200 and answer.body == data
    caught = nvme_stats(reader)["corrupt"] - corrupt
    assert caught >= RECENT_CHUNKS + 1 - MEMORY_CHUNKS
    assert stats(reader)["tiers"]["s3"]["hits"] == after["tiers"]["s3"]["hits"] + caught


def test_a_failed_read_ahead_fetch_fails_no_other_read(cluster_factory: MountCluster) -> None:
    """Chunk 2 of the file is gone from S3: reading chunks 0-1 (whose read-ahead asks for
    chunk 2) succeeds, the read of chunk 2 is EIO, chunk 3 still reads."""
    mc = cluster_factory
    data = os.urandom(4 * CHUNK)
    reader = cold_reader(mc, {"holed": data})
    lost = manifest_of(mc, "/holed")["chunks"][2]
    s3 = mc.cluster.s3
    client = botocore.session.get_session().create_client(
        "s3",
        endpoint_url=s3.endpoint,
        region_name=s3.region,
        aws_access_key_id=s3.access_key,
        aws_secret_access_key=s3.secret_key,
    )
    client.delete_object(Bucket=s3.bucket, Key=f"chunks/{lost}")
    path = reader.mnt / "holed"
    assert read_sequentially(path, 2 * CHUNK, 128 << 10) == data[: 2 * CHUNK]
    # the read-ahead of chunk 2 went to S3 and failed, without failing the reads above
    wait_until(lambda: stats(reader)["tiers"]["s3"]["misses"] >= 1, 30, message="S3 miss")
    assert stats(reader)["prefetches"] >= 1
    with pytest.raises(OSError) as caught:
        read_direct(path, 2 * CHUNK, 128 << 10)
    assert caught.value.errno == errno.EIO
    assert read_direct(path, 3 * CHUNK, CHUNK) == data[3 * CHUNK :]
