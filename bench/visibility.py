"""Cross-node visibility: how soon does node 2 see what node 1 just did?

Starts a two-node dev cluster (``fastcache dev-start --nodes 2``), then for each of N
operations on node 1 (create, rename, chmod, in turn) polls node 2 from the moment the call
returned until it sees the change, and prints the lag's p50/p99/max. With push invalidation
the first check already sees it; with timeouts alone the lag is up to ``--attr-timeout``.
It stops the cluster it started.

    python -m bench.visibility --ops 1000
"""

from __future__ import annotations

import argparse
import os
import stat
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _visible(check: object) -> tuple[float, int]:
    """Seconds until ``check()`` is true, and how many checks it took."""
    start = time.perf_counter()
    tries = 0
    while True:
        tries += 1
        if check():  # type: ignore[operator]
            return time.perf_counter() - start, tries
        if time.perf_counter() - start > 30:
            raise TimeoutError("node 2 never saw the change")


def _exists(path: Path) -> bool:
    try:
        os.stat(path)
    except FileNotFoundError:
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=1000)
    parser.add_argument("--base-port", type=int, default=18180)
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="fc-visibility-"))
    prefix = str(work / "mnt")
    cmd = [sys.executable, "-m", "fastcache"]
    common = ["--dir", str(work / "dev")]
    subprocess.run(
        [
            *cmd,
            "dev-start",
            *common,
            "--nodes",
            "2",
            "--base-port",
            str(args.base_port),
            "--mount-prefix",
            prefix,
        ],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    try:
        one, two = Path(prefix + "1") / "vis", Path(prefix + "2") / "vis"
        one.mkdir()
        lags: dict[str, list[float]] = {"create": [], "rename": [], "chmod": []}
        first_try = 0
        for i in range(args.ops):
            kind = ("create", "rename", "chmod")[i % 3]
            name = f"f{i // 3}"
            if kind == "create":
                _exists(two / name)  # node 2 caches "no such name"
                (one / name).write_bytes(b"x")
                lag, tries = _visible(lambda n=name: _exists(two / n))
            elif kind == "rename":
                _exists(two / name)
                os.rename(one / name, one / f"{name}.r")
                lag, tries = _visible(lambda n=name: not _exists(two / n))
            else:
                os.stat(two / f"{name}.r")
                os.chmod(one / f"{name}.r", 0o600)
                lag, tries = _visible(
                    lambda n=name: stat.S_IMODE(os.stat(two / f"{n}.r").st_mode) == 0o600
                )
            lags[kind].append(lag)
            first_try += tries == 1
        for kind, values in lags.items():
            values.sort()
            n = len(values)
            print(
                f"{kind:7s} n={n:4d}  p50 {values[n // 2] * 1e3:8.2f} ms  "
                f"p99 {values[min(n - 1, int(n * 0.99))] * 1e3:8.2f} ms  "
                f"max {values[-1] * 1e3:8.2f} ms"
            )
        print(f"seen on the first check after the call returned: {first_try}/{args.ops}")
    finally:
        subprocess.run([*cmd, "dev-stop", *common], check=False, stdout=subprocess.DEVNULL)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
