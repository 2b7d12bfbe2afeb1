"""Randomised, model-checked tests of the mount (``hypothesis``).

- ``test_namespace_matches_a_local_directory``: random creates, writes at offsets,
  truncates, renames (over existing targets, across directories, of directories), links,
  unlinks, mkdirs, rmdirs, symlinks, chmods and utimes applied to a mounted node and to a
  plain directory on the local disk; after every step the results (errno included) and the
  whole trees (names, types, modes, link counts, sizes, contents, symlink targets) must be
  the same.
- ``test_two_nodes_see_each_others_changes``: the same operations alternate between two
  nodes of one cluster, and the tree is read back through the node that did *not* make the
  change, right after the call returned: close-to-open visibility with nothing slept.
- ``test_data_integrity_against_a_model``: one file, random ``pwrite``/``pread``/
  ``truncate`` and ``mmap`` reads and writes, every read checked against an in-memory model,
  the file closed and reopened now and then, and read back whole through another node.

``make test`` runs a short budget with a fixed seed (derandomised: the same examples every
run); ``make test-long`` (``FASTCACHE_TEST_LONG=1``) a long, random one. A failure prints
the shrunk sequence of steps and a ``@reproduce_failure`` blob.
"""

from __future__ import annotations

import errno
import itertools
import mmap
import os
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    invariant,
    rule,
    run_state_machine_as_test,
)

from tests.mount.conftest import MountCluster

LONG = os.environ.get("FASTCACHE_TEST_LONG") == "1"


def _settings(short_examples: int, long_examples: int, steps: int = 0) -> settings:
    extra: dict[str, Any] = {"stateful_step_count": steps * (4 if LONG else 1)} if steps else {}
    return settings(
        max_examples=long_examples if LONG else short_examples,
        derandomize=not LONG,  # make test: a fixed seed, the same sequences every run
        deadline=None,  # a mount does I/O: no per-example time limit
        print_blob=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
        **extra,
    )


# A small universe of paths, so that operations collide: existing targets, missing
# parents, non-empty directories, directories moved into themselves.
PATHS = ["a", "b", "d1", "d1/a", "d1/b", "d1/d2", "d1/d2/a", "d2", "d2/a", "d2/d1"]
paths = st.sampled_from(PATHS)
small_data = st.binary(max_size=9000)
offsets = st.integers(0, 70_000)
modes = st.sampled_from([0o600, 0o644, 0o755, 0o700, 0o444])
mtimes = st.integers(1_000_000_000, 2_000_000_000).map(lambda s: s * 1_000_000_000 + 123)


def _outcome(fn: Callable[[], Any]) -> tuple[str, Any]:
    try:
        return ("ok", fn())
    except OSError as exc:
        return ("errno", errno.errorcode.get(exc.errno or 0, exc.errno))


