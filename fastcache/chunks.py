"""The Python face of the compiled hot path: chunk splitting, xxh3 digests, chunk-file I/O.

This is the only module that imports ``fastcache._chunker``, ``_xxh`` and ``_nvme``. When an
extension is missing (or ``FASTCACHE_NO_EXT=1``) a pure-Python fallback is used where one is
cheap; the fallbacks define the semantics the compiled code must match bit for bit.

Boundaries are a numpy ``uint64`` array of chunk *end* offsets: the last equals the input
length, an empty input has none.
"""

from __future__ import annotations

import contextlib
import itertools
import mmap
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import xxhash

from fastcache.config import no_extensions
from fastcache.coordinator.model import validate_manifest

Buffer = bytes | bytearray | memoryview
DIGEST_LEN = 32  # hex chars of an xxh3-128 digest
EXT_API_VERSION = 2

_chunker: Any = None
_xxh: Any = None
_nvme: Any = None
if not no_extensions():
    try:
        from fastcache import _chunker, _nvme, _xxh  # type: ignore[no-redef]

        for _mod in (_chunker, _xxh, _nvme):
            if getattr(_mod, "API_VERSION", None) != EXT_API_VERSION:
                raise ImportError(f"stale build of {_mod.__name__}: run `make build`")
    except ImportError:
        _chunker = _xxh = _nvme = None

HAVE_EXT = _xxh is not None


# --- hashing -----------------------------------------------------------------------------
# The ``_py`` functions are the pure-Python fallbacks: tests compare them with the compiled
# ones directly, whichever the process chose.
def _digest_py(data: Buffer) -> str:
    return xxhash.xxh3_128_hexdigest(data)


def _xxh64_py(data: Buffer) -> int:
    return xxhash.xxh3_64_intdigest(data)


def _digest_chunks_py(data: Buffer, ends: np.ndarray | Sequence[int]) -> list[str]:
    view = memoryview(data)
    out, start = [], 0
    for end in ends:
        out.append(xxhash.xxh3_128_hexdigest(view[start : int(end)]))
        start = int(end)
    return out


def digest(data: Buffer) -> str:
    """Hex xxh3-128 of ``data``: a chunk's name in every tier."""
    if _xxh is not None:
        return _xxh.xxh3_128_hex(data)
    return _digest_py(data)


def xxh64(data: Buffer) -> int:
    """xxh3-64 of ``data`` (used for cheap checksums, e.g. journal records)."""
    if _xxh is not None:
        return _xxh.xxh3_64(data)
    return _xxh64_py(data)


def digest_chunks(data: Buffer, ends: np.ndarray | Sequence[int]) -> list[str]:
    """The digest of every chunk of ``data`` cut at ``ends`` (one call, GIL released)."""
    if _xxh is not None:
        return _xxh.xxh3_128_hex_many(data, np.ascontiguousarray(ends, dtype=np.uint64))
    return _digest_chunks_py(data, ends)


def is_digest(text: str) -> bool:
    return len(text) == DIGEST_LEN and all(c in "0123456789abcdef" for c in text)


# --- splitting ---------------------------------------------------------------------------
def _split_fixed_py(length: int, chunk_size: int) -> np.ndarray:
    if length <= 0:
        return np.empty(0, dtype=np.uint64)
    ends = np.arange(chunk_size, length, chunk_size, dtype=np.uint64)
    return np.append(ends, np.uint64(length))


def split_fixed(length: int, chunk_size: int) -> np.ndarray:
    """End offsets of fixed-size chunks covering ``length`` bytes."""
    if _chunker is not None:
        return _chunker.fixed(length, chunk_size)
    return _split_fixed_py(length, chunk_size)


