"""fastcache: a distributed FUSE filesystem with a 3-tier cache (local NVMe, peers, S3)."""

__version__ = "0.1.0"
