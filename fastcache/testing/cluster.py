"""Real processes for the cluster tests: a coordinator and client nodes (no mounts) on
loopback, each on a port picked at runtime, each logging to a file under the test's tmp dir.

Every process a test starts is stopped by the ``Cluster`` it belongs to (SIGCONT, SIGTERM,
then SIGKILL after a deadline), whatever the test did to it (SIGSTOP, SIGKILL).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastcache.config import S3Config
from fastcache.testing.polling import free_port, wait_until

START_TIMEOUT = 60.0


@dataclass
class Answer:
    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


def http(
    method: str,
    url: str,
    body: bytes | None = None,
    *,
    token: str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Answer:
    """One HTTP request with the stdlib (the tests' client is not the code under test)."""
    request = urllib.request.Request(url, data=body, method=method)
    for key, value in (headers or {}).items():
        request.add_header(key, value)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
            return Answer(resp.status, resp.read(), dict(resp.headers))
    except urllib.error.HTTPError as exc:
        return Answer(exc.code, exc.read(), dict(exc.headers))


def free_port_block(count: int, host: str = "127.0.0.1", attempts: int = 50) -> int:
    """A base port ``p`` with ``p .. p + count - 1`` all free right now."""
    import random
    import socket

    for _ in range(attempts):
        base = random.randint(20000, 60000 - count)
        socks: list[socket.socket] = []
        try:
            for port in range(base, base + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind((host, port))
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
        return base
    raise RuntimeError(f"no block of {count} free ports found")


def healthy(url: str) -> bool:
    try:
        return http("GET", f"{url}/api/health", timeout=2.0).status == 200
    except OSError:
        return False


@dataclass
class Proc:
    """One child process of the test, in its own session (so signals reach only it)."""

    name: str
    cmd: list[str]
    url: str
    log_path: Path
    env: dict[str, str]
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> Proc:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            log.write(("\n--- " + " ".join(self.cmd) + "\n").encode())
            log.flush()
            self.popen = subprocess.Popen(
                self.cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.env,
                start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> None:
        def ready() -> bool:
            if not self.alive():
                raise RuntimeError(f"{self.name} exited: {self.log_tail()}")
            return healthy(self.url)

        wait_until(ready, timeout, interval=0.05, message=f"{self.name} healthy")

    def signal(self, sig: int) -> None:
        if self.alive():
            os.kill(self.pid, sig)

    def kill(self) -> None:
        """SIGKILL and reap."""
        if self.popen is not None and self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(10)

    def stop(self, timeout: float = 20.0) -> int | None:
        """Graceful stop (SIGTERM; SIGKILL past ``timeout``); the exit status."""
        if self.popen is None:
            return None
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, signal.SIGCONT)
                os.kill(self.pid, signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)
        return self.popen.returncode

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def coordinator_command(port: int, state_dir: Path | str, *flags: str) -> list[str]:
    """The command line of a coordinator process on loopback (``python -m fastcache``)."""
    return [
        sys.executable,
        "-m",
        "fastcache",
        "coordinator",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--state-dir",
        str(state_dir),
        *flags,
    ]


@dataclass
class Cluster:
    """A coordinator and client nodes; ``close()`` stops everything it started."""

    root: Path
    s3: S3Config
    token: str | None = None
    peer_timeout: float = 60.0
    heartbeat_interval: float = 10.0
    coordinator_flags: list[str] = field(default_factory=list)  # e.g. ["--lease-term", "0.2"]
    coordinator: Proc | None = None
    more_coordinators: list[Proc] = field(default_factory=list)  # on a shared store
    clients: list[Proc] = field(default_factory=list)

    @property
    def coordinator_url(self) -> str:
        assert self.coordinator is not None
        return self.coordinator.url

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FASTCACHE_"))}
        env["AWS_ACCESS_KEY_ID"] = self.s3.access_key or ""
        env["AWS_SECRET_ACCESS_KEY"] = self.s3.secret_key or ""
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _common(self) -> list[str]:
        return (["--token", self.token] if self.token else []) + ["--log-level", "INFO"]

    def start_coordinator(self, port: int | None = None, name: str = "coordinator") -> Proc:
        """Start (or restart, on the same state dir and port) the coordinator; another
        ``name`` starts one more coordinator (for a store they can share)."""
        if name != "coordinator":
            port = port or free_port()
        elif port is None:
            port = int(self.coordinator.url.rsplit(":", 1)[1]) if self.coordinator else free_port()
        cmd = coordinator_command(
            port,
            self.root / name,
            "--peer-timeout",
            str(self.peer_timeout),
            *self.coordinator_flags,
            *self._common(),
        )
        proc = Proc(
            name, cmd, f"http://127.0.0.1:{port}", self.root / "logs" / f"{name}.log", self._env()
        )
        proc.start()
        if name == "coordinator":
            self.coordinator = proc
        else:
            self.more_coordinators.append(proc)
        proc.wait_healthy()
        return proc

    def start_client(self, index: int | None = None, extra: list[str] | None = None) -> Proc:
        """Start client ``index`` (named ``client<index>``; default: the next) on a fresh port.

        A client started again under the same index keeps its NVMe dir."""
        index = len(self.clients) + 1 if index is None else index
        port = free_port()
        name = f"client{index}"
        cmd = [
            sys.executable,
            "-m",
            "fastcache",
            "client",
            "--coordinator",
            self.coordinator_url,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--peer-id",
            name,
            "--nvme-dir",
            str(self.root / f"nvme{index}"),
            "--nvme-capacity",
            "2G",
            "--s3-endpoint",
            self.s3.endpoint or "",
            "--bucket",
            self.s3.bucket,
            "--heartbeat-interval",
            str(self.heartbeat_interval),
            *self._common(),
            *(extra or []),
        ]
        proc = Proc(
            name, cmd, f"http://127.0.0.1:{port}", self.root / "logs" / f"{name}.log", self._env()
        )
        proc.start()
        self.clients = [c for c in self.clients if c.name != name] + [proc]
        return proc

    def client(self, name: str) -> Proc:
        return next(c for c in self.clients if c.name == name)

    def start(self, nodes: int) -> Cluster:
        self.start_coordinator()
        procs = [self.start_client() for _ in range(nodes)]
        for proc in procs:
            proc.wait_healthy()
        self.wait_peers({p.name for p in procs})
        return self

    def peers(self) -> set[str]:
        """Peer ids the coordinator lists as live."""
        answer = http("GET", f"{self.coordinator_url}/api/peers", token=self.token, timeout=5)
        if answer.status != 200:
            return set()
        return {p["peer_id"] for p in answer.json()["peers"]}

    def wait_peers(self, expected: set[str], timeout: float = 30.0) -> None:
        def ok() -> bool:
            try:
                return self.peers() == expected
            except OSError:
                return False

        wait_until(ok, timeout, interval=0.05, message=f"peers == {sorted(expected)}")

    def close(self) -> None:
        coordinators = [*([self.coordinator] if self.coordinator else []), *self.more_coordinators]
        for proc in [*self.clients, *coordinators]:
            proc.stop()

    def __enter__(self) -> Cluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def wait_for(predicate: Any, timeout: float = 30.0, message: str = "condition") -> Any:
    """``wait_until`` with the interval the cluster tests use."""
    return wait_until(predicate, timeout, interval=0.05, message=message)
