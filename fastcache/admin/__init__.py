"""Operator tools behind the ``fastcache`` subcommands: ``status``, ``warmup``, ``fsck``,
``gc``, ``mount``/``umount`` and the ``mount.fastcache`` helper. One job per module; they
reach the cluster only through the coordinator's and the nodes' REST APIs (and S3 for fsck
and gc); ``cli.py`` parses the flags and calls them."""
