"""``fastcache stats``: one node's rates, sampled every second from its ``/metrics``.

Each sample is the difference of two scrapes: FUSE operations and bytes per second, the
hit ratio of each tier over the interval, S3 and peer traffic, and the upload backlog (a
gauge). On a terminal a ``rich`` table is redrawn in place, like ``top``; otherwise one
plain line per sample under one header line, for scripts and logs.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.live import Live
from rich.table import Table

from fastcache.admin.nodes import NodeApi

MiB = 1 << 20
TIERS = ("nvme", "peer", "s3")
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of an exposition by (name, sorted labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _sum(samples: Samples, name: str, **labels: str) -> float:
    want = set(labels.items())
    return sum(v for (n, lab), v in samples.items() if n == name and want <= set(lab))


@dataclass(frozen=True)
class Rates:
    """What changed between two scrapes ``seconds`` apart (per second, but the ratios)."""

    seconds: float
    ops: float
    reads: float
    writes: float
    read_mib: float
    write_mib: float
    hit_ratio: dict[str, float | None]  # tier → hits / (hits + misses) in the interval
    s3_down_mib: float
    s3_up_mib: float
    peer_down_mib: float
    peer_up_mib: float
    backlog_chunks: int
    backlog_mib: float

    @classmethod
    def between(cls, old: Samples, new: Samples, seconds: float) -> Rates:
        def rate(name: str, scale: float = 1.0, **labels: str) -> float:
            delta = _sum(new, name, **labels) - _sum(old, name, **labels)
            return max(0.0, delta) / scale / seconds

        ratios: dict[str, float | None] = {}
        for tier in TIERS:
            hits = rate("fastcache_tier_hits_total", tier=tier)
            misses = rate("fastcache_tier_misses_total", tier=tier)
            ratios[tier] = hits / (hits + misses) if hits + misses else None
        return cls(
            seconds=seconds,
            ops=rate("fastcache_fuse_ops_total"),
            reads=rate("fastcache_fuse_ops_total", op="read"),
            writes=rate("fastcache_fuse_ops_total", op="write"),
            read_mib=rate("fastcache_fuse_op_bytes_total", MiB, op="read"),
            write_mib=rate("fastcache_fuse_op_bytes_total", MiB, op="write"),
            hit_ratio=ratios,
            s3_down_mib=rate("fastcache_s3_bytes_total", MiB, direction="down"),
            s3_up_mib=rate("fastcache_s3_bytes_total", MiB, direction="up"),
            peer_down_mib=rate("fastcache_peer_bytes_total", MiB, direction="down"),
            peer_up_mib=rate("fastcache_peer_bytes_total", MiB, direction="up"),
            backlog_chunks=int(_sum(new, "fastcache_writeback_pending_chunks")),
            backlog_mib=_sum(new, "fastcache_writeback_pending_bytes") / MiB,
        )


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


COLUMNS = (
    "ops/s",
    "read/s",
    "write/s",
    "read MiB/s",
    "write MiB/s",
    *(f"{t} hit" for t in TIERS),
    "S3 down/up MiB/s",
    "peer down/up MiB/s",
    "backlog",
)


def cells(r: Rates) -> list[str]:
    return [
        f"{r.ops:,.0f}",
        f"{r.reads:,.0f}",
        f"{r.writes:,.0f}",
        f"{r.read_mib:,.1f}",
        f"{r.write_mib:,.1f}",
        *(_ratio(r.hit_ratio[t]) for t in TIERS),
        f"{r.s3_down_mib:,.1f}/{r.s3_up_mib:,.1f}",
        f"{r.peer_down_mib:,.1f}/{r.peer_up_mib:,.1f}",
        f"{r.backlog_chunks:,} chunks ({r.backlog_mib:,.1f} MiB)",
    ]


def plain_line(r: Rates) -> str:
    """One sample as a line of tab-separated cells (``COLUMNS`` order)."""
    return "\t".join([time.strftime("%H:%M:%S"), *cells(r)])


def table(url: str, r: Rates) -> Table:
    t = Table(title=f"fastcache stats {url} (every {r.seconds:.1f}s, Ctrl-C to stop)")
    for name in COLUMNS:
        t.add_column(name, justify="right")
    t.add_row(*cells(r))
    return t


async def watch(
    url: str,
    token: str | None,
    *,
    interval: float,
    count: int | None,
    show: Callable[[Rates], None],
) -> None:
    """Scrape ``url``/metrics every ``interval`` seconds; ``show`` each sample's rates."""
    async with NodeApi(token) as api:
        old, at = parse(await api.get_text(url, "/metrics")), time.monotonic()
        shown = 0
        while count is None or shown < count:
            await asyncio.sleep(max(0.0, at + interval - time.monotonic()))
            new, now = parse(await api.get_text(url, "/metrics")), time.monotonic()
            show(Rates.between(old, new, now - at))
            old, at = new, now
            shown += 1


def run(url: str, token: str | None, *, interval: float, count: int | None, tty: bool) -> None:
    """Until ``count`` samples were shown (or Ctrl-C): a live table on a terminal, else
    plain lines under a header."""

    def go(show: Callable[[Rates], None]) -> None:
        asyncio.run(watch(url, token, interval=interval, count=count, show=show))

    if not tty:
        print("\t".join(["time", *COLUMNS]), flush=True)
        go(lambda r: print(plain_line(r), flush=True))
        return
    with Live(console=Console(), auto_refresh=False) as live:
        go(lambda r: live.update(table(url, r), refresh=True))
