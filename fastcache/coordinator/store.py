"""The coordinator's persistent state behind one small interface, and its SQLite engine.

The contract is row-level: a ``Store`` runs a function inside one transaction and hands it a
``Txn`` of plain reads and writes of the wire types (``model.py``). The namespace rules
(nlink, rename checks, versions) live once in ``service.py`` on top of it, so another engine
(PostgreSQL, etcd) only has to provide atomic transactions, these rows and a sync barrier.

``SQLiteStore`` keeps one connection on one dedicated thread: the event loop never touches
sqlite, and transactions are serialised by construction. What it guarantees:

- **Acknowledged = committed.** ``transact`` returns (or raises ``fn``'s exception) only
  after the transaction has committed or rolled back. The commit is a write into the WAL
  (``synchronous=NORMAL``, no fsync), so it survives SIGKILL of the coordinator: the WAL is
  in the page cache, which outlives the process, and the next open recovers it (and syncs it).
- **On disk by a barrier or within ``sync_interval``.** ``sync()`` returns once everything
  committed before it was called is on disk (one ``fdatasync`` of the ``-wal`` file, shared
  by concurrent callers); a commit is synced at the latest ``sync_interval`` seconds after
  it anyway, and ``close()`` syncs. Only power loss or a kernel crash between a commit and
  its sync can lose it. (``synchronous=FULL`` still works: every commit fsyncs, ``sync`` is
  free.)
- **Group commit.** The thread drains whatever is queued: the write functions run in one
  ``BEGIN IMMEDIATE … COMMIT``, each in its own ``SAVEPOINT``, so one that raises rolls back
  alone and the others commit together; the read-only ones run together in one read
  transaction (rolled back after: they must not write). If SQLite aborts a group as a whole
  (disk full, I/O error) or its commit fails, the functions that had succeeded run again,
  each alone: a function must act only through its ``Txn`` and may run more than once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from queue import Empty, SimpleQueue
from typing import Any, Protocol, TypeVar

from fastcache.coordinator.model import (
    INODE_FIELDS,
    LISTING_FIELDS,
    ROOT_INO,
    Entry,
    InodeAttrs,
    PeerInfo,
    allocated_blocks,
    entry_from_row,
)

T = TypeVar("T")
log = logging.getLogger("fastcache.coordinator.store")

SCHEMA_VERSION = 3  # 2: inodes.blocks; 3: xattrs, inodes.xattrs
DEFAULT_SYNC_INTERVAL = 0.1  # seconds from a commit to its fsync, at the latest
MAX_GROUP = 1024  # queued calls the store's thread takes at once (one commit for the writes)


# --- the interface -----------------------------------------------------------------------
class Txn(Protocol):
    """Reads and writes inside one transaction. Synchronous: it runs on the store's thread."""

    def get_inode(self, ino: int) -> InodeAttrs | None: ...
    def add_inode(self, attrs: InodeAttrs) -> int: ...  # ignores attrs.ino, returns the new one
    def update_inode(self, ino: int, **fields: Any) -> None: ...
    def delete_inode(self, ino: int) -> None: ...
    def lookup(self, parent: int, name: str) -> int | None: ...
    def add_entry(self, parent: int, name: str, ino: int) -> int: ...
    def remove_entry(self, parent: int, name: str) -> None: ...
    def move_entry(self, parent: int, name: str, new_parent: int, new_name: str) -> None: ...
    def set_entry_ino(self, parent: int, name: str, ino: int) -> None: ...
    def list_entries(self, parent: int, after: int, limit: int) -> list[Entry]: ...
    def list_rows(self, parent: int, after: int, limit: int) -> list[list[Any]]:
        """``list_entries`` as listing rows (``model.entry_from_row``), straight from SQL."""
        ...

    def has_entries(self, parent: int) -> bool: ...
    def parent_of(self, ino: int) -> int | None: ...
    def inode_counts(self) -> dict[str, int]: ...
    def file_bytes(self) -> int: ...
    def put_peer(self, peer: PeerInfo) -> None: ...
    def get_peer(self, peer_id: str) -> PeerInfo | None: ...
    def list_peers(self) -> list[PeerInfo]: ...
    def delete_peer(self, peer_id: str) -> bool: ...  # and its location records
    def add_location(self, key: str, peer_id: str) -> None: ...
    def remove_location(self, key: str, peer_id: str) -> None: ...
    def add_locations(self, keys: Sequence[str], peer_id: str) -> None: ...
    def remove_locations(self, keys: Sequence[str], peer_id: str) -> None: ...
    def location_peers(self, key: str) -> list[str]: ...
    def location_count(self) -> int: ...
    def list_manifests(self, after: int, limit: int) -> list[tuple[int, dict[str, Any]]]:
        """``(ino, manifest)`` of up to ``limit`` inodes with content, ``ino > after``, in
        inode order (open-unlinked ones included): what fsck and gc walk."""
        ...

    def get_xattr(self, ino: int, name: str) -> bytes | None: ...
    def list_xattrs(self, ino: int) -> list[str]: ...  # in name order
    def set_xattr(self, ino: int, name: str, value: bytes) -> None: ...  # create or replace
    def remove_xattr(self, ino: int, name: str) -> bool: ...
    def xattr_usage(self, ino: int) -> tuple[int, int, int]: ...  # count, name bytes, all bytes


