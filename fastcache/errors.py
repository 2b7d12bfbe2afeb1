"""Domain exceptions and the only two translation tables: errno (FUSE) and HTTP status (APIs).

Every layer raises these; the FUSE adapter asks ``errno_for`` and the HTTP middlewares ask
``http_status_for``. Nothing else maps errors.
"""

from __future__ import annotations

import errno as _errno
import logging

log = logging.getLogger("fastcache")


class FastcacheError(Exception):
    """Base of every domain error. ``str(exc)`` is the message users see."""


# --- namespace -------------------------------------------------------------------------
class NotFound(FastcacheError):
    """No such file, directory, peer or chunk."""


class Exists(FastcacheError):
    """The name is already taken."""


class NotADirectory(FastcacheError):
    """A path component or the target is not a directory."""


class IsADirectory(FastcacheError):
    """A file operation was asked of a directory."""


class NotEmpty(FastcacheError):
    """rmdir or rename onto a directory that still has entries."""


class InvalidName(FastcacheError):
    """A path or name that is malformed or escapes its root (``..``, NUL, empty segment)."""


class NameTooLong(FastcacheError):
    """A name longer than 255 bytes."""


class InvalidArgument(FastcacheError):
    """A request that makes no sense (moving a directory into its own subtree, bad field)."""


class PermissionDenied(FastcacheError):
    """The caller may not do this."""


class NotPermitted(FastcacheError):
    """The operation is never allowed here (EPERM), e.g. a hard link to a directory."""


class Conflict(FastcacheError):
    """Optimistic concurrency: the expected version is stale."""


class ReadOnly(FastcacheError):
    """The filesystem or tier is read-only."""


class Unsupported(FastcacheError):
    """A feature fastcache does not implement (ENOTSUP), e.g. an unknown xattr namespace."""


# --- extended attributes ---------------------------------------------------------------
class NoAttribute(FastcacheError):
    """No extended attribute of that name (ENODATA, which Linux also calls ENOATTR)."""


class OutOfRange(FastcacheError):
    """A name or buffer outside what the call allows (ERANGE): an xattr name of 0 or more
    than 255 bytes, a value larger than the caller's buffer."""


class ValueTooLarge(FastcacheError):
    """An extended attribute's value larger than 64 KiB (E2BIG)."""


class NoSpace(FastcacheError):
    """An inode's room for extended attributes is used up (ENOSPC, as ext4 answers)."""


# --- tiers and data ------------------------------------------------------------------
class ChunkNotFound(NotFound):
    """The tier does not hold this chunk."""


class ChunkCorrupt(FastcacheError):
    """The bytes a tier returned do not hash to their name."""


class TierUnavailable(FastcacheError):
    """The tier cannot be reached right now (network, 5xx, throttling, circuit open)."""


class StoreUnavailable(TierUnavailable):
    """The coordinator's metadata database cannot be reached right now (503: retry)."""


class TierFull(FastcacheError):
    """The tier has no room (ENOSPC, capacity reached with nothing evictable)."""


class DataUnavailable(FastcacheError):
    """Every tier failed for a chunk: the read cannot be served."""


# --- HTTP boundary ---------------------------------------------------------------------
class BadRequest(FastcacheError):
    """Malformed input: JSON, types, digests, paths."""


class Unauthorized(FastcacheError):
    """Missing or wrong cluster token."""


class PayloadTooLarge(FastcacheError):
    """The request body exceeds the limit."""


_ERRNO: list[tuple[type[BaseException], int]] = [
    (ChunkNotFound, _errno.EIO),
    (NotFound, _errno.ENOENT),
    (Exists, _errno.EEXIST),
    (NotADirectory, _errno.ENOTDIR),
    (IsADirectory, _errno.EISDIR),
    (NotEmpty, _errno.ENOTEMPTY),
    (NameTooLong, _errno.ENAMETOOLONG),
    (InvalidName, _errno.EINVAL),
    (InvalidArgument, _errno.EINVAL),
    (BadRequest, _errno.EINVAL),
    (PermissionDenied, _errno.EACCES),
    (NotPermitted, _errno.EPERM),
    (Unauthorized, _errno.EACCES),
    (Conflict, _errno.EAGAIN),
    (ReadOnly, _errno.EROFS),
    (Unsupported, _errno.EOPNOTSUPP),
    (NoAttribute, _errno.ENODATA),
    (OutOfRange, _errno.ERANGE),
    (ValueTooLarge, _errno.E2BIG),
    (NoSpace, _errno.ENOSPC),
    (TierFull, _errno.ENOSPC),
    (PayloadTooLarge, _errno.EFBIG),
    (ChunkCorrupt, _errno.EIO),
    (TierUnavailable, _errno.EIO),
    (DataUnavailable, _errno.EIO),
]

