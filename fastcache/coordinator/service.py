"""The coordinator's logic: peers, chunk/file locations and the inode-based namespace.

No HTTP here (``app.py`` adapts it). Every operation is one store transaction: the rules below
run inside ``Store.transact`` on the store's thread, so each call is atomic, and committed when
it returns: it survives the coordinator being killed (SIGKILL) and restarted. It is on disk
(survives power loss) after ``sync()`` returns, the barrier a client sends for its ``fsync``,
and at the latest ``sync_interval`` seconds after the call anyway (see ``store.py``).
Concurrent operations share one commit (group commit); each still succeeds or fails alone.

Namespace rules, as POSIX and ext4 have them:
- a directory's nlink is 2 + its subdirectories; a file's is its number of entries, and the
  inode goes away when that reaches 0;
- rename moves one entry row. Moving a directory checks only its new ancestors (a walk *up*
  from the new parent, O(depth)), never the subtree, so it is O(1) in the subtree's size;
- a file's content is a manifest with a version: ``commit_manifest`` takes the version the
  writer started from and refuses a stale one (``Conflict``), so no write is lost silently.
"""

from __future__ import annotations

import stat
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar

from fastcache.coordinator.leases import attr_key, entry_key, list_key
from fastcache.coordinator.model import (
    DEFAULT_READDIR,
    INODE_TYPES,
    INT64_MAX,
    MAX_ATIME_BATCH,
    MAX_FILE_SIZE,
    MAX_LOCATION_BATCH,
    MAX_READDIR,
    MAX_TARGET_BYTES,
    MAX_URL,
    PEER_ID_RE,
    ROOT_INO,
    STATUS_RE,
    UID_MAX,
    URL_RE,
    XATTR_CREATE,
    XATTR_LIST_MAX,
    XATTR_REPLACE,
    XATTR_TOTAL_MAX,
    Entry,
    InodeAttrs,
    PeerInfo,
    allocated_blocks,
    check_file_limits,
    check_xattr_value,
    entry_from_row,
    validate_manifest,
    xattr_namespace,
)
from fastcache.coordinator.store import DEFAULT_SYNC_INTERVAL, Store, Txn, open_store
from fastcache.errors import (
    BadRequest,
    Conflict,
    Exists,
    InvalidArgument,
    IsADirectory,
    NoAttribute,
    NoSpace,
    NotADirectory,
    NotEmpty,
    NotFound,
    NotPermitted,
    PermissionDenied,
)
from fastcache.paths import is_digest, join_path, split_path, validate_name

__all__ = ["CoordinatorService", "location_key"]

T = TypeVar("T")
# A listing asked for with manifests carries those of files up to this size (small files:
# one chunk, a manifest of about 100 bytes); larger files' opens ask for theirs.
LISTED_MANIFEST_MAX = 64 * 1024
ChangeHook = Callable[[list[str]], Awaitable[None]]


def _entry_keys(parent: int, name: str) -> list[str]:
    """The lease keys an entry change in ``parent`` touches: the name, the listing, the dir."""
    return [entry_key(parent, name), list_key(parent), attr_key(parent)]


