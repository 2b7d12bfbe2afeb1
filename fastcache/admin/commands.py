"""The operator commands as the ``fastcache`` CLI runs them: call the module that does the
job, show its progress, print the result (``--json`` for scripts) and pick the exit status.

Exit status: 0 done and clean; 1 done, with problems left (failed chunks, fsck findings
not repaired, a node that did not answer); 2 bad flags; 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from rich.console import Console

from fastcache.admin import mounting, stats, status, warmup
from fastcache.admin.mounts import mount_of
from fastcache.admin.progress import Bar
from fastcache.config import (
    DEFAULT_COORDINATOR,
    ClientConfig,
    ConfigError,
    S3Config,
    parse_coordinators,
)
from fastcache.coordinator.client import CoordinatorClient
from fastcache.errors import FastcacheError

if TYPE_CHECKING:
    from fastcache.tiers.cloud import CloudTier

T = TypeVar("T")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*$")


def parse_duration(text: str) -> float:
    """``"90"``, ``"30m"``, ``"1h"``, ``"2d"`` → seconds."""
    m = _DURATION.match(text)
    if not m:
        raise ConfigError(f"not a duration: {text!r} (use e.g. 3600, 30m, 1h, 2d)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def _coordinators(args: argparse.Namespace) -> list[str]:
    """``--coordinator`` (repeated or comma-separated), validated as the client's is."""
    return list(parse_coordinators(args.coordinator or [DEFAULT_COORDINATOR]))


def _run(coro: Coroutine[Any, Any, T]) -> T:
    try:
        return asyncio.run(coro)
    except FastcacheError as exc:
        raise SystemExit(_fail(str(exc))) from None


def _fail(message: str) -> int:
    print(f"fastcache: {message}", file=sys.stderr)
    return 1


def _print_json(doc: Any) -> None:
    print(json.dumps(doc, indent=2, sort_keys=True))


def run(args: argparse.Namespace, token: str | None) -> int:
    """status, stats, warmup, umount."""
    if args.command == "status":
        doc = _run(status.gather(_coordinators(args), token))
        if args.json:
            _print_json(doc)
        else:
            # a pipe gets whole lines, not a table cut to 80 columns
            status.render(doc, Console() if sys.stdout.isatty() else Console(width=200))
        if not any(c["reachable"] for c in doc["coordinators"]):
            return 1
        return 0
    if args.command == "warmup":
        return _warmup(args, token)
    if args.command == "stats":
        return _stats(args, token)
    if args.command == "umount":
        pid_file = args.pid_file or mounting.default_files(args.mountpoint)[0]
        return mounting.umount(args.mountpoint, pid_file, args.timeout)
    raise AssertionError(args.command)


# --- stats ---------------------------------------------------------------------------------
def _stats(args: argparse.Namespace, token: str | None) -> int:
    if not args.interval > 0:
        raise ConfigError("--interval must be positive")
    if args.count is not None and args.count < 1:
        raise ConfigError("--count must be at least 1")
    url = args.target.rstrip("/")
    if not url.startswith(("http://", "https://")):
        found = mount_of(Path(args.target))
        if found is None:
            raise ConfigError(f"{args.target}: not in a fastcache mount (give a node URL)")
        url = _run(warmup.node_for_mount(_coordinators(args)[0], token, found[0]))
    try:
        _run_stats(url, token, args)
    except KeyboardInterrupt:
        return 130
    return 0


def _run_stats(url: str, token: str | None, args: argparse.Namespace) -> None:
    try:
        stats.run(url, token, interval=args.interval, count=args.count, tty=sys.stdout.isatty())
    except FastcacheError as exc:
        raise SystemExit(_fail(str(exc))) from None


# --- warmup --------------------------------------------------------------------------------
def _warmup(args: argparse.Namespace, token: str | None) -> int:
    if not 1 <= args.threads <= 64:
        raise ConfigError("--threads must be between 1 and 64")
    coordinator = _coordinators(args)[0]
    try:
        where = warmup.targets(args.paths)
    except FastcacheError as exc:
        raise ConfigError(str(exc)) from None
    if args.cluster:
        nodes = _run(warmup.cluster_nodes(coordinator, token))
    elif args.node:
        nodes = [args.node.rstrip("/")]
    elif where.mountpoint is not None:
        nodes = [_run(warmup.node_for_mount(coordinator, token, where.mountpoint))]
    else:
        raise ConfigError("namespace paths need --node URL (or --cluster)")
    state = warmup.WarmupRun()
    try:
        with Bar("warmup", unit_bytes=True) as bar:
            summary = _run(
                warmup.run(
                    nodes,
                    where.paths,
                    token=token,
                    threads=args.threads,
                    cluster=args.cluster,
                    bar=bar,
                    state=state,
                )
            )
    except KeyboardInterrupt:
        done = state.summary()
        print(
            f"fastcache warmup: interrupted at {done['chunks_done']:,} of {done['chunks']:,} "
            "chunks; run it again to resume",
            file=sys.stderr,
        )
        return 130
    mib = summary["fetched_bytes"] / (1 << 20)
    print(
        f"warmed {summary['files']:,} files ({summary['bytes'] / (1 << 20):,.1f} MiB) on "
        f"{len(summary['nodes'])} node(s): {summary['fetched_chunks']:,} chunks fetched "
        f"({mib:,.1f} MiB), {summary['cached_chunks']:,} already cached, "
        f"{summary['failed_chunks']:,} failed"
    )
    for error in summary["errors"]:
        print(f"  {error}", file=sys.stderr)
    return 1 if summary["failed_chunks"] or summary["failed_nodes"] else 0


