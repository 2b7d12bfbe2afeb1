"""The peer tier: rendezvous placement, the circuit breaker, and reads against real
loopback peers (small aiohttp apps serving ``/api/chunks/{digest}``)."""

from __future__ import annotations

import asyncio
import os
import random
import socket
from collections import Counter
from collections.abc import Sequence

import aiohttp
import pytest
from aiohttp import web

from fastcache.chunks import digest
from fastcache.errors import ChunkNotFound, TierUnavailable
from fastcache.tiers.peer import (
    _VECTOR_FROM,
    CircuitBreaker,
    PeerAddr,
    PeerTier,
    hrw_score,
    rank_peers,
    replicas_for,
    top_peers,
)
from tests.helpers import serve_app

DIGESTS = [digest(i.to_bytes(4, "little")) for i in range(6000)]


# --- placement ---------------------------------------------------------------------------
def test_hrw_is_deterministic_and_order_independent() -> None:
    peers = [f"node{i}" for i in range(7)]
    for d in DIGESTS[:200]:
        assert rank_peers(d, peers) == rank_peers(d, list(reversed(peers)))
        assert sorted(rank_peers(d, peers)) == sorted(peers)


def test_hrw_is_balanced() -> None:
    peers = [f"node{i}" for i in range(5)]
    firsts = Counter(rank_peers(d, peers)[0] for d in DIGESTS)
    expected = len(DIGESTS) / len(peers)
    assert set(firsts) == set(peers)
    for count in firsts.values():
        assert abs(count - expected) < 0.15 * expected


def test_adding_a_peer_moves_about_one_nth() -> None:
    peers = [f"node{i}" for i in range(4)]
    grown = [*peers, "node4"]
    before = {d: rank_peers(d, peers)[0] for d in DIGESTS}
    after = {d: rank_peers(d, grown)[0] for d in DIGESTS}
    moved = [d for d in DIGESTS if before[d] != after[d]]
    # every move goes to the newcomer, and the newcomer takes ~1/5 of the digests
    assert all(after[d] == "node4" for d in moved)
    assert abs(len(moved) / len(DIGESTS) - 1 / 5) < 0.03


def test_removing_a_peer_only_moves_its_digests() -> None:
    peers = [f"node{i}" for i in range(5)]
    shrunk = [p for p in peers if p != "node2"]
    for d in DIGESTS[:1000]:
        before = rank_peers(d, peers)[0]
        if before != "node2":
            assert rank_peers(d, shrunk)[0] == before


def test_replicas_exclude_self_and_are_distinct() -> None:
    peers = [f"node{i}" for i in range(5)]
    for d in DIGESTS[:500]:
        reps = replicas_for(d, peers, "node0", 3)
        assert len(reps) == 3 == len(set(reps))
        assert "node0" not in reps
        assert reps == [p for p in rank_peers(d, peers) if p != "node0"][:3]
    assert replicas_for(DIGESTS[0], ["node0", "node1"], "node0", 3) == ["node1"]
    assert replicas_for(DIGESTS[0], ["node0"], "node0", 3) == []


# --- circuit breaker ---------------------------------------------------------------------
class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_after_k_failures_and_half_opens_after_cooldown() -> None:
    clock = FakeClock()
    b = CircuitBreaker(threshold=3, cooldown=5.0, clock=clock)
    assert b.allow() and b.state == "closed"
    assert not b.failure() and not b.failure()
    assert b.allow()
    assert b.failure()  # the third consecutive failure trips it
    assert b.state == "open" and not b.allow() and b.trips == 1
    clock.now += 4.9
    assert not b.allow()
    clock.now += 0.2
    assert b.state == "half-open"
    assert b.allow()  # one probe goes through ...
    assert not b.allow()  # ... and only one
    assert b.failure()  # the probe failed: open again for a whole cool-down
    assert b.state == "open" and b.trips == 2
    clock.now += 5.1
    assert b.allow()
    b.success()
    assert b.state == "closed" and b.failures == 0 and b.allow()


def test_breaker_probe_released_without_a_verdict() -> None:
    clock = FakeClock()
    b = CircuitBreaker(threshold=1, cooldown=1.0, clock=clock)
    b.failure()
    clock.now += 2
    assert b.allow() and not b.allow()
    b.release()  # the probe was cancelled: the next request may probe instead
    assert b.allow()


def test_breaker_success_resets_the_count() -> None:
    b = CircuitBreaker(threshold=2, cooldown=1.0, clock=FakeClock())
    b.failure()
    b.success()
    assert not b.failure()
    assert b.state == "closed"


