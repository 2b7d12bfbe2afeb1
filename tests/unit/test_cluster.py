"""Coordinators of one cluster (``coordinator/cluster.py``) over an in-memory bus.

The bus here stands in for the store's (PostgreSQL LISTEN/NOTIFY, tested for real in the
PostgreSQL integration tests): it broadcasts every payload to every subscriber, itself too,
on a later loop turn, as a notification arrives.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from fastcache.coordinator.cluster import Cluster


class LocalBus:
    def __init__(self) -> None:
        self.subscribers: list[Callable[[bytes], None]] = []
        self.muted = False  # a bus that delivers nothing (a lost LISTEN connection)
        self.broken = False  # a bus that refuses to publish (the database is away)

    async def publish(self, payload: bytes) -> None:
        if self.broken:
            raise ConnectionError("the database is away")
        if self.muted:
            return
        loop = asyncio.get_running_loop()
        for callback in list(self.subscribers):
            loop.call_soon(callback, payload)

    async def subscribe(self, callback: Callable[[bytes], None]) -> None:
        self.subscribers.append(callback)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Node:
    """One coordinator's cluster view plus what its hub would do with remote changes."""

    def __init__(self, bus: LocalBus, clock: Clock, lease_term: float = 30.0) -> None:
        self.applied: list[list[str]] = []
        self.fail = False
        self.lost = asyncio.Event()
        self.cluster = Cluster(
            bus,
            lease_term,
            self._apply,
            self._lost,
            hello=0.01,
            dead_after=3.0,
            clock=clock,
        )

    async def _apply(self, keys: list[str]) -> None:
        if self.fail:
            raise RuntimeError("push failed")
        self.applied.append(keys)

    async def _lost(self) -> None:
        self.lost.set()


async def settle() -> None:
    """Let every message already published be delivered (the bus delivers on the next turn)."""
    for _ in range(10):
        await asyncio.sleep(0)


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def _coordinators_see_each_other_and_one_leads(clock: Clock) -> None:
    bus = LocalBus()
    a, b = Node(bus, clock), Node(bus, clock)
    await a.cluster.start()
    await b.cluster.start()
    await settle()
    try:
        assert a.cluster.live() == [b.cluster.id]
        assert b.cluster.live() == [a.cluster.id]
        assert [a.cluster.is_leader, b.cluster.is_leader].count(True) == 1
        assert (a if a.cluster.id < b.cluster.id else b).cluster.is_leader
    finally:
        await b.cluster.close()
        await settle()
        assert a.cluster.live() == []  # a graceful bye
        assert a.cluster.is_leader
        await a.cluster.close()


async def _change_reaches_the_other_coordinator_before_spread_returns(clock: Clock) -> None:
    bus = LocalBus()
    a, b = Node(bus, clock), Node(bus, clock)
    for n in (a, b):
        await n.cluster.start()
    await settle()
    try:
        keys = [f"entry:1:{'n' * 90}{i}" for i in range(150)]  # more than one message's worth
        await asyncio.wait_for(a.cluster.spread(keys), 10)
        assert [k for part in b.applied for k in part] == keys
        assert a.applied == []  # its own change is not applied back to it
        assert a.cluster.counters["ack_timeouts"] == 0
        assert a.cluster.counters["published"] == 6  # at most 3,000 bytes of keys in each
    finally:
        for n in (a, b):
            await n.cluster.close()


async def _a_coordinator_that_cannot_apply_is_waited_for_at_most_the_lease_term(
    clock: Clock,
) -> None:
    bus = LocalBus()
    a, b = Node(bus, clock, lease_term=0.2), Node(bus, clock)
    for n in (a, b):
        await n.cluster.start()
    await settle()
    b.fail = True
    try:
        await asyncio.wait_for(a.cluster.spread(["attr:7"]), 10)
        assert a.cluster.counters["ack_timeouts"] == 1
    finally:
        for n in (a, b):
            await n.cluster.close()


