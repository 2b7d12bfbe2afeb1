"""Tier 2: the NVMe caches of the other client nodes, reached over their client API.

Placement is rendezvous (highest-random-weight) hashing over the live peers the coordinator
knows, so every node computes the same ``replication`` holders for a digest without asking
anyone, and a peer joining or leaving moves only ~1/n of the chunks. Reads also ask the
peers the coordinator's ``chunk:<digest>`` location record names (chunks written before the
peer set changed). Everything that arrives is verified against its digest.

A dead or frozen peer must never stall a read: connects are short, replies must start
quickly, the next candidate is asked as soon as one misses or fails, or has not started
answering after a short hedge delay (first verified answer wins), and a per-peer circuit
breaker skips a peer for a cool-down after a few consecutive failures. Candidates are not
all asked at once: on a busy node every extra copy is a 4 MiB transfer for nothing.

A fetch-through owner may rightly take an S3 read before it answers, so its silence alone
proves nothing; a liveness probe (``GET /api/health``, answered by its event loop at once)
tells a busy owner from a frozen one (SIGSTOP: the kernel still accepts the connection).
When nobody is left to ask and every peer asked is silent (no answer started, no probe
answered), ``read`` says so through its ``silent`` event: the caller then races its next
tier (S3) against the peers instead of waiting out their timeouts.

Chunk GETs go through ``fastget`` (received straight into one buffer); writes and HEADs
through the aiohttp session.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import numpy as np

from fastcache.chunks import Buffer, receive_buffer, xxh64
from fastcache.errors import ChunkCorrupt, ChunkNotFound, FastcacheError, TierUnavailable
from fastcache.tiers.base import verify
from fastcache.tiers.fastget import FastGet

log = logging.getLogger("fastcache.client.peer")

Clock = Callable[[], float]
PEER_HEADER = "X-Fastcache-Peer"  # the calling node's id, on every peer request
_YOUNG_FOR = 10.0  # seconds after start with frequent peer list refreshes ...
_YOUNG_REFRESH = 0.5  # ... this often at most
HEALTH_PATH = "/api/health"  # what a liveness probe asks: answered at once, no auth
_LIVE_FOR = 1.0  # a probe answered this recently shows a peer alive (seconds)


# --- placement ---------------------------------------------------------------------------
# Rendezvous (highest random weight) hashing: a chunk's owner is the live node with the
# highest ``mix(hash(node) ^ hash(digest))``. A join moves only the chunks the new node wins
# (1/N of them), a leave only the leaver's. Node hashes are computed once; with many nodes
# the scores are computed in one numpy pass (1,000 nodes: tens of microseconds, not
# milliseconds of Python per chunk).
_MASK = (1 << 64) - 1
_VECTOR_FROM = 32  # nodes from which numpy beats the Python loop
_node_hashes: dict[str, int] = {}


def _node_hash(peer_id: str) -> int:
    h = _node_hashes.get(peer_id)
    if h is None:
        if len(_node_hashes) > 65536:
            _node_hashes.clear()
        h = _node_hashes[peer_id] = xxh64(peer_id.encode())
    return h


def _mix(x: int) -> int:
    """splitmix64's finaliser: every input bit moves every output bit."""
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK
    return x ^ (x >> 31)


def _mix_all(x: np.ndarray) -> np.ndarray:
    """``_mix`` over an array of uint64 (multiplication wraps modulo 2**64, as in ``_mix``)."""
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def hrw_score(peer_id: str, digest: str) -> int:
    """The rendezvous weight of ``peer_id`` for ``digest`` (64 bits)."""
    return _mix(_node_hash(peer_id) ^ xxh64(digest.encode()))


@functools.lru_cache(maxsize=8)
def _ring(ids: tuple[str, ...]) -> tuple[np.ndarray, np.ndarray]:
    """The nodes sorted by id (an object array) and their hashes: the same list, one ring."""
    ordered = sorted(ids)
    hashes = np.array([_node_hash(p) for p in ordered], dtype=np.uint64)
    return np.array(ordered, dtype=object), hashes


