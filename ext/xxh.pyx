# cython: boundscheck=False, wraparound=False, cdivision=True
"""xxh3 digests over the C xxHash library, with the GIL released.

Inputs are typed ``const unsigned char[::1]``: bytes, bytearray, contiguous memoryviews,
mmap objects and ``uint8`` numpy arrays are hashed in place, never copied.
"""

from libc.stdint cimport uint64_t
from libc.stdlib cimport free, malloc

API_VERSION = 2

# Below this many bytes, releasing and re-taking the GIL costs more than the hash itself.
cdef enum:
    NOGIL_THRESHOLD = 16384


cdef extern from "xxhash.h" nogil:
    ctypedef unsigned long long XXH64_hash_t

    ctypedef struct XXH128_hash_t:
        XXH64_hash_t low64
        XXH64_hash_t high64

    ctypedef struct XXH128_canonical_t:
        unsigned char digest[16]

    void XXH128_canonicalFromHash(XXH128_canonical_t *dst, XXH128_hash_t h)


cdef extern from "fc_xxhash.h" nogil:
    XXH64_hash_t XXH3_64bits "fc_xxh3_64"(const void *data, size_t length)
    XXH128_hash_t XXH3_128bits "fc_xxh3_128"(const void *data, size_t length)


cdef const char *HEXDIGITS = b"0123456789abcdef"


cdef inline const unsigned char *_ptr(const unsigned char[::1] buf) noexcept nogil:
    # boundscheck is off: &buf[0] is the base pointer even for an empty view.
    return &buf[0]


cdef inline XXH128_hash_t _hash128(const unsigned char[::1] buf):
    cdef size_t n = <size_t>buf.shape[0]
    cdef const unsigned char *p = _ptr(buf)
    cdef XXH128_hash_t h
    if n >= NOGIL_THRESHOLD:
        with nogil:
            h = XXH3_128bits(p, n)
    else:
        h = XXH3_128bits(p, n)
    return h


cdef inline void _hex(XXH128_hash_t h, char *out) noexcept nogil:
    cdef XXH128_canonical_t canon
    cdef int i
    XXH128_canonicalFromHash(&canon, h)
    for i in range(16):
        out[2 * i] = HEXDIGITS[canon.digest[i] >> 4]
        out[2 * i + 1] = HEXDIGITS[canon.digest[i] & 15]


def xxh3_128_hex(const unsigned char[::1] buf) -> str:
    """Lowercase hex of the big-endian canonical xxh3-128 (as ``xxhash.xxh3_128_hexdigest``)."""
    cdef char out[32]
    _hex(_hash128(buf), out)
    return out[:32].decode("ascii")


def xxh3_128_digest(const unsigned char[::1] buf) -> bytes:
    """The 16-byte big-endian canonical xxh3-128 (as ``xxhash.xxh3_128_digest``)."""
    cdef XXH128_canonical_t canon
    XXH128_canonicalFromHash(&canon, _hash128(buf))
    return (<char *>canon.digest)[:16]


def xxh3_64(const unsigned char[::1] buf) -> int:
    """xxh3-64 with seed 0 (as ``xxhash.xxh3_64_intdigest``)."""
    cdef size_t n = <size_t>buf.shape[0]
    cdef const unsigned char *p = _ptr(buf)
    cdef XXH64_hash_t h
    if n >= NOGIL_THRESHOLD:
        with nogil:
            h = XXH3_64bits(p, n)
    else:
        h = XXH3_64bits(p, n)
    return h


def xxh3_128_hex_many(const unsigned char[::1] buf, const uint64_t[::1] ends) -> list:
    """Hex xxh3-128 of every chunk ``buf[ends[i-1]:ends[i]]`` (the first starts at 0).

    All chunks are hashed in one pass with the GIL released. ``ends`` must be
    non-decreasing and within ``buf``.
    """
    cdef Py_ssize_t count = ends.shape[0]
    cdef Py_ssize_t i
    cdef uint64_t start = 0
    cdef uint64_t length = <uint64_t>buf.shape[0]
    cdef const unsigned char *p = _ptr(buf)
    cdef XXH128_hash_t *hashes
    cdef char out[32]
    for i in range(count):
        if ends[i] < start or ends[i] > length:
            raise ValueError(
                f"chunk end {ends[i]} at index {i} is out of order or beyond {length} bytes"
            )
        start = ends[i]
    if count == 0:
        return []
    hashes = <XXH128_hash_t *>malloc(<size_t>count * sizeof(XXH128_hash_t))
    if hashes == NULL:
        raise MemoryError()
    try:
        with nogil:
            start = 0
            for i in range(count):
                hashes[i] = XXH3_128bits(p + start, <size_t>(ends[i] - start))
                start = ends[i]
        result = [None] * count
        for i in range(count):
            _hex(hashes[i], out)
            result[i] = out[:32].decode("ascii")
        return result
    finally:
        free(hashes)
