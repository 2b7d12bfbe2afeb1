"""A session listing asked for with manifests (what a node's ``readdir`` takes): small files'
rows end with their manifest, leased with the row, so the node opens them without asking;
larger files, directories and empty files' rows end with null; a change to a listed file is
pushed to the lister before it is acknowledged. Real coordinator processes, each store."""

from __future__ import annotations

from typing import Any

from fastcache.coordinator.client import CoordinatorClient
from fastcache.coordinator.model import ROOT_INO
from fastcache.coordinator.service import LISTED_MANIFEST_MAX
from tests.integration import test_session as session_suite
from tests.integration.test_session import D1, D2, TOKEN, LeasedCoordinator, _client, arun

coord = session_suite.coord  # the session suite's coordinator, on each store


def manifest(size: int, chunk_size: int) -> dict[str, Any]:
    count = -(-size // chunk_size)
    return {"size": size, "chunk_size": chunk_size, "chunks": [D1] * count}


def test_a_listing_with_manifests_carries_small_files_ones(coord: LeasedCoordinator) -> None:
    async def body() -> None:
        events: list[Any] = []
        async with (
            _client(coord.url, events, "A") as a,
            CoordinatorClient(coord.url, TOKEN) as rest,
        ):
            d = (await rest.mkdir(ROOT_INO, "listed-with-manifests")).ino
            small = await rest.create(d, "small")
            small_doc = manifest(4096, 1 << 20)
            await rest.commit_manifest(small.ino, small_doc, 0)
            edge = await rest.create(d, "edge")
            edge_doc = manifest(LISTED_MANIFEST_MAX, 1 << 20)
            await rest.commit_manifest(edge.ino, edge_doc, 0)
            large = await rest.create(d, "large")
            await rest.commit_manifest(large.ino, manifest(LISTED_MANIFEST_MAX + 1, 1 << 20), 0)
            await rest.create(d, "empty")
            await rest.mkdir(d, "sub")

            leased = await a.readdir_leased(d, manifests=True)
            assert leased.valid
            got = {e.name: e.attrs.manifest for e in leased.value}
            assert got == {
                "small": small_doc,
                "edge": edge_doc,
                "large": None,
                "empty": None,
                "sub": None,
            }
            plain = await a.readdir_leased(d)  # as before: the same rows, no manifests
            for e in leased.value:
                e.attrs.manifest = None
            assert [e.attrs for e in plain.value] == [e.attrs for e in leased.value]

            # the small file's row is leased: its change reaches A before it returns
            events.clear()
            await rest.commit_manifest(
                small.ino, {"size": 5, "chunk_size": 4, "chunks": [D1, D2]}, 1
            )
            assert any(f"attr:{small.ino}" in keys for _, _, keys in events), events

    arun(body())
