"""The coordinator's persistent state behind one small interface, and what engines share.

The contract is row-level: a ``Store`` runs a function inside one transaction and hands it a
``Txn`` of plain reads and writes of the wire types (``model.py``). The namespace rules
(nlink, rename checks, versions) live once in ``service.py`` on top of it, so an engine only
has to provide atomic transactions, these rows, a sync barrier and an event channel.

Shared here, written once:

- ``SQLTxn``: the ``Txn`` in SQL, over any connection with ``execute``/``executemany``;
  an engine's dialect differences are a ``Dialect`` (and, for PostgreSQL, ``?`` placeholders
  rewritten by its connection wrapper).
- ``ThreadedStore``: the job queue. ``transact`` queues a function; the engine's own threads
  drain what is queued and run the writes of a batch in one transaction (group commit, a
  savepoint each), the reads in one read transaction; outcomes go back to the callers' loops.
  A function must act only through its ``Txn`` and may run more than once.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from queue import Empty, SimpleQueue
from typing import Any, Protocol, TypeVar

import msgspec

from fastcache.coordinator.model import (
    INODE_FIELDS,
    LISTING_FIELDS,
    Entry,
    InodeAttrs,
    PeerInfo,
    entry_from_row,
)

T = TypeVar("T")
log = logging.getLogger("fastcache.coordinator.store")

_decode_json = msgspec.json.Decoder().decode  # manifests as stored (~6x json.loads)
MAX_GROUP = 1024  # queued calls a store thread takes at once (one commit for the writes)
EVENT_CHANNEL = "fastcache_events"  # PostgreSQL's NOTIFY channel for ``publish``


# --- the interface -----------------------------------------------------------------------
class Txn(Protocol):
    """Reads and writes inside one transaction. Synchronous: it runs on a store thread."""

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
    def list_rows(
        self, parent: int, after: int, limit: int, manifests_upto: int = 0
    ) -> list[list[Any]]:
        """``list_entries`` as listing rows (``model.entry_from_row``), straight from SQL;
        ``manifests_upto``: each row ends with the manifest of a file of at most that many
        bytes (``None`` for the others)."""
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
    shared: bool  # several coordinators may serve this store at once (``cluster.py``)

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

    async def publish(self, payload: bytes) -> None:
        """Send ``payload`` to every subscriber of every store on the same database
        (this one's included)."""
        ...

    async def subscribe(self, callback: Callable[[bytes], None]) -> None:
        """Call ``callback(payload)`` on this loop for each payload published from now on."""
        ...

    async def close(self) -> None:
        """Sync, then release everything."""
        ...


# --- SQL shared by the engines -----------------------------------------------------------
class Cursor(Protocol):
    @property
    def rowcount(self) -> int: ...
    def fetchone(self) -> Any: ...
    def fetchall(self) -> list[Any]: ...


class SQLConn(Protocol):
    """What ``SQLTxn`` needs of a connection: ``sqlite3.Connection`` is one as it is."""

    def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Cursor: ...
    def executemany(self, sql: str, seq_of_parameters: Iterable[Sequence[Any]], /) -> Any: ...


@dataclass(frozen=True)
class Dialect:
    name_bytes: str  # SQL for the length in bytes of the ``name`` column (UTF-8)


INODE_COLS = ", ".join(INODE_FIELDS)
_NEW_COLS = [c for c in INODE_FIELDS if c != "ino"]
_UPDATABLE = frozenset(INODE_FIELDS) - {"ino", "type"}
_ROW_COLS = ", ".join(f"i.{c}" for c in LISTING_FIELDS)
PEER_COLS = "peer_id, url, capacity, used, status, registered_at, last_seen"


def inode_from_row(row: Sequence[Any], with_manifest: bool = True) -> InodeAttrs:
    attrs = InodeAttrs(*row)
    if attrs.manifest is not None:
        attrs.manifest = _decode_json(attrs.manifest) if with_manifest else None  # type: ignore[arg-type]
    return attrs


def inode_values(attrs: InodeAttrs) -> dict[str, Any]:
    """The columns of an inode row (the manifest as JSON text)."""
    values = attrs.to_json()
    values["manifest"] = None if attrs.manifest is None else json.dumps(attrs.manifest)
    return values


class SQLTxn:
    """``Txn`` in SQL over one connection; valid only inside its store's transaction."""

    def __init__(self, conn: SQLConn, dialect: Dialect) -> None:
        self._c = conn
        self._d = dialect

    def get_inode(self, ino: int) -> InodeAttrs | None:
        row = self._c.execute(f"SELECT {INODE_COLS} FROM inodes WHERE ino = ?", (ino,)).fetchone()
        return None if row is None else inode_from_row(row)

    def add_inode(self, attrs: InodeAttrs) -> int:
        values = inode_values(attrs)
        values["xattrs"] = 0  # a new inode has none
        row = self._c.execute(
            f"INSERT INTO inodes ({', '.join(_NEW_COLS)}) "
            f"VALUES ({', '.join('?' * len(_NEW_COLS))}) RETURNING ino",
            [values[c] for c in _NEW_COLS],
        ).fetchone()
        return int(row[0])

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
        row = self._c.execute(
            "INSERT INTO entries (parent, name, ino) VALUES (?, ?, ?) RETURNING cookie",
            (parent, name, ino),
        ).fetchone()
        return int(row[0])

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

    def list_rows(
        self, parent: int, after: int, limit: int, manifests_upto: int = 0
    ) -> list[list[Any]]:
        # a listing carries no manifests (a file's is its chunk list) unless asked for small
        # files' ones: then not read for the others
        small = ", CASE WHEN i.type = 'file' AND i.size <= ? THEN i.manifest END"
        rows = self._c.execute(
            f"SELECT e.name, e.cookie, {_ROW_COLS}{small if manifests_upto else ''} "
            "FROM entries e JOIN inodes i ON i.ino = e.ino "
            "WHERE e.parent = ? AND e.cookie > ? ORDER BY e.cookie LIMIT ?",
            (manifests_upto, parent, after, limit) if manifests_upto else (parent, after, limit),
        ).fetchall()
        out = [list(r) for r in rows]
        if manifests_upto:
            for row in out:
                if row[-1] is not None:
                    row[-1] = _decode_json(row[-1])
        return out

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
            f"INSERT INTO peers ({PEER_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?)"
            " ON CONFLICT (peer_id) DO UPDATE SET url = excluded.url,"
            " capacity = excluded.capacity, used = excluded.used, status = excluded.status,"
            " registered_at = excluded.registered_at, last_seen = excluded.last_seen",
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
            f"SELECT {PEER_COLS} FROM peers WHERE peer_id = ?", (peer_id,)
        ).fetchone()
        return None if row is None else PeerInfo(*row)

    def list_peers(self) -> list[PeerInfo]:
        rows = self._c.execute(f"SELECT {PEER_COLS} FROM peers ORDER BY peer_id").fetchall()
        return [PeerInfo(*row) for row in rows]

    def delete_peer(self, peer_id: str) -> bool:
        self._c.execute("DELETE FROM locations WHERE peer_id = ?", (peer_id,))
        return self._c.execute("DELETE FROM peers WHERE peer_id = ?", (peer_id,)).rowcount > 0

    def add_location(self, key: str, peer_id: str) -> None:
        self.add_locations((key,), peer_id)

    def remove_location(self, key: str, peer_id: str) -> None:
        self._c.execute("DELETE FROM locations WHERE key = ? AND peer_id = ?", (key, peer_id))

    def add_locations(self, keys: Sequence[str], peer_id: str) -> None:
        self._c.executemany(
            "INSERT INTO locations (key, peer_id) VALUES (?, ?) ON CONFLICT DO NOTHING",
            [(key, peer_id) for key in keys],
        )

    def remove_locations(self, keys: Sequence[str], peer_id: str) -> None:
        self._c.executemany(
            "DELETE FROM locations WHERE key = ? AND peer_id = ?",
            [(key, peer_id) for key in keys],
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
        return [(int(ino), _decode_json(doc)) for ino, doc in rows]

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
            "INSERT INTO xattrs (ino, name, value) VALUES (?, ?, ?)"
            " ON CONFLICT (ino, name) DO UPDATE SET value = excluded.value",
            (ino, name, value),
        )

    def remove_xattr(self, ino: int, name: str) -> bool:
        cur = self._c.execute("DELETE FROM xattrs WHERE ino = ? AND name = ?", (ino, name))
        return cur.rowcount > 0

    def xattr_usage(self, ino: int) -> tuple[int, int, int]:
        row = self._c.execute(
            f"SELECT COUNT(*), COALESCE(SUM({self._d.name_bytes}), 0),"
            " COALESCE(SUM(LENGTH(value)), 0) FROM xattrs WHERE ino = ?",
            (ino,),
        ).fetchone()
        names = int(row[1])
        return int(row[0]), names, names + int(row[2])


