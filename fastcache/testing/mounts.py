"""Whether a path is a live FUSE mount, and lazily unmounting what a test left behind."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path


def is_fuse_mount(path: Path) -> bool:
    """Whether ``path`` is a live fastcache mount (listed in /proc/mounts and answering)."""
    target = str(path)
    with open("/proc/self/mounts") as f:
        listed = any(line.split()[1] == target and line.split()[2].startswith("fuse") for line in f)
    if not listed:
        return False
    try:
        os.stat(path)
    except OSError:
        return False
    return True


def listed_in_mounts(path: Path) -> bool:
    with open("/proc/self/mounts") as f:
        return any(line.split()[1] == str(path) for line in f)


def force_unmount(path: Path) -> None:
    """Lazily unmount ``path`` if anything is still mounted there (dead or alive)."""
    if listed_in_mounts(path):
        subprocess.run(["fusermount", "-u", "-z", str(path)], capture_output=True, check=False)
