"""The workloads: fio jobs where fio fits, plain Python for small files and metadata.

Each workload runs its repetitions itself (its setup, such as priming a cache, happens
once) and returns ``{metric key: [value per repetition]}``; the harness takes medians.
Every measured run is bounded in time (fio ``--runtime``, a deadline in the Python loops);
a run cut short reports the rate of what it did.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import tarfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from bench.systems import System

MiB = 1024 * 1024
GiB = 1024 * MiB
BENCH_DIR = "fcbench"  # every workload works under <mount>/fcbench
SEQ_FILE = f"{BENCH_DIR}/seq.dat"


REFERENCE = "s3"  # the pseudo-system of the reference figures (the bare S3 server)
PUT_JOBS = 16  # the S3 PUT ceiling: PUTs in flight ...
PUT_SIZE = 4 * MiB  # ... of this size (fastcache's chunk size)


@dataclass(frozen=True)
class Metric:
    """One row of the table.

    ``kind``: "system" (measured per system), "reference" (measured once per profile,
    with no filesystem, under the pseudo-system ``REFERENCE``; shown in the column of
    every S3-backed system) or "derived" (``of[0]``'s figure over the reference ``of[1]``,
    per system; computed by the report, never stored).
    """

    key: str
    runner: str  # the workload function that measures it (a key of RUNNERS)
    workload: str
    label: str
    unit: str
    higher_is_better: bool = True
    kind: str = "system"
    of: tuple[str, str] | None = None


METRICS: list[Metric] = [
    Metric("seq_write", "seq_write", "1 seq write", "1 MiB blocks, fsync at end", "MiB/s"),
    Metric(
        "seq_write_close",
        "seq_write",
        "1 seq write",
        "1 MiB blocks, acknowledged at close (no fsync)",
        "MiB/s",
    ),
    Metric(
        "s3_put",
        "s3_put",
        "1 seq write",
        f"S3 PUT ceiling ({PUT_JOBS} x {PUT_SIZE // MiB} MiB PUTs in parallel, no filesystem)",
        "MiB/s",
        kind="reference",
    ),
    Metric(
        "seq_write_vs_s3",
        "seq_write",
        "1 seq write",
        "fsync at end / S3 PUT ceiling",
        "x",
        kind="derived",
        of=("seq_write", "s3_put"),
    ),
    Metric(
        "seq_write_cpu",
        "seq_write",
        "1 seq write",
        "client CPU, fsync at end",
        "CPU-s/GiB",
        False,
    ),
    Metric(
        "seq_write_close_cpu",
        "seq_write",
        "1 seq write",
        "client CPU, close (until durable)",
        "CPU-s/GiB",
        False,
    ),
    Metric(
        "s3_put_cpu",
        "s3_put",
        "1 seq write",
        "CPU of the bare PUT loop (botocore)",
        "CPU-s/GiB",
        False,
        kind="reference",
    ),
    Metric("seq_read_warm", "seq_read_warm", "2 warm read", "local cache warm", "MiB/s"),
    Metric("seq_read_cold", "seq_read_cold", "3 cold read", "cache wiped, remounted", "MiB/s"),
    Metric(
        "seq_read_peer", "seq_read_peer", "3 cold read", "on node 2, written on node 1", "MiB/s"
    ),
    Metric("rand_read_iops", "rand_read", "4 random read", "4 KiB, 4 jobs", "IOPS"),
    Metric("rand_read_p99", "rand_read", "4 random read", "p99 latency", "µs", False),
    Metric("small_create", "small_files", "5 small files", "create 4 KiB files", "files/s"),
    Metric("small_list", "small_files", "5 small files", "list", "files/s"),
    Metric("small_read", "small_files", "5 small files", "read back", "files/s"),
    Metric("tree_extract", "src_tree", "5b source tree", "tar -x (files/s)", "files/s"),
    Metric("tree_rm", "src_tree", "5b source tree", "rm -rf (files/s)", "files/s"),
    Metric("meta_stat", "metadata", "6 metadata", "stat", "ops/s"),
    Metric("meta_mkdir", "metadata", "6 metadata", "mkdir", "ops/s"),
    Metric("meta_rmdir", "metadata", "6 metadata", "rmdir", "ops/s"),
    Metric("multi_read", "multi_read", "7 multi-reader", "3 nodes at once, cold", "MiB/s"),
    Metric(
        "multi_read_s3", "multi_read", "7 multi-reader", "S3 bytes / file size", "copies", False
    ),
]
METRIC_BY_KEY = {m.key: m for m in METRICS}
SINGLE_NODE = (
    "seq_write",
    "seq_read_warm",
    "rand_read",
    "seq_read_cold",
    "small_files",
    "src_tree",
    "metadata",
)
MULTI_NODE = ("seq_read_peer", "multi_read")
WORKLOADS = SINGLE_NODE + MULTI_NODE


@dataclass(frozen=True)
class SourceTree:
    """Workload 5b's input: an uncompressed tarball of a real source tree."""

    tarball: Path
    source: str
    files: int
    dirs: int
    bytes: int

    def describe(self) -> dict[str, object]:
        return {
            "tarball": str(self.tarball),
            "source": self.source,
            "files": self.files,
            "dirs": self.dirs,
            "bytes": self.bytes,
        }


