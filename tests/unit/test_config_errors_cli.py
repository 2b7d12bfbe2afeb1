"""errors.py tables, config.py parsing and the CLI's one-line errors."""

from __future__ import annotations

import errno
import logging
import subprocess
import sys
from pathlib import Path

import pytest

from fastcache import errors
from fastcache.cli import build_parser, client_config, coordinator_config
from fastcache.config import (
    CacheConfig,
    ConfigError,
    CoordinatorConfig,
    S3Config,
    parse_capacity,
    parse_size,
)
from fastcache.log import TagFormatter


@pytest.mark.parametrize(
    ("exc", "code"),
    [
        (errors.NotFound("x"), errno.ENOENT),
        (errors.ChunkNotFound("x"), errno.EIO),
        (errors.Exists("x"), errno.EEXIST),
        (errors.NotEmpty("x"), errno.ENOTEMPTY),
        (errors.NotADirectory("x"), errno.ENOTDIR),
        (errors.IsADirectory("x"), errno.EISDIR),
        (errors.NameTooLong("x"), errno.ENAMETOOLONG),
        (errors.InvalidArgument("x"), errno.EINVAL),
        (errors.TierFull("x"), errno.ENOSPC),
        (errors.ReadOnly("x"), errno.EROFS),
        (errors.DataUnavailable("x"), errno.EIO),
        (errors.NotPermitted("x"), errno.EPERM),
        (OSError(errno.EXDEV, "x"), errno.EXDEV),
    ],
)
def test_errno_table(exc: BaseException, code: int) -> None:
    assert errors.errno_for(exc) == code


def test_unmapped_exception_is_eio_and_logged(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.ERROR, logger="fastcache"):
        assert errors.errno_for(RuntimeError("boom")) == errno.EIO
    assert "boom" in caplog.text


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (errors.BadRequest("x"), 400),
        (errors.InvalidName("x"), 400),
        (errors.Unauthorized("x"), 401),
        (errors.NotFound("x"), 404),
        (errors.ChunkNotFound("x"), 404),
        (errors.Conflict("x"), 409),
        (errors.NotEmpty("x"), 409),
        (errors.PayloadTooLarge("x"), 413),
        (errors.TierUnavailable("x"), 503),
        (ValueError("x"), 500),
    ],
)
def test_http_status_table(exc: BaseException, status: int) -> None:
    assert errors.http_status_for(exc) == status


def test_error_kind_round_trip() -> None:
    for cls in (errors.NotEmpty, errors.Conflict, errors.IsADirectory, errors.NotFound):
        exc = cls("msg")
        back = errors.error_from_kind(errors.error_kind(exc), errors.http_status_for(exc), "msg")
        assert type(back) is cls and str(back) == "msg"
    assert isinstance(errors.error_from_kind("Nonsense", 404, "m"), errors.NotFound)
    assert isinstance(errors.error_from_kind(None, 503, "m"), errors.TierUnavailable)


@pytest.mark.parametrize(
    ("text", "value"),
    [("4096", 4096), ("4k", 4096), ("64M", 64 << 20), ("10GiB", 10 << 30), ("1.5g", 3 << 29)],
)
def test_parse_size(text: str, value: int) -> None:
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "abc", "-1", "4z", "1.2.3"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ConfigError):
        parse_size(text)


def test_parse_capacity_percent(tmp_path: Path) -> None:
    half = parse_capacity("50%", tmp_path / "not-yet")
    full = parse_capacity("100%", tmp_path)
    assert 0 < half < full and abs(full - 2 * half) <= 1
    with pytest.raises(ConfigError):
        parse_capacity("0%", tmp_path)
    assert parse_capacity("8M", tmp_path) == 8 << 20


