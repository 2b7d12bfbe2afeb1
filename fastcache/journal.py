"""The write-back journal: which chunks are on NVMe but not yet in S3.

One append-only file, ``<journal_dir>/pending.log``, of text records::

    add <digest> <xxh64 of "add <digest>", 16 hex>\\n
    done <digest> <xxh64 of "done <digest>", 16 hex>\\n

Replaying it in order (``add`` inserts, ``done`` removes) gives the pending set. A record whose
checksum does not match, or the last line when it has no newline, is a write torn by a crash
and is ignored: such a record was never acknowledged, because an ``add`` is acknowledged only
after the fsync that covers it.

Writes run on one dedicated thread, never on the event loop. Concurrent ``add`` calls share
one fsync (group commit): while one batch is being written and synced, new records collect
into the next batch. ``done`` records are not fsynced on their own (losing one only means an
idempotent re-upload after a crash); they ride along with the next sync.

When the file holds many ``done`` records, it is compacted: the pending set is written to a
new file, fsynced, and renamed over the old one (then the directory is fsynced). Opening a
journal always compacts, which also drops a torn tail before anything is appended after it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from fastcache.chunks import is_digest, xxh64

log = logging.getLogger("fastcache.journal")

JOURNAL_NAME = "pending.log"
_OPS = (b"add", b"done")


def encode_record(op: str, digest: str) -> bytes:
    """One journal line, newline included."""
    body = f"{op} {digest}".encode()
    return body + f" {xxh64(body):016x}\n".encode()


def decode_record(line: bytes) -> tuple[str, str] | None:
    """``(op, digest)`` of a complete line (without its newline); ``None`` if it is damaged."""
    body, sep, check = line.rpartition(b" ")
    if not sep or len(check) != 16:
        return None
    try:
        if int(check, 16) != xxh64(body):
            return None
    except ValueError:
        return None
    op, sep, digest = body.partition(b" ")
    if not sep or op not in _OPS:
        return None
    text = digest.decode("ascii", "replace")
    if not is_digest(text):
        return None
    return op.decode(), text


def replay_file(path: Path) -> tuple[set[str], int]:
    """The pending set recorded in ``path`` and the number of damaged records skipped.

    Records stay in file order, so a ``done`` followed by a new ``add`` of the same digest
    leaves it pending. A missing file is an empty journal.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return set(), 0
    pending: dict[str, None] = {}
    damaged = 0
    lines = raw.split(b"\n")
    tail = lines.pop()  # b"" when the file ends with a newline, else a torn record
    if tail:
        damaged += 1
    for line in lines:
        record = decode_record(line)
        if record is None:
            damaged += 1
            continue
        op, digest = record
        if op == "add":
            pending[digest] = None
        else:
            pending.pop(digest, None)
    return set(pending), damaged


