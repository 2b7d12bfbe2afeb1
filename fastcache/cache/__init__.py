"""The three-tier chunk cache of one client node: ``DefaultCacheManager`` in ``manager``."""
