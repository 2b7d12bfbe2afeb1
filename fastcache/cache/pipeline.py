"""Chunker → hash → store: the one write pipeline, for whole buffers (``write_bytes``) and
for streams (``ChunkWriter``), used by the client API and by CDC commits of the mount.

Chunks are cut fixed-size or by content (FastCDC), hashed (xxh3-128; large buffers on a
thread, not on the loop) and handed to ``store`` (the write-back's ``write_chunk``) with
at most ``concurrency`` chunks in flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import numpy as np

from fastcache.chunks import (
    Buffer,
    CdcParams,
    Manifest,
    digest,
    digest_chunks,
    split_cdc,
    split_fixed,
)
from fastcache.tiers.base import HASH_OFFLOAD

Store = Callable[[str, Buffer], Awaitable[None]]


class ChunkPipeline:
    """Splits, hashes and stores; ``writer()`` streams, ``write_bytes`` takes a whole buffer."""

    def __init__(
        self, chunk_size: int, cdc: CdcParams | None, concurrency: int, store: Store
    ) -> None:
        self.chunk_size = chunk_size
        self.cdc = cdc
        self.concurrency = concurrency
        self.store = store

    def writer(self) -> ChunkWriter:
        """A streaming writer (bounded memory) producing the same manifest as ``write_bytes``."""
        return ChunkWriter(self)

    async def write_bytes(self, data: Buffer) -> Manifest:
        """Split, hash (one batched call) and store the chunks of ``data`` (parallel, bounded)."""
        view = memoryview(data).cast("B")
        ends = self._split(view)
        names = await self._hash_many(view, ends)
        bounds = ends.tolist()
        lengths: list[int] = []
        unique: dict[str, tuple[int, int]] = {}
        start = 0
        for name, end in zip(names, bounds, strict=True):
            lengths.append(end - start)
            unique.setdefault(name, (start, end))
            start = end
        room = asyncio.Semaphore(self.concurrency)

        async def one(name: str, lo: int, hi: int) -> None:
            async with room:
                await self.store(name, view[lo:hi])

        async with asyncio.TaskGroup() as group:
            for name, (lo, hi) in unique.items():
                group.create_task(one(name, lo, hi))
        return Manifest(
            size=len(view),
            chunk_size=self.chunk_size,
            chunks=names,
            lengths=None if self.cdc is None else lengths,
        )

    async def hash(self, data: Buffer) -> str:
        if len(data) <= HASH_OFFLOAD:
            return digest(data)
        return await asyncio.get_running_loop().run_in_executor(None, digest, data)

    def _split(self, view: memoryview) -> np.ndarray:
        if self.cdc is None:
            return split_fixed(len(view), self.chunk_size)
        return split_cdc(view, self.cdc, final=True)

    async def _hash_many(self, data: memoryview, ends: np.ndarray) -> list[str]:
        if not len(ends):
            return []
        if len(data) <= HASH_OFFLOAD:
            return digest_chunks(data, ends)
        return await asyncio.get_running_loop().run_in_executor(None, digest_chunks, data, ends)


class ChunkWriter:
    """Streams a file into chunks: ``await w.write(piece)``…, ``manifest = await w.finish()``.

    Pieces may have any size. At most ``concurrency`` chunks are being hashed and stored at
    once; ``write`` waits for room, so memory stays near ``(concurrency + 1) * chunk_size``
    (plus one CDC window). ``abort`` cancels.
    """

    def __init__(self, pipeline: ChunkPipeline) -> None:
        self._pipeline = pipeline
        self._chunk_size = pipeline.chunk_size
        self._cdc = pipeline.cdc
        # CDC: cut when the buffer holds enough that every cut but the tail is final.
        self._window = 2 * self._cdc.max if self._cdc is not None else self._chunk_size
        self._buf = bytearray()
        self._digests: list[str] = []
        self._lengths: list[int] = []
        self._size = 0
        self._room = asyncio.Semaphore(pipeline.concurrency)
        self._tasks: set[asyncio.Task[None]] = set()
        self._error: BaseException | None = None
        self._state = "open"

    async def write(self, data: Buffer) -> None:
        """Add ``data`` to the file; may wait for earlier chunks to be written."""
        self._check()
        view = memoryview(data).cast("B")
        self._size += len(view)
        if self._cdc is not None:
            self._buf += view
            if len(self._buf) >= self._window:
                await self._cut_cdc(final=False)
            return
        size = self._chunk_size
        while view:
            if not self._buf and len(view) >= size:
                await self._dispatch(bytes(view[:size]))
                view = view[size:]
                continue
            take = min(size - len(self._buf), len(view))
            self._buf += view[:take]
            view = view[take:]
            if len(self._buf) == size:
                chunk, self._buf = self._buf, bytearray()
                await self._dispatch(chunk)

    async def finish(self) -> Manifest:
        """Write the tail, wait for every chunk; the file's manifest."""
        self._check()
        if self._cdc is not None:
            await self._cut_cdc(final=True)
        elif self._buf:
            chunk, self._buf = self._buf, bytearray()
            await self._dispatch(chunk)
        if self._tasks:
            await asyncio.wait(set(self._tasks))
        self._check()
        self._state = "finished"
        return Manifest(
            size=self._size,
            chunk_size=self._chunk_size,
            chunks=list(self._digests),
            lengths=None if self._cdc is None else list(self._lengths),
        )

    async def abort(self) -> None:
        """Cancel what is in flight and drop the buffer. Chunks already written stay written."""
        self._state = "aborted"
        self._buf = bytearray()
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(set(self._tasks))

    # --- internals -------------------------------------------------------------------------
    def _check(self) -> None:
        if self._error is not None:
            raise self._error
        if self._state != "open":
            raise RuntimeError(f"writer is {self._state}")

    async def _cut_cdc(self, final: bool) -> None:
        assert self._cdc is not None
        if not self._buf:
            return
        buf = self._buf
        ends = split_cdc(buf, self._cdc, final=final)
        if not len(ends):
            return
        view = memoryview(buf)
        chunks = []
        start = 0
        for end in ends.tolist():
            chunks.append(bytes(view[start:end]))
            start = end
        view.release()
        del buf[:start]
        for chunk in chunks:
            await self._dispatch(chunk)
        chunks.clear()

    async def _dispatch(self, chunk: bytes | bytearray) -> None:
        await self._room.acquire()
        if self._error is not None or self._state != "open":
            self._room.release()
            self._check()
        index = len(self._digests)
        self._digests.append("")
        self._lengths.append(len(chunk))
        task = asyncio.get_running_loop().create_task(self._write_one(index, chunk))
        self._tasks.add(task)
        task.add_done_callback(self._task_done)

    async def _write_one(self, index: int, chunk: bytes | bytearray) -> None:
        try:
            name = await self._pipeline.hash(chunk)
            self._digests[index] = name
            await self._pipeline.store(name, chunk)
        finally:
            self._room.release()

    def _task_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is not None and self._error is None:
            self._error = exc
