"""Metadata operations per second from three nodes, against one or two coordinators on
SQLite or PostgreSQL: what a second coordinator buys and what PostgreSQL costs.

Each "node" is a process with one metadata session (``SessionClient``, what a mount uses)
running ``--inflight`` operations at a time, as the FUSE worker threads of a busy mount do.
Every node works in a directory of its own, in phases: create ``--files`` empty files, stat
each (``getattr``, no lease reuse: every call reaches the coordinator), mkdir as many
directories, rename every file. Nodes are spread over the coordinators round-robin. The
PostgreSQL server is a local one started for the run (``fastcache/pgserver.py``).

    python -m bench.metadata_scale [--setups sqlite1,pg1,pg2] [--files 2000] [--inflight 8]
                                   [--json out.json]

Reported per setup and operation: ops/s summed over the nodes, and p50/p99 latency in ms.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.heartbeat_load import _pct, _wait_healthy
from bench.systems import free_port
from fastcache.testing.cluster import coordinator_command

PHASES = ("create", "stat", "mkdir", "rename")
TOKEN = "bench-metadata-token"


# --- one node: run as a subprocess (``--node``) ---------------------------------------------
async def _node(urls: list[str], name: str, files: int, inflight: int) -> dict[str, Any]:
    from fastcache.coordinator.model import ROOT_INO
    from fastcache.coordinator.session_client import SessionClient

    out: dict[str, Any] = {}
    async with SessionClient(urls, TOKEN) as s:
        home = (await s.mkdir(ROOT_INO, name)).ino
        inos: dict[int, int] = {}

        async def create(i: int) -> None:
            inos[i] = (await s.create(home, f"f{i}")).ino

        async def stat(i: int) -> None:
            await s.getattr(inos[i])

        async def mkdir(i: int) -> None:
            await s.mkdir(home, f"d{i}")

        async def rename(i: int) -> None:
            await s.rename(home, f"f{i}", home, f"r{i}")

        for phase, fn in zip(PHASES, (create, stat, mkdir, rename), strict=True):
            out[phase] = await _phase(fn, files, inflight)
    return out


async def _phase(fn: Any, count: int, inflight: int) -> dict[str, Any]:
    latencies: list[float] = []
    todo = iter(range(count))

    async def worker() -> None:
        for i in todo:
            t0 = time.perf_counter()
            await fn(i)
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(inflight)))
    return {"seconds": time.perf_counter() - start, "latencies": latencies}


# --- the run ------------------------------------------------------------------------------
def _start_coordinator(store: str, state: Path, port: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "FASTCACHE_TOKEN": TOKEN}
    cmd = coordinator_command(port, state, "--store", store)
    log = open(state.parent / f"coordinator-{port}.log", "ab")  # noqa: SIM115 (lives with proc)
    return subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)


async def _healthy(urls: list[str]) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as session:
        for url in urls:
            await _wait_healthy(url, session, 60)


def run_setup(setup: str, files: int, inflight: int, work: Path) -> dict[str, Any]:
    from fastcache.pgserver import PostgresServer

    engine, coordinators = setup[:-1], int(setup[-1])
    root = work / setup
    root.mkdir(parents=True)
    pg = None
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if engine == "pg":
            pg = PostgresServer(root / "pg").start()
            store = pg.create_database("fastcache")
        else:
            store = f"sqlite:///{root / 'namespace.db'}"
        urls = []
        for n in range(coordinators):
            port = free_port()
            state = root / f"coordinator{n}"
            state.mkdir()
            procs.append(_start_coordinator(store, state, port))
            urls.append(f"http://127.0.0.1:{port}")
        asyncio.run(_healthy(urls))
        nodes = []
        for n in range(3):
            mine = urls[n % len(urls) :] + urls[: n % len(urls)]  # spread, the rest as fallback
            cmd = [sys.executable, "-m", "bench.metadata_scale", "--node", ",".join(mine)]
            cmd += ["--name", f"node{n}", "--files", str(files), "--inflight", str(inflight)]
            nodes.append(subprocess.Popen(cmd, stdout=subprocess.PIPE))
        results = []
        for p in nodes:
            stdout, _ = p.communicate()
            if p.returncode != 0:
                raise RuntimeError(f"a bench node failed ({p.returncode})")
            results.append(json.loads(stdout))
        return _summarise(results)
    finally:
        for p in procs:
            p.terminate()
            p.wait(30)
        if pg is not None:
            pg.stop()


def _summarise(nodes: list[dict[str, Any]]) -> dict[str, Any]:
    out = {}
    for phase in PHASES:
        lat = [x for n in nodes for x in n[phase]["latencies"]]
        slowest = max(n[phase]["seconds"] for n in nodes)
        out[phase] = {
            "ops_per_s": round(len(lat) / slowest, 1),
            "p50_ms": round(_pct(lat, 0.50) * 1000, 2),
            "p99_ms": round(_pct(lat, 0.99) * 1000, 2),
        }
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--setups", default="sqlite1,pg1,pg2")
    ap.add_argument("--files", type=int, default=2000, help="files (and dirs) per node")
    ap.add_argument("--inflight", type=int, default=8, help="operations in flight per node")
    ap.add_argument("--json", type=Path, help="also write the results here")
    ap.add_argument("--node", help=argparse.SUPPRESS)  # internal: run one node
    ap.add_argument("--name", default="node", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.node:
        doc = asyncio.run(_node(args.node.split(","), args.name, args.files, args.inflight))
        print(json.dumps(doc))
        return 0
    report: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fc-meta-bench-") as tmp:
        os.chmod(tmp, 0o755)  # the postgres user must reach its data directory
        for setup in args.setups.split(","):
            report[setup] = run_setup(setup, args.files, args.inflight, Path(tmp))
            for phase, r in report[setup].items():
                print(
                    f"{setup:8} {phase:7} {r['ops_per_s']:>9,.0f} ops/s"
                    f"   p50 {r['p50_ms']:6.2f} ms   p99 {r['p99_ms']:7.2f} ms",
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
