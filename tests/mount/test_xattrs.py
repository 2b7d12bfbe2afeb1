"""Extended attributes through real mounts: errno against a local ext4 directory, flags,
another user, two nodes, rename and links, ``cp -a`` and ``rsync -aX``, a coordinator restart.

The local directory is a ``tmp_path`` on the machine's disk (ext4, user xattrs on). Where
ext4 answers differently by design, the Linux-documented answer is asserted instead: a value
may hold 64 KiB (``XATTR_SIZE_MAX``; ext4 without ``ea_inode`` has one block) and
``system.posix_acl_*`` answers ENOTSUP (fastcache has no ACLs; ext4 has).
"""

from __future__ import annotations

import ast
import contextlib
import ctypes
import errno
import os
import shutil
import sqlite3
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from fastcache.testing.cluster import http
from tests.mount.conftest import MountCluster
from tests.mount.test_posix import outcome, same

LIBC = ctypes.CDLL(None, use_errno=True)
XATTR_SIZE_MAX = 65536


def _raw(call: str, path: Path, *args: Any) -> tuple[int, bytes | int]:
    """``getxattr(2)``/``listxattr(2)`` with an exact buffer size (0: the size query); the
    answer and the bytes, or ``-1`` and the errno. Python's ``os`` hides both cases."""
    *head, size = args
    buf = ctypes.create_string_buffer(max(size, 1))
    fn = getattr(LIBC, call)
    fn.restype = ctypes.c_ssize_t
    n = fn(os.fsencode(path), *head, buf if size else None, ctypes.c_size_t(size))
    if n < 0:
        return -1, ctypes.get_errno()
    return n, buf.raw[:n] if size else b""


def _xattrs(path: Path) -> dict[str, bytes]:
    return {
        n: os.getxattr(path, n, follow_symlinks=False)
        for n in os.listxattr(path, follow_symlinks=False)
    }


@pytest.fixture
def dirs(two_nodes: MountCluster, request: pytest.FixtureRequest) -> Iterator[tuple[Path, Path]]:
    """A fresh directory: its path through node A's mount and through node B's."""
    name = "x-" + request.node.name.replace("[", "_").replace("]", "_")
    a, b = two_nodes.nodes
    (a.mnt / name).mkdir()
    os.chmod(a.mnt / name, 0o755)
    yield a.mnt / name, b.mnt / name


