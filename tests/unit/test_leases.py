"""The lease table (``coordinator/leases.py``) on a fake clock."""

from __future__ import annotations

import pytest

from fastcache.coordinator.leases import LeaseTable, attr_key, entry_key, list_key


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_keys() -> None:
    assert attr_key(7) == "attr:7"
    assert entry_key(1, "a b") == "entry:1:a b"
    assert list_key(3) == "list:3"


def test_term_must_be_positive() -> None:
    with pytest.raises(ValueError):
        LeaseTable(0)


def test_grant_and_expire(clock: Clock) -> None:
    t = LeaseTable(2.0, clock)
    assert t.grant("A", ["attr:1", "entry:1:x"]) == 102.0
    assert t.expiry("A", "attr:1") == 102.0
    assert t.held_by("A") == {"attr:1", "entry:1:x"}
    clock.now = 101.999
    assert [h.holder for h in t.holders(["attr:1"])] == ["A"]
    clock.now = 102.0  # expired at its expiry
    assert t.holders(["attr:1"]) == []
    assert t.expiry("A", "attr:1") is None
    assert t.held_by("A") == set()


def test_renew_by_use(clock: Clock) -> None:
    t = LeaseTable(2.0, clock)
    t.grant("A", ["attr:1"])
    clock.now = 101.5
    t.grant("A", ["attr:1"])
    clock.now = 103.0
    (held,) = t.holders(["attr:1"])
    assert held.expiries == {"attr:1": 103.5}
    assert held.deadline == 103.5


def test_holders_exclude_the_author_and_group_by_holder(clock: Clock) -> None:
    t = LeaseTable(2.0, clock)
    t.grant("A", ["entry:1:x", "list:1"])
    clock.now = 100.5
    t.grant("B", ["list:1"])
    t.grant("C", ["attr:9"])
    held = {h.holder: h for h in t.holders(["entry:1:x", "list:1", "attr:1"], exclude="B")}
    assert set(held) == {"A"}
    assert sorted(held["A"].keys) == ["entry:1:x", "list:1"]
    assert held["A"].deadline == 102.0
    both = {h.holder: h.deadline for h in t.holders(["list:1", "list:1"])}
    assert both == {"A": 102.0, "B": 102.5}


def test_drop_keeps_a_lease_renewed_since(clock: Clock) -> None:
    t = LeaseTable(2.0, clock)
    t.grant("A", ["attr:1", "attr:2"])
    (held,) = t.holders(["attr:1", "attr:2"])
    clock.now = 100.5
    t.grant("A", ["attr:2"])  # renewed while the push was in flight: a newer answer
    t.drop("A", held.expiries)
    assert t.expiry("A", "attr:1") is None
    assert t.expiry("A", "attr:2") == 102.5
    assert t.held_by("A") == {"attr:2"}
    t.drop("A", {"attr:404": 1e9})  # unknown keys are ignored


def test_drop_holder_drops_everything_at_once(clock: Clock) -> None:
    t = LeaseTable(2.0, clock)
    t.grant("A", ["attr:1", "list:1", "entry:1:x"])
    t.grant("B", ["attr:1"])
    assert t.drop_holder("A") == 3
    assert [h.holder for h in t.holders(["attr:1", "list:1", "entry:1:x"])] == ["B"]
    assert t.drop_holder("A") == 0
    assert len(t) == 1


def test_sweep_forgets_expired_records(clock: Clock) -> None:
    t = LeaseTable(2.0, clock)
    t.grant("A", ["attr:1", "attr:2"])
    clock.now = 101.0
    t.grant("B", ["attr:2"])
    clock.now = 102.5
    assert t.sweep() == 2
    assert len(t) == 1
    assert t.held_by("A") == set()
    assert t.held_by("B") == {"attr:2"}
    clock.now = 200.0
    assert t.sweep() == 1
    assert len(t) == 0
    assert t.granted == 3 and t.dropped == 3
