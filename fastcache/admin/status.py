"""``fastcache status``: the cluster at a glance.

The coordinators answer for the peers they record (with ``live``: heard from within the
peer timeout) and the namespace totals; every recorded node is then asked for its NVMe use,
pending uploads and S3 bucket. A node is *alive* when its coordinator still hears from it
and it answers: one killed a moment ago stays recorded until the peer timeout, shown dead.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table

from fastcache.admin.nodes import NodeApi
from fastcache.coordinator.client import CoordinatorClient
from fastcache.errors import FastcacheError

__all__ = ["gather", "render"]


async def _coordinator(url: str, token: str | None) -> dict[str, Any]:
    async with CoordinatorClient(url, token) as client:
        try:
            doc = await client.admin_status()
        except FastcacheError as exc:
            return {"url": url, "reachable": False, "error": str(exc)}
    return {"url": url, "reachable": True, **doc}


async def _node(api: NodeApi, peer: dict[str, Any], now: float) -> dict[str, Any]:
    url = peer["url"]
    node: dict[str, Any] = {
        "peer_id": peer["peer_id"],
        "url": url,
        "alive": False,
        "heartbeat_live": peer["live"],
        "last_heartbeat": peer["last_seen"],
        "last_heartbeat_age": round(max(0.0, now - peer["last_seen"]), 3),
        "nvme_used": peer["used"],
        "nvme_capacity": peer["capacity"],
        "nvme_chunks": None,
        "pending_uploads": None,
        "bucket": None,
        "mount": None,
        "error": None,
    }
    try:
        cache, stats, health = await asyncio.gather(
            api.get_json(url, "/api/cache?limit=0"),
            api.get_json(url, "/api/cache/stats"),
            api.get_json(url, "/api/health"),
        )
    except FastcacheError as exc:
        node["error"] = str(exc)
        return node
    s3 = (stats.get("tiers", {}).get("s3") or {}).get("tier") or {}
    node.update(
        alive=bool(peer["live"]),
        nvme_used=cache.get("used"),
        nvme_capacity=cache.get("capacity"),
        nvme_chunks=cache.get("chunks"),
        pending_uploads=cache.get("pending_uploads"),
        bucket=s3.get("bucket"),
        mount=health.get("mount"),
    )
    return node


async def gather(coordinators: list[str], token: str | None) -> dict[str, Any]:
    """The status document (``fastcache status --json`` prints it)."""
    coords = await asyncio.gather(*(_coordinator(u, token) for u in coordinators))
    source = next((c for c in coords if c["reachable"]), None)
    peers = source["peers"] if source else []
    async with NodeApi(token) as api:
        nodes = await asyncio.gather(*(_node(api, p, source["now"]) for p in peers))
    namespace = dict(source["namespace"]) if source else {}
    inodes = namespace.pop("inodes", {})
    return {
        "coordinators": [
            {k: c.get(k) for k in ("url", "reachable", "version", "peer_timeout", "error")}
            for c in coords
        ],
        "nodes": sorted(nodes, key=lambda n: n["peer_id"]),
        "namespace": {
            "files": inodes.get("file", 0),
            "directories": inodes.get("dir", 0),
            "symlinks": inodes.get("symlink", 0),
            "bytes": namespace.get("bytes", 0),
            "location_records": namespace.get("locations", 0),
        },
        "s3": {"buckets": sorted({n["bucket"] for n in nodes if n["bucket"]})},
        "time": time.time(),
    }


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError


def render(doc: dict[str, Any], console: Console) -> None:
    coords = Table(title="coordinators", title_justify="left", box=box.SIMPLE_HEAD)
    for col in ("url", "state", "version", "peer timeout"):
        coords.add_column(col)
    for c in doc["coordinators"]:
        state = "up" if c["reachable"] else f"[red]unreachable[/red] ({c['error']})"
        timeout = f"{c['peer_timeout']:g}s" if c.get("peer_timeout") else ""
        coords.add_row(c["url"], state, c.get("version") or "", timeout)
    console.print(coords)

    nodes = Table(title="nodes", title_justify="left", box=box.SIMPLE_HEAD)
    for col in ("id", "url", "state", "heartbeat", "NVMe used", "chunks", "pending"):
        right = col in ("chunks", "pending")
        nodes.add_column(col, justify="right" if right else "left", no_wrap=True)
    for n in doc["nodes"]:
        state = "[green]alive[/green]" if n["alive"] else "[red]dead[/red]"
        used = f"{_size(n['nvme_used'])} / {_size(n['nvme_capacity'])}"
        nodes.add_row(
            n["peer_id"],
            n["url"],
            state,
            f"{n['last_heartbeat_age']:.1f}s ago",
            used,
            "" if n["nvme_chunks"] is None else f"{n['nvme_chunks']:,}",
            "" if n["pending_uploads"] is None else f"{n['pending_uploads']:,}",
        )
    console.print(nodes)

    ns = doc["namespace"]
    console.print(
        f"namespace: {ns['files']:,} files, {ns['directories']:,} directories, "
        f"{ns['symlinks']:,} symlinks, {_size(ns['bytes'])} in files"
    )
    buckets = ", ".join(doc["s3"]["buckets"]) or "(no node answered)"
    console.print(f"S3 bucket: {buckets}")
