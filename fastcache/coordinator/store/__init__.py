"""The coordinator's store: ``open_store(url)`` picks the engine by the URL's scheme.

- ``sqlite:///path/to/coordinator.db`` (or a bare path): embedded, one coordinator;
- ``postgresql://user@host:port/db``: PostgreSQL, where several coordinators may share one
  database.

No SQL lives outside this package; ``service.py`` sees only ``Store`` and ``Txn``.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from fastcache.config import check_store_url
from fastcache.coordinator.store.base import Store, Txn
from fastcache.coordinator.store.sqlite import DEFAULT_SYNC_INTERVAL, SQLiteStore

__all__ = [
    "DEFAULT_SYNC_INTERVAL",
    "SQLiteStore",
    "Store",
    "Txn",
    "check_store_url",
    "open_store",
    "sqlite_url",
]


def sqlite_url(path: Path) -> str:
    """``sqlite:///abs/path``: the path is always absolute (the URL's path)."""
    return f"sqlite://{Path(path).resolve()}"


async def open_store(
    url: str, *, synchronous: str = "NORMAL", sync_interval: float = DEFAULT_SYNC_INTERVAL
) -> Store:
    """Open (creating or migrating the schema) the store ``url`` names.

    ``synchronous`` and ``sync_interval`` concern SQLite only: on PostgreSQL a commit is
    durable when it returns.
    """
    if check_store_url(url) == "sqlite":
        return await SQLiteStore.open(Path(urlsplit(url).path), synchronous, sync_interval)
    from fastcache.coordinator.store.postgres import PostgresStore

    return await PostgresStore.open(url)
