"""Input checking against a small JSON-Schema subset: request bodies (``read_json``) and
query or path parameters (``Param``). The same schema objects feed the ``OpenAPI`` builder,
so the published document and what the server accepts cannot drift apart."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Literal

from aiohttp import web

from fastcache.errors import BadRequest

Schema = dict[str, Any]


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
