"""Chunk boundaries (ext/chunker.pyx): normalised FastCDC and fixed-size splitting."""

import numpy as np
import numpy.typing as npt
from typing_extensions import Buffer

API_VERSION: int

def fastcdc(
    buf: Buffer, min_size: int, avg_size: int, max_size: int, final: bool = True, /
) -> npt.NDArray[np.uint64]:
    """End offsets of the FastCDC chunks of ``buf``; ``final=False`` leaves the tail out."""

def fixed(length: int, chunk_size: int, /) -> npt.NDArray[np.uint64]:
    """End offsets of fixed-size chunks covering ``length`` bytes."""

def gear_table() -> npt.NDArray[np.uint64]:
    """The 256 gear constants (splitmix64 from a fixed seed)."""
