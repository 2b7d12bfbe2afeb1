"""The node-side metadata cache: inode attributes, directory entries and lookup counts.

The kernel caches entries and attributes for ``attr_timeout`` seconds; this cache keeps
what the coordinator answered for the same time, so a kernel revalidation after a timeout
(``stat`` in a loop, ``ls -l``) rarely crosses the network while a change made on another
node is still seen within one timeout. Attributes are keyed by inode and never replaced by
an older version. Entries map ``(parent, name)`` to an inode so that unlink and rename can
invalidate the inode they touch.

A directory this node made, and then kept changing itself, is known *completely*: every
create answer carries the directory's version before and after, and while those chain up
(no other node changed it in between) a name not among its entries does not exist. Such a
negative answer is trusted for ``negative_ttl`` after the last confirmation; a create that
then finds the name taken gets ``Exists`` from the coordinator. The window is off by default
(``--negative-timeout 0``): a node cannot see another node's create in such a directory
until it asks, so with a window a freshly created name could stay invisible that long.

Not thread-safe by design: ``fs.Operations`` uses it only while holding the llfuse lock.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

# The attribute record the coordinator client returns (fastcache.coordinator.store.InodeAttrs).
Attrs = Any


class MetaCache:
    """Attributes by inode with an expiry, entries by ``(parent, name)``, lookup counts."""

    def __init__(
        self,
        ttl: float,
        clock: Callable[[], float] = time.monotonic,
        *,
        negative_ttl: float = 0.0,
    ) -> None:
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self._clock = clock
        self._attrs: dict[int, tuple[Attrs, float]] = {}
        self._entries: dict[tuple[int, str], int] = {}
        self._names: dict[int, set[tuple[int, str]]] = {}
        self._lookups: dict[int, int] = {}
        self._data_version: dict[int, int] = {}
        self._complete: dict[int, tuple[int, float]] = {}  # dir -> (version, expiry)

    # --- attributes ------------------------------------------------------------------------
    def get(self, ino: int) -> Attrs | None:
        """Fresh attributes of ``ino``, or ``None`` (absent or expired)."""
        item = self._attrs.get(ino)
        if item is None:
            return None
        if item[1] <= self._clock():
            del self._attrs[ino]
            return None
        return item[0]

    def put(self, attrs: Attrs) -> Attrs:
        """Remember ``attrs`` for one ttl unless a newer version is cached; returns the winner."""
        item = self._attrs.get(attrs.ino)
        if item is not None and item[0].version > attrs.version and item[1] > self._clock():
            return item[0]
        self._attrs[attrs.ino] = (attrs, self._clock() + self.ttl)
        return attrs

    def timeout(self, ino: int) -> float:
        """Seconds the kernel may keep ``ino``'s attributes: what is left of our own ttl."""
        item = self._attrs.get(ino)
        if item is None:
            return 0.0
        return max(0.0, item[1] - self._clock())

    def invalidate(self, ino: int) -> None:
        self._attrs.pop(ino, None)

    # --- entries ---------------------------------------------------------------------------
    def entry(self, parent: int, name: str) -> int | None:
        """The inode ``name`` in ``parent`` was last seen to name, if known."""
        return self._entries.get((parent, name))

    def bind(self, parent: int, name: str, ino: int) -> None:
        old = self._entries.get((parent, name))
        if old is not None and old != ino:
            self._names.get(old, set()).discard((parent, name))
        self._entries[(parent, name)] = ino
        self._names.setdefault(ino, set()).add((parent, name))

    def unbind(self, parent: int, name: str) -> int | None:
        """Forget the entry; returns the inode it named (if known) after invalidating it."""
        ino = self._entries.pop((parent, name), None)
        if ino is not None:
            self._names.get(ino, set()).discard((parent, name))
            self.invalidate(ino)
        return ino

    # --- complete directories --------------------------------------------------------------
    def complete(self, parent: int, version: int) -> None:
        """This node knows every entry of ``parent`` at ``version`` (it just made it)."""
        if self.negative_ttl > 0:
            self._complete[parent] = (version, self._clock() + self.negative_ttl)

    def changed(self, parent: int, before: int | None, after: int | None) -> None:
        """This node changed ``parent`` from version ``before`` to ``after``."""
        item = self._complete.pop(parent, None)
        if item is not None and before is not None and after is not None and item[0] == before:
            self.complete(parent, after)

    def incomplete(self, parent: int) -> None:
        self._complete.pop(parent, None)

    def absent(self, parent: int, name: str) -> bool:
        """True when ``name`` is known not to exist in ``parent`` (fresh, complete listing)."""
        item = self._complete.get(parent)
        if item is None:
            return False
        if item[1] <= self._clock():
            del self._complete[parent]
            return False
        return (parent, name) not in self._entries

    # --- lookup counts ---------------------------------------------------------------------
    def remember(self, ino: int) -> None:
        """The kernel got one more reference to ``ino`` (lookup, create, mkdir, link…)."""
        self._lookups[ino] = self._lookups.get(ino, 0) + 1

    def forget(self, ino: int, count: int) -> None:
        """The kernel dropped ``count`` references; at zero everything about ``ino`` goes."""
        left = self._lookups.get(ino, 0) - count
        if left > 0:
            self._lookups[ino] = left
            return
        self._lookups.pop(ino, None)
        self._attrs.pop(ino, None)
        self._data_version.pop(ino, None)
        self._complete.pop(ino, None)
        for key in self._names.pop(ino, ()):
            if self._entries.get(key) == ino:
                del self._entries[key]
                self._complete.pop(key[0], None)  # its listing now misses this name

    def lookups(self, ino: int) -> int:
        return self._lookups.get(ino, 0)

    # --- page cache ------------------------------------------------------------------------
    def data_changed(self, ino: int, version: int) -> bool:
        """Record that the kernel's page cache of ``ino`` now follows ``version``.

        True when it followed another version before: the caller must drop the kernel's
        cached pages (another node changed the file since this node last read it).
        """
        old = self._data_version.get(ino)
        self._data_version[ino] = version
        return old is not None and old != version

    def data_follows(self, ino: int, version: int) -> None:
        """This node itself produced ``version``: its page cache already holds that content."""
        self._data_version[ino] = version

    def __len__(self) -> int:
        return len(self._attrs)
