"""The fastcache FUSE mounts of this machine, from ``/proc/self/mountinfo``."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

FSTYPE = "fuse.fastcache"  # the kernel's name for our mounts (``subtype=fastcache``)
_OCTAL = re.compile(r"\\([0-7]{3})")


@dataclass(frozen=True)
class Mount:
    mountpoint: Path
    fstype: str
    source: str


def _unescape(field: str) -> str:
    return _OCTAL.sub(lambda m: chr(int(m.group(1), 8)), field)


def mounts(mountinfo: str = "/proc/self/mountinfo") -> list[Mount]:
    """Every mount listed (fields: ``… mountpoint … - fstype source options``)."""
    out = []
    with open(mountinfo) as f:
        for line in f:
            left, sep, right = line.partition(" - ")
            fields, tail = left.split(), right.split()
            if sep and len(fields) >= 5 and len(tail) >= 2:
                out.append(Mount(Path(_unescape(fields[4])), tail[0], _unescape(tail[1])))
    return out


def is_mounted(mountpoint: Path) -> bool:
    """Whether a fastcache mount is listed at ``mountpoint``."""
    target = Path(os.path.abspath(mountpoint))
    return any(m.mountpoint == target and m.fstype == FSTYPE for m in mounts())


def mount_of(path: Path) -> tuple[Path, str] | None:
    """The fastcache mount holding ``path`` and the path inside the namespace, or ``None``."""
    full = Path(os.path.abspath(path))
    best: Path | None = None
    for m in mounts():
        inside = m.fstype == FSTYPE and full.is_relative_to(m.mountpoint)
        if inside and (best is None or len(m.mountpoint.parts) > len(best.parts)):
            best = m.mountpoint
    if best is None:
        return None
    return best, "/" + "/".join(full.relative_to(best).parts)