def top_peers(digest: str, peer_ids: Iterable[str], count: int) -> list[str]:
    """The ``count`` best of ``peer_ids`` for ``digest``, best first (ties by id)."""
    ids = tuple(peer_ids)
    if len(ids) < _VECTOR_FROM:
        return sorted(ids, key=lambda p: (-hrw_score(p, digest), p))[:count]
    ordered, hashes = _ring(ids)
    # ~score: the highest score sorts first; a stable sort keeps ties in id order
    keys = ~_mix_all(hashes ^ np.uint64(xxh64(digest.encode())))
    if count == 1:
        return [ordered[int(np.argmin(keys))]]
    if count < len(ids):
        best = np.argpartition(keys, count - 1)[:count]
        best = best[np.lexsort((best, keys[best]))]
        return ordered[best].tolist()  # type: ignore[no-any-return]
    return ordered[np.argsort(keys, kind="stable")].tolist()  # type: ignore[no-any-return]


def rank_peers(digest: str, peer_ids: Iterable[str]) -> list[str]:
    """``peer_ids`` ordered by rendezvous weight for ``digest``, best first (ties by id)."""
    ids = tuple(peer_ids)
    return top_peers(digest, ids, len(ids))


def replicas_for(digest: str, peer_ids: Iterable[str], self_id: str, count: int) -> list[str]:
    """The ``count`` peers, other than ``self_id``, that should hold ``digest``."""
    return top_peers(digest, (p for p in peer_ids if p != self_id), count)


# --- circuit breaker ---------------------------------------------------------------------
class CircuitBreaker:
    """Closed → (``threshold`` consecutive failures) → open for ``cooldown`` s → half-open.

    Half-open lets one probe through; its success closes the breaker, its failure opens it
    for another cool-down. ``clock`` is injectable so tests need no sleeping.
    """

    def __init__(self, threshold: int = 3, cooldown: float = 5.0, clock: Clock = time.monotonic):
        if threshold < 1:
            raise ValueError("threshold must be at least 1")
        self.threshold = threshold
        self.cooldown = cooldown
        self._clock = clock
        self.failures = 0
        self.trips = 0
        self._open_until: float | None = None
        self._probing = False

    @property
    def state(self) -> str:
        if self._open_until is None:
            return "closed"
        if self._clock() < self._open_until:
            return "open"
        return "half-open"

    def allow(self) -> bool:
        """Whether a request may go to this peer now (claims the half-open probe)."""
        state = self.state
        if state == "closed":
            return True
        if state == "open" or self._probing:
            return False
        self._probing = True
        return True

    def release(self) -> None:
        """The request let through ended without a verdict (cancelled): free the probe."""
        self._probing = False

    def success(self) -> None:
        self.failures = 0
        self._open_until = None
        self._probing = False

    def failure(self) -> bool:
        """Record a failure; True when this one opened the breaker."""
        self.failures += 1
        if self._open_until is not None:  # a failed half-open probe: open again
            self._open_until = self._clock() + self.cooldown
            self._probing = False
            self.trips += 1
            return True
        if self.failures >= self.threshold:
            self._open_until = self._clock() + self.cooldown
            self.trips += 1
            return True
        return False


# --- the coordinator as the peer tier sees it ------------------------------------------
@dataclass(frozen=True)
class PeerAddr:
    peer_id: str
    url: str


class PeerDirectory(Protocol):
    """What the peer tier needs from the coordinator (see ``coordinator_directory``)."""

    async def live_peers(self) -> list[PeerAddr]: ...

    async def chunk_holders(self, digest: str) -> list[PeerAddr]:
        """The live peers the coordinator records as holding ``digest``."""
        ...

    async def add_chunk_holders(self, digest: str, peer_ids: Sequence[str]) -> None: ...

    async def add_holdings(self, peer_id: str, digests: Sequence[str]) -> None:
        """Record ``peer_id`` as a holder of every chunk in ``digests`` (one request)."""
        ...


