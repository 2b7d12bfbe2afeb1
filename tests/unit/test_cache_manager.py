"""DefaultCacheManager over in-memory fake tiers: read order, verification, promotion, the
NVMe-failure write race, write-back with retries, flush, ranges, streaming, prefetch."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from fastcache.cache.manager import DefaultCacheManager
from fastcache.cache.reader import RecentChunks
from fastcache.chunks import HAVE_EXT, Buffer, Manifest, digest
from fastcache.config import CacheConfig
from fastcache.errors import (
    ChunkCorrupt,
    ChunkNotFound,
    DataUnavailable,
    TierFull,
    TierUnavailable,
    errno_for,
)
from fastcache.journal import JOURNAL_NAME, replay_file

T = TypeVar("T")
CHUNK = 4096
needs_ext = pytest.mark.skipif(not HAVE_EXT, reason="CDC needs the compiled chunker (make build)")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 60))


async def until(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    """Poll ``predicate`` on the loop until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.002)


class FakeTier:
    """An in-memory tier that counts calls and can fail, block, corrupt or be down."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.data: dict[str, bytes] = {}
        self.calls: Counter[str] = Counter()
        self.fail_reads: Exception | None = None
        self.fail_writes: Exception | None = None
        self.corrupt: set[str] = set()
        self.down_until: asyncio.Event | None = None  # TierUnavailable until set
        self.block: asyncio.Event | None = None  # every call waits for it
        self.started = asyncio.Event()  # set when any call begins
        self.closed = False

    async def _enter(self, op: str) -> None:
        self.calls[op] += 1
        self.started.set()
        if self.block is not None:
            await self.block.wait()
        if self.down_until is not None and not self.down_until.is_set():
            raise TierUnavailable(f"{self.name} is down")

    async def read(self, digest: str) -> bytes:
        await self._enter("read")
        if self.fail_reads is not None:
            raise self.fail_reads
        try:
            data = self.data[digest]
        except KeyError:
            raise ChunkNotFound(digest) from None
        if digest in self.corrupt:
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        return data

    async def write(self, digest: str, data: Buffer, pending: bool = False) -> None:
        await self._enter("write")
        if pending:
            self.calls["write_pending"] += 1
        if self.fail_writes is not None:
            raise self.fail_writes
        self.data[digest] = bytes(data)

    async def delete(self, digest: str) -> None:
        await self._enter("delete")
        self.data.pop(digest, None)

    async def exists(self, digest: str) -> bool:
        await self._enter("exists")
        return digest in self.data

    async def size(self, digest: str) -> int:
        await self._enter("size")
        try:
            return len(self.data[digest])
        except KeyError:
            raise ChunkNotFound(digest) from None

    def stats(self) -> dict[str, Any]:
        return {"calls": dict(self.calls)}

    async def close(self) -> None:
        self.closed = True


class FakeNvme(FakeTier):
    """The NVMe fake: verified reads (deleting a bad copy), pins, the sync hit path.

    ``unpin`` checks the write-back rule: a chunk is unpinned only once S3 holds it.
    """

    def __init__(self, root: Path, cloud: FakeTier) -> None:
        super().__init__("nvme")
        self.root = root
        self.pins: set[str] = set()
        self.cloud = cloud
        self.early_unpins: list[str] = []
        self.reads: Counter[str] = Counter()

    @property
    def journal_dir(self) -> Path:
        return self.root / "journal"

    @property
    def staging_dir(self) -> Path:
        return self.root / "staging"

    async def read(self, digest: str) -> bytes:
        try:
            data = await super().read(digest)
        except ChunkNotFound:
            self.reads["misses"] += 1
            raise
        if globals()["digest"](data) != digest:
            del self.data[digest]
            raise ChunkCorrupt(f"{digest} on nvme")
        self.reads["hits"] += 1
        self.reads["bytes_read"] += len(data)
        return data

    def read_into(self, digest: str, offset: int, out: memoryview) -> int | None:
        self.calls["read_into"] += 1
        data = self.data.get(digest)
        if data is None:
            self.reads["misses"] += 1
            return None
        piece = data[offset : offset + len(out)]
        out[: len(piece)] = piece
        self.reads["hits"] += 1
        self.reads["bytes_read"] += len(piece)
        return len(piece)

    async def promote(self, digest: str, data: Buffer) -> None:
        self.calls["promote"] += 1
        await self.write(digest, data)

    def stats(self) -> dict[str, Any]:
        """Like ``NvmeTier``: the tier counts its own hits and misses."""
        return {**super().stats(), **self.reads}

    def chunk_size(self, digest: str) -> int | None:
        data = self.data.get(digest)
        return None if data is None else len(data)

    def pin(self, digest: str) -> None:
        self.pins.add(digest)

    def unpin(self, digest: str) -> None:
        if digest not in self.cloud.data:
            self.early_unpins.append(digest)
        self.pins.discard(digest)

    def pinned(self) -> set[str]:
        return set(self.pins)

    def usage(self) -> dict[str, int]:
        used = sum(map(len, self.data.values()))
        return {"capacity": 1 << 30, "used": used, "free": (1 << 30) - used}


class FakePeer(FakeTier):
    """The peer fake (``PeerRouting``): alone or not, no owners, announcing succeeds."""

    self_id = "me"

    def __init__(self) -> None:
        super().__init__("peer")
        self.verifies_reads = False
        self.alone = False

    async def live_peers(self) -> dict[str, str]:
        return {self.self_id: ""}

    def owner(self, digest: str) -> str | None:
        return None

    async def announce(self, digests: Any) -> int:
        return 0

    async def read(
        self, digest: str, fetch_through: bool = False, silent: asyncio.Event | None = None
    ) -> bytes:
        return await super().read(digest)

    def invalidate_peers(self) -> None:
        self.calls["invalidate_peers"] += 1


class Rig:
    def __init__(self, tmp: Path, **overrides: Any) -> None:
        values: dict[str, Any] = {
            "nvme_dir": tmp,
            "chunk_size": CHUNK,
            "nvme_capacity": 1 << 30,
            "upload_concurrency": 2,
            "fetch_concurrency": 4,
            "writeback_retry_max": 0.02,
        }
        values.update(overrides)
        self.config = CacheConfig(**values)
        self.s3 = FakeTier("s3")
        self.peer: FakePeer = FakePeer()
        self.nvme = FakeNvme(tmp, self.s3)

    async def open(self, with_peer: bool = True) -> DefaultCacheManager:
        return await DefaultCacheManager.open(
            self.config, self.nvme, self.s3, self.peer if with_peer else None
        )


def chunk_bytes(tag: str, size: int = CHUNK) -> bytes:
    return random.Random(tag).randbytes(size)


# --- read path ---------------------------------------------------------------------------------
def test_read_order_nvme_then_peer_then_s3(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path)
        a, b, c = (chunk_bytes(t) for t in "abc")
        da, db, dc = digest(a), digest(b), digest(c)
        for tier in (rig.nvme, rig.peer, rig.s3):
            tier.data[da] = a
        rig.peer.data[db] = rig.s3.data[db] = b
        rig.s3.data[dc] = c
        m = await rig.open()
        try:
            assert await m.read_chunk(da) == a
            assert (rig.peer.calls["read"], rig.s3.calls["read"]) == (0, 0)
            assert await m.read_chunk(db) == b
            assert (rig.peer.calls["read"], rig.s3.calls["read"]) == (1, 0)
            assert await m.read_chunk(dc) == c
            assert (rig.peer.calls["read"], rig.s3.calls["read"]) == (2, 1)
            tiers = m.stats()["tiers"]
            assert (tiers["nvme"]["hits"], tiers["nvme"]["misses"]) == (1, 2)
            assert (tiers["peer"]["hits"], tiers["peer"]["misses"]) == (1, 1)
            assert (tiers["s3"]["hits"], tiers["s3"]["bytes"]) == (1, CHUNK)
            assert m.stats()["latency"]["read"]["count"] == 3
        finally:
            await m.close()

    run(main())


class OwnerPeer(FakePeer):
    """A peer tier with rendezvous owners: ``owners`` maps digest → owner id (default us).
    A fetch-through read is served by the "owner", which reads S3 like a real one would."""

    def __init__(self, s3: FakeTier) -> None:
        super().__init__()
        self.s3 = s3
        self.owners: dict[str, str] = {}
        self.through: list[str] = []

    async def live_peers(self) -> dict[str, str]:
        return {"me": "", "other": ""}

    def owner(self, digest: str) -> str | None:
        return self.owners.get(digest, "me")

    async def read(
        self, digest: str, fetch_through: bool = False, silent: asyncio.Event | None = None
    ) -> bytes:
        if fetch_through and self.owner(digest) != self.self_id:
            await self._enter("read")
            self.through.append(digest)
            return await self.s3.read(digest)
        return await super().read(digest)


def test_fetch_through_asks_the_owner_and_is_one_hop(tmp_path: Path) -> None:
    """A miss on a chunk another node owns goes to that owner (fetch-through), never to S3
    here; concurrent misses share one request; a chunk we own, or a fetch-through request
    we serve for a peer, never asks another node to fetch (no recursion)."""

    async def main() -> None:
        rig = Rig(tmp_path)
        rig.peer = peer = OwnerPeer(rig.s3)
        theirs, ours, served = (chunk_bytes(t) for t in ("theirs", "ours", "served"))
        for data in (theirs, ours, served):
            rig.s3.data[digest(data)] = data
        peer.owners[digest(theirs)] = peer.owners[digest(served)] = "other"
        peer.block = asyncio.Event()
        m = await rig.open()
        try:
            readers = [asyncio.ensure_future(m.read_chunk(digest(theirs))) for _ in range(3)]
            await peer.started.wait()
            peer.block.set()
            assert await asyncio.gather(*readers) == [theirs] * 3
            assert peer.through == [digest(theirs)]  # one request for three readers
            assert rig.s3.calls["read"] == 1  # the "owner" read it, on our behalf
            assert m.stats()["tiers"]["s3"]["hits"] == 0

            assert await m.read_chunk(digest(ours)) == ours  # we own it: S3 ourselves
            assert await m.read_chunk_for_peer(digest(served)) == served  # one hop only
            assert peer.through == [digest(theirs)]
            assert m.stats()["tiers"]["s3"]["hits"] == 2
            assert m.stats()["fetch_through_served"] == 1
        finally:
            await m.close()

    run(main())


class SilentPeer(FakePeer):
    """Peers that fall silent (frozen): ``silent`` is set, then the read hangs until
    ``wake`` is set, when it answers with what ``data`` holds (or misses)."""

    def __init__(self) -> None:
        super().__init__()
        self.wake = asyncio.Event()
        self.cancelled = 0

    async def read(
        self, digest: str, fetch_through: bool = False, silent: asyncio.Event | None = None
    ) -> bytes:
        self.calls["read"] += 1
        assert silent is not None
        silent.set()
        try:
            await self.wake.wait()
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return await super().read(digest)


def test_silent_peers_are_raced_by_s3(tmp_path: Path) -> None:
    """Peers that fall silent do not hold a read up: S3 is read beside them and the first
    copy wins (the silent read is cancelled); if S3 lacks it, the peers may still answer."""

    async def main() -> None:
        rig = Rig(tmp_path)
        rig.peer = peer = SilentPeer()
        in_s3, only_peer = chunk_bytes("in-s3"), chunk_bytes("only-peer")
        rig.s3.data[digest(in_s3)] = in_s3
        peer.data[digest(only_peer)] = only_peer
        m = await rig.open()
        try:
            assert await m.read_chunk(digest(in_s3)) == in_s3  # the peer never woke
            assert (peer.cancelled, m.stats()["hedged_to_s3"]) == (1, 1)
            late = asyncio.ensure_future(m.read_chunk(digest(only_peer)))
            await until(lambda: rig.s3.calls["read"] == 2)  # S3 missed it ...
            assert not late.done()
            peer.wake.set()  # ... and the silent peer answers after all
            assert await late == only_peer
            assert m.stats()["hedged_to_s3"] == 2
            assert m.stats()["tiers"]["s3"]["misses"] == 1
        finally:
            await m.close()

    run(main())


def test_without_peer_tier_reads_go_to_s3(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path)
        data = chunk_bytes("np")
        rig.s3.data[digest(data)] = rig.peer.data[digest(data)] = data
        m = await rig.open(with_peer=False)
        try:
            assert await m.read_chunk(digest(data)) == data
            assert rig.peer.calls["read"] == 0
            m.set_peer_tier(rig.peer)
            other = chunk_bytes("np2")
            rig.peer.data[digest(other)] = other
            assert await m.read_chunk(digest(other)) == other
            assert rig.peer.calls["read"] == 1
        finally:
            await m.close()

    run(main())


def test_corrupt_peer_copy_falls_through_to_s3(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path)
        data = chunk_bytes("corrupt")
        d = digest(data)
        rig.peer.data[d] = rig.s3.data[d] = data
        rig.peer.corrupt.add(d)
        m = await rig.open()
        try:
            assert await m.read_chunk(d) == data
            stats = m.stats()
            assert stats["corrupt_chunks"] == 1
            assert stats["tiers"]["peer"]["corrupt"] == 1
            assert stats["tiers"]["s3"]["hits"] == 1
            await until(lambda: d in rig.nvme.data)
            assert rig.nvme.data[d] == data  # the good copy was promoted, not the bad one
        finally:
            await m.close()

    run(main())


def test_all_tiers_failing_is_data_unavailable(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path)
        data = chunk_bytes("gone")
        d = digest(data)
        rig.peer.fail_reads = TierUnavailable("peer down")
        rig.s3.data[d] = data
        rig.s3.corrupt.add(d)
        m = await rig.open()
        try:
            with pytest.raises(DataUnavailable) as info:
                await m.read_chunk(d)
            assert errno_for(info.value) == errno.EIO
            with pytest.raises(DataUnavailable):
                await m.read_chunk(digest(b"never written"))
            assert d not in rig.nvme.data
        finally:
            await m.close()

    run(main())


def test_promotion_lands_on_nvme_and_next_read_hits(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path)
        data = chunk_bytes("promote")
        d = digest(data)
        rig.s3.data[d] = data
        m = await rig.open(with_peer=False)
        try:
            assert await m.read_chunk(d) == data
            await until(lambda: m.stats()["promotions"] == 1)
            assert rig.nvme.data[d] == data
            out = bytearray(100)
            assert m.read_local(d, 10, memoryview(out)) == 100
            assert out == data[10:110]
            assert await m.read_chunk(d) == data
            assert rig.s3.calls["read"] == 1
        finally:
            await m.close()

    run(main())


def test_promotion_does_not_block_the_reader_and_tier_full_is_counted(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path)
        data = chunk_bytes("full")
        d = digest(data)
        rig.s3.data[d] = data
        rig.nvme.fail_writes = TierFull("nvme full")
        m = await rig.open(with_peer=False)
        try:
            assert await m.read_chunk(d) == data
            await until(lambda: m.stats()["promotions_full"] == 1)
            assert m.stats()["promotions"] == 0
            # A slow NVMe write does not hold the reader back either.
            rig.nvme.fail_writes = None
            gate = asyncio.Event()
            rig.nvme.block = gate
            other = chunk_bytes("slow")
            rig.s3.data[digest(other)] = other
            rig.nvme.started.clear()
            read = asyncio.create_task(m.read_chunk(digest(other)))
            # NVMe reads block too; let the read through and keep only the promotion stuck.
            await rig.nvme.started.wait()
            rig.nvme.block = None
            gate.set()
            assert await read == other
        finally:
            await m.close()

    run(main())


def test_corrupt_chunk_on_nvme_is_refetched_and_repromoted(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path)
        data = chunk_bytes("nvme-bad")
        d = digest(data)
        rig.s3.data[d] = data
        rig.nvme.data[d] = data
        rig.nvme.corrupt.add(d)
        m = await rig.open(with_peer=False)
        try:
            assert await m.read_chunk(d) == data
            assert m.stats()["corrupt_chunks"] == 1
            rig.nvme.corrupt.discard(d)
            await until(lambda: rig.nvme.data.get(d) == data)
        finally:
            await m.close()

    run(main())


# --- write path --------------------------------------------------------------------------------
def test_write_goes_to_nvme_pinned_journaled_then_s3(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path)
        data = chunk_bytes("w")
        d = digest(data)
        m = await rig.open()
        try:
            await m.write_chunk(d, data)
            assert rig.nvme.data[d] == data
            await m.flush([d])
            assert rig.s3.data[d] == data
            await until(lambda: d in rig.peer.data)  # replicated to peers as well
            assert d not in rig.nvme.pins
            assert m.pending_uploads() == 0
            assert m.stats()["writeback"]["uploaded"] == 1
        finally:
            await m.close()
        assert replay_file(rig.nvme.journal_dir / JOURNAL_NAME)[0] == set()
        assert rig.nvme.early_unpins == []

    run(main())


@pytest.mark.parametrize("nvme_error", [TierUnavailable("nvme gone"), TierFull("nvme full")])
def test_nvme_failure_races_peer_and_s3_s3_first(tmp_path: Path, nvme_error: Exception) -> None:
    async def main() -> None:
        rig = Rig(tmp_path)
        rig.nvme.fail_writes = nvme_error
        peer_gate = asyncio.Event()
        rig.peer.block = peer_gate  # the peer never answers
        data = chunk_bytes("race1")
        d = digest(data)
        m = await rig.open()
        try:
            await m.write_chunk(d, data)  # returns although the peer is still blocked
            assert rig.s3.data[d] == data
            assert rig.peer.calls["write"] == 1
            assert m.pending_uploads() == 0
            assert m.stats()["writes"]["s3"] == 1
            assert d not in rig.nvme.pins
        finally:
            peer_gate.set()
            await m.close()

    run(main())


def test_nvme_failure_race_peer_first_and_s3_finishes_in_background(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path)
        rig.nvme.fail_writes = TierUnavailable("nvme gone")
        s3_gate = asyncio.Event()
        rig.s3.block = s3_gate
        data = chunk_bytes("race2")
        d = digest(data)
        m = await rig.open()
        try:
            await m.write_chunk(d, data)  # the peer answered; S3 is still blocked
            assert rig.peer.data[d] == data
            assert d not in rig.s3.data
            assert m.pending_uploads() == 1
            with pytest.raises(TierUnavailable):
                await m.flush([d], timeout=0.05)
            s3_gate.set()
            await m.flush([d], timeout=10)
            assert rig.s3.data[d] == data
            assert m.pending_uploads() == 0
        finally:
            await m.close()

    run(main())


def test_nvme_failure_peer_briefly_away_is_tried_again_while_s3_is_frozen(
    tmp_path: Path,
) -> None:
    """The peer refuses the pending chunk twice (a late heartbeat, a restart) and S3 never
    answers: the write keeps asking the peers, asking the coordinator for the list again,
    and returns once a peer takes the chunk, instead of waiting on S3 alone."""

    class FlakyPeer(FakePeer):
        refusals = 2

        async def write(self, digest: str, data: Buffer, pending: bool = False) -> None:
            if self.refusals:
                self.refusals -= 1
                self.calls["refused"] += 1
                raise TierUnavailable("no live peer to replicate to")
            await super().write(digest, data, pending)

    async def main() -> None:
        rig = Rig(tmp_path)
        rig.peer = FlakyPeer()
        rig.nvme.fail_writes = TierUnavailable("nvme gone")
        rig.s3.block = asyncio.Event()  # frozen for the whole test
        data = chunk_bytes("flaky-peer")
        d = digest(data)
        m = await rig.open()
        try:
            await m.write_chunk(d, data)
            assert rig.peer.data[d] == data
            assert rig.peer.calls["refused"] == 2
            assert rig.peer.calls["write_pending"] == 1
            assert rig.peer.calls["invalidate_peers"] == 2
            assert d in m.journal  # pending until S3 has it
        finally:
            rig.s3.block.set()
            await m.close()

    run(main())


class AnnouncingPeer(FakePeer):
    """The peer fake with ``PeerTier.announce``: records each batch, can fail."""

    def __init__(self) -> None:
        super().__init__()
        self.batches: list[list[str]] = []
        self.announce_error: Exception | None = None

    async def announce(self, digests: Any) -> int:
        self.batches.append(list(digests))
        if self.announce_error is not None:
            raise self.announce_error
        return 0


def test_publish_announces_only_chunks_not_yet_in_s3(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path)
        peer = AnnouncingPeer()
        rig.peer = peer
        uploaded, local = chunk_bytes("up"), chunk_bytes("local")
        du, dl = digest(uploaded), digest(local)
        m = await rig.open()
        try:
            await m.write_chunk(du, uploaded)
            await m.flush([du])
            rig.s3.down_until = asyncio.Event()  # write-back of the next chunk cannot finish
            await m.write_chunk(dl, local)
            assert m.pending_uploads() == 1
            await m.publish([du, dl, dl, "f" * 32])
            assert peer.batches == [[dl]]  # one batch: only the chunk S3 does not have
            assert m.stats()["writeback"]["published"] == 1
            await m.publish([du])  # nothing local: no request at all
            assert len(peer.batches) == 1
            peer.announce_error = TierUnavailable("coordinator down")
            await m.publish([dl])  # logged and counted, not raised
            assert m.stats()["writeback"]["publish_failures"] == 1
            rig.s3.down_until.set()
            await m.flush([dl], timeout=10)
            await m.publish([dl])  # in S3 now: nothing to announce
            assert len(peer.batches) == 2
        finally:
            await m.close()

    run(main())


def test_publish_without_peer_tier_is_a_no_op(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path)
        rig.s3.down_until = asyncio.Event()
        data = chunk_bytes("solo")
        d = digest(data)
        m = await rig.open(with_peer=False)
        try:
            await m.write_chunk(d, data)
            await m.publish([d])
            assert m.stats()["writeback"]["published"] == 0
        finally:
            rig.s3.down_until.set()
            await m.close()

    run(main())


def test_peer_won_race_then_s3_failure_is_retried(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path)
        rig.nvme.fail_writes = TierUnavailable("nvme gone")
        up = asyncio.Event()
        rig.s3.down_until = up
        data = chunk_bytes("race3")
        d = digest(data)
        m = await rig.open()
        try:
            await m.write_chunk(d, data)
            await until(lambda: rig.s3.calls["write"] >= 3)
            up.set()
            await m.sync()
            assert rig.s3.data[d] == data
        finally:
            await m.close()

    run(main())


def test_every_tier_failing_a_write_raises(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path)
        rig.nvme.fail_writes = TierFull("nvme full")
        rig.peer.fail_writes = TierUnavailable("peer down")
        rig.s3.fail_writes = TierUnavailable("s3 down")
        data = chunk_bytes("fail")
        m = await rig.open()
        try:
            with pytest.raises(TierUnavailable):
                await m.write_chunk(digest(data), data)
            assert m.pending_uploads() == 0
            assert digest(data) not in rig.nvme.pins
        finally:
            await m.close()

    run(main())


def test_writeback_retries_until_s3_returns_and_never_unpins_early(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path)
        up = asyncio.Event()
        rig.s3.down_until = up
        chunks = [chunk_bytes(f"wb{i}") for i in range(5)]
        m = await rig.open()
        try:
            for data in chunks:
                await m.write_chunk(digest(data), data)
            assert m.pending_uploads() == 5
            assert rig.nvme.pins == {digest(c) for c in chunks}
            await until(lambda: m.stats()["writeback"]["failed_retries"] >= 6)
            assert rig.nvme.pins == {digest(c) for c in chunks}
            with pytest.raises(TierUnavailable):
                await m.flush([digest(chunks[0])], timeout=0.05)
            up.set()
            await m.flush([digest(c) for c in chunks], timeout=20)
            assert all(rig.s3.data[digest(c)] == c for c in chunks)
            assert rig.nvme.pins == set()
            assert m.pending_uploads() == 0
        finally:
            await m.close()
        assert rig.nvme.early_unpins == []

    run(main())


def test_peer_replication_failure_is_not_fatal(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path)
        rig.peer.fail_writes = TierUnavailable("peer down")
        data = chunk_bytes("rep")
        m = await rig.open()
        try:
            await m.write_chunk(digest(data), data)
            await m.sync()
            await until(lambda: m.stats()["writeback"]["peer_failures"] == 1)
            assert rig.s3.data[digest(data)] == data
        finally:
            await m.close()

    run(main())


def test_close_keeps_pending_uploads_journaled_and_reopen_uploads_them(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path)
        up = asyncio.Event()
        rig.s3.down_until = up
        chunks = [chunk_bytes(f"j{i}") for i in range(4)]
        m = await rig.open(with_peer=False)
        for data in chunks:
            await m.write_chunk(digest(data), data)
        await m.close()
        assert replay_file(rig.nvme.journal_dir / JOURNAL_NAME)[0] == {digest(c) for c in chunks}
        rig.nvme.pins.clear()  # a new process: nothing pinned in memory yet
        up.set()
        m2 = await rig.open(with_peer=False)
        try:
            assert rig.nvme.pins <= {digest(c) for c in chunks}
            await m2.sync()
            assert all(rig.s3.data[digest(c)] == c for c in chunks)
        finally:
            await m2.close()
        assert replay_file(rig.nvme.journal_dir / JOURNAL_NAME)[0] == set()

    run(main())


def test_replay_recovers_journaled_chunks_missing_from_nvme(tmp_path: Path) -> None:
    """A journaled chunk that is not on NVMe (it went to a peer when NVMe failed) is never
    dropped: the replay finds it on a peer and uploads it, or finds it already in S3."""

    async def main() -> None:
        rig = Rig(tmp_path)
        up = asyncio.Event()
        rig.s3.down_until = up
        on_peer, in_s3 = chunk_bytes("on-peer"), chunk_bytes("in-s3")
        m = await rig.open(with_peer=False)
        await m.write_chunk(digest(on_peer), on_peer)
        await m.write_chunk(digest(in_s3), in_s3)
        await m.close()
        for data in (on_peer, in_s3):
            del rig.nvme.data[digest(data)]
        rig.peer.data[digest(on_peer)] = on_peer
        up.set()
        rig.s3.data[digest(in_s3)] = in_s3
        m2 = await rig.open()
        try:
            await m2.sync(timeout=10)
            assert rig.s3.data[digest(on_peer)] == on_peer
            assert m2.journal.pending == frozenset()
            assert m2.stats()["writeback"]["lost"] == 0
            assert m2.counters.counts["recovered"] == 2
        finally:
            await m2.close()
        pending, _ = replay_file(tmp_path / "journal" / JOURNAL_NAME)
        assert pending == set()

    run(main())


def test_same_chunk_written_concurrently_is_stored_once(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path)
        data = chunk_bytes("same")
        m = await rig.open(with_peer=False)
        try:
            await asyncio.gather(*(m.write_chunk(digest(data), data) for _ in range(10)))
            await m.sync()
            assert rig.nvme.calls["write"] == 1
            assert rig.s3.calls["write"] == 1
        finally:
            await m.close()

    run(main())


# --- files: ranges, write_bytes, the streaming writer ---------------------------------------------
def _source(size: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(size)


def _ranges(size: int) -> list[tuple[int, int]]:
    rnd = random.Random(size)
    picks = [(0, size), (0, 1), (CHUNK - 1, 2), (CHUNK, CHUNK), (size - 1, 10), (size, 5)]
    picks += [(CHUNK - 10, 3 * CHUNK), (5, size)]
    picks += [(rnd.randrange(size), rnd.randrange(1, 4 * CHUNK)) for _ in range(25)]
    return picks


@pytest.mark.parametrize("chunking", ["fixed", pytest.param("cdc", marks=needs_ext)])
def test_read_range_across_chunk_boundaries(tmp_path: Path, chunking: str) -> None:
    async def main() -> None:
        rig = Rig(tmp_path, chunking=chunking)
        src = _source(10 * CHUNK + 123)
        m = await rig.open(with_peer=False)
        try:
            manifest = await m.write_bytes(src)
            assert manifest.size == len(src)
            if chunking == "cdc":
                assert manifest.lengths is not None and sum(manifest.lengths) == len(src)
            else:
                assert manifest.lengths is None and len(manifest.chunks) == 11
            Manifest.from_json(manifest.to_json())  # valid on the wire
            for off, size in _ranges(len(src)):
                assert await m.read_range(manifest, off, size) == src[off : off + size]
            await m.sync()
            rig.nvme.data.clear()  # from S3 now, and promoted again
            for off, size in _ranges(len(src)):
                assert await m.read_range(manifest, off, size) == src[off : off + size]
            assert m.stats()["tiers"]["s3"]["hits"] >= 1
        finally:
            await m.close()

    run(main())


@pytest.mark.parametrize("chunking", ["fixed", pytest.param("cdc", marks=needs_ext)])
@pytest.mark.parametrize("size", [0, 1, CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK + 17, 40 * CHUNK])
def test_writer_streaming_equals_write_bytes(tmp_path: Path, chunking: str, size: int) -> None:
    async def main() -> None:
        rig = Rig(tmp_path, chunking=chunking)
        src = _source(size, seed=size)
        m = await rig.open(with_peer=False)
        try:
            whole = await m.write_bytes(src)
            w = m.writer()
            rnd = random.Random(size)
            pos = 0
            while pos < size:
                n = rnd.choice([1, 7, 100, CHUNK - 1, CHUNK, 3 * CHUNK + 5])
                await w.write(memoryview(src)[pos : pos + n])
                pos += n
            streamed = await w.finish()
            assert streamed.to_json() == whole.to_json()
            assert await m.read_range(streamed, 0, size) == src
        finally:
            await m.close()

    run(main())


def test_writer_abort_and_errors(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path)
        m = await rig.open(with_peer=False)
        try:
            w = m.writer()
            await w.write(b"x" * 100)
            await w.abort()
            with pytest.raises(RuntimeError):
                await w.write(b"more")
            rig.nvme.fail_writes = TierUnavailable("nvme gone")
            rig.s3.fail_writes = TierUnavailable("s3 down")
            w = m.writer()
            await w.write(_source(3 * CHUNK))
            with pytest.raises(TierUnavailable):
                await w.finish()
        finally:
            await m.close()

    run(main())


def test_write_bytes_writes_each_distinct_chunk_once(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path)
        block = _source(CHUNK)
        src = block * 6 + b"tail"
        m = await rig.open(with_peer=False)
        try:
            manifest = await m.write_bytes(src)
            assert len(manifest.chunks) == 7
            assert len(set(manifest.chunks)) == 2
            assert rig.nvme.calls["write"] == 2
            assert await m.read_range(manifest, 0, len(src)) == src
        finally:
            await m.close()

    run(main())


# --- prefetch, entries, stats ------------------------------------------------------------------
def test_prefetch_dedups_inflight_fetches(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path, fetch_concurrency=8)  # all six fetches can be in flight at once
        src = _source(6 * CHUNK, seed=3)
        m = await rig.open(with_peer=False)
        try:
            manifest = await m.write_bytes(src)
            await m.sync()
            rig.nvme.data.clear()
            gate = asyncio.Event()
            rig.s3.block = gate
            reads_before = rig.s3.calls["read"]
            m.prefetch(manifest, 0, 4)
            m.prefetch(manifest, 0, 4)
            m.prefetch(manifest, 2, 4)  # overlaps: chunks 2, 3 in flight; 4, 5 new
            reader = asyncio.create_task(m.read_chunk(manifest.chunks[1]))
            await until(lambda: rig.s3.calls["read"] - reads_before >= 6)
            gate.set()
            assert await reader == src[CHUNK : 2 * CHUNK]
            await until(lambda: all(c in rig.nvme.data for c in manifest.chunks))
            assert rig.s3.calls["read"] - reads_before == 6
            assert m.stats()["promotions"] == 6
            m.prefetch(manifest, 0, 6)  # all on NVMe: nothing fetched
            await until(lambda: not m.reader._prefetches)
            assert rig.s3.calls["read"] - reads_before == 6
        finally:
            await m.close()

    run(main())


def test_read_ahead_fetches_only_the_chunks_missing_from_nvme(tmp_path: Path) -> None:
    """``prefetch`` leaves the chunks already on NVMe alone (a sequential reader through
    FUSE reads those whole itself, ``mount.stream``) and fetches and promotes the others,
    each once."""

    async def main() -> None:
        rig = Rig(tmp_path)
        src = _source(6 * CHUNK, seed=5)
        m = await rig.open(with_peer=False)
        try:
            manifest = await m.write_bytes(src)
            await m.sync()
            chunks = manifest.chunks
            del rig.nvme.data[chunks[3]]  # not on NVMe: fetched
            reads = rig.nvme.reads["hits"] + rig.nvme.reads["misses"]
            m.prefetch(manifest, 1, 4)
            await until(lambda: chunks[3] in rig.nvme.data)  # fetched and promoted
            m.prefetch(manifest, 2, 4)
            m.prefetch(manifest, 3, 4)
            await until(lambda: not m.reader.inflight())
            assert rig.s3.calls["read"] == 1
            assert rig.nvme.reads["hits"] + rig.nvme.reads["misses"] == reads  # none read
        finally:
            await m.close()

    run(main())


def test_stats_shape(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path)
        m = await rig.open()
        try:
            data = chunk_bytes("stats")
            await m.write_chunk(digest(data), data)
            await m.read_chunk(digest(data))
            assert m.read_local(digest(b"nope"), 0, memoryview(bytearray(4))) is None
            s = m.stats()
            assert set(s["tiers"]) == {"nvme", "peer", "s3"}
            assert s["tiers"]["nvme"]["misses"] == 1
            for key in ("read", "write", "read_local"):
                assert {"p50_ms", "p95_ms", "p99_ms", "count"} <= set(s["latency"][key])
            assert s["latency"]["write"]["count"] == 1
            assert {"queue_depth", "pending", "uploaded", "failed_retries"} <= set(s["writeback"])
            assert "corrupt_chunks" in s and "promotions" in s
        finally:
            await m.close()

    run(main())


# --- stress --------------------------------------------------------------------------------------
@pytest.mark.race
def test_many_small_writes_racing_reads(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path, upload_concurrency=4)
        m = await rig.open()
        payloads = [os.urandom(64 + i % 200) for i in range(1000)]
        written: list[str] = []
        try:

            async def writer(part: list[bytes]) -> None:
                for data in part:
                    await m.write_chunk(digest(data), data)
                    written.append(digest(data))
                    await asyncio.sleep(0)  # let the readers in between writes

            async def reader() -> int:
                checked = 0
                rnd = random.Random(1)
                while len(written) < len(payloads):
                    if written:
                        d = written[rnd.randrange(len(written))]
                        data = await m.read_chunk(d)
                        assert digest(data) == d
                        checked += 1
                    await asyncio.sleep(0)
                return checked

            readers = [asyncio.create_task(reader()) for _ in range(4)]
            await asyncio.gather(*(writer(payloads[i::8]) for i in range(8)))
            assert sum(await asyncio.gather(*readers)) > 0
            await m.sync()
            assert all(rig.s3.data[digest(p)] == p for p in payloads)
            assert rig.nvme.pins == set()
        finally:
            await m.close()
        assert rig.nvme.early_unpins == []

    run(main())


@pytest.mark.race
def test_concurrent_files_through_writers_and_ranges(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path)
        m = await rig.open(with_peer=False)
        try:

            async def one(seed: int) -> None:
                src = _source(5 * CHUNK + seed, seed=seed)
                w = m.writer()
                for pos in range(0, len(src), 1000):
                    await w.write(src[pos : pos + 1000])
                manifest = await w.finish()
                got = await m.read_range(manifest, 0, len(src))
                assert got == src

            await asyncio.gather(*(one(s) for s in range(16)))
            await m.sync()
            assert m.pending_uploads() == 0
        finally:
            await m.close()

    run(main())


def test_a_tier_that_verifies_its_reads_is_not_hashed_twice(tmp_path: Path) -> None:
    """The peer tier verifies what it returns; the manager trusts that (one hash per chunk),
    and keeps verifying tiers that do not say so (S3 here)."""

    async def main() -> None:
        rig = Rig(tmp_path)
        rig.peer.verifies_reads = True
        data = chunk_bytes("once")
        d = digest(data)
        rig.peer.data[d] = data
        rig.peer.corrupt.add(d)  # a lie the manager can only miss by not hashing
        rig.s3.data[d] = data
        m = await rig.open()
        try:
            assert await m.read_chunk(d) != data
            assert m.stats()["tiers"]["peer"]["hits"] == 1
        finally:
            await m.close()

    run(main())


def test_write_back_uploads_from_memory_not_a_reread_of_nvme(tmp_path: Path) -> None:
    """A chunk written through the manager is uploaded from the bytes it was given (NVMe is
    written O_DIRECT: reading it back would be a disk read and a hash); after a restart the
    journal's chunks are read from NVMe."""

    async def main() -> None:
        rig = Rig(tmp_path)
        data = chunk_bytes("mem")
        d = digest(data)
        m = await rig.open(with_peer=False)
        try:
            await m.write_chunk(d, bytearray(data))
            await m.flush([d], timeout=10)
            assert rig.s3.data[d] == data
            assert rig.nvme.calls["read"] == 0
            assert m.writeback._upload_bytes == 0 and not m.writeback._upload_data
        finally:
            await m.close()

    run(main())


