"""The write-back journal: which chunks this node acknowledged that are not yet in S3, and
which manifest commits the coordinator has not yet acknowledged.

Chunks: one append-only file, ``<journal_dir>/pending.log``, of text records::

    add <digest> <xxh64 of "add <digest>", 16 hex>\\n
    done <digest> <xxh64 of "done <digest>", 16 hex>\\n

Replaying it in order (``add`` inserts, ``done`` removes) gives the pending set. A record whose
checksum does not match, or the last line when it has no newline, is a write torn by a crash
and is ignored.

Durability (DESIGN §1): a record is one ``write()`` into the page cache, which outlives a
SIGKILL of the process; it is not fsynced, because power loss is covered elsewhere: ``fsync``
returns only once the chunks are in S3, and after an unclean reboot the NVMe tier verifies
its chunks before trusting them. ``sync()`` forces the file to disk for callers that want it.

Every method is thread-safe (FUSE threads and the event loop both record chunks) and cheap:
one short ``write`` under a lock. When the file holds many ``done`` records it is compacted:
the pending set is written to a new file and renamed over the old one. Opening a journal
always compacts, which also drops a torn tail before anything is appended after it.

Manifests: ``PendingCommits`` keeps, per inode, the manifest a ``close`` could not commit
(coordinator unreachable) in ``<journal_dir>/commits/<ino>.json`` until the coordinator has
it, so a restart commits it again (see ``mount.files.FileTable``).
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from fastcache.chunks import is_digest, xxh64

log = logging.getLogger("fastcache.journal")

JOURNAL_NAME = "pending.log"
COMMITS_DIR = "commits"
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


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _fsync_dir(directory: Path) -> None:
    dfd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


class Journal:
    """The pending-upload journal of one NVMe directory (see the module docstring).

    ``Journal.open(dir)`` replays the file (blocking: call it off the event loop);
    ``pending`` is the replayed set, kept up to date by ``add``/``done``.
    """

    def __init__(self, directory: Path, compact_after: int) -> None:
        self.directory = directory
        self.path = directory / JOURNAL_NAME
        self.compact_after = compact_after
        self._lock = threading.Lock()
        self._pending: set[str] = set()
        self._fd = -1
        self._done_records = 0  # done records in the file since the last compaction
        self.writes = 0
        self.fsyncs = 0
        self.compactions = 0
        self.damaged_records = 0

    @classmethod
    def open(cls, directory: Path, *, compact_after: int = 4096) -> Journal:
        """Replay ``directory``'s journal (creating it if needed) and compact it."""
        journal = cls(Path(directory), compact_after)
        journal.directory.mkdir(parents=True, exist_ok=True)
        pending, damaged = replay_file(journal.path)
        journal.damaged_records = damaged
        if damaged:
            log.info("journal %s: ignored %d damaged record(s)", journal.path, damaged)
        journal._pending = pending
        with journal._lock:
            journal._compact_locked()
        return journal

    # --- the public surface ----------------------------------------------------------------
    @property
    def pending(self) -> frozenset[str]:
        """Digests added and not yet marked done."""
        with self._lock:
            return frozenset(self._pending)

    def __contains__(self, digest: object) -> bool:
        return digest in self._pending

    def __len__(self) -> int:
        return len(self._pending)

    def add(self, digest: str) -> bool:
        """Record ``digest`` as pending (one ``write``); ``False`` if it already was."""
        return bool(self.add_many((digest,)))

    def add_many(self, digests: Iterable[str]) -> list[str]:
        """Record every digest not yet pending with one ``write``; the ones added."""
        with self._lock:
            new = [d for d in dict.fromkeys(digests) if d not in self._pending]
            if not new:
                return []
            self._append_locked(b"".join(encode_record("add", d) for d in new))
            self._pending.update(new)
            return new

    def done(self, digest: str) -> None:
        """Record that ``digest`` is in S3 (a lost ``done`` only costs an idempotent upload)."""
        with self._lock:
            if digest not in self._pending:
                return
            self._append_locked(encode_record("done", digest))
            self._pending.discard(digest)
            self._done_records += 1
            if self._done_records >= self.compact_after:
                try:
                    self._compact_locked()
                except OSError as exc:
                    log.error("journal %s: compaction failed: %s", self.path, exc)

    def sync(self) -> None:
        """Force what was recorded to disk."""
        with self._lock:
            if self._fd >= 0:
                os.fsync(self._fd)
                self.fsyncs += 1

    def close(self) -> None:
        """Close the file. Idempotent; later calls raise."""
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    # --- under the lock ----------------------------------------------------------------------
    def _append_locked(self, data: bytes) -> None:
        if self._fd < 0:
            raise RuntimeError("journal is closed")
        _write_all(self._fd, data)
        self.writes += 1

    def _compact_locked(self) -> None:
        tmp = self.path.with_name(JOURNAL_NAME + ".new")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            _write_all(fd, b"".join(encode_record("add", d) for d in sorted(self._pending)))
            os.fsync(fd)  # rare (start, every compact_after uploads): a clean base to append to
        finally:
            os.close(fd)
        os.rename(tmp, self.path)
        _fsync_dir(self.directory)
        if self._fd >= 0:
            os.close(self._fd)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        self._done_records = 0
        self.compactions += 1


class PendingCommits:
    """Manifests acknowledged to a ``close`` but not yet to the coordinator, one file each.

    A record is a JSON object (``mount.files.FileTable`` decides its fields) written to a temp
    file and renamed into place: a reader sees the old record or the new one, never a mix.
    Thread-safe: one lock around the renames.
    """

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory) / COMMITS_DIR
        self.directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def _path(self, ino: int) -> Path:
        return self.directory / f"{int(ino)}.json"

    def put(self, ino: int, record: dict[str, Any]) -> None:
        data = json.dumps(record, separators=(",", ":")).encode()
        path = self._path(ino)
        tmp = path.with_suffix(".tmp")
        with self._lock:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
            try:
                _write_all(fd, data)
            finally:
                os.close(fd)
            os.rename(tmp, path)

    def remove(self, ino: int) -> None:
        with self._lock:
            try:
                self._path(ino).unlink()
            except FileNotFoundError:
                pass

    def load(self) -> dict[int, dict[str, Any]]:
        """Every record; damaged ones are logged and kept on disk for an operator."""
        out: dict[int, dict[str, Any]] = {}
        for path in sorted(self.directory.glob("*.json")):
            try:
                record = json.loads(path.read_bytes())
                out[int(path.stem)] = record
            except (OSError, ValueError) as exc:
                log.error("pending commit %s cannot be read (kept): %s", path, exc)
        return out