class Store(Protocol):
    async def transact(self, fn: Callable[[Txn], T], *, readonly: bool = False) -> T:
        """Run ``fn`` in one transaction: committed before returning, rolled back on raise.

        Committed means it survives the coordinator process being killed; ``sync`` makes it
        survive power loss. ``fn`` may share the transaction with others and may run again.
        """
        ...

    async def sync(self) -> None:
        """Barrier: every transaction committed before the call is on disk when it returns."""
        ...

    def counters(self) -> dict[str, Any]:
        """Commit, sync and grouping counters for the stats endpoint."""
        ...

    async def close(self) -> None:
        """Sync, then release everything."""
        ...


# --- SQLite ------------------------------------------------------------------------------
_DDL = """
CREATE TABLE IF NOT EXISTS inodes (
    ino INTEGER PRIMARY KEY AUTOINCREMENT,
    type TEXT NOT NULL,
    mode INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    gid INTEGER NOT NULL,
    size INTEGER NOT NULL,
    atime_ns INTEGER NOT NULL,
    mtime_ns INTEGER NOT NULL,
    ctime_ns INTEGER NOT NULL,
    nlink INTEGER NOT NULL,
    rdev INTEGER NOT NULL DEFAULT 0,
    target TEXT,
    version INTEGER NOT NULL DEFAULT 0,
    blocks INTEGER NOT NULL DEFAULT 0,
    xattrs INTEGER NOT NULL DEFAULT 0,
    manifest TEXT
);
CREATE TABLE IF NOT EXISTS entries (
    cookie INTEGER PRIMARY KEY AUTOINCREMENT,
    parent INTEGER NOT NULL,
    name TEXT NOT NULL,
    ino INTEGER NOT NULL,
    UNIQUE (parent, name)
);
CREATE INDEX IF NOT EXISTS entries_by_parent ON entries (parent, cookie);
CREATE INDEX IF NOT EXISTS entries_by_ino ON entries (ino);
CREATE TABLE IF NOT EXISTS peers (
    peer_id TEXT PRIMARY KEY,
    url TEXT NOT NULL,
    capacity INTEGER NOT NULL,
    used INTEGER NOT NULL,
    status TEXT NOT NULL,
    registered_at REAL NOT NULL,
    last_seen REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS locations (
    key TEXT NOT NULL,
    peer_id TEXT NOT NULL,
    PRIMARY KEY (key, peer_id)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS locations_by_peer ON locations (peer_id);
CREATE TABLE IF NOT EXISTS xattrs (
    ino INTEGER NOT NULL,
    name TEXT NOT NULL,
    value BLOB NOT NULL,
    PRIMARY KEY (ino, name)
) WITHOUT ROWID;
"""
_INODE_COLS = ", ".join(INODE_FIELDS)
_UPDATABLE = frozenset(INODE_FIELDS) - {"ino", "type"}


def _inode(row: tuple[Any, ...], with_manifest: bool = True) -> InodeAttrs:
    attrs = InodeAttrs(*row)
    if attrs.manifest is not None:
        attrs.manifest = json.loads(attrs.manifest) if with_manifest else None  # type: ignore[arg-type]
    return attrs


