"""The CacheManager: the read path, the write path, promotion, write-back and cache stats.

Reads walk NVMe → peer → S3. Whatever comes from the peer or S3 is verified (xxh3-128)
before use and promoted to NVMe in the background. Writes go to NVMe first, where the chunk
is pinned, recorded in the journal (fsynced) and queued for write-back; if NVMe fails, the
chunk is raced to the peer tier and S3 in parallel and the first success returns.

Write-back: ``upload_concurrency`` workers upload queued chunks to S3 (and replicate them to
peers in parallel; peer failures are counted, not fatal). Only after S3 has a chunk is it
marked done in the journal and unpinned on NVMe. A failing upload is retried with
exponential backoff, forever: acknowledged data is never dropped. ``flush`` and ``sync``
wait for S3; they can time out, the uploads cannot.

Concurrency: every coroutine runs on one event loop. ``read_local`` and the entries API may
be called from any thread (FUSE workers): they touch only thread-safe state. The manager
does no blocking I/O on the loop: the tiers run their own executors, the journal has its
own thread, and large hashes run in the default executor.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Coroutine, Iterable
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np

from fastcache.chunks import (
    Buffer,
    CdcParams,
    Manifest,
    digest,
    digest_chunks,
    hole_digest,
    split_cdc,
    split_fixed,
)
from fastcache.config import CacheConfig
from fastcache.errors import (
    ChunkCorrupt,
    ChunkNotFound,
    DataUnavailable,
    FastcacheError,
    TierFull,
    TierUnavailable,
)
from fastcache.journal import Journal
from fastcache.tiers.base import TierStorage, verify

if TYPE_CHECKING:
    from fastcache.tiers.nvme import NvmeTier

log = logging.getLogger("fastcache.manager")

_HASH_OFFLOAD = 256 * 1024  # hash buffers larger than this on a thread, not on the loop
_LATENCY_SAMPLES = 2048
_LOCAL_SAMPLE_EVERY = 16  # NVMe hits: time one in this many
_RETRY_BASE = 0.1  # first write-back retry delay, seconds (doubles up to writeback_retry_max)
_RETRY_LOUD_AFTER = 60.0  # seconds of failing uploads before retries are logged as warnings
_MIN_WINDOW = 4  # read-ahead chunks a sequential stream may always reach
_STREAMS = 64  # read-ahead windows remembered (sequential streams)


class CacheManager(Protocol):
    """What the FUSE layer, the client API and the peer tier use. ``DefaultCacheManager``."""

    chunk_size: int

    def set_peer_tier(self, peer: TierStorage | None) -> None: ...
    async def read_chunk(self, digest: str) -> bytes: ...
    async def read_chunk_for_peer(self, digest: str) -> bytes: ...
    def read_local(self, digest: str, offset: int, out: memoryview) -> int | None: ...
    async def read_range(self, manifest: Manifest, offset: int, size: int) -> bytes: ...
    def prefetch(self, manifest: Manifest, first_index: int, count: int) -> None: ...
    async def write_chunk(self, digest: str, data: Buffer) -> None: ...
    async def write_bytes(self, data: Buffer) -> Manifest: ...
    def writer(self) -> ChunkWriter: ...
    async def publish(self, digests: Iterable[str]) -> None: ...
    def unpublished(self, digests: Iterable[str]) -> list[str]: ...
    def note_published(self, count: int) -> None: ...
    @property
    def peer_id(self) -> str | None: ...
    async def flush(self, digests: Iterable[str], timeout: float | None = None) -> None: ...
    async def sync(self, timeout: float | None = None) -> None: ...
    def stats(self) -> dict[str, Any]: ...
    def pending_uploads(self) -> int: ...
    async def close(self) -> None: ...


# --- stats -----------------------------------------------------------------------------------
class _TierCounters:
    """Hits, misses and bytes served by one tier. Thread-safe (FUSE threads count NVMe hits)."""

    __slots__ = ("_lock", "bytes", "corrupt", "errors", "hits", "misses")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.hits = self.misses = self.bytes = self.errors = self.corrupt = 0

    def hit(self, nbytes: int) -> None:
        with self._lock:
            self.hits += 1
            self.bytes += nbytes

    def miss(self, error: bool = False, corrupt: bool = False) -> None:
        with self._lock:
            self.misses += 1
            self.errors += error
            self.corrupt += corrupt

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {
                "hits": self.hits,
                "misses": self.misses,
                "bytes": self.bytes,
                "errors": self.errors,
                "corrupt": self.corrupt,
            }


class _Latency:
    """A bounded ring of latency samples (seconds); percentiles on demand."""

    def __init__(self, size: int = _LATENCY_SAMPLES) -> None:
        self._samples: deque[float] = deque(maxlen=size)  # append is thread-safe
        self.count = 0

    def add(self, seconds: float) -> None:
        self._samples.append(seconds)
        self.count += 1

    def snapshot(self) -> dict[str, float | int]:
        samples = sorted(self._samples)
        out: dict[str, float | int] = {"count": self.count}
        for name, q in (("p50", 0.50), ("p95", 0.95), ("p99", 0.99)):
            if samples:
                out[f"{name}_ms"] = samples[min(len(samples) - 1, int(q * len(samples)))] * 1e3
            else:
                out[f"{name}_ms"] = 0.0
        return out


class _RecentChunks:
    """Verified chunk bytes fetched from the lower tiers, at most ``budget`` bytes.

    A cold sequential reader reaches a chunk moments after its fetch: serving it from here
    (on the FUSE thread, no event-loop hop) spares reading back what promotion just wrote to
    NVMe (O_DIRECT, so from the disk). First in, first out, not LRU: the chunks fetched
    ahead of a reader are older than the ones it just read, and must outlive them.
    Thread-safe: FUSE threads read, the loop inserts.
    """

    def __init__(self, budget: int) -> None:
        self._lock = threading.Lock()
        self._chunks: OrderedDict[str, bytes] = OrderedDict()
        self._bytes = 0
        self._budget = budget
        self.hits = 0

    def put(self, digest: str, data: bytes) -> None:
        if len(data) > self._budget:
            return
        with self._lock:
            if digest in self._chunks:
                return
            self._chunks[digest] = data
            self._bytes += len(data)
            while self._bytes > self._budget:
                _, dropped = self._chunks.popitem(last=False)
                self._bytes -= len(dropped)

    def __contains__(self, digest: object) -> bool:
        with self._lock:
            return digest in self._chunks

    def get(self, digest: str) -> bytes | None:
        with self._lock:
            data = self._chunks.get(digest)
            if data is not None:
                self.hits += 1
            return data

    def read_into(self, digest: str, offset: int, out: memoryview) -> int | None:
        """Like ``NvmeTier.read_into``: bytes copied into ``out``, ``None`` if not here."""
        data = self.get(digest)
        if data is None:
            return None
        n = max(0, min(len(out), len(data) - offset))
        if n:
            out[:n] = memoryview(data)[offset : offset + n]
        return n


# --- the streaming writer ----------------------------------------------------------------------
class ChunkWriter:
    """Streams a file into chunks: ``await w.write(piece)``…, ``manifest = await w.finish()``.

    Pieces may have any size. At most ``upload_concurrency`` chunks are being hashed and
    written at once; ``write`` waits for room, so memory stays near
    ``(upload_concurrency + 1) * chunk_size`` (plus one CDC window). ``abort`` cancels.
    """

    def __init__(self, manager: DefaultCacheManager) -> None:
        self._manager = manager
        self._chunk_size = manager.chunk_size
        self._cdc = manager._cdc_params
        # CDC: cut when the buffer holds enough that every cut but the tail is final.
        self._window = 2 * self._cdc.max if self._cdc is not None else self._chunk_size
        self._buf = bytearray()
        self._digests: list[str] = []
        self._lengths: list[int] = []
        self._size = 0
        self._room = asyncio.Semaphore(manager.config.upload_concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._error: BaseException | None = None
        self._state = "open"

    async def write(self, data: Buffer) -> None:
        """Add ``data`` to the file; may wait for earlier chunks to be written."""
        self._check()
        view = memoryview(data).cast("B")
        self._size += len(view)
        if self._cdc is not None:
            self._buf += view
            if len(self._buf) >= self._window:
                await self._cut_cdc(final=False)
            return
        size = self._chunk_size
        while view:
            if not self._buf and len(view) >= size:
                await self._dispatch(bytes(view[:size]))
                view = view[size:]
                continue
            take = min(size - len(self._buf), len(view))
            self._buf += view[:take]
            view = view[take:]
            if len(self._buf) == size:
                chunk, self._buf = self._buf, bytearray()
                await self._dispatch(chunk)

    async def finish(self) -> Manifest:
        """Write the tail, wait for every chunk; the file's manifest."""
        self._check()
        if self._cdc is not None:
            await self._cut_cdc(final=True)
        elif self._buf:
            chunk, self._buf = self._buf, bytearray()
            await self._dispatch(chunk)
        if self._tasks:
            await asyncio.wait(set(self._tasks))
        self._check()
        self._state = "finished"
        return Manifest(
            size=self._size,
            chunk_size=self._chunk_size,
            chunks=list(self._digests),
            lengths=None if self._cdc is None else list(self._lengths),
        )

    async def abort(self) -> None:
        """Cancel what is in flight and drop the buffer. Chunks already written stay written."""
        self._state = "aborted"
        self._buf = bytearray()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks))

    # --- internals -------------------------------------------------------------------------
    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self._state != "open":
            raise RuntimeError(f"writer is {self._state}")

    async def _cut_cdc(self, final: bool) -> None:
        assert self._cdc is not None
        if not self._buf:
            return
        buf = self._buf
        ends = split_cdc(buf, self._cdc, final=final)
        if not len(ends):
            return
        view = memoryview(buf)
        chunks = []
        start = 0
        for end in ends.tolist():
            chunks.append(bytes(view[start:end]))
            start = end
        view.release()
        del buf[:start]
        for chunk in chunks:
            await self._dispatch(chunk)
        chunks.clear()

    async def _dispatch(self, chunk: bytes | bytearray) -> None:
        await self._room.acquire()
        if self._error is not None or self._state != "open":
            self._room.release()
            self._check()
        index = len(self._digests)
        self._digests.append("")
        self._lengths.append(len(chunk))
        task = asyncio.get_running_loop().create_task(self._write_one(index, chunk))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    async def _write_one(self, index: int, chunk: bytes | bytearray) -> None:
        try:
            name = await self._manager._hash(chunk)
            self._digests[index] = name
            await self._manager.write_chunk(name, chunk)
        finally:
            self._room.release()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and self._error is None:
            self._error = exc


