# cython: boundscheck=False, wraparound=False, cdivision=True
"""Chunk-file I/O for the NVMe tier: atomic (O_DIRECT) writes, pread, whole-file reads, mmap.

An atomic write is a temp file beside the target and a rename: a reader never sees half a
file. It is not synced unless asked (``sync=True``): a renamed file in the page cache
survives the death of the process, which is all a chunk on NVMe promises (S3 is the copy
that survives a power cut).

Every system call runs with the GIL released; a failure becomes ``OSError(errno, …)`` with
the path as ``filename`` (so ``ENOSPC`` reaches the tier as ``OSError(ENOSPC)``).
"""

import itertools
import os
import threading

from cpython.buffer cimport PyBuffer_FillInfo
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.errno cimport EINTR, EINVAL, EIO, errno
from libc.stdint cimport uintptr_t
from libc.stdio cimport rename
from libc.stdlib cimport free
from libc.string cimport memcpy, memset
from posix.fcntl cimport F_GETFL, F_SETFL, O_CLOEXEC, O_CREAT, O_DIRECT, O_EXCL, O_RDONLY
from posix.fcntl cimport O_WRONLY, fcntl
from posix.fcntl cimport open as c_open
from posix.mman cimport MADV_SEQUENTIAL, MAP_FAILED, MAP_SHARED, PROT_READ, madvise, mmap, munmap
from posix.stat cimport fstat, struct_stat
from posix.types cimport off_t
from posix.unistd cimport close, fdatasync, fsync, ftruncate, pread, pwrite, unlink

API_VERSION = 2

cdef extern from "<stdlib.h>" nogil:
    int posix_memalign(void **memptr, size_t alignment, size_t size)

cdef extern from "<sys/vfs.h>" nogil:
    cdef struct statfs_t "statfs":
        long f_type
    int c_statfs "statfs"(const char *path, statfs_t *buf)

cdef enum:
    BLOCK = 4096                      # O_DIRECT alignment of offsets, lengths and addresses
    SCRATCH_MAX = 4 * 1024 * 1024     # per-thread bounce buffer for O_DIRECT writes
    SPARES = 8                        # freed receive buffers kept for reuse (see below)
    TMPFS_MAGIC = 0x01021994
    RAMFS_MAGIC = 0x858458F6

_counter = itertools.count()
_tls = threading.local()
cdef unsigned char EMPTY[1]


cdef inline size_t _round_up(size_t n) noexcept nogil:
    return (n + BLOCK - 1) & ~(<size_t>BLOCK - 1)


cdef inline const unsigned char *_cptr(const unsigned char[::1] buf) noexcept nogil:
    return &buf[0]  # boundscheck is off: the base pointer, even for an empty view


cdef inline unsigned char *_wptr(unsigned char[::1] buf) noexcept nogil:
    return &buf[0]


cdef object _oserror(int err, object path):
    return OSError(err, os.strerror(err), os.fsdecode(path) if path is not None else None)


# --- aligned memory ------------------------------------------------------------------------
# Receive buffers (``zero=False``) of the same size come and go at the rate chunks are
# fetched. Fresh memory from the allocator is fresh pages (mmap): 1,024 page faults and as
# many zeroed pages per 4 MiB, a fifth of a cold read's CPU. Up to SPARES freed ones are kept
# and handed out again by size. Only touched with the GIL held (__cinit__, __dealloc__).
cdef void *_spare_ptr[SPARES]
cdef size_t _spare_size[SPARES]
cdef int _spares = 0


cdef void *_take_spare(size_t size) noexcept:
    global _spares
    cdef int i
    cdef void *p
    for i in range(_spares):
        if _spare_size[i] == size:
            p = _spare_ptr[i]
            _spares -= 1
            _spare_ptr[i] = _spare_ptr[_spares]
            _spare_size[i] = _spare_size[_spares]
            return p
    return NULL


cdef void _give_spare(void *p, size_t size) noexcept:
    global _spares
    if _spares < SPARES:
        _spare_ptr[_spares] = p
        _spare_size[_spares] = size
        _spares += 1
    else:
        free(p)

