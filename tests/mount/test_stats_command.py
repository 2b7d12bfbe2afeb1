"""``fastcache stats`` through the CLI against a real mounted node: a mount path resolves to
its node, the samples are rates over each interval (reads made meanwhile show up as FUSE
reads and NVMe hits), and ``--count`` ends it with one plain line per sample."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from tests.mount.conftest import MountCluster
from tests.mount.test_reads import read_direct

MiB = 1 << 20
STATS = [sys.executable, "-m", "fastcache", "stats"]


def run_stats_while_reading(target: str, coordinator: str, path: Path) -> list[dict[str, str]]:
    """Run ``fastcache stats TARGET --count 2`` and read ``path`` until it has finished;
    its samples as dicts keyed by the header's columns."""
    proc = subprocess.Popen(
        [*STATS, target, "--count", "2", "--interval", "0.5", "--coordinator", coordinator],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        while proc.poll() is None:
            read_direct(path, 0, 4096)  # O_DIRECT: each one a FUSE read, an NVMe hit
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    header, *lines = out.splitlines()
    columns = header.split("\t")
    assert columns[:4] == ["time", "ops/s", "read/s", "write/s"]
    assert len(lines) == 2, out
    return [dict(zip(columns, line.split("\t"), strict=True)) for line in lines]


def test_stats_of_a_mount_and_of_a_url(one_node: MountCluster) -> None:
    node = one_node.nodes[0]
    path = node.mnt / "stats-file"
    with open(path, "wb") as f:
        f.write(os.urandom(MiB))
        f.flush()
        os.fsync(f.fileno())
    coordinator = one_node.cluster.coordinator_url
    for target in (str(node.mnt), node.proc.url):
        samples = run_stats_while_reading(target, coordinator, path)
        busy = [s for s in samples if float(s["read/s"].replace(",", "")) > 0]
        assert busy, samples
        assert all(s["nvme hit"] == "100%" for s in busy), samples
        assert all(s["s3 hit"] == "-" for s in samples)  # nothing read from S3 meanwhile
        assert all(s["backlog"] == "0 chunks (0.0 MiB)" for s in samples)  # fsynced


def test_stats_of_a_path_outside_any_mount_is_one_line(tmp_path: Path) -> None:
    done = subprocess.run(
        [*STATS, str(tmp_path), "--count", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr == f"fastcache: {tmp_path}: not in a fastcache mount (give a node URL)\n"