def test_cache_config_validation(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        CacheConfig(nvme_dir=tmp_path, chunk_size=100)
    with pytest.raises(ConfigError):
        CacheConfig(nvme_dir=tmp_path, chunking="rabin")
    with pytest.raises(ConfigError):
        CacheConfig(nvme_dir=tmp_path, nvme_capacity=1 << 20, chunk_size=4 << 20)


def test_s3_config_from_env() -> None:
    env = {
        "AWS_ACCESS_KEY_ID": "AK",
        "AWS_SECRET_ACCESS_KEY": "SK",
        "AWS_REGION": "eu-west-1",
        "AWS_ENDPOINT_URL": "http://127.0.0.1:9",
    }
    cfg = S3Config.from_env(env, bucket="b")
    assert (cfg.access_key, cfg.secret_key, cfg.region, cfg.endpoint, cfg.bucket) == (
        "AK",
        "SK",
        "eu-west-1",
        "http://127.0.0.1:9",
        "b",
    )
    default = S3Config.from_env({})
    assert (default.region, default.bucket) == ("us-east-1", "fuse-client-cache")
    assert S3Config.from_env(env, region="ap-south-1").region == "ap-south-1"


def test_cli_builds_configs(tmp_path: Path) -> None:
    parser = build_parser()
    args = parser.parse_args(
        [
            "client",
            "--nvme-dir",
            str(tmp_path),
            "--nvme-capacity",
            "1G",
            "--port",
            "9001",
            "--bucket",
            "bk",
            "--token",
            "t0k",
        ]
    )
    cfg = client_config(args)
    assert cfg.cache.nvme_capacity == 1 << 30 and cfg.port == 9001
    assert cfg.s3.bucket == "bk" and cfg.token == "t0k" and cfg.peer_id == "127.0.0.1:9001"
    cargs = parser.parse_args(["coordinator", "--port", "9100", "--peer-timeout", "5"])
    ccfg = coordinator_config(cargs)
    assert (ccfg.port, ccfg.peer_timeout) == (9100, 5.0)


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastcache", *argv], capture_output=True, text=True, timeout=60
    )


def test_cli_version_and_help() -> None:
    out = _cli("--version")
    assert out.returncode == 0 and out.stdout.startswith("fastcache ")
    helped = _cli("--help")
    assert helped.returncode == 0
    for command in ("coordinator", "client", "dev-start", "dev-stop", "bench"):
        assert command in helped.stdout


def test_cli_bad_flag_is_one_line(tmp_path: Path) -> None:
    out = _cli("client", "--nvme-dir", str(tmp_path), "--chunk-size", "4z")
    assert out.returncode == 2
    assert out.stderr.strip() == "fastcache: not a size: '4z' (use e.g. 4096, 64M, 10G)"
    assert "Traceback" not in out.stderr


def test_log_tags() -> None:
    fmt = TagFormatter("%(tag)s %(message)s")
    for name, tag in [
        ("fastcache.coordinator", "[COORDINATOR]"),
        ("fastcache.coordinator.store", "[COORDINATOR]"),
        ("fastcache.client", "[CLIENT]"),
        ("fastcache.api", "[API]"),
        ("fastcache.fuse", "[FUSE]"),
    ]:
        record = logging.LogRecord(name, logging.INFO, __file__, 1, "hi", None, None)
        assert fmt.format(record) == f"{tag} hi"


def test_fuse_tuning_flags_and_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parser = build_parser()
    base = ["client", "--nvme-dir", str(tmp_path)]
    assert client_config(parser.parse_args(base)).fuse_workers == 4
    monkeypatch.setenv("FASTCACHE_FUSE_WORKERS", "3")
    monkeypatch.setenv("FASTCACHE_FUSE_OPTIONS", "async_read")
    cfg = client_config(parser.parse_args(base))
    assert (cfg.fuse_workers, cfg.fuse_options) == (3, "async_read")
    cfg = client_config(parser.parse_args([*base, "--fuse-workers", "8", "--fuse-options", ""]))
    assert (cfg.fuse_workers, cfg.fuse_options) == (8, "")  # flags beat the environment
    monkeypatch.setenv("FASTCACHE_FUSE_WORKERS", "many")
    with pytest.raises(ConfigError):
        client_config(parser.parse_args(base))


@pytest.mark.parametrize(
    "url",
    [
        "mysql://h/db",
        "sqlite://relative.db",
        "sqlite:///",
        "postgresql://h:port/db",
        "postgresql://h",
    ],
)
def test_coordinator_bad_store_url_is_one_line(url: str) -> None:
    out = _cli("coordinator", "--port", "0", "--store", url)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and out.stderr.startswith(
        f"fastcache: bad store URL {url!r}"
    )


def test_store_url_defaults_to_sqlite_in_the_state_dir(tmp_path: Path) -> None:
    cfg = CoordinatorConfig(state_dir=tmp_path)
    assert cfg.store_url == f"sqlite://{tmp_path.resolve()}/coordinator.db"
    assert CoordinatorConfig(store="postgresql://u@h:5432/db").store_url.startswith("postgresql")
