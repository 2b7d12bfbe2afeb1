"""A real coordinator process for integration tests (``python -m fastcache coordinator``).

Plain helpers, registered as the ``coordinator`` fixture in ``conftest.py``; other suites can
call ``start_coordinator`` directly for a token, a short peer timeout or a restart.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from fastcache.testing.cluster import coordinator_command
from fastcache.testing.polling import free_port

__all__ = ["CoordinatorProcess", "free_port", "start_coordinator"]

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT = 20.0


class CoordinatorProcess:
    """One coordinator process on loopback. ``stop()`` is SIGTERM, ``kill()`` SIGKILL."""

    def __init__(
        self,
        state_dir: Path,
        *,
        port: int | None = None,
        peer_timeout: float = 60.0,
        token: str | None = None,
        store: str | None = None,
        flags: Sequence[str] = (),
    ) -> None:
        self.state_dir = Path(state_dir)
        self.store = store  # a --store URL; None: SQLite in state_dir
        self.flags = list(flags)  # more coordinator flags, e.g. --lease-term
        self.port = port or free_port()
        self.peer_timeout = peer_timeout
        self.token = token
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = self.state_dir.parent / f"coordinator-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> CoordinatorProcess:
        cmd = coordinator_command(
            self.port, self.state_dir, "--peer-timeout", str(self.peer_timeout)
        )
        if self.store is not None:
            cmd += ["--store", self.store]
        cmd += self.flags
        env = {k: v for k, v in os.environ.items() if k != "FASTCACHE_TOKEN"}
        if self.token is not None:
            env["FASTCACHE_TOKEN"] = self.token
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT
            )
        self.wait_healthy()
        return self

    def wait_healthy(self, timeout: float = START_TIMEOUT) -> None:
        """Poll ``/api/health`` until it answers; fail early if the process died."""
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"coordinator exited {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + "/api/health", timeout=1) as resp:
                    if json.load(resp).get("status") == "ok":
                        return
            except (OSError, urllib.error.URLError, ValueError):
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise TimeoutError(f"coordinator not healthy after {timeout}s:\n{self.log()}")
            time.sleep(0.05)  # polling interval; the deadline above bounds the wait

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 15.0) -> int:
        """SIGTERM and wait; the exit code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def kill(self) -> None:
        """SIGKILL: no chance to flush anything that was not already committed."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> CoordinatorProcess:
        """Start again on the same state dir and port (after ``stop`` or ``kill``)."""
        assert not self.running
        return self.start()


def start_coordinator(
    state_dir: Path,
    *,
    peer_timeout: float = 60.0,
    token: str | None = None,
    port: int | None = None,
    store: str | None = None,
) -> CoordinatorProcess:
    return CoordinatorProcess(
        state_dir, port=port, peer_timeout=peer_timeout, token=token, store=store
    ).start()
