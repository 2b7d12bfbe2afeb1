"""fio through a real fastcache mount, with the raw NVMe directory as the ceiling.

Starts SeaweedFS, a coordinator and one client mounted in a temp dir, writes a 1 GiB file
through the mount, checks its chunks are on the client's NVMe dir, then for each repeat:
drops the page cache and runs the issue-4 fio jobs on the mounted file and on a plain
1 GiB file in the NVMe directory. Prints one JSON document (medians and every sample);
the client's RSS is sampled while it streams the file. Everything it started is stopped
and unmounted on exit, Ctrl-C included.

    .venv/bin/python bench/fio_mount.py [--repeat 3] [--size 1G] [--runtime 10]
        [--variant w2:FASTCACHE_FUSE_WORKERS=2 --variant w4:FASTCACHE_FUSE_WORKERS=4 ...]

Each ``--variant LABEL:NAME=VALUE,...`` restarts the client (same NVMe dir) with those
environment variables; every repeat runs every variant's jobs, then the raw reference once,
so variants are compared within one run. Without ``--variant`` the client runs as is.

Targets (issue 4): sequential read ≥ 1.2 GB/s, random 4 KiB O_DIRECT ≥ 40k IOPS with 4
jobs, client RSS < 300 MiB while streaming. Needs root for drop_caches (else says so).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from fastcache.config import DEFAULT_REGION, S3Config  # noqa: E402
from fastcache.seaweed import SeaweedServer  # noqa: E402
from fastcache.testing.cluster import Cluster  # noqa: E402
from fastcache.testing.mounts import force_unmount, is_fuse_mount  # noqa: E402
from fastcache.testing.polling import wait_until  # noqa: E402

GiB = 1 << 30
MiB = 1 << 20
WRITE_PIECE = 8 * MiB


def _size(text: str) -> int:
    units = {"K": 1 << 10, "M": MiB, "G": GiB}
    if text[-1:].upper() in units:
        return int(float(text[:-1]) * units[text[-1].upper()])
    return int(text)


def drop_caches() -> bool:
    """Write back and drop the page cache; False if not permitted (not root)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


def rss(pid: int) -> int:
    """Resident set size of ``pid`` in bytes (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class RssSampler:
    """Peak RSS of a process while a ``with`` block runs (polled every 20 ms)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss(self.pid))
            self._stop.wait(0.02)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss(self.pid))


def write_file(path: Path, size: int) -> None:
    """``size`` bytes of incompressible data, distinct per chunk (no dedup)."""
    rng = os.urandom
    with open(path, "wb", buffering=0) as f:
        done = 0
        while done < size:
            n = min(WRITE_PIECE, size - done)
            f.write(rng(n))
            done += n


def fio(filename: Path, size: int, job: dict[str, Any]) -> dict[str, Any]:
    """Run one fio job on ``filename``; its read figures."""
    args = [
        "fio",
        "--name=" + job["name"],
        f"--filename={filename}",
        f"--size={size}",
        "--readonly",
        "--ioengine=psync",
        "--group_reporting",
        "--output-format=json",
        *job["args"],
    ]
    out = subprocess.run(args, capture_output=True, text=True, check=True).stdout
    doc = json.loads(out[out.index("{") :])
    read = doc["jobs"][0]["read"]
    return {"bw_MBps": read["bw_bytes"] / 1e6, "iops": read["iops"]}


def jobs(runtime: int) -> list[dict[str, Any]]:
    return [
        {"name": "seq128k", "args": ["--rw=read", "--bs=128k"], "metric": "bw_MBps"},
        {"name": "seq1m", "args": ["--rw=read", "--bs=1M"], "metric": "bw_MBps"},
        {
            "name": "rand4k_direct_4jobs",
            "args": [
                "--direct=1",
                "--rw=randread",
                "--bs=4k",
                "--numjobs=4",
                "--iodepth=1",
                "--time_based",
                f"--runtime={runtime}",
            ],
            "metric": "iops",
        },
    ]