def _write_new(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _pwrite(path: Path, offset: int, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


def _tree(root: Path) -> dict[str, tuple[Any, ...]]:
    """Everything a user can see of ``root``, path by path."""
    out: dict[str, tuple[Any, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        for name in [*dirnames, *filenames]:
            full = Path(dirpath) / name
            rel = str(full.relative_to(root))
            st_ = os.lstat(full)
            if stat.S_ISLNK(st_.st_mode):
                out[rel] = ("symlink", os.readlink(full))
            elif stat.S_ISDIR(st_.st_mode):
                out[rel] = ("dir", stat.S_IMODE(st_.st_mode), st_.st_nlink)
            else:
                data = full.read_bytes() if st_.st_mode & 0o444 else None
                out[rel] = ("file", stat.S_IMODE(st_.st_mode), st_.st_nlink, st_.st_size, data)
    return out


class _Ops:
    """The operations, each applied to one root; the machine runs them on both."""

    @staticmethod
    def create(root: Path, p: str, data: bytes) -> Any:
        return _write_new(root / p, data)

    @staticmethod
    def pwrite(root: Path, p: str, offset: int, data: bytes) -> Any:
        return _pwrite(root / p, offset, data)

    @staticmethod
    def truncate(root: Path, p: str, size: int) -> Any:
        return os.truncate(root / p, size)

    @staticmethod
    def rename(root: Path, src: str, dst: str) -> Any:
        return os.rename(root / src, root / dst)

    @staticmethod
    def link(root: Path, src: str, dst: str) -> Any:
        return os.link(root / src, root / dst, follow_symlinks=False)

    @staticmethod
    def unlink(root: Path, p: str) -> Any:
        return os.unlink(root / p)

    @staticmethod
    def mkdir(root: Path, p: str) -> Any:
        return os.mkdir(root / p, 0o755)

    @staticmethod
    def rmdir(root: Path, p: str) -> Any:
        return os.rmdir(root / p)

    @staticmethod
    def symlink(root: Path, p: str, to: str) -> Any:
        return os.symlink(to, root / p)

    @staticmethod
    def chmod(root: Path, p: str, mode: int) -> Any:
        return os.chmod(root / p, mode)  # Linux cannot chmod a symlink itself: its target

    @staticmethod
    def utime(root: Path, p: str, mtime_ns: int) -> Any:
        os.utime(root / p, ns=(mtime_ns, mtime_ns), follow_symlinks=False)
        return os.lstat(root / p).st_mtime_ns

    @staticmethod
    def read(root: Path, p: str) -> Any:
        return (root / p).read_bytes()


def _machine(
    mounts: list[Path], local: Path, compare_through: Callable[[int], int]
) -> type[RuleBasedStateMachine]:
    """A state machine over fresh directories in ``mounts`` (one per node, the same
    directory) and in ``local``. Step ``n`` runs on node ``n % len(mounts)`` and the trees
    are compared through node ``compare_through(n)``."""
    counter = itertools.count()

    class Namespace(RuleBasedStateMachine):
        def __init__(self) -> None:
            super().__init__()
            name = f"model-{os.getpid()}-{next(counter)}"
            self.dirs = [m / name for m in mounts]
            self.dirs[0].mkdir()
            self.ref = local / name
            self.ref.mkdir()
            self.step = 0
            self.last_node = 0

        def teardown(self) -> None:
            shutil.rmtree(self.dirs[0], ignore_errors=True)
            shutil.rmtree(self.ref, ignore_errors=True)

        def _both(self, op: Callable[..., Any], *args: Any) -> None:
            self.last_node = self.step % len(self.dirs)
            self.step += 1
            ours = _outcome(lambda: op(self.dirs[self.last_node], *args))
            theirs = _outcome(lambda: op(self.ref, *args))
            assert ours == theirs, f"{op.__name__}{args}: mount {ours}, local disk {theirs}"

        @rule(p=paths, data=small_data)
        def create(self, p: str, data: bytes) -> None:
            self._both(_Ops.create, p, data)

        @rule(p=paths, offset=offsets, data=small_data)
        def pwrite(self, p: str, offset: int, data: bytes) -> None:
            self._both(_Ops.pwrite, p, offset, data)

        @rule(p=paths, size=st.integers(0, 80_000))
        def truncate(self, p: str, size: int) -> None:
            self._both(_Ops.truncate, p, size)

        @rule(src=paths, dst=paths)
        def rename(self, src: str, dst: str) -> None:
            self._both(_Ops.rename, src, dst)

        @rule(src=paths, dst=paths)
        def link(self, src: str, dst: str) -> None:
            self._both(_Ops.link, src, dst)

        @rule(p=paths)
        def unlink(self, p: str) -> None:
            self._both(_Ops.unlink, p)

        @rule(p=paths)
        def mkdir(self, p: str) -> None:
            self._both(_Ops.mkdir, p)

        @rule(p=paths)
        def rmdir(self, p: str) -> None:
            self._both(_Ops.rmdir, p)

        @rule(p=paths, to=st.sampled_from(["a", "../a", "d1/a", "nowhere", "/abs/path"]))
        def symlink(self, p: str, to: str) -> None:
            self._both(_Ops.symlink, p, to)

        @rule(p=paths, mode=modes)
        def chmod(self, p: str, mode: int) -> None:
            self._both(_Ops.chmod, p, mode)

        @rule(p=paths, mtime_ns=mtimes)
        def utime(self, p: str, mtime_ns: int) -> None:
            self._both(_Ops.utime, p, mtime_ns)

        @rule(p=paths)
        def read(self, p: str) -> None:
            self._both(_Ops.read, p)

        @invariant()
        def trees_match(self) -> None:
            seen_on = compare_through(self.last_node)
            assert _tree(self.dirs[seen_on]) == _tree(self.ref)

    return Namespace


def test_namespace_matches_a_local_directory(one_node: MountCluster, tmp_path: Path) -> None:
    machine = _machine([one_node.nodes[0].mnt], tmp_path, lambda node: 0)
    run_state_machine_as_test(machine, settings=_settings(12, 300, steps=30))


def test_two_nodes_see_each_others_changes(two_nodes: MountCluster, tmp_path: Path) -> None:
    a, b = two_nodes.nodes
    # the tree is read back through the node that did not make the change
    machine = _machine([a.mnt, b.mnt], tmp_path, lambda node: 1 - node)
    run_state_machine_as_test(machine, settings=_settings(10, 200, steps=30))


# --- data integrity (fsx) ------------------------------------------------------------------
CHUNK = 4 << 20  # the default chunk size: operations cross chunk boundaries
MAX_SIZE = 3 * CHUNK + 12_345
positions = st.one_of(
    st.integers(0, MAX_SIZE),
    st.sampled_from([0, 1, 4095, 4096, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK - 7]),
)
lengths = st.one_of(st.integers(1, 9000), st.integers(1, 300_000))
fsx_ops = st.one_of(
    st.tuples(st.just("pwrite"), positions, lengths, st.integers(0, 255)),
    st.tuples(st.just("pread"), positions, lengths),
    st.tuples(st.just("truncate"), positions),
    st.tuples(st.just("mmap_read"), positions, lengths),
    st.tuples(st.just("mmap_write"), positions, lengths, st.integers(0, 255)),
    st.tuples(st.just("reopen")),
    st.tuples(st.just("other_node")),
)


def _fill(length: int, seed: int) -> bytes:
    """Bytes that differ with position and seed (a misplaced block shows)."""
    block = bytes((seed + i * 7) & 0xFF for i in range(251))
    return (block * (length // 251 + 1))[:length]


@given(ops=st.lists(fsx_ops, min_size=1, max_size=40))
@_settings(8, 200)
def test_data_integrity_against_a_model(
    two_nodes: MountCluster, ops: list[tuple[Any, ...]]
) -> None:
    a, b = two_nodes.nodes
    name = f"fsx-{os.getpid()}-{next(_FSX_NAMES)}"
    path, other = a.mnt / name, b.mnt / name
    model = bytearray()
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for i, op in enumerate(ops):
            kind = op[0]
            where = f"step {i} {op}"
            if kind == "pwrite":
                _, off, length, seed = op
                data = _fill(length, seed)
                assert os.pwrite(fd, data, off) == length, where
                if off > len(model):
                    model.extend(bytes(off - len(model)))
                model[off : off + length] = data
            elif kind == "pread":
                _, off, length = op
                assert os.pread(fd, length, off) == bytes(model[off : off + length]), where
            elif kind == "truncate":
                _, size = op
                os.ftruncate(fd, size)
                del model[size:]
                model.extend(bytes(size - len(model)))
            elif kind in ("mmap_read", "mmap_write"):
                if not model:
                    continue  # an empty file cannot be mapped
                off, length = op[1] % len(model), op[2]
                length = min(length, len(model) - off)
                page = off - off % mmap.ALLOCATIONGRANULARITY
                with mmap.mmap(fd, off + length - page, offset=page) as m:
                    if kind == "mmap_read":
                        assert m[off - page :] == bytes(model[off : off + length]), where
                    else:
                        data = _fill(length, op[3])
                        m[off - page :] = data
                        m.flush()
                        model[off : off + length] = data
            elif kind == "reopen":
                os.close(fd)
                fd = os.open(path, os.O_RDWR)
                assert os.fstat(fd).st_size == len(model), where
            else:  # other_node: close (commit), then read the whole file through node B
                os.close(fd)
                assert other.read_bytes() == bytes(model), where
                fd = os.open(path, os.O_RDWR)
        assert os.fstat(fd).st_size == len(model)
    finally:
        os.close(fd)
    assert path.read_bytes() == bytes(model)
    assert other.read_bytes() == bytes(model)
    path.unlink()


_FSX_NAMES = itertools.count()
