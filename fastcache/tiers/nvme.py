"""Tier 1: content-addressed chunk files on the node's own disk, bounded by an LRU.

Layout: ``<nvme_dir>/chunks/<d[0:2]>/<d[2:4]>/<digest>``; ``staging/`` and ``journal/``
beside it belong to the manager and the FUSE layer. The index (digest → size, in LRU order)
lives in memory, is rebuilt by scanning the directory at open, and is guarded by one
``threading.Lock`` so FUSE threads (``read_into``) and the event loop (everything async)
can share it. Files appear by atomic rename, so a reader never sees half a chunk.

Durability: chunk files are written to a temp file and renamed, never synced (DESIGN §1):
a chunk on NVMe survives SIGKILL of the process (the page cache outlives it), not a power
cut (S3 covers that at ``fsync``). So a power cut may leave chunk files short or zeroed. A
small state file (``nvme-state.json``) records the kernel boot id at open and whether the
last close was clean (synced first). When the tier opens after a reboot that followed an
unclean close, every indexed chunk is *unverified*: its first read (``read_into`` or
``read``) hashes the whole file and drops a bad one; then it is trusted. Verification is
lazy (nothing is hashed at open) and sticky across restarts until a clean close with no
chunk left unverified.

Capacity: the configured capacity is clamped at open to what the disk can hold (our chunks
plus the filesystem's free space, less a small reserve), and again whenever a write hits
``ENOSPC``: then unpinned LRU chunks are evicted and the write retried once.

Invariants:
- a pinned chunk (not yet in S3) is never evicted; a write that cannot fit even after
  evicting every unpinned chunk raises ``TierFull``;
- ``used`` counts indexed chunks; space for a write in flight is reserved first, so
  concurrent writers never overshoot the capacity between them;
- nothing is evicted at open: pins are only known once the manager replays its journal,
  so an oversized cache shrinks on the next write instead;
- the hit path (``read_into``) keeps the last ``FD_CACHE`` chunk files open (descriptors
  by digest, oldest opened first out), so a sequential reader does not open and close a
  chunk file for every 128 KiB request. A descriptor is closed only once no reader uses it
  (``_OpenChunk``), so its number is never reused under a ``pread``; a chunk that leaves the
  index (evicted, deleted, corrupt) loses its descriptor too, and an open descriptor stays
  valid after the unlink, so eviction never breaks a reader mid-read;
- the hit path takes no lock: it reads the index and the descriptors with single dict
  lookups (atomic under the GIL), marks the chunk used in ``_touched`` (applied to the LRU
  order under the lock before anything is evicted) and counts per thread (``PerThread``).
  Only opening a descriptor locks.

Verification, one policy for every path: a read that covers a whole chunk checks it against
its digest (``read``, and ``read_into`` from offset 0 with room for all of it: the client
API, small files through FUSE); a part of a chunk is not hashed (it cannot be without
reading the rest), except with ``--verify-cache`` or while the chunk is unverified after a
power cut. A mismatch deletes the file and reads as a miss, so the caller refetches it.
``read_whole`` (a sequential reader's read-ahead through FUSE, which then serves parts of
the chunk) follows the part rule.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import heapq
import json
import logging
import os
import resource
import shutil
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
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
from fastcache.tiers.counters import PerThread

log = logging.getLogger("fastcache.client.nvme")

_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
FD_CACHE = 1024  # chunk files kept open for the hit path (at most 1/8 of RLIMIT_NOFILE)
_O_READ = os.O_RDONLY | os.O_CLOEXEC
_HITS, _MISSES, _BYTES, _WHOLE = 0, 1, 2, 3  # PerThread slots of ``NvmeTier._reads``
_BLOCK = 4096  # O_DIRECT alignment of buffer addresses and lengths
STATE_FILE = "nvme-state.json"  # boot id at open, clean close, chunks left to verify
BOOT_ID_PATH = "/proc/sys/kernel/random/boot_id"
RESERVE_MAX = 1 << 30  # disk space never claimed by the clamp: max(chunk, 1% of disk), <= 1 GiB
# Chunk writes from a page-aligned buffer (a sequential writer's sealed chunk, a chunk
# received from S3) go O_DIRECT: the kernel's copy into the page cache cost 0.5-1.1 CPU-s
# per GiB in a bare write loop and was a quarter of the client's CPU under a `dd` through
# the mount; O_DIRECT from an aligned buffer costs 0.16-0.19. Other buffers are written
# through the page cache (an O_DIRECT write would first copy them to a bounce buffer; on
# this class of VM disk, buffered 1 GiB ran 340-660 MiB/s against O_DIRECT 280-660 with
# stalls up to 1.3 s), which also keeps them there for the hit path.


class _OpenChunk:
    """A cached descriptor of one chunk file and the readers using it right now.

    Lock-free: ``users`` holds one item per reader inside a ``pread`` and ``claim`` one
    token, taken by whoever closes the descriptor (``list.append``/``pop`` are atomic under
    the GIL). So it is closed exactly once, and only once it is retired and unused.
    """

    __slots__ = ("claim", "dead", "fd", "users")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.users: list[None] = []
        self.claim = [True]
        self.dead = False

    # A reader: ``users.append(None)``, then gives up if ``dead`` (retired meanwhile);
    # after its pread, ``leave()`` (``read_into`` inlines both).
    def leave(self) -> None:
        self.users.pop()
        if self.dead and not self.users:
            self.close_unused()

    def close_unused(self) -> None:
        """Close the retired descriptor, unless another caller claimed it first."""
        fd = self.take()
        if fd is not None:
            os.close(fd)

    def take(self) -> int | None:
        """The descriptor to close, for the one caller that claims it; else ``None``."""
        try:
            self.claim.pop()
        except IndexError:
            return None
        return self.fd


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
        self.configured_capacity = config.nvme_capacity
        self.capacity = config.nvme_capacity  # clamped to the disk at open and on ENOSPC
        self.verify_reads = config.verify_cache
        self.direct = False  # whether O_DIRECT works here (for page-aligned buffers)
        self.boot_id = ""
        self._lock = threading.Lock()
        self._index: OrderedDict[str, int] = OrderedDict()  # oldest first
        self._pinned: set[str] = set()
        self._unverified: set[str] = set()  # indexed, but maybe torn by a power cut
        self._clamp_logged = False
        self._fds: OrderedDict[str, _OpenChunk] = OrderedDict()  # oldest opened first
        self._touched: set[str] = set()  # read by the hit path since the LRU last heard
        self._fd_limit = _fd_budget()
        self._chunk_root = str(self.chunk_dir)
        self._used = 0
        self._reserved = 0
        self._reads = PerThread("hits", "misses", "bytes_read", "whole_reads")
        self._local = self._reads.local  # the hit path's own counters: .counts
        self._bytes_written = 0
        self._direct_writes = 0  # chunk files written with O_DIRECT
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
            prior = self._read_state()
            self.boot_id = _boot_id()
            entries = self._scan()
        except OSError as exc:
            raise _tier_error(exc, f"opening {self.root}") from exc
        entries.sort()
        suspect = bool(entries) and _suspect(prior, self.boot_id)
        with self._lock:
            for _, d, size in entries:
                self._index[d] = size
            self._used = sum(size for _, _, size in entries)
            if suspect:
                self._unverified = set(self._index)
        self._clamp_capacity(at_open=True)
        self._record_open()
        if suspect:
            log.warning(
                "NVMe tier at %s: last close was not clean before a reboot (or never "
                "recorded): %d chunks will be verified on first read",
                self.root,
                len(entries),
            )
        log.info(
            "NVMe tier at %s: %d chunks, %d of %d bytes used, O_DIRECT %s",
            self.root,
            len(entries),
            self._used,
            self.capacity,
            "available" if self.direct else "off",
        )

    # --- the state file: boot id and clean close ------------------------------------------
    @property
    def state_path(self) -> Path:
        return self.root / STATE_FILE

    def _read_state(self) -> dict[str, Any] | None:
        """The recorded state; ``None`` if there is none; ``{}`` if it is unreadable."""
        try:
            doc = json.loads(self.state_path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning(
                "NVMe state file %s is unreadable (%s): verifying chunks", self.state_path, exc
            )
            return {}
        return doc if isinstance(doc, dict) else {}

    def _write_state(self, *, clean: bool, verify: bool) -> None:
        doc = {"version": 1, "boot_id": self.boot_id, "clean": clean, "verify": verify}
        data = json.dumps(doc, sort_keys=True).encode() + b"\n"
        try:
            chunks.write_chunk_file(str(self.state_path), data, False, sync=True)
        except OSError as exc:
            if exc.errno not in _FULL_ERRNOS or not self.state_path.exists():
                raise
            # No room for a temp file on a full disk: overwrite in place (its block is
            # already allocated). A torn record is unreadable, which only means "verify".
            fd = os.open(self.state_path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.pwrite(fd, data, 0)
                os.ftruncate(fd, len(data))
                os.fsync(fd)
            finally:
                os.close(fd)

    def _record_open(self) -> None:
        """Record this boot and "not closed cleanly" before any unsynced chunk write."""
        with self._lock:
            verify = bool(self._unverified)
        try:
            self._write_state(clean=False, verify=verify)
        except OSError as exc:
            # A stale "clean" record must not outlive this open: without a state file every
            # chunk is verified at the next open, which is safe.
            log.warning("cannot record NVMe state in %s: %s", self.state_path, exc)
            try:
                _unlink_missing_ok(str(self.state_path))
            except OSError as exc2:
                raise _tier_error(exc2, f"recording state in {self.state_path}") from exc2

    def _record_clean_close(self) -> None:
        """Flush every chunk to the disk, then record a clean close (after the pool stopped)."""
        with self._lock:
            verify = bool(self._unverified)
        try:
            _syncfs(str(self.chunk_dir))
            self._write_state(clean=True, verify=verify)
        except OSError as exc:
            log.warning("NVMe tier at %s not closed cleanly: %s", self.root, exc)

    # --- capacity ------------------------------------------------------------------------
    def _reserve_bytes(self, total: int) -> int:
        return max(self.config.chunk_size, min(total // 100, RESERVE_MAX))

    def _clamp_capacity(self, *, at_open: bool = False) -> int:
        """Clamp ``capacity`` to our chunks plus the disk's free space less the reserve."""
        try:
            du = shutil.disk_usage(self.root)
        except OSError as exc:
            log.warning("cannot measure free space of %s: %s", self.root, exc)
            return self.capacity
        reserve = self._reserve_bytes(du.total)
        with self._lock:
            fit = max(0, self._used + du.free - reserve)
            old = self.capacity
            self.capacity = min(self.configured_capacity, fit)
            cap = self.capacity
        if cap < self.configured_capacity and (at_open or cap < old) and not self._clamp_logged:
            self._clamp_logged = True
            log.info(
                "NVMe capacity %d clamped to %d bytes: the disk at %s has %d bytes free "
                "(%d kept in reserve)",
                self.configured_capacity,
                cap,
                self.root,
                du.free,
                reserve,
            )
        return cap

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

        Runs on the caller's thread (FUSE workers): no event loop, no logging, no lock
        (see the module docstring), one ``pread`` with the GIL released. A read of the whole
        chunk is verified (one policy with ``read``): a corrupt file is deleted and reported
        as a miss, so the caller refetches it from a lower tier. With ``verify_reads``, and
        for a chunk unverified since a power cut, a partial read hashes the whole chunk.
        """
        if self.verify_reads or (self._unverified and digest in self._unverified):
            return self._read_verified(digest, offset, out)
        try:
            counts = self._local.counts
        except AttributeError:
            counts = self._reads.mine()
        size = self._index.get(digest)
        if size is None:
            counts[_MISSES] += 1
            return None
        self._touched.add(digest)
        n = size - offset
        room = len(out)
        whole = offset == 0 and n <= room
        if n < room:
            if n <= 0:
                counts[_HITS] += 1
                return 0
            out = out[:n]
        entry = self._fds.get(digest)
        if entry is not None:  # _OpenChunk.enter, inlined
            users = entry.users
            users.append(None)
            if entry.dead:
                entry.leave()
                entry = None
        if entry is None:
            entry = self._open_fd(digest)
            if entry is None:
                counts[_MISSES] += 1
                return None
            users = entry.users
        try:
            n = chunks.pread_fd(entry.fd, offset, out)
        except OSError as exc:
            self._count_error()
            raise _tier_error(exc, f"reading chunk {digest}") from exc
        finally:
            users.pop()  # _OpenChunk.leave, inlined
            if entry.dead and not users:
                entry.close_unused()
        if whole and (n != size or chunks.digest(out[:n]) != digest):
            self._drop_corrupt(digest, self._path(digest))
            counts[_MISSES] += 1
            return None
        counts[_HITS] += 1
        counts[_BYTES] += n
        return n

    def read_whole_soon(self, digest: str, direct: bool) -> Future[memoryview | None]:
        """``read_whole`` on the tier's pool: a sequential reader's next chunk, read while it
        is still busy with this one. Callable from any thread."""
        return self._pool.submit(self.read_whole, digest, direct)

    def read_whole(self, digest: str, direct: bool) -> memoryview | None:
        """The whole chunk in a fresh page-aligned buffer, with one read; ``None`` if it is
        not here (or corrupt: deleted).

        For a sequential reader through FUSE (``mount.stream``), which then serves its
        requests from this buffer. ``direct``: read around the page cache (O_DIRECT, where
        the disk takes it): no copy into the page cache and out of it again, a quarter of a
        warm read's CPU, but the chunk is not in the page cache afterwards for the readers
        that reach the chunk files (O_DIRECT readers of the mount). Hashed only where a
        partial read is too (``--verify-cache``, unverified chunks): the reader still asks
        for parts of the chunk, and parts are not hashed.
        """
        counts = self._reads.mine()
        size = self._indexed(digest, counts)
        if size is None:
            return None
        path = self._path(digest)
        buf = chunks.receive_buffer(-(-max(size, 1) // _BLOCK) * _BLOCK)
        try:
            fd = os.open(path, _O_READ | (os.O_DIRECT if direct and self.direct else 0))
        except FileNotFoundError:
            self._forget(digest)  # deleted or evicted under us: a miss after all
            counts[_MISSES] += 1
            return None
        except OSError as exc:
            self._count_error()
            raise _tier_error(exc, f"opening chunk {digest}") from exc
        try:
            n = _read_direct(fd, buf)
        except OSError as exc:
            self._count_error()
            raise _tier_error(exc, f"reading chunk {digest}") from exc
        finally:
            os.close(fd)
        data = buf[:n]
        if n != size or (
            (self.verify_reads or digest in self._unverified) and chunks.digest(data) != digest
        ):
            self._drop_corrupt(digest, path)
            counts[_MISSES] += 1
            return None
        self._verified(digest)
        counts[_HITS] += 1
        counts[_BYTES] += n
        counts[_WHOLE] += 1
        return data

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
        with self._lock:  # entries in _fds are live under it: retiring needs the lock
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
            entry.users.append(None)
        for old in closing:
            os.close(old)
        return entry

    def _indexed(self, digest: str, counts: list[int]) -> int | None:
        """The chunk's size, marked used; ``None`` (a miss, counted) if it is not here."""
        size = self._index.get(digest)
        if size is None:
            counts[_MISSES] += 1
            return None
        self._touched.add(digest)
        return size

    def _read_verified(self, digest: str, offset: int, out: memoryview) -> int | None:
        counts = self._reads.mine()
        size = self._indexed(digest, counts)
        if size is None:
            return None
        n = max(0, min(len(out), size - offset))
        path = self._path(digest)
        try:
            data = chunks.read_chunk_file(path)
            if chunks.digest(data) != digest:
                self._drop_corrupt(digest, path)
                counts[_MISSES] += 1
                return None
            self._verified(digest)
            out[:n] = memoryview(data)[offset : offset + n]
            counts[_HITS] += 1
            counts[_BYTES] += n
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
        """The chunk's size if cached and trusted (no I/O, no LRU touch).

        ``None`` for a chunk not yet verified since a power cut too: read it with ``read``
        (which verifies) rather than sending the file as it is.
        """
        with self._lock:
            if digest in self._unverified:
                return None
            return self._index.get(digest)

    # --- TierStorage ---------------------------------------------------------------------
    async def read(self, digest: str) -> bytes:
        """The whole chunk, always verified: a mismatch deletes it and raises ``ChunkCorrupt``."""
        return await self._run(self._read_sync, digest)

    def _read_sync(self, digest: str) -> bytes:
        path = self.path_for(digest)
        counts = self._reads.mine()
        if digest not in self._index:
            counts[_MISSES] += 1
            raise ChunkNotFound(f"chunk {digest} not on NVMe")
        self._touched.add(digest)
        try:
            data = chunks.read_chunk_file(path)
        except FileNotFoundError:
            self._forget(digest)
            counts[_MISSES] += 1
            raise ChunkNotFound(f"chunk {digest} not on NVMe") from None
        except OSError as exc:
            self._count_error()
            raise _tier_error(exc, f"reading chunk {digest}") from exc
        if chunks.digest(data) != digest:
            self._drop_corrupt(digest, path)
            raise ChunkCorrupt(f"chunk {digest} on NVMe is corrupt; deleted")
        self._verified(digest)
        counts[_HITS] += 1
        counts[_BYTES] += len(data)
        return data

    async def write(self, digest: str, data: Buffer) -> None:
        """Store the chunk, evicting unpinned LRU chunks to make room; ``TierFull`` if not.

        The caller has hashed ``data`` (it named it); the tier does not hash it again.
        """
        await self._run(self._write_sync, digest, data, self.direct and chunks.page_aligned(data))

    async def promote(self, digest: str, data: Buffer) -> None:
        """``write`` of a verified chunk fetched from a lower tier, with O_DIRECT where the
        disk takes it: no copy into the page cache (a quarter of a cold read's CPU when
        buffered), none at all from a page-aligned buffer (``chunks.receive_buffer``). Its
        reader is served from memory meanwhile (``RecentChunks``), so a slow direct write
        holds nobody up."""
        await self._run(self._write_sync, digest, data, self.direct)

    def _write_sync(self, digest: str, data: Buffer, direct: bool) -> None:
        path = self.path_for(digest)
        size = memoryview(data).nbytes
        victims = self._reserve(digest, size)
        if victims is None:
            return  # already cached: content addressing makes the rewrite a no-op
        try:
            self._unlink_all(victims)
            try:
                self._write_file(path, data, direct)
            except OSError as exc:
                if exc.errno not in _FULL_ERRNOS:
                    raise
                # The disk is fuller than our accounting (other files, writes in flight):
                # shrink to what it holds now, evict, and try once more.
                self._unlink_all(self._make_room_after_enospc(size))
                self._write_file(path, data, direct)
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
            self._direct_writes += direct

    def _write_file(self, path: str, data: Buffer, direct: bool) -> None:
        try:
            chunks.write_chunk_file(path, data, direct)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            chunks.write_chunk_file(path, data, direct)

    def _reserve(self, digest: str, size: int) -> list[tuple[str, int]] | None:
        """Reserve ``size`` bytes, choosing LRU victims; ``None`` if the chunk is cached."""
        closing: list[int] = []
        with self._lock:
            if digest in self._index:
                if digest not in self._unverified:
                    self._index.move_to_end(digest)
                    return None
                # maybe torn by a power cut: the caller's bytes (it named them) replace it
                self._used -= self._index.pop(digest)
                self._unverified.discard(digest)
                closing.extend(self._drop_fd_locked(digest))
            need = self._used + self._reserved + size - self.capacity
            victims = self._pick_victims_locked(need)
            if victims is None:
                raise TierFull(
                    f"NVMe tier full: {size} bytes do not fit in {self.capacity} "
                    f"({self._used} used, {len(self._pinned)} chunks pinned)"
                )
            closing.extend(self._evict_locked(victims))
            self._reserved += size
        for fd in closing:
            os.close(fd)
        return victims

    def _pick_victims_locked(self, need: int) -> list[tuple[str, int]] | None:
        """Unpinned LRU chunks freeing at least ``need`` bytes; ``None`` if they cannot."""
        victims: list[tuple[str, int]] = []
        if need <= 0:
            return victims
        self._touch_locked()
        freed = 0
        for d, n in self._index.items():  # oldest first
            if d in self._pinned:
                continue
            victims.append((d, n))
            freed += n
            if freed >= need:
                return victims
        return None

    def _touch_locked(self) -> None:
        """Move the chunks the hit path read since last time to the LRU's recent end.

        A snapshot of ``_touched`` (copied and cleared by single C calls, so readers may go
        on adding): a touch added in between is lost, which only ages a chunk a little."""
        touched = list(self._touched)
        self._touched.difference_update(touched)
        index = self._index
        for d in touched:
            if d in index:
                index.move_to_end(d)

    def _evict_locked(self, victims: list[tuple[str, int]]) -> list[int]:
        """Take ``victims`` out of the index; the descriptors to close (outside the lock)."""
        closing: list[int] = []
        for d, n in victims:
            del self._index[d]
            self._used -= n
            self._unverified.discard(d)
            closing.extend(self._drop_fd_locked(d))
        self._evictions += len(victims)
        return closing

    def _make_room_after_enospc(self, size: int) -> list[tuple[str, int]]:
        """After ENOSPC for a reserved write of ``size``: re-clamp the capacity to the disk
        and evict unpinned LRU chunks to fit it (at least ``size`` bytes); the victims to
        unlink. ``TierFull`` (nothing evicted) if even evicting them all would not do."""
        cap = self._clamp_capacity()
        with self._lock:
            need = max(self._used + self._reserved - cap, size)
            victims = self._pick_victims_locked(need)
            if victims is None:
                raise TierFull(
                    f"NVMe disk at {self.root} is full: {size} bytes do not fit "
                    f"({self._used} used by chunks, {len(self._pinned)} chunks pinned)"
                )
            closing = self._evict_locked(victims)
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
        if n is None and digest in self:  # unverified since a power cut: verify it now
            try:
                return len(await self._run(self._read_sync, digest))
            except ChunkCorrupt:
                pass
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
            self._touch_locked()
            return list(self._index)

    def entries(self, after: str | None = None, limit: int = 1000) -> list[tuple[str, int, bool]]:
        """One page of what this node caches: ``(digest, size, pinned)`` in digest order,
        the digests greater than ``after`` (all from the start if ``None``), at most
        ``limit``. Pass the last digest of a page as ``after`` to get the next one.

        No I/O; the lock is held only to copy the index (O(n)), the page is picked outside
        it in O(n log limit).
        """
        if after is not None and not isinstance(after, str):
            raise BadRequest(f"not a chunk digest: {after!r}")
        if limit <= 0:
            return []
        with self._lock:
            items = list(self._index.items())
        if after is not None:
            items = [item for item in items if item[0] > after]
        page = heapq.nsmallest(limit, items) if len(items) > limit else sorted(items)
        with self._lock:
            pinned = self._pinned
            return [(d, n, d in pinned) for d, n in page]

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
        reads = self._reads.totals()
        with self._lock:
            return {
                "tier": self.name,
                "hits": reads["hits"],
                "misses": reads["misses"],
                "bytes_read": reads["bytes_read"],
                "whole_reads": reads["whole_reads"],
                "bytes_written": self._bytes_written,
                "evictions": self._evictions,
                "corrupt": self._corrupt,
                "errors": self._errors,
                "used": self._used,
                "capacity": self.capacity,
                "configured_capacity": self.configured_capacity,
                "chunks": len(self._index),
                "pinned": len(self._pinned),
                "unverified": len(self._unverified),
                "direct": self.direct,
                "direct_writes": self._direct_writes,
            }

    async def close(self) -> None:
        """Wait for in-flight file I/O, stop the pool, flush the chunks to the disk and
        record a clean close (so a reboot after it trusts them). Idempotent."""
        if self._closed:
            return
        self._closed = True
        await asyncio.to_thread(self._pool.shutdown, True)
        self._close_fds()
        await asyncio.to_thread(self._record_clean_close)

    # --- internals -----------------------------------------------------------------------
    async def _run(self, fn: Any, *args: Any) -> Any:
        if self._closed:
            raise TierUnavailable("NVMe tier is closed")
        return await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    def _verified(self, digest: str) -> None:
        if self._unverified:
            with self._lock:
                self._unverified.discard(digest)

    def _forget(self, digest: str) -> None:
        with self._lock:
            size = self._index.pop(digest, None)
            if size is not None:
                self._used -= size
            self._unverified.discard(digest)
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


