"""Open files of the mount: the staging file on NVMe, dirty chunks, and the commit.

One ``OpenFile`` per inode open on this node holds the state every handle of that inode
shares: the manifest it started from (``base``), the logical size, and, once something was
written or truncated, a sparse staging file under ``manager.nvme.staging_dir`` holding the
chunks that changed. A chunk is copied into the staging file from the existing content only
when a write covers it partially; bytes past ``base_limit`` (the smallest size the file was
truncated to since the last commit) read as zeros.

``flush``/``release``/``fsync`` commit: every changed chunk is hashed and written through the
manager, then the new manifest is committed to the coordinator with the version it was based
on. A stale version re-reads the fresh manifest, keeps the other writer's chunks where this
node changed nothing and retries (last writer wins per chunk; a write is never dropped
silently).

Each ``Handle`` keeps the manifest it saw at open (close-to-open consistency): it reads that
snapshot until this node itself changes the file.

Nothing here takes the llfuse lock. ``fs.Operations`` releases it before calling in; every
wait (staging I/O, the NVMe pread, the event loop) happens here without it. Each
``OpenFile`` has its own lock; the table has one for its dictionaries.
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
from typing import Any, TypeVar

from fastcache.chunks import Manifest, digest
from fastcache.coordinator.service import MAX_LOCATION_BATCH
from fastcache.errors import Conflict, FastcacheError, NotFound, TierUnavailable

log = logging.getLogger("fastcache.fuse")

T = TypeVar("T")
Attrs = Any  # fastcache.coordinator.store.InodeAttrs
STAGING_PREFIX = "fs-"
READ_BUFFER = 1 << 20  # per FUSE thread; grows if the kernel ever asks for more
SEQUENTIAL_WINDOW = 1 << 20  # a read this close to the previous one counts as sequential
COMMIT_BATCH = 8  # chunks hashed and written per round trip to the loop
COMMIT_ATTEMPTS = 8  # commits on a stale version before giving up (EAGAIN)


class LoopCaller:
    """Runs coroutines on the node's event loop from FUSE threads and waits for them.

    This is the one place a FUSE thread hops to the loop. It does not touch the llfuse
    lock: its callers release it first (``Operations._wait`` says so).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, timeout: float = 300.0) -> None:
        self.loop = loop
        self.timeout = timeout

    def __call__(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        future = asyncio.run_coroutine_threadsafe(coro, self.loop)
        try:
            return future.result(self.timeout if timeout is None else timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise TierUnavailable("timed out waiting for the event loop") from None

    def soon(self, fn: Callable[..., Any], *args: Any) -> None:
        """Schedule ``fn(*args)`` on the loop thread without waiting."""
        self.loop.call_soon_threadsafe(fn, *args)


def manifest_of(attrs: Attrs, chunk_size: int) -> Manifest:
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


class OpenFile:
    """The node-wide state of one open inode (see the module docstring)."""

    def __init__(self, ino: int, base: Manifest, chunk_size: int) -> None:
        self.ino = ino
        self.attrs: Attrs | None = None  # the last coordinator answer: outlives an unlink
        self.lock = threading.Lock()
        self.base = base
        self.version = base.version
        self.chunk_size = chunk_size
        self.size = base.size
        self.base_limit = base.size
        self.fd = -1
        self.path: Path | None = None
        self.present: set[int] = set()
        self.dirty = False
        self.generation = 0
        self.refs = 0
        self.mtime_ns = 0

    def refresh(self, base: Manifest) -> None:
        """Adopt a newer committed manifest (only while nothing is pending here)."""
        if self.dirty or base.version <= self.version:
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


class Handle:
    """One FUSE file handle: its open flags and the manifest snapshot it reads."""

    __slots__ = ("append", "fh", "file", "generation", "manifest", "next_off", "prefetched")

    def __init__(self, fh: int, file: OpenFile, flags: int) -> None:
        self.fh = fh
        self.file = file
        self.append = bool(flags & os.O_APPEND)
        self.manifest = file.base
        self.generation = file.generation
        self.next_off = 0
        self.prefetched = -1


class FileTable:
    """All open files and handles of the mount."""

    def __init__(
        self,
        manager: Any,
        namespace: Any,
        call: LoopCaller,
        chunk_size: int,
        readahead: int,
        staging_dir: Path,
    ) -> None:
        self.manager = manager
        self.ns = namespace
        self.call = call
        self.chunk_size = chunk_size
        self.readahead = readahead
        self.staging_dir = Path(staging_dir)
        self._lock = threading.Lock()
        self._files: dict[int, OpenFile] = {}
        self._handles: dict[int, Handle] = {}
        self._fh = itertools.count(1)
        self._tls = threading.local()
        self._read_local = manager.read_local  # bound once: the hit path is a few lookups

    # --- open / close ----------------------------------------------------------------------
    def open(self, ino: int, flags: int, attrs: Attrs) -> int:
        """A new handle on ``ino`` whose fresh coordinator answer is ``attrs``."""
        base = manifest_of(attrs, self.chunk_size)
        file = self._acquire(ino, base)
        with file.lock:
            file.refresh(base)
            file.attrs = attrs
            if flags & os.O_TRUNC and file.size:
                self._truncate_locked(file, 0)
            fh = next(self._fh)
            handle = Handle(fh, file, flags)
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
            if file.dirty:
                log.error("inode %d: dropping changes that could not be committed", file.ino)
            file.close_staging()

    def flush(self, fh: int) -> Attrs | None:
        """Commit the handle's file if it has changes; the new attributes, if any."""
        return self.commit(self._handles[fh].file)

    def release(self, fh: int) -> Attrs | None:
        """Commit what is left and close the handle."""
        with self._lock:
            handle = self._handles.pop(fh)
        try:
            return self.commit(handle.file)
        finally:
            self._drop(handle.file)

    def fsync(self, fh: int) -> Attrs | None:
        """Commit, then return once every chunk of the file is in S3."""
        file = self._handles[fh].file
        attrs = self.commit(file)
        self.call(self.manager.flush(list(file.base.chunks)))
        return attrs

    def flush_all(self) -> list[Attrs]:
        """Commit every open file (unmount): errors are logged, the others still commit."""
        with self._lock:
            files = list(self._files.values())
        done = []
        for file in files:
            try:
                attrs = self.commit(file)
            except (FastcacheError, OSError) as exc:
                log.error("inode %d: commit at unmount failed: %s", file.ino, exc)
                continue
            if attrs is not None:
                done.append(attrs)
        return done

    def open_count(self) -> int:
        return len(self._handles)

    # --- attributes overlay ----------------------------------------------------------------
    def pending(self, ino: int) -> tuple[int, int] | None:
        """``(size, mtime_ns)`` of uncommitted changes to ``ino`` on this node, if any."""
        file = self._files.get(ino)
        if file is None or not file.dirty:
            return None
        return file.size, file.mtime_ns

    def orphan(self, ino: int) -> Attrs | None:
        """The last attributes of ``ino`` if it is open here (it may be unlinked by now)."""
        file = self._files.get(ino)
        if file is None or file.attrs is None:
            return None
        return dataclasses.replace(file.attrs, nlink=0, size=file.size)

    def commit_ino(self, ino: int) -> Attrs | None:
        """Commit ``ino`` if it is open here with changes (before a setattr, say)."""
        file = self._files.get(ino)
        return None if file is None else self.commit(file)

    # --- reads -----------------------------------------------------------------------------
    def read(self, fh: int, off: int, size: int) -> memoryview | bytes:
        """Bytes of the file at ``off``; short at EOF.

        The NVMe hit returns a view of this thread's buffer, valid until the thread's next
        read (llfuse replies before its worker takes another request).
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
        cs = manifest.chunk_size
        index = off // cs
        inner = off - index * cs
        if manifest.lengths is None and inner + size <= cs:
            view = self._buffer(size)
            if self._read_local(manifest.chunks[index], inner, view) == size:
                if index != handle.prefetched and abs(off - handle.next_off) < SEQUENTIAL_WINDOW:
                    self._readahead(handle, index)
                handle.next_off = off + size
                return view
        # Read ahead before waiting for this read: the next chunks' fetches overlap it.
        if abs(off - handle.next_off) < SEQUENTIAL_WINDOW and manifest.lengths is None:
            last = (off + size - 1) // cs
            if last != handle.prefetched:
                self._readahead(handle, last)
        data = self.call(self.manager.read_range(manifest, off, size))
        handle.next_off = off + size
        return data

    def _buffer(self, size: int) -> memoryview:
        view: memoryview | None = getattr(self._tls, "view", None)
        if view is None or len(view) < size:
            view = self._tls.view = memoryview(bytearray(max(size, READ_BUFFER)))
        return view[:size]

    def _readahead(self, handle: Handle, index: int) -> None:
        handle.prefetched = index
        if self.readahead > 0 and index + 1 < len(handle.manifest.chunks):
            self.call.soon(self.manager.prefetch, handle.manifest, index + 1, self.readahead)

    def _read_staged(self, file: OpenFile, off: int, size: int) -> bytes:
        with file.lock:
            left = file.size - off
            if left <= 0:
                return b""
            size = min(size, left)
            out = bytearray(size)
            view = memoryview(out)
            cs = file.chunk_size
            pos = off
            while pos < off + size:
                index = pos // cs
                take = min((index + 1) * cs, off + size) - pos
                part = view[pos - off : pos - off + take]
                if index in file.present:
                    _pread_full(file.fd, part, pos)
                else:
                    self._read_base(file, part, pos)
                pos += take
            return bytes(out)

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
            if inner + n <= cs and self._read_local(base.chunks[index], inner, out[:n]) == n:
                return
        out[:n] = self.call(self.manager.read_range(base, pos, n))

    # --- writes ----------------------------------------------------------------------------
    def write(self, fh: int, off: int, data: bytes) -> int:
        handle = self._handles[fh]
        file = handle.file
        with file.lock:
            if handle.append:
                off = file.size
            self._stage(file)
            end = off + len(data)
            cs = file.chunk_size
            for index in range(off // cs, (end - 1) // cs + 1):
                if index in file.present:
                    continue
                start = index * cs
                if not (off <= start and end >= min(start + cs, max(file.size, end))):
                    self._materialize(file, index)
                file.present.add(index)
            view = memoryview(data)
            done = 0
            while done < len(view):
                done += os.pwrite(file.fd, view[done:], off + done)
            if end > file.size:
                file.size = end
            file.dirty = True
            file.generation += 1
            file.mtime_ns = time.time_ns()
        return len(data)

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
        if length <= 0 or start >= min(file.base.size, file.base_limit):
            return  # only zeros there: the sparse staging file already reads as zeros
        buf = bytearray(length)
        self._read_base(file, memoryview(buf), start)
        os.pwrite(file.fd, buf, start)

    def truncate(self, ino: int, size: int, fh: int | None = None) -> Attrs | None:
        """Set the size of ``ino``; the new attributes if committed.

        Through a handle (``ftruncate``, ``open(O_TRUNC)``) the change waits for the
        handle's commit like its writes, so other nodes never see the file emptied
        half-way through a rewrite; by path it is committed at once.
        """
        handle = self._handles.get(fh) if fh is not None else None
        if handle is not None:
            with handle.file.lock:
                self._truncate_locked(handle.file, size)
            return None
        attrs = self.call(self.ns.getattr(ino))
        file = self._acquire(ino, manifest_of(attrs, self.chunk_size))
        try:
            with file.lock:
                file.refresh(manifest_of(attrs, self.chunk_size))
                self._truncate_locked(file, size)
            return self.commit(file)
        finally:
            self._drop(file)

    def _truncate_locked(self, file: OpenFile, size: int) -> None:
        if size == file.size:
            return
        file.base_limit = min(file.base_limit, size)
        file.size = size
        if file.fd >= 0:
            os.ftruncate(file.fd, size)
            cs = file.chunk_size
            file.present = {i for i in file.present if i * cs < size}
        file.dirty = True
        file.generation += 1
        file.mtime_ns = time.time_ns()

    # --- commit ----------------------------------------------------------------------------
    def commit(self, file: OpenFile) -> Attrs | None:
        """Write the changed chunks and commit the manifest; ``None`` if nothing changed."""
        with file.lock:
            if not file.dirty:
                return None
            manifest, changed = self._build(file)
            try:
                attrs = self._commit_manifest(file, manifest, changed)
            except NotFound:
                # Unlinked (and gone) meanwhile: like a local file, the content goes with it.
                log.info("inode %d vanished before its commit; changes discarded", file.ino)
                file.dirty = False
                file.close_staging()
                return None
            file.base = manifest_of(attrs, self.chunk_size)
            file.attrs = attrs
            file.version = attrs.version
            file.size = file.base_limit = file.base.size
            file.dirty = False
            file.close_staging()
            return attrs

    def _build(self, file: OpenFile) -> tuple[Manifest, set[int]]:
        """The new manifest: reused base chunks plus hashed and stored changed ones."""
        cs = file.chunk_size
        base = file.base
        limit = min(base.size, file.base_limit)
        same_layout = base.lengths is None and base.chunk_size == cs
        chunks: list[str] = []
        changed: set[int] = set()
        batch: list[tuple[str, bytes | bytearray]] = []
        storing: list[concurrent.futures.Future[None]] = []
        for index in range(-(-file.size // cs)):
            start = index * cs
            length = min(cs, file.size - start)
            if (
                index not in file.present
                and same_layout
                and index < len(base.chunks)
                and start + length <= limit
                and base.chunk_length(index) == length
            ):
                chunks.append(base.chunks[index])
                continue
            data = bytearray(length)
            if index in file.present:
                _pread_full(file.fd, memoryview(data), start)
            else:
                self._read_base(file, memoryview(data), start)
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

    def _store(self, batch: list[tuple[str, bytes | bytearray]]) -> concurrent.futures.Future[None]:
        """Start writing ``batch`` through the manager; the future of all of it."""
        unique = dict(batch)
        write = self.manager.write_chunk

        async def store_all() -> None:
            await asyncio.gather(*(write(name, data) for name, data in unique.items()))

        return asyncio.run_coroutine_threadsafe(store_all(), self.call.loop)

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

    def _commit_manifest(self, file: OpenFile, manifest: Manifest, changed: set[int]) -> Attrs:
        expected = file.version
        # Publish with the commit: the chunks only this node holds yet (on its NVMe, not in
        # S3) are recorded as located here in the commit's own transaction, so the other
        # nodes can find them as soon as the manifest is visible (no separate round trip).
        holder = self.manager.peer_id
        held = self.manager.unpublished([manifest.chunks[i] for i in sorted(changed)])
        if len(held) > MAX_LOCATION_BATCH:  # more than one commit carries: publish first
            self.call(self.manager.publish(held))  # best effort, as the records with a commit
            held = []
        extra: dict[str, Any] = {"holder": holder, "held": held} if held and holder else {}
        for _attempt in range(COMMIT_ATTEMPTS):
            try:
                attrs = self.call(
                    self.ns.commit_manifest(file.ino, manifest.to_json(), expected, **extra)
                )
                if extra:
                    self.manager.note_published(len(held))
                return attrs
            except Conflict:
                fresh = self.call(self.ns.getattr(file.ino))
                _merge(manifest, manifest_of(fresh, self.chunk_size), changed)
                expected = fresh.version
        raise Conflict(f"inode {file.ino}: manifest commit kept conflicting")


def _merge(ours: Manifest, theirs: Manifest, changed: set[int]) -> None:
    """Take ``theirs`` for every chunk this node did not change (same index, same length)."""
    if theirs.lengths is not None or theirs.chunk_size != ours.chunk_size:
        return
    for index in range(min(len(ours.chunks), len(theirs.chunks))):
        if index not in changed and theirs.chunk_length(index) == ours.chunk_length(index):
            ours.chunks[index] = theirs.chunks[index]