@pytest.mark.parametrize("budget", [2, 6])
def test_upload_memory_bounds_what_waits_in_memory(tmp_path: Path, budget: int) -> None:
    """Six chunks written while S3 does not answer: the first ``budget`` of them (in chunks)
    wait in memory, the rest are read back from NVMe when their upload starts; read-only
    views (a sealed chunk) are kept as they are, not copied."""

    async def main() -> None:
        rig = Rig(tmp_path, upload_memory=budget * CHUNK)
        datas = [chunk_bytes(f"budget{i}") for i in range(6)]
        names = [digest(x) for x in datas]
        rig.s3.block = asyncio.Event()
        m = await rig.open(with_peer=False)
        try:
            views = [memoryview(x) for x in datas]  # read-only: bytes underneath
            ever_kept: set[str] = set()  # (an upload worker may take a kept chunk meanwhile)
            for name, view in zip(names, views, strict=True):
                await m.write_chunk(name, view)
                kept = m.writeback._upload_data
                assert m.writeback._upload_bytes == len(kept) * CHUNK <= budget * CHUNK
                if name in kept:
                    assert kept[name] is view
                ever_kept |= set(kept)
            assert len(ever_kept) >= min(budget, 6)
            rig.s3.block.set()
            await m.flush(names, timeout=10)
            assert [rig.s3.data[n] for n in names] == datas
            assert rig.nvme.calls["read"] == 6 - len(ever_kept)
            if budget < 6:
                assert rig.nvme.calls["read"] > 0
            assert m.writeback._upload_bytes == 0 and not m.writeback._upload_data
        finally:
            await m.close()

    run(main())


