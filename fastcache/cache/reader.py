"""The read path: NVMe hits, misses fetched from the peers or S3 (single flight per chunk,
fetch-through by the chunk's owner), read-ahead, promotion to NVMe, and the memory of the
chunks fetched a moment ago.

Reads walk NVMe → peer → S3. Whatever comes from the peer or S3 is verified (xxh3-128)
before use, unless the tier verified it itself, and promoted to NVMe in the background.
``read_local`` may be called from any thread (FUSE workers): it touches only thread-safe
state. Everything else runs on the event loop.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
import time
from collections import OrderedDict
from typing import Any

from fastcache.cache.context import CacheContext
from fastcache.chunks import Buffer, Manifest
from fastcache.coordinator.model import hole_digest
from fastcache.errors import ChunkCorrupt, ChunkNotFound, DataUnavailable, FastcacheError, TierFull
from fastcache.tiers.base import verifies_reads, verify_async
from fastcache.tiers.counters import PerThread

log = logging.getLogger("fastcache.manager")

_LOCAL_SAMPLE_EVERY = 16  # NVMe hits: time one in this many
_MIN_WINDOW = 4  # read-ahead chunks a sequential stream may always reach
_STREAMS = 64  # read-ahead windows remembered (sequential streams)


class RecentChunks:
    """Verified chunk bytes fetched from the lower tiers, at most ``budget`` bytes.

    A cold sequential reader reaches a chunk moments after its fetch: serving it from here
    (on the FUSE thread, no event-loop hop) spares reading back what promotion just wrote to
    NVMe (O_DIRECT, so from the disk). First in, first out, not LRU: the chunks fetched
    ahead of a reader are older than the ones it just read, and must outlive them.
    Thread-safe: FUSE threads read without a lock (one dict lookup, atomic under the GIL;
    hits counted per thread), the loop inserts under one.
    """

    def __init__(self, budget: int) -> None:
        self._lock = threading.Lock()
        self._chunks: OrderedDict[str, Buffer] = OrderedDict()
        self._bytes = 0
        self._budget = budget
        self._hits = PerThread("hits")

    @property
    def hits(self) -> int:
        return self._hits.totals()["hits"]

    def put(self, digest: str, data: Buffer) -> None:
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
        return digest in self._chunks

    def get(self, digest: str) -> Buffer | None:
        data = self._chunks.get(digest)
        if data is not None:
            self._hits.mine()[0] += 1
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


class ChunkReader:
    """Serves chunks and byte ranges from the fastest tier that has a good copy."""

    def __init__(self, ctx: CacheContext) -> None:
        self._ctx = ctx
        self._counts = ctx.counters.counts
        self._cloud_verifies = verifies_reads(ctx.cloud)
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
        self._prefetch_room = asyncio.Semaphore(ctx.config.fetch_concurrency)
        # Read-ahead windows of the sequential streams: id(manifest) → [manifest, last first
        # index, window]. A stream that keeps going gets a deeper window (up to
        # ``fetch_concurrency`` chunks), so that many fetches stay in flight.
        self._streams: OrderedDict[int, list[Any]] = OrderedDict()
        self.recent = RecentChunks(
            (max(ctx.config.fetch_concurrency, _MIN_WINDOW) + 8) * ctx.config.chunk_size
        )
        # the hit path: bound once; it counts nothing the NVMe tier counts itself
        self._memory = self.recent._chunks
        self._nvme_read_into = ctx.nvme.read_into
        self._ticks = itertools.count()

    def inflight(self) -> list[asyncio.Task[Any]]:
        """The fetches and read-aheads running now (``close`` cancels them)."""
        return [*self._fetches.values(), *self._through.values(), *self._prefetches.values()]

    async def read_chunk(self, digest: str) -> bytes:
        """The chunk's bytes from the fastest tier that has a good copy; ``DataUnavailable``."""
        start = time.perf_counter()
        data = await self._read_chunk(digest, try_nvme=True)
        self._ctx.counters.read_latency.add(time.perf_counter() - start)
        return data

    async def read_chunk_for_peer(self, digest: str) -> bytes:
        """A peer's fetch-through request (we own ``digest``): NVMe, else the peers' NVMe,
        else S3, joining any fetch of it already in flight here and promoting it. Never asks
        another node to fetch it (bounded: one hop)."""
        self._counts["fetch_through_served"] += 1
        return await self._read_chunk(digest, try_nvme=True, through=False)

    def read_local(self, digest: str, offset: int, out: memoryview) -> int | None:
        """Copy NVMe bytes of ``digest`` at ``offset`` into ``out``; ``None`` on a miss.

        Synchronous and loop-free: FUSE threads call it directly for the hit path. No lock
        and no count: the memory check is one dict lookup, and the NVMe tier counts its hits
        and misses itself (the stats show its counts). An NVMe I/O error is a miss too
        (counted as an error here): the caller then asks ``read_chunk``. A chunk fetched
        moments ago is copied from memory (``RecentChunks``).
        """
        if digest in self._memory:
            n = self.recent.read_into(digest, offset, out)
            if n is not None:
                return n
        # One hit in _LOCAL_SAMPLE_EVERY is timed: two timer reads and a sample on every hit
        # cost several percent of a 4 KiB read.
        if next(self._ticks) % _LOCAL_SAMPLE_EVERY:
            try:
                return self._nvme_read_into(digest, offset, out)
            except FastcacheError:  # an I/O error on NVMe: the lower tiers can still serve it
                self._ctx.counters.tiers["nvme"].miss(error=True)
                return None
        start = time.perf_counter()
        try:
            n = self._nvme_read_into(digest, offset, out)
        except FastcacheError:
            self._ctx.counters.tiers["nvme"].miss(error=True)
            return None
        if n is not None:
            self._ctx.counters.local_latency.add(time.perf_counter() - start)
        return n

    async def read_range(
        self, manifest: Manifest, offset: int, size: int, local_missed: bool = False
    ) -> bytes:
        """Bytes ``[offset, offset + size)`` of the file (short at EOF); chunks in parallel.

        ``local_missed``: the caller (a FUSE thread) just missed this range, within one
        chunk, on ``read_local``: no second try on a thread, straight to the fetch."""
        spans = list(manifest.spans(offset, size))
        if not spans:
            return b""
        if len(spans) == 1:
            return bytes(await self._read_span(manifest, *spans[0], local_missed))
        parts: list[Buffer] = [b""] * len(spans)
        room = asyncio.Semaphore(self._ctx.config.fetch_concurrency)

        async def one(i: int, index: int, off: int, length: int) -> None:
            async with room:
                parts[i] = await self._read_span(manifest, index, off, length)

        async with asyncio.TaskGroup() as group:
            for i, span in enumerate(spans):
                group.create_task(one(i, *span))
        return b"".join(parts)

    def prefetch(self, manifest: Manifest, first_index: int, count: int) -> None:
        """Fetch and promote, in the background, the chunks not on NVMe (those on NVMe a
        sequential reader through FUSE reads whole ahead itself: ``mount.stream``). Loop
        thread only.

        ``count`` is where a stream's window starts: called again for the next chunks of the
        same manifest, the window doubles up to ``fetch_concurrency`` chunks (a cold
        sequential read is bound by the fetches in flight, most of all on a far S3).
        """
        loop = asyncio.get_running_loop()
        if self._ctx.closed or count <= 0:
            return
        window = self._window(manifest, first_index, count)
        nvme = self._ctx.nvme
        for index in range(max(0, first_index), min(first_index + window, len(manifest.chunks))):
            name = manifest.chunks[index]
            if name in self._prefetches or name in self._fetches or name in self._through:
                continue
            if name == hole_digest(manifest.chunk_length(index)):
                continue
            if name in self._promoting or name in self.recent:
                continue
            if nvme.chunk_size(name) is not None:
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
            window = min(2 * window, max(count, self._ctx.config.fetch_concurrency))
        elif first_index != last:  # a seek: start again
            window = count
        state[1], state[2] = first_index, max(window, count)
        return int(state[2])

    async def _read_chunk(self, digest: str, try_nvme: bool, through: bool = True) -> bytes:
        recent = self.recent.get(digest)
        if recent is not None:
            return recent
        if try_nvme:  # the tier counts its hits and misses; errors are counted here
            nvme = self._ctx.counters.tiers["nvme"]
            try:
                data = await self._ctx.nvme.read(digest)
            except ChunkNotFound:
                pass
            except ChunkCorrupt as exc:
                # The NVMe tier deleted the bad file; a good copy is fetched and re-promoted.
                log.info("refetching a corrupt NVMe chunk: %s", exc)  # the tier logged it
                self._counts["corrupt_chunks"] += 1
                nvme.miss(corrupt=True)
            except FastcacheError:
                nvme.miss(error=True)
            else:
                return data
        fresh = self._fetches.get(digest) is None and self._through.get(digest) is None
        if through and fresh and self._ctx.peer is not None:
            await self._ctx.peer.live_peers()  # the first read of a fresh node waits for the list
        promoting = self._promoting.get(digest)
        if promoting is not None:  # fetched a moment ago, on its way to NVMe
            return promoting
        task = self._fetches.get(digest)
        if task is None and not try_nvme and self._ctx.nvme.chunk_size(digest) is not None:
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

    def _owned_elsewhere(self, digest: str) -> bool:
        """Whether another live node is the designated fetcher of ``digest``."""
        if self._ctx.peer is None:
            return False
        who = self._ctx.peer.owner(digest)
        return who is not None and who != self._ctx.peer.self_id

    async def _fetch_lower(self, digest: str, through: bool) -> bytes:
        """Peer (``through``: the owner fetches it for us), then S3; verified; promoted to
        NVMe in the background. A node that knows no other live node asks S3 first: the
        peer tier could only find the chunk through a coordinator request per chunk.

        Peers that all fall silent (frozen, not dead: nobody left to ask, no answer started,
        no owner answering a liveness probe) do not hold the read up: S3 is raced against
        them, first verified copy wins, so a read waits the hedge delay plus one S3 fetch.
        """
        errors: list[str] = []
        peer = self._ctx.peer
        if peer is None or peer.alone:
            data = await self._fetch_from("s3", digest, errors)
            if data is None and peer is not None:
                data = await self._fetch_from("peer", digest, errors)
        else:
            data = await self._fetch_hedged(digest, through, errors)
        if data is None:
            raise DataUnavailable(f"chunk {digest} is in no tier ({'; '.join(errors)})")
        return data

    async def _fetch_hedged(self, digest: str, through: bool, errors: list[str]) -> bytes | None:
        """The peers, then S3; S3 at once, beside the peers, when they fall silent."""
        loop = asyncio.get_running_loop()
        silent = asyncio.Event()
        from_peer = loop.create_task(self._fetch_from("peer", digest, errors, through, silent))
        tasks = [from_peer, loop.create_task(silent.wait())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            if from_peer.done():
                data = from_peer.result()
                return data if data is not None else await self._fetch_from("s3", digest, errors)
            self._counts["hedged_to_s3"] += 1
            racing = {from_peer, loop.create_task(self._fetch_from("s3", digest, errors))}
            tasks.extend(racing)
            while racing:
                done, racing = await asyncio.wait(racing, return_when=asyncio.FIRST_COMPLETED)
                for task in done:
                    data = task.result()
                    if data is not None:  # the first verified copy
                        return data
            return None
        finally:
            running = [task for task in tasks if not task.done()]
            for task in running:
                task.cancel()
            if running:
                await asyncio.wait(running)

    async def _fetch_from(
        self,
        role: str,
        digest: str,
        errors: list[str],
        through: bool = False,
        silent: asyncio.Event | None = None,
    ) -> bytes | None:
        """The verified chunk from one lower tier (counted, promoted); ``None`` if that tier
        failed (the reason appended to ``errors``)."""
        counters = self._ctx.counters.tiers[role]
        peer = self._ctx.peer
        start = time.perf_counter()
        try:
            if role == "peer":
                assert peer is not None
                data = await peer.read(digest, fetch_through=through, silent=silent)
                verified = peer.verifies_reads
            else:
                data = await self._ctx.cloud.read(digest)
                verified = self._cloud_verifies
            if not verified:  # verified exactly once
                await verify_async(digest, data, role)
        except ChunkCorrupt as exc:
            log.warning("%s", exc)
            self._counts["corrupt_chunks"] += 1
            counters.miss(corrupt=True)
            errors.append(f"{role}: corrupt")
            return None
        except ChunkNotFound:
            counters.miss()
            errors.append(f"{role}: not found")
            return None
        except FastcacheError as exc:
            counters.miss(error=True)
            errors.append(f"{role}: {exc}")
            return None
        counters.hit(len(data))
        counters.latency.add(time.perf_counter() - start)
        self._promote_later(digest, data)
        return data

    async def _read_span(
        self, manifest: Manifest, index: int, off: int, length: int, local_missed: bool = False
    ) -> Buffer:
        name = manifest.chunks[index]
        if name == hole_digest(manifest.chunk_length(index)):
            return bytes(length)  # a hole: zeros, stored nowhere
        if off == 0 and length == manifest.chunk_length(index):
            return await self.read_chunk(name)
        # Fetched a moment ago (still being promoted) or being fetched: no NVMe round trip.
        promoting = self.recent.get(name) or self._promoting.get(name)
        if promoting is not None:
            return memoryview(promoting)[off : off + length]
        inflight = self._fetches.get(name) or self._through.get(name)
        if inflight is not None:
            data = await asyncio.shield(inflight)
            return memoryview(data)[off : off + length]
        start = time.perf_counter()
        if local_missed:
            data = await self._read_chunk(name, try_nvme=False)
            self._ctx.counters.read_latency.add(time.perf_counter() - start)
            return memoryview(data)[off : off + length]
        # A part of a chunk: pread just that part from NVMe, on a thread.
        buf = bytearray(length)
        loop = asyncio.get_running_loop()
        n = await loop.run_in_executor(None, self.read_local, name, off, memoryview(buf))
        if n == length:
            return buf
        # Miss (None): straight to the lower tiers. Short read: let the verified read decide.
        data = await self._read_chunk(name, try_nvme=n is not None)
        self._ctx.counters.read_latency.add(time.perf_counter() - start)
        return memoryview(data)[off : off + length]

    async def _prefetch_one(self, digest: str) -> None:
        async with self._prefetch_room:
            try:
                if digest in self._promoting or await self._ctx.nvme.exists(digest):
                    return
                self._counts["prefetches"] += 1
                await self._read_chunk(digest, try_nvme=False)
            except FastcacheError as exc:
                log.info("prefetch of %s failed: %s", digest, exc)

    def _promote_later(self, digest: str, data: bytes) -> None:
        self.recent.put(digest, data)
        if digest in self._promoting or self._ctx.closed:
            return
        self._promoting[digest] = data
        self._ctx.spawn(self._promote(digest, data))

    async def _promote(self, digest: str, data: bytes) -> None:
        try:
            await self._ctx.nvme.promote(digest, data)
            self._counts["promotions"] += 1
        except TierFull:
            self._counts["promotions_full"] += 1
        except FastcacheError as exc:
            self._counts["promotions_failed"] += 1
            log.info("promotion of %s to NVMe failed: %s", digest, exc)
        finally:
            self._promoting.pop(digest, None)

    @staticmethod
    def _forget(table: dict[str, Any], key: str, task: asyncio.Task[Any]) -> None:
        if table.get(key) is task:
            del table[key]
        if not task.cancelled():
            task.exception()  # retrieved: the awaiting readers saw it
