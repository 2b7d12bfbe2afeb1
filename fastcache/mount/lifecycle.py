"""Mounting and unmounting: FUSE options, the llfuse main loop thread, stale mounts."""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import signal
import subprocess
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

import llfuse

from fastcache.config import ClientConfig
from fastcache.mount.files import STAGING_PREFIX
from fastcache.mount.ops import Operations

if TYPE_CHECKING:
    from fastcache.cache.manager import CacheManager
    from fastcache.coordinator.client import CoordinatorClient

log = logging.getLogger("fastcache.fuse")
MAX_IO = 1 << 20  # the largest FUSE read and write request asked for


def mount_options(allow_other: bool, extra: str | None = None) -> set[str]:
    """FUSE 2 options: the kernel enforces permissions; big requests both ways.

    ``extra``: more comma-separated options (``--fuse-options``).
    """
    options = {
        "fsname=fastcache",
        "subtype=fastcache",
        "default_permissions",
        "big_writes",
        "atomic_o_trunc",  # O_TRUNC reaches open(): the truncate commits with the writes
        f"max_read={MAX_IO}",
        f"max_write={MAX_IO}",
        "no_splice_read",
        "splice_write",
        "splice_move",
    }
    if allow_other:
        options.add("allow_other")
    if extra:
        options.update(o.strip() for o in extra.split(",") if o.strip())
    return options


def _may_allow_other() -> bool:
    if os.geteuid() == 0:
        return True
    try:
        with open("/etc/fuse.conf") as f:
            return any(line.strip() == "user_allow_other" for line in f)
    except OSError:
        return False


class MountHandle:
    """A running mount: ``unmount()`` commits open files, unmounts and joins the loop."""

    def __init__(
        self,
        ops: Operations,
        mountpoint: Path,
        loop: asyncio.AbstractEventLoop,
        workers: int,
    ) -> None:
        self.ops = ops
        self.mountpoint = mountpoint
        self._loop = loop
        self._lock = threading.Lock()
        self._unmounted = False
        self.error: BaseException | None = None
        self.workers = workers
        self._thread = threading.Thread(target=self._run, name="fastcache-fuse", daemon=True)

    def _run(self) -> None:
        try:
            llfuse.main(workers=self.workers, handle_signals=False)
        except BaseException as exc:
            self.error = exc
            log.exception("the FUSE main loop stopped")

    def start(self) -> None:
        self._thread.start()

    def is_alive(self) -> bool:
        return self._thread.is_alive()

    def unmount(self, timeout: float = 30.0) -> None:
        """Commit every open file, unmount (lazily if busy), join the FUSE thread. Idempotent.

        Blocks: call it off the event-loop thread (the commits run on that loop).
        """
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is self._loop:
            raise RuntimeError("unmount() waits on the event loop: call it from another thread")
        with self._lock:
            if self._unmounted:
                return
            self._unmounted = True
            self.ops.files.flush_all()
            self.ops.files.close()
            self.ops.call.cancel_all()  # requests still waiting on the loop fail now
            if self._thread.is_alive() and not _fusermount(self.mountpoint, lazy=False):
                _fusermount(self.mountpoint, lazy=True)
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("FUSE loop still busy after unmount of %s", self.mountpoint)
                return
            self.ops.mounted = False
            llfuse.close(unmount=False)
            log.info("unmounted %s", self.mountpoint)


def _fusermount(path: Path, lazy: bool) -> bool:
    args = ["fusermount", "-u", "-q"] + (["-z"] if lazy else []) + [str(path)]
    result = subprocess.run(args, capture_output=True, text=True, check=False)
    if result.returncode != 0 and lazy:
        log.warning("fusermount -u -z %s: %s", path, result.stderr.strip())
    return result.returncode == 0


def clean_stale_mount(path: Path) -> None:
    """Lazily unmount what a crashed process left at ``path`` ("not connected")."""
    try:
        os.stat(path)
    except OSError as exc:
        if exc.errno not in (errno.ENOTCONN, errno.ECONNABORTED):
            return
        log.warning("cleaning a stale mount at %s", path)
        _fusermount(path, lazy=True)


def _clean_staging(directory: Path) -> None:
    """Staging files left by a crashed process: their changes were never acknowledged."""
    for entry in directory.glob(f"{STAGING_PREFIX}*"):
        try:
            entry.unlink()
        except OSError as exc:
            log.warning("cannot remove stale staging file %s: %s", entry, exc)


def _no_op(signum: int, frame: Any) -> None:
    """SIGUSR1 only has to interrupt a FUSE worker's blocking read."""


def _keep_sigusr1() -> None:
    """llfuse wakes its workers with SIGUSR1 when the loop ends; by default it kills us.

    ``llfuse.main(handle_signals=False)`` (it runs in a thread) installs no handler, so
    install a no-op one (only possible from the main thread; node.py mounts from there).
    """
    if signal.getsignal(signal.SIGUSR1) not in (signal.SIG_DFL, None):
        return
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGUSR1, _no_op)
    else:
        log.warning("mount() outside the main thread: SIGUSR1 at unmount will end the process")


def mount(
    manager: CacheManager,
    coordinator_client: CoordinatorClient,
    config: ClientConfig,
    loop: asyncio.AbstractEventLoop,
) -> MountHandle:
    """Mount at ``config.mount`` and serve it from a dedicated thread; returns at once."""
    if config.mount is None:
        raise ValueError("no mount point configured")
    mountpoint = Path(config.mount)
    mountpoint.mkdir(parents=True, exist_ok=True)
    staging = Path(manager.nvme.staging_dir)
    staging.mkdir(parents=True, exist_ok=True)
    _clean_staging(staging)
    _keep_sigusr1()
    ops = Operations(manager, coordinator_client, config, loop)
    ops.files.replay()  # commits a previous run still owed the coordinator
    options = mount_options(_may_allow_other(), config.fuse_options)
    llfuse.init(ops, str(mountpoint), options)
    ops.mounted = True
    ops.kernel.attach()
    handle = MountHandle(ops, mountpoint, loop, config.fuse_workers)
    handle.start()
    log.info("mounted at %s", mountpoint)
    return handle