# --- fsck and gc ---------------------------------------------------------------------------
def check_bucket(args: argparse.Namespace, token: str | None, s3: S3Config) -> int:
    if not 1 <= args.threads <= 256:
        raise ConfigError("--threads must be between 1 and 256")
    if args.command == "gc":
        if args.delete and args.dry_run:
            raise ConfigError("--delete and --dry-run contradict each other")
        grace = parse_duration(args.grace)
    coordinator = _coordinators(args)[0]
    from fastcache.tiers.cloud import CloudTier  # botocore: only fsck and gc need it

    async def go() -> int:
        cloud = await CloudTier.open(s3, create_bucket=False)
        try:
            async with CoordinatorClient(coordinator, token) as client:
                if args.command == "fsck":
                    return await _fsck(args, token, client, cloud)
                return await _gc(args, client, cloud, grace)
        finally:
            await cloud.close()

    try:
        return _run(go())
    except KeyboardInterrupt:
        print(f"fastcache {args.command}: interrupted", file=sys.stderr)
        return 130


def _scan_note(bar: Bar) -> Callable[[int], None]:
    return lambda n: bar.update(0, None, f"{n:,} files read")


async def _fsck(
    args: argparse.Namespace, token: str | None, client: CoordinatorClient, cloud: CloudTier
) -> int:
    from fastcache.admin import fsck as fsck_mod

    with Bar("fsck", unit_bytes=False, out=sys.stderr if args.json else None) as bar:
        report = await fsck_mod.fsck(
            client,
            cloud,
            token=token,
            verify_data=args.verify_data,
            repair=args.repair,
            threads=args.threads,
            on_scan=_scan_note(bar),
            on_check=lambda done, total, bad: bar.update(done, total, f"{bad} problems"),
        )
    if args.json:
        _print_json(report.to_json())
    else:
        print(
            f"checked {report.chunks:,} chunks ({report.bytes / (1 << 20):,.1f} MiB) of "
            f"{report.files:,} files in bucket {cloud.bucket}: {len(report.problems)} problems"
        )
        for p in report.problems[: fsck_mod.MAX_LISTED]:
            fix = f", repaired from {p.repaired_from}" if p.repaired_from else ""
            detail = f" ({p.detail})" if p.detail else ""
            print(f"  {p.what}: chunk {p.digest} of inode {p.ino}{detail}{fix}")
    return 1 if report.unrepaired else 0


async def _gc(
    args: argparse.Namespace, client: CoordinatorClient, cloud: CloudTier, grace: float
) -> int:
    from fastcache.admin import gc as gc_mod

    with Bar("gc", unit_bytes=False, out=sys.stderr if args.json else None) as bar:
        report = await gc_mod.gc(
            client,
            cloud,
            grace=grace,
            delete=args.delete,
            threads=args.threads,
            on_scan=_scan_note(bar),
            on_delete=lambda done, total: bar.update(done, total, "deleted"),
        )
    if args.json:
        _print_json(report.to_json() | {"dry_run": not args.delete})
        return 1 if report.errors else 0
    doc = report.to_json()
    verb = "deleted" if args.delete else "would delete (dry run; --delete to delete)"
    print(
        f"{doc['objects']:,} chunks in bucket {cloud.bucket}, {doc['referenced']:,} referenced; "
        f"{doc['orphan_count']:,} unreferenced past the grace period "
        f"({doc['orphan_bytes'] / (1 << 20):,.1f} MiB), {doc['young_kept']:,} younger kept"
    )
    for orphan in doc["orphans"]:
        print(f"  {verb}: chunk {orphan['digest']} ({orphan['size']:,} bytes)")
    for error in report.errors:
        print(f"  {error}", file=sys.stderr)
    return 1 if report.errors else 0


# --- mount ---------------------------------------------------------------------------------
def mount(
    args: argparse.Namespace,
    argv: list[str],
    config: ClientConfig,
    env: dict[str, str] | None,
) -> int:
    pid_file, log_file = mounting.default_files(args.mountpoint)
    pid_file = args.pid_file or pid_file
    if args.daemon:
        child = [a for a in argv if a != "--daemon"]
        return mounting.daemonize(child, args.mountpoint, args.log_file or log_file, env)
    from fastcache.node import main as run_node

    with mounting.pid_file(pid_file):
        return run_node(config)