_HTTP: list[tuple[type[BaseException], int]] = [
    (BadRequest, 400),
    (InvalidName, 400),
    (NameTooLong, 400),
    (InvalidArgument, 400),
    (Unauthorized, 401),
    (PermissionDenied, 403),
    (NotPermitted, 403),
    (NotFound, 404),  # includes ChunkNotFound
    (NoAttribute, 404),
    (OutOfRange, 400),
    (Exists, 409),
    (NotEmpty, 409),
    (Conflict, 409),
    (NotADirectory, 409),
    (IsADirectory, 409),
    (PayloadTooLarge, 413),
    (ValueTooLarge, 413),
    (Unsupported, 400),  # a well-formed request for what is not implemented (ENOTSUP)
    (NoSpace, 507),
    (ReadOnly, 403),
    (TierFull, 507),
    (ChunkCorrupt, 502),
    (DataUnavailable, 502),
    (TierUnavailable, 503),
]


def errno_for(exc: BaseException) -> int:
    """The errno a FUSE handler answers for ``exc``. Unmapped exceptions are logged once: EIO."""
    if isinstance(exc, OSError) and exc.errno:
        return exc.errno
    for cls, code in _ERRNO:
        if isinstance(exc, cls):
            return code
    log.exception("unexpected error, answering EIO", exc_info=exc)
    return _errno.EIO


def http_status_for(exc: BaseException) -> int:
    """The HTTP status an API answers for ``exc``; 500 for anything unmapped."""
    for cls, code in _HTTP:
        if isinstance(exc, cls):
            return code
    return 500


def error_from_status(status: int, message: str) -> FastcacheError:
    """The domain error for an HTTP error answer (used by the HTTP clients of our own APIs).

    409 is ambiguous on the wire; the coordinator sends a ``kind`` field so the client can
    rebuild the exact class with ``error_from_kind``. This is the fallback.
    """
    if status == 400:
        return BadRequest(message)
    if status == 401:
        return Unauthorized(message)
    if status == 403:
        return PermissionDenied(message)
    if status == 404:
        return NotFound(message)
    if status == 409:
        return Conflict(message)
    if status == 413:
        return PayloadTooLarge(message)
    if status == 507:
        return TierFull(message)
    return TierUnavailable(f"HTTP {status}: {message}")


_BY_KIND: dict[str, type[FastcacheError]] = {
    cls.__name__: cls
    for cls in (
        NotFound,
        Exists,
        NotADirectory,
        IsADirectory,
        NotEmpty,
        InvalidName,
        NameTooLong,
        InvalidArgument,
        PermissionDenied,
        NotPermitted,
        Conflict,
        ReadOnly,
        Unsupported,
        NoAttribute,
        OutOfRange,
        ValueTooLarge,
        NoSpace,
        ChunkNotFound,
        ChunkCorrupt,
        TierUnavailable,
        StoreUnavailable,
        TierFull,
        DataUnavailable,
        BadRequest,
        Unauthorized,
        PayloadTooLarge,
    )
}


def error_kind(exc: BaseException) -> str:
    """The wire name of a domain error (its class name), sent beside ``error`` in JSON."""
    return type(exc).__name__ if type(exc).__name__ in _BY_KIND else "FastcacheError"


def error_from_kind(kind: str | None, status: int, message: str) -> FastcacheError:
    """Rebuild the domain error a service raised from its JSON ``{"error", "kind"}`` answer."""
    cls = _BY_KIND.get(kind or "")
    if cls is not None:
        return cls(message)
    return error_from_status(status, message)
