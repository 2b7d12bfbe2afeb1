"""The write-back journal: replay, torn records, compaction, group commit."""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest

from fastcache.chunks import digest
from fastcache.journal import (
    JOURNAL_NAME,
    Journal,
    decode_record,
    encode_record,
    replay_file,
)

T = TypeVar("T")


def run(coro: Coroutine[Any, Any, T]) -> T:
    return asyncio.run(asyncio.wait_for(coro, 30))


def names(n: int, tag: str = "") -> list[str]:
    return [digest(f"{tag}{i}".encode()) for i in range(n)]


def test_record_round_trip_and_damage() -> None:
    d = names(1)[0]
    line = encode_record("add", d)
    assert line.endswith(b"\n")
    assert decode_record(line[:-1]) == ("add", d)
    assert decode_record(encode_record("done", d)[:-1]) == ("done", d)
    flipped = bytearray(line[:-1])
    flipped[6] ^= 0x01  # a digest char: the checksum no longer matches
    assert decode_record(bytes(flipped)) is None
    assert decode_record(line[:-5]) is None
    assert decode_record(b"") is None
    assert decode_record(b"garbage") is None


def test_replay_of_add_and_done(tmp_path: Path) -> None:
    a, b, c = names(3)

    async def main() -> None:
        j = await Journal.open(tmp_path)
        await j.add(a)
        await j.add(b)
        await j.add(c)
        await j.done(b)
        assert j.pending == {a, c}
        await j.close()
        again = await Journal.open(tmp_path)
        assert again.pending == {a, c}
        await again.done(a)
        await again.add(b)  # re-added after done: pending again
        await again.close()
        third = await Journal.open(tmp_path)
        assert third.pending == {b, c}
        await third.close()

    run(main())


def test_torn_last_line_is_ignored_and_not_glued_to_new_records(tmp_path: Path) -> None:
    a, b, c = names(3, "torn")
    path = tmp_path / JOURNAL_NAME
    path.write_bytes(encode_record("add", a) + encode_record("add", b)[:20])
    pending, damaged = replay_file(path)
    assert pending == {a}
    assert damaged == 1

    async def main() -> None:
        j = await Journal.open(tmp_path)
        assert j.pending == {a}
        await j.add(c)  # appended after the torn tail was dropped by the open-time rewrite
        await j.close()

    run(main())
    assert replay_file(path) == ({a, c}, 0)


def test_damaged_record_in_the_middle_is_skipped(tmp_path: Path) -> None:
    a, b = names(2, "mid")
    path = tmp_path / JOURNAL_NAME
    bad = bytearray(encode_record("add", b))
    bad[10] ^= 0x02
    path.write_bytes(encode_record("add", a) + bytes(bad))
    assert replay_file(path) == ({a}, 1)


def test_missing_file_is_an_empty_journal(tmp_path: Path) -> None:
    assert replay_file(tmp_path / "nope") == (set(), 0)

    async def main() -> None:
        j = await Journal.open(tmp_path / "sub" / "dir")
        assert j.pending == frozenset()
        await j.close()

    run(main())
    assert (tmp_path / "sub" / "dir" / JOURNAL_NAME).exists()


def test_compaction_keeps_exactly_the_pending_set(tmp_path: Path) -> None:
    all_names = names(200, "c")
    keep = set(all_names[::7])

    async def main() -> None:
        j = await Journal.open(tmp_path, compact_after=50)
        for name in all_names:
            await j.add(name)
        for name in all_names:
            if name not in keep:
                await j.done(name)
        assert j.compactions >= 2  # once at open, then on the done count
        assert j.pending == keep
        await j.close()

    run(main())
    lines = (tmp_path / JOURNAL_NAME).read_bytes().splitlines()
    # Compacted: far fewer lines than the 200 adds + ~170 dones appended.
    assert len(lines) < 200
    assert replay_file(tmp_path / JOURNAL_NAME) == (keep, 0)
    assert not (tmp_path / (JOURNAL_NAME + ".new")).exists()


def test_group_commit_batches_concurrent_adds(tmp_path: Path) -> None:
    many = names(500, "g")

    async def main() -> None:
        j = await Journal.open(tmp_path)
        await asyncio.gather(*(j.add(name) for name in many))
        assert j.pending == set(many)
        # 500 concurrent adds, each acknowledged only after a sync that covers it; far
        # fewer syncs than adds means they were committed in groups.
        assert 1 <= j.fsyncs < 100
        await j.close()

    run(main())
    assert replay_file(tmp_path / JOURNAL_NAME) == (set(many), 0)


def test_add_is_durable_when_acknowledged(tmp_path: Path) -> None:
    """Every add acknowledged before a 'crash' (no close) is in the file."""
    many = names(50, "d")

    async def main() -> list[str]:
        j = await Journal.open(tmp_path)
        acked: list[str] = []

        async def one(name: str) -> None:
            await j.add(name)
            acked.append(name)

        await asyncio.gather(*(one(n) for n in many))
        # No close(): read the file as a restarted process would.
        pending, _ = replay_file(tmp_path / JOURNAL_NAME)
        assert set(acked) <= pending
        await j.close()
        return acked

    assert len(run(main())) == len(many)


def test_re_adding_a_pending_digest_writes_nothing(tmp_path: Path) -> None:
    a = names(1, "dup")[0]

    async def main() -> None:
        j = await Journal.open(tmp_path)
        await asyncio.gather(j.add(a), j.add(a), j.add(a))
        await j.add(a)
        await j.close()

    run(main())
    assert (tmp_path / JOURNAL_NAME).read_bytes().count(b"add ") == 1


def test_closed_journal_refuses_writes(tmp_path: Path) -> None:
    async def main() -> None:
        j = await Journal.open(tmp_path)
        await j.close()
        await j.close()  # idempotent
        with pytest.raises(RuntimeError):
            await j.add(names(1)[0])

    run(main())


def test_journal_writes_do_not_run_on_the_loop_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    real_fsync = os.fsync

    def spy(fd: int) -> None:
        seen.append(threading.current_thread().name)
        real_fsync(fd)

    async def main() -> None:
        j = await Journal.open(tmp_path)
        monkeypatch.setattr(os, "fsync", spy)
        await j.add(names(1, "thread")[0])
        await j.close()

    run(main())
    assert seen
    assert all(name.startswith("fastcache-journal") for name in seen)
