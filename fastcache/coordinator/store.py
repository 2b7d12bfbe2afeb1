"""The coordinator's persistent state behind one small interface, and its SQLite engine.

The contract is row-level: a ``Store`` runs a function inside one transaction and hands it a
``Txn`` of plain reads and writes. The namespace rules (nlink, rename checks, versions) live
once in ``service.py`` on top of it, so another engine (PostgreSQL, etcd) only has to provide
atomic transactions and these rows.

``SQLiteStore`` keeps one connection on one dedicated thread: the event loop never touches
sqlite, and transactions are serialised by construction. Every transaction is committed (WAL,
``synchronous=FULL`` by default) before ``transact`` returns, so an API acknowledges only
durable changes.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from fastcache.chunks import allocated_blocks

T = TypeVar("T")

ROOT_INO = 1
INODE_TYPES = ("file", "dir", "symlink", "fifo", "socket", "chr", "blk")
SCHEMA_VERSION = 2  # 2: inodes.blocks


# --- the data model ----------------------------------------------------------------------
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
    manifest: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        # Shallow on purpose: ``asdict`` deep-copies the manifest, on every answer.
        return {name: getattr(self, name) for name in _INODE_FIELDS}

    @classmethod
    def from_json(cls, doc: dict[str, Any]) -> InodeAttrs:
        if len(doc) == len(_INODE_FIELDS):
            try:
                return cls(**doc)  # the common case: exactly our fields (listings: per entry)
            except TypeError:
                pass
        return cls(**{name: doc.get(name) for name in _INODE_FIELDS})

    @property
    def is_dir(self) -> bool:
        return self.type == "dir"


_INODE_FIELDS = tuple(InodeAttrs.__dataclass_fields__)


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


class Store(Protocol):
    async def transact(self, fn: Callable[[Txn], T], *, readonly: bool = False) -> T:
        """Run ``fn`` in one transaction: committed before returning, rolled back on raise."""
        ...

    async def close(self) -> None: ...


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
"""
_INODE_COLS = ", ".join(_INODE_FIELDS)
_UPDATABLE = frozenset(_INODE_FIELDS) - {"ino", "type"}


def _inode(row: tuple[Any, ...], with_manifest: bool = True) -> InodeAttrs:
    attrs = InodeAttrs(*row)
    if attrs.manifest is not None:
        attrs.manifest = json.loads(attrs.manifest) if with_manifest else None  # type: ignore[arg-type]
    return attrs


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
        cols = [c for c in _INODE_FIELDS if c != "ino"]
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
        cols = ", ".join(f"i.{c}" for c in _INODE_FIELDS)
        rows = self._c.execute(
            f"SELECT e.cookie, e.name, {cols} FROM entries e JOIN inodes i ON i.ino = e.ino "
            "WHERE e.parent = ? AND e.cookie > ? ORDER BY e.cookie LIMIT ?",
            (parent, after, limit),
        ).fetchall()
        return [Entry(name=r[1], offset=r[0], attrs=_inode(r[2:], False)) for r in rows]

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


class SQLiteStore:
    """SQLite in WAL mode on one dedicated thread. Build it with ``await SQLiteStore.open``."""

    def __init__(self, path: Path, synchronous: str = "FULL") -> None:
        self.path = path
        self._synchronous = synchronous
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastcache-sqlite")
        self._conn: sqlite3.Connection | None = None

    @classmethod
    async def open(cls, path: Path, synchronous: str = "FULL") -> SQLiteStore:
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError("synchronous must be FULL or NORMAL")
        store = cls(path, synchronous)
        try:
            await store._call(store._connect)
        except BaseException:
            store._executor.shutdown(wait=False)
            raise
        return store

    async def _call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

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
        except BaseException:
            conn.close()
            raise
        self._conn = conn

    def _transact(self, fn: Callable[[Txn], T], readonly: bool) -> T:
        conn = self._conn
        if conn is None:
            raise RuntimeError("store is closed")
        conn.execute("BEGIN" if readonly else "BEGIN IMMEDIATE")
        try:
            result = fn(_SQLiteTxn(conn))
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")
        return result

    async def transact(self, fn: Callable[[Txn], T], *, readonly: bool = False) -> T:
        return await self._call(self._transact, fn, readonly)

    async def total_changes(self) -> int:
        """Rows inserted, updated or deleted since the store opened (tests use it)."""

        def count() -> int:
            assert self._conn is not None
            return self._conn.total_changes

        return await self._call(count)

    async def close(self) -> None:
        def _close() -> None:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

        try:
            await self._call(_close)
        finally:
            self._executor.shutdown(wait=False)  # idle by now; never join on the loop
