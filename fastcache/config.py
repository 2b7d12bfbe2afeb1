"""Configuration: one frozen dataclass per process, built once from flags and environment.

This is the only module that reads ``os.environ``; everything else gets its config passed in.
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

MiB = 1 << 20
GiB = 1 << 30
DEFAULT_CHUNK_SIZE = 4 * MiB
DEFAULT_BUCKET = "fuse-client-cache"
DEFAULT_REGION = "us-east-1"
DEFAULT_MAX_BODY = 4 * MiB + 64 * 1024  # one chunk plus headroom
DEFAULT_MAX_FILE_SIZE = 1 << 40  # 1 TiB: the largest file the client API accepts
_SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)(i?b?)?\s*$", re.IGNORECASE)
DEFAULT_COORDINATOR = "http://127.0.0.1:8080"
_COORDINATOR_URL = re.compile(r"^https?://[A-Za-z0-9.\-\[\]:]+(:\d{1,5})?/?$")


class ConfigError(ValueError):
    """A flag or variable with a value that cannot work; the CLI prints it on one line."""


def parse_size(text: str | int) -> int:
    """``"4M"``, ``"10GiB"``, ``"1.5g"``, ``"4096"`` → bytes (powers of 1024)."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ConfigError(f"not a size: {text!r} (use e.g. 4096, 64M, 10G)")
    number, unit = float(m.group(1)), m.group(2).lower()
    return int(number * (1 << (10 * " kmgtp".index(unit or " "))))


def parse_capacity(text: str | int, directory: Path) -> int:
    """Bytes, a size (``"10G"``) or a percentage of the disk holding ``directory`` (``"50%"``)."""
    if isinstance(text, str) and text.strip().endswith("%"):
        pct = float(text.strip()[:-1])
        if not 0 < pct <= 100:
            raise ConfigError(f"capacity percentage out of range: {text!r}")
        probe = directory
        while not probe.exists():
            probe = probe.parent
        return int(shutil.disk_usage(probe).total * pct / 100)
    size = parse_size(text)
    if size <= 0:
        raise ConfigError(f"capacity must be positive: {text!r}")
    return size


def parse_coordinators(text: str | Sequence[str]) -> tuple[str, ...]:
    """``"http://a:8080,http://b:8080"`` (or several such strings) → the coordinator URLs, in
    the order the node tries them."""
    parts = [text] if isinstance(text, str) else list(text)
    urls = [u.strip().rstrip("/") for part in parts for u in part.split(",") if u.strip()]
    if not urls:
        raise ConfigError("no coordinator URL given")
    for url in urls:
        if not _COORDINATOR_URL.fullmatch(url):
            raise ConfigError(f"not a coordinator URL: {url!r} (use e.g. http://10.0.0.5:8080)")
    return tuple(dict.fromkeys(urls))


@dataclass(frozen=True)
class S3Config:
    """Where tier 3 lives. Credentials fall back to the standard ``AWS_*`` variables."""

    endpoint: str | None = None
    region: str = DEFAULT_REGION
    bucket: str = DEFAULT_BUCKET
    access_key: str | None = None
    secret_key: str | None = None
    max_concurrency: int = 16
    max_attempts: int = 5
    connect_timeout: float = 5.0
    read_timeout: float = 60.0

    def __post_init__(self) -> None:
        if not self.bucket:
            raise ConfigError("bucket must not be empty")
        if self.max_concurrency < 1:
            raise ConfigError("S3 concurrency must be at least 1")

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, **overrides: object) -> S3Config:
        env = os.environ if env is None else env
        values: dict[str, object] = {
            "endpoint": env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or None,
            "region": env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or DEFAULT_REGION,
            "access_key": env.get("AWS_ACCESS_KEY_ID") or None,
            "secret_key": env.get("AWS_SECRET_ACCESS_KEY") or None,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)  # type: ignore[arg-type]


