"""What only the PostgreSQL store has: several stores on one database (serializable
retries, events between them), its schema versions, and surviving a server restart."""

from __future__ import annotations

import asyncio
from typing import Any

import psycopg
import pytest

from fastcache.config import ConfigError
from fastcache.coordinator.model import ROOT_INO
from fastcache.coordinator.service import CoordinatorService
from fastcache.coordinator.store.base import Txn
from fastcache.coordinator.store.postgres import SCHEMA_VERSION, PostgresStore
from fastcache.errors import StoreUnavailable
from fastcache.pgserver import PostgresServer
from tests.conftest import new_database


@pytest.fixture
def db(pg: PostgresServer) -> str:
    return new_database(pg)


def test_publish_reaches_a_subscriber_of_another_store(db: str) -> None:
    async def body() -> list[bytes]:
        a = await PostgresStore.open(db)
        b = await PostgresStore.open(db)
        got: list[bytes] = []
        arrived = asyncio.Event()

        def on_event(payload: bytes) -> None:
            got.append(payload)
            if len(got) == 2:
                arrived.set()

        try:
            await b.subscribe(on_event)
            await a.publish(b"\x00invalidate /d/f\xff")
            await a.publish(bytes(range(256)) * 20)  # 5,120 bytes: base64 under NOTIFY's 8000
            await asyncio.wait_for(arrived.wait(), 30)
            with pytest.raises(ValueError, match="too large"):
                await a.publish(b"x" * 7000)
            return got
        finally:
            await a.close()
            await b.close()

    got = asyncio.run(body())
    assert got == [b"\x00invalidate /d/f\xff", bytes(range(256)) * 20]


def test_two_stores_on_one_database_serialise_conflicting_writes(db: str) -> None:
    """Read-modify-write of one row from two stores at once: SERIALIZABLE makes one of each
    conflicting pair fail, the store runs it again, and no increment is lost."""

    def bump(tx: Txn) -> int:
        attrs = tx.get_inode(ROOT_INO)
        assert attrs is not None
        tx.update_inode(ROOT_INO, version=attrs.version + 1)
        return attrs.version + 1

    async def body() -> tuple[int, int]:
        a = await PostgresStore.open(db)
        b = await PostgresStore.open(db)
        try:
            await asyncio.gather(*(s.transact(bump) for _ in range(40) for s in (a, b)))
            root = await a.transact(lambda tx: tx.get_inode(ROOT_INO), readonly=True)
            assert root is not None
            return root.version, a.counters()["retries"] + b.counters()["retries"]
        finally:
            await a.close()
            await b.close()

    version, retries = asyncio.run(body())
    assert version == 80
    assert retries > 0  # they did conflict, and were run again


def test_a_newer_schema_is_refused(db: str) -> None:
    asyncio.run(_open_close(db))  # creates the schema
    with psycopg.connect(db, autocommit=True) as conn:
        conn.execute("UPDATE schema_version SET version = %s", (SCHEMA_VERSION + 1,))
    with pytest.raises(ConfigError, match=f"schema version {SCHEMA_VERSION + 1}, newer"):
        asyncio.run(_open_close(db))


def test_an_unreachable_database_is_a_clear_error(pg: PostgresServer) -> None:
    with pytest.raises(ConfigError, match=r"cannot open store .*nosuchdb"):
        asyncio.run(_open_close(pg.url("nosuchdb")))


async def _open_close(url: str) -> None:
    store = await PostgresStore.open(url)
    await store.close()


def test_the_store_reconnects_after_a_server_restart(own_pg: PostgresServer) -> None:
    url = own_pg.create_database("ns")

    async def body() -> list[Any]:
        store = await PostgresStore.open(url, reconnect_wait=0.5)
        svc = CoordinatorService(store)
        try:
            before = await svc.create(ROOT_INO, "before")
            await asyncio.to_thread(own_pg.stop)
            with pytest.raises(StoreUnavailable, match="unreachable"):
                await svc.create(ROOT_INO, "during")  # waited 0.5 s, then a clear error
            await asyncio.to_thread(own_pg.start)
            after = await svc.create(ROOT_INO, "after")
            names = [e.name for e in await svc.readdir(ROOT_INO)]
            assert store.counters()["reconnects"] >= 1
            return [before.ino < after.ino, names]
        finally:
            await svc.close()

    assert asyncio.run(body()) == [True, ["before", "after"]]
