"""xxh3 digests over the C xxHash library (ext/xxh.pyx), with the GIL released."""

import numpy as np
import numpy.typing as npt
from typing_extensions import Buffer

API_VERSION: int

def xxh3_128_hex(buf: Buffer, /) -> str:
    """Lowercase hex of the big-endian canonical xxh3-128 (= ``xxhash.xxh3_128_hexdigest``)."""

def xxh3_128_digest(buf: Buffer, /) -> bytes:
    """The 16-byte big-endian canonical xxh3-128 (= ``xxhash.xxh3_128_digest``)."""

def xxh3_64(buf: Buffer, /) -> int:
    """xxh3-64 with seed 0 (= ``xxhash.xxh3_64_intdigest``)."""

def xxh3_128_hex_many(buf: Buffer, ends: npt.NDArray[np.uint64], /) -> list[str]:
    """Hex xxh3-128 of every chunk cut at ``ends``; ``ValueError`` if they are unordered."""
