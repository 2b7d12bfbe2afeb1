"""A throwaway local PostgreSQL server: the dev cluster's and the test suite's.

Debian's ``postgresql-15`` binaries, ``initdb`` into a directory of our own, started with
``pg_ctl`` on loopback only (``trust`` authentication, a Unix socket in the same directory),
run as the ``postgres`` user when we are root (PostgreSQL refuses to run as root). ``stop``
is ``pg_ctl stop``: it stops exactly the server this directory holds, nothing else.
"""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
from pathlib import Path

PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_USER = "postgres"
START_TIMEOUT = 60  # seconds pg_ctl waits for the server to accept connections


class PostgresError(RuntimeError):
    """The server could not be set up, started or stopped; the message says why."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class PostgresServer:
    """One PostgreSQL cluster in ``root`` (``root/data``, ``root/server.log``, the socket)."""

    def __init__(self, root: Path, port: int | None = None, fsync: bool = True) -> None:
        """``fsync=False`` (tests): commits are not flushed to disk. A clean stop or restart
        keeps everything; only a machine crash could lose what a commit acknowledged."""
        self.root = Path(root).resolve()
        self.fsync = fsync
        self.data = self.root / "data"
        self.log_path = self.root / "server.log"
        self.port = port or _free_port()

    def url(self, database: str = "postgres") -> str:
        return f"postgresql://{PG_USER}@127.0.0.1:{self.port}/{database}"

    def _as_owner(self, cmd: list[str]) -> list[str]:
        return ["runuser", "-u", PG_USER, "--", *cmd] if os.geteuid() == 0 else cmd

    def _run(self, cmd: list[str]) -> None:
        done = subprocess.run(self._as_owner(cmd), capture_output=True, text=True, check=False)
        if done.returncode != 0:
            detail = (done.stderr or done.stdout).strip().splitlines()
            raise PostgresError(f"{Path(cmd[0]).name} failed: {detail[-1] if detail else '?'}")

    def start(self) -> PostgresServer:
        """``initdb`` on first use, then start on ``port``; returns once it accepts connections."""
        if not (PG_BIN / "pg_ctl").exists():
            raise PostgresError(
                f"PostgreSQL 15 is not installed ({PG_BIN}): apt install postgresql-15"
            )
        self.root.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            owner = pwd.getpwnam(PG_USER)
            os.chown(self.root, owner.pw_uid, owner.pw_gid)
        if not (self.data / "PG_VERSION").exists():
            self._run(
                [
                    str(PG_BIN / "initdb"),
                    "-D",
                    str(self.data),
                    "-U",
                    PG_USER,
                    "--auth=trust",
                    "--encoding=UTF8",
                    "--locale=C.UTF-8",
                    "--no-sync",
                ]
            )
        options = f"-p {self.port} -k {self.root} -c listen_addresses=127.0.0.1"
        if not self.fsync:
            options += " -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
        self._run(
            [
                str(PG_BIN / "pg_ctl"),
                "start",
                "-w",
                "-t",
                str(START_TIMEOUT),
                "-D",
                str(self.data),
                "-l",
                str(self.log_path),
                "-o",
                options,
            ]
        )
        return self

    @property
    def running(self) -> bool:
        return (self.data / "postmaster.pid").exists()

    def stop(self) -> None:
        """``pg_ctl stop -m fast``: open sessions are ended, everything committed stays."""
        if self.running:
            self._run([str(PG_BIN / "pg_ctl"), "stop", "-w", "-m", "fast", "-D", str(self.data)])

    def restart(self) -> None:
        self.stop()
        self.start()

    def create_database(self, name: str, template: str | None = None) -> str:
        """A new empty database (a copy of ``template`` if given); returns its URL."""
        cmd = [str(PG_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", PG_USER]
        if template is not None:
            cmd += ["-T", template]
        self._run([*cmd, name])
        return self.url(name)

    def remove(self) -> None:
        """Stop, then delete the whole directory."""
        self.stop()
        shutil.rmtree(self.root, ignore_errors=True)