# --- the manager -------------------------------------------------------------------------------
class DefaultCacheManager:
    """The three-tier cache of one node. Build with ``await DefaultCacheManager.open(...)``."""

    chunk_size: int
    nvme: NvmeTier

    def __init__(
        self,
        config: CacheConfig,
        nvme: NvmeTier,
        cloud: TierStorage,
        peer: TierStorage | None,
        journal: Journal,
    ) -> None:
        self.config = config
        self.chunk_size = config.chunk_size
        self.nvme = nvme
        self.cloud = cloud
        self._peer = peer
        self.journal = journal
        self._cdc_params = (
            CdcParams.for_average(config.chunk_size) if config.chunking == "cdc" else None
        )
        # read path
        # In-flight fetches below NVMe, one per chunk. ``_fetches`` read peers (plain) then S3
        # themselves; ``_through`` first ask the chunk's owner to fetch it for us (cluster-wide
        # single flight). A fetch-through request we serve only ever joins ``_fetches``: it
        # never waits on a fetch that waits on another node, so owners can never wait in a
        # cycle even when nodes disagree about who owns a chunk.
        self._fetches: dict[str, asyncio.Task[bytes]] = {}
        self._through: dict[str, asyncio.Task[bytes]] = {}
        self._prefetches: dict[str, asyncio.Task[None]] = {}
        # fetched, verified, being written to NVMe: served from memory until it is there
        self._promoting: dict[str, bytes] = {}
        self._prefetch_room = asyncio.Semaphore(config.fetch_concurrency)
        # Read-ahead windows of the sequential streams: id(manifest) → [manifest, last first
        # index, window]. A stream that keeps going gets a deeper window (up to
        # ``fetch_concurrency`` chunks), so that many fetches stay in flight.
        self._streams: OrderedDict[int, list[Any]] = OrderedDict()
        self._recent = _RecentChunks(
            (max(config.fetch_concurrency, _MIN_WINDOW) + 8) * config.chunk_size
        )
        # write path
        self._writes: dict[str, asyncio.Future[None]] = {}
        self._uploads: dict[str, asyncio.Future[None]] = {}  # digest → in S3
        # Chunks just written keep their bytes in memory until their upload starts (at most
        # one chunk per upload worker in all): write-back then does not read them back from
        # NVMe (written O_DIRECT, so that would be a disk read and a hash). Past that
        # budget, the upload reads NVMe as before.
        self._upload_data: dict[str, bytes | bytearray] = {}
        self._upload_bytes = 0
        self._upload_memory = config.upload_concurrency * config.chunk_size
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self._workers: list[asyncio.Task[None]] = []
        self._kick: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._background: set[asyncio.Task[Any]] = set()
        self._closed = False
        # stats
        self._tiers = {"nvme": _TierCounters(), "peer": _TierCounters(), "s3": _TierCounters()}
        self._read_latency = _Latency()
        self._local_latency = _Latency()
        self._write_latency = _Latency()
        self._counts = {
            "uploaded": 0,
            "upload_retries": 0,
            "peer_replicated": 0,
            "peer_replica_failures": 0,
            "promotions": 0,
            "promotions_full": 0,
            "promotions_failed": 0,
            "corrupt_chunks": 0,
            "nvme_write_failures": 0,
            "writes_nvme": 0,
            "writes_peer": 0,
            "writes_s3": 0,
            "lost_chunks": 0,
            "holes": 0,
            "writes_deduplicated": 0,
            "recovered": 0,
            "prefetches": 0,
            "fetch_through_served": 0,
            "published": 0,
            "publish_failures": 0,
        }
        self._failing_since: float | None = None

    @classmethod
    async def open(
        cls,
        config: CacheConfig,
        nvme: NvmeTier,
        cloud: TierStorage,
        peer: TierStorage | None = None,
    ) -> DefaultCacheManager:
        """Replay the journal (re-pin and re-queue pending chunks), start write-back workers."""
        loop = asyncio.get_running_loop()
        journal = await loop.run_in_executor(None, Journal.open, nvme.journal_dir)
        manager = cls(config, nvme, cloud, peer, journal)
        try:
            await manager._replay()
        except BaseException:
            journal.close()
            raise
        manager._workers = [
            asyncio.get_running_loop().create_task(
                manager._writeback_worker(), name=f"fastcache-writeback-{i}"
            )
            for i in range(config.upload_concurrency)
        ]
        return manager

    def set_peer_tier(self, peer: TierStorage | None) -> None:
        self._peer = peer

    @property
    def cdc_params(self) -> CdcParams | None:
        """The FastCDC parameters when this node chunks by content, else ``None``."""
        return self._cdc_params

    @property
    def peer(self) -> TierStorage | None:
        return self._peer

    # --- read path ---------------------------------------------------------------------------
    async def read_chunk(self, digest: str) -> bytes:
        """The chunk's bytes from the fastest tier that has a good copy; ``DataUnavailable``."""
        start = time.perf_counter()
        data = await self._read_chunk(digest, try_nvme=True)
        self._read_latency.add(time.perf_counter() - start)
        return data

    async def read_chunk_for_peer(self, digest: str) -> bytes:
        """A peer's fetch-through request (we own ``digest``): NVMe, else the peers' NVMe,
        else S3, joining any fetch of it already in flight here and promoting it. Never asks
        another node to fetch it (bounded: one hop)."""
        self._counts["fetch_through_served"] += 1
        return await self._read_chunk(digest, try_nvme=True, through=False)

    def read_local(self, digest: str, offset: int, out: memoryview) -> int | None:
        """Copy NVMe bytes of ``digest`` at ``offset`` into ``out``; ``None`` on a miss.

        Synchronous and loop-free: FUSE threads call it directly for the hit path. An NVMe
        I/O error is a miss too (counted as an error): the caller then asks ``read_chunk``.
        A chunk fetched moments ago is copied from memory (``_RecentChunks``).
        """
        n = self._recent.read_into(digest, offset, out)
        if n is not None:
            return n
        counters = self._tiers["nvme"]
        # One hit in _LOCAL_SAMPLE_EVERY is timed: two timer reads and a sample on every hit
        # cost several percent of a 4 KiB read.
        timed = counters.hits % _LOCAL_SAMPLE_EVERY == 0
        start = time.perf_counter() if timed else 0.0
        try:
            n = self.nvme.read_into(digest, offset, out)
        except FastcacheError:  # an I/O error on NVMe: the lower tiers can still serve it
            counters.miss(error=True)
            return None
        if n is None:
            counters.miss()
            return None
        counters.hit(n)
        if timed:
            self._local_latency.add(time.perf_counter() - start)
        return n

    async def read_range(self, manifest: Manifest, offset: int, size: int) -> bytes:
        """Bytes ``[offset, offset + size)`` of the file (short at EOF); chunks in parallel."""
        spans = list(manifest.spans(offset, size))
        if not spans:
            return b""
        if len(spans) == 1:
            return bytes(await self._read_span(manifest, *spans[0]))
        parts: list[Buffer] = [b""] * len(spans)
        room = asyncio.Semaphore(self.config.fetch_concurrency)

        async def one(i: int, index: int, off: int, length: int) -> None:
            async with room:
                parts[i] = await self._read_span(manifest, index, off, length)

        async with asyncio.TaskGroup() as group:
            for i, span in enumerate(spans):
                group.create_task(one(i, *span))
        return b"".join(parts)

    def prefetch(self, manifest: Manifest, first_index: int, count: int) -> None:
        """Fetch and promote, in the background, the chunks not on NVMe. Loop thread only.

        ``count`` is where a stream's window starts: called again for the next chunks of the
        same manifest, the window doubles up to ``fetch_concurrency`` chunks (a cold
        sequential read is bound by the fetches in flight, most of all on a far S3).
        """
        loop = asyncio.get_running_loop()
        if self._closed or count <= 0:
            return
        window = self._window(manifest, first_index, count)
        for index in range(max(0, first_index), min(first_index + window, len(manifest.chunks))):
            name = manifest.chunks[index]
            if name in self._prefetches or name in self._fetches or name in self._through:
                continue
            if name == hole_digest(manifest.chunk_length(index)):
                continue
            if name in self._promoting or name in self._recent:
                continue
            task = loop.create_task(self._prefetch_one(name))
            self._prefetches[name] = task
            task.add_done_callback(lambda t, n=name: self._forget(self._prefetches, n, t))

    def _window(self, manifest: Manifest, first_index: int, count: int) -> int:
        """The read-ahead window of the stream reading ``manifest`` now at ``first_index``."""
        key = id(manifest)
        state = self._streams.get(key)
        if state is None or state[0] is not manifest:
            state = self._streams[key] = [manifest, first_index, count]
            while len(self._streams) > _STREAMS:
                self._streams.popitem(last=False)
            return count
        self._streams.move_to_end(key)
        _, last, window = state
        if last < first_index <= last + 2:  # the stream went on: deeper
            window = min(2 * window, max(count, self.config.fetch_concurrency))
        elif first_index != last:  # a seek: start again
            window = count
        state[1], state[2] = first_index, max(window, count)
        return int(state[2])

    async def _read_chunk(self, digest: str, try_nvme: bool, through: bool = True) -> bytes:
        recent = self._recent.get(digest)
        if recent is not None:
            return recent
        if try_nvme:
            nvme = self._tiers["nvme"]
            try:
                data = await self.nvme.read(digest)
            except ChunkNotFound:
                nvme.miss()
            except ChunkCorrupt as exc:
                # The NVMe tier deleted the bad file; a good copy is fetched and re-promoted.
                log.info("refetching a corrupt NVMe chunk: %s", exc)  # the tier logged it
                self._counts["corrupt_chunks"] += 1
                nvme.miss(corrupt=True)
            except FastcacheError:
                nvme.miss(error=True)
            else:
                nvme.hit(len(data))
                return data
        if through and self._fetches.get(digest) is None and self._through.get(digest) is None:
            live_peers = getattr(self._peer, "live_peers", None)
            if live_peers is not None:  # the first read of a fresh node waits for the list
                await live_peers()
        promoting = self._promoting.get(digest)
        if promoting is not None:  # fetched a moment ago, on its way to NVMe
            return promoting
        task = self._fetches.get(digest)
        if task is None and not try_nvme and self._on_nvme(digest):
            # The caller's NVMe miss is stale: a fetch finished and promoted it meanwhile.
            return await self._read_chunk(digest, try_nvme=True, through=through)
        if task is None and through:
            task = self._through.get(digest)
            if task is None and self._owned_elsewhere(digest):
                task = asyncio.get_running_loop().create_task(self._fetch_lower(digest, True))
                self._through[digest] = task
                task.add_done_callback(lambda t: self._forget(self._through, digest, t))
        if task is None:
            task = asyncio.get_running_loop().create_task(self._fetch_lower(digest, False))
            self._fetches[digest] = task
            task.add_done_callback(lambda t: self._forget(self._fetches, digest, t))
        return await asyncio.shield(task)

    def _on_nvme(self, digest: str) -> bool:
        """Whether the NVMe tier's index has ``digest`` (no I/O)."""
        size_of = getattr(self.nvme, "chunk_size", None)
        return size_of is not None and size_of(digest) is not None

    def _owned_elsewhere(self, digest: str) -> bool:
        """Whether another live node is the designated fetcher of ``digest``."""
        owner = getattr(self._peer, "owner", None)
        if owner is None:
            return False
        who = owner(digest)
        return who is not None and who != getattr(self._peer, "self_id", None)

    async def _fetch_lower(self, digest: str, through: bool) -> bytes:
        """Peer (``through``: the owner fetches it for us), then S3; verified; promoted to
        NVMe in the background. A node that knows no other live node asks S3 first: the
        peer tier could only find the chunk through a coordinator request per chunk."""
        errors: list[str] = []
        order: tuple[tuple[str, TierStorage | None], ...] = (
            ("peer", self._peer),
            ("s3", self.cloud),
        )
        if getattr(self._peer, "alone", False):
            order = order[::-1]
        for role, tier in order:
            if tier is None:
                continue
            counters = self._tiers[role]
            try:
                if through and tier is self._peer:
                    data = await tier.read(digest, fetch_through=True)  # type: ignore[call-arg]
                else:
                    data = await tier.read(digest)
                if not getattr(tier, "verifies_reads", False):  # verified exactly once
                    await self._verify(digest, data, tier.name)
            except ChunkCorrupt as exc:
                log.warning("%s", exc)
                self._counts["corrupt_chunks"] += 1
                counters.miss(corrupt=True)
                errors.append(f"{role}: corrupt")
                continue
            except ChunkNotFound:
                counters.miss()
                errors.append(f"{role}: not found")
                continue
            except FastcacheError as exc:
                counters.miss(error=True)
                errors.append(f"{role}: {exc}")
                continue
            counters.hit(len(data))
            self._promote_later(digest, data)
            return data
        raise DataUnavailable(f"chunk {digest} is in no tier ({'; '.join(errors)})")

    async def _read_span(self, manifest: Manifest, index: int, off: int, length: int) -> Buffer:
        name = manifest.chunks[index]
        if name == hole_digest(manifest.chunk_length(index)):
            return bytes(length)  # a hole: zeros, stored nowhere
        if off == 0 and length == manifest.chunk_length(index):
            return await self.read_chunk(name)
        # Fetched a moment ago (still being promoted) or being fetched: no NVMe round trip.
        promoting = self._recent.get(name) or self._promoting.get(name)
        if promoting is not None:
            return memoryview(promoting)[off : off + length]
        inflight = self._fetches.get(name) or self._through.get(name)
        if inflight is not None:
            data = await asyncio.shield(inflight)
            return memoryview(data)[off : off + length]
        # A part of a chunk: pread just that part from NVMe, on a thread.
        start = time.perf_counter()
        buf = bytearray(length)
        loop = asyncio.get_running_loop()
        n = await loop.run_in_executor(None, self.read_local, name, off, memoryview(buf))
        if n == length:
            return buf
        # Miss (None): straight to the lower tiers. Short read: let the verified read decide.
        data = await self._read_chunk(name, try_nvme=n is not None)
        self._read_latency.add(time.perf_counter() - start)
        return memoryview(data)[off : off + length]

    async def _prefetch_one(self, digest: str) -> None:
        async with self._prefetch_room:
            try:
                if digest in self._promoting or await self.nvme.exists(digest):
                    return
                self._counts["prefetches"] += 1
                await self._read_chunk(digest, try_nvme=False)
            except FastcacheError as exc:
                log.info("prefetch of %s failed: %s", digest, exc)

    def _promote_later(self, digest: str, data: bytes) -> None:
        self._recent.put(digest, data)
        if digest in self._promoting or self._closed:
            return
        self._promoting[digest] = data
        self._spawn(self._promote(digest, data))

    async def _promote(self, digest: str, data: bytes) -> None:
        try:
            await self.nvme.write(digest, data)
            self._counts["promotions"] += 1
        except TierFull:
            self._counts["promotions_full"] += 1
        except FastcacheError as exc:
            self._counts["promotions_failed"] += 1
            log.info("promotion of %s to NVMe failed: %s", digest, exc)
        finally:
            self._promoting.pop(digest, None)

    # --- write path --------------------------------------------------------------------------
    async def write_chunk(self, digest: str, data: Buffer) -> None:
        """Store a chunk durably: NVMe (pinned, journaled, queued for S3) or peer/S3 raced."""
        if self._closed:
            raise TierUnavailable("cache manager is closed")
        if digest in self._uploads:
            return  # already stored and on its way to S3
        if digest == hole_digest(len(data)):
            self._counts["holes"] += 1
            return  # zeros: a hole, read back as zeros without a chunk anywhere
        if self._on_nvme(digest) and digest not in self.journal:
            # On NVMe and not pending here: it came from S3 or a peer, or was uploaded
            # already (content addressing): nothing to store, nothing to upload again.
            self._counts["writes_deduplicated"] += 1
            return
        same = self._writes.get(digest)
        if same is not None:
            await asyncio.shield(same)
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._writes[digest] = fut
        start = time.perf_counter()
        try:
            await self._write_chunk(digest, data)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                fut.cancel()
            else:
                fut.set_exception(exc)
                fut.exception()  # concurrent writers re-raise it; do not warn when there are none
            raise
        else:
            fut.set_result(None)
        finally:
            del self._writes[digest]
        self._write_latency.add(time.perf_counter() - start)

    async def _write_chunk(self, digest: str, data: Buffer) -> None:
        try:
            self.nvme.pin(digest)  # before the file exists: eviction can never see it unpinned
            try:
                await self.nvme.write(digest, data)
                self.journal.add(digest)
            except BaseException:
                self.nvme.unpin(digest)
                raise
        except FastcacheError as exc:
            self._counts["nvme_write_failures"] += 1
            await self._write_lower(digest, data, exc)
            return
        except OSError as exc:  # the journal's write failed: the chunk is not durable locally
            self._counts["nvme_write_failures"] += 1
            await self._write_lower(digest, data, TierUnavailable(f"journal: {exc}"))
            return
        self._counts["writes_nvme"] += 1
        if digest not in self._uploads and self._upload_bytes + len(data) <= self._upload_memory:
            # bytes and bytearrays are handed over by their writers (never reused): keep them
            kept = data if isinstance(data, (bytes, bytearray)) else bytes(data)
            self._upload_data[digest] = kept
            self._upload_bytes += len(kept)
        self._enqueue(digest)

    async def _write_lower(self, digest: str, data: Buffer, nvme_error: Exception) -> None:
        """NVMe failed: race the peer tier and S3; the first success returns.

        The chunk is journaled first like any pending chunk, so a restart finds it: a peer
        that wins keeps it pinned and journaled itself until it is in S3 (a ``pending``
        write), and this node keeps uploading it from memory meanwhile; after a restart the
        replay finds it on that peer or in S3 (``_recover``)."""
        if not isinstance(data, bytes):
            data = bytes(data)  # may outlive the caller's buffer in a background upload
        try:
            self.journal.add(digest)
        except (OSError, RuntimeError) as exc:
            raise TierUnavailable(f"journal: {exc}") from exc
        loop = asyncio.get_running_loop()
        s3 = loop.create_task(self.cloud.write(digest, data))
        peer = self._peer if self._peer is not None and not self._alone() else None
        peer_task = (
            loop.create_task(peer.write(digest, data, pending=True))  # type: ignore[call-arg]
            if peer is not None
            else None
        )
        racing: set[asyncio.Task[None]] = {s3} if peer_task is None else {s3, peer_task}
        errors: dict[str, BaseException] = {}
        try:
            while racing:
                finished, racing = await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
                for task in finished:
                    role = "s3" if task is s3 else "peer"
                    exc = task.exception()
                    if exc is not None:
                        errors[role] = exc
                        continue
                    self._counts[f"writes_{role}"] += 1
                    if task is s3:
                        if peer_task is not None:
                            peer_task.cancel()
                        self._in_s3(digest)
                        return
                    # The peer won: S3 keeps going in the background until it has the chunk.
                    self._track_upload(digest, self._s3_after_peer(digest, data, s3))
                    return
        except BaseException:
            s3.cancel()
            if peer_task is not None:
                peer_task.cancel()
            self.journal.done(digest)  # never acknowledged
            raise
        self.journal.done(digest)  # never acknowledged: nothing to recover
        s3_error = errors["s3"]
        detail = "; ".join(f"{k}: {v}" for k, v in (("nvme", nvme_error), *errors.items()))
        log.error("write of chunk %s failed in every tier: %s", digest, detail)
        raise s3_error

    async def write_bytes(self, data: Buffer) -> Manifest:
        """Split, hash (one batched call) and write the chunks of ``data`` (parallel, bounded)."""
        view = memoryview(data).cast("B")
        ends = self._split(view)
        names = await self._hash_many(view, ends)
        bounds = ends.tolist()
        lengths: list[int] = []
        unique: dict[str, tuple[int, int]] = {}
        start = 0
        for name, end in zip(names, bounds, strict=True):
            lengths.append(end - start)
            unique.setdefault(name, (start, end))
            start = end
        room = asyncio.Semaphore(self.config.upload_concurrency)

        async def one(name: str, lo: int, hi: int) -> None:
            async with room:
                await self.write_chunk(name, view[lo:hi])

        async with asyncio.TaskGroup() as group:
            for name, (lo, hi) in unique.items():
                group.create_task(one(name, lo, hi))
        return Manifest(
            size=len(view),
            chunk_size=self.chunk_size,
            chunks=names,
            lengths=None if self._cdc_params is None else lengths,
        )

    def writer(self) -> ChunkWriter:
        """A streaming writer (bounded memory) producing the same manifest as ``write_bytes``."""
        return ChunkWriter(self)

    @property
    def peer_id(self) -> str | None:
        """This node's peer id, ``None`` without a peer tier (nothing to publish then)."""
        if getattr(self._peer, "announce", None) is None:
            return None
        return getattr(self._peer, "self_id", None)

    def unpublished(self, digests: Iterable[str]) -> list[str]:
        """Of ``digests``, those only this node holds yet (written to NVMe, not in S3): the
        ones a manifest commit should record this node as holder of (``publish`` filter).
        Empty without a peer tier."""
        if self.peer_id is None:
            return []
        return self._local_only(digests)

    def _local_only(self, digests: Iterable[str]) -> list[str]:
        """Of ``digests`` (deduplicated), those written here and still waiting for S3."""
        return [d for d in dict.fromkeys(digests) if d in self._uploads and d in self.journal]

    def note_published(self, count: int) -> None:
        """Count ``count`` chunks published along with a manifest commit."""
        self._counts["published"] += count

    async def publish(self, digests: Iterable[str]) -> None:
        """Make the chunks of ``digests`` that are only on this node's NVMe (written, not yet
        in S3 nor replicated) findable by the other nodes: one batched location record at
        the coordinator, through the peer tier. Call it before committing a manifest that
        names them. No-op without a peer tier; failures are logged and counted, not raised
        (write-back still makes the chunks reachable, only later).
        """
        announce = getattr(self._peer, "announce", None)
        if announce is None:
            return
        local = self._local_only(digests)
        if not local:
            return
        try:
            failed = int(await announce(local))
        except Exception as exc:  # best effort: the write itself succeeded
            log.warning("publishing %d chunk(s) to the peers failed: %s", len(local), exc)
            failed = len(local)
        self._counts["published"] += len(local) - failed
        self._counts["publish_failures"] += failed

    async def flush(self, digests: Iterable[str], timeout: float | None = None) -> None:
        """Return once every chunk in ``digests`` is in S3; ``TierUnavailable`` on timeout.

        Chunks this manager has no pending upload for are taken to be in S3 already.
        """
        waits = {self._uploads[d] for d in dict.fromkeys(digests) if d in self._uploads}
        if not waits:
            return
        self._wake_retries()
        done, pending = await asyncio.wait(waits, timeout=timeout)
        if pending:
            raise TierUnavailable(f"{len(pending)} chunk(s) not in S3 after {timeout} s")
        for fut in done:
            if fut.cancelled():
                raise TierUnavailable("write-back stopped (manager closed)")
            exc = fut.exception()
            if exc is not None:
                raise exc

    async def sync(self, timeout: float | None = None) -> None:
        """Return once everything pending is in S3."""
        await self.flush(list(self._uploads), timeout=timeout)

    def pending_uploads(self) -> int:
        """Chunks acknowledged but not yet in S3."""
        return len(self._uploads)

    # --- write-back --------------------------------------------------------------------------
    def _enqueue(self, digest: str) -> None:
        if digest in self._uploads:
            return
        self._uploads[digest] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(digest)

    def _track_upload(self, digest: str, coro: Coroutine[Any, Any, None]) -> None:
        """An upload from memory (NVMe failed): flush and sync wait for it too."""
        if digest not in self._uploads:
            self._uploads[digest] = asyncio.get_running_loop().create_future()
        self._spawn(coro)

    def _uploaded(self, digest: str) -> None:
        self._counts["uploaded"] += 1
        fut = self._uploads.pop(digest, None)
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def _writeback_worker(self) -> None:
        while True:
            name = await self._queue.get()
            try:
                await self._upload_pending(name)
            except Exception:  # a bug: keep the worker alive, the chunk stays journaled
                log.exception("write-back of %s failed unexpectedly", name)
            finally:
                self._queue.task_done()

    async def _upload_pending(self, digest: str) -> None:
        kept = self._upload_data.pop(digest, None)
        if kept is not None:
            self._upload_bytes -= len(kept)
        try:
            data = kept if kept is not None else await self.nvme.read(digest)
        except FastcacheError as exc:
            # A pinned, journaled chunk that cannot be read back: this must not happen.
            self._counts["lost_chunks"] += 1
            log.error("pending chunk %s cannot be read from NVMe, not uploaded: %s", digest, exc)
            fut = self._uploads.pop(digest, None)
            if fut is not None and not fut.done():
                fut.set_exception(DataUnavailable(f"pending chunk {digest} lost on NVMe: {exc}"))
                fut.exception()
            return
        if self._peer is not None and self.config.replication > 0 and not self._alone():
            self._spawn(self._replicate(self._peer, digest, data))
        await self._retry_upload(digest, data)
        self._in_s3(digest)
        self.nvme.unpin(digest)
        self._uploaded(digest)

    def _alone(self) -> bool:
        """Whether the peer tier knows no other live node (nothing to replicate to)."""
        return bool(getattr(self._peer, "alone", False))

    async def _s3_after_peer(self, digest: str, data: bytes, first: asyncio.Task[None]) -> None:
        try:
            await first
        except FastcacheError:
            await self._retry_upload(digest, data)
        self._in_s3(digest)
        self._uploaded(digest)

    def _in_s3(self, digest: str) -> None:
        """``digest`` reached S3: done in the journal (nothing left to recover)."""
        self.journal.done(digest)

    async def _retry_upload(self, digest: str, data: Buffer) -> None:
        """Put ``digest`` in S3, retrying with capped exponential backoff until it succeeds."""
        attempt = 0
        while True:
            try:
                await self.cloud.write(digest, data)
            except Exception as exc:
                attempt += 1
                self._counts["upload_retries"] += 1
                now = time.monotonic()
                if self._failing_since is None:
                    self._failing_since = now
                delay = min(self.config.writeback_retry_max, _RETRY_BASE * 2 ** (attempt - 1))
                delay *= random.uniform(0.5, 1.0)
                loud = now - self._failing_since > _RETRY_LOUD_AFTER and attempt % 10 == 0
                log.log(
                    logging.WARNING if loud else logging.INFO,
                    "upload of %s to S3 failed (attempt %d, retrying in %.2f s): %s",
                    digest,
                    attempt,
                    delay,
                    exc,
                )
                if not isinstance(exc, FastcacheError):
                    log.exception("unexpected upload error", exc_info=exc)
                await asyncio.wait({self._kick}, timeout=delay)
                continue
            self._failing_since = None
            return

    def _wake_retries(self) -> None:
        """Let uploads waiting out a backoff retry now (flush/sync was asked for)."""
        kick, self._kick = self._kick, asyncio.get_running_loop().create_future()
        kick.set_result(None)

    async def _replicate(self, peer: TierStorage, digest: str, data: bytes) -> None:
        try:
            await peer.write(digest, data)
            self._counts["peer_replicated"] += 1
        except FastcacheError as exc:
            self._counts["peer_replica_failures"] += 1
            log.info("replication of %s to peers failed: %s", digest, exc)

    async def _replay(self) -> None:
        """Re-pin and re-queue every chunk the journal says is not yet in S3; the ones not on
        NVMe (written to a peer or S3 when NVMe was full) are recovered in the background."""
        pending = sorted(self.journal.pending)
        if not pending:
            return
        elsewhere = []
        for name in pending:
            if self._on_nvme(name):
                self.nvme.pin(name)
                self._enqueue(name)
            else:
                elsewhere.append(name)
        for name in elsewhere:
            self._track_upload(name, self._recover(name))
        log.info(
            "journal replay: %d chunk(s) queued for upload, %d to recover from peers or S3",
            len(pending) - len(elsewhere),
            len(elsewhere),
        )

    async def _recover(self, digest: str) -> None:
        """A journaled chunk that is not on our NVMe: find it in S3 (done) or on a peer (then
        upload it); retried with backoff until one of them answers. Never dropped."""
        attempt = 0
        while True:
            try:
                if await self.cloud.exists(digest):
                    break
                if self._peer is None:
                    raise ChunkNotFound(f"chunk {digest} is not in S3 and there are no peers")
                data = await self._peer.read(digest)
                await self._verify(digest, data, "peer")
                await self._retry_upload(digest, data)
                break
            except FastcacheError as exc:
                attempt += 1
                delay = min(self.config.writeback_retry_max, _RETRY_BASE * 2 ** (attempt - 1))
                log.log(
                    logging.ERROR if attempt % 10 == 1 else logging.INFO,
                    "journaled chunk %s not on NVMe, recovery attempt %d failed: %s",
                    digest,
                    attempt,
                    exc,
                )
                await asyncio.wait({self._kick}, timeout=delay)
        self._counts["recovered"] += 1
        self._in_s3(digest)
        self._uploaded(digest)

    # --- observability -----------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        counts = dict(self._counts)
        tiers: dict[str, Any] = {role: c.snapshot() for role, c in self._tiers.items()}
        tiers["nvme"]["tier"] = self.nvme.stats()
        tiers["s3"]["tier"] = self.cloud.stats()
        if self._peer is not None:
            tiers["peer"]["tier"] = self._peer.stats()
        return {
            "tiers": tiers,
            "latency": {
                "read": self._read_latency.snapshot(),
                "read_local": self._local_latency.snapshot(),
                "write": self._write_latency.snapshot(),
            },
            "writeback": {
                "queue_depth": self._queue.qsize(),
                "pending": len(self._uploads),
                "uploaded": counts["uploaded"],
                "failed_retries": counts["upload_retries"],
                "peer_replicated": counts["peer_replicated"],
                "peer_failures": counts["peer_replica_failures"],
                "lost": counts["lost_chunks"],
                "published": counts["published"],
                "publish_failures": counts["publish_failures"],
            },
            "writes": {
                "nvme": counts["writes_nvme"],
                "peer": counts["writes_peer"],
                "s3": counts["writes_s3"],
                "nvme_failures": counts["nvme_write_failures"],
            },
            "promotions": counts["promotions"],
            "promotions_full": counts["promotions_full"],
            "promotions_failed": counts["promotions_failed"],
            "prefetches": counts["prefetches"],
            "memory_hits": self._recent.hits,
            "fetch_through_served": counts["fetch_through_served"],
            "corrupt_chunks": counts["corrupt_chunks"],
        }

    async def close(self) -> None:
        """Stop workers and background tasks. Pending uploads stay journaled for next time."""
        if self._closed:
            return
        self._closed = True
        tasks = [*self._workers, *self._background, *self._fetches.values()]
        tasks += self._through.values()
        tasks += self._prefetches.values()
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks)
        in_memory = [d for d in self._uploads if d not in self.journal]
        if in_memory:
            log.error("closing with %d chunk(s) not journaled and not in S3", len(in_memory))
        for fut in self._uploads.values():
            if not fut.done():
                fut.cancel()
        self.journal.close()

    # --- helpers -----------------------------------------------------------------------------
    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background_done)
        return task

    def _background_done(self, task: asyncio.Task[Any]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    @staticmethod
    def _forget(table: dict[str, Any], key: str, task: asyncio.Task[Any]) -> None:
        if table.get(key) is task:
            del table[key]
        if not task.cancelled():
            task.exception()  # retrieved: the awaiting readers saw it

    def _split(self, view: memoryview) -> np.ndarray:
        if self._cdc_params is None:
            return split_fixed(len(view), self.chunk_size)
        return split_cdc(view, self._cdc_params, final=True)

    async def _hash(self, data: Buffer) -> str:
        if len(data) <= _HASH_OFFLOAD:
            return digest(data)
        return await asyncio.get_running_loop().run_in_executor(None, digest, data)

    async def _hash_many(self, data: memoryview, ends: np.ndarray) -> list[str]:
        if not len(ends):
            return []
        if len(data) <= _HASH_OFFLOAD:
            return digest_chunks(data, ends)
        return await asyncio.get_running_loop().run_in_executor(None, digest_chunks, data, ends)

    async def _verify(self, expected: str, data: Buffer, source: str) -> None:
        if len(data) <= _HASH_OFFLOAD:
            verify(expected, data, source)
        else:
            await asyncio.get_running_loop().run_in_executor(None, verify, expected, data, source)