cdef class AlignedBuffer:
    """``size`` bytes at an ``alignment``-aligned address (for O_DIRECT), writable through
    the buffer protocol, zeroed unless ``zero`` is false (a receive buffer the caller fills
    whole); freed when the object dies."""

    cdef unsigned char *ptr
    cdef readonly Py_ssize_t size
    cdef readonly Py_ssize_t alignment
    cdef int exports
    cdef bint spare  # a receive buffer: kept for reuse when freed

    def __cinit__(self, Py_ssize_t size, Py_ssize_t alignment=BLOCK, bint zero=True):
        cdef void *p = NULL
        if size < 0:
            raise ValueError(f"size must not be negative: {size}")
        if alignment < <Py_ssize_t>sizeof(void *) or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two >= {sizeof(void *)}")
        self.spare = not zero and alignment == BLOCK and size > 0
        if self.spare:
            p = _take_spare(<size_t>size)
        if p == NULL and posix_memalign(
            &p, <size_t>alignment, <size_t>(size if size > 0 else alignment)
        ):
            raise MemoryError(f"cannot allocate {size} aligned bytes")
        if zero:
            memset(p, 0, <size_t>size)
        self.ptr = <unsigned char *>p
        self.size = size
        self.alignment = alignment

    def __dealloc__(self):
        if self.spare and self.ptr != NULL:
            _give_spare(self.ptr, <size_t>self.size)
        else:
            free(self.ptr)
        self.ptr = NULL

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        PyBuffer_FillInfo(buffer, self, self.ptr, self.size, 0, flags)
        self.exports += 1

    def __releasebuffer__(self, Py_buffer *buffer):
        self.exports -= 1

    def __len__(self):
        return self.size

    @property
    def address(self) -> int:
        """The start address (a multiple of ``alignment``)."""
        return <uintptr_t>self.ptr


cdef AlignedBuffer _scratch(size_t want):
    """This thread's bounce buffer, grown to at least ``want`` bytes (a multiple of BLOCK)."""
    cdef AlignedBuffer buf = getattr(_tls, "scratch", None)
    if buf is None or <size_t>buf.size < want:
        buf = AlignedBuffer(want)
        _tls.scratch = buf
    return buf


# --- C helpers (no GIL; return 0 or an errno) ------------------------------------------------
cdef int _pwrite_all(int fd, const unsigned char *src, size_t n, off_t off) noexcept nogil:
    cdef ssize_t done
    while n > 0:
        done = pwrite(fd, src, n, off)
        if done < 0:
            if errno == EINTR:
                continue
            return errno
        if done == 0:
            return EIO
        src += done
        n -= <size_t>done
        off += done
    return 0


cdef ssize_t _pread_all(int fd, unsigned char *dst, size_t n, off_t off, int *err) noexcept nogil:
    """Bytes read into ``dst`` (short only at end of file); -1 with ``err`` set on failure."""
    cdef size_t total = 0
    cdef ssize_t got
    while total < n:
        got = pread(fd, dst + total, n - total, off + <off_t>total)
        if got < 0:
            if errno == EINTR:
                continue
            err[0] = errno
            return -1
        if got == 0:
            break
        total += <size_t>got
    return <ssize_t>total


cdef int _write_direct(
    int fd, const unsigned char *src, size_t n, unsigned char *scratch, size_t scap
) noexcept nogil:
    """Write ``n`` bytes with O_DIRECT: whole blocks straight from ``src`` when it is aligned,
    otherwise through ``scratch``; a partial last block is written zero-padded, then cut."""
    cdef size_t off = 0, take, padded = 0
    cdef int err
    if (<uintptr_t>src) % BLOCK == 0 and n >= BLOCK:
        off = n & ~(<size_t>BLOCK - 1)
        err = _pwrite_all(fd, src, off, 0)
        if err:
            return err
    while off < n:
        take = n - off
        if take > scap:
            take = scap
        padded = _round_up(take)
        memcpy(scratch, src + off, take)
        if padded > take:
            memset(scratch + take, 0, padded - take)
        err = _pwrite_all(fd, scratch, padded, <off_t>off)
        if err:
            return err
        off += take
    if _round_up(n) != n and ftruncate(fd, <off_t>n) != 0:
        return errno
    return 0


cdef int _sync_dir(const char *directory) noexcept nogil:
    """fsync a directory, so a rename inside it survives a power cut."""
    cdef int fd = c_open(directory, O_RDONLY | O_CLOEXEC)
    cdef int err = 0
    if fd < 0:
        return errno
    if fsync(fd) != 0:
        err = errno
    close(fd)
    return err


