"""The systems under test: one class per filesystem, all mounted on the same S3 server.

Every system has the same face: ``start()`` mounts its nodes (1, or 3 for the peer and
multi-reader workloads), ``stop()`` unmounts them, ``restart_nodes(..., wipe=True)``
wipes local caches and remounts, ``settle(path)`` waits until a file written through the
mount is durable in the backend, and ``versions()``/``options()`` are recorded in the
results. Mount processes run in the foreground, in their own session, logging into the
work directory; the harness owns their lifetime and stops them (also on Ctrl-C).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, ClassVar

ROOT = Path(__file__).resolve().parent.parent


class MountError(RuntimeError):
    """A system could not be set up, mounted or unmounted."""


# --- helpers -----------------------------------------------------------------------------


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _unescape_mount(path: str) -> str:
    """Mount points in /proc/self/mountinfo escape space, tab, newline, backslash in octal."""
    for code, char in (("\\040", " "), ("\\011", "\t"), ("\\012", "\n"), ("\\134", "\\")):
        path = path.replace(code, char)
    return path


def mounted_fstype(path: Path) -> str | None:
    """The filesystem type mounted exactly at ``path``, or None."""
    target = os.path.realpath(path)
    found = None
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields = left.split()
            if len(fields) >= 5 and _unescape_mount(fields[4]) == target:
                found = right.split()[0] if right else "?"
    return found


def lazy_unmount(path: Path) -> None:
    """``fusermount -u -z``: a leftover of one of OUR mounts only (callers guarantee it)."""
    if mounted_fstype(path) is not None:
        subprocess.run(
            ["fusermount", "-u", "-z", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            check=False,
        )


def wipe_dir(path: Path) -> None:
    """Remove everything inside ``path`` (not the directory itself)."""
    path.mkdir(parents=True, exist_ok=True)
    for child in path.iterdir():
        if child.is_dir() and not child.is_symlink():
            shutil.rmtree(child)
        else:
            child.unlink()


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def session_cpu_seconds(sid: int) -> float | None:
    """CPU time (user + system, plus that of waited-for children) of every process in the
    session ``sid``: a mount started in its own session, wrapper scripts and helpers
    included. None if no such process is left."""
    total = 0
    found = False
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as f:
                data = f.read()
        except OSError:  # gone meanwhile
            continue
        fields = data[data.rfind(b")") + 2 :].split()  # fields[0] is field 3 (state)
        if len(fields) < 15 or int(fields[3]) != sid:  # field 6: session
            continue
        found = True
        total += sum(int(x) for x in fields[11:15])  # fields 14-17: utime stime cutime cstime
    return total / CLOCK_TICKS if found else None


def first_line(cmd: Sequence[str]) -> str:
    try:
        out = subprocess.run(list(cmd), capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unavailable ({exc})"
    text = (out.stdout or out.stderr).strip()
    return text.splitlines()[0] if text else "unknown"


def http_ok(url: str, timeout: float = 2.0) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return bool(200 <= resp.status < 300)
    except (urllib.error.URLError, OSError, ValueError):
        return False


@dataclass
class Tools:
    """Where the binaries are, and the private PATH dir (``fusermount3`` → ``fusermount``)."""

    venv_bin: Path
    private_bin: Path

    def path(self, name: str) -> str:
        candidate = self.venv_bin / name
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
        found = shutil.which(name)
        if found is None:
            raise MountError(f"`{name}` not found")
        return found

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        path = os.pathsep.join([str(self.private_bin), str(self.venv_bin), os.environ["PATH"]])
        return {**os.environ, "PATH": path, **(extra or {})}


@dataclass
class Backend:
    """How the systems of one profile reach the S3 server (directly, or through the proxy)."""

    profile: str  # "local" or "remote"
    s3_endpoint: str
    filer_http: str  # host:port of the SeaweedFS filer's HTTP API, as mounts reach it
    filer_grpc_port: int
    access_key: str
    secret_key: str
    proxied: bool
    direct_s3_endpoint: str  # for the harness's own admin calls (never through the proxy)
    region: str = "us-east-1"


class S3Admin:
    """The harness's own S3 calls: create buckets, check a key's size (botocore)."""

    def __init__(self, endpoint: str, access_key: str, secret_key: str) -> None:
        import botocore.config
        import botocore.session

        session = botocore.session.get_session()
        self._client = session.create_client(
            "s3",
            endpoint_url=endpoint,
            aws_access_key_id=access_key,
            aws_secret_access_key=secret_key,
            region_name="us-east-1",
            config=botocore.config.Config(
                s3={"addressing_style": "path"}, retries={"max_attempts": 3}
            ),
        )

    def create_bucket(self, bucket: str) -> None:
        try:
            self._client.create_bucket(Bucket=bucket)
        except (
            self._client.exceptions.BucketAlreadyOwnedByYou,
            self._client.exceptions.BucketAlreadyExists,
        ):
            pass

    def delete_bucket(self, bucket: str) -> None:
        """Drop a bucket and everything in it (SeaweedFS drops the collection's volumes):
        one system's data must not fill the disk, or the volume slots, for the next."""
        import botocore.exceptions

        try:
            self._client.delete_bucket(Bucket=bucket)
        except botocore.exceptions.ClientError:
            pass

    def object_size(self, bucket: str, key: str) -> int | None:
        import botocore.exceptions

        try:
            head = self._client.head_object(Bucket=bucket, Key=key)
        except botocore.exceptions.ClientError:
            return None
        return int(head["ContentLength"])


class MountProcess:
    """One foreground mount (or server) process in its own session, logging to a file."""

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        *,
        log_path: Path,
        env: dict[str, str],
        mountpoint: Path | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.log_path = log_path
        self.env = env
        self.mountpoint = mountpoint
        self.cwd = cwd
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    @property
    def pid(self) -> int | None:
        """The process id (also its session id: ``start_new_session``), None if stopped."""
        return self._proc.pid if self.running and self._proc is not None else None

    def start(self, timeout: float = 60.0) -> None:
        if self.mountpoint is not None:
            lazy_unmount(self.mountpoint)  # our own leftover from an earlier, killed run
            self.mountpoint.mkdir(parents=True, exist_ok=True)
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self._log.write(("\n--- " + " ".join(self.cmd) + "\n").encode())
        self._log.flush()
        self._proc = subprocess.Popen(
            self.cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=self.env,
            cwd=self.cwd,
            start_new_session=True,
        )
        mountpoint = self.mountpoint
        if mountpoint is not None:
            self.wait(lambda: mounted_fstype(mountpoint) is not None, timeout, "mount")

    def wait(self, ready: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll ``ready()`` until true; fail if the process exits first or time runs out."""
        deadline = time.monotonic() + timeout
        delay = 0.05
        while not ready():
            if self._proc is None or self._proc.poll() is not None:
                code = self._proc.returncode if self._proc else "?"
                raise MountError(
                    f"{self.name}: exited with {code} before {what}; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if time.monotonic() > deadline:
                raise MountError(
                    f"{self.name}: no {what} within {timeout:.0f}s; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(delay)
            delay = min(delay * 1.5, 0.5)

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    def stop(self, timeout: float = 60.0) -> None:
        """SIGTERM (every system here unmounts on it), SIGKILL after ``timeout``, then
        a lazy unmount of our mount point if the kernel still has it. Idempotent."""
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                self._signal(signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    self._signal(signal.SIGKILL)
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        proc.wait(15)
            self._signal(signal.SIGKILL)  # stragglers in the group (s3fs/rclone helpers)
            self._proc = None
        if self.mountpoint is not None:
            lazy_unmount(self.mountpoint)
        if self._log is not None:
            self._log.close()
            self._log = None

    def _signal(self, sig: signal.Signals) -> None:
        if self._proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)  # pgid == pid: start_new_session


# --- the systems -------------------------------------------------------------------------


@dataclass
class Context:
    """What every system needs: a work dir, tools, the backend of the current profile."""

    workdir: Path
    tools: Tools
    backend: Backend
    admin: S3Admin
    cache_capacity_mb: int = 10240
    extra_options: dict[str, list[str]] = field(default_factory=dict)


class System:
    """Base: N mounts of one filesystem over one bucket (``bench-<name>-<profile>``)."""

    name: ClassVar[str] = "?"
    needs_s3: ClassVar[bool] = True
    max_nodes: ClassVar[int] = 3
    default_nodes: ClassVar[int] = 1

    def __init__(self, ctx: Context, nodes: int | None = None) -> None:
        self.ctx = ctx
        self.nodes = nodes or self.default_nodes
        if self.nodes > self.max_nodes:
            raise MountError(f"{self.name} runs at most {self.max_nodes} node(s)")
        tag = f"{self.name}-{ctx.backend.profile}-{self.nodes}n"
        self.dir = ctx.workdir / tag
        self.bucket = f"bench-{self.name}-{ctx.backend.profile}-{self.nodes}n".lower()
        self.mounts = [self.dir / f"mnt{i + 1}" for i in range(self.nodes)]
        self.caches = [self.dir / f"cache{i + 1}" for i in range(self.nodes)]
        self._procs: list[MountProcess | None] = [None] * self.nodes
        self._shared_up = False

    # lifecycle
    def start(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self._shared_up:
            if self.needs_s3:
                self.ctx.admin.create_bucket(self.bucket)
            self.start_shared()
            self._shared_up = True
        for i in range(self.nodes):
            self.start_node(i)

    def start_node(self, i: int) -> None:
        self.caches[i].mkdir(parents=True, exist_ok=True)
        proc = MountProcess(
            f"{self.name}#{i + 1}",
            self.mount_command(i),
            log_path=self.dir / f"node{i + 1}.log",
            env=self.mount_env(i),
            mountpoint=self.mounts[i],
            cwd=self.dir,
        )
        self._procs[i] = proc
        proc.start()

    def stop_node(self, i: int) -> None:
        proc = self._procs[i]
        if proc is not None:
            proc.stop()
            self._procs[i] = None

    def stop(self) -> None:
        errors = []
        for i in range(self.nodes):
            try:
                self.stop_node(i)
            except Exception as exc:  # keep stopping the others; report after
                errors.append(exc)
        if self._shared_up:
            self.stop_shared()
            self._shared_up = False
            if self.needs_s3:
                self.ctx.admin.delete_bucket(self.bucket)
        if errors:
            raise errors[0]

    def restart_nodes(self, nodes: Sequence[int] | None = None, *, wipe: bool) -> None:
        """Unmount, optionally wipe the local cache, mount again (the "cold" condition)."""
        which = list(range(self.nodes)) if nodes is None else list(nodes)
        for i in which:
            self.stop_node(i)
        if wipe:
            for i in which:
                self.wipe_cache(i)
        for i in which:
            self.start_node(i)

    def wipe_cache(self, i: int) -> None:
        wipe_dir(self.caches[i])

    def cpu_seconds(self, i: int = 0) -> float | None:
        """CPU time so far of node ``i``'s mount process(es); None if none runs (raw disk)."""
        proc = self._procs[i]
        pid = proc.pid if proc is not None else None
        return None if pid is None else session_cpu_seconds(pid)

    def settle(self, mount_index: int, relpath: str, size: int, timeout: float = 900.0) -> None:
        """Wait until a file written through the mount is durable in the backend."""

    # per-system parts
    def start_shared(self) -> None:
        """Services shared by the nodes (a coordinator, a formatted volume)."""

    def stop_shared(self) -> None:
        pass

    def mount_command(self, i: int) -> list[str]:
        raise NotImplementedError

    def mount_env(self, i: int) -> dict[str, str]:
        return self.ctx.tools.env()

    def versions(self) -> dict[str, str]:
        return {}

    def options(self) -> dict[str, object]:
        return {
            "nodes": self.nodes,
            "mount_command": [self._redact(self.mount_command(i)) for i in range(self.nodes)],
        }

    def _redact(self, cmd: list[str]) -> str:
        text = " ".join(cmd)
        return text.replace(self.ctx.backend.secret_key, "***")

    def extra(self) -> list[str]:
        return list(self.ctx.extra_options.get(self.name, []))


class RawDisk(System):
    """A plain directory on the same disk: the ceiling. No cache to wipe, no S3."""

    name = "raw"
    needs_s3 = False
    max_nodes = 1

    def start(self) -> None:
        for m in self.mounts:
            m.mkdir(parents=True, exist_ok=True)

    def start_node(self, i: int) -> None:
        self.mounts[i].mkdir(parents=True, exist_ok=True)

    def stop_node(self, i: int) -> None:
        pass

    def stop(self) -> None:
        pass

    def wipe_cache(self, i: int) -> None:
        pass

    def versions(self) -> dict[str, str]:
        return {"kernel": os.uname().release}

    def options(self) -> dict[str, object]:
        return {"nodes": 1, "path": str(self.mounts[0])}


class FastcacheSystem(System):
    """fastcache: a coordinator and N ``fastcache client --mount`` nodes (NVMe dir local)."""

    name = "fastcache"

    def __init__(self, ctx: Context, nodes: int | None = None) -> None:
        super().__init__(ctx, nodes)
        self._coordinator: MountProcess | None = None
        self.coordinator_port = 0
        self.client_ports = [0] * self.nodes

    @property
    def coordinator_url(self) -> str:
        return f"http://127.0.0.1:{self.coordinator_port}"

    def _fastcache(self) -> list[str]:
        return [sys.executable, "-m", "fastcache"]

    def start_shared(self) -> None:
        self.coordinator_port = free_port()
        state = self.dir / "coordinator"
        if state.exists():
            shutil.rmtree(state)
        state.mkdir(parents=True)
        cmd = [
            *self._fastcache(),
            "coordinator",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.coordinator_port),
            "--state-dir",
            str(state),
            "--log-level",
            "WARNING",
        ]
        self._coordinator = MountProcess(
            "fastcache-coordinator",
            cmd,
            log_path=self.dir / "coordinator.log",
            env=self.ctx.tools.env({"PYTHONPATH": str(ROOT)}),
            cwd=self.dir,
        )
        self._coordinator.start()
        self._coordinator.wait(
            lambda: http_ok(self.coordinator_url + "/api/health"), 60, "health check"
        )

    def stop_shared(self) -> None:
        if self._coordinator is not None:
            self._coordinator.stop()
            self._coordinator = None

    def start_node(self, i: int) -> None:
        if not self.client_ports[i]:
            self.client_ports[i] = free_port()
        super().start_node(i)

    def mount_command(self, i: int) -> list[str]:
        return [
            *self._fastcache(),
            "client",
            "--coordinator",
            self.coordinator_url,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.client_ports[i] or 0),
            "--peer-id",
            f"bench{i + 1}",
            "--nvme-dir",
            str(self.caches[i]),
            "--nvme-capacity",
            f"{self.ctx.cache_capacity_mb}M",
            "--s3-endpoint",
            self.ctx.backend.s3_endpoint,
            "--bucket",
            self.bucket,
            "--region",
            self.ctx.backend.region,
            "--mount",
            str(self.mounts[i]),
            "--log-level",
            "WARNING",
            *self.extra(),
        ]

    def mount_env(self, i: int) -> dict[str, str]:
        b = self.ctx.backend
        return self.ctx.tools.env(
            {
                "AWS_ACCESS_KEY_ID": b.access_key,
                "AWS_SECRET_ACCESS_KEY": b.secret_key,
                "PYTHONPATH": str(ROOT),
            }
        )

    def versions(self) -> dict[str, str]:
        from fastcache import __version__

        rev = first_line(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        return {"fastcache": f"{__version__} ({rev}{'+dirty' if dirty else ''})"}


class FastcacheCluster(FastcacheSystem):
    """The 3-node fastcache cluster (peer tier) for the multi-node workloads."""

    default_nodes = 3


class JuiceFS(System):
    """JuiceFS: SQLite metadata, S3 data, ``--cache-dir`` local; default (no write-back)."""

    name = "juicefs"

    @property
    def meta_url(self) -> str:
        return f"sqlite3://{self.dir / 'meta.db'}"

    def start_shared(self) -> None:
        meta = self.dir / "meta.db"
        if meta.exists():
            return
        b = self.ctx.backend
        cmd = [
            self.ctx.tools.path("juicefs"),
            "format",
            "--storage",
            "s3",
            "--bucket",
            f"{b.s3_endpoint}/{self.bucket}",
            "--access-key",
            b.access_key,
            "--secret-key",
            b.secret_key,
            "--trash-days",
            "0",
            "--no-update",
            self.meta_url,
            "fcbench",
        ]
        out = subprocess.run(
            cmd, capture_output=True, text=True, env=self.ctx.tools.env(), timeout=120, check=False
        )
        if out.returncode != 0 and "--no-update" in (out.stderr + out.stdout):
            cmd.remove("--no-update")
            out = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                env=self.ctx.tools.env(),
                timeout=120,
                check=False,
            )
        if out.returncode != 0:
            raise MountError(f"juicefs format failed: {(out.stderr or out.stdout)[-2000:]}")

    def mount_command(self, i: int) -> list[str]:
        return [
            self.ctx.tools.path("juicefs"),
            "mount",
            self.meta_url,
            str(self.mounts[i]),
            "--cache-dir",
            str(self.caches[i]),
            "--cache-size",
            str(self.ctx.cache_capacity_mb),
            "--no-usage-report",
            *self.extra(),
        ]

    def versions(self) -> dict[str, str]:
        return {"juicefs": first_line([self.ctx.tools.path("juicefs"), "--version"])}


