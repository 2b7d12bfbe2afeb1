"""aiohttp's own error lines (malformed HTTP, a client gone) made into one WARNING line."""

from __future__ import annotations

import logging

from fastcache.log import ClientErrorFilter


def protocol_logger(name: str) -> logging.Logger:
    """The logger to give ``AppRunner(logger=...)``: a client's malformed HTTP or dropped
    connection, which aiohttp logs at ERROR with a traceback, becomes one WARNING line
    (``setup_logging`` filters every handler's records the same way)."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, ClientErrorFilter) for f in logger.filters):
        logger.addFilter(ClientErrorFilter())
    return logger