# --- reads and writes against loopback peers ------------------------------------------
class Directory:
    """A fixed peer list and location records, standing in for the coordinator."""

    def __init__(self, peers: Sequence[PeerAddr]) -> None:
        self.peers = list(peers)
        self.holders: dict[str, list[str]] = {}

    async def live_peers(self) -> list[PeerAddr]:
        return list(self.peers)

    async def chunk_holders(self, digest: str) -> list[PeerAddr]:
        urls = {p.peer_id: p.url for p in self.peers}
        return [PeerAddr(p, urls[p]) for p in self.holders.get(digest, []) if p in urls]

    async def add_chunk_holders(self, digest: str, peer_ids: Sequence[str]) -> None:
        self.holders.setdefault(digest, []).extend(peer_ids)

    batches: list[tuple[str, list[str]]]
    fail_batches = False

    async def add_holdings(self, peer_id: str, digests: Sequence[str]) -> None:
        if not hasattr(self, "batches"):
            self.batches = []
        self.batches.append((peer_id, list(digests)))
        if self.fail_batches:
            raise TierUnavailable("coordinator down")
        for d in digests:
            self.holders.setdefault(d, []).append(peer_id)


def chunk_app(store: dict[str, bytes], corrupt: bool = False) -> web.Application:
    async def get(request: web.Request) -> web.StreamResponse:
        data = store.get(request.match_info["digest"])
        if data is None:
            raise web.HTTPNotFound()
        return web.Response(body=(b"x" + data[1:]) if corrupt else data)

    async def put(request: web.Request) -> web.StreamResponse:
        store[request.match_info["digest"]] = await request.read()
        return web.Response(status=201)

    app = web.Application(client_max_size=8 << 20)
    app.router.add_get("/api/chunks/{digest}", get)  # also answers HEAD
    app.router.add_put("/api/chunks/{digest}", put)
    return app


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def _with_peers(apps: dict[str, web.Application | None], body) -> None:  # type: ignore[no-untyped-def]
    runners, addrs = [], []
    for peer_id, app in apps.items():
        if app is None:  # a dead peer: nothing listens on its port
            addrs.append(PeerAddr(peer_id, f"http://127.0.0.1:{closed_port()}"))
            continue
        runner, url = await serve_app(app)
        runners.append(runner)
        addrs.append(PeerAddr(peer_id, url))
    directory = Directory([PeerAddr("me", "http://127.0.0.1:1"), *addrs])
    session = aiohttp.ClientSession()
    tier = PeerTier("me", directory, session, replication=3, breaker_threshold=2)
    try:
        await body(tier, directory)
    finally:
        await tier.close()
        await session.close()
        for runner in runners:
            await runner.cleanup()


def test_write_replicates_and_read_skips_corrupt_and_dead_peers() -> None:
    stores: dict[str, dict[str, bytes]] = {p: {} for p in ("a", "b", "c", "d")}
    data = os.urandom(100_000)
    d = digest(data)

    async def body(tier: PeerTier, directory: Directory) -> None:
        await tier.write(d, data)
        holders = tier.replicas(d)
        assert len(holders) == 3 and "me" not in holders
        for p in holders:
            assert p in ("dead",) or stores[p].get(d) == data
        # the remaining holders are recorded at the coordinator, once the task ran
        for _ in range(100):
            if directory.holders.get(d):
                break
            await asyncio.sleep(0)
        assert set(directory.holders[d]) == {p for p in holders if p != "dead"}
        assert await tier.read(d) == data
        assert await tier.exists(d)
        assert await tier.size(d) == len(data)
        stats = tier.stats()
        assert stats["hits"] == 1 and stats["bytes_read"] == len(data)

    apps: dict[str, web.Application | None] = {p: chunk_app(s) for p, s in stores.items()}
    apps["dead"] = None
    asyncio.run(_with_peers(apps, body))


def test_corrupt_answer_is_ignored_and_counted() -> None:
    """The first choice sends a corrupt copy: it is counted, and the next one is asked."""
    while True:  # a chunk whose first rendezvous choice is the corrupt peer
        data = os.urandom(50_000)
        d = digest(data)
        if rank_peers(d, ["bad", "good"])[0] == "bad":
            break
    good, bad = {d: data}, {d: data}

    async def body(tier: PeerTier, directory: Directory) -> None:
        directory.holders[d] = ["good", "bad"]
        for _ in range(5):
            assert await tier.read(d) == data
        assert tier.stats()["corrupt"] >= 1

    asyncio.run(_with_peers({"bad": chunk_app(bad, corrupt=True), "good": chunk_app(good)}, body))