SKIP_DIRS = frozenset({"__pycache__", "site-packages", ".git"})
MAX_TREE_FILE = MiB  # a source tree: bigger files (wheels, shared objects) are left out


def source_tarball(source: Path, max_files: int, cache_dir: Path) -> SourceTree:
    """The tarball of ``source`` (sorted walk, no ``__pycache__``/``site-packages``,
    no symlinks, no file over 1 MiB, the first ``max_files`` files), made once and kept
    in ``cache_dir`` (its name says what it holds: same tree, same tarball)."""
    source = source.resolve()
    if not source.is_dir():
        raise FileNotFoundError(f"source tree {source} is not a directory")
    members: list[tuple[Path, bool]] = []  # (path, is_dir)
    files = total = 0
    for dirpath, dirnames, filenames in os.walk(source):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS)
        here = Path(dirpath)
        picked: list[Path] = []
        for name in sorted(filenames):
            path = here / name
            try:
                st = path.lstat()
            except OSError:
                continue
            if not path.is_symlink() and path.is_file() and st.st_size <= MAX_TREE_FILE:
                picked.append(path)
                total += st.st_size
                if files + len(picked) >= max_files:
                    break
        members.append((here, True))
        members += [(f, False) for f in picked]
        files += len(picked)
        if files >= max_files:
            break
    dirs = sum(1 for _, is_dir in members if is_dir)
    digest = hashlib.sha256(
        "\n".join(str(m) for m, _ in members).encode() + str(total).encode()
    ).hexdigest()[:12]
    tarball = cache_dir / f"srctree-{source.name}-{files}f-{digest}.tar"
    if not tarball.exists():
        cache_dir.mkdir(parents=True, exist_ok=True)
        tmp = tarball.with_suffix(".tar.tmp")
        root = Path(source.name)

        def clean(info: tarfile.TarInfo) -> tarfile.TarInfo:
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            return info

        with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
            for path, _ in members:
                arcname = str(root / path.relative_to(source))
                tar.add(path, arcname=arcname, recursive=False, filter=clean)
        os.replace(tmp, tarball)
    return SourceTree(tarball, str(source), files, dirs, total)


@dataclass
class Params:
    file_size: int = 1024 * MiB
    small_files: int = 2000
    small_file_size: int = 4096
    dirs: int = 500
    rand_jobs: int = 4
    rand_runtime: float = 20.0
    time_limit: float = 300.0  # per measured run
    repeat: int = 3
    tree: SourceTree | None = None  # workload 5b's tarball (the harness makes it once)


