"""Whole chunks read ahead of a sequential reader of one FUSE handle.

The kernel asks a FUSE 2 filesystem for at most 128 KiB at a time. A handle that has read
sequentially for ``STREAK`` requests in a row gets a ``ChunkStream``: the next ``DEPTH``
chunks that are on NVMe are read whole, one read each on the NVMe tier's pool
(``read_whole``) while the reader is still busy with the chunk before, and its requests
are answered with views of those buffers. Chunks not on NVMe are left to the fetches and
``RecentChunks``.

Through the page cache or around it: a file that fits in it (``fits_in_memory``) is read
through it, so its chunk files stay there for the readers that reach them later (an
O_DIRECT reader of the mount: each of its reads is a ``pread`` of a chunk file). A larger
file could not stay there anyway: it is read around it (O_DIRECT), which spares a copy
into the page cache and one out of it (a quarter of the client's CPU per GiB) and leaves
the page cache to the kernel's cache of the mount's own pages.

Memory: a stream holds at most ``DEPTH + 2`` chunk buffers (the chunk being read, the one
before it for requests the kernel's read-ahead sends out of order, and ``DEPTH`` ahead);
``StreamSlots`` bounds the streams of the node. A handle that finds no free slot, or that
seeks (its stream is closed), reads chunk files as before.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import CancelledError, Future

from fastcache.chunks import Manifest
from fastcache.errors import FastcacheError
from fastcache.tiers.base import LocalChunkStore

DEPTH = 2  # chunks read ahead of the one being read
STREAK = 8  # sequential requests in a row (1 MiB of 128 KiB reads) before a stream starts
STREAM_MEMORY = 256 << 20  # bytes of read-ahead buffers on the node, at most (all streams)

PAGE_CACHE_SHARE = 4  # a file larger than 1/4 of the RAM is read around the page cache

_NOTHING: Future[memoryview | None] = Future()
_NOTHING.set_result(None)  # a chunk not on NVMe (or a hole): nothing read ahead


def fits_in_memory(size: int) -> bool:
    """Whether a file of ``size`` bytes is read through the page cache (see above)."""
    return size <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // PAGE_CACHE_SHARE


class StreamSlots:
    """The node-wide bound on streams: ``STREAM_MEMORY`` bytes of chunk buffers."""

    def __init__(self, chunk_size: int) -> None:
        self.limit = max(1, STREAM_MEMORY // ((DEPTH + 2) * chunk_size))
        self._free = threading.BoundedSemaphore(self.limit)

    def take(self) -> bool:
        return self._free.acquire(blocking=False)

    def give(self) -> None:
        self._free.release()


class ChunkStream:
    """The chunks of ``manifest`` read whole ahead of one sequential reader. Thread-safe:
    the kernel's read-ahead sends a handle's requests to several FUSE workers at once."""

    def __init__(self, manifest: Manifest, nvme: LocalChunkStore, slots: StreamSlots) -> None:
        self._manifest = manifest
        self._nvme = nvme
        self._slots = slots
        self.direct = not fits_in_memory(manifest.size)
        self._lock = threading.Lock()
        self._ahead: dict[int, Future[memoryview | None]] = {}
        self._current: tuple[int, memoryview | None] = (-1, None)
        self._closed = False

    def chunk(self, index: int) -> memoryview | None:
        """Chunk ``index`` whole if it was read ahead (waiting for its read if still in
        flight), else ``None``; reads the next ``DEPTH`` chunks ahead when the reader
        reaches a new one."""
        current = self._current  # one tuple: read atomically, no lock on the common path
        if current[0] == index:
            return current[1]
        with self._lock:
            if self._closed:
                return None
            future = self._ahead.get(index)
            for old in [i for i in self._ahead if i < index - 1]:
                del self._ahead[old]
            chunks = self._manifest.chunks
            for i in range(index + 1, min(index + 1 + DEPTH, len(chunks))):
                if i not in self._ahead:
                    self._ahead[i] = self._start(chunks[i])
        if future is None:
            return None
        try:
            data = future.result()
        except CancelledError:  # closed meanwhile (another request of the handle seeked)
            return None
        except FastcacheError:  # an NVMe error: the usual read path tries again and reports
            data = None
        if index > self._current[0]:
            self._current = (index, data)
        return data

    def _start(self, name: str) -> Future[memoryview | None]:
        if self._nvme.chunk_size(name) is None:  # not here (a hole never is): fetched instead
            return _NOTHING
        try:
            return self._nvme.read_whole_soon(name, self.direct)
        except RuntimeError:  # the tier's pool is shut down (closing): nothing ahead
            return _NOTHING

    def close(self) -> None:
        """Drop the buffers (views already handed out stay valid) and free the slot."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            for future in self._ahead.values():
                future.cancel()
            self._ahead.clear()
            self._current = (-1, None)
        self._slots.give()