def test_only_corrupt_copies_is_a_miss() -> None:
    data = os.urandom(1000)
    d = digest(data)

    async def body(tier: PeerTier, directory: Directory) -> None:
        with pytest.raises(ChunkNotFound):
            await tier.read(d)
        assert tier.stats()["corrupt"] == 1 and tier.stats()["misses"] == 1

    asyncio.run(_with_peers({"bad": chunk_app({d: data}, corrupt=True)}, body))


def test_location_records_find_chunks_off_their_replicas() -> None:
    """A chunk held by a peer outside the HRW replica set is found through the coordinator."""
    data = os.urandom(2000)
    d = digest(data)
    peers = [f"p{i}" for i in range(6)]
    stores: dict[str, dict[str, bytes]] = {p: {} for p in peers}
    outsider = rank_peers(d, peers)[-1]
    stores[outsider][d] = data

    async def body(tier: PeerTier, directory: Directory) -> None:
        with pytest.raises(ChunkNotFound):
            await tier.read(d)
        directory.holders[d] = [outsider]
        assert await tier.read(d) == data

    asyncio.run(_with_peers({p: chunk_app(s) for p, s in stores.items()}, body))


def test_dead_peers_trip_their_breaker_and_writes_fail_cleanly() -> None:
    d = digest(b"abc")

    async def body(tier: PeerTier, directory: Directory) -> None:
        for _ in range(2):
            with pytest.raises(ChunkNotFound):
                await tier.read(d)
        stats = tier.stats()
        assert stats["breaker_trips"] == 2 and stats["open_breakers"] == ["x", "y"]
        with pytest.raises(TierUnavailable):  # every replica is skipped while open
            await tier.write(d, b"abc")
        assert tier.stats()["errors"] == 4  # the skipped ones cost no request

    asyncio.run(_with_peers({"x": None, "y": None}, body))


def test_a_holder_newer_than_the_cached_peer_list_is_still_asked() -> None:
    data = os.urandom(3000)
    d = digest(data)

    async def body(tier: PeerTier, directory: Directory) -> None:
        runner, url = await serve_app(chunk_app({d: data}))
        try:
            await tier.live_peers()  # cached without the newcomer
            directory.peers.append(PeerAddr("newcomer", url))
            directory.holders[d] = ["newcomer"]
            assert "newcomer" not in tier.replicas(d)
            assert await tier.read(d) == data
            assert await tier.size(d) == len(data)
        finally:
            await runner.cleanup()

    asyncio.run(_with_peers({"old": chunk_app({})}, body))


def test_a_hanging_peer_does_not_hold_up_the_answer() -> None:
    """One holder never answers; the other's verified copy is returned without waiting."""
    data = os.urandom(4000)
    d = digest(data)
    release = asyncio.Event()

    async def hang(request: web.Request) -> web.StreamResponse:
        await release.wait()
        raise web.HTTPNotFound()

    hanging = web.Application()
    hanging.router.add_get("/api/chunks/{digest}", hang)

    async def body(tier: PeerTier, directory: Directory) -> None:
        tier._first_byte_timeout = 3600.0  # only the good peer's answer can end the read
        directory.holders[d] = ["hang", "good"]
        try:
            assert await tier.read(d) == data
        finally:
            release.set()

    asyncio.run(_with_peers({"hang": hanging, "good": chunk_app({d: data})}, body))


def test_announce_is_one_batch_and_makes_the_writer_findable() -> None:
    """A chunk only on "a" (the writer), outside the reader's rendezvous set: found only
    through the batched announce."""
    others = ("b", "c", "d")
    while True:
        data = os.urandom(1000)
        d = digest(data)
        if "a" not in replicas_for(d, ("a", *others), "me", 3):
            break
    extra = [x for x in DIGESTS[:3] if x != d][:2]

    async def body(tier: PeerTier, directory: Directory) -> None:
        with pytest.raises(ChunkNotFound):
            await tier.read(d)
        announcer = PeerTier("a", directory, tier._session)
        assert await announcer.announce([d, *extra, d]) == 0
        assert directory.batches == [("a", [d, *extra])]  # one request, no duplicates
        assert announcer.stats()["announced"] == 3
        assert await tier.read(d) == data
        assert await announcer.announce([]) == 0 and len(directory.batches) == 1
        directory.fail_batches = True
        assert await announcer.announce([DIGESTS[3]]) == 1  # logged and counted, not raised
        assert announcer.stats()["announce_failures"] == 1
        await announcer.close()

    apps: dict[str, web.Application | None] = {"a": chunk_app({d: data})}
    apps.update({p: chunk_app({}) for p in others})
    asyncio.run(_with_peers(apps, body))