@dataclass
class Run:
    """What a workload gets from the harness."""

    system: System
    params: Params
    drop_caches: Callable[[], None]
    progress: Callable[[str], None]
    s3_bytes: Callable[[], int | None]  # read-and-reset: bytes S3 served, None if not measured
    notes: list[str] = field(default_factory=list)

    def mount(self, i: int = 0) -> Path:
        return self.system.mounts[i]


Values = dict[str, list[float | None]]


class FioError(RuntimeError):
    pass


def fio(args: list[str], timeout: float) -> dict[str, object]:
    """Run fio with JSON output; its parsed report."""
    cmd = ["fio", "--output-format=json", *args]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired as exc:
        raise FioError(f"fio did not finish within {timeout:.0f}s: {' '.join(cmd)}") from exc
    text = out.stdout
    start, end = text.find("{"), text.rfind("}")
    if out.returncode != 0 or start < 0:
        raise FioError(f"fio failed ({out.returncode}): {(out.stderr or text)[-1500:]}")
    report: dict[str, object] = json.loads(text[start : end + 1])
    return report


def _jobs(report: dict[str, object]) -> list[dict[str, object]]:
    jobs = report.get("jobs")
    assert isinstance(jobs, list)
    return jobs


def _mib_s(report: dict[str, object], rw: str) -> float:
    """Aggregate MiB/s: all bytes over the longest job runtime."""
    total = 0
    runtime_ms = 0
    for job in _jobs(report):
        side = job[rw]
        assert isinstance(side, dict)
        total += int(side["io_bytes"])
        runtime_ms = max(runtime_ms, int(side["runtime"]))
    return total / MiB / max(runtime_ms / 1000.0, 1e-6)


def _common(p: Params) -> list[str]:
    return ["--ioengine=psync", "--fallocate=none", f"--runtime={p.time_limit:.0f}"]


def _size(path: Path) -> int:
    return os.stat(path).st_size


def _read_job(p: Params, path: Path, name: str) -> list[str]:
    return [
        f"--name={name}",
        f"--filename={path}",
        "--rw=read",
        "--bs=1M",
        f"--size={_size(path)}",
        "--readonly",
        *_common(p),
    ]


def _timed(p: Params) -> float:
    return p.time_limit + 120.0


# --- workload 1 ----------------------------------------------------------------------------
def _cpu_per_gib(before: float | None, after: float | None, written: int) -> float | None:
    if before is None or after is None or written <= 0:
        return None
    return (after - before) / (written / GiB)


def write_close(path: Path, size: int, deadline: float) -> tuple[int, float]:
    """Write ``size`` bytes in 1 MiB blocks and close, no fsync: (bytes written, seconds
    from open until close returned). Every 64 KiB carries its own 16-byte stamp, so no
    two chunks of any size are alike (as fio's ``scramble_buffers``): no deduplication.
    Stops early past ``deadline`` (time.monotonic())."""
    block = bytearray(os.urandom(MiB))
    nonce = os.urandom(8)
    view = memoryview(block)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    written = 0
    try:
        i = 0
        while written < size:
            for off in range(0, MiB, 64 * 1024):
                struct.pack_into("<8sQ", block, off, nonce, i)
                i += 1
            chunk = view[: min(MiB, size - written)]
            while chunk:
                n = os.write(fd, chunk)
                chunk = chunk[n:]
                written += n
            if i % 1024 == 0 and time.monotonic() > deadline:  # every 64 MiB
                break
    finally:
        os.close(fd)  # an error here (the system refused the data) propagates
    return written, time.perf_counter() - t0