def test_unpublished_names_only_local_chunks_and_the_peer_id(tmp_path: Path) -> None:
    """What a manifest commit sends as ``holder``/``held`` in place of ``publish``: the same
    filter (on this NVMe, not in S3 yet), this node's peer id, and no request of its own."""

    async def main() -> None:
        rig = Rig(tmp_path)
        peer = AnnouncingPeer()
        peer.self_id = "node-a"
        rig.peer = peer
        uploaded, local = chunk_bytes("up"), chunk_bytes("local")
        du, dl = digest(uploaded), digest(local)
        m = await rig.open()
        try:
            assert m.peer_id == "node-a"
            await m.write_chunk(du, uploaded)
            await m.flush([du])
            rig.s3.down_until = asyncio.Event()
            await m.write_chunk(dl, local)
            assert m.unpublished([du, dl, dl, "f" * 32]) == [dl]
            assert peer.batches == []  # a filter, not a request
            m.note_published(1)
            assert m.stats()["writeback"]["published"] == 1
            rig.s3.down_until.set()
            await m.flush([dl], timeout=10)
            assert m.unpublished([dl]) == []
        finally:
            await m.close()

    run(main())


def test_unpublished_without_peer_tier_is_empty(tmp_path: Path) -> None:
    async def main() -> None:
        rig = Rig(tmp_path)
        rig.s3.down_until = asyncio.Event()
        data = chunk_bytes("solo")
        d = digest(data)
        m = await rig.open(with_peer=False)
        try:
            await m.write_chunk(d, data)
            assert m.peer_id is None
            assert m.unpublished([d]) == []
        finally:
            rig.s3.down_until.set()
            await m.close()

    run(main())