def test_fetch_through_asks_only_the_owner_to_fetch() -> None:
    """``read(fetch_through=True)`` sends ``?fetch=1`` to the chunk's owner (first rendezvous
    choice, self included) and plain GETs to the other holders; a chunk we own is asked
    for plainly only."""
    peers = ("a", "b", "c")
    seen: list[tuple[str, str, bool]] = []

    def owned_by(want_me: bool) -> bytes:
        while True:
            data = os.urandom(50_000)
            if (rank_peers(digest(data), ["me", *peers])[0] == "me") == want_me:
                return data

    behind = owned_by(False)  # only "in S3": an owner that fetches it can serve it
    mine = owned_by(True)

    def fetch_app(peer_id: str) -> web.Application:
        async def get(request: web.Request) -> web.StreamResponse:
            d = request.match_info["digest"]
            fetch = request.query.get("fetch") == "1"
            seen.append((peer_id, d, fetch))
            if fetch and d == digest(behind):
                return web.Response(body=behind)
            raise web.HTTPNotFound()

        app = web.Application()
        app.router.add_get("/api/chunks/{digest}", get)
        return app

    async def body(tier: PeerTier, directory: Directory) -> None:
        await tier.live_peers()
        d = digest(behind)
        owner = rank_peers(d, ["me", *peers])[0]
        assert tier.owner(d) == owner != "me"
        assert await tier.read(d, fetch_through=True) == behind
        assert [p for p, _, fetch in seen if fetch] == [owner]
        assert tier.stats()["fetch_through"] == 1
        seen.clear()
        assert tier.owner(digest(mine)) == "me"
        with pytest.raises(ChunkNotFound):  # ours to fetch: the peers are asked plainly
            await tier.read(digest(mine), fetch_through=True)
        assert seen and not any(fetch for _, _, fetch in seen)
        seen.clear()
        with pytest.raises(ChunkNotFound):  # a plain read never asks anyone to fetch
            await tier.read(d)
        assert seen and not any(fetch for _, _, fetch in seen)

    apps: dict[str, web.Application | None] = {p: fetch_app(p) for p in peers}
    asyncio.run(_with_peers(apps, body))


def test_a_call_from_an_unknown_peer_refreshes_the_list_before_the_next_read() -> None:
    """A node that joined (or restarted) after our last refresh calls us: our owners are out
    of date, so the next use of the peer list waits for a fresh one."""

    async def main() -> None:
        directory = Directory([PeerAddr("me", "http://127.0.0.1:1")])
        async with aiohttp.ClientSession() as session:
            tier = PeerTier("me", directory, session)
            try:
                assert set(await tier.live_peers()) == {"me"}
                directory.peers.append(PeerAddr("late", "http://127.0.0.1:2"))
                tier.heard_from("me")  # ourselves, and peers we know: nothing to do
                assert set(await tier.live_peers()) == {"me"}
                tier.heard_from("late")
                assert set(await tier.live_peers()) == {"me", "late"}
            finally:
                await tier.close()

    asyncio.run(main())


def test_one_copy_is_transferred_when_several_peers_hold_it() -> None:
    """Every holder has the chunk: only the first choice is asked (a second 4 MiB transfer
    would be waste), and no coordinator lookup is made."""
    data = os.urandom(60_000)
    d = digest(data)
    served: list[str] = []

    def counting_app(peer_id: str) -> web.Application:
        async def get(request: web.Request) -> web.StreamResponse:
            served.append(peer_id)
            return web.Response(body=data)

        app = web.Application()
        app.router.add_get("/api/chunks/{digest}", get)
        return app

    async def body(tier: PeerTier, directory: Directory) -> None:
        tier._hedge_delay = 3600.0  # no hedging: only a miss or a failure asks the next
        looked_up: list[str] = []
        lookup = directory.chunk_holders

        async def chunk_holders(digest: str) -> list[PeerAddr]:
            looked_up.append(digest)
            return await lookup(digest)

        directory.chunk_holders = chunk_holders  # type: ignore[method-assign]
        for _ in range(3):
            assert await tier.read(d) == data
        assert served == [tier.replicas(d)[0]] * 3
        assert looked_up == []

    asyncio.run(_with_peers({p: counting_app(p) for p in ("a", "b", "c")}, body))


