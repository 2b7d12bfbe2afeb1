"""``fastcache coordinator migrate --from sqlite:///… --to postgresql://…``: copy a whole
SQLite namespace into an empty PostgreSQL database.

Every row keeps its numbers (inodes, entry offsets: what nodes and open directory streams
know), the sequences are moved past them, and it is one PostgreSQL transaction: the target
ends up with all of it or none. The source is brought to the current schema first (as a
coordinator would on start); stop its coordinator before migrating.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg

from fastcache.config import ConfigError, check_store_url, redacted_url
from fastcache.coordinator.store.base import INODE_COLS, PEER_COLS
from fastcache.coordinator.store.postgres import _schema, advance_sequences, connect
from fastcache.coordinator.store.sqlite import SQLiteStore

# table -> its columns, in copy order (inodes first: the rest refer to them)
TABLES: dict[str, str] = {
    "inodes": INODE_COLS,
    "entries": "cookie, parent, name, ino",
    "xattrs": "ino, name, value",
    "peers": PEER_COLS,
    "locations": "key, peer_id",
}
BATCH = 10_000


async def migrate(source: str, target: str) -> dict[str, int]:
    """Copy ``source`` (SQLite) into ``target`` (PostgreSQL, empty); rows copied per table."""
    if check_store_url(source) != "sqlite":
        raise ConfigError(f"--from must be a sqlite:/// URL, not {redacted_url(source)!r}")
    if check_store_url(target) != "postgresql":
        raise ConfigError(f"--to must be a postgresql:// URL, not {redacted_url(target)!r}")
    path = Path(urlsplit(source).path)
    if not path.is_file():
        raise ConfigError(f"no SQLite store at {path}")
    store = await SQLiteStore.open(path)  # brings it to the current schema
    await store.close()
    src = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        with connect(target) as dst:
            _schema(dst)
            with dst.transaction():
                _refuse_if_used(dst, target)
                dst.execute("DELETE FROM inodes")  # the root made with the schema: copied too
                counts = {table: _copy(src, dst, table, cols) for table, cols in TABLES.items()}
                # numbers SQLite handed out whose rows are gone are not handed out again
                used = dict(src.execute("SELECT name, seq FROM sqlite_sequence").fetchall())
                advance_sequences(dst, used)
    except psycopg.Error as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(f"migration into {redacted_url(target)} failed: {first}") from exc
    finally:
        src.close()
    return counts


def _refuse_if_used(dst: psycopg.Connection[Any], target: str) -> None:
    row = dst.execute(
        "SELECT (SELECT count(*) FROM inodes), (SELECT count(*) FROM entries),"
        " (SELECT count(*) FROM xattrs), (SELECT count(*) FROM peers)"
    ).fetchone()
    inodes, entries, xattrs, peers = (int(n) for n in row) if row else (0, 0, 0, 0)
    if inodes > 1 or entries or xattrs or peers:
        raise ConfigError(
            f"the target {redacted_url(target)} is not empty ({inodes} inodes, {entries} "
            "entries): migrate into a new database"
        )


def _copy(src: sqlite3.Connection, dst: psycopg.Connection[Any], table: str, cols: str) -> int:
    rows = src.execute(f"SELECT {cols} FROM {table}")
    copied = 0
    with dst.cursor() as cur, cur.copy(f"COPY {table} ({cols}) FROM STDIN") as copy:  # type: ignore[arg-type]
        while batch := rows.fetchmany(BATCH):
            for row in batch:
                copy.write_row(row)
            copied += len(batch)
    return copied