_ROW_COLS = ", ".join(f"i.{c}" for c in LISTING_FIELDS)


class _SQLiteTxn:
    """``Txn`` over one sqlite connection; valid only inside ``SQLiteStore.transact``."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._c = conn

    def get_inode(self, ino: int) -> InodeAttrs | None:
        row = self._c.execute(f"SELECT {_INODE_COLS} FROM inodes WHERE ino = ?", (ino,)).fetchone()
        return None if row is None else _inode(row)

    def add_inode(self, attrs: InodeAttrs) -> int:
        values = attrs.to_json()
        values["manifest"] = None if attrs.manifest is None else json.dumps(attrs.manifest)
        values["xattrs"] = 0  # a new inode has none
        cols = [c for c in INODE_FIELDS if c != "ino"]
        cur = self._c.execute(
            f"INSERT INTO inodes ({', '.join(cols)}) VALUES ({', '.join('?' * len(cols))})",
            [values[c] for c in cols],
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def update_inode(self, ino: int, **fields: Any) -> None:
        if not fields:
            return
        bad = set(fields) - _UPDATABLE
        if bad:
            raise ValueError(f"not updatable: {sorted(bad)}")
        if "manifest" in fields and fields["manifest"] is not None:
            fields["manifest"] = json.dumps(fields["manifest"])
        sets = ", ".join(f"{name} = ?" for name in fields)
        self._c.execute(f"UPDATE inodes SET {sets} WHERE ino = ?", (*fields.values(), ino))

    def delete_inode(self, ino: int) -> None:
        self._c.execute("DELETE FROM inodes WHERE ino = ?", (ino,))
        self._c.execute("DELETE FROM xattrs WHERE ino = ?", (ino,))

    def lookup(self, parent: int, name: str) -> int | None:
        row = self._c.execute(
            "SELECT ino FROM entries WHERE parent = ? AND name = ?", (parent, name)
        ).fetchone()
        return None if row is None else int(row[0])

    def add_entry(self, parent: int, name: str, ino: int) -> int:
        cur = self._c.execute(
            "INSERT INTO entries (parent, name, ino) VALUES (?, ?, ?)", (parent, name, ino)
        )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def remove_entry(self, parent: int, name: str) -> None:
        self._c.execute("DELETE FROM entries WHERE parent = ? AND name = ?", (parent, name))

    def move_entry(self, parent: int, name: str, new_parent: int, new_name: str) -> None:
        self._c.execute(
            "UPDATE entries SET parent = ?, name = ? WHERE parent = ? AND name = ?",
            (new_parent, new_name, parent, name),
        )

    def set_entry_ino(self, parent: int, name: str, ino: int) -> None:
        self._c.execute(
            "UPDATE entries SET ino = ? WHERE parent = ? AND name = ?", (ino, parent, name)
        )

    def list_entries(self, parent: int, after: int, limit: int) -> list[Entry]:
        return [entry_from_row(row) for row in self.list_rows(parent, after, limit)]

    def list_rows(self, parent: int, after: int, limit: int) -> list[list[Any]]:
        # a listing never carries manifests: not even read (a file's is its chunk list)
        rows = self._c.execute(
            f"SELECT e.name, e.cookie, {_ROW_COLS} FROM entries e JOIN inodes i ON i.ino = e.ino "
            "WHERE e.parent = ? AND e.cookie > ? ORDER BY e.cookie LIMIT ?",
            (parent, after, limit),
        ).fetchall()
        return [list(r) for r in rows]

    def has_entries(self, parent: int) -> bool:
        row = self._c.execute("SELECT 1 FROM entries WHERE parent = ? LIMIT 1", (parent,))
        return row.fetchone() is not None

    def parent_of(self, ino: int) -> int | None:
        row = self._c.execute("SELECT parent FROM entries WHERE ino = ? LIMIT 1", (ino,))
        found = row.fetchone()
        return None if found is None else int(found[0])

    def inode_counts(self) -> dict[str, int]:
        rows = self._c.execute("SELECT type, COUNT(*) FROM inodes GROUP BY type").fetchall()
        return {str(t): int(n) for t, n in rows}

    def file_bytes(self) -> int:
        row = self._c.execute("SELECT COALESCE(SUM(size), 0) FROM inodes WHERE type = 'file'")
        return int(row.fetchone()[0])

    def put_peer(self, peer: PeerInfo) -> None:
        self._c.execute(
            "INSERT OR REPLACE INTO peers (peer_id, url, capacity, used, status, registered_at,"
            " last_seen) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                peer.peer_id,
                peer.url,
                peer.capacity,
                peer.used,
                peer.status,
                peer.registered_at,
                peer.last_seen,
            ),
        )

    def get_peer(self, peer_id: str) -> PeerInfo | None:
        row = self._c.execute(
            "SELECT peer_id, url, capacity, used, status, registered_at, last_seen FROM peers"
            " WHERE peer_id = ?",
            (peer_id,),
        ).fetchone()
        return None if row is None else PeerInfo(*row)

    def list_peers(self) -> list[PeerInfo]:
        rows = self._c.execute(
            "SELECT peer_id, url, capacity, used, status, registered_at, last_seen FROM peers"
            " ORDER BY peer_id"
        ).fetchall()
        return [PeerInfo(*row) for row in rows]

    def delete_peer(self, peer_id: str) -> bool:
        self._c.execute("DELETE FROM locations WHERE peer_id = ?", (peer_id,))
        return self._c.execute("DELETE FROM peers WHERE peer_id = ?", (peer_id,)).rowcount > 0

    def add_location(self, key: str, peer_id: str) -> None:
        self._c.execute(
            "INSERT OR IGNORE INTO locations (key, peer_id) VALUES (?, ?)", (key, peer_id)
        )

    def remove_location(self, key: str, peer_id: str) -> None:
        self._c.execute("DELETE FROM locations WHERE key = ? AND peer_id = ?", (key, peer_id))

    def add_locations(self, keys: Sequence[str], peer_id: str) -> None:
        self._c.executemany(
            "INSERT OR IGNORE INTO locations (key, peer_id) VALUES (?, ?)",
            ((key, peer_id) for key in keys),
        )

    def remove_locations(self, keys: Sequence[str], peer_id: str) -> None:
        self._c.executemany(
            "DELETE FROM locations WHERE key = ? AND peer_id = ?",
            ((key, peer_id) for key in keys),
        )

    def location_peers(self, key: str) -> list[str]:
        rows = self._c.execute(
            "SELECT peer_id FROM locations WHERE key = ? ORDER BY peer_id", (key,)
        ).fetchall()
        return [str(r[0]) for r in rows]

    def location_count(self) -> int:
        return int(self._c.execute("SELECT COUNT(*) FROM locations").fetchone()[0])

    def list_manifests(self, after: int, limit: int) -> list[tuple[int, dict[str, Any]]]:
        rows = self._c.execute(
            "SELECT ino, manifest FROM inodes WHERE ino > ? AND manifest IS NOT NULL"
            " ORDER BY ino LIMIT ?",
            (after, limit),
        ).fetchall()
        return [(int(ino), json.loads(doc)) for ino, doc in rows]

    def get_xattr(self, ino: int, name: str) -> bytes | None:
        row = self._c.execute(
            "SELECT value FROM xattrs WHERE ino = ? AND name = ?", (ino, name)
        ).fetchone()
        return None if row is None else bytes(row[0])

    def list_xattrs(self, ino: int) -> list[str]:
        rows = self._c.execute("SELECT name FROM xattrs WHERE ino = ? ORDER BY name", (ino,))
        return [str(r[0]) for r in rows.fetchall()]

    def set_xattr(self, ino: int, name: str, value: bytes) -> None:
        self._c.execute(
            "INSERT OR REPLACE INTO xattrs (ino, name, value) VALUES (?, ?, ?)", (ino, name, value)
        )

    def remove_xattr(self, ino: int, name: str) -> bool:
        cur = self._c.execute("DELETE FROM xattrs WHERE ino = ? AND name = ?", (ino, name))
        return cur.rowcount > 0

    def xattr_usage(self, ino: int) -> tuple[int, int, int]:
        row = self._c.execute(
            "SELECT COUNT(*), COALESCE(SUM(LENGTH(CAST(name AS BLOB))), 0),"
            " COALESCE(SUM(LENGTH(value)), 0) FROM xattrs WHERE ino = ?",
            (ino,),
        ).fetchone()
        names = int(row[1])
        return int(row[0]), names, names + int(row[2])


def _migrate(conn: sqlite3.Connection) -> None:
    """Bring a store written by an older fastcache up to ``SCHEMA_VERSION``."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(inodes)")}
    if "blocks" not in columns:  # version 1: compute every file's allocated blocks once
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("ALTER TABLE inodes ADD COLUMN blocks INTEGER NOT NULL DEFAULT 0")
        rows = conn.execute("SELECT ino, manifest FROM inodes WHERE manifest IS NOT NULL")
        for ino, doc in rows.fetchall():
            conn.execute(
                "UPDATE inodes SET blocks = ? WHERE ino = ?",
                (allocated_blocks(json.loads(doc)), ino),
            )
        conn.execute("COMMIT")
    if "xattrs" not in columns:  # version 2: no extended attributes anywhere yet
        conn.execute("ALTER TABLE inodes ADD COLUMN xattrs INTEGER NOT NULL DEFAULT 0")