def _read_direct(fd: int, buf: memoryview) -> int:
    """Fill ``buf`` from the start of ``fd`` (maybe O_DIRECT); short only at end of file.

    A direct read may stop at a block boundary (then the next one starts aligned) and stops
    at the end of the file, where the offset is no longer aligned: a short, unaligned
    read is the end."""
    done = 0
    while done < len(buf):
        got = os.preadv(fd, [buf[done:]], done)
        done += got
        if got == 0 or done % _BLOCK:
            break
    return done


def _boot_id() -> str:
    """The kernel's id of this boot ("" where there is none: then it never matches)."""
    try:
        with open(BOOT_ID_PATH, encoding="ascii") as f:
            return f.read().strip()
    except (OSError, ValueError):
        return ""


def _suspect(prior: dict[str, Any] | None, boot_id: str) -> bool:
    """Whether chunk files may be torn: no (or no readable) record of the last open, a
    record asking for verification still, or a reboot after an unclean close."""
    if not prior:
        return True
    if prior.get("verify") is not False:
        return True
    if not boot_id or prior.get("boot_id") != boot_id:
        return prior.get("clean") is not True
    return False


_libc: Any = None


def _syncfs(path: str) -> None:
    """Write back every dirty page of the filesystem holding ``path`` (``OSError`` if not)."""
    global _libc
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            if _libc is None:
                _libc = ctypes.CDLL(None, use_errno=True)
            syncfs = _libc.syncfs
        except (OSError, AttributeError):
            os.sync()  # no syncfs(2) here: sync everything
            return
        if syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), path)
    finally:
        os.close(fd)


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
    if entry.users:
        return []
    fd = entry.take()
    return [] if fd is None else [fd]


def _unlink_missing_ok(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _listdir(path: str | os.PathLike[str]) -> list[os.DirEntry[str]]:
    with os.scandir(path) as it:
        return list(it)
