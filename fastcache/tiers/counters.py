"""Counters the hit path bumps on many threads at once, without a lock.

Each thread adds to its own list of ints, made on its first count; reading sums the lists.
A lock is taken only to register a thread's list and to read. A sum read while threads count
may miss their last few counts, never more. The lists of threads that ended stay (so do their
counts): FUSE workers and executor threads live as long as the node.

Hot paths inline the lookup (``counts = local.counts``, ``AttributeError`` on a thread's
first count) rather than call a method: a frame costs as much as the count.
"""

from __future__ import annotations

import threading


class PerThread:
    """Named counters, one list of ints per thread, summed when read."""

    __slots__ = ("_lists", "_lock", "index", "local", "names")

    def __init__(self, *names: str) -> None:
        self.names = names
        self.index = {name: i for i, name in enumerate(names)}
        self.local = threading.local()  # .counts: this thread's list
        self._lists: list[list[int]] = []
        self._lock = threading.Lock()

    def mine(self) -> list[int]:
        """This thread's list (registered on first use)."""
        try:
            counts: list[int] = self.local.counts
        except AttributeError:
            counts = self.local.counts = [0] * len(self.names)
            with self._lock:
                self._lists.append(counts)
        return counts

    def add(self, name: str, n: int = 1) -> None:
        self.mine()[self.index[name]] += n

    def totals(self) -> dict[str, int]:
        with self._lock:
            lists = list(self._lists)
        return {name: sum(c[i] for c in lists) for i, name in enumerate(self.names)}