async def _a_change_the_bus_cannot_carry_waits_out_the_lease_term(clock: Clock) -> None:
    """Committed, but the others cannot be told: the change is acknowledged (no error) once
    every lease they could have granted before it has run out."""
    bus = LocalBus()
    a, b = Node(bus, clock, lease_term=0.2), Node(bus, clock)
    for n in (a, b):
        await n.cluster.start()
    await settle()
    bus.broken = True
    try:
        await asyncio.wait_for(a.cluster.spread(["attr:7"]), 10)  # returns, does not raise
        assert a.cluster.counters["ack_timeouts"] == 1
        assert b.applied == []
    finally:
        bus.broken = False
        for n in (a, b):
            await n.cluster.close()


async def _silent_coordinators_are_dead_and_not_waited_for(clock: Clock) -> None:
    bus = LocalBus()
    a, b = Node(bus, clock), Node(bus, clock)
    for n in (a, b):
        await n.cluster.start()
    await settle()
    await b.cluster.close()  # its bye is lost: it vanished
    bus.subscribers.remove(b.cluster._receive)
    clock.now += 3.5
    assert a.cluster.live() == []
    await asyncio.wait_for(a.cluster.spread(["attr:1"]), 10)  # nobody to wait for
    assert a.cluster.counters["published"] == 0
    await a.cluster.close()


async def _leases_only_while_the_bus_echoes(clock: Clock) -> None:
    bus = LocalBus()
    a = Node(bus, clock)
    await a.cluster.start()
    await settle()
    try:
        assert not a.cluster.may_lease  # just started: the others may not know it yet
        clock.now += 3.1
        await asyncio.wait_for(_until(lambda: a.cluster.may_lease), 10)
        bus.muted = True  # its hellos stop coming back
        await settle()  # (those already on their way arrive)
        clock.now += 3.1
        await asyncio.wait_for(a.lost.wait(), 10)
        assert not a.cluster.may_lease
        assert a.cluster.counters["bus_lost"] == 1
        bus.muted = False
        await asyncio.wait_for(_until(lambda: a.cluster.may_lease), 10)
    finally:
        await a.cluster.close()


async def _garbage_on_the_bus_is_ignored(clock: Clock) -> None:
    bus = LocalBus()
    a = Node(bus, clock)
    await a.cluster.start()
    try:
        await bus.publish(b"\xc1 not msgpack")
        await bus.publish(b"\x81\xa1t\xa3inv")  # a message, not an array of them
        await bus.publish(b"\x91\x81\xa1t\xa3inv")  # a message without a sender
        await settle()
        assert a.cluster.live() == []
        assert a.applied == []
    finally:
        await a.cluster.close()


async def _until(condition: Callable[[], bool]) -> None:
    """Wait for ``condition``, checking once per hello (the hellos move it)."""
    while not condition():
        await asyncio.sleep(0.01)


def test_coordinators_see_each_other_and_one_leads(clock: Clock) -> None:
    asyncio.run(_coordinators_see_each_other_and_one_leads(clock))


def test_change_reaches_the_other_coordinator_before_spread_returns(clock: Clock) -> None:
    asyncio.run(_change_reaches_the_other_coordinator_before_spread_returns(clock))


def test_a_coordinator_that_cannot_apply_is_waited_for_at_most_the_lease_term(clock: Clock) -> None:
    asyncio.run(_a_coordinator_that_cannot_apply_is_waited_for_at_most_the_lease_term(clock))


def test_silent_coordinators_are_dead_and_not_waited_for(clock: Clock) -> None:
    asyncio.run(_silent_coordinators_are_dead_and_not_waited_for(clock))


def test_leases_only_while_the_bus_echoes(clock: Clock) -> None:
    asyncio.run(_leases_only_while_the_bus_echoes(clock))


def test_garbage_on_the_bus_is_ignored(clock: Clock) -> None:
    asyncio.run(_garbage_on_the_bus_is_ignored(clock))


def test_a_change_the_bus_cannot_carry_waits_out_the_lease_term(clock: Clock) -> None:
    asyncio.run(_a_change_the_bus_cannot_carry_waits_out_the_lease_term(clock))