@dataclass(frozen=True)
class CdcParams:
    """FastCDC sizes. ``avg`` must be a power of two; defaults derive from it."""

    avg: int
    min: int = 0
    max: int = 0

    @classmethod
    def for_average(cls, avg: int) -> CdcParams:
        return cls(avg=avg, min=max(64, avg // 4), max=avg * 4)

    def __post_init__(self) -> None:
        if self.avg & (self.avg - 1) or self.avg < 256:
            raise ValueError("CDC average size must be a power of two >= 256")
        if not 0 < self.min <= self.avg <= self.max:
            raise ValueError("CDC sizes must satisfy 0 < min <= avg <= max")


def split_cdc(data: Buffer, params: CdcParams, final: bool = True) -> np.ndarray:
    """Content-defined (FastCDC, normalised) end offsets of ``data``.

    With ``final=False`` the tail after the last cut is left out, so a streaming caller can
    carry it into the next buffer.
    """
    if _chunker is None:
        raise RuntimeError("content-defined chunking needs the compiled extension: make build")
    return _chunker.fastcdc(data, params.min, params.avg, params.max, final)


Chunking = int | CdcParams  # a fixed chunk size in bytes, or FastCDC sizes


def split(data: Buffer, chunking: Chunking) -> np.ndarray:
    """End offsets of ``data`` cut by ``chunking`` (a fixed size or ``CdcParams``)."""
    if isinstance(chunking, CdcParams):
        return split_cdc(data, chunking)
    return split_fixed(memoryview(data).nbytes, chunking)


# Gear constants of the compiled FastCDC: splitmix64 from this seed (ext/chunker.pyx).
_GEAR_SEED = 0x6661737463616368
_M64 = (1 << 64) - 1


def _gear_table_py() -> list[int]:
    state, table = _GEAR_SEED, []
    for _ in range(256):
        state = (state + 0x9E3779B97F4A7C15) & _M64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _M64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _M64
        table.append(z ^ (z >> 31))
    return table


def _fastcdc_py(data: Buffer, params: CdcParams, final: bool = True) -> np.ndarray:
    """The reference FastCDC the compiled kernel must match: slow, for tests only."""
    gear = _gear_table_py()
    bits = params.avg.bit_length() - 1
    mask_s = (_M64 << (64 - bits - 2)) & _M64
    mask_l = (_M64 << (64 - bits + 2)) & _M64
    buf = bytes(data)
    ends: list[int] = []
    pos = 0
    while pos < len(buf):
        n = len(buf) - pos
        if n <= params.min:
            if final:
                ends.append(pos + n)
            break
        limit = min(n, params.max)
        normal = min(params.avg, limit)
        h, cut, i = 0, 0, params.min
        while i < limit and not cut:
            h = ((h << 1) + gear[buf[pos + i]]) & _M64
            i += 1
            if h & (mask_s if i <= normal else mask_l) == 0:
                cut = i
        if not cut:
            if n >= params.max:
                cut = params.max
            elif final:
                cut = n
            else:
                break
        pos += cut
        ends.append(pos)
    return np.array(ends, dtype=np.uint64)


class StreamChunker:
    """Cut a byte stream into the same chunks as one-shot splitting, fed piece by piece.

    ``chunking`` is a fixed chunk size in bytes or ``CdcParams``. ``feed(data)`` returns the
    chunks completed so far and ``finish()`` the last one (shorter, possibly). A chunk is a
    ``memoryview`` into the ``data`` just fed when it lies wholly inside it (do not modify
    that buffer while you use the chunk), else ``bytes``. Memory held between calls: one
    partial chunk, under ``max`` (CDC) or ``chunk_size`` (fixed) bytes.
    """

    def __init__(self, chunking: Chunking) -> None:
        if isinstance(chunking, CdcParams):
            self._limit = chunking.max
        elif isinstance(chunking, int) and not isinstance(chunking, bool) and chunking > 0:
            self._limit = chunking
        else:
            raise ValueError(f"chunking must be a positive size or CdcParams, not {chunking!r}")
        self.chunking: Chunking = chunking
        self._carry = bytearray()
        self._finished = False

    @classmethod
    def for_config(cls, chunking: str, chunk_size: int) -> StreamChunker:
        """From ``CacheConfig.chunking`` (``"fixed"`` or ``"cdc"``) and ``chunk_size``.

        For ``"cdc"`` the chunk size is the average (``CdcParams.for_average``).
        """
        if chunking == "cdc":
            return cls(CdcParams.for_average(chunk_size))
        if chunking == "fixed":
            return cls(chunk_size)
        raise ValueError(f"chunking must be 'fixed' or 'cdc', not {chunking!r}")

    @property
    def buffered(self) -> int:
        """Bytes held back: the start of the next chunk."""
        return len(self._carry)

    def _ends(self, data: Buffer, final: bool) -> np.ndarray:
        if isinstance(self.chunking, CdcParams):
            return split_cdc(data, self.chunking, final)
        length = memoryview(data).nbytes
        ends = split_fixed(length, self.chunking)
        if not final and length % self.chunking:
            ends = ends[:-1]
        return ends

    def feed(self, data: Buffer) -> list[memoryview | bytes]:
        """The chunks that ``data`` completes, in order."""
        if self._finished:
            raise RuntimeError("feed() after finish()")
        view = memoryview(data)
        if view.ndim != 1 or view.format != "B":
            view = view.cast("B")
        out: list[memoryview | bytes] = []
        if not view.nbytes:
            return out
        if self._carry:
            # The pending chunk ends within ``limit`` bytes of its start: top it up that far.
            held = len(self._carry)
            self._carry += view[: self._limit - held]
            ends = self._ends(self._carry, final=False)
            if not len(ends):
                return out  # everything fed is now held (the carry is still under limit)
            first = int(ends[0])
            with memoryview(self._carry) as carry:
                out.append(bytes(carry[:first]))
            self._carry = bytearray()
            view = view[first - held :]
        start = 0
        for end in self._ends(view, final=False).tolist():
            out.append(view[start:end])
            start = end
        self._carry += view[start:]
        return out

    def finish(self) -> list[memoryview | bytes]:
        """The remaining chunk(s) at end of stream; the chunker cannot be fed afterwards."""
        self._finished = True
        if not self._carry:
            return []
        tail = bytes(self._carry)
        self._carry = bytearray()
        out: list[memoryview | bytes] = []
        start = 0
        for end in self._ends(tail, final=True).tolist():
            out.append(tail[start:end])
            start = end
        return out


# --- manifests ---------------------------------------------------------------------------
@dataclass
class Manifest:
    """A file's content: its chunks in order. ``lengths`` is set only for CDC chunking."""

    size: int = 0
    chunk_size: int = 4 << 20
    chunks: list[str] = field(default_factory=list)
    lengths: list[int] | None = None
    version: int = 0

    def chunk_length(self, index: int) -> int:
        if self.lengths is not None:
            return self.lengths[index]
        return min(self.chunk_size, self.size - index * self.chunk_size)

    def offsets(self) -> list[int]:
        """Start offset of every chunk."""
        if self.lengths is None:
            return [i * self.chunk_size for i in range(len(self.chunks))]
        out, pos = [], 0
        for n in self.lengths:
            out.append(pos)
            pos += n
        return out

    def spans(self, offset: int, size: int) -> Iterator[tuple[int, int, int]]:
        """``(chunk index, offset in chunk, length)`` for each chunk overlapping the range."""
        end = min(offset + size, self.size)
        if offset >= end:
            return
        if self.lengths is None:
            index = offset // self.chunk_size
            while offset < end:
                start = index * self.chunk_size
                take = min(end, start + self.chunk_size) - offset
                yield index, offset - start, take
                offset += take
                index += 1
            return
        for index, start in enumerate(self.offsets()):
            length = self.lengths[index]
            if start + length <= offset:
                continue
            if start >= end:
                break
            lo = max(offset, start)
            hi = min(end, start + length)
            yield index, lo - start, hi - lo

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {
            "size": self.size,
            "chunk_size": self.chunk_size,
            "chunks": list(self.chunks),
        }
        if self.lengths is not None:
            doc["lengths"] = list(self.lengths)
        return doc

    @classmethod
    def from_json(cls, doc: Any, version: int = 0) -> Manifest:
        """Parse a manifest checked by ``validate_manifest``: malformed raises ``BadRequest``."""
        valid = validate_manifest(doc)
        return cls(
            size=valid["size"],
            chunk_size=valid["chunk_size"],
            chunks=valid["chunks"],
            lengths=valid.get("lengths"),
            version=version,
        )


# --- chunk-file I/O ----------------------------------------------------------------------
# Every function raises ``OSError`` with the C errno (``ENOSPC`` when the disk is full).
_tmp_counter = itertools.count()


def probe_direct(directory: str) -> bool:
    """Whether ``O_DIRECT`` works in ``directory`` (tmpfs answers EINVAL). Probe once per dir.

    False on tmpfs/ramfs too: Linux >= 6.6 accepts O_DIRECT there, but it buys nothing.
    """
    if _nvme is not None:
        return _nvme.probe_direct(directory)
    return False


def _write_chunk_file_py(path: str, data: Buffer, sync: bool = False) -> None:
    tmp = f"{path}.tmp.{os.getpid()}.{next(_tmp_counter)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    try:
        try:
            view = memoryview(data).cast("B")
            while view:
                view = view[os.write(fd, view) :]
            if sync:
                os.fdatasync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if not sync:
        return
    dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(dfd)  # the rename itself survives a power cut
    finally:
        os.close(dfd)


def write_chunk_file(path: str, data: Buffer, direct: bool, sync: bool = False) -> None:
    """Write ``data`` to ``path`` atomically: a temp file beside it, (O_DIRECT), rename.

    A reader never sees a partial file. Not synced by default: the renamed file survives
    SIGKILL of the process (the page cache outlives it), not a power cut; ``sync=True`` adds
    fdatasync before the rename and a directory fsync after it. On failure the temp file
    is removed. ``direct`` on a filesystem that refuses O_DIRECT falls back to buffered.
    """
    if _nvme is not None:
        _nvme.write_file_atomic(path, data, direct, sync)
        return
    _write_chunk_file_py(path, data, sync)


def _pread_fd_py(fd: int, offset: int, out: bytearray | memoryview) -> int:
    view = memoryview(out).cast("B")
    total = 0
    while total < len(view):
        got = os.preadv(fd, [view[total:]], offset + total)
        if got == 0:
            break
        total += got
    return total


def _pread_into_py(path: str, offset: int, out: bytearray | memoryview) -> int:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return _pread_fd_py(fd, offset, out)
    finally:
        os.close(fd)


def pread_into(path: str, offset: int, out: bytearray | memoryview) -> int:
    """Read ``len(out)`` bytes at ``offset`` of ``path`` into ``out``; returns bytes read.

    Short only at end of file (0 at or past it). The GIL is released for open/pread/close.
    """
    if _nvme is not None:
        return _nvme.pread_into(path, offset, out)
    return _pread_into_py(path, offset, out)


def pread_fd(fd: int, offset: int, out: bytearray | memoryview) -> int:
    """As ``pread_into`` on an already open descriptor."""
    if _nvme is not None:
        return _nvme.pread_fd(fd, offset, out)
    return _pread_fd_py(fd, offset, out)


def _read_chunk_file_py(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def read_chunk_file(path: str) -> bytes:
    """The whole file at ``path``."""
    if _nvme is not None:
        return _nvme.read_file(path)
    return _read_chunk_file_py(path)


class MappedChunk(Protocol):
    """A read-only mapping of a chunk file: buffer protocol, ``len()``, ``close()``."""

    def __buffer__(self, flags: int, /) -> memoryview: ...

    def __len__(self) -> int: ...

    def close(self) -> None: ...

    def __enter__(self) -> MappedChunk: ...

    def __exit__(self, *exc_info: object) -> None: ...


def map_chunk_file(path: str) -> MappedChunk:
    """A read-only mmap of the whole file (for large sequential reads); ``close()`` it.

    ``memoryview(mapped)`` reads it without a copy; the file must not be truncated while
    mapped (chunk files never are).
    """
    if _nvme is not None:
        return _nvme.mmap_read(path)
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return _EmptyMapping()
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # type: ignore[return-value]


class _EmptyMapping(bytes):
    """``mmap`` cannot map an empty file: an empty, closeable stand-in."""

    def close(self) -> None:
        return None

    def __enter__(self) -> _EmptyMapping:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None


def aligned_buffer(size: int) -> Any:
    """A zeroed, writable buffer of ``size`` bytes at a 4096-aligned address (for O_DIRECT)."""
    if _nvme is not None:
        return _nvme.AlignedBuffer(size)
    return bytearray() if size == 0 else mmap.mmap(-1, size)


def seal(parts: Sequence[Buffer], size: int) -> memoryview:
    """A sequential writer's chunk: ``parts`` (``size`` bytes in all) copied once into a
    page-aligned buffer, written to NVMe with O_DIRECT from there (no copy into the page
    cache), returned read-only: nothing writes it again, so an upload may send it as is."""
    out = receive_buffer(size)
    pos = 0
    for part in parts:
        n = memoryview(part).nbytes
        out[pos : pos + n] = part
        pos += n
    if pos != size:
        raise ValueError(f"sealing {pos} bytes as a chunk of {size}")
    return out.toreadonly()


def page_aligned(data: Buffer) -> bool:
    """Whether ``data`` is a whole page-aligned buffer (``receive_buffer``, ``seal``): one
    O_DIRECT write takes it with no bounce copy."""
    if _nvme is None or not isinstance(data, memoryview):
        return False
    base = data.obj
    return isinstance(base, _nvme.AlignedBuffer) and len(base) == data.nbytes


def receive_buffer(size: int) -> memoryview:
    """``size`` writable bytes for a chunk received from the network, not zeroed (the
    receiver fills them whole), page-aligned when the compiled module is here: promoted to
    NVMe with O_DIRECT straight from where it was received, no bounce copy."""
    if _nvme is not None and size >= 4096:
        return memoryview(_nvme.AlignedBuffer(size, 4096, False))
    return memoryview(bytearray(size))