class Journal:
    """The pending-upload journal of one NVMe directory. Use from one event loop.

    ``await Journal.open(dir)`` replays the file; ``pending`` is the replayed set, kept up to
    date by ``add``/``done``.
    """

    def __init__(self, directory: Path, compact_after: int) -> None:
        self.directory = directory
        self.path = directory / JOURNAL_NAME
        self.compact_after = compact_after
        self._pending: dict[str, asyncio.Future[None] | None] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fastcache-journal")
        self._fd = -1
        self._done_records = 0  # done records in the file since the last compaction
        self._batch: list[bytes] = []
        self._batch_waiters: list[asyncio.Future[None]] = []
        self._batch_sync = False
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False
        self.fsyncs = 0
        self.compactions = 0
        self.damaged_records = 0

    @classmethod
    async def open(cls, directory: Path, *, compact_after: int = 4096) -> Journal:
        """Replay ``directory``'s journal (creating it if needed) and compact it."""
        journal = cls(Path(directory), compact_after)
        loop = asyncio.get_running_loop()
        try:
            pending, damaged = await loop.run_in_executor(journal._executor, journal._start)
        except BaseException:
            journal._executor.shutdown(wait=False)
            raise
        journal.damaged_records = damaged
        if damaged:
            log.info("journal %s: ignored %d damaged record(s)", journal.path, damaged)
        journal._pending = dict.fromkeys(pending)
        return journal

    # --- the public surface ----------------------------------------------------------------
    @property
    def pending(self) -> frozenset[str]:
        """Digests added and not yet marked done."""
        return frozenset(self._pending)

    def __contains__(self, digest: object) -> bool:
        return digest in self._pending

    def __len__(self) -> int:
        return len(self._pending)

    async def add(self, digest: str) -> None:
        """Record ``digest`` as pending; returns once the record is on disk (fsynced).

        Adding a digest that is already pending waits for its first record to be durable.
        """
        if digest in self._pending:
            durable = self._pending[digest]
            if durable is not None:
                await asyncio.shield(durable)
            return
        fut = self._append(encode_record("add", digest), sync=True)
        self._pending[digest] = fut
        try:
            await asyncio.shield(fut)
        except BaseException:
            if fut.done() and fut.exception() is not None and self._pending.get(digest) is fut:
                del self._pending[digest]
            raise
        if self._pending.get(digest) is fut:
            self._pending[digest] = None

    async def add_many(self, digests: Iterable[str]) -> None:
        """``add`` each digest; one group commit covers them all."""
        await asyncio.gather(*(self.add(d) for d in dict.fromkeys(digests)))

    async def done(self, digest: str) -> None:
        """Record that ``digest`` is in S3. Not fsynced by itself (a lost ``done`` is harmless)."""
        if digest not in self._pending:
            return
        # If its add is still being written, the done lands after it: batches keep order.
        del self._pending[digest]
        await asyncio.shield(self._append(encode_record("done", digest), sync=False))

    async def close(self) -> None:
        """Write and sync what is queued, then close the file. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self._flusher is not None:
            await asyncio.shield(self._flusher)
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._executor, self._close_fd)
        self._executor.shutdown(wait=True)

    # --- batching ----------------------------------------------------------------------------
    def _append(self, record: bytes, sync: bool) -> asyncio.Future[None]:
        if self._closed:
            raise RuntimeError("journal is closed")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        self._batch.append(record)
        self._batch_waiters.append(fut)
        self._batch_sync = self._batch_sync or sync
        if self._flusher is None:
            self._flusher = loop.create_task(self._flush_loop(), name="fastcache-journal-flush")
        return fut

    async def _flush_loop(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while self._batch:
                data = b"".join(self._batch)
                waiters, sync = self._batch_waiters, self._batch_sync
                dones = data.count(b"\ndone ") + data.startswith(b"done ")
                self._batch, self._batch_waiters, self._batch_sync = [], [], False
                try:
                    await loop.run_in_executor(self._executor, self._write, data, sync)
                except Exception as exc:
                    log.error("journal %s: write failed: %s", self.path, exc)
                    for fut in waiters:
                        if not fut.done():
                            fut.set_exception(exc)
                            fut.exception()  # retrieved here; awaiting callers re-raise it
                    continue
                for fut in waiters:
                    if not fut.done():
                        fut.set_result(None)
                self._done_records += dones
                if self._done_records >= self.compact_after and not self._batch:
                    snapshot = list(self._pending)
                    try:
                        await loop.run_in_executor(self._executor, self._compact, snapshot)
                    except OSError as exc:
                        log.error("journal %s: compaction failed: %s", self.path, exc)
        finally:
            self._flusher = None

    # --- on the journal thread ---------------------------------------------------------------
    def _start(self) -> tuple[set[str], int]:
        self.directory.mkdir(parents=True, exist_ok=True)
        pending, damaged = replay_file(self.path)
        self._compact(sorted(pending))
        return pending, damaged

    def _write(self, data: bytes, sync: bool) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]
        if sync:
            os.fsync(self._fd)
            self.fsyncs += 1

    def _compact(self, pending: list[str]) -> None:
        tmp = self.path.with_name(JOURNAL_NAME + ".new")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            data = b"".join(encode_record("add", d) for d in pending)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        os.rename(tmp, self.path)
        dfd = os.open(self.directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        self._close_fd()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND)
        self._done_records = 0
        self.compactions += 1

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