cdef int _write_atomic(
    const char *tmp,
    const char *path,
    const char *directory,
    const unsigned char *src,
    size_t n,
    bint direct,
    bint sync,
    unsigned char *scratch,
    size_t scap,
) noexcept nogil:
    cdef int flags = O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC
    cdef int fd = -1
    cdef int err = 0
    if direct:
        fd = c_open(tmp, flags | O_DIRECT, 0o644)
        if fd < 0:
            if errno != EINVAL:
                return errno
            direct = False  # the filesystem refuses O_DIRECT: write buffered
    if fd < 0:
        fd = c_open(tmp, flags, 0o644)
        if fd < 0:
            return errno
    if direct:
        err = _write_direct(fd, src, n, scratch, scap)
        if err == EINVAL:
            # O_DIRECT accepted at open but not for this write: redo it buffered.
            if fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) & ~O_DIRECT) != 0:
                err = errno
            else:
                err = _pwrite_all(fd, src, n, 0)
                if err == 0 and ftruncate(fd, <off_t>n) != 0:
                    err = errno
    else:
        err = _pwrite_all(fd, src, n, 0)
    if sync and err == 0 and fdatasync(fd) != 0:
        err = errno
    if close(fd) != 0 and err == 0 and errno != EINTR:
        err = errno
    if err == 0 and rename(tmp, path) != 0:
        err = errno
    if err:
        unlink(tmp)
        return err
    if sync:
        return _sync_dir(directory)
    return 0


# --- public functions ------------------------------------------------------------------------
def probe_direct(directory) -> bool:
    """Whether O_DIRECT writes work in ``directory`` and bypass a cache.

    False when the filesystem refuses O_DIRECT (EINVAL) and on tmpfs/ramfs, where Linux
    (>= 6.6) accepts O_DIRECT but the file lives in the page cache anyway. Other failures
    (missing directory, no permission) raise ``OSError``. The probe file is removed.
    """
    cdef bytes bdir = os.fsencode(directory)
    cdef bytes name = os.path.join(bdir, b".fastcache-direct-probe.%d.%d" % (
        os.getpid(), next(_counter)))
    cdef const char *cdir = bdir
    cdef const char *cname = name
    cdef AlignedBuffer block = AlignedBuffer(BLOCK)
    cdef unsigned char *p = block.ptr
    cdef statfs_t fs
    cdef int fd, err = 0
    cdef ssize_t done = 0
    with nogil:
        if c_statfs(cdir, &fs) != 0:
            err = errno
        elif fs.f_type == TMPFS_MAGIC or fs.f_type == <long>RAMFS_MAGIC:
            err = -1
        else:
            fd = c_open(cname, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC | O_DIRECT, 0o600)
            if fd < 0:
                err = errno
            else:
                done = pwrite(fd, p, BLOCK, 0)
                if done < 0:
                    err = errno
                close(fd)
                unlink(cname)
    if err == -1 or err == EINVAL:
        return False
    if err:
        raise _oserror(err, bdir)
    return done == BLOCK


def write_file_atomic(path, const unsigned char[::1] buf, bint direct, bint sync=False) -> None:
    """Write ``buf`` to ``path`` atomically: a temp file beside it, (O_DIRECT), rename.

    With ``sync`` the temp file is fdatasynced before the rename and the directory fsynced
    after it, so the file also survives a power cut. On failure the temp file is removed
    and ``OSError`` raised.
    """
    cdef bytes bpath = os.fsencode(path)
    cdef bytes btmp = bpath + b".tmp.%d.%d" % (os.getpid(), next(_counter))
    cdef bytes bdir = os.path.dirname(bpath) or b"."
    cdef const char *cpath = bpath
    cdef const char *ctmp = btmp
    cdef const char *cdir = bdir
    cdef const unsigned char *src = _cptr(buf)
    cdef size_t n = <size_t>buf.shape[0]
    cdef AlignedBuffer scratch = None
    cdef unsigned char *sp = NULL
    cdef size_t scap = 0
    cdef int err
    if direct and n > 0:
        if (<uintptr_t>src) % BLOCK == 0:
            scratch = _scratch(BLOCK)  # only a partial last block needs copying
        else:
            scratch = _scratch(min(_round_up(n), <size_t>SCRATCH_MAX))
        sp = scratch.ptr
        scap = <size_t>scratch.size
    with nogil:
        err = _write_atomic(ctmp, cpath, cdir, src, n, direct, sync, sp, scap)
    if err:
        raise _oserror(err, bpath)


def pread_fd(int fd, off_t offset, unsigned char[::1] out) -> int:
    """Read up to ``len(out)`` bytes at ``offset`` of ``fd`` into ``out``; short only at EOF."""
    cdef unsigned char *dst = _wptr(out)
    cdef size_t n = <size_t>out.shape[0]
    cdef ssize_t got
    cdef int err = 0
    if offset < 0:
        raise ValueError(f"negative offset: {offset}")
    with nogil:
        got = _pread_all(fd, dst, n, offset, &err)
    if got < 0:
        raise _oserror(err, None)
    return got


