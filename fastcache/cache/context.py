"""What the reader and the write-back of one cache share: the configuration, the tiers, the
counters, the background tasks (promotions, replication, uploads raced past NVMe) and
whether the cache is closed."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from fastcache.cache.stats import CacheStats
from fastcache.config import CacheConfig
from fastcache.tiers.base import LocalChunkStore, PeerRouting, TierStorage

log = logging.getLogger("fastcache.manager")


@dataclass
class CacheContext:
    """One per cache. ``peer`` may change (``set_peer_tier``); ``closed`` is set once."""

    config: CacheConfig
    nvme: LocalChunkStore
    cloud: TierStorage
    peer: PeerRouting | None
    counters: CacheStats = field(default_factory=CacheStats)
    closed: bool = False
    _tasks: set[asyncio.Task[Any]] = field(default_factory=set)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run ``coro`` in the background; its failure is logged, ``close`` cancels it."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def tasks(self) -> list[asyncio.Task[Any]]:
        return list(self._tasks)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())
