"""The operator tools' pure parts: mountinfo parsing, the mount(8) helper's argv, env files,
durations, the plain progress lines and which chunks of a manifest are stored."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

from fastcache.admin.commands import parse_duration
from fastcache.admin.mounting import default_files, helper_argv, read_env_file
from fastcache.admin.mounts import mounts
from fastcache.admin.progress import Bar
from fastcache.cache.warmup import data_chunks
from fastcache.config import ConfigError
from fastcache.coordinator.model import hole_digest

MOUNTINFO = (
    "22 1 0:21 / / rw,relatime shared:1 - ext4 /dev/vda1 rw\n"
    "98 22 0:55 / /mnt/with\\040space rw,nosuid,nodev shared:60 - fuse.fastcache fastcache "
    "rw,user_id=0,group_id=0\n"
    "99 22 0:56 / /tmp/other rw - fuse.sshfs host:/x rw\n"
)


def test_mountinfo_fields_and_octal_escapes(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO)
    found = mounts(str(info))
    assert [(m.mountpoint, m.fstype, m.source) for m in found] == [
        (Path("/"), "ext4", "/dev/vda1"),
        (Path("/mnt/with space"), "fuse.fastcache", "fastcache"),
        (Path("/tmp/other"), "fuse.sshfs", "host:/x"),
    ]


@pytest.mark.parametrize(
    "argv",
    [
        ["http://c:8080"],  # no mount point
        ["c:8080", "/mnt/x"],  # the source is a URL
        ["http://c:8080", "/mnt/x", "-o", "ro"],  # read-only is refused
        ["http://c:8080", "/mnt/x", "-o"],  # -o without options
    ],
)
def test_helper_argv_refuses(argv: list[str]) -> None:
    with pytest.raises(ConfigError):
        helper_argv(argv)


def test_helper_argv_glued_o_and_values_with_equals() -> None:
    argv = helper_argv(["http://c:8080", "/m", "-onvme_dir=/d,fuse_options=a=b", "-sv"])
    assert argv == [
        "mount",
        "--daemon",
        "--coordinator",
        "http://c:8080",
        "--nvme-dir",
        "/d",
        "--fuse-options",
        "a=b",
        "/m",
    ]


def test_env_file(tmp_path: Path) -> None:
    env = tmp_path / "env"
    env.write_text("# keys\nexport AWS_ACCESS_KEY_ID=ak\n\nAWS_SECRET_ACCESS_KEY='s k'\nX=a=b\n")
    assert read_env_file(env) == {
        "AWS_ACCESS_KEY_ID": "ak",
        "AWS_SECRET_ACCESS_KEY": "s k",
        "X": "a=b",
    }
    env.write_text("no equals sign\n")
    with pytest.raises(ConfigError, match=":1:"):
        read_env_file(env)
    with pytest.raises(ConfigError):
        read_env_file(tmp_path / "missing")


def test_default_files_are_named_after_the_mount_point() -> None:
    pid, log = default_files(Path("/mnt/data/set"))
    assert (pid.name, log.name) == ("mnt-data-set.pid", "mnt-data-set.log")
    assert pid.parent == log.parent


@pytest.mark.parametrize(
    ("text", "seconds"), [("90", 90), ("30m", 1800), ("1h", 3600), ("2d", 172800), ("0", 0)]
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "1w", "-1", "h"])
def test_parse_duration_refuses(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_duration(text)


def test_plain_progress_ends_at_100_percent() -> None:
    out = io.StringIO()
    with Bar("warmup", unit_bytes=True, out=out) as bar:
        bar.update(0, 4 << 20, "0/2 files")
        bar.update(4 << 20, 4 << 20, "2/2 files")
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("warmup:   0.0% 0.0 MiB of 4.0 MiB")
    assert lines[-1].startswith("warmup: 100.0% 4.0 MiB of 4.0 MiB")
    assert lines[-1].endswith("2/2 files")


def test_plain_progress_prints_nothing_more_when_interrupted() -> None:
    out = io.StringIO()
    with pytest.raises(KeyboardInterrupt), Bar("gc", unit_bytes=False, out=out) as bar:
        bar.update(1, 10)
        raise KeyboardInterrupt
    assert out.getvalue().splitlines() == ["gc:  10.0% 1 of 10"]


def test_data_chunks_leave_holes_out() -> None:
    hole = hole_digest(4)
    doc = {"size": 10, "chunk_size": 4, "chunks": ["a" * 32, hole, hole_digest(2)]}
    assert data_chunks(doc) == [("a" * 32, 4)]
    doc = {"size": 6, "chunk_size": 4, "chunks": ["b" * 32, hole], "lengths": [2, 4]}
    assert data_chunks(doc) == [("b" * 32, 2)]
