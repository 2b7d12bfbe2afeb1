"""A TCP proxy that makes a loopback server look like a remote region.

This kernel has no netem, so the "remote S3" profile of the harness puts the delay here:
every response (the first server bytes after the client has sent something) is held back
by ``delay`` seconds, and each direction of each connection is paced to ``bandwidth``
bytes/s. The proxy is protocol-agnostic (HTTP/1.1 keep-alive, gRPC over HTTP/2 alike) and
counts the bytes it carries, which is how the harness tells how much data S3 served.

Two faces:
- ``Proxy``: asyncio, in-process (tests, and the body of the subprocess);
- ``ProxyProcess``: ``python -m bench.proxy`` in its own process, so that pacing never
  competes with the harness for the GIL; a one-line control port returns and resets stats.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from types import TracebackType
from typing import IO

CHUNK = 64 * 1024


@dataclass
class ProxyStats:
    """Counters of one listener (one target)."""

    connections: int = 0
    bytes_up: int = 0  # client -> server
    bytes_down: int = 0  # server -> client
    responses: int = 0  # responses held back by the delay

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


class _Pacer:
    """Caps one direction of one connection at ``rate`` bytes/s (0: unlimited).

    Each chunk waits for its own transmission time after the previous one, so sending
    ``n`` bytes never takes less than ``n / rate`` seconds; idle time earns no burst.
    """

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._free_at = 0.0

    async def pace(self, nbytes: int) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        start = max(now, self._free_at)
        self._free_at = start + nbytes / self.rate
        await asyncio.sleep(self._free_at - now)


class _Connection:
    """One proxied connection: two pumps and the "a request is outstanding" flag."""

    def __init__(self, stats: ProxyStats, delay: float, bandwidth: float) -> None:
        self.stats = stats
        self.delay = delay
        self.bandwidth = bandwidth
        self.request_seen = False

    async def run(
        self,
        c_reader: asyncio.StreamReader,
        c_writer: asyncio.StreamWriter,
        target: tuple[str, int],
    ) -> None:
        try:
            s_reader, s_writer = await asyncio.open_connection(*target)
        except OSError:
            c_writer.close()
            return
        try:
            await asyncio.gather(
                self._pump(c_reader, s_writer, upstream=True),
                self._pump(s_reader, c_writer, upstream=False),
            )
        finally:
            for w in (c_writer, s_writer):
                w.close()
            for w in (c_writer, s_writer):
                with contextlib.suppress(OSError, asyncio.CancelledError):
                    await w.wait_closed()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool
    ) -> None:
        pacer = _Pacer(self.bandwidth)
        try:
            while True:
                data = await reader.read(CHUNK)
                if not data:
                    break
                if upstream:
                    self.request_seen = True
                    self.stats.bytes_up += len(data)
                else:
                    if self.request_seen and self.delay > 0:
                        self.request_seen = False
                        self.stats.responses += 1
                        await asyncio.sleep(self.delay)
                    self.stats.bytes_down += len(data)
                await pacer.pace(len(data))
                writer.write(data)
                await writer.drain()
            if writer.can_write_eof():
                writer.write_eof()
        except (ConnectionError, OSError):
            # one side went away: end the other side too
            writer.close()


class Proxy:
    """Listeners on ``host``, one per target, forwarding with delay and bandwidth cap."""

    def __init__(
        self,
        targets: Sequence[tuple[str, int]],
        *,
        delay: float = 0.02,
        bandwidth: float = 0.0,
        host: str = "127.0.0.1",
        listen_ports: Sequence[int] | None = None,
    ) -> None:
        self.targets = list(targets)
        self.listen_ports = list(listen_ports or [0] * len(self.targets))
        self.delay = delay
        self.bandwidth = bandwidth
        self.host = host
        self.stats = [ProxyStats() for _ in self.targets]
        self.ports: list[int] = []
        self._servers: list[asyncio.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> Proxy:
        for i, target in enumerate(self.targets):
            server = await asyncio.start_server(
                lambda r, w, i=i, t=target: self._accept(r, w, i, t),
                self.host,
                self.listen_ports[i],
            )
            self._servers.append(server)
            self.ports.append(server.sockets[0].getsockname()[1])
        return self

    async def _accept(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        index: int,
        target: tuple[str, int],
    ) -> None:
        stats = self.stats[index]
        stats.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await _Connection(stats, self.delay, self.bandwidth).run(reader, writer, target)
        finally:
            self._tasks.discard(task)

    def snapshot(self) -> list[dict[str, int]]:
        return [s.as_dict() for s in self.stats]

    def reset(self) -> None:
        for s in self.stats:
            s.connections = s.bytes_up = s.bytes_down = s.responses = 0

    async def stop(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for server in self._servers:
            await server.wait_closed()
        self._servers.clear()

    async def __aenter__(self) -> Proxy:
        return await self.start()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()


# --- the proxy as a process --------------------------------------------------------------


def parse_rate(text: str) -> float:
    """Bytes/s from ``64M``, ``1.5G``, ``500k`` or a plain number (binary multiples)."""
    text = text.strip().upper().removesuffix("B").removesuffix("/S").removesuffix("I")
    mult = 1
    if text and text[-1] in "KMGT":
        mult = 1024 ** ("KMGT".index(text[-1]) + 1)
        text = text[:-1]
    value = float(text) * mult
    if value < 0:
        raise ValueError("negative rate")
    return value


async def _control(
    proxy: Proxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> None:
    try:
        line = (await reader.readline()).decode().strip()
        snapshot = proxy.snapshot()
        if line == "reset":  # read and reset in one step: nothing is counted twice or lost
            proxy.reset()
        writer.write((json.dumps(snapshot) + "\n").encode())
        await writer.drain()
    finally:
        writer.close()


async def _serve(args: argparse.Namespace) -> None:
    targets = []
    listen = []
    for t in args.target:
        t, _, at = t.partition("@")
        host, _, port = t.rpartition(":")
        targets.append((host, int(port)))
        listen.append(int(at or 0))
    proxy = Proxy(
        targets, delay=args.delay_ms / 1000.0, bandwidth=args.bandwidth, listen_ports=listen
    )
    await proxy.start()
    control = await asyncio.start_server(lambda r, w: _control(proxy, r, w), "127.0.0.1", 0)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    info = {"ports": proxy.ports, "control_port": control.sockets[0].getsockname()[1]}
    print(json.dumps(info), flush=True)
    await stop.wait()
    control.close()
    await proxy.stop()


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.proxy", description=__doc__)
    p.add_argument(
        "--target", action="append", required=True, help="HOST:PORT[@LISTEN_PORT] (repeatable)"
    )
    p.add_argument("--delay-ms", type=float, default=20.0, help="first-byte delay per response")
    p.add_argument(
        "--bandwidth", type=parse_rate, default=0.0, help="bytes/s per connection, 0: no cap"
    )
    args = p.parse_args(argv)
    asyncio.run(_serve(args))
    return 0


class ProxyProcess:
    """``python -m bench.proxy`` as a child in its own session; ``stop()`` is idempotent."""

    def __init__(
        self,
        targets: Sequence[tuple[str, int]],
        *,
        delay_ms: float,
        bandwidth: float,
        log_path: Path | None = None,
        listen_ports: Sequence[int] | None = None,
    ) -> None:
        self.targets = list(targets)
        self.listen_ports = list(listen_ports or [0] * len(self.targets))
        self.delay_ms = delay_ms
        self.bandwidth = bandwidth
        self.log_path = log_path
        self.ports: list[int] = []
        self.control_port = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def start(self, timeout: float = 15.0) -> ProxyProcess:
        cmd = [sys.executable, "-m", "bench.proxy"]
        for (host, port), listen in zip(self.targets, self.listen_ports, strict=True):
            cmd += ["--target", f"{host}:{port}" + (f"@{listen}" if listen else "")]
        cmd += ["--delay-ms", str(self.delay_ms), "--bandwidth", str(self.bandwidth)]
        if self.log_path is not None:
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the proxy
        root = str(Path(__file__).resolve().parent.parent)
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]),
        }
        self._proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=self._log if self._log is not None else subprocess.DEVNULL,
            start_new_session=True,
            env=env,
        )
        assert self._proc.stdout is not None
        deadline = time.monotonic() + timeout
        line = b""
        while time.monotonic() < deadline:
            line = self._proc.stdout.readline()
            if line or self._proc.poll() is not None:
                break
        if not line:
            self.stop()
            raise RuntimeError("bench.proxy did not start")
        info = json.loads(line)
        self.ports = list(info["ports"])
        self.control_port = int(info["control_port"])
        return self

    def _ask(self, command: str) -> list[dict[str, int]]:
        with socket.create_connection(("127.0.0.1", self.control_port), timeout=10) as s:
            s.sendall(command.encode() + b"\n")
            data = b""
            while not data.endswith(b"\n"):
                part = s.recv(65536)
                if not part:
                    break
                data += part
        return list(json.loads(data))

    def stats(self) -> list[dict[str, int]]:
        return self._ask("stats")

    def reset(self) -> list[dict[str, int]]:
        """Return the counters and zero them, atomically."""
        return self._ask("reset")

    def stop(self, timeout: float = 10.0) -> None:
        proc = self._proc
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(timeout)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(timeout)
            if proc.stdout is not None:
                proc.stdout.close()
            self._proc = None
        if self._log is not None:
            self._log.close()
            self._log = None

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main())
