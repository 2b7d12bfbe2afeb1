"""Progress for the long commands (warmup, fsck, gc): a ``rich`` bar on a terminal, plain
lines (at most one a second, and the last at 100%) when stdout is a file or a pipe."""

from __future__ import annotations

import sys
import time
from types import TracebackType
from typing import TextIO

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TaskProgressColumn,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

MiB = 1 << 20


def _mib(n: float) -> str:
    return f"{n / MiB:,.1f} MiB"


class Bar:
    """One progress bar. ``update(done, total, note)``; ``bytes_`` says whether the unit
    is bytes (MiB, MiB/s) or items."""

    def __init__(self, label: str, *, unit_bytes: bool, out: TextIO | None = None) -> None:
        self.label = label
        self.unit_bytes = unit_bytes
        self.out = out or sys.stdout
        self._live = self.out.isatty()
        self._progress: Progress | None = None
        self._task = None
        self._started = time.monotonic()
        self._printed = 0.0
        self._last: tuple[float, float, str] = (0, 0, "")

    def __enter__(self) -> Bar:
        if self._live:
            amount = DownloadColumn() if self.unit_bytes else MofNCompleteColumn()
            columns = [
                TextColumn("{task.description}"),
                BarColumn(),
                TaskProgressColumn(),
                amount,
                *([TransferSpeedColumn()] if self.unit_bytes else []),
                TimeRemainingColumn(),
                TextColumn("{task.fields[note]}"),
            ]
            self._progress = Progress(*columns, console=Console(file=self.out))
            self._progress.start()
            self._task = self._progress.add_task(self.label, total=None, note="")
        return self

    def update(self, done: float, total: float | None, note: str = "") -> None:
        self._last = (done, total or 0, note)
        if self._progress is not None:
            self._progress.update(self._task, completed=done, total=total, note=note)
            return
        now = time.monotonic()
        if now - self._printed >= 1.0:
            self._printed = now
            self._line()

    def _line(self) -> None:
        done, total, note = self._last
        pct = 100.0 * done / total if total else 100.0
        if self.unit_bytes:
            elapsed = max(time.monotonic() - self._started, 1e-6)
            rate = done / elapsed
            eta = (total - done) / rate if rate > 0 and total else 0.0
            amount = f"{_mib(done)} of {_mib(total)}, {rate / MiB:,.1f} MiB/s, ETA {eta:.0f}s"
        else:
            amount = f"{int(done):,} of {int(total):,}"
        self.out.write(f"{self.label}: {pct:5.1f}% {amount}{', ' + note if note else ''}\n")
        self.out.flush()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._progress is not None:
            self._progress.stop()
        elif exc_type is None:
            self._line()  # the final state (100% when it finished)
