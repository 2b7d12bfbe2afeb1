"""POSIX behaviour of a real mount, compared with the same calls on a local directory."""

from __future__ import annotations

import errno
import os
import random
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

MiB = 1 << 20  # the mount fixture uses 1 MiB chunks: multi-chunk files stay small


def outcome(fn: Callable[[Path], Any], root: Path) -> Any:
    """``fn(root)``'s result, or the errno it failed with."""
    try:
        return fn(root)
    except OSError as exc:
        return ("errno", errno.errorcode.get(exc.errno or 0, exc.errno))


def same(fn: Callable[[Path], Any], mounted: Path, local: Path) -> Any:
    """Run ``fn`` on the mount and on a local directory; both must answer alike."""
    got, want = outcome(fn, mounted), outcome(fn, local)
    assert got == want
    return got


def errno_of(fn: Callable[[], Any]) -> int:
    with pytest.raises(OSError) as info:
        fn()
    return info.value.errno or 0


def pwrite(path: Path, data: bytes, offset: int, flags: int = os.O_WRONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.pwrite(fd, data, offset)
    finally:
        os.close(fd)


# --- data ------------------------------------------------------------------------------------
def test_create_read_write_append_overwrite(workdir: Path, tmp_path: Path) -> None:
    def run(root: Path) -> bytes:
        p = root / "f"
        p.write_bytes(b"hello world")
        with open(p, "ab") as f:
            f.write(b" and more")
        pwrite(p, b"HELLO", 0)
        pwrite(p, b"WORLD", 6)
        return p.read_bytes()

    assert same(run, workdir, tmp_path) == b"HELLO WORLD and more"


def test_random_writes_across_chunks(workdir: Path, tmp_path: Path) -> None:
    rng = random.Random(7)
    base = rng.randbytes(3 * MiB + 12345)
    edits = [
        (rng.randrange(0, 4 * MiB), rng.randbytes(rng.randrange(1, 300_000))) for _ in range(20)
    ]

    def run(root: Path) -> tuple[int, str]:
        p = root / "big"
        p.write_bytes(base)
        fd = os.open(p, os.O_RDWR)
        try:
            for off, data in edits:
                os.pwrite(fd, data, off)
            mid = os.pread(fd, 2 * MiB, MiB - 100)  # read back before close: staged bytes
        finally:
            os.close(fd)
        content = p.read_bytes()
        assert content[MiB - 100 : 3 * MiB - 100] == mid
        import hashlib

        return len(content), hashlib.sha256(content).hexdigest()

    same(run, workdir, tmp_path)


def test_truncate_up_and_down(workdir: Path, tmp_path: Path) -> None:
    def run(root: Path) -> list[Any]:
        p = root / "t"
        p.write_bytes(bytes(range(256)) * 9000)  # ~2.2 MiB: three chunks
        seen = []
        os.truncate(p, 1_500_000)
        seen.append(p.read_bytes())
        os.truncate(p, 2_500_000)  # grows with zeros, not the old bytes
        seen.append(p.read_bytes())
        with open(p, "r+b") as f:
            f.truncate(10)
            f.seek(0, os.SEEK_END)
            f.write(b"tail")
        seen.append(p.read_bytes())
        os.truncate(p, 0)
        seen.append((p.read_bytes(), p.stat().st_size))
        return seen

    same(run, workdir, tmp_path)


def test_sparse_file(workdir: Path, tmp_path: Path) -> None:
    def run(root: Path) -> tuple[int, bytes, bytes]:
        p = root / "sparse"
        fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o644)
        try:
            os.pwrite(fd, b"start", 0)
            os.pwrite(fd, b"end", 5 * MiB + 7)
        finally:
            os.close(fd)
        data = p.read_bytes()
        return len(data), data[:5] + data[2 * MiB : 2 * MiB + 16], data[-3:]

    assert same(run, workdir, tmp_path)[0] == 5 * MiB + 10


def test_open_flags(workdir: Path, tmp_path: Path) -> None:
    def run(root: Path) -> list[Any]:
        p = root / "flags"
        out: list[Any] = []
        fd = os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o640)
        os.write(fd, b"0123456789")
        os.close(fd)
        out.append(outcome(lambda r: os.open(r / "flags", os.O_CREAT | os.O_EXCL), root))
        fd = os.open(p, os.O_WRONLY | os.O_APPEND)
        os.pwrite(fd, b"AB", 0)  # Linux: O_APPEND wins over the offset
        os.write(fd, b"CD")
        os.close(fd)
        out.append(p.read_bytes())
        fd = os.open(p, os.O_WRONLY | os.O_TRUNC)
        os.write(fd, b"x")
        os.close(fd)
        out.append(p.read_bytes())
        out.append(stat.S_IMODE(p.stat().st_mode))
        return out

    same(run, workdir, tmp_path)


