"""The coordinator's wire model: the one manifest check, holes and blocks, and what importing
the coordinator or a client loads (the model keeps the two apart)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from fastcache import chunks
from fastcache.coordinator.model import (
    INODE_FIELDS,
    INT64_MAX,
    Entry,
    InodeAttrs,
    PeerInfo,
    allocated_blocks,
    hole_digest,
    validate_manifest,
)
from fastcache.errors import BadRequest

D1, D2 = "0" * 32, "f" * 32
REPO = Path(__file__).resolve().parents[2]


# --- validate_manifest -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("doc", "message"),
    [
        (None, "manifest must be an object"),
        ([], "manifest must be an object"),
        ({"size": 4, "chunk_size": 4, "chunks": [D1], "extra": 1}, "unknown fields: extra"),
        ({"size": 4, "chunk_size": 4}, "missing chunks"),
        ({"chunks": []}, "missing size, chunk_size"),
        ({"size": -1, "chunk_size": 4, "chunks": []}, r"size must be an integer in \[0,"),
        ({"size": True, "chunk_size": 4, "chunks": [D1]}, "size must be an integer"),
        ({"size": 4.0, "chunk_size": 4, "chunks": [D1]}, "size must be an integer"),
        ({"size": INT64_MAX + 1, "chunk_size": 4, "chunks": []}, "size must be an integer"),
        ({"size": 4, "chunk_size": 0, "chunks": [D1]}, r"chunk_size must be an integer in \[1,"),
        ({"size": 4, "chunk_size": "4", "chunks": [D1]}, "chunk_size must be an integer"),
        ({"size": 0, "chunk_size": INT64_MAX + 1, "chunks": []}, "chunk_size must be"),
        ({"size": 4, "chunk_size": 4, "chunks": D1}, "chunks must be a list of digests"),
        ({"size": 4, "chunk_size": 4, "chunks": ["A" * 32]}, r"chunks\[0\] is not a digest"),
        ({"size": 8, "chunk_size": 4, "chunks": [D1, "0" * 31]}, r"chunks\[1\] is not a digest"),
        ({"size": 4, "chunk_size": 4, "chunks": [D1[:-1] + "\n"]}, r"chunks\[0\]"),
        ({"size": 4, "chunk_size": 4, "chunks": [None]}, r"chunks\[0\]"),
        ({"size": 4, "chunk_size": 4, "chunks": [D1, D2]}, "has 2 chunks; size 4 in chunks of 4"),
        ({"size": 5, "chunk_size": 4, "chunks": [D1]}, "needs 2"),
        ({"size": 0, "chunk_size": 4, "chunks": [D1]}, "needs 0"),
        ({"size": 7, "chunk_size": 4, "chunks": [D1, D2], "lengths": None}, "lengths must be"),
        ({"size": 7, "chunk_size": 4, "chunks": [D1, D2], "lengths": [0, 7]}, "lengths must be"),
        ({"size": 7, "chunk_size": 4, "chunks": [D1, D2], "lengths": [True, 6]}, "lengths must"),
        ({"size": 7, "chunk_size": 4, "chunks": [D1, D2], "lengths": [7]}, "1 lengths for 2"),
        ({"size": 7, "chunk_size": 4, "chunks": [D1, D2], "lengths": [3, 3]}, "add up to 6, not"),
    ],
)
def test_validate_manifest_refuses(doc: Any, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        validate_manifest(doc)


@pytest.mark.parametrize(
    "doc",
    [
        {"size": 0, "chunk_size": 4, "chunks": []},
        {"size": 4, "chunk_size": 4, "chunks": [D1]},
        {"size": 9, "chunk_size": 4, "chunks": [D1, D2, D1]},
        {"size": 7, "chunk_size": 4, "chunks": [D1, D2], "lengths": [3, 4]},  # CDC: any sizes
        {"size": 0, "chunk_size": 4, "chunks": [], "lengths": []},
    ],
)
def test_validate_manifest_returns_a_canonical_copy(doc: dict[str, Any]) -> None:
    valid = validate_manifest(doc)
    assert valid == doc
    assert valid["chunks"] is not doc["chunks"]  # the caller may keep changing its own lists
    if "lengths" in doc:
        assert valid["lengths"] is not doc["lengths"]


def test_a_node_parses_manifests_with_the_same_check() -> None:
    bad = {"size": 4, "chunk_size": 4, "chunks": [D1, D2]}
    with pytest.raises(BadRequest, match="needs 1"):
        chunks.Manifest.from_json(bad)
    cdc = {"size": 7, "chunk_size": 4, "chunks": [D1, D2], "lengths": [3, 4]}
    manifest = chunks.Manifest.from_json(cdc, version=3)
    assert (manifest.version, manifest.to_json()) == (3, cdc)
    assert manifest.chunks is not cdc["chunks"]


# --- holes and st_blocks -----------------------------------------------------------------
@pytest.mark.parametrize("length", [0, 1, 4096, 65537, 4 << 20])
def test_hole_digest_is_the_digest_of_zeros(length: int) -> None:
    # the coordinator hashes with the xxhash wheel, a node with the compiled code
    assert hole_digest(length) == chunks.digest(bytes(length))


def test_allocated_blocks_skip_holes_and_round_up() -> None:
    cs = 65536
    fixed = {"size": 2 * cs + 10, "chunk_size": cs, "chunks": [hole_digest(cs), D1, D2]}
    assert allocated_blocks(fixed) == (cs + 4096) // 512  # the 10-byte tail is a 4 KiB block
    tail_hole = {"size": cs + 10, "chunk_size": cs, "chunks": [D1, hole_digest(10)]}
    assert allocated_blocks(tail_hole) == cs // 512
    cdc = {"size": 7000, "chunk_size": 4096, "chunks": [D1, hole_digest(3000)]}
    cdc["lengths"] = [4000, 3000]
    assert allocated_blocks(cdc) == 8
    assert allocated_blocks(None) == allocated_blocks({}) == 0


# --- the wire types ----------------------------------------------------------------------
def test_wire_types_round_trip() -> None:
    attrs = InodeAttrs(7, "file", 0o644, 1, 2, 4, 10, 11, 12, 1, version=2, blocks=8)
    attrs.manifest = {"size": 4, "chunk_size": 4, "chunks": [D1]}
    assert list(attrs.to_json()) == list(INODE_FIELDS)
    assert InodeAttrs.from_json(attrs.to_json()) == attrs
    assert InodeAttrs.from_json({**attrs.to_json(), "future": 1}) == attrs  # a newer peer
    entry = Entry("f", attrs, 3)
    assert Entry.from_json(entry.to_json()) == entry
    peer = PeerInfo("n1", "http://h:1", 10, 1, "active", 1.0, 2.0)
    assert PeerInfo.from_json({**peer.to_json(), "extra": 0}) == peer


# --- what importing loads ----------------------------------------------------------------
def _loaded_by(*modules: str) -> set[str]:
    """The ``fastcache`` modules a fresh interpreter holds after importing ``modules``."""
    code = (
        f"import sys, {', '.join(modules)}\n"
        "print('\\n'.join(m for m in sys.modules if m.startswith('fastcache')))"
    )
    env = {k: v for k, v in os.environ.items() if k != "FASTCACHE_NO_EXT"}  # as deployed
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, check=True
    )
    return set(out.stdout.split())


def test_the_probe_sees_the_extensions() -> None:
    assert {"fastcache._xxh", "fastcache._chunker", "fastcache._nvme"} <= _loaded_by(
        "fastcache.chunks"
    )


def test_the_coordinator_loads_no_extension_and_no_node_code() -> None:
    loaded = _loaded_by("fastcache.coordinator.app")
    assert "fastcache.coordinator.service" in loaded
    node_side = ("fastcache._", "fastcache.chunks", "fastcache.mount", "fastcache.cache")
    assert sorted(m for m in loaded if m.startswith((*node_side, "fastcache.tiers"))) == []


@pytest.mark.parametrize(
    "module",
    ["fastcache.mount.files", "fastcache.mount.ops", "fastcache.api", "fastcache.node"],
)
def test_a_client_loads_neither_service_nor_store(module: str) -> None:
    loaded = _loaded_by(module)
    assert "fastcache.coordinator.model" in loaded
    assert not loaded & {"fastcache.coordinator.service", "fastcache.coordinator.store"}