class Rclone(System):
    """rclone mount with ``--vfs-cache-mode full`` (uploads after close, in the background)."""

    name = "rclone"

    def start_shared(self) -> None:
        (self.dir / "rclone.conf").write_text("")

    def mount_command(self, i: int) -> list[str]:
        return [
            self.ctx.tools.path("rclone"),
            "mount",
            f"fcbench:{self.bucket}",
            str(self.mounts[i]),
            "--config",
            str(self.dir / "rclone.conf"),
            "--vfs-cache-mode",
            "full",
            "--vfs-cache-max-size",
            f"{self.ctx.cache_capacity_mb}M",
            "--cache-dir",
            str(self.caches[i]),
            "--log-level",
            "NOTICE",
            *self.extra(),
        ]

    def mount_env(self, i: int) -> dict[str, str]:
        b = self.ctx.backend
        return self.ctx.tools.env(
            {
                "RCLONE_CONFIG_FCBENCH_TYPE": "s3",
                "RCLONE_CONFIG_FCBENCH_PROVIDER": "SeaweedFS",
                "RCLONE_CONFIG_FCBENCH_ENDPOINT": b.s3_endpoint,
                "RCLONE_CONFIG_FCBENCH_ACCESS_KEY_ID": b.access_key,
                "RCLONE_CONFIG_FCBENCH_SECRET_ACCESS_KEY": b.secret_key,
                "RCLONE_CONFIG_FCBENCH_REGION": b.region,
                "RCLONE_CONFIG_FCBENCH_FORCE_PATH_STYLE": "true",
            }
        )

    def settle(self, mount_index: int, relpath: str, size: int, timeout: float = 900.0) -> None:
        deadline = time.monotonic() + timeout
        while self.ctx.admin.object_size(self.bucket, relpath) != size:
            if time.monotonic() > deadline:
                raise MountError(f"rclone: {relpath} not uploaded within {timeout:.0f}s")
            time.sleep(0.5)

    def versions(self) -> dict[str, str]:
        return {"rclone": first_line([self.ctx.tools.path("rclone"), "version"])}


