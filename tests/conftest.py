"""Session fixtures shared by every suite: one SeaweedFS S3 and (when a test asks for it)
one PostgreSQL server for the whole run; ``store_url`` runs a test on each store."""

from __future__ import annotations

import itertools
import secrets
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fastcache.config import DEFAULT_REGION, S3Config
from fastcache.coordinator.store import sqlite_url
from fastcache.pgserver import PostgresServer
from fastcache.seaweed import SeaweedServer

STORES = ("sqlite", "postgresql")
_databases = itertools.count()


@dataclass
class S3Fixture:
    """The session's S3: endpoint and credentials, plus a fresh bucket name per call."""

    server: SeaweedServer
    _counter: Iterator[int] = field(default_factory=itertools.count)
    _prefix: str = field(default_factory=lambda: "t" + secrets.token_hex(3))

    @property
    def endpoint(self) -> str:
        return self.server.endpoint

    @property
    def access_key(self) -> str:
        return self.server.access_key

    @property
    def secret_key(self) -> str:
        return self.server.secret_key

    def new_bucket(self) -> str:
        """A bucket name no other test in this session uses (not created)."""
        return f"{self._prefix}-{next(self._counter)}"

    def s3_config(self, bucket: str | None = None, **overrides: object) -> S3Config:
        """An ``S3Config`` for this server; a new bucket unless one is given."""
        values: dict[str, object] = {
            "endpoint": self.endpoint,
            "region": DEFAULT_REGION,
            "bucket": bucket or self.new_bucket(),
            "access_key": self.access_key,
            "secret_key": self.secret_key,
        }
        values.update(overrides)
        return S3Config(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Fixture]:
    data_dir: Path = tmp_path_factory.mktemp("seaweedfs")
    server = SeaweedServer(data_dir)
    server.start()
    try:
        yield S3Fixture(server)
    finally:
        server.stop()


def _postgres() -> Iterator[PostgresServer]:
    """A PostgreSQL 15 server on loopback (its directory is under /tmp, where the
    ``postgres`` user can reach it); stopped and removed at the end."""
    server = PostgresServer(Path(tempfile.mkdtemp(prefix="fastcache-pg-")), fsync=False)
    try:
        yield server.start()
    finally:
        server.remove()


@pytest.fixture(scope="session")
def pg() -> Iterator[PostgresServer]:
    """The session's PostgreSQL server: each test makes its own database on it."""
    yield from _postgres()


@pytest.fixture
def own_pg() -> Iterator[PostgresServer]:
    """A server of the test's own, for tests that stop or restart it."""
    yield from _postgres()


def new_database(pg: PostgresServer) -> str:
    """The URL of a new empty database on the session's server."""
    return pg.create_database(f"t{next(_databases)}")


@pytest.fixture(params=STORES)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A fresh store of each kind: a SQLite file in ``tmp_path``, a new PostgreSQL database."""
    if request.param == "sqlite":
        return sqlite_url(tmp_path / "coordinator.db")
    return new_database(request.getfixturevalue("pg"))
