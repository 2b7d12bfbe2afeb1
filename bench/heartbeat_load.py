"""What one coordinator pays for a large cluster's housekeeping, measured on a real
coordinator process with synthetic nodes (no mounts, no S3).

Every synthetic node registers, then heartbeats every ``--heartbeat`` seconds and fetches
the peer list every ``--peer-refresh`` seconds with the last answer's ETag (what a client
node does: see ``ClientConfig.heartbeat_interval``, ``PeerTier``'s refresh and
``CoordinatorClient.list_peers``), each at a random phase. The load generator is one
Python process: on a small machine it competes with the coordinator for the cores.
Reported: the coordinator's CPU (% of one core, from /proc), the requests it answered per
second against those offered, and p50/p99 latency per request kind.

    python -m bench.heartbeat_load [--nodes 1000] [--seconds 30] [--heartbeat 10]
                                   [--peer-refresh 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from bench.systems import free_port
from fastcache.testing.cluster import coordinator_command


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def _wait_healthy(url: str, session: aiohttp.ClientSession, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            async with session.get(f"{url}/api/health") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the coordinator did not come up")
        await asyncio.sleep(0.1)  # polling a starting process: nothing to wait on instead


async def _run(args: argparse.Namespace, url: str, pid: int) -> dict[str, Any]:
    connector = aiohttp.TCPConnector(limit=args.connections)
    async with aiohttp.ClientSession(connector=connector) as session:
        await _wait_healthy(url, session, 30)
        ids = [f"synthetic-{i:05d}" for i in range(args.nodes)]
        for i in range(0, len(ids), 100):
            await asyncio.gather(
                *(
                    session.post(
                        f"{url}/api/peers/register",
                        json={
                            "peer_id": p,
                            "url": f"http://10.0.{n // 250}.{n % 250}:9000",
                            "capacity": 1 << 40,
                            "used": 0,
                        },
                    )
                    for n, p in enumerate(ids[i : i + 100], start=i)
                )
            )
        latencies: dict[str, list[float]] = {"heartbeat": [], "peers": []}
        errors = {"heartbeat": 0, "peers": 0}
        stop = time.monotonic() + args.seconds

        etags: dict[str, str] = {}  # the last peer list's ETag, per node (as nodes keep it)

        async def timed(
            kind: str, method: str, path: str, body: Any = None, node: str = ""
        ) -> None:
            t0 = time.perf_counter()
            asked = {"If-None-Match": etags[node]} if node in etags else None
            try:
                async with session.request(
                    method,
                    f"{url}{path}",
                    json=body,
                    headers=asked,
                    timeout=aiohttp.ClientTimeout(total=10),
                ) as resp:
                    await resp.read()
                    ok = resp.status in (200, 304)
                    if kind == "peers" and resp.status == 200 and "ETag" in resp.headers:
                        etags[node] = resp.headers["ETag"]
            except (aiohttp.ClientError, TimeoutError):
                ok = False  # a request the coordinator did not answer within 10 s
            if ok:
                latencies[kind].append(time.perf_counter() - t0)
            else:
                errors[kind] += 1

        inflight: set[asyncio.Task[None]] = set()

        def spawn(coro: Any) -> None:
            task = asyncio.ensure_future(coro)
            inflight.add(task)
            task.add_done_callback(inflight.discard)

        async def node(peer_id: str) -> None:
            next_hb = time.monotonic() + random.uniform(0, args.heartbeat)
            next_list = time.monotonic() + random.uniform(0, args.peer_refresh)
            while True:
                now = time.monotonic()
                if now >= stop:
                    return
                if now >= next_hb:
                    next_hb += args.heartbeat
                    body = {"peer_id": peer_id, "used": random.randrange(1 << 30)}
                    spawn(timed("heartbeat", "PUT", "/api/peers/status", body))
                if now >= next_list:
                    next_list += args.peer_refresh
                    spawn(timed("peers", "GET", "/api/peers", node=peer_id))
                await asyncio.sleep(max(0.0, min(next_hb, next_list, stop) - time.monotonic()))

        cpu0, t0 = _cpu_seconds(pid), time.monotonic()
        await asyncio.gather(*(node(p) for p in ids))
        await asyncio.gather(*inflight, return_exceptions=True)
        elapsed = time.monotonic() - t0
        cpu = (_cpu_seconds(pid) - cpu0) / elapsed * 100
    offered = {
        "heartbeat": args.nodes / args.heartbeat,
        "peers": args.nodes / args.peer_refresh,
    }
    return {
        "nodes": args.nodes,
        "seconds": round(elapsed, 1),
        "coordinator_cpu_percent": round(cpu, 1),
        "kinds": {
            kind: {
                "offered_per_s": round(offered[kind], 1),
                "answered_per_s": round(len(lat) / elapsed, 1),
                "errors": errors[kind],
                "p50_ms": round(_pct(lat, 0.5) * 1e3, 2),
                "p99_ms": round(_pct(lat, 0.99) * 1e3, 2),
            }
            for kind, lat in latencies.items()
        },
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.heartbeat_load")
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--heartbeat", type=float, default=10.0, help="seconds between heartbeats")
    ap.add_argument("--peer-refresh", type=float, default=3.0, help="seconds between peer lists")
    ap.add_argument("--connections", type=int, default=64)
    ap.add_argument("--json", help="also write the result to this file")
    args = ap.parse_args(argv)
    if args.nodes < 1 or args.seconds <= 0 or args.heartbeat <= 0 or args.peer_refresh <= 0:
        print("--nodes, --seconds, --heartbeat, --peer-refresh: positive", file=sys.stderr)
        return 2
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory(prefix="fc-hb-") as state:
        cmd = coordinator_command(port, state, "--peer-timeout", "3600", "--log-level", "WARNING")
        env = {k: v for k, v in os.environ.items() if k != "FASTCACHE_TOKEN"}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
        try:
            result = asyncio.run(_run(args, url, proc.pid))
        finally:
            proc.terminate()
            proc.wait(30)
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