class S3fs(System):
    """s3fs-fuse with ``use_cache`` (whole-file local cache)."""

    name = "s3fs"

    def start_shared(self) -> None:
        passwd = self.dir / "passwd-s3fs"
        b = self.ctx.backend
        passwd.write_text(f"{b.access_key}:{b.secret_key}\n")
        passwd.chmod(0o600)

    def mount_command(self, i: int) -> list[str]:
        b = self.ctx.backend
        opts = [
            f"url={b.s3_endpoint}",
            "use_path_request_style",
            f"passwd_file={self.dir / 'passwd-s3fs'}",
            f"use_cache={self.caches[i]}",
            f"endpoint={b.region}",
            "dbglevel=warn",
        ]
        return [
            self.ctx.tools.path("s3fs"),
            self.bucket,
            str(self.mounts[i]),
            "-f",
            "-o",
            ",".join(opts),
            *self.extra(),
        ]

    def versions(self) -> dict[str, str]:
        return {"s3fs": first_line([self.ctx.tools.path("s3fs"), "--version"])}


class WeedMount(System):
    """SeaweedFS's own ``weed mount`` on the bucket's filer directory, ``-cacheDir`` local.

    It speaks to the filer, not to S3: in the remote profile both filer ports go through
    the proxy and chunk reads go through the filer (``-volumeServerAccess=filerProxy``).
    With several nodes, ``-peer.enable`` shares chunk caches between the mounts.
    """

    name = "weed"

    def __init__(self, ctx: Context, nodes: int | None = None) -> None:
        super().__init__(ctx, nodes)
        self.peer_ports = [0] * self.nodes

    def start_node(self, i: int) -> None:
        if not self.peer_ports[i]:
            self.peer_ports[i] = free_port()
        super().start_node(i)

    def mount_command(self, i: int) -> list[str]:
        b = self.ctx.backend
        http_port = int(b.filer_http.rsplit(":", 1)[1])
        filer = b.filer_http
        if b.filer_grpc_port != http_port + 10000:  # weed's default gRPC offset
            filer += f".{b.filer_grpc_port}"
        cmd = [
            self.ctx.tools.path("weed"),
            "mount",
            f"-filer={filer}",
            f"-filer.path=/buckets/{self.bucket}",
            f"-dir={self.mounts[i]}",
            f"-cacheDir={self.caches[i]}",
            f"-cacheCapacityMB={self.ctx.cache_capacity_mb}",
            f"-localSocket={self.dir / f'weed-mount{i + 1}.sock'}",
        ]
        if b.proxied:
            cmd.append("-volumeServerAccess=filerProxy")
        if self.nodes > 1 and weed_has_peer(self.ctx.tools.path("weed")):
            port = self.peer_ports[i] or 0
            cmd += [
                "-peer.enable",
                f"-peer.listen=127.0.0.1:{port}",
                f"-peer.advertise=127.0.0.1:{port}",
            ]
        return [*cmd, *self.extra()]

    def mount_env(self, i: int) -> dict[str, str]:
        return self.ctx.tools.env({"GOMAXPROCS": os.environ.get("GOMAXPROCS", "2")})

    def versions(self) -> dict[str, str]:
        return {"weed": first_line([self.ctx.tools.path("weed"), "version"])}


