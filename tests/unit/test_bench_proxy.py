"""bench.proxy: the first byte of every response is held back, and bandwidth is capped.

Timing assertions are lower bounds only (a loaded machine can only make things slower).
"""

from __future__ import annotations

import asyncio
import time

import pytest

from bench.proxy import Proxy, ProxyProcess, parse_rate


async def _echo_server() -> asyncio.Server:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        finally:
            writer.close()

    return await asyncio.start_server(handle, "127.0.0.1", 0)


def _port(server: asyncio.Server) -> int:
    return int(server.sockets[0].getsockname()[1])


def test_every_response_is_delayed_and_in_order() -> None:
    delay = 0.05

    async def run() -> None:
        server = await _echo_server()
        async with server, Proxy([("127.0.0.1", _port(server))], delay=delay) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.ports[0])
            replies = []
            for i in range(3):
                line = f"request {i}\n".encode()
                start = time.monotonic()
                writer.write(line)
                await writer.drain()
                reply = await reader.readexactly(len(line))
                elapsed = time.monotonic() - start
                replies.append(reply)
                assert elapsed >= delay * 0.99, f"response {i} came after {elapsed:.4f}s"
            assert replies == [f"request {i}\n".encode() for i in range(3)]
            writer.close()
            await writer.wait_closed()
            stats = proxy.snapshot()[0]
            assert stats["connections"] == 1
            assert stats["responses"] == 3
            assert stats["bytes_up"] == stats["bytes_down"] == sum(len(r) for r in replies)

    asyncio.run(run())


def test_bandwidth_is_capped_per_connection() -> None:
    rate = 1024 * 1024  # 1 MiB/s
    payload = bytes(range(256)) * 1024  # 256 KiB

    async def run() -> None:
        server = await _echo_server()
        async with server, Proxy([("127.0.0.1", _port(server))], delay=0, bandwidth=rate) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.ports[0])
            start = time.monotonic()
            writer.write(payload)
            await writer.drain()
            got = await reader.readexactly(len(payload))
            elapsed = time.monotonic() - start
            writer.close()
            await writer.wait_closed()
            assert got == payload
            assert elapsed >= 0.95 * len(payload) / rate
            assert proxy.snapshot()[0]["bytes_down"] == len(payload)

    asyncio.run(run())


def test_half_close_is_forwarded() -> None:
    async def run() -> None:
        server = await _echo_server()
        async with server, Proxy([("127.0.0.1", _port(server))], delay=0.01) as proxy:
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.ports[0])
            writer.write(b"last words")
            writer.write_eof()
            assert await reader.read() == b"last words"
            writer.close()
            await writer.wait_closed()

    asyncio.run(run())


def test_proxy_process_counts_and_stops() -> None:
    async def run() -> None:
        server = await _echo_server()
        async with server:
            proxy = ProxyProcess([("127.0.0.1", _port(server))], delay_ms=20, bandwidth=0)
            await asyncio.to_thread(proxy.start)
            try:
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy.ports[0])
                start = time.monotonic()
                writer.write(b"hello\n")
                await writer.drain()
                assert await reader.readexactly(6) == b"hello\n"
                assert time.monotonic() - start >= 0.0198
                writer.close()
                await writer.wait_closed()
                stats = await asyncio.to_thread(proxy.reset)
                assert stats[0]["bytes_down"] == 6
                assert (await asyncio.to_thread(proxy.stats))[0]["bytes_down"] == 0
            finally:
                await asyncio.to_thread(proxy.stop)
            assert proxy._proc is None

    asyncio.run(run())


@pytest.mark.parametrize(
    ("text", "value"), [("0", 0.0), ("64M", 64 * 2**20), ("1.5k", 1536.0), ("10MiB", 10 * 2**20)]
)
def test_parse_rate(text: str, value: float) -> None:
    assert parse_rate(text) == value