def test_second_descriptor_sees_writes_before_close(workdir: Path) -> None:
    p = workdir / "two-fds"
    p.write_bytes(b"a" * 10)
    writer = os.open(p, os.O_WRONLY)
    reader = os.open(p, os.O_RDONLY)
    try:
        os.pwrite(writer, b"bbb", 2)
        assert os.pread(reader, 10, 0) == b"aabbbaaaaa"
    finally:
        os.close(writer)
        os.close(reader)


def test_unlinked_open_file_stays_readable(workdir: Path) -> None:
    p = workdir / "doomed"
    payload = os.urandom(2 * MiB + 5)
    p.write_bytes(payload)
    fd = os.open(p, os.O_RDONLY)
    try:
        p.unlink()
        assert not p.exists()
        assert os.pread(fd, len(payload) + 10, 0) == payload
    finally:
        os.close(fd)


# --- names -----------------------------------------------------------------------------------
def test_rename_file_dir_and_replace(workdir: Path, tmp_path: Path) -> None:
    def run(root: Path) -> list[Any]:
        (root / "a").write_bytes(b"A")
        (root / "b").write_bytes(b"B")
        (root / "d1").mkdir()
        (root / "d1" / "inner").write_bytes(b"I")
        os.rename(root / "a", root / "a2")
        os.rename(root / "a2", root / "b")  # replaces b
        os.rename(root / "d1", root / "d2")
        (root / "empty").mkdir()
        os.rename(root / "d2", root / "empty")  # a directory replaces an empty one
        return [
            sorted(os.listdir(root)),
            (root / "b").read_bytes(),
            (root / "empty" / "inner").read_bytes(),
            outcome(lambda r: os.rename(r / "empty", r / "empty" / "sub"), root),
            outcome(lambda r: os.rename(r / "b", r / "empty"), root),
            outcome(lambda r: os.rename(r / "missing", r / "x"), root),
        ]

    got = same(run, workdir, tmp_path)
    assert got[3] == ("errno", "EINVAL")


def test_hard_links(workdir: Path, tmp_path: Path) -> None:
    def run(root: Path) -> list[Any]:
        a, b = root / "orig", root / "link"
        a.write_bytes(b"shared")
        os.link(a, b)
        out: list[Any] = [a.stat().st_nlink, a.stat().st_ino == b.stat().st_ino]
        with open(b, "r+b") as f:
            f.write(b"SHARED")
        out.append(a.read_bytes())
        a.unlink()
        out += [b.stat().st_nlink, b.read_bytes()]
        out.append(outcome(lambda r: os.link(r, r / "dirlink"), root))
        return out

    assert same(run, workdir, tmp_path)[:3] == [2, True, b"SHARED"]


def test_mkdir_rmdir_readdir(workdir: Path, tmp_path: Path) -> None:
    names = [f"entry-{i:04d}" for i in range(600)]  # more than one coordinator batch (512)

    def run(root: Path) -> list[Any]:
        d = root / "many"
        d.mkdir()
        for name in names:
            (d / name).touch()
        out: list[Any] = [sorted(os.listdir(d)) == names]
        out.append(sorted(e.name for e in os.scandir(d))[:3])
        out.append(outcome(lambda r: os.rmdir(r / "many"), root))
        for name in names[:550]:
            os.unlink(d / name)
        out.append(len(os.listdir(d)))
        (d / "sub").mkdir()
        out.append(d.stat().st_nlink)
        os.rmdir(d / "sub")
        out.append(d.stat().st_nlink)
        return out

    assert same(run, workdir, tmp_path)[0] is True