def pread_into(path, off_t offset, unsigned char[::1] out) -> int:
    """Open ``path``, read up to ``len(out)`` bytes at ``offset`` into ``out``, close.

    Returns the bytes read: short only at end of file, 0 at or past it.
    """
    cdef bytes bpath = os.fsencode(path)
    cdef const char *cpath = bpath
    cdef unsigned char *dst = _wptr(out)
    cdef size_t n = <size_t>out.shape[0]
    cdef ssize_t got = -1
    cdef int fd, err = 0
    if offset < 0:
        raise ValueError(f"negative offset: {offset}")
    with nogil:
        fd = c_open(cpath, O_RDONLY | O_CLOEXEC)
        if fd < 0:
            err = errno
        else:
            got = _pread_all(fd, dst, n, offset, &err)
            close(fd)
    if got < 0:
        raise _oserror(err, bpath)
    return got


def read_file(path) -> bytes:
    """The whole file at ``path``, read into one freshly allocated ``bytes``."""
    cdef bytes bpath = os.fsencode(path)
    cdef const char *cpath = bpath
    cdef struct_stat st
    cdef int fd, err = 0
    cdef ssize_t got
    cdef char *dst
    with nogil:
        fd = c_open(cpath, O_RDONLY | O_CLOEXEC)
        if fd < 0:
            err = errno
        elif fstat(fd, &st) != 0:
            err = errno
            close(fd)
    if err:
        raise _oserror(err, bpath)
    try:
        result = PyBytes_FromStringAndSize(NULL, st.st_size)
        dst = PyBytes_AS_STRING(result)
        with nogil:
            got = _pread_all(fd, <unsigned char *>dst, <size_t>st.st_size, 0, &err)
    finally:
        close(fd)
    if got < 0:
        raise _oserror(err, bpath)
    if got < st.st_size:  # the file shrank while we read it
        return result[:got]
    return result


cdef class MappedFile:
    """A read-only, shared mmap of a whole file, exposed through the buffer protocol.

    ``close()`` unmaps it (refused while a memoryview of it is alive). Reading a mapping
    whose file was truncated underneath raises SIGBUS: use it on immutable chunk files.
    """

    cdef unsigned char *addr
    cdef readonly Py_ssize_t size
    cdef int exports
    cdef bint mapped

    def __cinit__(self, path):
        cdef bytes bpath = os.fsencode(path)
        cdef const char *cpath = bpath
        cdef struct_stat st
        cdef int fd, err = 0
        cdef void *addr = NULL
        with nogil:
            fd = c_open(cpath, O_RDONLY | O_CLOEXEC)
            if fd < 0:
                err = errno
            else:
                if fstat(fd, &st) != 0:
                    err = errno
                elif st.st_size > 0:
                    addr = mmap(NULL, <size_t>st.st_size, PROT_READ, MAP_SHARED, fd, 0)
                    if addr == MAP_FAILED:
                        err = errno
                    else:
                        madvise(addr, <size_t>st.st_size, MADV_SEQUENTIAL)
                close(fd)
        if err:
            raise _oserror(err, bpath)
        self.size = st.st_size
        self.mapped = addr != NULL
        self.addr = <unsigned char *>addr if addr != NULL else EMPTY

    def __dealloc__(self):
        if self.mapped:
            munmap(self.addr, <size_t>self.size)
            self.mapped = False

    def __getbuffer__(self, Py_buffer *buffer, int flags):
        if self.addr == NULL:
            raise ValueError("mapped file is closed")
        PyBuffer_FillInfo(buffer, self, self.addr, self.size, 1, flags)
        self.exports += 1

    def __releasebuffer__(self, Py_buffer *buffer):
        self.exports -= 1

    def __len__(self):
        return self.size

    @property
    def closed(self) -> bool:
        return self.addr == NULL

    def close(self) -> None:
        """Unmap. Idempotent; ``BufferError`` while exported buffers are alive."""
        if self.exports:
            raise BufferError("cannot close a mapped file while memoryviews of it exist")
        if self.mapped:
            munmap(self.addr, <size_t>self.size)
            self.mapped = False
        self.addr = NULL

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.close()


def mmap_read(path) -> MappedFile:
    """A read-only mapping of the whole file at ``path`` (for large sequential reads)."""
    return MappedFile(path)
