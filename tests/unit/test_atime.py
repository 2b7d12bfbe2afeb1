"""relatime's rule and the access-time batcher (no mount: a fake sender)."""

from __future__ import annotations

import asyncio

from fastcache.coordinator.model import MAX_ATIME_BATCH, InodeAttrs
from fastcache.errors import TierUnavailable
from fastcache.mount.atime import DAY_NS, AtimeBatcher, relatime_due


def attrs(atime: int, mtime: int, ctime: int) -> InodeAttrs:
    return InodeAttrs(
        ino=5, type="file", mode=0o644, uid=0, gid=0, size=1,
        atime_ns=atime, mtime_ns=mtime, ctime_ns=ctime, nlink=1,
    )  # fmt: skip


def test_relatime_rule() -> None:
    now = 10 * DAY_NS
    assert relatime_due(attrs(now - 5, now - 5, now - 9), now)  # atime == mtime
    assert relatime_due(attrs(now - 9, now - 5, now - 9), now)  # older than the write
    assert relatime_due(attrs(now - 9, now - 20, now - 5), now)  # older than ctime
    assert relatime_due(attrs(now - DAY_NS, now - 2 * DAY_NS, now - 2 * DAY_NS), now)
    assert not relatime_due(attrs(now - 9, now - 20, now - 20), now)  # read since, today


def test_batcher_keeps_the_latest_time_per_inode_and_splits_big_batches() -> None:
    sent: list[list[tuple[int, int]]] = []

    async def send(batch: list[tuple[int, int]]) -> int:
        sent.append(batch)
        return len(batch)

    async def main() -> None:
        b = AtimeBatcher(send)
        b.note(7, 100)
        b.note(7, 90)  # an older time never wins
        b.note(7, 120)
        for ino in range(10, 10 + MAX_ATIME_BATCH):
            b.note(ino, 5)
        assert b.latest(7, 110) == 120 and b.latest(7, 130) == 130
        await b.flush()
        assert [len(x) for x in sent] == [MAX_ATIME_BATCH, 1]
        assert (7, 120) in sent[0] + sent[1]
        assert b.pending() == 0 and b.sent == MAX_ATIME_BATCH + 1
        await b.flush()  # nothing new: nothing sent
        assert len(sent) == 2

    asyncio.run(main())


def test_a_failed_batch_is_counted_not_raised() -> None:
    async def send(batch: list[tuple[int, int]]) -> int:
        raise TierUnavailable("coordinator away")

    async def main() -> None:
        b = AtimeBatcher(send)
        b.note(1, 1)
        await b.flush()
        assert (b.failed, b.sent, b.pending()) == (1, 0, 0)

    asyncio.run(main())
