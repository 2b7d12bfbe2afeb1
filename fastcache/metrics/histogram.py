"""Latency histograms filled on many threads at once, without a lock.

Like ``tiers.counters.PerThread``: each thread adds to its own list of ints (made on its
first observation); a scrape sums the lists. One list holds every named operation: per name
``len(BOUNDS) + 1`` bucket counts (not cumulative; the last is +Inf), then the number of
timed calls, their sum in nanoseconds, the number of calls (timed or not) and bytes. A
sum read while threads count may miss their last few counts, never more.
"""

from __future__ import annotations

import threading
from bisect import bisect_left
from collections.abc import Iterable
from dataclasses import dataclass

# Upper bounds in seconds: a page-cache hit (tens of µs) up to an S3 retry storm.
BOUNDS: tuple[float, ...] = (
    0.00005,
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
_NB = len(BOUNDS) + 1
TIMED, SUM_NS, CALLS, BYTES = _NB, _NB + 1, _NB + 2, _NB + 3  # offsets after the buckets
WIDTH = _NB + 4


@dataclass(frozen=True)
class OpSnapshot:
    """One operation's sums: ``buckets`` per bound (not cumulative, +Inf last)."""

    buckets: list[int]
    timed: int
    sum_seconds: float
    calls: int
    bytes: int

    def cumulative(self) -> list[tuple[str, int]]:
        """``(le, count)`` pairs as Prometheus wants them, +Inf last."""
        out, total = [], 0
        for bound, n in zip((*map(str, BOUNDS), "+Inf"), self.buckets, strict=True):
            total += n
            out.append((bound, total))
        return out


class OpHistograms:
    """A latency histogram, a call count and a byte count per named operation.

    ``observe`` times a call; ``row()`` hands a hot path its thread's list, for counting a
    call without timing it (``row[base(i) + CALLS] += 1``)."""

    __slots__ = ("_bounds_ns", "_lock", "_rows", "index", "local", "names")

    def __init__(self, names: Iterable[str]) -> None:
        self.names = tuple(names)
        self.index = {name: i for i, name in enumerate(self.names)}
        self._bounds_ns = tuple(int(b * 1e9) for b in BOUNDS)
        self.local = threading.local()  # .row: this thread's list
        self._rows: list[list[int]] = []
        self._lock = threading.Lock()

    @staticmethod
    def base(index: int) -> int:
        """Where operation ``index``'s slots start in a row."""
        return index * WIDTH

    def row(self) -> list[int]:
        """This thread's list (registered on first use)."""
        try:
            row: list[int] = self.local.row
        except AttributeError:
            row = self.local.row = [0] * (WIDTH * len(self.names))
            with self._lock:
                self._rows.append(row)
        return row

    def observe(self, index: int, ns: int, nbytes: int = 0) -> None:
        """One call of operation ``index`` that took ``ns`` nanoseconds."""
        try:
            row: list[int] = self.local.row
        except AttributeError:
            row = self.row()
        base = index * WIDTH
        row[base + bisect_left(self._bounds_ns, ns)] += 1
        row[base + TIMED] += 1
        row[base + SUM_NS] += ns
        row[base + CALLS] += 1
        row[base + BYTES] += nbytes

    def snapshot(self) -> dict[str, OpSnapshot]:
        with self._lock:
            rows = list(self._rows)
        sums = [sum(col) for col in zip(*rows, strict=True)] if rows else []
        if not sums:
            sums = [0] * (WIDTH * len(self.names))
        out = {}
        for i, name in enumerate(self.names):
            s = sums[i * WIDTH : (i + 1) * WIDTH]
            out[name] = OpSnapshot(s[:_NB], s[TIMED], s[SUM_NS] / 1e9, s[CALLS], s[BYTES])
        return out