def chunk_bytes(nvme: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(nvme / "chunks"):
        for name in files:
            if ".tmp." not in name:
                total += os.path.getsize(os.path.join(dirpath, name))
    return total


def _variant(text: str) -> tuple[str, dict[str, str]]:
    label, _, spec = text.partition(":")
    env = dict(kv.split("=", 1) for kv in spec.split(",") if kv)
    return label, env


def restart(client: Any, mnt: Path, env: dict[str, str]) -> None:
    """Stop the client (it unmounts) and start it again with ``env`` added."""
    client.stop()
    wait_until(lambda: not is_fuse_mount(mnt), 30.0, interval=0.05, message="unmount")
    base = getattr(client, "base_env", None)
    if base is None:
        base = client.base_env = dict(client.env)
    client.env = {**base, **env}
    client.start()
    client.wait_healthy()
    wait_until(lambda: is_fuse_mount(mnt), 60.0, interval=0.05, message="mount")


def run(args: argparse.Namespace, root: Path, cleanups: list[Callable[[], None]]) -> dict:
    server = SeaweedServer(root / "seaweed")
    cleanups.append(server.stop)
    server.start()
    s3 = S3Config(
        endpoint=server.endpoint,
        region=DEFAULT_REGION,
        bucket="fio-bench",
        access_key=server.access_key,
        secret_key=server.secret_key,
    )
    cluster = Cluster(root, s3)
    cleanups.append(cluster.close)
    cluster.start_coordinator()
    mnt, nvme = root / "mnt", root / "nvme1"
    mnt.mkdir()
    cleanups.append(lambda: force_unmount(mnt))
    extra = ["--mount", str(mnt), "--nvme-capacity", str(4 * args.size), *args.client_args]
    client = cluster.start_client(1, extra=extra)
    client.wait_healthy()
    wait_until(lambda: is_fuse_mount(mnt), 60.0, interval=0.05, message="mount")

    target = mnt / "big.bin"
    with RssSampler(client.pid) as write_rss:
        write_file(target, args.size)
    if os.path.getsize(target) != args.size:
        raise RuntimeError("the file written through the mount has the wrong size")
    on_nvme = chunk_bytes(nvme)
    if on_nvme < args.size:
        raise RuntimeError(f"only {on_nvme} of {args.size} bytes of chunks are on NVMe")
    raw = nvme / "raw.bin"
    write_file(raw, args.size)

    dropped = drop_caches()
    variants = [_variant(v) for v in args.variant] or [("mount", {})]
    samples: dict[str, dict[str, list[float]]] = {label: {} for label, _ in variants}
    samples["raw_nvme_dir"] = {}
    stream_rss = 0
    for _ in range(args.repeat):
        for label, env in variants:
            if len(variants) > 1 or env:
                restart(client, mnt, env)
            for job in jobs(args.runtime):
                drop_caches()
                if job["name"].startswith("seq"):
                    with RssSampler(client.pid) as sampler:
                        figures = fio(target, args.size, job)
                    stream_rss = max(stream_rss, sampler.peak)
                else:
                    figures = fio(target, args.size, job)
                samples[label].setdefault(job["name"], []).append(figures[job["metric"]])
        for job in jobs(args.runtime):
            drop_caches()
            figures = fio(raw, args.size, job)
            samples["raw_nvme_dir"].setdefault(job["name"], []).append(figures[job["metric"]])
    # Page cache across opens: one fio run fills it, a second (a new open of the unchanged
    # file) should be served by the kernel without a FUSE read.
    warm_job = next(j for j in jobs(args.runtime) if j["name"] == "seq1m")
    drop_caches()
    cold = fio(target, args.size, warm_job)[warm_job["metric"]]
    warm = fio(target, args.size, warm_job)[warm_job["metric"]]
    medians = {
        label: {name: round(statistics.median(v), 1) for name, v in by_job.items()}
        for label, by_job in samples.items()
    }
    return {
        "size": args.size,
        "repeat": args.repeat,
        "page_cache_dropped": dropped,
        "client_args": args.client_args,
        "variants": dict(variants),
        "units": {"seq128k": "MB/s", "seq1m": "MB/s", "rand4k_direct_4jobs": "IOPS"},
        "median": medians,
        "samples": samples,
        "reopen_seq1m_MBps": {"first": round(cold, 1), "second_open_warm": round(warm, 1)},
        "client_rss_MiB": {
            "while_streaming_peak": round(stream_rss / MiB, 1),
            "while_writing_peak": round(write_rss.peak / MiB, 1),
        },
        "targets": {"seq_MBps": 1200, "rand4k_iops": 40000, "rss_MiB": 300},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=_size, default=GiB)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--runtime", type=int, default=10)
    parser.add_argument("--root", type=Path, default=None, help="work dir (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the work dir")
    parser.add_argument(
        "--variant",
        action="append",
        default=[],
        help="LABEL:NAME=VALUE,... client environment to compare (repeatable)",
    )
    parser.add_argument("client_args", nargs="*", help="extra `fastcache client` flags (after --)")
    args = parser.parse_args()

    def interrupted(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupted)
    tmp = None
    if args.root is None:
        tmp = tempfile.TemporaryDirectory(prefix="fio-mount-", dir="/var/tmp")
        root = Path(tmp.name)
    else:
        root = args.root
        root.mkdir(parents=True, exist_ok=True)
    cleanups: list[Callable[[], None]] = []
    status = 0
    try:
        result = run(args, root, cleanups)
        print(json.dumps(result, indent=2))
    except KeyboardInterrupt:
        print("interrupted: tearing down", file=sys.stderr)
        status = 130
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # finish the teardown
        for cleanup in reversed(cleanups):
            try:
                cleanup()
            except Exception as exc:  # keep tearing down the rest
                print(f"teardown: {exc}", file=sys.stderr)
        if tmp is not None and not args.keep:
            tmp.cleanup()
        signal.signal(signal.SIGINT, signal.default_int_handler)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
