"""The FUSE mount: ``ops`` (llfuse Operations), ``files`` (open files, staging),
``metacache`` (the lease-aware node cache), ``notify`` (kernel invalidation),
``lifecycle`` (mounting and unmounting)."""
