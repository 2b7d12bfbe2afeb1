"""What the coordinator and its clients share: the wire types, their limits and checks.

Plain data only: importing this loads no aiohttp, no sqlite and no compiled extension, so a
client node can use it without the coordinator's service or store, and the coordinator
without the node's hot path (``chunks.py``).

A file's content travels as a manifest, ``{"size", "chunk_size", "chunks", "lengths"?}``:
``chunks`` are the xxh3-128 digests of its chunks in order; ``lengths`` is there only for
content-defined chunking (one length per chunk), otherwise every chunk is ``chunk_size``
bytes but the last. ``validate_manifest`` is the one check of that shape: the coordinator
runs it on every commit, a client on every manifest it parses (``chunks.Manifest``).
"""

from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass
from typing import Any

import xxhash

from fastcache.errors import (
    BadRequest,
    InvalidArgument,
    OutOfRange,
    Unsupported,
    ValueTooLarge,
)
from fastcache.paths import is_digest

# --- limits ------------------------------------------------------------------------------
INT64_MAX = (1 << 63) - 1
UID_MAX = (1 << 32) - 1  # uid and gid
MAX_TARGET_BYTES = 4095  # a symlink's target, UTF-8 encoded
MAX_READDIR = 10_000  # entries per readdir answer
DEFAULT_READDIR = 1000
MAX_LOCATION_BATCH = 4096  # chunk locations per batch request (one transaction)
MAX_ATIME_BATCH = 4096  # inodes per batch of read access times (one transaction)
ROOT_INO = 1
INODE_TYPES = ("file", "dir", "symlink", "fifo", "socket", "chr", "blk")
# Patterns as strings for the OpenAPI schemas, compiled for the service's own checks.
DIGEST_PATTERN = "^[0-9a-f]{32}$"
PEER_ID_PATTERN = "^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$"
URL_PATTERN = r"^https?://[^\s/?#]+(/\S*)?$"
MAX_URL = 2048
STATUS_PATTERN = "^[a-z][a-z_-]{0,31}$"
PEER_ID_RE = re.compile(PEER_ID_PATTERN)
URL_RE = re.compile(URL_PATTERN)
STATUS_RE = re.compile(STATUS_PATTERN)
BLOCK = 4096  # allocation unit ``st_blocks`` rounds to
# Extended attributes: Linux's limits (``XATTR_NAME_MAX``, ``XATTR_SIZE_MAX``,
# ``XATTR_LIST_MAX``) and the room one inode has for them (ext4 answers ENOSPC when full).
XATTR_NAME_MAX = 255  # bytes of a name, its namespace prefix included
XATTR_SIZE_MAX = 65536  # bytes of one value
XATTR_LIST_MAX = 65536  # bytes of an inode's names, one NUL after each (listxattr's answer)
XATTR_TOTAL_MAX = 1 << 20  # bytes of an inode's names and values together
XATTR_CREATE = 1  # setxattr flags, as in <sys/xattr.h>
XATTR_REPLACE = 2
XATTR_NAMESPACES = ("user", "trusted", "security")  # stored; ``system.*`` (ACLs) is not
# File size. A manifest lists every chunk of its file, holes included (``hole_digest``), and
# a commit travels in one session frame (``session.MAX_FRAME``, 1 MiB of msgpack): its
# chunks (34 bytes each, 39 with CDC lengths) plus up to ``MAX_LOCATION_BATCH`` held
# digests must fit, so a manifest lists at most ``MAX_MANIFEST_CHUNKS`` chunks (778 KiB at
# worst). A file may therefore hold ``MAX_MANIFEST_CHUNKS`` times the smallest chunk its
# node cuts (``max_file_size``): 64 GiB at the default 4 MiB fixed chunks, 16 GiB with CDC
# at 4 MiB (whose chunks may be as small as 1 MiB), 1 TiB at the largest chunk size
# (64 MiB). ``MAX_FILE_SIZE`` is that ceiling for any node, far inside the int64 offsets of
# POSIX, FUSE and the manifest format (2**63 - 1). Beyond it a node answers EFBIG (413 on
# its API) at once and the coordinator refuses the manifest (400): nothing does work in
# proportion to a size that is refused.
MAX_MANIFEST_CHUNKS = 16_384
MAX_FILE_SIZE = 1 << 40  # 1 TiB = MAX_MANIFEST_CHUNKS * 64 MiB, the largest chunk size


def max_file_size(chunk_size: int, cdc_min: int | None = None) -> int:
    """The largest file a node can commit: ``MAX_MANIFEST_CHUNKS`` chunks of ``chunk_size``
    (fixed chunking) or, chunking by content, chunks of at least ``cdc_min`` bytes each but
    the last; never more than ``MAX_FILE_SIZE``."""
    if cdc_min is None:
        return min(MAX_FILE_SIZE, MAX_MANIFEST_CHUNKS * chunk_size)
    return min(MAX_FILE_SIZE, (MAX_MANIFEST_CHUNKS - 1) * cdc_min)


