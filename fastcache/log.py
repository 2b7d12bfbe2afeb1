"""Logging: one formatter that renders logger names as the component tags.

Components log through ``logging.getLogger("fastcache.<component>")``; the formatter shows
``fastcache.coordinator`` as ``[COORDINATOR]`` and so on.
"""

from __future__ import annotations

import logging
import sys

_TAGS = {
    "fastcache.coordinator": "[COORDINATOR]",
    "fastcache.client": "[CLIENT]",
    "fastcache.api": "[API]",
    "fastcache.fuse": "[FUSE]",
}


class TagFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        tag = None
        name = record.name
        while name:
            tag = _TAGS.get(name)
            if tag:
                break
            name = name.rpartition(".")[0]
        record.tag = tag or f"[{record.name.rpartition('.')[2].upper()}]"
        return super().format(record)


def setup_logging(level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(TagFormatter("%(asctime)s %(levelname)s %(tag)s %(message)s"))
    root = logging.getLogger("fastcache")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