# --- cold sequential reads ---------------------------------------------------------------------
def test_a_sequential_stream_reads_further_ahead(tmp_path: Path) -> None:
    """Each step of the same stream doubles its window, up to ``fetch_concurrency``; a seek
    starts it again from the window asked for."""

    async def main() -> None:
        rig = Rig(tmp_path, fetch_concurrency=8)
        src = _source(40 * CHUNK, seed=5)
        m = await rig.open(with_peer=False)
        try:
            manifest = await m.write_bytes(src)
            await m.sync()
            rig.nvme.data.clear()
            rig.s3.block = gate = asyncio.Event()  # fetches stay in flight
            chunks = manifest.chunks
            m.prefetch(manifest, 1, 2)  # a new stream
            assert set(m.reader._prefetches) == set(chunks[1:3])
            m.prefetch(manifest, 2, 2)  # it went on: window 4
            assert set(m.reader._prefetches) == set(chunks[1:6])
            m.prefetch(manifest, 3, 2)  # window 8
            assert set(m.reader._prefetches) == set(chunks[1:11])
            m.prefetch(manifest, 4, 2)  # capped at fetch_concurrency
            assert set(m.reader._prefetches) == set(chunks[1:12])
            m.prefetch(manifest, 30, 2)  # a seek: back to 2
            assert set(m.reader._prefetches) == set(chunks[1:12]) | set(chunks[30:32])
            gate.set()
            await until(lambda: not m.reader._prefetches)
            await until(lambda: m.stats()["promotions"] == 13)
        finally:
            await m.close()

    run(main())


