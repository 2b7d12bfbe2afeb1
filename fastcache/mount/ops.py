"""The mount: llfuse ``Operations`` over the coordinator's namespace and the cache manager.

Each handler decodes its arguments, makes one call and builds attributes. Handlers run
holding llfuse's global lock; every wait happens with it released (``_wait`` for the
coordinator, ``llfuse.lock_released`` around the data path in ``mount.files.FileTable``). One
decorator, ``_handler``, turns every exception into a ``FUSEError`` through
``errors.errno_for``: anything else escaping a handler would stop the mount loop.

Inode numbers are the coordinator's. Close-to-open consistency: ``open`` takes the current
manifest from the lease this node holds on the file's attributes (another node's commit is
pushed here, dropping them, before it is acknowledged), else asks the coordinator, and drops
the kernel's cached pages when another node changed the file since this node last read it;
``flush`` (every ``close`` of a handle that may have changed the file) commits.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import functools
import logging
import os
import stat
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

import llfuse

from fastcache.config import ClientConfig
from fastcache.coordinator.model import xattr_namespace
from fastcache.coordinator.session_client import SessionClient
from fastcache.errors import (
    Exists,
    InvalidArgument,
    NameTooLong,
    NoAttribute,
    NotFound,
    errno_for,
)
from fastcache.journal import PendingCommits
from fastcache.metrics.histogram import BYTES, CALLS, OpHistograms
from fastcache.mount.atime import AtimeBatcher, relatime_due
from fastcache.mount.files import FileTable, LoopCaller
from fastcache.mount.metacache import MetaCache
from fastcache.mount.notify import KernelNotifier

if TYPE_CHECKING:
    from fastcache.cache.manager import CacheManager
    from fastcache.coordinator.client import CoordinatorClient
    from fastcache.coordinator.model import Entry, InodeAttrs

log = logging.getLogger("fastcache.fuse")
_lock_released = llfuse.lock_released
_clock = time.perf_counter_ns

T = TypeVar("T")
NAME_MAX = 255
BLOCK = 4096
IO_SIZE = 128 * 1024  # st_blksize: what cp and friends use as their buffer size
NS_TIMEOUT = 60.0  # a namespace call the coordinator does not answer in time: EIO
READDIR_BATCH = 512
PREFETCH_AFTER = 4  # lookup misses in one directory within a ttl that make us list it
PREFETCH_BATCHES = 4  # at most this many READDIR_BATCH pages per listing
BIG_DIR_MEMO = 30.0  # seconds a directory too large to list on a lookup miss is not tried
BUSY_DIR_MEMO = 2.0  # seconds a directory another node changed is not listed on a miss

_TYPE_BITS = {
    "file": stat.S_IFREG,
    "dir": stat.S_IFDIR,
    "symlink": stat.S_IFLNK,
    "fifo": stat.S_IFIFO,
    "socket": stat.S_IFSOCK,
    "chr": stat.S_IFCHR,
    "blk": stat.S_IFBLK,
}
_TYPE_NAMES = {bits: name for name, bits in _TYPE_BITS.items()}


# The handlers timed into ``Operations.op_times`` (``fastcache_fuse_op_seconds``).
FUSE_OPS = (
    "lookup",
    "forget",
    "getattr",
    "setattr",
    "readlink",
    "mknod",
    "mkdir",
    "symlink",
    "link",
    "unlink",
    "rmdir",
    "rename",
    "opendir",
    "readdir",
    "releasedir",
    "fsyncdir",
    "open",
    "create",
    "read",
    "write",
    "flush",
    "release",
    "fsync",
    "statfs",
    "access",
    "getxattr",
    "setxattr",
    "listxattr",
    "removexattr",
)
_READ_INDEX = FUSE_OPS.index("read")
_READ = OpHistograms.base(_READ_INDEX)
_READ_CALLS, _READ_BYTES = _READ + CALLS, _READ + BYTES
_WRITE_BYTES = OpHistograms.base(FUSE_OPS.index("write")) + BYTES
READ_SAMPLE_MASK = 15  # one read in 16 is timed: two clock reads cost ~2% of a 4 KiB hit


def _handler(fn: Callable[..., T]) -> Callable[..., T]:
    """Answer every failure of ``fn`` with an errno; nothing else may leave a handler. Times
    each call into ``self.op_times``."""
    index = FUSE_OPS.index(fn.__name__)

    @functools.wraps(fn)
    def wrapper(*args: Any) -> T:
        start = _clock()
        try:
            return fn(*args)
        except llfuse.FUSEError:
            raise
        except Exception as exc:
            raise llfuse.FUSEError(errno_for(exc)) from None
        finally:
            args[0].op_times.observe(index, _clock() - start)

    return wrapper


def _name(raw: bytes) -> str:
    if len(raw) > NAME_MAX:
        raise NameTooLong(f"name longer than {NAME_MAX} bytes")
    return os.fsdecode(raw)


def _xattr_name(raw: bytes) -> str:
    """An xattr name checked here (ERANGE, ENOTSUP: no round trip); UTF-8 only (EINVAL)."""
    try:
        name = raw.decode()
    except UnicodeDecodeError:
        raise InvalidArgument("xattr names are UTF-8 here") from None
    xattr_namespace(name)
    return name


def _data_key(attrs: InodeAttrs) -> int:
    """What identifies a file's content version for the kernel's page cache."""
    return hash((attrs.size, attrs.mtime_ns, attrs.version))


def _dirents(
    batch: list[tuple[bytes, int, int, int]], start: int
) -> Iterator[tuple[bytes, llfuse.EntryAttributes, int]]:
    """What readdir hands llfuse. FUSE 2 has no readdirplus: the kernel takes only the inode
    number and the type from each entry, so nothing else is filled in (full attributes wait
    in the node cache for the lookups that follow)."""
    for name, ino, mode, cookie in batch[start:]:
        e = llfuse.EntryAttributes()
        e.st_ino = ino
        e.st_mode = mode
        yield name, e, cookie


class _DirHandle:
    """An open directory: the last batch the coordinator returned, to resume from."""

    __slots__ = ("batch", "complete", "ino", "positions")

    def __init__(self, ino: int) -> None:
        self.ino = ino
        self.batch: list[tuple[bytes, int, int, int]] = []  # (name, ino, st_mode, cookie)
        self.positions: dict[int, int] = {}
        self.complete = False


class Operations(llfuse.Operations):
    """The llfuse request handlers. Thin: the work is in ``FileTable`` and the coordinator."""

    def __init__(
        self,
        manager: CacheManager,
        namespace: CoordinatorClient | SessionClient,
        config: ClientConfig,
        loop: asyncio.AbstractEventLoop,
    ) -> None:
        super().__init__()
        self.manager = manager
        self.ns = namespace
        # With a metadata session, answers are leased and the coordinator pushes
        # invalidations (``on_invalidate``); ``_epoch`` counts them, so an answer that an
        # invalidation may have overtaken between the call and the cache update is not kept.
        self.session = namespace if isinstance(namespace, SessionClient) else None
        self._epoch = 0
        # dir -> until when a lookup miss there asks for the one name instead of listing it
        # (too large to list, or another node is changing it: its listing would not last)
        self._no_listing: dict[int, float] = {}
        self.config = config
        self.ttl = config.attr_timeout
        self.meta = MetaCache(config.attr_timeout, negative_ttl=config.negative_timeout)
        self.call = LoopCaller(loop)
        self.files = FileTable(
            manager,
            namespace,
            self.call,
            config.cache.chunk_size,
            config.readahead_chunks,
            manager.nvme.staging_dir,
            PendingCommits(manager.nvme.journal_dir),
            commit_timeout=config.commit_timeout,
            fsync_timeout=config.fsync_timeout,
            max_size=config.max_file_size,
        )
        # read access times (relatime), batched; none without a session or with --noatime
        self.atimes = (
            AtimeBatcher(self.session.touch_atimes)
            if self.session is not None and not config.noatime
            else None
        )
        self.mounted = False  # set by mount(): kernel notifications need a live session
        self.kernel = KernelNotifier()
        self._dirs: dict[int, _DirHandle] = {}
        self._next_dir = 1
        self._misses: dict[int, tuple[int, float]] = {}  # dir -> (lookup misses, window end)
        self.op_times = OpHistograms(FUSE_OPS)  # read by the node's /metrics
        self._op_local = self.op_times.local

    # --- helpers ---------------------------------------------------------------------------
    def _wait(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the event loop and wait for it; releases the llfuse lock meanwhile."""
        with llfuse.lock_released:
            return self.call(coro, NS_TIMEOUT)

    def _attrs(self, ino: int) -> InodeAttrs:
        attrs = self.meta.get(ino)
        if attrs is None:
            if self.session is not None:
                epoch = self._epoch
                leased = self._wait(self.session.getattr_leased(ino))
                return self.meta.put(leased.value, self._until(leased.deadline, epoch))
            attrs = self.meta.put(self._wait(self.ns.getattr(ino)))
        return attrs

    def _until(self, deadline: float, epoch: int) -> float:
        """How long a leased answer may be kept: not at all if an invalidation came in
        while it was on its way (it may be older than what the invalidation announced)."""
        return deadline if deadline and epoch == self._epoch else time.monotonic()

    # --- push invalidation (the metadata session) ------------------------------------------
    async def on_invalidate(self, keys: list[str]) -> None:
        """The coordinator is about to acknowledge a change of ``keys`` by another node."""
        await asyncio.get_running_loop().run_in_executor(None, self._invalidate, keys, False)

    async def on_reset(self) -> None:
        """The session was lost: every lease is void."""
        await asyncio.get_running_loop().run_in_executor(None, self._invalidate, [], True)

    def _invalidate(self, keys: list[str], everything: bool) -> None:
        with llfuse.lock:
            self._epoch += 1
            until = time.monotonic() + BUSY_DIR_MEMO
            if len(self._no_listing) > 4096:
                self._no_listing.clear()
            for key in keys:
                if key.startswith("list:"):
                    self._no_listing[int(key[5:])] = until
            inodes, entries = self.meta.clear() if everything else self.meta.drop(keys)
        if self.mounted:
            self.kernel.forget(inodes, entries)

    def _entry(self, attrs: InodeAttrs) -> llfuse.EntryAttributes:
        """Kernel attributes; a file with uncommitted changes here shows their size."""
        e = llfuse.EntryAttributes()
        e.st_ino = attrs.ino
        e.generation = 0
        e.entry_timeout = self.ttl
        e.attr_timeout = self.meta.timeout(attrs.ino)
        e.st_mode = _TYPE_BITS[attrs.type] | attrs.mode
        e.st_nlink = attrs.nlink
        e.st_uid = attrs.uid
        e.st_gid = attrs.gid
        e.st_rdev = attrs.rdev or 0
        e.st_size = attrs.size
        e.st_atime_ns = attrs.atime_ns
        e.st_mtime_ns = attrs.mtime_ns
        e.st_ctime_ns = attrs.ctime_ns
        pending = self.files.pending(attrs.ino)
        if pending is not None:
            e.st_size, e.st_mtime_ns = pending
            e.st_ctime_ns = max(attrs.ctime_ns, pending[1])
            e.attr_timeout = 0
        e.st_blksize = IO_SIZE
        if pending is None and attrs.type == "file":
            e.st_blocks = attrs.blocks  # data chunks, not holes (the coordinator counts)
        else:
            e.st_blocks = -(-e.st_size // BLOCK) * (BLOCK // 512)
        return e

    def _learn(
        self, parent: int, name: str, attrs: InodeAttrs, until: float | None = None
    ) -> llfuse.EntryAttributes:
        """A new kernel reference to ``attrs.ino`` under ``parent``/``name`` (kept one ttl,
        or until ``until``: a lease's deadline)."""
        attrs = self.meta.put(attrs, until)
        self.meta.bind(parent, name, attrs.ino, until)
        self.meta.remember(attrs.ino)
        return self._entry(attrs)

    def _owner(self, parent: int, mode: int, ctx: llfuse.RequestContext) -> tuple[int, int]:
        """``(mode, gid)`` of a new inode: a set-group-ID directory passes its group on."""
        p = self._attrs(parent)
        if p.mode & stat.S_ISGID:
            if stat.S_ISDIR(mode):
                mode |= stat.S_ISGID
            return mode & 0o7777, p.gid
        return mode & 0o7777, ctx.gid

    def _made(
        self, parent: int, name: str, kind: str, mode: int, ctx: Any, **kw: Any
    ) -> tuple[llfuse.EntryAttributes, InodeAttrs]:
        """Create ``name``; its kernel entry and its attributes (which the node cache may
        not keep: an invalidation that crossed the answer voids the lease)."""
        perm, gid = self._owner(parent, mode, ctx)
        until: float | None = None
        if self.session is not None:  # leased: another node's change to it reaches us
            epoch = self._epoch
            leased = self._wait(
                self.session.create_entry_leased(parent, name, kind, perm, ctx.uid, gid, **kw)
            )
            attrs, after, before, lists = leased.value
            until = self._until(leased.deadline, epoch)
        else:
            attrs, after, before = self._wait(
                self.ns.create_entry(parent, name, kind, perm, ctx.uid, gid, **kw)
            )
            lists: list[int] = []
        if after is None:
            self.meta.invalidate(parent)
        else:  # the parent as the create left it: the next create here needs no getattr
            self.meta.put(after)
        self.meta.changed(parent, before, None if after is None else after.version)
        entry = self._learn(parent, name, attrs, until)
        if attrs.type == "dir":
            self.meta.complete(attrs.ino, attrs.version)  # new and empty: known completely
        if until is not None:
            for ino in lists:  # the new directory (empty), or our renewed parent listing
                if ino == attrs.ino or self.meta.is_listed(ino):
                    self.meta.listed(ino, until)
        return entry, attrs

    def _prefetch(self, parent: int) -> bool:
        """Names that exist but were unknown here, again and again in one directory (``stat``
        of every file after the kernel dropped its dentries): list it once per ttl instead
        ("readdirplus"). Names that do not exist (a create's lookup) do not count."""
        count, until = self._misses.get(parent, (0, 0.0))
        if count != PREFETCH_AFTER - 1 or until <= time.monotonic():
            return False
        self._misses[parent] = (count + 1, until)  # once per window
        offset = 0
        for _ in range(PREFETCH_BATCHES):
            entries, lease = self._listing(parent, offset)
            for e in entries:
                self.meta.bind(parent, e.name, self.meta.put(e.attrs, lease).ino, lease)
            if len(entries) < READDIR_BATCH:
                break
            offset = entries[-1].offset
        return True

    def _listing(self, parent: int, offset: int) -> tuple[list[Entry], float | None]:
        """A batch of ``parent``'s entries (``readdirplus``) and until when they may be kept
        (``None``: one ttl). With a session they are leased, small files with their
        manifest: reading back the small files of a listed directory asks nothing more."""
        if self.session is None:
            return self._wait(self.ns.readdir(parent, offset, READDIR_BATCH)), None
        epoch = self._epoch
        leased = self._wait(
            self.session.readdir_leased(parent, offset, READDIR_BATCH, manifests=True)
        )
        until = self._until(leased.deadline, epoch)
        return leased.value, until if until > time.monotonic() else None

    def _list_leased(self, parent: int) -> bool:
        """A name unknown in ``parent``: take a leased listing of it instead of asking for
        the one name (same round trip), so the next unknown names there (a ``tar -x``,
        ``cp -r``: a lookup before every create) are answered here while the lease lasts.
        False for a directory too large for one batch, or without a session."""
        if self.session is None or self.meta.is_listed(parent):
            return False
        now = time.monotonic()
        if self._no_listing.get(parent, 0.0) > now:
            return False
        epoch = self._epoch
        leased = self._wait(self.session.readdir_leased(parent, 0, READDIR_BATCH))
        until = self._until(leased.deadline, epoch)
        if len(leased.value) >= READDIR_BATCH:
            if len(self._no_listing) > 4096:
                self._no_listing.clear()
            self._no_listing[parent] = now + BIG_DIR_MEMO  # ask for single names there
            return False
        if until <= now:
            return False
        for e in leased.value:
            self.meta.bind(parent, e.name, self.meta.put(e.attrs, until).ino, until)
        self.meta.listed(parent, until)
        return True

    def _missed(self, parent: int) -> None:
        """The coordinator knew a name in ``parent`` that this node did not: count it."""
        now = time.monotonic()
        count, until = self._misses.get(parent, (0, 0.0))
        if until <= now:
            count, until = 0, now + self.ttl
            if len(self._misses) > 4096:
                self._misses.clear()
        self._misses[parent] = (count + 1, until)

    def _committed(self, attrs: InodeAttrs | None, epoch: int | None = None) -> None:
        """New content committed by this node: its page cache already holds it. Kept on the
        lease this node holds on the file's attributes (the coordinator does not push a
        change to its author, nor drop the author's lease), unless an invalidation came in
        since ``epoch`` (taken before the commit): then only for one ttl."""
        if attrs is not None:
            until = self.meta.lease_until(attrs.ino) if epoch == self._epoch else None
            self.meta.put(attrs, until)
            self.meta.data_follows(attrs.ino, _data_key(attrs))

    # --- names -----------------------------------------------------------------------------
    def _absent(self, parent: int, name: str) -> llfuse.EntryAttributes:
        """ "No such name": a negative entry the kernel keeps (no upcall for the next lookup)
        while this node's lease on that answer lasts, at most one ttl; another node's create
        of the name invalidates it in the kernel too (the push names every changed key)."""
        e = llfuse.EntryAttributes()
        e.st_ino = 0
        left = self.meta.absent_until(parent, name) - time.monotonic()
        e.entry_timeout = min(self.ttl, max(0.0, left))
        return e

    @_handler
    def lookup(self, parent_inode: int, name: bytes, ctx: Any) -> llfuse.EntryAttributes:
        n = _name(name)
        ino = self.meta.entry(parent_inode, n)
        attrs = None if ino is None else self.meta.get(ino)
        if attrs is None:
            if ino is None and self.meta.absent(parent_inode, n):
                return self._absent(parent_inode, n)
            if self._prefetch(parent_inode):
                ino = self.meta.entry(parent_inode, n)
                attrs = None if ino is None else self.meta.get(ino)
        if attrs is None and self.meta.denied(parent_inode, n):
            return self._absent(parent_inode, n)
        if attrs is None and ino is None and self._list_leased(parent_inode):
            ino = self.meta.entry(parent_inode, n)
            if ino is None:
                return self._absent(parent_inode, n)
            attrs = self.meta.get(ino)
            if attrs is not None:
                self.meta.remember(ino)
                return self._entry(attrs)
        if attrs is None and self.session is not None:
            epoch = self._epoch
            leased = self._wait(self.session.lookup_leased(parent_inode, n))
            until = self._until(leased.deadline, epoch)
            if leased.value is None:
                self.meta.deny(parent_inode, n, until)
                return self._absent(parent_inode, n)
            self._missed(parent_inode)
            attrs = self.meta.put(leased.value, until)
            self.meta.bind(parent_inode, n, attrs.ino, until)
            self.meta.remember(attrs.ino)
            return self._entry(attrs)
        if attrs is None:
            attrs = self._wait(self.ns.lookup(parent_inode, n))
            self._missed(parent_inode)
        return self._learn(parent_inode, n, attrs)

    @_handler
    def forget(self, inode_list: list[tuple[int, int]]) -> None:
        for ino, count in inode_list:
            self.meta.forget(ino, count)

    @_handler
    def getattr(self, inode: int, ctx: Any) -> llfuse.EntryAttributes:
        try:
            return self._entry(self._attrs(inode))
        except NotFound:
            attrs = self.files.orphan(inode)  # unlinked while open here: still readable
            if attrs is None:
                raise
            return self._entry(attrs)

    @_handler
    def setattr(
        self, inode: int, attr: llfuse.EntryAttributes, fields: Any, fh: int | None, ctx: Any
    ) -> llfuse.EntryAttributes:
        changes = {
            "mode": attr.st_mode & 0o7777 if fields.update_mode else None,
            "uid": attr.st_uid if fields.update_uid else None,
            "gid": attr.st_gid if fields.update_gid else None,
            "atime_ns": attr.st_atime_ns if fields.update_atime else None,
            "mtime_ns": attr.st_mtime_ns if fields.update_mtime else None,
        }
        changed = any(v is not None for v in changes.values())
        attrs = None
        if changed:  # times and modes apply to the committed content (cp -p: futimens, close)
            with llfuse.lock_released:
                self._committed(self.files.commit_ino(inode))
        if fields.update_size:  # through a handle: committed at close, like its writes
            with llfuse.lock_released:
                attrs = self.files.truncate(inode, attr.st_size, fh)
            self._committed(attrs)
        if changed or (attrs is None and not fields.update_size):
            attrs = self._wait(self.ns.setattr(inode, **changes))
        self.meta.invalidate(inode)
        return self._entry(self.meta.put(attrs) if attrs is not None else self._attrs(inode))

    @_handler
    def readlink(self, inode: int, ctx: Any) -> bytes:
        return os.fsencode(self._attrs(inode).target or "")

    @_handler
    def mknod(
        self, parent_inode: int, name: bytes, mode: int, rdev: int, ctx: Any
    ) -> llfuse.EntryAttributes:
        kind = _TYPE_NAMES.get(stat.S_IFMT(mode) or stat.S_IFREG)
        if kind is None or kind in ("dir", "symlink"):
            raise llfuse.FUSEError(errno.EINVAL)
        return self._made(parent_inode, _name(name), kind, mode, ctx, rdev=rdev)[0]

    @_handler
    def mkdir(self, parent_inode: int, name: bytes, mode: int, ctx: Any) -> llfuse.EntryAttributes:
        return self._made(parent_inode, _name(name), "dir", mode | stat.S_IFDIR, ctx)[0]

    @_handler
    def symlink(
        self, parent_inode: int, name: bytes, target: bytes, ctx: Any
    ) -> llfuse.EntryAttributes:
        n = _name(name)
        attrs = self._wait(self.ns.symlink(parent_inode, n, os.fsdecode(target), ctx.uid, ctx.gid))
        self.meta.invalidate(parent_inode)
        return self._learn(parent_inode, n, attrs)

    @_handler
    def link(
        self, inode: int, new_parent_inode: int, new_name: bytes, ctx: Any
    ) -> llfuse.EntryAttributes:
        n = _name(new_name)
        attrs = self._wait(self.ns.link(inode, new_parent_inode, n))
        self.meta.invalidate(new_parent_inode)
        return self._learn(new_parent_inode, n, attrs)

    def _removed(self, parent: int, name: str, is_dir: bool) -> None:
        after, before = self._wait(self.ns.remove_entry(parent, name, is_dir=is_dir))
        self.meta.unbind(parent, name)
        if after is None:
            self.meta.invalidate(parent)
            self.meta.incomplete(parent)
            return
        self.meta.put(after)  # the kernel revalidates the parent next: no getattr needed
        self.meta.changed(parent, before, after.version)

    @_handler
    def unlink(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._removed(parent_inode, _name(name), False)

    @_handler
    def rmdir(self, parent_inode: int, name: bytes, ctx: Any) -> None:
        self._removed(parent_inode, _name(name), True)

    @_handler
    def rename(
        self,
        parent_inode_old: int,
        name_old: bytes,
        parent_inode_new: int,
        name_new: bytes,
        ctx: Any,
    ) -> None:
        old, new = _name(name_old), _name(name_new)
        parents: list[InodeAttrs] = []
        if self.session is not None:  # the directories as the rename left them, too
            parents = self._wait(
                self.session.rename_entry(parent_inode_old, old, parent_inode_new, new)
            )
        else:
            self._wait(self.ns.rename(parent_inode_old, old, parent_inode_new, new))
        self.meta.unbind(parent_inode_new, new)  # the replaced inode, if any, lost a link
        moved = self.meta.unbind(parent_inode_old, old)
        if moved is not None:
            self.meta.bind(parent_inode_new, new, moved)
        else:  # the new name's inode is unknown here: a listing here would miss it
            self.meta.incomplete(parent_inode_new)
        self.meta.invalidate(parent_inode_old)
        self.meta.invalidate(parent_inode_new)
        for attrs in parents:  # the kernel revalidates them next: no getattr needed
            self.meta.put(attrs)
        # Leased listings stay: our own change does not void our leases (the coordinator
        # pushes it to the other holders only), and the entries above follow it. The
        # version-chained "complete" knowledge does not: the answer carries no versions.
        self.meta.unchained(parent_inode_old)
        self.meta.unchained(parent_inode_new)

    # --- directories -----------------------------------------------------------------------
    @_handler
    def opendir(self, inode: int, ctx: Any) -> int:
        fh = self._next_dir
        self._next_dir += 1
        self._dirs[fh] = _DirHandle(inode)
        return fh

    @_handler
    def readdir(self, fh: int, off: int) -> Iterator[tuple[bytes, llfuse.EntryAttributes, int]]:
        """Entries after cookie ``off``: 1 is ".", 2 is "..", ``c + 2`` the coordinator's ``c``."""
        d = self._dirs[fh]
        start = d.positions.get(off)
        if start is None or (start == len(d.batch) and not d.complete):
            self._fetch_entries(d, off)
            start = 0
        return _dirents(d.batch, start)

    def _fetch_entries(self, d: _DirHandle, off: int) -> None:
        batch: list[tuple[bytes, int, int, int]] = []
        if off < 2:
            me = self._attrs(d.ino)
            mode = _TYPE_BITS[me.type] | me.mode
            batch = [(b".", me.ino, mode, 1), (b"..", me.ino, mode, 2)][off:]
        entries, lease = self._listing(d.ino, max(0, off - 2))
        put, bind = self.meta.put, self.meta.bind
        for e in entries:
            attrs = put(e.attrs, lease)  # readdirplus: the lookups that follow stay local
            bind(d.ino, e.name, attrs.ino, lease)
            mode = _TYPE_BITS[attrs.type] | attrs.mode
            batch.append((os.fsencode(e.name), attrs.ino, mode, e.offset + 2))
        d.batch = batch
        d.positions = {off: 0}
        d.positions.update((entry[3], i + 1) for i, entry in enumerate(batch))
        d.complete = len(entries) < READDIR_BATCH

    @_handler
    def releasedir(self, fh: int) -> None:
        self._dirs.pop(fh, None)

    @_handler
    def fsyncdir(self, fh: int, datasync: bool) -> None:
        """The directory's changes on the coordinator's disk: its sync barrier."""
        with llfuse.lock_released:
            self.files.sync_namespace()

    # --- files -----------------------------------------------------------------------------
    @_handler
    def open(self, inode: int, flags: int, ctx: Any) -> int:
        known = self.meta.get(inode)  # what the kernel may have been told (lookup, listing)
        attrs = self._open_attrs(inode)
        changed = self.meta.data_changed(inode, _data_key(attrs))
        if known is not None and _data_key(known) != _data_key(attrs):
            changed = True  # e.g. listed before another node's commit: a stale size
        accessed = False
        if self.atimes is not None and flags & os.O_ACCMODE != os.O_WRONLY:
            now = time.time_ns()
            latest = self.atimes.latest(inode, attrs.atime_ns)
            if latest != attrs.atime_ns:  # a read here the coordinator has not heard of yet
                attrs = self.meta.amend(dataclasses.replace(attrs, atime_ns=latest))
            if relatime_due(attrs, now):  # noted here, sent in the next batch
                self.atimes.note(inode, now)
                attrs = self.meta.amend(dataclasses.replace(attrs, atime_ns=now))
                accessed = True
        if (changed or accessed) and self.mounted:
            with llfuse.lock_released:
                self.kernel.invalidate(inode, attr_only=not changed)
        with llfuse.lock_released:
            return self.files.open(inode, flags, attrs)

    def _open_attrs(self, ino: int) -> InodeAttrs:
        """Attributes with the manifest, as an open needs them (close-to-open): from a lease
        this node holds on them (another node's commit is pushed here, dropping them, before
        it is acknowledged), without a round trip; else asked for, and leased."""
        if self.session is None:
            return self.meta.put(self._wait(self.ns.getattr(ino)))
        held = self.meta.leased(ino)
        if held is not None and (held.manifest is not None or held.size == 0):
            return held  # a listing's compact rows carry no manifest: those are asked for
        epoch = self._epoch
        leased = self._wait(self.session.getattr_leased(ino))
        return self.meta.put(leased.value, self._until(leased.deadline, epoch))

    @_handler
    def create(
        self, parent_inode: int, name: bytes, mode: int, flags: int, ctx: Any
    ) -> tuple[int, llfuse.EntryAttributes]:
        n = _name(name)
        try:
            entry, attrs = self._made(parent_inode, n, "file", mode, ctx)
        except Exists:
            if flags & os.O_EXCL:
                raise
            # the name appeared since our (possibly cached) negative lookup: open it
            entry = self._learn(parent_inode, n, self._wait(self.ns.lookup(parent_inode, n)))
            return self.open(entry.st_ino, flags, ctx), entry
        self.meta.data_follows(entry.st_ino, _data_key(attrs))
        with llfuse.lock_released:
            fh = self.files.open(entry.st_ino, flags & ~os.O_TRUNC, attrs)
        return fh, entry

    def read(self, fh: int, off: int, size: int) -> memoryview | bytes:
        # The hot path: no decorator frame; the same errno mapping as ``_handler``. Every
        # read is counted (its thread's row), one in READ_SAMPLE_MASK + 1 timed.
        try:
            row = self._op_local.row
        except AttributeError:
            row = self.op_times.row()
        row[_READ_CALLS] += 1
        start = 0 if row[_READ_CALLS] & READ_SAMPLE_MASK else _clock()
        try:
            with _lock_released:
                data = self.files.read(fh, off, size)
        except llfuse.FUSEError:
            raise
        except Exception as exc:
            raise llfuse.FUSEError(errno_for(exc)) from None
        row[_READ_BYTES] += len(data)
        if start:
            self.op_times.observe(_READ_INDEX, _clock() - start)
            row[_READ_CALLS] -= 1  # observe counted the call again
        return data

    @_handler
    def write(self, fh: int, off: int, buf: bytes) -> int:
        with llfuse.lock_released:
            n = self.files.write(fh, off, buf)
        self.op_times.row()[_WRITE_BYTES] += n
        return n

    @_handler
    def flush(self, fh: int) -> None:
        epoch = self._epoch
        with llfuse.lock_released:
            attrs = self.files.flush(fh)
        self._committed(attrs, epoch)

    @_handler
    def release(self, fh: int) -> None:
        epoch = self._epoch
        with llfuse.lock_released:
            attrs = self.files.release(fh)
        self._committed(attrs, epoch)

    @_handler
    def fsync(self, fh: int, datasync: bool) -> None:
        epoch = self._epoch
        with llfuse.lock_released:
            attrs = self.files.fsync(fh)
        self._committed(attrs, epoch)

    # --- the rest --------------------------------------------------------------------------
    @_handler
    def statfs(self, ctx: Any) -> llfuse.StatvfsData:
        """Capacity: the NVMe tier's (S3 has no limit); used: the bytes of every file."""
        usage = self.manager.nvme.usage()
        ns = self._wait(self.ns.statfs())
        st = llfuse.StatvfsData()
        st.f_bsize = IO_SIZE
        st.f_frsize = BLOCK
        total = max(usage["capacity"], ns["bytes"] + usage["free"])
        st.f_blocks = total // BLOCK
        st.f_bfree = st.f_bavail = max(0, total - ns["bytes"]) // BLOCK
        st.f_files = ns["inodes"] + (1 << 32)
        st.f_ffree = st.f_favail = 1 << 32
        st.f_namemax = ns.get("max_name", NAME_MAX)
        return st

    @_handler
    def access(self, inode: int, mode: int, ctx: Any) -> bool:
        raise llfuse.FUSEError(errno.ENOSYS)  # default_permissions: the kernel checks

    # --- extended attributes ----------------------------------------------------------------
    # The kernel has checked the caller already (the namespace rules, permissions with every
    # group of the process, the name and size limits), so the coordinator is asked without
    # an identity; it also calls in itself (``security.capability`` before every write, to
    # drop it on a write by another user). The inode's attributes say how many it has: with
    # none (most files) every answer is given here, without a round trip. Other namespaces
    # (``system.posix_acl_*``, which ``ls -l`` asks for) are answered ENOTSUP here too.
    def _xattr_count(self, inode: int) -> int:
        """How many extended attributes ``inode`` has, as the attributes held here say (asked
        again when they do not say: a listing's)."""
        try:
            attrs = self._attrs(inode)
            if attrs.xattrs is None:
                self.meta.invalidate(inode)
                attrs = self._attrs(inode)
        except NotFound:
            if self.files.orphan(inode) is None:
                raise
            return 0  # unlinked while open here: its attributes went with the inode
        return attrs.xattrs if attrs.xattrs is not None else 1

    def _xattr_changed(self, attrs: InodeAttrs) -> None:
        self.meta.invalidate(attrs.ino)
        self.meta.put(attrs)

    @_handler
    def getxattr(self, inode: int, name: bytes, ctx: Any = None) -> bytes:
        # ``ctx`` None: llfuse's own existence check for XATTR_CREATE / XATTR_REPLACE, which
        # FUSE 2 does not pass on (so neither is atomic against another node's setxattr)
        n = _xattr_name(name)
        if not self._xattr_count(inode):
            raise NoAttribute(f"no attribute {n!r} on inode {inode}")
        return self._wait(self.ns.getxattr(inode, n))

    @_handler
    def setxattr(self, inode: int, name: bytes, value: bytes, ctx: Any) -> None:
        n = _xattr_name(name)
        self._xattr_changed(self._wait(self.ns.setxattr(inode, n, value)))

    @_handler
    def listxattr(self, inode: int, ctx: Any) -> list[bytes]:
        if not self._xattr_count(inode):
            return []
        names = self._wait(self.ns.listxattr(inode))
        if ctx.uid != 0:  # as ext4: trusted.* is listed to root only
            names = [n for n in names if not n.startswith("trusted.")]
        return [n.encode() for n in names]

    @_handler
    def removexattr(self, inode: int, name: bytes, ctx: Any) -> None:
        n = _xattr_name(name)
        self._xattr_changed(self._wait(self.ns.removexattr(inode, n)))
