"""Access times with ``relatime`` semantics, batched: reads never wait on the coordinator.

A file opened for reading gets its atime moved to now when the atime is older than its
mtime or ctime, or more than a day old (Linux's ``relatime``). The node notes the new time
at once (its own ``stat`` shows it) and sends the noted times in one batch at most every
``FLUSH_INTERVAL`` seconds (``touch_atimes``: the coordinator moves each atime forward only,
without touching ctime or the file's version). ``--noatime`` turns it off. An atime not yet
sent when the node stops is lost, as on a local filesystem that had not written the inode.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable

from fastcache.coordinator.model import MAX_ATIME_BATCH, InodeAttrs
from fastcache.errors import FastcacheError

log = logging.getLogger("fastcache.fuse")

DAY_NS = 24 * 3600 * 10**9
FLUSH_INTERVAL = 1.0  # seconds between batches
NOTED_MAX = 65536  # inodes whose last noted atime is remembered


def relatime_due(attrs: InodeAttrs, now_ns: int) -> bool:
    """Whether a read at ``now_ns`` moves the atime (``relatime``)."""
    atime = attrs.atime_ns
    return atime <= attrs.mtime_ns or atime <= attrs.ctime_ns or now_ns - atime >= DAY_NS


Send = Callable[[list[tuple[int, int]]], Awaitable[int]]


class AtimeBatcher:
    """Collects read access times from the FUSE threads; a task on the event loop sends
    them in batches. ``note`` never blocks on the network."""

    def __init__(self, send: Send, interval: float = FLUSH_INTERVAL) -> None:
        self._send = send
        self._interval = interval
        self._lock = threading.Lock()
        self._due: dict[int, int] = {}  # ino -> atime_ns, not sent yet
        self._noted: dict[int, int] = {}  # ino -> the last atime noted here (sent or not)
        self._wake: asyncio.Event | None = None
        self.sent = 0
        self.failed = 0

    def note(self, ino: int, atime_ns: int) -> None:
        with self._lock:
            if self._due.get(ino, -1) < atime_ns:
                self._due[ino] = atime_ns
            if len(self._noted) >= NOTED_MAX:
                self._noted.clear()
            self._noted[ino] = max(atime_ns, self._noted.get(ino, 0))

    def latest(self, ino: int, atime_ns: int) -> int:
        """``atime_ns`` (the coordinator's) or the later one noted here but maybe not yet
        applied there: a second read before the batch lands sees the first one's time."""
        with self._lock:
            return max(atime_ns, self._noted.get(ino, 0))

    def pending(self) -> int:
        with self._lock:
            return len(self._due)

    async def run(self) -> None:
        """Send what was noted, every ``interval`` seconds, until cancelled (then once more)."""
        try:
            while True:
                await asyncio.sleep(self._interval)  # the batching window
                await self.flush()
        finally:
            await asyncio.shield(self.flush())

    async def flush(self) -> None:
        with self._lock:
            due, self._due = self._due, {}
        items = sorted(due.items())
        for start in range(0, len(items), MAX_ATIME_BATCH):
            batch = items[start : start + MAX_ATIME_BATCH]
            try:
                await self._send(batch)
                self.sent += len(batch)
            except (FastcacheError, OSError, TimeoutError) as exc:
                # an access time is not worth a retry queue: the next read notes it again
                self.failed += len(batch)
                log.info("access times of %d file(s) not sent: %s", len(batch), exc)