# --- attributes ------------------------------------------------------------------------------
def test_stat_fields_chmod_chown_utime(workdir: Path, tmp_path: Path) -> None:
    def run(root: Path) -> list[Any]:
        p = root / "s"
        fd = os.open(p, os.O_CREAT | os.O_WRONLY, 0o640)
        os.write(fd, b"x" * 1000)
        os.close(fd)
        st = p.stat()
        out: list[Any] = [stat.S_IFMT(st.st_mode), stat.S_IMODE(st.st_mode), st.st_nlink]
        out += [st.st_uid, st.st_gid, st.st_size]
        ctime = st.st_ctime_ns
        os.chmod(p, 0o4751)
        st2 = p.stat()
        out += [stat.S_IMODE(st2.st_mode), st2.st_ctime_ns >= ctime]
        os.chown(p, 1234, 5678)
        st3 = p.stat()
        out += [st3.st_uid, st3.st_gid]
        os.utime(p, ns=(1_000_000_123, 2_000_000_456))
        st4 = p.stat()
        out += [st4.st_atime_ns, st4.st_mtime_ns]
        return out

    got = same(run, workdir, tmp_path)
    assert got[-2:] == [1_000_000_123, 2_000_000_456]


def test_times_follow_writes(workdir: Path) -> None:
    p = workdir / "times"
    p.write_bytes(b"1")
    os.utime(p, ns=(5_000_000_000, 5_000_000_000))
    with open(p, "ab") as f:
        f.write(b"2")
    st = p.stat()
    assert st.st_mtime_ns > 5_000_000_000 and st.st_ctime_ns >= st.st_mtime_ns
    before = st.st_ctime_ns
    os.chmod(p, 0o600)
    assert p.stat().st_ctime_ns >= before


def test_utime_before_close_survives_commit(workdir: Path) -> None:
    """``cp -p`` sets times on the open descriptor before closing it."""
    p = workdir / "cp-p"
    with open(p, "wb") as f:
        f.write(b"data")
        f.flush()
        os.utime(f.fileno(), ns=(3_000_000_000, 4_000_000_000))
    st = p.stat()
    assert (st.st_mtime_ns, st.st_size, p.read_bytes()) == (4_000_000_000, 4, b"data")


def test_symlink_fifo_and_device_nodes(workdir: Path, tmp_path: Path) -> None:
    def run(root: Path) -> list[Any]:
        os.symlink("target/path", root / "ln")
        os.mkfifo(root / "fifo", 0o620)
        os.mknod(root / "chr", 0o600 | stat.S_IFCHR, os.makedev(1, 3))
        os.mknod(root / "sock", 0o600 | stat.S_IFSOCK)
        ln, fifo, chr_ = (os.lstat(root / n) for n in ("ln", "fifo", "chr"))
        return [
            os.readlink(root / "ln"),
            stat.S_ISLNK(ln.st_mode),
            ln.st_size,
            stat.S_ISFIFO(fifo.st_mode),
            stat.S_IMODE(fifo.st_mode),
            stat.S_ISCHR(chr_.st_mode),
            chr_.st_rdev == os.makedev(1, 3),
            stat.S_ISSOCK(os.lstat(root / "sock").st_mode),
            outcome(lambda r: os.readlink(r / "fifo"), root),
        ]

    assert same(run, workdir, tmp_path)[:2] == ["target/path", True]


def test_fifo_carries_data(workdir: Path) -> None:
    path = workdir / "pipe"
    os.mkfifo(path)
    pid = os.fork()
    if pid == 0:  # the writer
        try:
            with open(path, "wb") as f:
                f.write(b"through the pipe")
        finally:
            os._exit(0)
    with open(path, "rb") as f:
        assert f.read() == b"through the pipe"
    assert os.waitpid(pid, 0)[1] == 0


# --- errors and permissions ------------------------------------------------------------------
def test_error_codes(workdir: Path, tmp_path: Path) -> None:
    def run(root: Path) -> list[Any]:
        (root / "file").write_bytes(b"x")
        (root / "dir").mkdir()
        (root / "dir" / "child").touch()
        checks: list[Callable[[Path], Any]] = [
            lambda r: os.stat(r / "nope"),
            lambda r: os.mkdir(r / "dir"),
            lambda r: os.rmdir(r / "dir"),
            lambda r: os.open(r / "dir", os.O_WRONLY),
            lambda r: os.listdir(r / "file"),
            lambda r: os.stat(r / "file" / "below"),
            lambda r: os.unlink(r / "dir"),
            lambda r: os.rmdir(r / "file"),
            lambda r: (r / ("n" * 256)).touch(),
            lambda r: os.stat(r / ("n" * 300)),
            lambda r: os.symlink("x", r / "file"),
            lambda r: os.link(r / "file", r / "dir"),
        ]
        return [outcome(check, root) for check in checks]

    got = same(run, workdir, tmp_path)
    assert got[:3] == [("errno", "ENOENT"), ("errno", "EEXIST"), ("errno", "ENOTEMPTY")]
    assert got[3] == ("errno", "EISDIR") and got[4] == ("errno", "ENOTDIR")
    assert got[8] == ("errno", "ENAMETOOLONG")


