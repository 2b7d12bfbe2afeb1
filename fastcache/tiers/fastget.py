"""A lean HTTP/1.1 client for chunk transfers: peer and S3 GETs, S3 PUTs.

A 4 MiB chunk through aiohttp's client costs ~5 ms of CPU (a ``bytes`` object per socket
read, the stream reader's bookkeeping, a final join), more than the transfer itself on
loopback; botocore's PUT costs more again (request building, a pool thread). Here a body
is received straight into one preallocated buffer (``asyncio.BufferedProtocol``: the event
loop ``recv_into``s it) and a request body is handed to the transport as it is, with
keep-alive connections pooled per server. Only what chunk endpoints answer is supported: a
status line, headers and a ``Content-Length`` body; anything else closes the connection
and fails the request (the caller treats it like any transport error).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Union
from urllib.parse import urlsplit

_HEAD_MAX = 64 * 1024  # status line and headers, at most
_IDLE_PER_PEER = 16  # keep-alive connections kept per peer
Body = Union[bytearray, memoryview]  # noqa: UP007 (a runtime alias)
Payload = Union[bytes, memoryview]  # noqa: UP007 (a request body: bytes or a read-only view)
Allocate = Callable[[int], Body]  # the body's buffer, given its Content-Length


class ProtocolError(ConnectionError):
    """The peer answered something this client does not speak (or cut the answer short)."""


class _Conn(asyncio.BufferedProtocol):
    """One connection; one request at a time."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._head = bytearray(_HEAD_MAX)
        self._head_len = 0
        self._allocate: Allocate = bytearray
        self._body: Body | None = None
        self._body_len = 0
        self._status = 0
        self._keep_alive = True
        self.headers_in: asyncio.Future[int] | None = None  # → status
        self.done: asyncio.Future[Body] | None = None  # → body
        self.closed = False

    # --- the request side ------------------------------------------------------------------
    def start(self, request: bytes, allocate: Allocate = bytearray, body: Payload = b"") -> None:
        loop = asyncio.get_running_loop()
        self._allocate = allocate
        self._head_len = 0
        self._body = None
        self._body_len = 0
        self.headers_in = loop.create_future()
        self.done = loop.create_future()
        assert self.transport is not None
        self.transport.write(request)
        if body:
            self.transport.write(body)  # kept by reference until sent, not copied

    @property
    def reusable(self) -> bool:
        return not self.closed and self._keep_alive

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    # --- asyncio.BufferedProtocol ----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._body is not None:
            return memoryview(self._body)[self._body_len :]
        if self._head_len >= _HEAD_MAX:  # headers too large: the next update fails it
            return memoryview(bytearray(1 << 16))
        return memoryview(self._head)[self._head_len :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._body is not None:
            self._body_len += nbytes
            self._body_progress()
            return
        if self.done is None or self.done.done():  # bytes nobody asked for
            self._fail(ProtocolError("unexpected data from peer"))
            return
        self._head_len += nbytes
        end = self._head.find(b"\r\n\r\n", 0, self._head_len)
        if end < 0:
            if self._head_len >= _HEAD_MAX:
                self._fail(ProtocolError("response headers too large"))
            return
        try:
            status, length, keep_alive = _parse_head(bytes(self._head[:end]))
        except ValueError as exc:
            self._fail(ProtocolError(f"bad response from peer: {exc}"))
            return
        self._status, self._keep_alive = status, keep_alive
        extra = self._head_len - (end + 4)
        if extra > length:
            self._fail(ProtocolError("more data than Content-Length"))
            return
        body = self._body = self._allocate(length) if status == 200 else bytearray(length)
        memoryview(body)[:extra] = memoryview(self._head)[end + 4 : self._head_len]
        self._body_len = extra
        if self.headers_in is not None and not self.headers_in.done():
            self.headers_in.set_result(status)
        self._body_progress()

    def _body_progress(self) -> None:
        assert self._body is not None
        if self._body_len < len(self._body):
            return
        body, self._body = self._body, None
        if self.done is not None and not self.done.done():
            self.done.set_result(body)

    def eof_received(self) -> bool | None:
        self._fail(ProtocolError("peer closed the connection"))
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(exc if exc is not None else ProtocolError("connection lost"))

    def _fail(self, exc: BaseException) -> None:
        for fut in (self.headers_in, self.done):
            if fut is not None and not fut.done():
                fut.set_exception(exc)
                fut.exception()  # the caller may be gone already: no "never retrieved"
        self.close()


def _parse_head(head: bytes) -> tuple[int, int, bool]:
    """(status, Content-Length, keep-alive) of an HTTP/1.1 response head."""
    lines = head.split(b"\r\n")
    parts = lines[0].split(b" ", 2)
    if len(parts) < 2 or not parts[0].startswith(b"HTTP/1."):
        raise ValueError("not an HTTP/1.x status line")
    status = int(parts[1])
    length: int | None = None
    keep_alive = parts[0] == b"HTTP/1.1"
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        key = name.strip().lower()
        if key == b"content-length":
            length = int(value.strip())
        elif key == b"transfer-encoding":
            raise ValueError("chunked transfer encoding")
        elif key == b"connection":
            keep_alive = value.strip().lower() == b"keep-alive"
    if length is None or length < 0:
        raise ValueError("no Content-Length")
    return status, length, keep_alive


class FastGet:
    """``await request(method, base_url, path, headers, body, ...)`` → (status, body).
    Loop-bound; ``close()``."""

    def __init__(self) -> None:
        self._idle: dict[tuple[str, int], list[_Conn]] = {}
        self._closed = False

    @staticmethod
    def supports(base_url: str) -> bool:
        parts = urlsplit(base_url)
        return parts.scheme == "http" and parts.hostname is not None

    async def request(
        self,
        method: str,
        base_url: str,
        path: str,
        headers: Mapping[str, str],
        body: Payload = b"",
        *,
        connect_timeout: float,
        first_byte_timeout: float | None,
        read_timeout: float,
        on_headers: Callable[[int], None] | None = None,
        allocate: Allocate = bytearray,
    ) -> tuple[int, Body]:
        """``method`` (an idempotent one: GET, PUT) ``base_url + path`` with ``body`` (sent
        with its ``Content-Length``). ``first_byte_timeout`` bounds the wait for the status
        line (sending the body included), ``read_timeout`` the answer's body after it;
        ``on_headers(status)`` runs in between. ``allocate(length)`` gives the buffer a 200's
        body is received into (a bytearray by default; other answers always get one).
        Transport failures raise ``OSError`` (``ConnectionError``, ``TimeoutError``). A
        kept-alive connection the server closed meanwhile is retried once on a new one."""
        parts = urlsplit(base_url)
        host, port = parts.hostname or "", parts.port or 80
        target = (parts.path.rstrip("/") + path).encode()
        lines = [method.encode() + b" " + target + b" HTTP/1.1", b"Host: " + parts.netloc.encode()]
        lines += [f"{k}: {v}".encode() for k, v in headers.items()]
        if body or method != "GET":
            lines.append(b"Content-Length: %d" % len(body))
        request = b"\r\n".join(lines) + b"\r\n\r\n"
        key = (host, port)
        conn = self._take(key)
        reused = conn is not None
        if conn is None:
            conn = await self._connect(host, port, connect_timeout)
        ok = False
        try:
            conn.start(request, allocate, body)
            assert conn.headers_in is not None and conn.done is not None
            try:
                async with asyncio.timeout(first_byte_timeout):
                    status = await asyncio.shield(conn.headers_in)
            except ConnectionError:
                if not reused:
                    raise
                conn.close()  # closed by the peer while idle: once more, on a new one
                conn = await self._connect(host, port, connect_timeout)
                conn.start(request, allocate, body)
                assert conn.headers_in is not None and conn.done is not None
                async with asyncio.timeout(first_byte_timeout):
                    status = await asyncio.shield(conn.headers_in)
            if on_headers is not None:
                on_headers(status)
            async with asyncio.timeout(read_timeout):
                answer = await asyncio.shield(conn.done)
            ok = True
            if body and status >= 300:
                conn.close()  # the server may have answered before reading all of the body
            return status, answer
        finally:
            if ok and conn.reusable and not self._closed:
                self._idle.setdefault(key, []).append(conn)
                self._trim(key)
            else:  # cancelled or failed mid-answer: the connection's state is unknown
                conn.close()

    @staticmethod
    async def _connect(host: str, port: int, timeout: float) -> _Conn:
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            _, conn = await loop.create_connection(_Conn, host, port)
        return conn

    def _take(self, key: tuple[str, int]) -> _Conn | None:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()
            if conn.reusable and conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    def _trim(self, key: tuple[str, int]) -> None:
        idle = self._idle[key]
        while len(idle) > _IDLE_PER_PEER:
            idle.pop(0).close()

    def close(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()
