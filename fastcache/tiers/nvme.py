"""Tier 1: content-addressed chunk files on the node's own disk, bounded by an LRU.

Layout: ``<nvme_dir>/chunks/<d[0:2]>/<d[2:4]>/<digest>``; ``staging/`` and ``journal/``
beside it belong to the manager and the FUSE layer. The index (digest → size, in LRU order)
lives in memory, is rebuilt by scanning the directory at open, and is guarded by one
``threading.Lock`` so FUSE threads (``read_into``) and the event loop (everything async)
can share it. Files appear by atomic rename, so a reader never sees half a chunk.

Invariants:
- a pinned chunk (not yet in S3) is never evicted; a write that cannot fit even after
  evicting every unpinned chunk raises ``TierFull``;
- ``used`` counts indexed chunks; space for a write in flight is reserved first, so
  concurrent writers never overshoot the capacity between them;
- nothing is evicted at open: pins are only known once the manager replays its journal,
  so an oversized cache shrinks on the next write instead;
- the hit path (``read_into``) keeps the last ``FD_CACHE`` chunk files open (an LRU of
  descriptors by digest), so a sequential reader does not open and close a chunk file for
  every 128 KiB request. A descriptor is closed only once no reader uses it (a reference
  count), so its number is never reused under a ``pread``; a chunk that leaves the index
  (evicted, deleted, corrupt) loses its descriptor too, and an open descriptor stays valid
  after the unlink, so eviction never breaks a reader mid-read.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import resource
import shutil
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastcache import chunks
from fastcache.chunks import Buffer, is_digest
from fastcache.config import CacheConfig
from fastcache.errors import (
    BadRequest,
    ChunkCorrupt,
    ChunkNotFound,
    TierFull,
    TierUnavailable,
)

log = logging.getLogger("fastcache.client.nvme")

_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
FD_CACHE = 1024  # chunk files kept open for the hit path (at most 1/8 of RLIMIT_NOFILE)
_O_READ = os.O_RDONLY | os.O_CLOEXEC


class _OpenChunk:
    """A cached descriptor of one chunk file and the readers using it right now."""

    __slots__ = ("dead", "fd", "users")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users = 0
        self.dead = False


def _tier_error(exc: OSError, what: str) -> Exception:
    """The domain error for an OS error on the NVMe tier (full or unavailable)."""
    if exc.errno in _FULL_ERRNOS:
        return TierFull(f"NVMe tier full while {what}: {exc.strerror or exc}")
    return TierUnavailable(f"NVMe tier failed while {what}: {exc}")


class NvmeTier:
    """The local chunk store: ``TierStorage`` (async) plus ``LocalChunkReader`` (sync)."""

    name = "nvme"

    def __init__(self, config: CacheConfig, *, max_workers: int | None = None) -> None:
        """Use ``await NvmeTier.open(config)``; the constructor does no I/O."""
        self.config = config
        self.root = Path(config.nvme_dir)
        self.chunk_dir = self.root / "chunks"
        self.capacity = config.nvme_capacity
        self.verify_reads = config.verify_cache
        self.direct = False
        self._lock = threading.Lock()
        self._index: OrderedDict[str, int] = OrderedDict()  # oldest first
        self._pinned: set[str] = set()
        self._fds: OrderedDict[str, _OpenChunk] = OrderedDict()  # oldest first
        self._fd_limit = _fd_budget()
        self._chunk_root = str(self.chunk_dir)
        self._used = 0
        self._reserved = 0
        self._hits = 0
        self._misses = 0
        self._bytes_read = 0
        self._bytes_written = 0
        self._evictions = 0
        self._corrupt = 0
        self._errors = 0
        workers = max_workers or min(32, 4 * (os.cpu_count() or 1))
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="nvme")
        self._closed = False

    # --- construction --------------------------------------------------------------------
    @classmethod
    async def open(cls, config: CacheConfig, *, max_workers: int | None = None) -> NvmeTier:
        """Create the directories, probe O_DIRECT once and rebuild the index from disk."""
        tier = cls(config, max_workers=max_workers)
        try:
            await tier._run(tier._open_sync)
        except BaseException:
            tier._pool.shutdown(wait=False)
            raise
        return tier

    def _open_sync(self) -> None:
        try:
            for d in (self.chunk_dir, self.staging_dir, self.journal_dir):
                d.mkdir(parents=True, exist_ok=True)
            self.direct = chunks.probe_direct(str(self.chunk_dir))
            entries = self._scan()
        except OSError as exc:
            raise _tier_error(exc, f"opening {self.root}") from exc
        entries.sort()
        with self._lock:
            for _, d, size in entries:
                self._index[d] = size
            self._used = sum(size for _, _, size in entries)
        log.info(
            "NVMe tier at %s: %d chunks, %d of %d bytes used, O_DIRECT %s",
            self.root,
            len(entries),
            self._used,
            self.capacity,
            "on" if self.direct else "off",
        )

    def _scan(self) -> list[tuple[int, str, int]]:
        """``(last use ns, digest, size)`` of every chunk file; stray temp files removed."""
        found: list[tuple[int, str, int]] = []
        for top in _listdir(self.chunk_dir):
            if not top.is_dir(follow_symlinks=False):
                continue
            for sub in _listdir(top.path):
                if not sub.is_dir(follow_symlinks=False):
                    continue
                for entry in _listdir(sub.path):
                    name = entry.name
                    if ".tmp." in name:
                        # a write cut short by a crash: never renamed, never indexed
                        try:
                            os.unlink(entry.path)
                        except FileNotFoundError:
                            pass
                        continue
                    if not (is_digest(name) and name[:2] == top.name and name[2:4] == sub.name):
                        continue
                    st = entry.stat(follow_symlinks=False)
                    found.append((max(st.st_atime_ns, st.st_mtime_ns), name, st.st_size))
        return found

    # --- paths ---------------------------------------------------------------------------
    @property
    def staging_dir(self) -> Path:
        """Per-handle staging files of the FUSE layer (same disk as the chunks)."""
        return self.root / "staging"

    @property
    def journal_dir(self) -> Path:
        """The manager's journal of uploads not yet in S3."""
        return self.root / "journal"

    def path_for(self, digest: str) -> str:
        if not is_digest(digest):
            raise BadRequest(f"not a chunk digest: {digest!r}")
        return f"{self._chunk_root}/{digest[0:2]}/{digest[2:4]}/{digest}"

    def _path(self, digest: str) -> str:
        """``path_for`` without validation: only for digests already in the index."""
        return f"{self._chunk_root}/{digest[0:2]}/{digest[2:4]}/{digest}"

    # --- the synchronous hit path (LocalChunkReader) --------------------------------------
    def read_into(self, digest: str, offset: int, out: memoryview) -> int | None:
        """Copy chunk bytes at ``offset`` into ``out``; ``None`` on a miss.

        Runs on the caller's thread (FUSE workers): no event loop, no hashing, no logging.
        One lock round finds the chunk, touches the LRU and takes its cached descriptor
        (opening it on first use), then one ``pread`` with the GIL released, then one lock
        round gives the descriptor back. With ``verify_reads`` the whole chunk is hashed
        first; a corrupt file is deleted and reported as a miss, so the caller refetches
        from a lower tier.
        """
        if self.verify_reads:
            return self._read_verified(digest, offset, out)
        lock = self._lock
        with lock:
            size = self._index.get(digest)
            if size is None:
                self._misses += 1
                return None
            self._index.move_to_end(digest)
            n = size - offset
            if n <= 0:
                self._hits += 1
                return 0
            if n >= len(out):
                n = len(out)
            else:
                out = out[:n]
            self._hits += 1
            self._bytes_read += n
            entry = self._fds.get(digest)
            if entry is not None:
                self._fds.move_to_end(digest)
                entry.users += 1
        if entry is None:
            entry = self._open_fd(digest)
            if entry is None:
                return None
        try:
            return chunks.pread_fd(entry.fd, offset, out)
        except OSError as exc:
            self._count_error()
            raise _tier_error(exc, f"reading chunk {digest}") from exc
        finally:
            with lock:
                entry.users -= 1
                close = entry.dead and entry.users == 0
            if close:
                os.close(entry.fd)

    def _open_fd(self, digest: str) -> _OpenChunk | None:
        """Open ``digest``'s file for the hit path and cache it (in use once); ``None`` if gone."""
        try:
            fd = os.open(self._path(digest), _O_READ)
        except FileNotFoundError:
            self._forget(digest)  # deleted or evicted under us: a miss after all
            return None
        except OSError as exc:
            self._count_error()
            raise _tier_error(exc, f"opening chunk {digest}") from exc
        closing: list[int] = []
        with self._lock:
            entry = self._fds.get(digest)
            if entry is None and digest in self._index:
                entry = self._fds[digest] = _OpenChunk(fd)
                while len(self._fds) > self._fd_limit:
                    closing.extend(_retire(self._fds.popitem(last=False)[1]))
            elif entry is None:  # it left the index meanwhile: read once through fd, uncached
                entry = _OpenChunk(fd)
                entry.dead = True
            else:
                closing.append(fd)  # another reader cached one first
            entry.users += 1
        for old in closing:
            os.close(old)
        return entry

    def _read_verified(self, digest: str, offset: int, out: memoryview) -> int | None:
        with self._lock:
            size = self._index.get(digest)
            if size is None:
                self._misses += 1
                return None
            self._index.move_to_end(digest)
            n = max(0, min(len(out), size - offset))
            self._hits += 1
            self._bytes_read += n
        path = self._path(digest)
        try:
            data = chunks.read_chunk_file(path)
            if chunks.digest(data) != digest:
                self._drop_corrupt(digest, path)
                return None
            out[:n] = memoryview(data)[offset : offset + n]
            return n
        except FileNotFoundError:
            self._forget(digest)  # deleted or evicted under us: a miss after all
            return None
        except OSError as exc:
            self._count_error()
            raise _tier_error(exc, f"reading chunk {digest}") from exc

    def __contains__(self, digest: object) -> bool:
        with self._lock:
            return digest in self._index

    def chunk_size(self, digest: str) -> int | None:
        """The chunk's size if cached (no I/O, no LRU touch)."""
        with self._lock:
            return self._index.get(digest)

    # --- TierStorage ---------------------------------------------------------------------
    async def read(self, digest: str) -> bytes:
        """The whole chunk, always verified: a mismatch deletes it and raises ``ChunkCorrupt``."""
        return await self._run(self._read_sync, digest)

    def _read_sync(self, digest: str) -> bytes:
        path = self.path_for(digest)
        with self._lock:
            if digest not in self._index:
                self._misses += 1
                raise ChunkNotFound(f"chunk {digest} not on NVMe")
            self._index.move_to_end(digest)
        try:
            data = chunks.read_chunk_file(path)
        except FileNotFoundError:
            self._forget(digest)
            with self._lock:
                self._misses += 1
            raise ChunkNotFound(f"chunk {digest} not on NVMe") from None
        except OSError as exc:
            self._count_error()
            raise _tier_error(exc, f"reading chunk {digest}") from exc
        if chunks.digest(data) != digest:
            self._drop_corrupt(digest, path)
            raise ChunkCorrupt(f"chunk {digest} on NVMe is corrupt; deleted")
        with self._lock:
            self._hits += 1
            self._bytes_read += len(data)
        return data

    async def write(self, digest: str, data: Buffer) -> None:
        """Store the chunk, evicting unpinned LRU chunks to make room; ``TierFull`` if not.

        The caller has hashed ``data`` (it named it); the tier does not hash it again.
        """
        await self._run(self._write_sync, digest, data)

    def _write_sync(self, digest: str, data: Buffer) -> None:
        path = self.path_for(digest)
        size = len(memoryview(data))
        victims = self._reserve(digest, size)
        if victims is None:
            return  # already cached: content addressing makes the rewrite a no-op
        try:
            self._unlink_all(victims)
            try:
                chunks.write_chunk_file(path, data, self.direct)
            except FileNotFoundError:
                os.makedirs(os.path.dirname(path), exist_ok=True)
                chunks.write_chunk_file(path, data, self.direct)
        except OSError as exc:
            with self._lock:
                self._reserved -= size
                self._errors += 1
            raise _tier_error(exc, f"writing chunk {digest}") from exc
        except BaseException:
            with self._lock:
                self._reserved -= size
            raise
        with self._lock:
            self._reserved -= size
            if digest not in self._index:  # a concurrent writer of the same chunk may win
                self._index[digest] = size
                self._used += size
            self._index.move_to_end(digest)
            self._bytes_written += size

    def _reserve(self, digest: str, size: int) -> list[tuple[str, int]] | None:
        """Reserve ``size`` bytes, choosing LRU victims; ``None`` if the chunk is cached."""
        with self._lock:
            if digest in self._index:
                self._index.move_to_end(digest)
                return None
            need = self._used + self._reserved + size - self.capacity
            victims: list[tuple[str, int]] = []
            closing: list[int] = []
            if need > 0:
                freed = 0
                for d, n in self._index.items():  # oldest first
                    if d in self._pinned:
                        continue
                    victims.append((d, n))
                    freed += n
                    if freed >= need:
                        break
                if freed < need:
                    raise TierFull(
                        f"NVMe tier full: {size} bytes do not fit in {self.capacity} "
                        f"({self._used} used, {len(self._pinned)} chunks pinned)"
                    )
                for d, n in victims:
                    del self._index[d]
                    self._used -= n
                    closing.extend(self._drop_fd_locked(d))
                self._evictions += len(victims)
            self._reserved += size
        for fd in closing:
            os.close(fd)
        return victims

    def _unlink_all(self, victims: list[tuple[str, int]]) -> None:
        for d, _ in victims:
            try:
                os.unlink(self.path_for(d))
            except FileNotFoundError:
                pass

    async def delete(self, digest: str) -> None:
        """Drop the chunk (its pin, if any, stays: the manager owns pins)."""
        path = self.path_for(digest)
        self._forget(digest)
        try:
            await self._run(_unlink_missing_ok, path)
        except OSError as exc:
            self._count_error()
            raise _tier_error(exc, f"deleting chunk {digest}") from exc

    async def exists(self, digest: str) -> bool:
        self.path_for(digest)  # validates
        return digest in self

    async def size(self, digest: str) -> int:
        self.path_for(digest)
        n = self.chunk_size(digest)
        if n is None:
            raise ChunkNotFound(f"chunk {digest} not on NVMe")
        return n

    # --- pins ----------------------------------------------------------------------------
    def pin(self, digest: str) -> None:
        """Never evict ``digest`` (it is not yet in S3). May precede the write."""
        with self._lock:
            self._pinned.add(digest)

    def unpin(self, digest: str) -> None:
        with self._lock:
            self._pinned.discard(digest)

    def pinned(self) -> set[str]:
        with self._lock:
            return set(self._pinned)

    # --- accounting ----------------------------------------------------------------------
    def digests(self) -> list[str]:
        """Cached digests, least recently used first."""
        with self._lock:
            return list(self._index)

    def usage(self) -> dict[str, int]:
        """For statfs: capacity, used, and free (also bounded by the disk's real free space)."""
        with self._lock:
            used = self._used + self._reserved
        free = max(0, self.capacity - used)
        try:
            free = min(free, shutil.disk_usage(self.chunk_dir).free)
        except OSError:
            pass
        return {"capacity": self.capacity, "used": used, "free": free}

    def stats(self) -> dict[str, Any]:
        with self._lock:
            return {
                "tier": self.name,
                "hits": self._hits,
                "misses": self._misses,
                "bytes_read": self._bytes_read,
                "bytes_written": self._bytes_written,
                "evictions": self._evictions,
                "corrupt": self._corrupt,
                "errors": self._errors,
                "used": self._used,
                "capacity": self.capacity,
                "chunks": len(self._index),
                "pinned": len(self._pinned),
                "direct": self.direct,
            }

    async def close(self) -> None:
        """Wait for in-flight file I/O, then stop the pool. Idempotent."""
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._pool.shutdown, True)
        self._close_fds()

    # --- internals -----------------------------------------------------------------------
    async def _run(self, fn: Any, *args: Any) -> Any:
        if self._closed:
            raise TierUnavailable("NVMe tier is closed")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _forget(self, digest: str) -> None:
        with self._lock:
            size = self._index.pop(digest, None)
            if size is not None:
                self._used -= size
            closing = self._drop_fd_locked(digest)
        for fd in closing:
            os.close(fd)

    def _drop_fd_locked(self, digest: str) -> list[int]:
        """Uncache ``digest``'s descriptor; the fds to close now (none while in use)."""
        entry = self._fds.pop(digest, None)
        return [] if entry is None else _retire(entry)

    def _close_fds(self) -> None:
        with self._lock:
            closing = [fd for entry in self._fds.values() for fd in _retire(entry)]
            self._fds.clear()
        for fd in closing:
            os.close(fd)

    def _drop_corrupt(self, digest: str, path: str) -> None:
        log.warning("chunk %s on NVMe is corrupt: deleted, will be refetched", digest)
        self._forget(digest)
        with self._lock:
            self._corrupt += 1
        try:
            _unlink_missing_ok(path)
        except OSError as exc:  # unindexed now either way; the next write replaces it
            log.warning("could not delete corrupt chunk %s: %s", path, exc)

    def _count_error(self) -> None:
        with self._lock:
            self._errors += 1


def _fd_budget() -> int:
    """How many chunk descriptors the hit path may keep open in this process."""
    try:
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (OSError, ValueError):
        soft = 1024
    if soft == resource.RLIM_INFINITY:
        return FD_CACHE
    return max(16, min(FD_CACHE, soft // 8))


def _retire(entry: _OpenChunk) -> list[int]:
    """Mark a cached descriptor dead; its fd if nobody reads through it (else the last does)."""
    entry.dead = True
    return [entry.fd] if entry.users == 0 else []


def _unlink_missing_ok(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _listdir(path: str | os.PathLike[str]) -> list[os.DirEntry[str]]:
    with os.scandir(path) as it:
        return list(it)
