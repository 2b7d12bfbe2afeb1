"""The embedded store: SQLite in WAL mode, the default (``sqlite:///path``).

One connection on one dedicated thread (``base.ThreadedStore``): the event loop never
touches sqlite, and transactions are serialised by construction. What it guarantees:

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
- **Events.** ``publish`` reaches this process's subscribers only (one coordinator).
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fastcache.coordinator.model import ROOT_INO, allocated_blocks
from fastcache.coordinator.store.base import (
    CALL,
    Dialect,
    Job,
    SQLTxn,
    ThreadedStore,
    log,
)

SCHEMA_VERSION = 3  # 2: inodes.blocks; 3: xattrs, inodes.xattrs
DEFAULT_SYNC_INTERVAL = 0.1  # seconds from a commit to its fsync, at the latest


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
DIALECT = Dialect(name_bytes="LENGTH(CAST(name AS BLOB))")


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


class SQLiteStore(ThreadedStore):
    """SQLite in WAL mode on one dedicated thread. Build it with ``await SQLiteStore.open``.

    The thread drains whatever is queued: the write transactions among it run in one
    ``BEGIN IMMEDIATE … COMMIT`` with a ``SAVEPOINT`` each (group commit), the read-only ones
    together in one read transaction. Durability: see the module docstring and ``sync``.
    """

    shared = False  # one coordinator owns the file

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
        super().__init__()
        self._syncer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastcache-wal-sync")
        self._conn: sqlite3.Connection | None = None
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
        store._start_threads()
        try:
            await store._call(store._connect)
        except BaseException:
            store._stop_threads_now()
            store._syncer.shutdown(wait=False)
            raise
        return store

    # --- the store's thread ----------------------------------------------------------------
    thread_name = "fastcache-sqlite"

    def _abandon(self) -> None:
        if self._conn is not None and self._conn.in_transaction:
            self._conn.execute("ROLLBACK")

    def _after_settle(self) -> None:
        self._note_change()

    def _conn_or_fail(self, jobs: list[Job]) -> sqlite3.Connection | None:
        if self._conn is None:
            for job in jobs:
                job.value = RuntimeError("store is closed")
        return self._conn

    def _run_reads(self, jobs: list[Job]) -> None:
        conn = self._conn_or_fail(jobs)
        if conn is None:
            return
        txn = SQLTxn(conn, DIALECT)
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

    def _run_writes(self, jobs: list[Job]) -> None:
        conn = self._conn_or_fail(jobs)
        if conn is None:
            return
        live = [job for job in jobs if not job.fut.done()]
        if len(live) == 1:
            self._run_alone(conn, live[0])
        elif live:
            self._run_group(conn, live)

    def _run_alone(self, conn: sqlite3.Connection, job: Job) -> None:
        """One function, one transaction: no savepoint needed."""
        changes = conn.total_changes
        try:
            conn.execute("BEGIN IMMEDIATE")
        except BaseException as exc:  # handed to the caller
            job.value = exc
            return
        try:
            job.value = job.fn(SQLTxn(conn, DIALECT))
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

    def _run_group(self, conn: sqlite3.Connection, jobs: list[Job]) -> None:
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
        txn = SQLTxn(conn, DIALECT)
        done: list[Job] = []
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

    def _retry_alone(self, conn: sqlite3.Connection, jobs: list[Job]) -> None:
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

    # --- events: one coordinator, so in-process ----------------------------------------
    async def publish(self, payload: bytes) -> None:
        self._notify_local(payload)

    async def subscribe(self, callback: Callable[[bytes], None]) -> None:
        self._subscribers.append(callback)

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
            await self._submit(CALL, lambda: None, closing=True)  # the queued ones commit
            try:
                await self._sync_all()
            except Exception:
                log.exception("final sync failed")
            if self._timer_task is not None:
                self._timer_task.cancel()
            loop = asyncio.get_running_loop()
            await self._stop_all(self._disconnect)
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
