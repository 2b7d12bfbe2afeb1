"""``metrics.histogram.OpHistograms``: per-thread rows summed at scrape; buckets by upper
bound (inclusive), cumulative for Prometheus; calls counted apart from timed calls."""

from __future__ import annotations

import threading

import pytest

from fastcache.cache.stats import Latency
from fastcache.metrics.histogram import BOUNDS, CALLS, OpHistograms
from fastcache.metrics.node import latency_buckets


def test_observations_land_in_their_buckets_and_sum() -> None:
    h = OpHistograms(["read", "write"])
    h.observe(0, 50_000)  # exactly the first bound (50 µs): le is inclusive
    h.observe(0, 2_000_000, 4096)  # 2 ms
    h.observe(0, 60 * 10**9)  # past every bound: +Inf only
    snap = h.snapshot()
    read = snap["read"]
    assert read.timed == read.calls == 3
    assert read.bytes == 4096
    assert read.sum_seconds == pytest.approx(60.00205)
    cumulative = dict(read.cumulative())
    assert cumulative["5e-05"] == 1
    assert cumulative["0.001"] == 1 and cumulative["0.0025"] == 2
    assert cumulative["10.0"] == 2 and cumulative["+Inf"] == 3
    assert list(cumulative) == [*map(str, BOUNDS), "+Inf"]
    assert snap["write"].calls == 0 and dict(snap["write"].cumulative())["+Inf"] == 0


def test_rows_of_many_threads_are_summed_and_untimed_calls_counted() -> None:
    h = OpHistograms(["read"])

    def work() -> None:
        row = h.row()
        for _ in range(1000):
            row[OpHistograms.base(0) + CALLS] += 1  # counted, not timed (the read hot path)
        h.observe(0, 1_000)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = h.snapshot()["read"]
    assert snap.calls == 8 * 1001
    assert snap.timed == 8


def test_a_latency_ring_keeps_a_histogram_too() -> None:
    lat = Latency()
    for seconds in (0.00001, 0.003, 0.003, 20.0):
        lat.add(seconds)
    buckets = dict(latency_buckets(lat))
    assert buckets["5e-05"] == 1 and buckets["0.005"] == 3 and buckets["+Inf"] == 4
    assert lat.total == pytest.approx(20.00601)