def _make_durable(run: Run, rel: str, size: int) -> None:
    """After a measured close: fsync (data in S3 for the systems that do so on fsync),
    then the system's own wait (rclone uploads after close). Not measured."""
    fd = os.open(run.mount() / rel, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    run.system.settle(0, rel, size)


def seq_write(run: Run) -> Values:
    """One file per repetition, fsync at end (fio); the first one stays as the read target
    (``seq.dat``). Then per repetition one file written and closed without fsync (timed
    until close returns), made durable (fsync, settle: unmeasured) and removed. Client CPU
    is the mount process's, from before the write until the file is durable."""
    p = run.params
    base = run.mount() / BENCH_DIR
    base.mkdir(exist_ok=True)
    out: Values = {
        "seq_write": [],
        "seq_write_cpu": [],
        "seq_write_close": [],
        "seq_write_close_cpu": [],
    }
    for r in range(p.repeat):
        rel = f"{BENCH_DIR}/seq-w{r}.dat"
        cpu0 = run.system.cpu_seconds()
        report = fio(
            [
                "--name=seqwrite",
                f"--filename={run.mount() / rel}",
                "--rw=write",
                "--bs=1M",
                f"--size={p.file_size}",
                "--end_fsync=1",
                *_common(p),
            ],
            _timed(p),
        )
        run.system.settle(0, rel, p.file_size)
        cpu = _cpu_per_gib(cpu0, run.system.cpu_seconds(), p.file_size)
        out["seq_write"].append(_mib_s(report, "write"))
        out["seq_write_cpu"].append(cpu)
        if r:
            (run.mount() / rel).unlink()
        run.progress(
            f"seq_write rep {r + 1}/{p.repeat}: {out['seq_write'][-1]:.1f} MiB/s"
            + ("" if cpu is None else f", client {cpu:.2f} CPU-s/GiB")
        )
    for r in range(p.repeat):
        rel = f"{BENCH_DIR}/seq-c{r}.dat"
        cpu0 = run.system.cpu_seconds()
        written, seconds = write_close(run.mount() / rel, p.file_size, _deadline(p))
        _make_durable(run, rel, written)
        cpu = _cpu_per_gib(cpu0, run.system.cpu_seconds(), written)
        out["seq_write_close"].append(written / MiB / max(seconds, 1e-6))
        out["seq_write_close_cpu"].append(cpu)
        (run.mount() / rel).unlink()
        run.progress(
            f"seq_write (close, no fsync) rep {r + 1}/{p.repeat}: "
            f"{out['seq_write_close'][-1]:.1f} MiB/s"
            + ("" if cpu is None else f", client {cpu:.2f} CPU-s/GiB")
        )
    os.rename(base / "seq-w0.dat", run.mount() / SEQ_FILE)
    run.system.settle(0, SEQ_FILE, p.file_size)
    return out


# --- workload 2 ----------------------------------------------------------------------------
def _prime(path: Path) -> None:
    """Read the whole file once so the system's local cache holds it (not measured)."""
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(MiB)
        while f.readinto(buf):
            pass


def seq_read_warm(run: Run) -> Values:
    p = run.params
    path = run.mount() / SEQ_FILE
    _prime(path)
    values: list[float | None] = []
    for r in range(p.repeat):
        run.drop_caches()
        values.append(_mib_s(fio(_read_job(p, path, "warmread"), _timed(p)), "read"))
        run.progress(f"seq_read_warm rep {r + 1}/{p.repeat}: {values[-1]:.1f} MiB/s")
    return {"seq_read_warm": values}


# --- workload 3 ----------------------------------------------------------------------------
def seq_read_cold(run: Run) -> Values:
    p = run.params
    values: list[float | None] = []
    for r in range(p.repeat):
        run.system.restart_nodes([0], wipe=True)
        run.drop_caches()
        path = run.mount() / SEQ_FILE
        values.append(_mib_s(fio(_read_job(p, path, "coldread"), _timed(p)), "read"))
        run.progress(f"seq_read_cold rep {r + 1}/{p.repeat}: {values[-1]:.1f} MiB/s")
    return {"seq_read_cold": values}


def write_seq_file(run: Run) -> None:
    """Setup: the file is written on node 1 and made durable (not measured)."""
    p = run.params
    (run.mount(0) / BENCH_DIR).mkdir(exist_ok=True)
    fio(
        [
            "--name=clusterwrite",
            f"--filename={run.mount(0) / SEQ_FILE}",
            "--rw=write",
            "--bs=1M",
            f"--size={p.file_size}",
            "--end_fsync=1",
            *_common(p),
        ],
        _timed(p),
    )
    run.system.settle(0, SEQ_FILE, p.file_size)


def _wait_visible(path: Path, size: int, timeout: float = 60.0) -> None:
    """Another node sees a file written elsewhere within its metadata cache timeout."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if _size(path) == size:
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise FioError(f"{path} not visible with size {size} within {timeout:.0f}s")
        time.sleep(0.2)


def seq_read_peer(run: Run) -> Values:
    """Cold on node 2 (cache wiped, remounted), warm on node 1 where it was written (and
    read once, so that node 1's cache holds it whatever the system's write policy)."""
    p = run.params
    _prime(run.mount(0) / SEQ_FILE)
    values: list[float | None] = []
    for r in range(p.repeat):
        run.system.restart_nodes([1], wipe=True)
        run.drop_caches()
        path = run.mount(1) / SEQ_FILE
        _wait_visible(path, p.file_size)
        values.append(_mib_s(fio(_read_job(p, path, "peerread"), _timed(p)), "read"))
        run.progress(f"seq_read_peer rep {r + 1}/{p.repeat}: {values[-1]:.1f} MiB/s")
    return {"seq_read_peer": values}


# --- workload 4 ----------------------------------------------------------------------------
RAND_RAMP = 5.0  # seconds of random reads before fio starts measuring


def _page_cache_room() -> int | None:
    """``MemAvailable`` in bytes (what the page cache may hold), ``None`` if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def rand_read(run: Run) -> Values:
    """Random 4 KiB reads on a file in use, measured as its user sees them.

    The file was just read (``_prime``), so each system's local cache holds it, and so does
    the page cache beneath that cache (the file fits in RAM: noted when it does not). No
    page-cache drop before a run: after one, a short run measures how fast each system's
    cache files come back from the disk (random reads warm 1 GiB in about the run's own
    length), not random reads of a cached file; s3fs read 12.6k IOPS that way where it
    serves 46k once warm. ``O_DIRECT`` (each read reaches the filesystem, not the kernel's
    cache of the mount) and ``RAND_RAMP`` s unmeasured at the start of every run, so the
    figure is the steady state, whatever each system keeps where.
    """
    p = run.params
    path = run.mount() / SEQ_FILE
    _prime(path)  # "on the cached file", also when seq_read_warm did not run first
    room = _page_cache_room()
    if room is not None and _size(path) > room // 2:
        run.notes.append(
            f"random reads: the file ({_size(path) >> 20} MiB) does not fit in the page cache "
            f"({room >> 20} MiB available): disk-bound"
        )
    iops: list[float | None] = []
    p99: list[float | None] = []
    direct = True
    for r in range(p.repeat):
        args = [
            "--name=randread",
            f"--filename={path}",
            "--rw=randread",
            "--bs=4k",
            f"--size={_size(path)}",
            f"--numjobs={p.rand_jobs}",
            "--time_based",
            f"--ramp_time={RAND_RAMP:.0f}",
            f"--runtime={p.rand_runtime:.0f}",
            "--group_reporting",
            "--norandommap",
            "--readonly",
            "--ioengine=psync",
        ]
        timeout = RAND_RAMP + p.rand_runtime + 120
        try:
            report = fio([*args, f"--direct={int(direct)}"], timeout)
        except FioError:
            if not direct:
                raise
            direct = False  # O_DIRECT refused by this FUSE filesystem: the kernel's cache too
            run.notes.append("random reads: O_DIRECT refused, buffered reads used")
            report = fio([*args, "--direct=0"], timeout)
        job = _jobs(report)[0]["read"]
        assert isinstance(job, dict)
        iops.append(float(job["iops"]))
        pct = job["clat_ns"].get("percentile", {})
        p99.append(float(pct["99.000000"]) / 1000.0 if "99.000000" in pct else None)
        run.progress(
            f"rand_read rep {r + 1}/{p.repeat}: {iops[-1]:.0f} IOPS, p99 {p99[-1] or 0:.0f} µs"
            f"{'' if direct else ' (buffered)'}"
        )
    return {"rand_read_iops": iops, "rand_read_p99": p99}


# --- workload 5 ----------------------------------------------------------------------------
def _deadline(p: Params) -> float:
    return time.monotonic() + p.time_limit


def small_files(run: Run) -> Values:
    p = run.params
    payload = os.urandom(p.small_file_size)
    out: Values = {"small_create": [], "small_list": [], "small_read": []}
    for r in range(p.repeat):
        d = run.mount() / BENCH_DIR / f"small-{r}"
        d.mkdir(parents=True, exist_ok=True)
        deadline = _deadline(p)
        t0 = time.perf_counter()
        done = 0
        for i in range(p.small_files):
            with open(d / f"f{i:06d}", "wb", buffering=0) as f:
                f.write(payload)
            done += 1
            if done % 50 == 0 and time.monotonic() > deadline:
                break
        out["small_create"].append(done / (time.perf_counter() - t0))

        run.drop_caches()
        t0 = time.perf_counter()
        names = os.listdir(d)
        out["small_list"].append(len(names) / (time.perf_counter() - t0))
        if len(names) != done:
            raise RuntimeError(f"listed {len(names)} files in {d}, created {done}")

        run.drop_caches()
        deadline = _deadline(p)
        t0 = time.perf_counter()
        count = 0
        for name in names:
            with open(d / name, "rb", buffering=0) as f:
                if len(f.read()) != p.small_file_size:
                    raise RuntimeError(f"{d / name}: short read")
            count += 1
            if count % 50 == 0 and time.monotonic() > deadline:
                break
        out["small_read"].append(count / (time.perf_counter() - t0))
        run.progress(
            f"small_files rep {r + 1}/{p.repeat}: create {out['small_create'][-1]:.0f}, "
            f"list {out['small_list'][-1]:.0f}, read {out['small_read'][-1]:.0f} files/s"
        )
    return out


# --- workload 5b ---------------------------------------------------------------------------
def _count_files(d: Path) -> int:
    return sum(len(files) for _, _, files in os.walk(d))


def _run_bounded(cmd: list[str], limit: float) -> tuple[float, bool]:
    """Run ``cmd`` (our own child); (seconds, finished). Past ``limit`` it is killed
    (by its pid) and reported unfinished; a failure raises with its stderr."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        _, err = proc.communicate(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return time.perf_counter() - t0, False
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err.decode()[-1500:]}")
    return elapsed, True


def src_tree(run: Run) -> Values:
    """``tar -x`` of a real source tree (regular files/s), then ``rm -rf`` of it."""
    p = run.params
    tree = p.tree
    if tree is None:
        raise RuntimeError("no source-tree tarball (the harness makes it before the run)")
    out: Values = {"tree_extract": [], "tree_rm": []}
    for r in range(p.repeat):
        d = run.mount() / BENCH_DIR / f"tree-{r}"
        d.mkdir(parents=True, exist_ok=True)
        cmd = ["tar", "-x", "--no-same-owner", "-f", str(tree.tarball), "-C", str(d)]
        seconds, finished = _run_bounded(cmd, p.time_limit)
        made = tree.files if finished else _count_files(d)
        out["tree_extract"].append(made / max(seconds, 1e-6))
        if finished and _count_files(d) != tree.files:
            raise RuntimeError(f"{d}: {_count_files(d)} files extracted, {tree.files} expected")
        seconds, finished = _run_bounded(["rm", "-rf", "--", str(d)], p.time_limit)
        removed = made if finished else made - _count_files(d)
        out["tree_rm"].append(removed / max(seconds, 1e-6))
        if not finished:
            shutil.rmtree(d, ignore_errors=True)  # the tree must be left clean
        run.progress(
            f"src_tree rep {r + 1}/{p.repeat} ({tree.files} files, {tree.dirs} dirs): "
            f"tar -x {out['tree_extract'][-1]:.0f}, rm -rf {out['tree_rm'][-1]:.0f} files/s"
        )
    return out


# --- workload 6 ----------------------------------------------------------------------------
def metadata(run: Run) -> Values:
    """stat the small files of workload 5 (cold dentry cache), mkdir/rmdir ``dirs`` dirs."""
    p = run.params
    src = run.mount() / BENCH_DIR / "small-0"
    names = sorted(os.listdir(src))
    out: Values = {"meta_stat": [], "meta_mkdir": [], "meta_rmdir": []}
    for r in range(p.repeat):
        run.drop_caches()
        deadline = _deadline(p)
        t0 = time.perf_counter()
        done = 0
        for name in names:
            os.stat(src / name)
            done += 1
            if done % 50 == 0 and time.monotonic() > deadline:
                break
        out["meta_stat"].append(done / (time.perf_counter() - t0))

        d = run.mount() / BENCH_DIR / f"meta-{r}"
        d.mkdir()
        made: list[Path] = []
        deadline = _deadline(p)
        t0 = time.perf_counter()
        for i in range(p.dirs):
            x = d / f"d{i:05d}"
            os.mkdir(x)
            made.append(x)
            if i % 50 == 49 and time.monotonic() > deadline:
                break
        out["meta_mkdir"].append(len(made) / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for x in made:  # all of them, even past the deadline: the tree must be left clean
            os.rmdir(x)
        out["meta_rmdir"].append(len(made) / (time.perf_counter() - t0))
        d.rmdir()
        run.progress(
            f"metadata rep {r + 1}/{p.repeat}: stat {out['meta_stat'][-1]:.0f}, "
            f"mkdir {out['meta_mkdir'][-1]:.0f}, rmdir {out['meta_rmdir'][-1]:.0f} ops/s"
        )
    return out


# --- workload 7 ----------------------------------------------------------------------------
def multi_read(run: Run) -> Values:
    """Every node cold (caches wiped, remounted); all read the same file at once."""
    p = run.params
    out: Values = {"multi_read": [], "multi_read_s3": []}
    for r in range(p.repeat):
        run.system.restart_nodes(None, wipe=True)
        run.drop_caches()
        paths = [m / SEQ_FILE for m in run.system.mounts]
        for path in paths:
            _wait_visible(path, p.file_size)
        run.s3_bytes()  # zero the counter
        args: list[str] = ["--rw=read", "--bs=1M", "--readonly", *_common(p)]
        for i, path in enumerate(paths):
            args += [f"--name=node{i + 1}", f"--filename={path}", f"--size={p.file_size}"]
        report = fio(args, _timed(p))
        served = run.s3_bytes()
        out["multi_read"].append(_mib_s(report, "read"))
        out["multi_read_s3"].append(None if served is None else served / p.file_size)
        copies = "n/a" if served is None else f"{served / p.file_size:.2f} copies"
        run.progress(
            f"multi_read rep {r + 1}/{p.repeat}: {out['multi_read'][-1]:.1f} MiB/s, "
            f"S3 served {copies}"
        )
    return out


def make_small_files(run: Run) -> None:
    """Setup for ``metadata`` when ``small_files`` did not run: the files, unmeasured."""
    d = run.mount() / BENCH_DIR / "small-0"
    d.mkdir(parents=True, exist_ok=True)
    payload = os.urandom(run.params.small_file_size)
    for i in range(run.params.small_files):
        with open(d / f"f{i:06d}", "wb", buffering=0) as f:
            f.write(payload)


RUNNERS: dict[str, Callable[[Run], Values]] = {
    "seq_write": seq_write,
    "seq_read_warm": seq_read_warm,
    "rand_read": rand_read,
    "seq_read_cold": seq_read_cold,
    "small_files": small_files,
    "src_tree": src_tree,
    "metadata": metadata,
    "seq_read_peer": seq_read_peer,
    "multi_read": multi_read,
}


def cleanup_tree(mount: Path) -> None:
    """Remove the workload tree from a mount (best effort, between systems)."""
    shutil.rmtree(mount / BENCH_DIR, ignore_errors=True)