def _as_nobody(directory: Path, fn: Callable[[], None]) -> int:
    """Run ``fn`` in a child that changed to uid/gid 65534; the errno it failed with (0: ok)."""
    pid = os.fork()
    if pid == 0:
        code = 0
        try:
            os.chdir(directory)  # the path above the mount is not searchable for nobody
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            fn()
        except OSError as exc:
            code = exc.errno or 255
        except BaseException:
            code = 254
        os._exit(code)
    return os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])


def test_permission_denied_for_other_users(workdir: Path, tmp_path: Path) -> None:
    for root in (workdir, tmp_path):
        os.chmod(root, 0o755)
        secret, public = root / "secret", root / "public"
        secret.write_bytes(b"root only")
        os.chmod(secret, 0o600)
        public.write_bytes(b"everyone")
        os.chmod(public, 0o644)
    for root in (workdir, tmp_path):
        assert _as_nobody(root, lambda: os.close(os.open("secret", os.O_RDONLY))) == errno.EACCES
        assert _as_nobody(root, lambda: os.close(os.open("public", os.O_RDONLY))) == 0
        assert _as_nobody(root, lambda: os.close(os.open("public", os.O_WRONLY))) == errno.EACCES
        assert _as_nobody(root, lambda: os.mkdir("newdir")) == errno.EACCES
        assert _as_nobody(root, lambda: os.chmod("public", 0o777)) == errno.EPERM


def test_xattrs_and_statfs_answer(workdir: Path) -> None:
    p = workdir / "x"
    p.touch()
    assert errno_of(lambda: os.getxattr(p, "user.k")) == errno.ENODATA
    os.setxattr(p, "user.k", b"v")  # tests/mount/test_xattrs.py has the rest
    assert os.getxattr(p, "user.k") == b"v"
    st = os.statvfs(workdir)
    assert st.f_blocks > 0 and st.f_namemax == 255
    assert os.access(p, os.R_OK | os.W_OK)


def test_inode_numbers_are_stable(workdir: Path) -> None:
    p = workdir / "stable"
    p.write_bytes(b"1")
    ino = p.stat().st_ino
    os.rename(p, workdir / "moved")
    (workdir / "moved").write_bytes(b"22")
    assert (workdir / "moved").stat().st_ino == ino
    entries = {e.name: e.inode() for e in os.scandir(workdir)}
    assert entries["moved"] == ino


# --- POSIX corners a conformance suite checks --------------------------------------------------
def test_setgid_directory_passes_its_group_on(workdir: Path, tmp_path: Path) -> None:
    def run(root: Path) -> list[Any]:
        d = root / "sg"
        d.mkdir()
        os.chown(d, 0, 1234)
        os.chmod(d, 0o2775)
        (d / "file").touch()
        (d / "sub").mkdir(0o755)
        f, sub = (d / "file").stat(), (d / "sub").stat()
        return [f.st_gid, stat.S_IMODE(f.st_mode) & 0o7000, sub.st_gid, sub.st_mode & 0o7000]

    assert same(run, workdir, tmp_path) == [1234, 0, 1234, stat.S_ISGID]


def test_write_and_truncate_by_non_owner_clear_suid_sgid(workdir: Path, tmp_path: Path) -> None:
    def as_other(root: Path, fn: Callable[[], None]) -> int:
        os.chmod(root, 0o777)
        return _as_nobody(root, fn)

    def write_once() -> None:
        fd = os.open("w", os.O_WRONLY)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)

    def run(root: Path) -> list[Any]:
        for name in ("w", "t", "c"):
            (root / name).write_bytes(b"data")
            os.chmod(root / name, 0o6777)
        codes = [as_other(root, write_once), as_other(root, lambda: os.truncate("t", 1))]
        os.chown(root / "c", 1234, 1234)  # chown by root of an executable drops the bits
        return codes + [stat.S_IMODE((root / n).stat().st_mode) for n in ("w", "t", "c")]

    got = same(run, workdir, tmp_path)
    assert got[:2] == [0, 0]
    assert not any(mode & (stat.S_ISUID | stat.S_ISGID) for mode in got[2:])


