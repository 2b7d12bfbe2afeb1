"""The coordinators of one cluster, and what crosses between them: liveness, the leader,
invalidations.

Several coordinators may serve one namespace (a PostgreSQL store). They know each other only
through the store's event bus (``Bus``: PostgreSQL ``LISTEN``/``NOTIFY``; in-process for
SQLite, which has one coordinator). A notification carries a msgpack array of messages
(those said while the previous notification was on its way), each a map:

- ``{"t": "hello", "c": id}`` every ``hello`` seconds. A coordinator not heard from for
  ``dead_after`` seconds is gone. The lowest id among the live ones is the leader: it alone
  drops timed-out peers, so the cleanup runs once per cluster.
- ``{"t": "inv", "c": id, "n": seq, "k": keys}``: a namespace change committed on coordinator
  ``id`` touched these lease keys. Every other coordinator pushes them to its own sessions
  that hold leases on them (``SessionHub.invalidate_remote``), waits for those acks or the
  leases' expiry, then answers ``{"t": "ack", "c": its id, "to": id, "n": seq}``.
- ``{"t": "bye", "c": id}`` when a coordinator stops gracefully.

The change's answer waits for the acks of every coordinator that was live when it was
published, for at most the lease term: a coordinator that does not answer in that time has
nodes whose leases granted before the change have run out anyway. So an invalidation caused
on coordinator A reaches the nodes on coordinator B before A acknowledges the change, which is
what a single coordinator guarantees too.

NOTIFY rather than lease records in the database: granting a lease is the hot read path
(every lookup, getattr and readdir), and a write per grant would cost each of them a database
round trip; a notification costs one per change and only when the change touches leased keys.

A coordinator that may have missed messages must not keep leases: when its own hello has not
come back for ``dead_after`` seconds (its bus connection is down or stuck), it closes its
sessions (their nodes drop every lease and reconnect, to it or to another coordinator) and
grants no lease until its hellos come back. A coordinator that just started grants no lease
before its first hello has come back and ``dead_after`` has passed (by then every other
coordinator has heard of it and waits for its acks).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine
from itertools import count
from typing import Any, Protocol

import msgspec

__all__ = ["Bus", "Cluster"]

log = logging.getLogger("fastcache.coordinator.cluster")

HELLO = 1.0  # seconds between hellos
DEAD_AFTER = 3.5  # seconds without a hello: that coordinator is gone
# PostgreSQL caps a notification at 8,000 bytes (base64: 5,999 bytes of msgpack)
MAX_KEY_BYTES = 3000  # keys of one "inv" message
MAX_BATCH = 4000  # bytes of messages sent in one notification


class Bus(Protocol):
    """The store's broadcast channel between coordinators (``store/``)."""

    async def publish(self, payload: bytes) -> None: ...
    async def subscribe(self, callback: Callable[[bytes], None]) -> None: ...


RemoteChange = Callable[[list[str]], Awaitable[None]]
SessionsLost = Callable[[], Awaitable[None]]

_encode = msgspec.msgpack.Encoder().encode
_ARRAY16 = b"\xdc"  # msgpack: an array of up to 65,535 items follows
_decode = msgspec.msgpack.Decoder().decode


