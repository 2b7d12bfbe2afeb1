"""Logging: one formatter that renders logger names as the component tags, and one filter
that keeps the mistakes of HTTP clients apart from our own faults.

Components log through ``logging.getLogger("fastcache.<component>")``; the formatter shows
``fastcache.coordinator`` as ``[COORDINATOR]`` and so on, aiohttp's own loggers as
``[HTTP]``.

Levels: a client's mistake (malformed HTTP, bad JSON, a refused token, a client that goes
away in the middle of its upload) is one WARNING line without a traceback; a fault of ours
(an unexpected exception, answered 500) is an ERROR with its traceback.
"""

from __future__ import annotations

import logging
import sys

from aiohttp.http_exceptions import HttpProcessingError

_TAGS = {
    "fastcache.coordinator": "[COORDINATOR]",
    "fastcache.client": "[CLIENT]",
    "fastcache.api": "[API]",
    "fastcache.fuse": "[FUSE]",
    "aiohttp": "[HTTP]",
}


def client_fault(exc: BaseException | None) -> str | None:
    """One line saying what the client did wrong, if ``exc`` is a client's fault: malformed
    HTTP (aiohttp's 4xx parser errors) or a connection the client dropped."""
    if isinstance(exc, HttpProcessingError) and 400 <= (exc.code or 0) < 500:
        # aiohttp's message spreads over lines: what is wrong, the offending bytes, a caret
        parts = [p.strip() for p in str(exc.message).splitlines() if p.strip(" ^")]
        return f"malformed HTTP: {' '.join(parts)[:200] or exc.code}"
    if isinstance(exc, ConnectionError):
        return f"the client went away ({exc})"
    return None


class ClientErrorFilter(logging.Filter):
    """Turns a record aiohttp logs for a client's fault (``Error handling request`` with a
    traceback, at ERROR) into one WARNING line; anything else passes unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        fault = client_fault(record.exc_info[1] if record.exc_info else None)
        if fault is not None and record.levelno > logging.WARNING:
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg, record.args = "%s: %s", (record.getMessage(), fault)
            record.exc_info = record.exc_text = None
        return True


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
    handler.addFilter(ClientErrorFilter())
    root = logging.getLogger("fastcache")
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    root.propagate = False
    # aiohttp's server logs (``aiohttp.server``: "Error handling request") go through the
    # same handler and filter, not Python's last-resort handler with a bare traceback.
    aio = logging.getLogger("aiohttp")
    aio.handlers[:] = [handler]
    aio.setLevel(max(logging.WARNING, root.level))
    aio.propagate = False
