"""Route tables and the OpenAPI 3.0 document built from them."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from fastcache.web.middleware import Handler
from fastcache.web.validate import Param, Schema

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


@dataclass(frozen=True)
class Route:
    """One row of an app's route table: what answers, and what the document says of it.

    ``responses`` maps status → body schema (``None``: no JSON body). ``public``: answered
    without the token (the auth middleware's ``open_paths``); the document itself always is.
    """

    method: str
    path: str
    handler: Handler
    summary: str
    responses: Mapping[int, Schema | None]
    params: Sequence[Param] = ()
    body: Schema | None = None
    public: bool = False


@dataclass
class OpenAPI:
    """Collects routes as they are added to a router and renders an OpenAPI 3.0 document."""

    title: str
    version: str
    bearer: bool = False
    paths: dict[str, dict[str, Any]] = field(default_factory=dict)

    def add(self, router: web.UrlDispatcher, route: Route) -> None:
        """Register ``route.handler`` and document it."""
        method, path, handler = route.method, route.path, route.handler
        router.add_route(method, path, handler)
        params, body = route.params, route.body
        public = route.public or handler == self.handler
        op: Schema = {
            "summary": route.summary,
            "operationId": f"{method.lower()}_{re.sub(r'[^A-Za-z0-9]+', '_', path).strip('_')}",
            "parameters": [p.spec() for p in params],
            "responses": {},
        }
        if body is not None:
            op["requestBody"] = {
                "required": True,
                "content": {"application/json": {"schema": body}},
            }
        codes = dict(route.responses)
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

    def add_all(self, router: web.UrlDispatcher, routes: Iterable[Route]) -> None:
        """Register a route table, row by row, in its order (aiohttp matches in that order)."""
        for route in routes:
            self.add(router, route)

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
