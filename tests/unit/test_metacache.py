"""``MetaCache``: attributes with an expiry, entries, and complete directories."""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from fastcache.mount.metacache import MetaCache


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@dataclass
class A:
    ino: int
    version: int = 0
    size: int = 0
    manifest: dict[str, Any] | None = None
    atime_ns: int = 0


def test_attrs_expire_and_never_go_back_in_version() -> None:
    clock = Clock()
    m = MetaCache(1.0, clock)
    m.put(A(5, version=2))
    assert m.put(A(5, version=1)).version == 2
    clock.now += 1.0
    assert m.get(5) is None


def test_a_complete_directory_answers_negative_lookups_until_its_ttl() -> None:
    clock = Clock()
    m = MetaCache(1.0, clock, negative_ttl=1.0)
    assert not m.absent(1, "x")  # unknown directory: ask the coordinator
    m.complete(1, version=0)
    assert m.absent(1, "x")
    m.bind(1, "x", 7)
    m.remember(7)
    assert not m.absent(1, "x")
    clock.now += 0.9
    m.changed(1, before=0, after=1)  # our own create, nobody else's in between: refreshed
    clock.now += 0.9
    assert m.absent(1, "y")
    clock.now += 0.2
    assert not m.absent(1, "y")  # one ttl after the last confirmation


def test_a_version_gap_or_a_forgotten_entry_ends_completeness() -> None:
    m = MetaCache(10.0, Clock(), negative_ttl=10.0)
    m.complete(1, version=3)
    m.changed(1, before=4, after=5)  # another node changed it in between
    assert not m.absent(1, "y")
    m.complete(2, version=0)
    m.bind(2, "x", 9)
    m.remember(9)
    m.forget(9, 1)  # the kernel forgot the inode: the name is still known to exist
    assert not m.absent(2, "x")
    m.complete(3, version=0)
    m.changed(3, before=0, after=None)  # an answer without versions
    assert not m.absent(3, "z")
    m.complete(4, version=0)
    m.incomplete(4)
    assert not m.absent(4, "z")


def test_negative_answers_are_off_by_default() -> None:
    m = MetaCache(1.0, Clock())
    m.complete(1, version=0)
    assert not m.absent(1, "x")  # --negative-timeout 0: always ask the coordinator


def test_a_forgotten_inode_is_still_answered_until_its_ttl() -> None:
    """``drop_caches`` makes the kernel forget every inode; a stat right after stays local."""
    clock = Clock()
    m = MetaCache(1.0, clock)
    m.put(A(9, version=3))
    m.bind(1, "x", 9)
    m.remember(9)
    m.forget(9, 1)
    assert m.lookups(9) == 0
    assert m.entry(1, "x") == 9
    assert m.get(9) == A(9, version=3)
    clock.now += 1.0
    assert m.entry(1, "x") is None  # entries expire with the attributes
    assert m.get(9) is None


def test_forgotten_page_cache_version_is_dropped() -> None:
    m = MetaCache(1.0, Clock())
    m.remember(9)
    m.data_changed(9, 1)
    m.forget(9, 1)
    assert not m.data_changed(9, 2)  # the kernel has no pages of it any more


def test_expired_items_are_swept_once_the_cache_grows() -> None:
    import fastcache.mount.metacache as metacache

    clock = Clock()
    m = MetaCache(1.0, clock, negative_ttl=10.0)
    m.complete(1, version=0)
    for ino in range(10, 20):
        m.put(A(ino))
        m.bind(1, f"n{ino}", ino)
    clock.now += 2.0
    assert m.absent(1, "other")
    m._sweep_at = 0  # as if SWEEP_AT were reached
    m.put(A(99))
    assert len(m) == 1
    assert m._entries == {}
    assert not m.absent(1, "other")  # entries swept: the directory is no longer known whole
    assert m._sweep_at == metacache.SWEEP_AT


