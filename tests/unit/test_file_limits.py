"""The maximum file size: what it is derived from, and the coordinator's refusal beyond it."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from fastcache.chunks import CdcParams
from fastcache.coordinator.model import (
    MAX_FILE_SIZE,
    MAX_LOCATION_BATCH,
    MAX_MANIFEST_CHUNKS,
    ROOT_INO,
    check_file_limits,
    hole_digest,
    max_file_size,
)
from fastcache.coordinator.service import CoordinatorService
from fastcache.coordinator.session import MAX_FRAME
from fastcache.coordinator.store.sqlite import SQLiteStore
from fastcache.errors import BadRequest, InvalidArgument

MiB, GiB = 1 << 20, 1 << 30
DIGEST = "f" * 32


def test_the_largest_commit_fits_one_session_frame() -> None:
    """A commit of ``MAX_MANIFEST_CHUNKS`` chunks with CDC lengths as large as they get and a
    full batch of held digests is one frame the coordinator accepts."""
    args = {
        "ino": (1 << 63) - 1,
        "manifest": {
            "size": MAX_FILE_SIZE,
            "chunk_size": 64 * MiB,
            "chunks": [DIGEST] * MAX_MANIFEST_CHUNKS,
            "lengths": [CdcParams.for_average(64 * MiB).max] * MAX_MANIFEST_CHUNKS,
        },
        "expected_version": (1 << 63) - 1,
        "holder": "p" * 128,
        "held": [DIGEST] * MAX_LOCATION_BATCH,
    }
    frame = msgspec.msgpack.encode({"id": (1 << 63) - 1, "op": "commit_manifest", "args": args})
    assert len(frame) < MAX_FRAME


def test_max_file_size_follows_the_smallest_chunk() -> None:
    assert max_file_size(4 * MiB) == 64 * GiB  # the default
    assert max_file_size(1 * MiB) == 16 * GiB  # the mount tests' chunks
    assert max_file_size(64 * MiB) == MAX_FILE_SIZE == 1 << 40
    assert max_file_size(1 << 40) == MAX_FILE_SIZE  # never beyond the ceiling
    cdc = CdcParams.for_average(4 * MiB)
    # every CDC chunk but the last is at least ``min``: one chunk is kept for the last
    assert max_file_size(4 * MiB, cdc.min) == (MAX_MANIFEST_CHUNKS - 1) * MiB


def test_check_file_limits() -> None:
    check_file_limits({"size": MAX_FILE_SIZE, "chunks": [DIGEST] * MAX_MANIFEST_CHUNKS})
    with pytest.raises(BadRequest, match="maximum file size"):
        check_file_limits({"size": MAX_FILE_SIZE + 1, "chunks": []})
    with pytest.raises(BadRequest, match="at most"):
        check_file_limits({"size": 1, "chunks": [DIGEST] * (MAX_MANIFEST_CHUNKS + 1)})


# --- the coordinator ---------------------------------------------------------------------
@pytest.fixture
def run() -> Iterator[Any]:
    loop = asyncio.new_event_loop()
    yield loop.run_until_complete
    loop.close()


@pytest.fixture
def svc(tmp_path: Path, run: Any) -> Iterator[CoordinatorService]:
    store = run(SQLiteStore.open(tmp_path / "coordinator.db", synchronous="NORMAL"))
    service = CoordinatorService(store, peer_timeout=10.0)
    yield service
    run(service.close())


def holes(size: int, chunk_size: int) -> dict[str, Any]:
    count = -(-size // chunk_size)
    chunks = [hole_digest(chunk_size)] * (count - 1) + [
        hole_digest(size - (count - 1) * chunk_size)
    ]
    return {"size": size, "chunk_size": chunk_size, "chunks": chunks}


def test_coordinator_commits_up_to_the_limit(svc: CoordinatorService, run: Any) -> None:
    f = run(svc.create(ROOT_INO, "f", "file"))
    attrs = run(svc.commit_manifest(f.ino, holes(MAX_FILE_SIZE, 64 * MiB), 0))
    assert (attrs.size, attrs.blocks) == (MAX_FILE_SIZE, 0)  # all hole: nothing allocated
    assert run(svc.setattr(f.ino, size=MAX_FILE_SIZE - 1)).size == MAX_FILE_SIZE - 1


def test_coordinator_refuses_beyond_the_limit(svc: CoordinatorService, run: Any) -> None:
    f = run(svc.create(ROOT_INO, "f", "file"))
    with pytest.raises(BadRequest, match="maximum file size"):
        run(svc.commit_manifest(f.ino, holes(MAX_FILE_SIZE + 1, 64 * MiB), 0))
    with pytest.raises(BadRequest, match="at most"):
        run(svc.commit_manifest(f.ino, holes(MAX_MANIFEST_CHUNKS + 1, 1), 0))
    with pytest.raises(BadRequest, match="maximum file size"):
        run(svc.put_file("/g", holes(MAX_FILE_SIZE + 1, 64 * MiB)))
    for size in (MAX_FILE_SIZE + 1, (1 << 63) - 1):
        with pytest.raises(InvalidArgument):
            run(svc.setattr(f.ino, size=size))
    assert run(svc.getattr(f.ino)).size == 0