class CoordinatorDirectory:
    """``PeerDirectory`` over ``fastcache.coordinator.client.CoordinatorClient``."""

    def __init__(self, client: Any) -> None:
        self._client = client

    async def live_peers(self) -> list[PeerAddr]:
        return [PeerAddr(p.peer_id, p.url.rstrip("/")) for p in await self._client.list_peers()]

    async def chunk_holders(self, digest: str) -> list[PeerAddr]:
        found = await self._client.get_locations(chunk=digest)
        return [PeerAddr(p.peer_id, p.url.rstrip("/")) for p in found]

    async def add_chunk_holders(self, digest: str, peer_ids: Sequence[str]) -> None:
        await asyncio.gather(*(self._client.add_location(p, chunk=digest) for p in peer_ids))

    async def add_holdings(self, peer_id: str, digests: Sequence[str]) -> None:
        await self._client.add_locations(peer_id, chunks=digests)


def make_session(pool_size: int = 64) -> aiohttp.ClientSession:
    """The pooled session peer transfers share. A read buffer of one chunk: with aiohttp's
    64 KiB default, a 4 MiB body pauses and resumes the socket dozens of times."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=pool_size, limit_per_host=16),
        auto_decompress=False,
        read_bufsize=4 << 20,
    )


# --- the tier ----------------------------------------------------------------------------
class _Miss(Exception):
    """A peer answered, but does not hold the chunk."""


class PeerTier:
    """``TierStorage`` over the other nodes' ``/api/chunks/{digest}`` (name ``"peer"``), and
    the cache's ``PeerRouting``: live peers, owners, announcements."""

    name = "peer"
    # ``read`` returns only bytes it verified against the digest: the cache does not hash
    # them a second time (every chunk from another node is still verified exactly once).
    verifies_reads = True

    def __init__(
        self,
        self_id: str,
        directory: PeerDirectory,
        session: aiohttp.ClientSession,
        *,
        token: str | None = None,
        replication: int = 3,
        connect_timeout: float = 0.5,
        read_timeout: float = 10.0,
        refresh_interval: float = 3.0,
        breaker_threshold: int = 3,
        breaker_cooldown: float = 5.0,
        clock: Clock = time.monotonic,
        own_session: bool = False,
        hedge_delay: float = 0.05,
    ) -> None:
        self.self_id = self_id
        self.replication = replication
        self._directory = directory
        self._session = session
        self._own_session = own_session
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._headers[PEER_HEADER] = self_id  # lets a peer that does not know us yet learn
        self._connect_timeout = connect_timeout
        # Reply headers must come quickly: a peer serves from its NVMe or says 404.
        self._first_byte_timeout = max(4 * connect_timeout, 1.0)
        self._hedge_delay = hedge_delay
        self._read_timeout = read_timeout
        self._fast = FastGet()  # chunk GETs; aiohttp for the rest
        self._timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=connect_timeout, sock_read=read_timeout
        )
        self._refresh_interval = refresh_interval
        self._breaker_threshold = breaker_threshold
        self._breaker_cooldown = breaker_cooldown
        self._clock = clock
        self._peers: dict[str, str] = {}  # peer id -> base URL
        self._peers_at: float | None = None
        self._refresh_task: asyncio.Task[None] | None = None
        self._refresh_ok = True  # the last refresh answered: worth waiting for the next
        self._stale = False  # a peer we do not know called us: refresh before the next use
        # Nodes usually start together (a cluster start or restart): for a while after ours,
        # the list is refreshed more often, so early owners are not computed from a list
        # taken before the others registered.
        self._young_until = clock() + _YOUNG_FOR
        self._breakers: dict[str, CircuitBreaker] = {}
        self._tasks: set[asyncio.Task[Any]] = set()
        # liveness probes: peer → the one in flight; peer → when the last answered one left
        self._probing: dict[str, asyncio.Task[None]] = {}
        self._heard: dict[str, float] = {}
        self._counters = dict.fromkeys(
            (
                "requests",
                "hits",
                "misses",
                "bytes_read",
                "writes",
                "write_failures",
                "bytes_written",
                "errors",
                "corrupt",
                "skipped_open_breaker",
                "peer_refreshes",
                "announced",
                "announce_failures",
                "fetch_through",
                "probes",
                "silent",
            ),
            0,
        )

    @classmethod
    async def open(
        cls,
        self_id: str,
        coordinator: Any,
        *,
        token: str | None = None,
        replication: int = 3,
        connect_timeout: float = 0.5,
        read_timeout: float = 10.0,
        pool_size: int = 64,
    ) -> PeerTier:
        """A tier with its own pooled session, over a ``CoordinatorClient``."""
        session = make_session(pool_size)
        return cls(
            self_id,
            CoordinatorDirectory(coordinator),
            session,
            token=token,
            replication=replication,
            connect_timeout=connect_timeout,
            read_timeout=read_timeout,
            own_session=True,
        )

    # --- peers ---------------------------------------------------------------------------
    async def _refresh(self) -> None:
        try:
            peers = await asyncio.wait_for(
                self._directory.live_peers(), timeout=max(2.0, 4 * self._connect_timeout)
            )
        except (FastcacheError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.debug("peer list refresh failed: %s", exc)
            self._refresh_ok = False
            return
        self._refresh_ok = True
        self._peers = {p.peer_id: p.url for p in peers}
        self._peers_at = self._clock()
        self._counters["peer_refreshes"] += 1

    async def live_peers(self) -> dict[str, str]:
        """Live peers (id → URL), self included. The very first call waits for the
        coordinator; the call that finds the list stale starts a refresh and waits for it
        briefly (a connect timeout at most: owners computed from a stale list send reads to
        the wrong node, or to S3 twice); calls meanwhile use the list as it is."""
        if self._peers_at is None:
            await self._refresh()
        elif self._stale or self._clock() - self._peers_at >= self._interval():
            self._stale = False
            running = self._refresh_task is not None and not self._refresh_task.done()
            self.invalidate_peers()
            if not running and self._refresh_ok and self._refresh_task is not None:
                await asyncio.wait({self._refresh_task}, timeout=self._connect_timeout)
        return self._peers

    def invalidate_peers(self) -> None:
        """Refresh the peer list soon (after a failure, or when the node learns of a change)."""
        if self._refresh_task is None or self._refresh_task.done():
            self._refresh_task = self._spawn(self._refresh())

    def _interval(self) -> float:
        if self._clock() < self._young_until:
            return min(self._refresh_interval, _YOUNG_REFRESH)
        return self._refresh_interval

    def heard_from(self, peer_id: str) -> None:
        """A peer called us (``PEER_HEADER``): if our list lacks it, the list is out of date
        (it joined or restarted since), and owners computed from it are wrong."""
        if peer_id != self.self_id and peer_id not in self._peers and self._peers_at is not None:
            self._stale = True

    def owner(self, digest: str) -> str | None:
        """The node that fetches ``digest`` from S3 for the cluster: the first rendezvous
        choice among the live peers, this node included. None before any peer list."""
        if not self._peers:
            return None
        return top_peers(digest, self._peers, 1)[0]

    @property
    def alone(self) -> bool:
        """Whether the peer list names no node but this one (nobody to ask but S3)."""
        return all(p == self.self_id for p in self._peers)

    def replicas(self, digest: str) -> list[str]:
        """The peers that should hold ``digest`` under the current peer list."""
        return replicas_for(digest, self._peers, self.self_id, self.replication)

    def _learn(self, peers: Iterable[PeerAddr]) -> list[str]:
        """Peers the coordinator just named as live: known from now on, even if our cached
        list predates them. Returns their ids."""
        ids = []
        for p in peers:
            if p.peer_id not in self._peers:
                self._peers = {**self._peers, p.peer_id: p.url}
            ids.append(p.peer_id)
        return ids

    def breaker(self, peer_id: str) -> CircuitBreaker:
        b = self._breakers.get(peer_id)
        if b is None:
            b = self._breakers[peer_id] = CircuitBreaker(
                self._breaker_threshold, self._breaker_cooldown, self._clock
            )
        return b

    def _spawn(self, coro: Awaitable[Any]) -> asyncio.Task[Any]:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    # --- one request to one peer ---------------------------------------------------------
    def _usable(self, peer_id: str) -> bool:
        if peer_id == self.self_id or peer_id not in self._peers:
            return False
        if not self.breaker(peer_id).allow():
            self._counters["skipped_open_breaker"] += 1
            return False
        return True

    def _failed(self, peer_id: str, exc: BaseException) -> None:
        self._counters["errors"] += 1
        if self.breaker(peer_id).failure():
            log.warning(
                "peer %s failing (%s): skipping it for %.0fs", peer_id, exc, self._breaker_cooldown
            )
            self.invalidate_peers()

    def _probe(self, peer_id: str) -> None:
        """Probe ``peer_id``'s liveness in the background, unless a probe is in flight or
        one sent less than a hedge delay ago answered. An answer (any status) records when
        the probe was sent in ``_heard``; no answer is a failure for its breaker."""
        running = self._probing.get(peer_id)
        if running is not None and not running.done():
            return
        if self._clock() - self._heard.get(peer_id, -_LIVE_FOR) < self._hedge_delay:
            return
        self._probing[peer_id] = self._spawn(self._probe_once(peer_id, self._peers[peer_id]))

    async def _probe_once(self, peer_id: str, base: str) -> None:
        sent = self._clock()
        self._counters["probes"] += 1
        try:
            if FastGet.supports(base):
                await self._fast.request(
                    "GET",
                    base,
                    HEALTH_PATH,
                    self._headers,
                    connect_timeout=self._connect_timeout,
                    first_byte_timeout=self._first_byte_timeout,
                    read_timeout=self._first_byte_timeout,
                )
            else:
                async with asyncio.timeout(self._first_byte_timeout):
                    resp = await self._session.get(
                        base + HEALTH_PATH, headers=self._headers, timeout=self._timeout
                    )
                    async with resp:
                        await resp.read()
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self._failed(peer_id, exc)
            return
        self._heard[peer_id] = max(sent, self._heard.get(peer_id, sent))

    def _alive(self, peer_id: str, asked_at: float) -> bool:
        """Whether ``peer_id``, asked at ``asked_at``, answered a probe sent since (or just
        before) then and lately; asks again when the last answer grows old."""
        heard = self._heard.get(peer_id)
        now = self._clock()
        if heard is None or now - heard >= _LIVE_FOR / 2:
            self._probe(peer_id)
        return (
            heard is not None and heard >= asked_at - self._hedge_delay and now - heard < _LIVE_FOR
        )

    async def _request(
        self,
        method: str,
        peer_id: str,
        digest: str,
        data: Buffer | None = None,
        fetch: bool = False,
        answering: set[str] | None = None,
        pending: bool = False,
    ) -> tuple[int, bytes, int]:
        """One call; returns (status, body, content length). Raises on transport failure.

        ``fetch``: a fetch-through GET (the peer reads the chunk from its own tiers, S3
        included), which may take as long as an S3 read before answering."""
        url = f"{self._peers[peer_id]}/api/chunks/{digest}"
        if fetch:
            url += "?fetch=1"
            self._counters["fetch_through"] += 1
        elif pending:
            url += "?pending=1"
        self._counters["requests"] += 1
        # A GET or HEAD must be answered quickly (the peer serves from its NVMe or says 404);
        # a PUT first sends a whole chunk, so it gets only the socket timeouts.
        first_byte = None if data is not None else self._first_byte_timeout
        if fetch:
            first_byte = self._timeout.sock_read
        base = self._peers[peer_id]
        if method == "GET" and FastGet.supports(base):
            try:
                status, body = await self._fast.request(
                    "GET",
                    base,
                    url[len(base) :],
                    self._headers,
                    connect_timeout=self._connect_timeout,
                    first_byte_timeout=first_byte,
                    read_timeout=self._read_timeout,
                    on_headers=None if answering is None else lambda _: answering.add(peer_id),
                    allocate=receive_buffer,  # page-aligned: promoted with O_DIRECT, no copy
                )
            except asyncio.CancelledError:  # another peer answered first
                self.breaker(peer_id).release()
                raise
            return status, body, len(body)
        try:
            async with asyncio.timeout(first_byte):
                resp = await self._session.request(
                    method, url, data=data, headers=self._headers, timeout=self._timeout
                )
            async with resp:
                length = resp.content_length or 0
                if method == "GET" and resp.status == 200:
                    if answering is not None:
                        answering.add(peer_id)
                    return resp.status, await resp.read(), length
                await resp.release()
                return resp.status, b"", length
        except asyncio.CancelledError:  # another peer answered first
            self.breaker(peer_id).release()
            raise

    async def _get_from(
        self, peer_id: str, digest: str, fetch: bool = False, answering: set[str] | None = None
    ) -> bytes:
        """``answering``: ``peer_id`` joins it once the peer's 200 headers arrive."""
        try:
            status, body, _ = await self._request(
                "GET", peer_id, digest, fetch=fetch, answering=answering
            )
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self._failed(peer_id, exc)
            raise
        if status == 404:
            self.breaker(peer_id).success()
            raise _Miss(peer_id)
        if status != 200:
            exc = TierUnavailable(f"peer {peer_id} answered HTTP {status}")
            self._failed(peer_id, exc)
            raise exc
        self.breaker(peer_id).success()
        try:
            verify(digest, body, f"peer {peer_id}")
        except ChunkCorrupt:
            self._counters["corrupt"] += 1
            log.warning("peer %s sent a corrupt copy of chunk %s", peer_id, digest)
            raise
        return body

    # --- TierStorage ---------------------------------------------------------------------
    async def read(
        self, digest: str, fetch_through: bool = False, silent: asyncio.Event | None = None
    ) -> bytes:
        """The chunk from the first peer that sends a verified copy.

        Candidates, best first: the owner (``fetch_through``: asked to read it through its
        own tiers, S3 included, so that nodes missing a chunk at the same time cost S3 one
        read between them), the replica holders, then the holders the coordinator records
        (asked only once those run out: it costs a coordinator request). One candidate at a
        time: every copy asked for is a 4 MiB transfer, and a second one is waste. The next
        is asked at once when one misses or fails, or when none has started answering after
        ``hedge_delay`` (a slow or frozen peer delays a read by that much, no more).

        ``silent`` is set, once, when nobody is left to ask and every peer asked is silent:
        none has started answering and no fetch-through owner answered a liveness probe
        (``_alive``). The read goes on (a slow peer may still answer); the caller is
        expected to race its next tier against it.
        """
        await self.live_peers()
        asked: set[str] = set()
        queue: list[tuple[str, bool]] = []  # (peer id, fetch-through), not yet asked
        if fetch_through:
            owner = self.owner(digest)
            if owner is not None:
                queue.append((owner, True))
        queue += [(p, False) for p in self.replicas(digest)]
        pending: dict[asyncio.Task[bytes], str] = {}  # → the peer asked
        answering: set[str] = set()  # peers whose 200 headers arrived
        holders: asyncio.Task[list[PeerAddr]] | None = None
        looked_up = False
        fetching: dict[str, float] = {}  # fetch-through peers asked → when

        def ask_next() -> bool:
            """Ask the next usable candidate, else the coordinator; False if none is left."""
            nonlocal holders, looked_up
            while queue:
                peer_id, fetch = queue.pop(0)
                if peer_id in asked or not self._usable(peer_id):
                    continue
                asked.add(peer_id)
                get = self._get_from(peer_id, digest, fetch=fetch, answering=answering)
                pending[asyncio.ensure_future(get)] = peer_id
                if fetch and silent is not None:
                    fetching[peer_id] = self._clock()
                    self._probe(peer_id)
                return True
            if not looked_up:
                looked_up = True
                holders = asyncio.ensure_future(self._directory.chunk_holders(digest))
                return True
            return False

        ask_next()
        try:
            while pending or holders is not None:
                waiting: set[asyncio.Future[Any]] = set(pending)
                if holders is not None:
                    waiting.add(holders)
                exhausted = not queue and looked_up
                watch = silent is not None and not silent.is_set() and holders is None
                hedge = None if answering or (exhausted and not watch) else self._hedge_delay
                done, _ = await asyncio.wait(
                    waiting, timeout=hedge, return_when=asyncio.FIRST_COMPLETED
                )
                if not done and not exhausted:  # nobody has started answering: ask one more
                    ask_next()
                    continue
                if not done:  # nobody left to ask: are the peers asked alive at all?
                    if not any(
                        self._alive(p, fetching[p]) for p in pending.values() if p in fetching
                    ):
                        self._counters["silent"] += 1
                        assert silent is not None
                        silent.set()
                    continue
                for task in done:
                    if task is holders:
                        holders = None
                        if not task.cancelled() and task.exception() is None:
                            queue.extend((p, False) for p in self._learn(task.result()))
                        continue
                    answering.discard(pending.pop(task))  # type: ignore[call-overload]
                    if task.cancelled() or task.exception() is not None:
                        continue
                    data = task.result()
                    self._counters["hits"] += 1
                    self._counters["bytes_read"] += len(data)
                    return data
                if not pending and (queue or holders is None):
                    ask_next()
        finally:
            for task in pending:
                task.cancel()
            if holders is not None:
                holders.cancel()
            leftovers: list[asyncio.Future[Any]] = [*pending, *([holders] if holders else [])]
            if leftovers:
                await asyncio.gather(*leftovers, return_exceptions=True)
        self._counters["misses"] += 1
        self.invalidate_peers()  # a stale peer list may have pointed us at the wrong peers
        raise ChunkNotFound(f"chunk {digest} not on any of {len(asked)} peers asked")

    async def write(self, digest: str, data: Buffer, pending: bool = False) -> None:
        """PUT to the replica holders in parallel; succeeds if at least one accepted.

        ``pending``: the chunk is not in S3 yet (the writer's NVMe failed): each holder
        stores it as its own write (pinned, journaled, uploaded to S3 by that holder)."""
        await self.live_peers()
        if pending:
            # The writer's last resort for an acknowledged chunk: every live peer in ring
            # order until one takes it, breakers ignored (they guard speed, not durability).
            targets = [p for p in rank_peers(digest, self._peers) if p != self.self_id]
        else:
            targets = [p for p in self.replicas(digest) if self._usable(p)]
        if not targets:
            self._counters["write_failures"] += 1
            raise TierUnavailable("no live peer to replicate to")
        payload = data  # aiohttp sends bytes, bytearray and memoryview without copying
        if pending:
            accepted, results = await self._put_first(targets, digest, payload)
        else:
            results = await asyncio.gather(
                *(self._put_to(p, digest, payload, pending) for p in targets),
                return_exceptions=True,
            )
            accepted = [p for p, r in zip(targets, results, strict=True) if r is True]
        self._counters["writes"] += 1
        if not accepted:
            self._counters["write_failures"] += 1
            raise TierUnavailable(f"no peer accepted chunk {digest}: {results[0]}")
        self._counters["bytes_written"] += len(payload) * len(accepted)
        self._spawn(self._record(digest, accepted))

    async def _put_first(
        self, targets: list[str], digest: str, data: Buffer
    ) -> tuple[list[str], list[BaseException | bool]]:
        """A pending chunk to the first of ``targets`` that accepts it, one at a time."""
        results: list[BaseException | bool] = []
        for peer_id in targets:
            try:
                results.append(await self._put_to(peer_id, digest, data, True))
            except TierUnavailable as exc:
                results.append(exc)
                continue
            return [peer_id], results
        return [], results

    async def _put_to(self, peer_id: str, digest: str, data: Buffer, pending: bool) -> bool:
        try:
            status, _, _ = await self._request("PUT", peer_id, digest, data, pending=pending)
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            self._failed(peer_id, exc)
            raise TierUnavailable(f"peer {peer_id}: {exc}") from exc
        if status in (200, 201, 204):
            self.breaker(peer_id).success()
            return True
        if status >= 500:
            self._failed(peer_id, TierUnavailable(f"HTTP {status}"))
        else:
            self.breaker(peer_id).success()  # it answered: alive, whatever it thought of us
        raise TierUnavailable(f"peer {peer_id} answered HTTP {status}")

    async def _record(self, digest: str, peer_ids: Sequence[str]) -> None:
        """Best effort: the coordinator's location record lets readers find the copies even
        after the peer set changed."""
        try:
            await self._directory.add_chunk_holders(digest, peer_ids)
        except (FastcacheError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            log.debug("recording holders of %s failed: %s", digest, exc)

    async def announce(self, digests: Iterable[str]) -> int:
        """Record this node as a holder of ``digests`` (fresh writes, still only on our NVMe
        until write-back replicates them): other nodes can read them from us at once.
        One batched request to the coordinator. Best effort; returns how many records
        failed (0 or all of them)."""
        names = list(dict.fromkeys(digests))
        if not names:
            return 0
        try:
            await self._directory.add_holdings(self.self_id, names)
        except (FastcacheError, aiohttp.ClientError, OSError, TimeoutError) as exc:
            self._counters["announce_failures"] += len(names)
            log.info("recording this node as holder of %d chunk(s) failed: %s", len(names), exc)
            return len(names)
        self._counters["announced"] += len(names)
        return 0

    async def _holders(self, digest: str) -> list[str]:
        await self.live_peers()
        candidates = self.replicas(digest)
        with contextlib.suppress(FastcacheError, aiohttp.ClientError, OSError, TimeoutError):
            recorded = await asyncio.wait_for(
                self._directory.chunk_holders(digest), self._first_byte_timeout
            )
            candidates += [p for p in self._learn(recorded) if p not in candidates]
        return [p for p in candidates if self._usable(p)]

    async def _head_any(self, digest: str) -> int | None:
        """The size reported by the first peer that holds ``digest``; None if none does."""

        async def head(peer_id: str) -> int:
            try:
                status, _, length = await self._request("HEAD", peer_id, digest)
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                self._failed(peer_id, exc)
                raise
            self.breaker(peer_id).success()
            if status != 200:
                raise _Miss(peer_id)
            return length

        tasks = {asyncio.ensure_future(head(p)) for p in await self._holders(digest)}
        try:
            for next_done in asyncio.as_completed(tasks):
                with contextlib.suppress(Exception):
                    return await next_done
            return None
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def exists(self, digest: str) -> bool:
        return await self._head_any(digest) is not None

    async def size(self, digest: str) -> int:
        size = await self._head_any(digest)
        if size is None:
            raise ChunkNotFound(f"chunk {digest} not on any peer")
        return size

    async def delete(self, digest: str) -> None:
        """Peers cache chunks and evict them by LRU themselves; nothing to do remotely."""

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self._counters)
        out["live_peers"] = len([p for p in self._peers if p != self.self_id])
        out["breaker_trips"] = sum(b.trips for b in self._breakers.values())
        out["open_breakers"] = sorted(p for p, b in self._breakers.items() if b.state != "closed")
        return out

    async def close(self) -> None:
        self._fast.close()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._own_session:
            await self._session.close()
