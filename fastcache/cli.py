"""The ``fastcache`` command: parse flags and environment into config, then hand over.

Bad flags get a one-line message and exit status 2; no traceback reaches the user.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fastcache import __version__
from fastcache.config import (
    DEFAULT_COORDINATOR,
    CacheConfig,
    ClientConfig,
    ConfigError,
    CoordinatorConfig,
    S3Config,
    fuse_tuning_from_env,
    parse_capacity,
    parse_coordinators,
    parse_size,
    token_from_env,
)
from fastcache.log import setup_logging


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token", help="cluster token (default: $FASTCACHE_TOKEN)")
    p.add_argument("--log-level", default="INFO", help="DEBUG, INFO, WARNING, ERROR")
    p.add_argument(
        "--metrics-public",
        action="store_true",
        help="answer GET /metrics without the token (for a Prometheus without it)",
    )


def _add_node_args(n: argparse.ArgumentParser) -> None:
    """The flags of a client node (``client`` and ``mount``)."""
    n.add_argument(
        "--coordinator",
        default=DEFAULT_COORDINATOR,
        help="coordinator URL, or several comma-separated: the node moves to the next one "
        "when its coordinator stops answering (default http://127.0.0.1:8080)",
    )
    n.add_argument("--host", default="127.0.0.1")
    n.add_argument("--port", type=int, default=8081)
    n.add_argument("--advertise-url", help="URL peers use to reach this node")
    n.add_argument("--peer-id", default="", help="node id (default: host:port)")
    n.add_argument("--nvme-dir", type=Path, required=True, help="local cache directory")
    n.add_argument("--nvme-capacity", default="10G", help="bytes, size (64G) or percent (50%%)")
    n.add_argument("--chunk-size", default="4M")
    n.add_argument("--chunking", choices=("fixed", "cdc"), default="fixed")
    n.add_argument(
        "--upload-memory",
        default="256M",
        help="chunks waiting for their upload keep their bytes in memory up to this size; "
        "past it they are read back from NVMe (default 256M)",
    )
    n.add_argument(
        "--verify-cache",
        action="store_true",
        help="verify every NVMe read against its digest, not only whole chunks",
    )
    n.add_argument("--s3-endpoint", help="S3 endpoint URL (default: AWS, or $AWS_ENDPOINT_URL)")
    n.add_argument("--bucket", default=None, help="S3 bucket (default fuse-client-cache)")
    n.add_argument("--region", default=None, help="S3 region (default us-east-1)")
    n.add_argument("--heartbeat-interval", type=float, default=10.0)
    n.add_argument(
        "--attr-timeout",
        type=float,
        default=1.0,
        help="kernel attribute/entry cache timeout in seconds (default 1)",
    )
    n.add_argument(
        "--negative-timeout",
        type=float,
        default=0.0,
        help="seconds a node may answer ENOENT from its cache for directories only it "
        "changed (default 0: always ask the coordinator; >0 speeds up creates but a "
        "name made on another node may stay invisible that long)",
    )
    n.add_argument(
        "--fuse-workers",
        type=int,
        default=None,
        help="FUSE worker threads (default 4, or $FASTCACHE_FUSE_WORKERS)",
    )
    n.add_argument("--fuse-options", default=None, help="extra comma-separated FUSE mount options")
    n.add_argument(
        "--noatime",
        action="store_true",
        help="reads never move access times (default: relatime, sent in batches)",
    )
    n.add_argument(
        "--readahead",
        type=int,
        default=4,
        help="chunks read ahead at first (default 4); sequential reads double it up to 16",
    )
    n.add_argument(
        "--replication",
        type=int,
        default=3,
        help="peer replicas written back per chunk (default 3; 0: S3 only)",
    )
    n.add_argument(
        "--max-file-size",
        default="1T",
        help="largest file the client API accepts (default 1T)",
    )
    n.add_argument(
        "--shutdown-sync-timeout",
        type=float,
        default=10.0,
        help="seconds a graceful stop waits for pending uploads to reach S3 (default 10)",
    )
    n.add_argument(
        "--commit-timeout",
        type=float,
        default=10.0,
        help="seconds close() waits for the coordinator before EIO; the commit is kept and "
        "retried until it lands (default 10)",
    )
    n.add_argument(
        "--fsync-timeout",
        type=float,
        default=120.0,
        help="seconds fsync() waits for S3 and the coordinator's sync before EIO (default 120)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastcache",
        description="A distributed FUSE filesystem with a 3-tier cache: NVMe, peers, S3.",
    )
    parser.add_argument("--version", action="version", version=f"fastcache {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    c = sub.add_parser("coordinator", help="run the coordinator (peers, locations, namespace)")
    c.add_argument("--host", default="127.0.0.1")
    c.add_argument("--port", type=int, default=8080)
    c.add_argument("--state-dir", type=Path, default=Path("coordinator-state"))
    c.add_argument(
        "--store",
        metavar="URL",
        help="the namespace store: sqlite:///path.db or postgresql://user@host:port/db "
        "(default: sqlite in --state-dir)",
    )
    c.add_argument(
        "--peer-timeout",
        type=float,
        default=60.0,
        help="seconds of silence after which a peer is dropped (default 60)",
    )
    c.add_argument(
        "--sync-interval",
        type=float,
        default=0.1,
        help="seconds from a namespace change to its fsync at the latest (default 0.1; "
        "a change survives a coordinator crash at once, power loss after this or a sync)",
    )
    c.add_argument(
        "--lease-term",
        type=float,
        default=2.0,
        help="seconds a node's session lease on cached metadata lasts; the most a frozen "
        "node delays another node's conflicting change (default 2)",
    )
    _add_common(c)

    n = sub.add_parser("client", help="run a client node: API, peer cache, optional mount")
    _add_node_args(n)
    n.add_argument("--mount", type=Path, help="mount point for the FUSE filesystem")
    _add_common(n)

    d = sub.add_parser("dev-start", help="start S3, a coordinator and 3 mounted clients")
    d.add_argument("--dir", type=Path, default=Path(".dev"), help="state and logs (default .dev)")
    d.add_argument(
        "--base-port", type=int, default=8080, help="coordinator port; clients use the next three"
    )
    d.add_argument(
        "--mount-prefix",
        default="/tmp/fuse-client",
        help="mounts at PREFIX1..3 (default /tmp/fuse-client)",
    )
    d.add_argument("--nodes", type=int, default=3)
    d.add_argument(
        "--store",
        choices=("sqlite", "postgres"),
        default="sqlite",
        help="postgres: a local PostgreSQL and two coordinators on it (default sqlite)",
    )
    d.add_argument("--s3-port", type=int, default=0, help="embedded S3 port (default: free)")
    d.add_argument("--log-level", default="INFO")

    s = sub.add_parser("dev-stop", help="stop what dev-start started and unmount")
    s.add_argument("--dir", type=Path, default=Path(".dev"))
    s.add_argument("--log-level", default="INFO")

    b = sub.add_parser("bench", help="benchmark fastcache beside other filesystems")
    b.add_argument("rest", nargs=argparse.REMAINDER, help="harness flags (fastcache bench --help)")
    _add_admin_commands(sub)
    return parser


def _add_coordinator_url(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--coordinator",
        action="append",
        help="coordinator URL (default http://127.0.0.1:8080; repeat for several)",
    )
    p.add_argument("--token", help="cluster token (default: $FASTCACHE_TOKEN)")
    p.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING, ERROR")


def _add_s3(p: argparse.ArgumentParser) -> None:
    p.add_argument("--s3-endpoint", help="S3 endpoint URL (default: AWS, or $AWS_ENDPOINT_URL)")
    p.add_argument("--bucket", default=None, help="S3 bucket (default fuse-client-cache)")
    p.add_argument("--region", default=None, help="S3 region (default us-east-1)")
    p.add_argument("--threads", type=int, default=16, help="S3 requests in flight (default 16)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")


def _add_admin_commands(sub: Any) -> None:
    st = sub.add_parser("status", help="the cluster at a glance: coordinators, nodes, namespace")
    _add_coordinator_url(st)
    st.add_argument("--json", action="store_true", help="print the status as JSON")

    sx = sub.add_parser("stats", help="one node's live rates, every second (like top)")
    sx.add_argument(
        "target",
        nargs="?",
        default=".",
        metavar="MOUNT|URL",
        help="a path in a fastcache mount, or a node's URL (default: the current directory)",
    )
    sx.add_argument("--interval", type=float, default=1.0, help="seconds per sample (default 1)")
    sx.add_argument("--count", type=int, help="stop after this many samples (default: never)")
    _add_coordinator_url(sx)

    w = sub.add_parser("warmup", help="fetch files or trees into a node's NVMe cache")
    w.add_argument("paths", nargs="+", metavar="PATH", help="in a local mount, or /namespace/path")
    w.add_argument("--node", help="node URL (default: the node serving the mount PATH is in)")
    w.add_argument("--threads", type=int, default=16, help="chunk fetches in flight (default 16)")
    w.add_argument(
        "--cluster",
        action="store_true",
        help="warm every live node with the chunks it owns instead of one node",
    )
    _add_coordinator_url(w)

    f = sub.add_parser("fsck", help="check that every chunk the namespace lists is in S3")
    _add_coordinator_url(f)
    _add_s3(f)
    f.add_argument("--verify-data", action="store_true", help="GET and hash every chunk")
    f.add_argument(
        "--repair", action="store_true", help="re-upload missing or bad chunks from the nodes"
    )

    g = sub.add_parser("gc", help="find (and with --delete remove) unreferenced S3 chunks")
    _add_coordinator_url(g)
    _add_s3(g)
    g.add_argument(
        "--grace",
        default="1h",
        help="keep unreferenced chunks younger than this (seconds, or 30m, 1h, 2d; default 1h)",
    )
    g.add_argument(
        "--delete", action="store_true", help="delete them (default: only list them, a dry run)"
    )
    g.add_argument("--dry-run", action="store_true", help="only list (the default)")

    m = sub.add_parser(
        "mount", help="mount the filesystem: run a client node, foreground or --daemon"
    )
    m.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    _add_node_args(m)
    m.add_argument("--daemon", action="store_true", help="run in the background once mounted")
    m.add_argument("--pid-file", type=Path, help="default /run/fastcache/<mountpoint>.pid")
    m.add_argument("--log-file", type=Path, help="--daemon's log (default: beside the PID file)")
    m.add_argument(
        "--env-file", type=Path, help="KEY=VALUE lines (AWS_*, FASTCACHE_TOKEN) for the node"
    )
    _add_common(m)

    u = sub.add_parser("umount", help="unmount: stop the node serving MOUNTPOINT")
    u.add_argument("mountpoint", type=Path, metavar="MOUNTPOINT")
    u.add_argument("--pid-file", type=Path, help="as given to fastcache mount")
    u.add_argument("--timeout", type=float, default=60.0, help="seconds to wait (default 60)")
    u.add_argument("--log-level", default="WARNING")


def coordinator_config(args: argparse.Namespace) -> CoordinatorConfig:
    return CoordinatorConfig(
        host=args.host,
        port=args.port,
        state_dir=args.state_dir,
        store=args.store,
        token=args.token or token_from_env(),
        peer_timeout=args.peer_timeout,
        sync_interval=args.sync_interval,
        lease_term=args.lease_term,
        metrics_public=args.metrics_public,
    )


def client_config(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> ClientConfig:
    cache = CacheConfig(
        nvme_dir=args.nvme_dir,
        nvme_capacity=parse_capacity(args.nvme_capacity, args.nvme_dir),
        chunk_size=parse_size(args.chunk_size),
        chunking=args.chunking,
        verify_cache=args.verify_cache,
        replication=args.replication,
        upload_memory=parse_size(args.upload_memory),
    )
    s3 = S3Config.from_env(env, endpoint=args.s3_endpoint, bucket=args.bucket, region=args.region)
    return ClientConfig(
        cache=cache,
        s3=s3,
        coordinators=parse_coordinators(args.coordinator),
        host=args.host,
        port=args.port,
        advertise_url=args.advertise_url,
        peer_id=args.peer_id or f"{args.host}:{args.port}",
        token=args.token or token_from_env(env),
        heartbeat_interval=args.heartbeat_interval,
        mount=args.mount,
        attr_timeout=args.attr_timeout,
        negative_timeout=args.negative_timeout,
        noatime=args.noatime,
        **_fuse_tuning(args),
        readahead_chunks=args.readahead,
        shutdown_sync_timeout=args.shutdown_sync_timeout,
        commit_timeout=args.commit_timeout,
        fsync_timeout=args.fsync_timeout,
        max_file_size=parse_size(args.max_file_size),
        metrics_public=args.metrics_public,
    )


ADMIN_COMMANDS = ("status", "stats", "warmup", "fsck", "gc", "mount", "umount")


def _admin(args: argparse.Namespace, argv: list[str]) -> int:
    """The operator commands (``fastcache.admin``): their config from flags and env here."""
    from fastcache.admin import commands, mounting

    token = getattr(args, "token", None) or token_from_env()
    if args.command in ("fsck", "gc"):
        s3 = S3Config.from_env(endpoint=args.s3_endpoint, bucket=args.bucket, region=args.region)
        return commands.check_bucket(args, token, s3)
    if args.command == "mount":
        env = None
        if args.env_file is not None:
            env = {**os.environ, **mounting.read_env_file(args.env_file)}
        args.mount = args.mountpoint
        return commands.mount(args, argv, client_config(args, env), env)
    return commands.run(args, token)


def _fuse_tuning(args: argparse.Namespace) -> dict[str, object]:
    tuning = fuse_tuning_from_env()
    if args.fuse_workers is not None:
        if args.fuse_workers < 1:
            raise ConfigError("--fuse-workers must be at least 1")
        tuning["fuse_workers"] = args.fuse_workers
    if args.fuse_options is not None:
        tuning["fuse_options"] = args.fuse_options
    return tuning


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # the harness owns its flags; REMAINDER would reject them
        return _bench(argv[1:])
    if argv[:2] == ["coordinator", "migrate"]:
        return _coordinator_migrate(argv[2:])
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    setup_logging(getattr(args, "log_level", "INFO"))
    try:
        if args.command == "coordinator":
            import uvloop

            from fastcache.coordinator.app import serve

            uvloop.run(serve(coordinator_config(args)))
            return 0
        if args.command == "client":
            config = client_config(args)
            from fastcache.node import main as run_node

            return run_node(config)
        if args.command == "dev-start":
            from fastcache import devcluster

            return devcluster.start(args)
        if args.command == "dev-stop":
            from fastcache import devcluster

            return devcluster.stop(args)
        if args.command in ADMIN_COMMANDS:
            return _admin(args, argv)
    except ConfigError as exc:
        print(f"fastcache: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except OSError as exc:
        print(
            f"fastcache: {exc.strerror or exc}" + (f": {exc.filename}" if exc.filename else ""),
            file=sys.stderr,
        )
        return 1
    parser.error(f"unknown command {args.command}")
    return 2


def _coordinator_migrate(argv: list[str]) -> int:
    """``fastcache coordinator migrate --from sqlite:///… --to postgresql://…``."""
    p = argparse.ArgumentParser(
        prog="fastcache coordinator migrate",
        description="Copy a SQLite namespace (every inode, entry, manifest, xattr and hard "
        "link, with their numbers) into an empty PostgreSQL database. Stop the coordinator "
        "first.",
    )
    p.add_argument("--from", dest="source", required=True, metavar="sqlite:///PATH")
    p.add_argument("--to", dest="target", required=True, metavar="postgresql://USER@HOST:PORT/DB")
    p.add_argument("--log-level", default="WARNING")
    args = p.parse_args(argv)
    setup_logging(args.log_level)
    from fastcache.coordinator.store.migrate import migrate

    try:
        counts = asyncio.run(migrate(args.source, args.target))
    except ConfigError as exc:
        print(f"fastcache: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"fastcache: {exc}", file=sys.stderr)
        return 1
    print("copied " + ", ".join(f"{n} {table}" for table, n in counts.items()))
    return 0


def mount_helper(argv: Sequence[str] | None = None) -> int:
    """``mount.fastcache SOURCE MOUNTPOINT -o key=value,...``: what mount(8) runs for
    ``mount -t fastcache`` and /etc/fstab lines; mounts as a daemon (``fastcache mount``)."""
    from fastcache.admin.mounting import helper_argv

    try:
        translated = helper_argv(list(sys.argv[1:] if argv is None else argv))
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return 1  # mount(8): incorrect invocation
    return 0 if translated is None else main(translated)


def _bench(argv: list[str]) -> int:
    """``fastcache bench``: ``python -m bench.harness`` in the source checkout this package
    runs from. The harness drives other filesystems and is not installed with the package
    (nothing in ``fastcache`` imports ``bench``), so without a checkout this says so."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "bench" / "harness.py").is_file():
        print(
            "fastcache: bench runs from a source checkout (bench/ is not installed); "
            "clone the repository and run it there",
            file=sys.stderr,
        )
        return 2
    path = os.pathsep.join(p for p in (str(root), os.environ.get("PYTHONPATH")) if p)
    try:
        return subprocess.call(
            [sys.executable, "-m", "bench.harness", *argv], env={**os.environ, "PYTHONPATH": path}
        )
    except KeyboardInterrupt:
        return 130