def _int(value: Any, name: str, lo: int, hi: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
        raise InvalidArgument(f"{name} must be an integer in [{lo}, {hi}]")
    return value


def _caller(uid: int | None, gids: Sequence[int]) -> None:
    if uid is not None:
        _int(uid, "uid", 0, UID_MAX)
    for gid in gids:
        _int(gid, "gid", 0, UID_MAX)


def location_key(path: str | None = None, chunk: str | None = None) -> str:
    """A location record's key: a normalised path, or ``chunk:<digest>``."""
    if (path is None) == (chunk is None):
        raise BadRequest("give exactly one of path and chunk")
    if chunk is not None:
        if not is_digest(chunk):
            raise BadRequest("chunk must be 32 lowercase hex characters")
        return f"chunk:{chunk}"
    assert path is not None
    parts = split_path(path)
    if not parts:
        raise InvalidArgument("the root has no location")
    return join_path(parts)


def _dir(tx: Txn, ino: int) -> InodeAttrs:
    attrs = tx.get_inode(ino)
    if attrs is None:
        raise NotFound(f"no inode {ino}")
    if not attrs.is_dir:
        raise NotADirectory(f"inode {ino} is not a directory")
    return attrs


def _inode(tx: Txn, ino: int) -> InodeAttrs:
    attrs = tx.get_inode(ino)
    if attrs is None:
        raise NotFound(f"no inode {ino}")
    return attrs


def _child(tx: Txn, parent: int, name: str) -> InodeAttrs:
    ino = tx.lookup(parent, name)
    if ino is None:
        raise NotFound(f"no entry {name!r} in directory {parent}")
    return _inode(tx, ino)


def _drop_link(tx: Txn, attrs: InodeAttrs, now: int) -> None:
    """One entry of a non-directory went away: decrement nlink, delete the inode at 0."""
    if attrs.nlink <= 1:
        tx.delete_inode(attrs.ino)
    else:
        tx.update_inode(attrs.ino, nlink=attrs.nlink - 1, ctime_ns=now)


def _not_into_itself(tx: Txn, moving: int, new_parent: int) -> None:
    """Refuse to move directory ``moving`` under itself: walk up from ``new_parent``."""
    cur: int | None = new_parent
    while cur is not None and cur != ROOT_INO:
        if cur == moving:
            raise InvalidArgument("cannot move a directory into its own subtree")
        cur = tx.parent_of(cur)


def _may(attrs: InodeAttrs, uid: int, gids: Sequence[int], want: int) -> bool:
    """POSIX mode bits: the owner's, else the group's (any of ``gids``), else the others'."""
    if uid == attrs.uid:
        bits = attrs.mode >> 6
    elif attrs.gid in gids:
        bits = attrs.mode >> 3
    else:
        bits = attrs.mode
    return bits & want == want


def _xattr_access(
    attrs: InodeAttrs, name: str, space: str, write: bool, uid: int | None, gids: Sequence[int]
) -> None:
    """Linux's ``xattr_permission`` (and the capability module's rule for ``security.*``).

    ``user.*`` lives on regular files and directories only (elsewhere: EPERM to change,
    ENODATA to read, for root too), needs write permission to change (on a sticky
    directory, ownership) and read permission to read; ``trusted.*`` is root's alone
    (EPERM to change, ENODATA to read); anyone reads ``security.*``, root alone changes it.
    ``uid`` ``None``: a caller that has checked already (a node, after its kernel did).
    """
    if space == "user" and attrs.type not in ("file", "dir"):
        if write:
            raise NotPermitted(f"user.* attributes live on files and directories only ({name!r})")
        raise NoAttribute(f"no attribute {name!r} on inode {attrs.ino}")
    if uid is None or uid == 0:
        return
    if space == "trusted" or (space == "security" and write):
        if write:
            raise NotPermitted(f"only root may change {name!r}")
        raise NoAttribute(f"no attribute {name!r} on inode {attrs.ino}")
    if space == "security":
        return
    if write and attrs.is_dir and attrs.mode & stat.S_ISVTX and uid != attrs.uid:
        raise NotPermitted("only the owner changes user.* attributes of a sticky directory")
    if not _may(attrs, uid, gids, 2 if write else 4):
        raise PermissionDenied(f"no {'write' if write else 'read'} permission on inode {attrs.ino}")


def _walk(tx: Txn, parts: tuple[str, ...]) -> int:
    cur = ROOT_INO
    for name in parts:
        _dir(tx, cur)
        nxt = tx.lookup(cur, name)
        if nxt is None:
            raise NotFound(f"no such file or directory: {join_path(parts)}")
        cur = nxt
    return cur


class CoordinatorService:
    def __init__(
        self,
        store: Store,
        peer_timeout: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.peer_timeout = peer_timeout
        self._clock = clock  # wall clock: peers' last_seen must survive a restart
        # The lease hook (``session.py``): awaited with the lease keys a namespace change
        # touched, after its commit and before the call returns, so every other node caching
        # them has been told (or its lease ran out) when the change is acknowledged.
        self.on_change: ChangeHook | None = None

    async def _mutate(self, op: Callable[[Txn], T], keys: list[str]) -> T:
        """One namespace transaction; ``op`` may add to ``keys`` what it changed."""
        result = await self.store.transact(op)
        if self.on_change is not None and keys:
            await self.on_change(list(dict.fromkeys(keys)))
        return result

    @classmethod
    async def open(
        cls,
        store_url: str,
        peer_timeout: float = 60.0,
        synchronous: str = "NORMAL",
        sync_interval: float = DEFAULT_SYNC_INTERVAL,
    ) -> CoordinatorService:
        """On the store ``store_url`` names (``config.CoordinatorConfig.store_url``)."""
        store = await open_store(store_url, synchronous=synchronous, sync_interval=sync_interval)
        return cls(store, peer_timeout)

    async def close(self) -> None:
        """Sync and close the store: a graceful stop leaves everything acknowledged on disk."""
        await self.store.close()

    async def sync(self) -> None:
        """The barrier: returns once every change acknowledged before the call is on disk."""
        await self.store.sync()

    # --- peers ---------------------------------------------------------------------------
    def _live(self, peer: PeerInfo, now: float) -> bool:
        return now - peer.last_seen <= self.peer_timeout

    async def register_peer(self, peer_id: str, url: str, capacity: int, used: int = 0) -> PeerInfo:
        if not isinstance(peer_id, str) or not PEER_ID_RE.fullmatch(peer_id):
            raise BadRequest("peer_id must be 1-128 of [A-Za-z0-9._:-]")
        if not isinstance(url, str) or len(url) > MAX_URL or not URL_RE.fullmatch(url):
            raise BadRequest("url must be an http(s) URL")
        _int(capacity, "capacity", 0, INT64_MAX)
        _int(used, "used", 0, INT64_MAX)
        now = self._clock()

        def op(tx: Txn) -> PeerInfo:
            old = tx.get_peer(peer_id)
            if old is not None and not self._live(old, now):
                tx.delete_peer(peer_id)  # it was gone: its location records are stale
                old = None
            peer = PeerInfo(
                peer_id=peer_id,
                url=url,
                capacity=capacity,
                used=used,
                status="active",
                registered_at=now if old is None else old.registered_at,
                last_seen=now,
            )
            tx.put_peer(peer)
            return peer

        return await self.store.transact(op)

    async def heartbeat(
        self, peer_id: str, used: int | None = None, status: str | None = None
    ) -> PeerInfo:
        """Record that a peer is alive. ``NotFound`` tells it to register again."""
        if used is not None:
            _int(used, "used", 0, INT64_MAX)
        if status is not None and (not isinstance(status, str) or not STATUS_RE.fullmatch(status)):
            raise BadRequest("status must be a short lowercase word")
        now = self._clock()

        def op(tx: Txn) -> PeerInfo:
            peer = tx.get_peer(peer_id)
            if peer is None or not self._live(peer, now):  # timed out counts as gone
                raise NotFound(f"unknown peer {peer_id!r}: register again")
            peer.last_seen = now
            if used is not None:
                peer.used = used
            if status is not None:
                peer.status = status
            tx.put_peer(peer)
            return peer

        return await self.store.transact(op)

    async def deregister_peer(self, peer_id: str) -> None:
        def op(tx: Txn) -> None:
            if not tx.delete_peer(peer_id):
                raise NotFound(f"unknown peer {peer_id!r}")

        await self.store.transact(op)

    async def list_peers(self, live_only: bool = True) -> list[PeerInfo]:
        now = self._clock()
        peers = await self.store.transact(lambda tx: tx.list_peers(), readonly=True)
        return [p for p in peers if not live_only or self._live(p, now)]

    async def cleanup_peers(self) -> list[str]:
        """Drop peers silent for longer than ``peer_timeout``, with their location records."""
        now = self._clock()

        def op(tx: Txn) -> list[str]:
            gone = [p.peer_id for p in tx.list_peers() if not self._live(p, now)]
            for peer_id in gone:
                tx.delete_peer(peer_id)
            return gone

        return await self.store.transact(op)

    async def grant_grace(self) -> None:
        """At start: every known peer gets a full timeout to reach us again.

        While the coordinator was down no peer could heartbeat; dropping them all at once
        on restart would throw away every location record for nothing.
        """
        now = self._clock()

        def op(tx: Txn) -> None:
            for peer in tx.list_peers():
                peer.last_seen = max(peer.last_seen, now)
                tx.put_peer(peer)

        await self.store.transact(op)

    # --- locations -----------------------------------------------------------------------
    async def add_location(self, key: str, peer_id: str) -> None:
        now = self._clock()

        def op(tx: Txn) -> None:
            peer = tx.get_peer(peer_id)
            if peer is None or not self._live(peer, now):
                raise NotFound(f"unknown peer {peer_id!r}")
            tx.add_location(key, peer_id)

        await self.store.transact(op)

    async def remove_location(self, key: str, peer_id: str) -> None:
        await self.store.transact(lambda tx: tx.remove_location(key, peer_id))

    async def add_locations(self, keys: Sequence[str], peer_id: str) -> None:
        """Record ``peer_id`` as a holder of every key, in one transaction (all or none)."""
        keys = list(dict.fromkeys(keys))
        if len(keys) > MAX_LOCATION_BATCH:
            raise BadRequest(f"at most {MAX_LOCATION_BATCH} locations per request")
        now = self._clock()

        def op(tx: Txn) -> None:
            peer = tx.get_peer(peer_id)
            if peer is None or not self._live(peer, now):
                raise NotFound(f"unknown peer {peer_id!r}")
            tx.add_locations(keys, peer_id)

        await self.store.transact(op)

    async def remove_locations(self, keys: Sequence[str], peer_id: str) -> None:
        keys = list(dict.fromkeys(keys))
        if len(keys) > MAX_LOCATION_BATCH:
            raise BadRequest(f"at most {MAX_LOCATION_BATCH} locations per request")
        await self.store.transact(lambda tx: tx.remove_locations(keys, peer_id))

    async def locations(self, key: str) -> list[PeerInfo]:
        """The live peers recorded as holding ``key``."""
        now = self._clock()

        def op(tx: Txn) -> list[PeerInfo]:
            peers = (tx.get_peer(pid) for pid in tx.location_peers(key))
            return [p for p in peers if p is not None and self._live(p, now)]

        return await self.store.transact(op, readonly=True)

    # --- namespace: inode operations ------------------------------------------------------
    async def lookup(self, parent: int, name: str) -> InodeAttrs:
        validate_name(name)

        def op(tx: Txn) -> InodeAttrs:
            _dir(tx, parent)
            return _child(tx, parent, name)

        return await self.store.transact(op, readonly=True)

    async def getattr(self, ino: int) -> InodeAttrs:
        return await self.store.transact(lambda tx: _inode(tx, ino), readonly=True)

    async def touch_atimes(self, atimes: list[tuple[int, int]]) -> int:
        """Reads seen on a node (``relatime``): each inode's atime moves forward to the time
        given, never back, and nothing else changes (no ctime, no version: a read is not a
        change of the file). One transaction for the batch; inodes gone meanwhile are
        skipped. How many moved."""
        if len(atimes) > MAX_ATIME_BATCH:
            raise BadRequest(f"at most {MAX_ATIME_BATCH} atimes per batch")
        for ino, ns in atimes:
            _int(ino, "ino", 1, INT64_MAX)
            _int(ns, "atime_ns", 0, INT64_MAX)
        keys: list[str] = []

        def op(tx: Txn) -> int:
            keys.clear()
            for ino, ns in atimes:
                attrs = tx.get_inode(ino)
                if attrs is not None and attrs.atime_ns < ns:
                    tx.update_inode(ino, atime_ns=ns)
                    keys.append(attr_key(ino))
            return len(keys)

        return await self._mutate(op, keys)

    async def setattr(
        self,
        ino: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
    ) -> InodeAttrs:
        """Change attributes; any change bumps ctime, a size change also mtime.

        A size change only records the size: the writer commits the truncated manifest.
        """
        changes: dict[str, int] = {}
        if mode is not None:
            changes["mode"] = _int(mode, "mode", 0, 0o7777)
        if uid is not None:
            changes["uid"] = _int(uid, "uid", 0, UID_MAX)
        if gid is not None:
            changes["gid"] = _int(gid, "gid", 0, UID_MAX)
        if atime_ns is not None:
            changes["atime_ns"] = _int(atime_ns, "atime_ns", -INT64_MAX, INT64_MAX)
        if mtime_ns is not None:
            changes["mtime_ns"] = _int(mtime_ns, "mtime_ns", -INT64_MAX, INT64_MAX)
        if size is not None:
            _int(size, "size", 0, MAX_FILE_SIZE)

        def op(tx: Txn) -> InodeAttrs:
            attrs = _inode(tx, ino)
            now = time.time_ns()
            if size is not None:
                if attrs.is_dir:
                    raise IsADirectory(f"inode {ino} is a directory")
                if attrs.type != "file":
                    raise InvalidArgument(f"inode {ino} is not a regular file")
                if size != attrs.size:
                    changes["size"] = size
                    # cut data goes; a longer file is a hole until its writer commits
                    changes["blocks"] = min(attrs.blocks, -(-size // 4096) * 8)
                    changes.setdefault("mtime_ns", now)
            if changes or size is not None:
                changes["ctime_ns"] = now
                tx.update_inode(ino, **changes)
            return _inode(tx, ino)

        return await self._mutate(op, [attr_key(ino)])

    async def readdir(self, ino: int, offset: int = 0, limit: int = DEFAULT_READDIR) -> list[Entry]:
        """Entries after cookie ``offset``, in creation order; attrs carry no manifest.

        Cookies are the entries' serial numbers, so entries added or removed while a
        listing is under way never shift the others.
        """
        return [entry_from_row(row) for row in await self.readdir_rows(ino, offset, limit)]

    async def readdir_rows(
        self, ino: int, offset: int = 0, limit: int = DEFAULT_READDIR, manifests: bool = False
    ) -> list[list[Any]]:
        """``readdir`` as listing rows (``model.entry_from_row``) (what the session sends).

        ``manifests``: each row ends with the manifest of a file of at most
        ``LISTED_MANIFEST_MAX`` bytes (``None`` for the others), read in the same
        transaction: a node that reads the small files it lists opens them without asking.
        """
        _int(offset, "offset", 0, INT64_MAX)
        _int(limit, "limit", 1, MAX_READDIR)

        def op(tx: Txn) -> list[list[Any]]:
            _dir(tx, ino)
            return tx.list_rows(ino, offset, limit, LISTED_MANIFEST_MAX if manifests else 0)

        return await self.store.transact(op, readonly=True)

    def _create_tx(
        self,
        tx: Txn,
        parent: int,
        name: str,
        type_: str,
        mode: int,
        uid: int,
        gid: int,
        rdev: int = 0,
        target: str | None = None,
        keys: list[str] | None = None,
    ) -> InodeAttrs:
        p = _dir(tx, parent)
        if tx.lookup(parent, name) is not None:
            raise Exists(f"{name!r} already exists in directory {parent}")
        now = time.time_ns()
        is_dir = type_ == "dir"
        attrs = InodeAttrs(
            ino=0,
            type=type_,
            mode=mode,
            uid=uid,
            gid=gid,
            size=len(target.encode()) if target is not None else 0,
            atime_ns=now,
            mtime_ns=now,
            ctime_ns=now,
            nlink=2 if is_dir else 1,
            rdev=rdev,
            target=target,
            xattrs=0,
        )
        attrs.ino = tx.add_inode(attrs)
        tx.add_entry(parent, name, attrs.ino)
        if keys is not None:
            keys += _entry_keys(parent, name)
        tx.update_inode(
            parent, nlink=p.nlink + is_dir, mtime_ns=now, ctime_ns=now, version=p.version + 1
        )
        return attrs

    async def create(
        self,
        parent: int,
        name: str,
        type: str = "file",
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        rdev: int = 0,
        target: str | None = None,
    ) -> InodeAttrs:
        """Create an inode of any type and its entry; ``Exists`` if the name is taken."""
        attrs, _, _ = await self.create_entry(
            parent, name, type, mode, uid, gid, rdev=rdev, target=target
        )
        return attrs

    async def create_entry(
        self,
        parent: int,
        name: str,
        type: str = "file",
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        rdev: int = 0,
        target: str | None = None,
    ) -> tuple[InodeAttrs, InodeAttrs, int]:
        """``create``, plus the parent's attributes after it and the parent's version before.

        Every entry change bumps its directory's version, so a node that knew the directory
        at ``version before`` knows it completely after this create too.
        """
        validate_name(name)
        if type not in INODE_TYPES:
            raise InvalidArgument(f"type must be one of {', '.join(INODE_TYPES)}")
        _int(mode, "mode", 0, 0o7777)
        _int(uid, "uid", 0, UID_MAX)
        _int(gid, "gid", 0, UID_MAX)
        _int(rdev, "rdev", 0, INT64_MAX)
        if type == "symlink":
            if not isinstance(target, str) or not target or "\0" in target:
                raise InvalidArgument("a symlink needs a non-empty target without NUL")
            try:
                if len(target.encode()) > MAX_TARGET_BYTES:
                    raise InvalidArgument("symlink target too long")
            except UnicodeEncodeError:
                raise InvalidArgument("symlink target is not valid UTF-8") from None
        elif target is not None:
            raise InvalidArgument("only a symlink has a target")

        def op(tx: Txn) -> tuple[InodeAttrs, InodeAttrs, int]:
            attrs = self._create_tx(tx, parent, name, type, mode, uid, gid, rdev, target)
            after = _inode(tx, parent)
            return attrs, after, after.version - 1

        return await self._mutate(op, _entry_keys(parent, name))

    async def mkdir(
        self, parent: int, name: str, mode: int = 0o755, uid: int = 0, gid: int = 0
    ) -> InodeAttrs:
        return await self.create(parent, name, "dir", mode, uid, gid)

    async def link(self, ino: int, new_parent: int, new_name: str) -> InodeAttrs:
        validate_name(new_name)

        def op(tx: Txn) -> InodeAttrs:
            attrs = _inode(tx, ino)
            if attrs.is_dir:
                raise NotPermitted("hard links to directories are not allowed")
            p = _dir(tx, new_parent)
            if tx.lookup(new_parent, new_name) is not None:
                raise Exists(f"{new_name!r} already exists in directory {new_parent}")
            now = time.time_ns()
            tx.add_entry(new_parent, new_name, ino)
            tx.update_inode(ino, nlink=attrs.nlink + 1, ctime_ns=now)
            tx.update_inode(new_parent, mtime_ns=now, ctime_ns=now, version=p.version + 1)
            return _inode(tx, ino)

        return await self._mutate(op, [*_entry_keys(new_parent, new_name), attr_key(ino)])

    def _unlink_tx(
        self, tx: Txn, parent: int, name: str, keys: list[str] | None = None
    ) -> InodeAttrs:
        p = _dir(tx, parent)
        attrs = _child(tx, parent, name)
        if attrs.is_dir:
            raise IsADirectory(f"{name!r} is a directory")
        if keys is not None:
            keys += [*_entry_keys(parent, name), attr_key(attrs.ino)]
        now = time.time_ns()
        tx.remove_entry(parent, name)
        _drop_link(tx, attrs, now)
        tx.update_inode(parent, mtime_ns=now, ctime_ns=now, version=p.version + 1)
        return _inode(tx, parent)

    def _rmdir_tx(
        self, tx: Txn, parent: int, name: str, keys: list[str] | None = None
    ) -> InodeAttrs:
        p = _dir(tx, parent)
        attrs = _child(tx, parent, name)
        if not attrs.is_dir:
            raise NotADirectory(f"{name!r} is not a directory")
        if tx.has_entries(attrs.ino):
            raise NotEmpty(f"directory {name!r} is not empty")
        if keys is not None:
            keys += [*_entry_keys(parent, name), attr_key(attrs.ino), list_key(attrs.ino)]
        now = time.time_ns()
        tx.remove_entry(parent, name)
        tx.delete_inode(attrs.ino)
        tx.update_inode(
            parent, nlink=p.nlink - 1, mtime_ns=now, ctime_ns=now, version=p.version + 1
        )
        return _inode(tx, parent)

    async def unlink(self, parent: int, name: str) -> InodeAttrs:
        """Remove a non-directory entry; the parent's attributes after it (version - 1 before)."""
        validate_name(name)
        keys: list[str] = []
        return await self._mutate(lambda tx: self._unlink_tx(tx, parent, name, keys), keys)

    async def rmdir(self, parent: int, name: str) -> InodeAttrs:
        """Remove an empty directory; the parent's attributes after it (version - 1 before)."""
        validate_name(name)
        keys: list[str] = []
        return await self._mutate(lambda tx: self._rmdir_tx(tx, parent, name, keys), keys)

    async def rename(
        self,
        parent: int,
        name: str,
        new_parent: int,
        new_name: str,
        *,
        noreplace: bool = False,
        exchange: bool = False,
    ) -> list[InodeAttrs]:
        """Move one entry (``RENAME_NOREPLACE`` / ``RENAME_EXCHANGE`` as flags), atomically;
        the attributes of the directories involved as the rename left them."""
        validate_name(name)
        validate_name(new_name)
        if noreplace and exchange:
            raise InvalidArgument("noreplace and exchange exclude each other")

        keys: list[str] = []

        def op(tx: Txn) -> list[InodeAttrs]:
            dirs = {parent: _dir(tx, parent), new_parent: _dir(tx, new_parent)}
            src = _child(tx, parent, name)
            dst_ino = tx.lookup(new_parent, new_name)
            if parent == new_parent and name == new_name:
                return list(dirs.values())
            keys.clear()  # what a successful rename touches (op may run again)
            keys.extend(_entry_keys(parent, name) + _entry_keys(new_parent, new_name))
            keys.append(attr_key(src.ino))
            if dst_ino is not None:  # replaced (nlink, gone) or exchanged (ctime)
                keys.extend((attr_key(dst_ino), list_key(dst_ino)))
            if src.is_dir and parent != new_parent:
                _not_into_itself(tx, src.ino, new_parent)
            now = time.time_ns()
            nlink = {ino: attrs.nlink for ino, attrs in dirs.items()}
            if exchange:
                if dst_ino is None:
                    raise NotFound(f"no entry {new_name!r} to exchange with")
                dst = _inode(tx, dst_ino)
                if dst.is_dir and parent != new_parent:
                    _not_into_itself(tx, dst.ino, parent)
                tx.set_entry_ino(parent, name, dst.ino)
                tx.set_entry_ino(new_parent, new_name, src.ino)
                nlink[parent] += dst.is_dir - src.is_dir
                nlink[new_parent] += src.is_dir - dst.is_dir
                tx.update_inode(dst.ino, ctime_ns=now)
            else:
                if dst_ino is not None:
                    if noreplace:
                        raise Exists(f"{new_name!r} already exists")
                    if dst_ino == src.ino:  # two links to one inode: POSIX does nothing
                        return list(dirs.values())
                    dst = _inode(tx, dst_ino)
                    if src.is_dir and not dst.is_dir:
                        raise NotADirectory(f"{new_name!r} is not a directory")
                    if not src.is_dir and dst.is_dir:
                        raise IsADirectory(f"{new_name!r} is a directory")
                    if dst.is_dir and tx.has_entries(dst.ino):
                        raise NotEmpty(f"directory {new_name!r} is not empty")
                    tx.remove_entry(new_parent, new_name)
                    if dst.is_dir:
                        tx.delete_inode(dst.ino)
                        nlink[new_parent] -= 1
                    else:
                        _drop_link(tx, dst, now)
                tx.move_entry(parent, name, new_parent, new_name)
                nlink[parent] -= src.is_dir
                nlink[new_parent] += src.is_dir
            tx.update_inode(src.ino, ctime_ns=now)
            for ino, count in nlink.items():
                version = dirs[ino].version + 1
                tx.update_inode(ino, nlink=count, mtime_ns=now, ctime_ns=now, version=version)
            return [_inode(tx, ino) for ino in dirs]

        return await self._mutate(op, keys)

    def _commit_tx(
        self, tx: Txn, ino: int, manifest: dict[str, Any], expected_version: int | None
    ) -> InodeAttrs:
        attrs = _inode(tx, ino)
        if attrs.is_dir:
            raise IsADirectory(f"inode {ino} is a directory")
        if attrs.type != "file":
            raise InvalidArgument(f"inode {ino} is not a regular file")
        if expected_version is not None and expected_version != attrs.version:
            raise Conflict(
                f"stale manifest version {expected_version}: inode {ino} is at {attrs.version}"
            )
        now = time.time_ns()
        tx.update_inode(
            ino,
            version=attrs.version + 1,
            size=manifest["size"],
            blocks=allocated_blocks(manifest),
            manifest=manifest,
            mtime_ns=now,
            ctime_ns=now,
        )
        return _inode(tx, ino)

    async def commit_manifest(
        self,
        ino: int,
        manifest: dict[str, Any],
        expected_version: int,
        *,
        holder: str | None = None,
        held: Sequence[str] = (),
    ) -> InodeAttrs:
        """Replace a file's content if it is still at ``expected_version``, else ``Conflict``.

        ``holder`` / ``held``: the committing peer and the chunks (digests) it wrote that only
        it holds yet; recorded as their locations in the same transaction, so the other nodes
        can find them as soon as the manifest is visible (no separate publish round trip).
        Best effort like a publish: an unknown or timed-out holder records nothing.
        """
        canonical = validate_manifest(manifest)
        check_file_limits(canonical)
        _int(expected_version, "expected_version", 0, INT64_MAX)
        keys = [location_key(chunk=digest) for digest in dict.fromkeys(held)]
        if len(keys) > MAX_LOCATION_BATCH:
            raise BadRequest(f"at most {MAX_LOCATION_BATCH} held chunks per commit")
        if keys and holder is None:
            raise BadRequest("held chunks need a holder")
        now = self._clock()

        def op(tx: Txn) -> InodeAttrs:
            attrs = self._commit_tx(tx, ino, canonical, expected_version)
            if keys and holder is not None:
                peer = tx.get_peer(holder)
                if peer is not None and self._live(peer, now):
                    tx.add_locations(keys, holder)
            return attrs

        return await self._mutate(op, [attr_key(ino)])

    # --- namespace: extended attributes ----------------------------------------------------
    # Per inode, so hard links share them and a rename keeps them; they go with the inode.
    # ``uid``/``gids``: the caller to check (Linux's rules, ``_xattr_access``); ``None`` for
    # a caller that checked already (a node: its kernel did, with every group of the process).
    async def getxattr(
        self, ino: int, name: str, *, uid: int | None = None, gids: Sequence[int] = ()
    ) -> bytes:
        """One attribute's value; ``NoAttribute`` (ENODATA) if the inode has none of that name."""
        space = xattr_namespace(name)
        _caller(uid, gids)

        def op(tx: Txn) -> bytes:
            _xattr_access(_inode(tx, ino), name, space, False, uid, gids)
            value = tx.get_xattr(ino, name)
            if value is None:
                raise NoAttribute(f"no attribute {name!r} on inode {ino}")
            return value

        return await self.store.transact(op, readonly=True)

    async def listxattr(
        self, ino: int, *, uid: int | None = None, gids: Sequence[int] = ()
    ) -> list[str]:
        """The names, in order. As on Linux no permission is needed, and a caller other than
        root does not see ``trusted.*``."""
        _caller(uid, gids)

        def op(tx: Txn) -> list[str]:
            _inode(tx, ino)
            names = tx.list_xattrs(ino)
            if uid not in (None, 0):
                names = [n for n in names if not n.startswith("trusted.")]
            return names

        return await self.store.transact(op, readonly=True)

    async def setxattr(
        self,
        ino: int,
        name: str,
        value: bytes,
        flags: int = 0,
        *,
        uid: int | None = None,
        gids: Sequence[int] = (),
    ) -> InodeAttrs:
        """Create or replace one attribute; the inode's attributes after it (ctime moves).

        ``XATTR_CREATE``: ``Exists`` if it is there; ``XATTR_REPLACE``: ``NoAttribute`` if it
        is not. Beyond the inode's room (``XATTR_LIST_MAX`` of names, ``XATTR_TOTAL_MAX`` of
        names and values): ``NoSpace``. The version stays: it is the content's, which a
        writer commits against.
        """
        space = xattr_namespace(name)
        value = check_xattr_value(value)
        _int(flags, "flags", 0, XATTR_CREATE | XATTR_REPLACE)
        _caller(uid, gids)

        def op(tx: Txn) -> InodeAttrs:
            attrs = _inode(tx, ino)
            _xattr_access(attrs, name, space, True, uid, gids)
            exists = tx.get_xattr(ino, name) is not None
            if exists and flags & XATTR_CREATE:
                raise Exists(f"attribute {name!r} exists on inode {ino}")
            if not exists and flags & XATTR_REPLACE:
                raise NoAttribute(f"no attribute {name!r} on inode {ino}")
            tx.set_xattr(ino, name, value)
            count, names, total = tx.xattr_usage(ino)
            if names + count > XATTR_LIST_MAX or total > XATTR_TOTAL_MAX:
                raise NoSpace(f"no room for more extended attributes on inode {ino}")
            tx.update_inode(ino, ctime_ns=time.time_ns(), xattrs=count)
            return _inode(tx, ino)

        return await self._mutate(op, [attr_key(ino)])

    async def removexattr(
        self, ino: int, name: str, *, uid: int | None = None, gids: Sequence[int] = ()
    ) -> InodeAttrs:
        """Remove one attribute (``NoAttribute`` if absent); the inode's attributes after it."""
        space = xattr_namespace(name)
        _caller(uid, gids)

        def op(tx: Txn) -> InodeAttrs:
            _xattr_access(_inode(tx, ino), name, space, True, uid, gids)
            if not tx.remove_xattr(ino, name):
                raise NoAttribute(f"no attribute {name!r} on inode {ino}")
            count = tx.xattr_usage(ino)[0]
            tx.update_inode(ino, ctime_ns=time.time_ns(), xattrs=count)
            return _inode(tx, ino)

        return await self._mutate(op, [attr_key(ino)])

    # --- namespace: path helpers (the client API and location records use paths) --------
    async def resolve(self, path: str) -> InodeAttrs:
        parts = split_path(path)
        return await self.store.transact(lambda tx: _inode(tx, _walk(tx, parts)), readonly=True)

    async def put_file(
        self,
        path: str,
        manifest: dict[str, Any],
        expected_version: int | None = None,
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        make_parents: bool = True,
    ) -> InodeAttrs:
        """Create or replace the file at ``path`` (and missing parents), in one transaction.

        ``expected_version`` 0 means "must not exist yet" (or exist unwritten); ``None``
        replaces whatever is there.
        """
        parts = split_path(path)
        if not parts:
            raise IsADirectory("/ is a directory")
        canonical = validate_manifest(manifest)
        check_file_limits(canonical)
        _int(mode, "mode", 0, 0o7777)
        _int(uid, "uid", 0, UID_MAX)
        _int(gid, "gid", 0, UID_MAX)
        if expected_version is not None:
            _int(expected_version, "expected_version", 0, INT64_MAX)
        keys: list[str] = []

        def op(tx: Txn) -> InodeAttrs:
            keys.clear()
            cur = ROOT_INO
            for name in parts[:-1]:
                _dir(tx, cur)
                nxt = tx.lookup(cur, name)
                if nxt is None:
                    if not make_parents:
                        raise NotFound(f"no such directory: {name!r}")
                    nxt = self._create_tx(tx, cur, name, "dir", 0o755, uid, gid, keys=keys).ino
                cur = nxt
            _dir(tx, cur)
            ino = tx.lookup(cur, parts[-1])
            if ino is None:
                if expected_version not in (None, 0):
                    raise Conflict(f"{join_path(parts)} does not exist")
                ino = self._create_tx(tx, cur, parts[-1], "file", mode, uid, gid, keys=keys).ino
            keys.append(attr_key(ino))
            return self._commit_tx(tx, ino, canonical, expected_version)

        return await self._mutate(op, keys)

    async def delete_path(self, path: str) -> None:
        """Unlink a file (or other non-directory), or remove an empty directory."""
        parts = split_path(path)
        if not parts:
            raise InvalidArgument("cannot delete the root")

        keys: list[str] = []

        def op(tx: Txn) -> None:
            keys.clear()
            parent = _walk(tx, parts[:-1])
            _dir(tx, parent)
            if _child(tx, parent, parts[-1]).is_dir:
                self._rmdir_tx(tx, parent, parts[-1], keys)
            else:
                self._unlink_tx(tx, parent, parts[-1], keys)

        await self._mutate(op, keys)

    # --- stats ---------------------------------------------------------------------------
    async def stats(self) -> dict[str, Any]:
        now = self._clock()

        def op(tx: Txn) -> dict[str, Any]:
            peers = tx.list_peers()
            return {
                "peers": {
                    "total": len(peers),
                    "live": sum(self._live(p, now) for p in peers),
                },
                "inodes": tx.inode_counts(),
                "bytes": tx.file_bytes(),
                "locations": tx.location_count(),
            }

        stats = await self.store.transact(op, readonly=True)
        stats["store"] = self.store.counters()  # commits, syncs, grouped transactions
        return stats

    async def peers_status(self) -> list[tuple[PeerInfo, bool]]:
        """Every peer still recorded and whether it is live (a silent one stays listed, not
        live, until the cleanup drops it)."""
        now = self._clock()
        peers = await self.list_peers(live_only=False)
        return [(p, self._live(p, now)) for p in peers]

    async def manifests(
        self, after: int = 0, limit: int = 1000
    ) -> list[tuple[int, dict[str, Any]]]:
        """One page of every inode's manifest (``ino > after``, inode order): fsck and gc."""
        return await self.store.transact(lambda tx: tx.list_manifests(after, limit), readonly=True)

    async def statfs(self) -> dict[str, int]:
        def op(tx: Txn) -> dict[str, int]:
            return {
                "inodes": sum(tx.inode_counts().values()),
                "bytes": tx.file_bytes(),
                "max_name": 255,
            }

        return await self.store.transact(op, readonly=True)