# --- the wire types ----------------------------------------------------------------------
@dataclass
class InodeAttrs:
    """One inode. ``manifest`` is ``None`` for non-files, empty files and readdir answers."""

    ino: int
    type: str
    mode: int
    uid: int
    gid: int
    size: int
    atime_ns: int
    mtime_ns: int
    ctime_ns: int
    nlink: int
    rdev: int = 0
    target: str | None = None
    version: int = 0
    blocks: int = 0  # 512-byte blocks of the file's data chunks (``st_blocks``; holes free)
    # How many extended attributes it has (the coordinator always says; ``None``: unknown).
    # A node holding the attributes answers "none" itself: the kernel asks for
    # ``security.capability`` before every write and ``ls -l`` for ACLs and labels.
    xattrs: int | None = None
    manifest: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        # Shallow on purpose: ``asdict`` deep-copies the manifest, on every answer.
        return {name: getattr(self, name) for name in INODE_FIELDS}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> InodeAttrs:
        if len(doc) == len(INODE_FIELDS):
            try:
                return cls(**doc)  # the common case: exactly our fields (listings: per entry)
            except TypeError:
                pass
        return cls(**{name: doc.get(name) for name in INODE_FIELDS})

    @property
    def is_dir(self) -> bool:
        return self.type == "dir"


INODE_FIELDS = tuple(InodeAttrs.__dataclass_fields__)  # in declaration (column) order


@dataclass
class Entry:
    """A directory entry as readdir returns it. ``offset`` resumes the listing after it."""

    name: str
    attrs: InodeAttrs
    offset: int

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "offset": self.offset, "attrs": self.attrs.to_json()}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> Entry:
        return cls(name=doc["name"], offset=doc["offset"], attrs=InodeAttrs.from_json(doc["attrs"]))


# A listing row (the session's listings, ``Txn.list_rows``): one array per entry,
# ``[name, offset, ino, type, …, blocks]`` (the inode's fields in ``INODE_FIELDS`` order,
# without the manifest listings never carry): no per-entry map to build or unpack.
LISTING_FIELDS = INODE_FIELDS[: INODE_FIELDS.index("manifest")]


def entry_from_row(row: list[Any]) -> Entry:
    if not isinstance(row, list) or len(row) != 2 + len(LISTING_FIELDS):
        raise ValueError(f"a listing row has {2 + len(LISTING_FIELDS)} items")
    return Entry(name=row[0], offset=row[1], attrs=InodeAttrs(*row[2:]))


@dataclass
class PeerInfo:
    peer_id: str
    url: str
    capacity: int
    used: int
    status: str
    registered_at: float
    last_seen: float

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> PeerInfo:
        return cls(**{name: doc[name] for name in cls.__dataclass_fields__})


# --- extended attributes -------------------------------------------------------------------
def xattr_namespace(name: Any) -> str:
    """Check an extended attribute's name as Linux does; its namespace (``XATTR_NAMESPACES``).

    ``OutOfRange`` (ERANGE) for an empty name or one over ``XATTR_NAME_MAX`` UTF-8 bytes;
    ``InvalidArgument`` (EINVAL) for a name that is not a string, holds a NUL or is a bare
    prefix (``user.``); ``Unsupported`` (ENOTSUP) for any other namespace, ``system.*``
    (POSIX ACLs) included. Names are UTF-8 (the wire carries text).
    """
    if not isinstance(name, str):
        raise InvalidArgument("an xattr name is a string")
    try:
        size = len(name.encode())
    except UnicodeEncodeError:
        raise InvalidArgument("an xattr name must be valid UTF-8") from None
    if not 0 < size <= XATTR_NAME_MAX:
        raise OutOfRange(f"an xattr name has 1 to {XATTR_NAME_MAX} bytes")
    if "\0" in name:
        raise InvalidArgument("an xattr name has no NUL")
    space, dot, rest = name.partition(".")
    if not dot or space not in XATTR_NAMESPACES:
        raise Unsupported(f"xattr namespace of {name!r} not supported (user, trusted, security)")
    if not rest:
        raise InvalidArgument(f"{name!r}: a namespace needs a name after it")
    return space


def check_xattr_value(value: Any) -> bytes:
    """A value is bytes of at most ``XATTR_SIZE_MAX``; ``ValueTooLarge`` (E2BIG) beyond."""
    if not isinstance(value, bytes | bytearray | memoryview):
        raise InvalidArgument("an xattr value is bytes")
    if len(value) > XATTR_SIZE_MAX:
        raise ValueTooLarge(f"an xattr value has at most {XATTR_SIZE_MAX} bytes")
    return bytes(value)


