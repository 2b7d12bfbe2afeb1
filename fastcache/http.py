"""aiohttp plumbing shared by the coordinator and the client API.

- ``error_middleware``: domain errors and aiohttp errors become ``{"error", "kind"}`` JSON with
  the status from ``errors.http_status_for``; anything unexpected is logged once and answered
  500 with a generic message, never a traceback. A client's mistake (a 4xx answer, malformed
  HTTP in its body, a client gone in the middle of its request) is one WARNING line; ours (a
  500) an ERROR with the traceback (``log.py``).
- ``auth_middleware``: the cluster bearer token (the scheme in any case, as HTTP says).
- ``read_json`` / ``validate`` and ``Param``: input checking against a small JSON-Schema subset.
  The same schema objects feed the ``OpenAPI`` builder, so the published document and what the
  server accepts cannot drift apart.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import os
import re
import select
from collections.abc import Awaitable, Callable, Iterable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal

from aiohttp import ClientError, web

from fastcache.errors import (
    BadRequest,
    FastcacheError,
    Unauthorized,
    error_kind,
    http_status_for,
)
from fastcache.log import ClientErrorFilter, client_fault

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Schema = dict[str, Any]

INT64_MAX = (1 << 63) - 1
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


def protocol_logger(name: str) -> logging.Logger:
    """The logger to give ``AppRunner(logger=...)``: a client's malformed HTTP or dropped
    connection, which aiohttp logs at ERROR with a traceback, becomes one WARNING line
    (``setup_logging`` filters every handler's records the same way)."""
    logger = logging.getLogger(name)
    if not any(isinstance(f, ClientErrorFilter) for f in logger.filters):
        logger.addFilter(ClientErrorFilter())
    return logger


# --- zero-copy file answers --------------------------------------------------------------
SEND_TIMEOUT = 30.0  # seconds a peer may leave its receive window shut before we give up


async def send_file(
    request: web.Request, path: str, size: int, pool: Executor
) -> web.StreamResponse | None:
    """Answer 200 with the first ``size`` bytes of ``path`` through ``os.sendfile`` on the
    connection's socket: the body never enters this process (uvloop has no
    ``loop.sendfile``, and aiohttp's fallback reads the file into memory in pieces).

    ``None``, before anything is sent, when this cannot work (TLS, no socket, the file is
    gone): the caller answers the usual way. A body cut short (the file shrank, the peer
    went away) closes the connection, so the peer sees an error, never a short body.
    """
    transport = request.transport
    if transport is None or transport.get_extra_info("sslcontext") is not None:
        return None
    sock = transport.get_extra_info("socket")
    if sock is None:
        return None
    loop = asyncio.get_running_loop()
    try:
        fd = await loop.run_in_executor(pool, os.open, path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        resp = web.StreamResponse(status=200)
        resp.content_length = size
        resp.content_type = "application/octet-stream"
        await resp.prepare(request)
        await resp.write(b"")  # aiohttp holds headers back for the first body write
        if transport.get_write_buffer_size():  # must be on the wire before the body
            await resp.write(await loop.run_in_executor(pool, os.pread, fd, size, 0))
            await resp.write_eof()
            return resp
        sent = await loop.run_in_executor(pool, _sendfile_all, sock.fileno(), fd, size)
        if sent != size:
            transport.close()
    except OSError:
        transport.close()
        return resp
    finally:
        os.close(fd)
    await resp.write_eof()
    return resp


def _sendfile_all(sock_fd: int, fd: int, size: int) -> int:
    """``os.sendfile`` until ``size`` bytes went (or the file ends); waits out a full socket
    buffer (the socket is non-blocking: the event loop owns it)."""
    sent = 0
    poller = select.poll()
    poller.register(sock_fd, select.POLLOUT)
    while sent < size:
        try:
            n = os.sendfile(sock_fd, fd, sent, size - sent)
        except BlockingIOError:
            if not poller.poll(SEND_TIMEOUT * 1000):
                raise TimeoutError("peer stopped reading") from None
            continue
        if n == 0:
            break
        sent += n
    return sent


# --- input validation --------------------------------------------------------------------
def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


@lru_cache(maxsize=256)
def _regex(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _utf8_ok(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def validate(value: Any, schema: Mapping[str, Any], where: str = "body") -> Any:
    """Check ``value`` against a JSON-Schema subset; raise ``BadRequest`` naming the field.

    Supported: type (one name), nullable, properties, required, additionalProperties
    (bool or schema), items, minItems, maxItems, minimum, maximum, minLength, maxLength,
    pattern, enum. That is all our schemas use, and all the OpenAPI document declares.
    """
    if value is None and schema.get("nullable"):
        return value
    kind = schema.get("type")
    if kind == "object":
        if not isinstance(value, dict):
            raise BadRequest(f"{where} must be an object")
        props: Mapping[str, Any] = schema.get("properties", {})
        for name in schema.get("required", ()):
            if name not in value:
                raise BadRequest(f"{where}.{name} is required")
        extra = schema.get("additionalProperties", True)
        for name, item in value.items():
            sub = props.get(name)
            if sub is not None:
                validate(item, sub, f"{where}.{name}")
            elif extra is False:
                raise BadRequest(f"{where}: unknown field {name!r}")
            elif isinstance(extra, Mapping):
                validate(item, extra, f"{where}.{name}")
    elif kind == "array":
        if not isinstance(value, list):
            raise BadRequest(f"{where} must be an array")
        if len(value) < schema.get("minItems", 0):
            raise BadRequest(f"{where} has too few items")
        if "maxItems" in schema and len(value) > schema["maxItems"]:
            raise BadRequest(f"{where} has too many items")
        items = schema.get("items")
        if items is not None:
            for i, item in enumerate(value):
                validate(item, items, f"{where}[{i}]")
    elif kind == "string":
        if not isinstance(value, str):
            raise BadRequest(f"{where} must be a string")
        if not _utf8_ok(value):
            raise BadRequest(f"{where} is not valid UTF-8")
        if len(value) < schema.get("minLength", 0):
            raise BadRequest(f"{where} is too short")
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            raise BadRequest(f"{where} is too long")
        if "pattern" in schema and not _regex(schema["pattern"]).search(value):
            raise BadRequest(f"{where} has an invalid format")
    elif kind == "integer":
        if not _is_int(value):
            raise BadRequest(f"{where} must be an integer")
        _check_range(value, schema, where)
    elif kind == "number":
        if not (_is_int(value) or isinstance(value, float)) or not math.isfinite(value):
            raise BadRequest(f"{where} must be a number")
        _check_range(value, schema, where)
    elif kind == "boolean":
        if not isinstance(value, bool):
            raise BadRequest(f"{where} must be a boolean")
    elif kind is not None:  # pragma: no cover - a schema bug, not an input error
        raise TypeError(f"unsupported schema type {kind!r}")
    if "enum" in schema and value not in schema["enum"]:
        raise BadRequest(f"{where} must be one of {', '.join(map(str, schema['enum']))}")
    return value


def _check_range(value: float, schema: Mapping[str, Any], where: str) -> None:
    if "minimum" in schema and value < schema["minimum"]:
        raise BadRequest(f"{where} must be at least {schema['minimum']}")
    if "maximum" in schema and value > schema["maximum"]:
        raise BadRequest(f"{where} must be at most {schema['maximum']}")


async def read_json(request: web.Request, schema: Mapping[str, Any]) -> dict[str, Any]:
    """The request body parsed as JSON and validated; ``client_max_size`` bounds it (413)."""
    raw = await request.read()
    try:
        doc = json.loads(raw)
    except (ValueError, RecursionError):  # JSONDecodeError, bad UTF-8, 4300-digit ints
        raise BadRequest("request body is not valid JSON") from None
    validate(doc, schema)
    if not isinstance(doc, dict):
        raise BadRequest("request body must be a JSON object")
    return doc


def req_str(doc: Mapping[str, Any], key: str) -> str:
    value = doc.get(key)
    if not isinstance(value, str):
        raise BadRequest(f"{key} must be a string")
    return value


def opt_str(doc: Mapping[str, Any], key: str) -> str | None:
    return None if doc.get(key) is None else req_str(doc, key)


def req_int(doc: Mapping[str, Any], key: str) -> int:
    value = doc.get(key)
    if not _is_int(value):
        raise BadRequest(f"{key} must be an integer")
    return int(value)  # type: ignore[arg-type]


def opt_int(doc: Mapping[str, Any], key: str) -> int | None:
    return None if doc.get(key) is None else req_int(doc, key)


def opt_bool(doc: Mapping[str, Any], key: str, default: bool = False) -> bool:
    value = doc.get(key, default)
    if not isinstance(value, bool):
        raise BadRequest(f"{key} must be a boolean")
    return value


@dataclass(frozen=True)
class Param:
    """A query or path parameter: its OpenAPI declaration and its parser in one object."""

    name: str
    where: Literal["query", "path"]
    schema: Schema
    required: bool = False
    description: str = ""

    def get(self, request: web.Request) -> Any:
        """The parsed value (``None`` when optional and absent); ``BadRequest`` if invalid."""
        source = request.match_info if self.where == "path" else request.query
        raw = source.get(self.name)
        if raw is None:
            if self.required or self.where == "path":
                raise BadRequest(f"{self.name} is required")
            return self.schema.get("default")
        value: Any = raw
        if self.schema.get("type") == "integer":
            if not re.fullmatch(r"-?[0-9]{1,19}", raw):
                raise BadRequest(f"{self.name} must be an integer")
            value = int(raw)
        elif self.schema.get("type") == "boolean":
            if raw not in ("true", "false"):
                raise BadRequest(f"{self.name} must be true or false")
            value = raw == "true"
        return validate(value, self.schema, self.name)

    def spec(self) -> Schema:
        doc: Schema = {
            "name": self.name,
            "in": self.where,
            "required": self.required or self.where == "path",
            "schema": self.schema,
        }
        if self.description:
            doc["description"] = self.description
        return doc


# --- OpenAPI -----------------------------------------------------------------------------
ERROR_SCHEMA: Schema = {
    "type": "object",
    "required": ["error", "kind"],
    "properties": {"error": {"type": "string"}, "kind": {"type": "string"}},
}
_REASONS = {
    200: "OK",
    201: "Created",
    204: "No content",
    400: "Malformed input",
    401: "Missing or wrong token",
    403: "Not permitted",
    404: "Not found",
    409: "Conflict with the current state",
    413: "Request body too large",
    503: "Service unavailable",
}


@dataclass
class OpenAPI:
    """Collects routes as they are added to a router and renders an OpenAPI 3.0 document."""

    title: str
    version: str
    bearer: bool = False
    paths: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(
        self,
        router: web.UrlDispatcher,
        method: str,
        path: str,
        handler: Handler,
        *,
        summary: str,
        params: Iterable[Param] = (),
        body: Schema | None = None,
        responses: Mapping[int, Schema | None],
        public: bool = False,
    ) -> None:
        """Register ``handler`` and document it. ``responses`` maps status → body schema.

        ``public``: answered without the token (``auth_middleware``'s ``open_paths``); the
        document itself always is.
        """
        router.add_route(method, path, handler)
        public = public or handler == self.handler
        op: Schema = {
            "summary": summary,
            "operationId": f"{method.lower()}_{re.sub(r'[^A-Za-z0-9]+', '_', path).strip('_')}",
            "parameters": [p.spec() for p in params],
            "responses": {},
        }
        if body is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": body}},
            }
        codes = dict(responses)
        if body is not None or any(p.where == "query" or p.schema.get("type") for p in params):
            codes.setdefault(400, ERROR_SCHEMA)
        if body is not None:
            codes.setdefault(413, ERROR_SCHEMA)
        if self.bearer and not public:
            codes.setdefault(401, ERROR_SCHEMA)
        else:
            op["security"] = []
        for status, schema in sorted(codes.items()):
            answer: Schema = {"description": _REASONS.get(status, "Answer")}
            if schema is not None:
                answer["content"] = {"application/json": {"schema": schema}}
            op["responses"][str(status)] = answer
        self.paths.setdefault(path, {})[method.lower()] = op

    def document(self) -> Schema:
        doc: Schema = {
            "openapi": "3.0.3",
            "info": {"title": self.title, "version": self.version},
            "paths": self.paths,
        }
        if self.bearer:
            doc["components"] = {
                "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}}
            }
            doc["security"] = [{"bearer": []}]
        return doc

    async def handler(self, request: web.Request) -> web.Response:
        return web.json_response(self.document())