def test_a_fetched_chunk_is_served_from_memory(tmp_path: Path) -> None:
    """Even when promotion to NVMe fails, the chunk just fetched (and verified) serves the
    hit path and the next reads without another fetch."""

    async def main() -> None:
        rig = Rig(tmp_path)
        data = chunk_bytes("memory")
        d = digest(data)
        rig.s3.data[d] = data
        rig.nvme.fail_writes = TierUnavailable("disk gone")
        m = await rig.open(with_peer=False)
        try:
            assert await m.read_chunk(d) == data
            await until(lambda: m.stats()["promotions_failed"] == 1)
            out = bytearray(100)
            assert m.read_local(d, 10, memoryview(out)) == 100
            assert out == data[10:110]
            assert await m.read_chunk(d) == data
            assert rig.s3.calls["read"] == 1
            assert m.stats()["memory_hits"] == 2
        finally:
            await m.close()

    run(main())


def test_recent_chunks_drop_the_oldest_fetched_first() -> None:
    """FIFO, not LRU: a reader re-reading the chunk it is on must not push out the chunks
    fetched ahead of it."""
    recent = RecentChunks(budget=2 * CHUNK)
    a, b, c = (chunk_bytes(t) for t in "abc")
    recent.put("a", a)
    recent.put("b", b)
    assert recent.get("a") == a  # read, but still the oldest fetched
    recent.put("c", c)
    assert "a" not in recent and recent.get("b") == b and recent.get("c") == c
    out = bytearray(10)
    assert recent.read_into("c", CHUNK - 4, memoryview(out)) == 4
    assert out[:4] == c[-4:]
    assert recent.read_into("a", 0, memoryview(out)) is None


def test_a_node_alone_asks_s3_before_the_peer_tier(tmp_path: Path) -> None:
    """With no other live node, the peer tier could only ask the coordinator: S3 first, the
    peer tier only for what S3 lacks."""

    async def main() -> None:
        rig = Rig(tmp_path)
        rig.peer.alone = True
        a, b = chunk_bytes("alone-a"), chunk_bytes("alone-b")
        rig.s3.data[digest(a)] = rig.peer.data[digest(a)] = a
        rig.peer.data[digest(b)] = b
        m = await rig.open()
        try:
            assert await m.read_chunk(digest(a)) == a
            assert (rig.s3.calls["read"], rig.peer.calls["read"]) == (1, 0)
            assert await m.read_chunk(digest(b)) == b
            assert (rig.s3.calls["read"], rig.peer.calls["read"]) == (2, 1)
        finally:
            await m.close()

    run(main())