@dataclass(frozen=True)
class CacheConfig:
    """The CacheManager and its NVMe tier."""

    nvme_dir: Path
    nvme_capacity: int = 10 * GiB
    chunk_size: int = DEFAULT_CHUNK_SIZE
    chunking: str = "fixed"  # or "cdc" (FastCDC, average = chunk_size)
    verify_cache: bool = False  # hash every NVMe read, not only whole-chunk reads
    upload_concurrency: int = 8  # parallel write-back uploads
    # chunks written here keep their bytes in memory until uploaded, up to this much: the
    # upload then neither reads the chunk file back nor hashes it again
    upload_memory: int = 256 * MiB
    fetch_concurrency: int = 16  # parallel chunk fetches of one read (and read-ahead depth)
    replication: int = 3  # peer replicas per chunk
    writeback_retry_max: float = 30.0  # seconds between write-back retries, at most

    def __post_init__(self) -> None:
        if self.chunk_size < 4096 or self.chunk_size > 64 * MiB:
            raise ConfigError("chunk size must be between 4 KiB and 64 MiB")
        if self.chunking not in ("fixed", "cdc"):
            raise ConfigError(f"chunking must be 'fixed' or 'cdc', not {self.chunking!r}")
        if self.nvme_capacity < self.chunk_size:
            raise ConfigError("NVMe capacity must hold at least one chunk")
        if self.replication < 0:
            raise ConfigError("replication must not be negative")
        if self.upload_memory < 0:
            raise ConfigError("upload memory must not be negative")


STORE_DB_NAME = "coordinator.db"  # the SQLite store's file in --state-dir


def check_store_url(url: str) -> str:
    """The engine a ``--store`` URL names (``sqlite`` or ``postgresql``), else ConfigError.

    ``sqlite:///abs/path.db`` (the URL's path is the file) or
    ``postgresql://user@host:port/database``.
    """
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        if parts.netloc or not parts.path.startswith("/") or parts.path.endswith("/"):
            raise ConfigError(f"bad store URL {url!r}: expected sqlite:///absolute/path.db")
        return "sqlite"
    if parts.scheme in ("postgresql", "postgres"):
        try:
            port_ok = parts.port is None or parts.port > 0
        except ValueError:
            port_ok = False
        if not parts.hostname or len(parts.path) < 2 or not port_ok:
            raise ConfigError(
                f"bad store URL {url!r}: expected postgresql://user@host:port/database"
            )
        return "postgresql"
    raise ConfigError(
        f"bad store URL {url!r}: expected sqlite:///path.db or postgresql://user@host:port/db"
    )