# --- the job queue -----------------------------------------------------------------------
class Job:
    """One queued call for a store thread; ``ok``/``value`` hold its outcome."""

    __slots__ = ("fn", "fut", "kind", "loop", "ok", "sent", "value")

    def __init__(
        self,
        kind: int,
        fn: Callable[..., Any],
        fut: asyncio.Future[Any],
        loop: asyncio.AbstractEventLoop | None,
    ) -> None:
        self.kind = kind
        self.fn = fn
        self.fut = fut
        self.loop = loop
        self.ok = False
        self.sent = False  # its outcome is on the way to the loop: no more changes
        self.value: Any = None


WRITE, READ, CALL, STOP = range(4)


def _settle(jobs: list[Job]) -> None:
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


class ThreadedStore:
    """The queue and the threads that drain it; an engine provides ``_run_reads`` and
    ``_run_writes`` (each sets every job's ``ok``/``value``) and may hook ``_after_settle``.

    Each thread takes whatever is queued (up to ``MAX_GROUP``): the writes in it run as one
    group, the reads as another; a control call (``CALL``/``STOP``) runs after everything
    its thread took before it. ``STOP`` ends the thread that takes it.
    """

    thread_name = "fastcache-store"

    def __init__(self, readers: int = 0) -> None:
        self._queue: SimpleQueue[Job] = SimpleQueue()  # one thread: writes and calls
        # with ``readers``, read-only transactions have their own queue and threads
        self._read_queue = SimpleQueue[Job]() if readers else self._queue
        self._threads = [
            (threading.Thread(target=self._serve, args=(q,), name=self.thread_name, daemon=True), q)
            for q in [self._queue] + [self._read_queue] * readers
        ]
        self._closed = False
        self._subscribers: list[Callable[[bytes], None]] = []

    def _start_threads(self) -> None:
        for thread, _ in self._threads:
            thread.start()

    def _stop_threads_now(self) -> None:
        """After a failed open: end the threads without waiting (nothing is queued)."""
        self._closed = True
        for _, queue in self._threads:
            done = asyncio.get_running_loop().create_future()
            queue.put(Job(STOP, lambda: None, done, None))

    # --- a store thread ------------------------------------------------------------------
    def _serve(self, queue: SimpleQueue[Job]) -> None:
        while True:
            jobs = [queue.get()]
            while len(jobs) < MAX_GROUP and jobs[-1].kind != STOP:
                try:
                    jobs.append(queue.get_nowait())
                except Empty:
                    break
            try:
                if self._run_jobs(jobs, queue):
                    return
            except BaseException as exc:  # the thread must outlive any bug
                log.exception("store thread: unexpected error; failing its batch")
                self._abandon()
                lost = [job for job in jobs if not job.sent]
                for job in lost:
                    if not job.ok:  # ok: committed (or read) already, its value stands
                        job.value = exc
                self._deliver(lost)

    def _run_jobs(self, jobs: list[Job], queue: SimpleQueue[Job]) -> bool:
        """Run one drained batch in order of kind; True once this thread is to stop."""
        reads: list[Job] = []
        writes: list[Job] = []
        for job in jobs:
            if job.kind == WRITE:
                writes.append(job)
            elif job.kind == READ:
                reads.append(job)
            else:  # a control call: everything taken before it runs first
                self._flush(reads, writes)
                reads, writes = [], []
                try:
                    job.value, job.ok = job.fn(), True
                except BaseException as exc:  # handed to the caller
                    job.value = exc
                self._deliver([job])
                if job.kind == STOP:
                    self._fail_queued(queue)
                    return True
        self._flush(reads, writes)
        return False

    def _fail_queued(self, queue: SimpleQueue[Job]) -> None:
        """Fail what is still queued, except the other threads' ``STOP`` calls."""
        rest: list[Job] = []
        stops: list[Job] = []
        while True:
            try:
                job = queue.get_nowait()
            except Empty:
                break
            if job.kind == STOP:
                stops.append(job)
            else:
                job.value = RuntimeError("store is closed")
                rest.append(job)
        for job in stops:
            queue.put(job)
        self._deliver(rest)

    def _flush(self, reads: list[Job], writes: list[Job]) -> None:
        if reads:
            self._run_reads(reads)
            self._deliver(reads)
        if writes:
            self._run_writes(writes)
            self._deliver(writes)

    def _deliver(self, jobs: list[Job]) -> None:
        loops: dict[asyncio.AbstractEventLoop, list[Job]] = {}
        for job in jobs:
            job.sent = True
            if job.loop is not None:
                loops.setdefault(job.loop, []).append(job)
        for loop, mine in loops.items():
            try:
                loop.call_soon_threadsafe(self._settle_and_note, mine)
            except RuntimeError:  # that loop is closed: nobody is waiting any more
                pass

    def _settle_and_note(self, jobs: list[Job]) -> None:
        _settle(jobs)
        self._after_settle()

    def _after_settle(self) -> None:
        """On the event loop after outcomes were handed over (SQLite schedules its sync)."""

    def _abandon(self) -> None:
        """On a store thread after an unexpected error: end any open transaction."""

    def _run_reads(self, jobs: list[Job]) -> None:
        raise NotImplementedError

    def _run_writes(self, jobs: list[Job]) -> None:
        raise NotImplementedError

    # --- the event loop's side ---------------------------------------------------------------
    def _submit(
        self, kind: int, fn: Callable[..., Any], closing: bool = False
    ) -> asyncio.Future[Any]:
        if self._closed and not closing:
            raise RuntimeError("store is closed")
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        (self._read_queue if kind == READ else self._queue).put(Job(kind, fn, fut, loop))
        return fut

    async def _call(self, fn: Callable[[], T]) -> T:
        """Run ``fn()`` on a store thread, outside any transaction."""
        return await self._submit(CALL, fn)  # type: ignore[no-any-return]

    async def transact(self, fn: Callable[[Txn], T], *, readonly: bool = False) -> T:
        return await self._submit(READ if readonly else WRITE, fn)  # type: ignore[no-any-return]

    async def _stop_all(self, disconnect: Callable[[], None]) -> None:
        """One ``STOP`` per thread (each runs ``disconnect`` on its way out); waits for all."""
        loop = asyncio.get_running_loop()
        futs = []
        for _, queue in self._threads:
            futs.append(fut := loop.create_future())
            queue.put(Job(STOP, disconnect, fut, loop))
        await asyncio.gather(*futs)

    def _notify_local(self, payload: bytes) -> None:
        for callback in list(self._subscribers):
            try:
                callback(payload)
            except Exception:
                log.exception("event subscriber failed")
