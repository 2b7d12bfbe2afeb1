"""Zero-copy file answers: a chunk file pushed into the socket with ``os.sendfile``."""

from __future__ import annotations

import asyncio
import os
import select
from concurrent.futures import Executor

from aiohttp import web

SEND_TIMEOUT = 30.0  # seconds a peer may leave its receive window shut before we give up


async def send_file(
    request: web.Request, path: str, size: int, pool: Executor
) -> web.StreamResponse | None:
    """Answer 200 with the first ``size`` bytes of ``path`` through ``os.sendfile`` on the
    connection's socket: the body never enters this process (uvloop has no
    ``loop.sendfile``, and aiohttp's fallback reads the file into memory in pieces).

    ``None``, before anything is sent, when this cannot work (TLS, no socket, the file is
    gone): the caller answers the usual way. A body cut short (the file shrank, the peer
    went away) closes the connection, so the peer sees an error, never a short body.
    """
    transport = request.transport
    if transport is None or transport.get_extra_info("sslcontext") is not None:
        return None
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    loop = asyncio.get_running_loop()
    try:
        fd = await loop.run_in_executor(pool, os.open, path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        resp = web.StreamResponse(status=200)
        resp.content_length = size
        resp.content_type = "application/octet-stream"
        await resp.prepare(request)
        await resp.write(b"")  # aiohttp holds headers back for the first body write
        if transport.get_write_buffer_size():  # must be on the wire before the body
            await resp.write(await loop.run_in_executor(pool, os.pread, fd, size, 0))
            await resp.write_eof()
            return resp
        sent = await loop.run_in_executor(pool, _sendfile_all, sock.fileno(), fd, size)
        if sent != size:
            transport.close()
    except OSError:
        transport.close()
        return resp
    finally:
        os.close(fd)
    await resp.write_eof()
    return resp


def _sendfile_all(sock_fd: int, fd: int, size: int) -> int:
    """``os.sendfile`` until ``size`` bytes went (or the file ends); waits out a full socket
    buffer (the socket is non-blocking: the event loop owns it)."""
    sent = 0
    poller = select.poll()
    poller.register(sock_fd, select.POLLOUT)
    while sent < size:
        try:
            n = os.sendfile(sock_fd, fd, sent, size - sent)
        except BlockingIOError:
            if not poller.poll(SEND_TIMEOUT * 1000):
                raise TimeoutError("peer stopped reading") from None
            continue
        if n == 0:
            break
        sent += n
    return sent