class Cluster:
    """This coordinator's view of the others; see the module docstring."""

    def __init__(
        self,
        bus: Bus,
        lease_term: float,
        on_remote_change: RemoteChange,
        on_bus_lost: SessionsLost,
        *,
        hello: float = HELLO,
        dead_after: float = DEAD_AFTER,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.id = secrets.token_hex(8)
        self.bus = bus
        self.lease_term = lease_term
        self.on_remote_change = on_remote_change
        self.on_bus_lost = on_bus_lost
        self.hello = hello
        self.dead_after = dead_after
        self._clock = clock
        self._started = clock()
        self._seen: dict[str, float] = {}  # other coordinator id -> when last heard
        self._own_echo: float | None = None  # when our own hello last came back
        self._seq = count(1)
        self._outbox: deque[tuple[bytes, asyncio.Future[None]]] = deque()
        self._sender: asyncio.Task[None] | None = None
        self._waiting: dict[int, tuple[set[str], asyncio.Event]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._hello_task: asyncio.Task[None] | None = None
        self._lost = False
        self.counters = {"published": 0, "remote_changes": 0, "ack_timeouts": 0, "bus_lost": 0}

    # --- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        await self.bus.subscribe(self._receive)
        await self._say({"t": "hello", "c": self.id})
        self._hello_task = asyncio.create_task(self._hello_loop(), name="coordinator-hello")

    async def close(self) -> None:
        if self._hello_task is not None:
            self._hello_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._hello_task
        for task in list(self._tasks):
            task.cancel()
        with contextlib.suppress(Exception):
            await self._say({"t": "bye", "c": self.id})

    # --- what the rest of the coordinator asks -------------------------------------------
    def live(self) -> list[str]:
        """The other coordinators heard from within ``dead_after``."""
        horizon = self._clock() - self.dead_after
        return sorted(c for c, t in self._seen.items() if t >= horizon)

    @property
    def is_leader(self) -> bool:
        others = self.live()
        return not others or self.id < others[0]

    @property
    def may_lease(self) -> bool:
        """Whether this coordinator hears every change: its own hellos come back, and it has
        been up for long enough that every other coordinator has heard of it."""
        now = self._clock()
        if self._own_echo is None or now - self._started < self.dead_after:
            return False
        return now - self._own_echo <= self.dead_after

    def stats(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "others": self.live(),
            "leader": self.is_leader,
            "may_lease": self.may_lease,
            **self.counters,
        }

    async def spread(self, keys: list[str]) -> None:
        """A change committed here touched ``keys``: have every other live coordinator push
        them to its sessions; return once all acked or the lease term ran out."""
        others = set(self.live())
        if not others:
            return
        waits = []
        sends = []
        for part in _parts(keys):
            seq = next(self._seq)
            done = asyncio.Event()
            self._waiting[seq] = (set(others), done)
            sends.append(self._say({"t": "inv", "c": self.id, "n": seq, "k": part}))
            self.counters["published"] += 1
            waits.append((seq, done))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.lease_term
        try:
            async with asyncio.timeout_at(deadline):
                await asyncio.gather(*sends)
                for _, done in waits:
                    await done.wait()
        except TimeoutError:
            self.counters["ack_timeouts"] += 1
            missing = set().union(*(self._waiting.get(s, (set(), None))[0] for s, _ in waits))
            log.warning("coordinators %s did not ack an invalidation in time", sorted(missing))
        except Exception as exc:  # the bus failed: nobody could be told, so every lease
            # granted before the change must run out before the change is acknowledged
            self.counters["ack_timeouts"] += 1
            log.warning("could not tell the other coordinators of a change (%s): waiting", exc)
            await asyncio.sleep(max(0.0, deadline - loop.time()))
        finally:
            for seq, _ in waits:
                self._waiting.pop(seq, None)

    # --- the bus ---------------------------------------------------------------------------
    async def _say(self, doc: dict[str, Any]) -> None:
        """Publish ``doc``. Messages said while a notification is on its way go together in
        the next one: with many changes in flight, one round trip carries many."""
        done = asyncio.get_running_loop().create_future()
        self._outbox.append((_encode(doc), done))
        if self._sender is None or self._sender.done():
            self._sender = asyncio.create_task(self._send_all(), name="coordinator-bus-send")
        await done

    async def _send_all(self) -> None:
        while self._outbox:
            batch = [self._outbox.popleft()]
            size = len(batch[0][0])
            while self._outbox and size + len(self._outbox[0][0]) <= MAX_BATCH:
                size += len(self._outbox[0][0])
                batch.append(self._outbox.popleft())
            try:
                await self.bus.publish(
                    _ARRAY16 + len(batch).to_bytes(2, "big") + b"".join(raw for raw, _ in batch)
                )
            except Exception as exc:
                for _, done in batch:
                    if not done.done():
                        done.set_exception(exc)
            else:
                for _, done in batch:
                    if not done.done():
                        done.set_result(None)

    async def _hello(self) -> None:
        try:
            await self._say({"t": "hello", "c": self.id})
        except Exception as exc:  # the store reconnects; the echo check notices a long gap
            log.warning("could not say hello on the bus: %s", exc)

    async def _hello_loop(self) -> None:
        while True:
            await asyncio.sleep(self.hello)  # a period, not a synchronisation
            await self._hello()
            now = self._clock()
            echoed = self._own_echo if self._own_echo is not None else self._started
            if not self._lost and now - echoed > self.dead_after:
                self._lost = True
                self.counters["bus_lost"] += 1
                log.warning("the coordinator bus is silent: closing sessions, no leases")
                await self.on_bus_lost()

    def _receive(self, payload: bytes) -> None:
        try:
            docs = _decode(payload)
        except (msgspec.DecodeError, ValueError):
            docs = None
        if not isinstance(docs, list):
            log.warning("undecodable message on the coordinator bus (%d bytes)", len(payload))
            return
        for doc in docs:
            try:
                kind, sender = doc["t"], doc["c"]
            except (KeyError, TypeError, IndexError):
                log.warning("a message without kind or sender on the coordinator bus")
                continue
            self._handle(kind, sender, doc)

    def _handle(self, kind: Any, sender: Any, doc: dict[str, Any]) -> None:
        if sender == self.id:
            if kind == "hello":
                self._own_echo = self._clock()
                if self._lost:
                    self._lost = False
                    log.info("the coordinator bus is back")
            return
        if kind == "hello":
            if sender not in self._seen or self._clock() - self._seen[sender] > self.dead_after:
                log.info("coordinator %s joined", sender)
                self._spawn(self._hello())  # so the newcomer learns of us at once
            self._seen[sender] = self._clock()
        elif kind == "bye":
            self._seen.pop(sender, None)
            self._forget(sender)
            log.info("coordinator %s left", sender)
        elif kind == "inv":
            self._seen[sender] = self._clock()
            self._spawn(self._apply(sender, doc))
        elif kind == "ack" and doc.get("to") == self.id:
            entry = self._waiting.get(doc.get("n"))  # type: ignore[arg-type]
            if entry is not None:
                entry[0].discard(sender)
                if not entry[0]:
                    entry[1].set()

    def _spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _forget(self, sender: str) -> None:
        """A coordinator that left acks nothing more: stop waiting for it."""
        for waiting, done in self._waiting.values():
            waiting.discard(sender)
            if not waiting:
                done.set()

    async def _apply(self, sender: str, doc: dict[str, Any]) -> None:
        keys = doc.get("k")
        if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
            return
        self.counters["remote_changes"] += 1
        try:
            await self.on_remote_change(keys)
            await self._say({"t": "ack", "c": self.id, "to": sender, "n": doc.get("n")})
        except Exception:  # no ack: the sender waits out the lease term instead
            log.exception("applying a change from coordinator %s failed", sender)


def _parts(keys: list[str]) -> list[list[str]]:
    """``keys`` in runs of at most ``MAX_KEY_BYTES`` (one key alone may be longer: ≤ 4 KiB)."""
    parts: list[list[str]] = [[]]
    size = 0
    for key in keys:
        if parts[-1] and size + len(key) > MAX_KEY_BYTES:
            parts.append([])
            size = 0
        parts[-1].append(key)
        size += len(key)
    return parts
