"""Chunk-file I/O (ext/nvme.pyx): atomic O_DIRECT writes, pread, whole-file reads, mmap.

Failures raise ``OSError`` with the C errno and the path as ``filename``.
"""

import os
from types import TracebackType

from typing_extensions import Buffer

API_VERSION: int

_Path = str | bytes | os.PathLike[str] | os.PathLike[bytes]

class AlignedBuffer:
    """Writable memory at an aligned address (posix_memalign), zeroed unless ``zero`` is
    false, freed with the object."""

    size: int
    alignment: int
    def __init__(self, size: int, alignment: int = 4096, zero: bool = True) -> None: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...
    def __len__(self) -> int: ...
    @property
    def address(self) -> int: ...

class MappedFile:
    """A read-only shared mmap of a whole file; ``close()`` refuses while views are alive."""

    size: int
    def __init__(self, path: _Path) -> None: ...
    def __buffer__(self, flags: int, /) -> memoryview: ...
    def __len__(self) -> int: ...
    @property
    def closed(self) -> bool: ...
    def close(self) -> None: ...
    def __enter__(self) -> MappedFile: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

def probe_direct(directory: _Path) -> bool:
    """Whether O_DIRECT writes work in ``directory`` (False on EINVAL and on tmpfs/ramfs)."""

def write_file_atomic(path: _Path, buf: Buffer, direct: bool, sync: bool = False) -> None:
    """Temp file, (O_DIRECT) write, rename over ``path``; temp removed on failure.

    ``sync`` adds fdatasync before the rename and a directory fsync after it.
    """

def pread_into(path: _Path, offset: int, out: Buffer) -> int:
    """Read into the writable ``out`` at ``offset``; bytes read, short only at EOF."""

def pread_fd(fd: int, offset: int, out: Buffer) -> int:
    """As ``pread_into`` on an open descriptor."""

def read_file(path: _Path) -> bytes:
    """The whole file, in one allocation."""

def mmap_read(path: _Path) -> MappedFile:
    """A read-only mapping of the whole file."""
