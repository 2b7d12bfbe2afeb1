# cython: boundscheck=False, wraparound=False, cdivision=True
"""Chunk boundaries: normalised FastCDC (gear hash, two masks) and fixed-size splitting.

Both return a numpy ``uint64`` array of chunk *end* offsets. The gear table is 256 64-bit
constants from splitmix64 with a fixed seed, so cut points are stable across builds and
machines (a golden hash in the tests pins them).

Cut rule, for a chunk starting at ``s`` with ``n`` bytes available after it:
  * the first ``min_size`` bytes are skipped (never hashed);
  * from ``s + min_size`` the gear hash ``h = (h << 1) + GEAR[byte]`` rolls, starting at 0;
    after byte ``s + i - 1`` is added the chunk may end with length ``i``;
  * below ``avg_size`` the chunk ends when ``h & mask_s == 0`` (log2(avg) + 2 top bits: hard),
    from ``avg_size`` on when ``h & mask_l == 0`` (log2(avg) - 2 top bits: easy);
  * at ``max_size`` the chunk is cut whatever the hash (a forced cut);
  * what is left at the end of the input is the last chunk when ``final``, else left out.
A cut depends only on the bytes from the chunk's start to the cut, so a streaming caller
that carries the tail into the next buffer gets exactly the one-shot cut points.
"""

import numpy as np

from libc.stdint cimport uint64_t

API_VERSION = 2

cdef uint64_t GEAR_SEED = 0x6661737463616368ULL  # b"fastcach"
cdef uint64_t GEAR[256]


cdef void _init_gear() noexcept nogil:
    cdef uint64_t state = GEAR_SEED
    cdef uint64_t z
    cdef int i
    for i in range(256):
        state += 0x9E3779B97F4A7C15ULL
        z = state
        z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL
        z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL
        GEAR[i] = z ^ (z >> 31)


_init_gear()


cdef inline uint64_t _top_mask(int bits) noexcept nogil:
    return (~<uint64_t>0) << (64 - bits)


cdef size_t _cut(
    const unsigned char *p,
    size_t n,
    size_t min_size,
    size_t avg_size,
    size_t max_size,
    uint64_t mask_s,
    uint64_t mask_l,
    bint final,
) noexcept nogil:
    """Length of the chunk at ``p`` (``n`` bytes available); 0 when more data is needed."""
    cdef size_t limit, normal, i
    cdef uint64_t h = 0
    if n <= min_size:
        return n if final else 0
    limit = n if n < max_size else max_size
    normal = avg_size if avg_size < limit else limit
    i = min_size
    while i < normal:
        h = (h << 1) + GEAR[p[i]]
        i += 1
        if (h & mask_s) == 0:
            return i
    while i < limit:
        h = (h << 1) + GEAR[p[i]]
        i += 1
        if (h & mask_l) == 0:
            return i
    if n >= max_size:
        return max_size
    return n if final else 0


def gear_table():
    """The 256 gear constants (for tests and the pure-Python reference)."""
    out = np.empty(256, dtype=np.uint64)
    cdef uint64_t[::1] view = out
    cdef int i
    for i in range(256):
        view[i] = GEAR[i]
    return out


def fastcdc(
    const unsigned char[::1] buf,
    Py_ssize_t min_size,
    Py_ssize_t avg_size,
    Py_ssize_t max_size,
    bint final=True,
):
    """End offsets of the normalised-FastCDC chunks of ``buf`` (numpy ``uint64``).

    With ``final=False`` the tail after the last cut is left out (a cut forced by
    ``max_size`` still counts), so a streaming caller can carry it into the next buffer.
    """
    cdef int bits = 0
    if avg_size < 64 or avg_size & (avg_size - 1):
        raise ValueError(f"avg_size must be a power of two >= 64, not {avg_size}")
    if not 0 < min_size <= avg_size <= max_size:
        raise ValueError("sizes must satisfy 0 < min_size <= avg_size <= max_size")
    while (<Py_ssize_t>1 << bits) < avg_size:
        bits += 1
    if bits > 60:
        raise ValueError(f"avg_size too large: {avg_size}")
    cdef uint64_t mask_s = _top_mask(bits + 2)
    cdef uint64_t mask_l = _top_mask(bits - 2)
    cdef size_t n = <size_t>buf.shape[0]
    cdef size_t cap = n // <size_t>min_size + 1
    out = np.empty(cap, dtype=np.uint64)
    cdef uint64_t[::1] ends = out
    cdef const unsigned char *p = &buf[0]
    cdef size_t pos = 0, count = 0, length
    with nogil:
        while pos < n:
            length = _cut(
                p + pos, n - pos, <size_t>min_size, <size_t>avg_size, <size_t>max_size,
                mask_s, mask_l, final,
            )
            if length == 0:
                break
            pos += length
            ends[count] = pos
            count += 1
    if count * 2 < cap:
        return out[:count].copy()
    return out[:count]


def fixed(Py_ssize_t length, Py_ssize_t chunk_size):
    """End offsets of fixed-size chunks covering ``length`` bytes (as ``chunks.split_fixed``)."""
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be positive, not {chunk_size}")
    if length <= 0:
        return np.empty(0, dtype=np.uint64)
    cdef Py_ssize_t count = (length + chunk_size - 1) // chunk_size
    out = np.empty(count, dtype=np.uint64)
    cdef uint64_t[::1] ends = out
    cdef Py_ssize_t i
    with nogil:
        for i in range(count - 1):
            ends[i] = <uint64_t>((i + 1) * chunk_size)
        ends[count - 1] = <uint64_t>length
    return out
