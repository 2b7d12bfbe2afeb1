"""Session fixtures shared by every suite: one SeaweedFS S3 for the whole run."""

from __future__ import annotations

import itertools
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from fastcache.config import DEFAULT_REGION, S3Config
from fastcache.seaweed import SeaweedServer


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