def test_sparse_file_blocks_count_data_not_holes(workdir: Path, tmp_path: Path) -> None:
    def run(root: Path) -> list[int]:
        holes = root / "holes"
        with open(holes, "wb") as f:
            f.truncate(3 * MiB)
        data = root / "data"
        with open(data, "wb") as f:
            f.write(os.urandom(MiB + 1))
        return [holes.stat().st_blocks, data.stat().st_blocks]

    got, want = run(workdir), run(tmp_path)
    assert got[0] == want[0] == 0  # du of a file of holes: nothing allocated
    assert got[1] * 512 >= MiB + 1  # real data is counted
    p = workdir / "mostly-holes"
    with open(p, "wb") as f:
        f.truncate(8 * MiB)
        f.seek(5 * MiB)
        f.write(b"x")
    st = p.stat()
    assert 0 < st.st_blocks * 512 < st.st_size  # du reports less than the apparent size


def test_namespace_times_and_nlink(workdir: Path, tmp_path: Path) -> None:
    def run(root: Path) -> list[Any]:
        a, b = root / "a", root / "b"
        a.mkdir()
        b.mkdir()
        (a / "x").mkdir()
        (b / "x").mkdir()
        os.rename(a / "x", b / "x")  # over an existing empty directory
        nlinks = [a.stat().st_nlink, b.stat().st_nlink]
        f = root / "f"
        f.write_bytes(b"1")
        os.utime(f, ns=(1, 1))  # old times
        parent = os.stat(root)
        os.utime(root, ns=(2, 2))
        before = f.stat().st_ctime_ns
        os.link(f, root / "g")
        after_link = f.stat()
        os.unlink(root / "g")
        after_unlink = f.stat()
        parent = os.stat(root)
        return [
            *nlinks,
            after_link.st_ctime_ns > before,
            after_unlink.st_ctime_ns >= after_link.st_ctime_ns,
            after_unlink.st_nlink,
            parent.st_mtime_ns > 2 and parent.st_ctime_ns > 2,
        ]

    assert same(run, workdir, tmp_path) == [2, 3, True, True, 1, True]


def test_utimensat_now_and_omit(workdir: Path, tmp_path: Path) -> None:
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    utime_now, utime_omit = (1 << 30) - 1, (1 << 30) - 2

    class Timespec(ctypes.Structure):
        _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]

    def utimens(path: Path, atime: tuple[int, int], mtime: tuple[int, int]) -> None:
        times = (Timespec * 2)(Timespec(*atime), Timespec(*mtime))
        if libc.utimensat(-100, os.fsencode(path), times, 0) != 0:  # AT_FDCWD
            raise OSError(ctypes.get_errno(), "utimensat")

    def run(root: Path) -> list[Any]:
        p = root / "t"
        p.touch()
        os.utime(p, ns=(10**9, 2 * 10**9))
        utimens(p, (0, utime_omit), (5, 0))  # atime kept, mtime set
        st1 = p.stat()
        utimens(p, (0, utime_now), (0, utime_omit))  # atime now, mtime kept
        st2 = p.stat()
        return [st1.st_atime_ns, st1.st_mtime_ns, st2.st_atime_ns > 10**18, st2.st_mtime_ns]

    assert same(run, workdir, tmp_path) == [10**9, 5 * 10**9, True, 5 * 10**9]


def test_more_error_codes(workdir: Path, tmp_path: Path) -> None:
    def run(root: Path) -> list[Any]:
        (root / "file").write_bytes(b"x")
        (root / "dir").mkdir()
        os.symlink("loop2", root / "loop1")
        os.symlink("loop1", root / "loop2")
        checks: list[Callable[[Path], Any]] = [
            lambda r: os.truncate(r / "dir", 0),
            lambda r: os.open(r / "file", os.O_RDONLY | os.O_DIRECTORY),
            lambda r: os.mkdir(r / "dir"),
            lambda r: os.rmdir(os.path.join(r, "dir", ".")),  # pathlib would drop the "."
            lambda r: os.stat(r / "loop1"),
            lambda r: os.readlink(r / "file"),
        ]
        return [outcome(check, root) for check in checks]

    got = same(run, workdir, tmp_path)
    assert got == [
        ("errno", "EISDIR"),
        ("errno", "ENOTDIR"),
        ("errno", "EEXIST"),
        ("errno", "EINVAL"),
        ("errno", "ELOOP"),
        ("errno", "EINVAL"),
    ]
    for root in (workdir, tmp_path):
        os.chmod(root, 0o755)
        assert _as_nobody(root, lambda: os.chmod("file", 0o777)) == errno.EPERM
