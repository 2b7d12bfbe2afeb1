"""Kernel cache invalidation: tells the kernel to drop entries, attributes and pages."""

from __future__ import annotations

import errno
import logging
import os
import struct
import threading

import llfuse

log = logging.getLogger("fastcache.fuse")
KERNEL_WAIT = 0.2  # seconds an invalidation waits for the kernel before it is acknowledged


class KernelNotifier:
    """Drops the kernel's cached pages of an inode before ``open`` returns.

    ``llfuse.invalidate_inode`` only queues the request for another thread, so a read right
    after ``open`` could still be served from stale pages. Writing the notification to the
    session's ``/dev/fuse`` descriptor ourselves is synchronous: the kernel has invalidated
    when the write returns. Call it with the llfuse lock released.
    """

    _INVAL_INODE = 2  # FUSE_NOTIFY_INVAL_INODE
    _INVAL_ENTRY = 3  # FUSE_NOTIFY_INVAL_ENTRY

    def __init__(self) -> None:
        self.fd = -1

    def attach(self) -> None:
        """Find the session's descriptor (llfuse keeps one session per process)."""
        for name in os.listdir("/proc/self/fd"):
            try:
                if os.readlink(f"/proc/self/fd/{name}") == "/dev/fuse":
                    self.fd = int(name)
            except OSError:
                continue

    def invalidate(self, ino: int, attr_only: bool = False) -> None:
        if self.fd < 0:
            llfuse.invalidate_inode(ino, attr_only=attr_only)
            return
        offset = -1 if attr_only else 0  # a negative offset: the attributes only
        self._send(struct.pack("<IiQQqq", 40, self._INVAL_INODE, 0, ino, offset, 0))

    def invalidate_entry(self, parent: int, name: str) -> None:
        raw = os.fsencode(name)
        if self.fd < 0:
            llfuse.invalidate_entry(parent, raw)
            return
        head = struct.pack("<IiQQII", 32 + len(raw) + 1, self._INVAL_ENTRY, 0, parent, len(raw), 0)
        self._send(head + raw + b"\0")

    def forget(self, inodes: list[int], entries: list[tuple[int, str]]) -> None:
        """Drop the kernel's cached entries and attributes, waiting ``KERNEL_WAIT`` at most:
        the kernel may first need a directory lock that a request of ours holds, and that
        request may be waiting for the very change being announced (it goes on in the
        background then)."""
        if not inodes and not entries:
            return
        done = threading.Event()

        def run() -> None:
            try:
                for parent, name in entries:
                    self.invalidate_entry(parent, name)
                for ino in inodes:
                    self.invalidate(ino, attr_only=True)
            except OSError as exc:
                log.info("kernel invalidation failed: %s", exc)
            finally:
                done.set()

        threading.Thread(target=run, name="fastcache-kernel-inval", daemon=True).start()
        done.wait(KERNEL_WAIT)

    def _send(self, msg: bytes) -> None:
        try:
            os.write(self.fd, msg)
        except OSError as exc:
            if exc.errno != errno.ENOENT:  # the kernel does not know it: nothing cached
                raise
