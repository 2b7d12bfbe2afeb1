"""The Python face of the compiled hot path: chunk splitting, xxh3 digests, chunk-file I/O.

This is the only module that imports ``fastcache._chunker``, ``_xxh`` and ``_nvme``. When an
extension is missing (or ``FASTCACHE_NO_EXT=1``) a pure-Python fallback is used where one is
cheap; the fallbacks define the semantics the compiled code must match bit for bit.

Boundaries are a numpy ``uint64`` array of chunk *end* offsets: the last equals the input
length, an empty input has none.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import xxhash

from fastcache.config import no_extensions
from fastcache.errors import BadRequest

Buffer = bytes | bytearray | memoryview
DIGEST_LEN = 32  # hex chars of an xxh3-128 digest
EXT_API_VERSION = 1

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
def digest(data: Buffer) -> str:
    """Hex xxh3-128 of ``data``: a chunk's name in every tier."""
    if _xxh is not None:
        return _xxh.xxh3_128_hex(data)
    return xxhash.xxh3_128_hexdigest(data)


def xxh64(data: Buffer) -> int:
    """xxh3-64 of ``data`` (used for cheap checksums, e.g. journal records)."""
    if _xxh is not None:
        return _xxh.xxh3_64(data)
    return xxhash.xxh3_64_intdigest(data)


def digest_chunks(data: Buffer, ends: np.ndarray | Sequence[int]) -> list[str]:
    """The digest of every chunk of ``data`` cut at ``ends`` (one call, GIL released)."""
    if _xxh is not None:
        return _xxh.xxh3_128_hex_many(data, np.asarray(ends, dtype=np.uint64))
    view = memoryview(data)
    out, start = [], 0
    for end in ends:
        out.append(xxhash.xxh3_128_hexdigest(view[start : int(end)]))
        start = int(end)
    return out


def is_digest(text: str) -> bool:
    return len(text) == DIGEST_LEN and all(c in "0123456789abcdef" for c in text)


# --- splitting ---------------------------------------------------------------------------
def split_fixed(length: int, chunk_size: int) -> np.ndarray:
    """End offsets of fixed-size chunks covering ``length`` bytes."""
    if length <= 0:
        return np.empty(0, dtype=np.uint64)
    ends = np.arange(chunk_size, length, chunk_size, dtype=np.uint64)
    return np.append(ends, np.uint64(length))


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
        """Parse and validate; malformed input raises ``BadRequest``."""
        if not isinstance(doc, dict):
            raise BadRequest("manifest must be an object")
        size, chunk_size, chunks = doc.get("size"), doc.get("chunk_size"), doc.get("chunks")
        lengths = doc.get("lengths")
        if not isinstance(size, int) or isinstance(size, bool) or size < 0:
            raise BadRequest("manifest size must be a non-negative integer")
        if not isinstance(chunk_size, int) or isinstance(chunk_size, bool) or chunk_size <= 0:
            raise BadRequest("manifest chunk_size must be a positive integer")
        if not isinstance(chunks, list) or not all(
            isinstance(c, str) and is_digest(c) for c in chunks
        ):
            raise BadRequest("manifest chunks must be a list of 32-hex-char digests")
        if lengths is not None:
            if not isinstance(lengths, list) or not all(
                isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in lengths
            ):
                raise BadRequest("manifest lengths must be positive integers")
            if len(lengths) != len(chunks) or sum(lengths) != size:
                raise BadRequest("manifest lengths do not match its chunks and size")
        elif len(chunks) != math.ceil(size / chunk_size):
            raise BadRequest("manifest chunk count does not match its size")
        return cls(
            size=size,
            chunk_size=chunk_size,
            chunks=list(chunks),
            lengths=None if lengths is None else list(lengths),
            version=version,
        )


# --- chunk-file I/O ----------------------------------------------------------------------
def probe_direct(directory: str) -> bool:
    """Whether ``O_DIRECT`` works in ``directory`` (tmpfs answers EINVAL). Probe once per dir."""
    if _nvme is not None:
        return _nvme.probe_direct(directory)
    return False


def write_chunk_file(path: str, data: Buffer, direct: bool) -> None:
    """Write ``data`` to ``path`` atomically: temp file, (O_DIRECT), fdatasync, rename."""
    if _nvme is not None:
        _nvme.write_file_atomic(path, data, direct)
        return
    tmp = f"{path}.tmp.{os.getpid()}.{id(data)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fdatasync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, path)


def pread_into(path: str, offset: int, out: bytearray | memoryview) -> int:
    """Read ``len(out)`` bytes at ``offset`` of ``path`` into ``out``; returns bytes read."""
    if _nvme is not None:
        return _nvme.pread_into(path, offset, out)
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.preadv(fd, [out], offset)
    finally:
        os.close(fd)


def read_chunk_file(path: str) -> bytes:
    """The whole file at ``path``."""
    if _nvme is not None:
        return _nvme.read_file(path)
    with open(path, "rb") as f:
        return f.read()
