"""The node-side metadata cache: inode attributes, directory entries and lookup counts.

The kernel caches entries and attributes for ``attr_timeout`` seconds; this cache keeps
what the coordinator answered for the same time, so a kernel revalidation after a timeout
(``stat`` in a loop, ``ls -l``) rarely crosses the network while a change made on another
node is still seen within one timeout. Attributes are keyed by inode and never replaced by
an older version. Entries map ``(parent, name)`` to an inode for one ttl too, so lookups
stay local and unlink and rename can invalidate the inode they touch. Neither is dropped when
the kernel forgets an inode (``drop_caches``, memory pressure): the next ``stat`` is still
answered here. Expired items are swept out once the cache has grown past ``SWEEP_AT``.

A directory this node made, and then kept changing itself, is known *completely*: every
create answer carries the directory's version before and after, and while those chain up
(no other node changed it in between) a name not among its entries does not exist. Such a
negative answer is trusted for ``negative_ttl`` after the last confirmation; a create that
then finds the name taken gets ``Exists`` from the coordinator. The window is off by default
(``--negative-timeout 0``): a node cannot see another node's create in such a directory
until it asks, so with a window a freshly created name could stay invisible that long.

With a metadata session (``SessionClient``) answers come with a lease: attributes, entries
and "no such name" are then kept until the lease's deadline instead of one ttl, and the
coordinator's push invalidation drops them (``drop``) before another node's change is
acknowledged; a lost session drops everything (``clear``).

Not thread-safe by design: ``fs.Operations`` uses it only while holding the llfuse lock.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fastcache.coordinator.model import InodeAttrs  # what the coordinator client returns

SWEEP_AT = 65536  # cached inodes before expired ones are swept out


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
        self._attrs: dict[int, tuple[InodeAttrs, float]] = {}
        self._entries: dict[tuple[int, str], tuple[int, float]] = {}  # -> (ino, expiry)
        self._lookups: dict[int, int] = {}
        self._data_version: dict[int, int] = {}
        self._complete: dict[int, tuple[int, float]] = {}  # dir -> (version, expiry)
        self._denied: dict[tuple[int, str], float] = {}  # leased "no such name" -> expiry
        self._listed: dict[int, float] = {}  # dir -> expiry of its leased, complete listing
        self._leased: set[int] = set()  # inodes whose cached attributes are held on a lease
        self._sweep_at = SWEEP_AT

    def sizes(self) -> dict[str, int]:
        """How many items of each kind are cached (expired ones not yet swept included)."""
        return {
            "attributes": len(self._attrs),
            "entries": len(self._entries),
            "negative": len(self._denied),
            "listings": len(self._listed),
        }

    # --- attributes ------------------------------------------------------------------------
    def get(self, ino: int) -> InodeAttrs | None:
        """Fresh attributes of ``ino``, or ``None`` (absent or expired)."""
        item = self._attrs.get(ino)
        if item is None:
            return None
        if item[1] <= self._clock():
            del self._attrs[ino]
            return None
        return item[0]

    def put(self, attrs: InodeAttrs, until: float | None = None) -> InodeAttrs:
        """Remember ``attrs`` for one ttl (or until a lease's deadline) unless a newer version
        is cached; returns the winner. A listing's row (no manifest) of the version cached
        with its manifest keeps that manifest: a version names one content. An answer
        without a lease (a listing's) of the version held on a lease keeps the lease: any
        change to it is still pushed here first."""
        item = self._attrs.get(attrs.ino)
        now = self._clock()
        if item is not None:
            cached = item[0]
            if cached.version > attrs.version and item[1] > now:
                return cached
            if cached.version == attrs.version:
                if attrs.manifest is None and cached.manifest is not None:
                    attrs = dataclasses.replace(attrs, manifest=cached.manifest)
                if until is None and attrs.ino in self._leased and item[1] > now:
                    until = item[1]
        self._attrs[attrs.ino] = (attrs, now + self.ttl if until is None else until)
        if until is None:
            self._leased.discard(attrs.ino)
        else:
            self._leased.add(attrs.ino)
        if len(self._attrs) > self._sweep_at:
            self._sweep(now)
        return attrs

    def amend(self, attrs: InodeAttrs) -> InodeAttrs:
        """Replace the cached attributes of ``attrs.ino`` by ``attrs`` (this node's own
        change to them, such as a noted access time), keeping their expiry and lease."""
        item = self._attrs.get(attrs.ino)
        if item is None:
            return self.put(attrs)
        self._attrs[attrs.ino] = (attrs, item[1])
        return attrs

    def lease_until(self, ino: int) -> float | None:
        """The deadline of the lease ``ino``'s cached attributes are held on, if one runs."""
        item = self._attrs.get(ino)
        if ino not in self._leased or item is None or item[1] <= self._clock():
            return None
        return item[1]

    def leased(self, ino: int) -> InodeAttrs | None:
        """``ino``'s attributes if they are held on a lease that still runs: another node's
        change to them would have been pushed here (and dropped them) first."""
        if ino not in self._leased:
            return None
        return self.get(ino)

    def _sweep(self, now: float) -> None:
        """Drop expired attributes and entries (the cache would otherwise only grow)."""
        self._attrs = {ino: item for ino, item in self._attrs.items() if item[1] > now}
        self._leased &= self._attrs.keys()
        self._denied = {key: until for key, until in self._denied.items() if until > now}
        for key, (_, until) in list(self._entries.items()):
            if until <= now:
                del self._entries[key]
                self._complete.pop(key[0], None)  # its entries are no longer all known
                self._listed.pop(key[0], None)
        self._sweep_at = max(SWEEP_AT, 2 * len(self._attrs))

    def timeout(self, ino: int) -> float:
        """Seconds the kernel may keep ``ino``'s attributes: what is left of our own ttl."""
        item = self._attrs.get(ino)
        if item is None:
            return 0.0
        return max(0.0, item[1] - self._clock())

    def invalidate(self, ino: int) -> None:
        self._attrs.pop(ino, None)
        self._leased.discard(ino)

    # --- entries ---------------------------------------------------------------------------
    def entry(self, parent: int, name: str) -> int | None:
        """The inode ``name`` in ``parent`` named when last seen, if that was within a ttl."""
        item = self._entries.get((parent, name))
        if item is None or item[1] <= self._clock():
            return None
        return item[0]

    def bind(self, parent: int, name: str, ino: int, until: float | None = None) -> None:
        self._entries[(parent, name)] = (ino, self._clock() + self.ttl if until is None else until)
        self._denied.pop((parent, name), None)

    def deny(self, parent: int, name: str, until: float) -> None:
        """The coordinator leased "no such name" until ``until``."""
        self._entries.pop((parent, name), None)
        self._denied[(parent, name)] = until

    def absent_until(self, parent: int, name: str) -> float:
        """Until when ``name`` is known under a lease not to exist in ``parent`` (a leased
        "no such name", or a leased listing without it); 0.0 if it is not."""
        now = self._clock()
        until = self._denied.get((parent, name), 0.0)
        if until > now:
            return until
        listed = self._listed.get(parent, 0.0)
        if listed > now and (parent, name) not in self._entries:
            return listed
        return 0.0

    def denied(self, parent: int, name: str) -> bool:
        until = self._denied.get((parent, name))
        if until is None:
            return False
        if until <= self._clock():
            del self._denied[(parent, name)]
            return False
        return True

    # --- leases ----------------------------------------------------------------------------
    def drop(self, keys: list[str]) -> tuple[list[int], list[tuple[int, str]]]:
        """Forget what the coordinator's invalidation names (``attr:``, ``entry:``, ``list:``
        keys); the inodes and entries the kernel may hold of it."""
        inodes: list[int] = []
        entries: list[tuple[int, str]] = []
        for key in keys:
            kind, _, rest = key.partition(":")
            if kind == "attr":
                ino = int(rest)
                self._attrs.pop(ino, None)
                self._leased.discard(ino)
                inodes.append(ino)
            elif kind == "entry":
                parent_text, _, name = rest.partition(":")
                parent = int(parent_text)
                self._entries.pop((parent, name), None)
                self._denied.pop((parent, name), None)
                self._complete.pop(parent, None)
                self._listed.pop(parent, None)
                entries.append((parent, name))
            elif kind == "list":  # the entries learnt from the listing go with it
                parent = int(rest)
                self._complete.pop(parent, None)
                self._listed.pop(parent, None)
                names = [key for key in self._entries if key[0] == parent]
                for key in names:
                    del self._entries[key]
                entries.extend(names)
        return inodes, entries

    def clear(self) -> tuple[list[int], list[tuple[int, str]]]:
        """Forget every attribute and entry (the session and its leases are gone); what the
        kernel may hold of them."""
        inodes = list(self._attrs)
        entries = list(self._entries)
        self._attrs.clear()
        self._leased.clear()
        self._entries.clear()
        self._denied.clear()
        self._complete.clear()
        self._listed.clear()
        return inodes, entries

    def unbind(self, parent: int, name: str) -> int | None:
        """Forget the entry; returns the inode it named (if known) after invalidating it."""
        self._denied.pop((parent, name), None)
        item = self._entries.pop((parent, name), None)
        if item is None:
            return None
        self.invalidate(item[0])
        return item[0]

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
        self._listed.pop(parent, None)

    def unchained(self, parent: int) -> None:
        """This node changed ``parent`` without learning its versions: what ``complete``
        knew no longer chains up; a leased listing stays (this node keeps its entries)."""
        self._complete.pop(parent, None)

    def listed(self, parent: int, until: float) -> None:
        """Every entry of ``parent`` is bound here, under a lease on its listing until
        ``until``: another node's change to it invalidates ``list:<parent>`` first, and this
        node's own changes bind and unbind their entries."""
        self._listed[parent] = until

    def is_listed(self, parent: int) -> bool:
        until = self._listed.get(parent)
        if until is None:
            return False
        if until <= self._clock():
            del self._listed[parent]
            return False
        return True

    def absent(self, parent: int, name: str) -> bool:
        """True when ``name`` is known not to exist in ``parent`` (fresh, complete listing).
        A leased listing outlives its entries' own expiry when renewed by this node's
        creates there: an entry that expired still says the name exists (sweeping one
        ends the listing)."""
        if self.is_listed(parent):
            return (parent, name) not in self._entries
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
        """The kernel dropped ``count`` references; at zero its page cache of ``ino`` is gone.

        Attributes and entries stay until they expire: a ``stat`` right after the kernel
        dropped its dentries (memory pressure, ``drop_caches``) is still answered here.
        """
        left = self._lookups.get(ino, 0) - count
        if left > 0:
            self._lookups[ino] = left
            return
        self._lookups.pop(ino, None)
        self._data_version.pop(ino, None)

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