# --- manifests ---------------------------------------------------------------------------
_MANIFEST_KEYS = ("size", "chunk_size", "chunks", "lengths")


def _is_int(value: Any, lo: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= INT64_MAX


def validate_manifest(doc: Any) -> dict[str, Any]:
    """Check a manifest's shape and consistency; return its canonical form (fresh lists).

    Refused with ``BadRequest`` (HTTP 400; ``EINVAL`` on a node): not an object, a missing or
    unknown field, a size or chunk size that is not an integer in range, a chunk that is not
    a 32-lowercase-hex digest, ``lengths`` that are not positive integers, one per chunk,
    adding up to the size, and (without ``lengths``) a chunk count other than
    ``ceil(size / chunk_size)``.
    """
    if not isinstance(doc, dict):
        raise BadRequest("manifest must be an object")
    unknown = [key for key in doc if key not in _MANIFEST_KEYS]
    if unknown:
        raise BadRequest(f"manifest has unknown fields: {', '.join(sorted(map(str, unknown)))}")
    missing = [key for key in _MANIFEST_KEYS[:3] if key not in doc]
    if missing:
        raise BadRequest(f"manifest is missing {', '.join(missing)}")
    size, chunk_size, chunks = doc["size"], doc["chunk_size"], doc["chunks"]
    if not _is_int(size, 0):
        raise BadRequest("manifest size must be an integer in [0, 2**63 - 1]")
    if not _is_int(chunk_size, 1):
        raise BadRequest("manifest chunk_size must be an integer in [1, 2**63 - 1]")
    if not isinstance(chunks, list):
        raise BadRequest("manifest chunks must be a list of digests")
    if not all(map(is_digest, chunks)):
        bad = next(i for i, name in enumerate(chunks) if not is_digest(name))
        raise BadRequest(f"manifest chunks[{bad}] is not a digest (32 lowercase hex characters)")
    out: dict[str, Any] = {"size": size, "chunk_size": chunk_size, "chunks": list(chunks)}
    if "lengths" in doc:
        lengths = doc["lengths"]
        if not isinstance(lengths, list) or not all(_is_int(n, 1) for n in lengths):
            raise BadRequest("manifest lengths must be a list of positive integers")
        if len(lengths) != len(chunks):
            raise BadRequest(
                f"manifest has {len(lengths)} lengths for {len(chunks)} chunks: one per chunk"
            )
        if sum(lengths) != size:
            raise BadRequest(f"manifest lengths add up to {sum(lengths)}, not its size {size}")
        out["lengths"] = list(lengths)
    elif len(chunks) != -(-size // chunk_size):
        raise BadRequest(
            f"manifest has {len(chunks)} chunks; size {size} in chunks of {chunk_size}"
            f" needs {-(-size // chunk_size)}"
        )
    return out


def check_file_limits(manifest: dict[str, Any]) -> None:
    """Refuse (``BadRequest``, HTTP 400) a valid manifest beyond the file limits: a size over
    ``MAX_FILE_SIZE`` or more than ``MAX_MANIFEST_CHUNKS`` chunks. The coordinator's check on
    what it commits; not part of ``validate_manifest``, so a node still reads any file."""
    if manifest["size"] > MAX_FILE_SIZE:
        raise BadRequest(
            f"file size {manifest['size']} exceeds the maximum file size {MAX_FILE_SIZE}"
        )
    if len(manifest["chunks"]) > MAX_MANIFEST_CHUNKS:
        raise BadRequest(
            f"manifest has {len(manifest['chunks'])} chunks; at most {MAX_MANIFEST_CHUNKS}"
        )


@functools.lru_cache(maxsize=64)
def hole_digest(length: int) -> str:
    """The digest of ``length`` zero bytes: a chunk that is a hole (truncate up, seek past EOF).

    The ``xxhash`` wheel's xxh3-128, which the compiled ``chunks.digest`` matches bit for bit.
    """
    return xxhash.xxh3_128_hexdigest(bytes(length))


def allocated_blocks(doc: dict[str, Any] | None) -> int:
    """512-byte blocks of a valid manifest's data chunks, in whole 4 KiB blocks: holes are
    free, so ``du`` of a sparse file shows less than its size (``st_blocks``)."""
    if not doc:
        return 0
    size, cs, lengths = doc["size"], doc["chunk_size"], doc.get("lengths")
    total = 0
    for index, name in enumerate(doc["chunks"]):
        length = lengths[index] if lengths is not None else min(cs, size - index * cs)
        if name != hole_digest(length):
            total += length
    return -(-total // BLOCK) * (BLOCK // 512)
