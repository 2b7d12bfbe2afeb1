"""Benchmark plumbing: a GB/s recorder and the summary table printed after the run.

Benchmarks never fail on timing: the table shows each figure beside the reference measured
in the same run, with the target ratio for information only.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import pytest

GB = 1e9


@dataclass(frozen=True)
class Comparison:
    label: str
    ours: str
    reference: str | None  # None: an absolute figure, compared with ``target`` GB/s
    target: float


# What the summary compares: (ours, reference, target ratio, or target GB/s if no reference).
COMPARISONS = [
    Comparison("xxh3-128, 1 thread vs python-xxhash", "hash/ours-1t", "hash/xxhash-1t", 0.9),
    Comparison("xxh3-128, 2 threads vs our 1 thread", "hash/ours-2t", "hash/ours-1t", 1.6),
    Comparison("xxh3-128, 2 threads vs python-xxhash 2t", "hash/ours-2t", "hash/xxhash-2t", 0.9),
    Comparison(
        "xxh3-128 cached 1 MiB, 2 threads vs 1",
        "hash-cached/ours-2t",
        "hash-cached/ours-1t",
        1.6,
    ),
    Comparison("digest_chunks (4 MiB) vs xxh3 one call", "hash/ours-many", "hash/ours-1t", 0.9),
    Comparison("FastCDC avg 1 MiB (GB/s)", "cdc/fastcdc-1m", None, 1.0),
    Comparison("FastCDC avg 64 KiB (GB/s)", "cdc/fastcdc-64k", None, 1.0),
    Comparison("FastCDC, 2 threads vs 1", "cdc/fastcdc-1m-2t", "cdc/fastcdc-1m", 1.6),
    Comparison("fixed split vs Python fallback", "split/fixed-ours", "split/fixed-py", 1.0),
    Comparison("O_DIRECT chunk writes vs dd oflag=direct", "write/ours-direct", "write/dd", 0.8),
    Comparison(
        "O_DIRECT chunk writes vs dd direct+fdatasync",
        "write/ours-direct",
        "write/dd-fdatasync",
        0.8,
    ),
    Comparison("chunk writes vs open().write()+fsync", "write/ours-direct", "write/python", 0.9),
    Comparison("pread_into vs f.readinto", "read/pread-into", "read/readinto", 0.9),
]

RESULTS = pytest.StashKey[dict[str, tuple[float, float]]]()  # key -> (median, best) GB/s


def pytest_configure(config: pytest.Config) -> None:
    config.stash[RESULTS] = {}


@pytest.fixture
def record(request: pytest.FixtureRequest) -> Callable[[str, object, int], float | None]:
    """``record(key, benchmark, nbytes)``: after a run, store GB/s of the median and the best
    round (the best is the steadier figure on a machine shared with other work)."""

    def _record(key: str, benchmark: object, nbytes: int) -> float | None:
        stats = getattr(benchmark, "stats", None)
        if stats is None:  # --benchmark-disable
            return None
        median, best = (
            nbytes / t / GB if t > 0 else float("inf")
            for t in (stats.stats.median, stats.stats.min)
        )
        benchmark.extra_info.update(  # type: ignore[attr-defined]
            {
                "key": key,
                "bytes": nbytes,
                "gb_per_s": round(median, 3),
                "gb_per_s_best": round(best, 3),
            }
        )
        request.config.stash[RESULTS][key] = (median, best)
        return median

    return _record


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    results = config.stash.get(RESULTS, {})
    if not results:
        return
    write = terminalreporter.write_line
    terminalreporter.section("kernel throughput, GB/s (median round; ratio also by best round)")
    write(f"{'measure':<46} {'ours':>7} {'ref':>7} {'ratio':>6} {'best':>6} {'target':>7}")
    for c in COMPARISONS:
        if c.ours not in results:
            continue
        ours, ours_best = results[c.ours]
        if c.reference is None:
            mark = "ok" if ours >= c.target else "MISS"
            write(f"{c.label:<46} {ours:>7.2f} {'':>7} {'':>6} {'':>6} {c.target:>6.1f}G  {mark}")
            continue
        if c.reference not in results:
            continue
        ref, ref_best = results[c.reference]
        ratio, ratio_best = ours / ref, ours_best / ref_best
        mark = "ok" if ratio >= c.target else "MISS"
        write(
            f"{c.label:<46} {ours:>7.2f} {ref:>7.2f} {ratio:>5.2f}x {ratio_best:>5.2f}x"
            f" {c.target:>6.1f}x  {mark}"
        )
    load = os.getloadavg()[0]
    write(f"(load average {load:.2f} on {os.cpu_count()} CPUs: other work skews every figure)")