def test_errno_as_a_local_directory(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    on_a, _ = dirs

    def run(root: Path) -> list[Any]:
        f = root / "f"
        f.write_bytes(b"data")
        (root / "d").mkdir(exist_ok=True)
        os.symlink("f", root / "link")
        os.mkfifo(root / "fifo")
        checks: list[Callable[[Path], Any]] = [
            lambda r: os.getxattr(f, "user.none"),  # ENODATA
            lambda r: os.setxattr(f, "user.k", b"v1"),
            lambda r: os.getxattr(f, "user.k"),
            lambda r: os.setxattr(f, "user.k", b"v2", os.XATTR_CREATE),  # EEXIST
            lambda r: os.setxattr(f, "user.new", b"n", os.XATTR_REPLACE),  # ENODATA
            lambda r: os.setxattr(f, "user.k", b"v3", os.XATTR_REPLACE),
            lambda r: os.setxattr(f, "user.c", b"", os.XATTR_CREATE),
            lambda r: (os.getxattr(f, "user.k"), os.getxattr(f, "user.c")),
            lambda r: sorted(os.listxattr(f)),
            lambda r: os.removexattr(f, "user.none"),  # ENODATA
            lambda r: os.removexattr(f, "user.c"),
            lambda r: sorted(os.listxattr(f)),
            lambda r: os.setxattr(f, "user." + "n" * 251, b""),  # 256 bytes: ERANGE
            lambda r: os.getxattr(f, ""),  # ERANGE
            lambda r: os.setxattr(f, "user.big", b"x" * (XATTR_SIZE_MAX + 1)),  # E2BIG
            lambda r: os.setxattr(f, "user.", b"v"),  # EINVAL
            lambda r: os.setxattr(f, "os2.k", b"v"),  # EOPNOTSUPP
            lambda r: os.getxattr(f, "nonamespace"),  # EOPNOTSUPP
            lambda r: os.setxattr(f, "trusted.t", b"\x00\xff"),
            lambda r: os.getxattr(f, "trusted.t"),
            lambda r: os.setxattr(f, "security.s", b"label"),
            lambda r: os.getxattr(f, "security.s"),
            lambda r: sorted(os.listxattr(f)),
            lambda r: os.setxattr(r / "d", "user.dir", b"on a directory"),
            lambda r: os.getxattr(r / "d", "user.dir"),
            lambda r: os.setxattr(r / "link", "user.k", b"v", follow_symlinks=False),  # EPERM
            lambda r: os.getxattr(r / "link", "user.k", follow_symlinks=False),  # ENODATA
            lambda r: os.getxattr(r / "link", "user.k"),  # followed: the file's
            lambda r: os.setxattr(r / "fifo", "user.k", b"v"),  # EPERM
            lambda r: os.setxattr(r / "link", "trusted.t", b"l", follow_symlinks=False),
            lambda r: os.listxattr(r / "link", follow_symlinks=False),
            lambda r: _raw("getxattr", f, b"user.k", 0),  # the size query
            lambda r: _raw("getxattr", f, b"user.k", 1),  # ERANGE
            lambda r: _raw("getxattr", f, b"user.k", 2),
            lambda r: _raw("listxattr", f, 0),
            lambda r: _raw("listxattr", f, 5),  # ERANGE
            lambda r: _raw("listxattr", r / "d", 100),
        ]
        return [outcome(check, root) for check in checks]

    got = same(run, on_a, tmp_path)
    assert got[0] == ("errno", "ENODATA") and got[2] == b"v1"
    assert got[3] == ("errno", "EEXIST") and got[4] == ("errno", "ENODATA")
    assert got[7] == (b"v3", b"") and got[9] == ("errno", "ENODATA")
    assert got[12] == got[13] == ("errno", "ERANGE") and got[14] == ("errno", "E2BIG")
    assert got[15] == ("errno", "EINVAL") and got[16] == got[17] == ("errno", "ENOTSUP")
    assert got[22] == ["security.s", "trusted.t", "user.k"]
    assert got[25] == got[28] == ("errno", "EPERM") and got[26] == ("errno", "ENODATA")
    assert got[31] == (2, b"") and got[32] == (-1, errno.ERANGE) and got[33] == (2, b"v3")
    assert got[35] == (-1, errno.ERANGE)


def test_where_linux_documents_more_than_ext4_gives(dirs: tuple[Path, Path]) -> None:
    on_a, _ = dirs
    f = on_a / "f"
    f.write_bytes(b"")
    os.setxattr(f, "user.max", b"m" * XATTR_SIZE_MAX)  # ext4 (no ea_inode): ENOSPC
    assert os.getxattr(f, "user.max") == b"m" * XATTR_SIZE_MAX
    (on_a / "d").mkdir()
    # no ACLs (a default ACL on a directory: the kernel answers for a file itself)
    for name, path in (("system.posix_acl_access", f), ("system.posix_acl_default", on_a / "d")):
        with pytest.raises(OSError) as info:
            os.getxattr(path, name)
        assert info.value.errno == errno.ENOTSUP
        with pytest.raises(OSError) as info:
            os.setxattr(path, name, b"\x02\x00\x00\x00")  # an empty ACL (version 2)
        assert info.value.errno == errno.ENOTSUP
        with pytest.raises(OSError) as info:
            os.removexattr(path, name)
        assert info.value.errno == errno.ENOTSUP


def _as_nobody(directory: Path, fn: Callable[[], Any]) -> Any:
    """``fn()`` in a child that changed to uid/gid 65534: ``("ok", result)`` or the errno."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(read)
        try:
            os.chdir(directory)  # the path above is not searchable for nobody
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            answer = repr(("ok", fn()))
        except OSError as exc:
            answer = repr(("errno", errno.errorcode.get(exc.errno or 0, exc.errno)))
        except BaseException as exc:
            answer = repr(("bug", str(exc)))
        os.write(write, answer.encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        answer = f.read()
    assert os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) == 0
    return ast.literal_eval(answer)


def test_another_user_as_on_a_local_directory(dirs: tuple[Path, Path], tmp_path: Path) -> None:
    """The kernel checks the caller (default_permissions): user.* needs read permission to
    read and write permission to change, trusted.* is root's, security.* root's to change,
    a sticky directory's user.* its owner's; listing needs nothing and hides trusted.*."""
    on_a, _ = dirs
    roots = (on_a, tmp_path)
    for root in roots:
        os.chmod(root, 0o755)
        for name, mode in (("public", 0o644), ("secret", 0o600), ("theirs", 0o644)):
            (root / name).write_bytes(b"x")
            os.chmod(root / name, mode)
            os.setxattr(root / name, "user.k", b"v")
            os.setxattr(root / name, "trusted.t", b"t")
            os.setxattr(root / name, "security.s", b"s")
        os.chown(root / "theirs", 65534, 65534)
        (root / "sticky").mkdir()
        os.chmod(root / "sticky", 0o1777)
    checks: list[Callable[[], Any]] = [
        lambda: os.getxattr("public", "user.k"),
        lambda: os.setxattr("public", "user.k", b"w"),  # EACCES
        lambda: os.removexattr("public", "user.k"),  # EACCES
        lambda: os.getxattr("secret", "user.k"),  # EACCES
        lambda: sorted(os.listxattr("secret")),  # no permission needed; no trusted.*
        lambda: os.getxattr("public", "trusted.t"),  # ENODATA
        lambda: os.setxattr("public", "trusted.t", b"w"),  # EPERM
        lambda: os.getxattr("public", "security.s"),
        lambda: os.setxattr("theirs", "security.s", b"w"),  # EPERM, even on one's own
        lambda: os.setxattr("theirs", "user.k", b"mine"),
        lambda: os.getxattr("theirs", "user.k"),
        lambda: os.setxattr("sticky", "user.k", b"w"),  # EPERM
    ]
    answers = {root: [_as_nobody(root, check) for check in checks] for root in roots}
    assert answers[on_a] == answers[tmp_path]
    got = answers[on_a]
    assert got[0] == ("ok", b"v") and got[1] == got[2] == got[3] == ("errno", "EACCES")
    assert got[4] == ("ok", ["security.s", "user.k"]) and got[5] == ("errno", "ENODATA")
    assert got[6] == got[8] == got[11] == ("errno", "EPERM") and got[10] == ("ok", b"mine")


def test_another_node_sees_each_change_at_once(dirs: tuple[Path, Path]) -> None:
    on_a, on_b = dirs
    (on_a / "f").write_bytes(b"data")
    for _ in range(2):  # B caches the file and "no attributes" first
        assert os.listxattr(on_b / "f") == []
        with pytest.raises(OSError) as info:
            os.getxattr(on_b / "f", "user.k")
        assert info.value.errno == errno.ENODATA
    os.setxattr(on_a / "f", "user.k", b"one")
    assert os.getxattr(on_b / "f", "user.k") == b"one"  # no sleep: told before A returned
    os.setxattr(on_a / "f", "user.k", b"two")
    assert os.getxattr(on_b / "f", "user.k") == b"two"
    os.setxattr(on_b / "f", "user.b", b"from B")
    assert _xattrs(on_a / "f") == {"user.b": b"from B", "user.k": b"two"}
    os.removexattr(on_a / "f", "user.k")
    assert _xattrs(on_b / "f") == {"user.b": b"from B"}
    with pytest.raises(OSError) as info:
        os.setxattr(on_b / "f", "user.b", b"again", os.XATTR_CREATE)
    assert info.value.errno == errno.EEXIST
    ctime = (on_b / "f").stat().st_ctime_ns
    os.setxattr(on_a / "f", "user.b", b"moved ctime")
    assert (on_b / "f").stat().st_ctime_ns > ctime  # a change moves ctime, as on ext4


def _session_requests(cluster: MountCluster) -> int:
    stats = http("GET", f"{cluster.cluster.coordinator_url}/api/stats").json()
    return int(stats["sessions"]["requests"])


def test_writes_to_a_file_without_xattrs_ask_the_coordinator_nothing_more(
    two_nodes: MountCluster, dirs: tuple[Path, Path]
) -> None:
    """The kernel asks for ``security.capability`` before every write(2) and ``ls -l`` for
    ACLs and SELinux labels: a node that holds the inode's attributes answers them itself."""
    on_a, _ = dirs
    before = _session_requests(two_nodes)
    fd = os.open(on_a / "many-writes", os.O_CREAT | os.O_WRONLY, 0o644)
    try:
        for i in range(300):
            os.write(fd, b"%06d\n" % i)
    finally:
        os.close(fd)
    sent = _session_requests(two_nodes) - before
    assert sent < 30, f"{sent} session requests for 300 writes"
    assert (on_a / "many-writes").read_bytes().count(b"\n") == 300


def test_kept_across_rename_and_links_gone_with_the_inode(
    two_nodes: MountCluster, dirs: tuple[Path, Path]
) -> None:
    on_a, on_b = dirs
    (on_a / "sub").mkdir()
    f = on_a / "f"
    f.write_bytes(b"data")
    os.setxattr(f, "user.k", b"kept")
    ino = f.stat().st_ino
    os.link(f, on_a / "hard")
    os.rename(f, on_a / "sub" / "moved")
    assert os.getxattr(on_b / "hard", "user.k") == b"kept"
    assert os.getxattr(on_b / "sub" / "moved", "user.k") == b"kept"
    os.setxattr(on_b / "hard", "user.k", b"shared")  # one inode: every name sees it
    assert os.getxattr(on_a / "sub" / "moved", "user.k") == b"shared"
    os.unlink(on_a / "hard")
    assert os.getxattr(on_b / "sub" / "moved", "user.k") == b"shared"
    db = two_nodes.cluster.root / "coordinator" / "coordinator.db"

    def rows() -> int:
        with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as conn:
            row = conn.execute("SELECT COUNT(*) FROM xattrs WHERE ino = ?", (ino,)).fetchone()
        return int(row[0])

    assert rows() == 1
    os.unlink(on_a / "sub" / "moved")  # the last link
    assert rows() == 0


def _tree(root: Path) -> None:
    """Files (one over a chunk), a directory, a symlink, xattrs on files and directories."""
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "small").write_bytes(b"small file")
    (root / "big").write_bytes(os.urandom(3 * (1 << 20) // 2))
    (root / "sub" / "deeper" / "empty").write_bytes(b"")
    os.symlink("../small", root / "sub" / "link")
    os.setxattr(root / "small", "user.mime_type", b"text/plain")
    os.setxattr(root / "small", "user.binary", bytes(range(256)))
    os.setxattr(root / "small", "user.empty", b"")
    os.setxattr(root / "big", "user.checksum", b"x" * 3000)
    os.setxattr(root / "big", "trusted.origin", b"root only")
    os.setxattr(root / "sub", "user.dir", b"a directory's")
    os.setxattr(root / "sub" / "deeper" / "empty", "user.k", b"on an empty file")


def _snapshot(root: Path) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for path in sorted([root, *root.rglob("*")]):
        st = path.lstat()
        entry: dict[str, Any] = {"mode": st.st_mode, "xattrs": _xattrs(path)}
        if path.is_symlink():
            entry["target"] = os.readlink(path)
        elif path.is_file():
            entry["data"] = path.read_bytes()
            entry["mtime"] = st.st_mtime_ns
        found[str(path.relative_to(root))] = entry
    return found


@pytest.mark.parametrize(
    "tool",
    [
        ["cp", "-a"],
        ["rsync", "-aX"],
    ],
)
def test_a_tree_with_xattrs_copied_in_and_back_out(
    dirs: tuple[Path, Path], tmp_path: Path, tool: list[str]
) -> None:
    on_a, on_b = dirs
    src, back = tmp_path / "src", tmp_path / "back"
    src.mkdir()
    _tree(src)
    want = _snapshot(src)
    assert want["small"]["xattrs"]["user.binary"] == bytes(range(256))  # the local fs has them

    def copy(a: Path, b: Path) -> None:
        args = [*tool, f"{a}/", f"{b}/"] if tool[0] == "rsync" else [*tool, str(a), str(b)]
        done = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 0 and not done.stderr, done.stderr

    copy(src, on_a / "in")
    assert _snapshot(on_a / "in") == want
    assert _snapshot(on_b / "in") == want  # and on the other node
    copy(on_b / "in", back)
    assert _snapshot(back) == want
    shutil.rmtree(back)


def test_kept_across_a_coordinator_restart(two_nodes: MountCluster) -> None:
    a, b = two_nodes.nodes
    f = a.mnt / "x-restart"
    f.write_bytes(b"data")
    os.setxattr(f, "user.k", b"before the restart")
    os.setxattr(f, "trusted.t", b"\x00\x01")
    coordinator = two_nodes.cluster.coordinator
    assert coordinator is not None
    coordinator.kill()  # SIGKILL: what was acknowledged is committed
    two_nodes.cluster.start_coordinator()
    assert _xattrs(b.mnt / "x-restart") == {
        "trusted.t": b"\x00\x01",
        "user.k": b"before the restart",
    }
    assert os.getxattr(f, "user.k") == b"before the restart"