_PEER_FLAG: dict[str, bool] = {}


def weed_has_peer(weed: str) -> bool:
    """Whether this ``weed`` build knows ``mount -peer.enable`` (asked once)."""
    if weed not in _PEER_FLAG:
        out = subprocess.run(
            [weed, "mount", "-h"], capture_output=True, text=True, timeout=30, check=False
        )
        _PEER_FLAG[weed] = "-peer.enable" in (out.stdout + out.stderr)
    return _PEER_FLAG[weed]


SYSTEMS: dict[str, type[System]] = {
    "fastcache": FastcacheSystem,
    "juicefs": JuiceFS,
    "rclone": Rclone,
    "s3fs": S3fs,
    "weed": WeedMount,
    "raw": RawDisk,
}

CLUSTERS: dict[str, type[System]] = {"fastcache": FastcacheCluster}


def make_system(name: str, ctx: Context, *, cluster: bool) -> System:
    """One node of ``name``, or its 3-node variant for the multi-node workloads."""
    if cluster:
        cls = CLUSTERS.get(name, SYSTEMS[name])
        return cls(ctx, nodes=3)
    return SYSTEMS[name](ctx, nodes=1)


def describe(systems: Sequence[System]) -> str:
    return json.dumps({s.name: s.options() for s in systems}, indent=1, default=str)