class _Job:
    """One queued call for the store's thread; ``ok``/``value`` hold its outcome."""

    __slots__ = ("fn", "fut", "kind", "loop", "ok", "sent", "value")

    def __init__(
        self, kind: int, fn: Callable[..., Any], fut: asyncio.Future[Any], loop: Any
    ) -> None:
        self.kind = kind
        self.fn = fn
        self.fut = fut
        self.loop = loop
        self.ok = False
        self.sent = False  # its outcome is on the way to the loop: no more changes
        self.value: Any = None


_WRITE, _READ, _CALL, _STOP = range(4)


def _settle(jobs: list[_Job]) -> None:
    """On the event loop: hand each job's outcome to its caller (unless it gave up)."""
    for job in jobs:
        fut = job.fut
        if fut.done():
            continue
        if job.ok:
            fut.set_result(job.value)
        elif isinstance(job.value, StopIteration):  # a Future refuses StopIteration
            fut.set_exception(RuntimeError(f"transaction raised {job.value!r}"))
        else:
            fut.set_exception(job.value)


class SQLiteStore:
    """SQLite in WAL mode on one dedicated thread. Build it with ``await SQLiteStore.open``.

    The thread drains whatever is queued: the write transactions among it run in one
    ``BEGIN IMMEDIATE … COMMIT`` with a ``SAVEPOINT`` each (group commit), the read-only ones
    together in one read transaction. Durability: see the module docstring and ``sync``.
    """

    def __init__(
        self,
        path: Path,
        synchronous: str = "NORMAL",
        sync_interval: float = DEFAULT_SYNC_INTERVAL,
    ) -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError("synchronous must be FULL or NORMAL")
        if not sync_interval >= 0:
            raise ValueError("sync_interval must be >= 0")
        self.path = path
        self._wal_path = Path(f"{path}-wal")
        self._synchronous = synchronous
        self._sync_interval = sync_interval
        self._queue: SimpleQueue[_Job] = SimpleQueue()
        self._thread = threading.Thread(target=self._serve, name="fastcache-sqlite", daemon=True)
        self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastcache-wal-sync")
        self._conn: sqlite3.Connection | None = None
        self._closed = False
        self._wal_fd = -1
        self._wal_id: tuple[int, int] | None = None
        # written by the store's thread only (plain int stores: the loop may read them)
        self._commit_seq = 0  # commits that changed something: a sync covers those it saw
        self._commits = 0  # write commits, changing something or not
        self._transactions = 0  # write functions committed
        self._grouped = 0  # ... of them in a commit shared with another function
        self._rolled_back = 0  # write functions that raised (rolled back alone)
        self._reads = 0
        self._max_group = 0
        # the event loop's side
        self._synced_seq = 0
        self._syncs = 0  # WAL fsyncs
        self._barriers = 0  # sync() calls
        self._sync_task: asyncio.Task[None] | None = None
        self._sync_error: BaseException | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._timer_task: asyncio.Task[None] | None = None
        self._sync_pending = False  # a periodic sync is scheduled or running

    @classmethod
    async def open(
        cls,
        path: Path,
        synchronous: str = "NORMAL",
        sync_interval: float = DEFAULT_SYNC_INTERVAL,
    ) -> SQLiteStore:
        store = cls(path, synchronous, sync_interval)
        store._thread.start()
        try:
            await store._call(store._connect)
        except BaseException:
            store._closed = True
            done = asyncio.get_running_loop().create_future()
            store._queue.put(_Job(_STOP, lambda: None, done, None))  # ends the thread
            store._syncer.shutdown(wait=False)
            raise
        return store

    # --- the store's thread ----------------------------------------------------------------
    def _serve(self) -> None:
        queue = self._queue
        while True:
            jobs = [queue.get()]
            while len(jobs) < MAX_GROUP:
                try:
                    jobs.append(queue.get_nowait())
                except Empty:
                    break
            try:
                if self._run_jobs(jobs):
                    return
            except BaseException as exc:  # the thread must outlive any bug
                log.exception("store thread: unexpected error; failing its batch")
                if self._conn is not None and self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                lost = [job for job in jobs if not job.sent]
                for job in lost:
                    if not job.ok:  # ok: committed (or read) already, its value stands
                        job.value = exc
                self._deliver(lost)

    def _run_jobs(self, jobs: list[_Job]) -> bool:
        """Run one drained batch in order of kind; True once the store is stopped."""
        reads: list[_Job] = []
        writes: list[_Job] = []
        for job in jobs:
            if job.kind == _WRITE:
                writes.append(job)
            elif job.kind == _READ:
                reads.append(job)
            else:  # a control call: everything queued before it runs first
                self._flush(reads, writes)
                reads, writes = [], []
                try:
                    job.value, job.ok = job.fn(), True
                except BaseException as exc:  # handed to the caller
                    job.value = exc
                self._deliver([job])
                if job.kind == _STOP:
                    self._fail_queued()
                    return True
        self._flush(reads, writes)
        return False

    def _fail_queued(self) -> None:
        rest: list[_Job] = []
        while True:
            try:
                job = self._queue.get_nowait()
            except Empty:
                break
            job.value = RuntimeError("store is closed")
            rest.append(job)
        self._deliver(rest)

    def _flush(self, reads: list[_Job], writes: list[_Job]) -> None:
        if reads:
            self._run_reads(reads)
            self._deliver(reads)
        if writes:
            self._run_writes(writes)
            self._deliver(writes)

    def _deliver(self, jobs: list[_Job]) -> None:
        loops: dict[Any, list[_Job]] = {}
        for job in jobs:
            job.sent = True
            if job.loop is not None:
                loops.setdefault(job.loop, []).append(job)
        for loop, mine in loops.items():
            try:
                loop.call_soon_threadsafe(self._settle_and_note, mine)
            except RuntimeError:  # that loop is closed: nobody is waiting any more
                pass

    def _settle_and_note(self, jobs: list[_Job]) -> None:
        _settle(jobs)
        self._note_change()

    def _conn_or_fail(self, jobs: list[_Job]) -> sqlite3.Connection | None:
        if self._conn is None:
            for job in jobs:
                job.value = RuntimeError("store is closed")
        return self._conn

    def _run_reads(self, jobs: list[_Job]) -> None:
        conn = self._conn_or_fail(jobs)
        if conn is None:
            return
        txn = _SQLiteTxn(conn)
        conn.execute("BEGIN")
        for job in jobs:
            if job.fut.done():  # its caller gave up (cancelled) before it ran
                continue
            try:
                job.value, job.ok = job.fn(txn), True
            except BaseException as exc:  # handed to the caller
                job.value = exc
        if conn.in_transaction:
            conn.execute("ROLLBACK")  # read only: nothing to keep, and a ROLLBACK cannot fail
        self._reads += len(jobs)

    @staticmethod
    def _end(conn: sqlite3.Connection, how: str) -> None:
        try:
            conn.execute(how)
        except sqlite3.Error:
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    def _run_writes(self, jobs: list[_Job]) -> None:
        conn = self._conn_or_fail(jobs)
        if conn is None:
            return
        live = [job for job in jobs if not job.fut.done()]
        if len(live) == 1:
            self._run_alone(conn, live[0])
        elif live:
            self._run_group(conn, live)

    def _run_alone(self, conn: sqlite3.Connection, job: _Job) -> None:
        """One function, one transaction: no savepoint needed."""
        changes = conn.total_changes
        try:
            conn.execute("BEGIN IMMEDIATE")
        except BaseException as exc:  # handed to the caller
            job.value = exc
            return
        try:
            job.value = job.fn(_SQLiteTxn(conn))
        except BaseException as exc:  # handed to the caller
            job.value = exc
            self._rolled_back += 1
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            return
        try:
            self._end(conn, "COMMIT")
        except BaseException as exc:  # handed to the caller
            job.value = exc
            return
        job.ok = True
        self._committed(conn, changes)
        self._transactions += 1
        self._max_group = max(self._max_group, 1)

    def _run_group(self, conn: sqlite3.Connection, jobs: list[_Job]) -> None:
        """Many functions, one transaction and one commit; each one inside a savepoint, so
        a function that raises is rolled back alone. Should SQLite abort the transaction as
        a whole (disk full, I/O error) or the commit fail, the functions that had succeeded
        run again, each in its own transaction: nothing is reported done that is not."""
        changes = conn.total_changes
        try:
            conn.execute("BEGIN IMMEDIATE")
        except BaseException:  # each one tries alone and reports its own error
            for job in jobs:
                self._run_alone(conn, job)
            return
        txn = _SQLiteTxn(conn)
        done: list[_Job] = []
        for i, job in enumerate(jobs):
            conn.execute("SAVEPOINT fn")
            try:
                job.value = job.fn(txn)
            except BaseException as exc:  # handed to the caller
                job.value = exc
                self._rolled_back += 1
                if not conn.in_transaction:  # SQLite rolled everything back
                    self._retry_alone(conn, done + jobs[i + 1 :])
                    return
                conn.execute("ROLLBACK TO fn")
                conn.execute("RELEASE fn")
            else:
                conn.execute("RELEASE fn")
                done.append(job)
        try:
            self._end(conn, "COMMIT")
        except BaseException:
            self._retry_alone(conn, done)
            return
        for job in done:
            job.ok = True
        self._committed(conn, changes)
        self._transactions += len(done)
        if len(done) > 1:
            self._grouped += len(done)
        self._max_group = max(self._max_group, len(done))

    def _committed(self, conn: sqlite3.Connection, changes_before: int) -> None:
        self._commits += 1
        if conn.total_changes != changes_before:  # else no WAL frame was written: no sync
            self._commit_seq += 1

    def _retry_alone(self, conn: sqlite3.Connection, jobs: list[_Job]) -> None:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        for job in jobs:
            job.value = None
            self._run_alone(conn, job)

    def _connect(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute(f"PRAGMA synchronous = {self._synchronous}")
            conn.execute("PRAGMA busy_timeout = 5000")
            conn.executescript(_DDL)
            _migrate(conn)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            if conn.execute("SELECT 1 FROM inodes WHERE ino = ?", (ROOT_INO,)).fetchone() is None:
                now = time.time_ns()
                conn.execute(
                    "INSERT INTO inodes (ino, type, mode, uid, gid, size, atime_ns, mtime_ns,"
                    " ctime_ns, nlink) VALUES (?, 'dir', ?, 0, 0, 0, ?, ?, ?, 2)",
                    (ROOT_INO, 0o755, now, now, now),
                )
            # what a killed predecessor acknowledged may be in the page cache only: sync it
            # now, names included (the WAL may just have been made)
            self._sync_wal()
            _fsync_dir(self.path.parent)
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _disconnect(self) -> None:
        if self._conn is not None:
            self._conn.close()  # the last connection: checkpoints, syncs, removes the WAL
            self._conn = None

    # --- the event loop's side ---------------------------------------------------------------
    def _submit(
        self, kind: int, fn: Callable[..., Any], closing: bool = False
    ) -> asyncio.Future[Any]:
        if self._closed and not closing:
            raise RuntimeError("store is closed")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queue.put(_Job(kind, fn, fut, loop))
        return fut

    async def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` on the store's thread, outside any transaction."""
        return await self._submit(_CALL, fn)  # type: ignore[no-any-return]

    async def transact(self, fn: Callable[[Txn], T], *, readonly: bool = False) -> T:
        return await self._submit(_READ if readonly else _WRITE, fn)  # type: ignore[no-any-return]

    async def total_changes(self) -> int:
        """Rows inserted, updated or deleted since the store opened (tests use it)."""

        def count() -> int:
            assert self._conn is not None
            return self._conn.total_changes

        return await self._call(count)

    def counters(self) -> dict[str, Any]:
        """Commits, syncs and grouping so far (the coordinator's stats show them)."""
        return {
            "synchronous": self._synchronous,
            "sync_interval": self._sync_interval,
            "transactions": self._transactions,
            "commits": self._commits,
            "grouped": self._grouped,
            "max_group": self._max_group,
            "rolled_back": self._rolled_back,
            "reads": self._reads,
            "syncs": self._syncs,
            "barriers": self._barriers,
            "unsynced_commits": self._commit_seq - self._synced_seq,
        }

    # --- durability ----------------------------------------------------------------------
    async def sync(self) -> None:
        """A barrier: returns once every transaction committed before the call is on disk.

        Concurrent callers share one WAL fsync; one already running that started before a
        caller's last commit is waited for, then one more covers it.
        """
        self._barriers += 1
        await self._sync_all()

    async def _sync_all(self) -> None:
        need = self._commit_seq
        while self._synced_seq < need:
            if self._sync_error is not None:
                raise OSError(f"the coordinator's WAL could not be synced: {self._sync_error}")
            task = self._sync_task
            if task is None:
                task = self._sync_task = asyncio.ensure_future(self._sync_once())
            await asyncio.shield(task)

    async def _sync_once(self) -> None:
        target = self._commit_seq  # every commit counted here has written its WAL frames
        try:
            if self._synchronous != "FULL":  # FULL: each commit synced already
                loop = asyncio.get_running_loop()
                await loop.run_in_executor(self._syncer, self._sync_wal)
                self._syncs += 1
        except BaseException as exc:
            # after a failed fsync the kernel may have dropped the dirty pages: never claim
            # durability again in this process (a restart recovers from what is on disk)
            if not isinstance(exc, asyncio.CancelledError):
                self._sync_error = exc
                log.critical("fsync of %s failed: %s; refusing further syncs", self._wal_path, exc)
            raise
        finally:
            self._sync_task = None
        self._synced_seq = max(self._synced_seq, target)

    def _sync_wal(self) -> None:
        """fdatasync the ``-wal`` file (on the syncer thread; at connect on the store's)."""
        try:
            st = os.stat(self._wal_path)
        except FileNotFoundError:
            return  # no WAL: everything is in the database file, synced at its checkpoint
        if self._wal_id != (st.st_dev, st.st_ino):  # first time, or SQLite made a new one
            if self._wal_fd >= 0:
                os.close(self._wal_fd)
                self._wal_fd = -1
            self._wal_fd = os.open(self._wal_path, os.O_RDONLY | os.O_CLOEXEC)
            self._wal_id = (st.st_dev, st.st_ino)
        os.fdatasync(self._wal_fd)

    def _close_wal_fd(self) -> None:
        if self._wal_fd >= 0:
            os.close(self._wal_fd)
            self._wal_fd = -1

    def _note_change(self) -> None:
        """After commits: make sure a sync comes within ``sync_interval`` if one is due."""
        if self._sync_pending or self._closed or self._commit_seq <= self._synced_seq:
            return
        self._sync_pending = True
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._sync_interval, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_task = asyncio.ensure_future(self._periodic_sync())

    async def _periodic_sync(self) -> None:
        try:
            await self._sync_all()
        except Exception:
            log.exception("periodic sync failed")
        finally:
            self._timer_task = None
            self._sync_pending = False
        if self._commit_seq > self._synced_seq and self._sync_error is None:
            self._note_change()

    async def close(self) -> None:
        """Sync, then close: a graceful stop leaves every acknowledged change on disk."""
        if self._closed:
            return
        self._closed = True  # no new transactions from here on
        try:
            if self._timer is not None:
                self._timer.cancel()
                self._timer = None
            await self._submit(_CALL, lambda: None, closing=True)  # the queued ones commit
            try:
                await self._sync_all()
            except Exception:
                log.exception("final sync failed")
            if self._timer_task is not None:
                self._timer_task.cancel()
            loop = asyncio.get_running_loop()
            await self._submit(_STOP, self._disconnect, closing=True)
            await loop.run_in_executor(self._syncer, self._close_wal_fd)
        finally:
            self._closed = True
            self._syncer.shutdown(wait=False)  # idle by now; never join on the loop


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
