"""``fastcache mount`` / ``umount`` and the ``mount.fastcache`` helper of mount(8).

A mount is a client node run with ``--mount``: in the foreground (``fastcache mount``, what
a systemd service runs) or as a daemon (``--daemon``: the node runs in its own session with
its output in a log file, and the command returns once the filesystem is mounted, as
mount(8) expects of a helper). Either way the node's PID is in a PID file named after the
mount point, which ``fastcache umount`` signals: SIGTERM makes the node commit open files,
unmount and exit 0.

mount(8) runs ``/sbin/mount.fastcache SOURCE MOUNTPOINT -o OPTIONS`` for ``mount -t
fastcache`` and ``/etc/fstab`` lines; the SOURCE is the coordinator URL and each option
``key=value`` is the ``fastcache mount`` flag ``--key value`` (``nvme_dir=/x`` →
``--nvme-dir /x``, a bare ``verify_cache`` → ``--verify-cache``, ``noatime`` →
``--noatime``). mount(8)'s generic
options (``defaults``, ``_netdev``, ``nofail``, ``x-systemd.*``…) are dropped.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from fastcache.admin.mounts import is_mounted
from fastcache.config import ConfigError

__all__ = [
    "daemonize",
    "default_files",
    "helper_argv",
    "pid_file",
    "read_env_file",
    "umount",
]

START_TIMEOUT = 120.0  # how long --daemon waits for the mount to appear
POLL = 0.05
# mount(8) options that are about the mount call, not fastcache: dropped
_GENERIC = frozenset(
    (
        *("defaults", "auto", "noauto", "nofail", "_netdev", "user", "nouser", "users"),
        *("owner", "group", "rw", "exec", "noexec", "suid", "nosuid", "dev", "nodev"),
        *("async", "atime", "relatime", "strictatime", "nodiratime", "diratime"),
        *("lazytime", "nolazytime", "silent", "loud"),
    )
)


def runtime_dir() -> Path:
    """Where PID and log files go by default: /run/fastcache as root, else /tmp/fastcache-UID."""
    uid = os.geteuid()
    return Path("/run/fastcache") if uid == 0 else Path(f"/tmp/fastcache-{uid}")


def default_files(mountpoint: Path) -> tuple[Path, Path]:
    """``(PID file, log file)`` of the mount at ``mountpoint`` (named after its path)."""
    name = str(Path(os.path.abspath(mountpoint))).strip("/").replace("/", "-") or "root"
    base = runtime_dir()
    return base / f"{name}.pid", base / f"{name}.log"


# --- the mount(8) helper -------------------------------------------------------------------
def helper_argv(argv: Sequence[str]) -> list[str] | None:
    """``mount.fastcache SOURCE DIR [-sfnv] [-o OPTS] [-N NS] [-t TYPE]`` → the ``fastcache``
    argv that mounts it as a daemon; ``None`` for ``-f`` (mount(8)'s fake run)."""
    positional: list[str] = []
    options: list[str] = []
    fake = False
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-o", "-N", "-t"):
            if not args:
                raise ConfigError(f"mount.fastcache: {arg} needs a value")
            value = args.pop(0)
            if arg == "-o":
                options.extend(o for o in value.split(",") if o)
        elif arg.startswith("-o") and len(arg) > 2:
            options.extend(o for o in arg[2:].split(",") if o)
        elif arg.startswith("-") and len(arg) > 1:
            fake = fake or "f" in arg[1:]  # -s (sloppy), -n (no mtab), -v: nothing to do
        else:
            positional.append(arg)
    if len(positional) != 2:
        raise ConfigError("usage: mount.fastcache COORDINATOR_URL MOUNTPOINT [-o key=value,...]")
    source, mountpoint = positional
    if not source.startswith(("http://", "https://")):
        raise ConfigError(f"mount.fastcache: the source is the coordinator URL, not {source!r}")
    flags: list[str] = []
    for option in options:
        key, eq, value = option.partition("=")
        if key in _GENERIC or key.startswith(("x-", "comment")):
            continue
        if key == "ro":
            raise ConfigError("mount.fastcache: read-only mounts are not supported")
        flags.append("--" + key.replace("_", "-"))
        if eq:
            flags.append(value)
    if fake:
        return None
    return ["mount", "--daemon", "--coordinator", source, *flags, mountpoint]


def read_env_file(path: Path) -> dict[str, str]:
    """``KEY=VALUE`` lines (``#`` comments, optional quotes): S3 keys and the token for a
    mount that mount(8) or systemd starts with an empty environment."""
    out: dict[str, str] = {}
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read env file {path}: {exc.strerror}") from None
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, eq, value = line.removeprefix("export ").partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"{path}:{number}: not KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        out[key.strip()] = value
    return out


# --- running -------------------------------------------------------------------------------
@contextlib.contextmanager
def pid_file(path: Path) -> Iterator[None]:
    """This process's PID in ``path`` while the block runs (removed after, if still ours)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"{os.getpid()}\n")
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            if path.read_text().strip() == str(os.getpid()):
                path.unlink()


def daemonize(
    argv: Sequence[str],
    mountpoint: Path,
    log_file: Path,
    env: Mapping[str, str] | None = None,
    timeout: float = START_TIMEOUT,
) -> int:
    """Run ``fastcache ARGV`` (a foreground mount) in its own session, output to
    ``log_file``; 0 once ``mountpoint`` is mounted, 1 if the node exits or times out first."""
    if is_mounted(mountpoint):
        print(f"fastcache: {mountpoint} is mounted already", file=sys.stderr)
        return 1
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "ab") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "fastcache", *argv],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=None if env is None else dict(env),
        )
    deadline = time.monotonic() + timeout
    while not is_mounted(mountpoint):
        if child.poll() is not None:
            print(
                f"fastcache: the node exited with status {child.returncode} before mounting "
                f"{mountpoint}; see {log_file}",
                file=sys.stderr,
            )
            return 1
        if time.monotonic() > deadline:
            child.terminate()
            print(
                f"fastcache: {mountpoint} not mounted after {timeout:.0f}s; see {log_file}",
                file=sys.stderr,
            )
            return 1
        time.sleep(POLL)
    print(f"fastcache: mounted {mountpoint} (pid {child.pid}, log {log_file})")
    return 0


def _running(pid: int) -> bool:
    """Whether ``pid`` is a live (not zombie) fastcache process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    state = stat.rpartition(")")[2].split()[0]
    return state != "Z" and b"fastcache" in cmdline


def _fusermount(mountpoint: Path) -> int:
    done = subprocess.run(["fusermount", "-u", str(mountpoint)], capture_output=True, text=True)
    if done.returncode != 0:
        print(f"fastcache: fusermount -u {mountpoint}: {done.stderr.strip()}", file=sys.stderr)
    return done.returncode


def umount(mountpoint: Path, pid_path: Path, timeout: float = 60.0) -> int:
    """Stop the node serving ``mountpoint`` (SIGTERM: it commits, unmounts, exits); without
    a live node, unmount what is there. 0 once it is unmounted."""
    try:
        pid: int | None = int(pid_path.read_text().strip())
    except (OSError, ValueError):
        pid = None
    if pid is not None and _running(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while _running(pid):
            if time.monotonic() > deadline:
                print(f"fastcache: pid {pid} still running after {timeout:.0f}s", file=sys.stderr)
                return 1
            time.sleep(POLL)
        with contextlib.suppress(OSError):
            pid_path.unlink()
        return _fusermount(mountpoint) if is_mounted(mountpoint) else 0
    if is_mounted(mountpoint):  # no node (e.g. killed): a dead mount to remove
        return _fusermount(mountpoint)
    print(f"fastcache: nothing is mounted at {mountpoint}", file=sys.stderr)
    return 1
