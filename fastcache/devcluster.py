"""``fastcache dev-start`` / ``dev-stop``: a whole cluster on loopback, in the background.

``start`` launches an embedded S3 (SeaweedFS, through a small supervisor process that owns
it), a coordinator on ``--base-port`` and N clients on the next ports, each with its own
NVMe dir and mount, as detached sessions logging to ``<dir>/logs``. What it started is
recorded in ``<dir>/cluster.json`` as soon as it is started, so ``stop`` (or a failed start)
stops exactly those processes, and nothing else. An empty ``--mount-prefix`` runs the
clients without mounts.

``--store postgres`` starts a local PostgreSQL under ``<dir>/postgres`` (``pgserver.py``)
and two coordinators on it, the second on the port after the clients'; odd-numbered
clients use the first, even-numbered ones the second. ``stop`` stops PostgreSQL too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from fastcache.config import token_from_env
from fastcache.pgserver import PostgresError, PostgresServer

STATE_FILE = "cluster.json"
START_TIMEOUT = 90.0
STOP_TIMEOUT = 15.0


class DevClusterError(RuntimeError):
    """Something did not come up; the message is printed on one line."""


# --- process helpers ---------------------------------------------------------------------
def _alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            state = f.read().rpartition(")")[2].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


def _mounted(path: str) -> bool:
    target = os.path.realpath(path)
    with open("/proc/mounts") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 1 and fields[1].replace("\\040", " ") == target:
                return True
    return False


def _unmount(path: str) -> None:
    if _mounted(path):
        subprocess.run(["fusermount", "-u", "-z", path], check=False, capture_output=True)


def _http_ok(url: str, token: str | None = None) -> bool:
    request = urllib.request.Request(url)
    if token:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=2.0) as resp:
            return resp.status == 200
    except (OSError, ValueError):
        return False


def _spawn(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> int:
    """A detached process (own session) logging to ``log_path``; returns its pid."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(("\n--- " + " ".join(cmd) + "\n").encode())
        log.flush()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env=env,
        )
    return proc.pid


def _terminate(pids: list[int], timeout: float = STOP_TIMEOUT) -> None:
    """SIGTERM each pid's process group (each runs in its own session), SIGKILL stragglers."""
    live = [p for p in pids if _alive(p)]
    for pid in live:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGCONT)  # a stopped process would not act on SIGTERM
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while live and time.monotonic() < deadline:
        _reap(live)
        live = [p for p in live if _alive(p)]
        if live:
            time.sleep(0.05)  # polling interval, bounded by the deadline
    for pid in live:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
    _reap(live)


def _reap(pids: list[int]) -> None:
    """Collect our own exited children (when start and stop run in one process)."""
    for pid in pids:
        with contextlib.suppress(ChildProcessError, OSError):
            os.waitpid(pid, os.WNOHANG)


# --- the state file ----------------------------------------------------------------------
def _load(directory: Path) -> dict[str, Any] | None:
    try:
        return json.loads((directory / STATE_FILE).read_text())
    except FileNotFoundError:
        return None
    except ValueError:
        return {}


def _save(directory: Path, state: dict[str, Any]) -> None:
    tmp = directory / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(directory / STATE_FILE)


def _pids(state: dict[str, Any]) -> list[int]:
    """Every pid the state file records, clients first (they flush through the others)."""
    procs = state.get("processes", [])
    order = {"client": 0, "coordinator": 1, "s3": 2}
    procs = sorted(procs, key=lambda p: order.get(p.get("role", ""), 3))
    return [int(p["pid"]) for p in procs if isinstance(p.get("pid"), int)]


# --- the S3 supervisor -------------------------------------------------------------------
def _s3_main(data_dir: str, info_path: str, s3_port: int) -> None:
    """Run one SeaweedServer until SIGTERM; publish endpoint and keys in ``info_path``.

    dev-start exits while the cluster runs, so S3 needs an owner that lives on: this process.
    The keys are kept in the data dir so a restart serves the same objects with the same keys.
    """
    from fastcache.log import setup_logging
    from fastcache.seaweed import SeaweedServer

    setup_logging("INFO")

    keys_path = Path(data_dir) / "keys.json"
    keys: dict[str, str] = {}
    with contextlib.suppress(OSError, ValueError):
        keys = json.loads(keys_path.read_text())
    server = SeaweedServer(
        data_dir,
        s3_port=s3_port or None,  # pinned when asked for; the other ports are picked free
        access_key=keys.get("access_key"),
        secret_key=keys.get("secret_key"),
    )
    stop = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal stop
        stop = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    server.start()
    try:
        keys_path.write_text(
            json.dumps({"access_key": server.access_key, "secret_key": server.secret_key})
        )
        keys_path.chmod(0o600)
        info = {
            "endpoint": server.endpoint,
            "access_key": server.access_key,
            "secret_key": server.secret_key,
            "weed_pid": server.pid,
        }
        tmp = Path(info_path + ".tmp")
        tmp.write_text(json.dumps(info))
        tmp.chmod(0o600)
        tmp.replace(info_path)
        # Block the signals only now: weed inherited the mask at spawn and must not have them
        # blocked. Then wait for one, checking once a second that weed still runs.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGINT})
        while not stop and server.running:
            if signal.sigtimedwait([signal.SIGTERM, signal.SIGINT], 1.0) is not None:
                break
    finally:
        server.stop()


