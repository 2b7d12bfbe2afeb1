"""A client node: wires config → NVMe → S3 → peers → manager → coordinator → API → mount.

The event loop (uvloop) runs in the main thread, so SIGINT/SIGTERM reach it directly; the
FUSE worker threads hand network work to it with ``asyncio.run_coroutine_threadsafe``.
Everything is torn down through one ``AsyncExitStack`` in the reverse order of setup:

    heartbeat stops + deregister → API stops (in-flight requests finish) → unmount (open
    handles flushed) → pending uploads get ``shutdown_sync_timeout`` to reach S3 → manager
    closes (unfinished uploads stay journaled) → tiers close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web

from fastcache.api import NodeState, make_app
from fastcache.config import ClientConfig
from fastcache.coordinator.session_client import SessionClient
from fastcache.errors import FastcacheError, NotFound
from fastcache.tiers.peer import PeerTier

if TYPE_CHECKING:
    from fastcache.mount.lifecycle import MountHandle

log = logging.getLogger("fastcache.client")

_NET_ERRORS = (FastcacheError, aiohttp.ClientError, OSError, TimeoutError)
SHUTDOWN_TIMEOUT = 30.0  # seconds the API waits for in-flight requests on shutdown


class Node:
    """One client node, runnable in-process: ``await start()``, ``await stop()``."""

    def __init__(self, config: ClientConfig) -> None:
        self.config = config
        self.state: NodeState | None = None
        self.port: int | None = None
        self._stack = AsyncExitStack()
        self._stopping: asyncio.Event | None = None
        self._heartbeat_task: asyncio.Task[None] | None = None
        self._mount: MountHandle | None = None
        self._atime_task: asyncio.Task[None] | None = None
        self._session: SessionClient | None = None
        self._registered_once = False

    @property
    def url(self) -> str:
        """The URL peers use; with ``port=0`` the port picked at start."""
        if self.config.advertise_url:
            return self.config.advertise_url.rstrip("/")
        return f"http://{self.config.host}:{self.port or self.config.port}"

    # --- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        from fastcache.cache.manager import DefaultCacheManager
        from fastcache.coordinator.client import CoordinatorClient
        from fastcache.tiers.cloud import CloudTier
        from fastcache.tiers.nvme import NvmeTier

        config = self.config
        self._stopping = asyncio.Event()
        stack = self._stack
        try:
            nvme = await NvmeTier.open(config.cache)
            stack.push_async_callback(nvme.close)
            cloud = await CloudTier.open(config.s3)
            stack.push_async_callback(cloud.close)
            session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=32),
                timeout=aiohttp.ClientTimeout(total=30, sock_connect=5),
            )
            stack.push_async_callback(session.close)
            coordinator = CoordinatorClient(
                config.coordinators, token=config.token, session=session
            )
            peer = await PeerTier.open(
                config.peer_id,
                coordinator,
                token=config.token,
                replication=config.cache.replication,
                connect_timeout=config.peer_connect_timeout,
                read_timeout=config.peer_read_timeout,
            )
            stack.push_async_callback(peer.close)
            manager = await DefaultCacheManager.open(config.cache, nvme, cloud, peer)
            stack.push_async_callback(manager.close)
            stack.push_async_callback(self._sync_uploads)  # after the unmount, before close
            self.state = NodeState(
                config=config, manager=manager, nvme=nvme, coordinator=coordinator, peer=peer
            )
            if config.mount is not None:  # the mount's metadata session (leases, pushes)
                self._session = SessionClient(config.coordinators, token=config.token)
                stack.push_async_callback(self._session.close)  # after the unmount
            stack.push_async_callback(self._unmount)  # runs after the API has stopped
            await self._serve_api(self.state)
            stack.push_async_callback(self._leave)
            await self._register_first()
            self._heartbeat_task = asyncio.get_running_loop().create_task(
                self._heartbeat_loop(), name="fastcache-heartbeat"
            )
            if config.mount is not None:
                await self._do_mount()
        except BaseException:
            await self._stack.aclose()
            raise
        log.info(
            "node %s serving %s (NVMe %s%s)",
            config.peer_id,
            self.url,
            config.cache.nvme_dir,
            f", mounted at {config.mount}" if config.mount else "",
        )

    async def stop(self) -> None:
        """Graceful shutdown; safe to call twice."""
        if self._stopping is not None:
            self._stopping.set()
        await self._stack.aclose()

    def request_stop(self) -> None:
        if self._stopping is not None:
            self._stopping.set()

    async def run(self) -> None:
        """Start, serve until SIGINT/SIGTERM (or ``request_stop``), stop."""
        loop = asyncio.get_running_loop()
        await self.start()
        assert self._stopping is not None
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self._stopping.wait()
            log.info("shutting down")
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            await self.stop()
        log.info("stopped")

    # --- parts ---------------------------------------------------------------------------
    async def _serve_api(self, state: NodeState) -> None:
        runner = web.AppRunner(make_app(state), shutdown_timeout=SHUTDOWN_TIMEOUT, access_log=None)
        await runner.setup()
        self._stack.push_async_callback(runner.cleanup)
        site = web.TCPSite(runner, self.config.host, self.config.port, reuse_address=True)
        await site.start()
        addresses = runner.addresses
        self.port = int(addresses[0][1]) if addresses else self.config.port

    def _used_bytes(self) -> int:
        assert self.state is not None
        stats = self.state.nvme.stats()
        return int(stats.get("used_bytes", stats.get("used", 0)))

    async def _register(self) -> None:
        assert self.state is not None
        await self.state.coordinator.register_peer(
            self.config.peer_id,
            self.url,
            capacity=self.state.nvme.capacity,
            used=self._used_bytes(),
        )
        self.state.registered = True
        if self.state.peer is not None:
            self.state.peer.invalidate_peers()
        if self._registered_once:
            log.info("re-registered at the coordinator %s", self.state.coordinator.base_url)
        else:
            log.info(
                "registered at the coordinator %s as %s",
                self.state.coordinator.base_url,
                self.config.peer_id,
            )
        self._registered_once = True

    async def _register_first(self) -> None:
        """One attempt; if the coordinator is not up yet, the heartbeat loop keeps trying."""
        try:
            await self._register()
        except _NET_ERRORS as exc:
            log.warning(
                "coordinator %s not reachable yet (%s): will retry",
                ", ".join(self.config.coordinators),
                exc,
            )

    async def _heartbeat_loop(self) -> None:
        assert self.state is not None
        interval = self.config.heartbeat_interval
        failing_since: float | None = None
        while True:
            await asyncio.sleep(interval)  # a period, not a synchronisation
            try:
                if not self.state.registered:
                    await self._register()
                else:
                    await self.state.coordinator.heartbeat(
                        self.config.peer_id, used=self._used_bytes()
                    )
            except NotFound:
                log.info("the coordinator forgot this node (restarted?): registering again")
                self.state.registered = False
                with contextlib.suppress(*_NET_ERRORS):
                    await self._register()
            except _NET_ERRORS as exc:
                now = time.monotonic()
                if failing_since is None:
                    failing_since = now
                    log.warning("heartbeat to the coordinator failed: %s", exc)
                continue
            if failing_since is not None:
                log.info("coordinator reachable again")
                failing_since = None
            if self.state.peer is not None:
                # Keep the peer list fresh while idle: a joining node changes the owner
                # (rendezvous) of ~1/n of the chunks, and nodes that disagree on owners
                # fetch some chunks from S3 twice.
                self.state.peer.invalidate_peers()

    async def _leave(self) -> None:
        """Stop heartbeating and deregister, so peers stop sending us work."""
        task = self._heartbeat_task
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        state = self.state
        if state is not None and state.registered:
            try:
                await asyncio.wait_for(state.coordinator.deregister_peer(self.config.peer_id), 5.0)
            except _NET_ERRORS as exc:
                log.info("deregistering failed: %s", exc)
            state.registered = False

    async def _sync_uploads(self) -> None:
        """Give pending uploads up to ``shutdown_sync_timeout`` to reach S3; what is left stays
        journaled and is uploaded at the next start."""
        state = self.state
        if state is None:
            return
        manager = state.manager
        pending = manager.pending_uploads()
        if not pending:
            return
        timeout = self.config.shutdown_sync_timeout
        log.info("waiting up to %.1f s for %d pending upload(s) to reach S3", timeout, pending)
        try:
            await manager.sync(timeout=timeout)
        except FastcacheError as exc:
            log.warning(
                "%d chunk(s) not in S3 yet (%s): they stay journaled for the next start",
                manager.pending_uploads(),
                exc,
            )
        else:
            log.info("all %d pending upload(s) are in S3", pending)

    async def _do_mount(self) -> None:
        from fastcache.mount import lifecycle  # llfuse is only needed with a mount

        assert self.state is not None and self.config.mount is not None
        assert self._session is not None
        lifecycle.clean_stale_mount(self.config.mount)
        await self._session.start(wait=False)  # calls wait for it; it reconnects by itself
        self._mount = lifecycle.mount(
            self.state.manager, self._session, self.config, asyncio.get_running_loop()
        )
        self.state.mount_ops = self._mount.ops  # its FUSE counters, for /metrics
        self._session.on_invalidate = self._mount.ops.on_invalidate
        self._session.on_reset = self._mount.ops.on_reset
        if self._mount.ops.atimes is not None:
            self._atime_task = asyncio.get_running_loop().create_task(
                self._mount.ops.atimes.run(), name="fastcache-atimes"
            )

    async def _unmount(self) -> None:
        handle, self._mount = self._mount, None
        if handle is not None:
            # unmount() flushes open handles through this loop: run it off the loop thread.
            await asyncio.get_running_loop().run_in_executor(None, handle.unmount)
        task, self._atime_task = self._atime_task, None
        if task is not None:  # sends what was noted, then stops
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)


def main(config: ClientConfig) -> int:
    """``fastcache client``: run a node until SIGINT/SIGTERM; 0 on a clean shutdown."""
    import uvloop

    try:
        uvloop.run(Node(config).run())
    except FastcacheError as exc:
        log.error("node failed: %s", exc)
        return 1
    return 0