def test_a_slow_first_choice_is_hedged() -> None:
    """The first choice has not answered after ``hedge_delay``: the next one is asked too."""
    data = os.urandom(5000)
    d = digest(data)
    release = asyncio.Event()
    first = rank_peers(d, ["p", "q"])[0]

    async def hang(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.Response(body=data)

    slow = web.Application()
    slow.router.add_get("/api/chunks/{digest}", hang)
    apps = {first: slow, ({"p", "q"} - {first}).pop(): chunk_app({d: data})}

    async def body(tier: PeerTier, directory: Directory) -> None:
        tier._first_byte_timeout = 3600.0
        tier._hedge_delay = 0.01
        try:  # without the hedge this waits for the slow peer, i.e. forever
            assert await asyncio.wait_for(tier.read(d), 60) == data
        finally:
            release.set()

    asyncio.run(_with_peers(apps, body))


def owned_by(owner: str, peers: list[str], size: int = 5000) -> bytes:
    while True:
        data = os.urandom(size)
        if rank_peers(digest(data), peers)[0] == owner:
            return data


def test_a_frozen_owner_is_reported_silent() -> None:
    """The owner accepts connections but never answers (a SIGSTOPped process: the kernel
    still completes the handshake): with nobody else to ask, ``silent`` is set while the
    read still waits, so the caller can race S3 instead of waiting out the timeouts."""
    data = owned_by("frozen", ["me", "frozen"])
    d = digest(data)
    frozen = socket.socket()
    frozen.bind(("127.0.0.1", 0))
    frozen.listen(64)  # never accepted, never answered
    url = f"http://127.0.0.1:{frozen.getsockname()[1]}"

    async def main() -> None:
        directory = Directory([PeerAddr("me", "http://127.0.0.1:1"), PeerAddr("frozen", url)])
        async with aiohttp.ClientSession() as session:
            tier = PeerTier("me", directory, session, hedge_delay=0.01)
            silent = asyncio.Event()
            read = asyncio.ensure_future(tier.read(d, fetch_through=True, silent=silent))
            try:
                said = asyncio.ensure_future(silent.wait())
                await asyncio.wait({read, said}, return_when=asyncio.FIRST_COMPLETED)
                assert silent.is_set() and not read.done()  # said so, still waiting
                stats = tier.stats()
                assert stats["silent"] == 1 and stats["probes"] == 1
                assert stats["fetch_through"] == 1
            finally:
                read.cancel()
                await asyncio.gather(read, return_exceptions=True)
                await tier.close()

    try:
        asyncio.run(main())
    finally:
        frozen.close()


def test_a_busy_owner_that_answers_probes_is_waited_for() -> None:
    """The owner takes its time over a fetch-through (an S3 read) but answers liveness
    probes: the read waits for it, never reporting it silent (S3 would be read twice)."""
    data = owned_by("owner", ["me", "owner"])
    d = digest(data)
    checks: list[bool] = []

    async def fetch(request: web.Request) -> web.StreamResponse:
        while len(checks) < 5:  # answer only after several silence checks found it alive
            await asyncio.sleep(0.005)
        return web.Response(body=data)

    async def health(request: web.Request) -> web.StreamResponse:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_get("/api/chunks/{digest}", fetch)
    app.router.add_get("/api/health", health)

    async def body(tier: PeerTier, directory: Directory) -> None:
        tier._hedge_delay = 0.01
        alive = tier._alive

        def counted(peer_id: str, asked_at: float) -> bool:
            checks.append(alive(peer_id, asked_at))
            return checks[-1]

        tier._alive = counted  # type: ignore[method-assign]
        silent = asyncio.Event()
        assert await tier.read(d, fetch_through=True, silent=silent) == data
        assert not silent.is_set() and all(checks) and tier.stats()["silent"] == 0

    asyncio.run(_with_peers({"owner": app}, body))


def test_large_clusters_rank_with_the_same_weights_as_small_ones() -> None:
    """From ``_VECTOR_FROM`` nodes the weights are computed in one numpy pass: the order
    must be the one the per-node weights give, whatever order the nodes come in, and the
    top ``k`` must be the head of the full ranking."""
    rng = random.Random(7)
    for n in (_VECTOR_FROM - 1, _VECTOR_FROM, 200):
        nodes = [f"n{i}" for i in range(n)]
        for d in DIGESTS[:40]:
            expected = sorted(nodes, key=lambda p: (-hrw_score(p, d), p))
            shuffled = nodes[:]
            rng.shuffle(shuffled)
            assert rank_peers(d, shuffled) == expected
            for k in (1, 3, n):
                assert top_peers(d, shuffled, k) == expected[:k]
