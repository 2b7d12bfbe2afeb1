"""The write path and write-back: a chunk is acknowledged once it is durable on this node
(NVMe, pinned, journaled) or, when NVMe fails, on a peer or in S3 (raced, first success
wins); then it is uploaded to S3 and replicated to the peers, and unpinned.

Write-back: ``upload_concurrency`` workers upload queued chunks to S3 (and replicate them to
peers in parallel; peer failures are counted, not fatal). Only after S3 has a chunk is it
marked done in the journal and unpinned on NVMe. A failing upload is retried with
exponential backoff, forever: acknowledged data is never dropped. ``flush`` and ``sync``
wait for S3; they can time out, the uploads cannot. At start, the journal is replayed:
pending chunks are re-queued, the ones not on NVMe recovered from a peer or S3.

Publishing makes the chunks still only on this node findable by the other nodes.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Coroutine, Iterable
from typing import Any

from fastcache.cache.context import CacheContext
from fastcache.chunks import Buffer
from fastcache.coordinator.model import hole_digest
from fastcache.errors import ChunkNotFound, DataUnavailable, FastcacheError, TierUnavailable
from fastcache.journal import Journal
from fastcache.tiers.base import PeerRouting, TierStorage, verify_async

log = logging.getLogger("fastcache.manager")

_RETRY_BASE = 0.1  # first write-back retry delay, seconds (doubles up to writeback_retry_max)
PEER_RETRY_FOR = 30.0  # seconds a pending chunk keeps trying the peers while S3 does not answer
_RETRY_LOUD_AFTER = 60.0  # seconds of failing uploads before retries are logged as warnings


class WriteBack:
    """Stores chunks durably and brings every acknowledged chunk to S3."""

    def __init__(self, ctx: CacheContext, journal: Journal) -> None:
        self._ctx = ctx
        self.journal = journal
        self._counts = ctx.counters.counts
        self._writes: dict[str, asyncio.Future[None]] = {}
        self._uploads: dict[str, asyncio.Future[None]] = {}  # digest → in S3
        # Chunks just written keep their bytes in memory until their upload starts, up to
        # ``upload_memory`` in all: write-back then does not read them back from NVMe (a
        # sealed chunk is written O_DIRECT, so that would be a disk read, a copy and a
        # hash). Past that budget, the upload reads NVMe.
        self._upload_data: dict[str, Buffer] = {}
        self._upload_bytes = 0
        self._upload_memory = ctx.config.upload_memory
        self._queue: asyncio.Queue[str] = asyncio.Queue()
        self.workers: list[asyncio.Task[None]] = []
        self._kick: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._failing_since: float | None = None

    def start(self) -> None:
        """Start the ``upload_concurrency`` upload workers."""
        self.workers = [
            asyncio.get_running_loop().create_task(
                self._writeback_worker(), name=f"fastcache-writeback-{i}"
            )
            for i in range(self._ctx.config.upload_concurrency)
        ]

    def queue_depth(self) -> int:
        return self._queue.qsize()

    def close(self) -> None:
        """After the workers and background tasks are gone: what is pending stays journaled."""
        in_memory = [d for d in self._uploads if d not in self.journal]
        if in_memory:
            log.error("closing with %d chunk(s) not journaled and not in S3", len(in_memory))
        for fut in self._uploads.values():
            if not fut.done():
                fut.cancel()
        self.journal.close()

    # --- write path --------------------------------------------------------------------------
    async def write_chunk(self, digest: str, data: Buffer) -> None:
        """Store a chunk durably: NVMe (pinned, journaled, queued for S3) or peer/S3 raced."""
        if self._ctx.closed:
            raise TierUnavailable("cache manager is closed")
        if digest in self._uploads:
            return  # already stored and on its way to S3
        if digest == hole_digest(len(data)):
            self._counts["holes"] += 1
            return  # zeros: a hole, read back as zeros without a chunk anywhere
        if self._ctx.nvme.chunk_size(digest) is not None and digest not in self.journal:
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
        self._ctx.counters.write_latency.add(time.perf_counter() - start)

    async def _write_chunk(self, digest: str, data: Buffer) -> None:
        try:
            self._ctx.nvme.pin(digest)  # before the file exists: eviction can never see it unpinned
            try:
                await self._ctx.nvme.write(digest, data)
                self.journal.add(digest)
            except BaseException:
                self._ctx.nvme.unpin(digest)
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
            # bytes, bytearrays and read-only views (a sealed chunk) are handed over by their
            # writers, never written again: kept as they are; anything else is copied
            handed_over = isinstance(data, (bytes, bytearray)) or (
                isinstance(data, memoryview) and data.readonly
            )
            kept = data if handed_over else bytes(data)
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
        s3 = loop.create_task(self._ctx.cloud.write(digest, data))
        peer = self._ctx.peer  # not ``alone``: its peer list may be stale; it says if none
        peer_task = (
            loop.create_task(self._peer_keeps_trying(peer, digest, data))
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

    @staticmethod
    async def _peer_keeps_trying(peer: PeerRouting, digest: str, data: bytes) -> None:
        """The peer side of the race: a peer that is briefly away or missing from our peer
        list (a late heartbeat) must not leave the chunk to a frozen S3 alone. Retried with
        back-off for ``PEER_RETRY_FOR`` seconds; the race cancels it once S3 has the chunk."""
        deadline = time.monotonic() + PEER_RETRY_FOR
        delay = 0.05
        while True:
            try:
                await peer.write(digest, data, pending=True)
                return
            except FastcacheError as exc:
                if time.monotonic() + delay > deadline:
                    raise
                log.debug("pending chunk %s to a peer: %s; again in %.2fs", digest, exc, delay)
            peer.invalidate_peers()  # ask the coordinator for the live peers again
            await asyncio.sleep(delay)  # back-off between attempts
            delay = min(delay * 2, 1.0)

    @property
    def peer_id(self) -> str | None:
        """This node's peer id, ``None`` without a peer tier (nothing to publish then)."""
        return None if self._ctx.peer is None else self._ctx.peer.self_id

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
        if self._ctx.peer is None:
            return
        local = self._local_only(digests)
        if not local:
            return
        try:
            failed = int(await self._ctx.peer.announce(local))
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

    def pending_bytes(self) -> int:
        """Bytes of the chunks acknowledged but not yet in S3 (as they lie on NVMe)."""
        size = self._ctx.nvme.chunk_size
        return sum(size(d) or 0 for d in list(self._uploads))

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
        self._ctx.spawn(coro)

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
            data = kept if kept is not None else await self._ctx.nvme.read(digest)
        except FastcacheError as exc:
            # A pinned, journaled chunk that cannot be read back: this must not happen.
            self._counts["lost_chunks"] += 1
            log.error("pending chunk %s cannot be read from NVMe, not uploaded: %s", digest, exc)
            fut = self._uploads.pop(digest, None)
            if fut is not None and not fut.done():
                fut.set_exception(DataUnavailable(f"pending chunk {digest} lost on NVMe: {exc}"))
                fut.exception()
            return
        peer = self._ctx.peer
        if peer is not None and self._ctx.config.replication > 0 and not peer.alone:
            self._ctx.spawn(self._replicate(peer, digest, data))
        await self._retry_upload(digest, data)
        self._in_s3(digest)
        self._ctx.nvme.unpin(digest)
        self._uploaded(digest)

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
                await self._ctx.cloud.write(digest, data)
            except Exception as exc:
                attempt += 1
                self._counts["upload_retries"] += 1
                now = time.monotonic()
                if self._failing_since is None:
                    self._failing_since = now
                delay = min(self._ctx.config.writeback_retry_max, _RETRY_BASE * 2 ** (attempt - 1))
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

    async def replay(self) -> None:
        """Re-pin and re-queue every chunk the journal says is not yet in S3; the ones not on
        NVMe (written to a peer or S3 when NVMe was full) are recovered in the background."""
        pending = sorted(self.journal.pending)
        if not pending:
            return
        elsewhere = []
        for name in pending:
            if self._ctx.nvme.chunk_size(name) is not None:  # on NVMe (index, no I/O)
                self._ctx.nvme.pin(name)
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
                if await self._ctx.cloud.exists(digest):
                    break
                if self._ctx.peer is None:
                    raise ChunkNotFound(f"chunk {digest} is not in S3 and there are no peers")
                data = await self._ctx.peer.read(digest)
                await verify_async(digest, data, "peer")
                await self._retry_upload(digest, data)
                break
            except FastcacheError as exc:
                attempt += 1
                delay = min(self._ctx.config.writeback_retry_max, _RETRY_BASE * 2 ** (attempt - 1))
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
