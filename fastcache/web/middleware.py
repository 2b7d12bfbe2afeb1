"""The two middlewares every app runs.

- ``error_middleware``: domain errors and aiohttp errors become ``{"error", "kind"}`` JSON with
  the status from ``errors.http_status_for``; anything unexpected is logged once and answered
  500 with a generic message, never a traceback. A client's mistake (a 4xx answer, malformed
  HTTP in its body, a client gone in the middle of its request) is one WARNING line; ours (a
  500) an ERROR with the traceback (``log.py``).
- ``auth_middleware``: the cluster bearer token (the scheme in any case, as HTTP says).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiohttp import ClientError, web

from fastcache.errors import FastcacheError, Unauthorized, error_kind, http_status_for
from fastcache.log import client_fault

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_KIND_BY_STATUS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "PermissionDenied",
    404: "NotFound",
    405: "MethodNotAllowed",
    413: "PayloadTooLarge",
}


def error_response(status: int, message: str, kind: str) -> web.Response:
    return web.json_response({"error": message, "kind": kind}, status=status)


# Answers about the state of things, not mistakes: a chunk miss is a peer's everyday 404, a
# stale version an optimistic writer's 409. Logged at DEBUG; every other 4xx at WARNING.
_ROUTINE = frozenset({404, 409, 412, 416})


def _log_client_error(
    log: logging.Logger, request: web.Request, status: int | None, why: str
) -> None:
    """One line, no traceback: the client's mistake, not ours (``status``: what it is
    answered, ``None`` if it cannot be)."""
    level = logging.DEBUG if status in _ROUTINE else logging.WARNING
    if log.isEnabledFor(level):
        lines = why.strip().splitlines()
        answer = "" if status is None else f"{status} "
        where = (request.method, request.path, request.remote)
        log.log(level, "%s %s from %s: %s%s", *where, answer, lines[0] if lines else "")


def _client_fault(request: web.Request, exc: Exception) -> str | None:
    """What the client did wrong if ``exc`` is its fault: malformed HTTP in its body, or its
    connection gone (``ConnectionResetError`` from reading the body: not a reset of one of
    our own outgoing connections, which are ``ClientError``s)."""
    if isinstance(exc, ClientError):
        return None
    if isinstance(exc, ConnectionError):
        transport = request.transport
        if transport is not None and not transport.is_closing():
            return None
    return client_fault(exc)


def error_middleware(log: logging.Logger) -> Any:
    """The outermost middleware: the one place an exception becomes an HTTP answer."""

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except FastcacheError as exc:
            status = http_status_for(exc)
            if status < 500:
                _log_client_error(log, request, status, str(exc))
            return error_response(status, str(exc), error_kind(exc))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            if isinstance(exc, web.HTTPRequestEntityTooLarge):
                message = "request body too large"
            else:
                message = exc.reason
            if exc.status < 500:
                _log_client_error(log, request, exc.status, message)
            resp = error_response(exc.status, message, _KIND_BY_STATUS.get(exc.status, "HTTPError"))
            if "Allow" in exc.headers:
                resp.headers["Allow"] = exc.headers["Allow"]
            return resp
        except Exception as exc:
            fault = _client_fault(request, exc)
            if fault is None:
                log.exception("unexpected error serving %s %s", request.method, request.path)
                return error_response(500, "internal error", "InternalError")
            gone = isinstance(exc, ConnectionError)
            _log_client_error(log, request, None if gone else 400, fault)
            return error_response(400, fault, "BadRequest")  # if anyone is there to read it

    return middleware


OPENAPI_PATH = "/api/openapi.json"  # where both services publish their ``OpenAPI`` document


def auth_middleware(token: str | None, open_paths: Iterable[str] = ("/api/health",)) -> Any:
    """Require ``Authorization: Bearer <token>`` on every path but ``open_paths`` and the
    OpenAPI document, which is always public (``OpenAPI.add`` documents it so).

    ``token=None`` leaves the API open. The scheme is matched in any case (``bearer``,
    ``BEARER``: RFC 9110 makes it case-insensitive); a missing or malformed header or a wrong
    token is a 401. The token comparison is constant-time.
    """
    expected = None if token is None else token.encode("utf-8", "surrogateescape")
    exempt = frozenset(open_paths) | {OPENAPI_PATH}

    @web.middleware
    async def middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
        if expected is not None and request.path not in exempt:
            parts = request.headers.get("Authorization", "").split(None, 1)
            if (
                len(parts) != 2
                or parts[0].lower() != "bearer"
                or not hmac.compare_digest(
                    parts[1].strip().encode("utf-8", "surrogateescape"), expected
                )
            ):
                raise Unauthorized("missing or wrong cluster token")
        return await handler(request)

    return middleware
