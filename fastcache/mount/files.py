"""Open files of the mount: sequential sealing, the staging file, and the commit.

One ``OpenFile`` per inode open on this node holds the state every handle of that inode
shares: the manifest it started from (``base``), the logical size, and what changed since:

- **sealed chunks** (fixed chunking): a writer that fills a chunk from its start to its end
  in order (``cp``, ``dd``, a download) never touches a staging file. Its bytes are copied
  once, from the FUSE buffer into the chunk's buffer; when the chunk is full it is hashed on
  the FUSE thread and handed to the cache manager (NVMe, journal, write-back) while the
  writer goes on. A partly filled chunk at the end of the file is sealed at commit.
- **the staging file** for everything else (random writes, a rewrite of part of a chunk): a
  sparse file under ``manager.nvme.staging_dir`` holding the chunks that changed. A chunk is
  copied into it from the current content only when a write covers it partially.
- **holes**: bytes past ``base_limit`` (the smallest size the file was truncated to since
  the last commit) read as zeros. A chunk that is all hole is committed as
  ``hole_digest(length)`` without being read, hashed or stored, so extending a file costs
  nothing per byte.

With ``--chunking cdc`` a commit streams the whole current content through the cache
manager's chunk writer (the pipeline the client API uses); unchanged content cuts into the
same chunks, which are already stored, so an edit in the middle stores only the chunks
around it.

Commit and durability (docs/durability.md): ``flush``/``release`` commit the new manifest
to the coordinator. Once the chunks are stored the new content is this node's content, even
before the coordinator acknowledged it (``OpenFile.unsent``). If the coordinator cannot be
reached within ``--commit-timeout``, the manifest is recorded in the journal's
``PendingCommits``, the call fails with ``EIO``, and a retry thread commits it as soon as
the coordinator answers (a restart replays the record). Nothing acknowledged is dropped.
``fsync`` additionally waits for the file's chunks to reach S3 and for the coordinator's
sync barrier, each bounded by ``--fsync-timeout``.

A stale version re-reads the fresh manifest, keeps the other writer's chunks where this
node changed nothing and retries (last writer wins per chunk).

Each ``Handle`` keeps the manifest it saw at open (close-to-open consistency).

Nothing here takes the llfuse lock. ``fs.Operations`` releases it before calling in. Each
``OpenFile`` has its own lock; the table has one for its dictionaries, always taken after a
file's lock or alone, never before it.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import itertools
import logging
import os
import threading
import time
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from fastcache.chunks import Buffer, Manifest, digest, seal
from fastcache.coordinator.model import MAX_LOCATION_BATCH, hole_digest, max_file_size
from fastcache.errors import Conflict, FastcacheError, NotFound, PayloadTooLarge, TierUnavailable
from fastcache.journal import PendingCommits
from fastcache.mount.stream import STREAK, ChunkStream, StreamSlots

if TYPE_CHECKING:
    from fastcache.cache.manager import CacheManager
    from fastcache.coordinator.client import CoordinatorClient
    from fastcache.coordinator.model import InodeAttrs

log = logging.getLogger("fastcache.fuse")

T = TypeVar("T")
STAGING_PREFIX = "fs-"
READ_BUFFER = 1 << 20  # per FUSE thread; grows if the kernel ever asks for more
SEQUENTIAL_WINDOW = 1 << 20  # a read this close to the previous one counts as sequential
COMMIT_BATCH = 8  # chunks hashed and written per round trip to the loop
COMMIT_ATTEMPTS = 8  # commits on a stale version before trying again later
SEAL_WINDOW = 4  # sealed chunks of one file being stored at once (memory: 4 chunks)
CDC_PIECE = 1 << 20  # bytes handed to the chunk writer at a time when re-chunking (CDC)
RETRY_FIRST = 0.2  # seconds before the first retry of an unacknowledged commit
RETRY_MAX = 10.0


class LoopCaller:
    """Runs coroutines on the node's event loop from FUSE threads and waits for them.

    This is the one place a FUSE thread hops to the loop. It does not touch the llfuse
    lock: its callers release it first (``Operations._wait`` says so). ``cancel_all`` ends
    every wait at once (shutdown): the waiting calls fail with ``TierUnavailable``.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float = 300.0) -> None:
        self.loop = loop
        self.timeout = timeout
        self._lock = threading.Lock()
        self._waiting: set[concurrent.futures.Future[Any]] = set()
        self._closed = False

    def __call__(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        if self._closed:
            coro.close()
            raise TierUnavailable("the node is shutting down")
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        with self._lock:
            self._waiting.add(future)
        try:
            return future.result(self.timeout if timeout is None else timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TierUnavailable("timed out waiting for the event loop") from None
        except concurrent.futures.CancelledError:
            raise TierUnavailable("the node is shutting down") from None
        finally:
            with self._lock:
                self._waiting.discard(future)

    def soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Schedule ``fn(*args)`` on the loop thread without waiting."""
        self.loop.call_soon_threadsafe(fn, *args)

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start ``coro`` on the loop; the caller waits for the future when it needs to."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def cancel_all(self) -> None:
        """Fail every call still waiting, and every later one (shutdown)."""
        with self._lock:
            self._closed = True
            waiting = list(self._waiting)
        for future in waiting:
            future.cancel()


def manifest_of(attrs: InodeAttrs, chunk_size: int) -> Manifest:
    """The manifest in a coordinator answer (an empty one for an empty file)."""
    doc = attrs.manifest
    if doc is None:
        return Manifest(size=0, chunk_size=chunk_size, chunks=[], version=attrs.version)
    return Manifest.from_json(doc, version=attrs.version)


def _pread_full(fd: int, view: memoryview, offset: int) -> None:
    """Fill ``view`` from ``fd`` at ``offset``; a short file reads as zeros."""
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done:]], offset + done)
        if n == 0:
            view[done:] = bytes(len(view) - done)
            return
        done += n


@dataclasses.dataclass
class Unsent:
    """A manifest this node adopted that the coordinator has not acknowledged yet."""

    manifest: Manifest
    expected: int  # the version it replaces
    changed: set[int]  # chunk indices this node changed (kept in a conflict merge)

    def record(self, ino: int) -> dict[str, Any]:
        return {
            "ino": ino,
            "expected": self.expected,
            "manifest": self.manifest.to_json(),
            "changed": sorted(self.changed),
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> Unsent:
        expected = int(record["expected"])
        manifest = Manifest.from_json(record["manifest"], version=expected)
        return cls(manifest, expected, {int(i) for i in record.get("changed", [])})


class OpenFile:
    """The node-wide state of one open inode (see the module docstring)."""

    def __init__(self, ino: int, base: Manifest, chunk_size: int) -> None:
        self.ino = ino
        self.attrs: InodeAttrs | None = None  # the last coordinator answer: outlives an unlink
        self.lock = threading.Lock()
        self.base = base
        self.version = base.version  # the last version the coordinator acknowledged
        self.chunk_size = chunk_size
        self.size = base.size
        self.base_limit = base.size
        self.fd = -1
        self.path: Path | None = None
        self.present: set[int] = set()  # chunk indices held by the staging file
        self.sealed: dict[int, str] = {}  # chunk index → digest, written in order
        self.seq_index = -1  # the chunk a sequential writer is filling
        # the FUSE buffers of that chunk, kept as given (joined once, when it is full)
        self.seq_parts: list[memoryview] | None = None
        self.seq_fill = 0
        self.stores: list[tuple[str, Buffer, concurrent.futures.Future[None]]] = []
        self.unstored: dict[str, Buffer] = {}  # sealed chunks whose store failed
        self.dirty = False
        self.unsent: Unsent | None = None
        self.generation = 0
        self.refs = 0
        self.mtime_ns = 0

    def refresh(self, base: Manifest) -> None:
        """Adopt a newer committed manifest (only while nothing is pending here)."""
        if self.dirty or self.unsent is not None or base.version <= self.version:
            return
        self.base = base
        self.version = base.version
        self.size = self.base_limit = base.size

    def close_staging(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.path is not None:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass
            self.path = None
        self.present.clear()
        self.sealed.clear()
        self.seq_index, self.seq_parts, self.seq_fill = -1, None, 0


class Handle:
    """One FUSE file handle: its open flags and the manifest snapshot it reads. ``changed``:
    the file was changed through it (writes, its truncate) since its last commit."""

    __slots__ = (
        "append",
        "changed",
        "fh",
        "file",
        "generation",
        "manifest",
        "next_off",
        "prefetched",
        "streak",
        "stream",
        "writable",
    )

    def __init__(self, fh: int, file: OpenFile, flags: int) -> None:
        self.fh = fh
        self.file = file
        self.append = bool(flags & os.O_APPEND)
        self.manifest = file.base
        self.generation = file.generation
        self.next_off = 0
        self.prefetched = -1
        self.streak = 0  # sequential requests in a row
        self.stream: ChunkStream | None = None  # whole chunks read ahead (``mount.stream``)
        self.changed = False
        self.writable = flags & os.O_ACCMODE != os.O_RDONLY


class FileTable:
    """All open files and handles of the mount, and the commits still owed."""

    def __init__(
        self,
        manager: CacheManager,
        namespace: CoordinatorClient,
        call: LoopCaller,
        chunk_size: int,
        readahead: int,
        staging_dir: Path,
        pending: PendingCommits | None = None,
        commit_timeout: float = 30.0,
        fsync_timeout: float = 60.0,
        max_size: int | None = None,
    ) -> None:
        self.manager = manager
        self.ns = namespace
        self.call = call
        self.chunk_size = chunk_size
        self.readahead = readahead
        self.staging_dir = Path(staging_dir)
        self.pending_commits = pending or PendingCommits(self.staging_dir.parent / "journal")
        self.commit_timeout = commit_timeout
        self.fsync_timeout = fsync_timeout
        self.cdc = manager.cdc_params is not None
        # The largest file this node can commit (``model.max_file_size``), capped at
        # ``max_size`` (``--max-file-size``): EFBIG beyond it (truncate, write).
        limit = max_file_size(chunk_size, manager.cdc_params.min if self.cdc else None)
        self.max_size = limit if max_size is None else min(limit, max_size)
        self._lock = threading.Lock()
        self._files: dict[int, OpenFile] = {}
        self._handles: dict[int, Handle] = {}
        self._fh = itertools.count(1)
        self._tls = threading.local()
        self._read_local = manager.read_local  # bound once: the hit path is a few lookups
        self._recent = manager.recent_chunk
        self._hole = hole_digest(chunk_size)
        self._nvme = manager.nvme
        self._streams = StreamSlots(chunk_size)
        # commits the coordinator has not acknowledged: ino → file (holding one ref)
        self._owed: dict[int, OpenFile] = {}
        self._retry_wake = threading.Event()
        self._closing = False
        self._retrier: threading.Thread | None = None

    # --- pending commits (restart, retry) ----------------------------------------------------
    def replay(self) -> int:
        """Take over the commits a previous run could not make; the number found."""
        records = self.pending_commits.load()
        for ino, record in records.items():
            try:
                unsent = Unsent.from_record(record)
            except (FastcacheError, KeyError, TypeError, ValueError) as exc:
                log.error("pending commit of inode %d is damaged (kept on disk): %s", ino, exc)
                continue
            file = self._acquire(ino, unsent.manifest)
            with file.lock:
                file.version = unsent.expected
                file.unsent = unsent
                self._owe(file)
            self._drop(file)  # the retry thread holds it now
        if records:
            log.info("%d commit(s) from the last run to send to the coordinator", len(records))
        return len(records)

    def owed(self) -> int:
        """Commits not yet acknowledged by the coordinator."""
        return len(self._owed)

    def _owe(self, file: OpenFile) -> None:
        """``file`` has an unsent manifest: record it on disk and let the retrier send it."""
        assert file.unsent is not None
        self.pending_commits.put(file.ino, file.unsent.record(file.ino))
        with self._lock:
            if file.ino not in self._owed:
                self._owed[file.ino] = file
                file.refs += 1
            if self._retrier is None and not self._closing:
                self._retrier = threading.Thread(
                    target=self._retry_loop, name="fastcache-commit-retry", daemon=True
                )
                self._retrier.start()
        self._retry_wake.set()

    def _retry_loop(self) -> None:
        delay = RETRY_FIRST
        while not self._closing:
            self._retry_wake.wait(delay)  # a backoff period, woken early by new work
            self._retry_wake.clear()
            if self._closing:
                return
            with self._lock:
                files = list(self._owed.values())
            failed = False
            for file in files:
                try:
                    self._send_owed(file)
                except (FastcacheError, OSError) as exc:
                    failed = True
                    log.info("inode %d: commit still not acknowledged: %s", file.ino, exc)
                    break  # the coordinator is away: try them all again later
            delay = min(RETRY_MAX, delay * 2) if failed else RETRY_FIRST
            if not failed:
                with self._lock:
                    if not self._owed:
                        delay = RETRY_MAX

    def _send_owed(self, file: OpenFile) -> None:
        with file.lock:
            if file.unsent is not None:
                self._send(file, self.commit_timeout)
            settled = file.unsent is None
        if settled:
            self._settle_owed(file)

    def _settle_owed(self, file: OpenFile) -> None:
        with self._lock:
            held = self._owed.pop(file.ino, None)
        if held is not None:
            self._drop(file)

    # --- open / close ----------------------------------------------------------------------
    def open(self, ino: int, flags: int, attrs: InodeAttrs) -> int:
        """A new handle on ``ino`` whose fresh coordinator answer is ``attrs``."""
        base = manifest_of(attrs, self.chunk_size)
        file = self._acquire(ino, base)
        with file.lock:
            file.refresh(base)
            file.attrs = attrs
            truncated = bool(flags & os.O_TRUNC and file.size)
            if truncated:
                self._truncate_locked(file, 0)
            fh = next(self._fh)
            handle = Handle(fh, file, flags)
            handle.changed = truncated
        with self._lock:
            self._handles[fh] = handle
        return fh

    def _acquire(self, ino: int, base: Manifest) -> OpenFile:
        with self._lock:
            file = self._files.get(ino)
            if file is None:
                file = self._files[ino] = OpenFile(ino, base, self.chunk_size)
            file.refs += 1
            return file

    def _drop(self, file: OpenFile) -> None:
        with self._lock:
            file.refs -= 1
            if file.refs > 0:
                return
            del self._files[file.ino]
        with file.lock:
            if file.dirty or file.unsent is not None:  # cannot happen: _owe holds a ref
                log.error("inode %d: closing with changes not committed", file.ino)
            self._wait_stores(file, raise_errors=False)
            file.close_staging()

    def flush(self, fh: int) -> InodeAttrs | None:
        """Commit the handle's file if it has changes; the new attributes, if any. Not
        through a read-only handle that changed nothing: another handle may be half-way
        through a rewrite (its changes are committed at its own close). A writable one
        commits them all (a shared mapping's pages may be written through another handle)."""
        handle = self._handles[fh]
        if not (handle.changed or handle.writable):
            return None
        attrs = self.commit(handle.file)
        handle.changed = False
        return attrs

    def release(self, fh: int) -> InodeAttrs | None:
        """Commit what was changed through the handle since its flush (a write of a shared
        mapping's pages) and close it. Not another handle's changes: the kernel sends a
        release after ``close`` has returned, so a rewrite's ``open(O_TRUNC)`` may already
        have emptied the file, and committing that would show other nodes the file empty."""
        with self._lock:
            handle = self._handles.pop(fh)
        if handle.stream is not None:
            handle.stream.close()  # its buffers go; its slot is free for another reader
        try:
            return self.commit(handle.file) if handle.changed else None
        finally:
            self._drop(handle.file)

    def fsync(self, fh: int) -> InodeAttrs | None:
        """Commit (waiting for the coordinator), then return once every chunk of the file is
        in S3 and the coordinator has synced; ``TierUnavailable`` (EIO) past the bound."""
        handle = self._handles[fh]
        file = handle.file
        attrs = self.commit(file, timeout=self.fsync_timeout, force=True)
        handle.changed = False
        if file.ino in self._owed and file.unsent is None:
            self._settle_owed(file)
        chunks = list(file.base.chunks)
        timeout = self.fsync_timeout
        self.call(self.manager.flush(chunks, timeout=timeout), timeout + 1.0)
        self.sync_namespace()
        return attrs

    def sync_namespace(self) -> None:
        """The coordinator's sync barrier (``syncfs``, directory ``fsync``)."""
        barrier = getattr(self.ns, "sync", None)
        if barrier is not None:
            self.call(barrier(), self.fsync_timeout)

    def flush_all(self) -> list[InodeAttrs]:
        """Commit every open file (unmount). Once the coordinator fails to answer, the rest
        are only recorded (``PendingCommits``) for the next start: shutdown stays bounded."""
        with self._lock:
            files = list(self._files.values())
        done = []
        reachable = True
        for file in files:
            try:
                attrs = self.commit(file, send=reachable)
            except (FastcacheError, OSError) as exc:
                reachable = False
                log.warning("inode %d: commit at unmount failed (kept): %s", file.ino, exc)
                continue
            if attrs is not None:
                done.append(attrs)
        return done

    def close(self) -> None:
        """Stop the retry thread (what it still owes stays recorded on disk)."""
        self._closing = True
        self._retry_wake.set()
        retrier = self._retrier
        if retrier is not None:
            retrier.join(self.commit_timeout + 1.0)

    def open_count(self) -> int:
        return len(self._handles)

    # --- attributes overlay ----------------------------------------------------------------
    def pending(self, ino: int) -> tuple[int, int] | None:
        """``(size, mtime_ns)`` of changes to ``ino`` this node has not committed, if any."""
        file = self._files.get(ino)
        if file is None or not (file.dirty or file.unsent is not None):
            return None
        return file.size, file.mtime_ns

    def orphan(self, ino: int) -> InodeAttrs | None:
        """The last attributes of ``ino`` if it is open here (it may be unlinked by now)."""
        file = self._files.get(ino)
        if file is None or file.attrs is None:
            return None
        return dataclasses.replace(file.attrs, nlink=0, size=file.size)

    def commit_ino(self, ino: int) -> InodeAttrs | None:
        """Commit ``ino`` if it is open here with changes (before a setattr, say)."""
        file = self._files.get(ino)
        return None if file is None else self.commit(file, force=True)

    # --- reads -----------------------------------------------------------------------------
    def read(self, fh: int, off: int, size: int) -> memoryview | bytes:
        """Bytes of the file at ``off``; short at EOF.

        The NVMe hit returns a view of this thread's buffer, valid until the thread's next
        read (llfuse replies before its worker takes another request); a chunk fetched a
        moment ago (a cold sequential reader's) or read whole ahead of a sequential reader
        (``ChunkStream``), a view of its bytes in memory.
        """
        handle = self._handles[fh]
        file = handle.file
        if file.dirty or handle.generation != file.generation:
            return self._read_staged(file, off, size)
        manifest = handle.manifest
        left = manifest.size - off
        if left <= 0:
            return b""
        if size > left:
            size = left
        sequential = abs(off - handle.next_off) < SEQUENTIAL_WINDOW
        if sequential:
            handle.streak += 1
        else:
            handle.streak = 0
            stream = handle.stream
            if stream is not None:  # a seek: its read-ahead is of no use now
                handle.stream = None
                stream.close()
        cs = manifest.chunk_size
        index = off // cs
        inner = off - index * cs
        tried = manifest.lengths is None and inner + size <= cs
        if tried:
            name = manifest.chunks[index]
            if name == self._hole:
                return bytes(size)
            recent = self._recent(name)
            stream = handle.stream
            if recent is None and stream is not None:
                recent = stream.chunk(index)
            if recent is not None:  # fetched or read ahead: a view of it, no copy
                view = memoryview(recent)[inner : inner + size]
                hit = len(view) == size
            else:
                try:  # this thread's buffer (``_buffer``, inlined: the hit path counts frames)
                    view = self._tls.view[:size]
                except AttributeError:
                    view = self._buffer(size)
                if len(view) < size:
                    view = self._buffer(size)
                hit = self._read_local(name, inner, view) == size
            if hit:
                if index != handle.prefetched and sequential:
                    self._readahead(handle, index)
                handle.next_off = off + size
                return view
        # Read ahead before waiting for this read: the next chunks' fetches overlap it.
        if sequential and manifest.lengths is None:
            last = (off + size - 1) // cs
            if last != handle.prefetched:
                self._readahead(handle, last)
        data = self.call(self.manager.read_range(manifest, off, size, tried))
        handle.next_off = off + size
        return data

    def _buffer(self, size: int) -> memoryview:
        view: memoryview | None = getattr(self._tls, "view", None)
        if view is None or len(view) < size:
            view = self._tls.view = memoryview(bytearray(max(size, READ_BUFFER)))
        return view[:size]

    def _readahead(self, handle: Handle, index: int) -> None:
        """The reader reached chunk ``index`` sequentially: fetch the next chunks missing
        from NVMe; read those on NVMe whole ahead of it (its stream, once it has read
        ``STREAK`` requests in a row)."""
        handle.prefetched = index
        if index + 1 >= len(handle.manifest.chunks):
            return
        if handle.stream is None and handle.streak >= STREAK:
            with self._lock:  # two workers may serve the same handle: one stream
                if handle.stream is None and self._streams.take():
                    handle.stream = ChunkStream(handle.manifest, self._nvme, self._streams)
            stream = handle.stream
            if stream is not None:
                stream.chunk(index)  # starts reading the next ones
        if self.readahead > 0:
            self.call.soon(self.manager.prefetch, handle.manifest, index + 1, self.readahead)

    def _read_staged(self, file: OpenFile, off: int, size: int) -> bytes:
        with file.lock:
            left = file.size - off
            if left <= 0:
                return b""
            out = bytearray(min(size, left))
            self._read_current(file, memoryview(out), off)
            return bytes(out)

    def _read_current(self, file: OpenFile, out: memoryview, off: int) -> None:
        """``out`` ← the file's current content at ``off`` (``out`` is zeroed). Locked."""
        cs = file.chunk_size
        pos, end = off, off + len(out)
        while pos < end:
            index = pos // cs
            take = min((index + 1) * cs, end) - pos
            part = out[pos - off : pos - off + take]
            if index in file.present:
                _pread_full(file.fd, part, pos)
            elif index == file.seq_index:
                inner = pos - index * cs
                n = max(0, min(take, file.seq_fill - inner))
                if n:
                    assert file.seq_parts is not None
                    part[:n] = b"".join(file.seq_parts)[inner : inner + n]
                if n < take:
                    self._read_base(file, part[n:], pos + n)
            elif index in file.sealed:
                self._read_sealed(file, file.sealed[index], part, pos - index * cs)
            else:
                self._read_base(file, part, pos)
            pos += take

    def _read_sealed(self, file: OpenFile, name: str, out: memoryview, inner: int) -> None:
        kept = file.unstored.get(name)
        if kept is None:
            for stored, buf, _ in file.stores:
                if stored == name:
                    kept = buf
                    break
        if kept is not None:
            out[:] = kept[inner : inner + len(out)]
            return
        if self._read_local(name, inner, out) == len(out):
            return
        one = Manifest(size=file.chunk_size, chunk_size=file.chunk_size, chunks=[name])
        out[:] = self.call(self.manager.read_range(one, inner, len(out)))

    def _read_base(self, file: OpenFile, out: memoryview, pos: int) -> None:
        """``out`` ← the base content at ``pos``; zeros past ``base_limit`` (out is zeroed)."""
        limit = min(file.base.size, file.base_limit)
        n = min(len(out), limit - pos)
        if n <= 0:
            return
        base = file.base
        if base.lengths is None:
            cs = base.chunk_size
            index = pos // cs
            inner = pos - index * cs
            if inner + n <= cs:
                name = base.chunks[index]
                if name == hole_digest(base.chunk_length(index)):
                    return
                if self._read_local(name, inner, out[:n]) == n:
                    return
        out[:n] = self.call(self.manager.read_range(base, pos, n))

    # --- writes ----------------------------------------------------------------------------
    def write(self, fh: int, off: int, data: bytes) -> int:
        """Write ``data`` at ``off``; as on Linux, a write that would cross the maximum file
        size is cut short at it and one that starts there fails (``PayloadTooLarge``: EFBIG)."""
        handle = self._handles[fh]
        file = handle.file
        with file.lock:
            if handle.append:
                off = file.size
            if off + len(data) > self.max_size:
                if off >= self.max_size:
                    raise PayloadTooLarge(
                        f"offset {off} is not below the maximum file size, {self.max_size}"
                    )
                data = data[: self.max_size - off]  # a copy, on this rare path only
            end = off + len(data)
            if not self._write_sequential(file, off, data):
                self._write_staged(file, off, data)
            if end > file.size:
                file.size = end
            file.dirty = True
            file.generation += 1
            file.mtime_ns = time.time_ns()
        handle.changed = True
        return len(data)

    def _write_sequential(self, file: OpenFile, off: int, data: bytes) -> bool:
        """Fill chunks in order and seal each full one; ``False`` if ``off`` is elsewhere."""
        if self.cdc or file.base.lengths is not None:
            return False
        cs = file.chunk_size
        if file.seq_parts is not None and off == file.seq_index * cs + file.seq_fill:
            pass
        elif off % cs == 0 and off // cs not in file.present and off >= file.size:
            self._spill(file)  # a writer that jumped ahead leaves its old chunk to staging
            file.sealed.pop(off // cs, None)
            file.seq_index, file.seq_parts, file.seq_fill = off // cs, [], 0
        else:
            return False
        view = memoryview(data)  # llfuse hands each write a fresh bytes: kept, not copied
        while view:
            parts = file.seq_parts
            assert parts is not None
            take = min(cs - file.seq_fill, len(view))
            parts.append(view[:take])
            file.seq_fill += take
            view = view[take:]
            if file.seq_fill == cs:
                self._seal(file, file.seq_index, seal(parts, cs))  # the one copy
                file.seq_index += 1
                file.seq_parts, file.seq_fill = [], 0
                file.sealed.pop(file.seq_index, None)
        return True

    def _seal(self, file: OpenFile, index: int, buf: memoryview) -> None:
        """Hash a full chunk here (GIL released) and start storing it; bounded in flight."""
        name = digest(buf)
        file.sealed[index] = name
        if name == self._hole:
            return
        while len(file.stores) >= SEAL_WINDOW:
            self._finish_store(file, *file.stores.pop(0))
        file.stores.append((name, buf, self.call.submit(self.manager.write_chunk(name, buf))))

    def _finish_store(
        self, file: OpenFile, name: str, buf: Buffer, future: concurrent.futures.Future[None]
    ) -> None:
        try:
            future.result(self.call.timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            file.unstored[name] = buf
        except Exception as exc:
            log.info("storing sealed chunk %s failed (retried at commit): %s", name, exc)
            file.unstored[name] = buf

    def _wait_stores(self, file: OpenFile, raise_errors: bool = True) -> None:
        """Every sealed chunk stored; the ones that failed are tried once more (raises)."""
        while file.stores:
            self._finish_store(file, *file.stores.pop(0))
        if not raise_errors:
            return
        for name, buf in list(file.unstored.items()):
            self.call(self.manager.write_chunk(name, buf))
            del file.unstored[name]

    def _spill(self, file: OpenFile) -> None:
        """Move a partly filled sequential chunk into the staging file."""
        parts, index = file.seq_parts, file.seq_index
        if parts is None:
            return
        file.seq_index, file.seq_parts, file.seq_fill = -1, None, 0
        self._stage(file)
        self._materialize(file, index)
        os.pwrite(file.fd, b"".join(parts), index * file.chunk_size)
        file.present.add(index)

    def _write_staged(self, file: OpenFile, off: int, data: bytes) -> None:
        self._spill(file)
        self._stage(file)
        end = off + len(data)
        cs = file.chunk_size
        for index in range(off // cs, (end - 1) // cs + 1):
            if index in file.present:
                continue
            start = index * cs
            if index in file.sealed or not (
                off <= start and end >= min(start + cs, max(file.size, end))
            ):
                self._materialize(file, index)
            file.sealed.pop(index, None)
            file.present.add(index)
        view = memoryview(data)
        done = 0
        while done < len(view):
            done += os.pwrite(file.fd, view[done:], off + done)

    def _stage(self, file: OpenFile) -> None:
        """Create the staging file on first change (a file split by CDC is copied whole)."""
        if file.fd >= 0:
            return
        path = self.staging_dir / f"{STAGING_PREFIX}{file.ino}-{os.getpid()}-{next(self._fh)}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        file.fd, file.path = fd, path
        os.ftruncate(fd, file.size)
        if file.base.lengths is not None:  # not our fixed layout: copy everything once
            for index in range(-(-file.size // file.chunk_size)):
                self._materialize(file, index)
                file.present.add(index)

    def _materialize(self, file: OpenFile, index: int) -> None:
        """Copy chunk ``index`` of the current content into the staging file."""
        start = index * file.chunk_size
        length = min(file.chunk_size, file.size - start)
        if length <= 0:
            return
        if index not in file.sealed and start >= min(file.base.size, file.base_limit):
            return  # only zeros there: the sparse staging file already reads as zeros
        buf = bytearray(length)
        self._read_current(file, memoryview(buf), start)
        os.pwrite(file.fd, buf, start)

    def truncate(self, ino: int, size: int, fh: int | None = None) -> InodeAttrs | None:
        """Set the size of ``ino``; the new attributes if committed.

        Through a handle (``ftruncate``, ``open(O_TRUNC)``) the change waits for the
        handle's commit like its writes, so other nodes never see the file emptied
        half-way through a rewrite; by path it is committed at once.
        """
        if size > self.max_size:  # refused before anything scales with it
            raise PayloadTooLarge(
                f"{size} bytes is more than the maximum file size, {self.max_size}"
            )
        handle = self._handles.get(fh) if fh is not None else None
        if handle is not None:
            with handle.file.lock:
                self._truncate_locked(handle.file, size)
            handle.changed = True
            return None
        attrs = self.call(self.ns.getattr(ino))
        file = self._acquire(ino, manifest_of(attrs, self.chunk_size))
        try:
            with file.lock:
                file.refresh(manifest_of(attrs, self.chunk_size))
                self._truncate_locked(file, size)
            return self.commit(file, force=True)
        finally:
            self._drop(file)

    def _truncate_locked(self, file: OpenFile, size: int) -> None:
        if size == file.size:
            return
        cs = file.chunk_size
        if size < file.size:
            self._spill(file)
            edge = size // cs
            if size % cs and edge in file.sealed:  # cut inside a sealed chunk: stage it
                self._stage(file)
                self._materialize(file, edge)
                file.present.add(edge)
            file.sealed = {i: d for i, d in file.sealed.items() if (i + 1) * cs <= size}
        file.base_limit = min(file.base_limit, size)
        file.size = size
        if file.fd >= 0:
            os.ftruncate(file.fd, size)
            file.present = {i for i in file.present if i * cs < size}
        file.dirty = True
        file.generation += 1
        file.mtime_ns = time.time_ns()

    # --- commit ----------------------------------------------------------------------------
    def commit(
        self, file: OpenFile, timeout: float | None = None, force: bool = False, send: bool = True
    ) -> InodeAttrs | None:
        """Store the changed chunks and commit the manifest; ``None`` if nothing changed.

        A manifest already owed to the coordinator is left to the retry thread unless
        ``force`` (fsync, setattr). ``send=False`` only records it (unmount, coordinator
        away). Raises ``TierUnavailable`` (EIO) when the coordinator does not answer in
        ``timeout`` (default ``commit_timeout``); the commit is then owed, not lost.
        """
        with file.lock:
            adopted = file.dirty
            if adopted:
                self._adopt(file)
            if file.unsent is None:
                return None
            owed = file.ino in self._owed
            if send and (adopted or force or not owed):
                try:
                    attrs = self._send(file, self.commit_timeout if timeout is None else timeout)
                except (FastcacheError, OSError):
                    self._owe(file)  # recorded (again: a merge may have changed it)
                    raise
            else:
                if adopted or not owed:
                    self._owe(file)
                return None
        if owed:
            self._settle_owed(file)
        return attrs

    def _adopt(self, file: OpenFile) -> None:
        """Build the new manifest (chunks stored) and make it this node's content."""
        manifest, changed = self._build_cdc(file) if self.cdc else self._build(file)
        previous = file.unsent
        if previous is not None:
            changed |= previous.changed
        file.unsent = Unsent(manifest, file.version, changed)
        file.base = manifest
        file.size = file.base_limit = manifest.size
        file.dirty = False
        file.close_staging()

    def _send(self, file: OpenFile, timeout: float) -> InodeAttrs | None:
        """Commit ``file.unsent`` at the coordinator (file locked); its attributes."""
        unsent = file.unsent
        assert unsent is not None
        try:
            attrs = self._commit_manifest(file, unsent, timeout)
        except NotFound:
            # Unlinked (and gone) meanwhile: like a local file, the content goes with it.
            log.info("inode %d vanished before its commit; changes discarded", file.ino)
            file.unsent = None
            self.pending_commits.remove(file.ino)
            return None
        file.unsent = None
        file.base = manifest_of(attrs, self.chunk_size)
        file.attrs = attrs
        file.version = attrs.version
        file.size = file.base_limit = file.base.size
        if file.ino in self._owed:
            self.pending_commits.remove(file.ino)
        return attrs

    def _build(self, file: OpenFile) -> tuple[Manifest, set[int]]:
        """The new manifest: reused base chunks, sealed chunks, holes, and the rest hashed
        and stored (fixed chunking)."""
        self._wait_stores(file)
        cs = file.chunk_size
        base = file.base
        limit = min(base.size, file.base_limit)
        same_layout = base.lengths is None and base.chunk_size == cs
        tail: bytes | None = None
        if file.seq_parts is not None:
            start = file.seq_index * cs
            covers = min(file.size, start + cs) - start
            if 0 < covers <= file.seq_fill:
                tail = b"".join(file.seq_parts)
                tail = tail if covers == len(tail) else tail[:covers]
            elif covers > 0:
                self._spill(file)
        chunks: list[str] = []
        changed: set[int] = set()
        batch: list[tuple[str, bytes | bytearray]] = []
        storing: list[concurrent.futures.Future[None]] = []
        for index in range(-(-file.size // cs)):
            start = index * cs
            length = min(cs, file.size - start)
            sealed = file.sealed.get(index)
            if sealed is not None and length == cs:
                chunks.append(sealed)
                changed.add(index)
                continue
            if index not in file.present and index != file.seq_index:
                if (
                    same_layout
                    and index < len(base.chunks)
                    and start + length <= limit
                    and base.chunk_length(index) == length
                ):
                    chunks.append(base.chunks[index])
                    continue
                if start >= limit and sealed is None:  # never written: a hole
                    chunks.append(hole_digest(length))
                    changed.add(index)
                    continue
            if tail is not None and index == file.seq_index and len(tail) == length:
                data: bytes | bytearray = tail
            else:
                data = bytearray(length)
                self._read_current(file, memoryview(data), start)
            name = digest(data)
            chunks.append(name)
            changed.add(index)
            batch.append((name, data))
            if len(batch) >= COMMIT_BATCH:
                # Stored while the next batch is read and hashed (two batches at most).
                storing.append(self._store(batch))
                batch = []
                if len(storing) >= 2:
                    self._finish_stores(storing[:1])
                    del storing[:1]
        if batch:
            storing.append(self._store(batch))
        self._finish_stores(storing)
        return Manifest(size=file.size, chunk_size=cs, chunks=chunks), changed

    def _build_cdc(self, file: OpenFile) -> tuple[Manifest, set[int]]:
        """The new manifest of a CDC node: the whole content through the chunk writer."""
        writer = self.manager.writer()
        pos = 0
        try:
            while pos < file.size:
                piece = bytearray(min(CDC_PIECE, file.size - pos))
                self._read_current(file, memoryview(piece), pos)
                self.call(writer.write(piece))
                pos += len(piece)
            manifest: Manifest = self.call(writer.finish())
        except BaseException:
            self.call.submit(writer.abort())  # drop what is in flight; not waited for
            raise
        return manifest, set(range(len(manifest.chunks)))

    def _store(self, batch: list[tuple[str, bytes | bytearray]]) -> concurrent.futures.Future[None]:
        """Start writing ``batch`` through the manager; the future of all of it."""
        unique = dict(batch)
        write = self.manager.write_chunk

        async def store_all() -> None:
            await asyncio.gather(*(write(name, data) for name, data in unique.items()))

        return self.call.submit(store_all())

    def _finish_stores(self, futures: list[concurrent.futures.Future[None]]) -> None:
        """Wait for batches ``_store`` started; the first failure is raised (after all)."""
        error: BaseException | None = None
        for future in futures:
            try:
                future.result(self.call.timeout)
            except concurrent.futures.TimeoutError:
                future.cancel()
                error = error or TierUnavailable("timed out waiting for the event loop")
            except BaseException as exc:
                error = error or exc
        if error is not None:
            raise error

    def _commit_manifest(self, file: OpenFile, unsent: Unsent, timeout: float) -> InodeAttrs:
        manifest, changed = unsent.manifest, unsent.changed
        # Publish with the commit: the chunks only this node holds yet (on its NVMe, not in
        # S3) are recorded as located here in the commit's own transaction, so the other
        # nodes can find them as soon as the manifest is visible (no separate round trip).
        holder = self.manager.peer_id
        held = self.manager.unpublished([manifest.chunks[i] for i in sorted(changed)])
        if len(held) > MAX_LOCATION_BATCH:  # more than one commit carries: publish first
            self.call(self.manager.publish(held), timeout)  # best effort, as with a commit
            held = []
        extra: dict[str, Any] = {"holder": holder, "held": held} if held and holder else {}
        for _attempt in range(COMMIT_ATTEMPTS):
            try:
                attrs = self.call(
                    self.ns.commit_manifest(file.ino, manifest.to_json(), unsent.expected, **extra),
                    timeout,
                )
                if extra:
                    self.manager.note_published(len(held))
                return attrs
            except Conflict:
                fresh = self.call(self.ns.getattr(file.ino), timeout)
                _merge(manifest, manifest_of(fresh, self.chunk_size), changed)
                unsent.expected = fresh.version
        raise Conflict(f"inode {file.ino}: manifest commit kept conflicting")


def _merge(ours: Manifest, theirs: Manifest, changed: set[int]) -> None:
    """Take ``theirs`` for every chunk this node did not change (same index, same length)."""
    if theirs.lengths is not None or theirs.chunk_size != ours.chunk_size:
        return
    for index in range(min(len(ours.chunks), len(theirs.chunks))):
        if index not in changed and theirs.chunk_length(index) == ours.chunk_length(index):
            ours.chunks[index] = theirs.chunks[index]
