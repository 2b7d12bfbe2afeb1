"""Leases: which session caches which namespace key, and until when. Pure logic, no I/O.

A key names something a node may cache and answer from without asking:

- ``attr:<ino>``            an inode's attributes;
- ``entry:<parent>:<name>`` what a name in a directory resolves to, "does not exist" included;
- ``list:<ino>``            a directory's whole listing.

The coordinator grants a lease on a key to a session (a holder) for ``term`` seconds, renewed
by use. Before a change to a key is acknowledged, every other holder of an unexpired lease on
it is told (``session.py`` sends the push and waits for the ack or the expiry); then its
records are dropped with ``drop``. A session that goes away drops all of its leases at once.

The clock is monotonic and injectable, so the unit tests run on a fake one.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass

__all__ = ["DEFAULT_TERM", "Held", "LeaseTable", "attr_key", "entry_key", "list_key"]

DEFAULT_TERM = 2.0


def attr_key(ino: int) -> str:
    return f"attr:{ino}"


def entry_key(parent: int, name: str) -> str:
    return f"entry:{parent}:{name}"


def list_key(ino: int) -> str:
    return f"list:{ino}"


@dataclass
class Held:
    """What one holder holds of a set of changed keys: the keys, each with its expiry."""

    holder: Hashable
    expiries: dict[str, float]

    @property
    def keys(self) -> list[str]:
        return list(self.expiries)

    @property
    def deadline(self) -> float:
        """When the last of these leases runs out: waiting longer is never needed."""
        return max(self.expiries.values())


class LeaseTable:
    """Lease records by key and by holder; expired records are ignored and swept lazily."""

    def __init__(self, term: float = DEFAULT_TERM, clock: Callable[[], float] = time.monotonic):
        if not term > 0:
            raise ValueError("lease term must be positive")
        self.term = term
        self._clock = clock
        self._by_key: dict[str, dict[Hashable, float]] = {}
        self._by_holder: dict[Hashable, set[str]] = {}
        self.granted = 0  # counters for the coordinator's stats
        self.dropped = 0

    def __len__(self) -> int:
        return sum(len(h) for h in self._by_key.values())

    def grant(self, holder: Hashable, keys: Iterable[str]) -> float:
        """Grant (or renew) ``holder`` a lease on every key; the expiry (clock time)."""
        expiry = self._clock() + self.term
        mine = self._by_holder.setdefault(holder, set())
        for key in keys:
            self._by_key.setdefault(key, {})[holder] = expiry
            mine.add(key)
            self.granted += 1
        return expiry

    def expiry(self, holder: Hashable, key: str) -> float | None:
        """The unexpired lease's expiry, or ``None``."""
        exp = self._by_key.get(key, {}).get(holder)
        return exp if exp is not None and exp > self._clock() else None

    def holders(self, keys: Iterable[str], exclude: Hashable | None = None) -> list[Held]:
        """Every holder but ``exclude`` with an unexpired lease on any of ``keys``."""
        now = self._clock()
        found: dict[Hashable, Held] = {}
        for key in dict.fromkeys(keys):
            for holder, exp in self._by_key.get(key, {}).items():
                if exp > now and holder != exclude:
                    held = found.get(holder)
                    if held is None:
                        held = found[holder] = Held(holder, {})
                    held.expiries[key] = exp
        return list(found.values())

    def drop(self, holder: Hashable, expiries: dict[str, float]) -> None:
        """Drop ``holder``'s records on these keys, unless renewed since (a later expiry)."""
        mine = self._by_holder.get(holder)
        for key, seen in expiries.items():
            records = self._by_key.get(key)
            if records is None:
                continue
            exp = records.get(holder)
            if exp is not None and exp <= seen:
                del records[holder]
                self.dropped += 1
                if mine is not None:
                    mine.discard(key)
                if not records:
                    del self._by_key[key]

    def drop_holder(self, holder: Hashable) -> int:
        """A session went away: forget all its leases at once; how many there were."""
        keys = self._by_holder.pop(holder, set())
        for key in keys:
            records = self._by_key.get(key)
            if records is not None and records.pop(holder, None) is not None:
                self.dropped += 1
                if not records:
                    del self._by_key[key]
        return len(keys)

    def sweep(self) -> int:
        """Forget every expired record; how many went."""
        now = self._clock()
        gone = 0
        for key in list(self._by_key):
            records = self._by_key[key]
            for holder in [h for h, exp in records.items() if exp <= now]:
                del records[holder]
                mine = self._by_holder.get(holder)
                if mine is not None:
                    mine.discard(key)
                    if not mine:
                        del self._by_holder[holder]
                gone += 1
            if not records:
                del self._by_key[key]
        self.dropped += gone
        return gone

    def held_by(self, holder: Hashable) -> set[str]:
        """The keys ``holder`` has unexpired leases on."""
        now = self._clock()
        return {
            k
            for k in self._by_holder.get(holder, ())
            if self._by_key.get(k, {}).get(holder, 0) > now
        }
