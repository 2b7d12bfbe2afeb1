"""Several coordinator URLs on a node: calls and the metadata session move to the next
coordinator when theirs cannot be reached (real coordinator processes on loopback).

Two coordinators sharing one PostgreSQL namespace are in ``test_coordinators_postgres.py``;
here a standby coordinator is started on the same SQLite state after the first one dies,
which is how a one-coordinator cluster fails over.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from fastcache.config import ConfigError, parse_coordinators
from fastcache.coordinator.client import CoordinatorClient
from fastcache.coordinator.model import ROOT_INO
from fastcache.coordinator.session_client import SessionClient
from fastcache.errors import TierUnavailable
from tests.integration.conftest_coordinator import CoordinatorProcess, free_port

TOKEN = "failover-token"


@pytest.fixture
def coord(tmp_path: Path) -> Iterator[CoordinatorProcess]:
    proc = CoordinatorProcess(tmp_path / "state", token=TOKEN).start()
    try:
        yield proc
    finally:
        proc.kill()


def dead_url() -> str:
    """A loopback URL nothing listens on: connections are refused."""
    return f"http://127.0.0.1:{free_port()}"


def test_rest_calls_move_past_a_dead_coordinator(coord: CoordinatorProcess) -> None:
    async def main() -> None:
        async with CoordinatorClient([dead_url(), coord.url], TOKEN) as client:
            peer = await client.register_peer("n1", "http://127.0.0.1:9", 1 << 30)  # a POST
            assert peer.peer_id == "n1"
            assert client.base_url == coord.url  # later calls go straight there
            assert [p.peer_id for p in await client.list_peers()] == ["n1"]
        async with CoordinatorClient([dead_url(), dead_url()], TOKEN) as client:
            with pytest.raises(TierUnavailable, match="unreachable"):
                await client.list_peers()

    asyncio.run(main())


def test_session_opens_with_the_first_coordinator_that_answers(
    coord: CoordinatorProcess,
) -> None:
    async def main() -> None:
        async with SessionClient([dead_url(), dead_url(), coord.url], TOKEN) as s:
            assert s.base_url == coord.url
            made = await s.mkdir(ROOT_INO, "d")
            assert (await s.lookup(ROOT_INO, "d")).ino == made.ino

    asyncio.run(main())


def test_session_moves_to_a_standby_when_its_coordinator_dies(tmp_path: Path) -> None:
    """Coordinator 1 is SIGKILLed; a standby comes up on the same state at another URL. The
    session moves there by itself: its leases are dropped (``on_reset``), everything
    acknowledged before is there, and new calls work without a new client."""
    state = tmp_path / "state"
    first = CoordinatorProcess(state, token=TOKEN).start()
    standby = CoordinatorProcess(state, token=TOKEN)
    resets: list[str] = []

    async def main() -> None:
        client = SessionClient(
            [first.url, standby.url], TOKEN, on_reset=lambda: resets.append(first.url)
        )
        async with client as s:
            made = await s.create(ROOT_INO, "kept")
            assert (await s.lookup_leased(ROOT_INO, "kept")).valid
            first.kill()
            await asyncio.to_thread(standby.start)
            found = await s.lookup(ROOT_INO, "kept")  # waits for the new session
            assert found.ino == made.ino
            assert s.base_url == standby.url
            assert resets  # the old session's leases were dropped
            assert s.connects == 2
            await s.mkdir(ROOT_INO, "after")
            assert {e.name for e in await s.readdir(ROOT_INO)} == {"kept", "after"}

    try:
        asyncio.run(main())
    finally:
        first.kill()
        standby.kill()


@pytest.mark.parametrize(
    ("text", "urls"),
    [
        ("http://a:1", ("http://a:1",)),
        ("http://a:1/, http://b:2", ("http://a:1", "http://b:2")),
        (["http://a:1,http://b:2", "http://a:1"], ("http://a:1", "http://b:2")),
    ],
)
def test_parse_coordinators(text: str | list[str], urls: tuple[str, ...]) -> None:
    assert parse_coordinators(text) == urls


@pytest.mark.parametrize("text", ["", ",", "a:1", "ftp://a:1", "http://a:1,b"])
def test_parse_coordinators_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_coordinators(text)