# --- start / stop ------------------------------------------------------------------------
def _fail(message: str) -> int:
    print(f"fastcache dev-start: {message}", file=sys.stderr)
    return 1


def start(args: argparse.Namespace) -> int:
    directory = Path(args.dir).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    existing = _load(directory)
    if existing is not None:
        live = [p for p in _pids(existing) if _alive(p)]
        if live:
            return _fail(
                f"a cluster already runs from {directory} (pids {', '.join(map(str, live))}); "
                "run `fastcache dev-stop` first"
            )
        _cleanup(directory, existing)  # a stale file from a crashed run
    state: dict[str, Any] = {"dir": str(directory), "processes": [], "mounts": []}
    _save(directory, state)
    try:
        summary = _start(args, directory, state)
    except (DevClusterError, PostgresError, OSError) as exc:
        _cleanup(directory, state)
        return _fail(str(exc))
    except KeyboardInterrupt:
        _cleanup(directory, state)
        raise
    print(summary)
    return 0


def _start(args: argparse.Namespace, directory: Path, state: dict[str, Any]) -> str:
    logs = directory / "logs"
    logs.mkdir(exist_ok=True)
    python = sys.executable
    level = getattr(args, "log_level", "INFO")
    base = int(args.base_port)
    nodes = int(args.nodes)
    if nodes < 1:
        raise DevClusterError("--nodes must be at least 1")
    token = token_from_env()
    deadline = time.monotonic() + START_TIMEOUT

    def record(role: str, name: str, pid: int, **extra: Any) -> None:
        state["processes"].append({"role": role, "name": name, "pid": pid, **extra})
        _save(directory, state)

    # 1. S3
    info_path = directory / "s3-info.json"
    info_path.unlink(missing_ok=True)
    s3_dir = directory / "s3"
    s3_dir.mkdir(exist_ok=True)
    pid = _spawn(
        [
            python,
            "-m",
            "fastcache.devcluster",
            "s3",
            str(s3_dir),
            str(info_path),
            str(int(args.s3_port or 0)),
        ],
        logs / "s3.log",
    )
    record("s3", "s3", pid, log=str(logs / "s3.log"))
    info = _wait(deadline, "S3", pid, logs / "s3.log", lambda: _read_json(info_path))
    state["processes"][-1]["weed_pid"] = info.get("weed_pid")
    state["s3"] = {"endpoint": info["endpoint"]}
    _save(directory, state)

    # 2. PostgreSQL (--store postgres), then the coordinators
    store: list[str] = []
    ports = [base]
    if getattr(args, "store", "sqlite") == "postgres":
        server = PostgresServer(directory / "postgres")
        state["postgres"] = {"root": str(server.root), "port": server.port}
        _save(directory, state)
        server.start()
        try:
            server.create_database("fastcache")
        except PostgresError as exc:  # kept from an earlier run: the namespace goes on
            if "already exists" not in str(exc):
                raise
        store = ["--store", server.url("fastcache")]
        ports.append(base + nodes + 1)
    coordinators = []
    for n, port in enumerate(ports):
        name = "coordinator" if n == 0 else f"coordinator{n + 1}"
        coord_url = f"http://127.0.0.1:{port}"
        coord_log = logs / f"{name}.log"
        cmd = [python, "-m", "fastcache", "coordinator", "--host", "127.0.0.1", "--port",
               str(port), "--state-dir", str(directory / "coordinator"), *store,
               "--log-level", level]  # fmt: skip
        pid = _spawn(cmd, coord_log)
        record("coordinator", name, pid, url=coord_url, log=str(coord_log))
        coordinators.append((name, pid, coord_url, coord_log))
    for name, pid, coord_url, coord_log in coordinators:
        _wait(deadline, name, pid, coord_log, lambda u=coord_url: _http_ok(f"{u}/api/health"))

    # 3. clients
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": info["access_key"],
        "AWS_SECRET_ACCESS_KEY": info["secret_key"],
    }
    prefix = str(args.mount_prefix or "")
    clients = []
    for i in range(1, nodes + 1):
        port = base + i
        mount = f"{prefix}{i}" if prefix else None
        k = (i - 1) % len(coordinators)
        cmd = [
            python,
            "-m",
            "fastcache",
            "client",
            "--coordinator",  # its own coordinator first, the others to fail over to
            ",".join(u for _, _, u, _ in coordinators[k:] + coordinators[:k]),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--peer-id",
            f"client{i}",
            "--nvme-dir",
            str(directory / f"nvme{i}"),
            "--s3-endpoint",
            info["endpoint"],
            "--log-level",
            level,
        ]
        if mount:
            Path(mount).mkdir(parents=True, exist_ok=True)
            _unmount(mount)
            cmd += ["--mount", mount]
            state["mounts"].append(mount)
        client_log = logs / f"client{i}.log"
        pid = _spawn(cmd, client_log, env)
        url = f"http://127.0.0.1:{port}"
        record("client", f"client{i}", pid, url=url, mount=mount, log=str(client_log))
        clients.append((f"client{i}", pid, url, mount, client_log))
    for name, pid, url, mount, client_log in clients:

        def ready(url: str = url, mount: str | None = mount) -> bool:
            return _http_ok(f"{url}/api/health") and (mount is None or _mounted(mount))

        _wait(deadline, name, pid, client_log, ready)

    lines = [
        f"fastcache dev cluster running from {directory}",
        f"  S3           {info['endpoint']}  (log {logs / 's3.log'})",
    ]
    if "postgres" in state:
        lines.append(f"  PostgreSQL   {store[1]}  (log {directory / 'postgres' / 'server.log'})")
    for name, _pid, coord_url, coord_log in coordinators:
        lines.append(f"  {name:<12} {coord_url}  (log {coord_log})")
    for name, _pid, url, mount, client_log in clients:
        where = f"mounted at {mount}" if mount else "no mount"
        lines.append(f"  {name:<12} {url}  {where}  (log {client_log})")
    if token:
        lines.append("  token: $FASTCACHE_TOKEN")
    lines.append("stop with: fastcache dev-stop" + (f" --dir {directory}" if args.dir else ""))
    return "\n".join(lines)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _wait(deadline: float, what: str, pid: int, log_path: Path, ready: Any) -> Any:
    """Poll ``ready()`` until it is truthy; fail early if ``pid`` died, late at the deadline."""
    while True:
        result = ready()
        if result:
            return result
        if not _alive(pid):
            _reap([pid])
            raise DevClusterError(f"{what} exited during start: {_tail(log_path)}")
        if time.monotonic() > deadline:
            raise DevClusterError(f"{what} not ready within {START_TIMEOUT:.0f}s; see {log_path}")
        time.sleep(0.1)  # polling interval, bounded by the deadline