def test_leased_items_live_until_their_deadline_and_die_when_invalidated() -> None:
    clock = Clock()
    m = MetaCache(1.0, clock)
    m.put(A(7), until=clock.now + 5)  # type: ignore[arg-type]
    m.bind(1, "f", 7, until=clock.now + 5)
    m.deny(1, "ghost", until=clock.now + 5)
    clock.now += 3  # past the ttl, within the lease
    assert m.get(7) is not None and m.entry(1, "f") == 7 and m.denied(1, "ghost")
    inodes, entries = m.drop(["attr:7", "entry:1:ghost", "list:9"])
    assert inodes == [7] and entries == [(1, "ghost")]
    assert m.get(7) is None and not m.denied(1, "ghost")
    assert m.entry(1, "f") == 7  # not named: kept
    clock.now += 3
    assert m.entry(1, "f") is None  # the lease ran out


def test_a_bind_replaces_a_denial_and_clear_forgets_everything() -> None:
    clock = Clock()
    m = MetaCache(1.0, clock)
    m.deny(1, "n", until=clock.now + 5)
    m.bind(1, "n", 3)
    assert not m.denied(1, "n") and m.entry(1, "n") == 3
    m.put(A(3))  # type: ignore[arg-type]
    m.listed(1, until=clock.now + 5)
    inodes, entries = m.clear()
    assert inodes == [3] and entries == [(1, "n")]
    assert m.entry(1, "n") is None and not m.is_listed(1)


def test_a_leased_listing_answers_missing_names_until_it_is_invalidated() -> None:
    clock = Clock()
    m = MetaCache(1.0, clock)
    m.bind(1, "there", 4, until=clock.now + 2)
    m.listed(1, until=clock.now + 2)
    assert m.absent(1, "missing") and not m.absent(1, "there")
    m.incomplete(1)  # this node renamed something into it: no longer known whole
    assert not m.absent(1, "missing")
    m.listed(1, until=clock.now + 2)
    m.drop(["list:1"])  # another node changed it
    assert not m.absent(1, "missing")
    m.listed(1, until=clock.now + 2)
    clock.now += 2
    assert not m.absent(1, "missing")  # the lease ran out


def test_leased_attributes_keep_their_manifest_and_lease() -> None:
    """What an open may use without asking: attributes on a lease that still runs. A
    listing's row (no manifest) of the same version keeps the manifest cached with it, and
    its lease when it comes without one; a newer version does not; a noted access time
    keeps the lease; a ttl answer is no lease."""
    clock = Clock()
    m = MetaCache(1.0, clock)
    full = A(5, version=3, size=10, manifest={"chunks": ["x"]})
    m.put(full)
    assert m.leased(5) is None  # ttl only
    m.put(A(5, version=3, size=10), until=clock.now + 30)  # the listing's row, leased
    held = m.leased(5)
    assert held is not None and held.manifest == full.manifest
    m.amend(replace(held, atime_ns=7))
    clock.now += 5.0  # past the ttl, within the lease
    held = m.leased(5)
    assert held is not None and held.atime_ns == 7 and held.manifest == full.manifest
    m.put(A(5, version=3, size=10, atime_ns=7))  # a listing's row of it, no lease: kept
    clock.now += 5.0
    held = m.leased(5)
    assert held is not None and held.manifest == full.manifest
    m.put(A(5, version=4, size=20), until=clock.now + 30)  # changed: no manifest to keep
    held = m.leased(5)
    assert held is not None and held.manifest is None
    m.put(A(5, version=5, size=20))  # newer, without a lease: asked for again
    assert m.leased(5) is None and m.get(5) is not None
    m.put(A(5, version=5, size=20), until=clock.now + 30)
    m.drop(["attr:5"])
    assert m.leased(5) is None
    m.put(full, until=clock.now + 30)
    clock.now += 31.0
    assert m.leased(5) is None  # the lease ran out
    m.put(full, until=clock.now + 30)
    m.clear()
    assert m.leased(5) is None
