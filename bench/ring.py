"""The peer ring at scale, simulated: rendezvous (HRW) placement of chunks on 100 and 1,000
nodes, without processes.

For each cluster size it reports
- the fraction of chunks whose owner changes when one node joins and when one leaves
  (ideal: 1/N of them, and only chunks moving to the new node or off the old one);
- the load spread: max/mean and min/mean chunks owned per node;
- the placement cost: microseconds to rank the nodes for one chunk (every read and write
  of a chunk not on the local NVMe ranks the live nodes).

    python -m bench.ring [--chunks 200000] [--nodes 100,1000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections import Counter
from typing import Any

from fastcache.tiers.peer import rank_peers


def _owners(digests: list[str], nodes: list[str]) -> list[str]:
    return [rank_peers(d, nodes)[0] for d in digests]


def simulate(n_nodes: int, n_chunks: int) -> dict[str, Any]:
    nodes = [f"node-{i:04d}" for i in range(n_nodes)]
    digests = [os.urandom(16).hex() for _ in range(n_chunks)]
    t0 = time.perf_counter()
    before = _owners(digests, nodes)
    rank_us = (time.perf_counter() - t0) / n_chunks * 1e6

    joined = _owners(digests, [*nodes, "node-new"])
    moved_join = [i for i, (a, b) in enumerate(zip(before, joined, strict=True)) if a != b]
    stray_join = sum(1 for i in moved_join if joined[i] != "node-new")

    gone = nodes[n_nodes // 2]
    left = _owners(digests, [n for n in nodes if n != gone])
    moved_leave = [i for i, (a, b) in enumerate(zip(before, left, strict=True)) if a != b]
    stray_leave = sum(1 for i in moved_leave if before[i] != gone)

    load = Counter(before)
    counts = [load.get(n, 0) for n in nodes]
    mean = n_chunks / n_nodes
    return {
        "nodes": n_nodes,
        "chunks": n_chunks,
        "ideal_moved": 1 / (n_nodes + 1),
        "moved_on_join": len(moved_join) / n_chunks,
        "moved_elsewhere_on_join": stray_join,
        "ideal_moved_on_leave": 1 / n_nodes,
        "moved_on_leave": len(moved_leave) / n_chunks,
        "moved_elsewhere_on_leave": stray_leave,
        "load_max_over_mean": max(counts) / mean,
        "load_min_over_mean": min(counts) / mean,
        "load_stdev_over_mean": statistics.pstdev(counts) / mean,
        "rank_us_per_chunk": rank_us,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.ring", description=__doc__.split("\n")[0])
    ap.add_argument("--chunks", type=int, default=200_000)
    ap.add_argument("--nodes", default="100,1000", help="comma-separated cluster sizes")
    ap.add_argument("--json", help="also write the results to this file")
    args = ap.parse_args(argv)
    try:
        sizes = [int(x) for x in args.nodes.split(",")]
    except ValueError:
        print("--nodes: comma-separated integers", file=sys.stderr)
        return 2
    if args.chunks < 1 or any(n < 2 for n in sizes):
        print("--chunks must be positive and every cluster at least 2 nodes", file=sys.stderr)
        return 2
    results = [simulate(n, args.chunks) for n in sizes]
    for r in results:
        print(
            f"{r['nodes']:>5} nodes, {r['chunks']} chunks: "
            f"join moves {r['moved_on_join']:.4%} (ideal {r['ideal_moved']:.4%}, "
            f"{r['moved_elsewhere_on_join']} elsewhere); "
            f"leave moves {r['moved_on_leave']:.4%} (ideal {r['ideal_moved_on_leave']:.4%}, "
            f"{r['moved_elsewhere_on_leave']} elsewhere); "
            f"load max/mean {r['load_max_over_mean']:.2f}, min/mean {r['load_min_over_mean']:.2f}; "
            f"ranking {r['rank_us_per_chunk']:.0f} us/chunk"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
