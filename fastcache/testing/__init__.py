"""Real processes for tests and benchmarks: a coordinator and client nodes on loopback
(``cluster``), ports and deadline polling (``polling``), FUSE mount checks (``mounts``).

Runtime dependencies only, so ``tests/`` and ``bench/`` can both use it; nothing else in
``fastcache`` imports it.
"""
