"""Small test helpers shared by every suite: memory use, an app on a free port (ports and
deadline polling: ``fastcache.testing.polling``)."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

from aiohttp import web

T = TypeVar("T")


def rss_bytes(pid: int | None = None) -> int:
    """Resident set size of ``pid`` (default: this process) in bytes, from /proc."""
    path = f"/proc/{pid if pid is not None else 'self'}/status"
    with open(path) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS in {path}")


def tree_rss_bytes(pid: int) -> int:
    """RSS of ``pid`` plus its direct children (e.g. a server and its workers)."""
    total = rss_bytes(pid)
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        children = []
    for child in children:
        try:
            total += rss_bytes(int(child))
        except (OSError, RuntimeError):
            pass
    return total


async def serve_app(app: web.Application) -> tuple[web.AppRunner, str]:
    """Serve ``app`` on a free loopback port; the runner (clean it up) and its base URL."""
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    return runner, f"http://127.0.0.1:{port}"