def _tail(path: Path) -> str:
    try:
        lines = [ln for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return f"see {path}"
    return (lines[-1].strip() if lines else "no output") + f" (see {path})"


def _cleanup(directory: Path, state: dict[str, Any]) -> None:
    _terminate(_pids(state))
    weed = [p.get("weed_pid") for p in state.get("processes", []) if p.get("weed_pid")]
    _terminate([int(p) for p in weed])  # only if the supervisor could not stop it
    for mount in state.get("mounts", []):
        _unmount(mount)
    pg = state.get("postgres")
    if pg:  # after the coordinators: they were its clients
        try:
            PostgresServer(Path(pg["root"]), int(pg["port"])).stop()
        except PostgresError as exc:
            print(f"fastcache dev-stop: PostgreSQL: {exc}", file=sys.stderr)
    (directory / STATE_FILE).unlink(missing_ok=True)


def stop(args: argparse.Namespace) -> int:
    directory = Path(args.dir).resolve()
    state = _load(directory)
    if state is None:
        print(f"no dev cluster recorded in {directory}")
        return 0
    live = [p for p in _pids(state) if _alive(p)]
    _cleanup(directory, state)
    print(f"stopped {len(live)} process(es) of the dev cluster in {directory}")
    return 0


if __name__ == "__main__" and len(sys.argv) == 5 and sys.argv[1] == "s3":
    _s3_main(sys.argv[2], sys.argv[3], int(sys.argv[4]))