def redacted_url(url: str) -> str:
    """``url`` without its password, for logs and messages."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@", 1)).geturl()


@dataclass(frozen=True)
class CoordinatorConfig:
    host: str = "127.0.0.1"
    port: int = 8080
    state_dir: Path = Path("coordinator-state")
    # where the namespace lives: a URL (check_store_url); None: SQLite in state_dir
    store: str | None = None
    token: str | None = None
    peer_timeout: float = 60.0  # a peer silent this long is dropped
    cleanup_interval: float = 10.0
    max_body: int = DEFAULT_MAX_BODY
    # A namespace change is committed (survives SIGKILL of the coordinator) when it is
    # acknowledged, and on disk (survives power loss) at the latest this many seconds later,
    # or at once on a sync barrier (a client's fsync). 0: sync right after every commit.
    sync_interval: float = 0.1
    # Leases on what a node caches over its session: the longest a frozen node can delay
    # another node's conflicting change (push invalidation waits for its ack or this).
    lease_term: float = 2.0
    metrics_public: bool = False  # GET /metrics without the token (--metrics-public)

    def __post_init__(self) -> None:
        if not 0 < self.lease_term <= 3600:  # also refuses NaN
            raise ConfigError(f"lease term must be in (0, 3600] seconds: {self.lease_term}")
        if self.peer_timeout <= 0:
            raise ConfigError("peer timeout must be positive")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port out of range: {self.port}")
        if not 0 <= self.sync_interval <= 3600:  # also refuses NaN
            raise ConfigError(f"sync interval must be in [0, 3600] seconds: {self.sync_interval}")
        if self.store is not None:
            check_store_url(self.store)

    @property
    def store_url(self) -> str:
        """``store``, or the SQLite file in ``state_dir``."""
        return self.store or f"sqlite://{(self.state_dir / STORE_DB_NAME).resolve()}"


@dataclass(frozen=True)
class ClientConfig:
    cache: CacheConfig
    s3: S3Config = field(default_factory=S3Config)
    # every coordinator of the cluster; the node's session and calls move to the next one
    # when theirs stops answering (``parse_coordinators``)
    coordinators: tuple[str, ...] = (DEFAULT_COORDINATOR,)
    host: str = "127.0.0.1"
    port: int = 8081
    advertise_url: str | None = None  # how peers reach this node; default http://host:port
    peer_id: str = ""
    token: str | None = None
    heartbeat_interval: float = 10.0
    mount: Path | None = None
    attr_timeout: float = 1.0  # kernel attribute/entry cache, seconds
    # How long "no such name" may be answered from this node's cache, for directories only
    # this node has changed. 0 (default) always asks the coordinator, so a file another node
    # just created and closed is found by the next open() here (close-to-open for new names).
    negative_timeout: float = 0.0
    fuse_workers: int = 4  # llfuse worker threads: 4 beat 16 and 8 on 2 cores (fio_mount.py)
    fuse_options: str = ""  # extra comma-separated FUSE mount options
    noatime: bool = False  # True: reads never move access times (default: relatime)
    readahead_chunks: int = 4  # a reader's first window; a sequential one doubles it up to
    # CacheConfig.fetch_concurrency (DefaultCacheManager.prefetch)
    max_body: int = DEFAULT_MAX_BODY
    peer_connect_timeout: float = 0.5
    peer_read_timeout: float = 10.0
    shutdown_sync_timeout: float = 10.0  # seconds a graceful stop waits for uploads to S3
    commit_timeout: float = 10.0  # seconds close() waits for the coordinator, then EIO (kept)
    fsync_timeout: float = 120.0  # seconds fsync() waits for S3 and the coordinator's sync
    max_file_size: int = DEFAULT_MAX_FILE_SIZE  # largest file the client API accepts
    metrics_public: bool = False  # GET /metrics without the token (--metrics-public)

    @property
    def coordinator_url(self) -> str:
        """The first coordinator: the one the node tries first."""
        return self.coordinators[0]

    def __post_init__(self) -> None:
        if not self.coordinators:
            raise ConfigError("at least one coordinator URL is needed")
        if self.heartbeat_interval <= 0:
            raise ConfigError("heartbeat interval must be positive")
        if self.shutdown_sync_timeout < 0:
            raise ConfigError("shutdown sync timeout must not be negative")
        if self.commit_timeout <= 0 or self.fsync_timeout <= 0:
            raise ConfigError("commit and fsync timeouts must be positive")
        if self.max_file_size <= 0:
            raise ConfigError("max file size must be positive")
        if not 0 <= self.port <= 65535:
            raise ConfigError(f"port out of range: {self.port}")

    @property
    def url(self) -> str:
        return self.advertise_url or f"http://{self.host}:{self.port}"


def token_from_env(env: Mapping[str, str] | None = None) -> str | None:
    env = os.environ if env is None else env
    return env.get("FASTCACHE_TOKEN") or None


def fuse_tuning_from_env(env: Mapping[str, str] | None = None) -> dict[str, object]:
    """``FASTCACHE_FUSE_WORKERS`` / ``FASTCACHE_FUSE_OPTIONS``: defaults for the FUSE knobs,
    so a benchmark can vary them per process (``bench/fio_mount.py --variant``)."""
    env = os.environ if env is None else env
    out: dict[str, object] = {}
    workers = env.get("FASTCACHE_FUSE_WORKERS", "").strip()
    if workers:
        if not workers.isdigit() or int(workers) < 1:
            raise ConfigError(f"FASTCACHE_FUSE_WORKERS must be a positive integer: {workers!r}")
        out["fuse_workers"] = int(workers)
    if env.get("FASTCACHE_FUSE_OPTIONS"):
        out["fuse_options"] = env["FASTCACHE_FUSE_OPTIONS"]
    return out


def no_extensions(env: Mapping[str, str] | None = None) -> bool:
    """``FASTCACHE_NO_EXT=1`` forces the pure-Python fallbacks (for tests and debugging)."""
    env = os.environ if env is None else env
    return env.get("FASTCACHE_NO_EXT") == "1"
