"""The coordinator's HTTP face: a thin aiohttp adapter over ``CoordinatorService``.

Every route is declared once through ``OpenAPI.add`` with the JSON schemas its input is
validated against, so ``/api/openapi.json`` describes exactly what the server accepts. A
manifest is the exception: its schema only documents it, the service checks it
(``model.validate_manifest``, the one manifest check coordinator and nodes share).
The namespace operations are one table (``NS_OPS``: argument schema + service call) that the
REST handlers and the WebSocket session (``GET /api/session``, ``session.py``) both run, so
the two paths validate and answer alike; the session adds leases and push invalidation.

Durability as the API sees it: a change is committed when its answer is sent (it survives the
coordinator being killed and restarted), and on disk when a later ``POST /api/sync`` has
answered, or ``--sync-interval`` seconds after it at the latest. ``GET /api/stats`` counts
commits, syncs and grouped transactions under ``store``. A graceful stop (SIGTERM, SIGINT)
syncs before it exits.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import logging
import signal
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from aiohttp import web

from fastcache import __version__
from fastcache.config import CoordinatorConfig, redacted_url
from fastcache.coordinator.cluster import Cluster
from fastcache.coordinator.model import (
    DEFAULT_READDIR,
    DIGEST_PATTERN,
    INODE_TYPES,
    INT64_MAX,
    MAX_ATIME_BATCH,
    MAX_LOCATION_BATCH,
    MAX_READDIR,
    MAX_TARGET_BYTES,
    MAX_URL,
    PEER_ID_PATTERN,
    STATUS_PATTERN,
    UID_MAX,
    URL_PATTERN,
    XATTR_CREATE,
    XATTR_NAME_MAX,
    XATTR_REPLACE,
    XATTR_SIZE_MAX,
    InodeAttrs,
)
from fastcache.coordinator.service import CoordinatorService, location_key
from fastcache.coordinator.session import Op, SessionHub
from fastcache.errors import BadRequest
from fastcache.metrics.coordinator import CoordinatorCollector, request_timer, route_name
from fastcache.metrics.histogram import OpHistograms
from fastcache.paths import MAX_NAME_BYTES, MAX_PATH_BYTES
from fastcache.web.metrics import METRICS_PATH, metrics_route
from fastcache.web.middleware import auth_middleware, error_middleware
from fastcache.web.openapi import ERROR_SCHEMA, OpenAPI, Route
from fastcache.web.protocol_log import protocol_logger
from fastcache.web.validate import (
    Param,
    Schema,
    opt_bool,
    opt_int,
    opt_str,
    read_json,
    req_int,
    req_str,
)

log = logging.getLogger("fastcache.coordinator")

SERVICE = web.AppKey("service", CoordinatorService)
CLEANUP_TASK = web.AppKey("cleanup_task", asyncio.Task)
SESSIONS = web.AppKey("sessions", SessionHub)
METRICS = web.AppKey("metrics", CoordinatorCollector)

# --- schemas -----------------------------------------------------------------------------
_INT64: Schema = {"type": "integer", "minimum": 0, "maximum": INT64_MAX}
_TIME: Schema = {"type": "integer", "minimum": -INT64_MAX, "maximum": INT64_MAX}
_INO: Schema = {"type": "integer", "minimum": 1, "maximum": INT64_MAX}
_MODE: Schema = {"type": "integer", "minimum": 0, "maximum": 0o7777}
_ID: Schema = {"type": "integer", "minimum": 0, "maximum": UID_MAX}
_NAME: Schema = {"type": "string", "minLength": 1, "maxLength": MAX_NAME_BYTES}
_PATH: Schema = {"type": "string", "maxLength": MAX_PATH_BYTES}
_TARGET: Schema = {"type": "string", "minLength": 1, "maxLength": MAX_TARGET_BYTES}
_DIGEST: Schema = {"type": "string", "pattern": DIGEST_PATTERN}
_PEER_ID: Schema = {"type": "string", "pattern": PEER_ID_PATTERN}
_URL: Schema = {"type": "string", "maxLength": MAX_URL, "pattern": URL_PATTERN}
_STATUS: Schema = {"type": "string", "pattern": STATUS_PATTERN}
# Checked by the service (``model.validate_manifest``, as every node checks what it reads),
# not here: the schema only documents the shape.
_MANIFEST: Schema = {
    "type": "object",
    "description": (
        "A file's content: size, chunk_size, chunks (xxh3-128 digests in order) and, for"
        " content-defined chunking, lengths (one per chunk, adding up to size); without"
        " lengths there are ceil(size / chunk_size) chunks"
    ),
    "example": {"size": 5, "chunk_size": 4, "chunks": ["0" * 32, "1" * 32]},
}


def _obj(required: list[str], **props: Schema) -> Schema:
    return {
        "type": "object",
        "required": required,
        "additionalProperties": False,
        "properties": props,
    }


ATTRS = _obj(
    [
        "ino",
        "type",
        "mode",
        "uid",
        "gid",
        "size",
        "atime_ns",
        "mtime_ns",
        "ctime_ns",
        "nlink",
        "rdev",
        "target",
        "version",
        "blocks",
        "xattrs",
        "manifest",
    ],
    ino=_INO,
    type={"type": "string", "enum": list(INODE_TYPES)},
    mode=_MODE,
    uid=_ID,
    gid=_ID,
    size=_INT64,
    atime_ns=_TIME,
    mtime_ns=_TIME,
    ctime_ns=_TIME,
    nlink=_INT64,
    rdev=_INT64,
    target={"type": "string", "nullable": True},
    version=_INT64,
    blocks=_INT64,
    xattrs={**_INT64, "description": "how many extended attributes the inode has"},
    manifest={**_MANIFEST, "nullable": True},
)
# create's answer: the new inode, and its parent after and (version) before the change
CREATED: Schema = {
    **ATTRS,
    "properties": {**ATTRS["properties"], "parent_attrs": ATTRS, "parent_version_before": _INT64},
}
REMOVED = _obj(
    ["parent_attrs", "parent_version_before"], parent_attrs=ATTRS, parent_version_before=_INT64
)
ENTRIES = _obj(
    ["entries"],
    entries={
        "type": "array",
        "items": _obj(["name", "offset", "attrs"], name=_NAME, offset=_INT64, attrs=ATTRS),
    },
)
PEER = _obj(
    ["peer_id", "url", "capacity", "used", "status", "registered_at", "last_seen"],
    peer_id=_PEER_ID,
    url={"type": "string"},
    capacity=_INT64,
    used=_INT64,
    status={"type": "string"},
    registered_at={"type": "number"},
    last_seen={"type": "number"},
)
PEERS = _obj(["peers"], peers={"type": "array", "items": PEER})
LOCATION = _obj(["key", "peers"], key={"type": "string"}, peers={"type": "array", "items": PEER})
ANY_OBJECT: Schema = {"type": "object"}

REGISTER = _obj(
    ["peer_id", "url", "capacity"], peer_id=_PEER_ID, url=_URL, capacity=_INT64, used=_INT64
)
STATUS = _obj(["peer_id"], peer_id=_PEER_ID, used=_INT64, status=_STATUS)
LOCATION_PUT = _obj(
    ["peer_id", "action"],
    path=_PATH,
    chunk=_DIGEST,
    chunks={"type": "array", "items": _DIGEST, "minItems": 1, "maxItems": MAX_LOCATION_BATCH},
    peer_id=_PEER_ID,
    action={"type": "string", "enum": ["add", "remove"]},
)
LOOKUP = _obj(["parent", "name"], parent=_INO, name=_NAME)
SETATTR = _obj([], mode=_MODE, uid=_ID, gid=_ID, size=_INT64, atime_ns=_TIME, mtime_ns=_TIME)
CREATE = _obj(
    ["parent", "name", "type"],
    parent=_INO,
    name=_NAME,
    type={"type": "string", "enum": list(INODE_TYPES)},
    mode=_MODE,
    uid=_ID,
    gid=_ID,
    rdev=_INT64,
    target={**_TARGET, "nullable": True},
)
LINK = _obj(["ino", "new_parent", "new_name"], ino=_INO, new_parent=_INO, new_name=_NAME)
RENAME = _obj(
    ["parent", "name", "new_parent", "new_name"],
    parent=_INO,
    name=_NAME,
    new_parent=_INO,
    new_name=_NAME,
    noreplace={"type": "boolean"},
    exchange={"type": "boolean"},
)
COMMIT = _obj(
    ["manifest", "expected_version"],
    manifest=_MANIFEST,
    expected_version=_INT64,
    holder=_PEER_ID,
    held={"type": "array", "items": _DIGEST, "maxItems": MAX_LOCATION_BATCH},
)
PUT_PATH = _obj(
    ["path", "manifest"],
    path=_PATH,
    manifest=_MANIFEST,
    expected_version={**_INT64, "nullable": True},
    mode=_MODE,
    uid=_ID,
    gid=_ID,
    make_parents={"type": "boolean"},
)

# Extended attributes. Names are text; their limits are the service's (ERANGE, ENOTSUP), not
# the schema's. Values travel as base64 (standard alphabet, padded) over REST and the
# session alike; the schema bounds the text, the service the bytes (E2BIG beyond 64 KiB).
_XATTR_NAME: Schema = {
    "type": "string",
    "description": (
        f"namespace.name, 1 to {XATTR_NAME_MAX} UTF-8 bytes (ERANGE beyond); namespaces"
        " user, trusted, security (others, system.posix_acl_* included: ENOTSUP)"
    ),
}
_XATTR_VALUE: Schema = {
    "type": "string",
    "pattern": "^[A-Za-z0-9+/]*={0,2}$",
    "maxLength": 2 * 4 * -(-XATTR_SIZE_MAX // 3),
    "description": f"the value in base64; at most {XATTR_SIZE_MAX} bytes (E2BIG beyond)",
}
_GIDS: Schema = {"type": "array", "items": _ID, "maxItems": 65536}
_XATTR_FLAGS: Schema = {
    "type": "integer",
    "minimum": 0,
    "maximum": XATTR_CREATE | XATTR_REPLACE,
    "description": f"{XATTR_CREATE}: XATTR_CREATE (EEXIST if it exists), {XATTR_REPLACE}:"
    " XATTR_REPLACE (ENODATA if it does not)",
}
_WHO_DOC = (
    "as whom (Linux's rules: user.* needs read or write permission, trusted.* is root's);"
    " without uid, as the cluster (no check)"
)
SETXATTR = _obj(
    ["name", "value"],
    name=_XATTR_NAME,
    value=_XATTR_VALUE,
    flags=_XATTR_FLAGS,
    uid={**_ID, "description": _WHO_DOC},
    gids=_GIDS,
)
XATTR = _obj(["name", "value"], name=_XATTR_NAME, value=_XATTR_VALUE)
XATTR_NAMES = _obj(["names"], names={"type": "array", "items": _XATTR_NAME})
XATTR_GET = _obj([], **XATTR["properties"], **XATTR_NAMES["properties"])  # one or the other

P_INO = Param("ino", "path", _INO)
P_PEER = Param("peer_id", "path", _PEER_ID)
P_PATH = Param("path", "query", _PATH, description="a path in the namespace")
P_PATH_REQ = Param("path", "query", _PATH, required=True)
P_CHUNK = Param("chunk", "query", _DIGEST, description="a chunk digest")
P_OFFSET = Param("offset", "query", {**_INT64, "default": 0}, description="resume cookie")
P_REPLY = Param(
    "reply",
    "query",
    {"type": "boolean", "default": False},
    description="answer with the parent's attributes instead of 204",
)
P_LIMIT = Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": MAX_READDIR})

# --- operator tools (fastcache status, fsck, gc) -------------------------------------------
MAX_MANIFEST_PAGE = 1000
P_AFTER_INO = Param(
    "after", "query", _INT64, description="inodes after this one (the last page's next_after)"
)
P_PAGE = Param("limit", "query", {"type": "integer", "minimum": 1, "maximum": MAX_MANIFEST_PAGE})
ADMIN_PEER = _obj(
    ["peer_id", "url", "capacity", "used", "status", "registered_at", "last_seen", "live"],
    peer_id=_PEER_ID,
    url=_URL,
    capacity=_INT64,
    used=_INT64,
    status=_STATUS,
    registered_at={"type": "number"},
    last_seen={"type": "number"},
    live={"type": "boolean", "description": "heard from within the peer timeout"},
)
ADMIN_STATUS = _obj(
    ["version", "now", "peer_timeout", "peers", "namespace"],
    version={"type": "string"},
    now={"type": "number", "description": "the coordinator's clock (epoch seconds)"},
    peer_timeout={"type": "number"},
    peers={"type": "array", "items": ADMIN_PEER},
    namespace={"type": "object", "description": "inodes by type, file bytes, location records"},
    sessions={"type": "object"},
)
MANIFEST_PAGE = _obj(
    ["files", "next_after"],
    files={
        "type": "array",
        "items": _obj(["ino", "manifest"], ino=_INO, manifest=_MANIFEST),
    },
    next_after={**_INO, "nullable": True, "description": "pass as after; null: the last page"},
)
P_XNAME = Param("name", "query", _XATTR_NAME, description="one attribute (without: the names)")
P_XNAME_REQ = Param("name", "query", _XATTR_NAME, required=True)
P_UID = Param("uid", "query", _ID, description=_WHO_DOC)
P_GIDS = Param(
    "gids",
    "query",
    {"type": "string", "pattern": "^[0-9]{1,10}(,[0-9]{1,10}){0,65535}$"},
    description="the caller's groups, comma-separated",
)


# --- the namespace operations: one table for REST and the session ------------------------
# Each op takes its arguments as one object (REST: the body plus path and query parameters;
# session: the frame's ``args``), validated against ``Op.schema``, and runs one service call.
def _with(schema: Schema, required: list[str], **props: Schema) -> Schema:
    """``schema`` plus properties (a path or query parameter as an argument)."""
    return {
        **schema,
        "required": [*required, *schema.get("required", ())],
        "properties": {**schema["properties"], **props},
    }


INO_ARGS = _obj(["ino"], ino=_INO)
SETATTR_ARGS = _with(SETATTR, ["ino"], ino=_INO)
READDIR_ARGS = _obj(
    ["ino"], ino=_INO, offset=_INT64, limit=P_LIMIT.schema, manifests={"type": "boolean"}
)  # manifests: the session's listing only (``service.readdir_rows``)
MKDIR_ARGS = _obj(["parent", "name"], parent=_INO, name=_NAME, mode=_MODE, uid=_ID, gid=_ID)
SYMLINK_ARGS = _obj(
    ["parent", "name", "target"],
    parent=_INO,
    name=_NAME,
    target=_TARGET,
    uid=_ID,
    gid=_ID,
)
REMOVE_ARGS = _with(LOOKUP, ["is_dir"], is_dir={"type": "boolean"})
ATIMES_ARGS = _obj(
    ["atimes"],
    atimes={
        "type": "array",
        "maxItems": MAX_ATIME_BATCH,
        "items": {"type": "array", "minItems": 2, "maxItems": 2, "items": _INT64},
    },
)
COMMIT_ARGS = _with(COMMIT, ["ino"], ino=_INO)
NO_ARGS = _obj([])
XATTR_ARGS = _obj(["ino", "name"], ino=_INO, name=_XATTR_NAME, uid=_ID, gids=_GIDS)
XATTRS_ARGS = _obj(["ino"], ino=_INO, uid=_ID, gids=_GIDS)
SETXATTR_ARGS = _with(SETXATTR, ["ino"], ino=_INO)
LOCATIONS_ARGS = _obj(
    ["peer_id", "chunks"],
    peer_id=_PEER_ID,
    chunks={"type": "array", "items": _DIGEST, "maxItems": MAX_LOCATION_BATCH},
)


def _removed_doc(parent: Any) -> dict[str, Any]:
    return {"parent_attrs": parent.to_json(), "parent_version_before": parent.version - 1}


async def _op_lookup(svc: CoordinatorService, a: dict[str, Any]) -> Any:
    return (await svc.lookup(req_int(a, "parent"), req_str(a, "name"))).to_json()


async def _op_getattr(svc: CoordinatorService, a: dict[str, Any]) -> Any:
    return (await svc.getattr(req_int(a, "ino"))).to_json()


async def _op_setattr(svc: CoordinatorService, a: dict[str, Any]) -> Any:
    fields = {name: opt_int(a, name) for name in SETATTR["properties"]}
    return (await svc.setattr(req_int(a, "ino"), **fields)).to_json()


async def _op_readdir(svc: CoordinatorService, a: dict[str, Any]) -> Any:
    entries = await svc.readdir(
        req_int(a, "ino"), opt_int(a, "offset") or 0, opt_int(a, "limit") or DEFAULT_READDIR
    )
    return {"entries": [e.to_json() for e in entries]}


async def _op_create(svc: CoordinatorService, a: dict[str, Any]) -> Any:
    type_ = req_str(a, "type")
    attrs, parent, before = await svc.create_entry(
        req_int(a, "parent"),
        req_str(a, "name"),
        type_,
        mode=a.get("mode", 0o755 if type_ == "dir" else 0o644),
        uid=a.get("uid", 0),
        gid=a.get("gid", 0),
        rdev=a.get("rdev", 0),
        target=opt_str(a, "target"),
    )
    answer = attrs.to_json()
    answer["parent_attrs"] = parent.to_json()
    answer["parent_version_before"] = before
    return answer


async def _op_mkdir(svc: CoordinatorService, a: dict[str, Any]) -> Any:
    return await _op_create(svc, {**a, "type": "dir"})


async def _op_symlink(svc: CoordinatorService, a: dict[str, Any]) -> Any:
    return await _op_create(svc, {**a, "type": "symlink", "mode": 0o777})


async def _op_link(svc: CoordinatorService, a: dict[str, Any]) -> Any:
    attrs = await svc.link(req_int(a, "ino"), req_int(a, "new_parent"), req_str(a, "new_name"))
    return attrs.to_json()


async def _op_unlink(svc: CoordinatorService, a: dict[str, Any]) -> Any:
    return _removed_doc(await svc.unlink(req_int(a, "parent"), req_str(a, "name")))


async def _op_rmdir(svc: CoordinatorService, a: dict[str, Any]) -> Any:
    return _removed_doc(await svc.rmdir(req_int(a, "parent"), req_str(a, "name")))


async def _op_remove_entry(svc: CoordinatorService, a: dict[str, Any]) -> Any:
    return await (_op_rmdir if opt_bool(a, "is_dir") else _op_unlink)(svc, a)


async def _rename(svc: CoordinatorService, a: dict[str, Any]) -> list[InodeAttrs]:
    return await svc.rename(
        req_int(a, "parent"),
        req_str(a, "name"),
        req_int(a, "new_parent"),
        req_str(a, "new_name"),
        noreplace=opt_bool(a, "noreplace"),
        exchange=opt_bool(a, "exchange"),
    )


async def _op_touch_atimes(svc: CoordinatorService, a: dict[str, Any]) -> Any:
    """A node's batch of read access times (``relatime``): the session's op only."""
    return {"moved": await svc.touch_atimes([(int(i), int(ns)) for i, ns in a["atimes"]])}


async def _op_rename(svc: CoordinatorService, a: dict[str, Any]) -> Any:
    await _rename(svc, a)
    return None


async def _op_rename_entry(svc: CoordinatorService, a: dict[str, Any]) -> Any:
    """``rename``, answering the directories' attributes after it (the node's kernel
    revalidates them next: no getattr needed)."""
    return {"parents": [attrs.to_json() for attrs in await _rename(svc, a)]}


async def _op_commit(svc: CoordinatorService, a: dict[str, Any]) -> Any:
    attrs = await svc.commit_manifest(
        req_int(a, "ino"),
        a["manifest"],
        req_int(a, "expected_version"),
        holder=opt_str(a, "holder"),
        held=a.get("held") or (),
    )
    return attrs.to_json()


def _who(a: dict[str, Any]) -> dict[str, Any]:
    """The caller an xattr op checks permissions for (``uid`` absent: no check)."""
    return {"uid": opt_int(a, "uid"), "gids": a.get("gids") or ()}


def _unbase64(text: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error:
        raise BadRequest("value is not base64") from None


async def _op_getxattr(svc: CoordinatorService, a: dict[str, Any]) -> Any:
    name = req_str(a, "name")
    value = await svc.getxattr(req_int(a, "ino"), name, **_who(a))
    return {"name": name, "value": base64.b64encode(value).decode()}


async def _op_listxattr(svc: CoordinatorService, a: dict[str, Any]) -> Any:
    return {"names": await svc.listxattr(req_int(a, "ino"), **_who(a))}


async def _op_setxattr(svc: CoordinatorService, a: dict[str, Any]) -> Any:
    value = _unbase64(req_str(a, "value"))
    flags = opt_int(a, "flags") or 0
    attrs = await svc.setxattr(req_int(a, "ino"), req_str(a, "name"), value, flags, **_who(a))
    return attrs.to_json()


async def _op_removexattr(svc: CoordinatorService, a: dict[str, Any]) -> Any:
    return (await svc.removexattr(req_int(a, "ino"), req_str(a, "name"), **_who(a))).to_json()


async def _op_statfs(svc: CoordinatorService, a: dict[str, Any]) -> Any:
    return await svc.statfs()


async def _op_sync(svc: CoordinatorService, a: dict[str, Any]) -> Any:
    await svc.sync()
    return None


async def _op_add_locations(svc: CoordinatorService, a: dict[str, Any]) -> Any:
    keys = [location_key(chunk=c) for c in a["chunks"]]
    await svc.add_locations(keys, req_str(a, "peer_id"))
    return None


NS_OPS: dict[str, Op] = {
    "lookup": Op(LOOKUP, _op_lookup),
    "getattr": Op(INO_ARGS, _op_getattr),
    "setattr": Op(SETATTR_ARGS, _op_setattr),
    "readdir": Op(READDIR_ARGS, _op_readdir),
    "create": Op(CREATE, _op_create),
    "create_entry": Op(CREATE, _op_create),
    "mkdir": Op(MKDIR_ARGS, _op_mkdir),
    "symlink": Op(SYMLINK_ARGS, _op_symlink),
    "link": Op(LINK, _op_link),
    "unlink": Op(LOOKUP, _op_unlink),
    "rmdir": Op(LOOKUP, _op_rmdir),
    "remove_entry": Op(REMOVE_ARGS, _op_remove_entry),
    "rename": Op(RENAME, _op_rename),
    "rename_entry": Op(RENAME, _op_rename_entry),
    "touch_atimes": Op(ATIMES_ARGS, _op_touch_atimes),
    "commit_manifest": Op(COMMIT_ARGS, _op_commit),
    "getxattr": Op(XATTR_ARGS, _op_getxattr),
    "listxattr": Op(XATTRS_ARGS, _op_listxattr),
    "setxattr": Op(SETXATTR_ARGS, _op_setxattr),
    "removexattr": Op(XATTR_ARGS, _op_removexattr),
    "statfs": Op(NO_ARGS, _op_statfs),
    "sync": Op(NO_ARGS, _op_sync),
    "add_locations": Op(LOCATIONS_ARGS, _op_add_locations),
}


def _json(data: Any, status: int = 200) -> web.Response:
    # orjson: a listing of 512 entries encodes 3x faster than with the json module
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


_NO_CONTENT = 204


def _removed(request: web.Request, doc: Any) -> web.Response:
    """unlink/rmdir: 204, or with ``?reply=true`` the parent after and (version) before."""
    if not P_REPLY.get(request):
        return web.Response(status=_NO_CONTENT)
    return _json(doc)


PEER_LIST_TTL = 1.0  # seconds one encoded peer list answers every node that asks


class _Views:
    """The handlers: decode, one service call, encode."""

    def __init__(self, app: web.Application) -> None:
        self._app = app
        self._peer_list: tuple[float, bytes, str] | None = None  # (made, body, ETag)

    @property
    def svc(self) -> CoordinatorService:
        return self._app[SERVICE]

    # peers
    async def register(self, request: web.Request) -> web.Response:
        doc = await read_json(request, REGISTER)
        peer = await self.svc.register_peer(
            req_str(doc, "peer_id"),
            req_str(doc, "url"),
            req_int(doc, "capacity"),
            opt_int(doc, "used") or 0,
        )
        self._peer_list = None
        log.info("peer %s registered at %s", peer.peer_id, peer.url)
        return _json(peer.to_json())

    async def peers(self, request: web.Request) -> web.Response:
        """Every node asks every few seconds: one encoded answer serves them all for
        ``PEER_LIST_TTL`` (a register or deregister here renews it at once), and its ETag
        names the live set (ids and URLs), so an unchanged set is a 304 without a body.
        ``used`` and ``last_seen`` may be that much older."""
        now = time.monotonic()
        cached = self._peer_list
        if cached is None or now - cached[0] > PEER_LIST_TTL:
            peers = await self.svc.list_peers()
            body = orjson.dumps({"peers": [p.to_json() for p in peers]})
            members = sorted((p.peer_id, p.url) for p in peers)
            tag = hashlib.blake2b(orjson.dumps(members), digest_size=12).hexdigest()
            cached = self._peer_list = (now, body, f'"{tag}"')
        _, body, etag = cached
        asked = {t.strip() for t in request.headers.get("If-None-Match", "").split(",")}
        if etag in asked:
            return web.Response(status=304, headers={"ETag": etag})
        return web.Response(body=body, content_type="application/json", headers={"ETag": etag})

    async def status(self, request: web.Request) -> web.Response:
        doc = await read_json(request, STATUS)
        peer = await self.svc.heartbeat(
            req_str(doc, "peer_id"), opt_int(doc, "used"), opt_str(doc, "status")
        )
        return _json(peer.to_json())

    async def deregister(self, request: web.Request) -> web.Response:
        peer_id = P_PEER.get(request)
        await self.svc.deregister_peer(peer_id)
        self._peer_list = None
        log.info("peer %s deregistered", peer_id)
        return web.Response(status=_NO_CONTENT)

    # locations
    async def get_location(self, request: web.Request) -> web.Response:
        key = location_key(P_PATH.get(request), P_CHUNK.get(request))
        peers = await self.svc.locations(key)
        return _json({"key": key, "peers": [p.to_json() for p in peers]})

    async def put_location(self, request: web.Request) -> web.Response:
        doc = await read_json(request, LOCATION_PUT)
        peer_id = req_str(doc, "peer_id")
        add = req_str(doc, "action") == "add"
        chunks = doc.get("chunks")
        if chunks is not None:  # the batch form: one transaction for every chunk
            if doc.get("path") is not None or doc.get("chunk") is not None:
                raise BadRequest("give exactly one of path, chunk and chunks")
            keys = [location_key(chunk=c) for c in chunks]
            if add:
                await self.svc.add_locations(keys, peer_id)
            else:
                await self.svc.remove_locations(keys, peer_id)
            return web.Response(status=_NO_CONTENT)
        key = location_key(opt_str(doc, "path"), opt_str(doc, "chunk"))
        if add:
            await self.svc.add_location(key, peer_id)
        else:
            await self.svc.remove_location(key, peer_id)
        return web.Response(status=_NO_CONTENT)

    async def stats(self, request: web.Request) -> web.Response:
        doc = await self.svc.stats()
        doc["sessions"] = self._app[SESSIONS].stats()
        return _json(doc)

    async def sync(self, request: web.Request) -> web.Response:
        await self._op("sync", {})
        return web.Response(status=_NO_CONTENT)

    async def session(self, request: web.Request) -> web.StreamResponse:
        return await self._app[SESSIONS].handle(request)

    async def statfs(self, request: web.Request) -> web.Response:
        return _json(await self._op("statfs", {}))

    async def health(self, request: web.Request) -> web.Response:
        return _json({"status": "ok", "service": "coordinator", "version": __version__})

    # operator tools
    async def admin_status(self, request: web.Request) -> web.Response:
        peers = [{**p.to_json(), "live": live} for p, live in await self.svc.peers_status()]
        namespace = await self.svc.stats()
        return _json(
            {
                "version": __version__,
                "now": time.time(),
                "peer_timeout": self.svc.peer_timeout,
                "peers": peers,
                "namespace": {k: namespace[k] for k in ("inodes", "bytes", "locations")},
                "sessions": self._app[SESSIONS].stats(),
            }
        )

    async def manifests(self, request: web.Request) -> web.Response:
        limit = P_PAGE.get(request) or MAX_MANIFEST_PAGE
        page = await self.svc.manifests(P_AFTER_INO.get(request) or 0, limit)
        files = [{"ino": ino, "manifest": doc} for ino, doc in page]
        return _json({"files": files, "next_after": page[-1][0] if len(page) == limit else None})

    # namespace: the body (and path/query parameters) are the op's arguments (``NS_OPS``)
    async def _op(self, name: str, args: dict[str, Any]) -> Any:
        return await NS_OPS[name].run(self.svc, args)

    async def lookup(self, request: web.Request) -> web.Response:
        return _json(await self._op("lookup", await read_json(request, LOOKUP)))

    async def getattr(self, request: web.Request) -> web.Response:
        return _json(await self._op("getattr", {"ino": P_INO.get(request)}))

    async def setattr(self, request: web.Request) -> web.Response:
        ino = P_INO.get(request)
        doc = await read_json(request, SETATTR)
        return _json(await self._op("setattr", {**doc, "ino": ino}))

    async def readdir(self, request: web.Request) -> web.Response:
        args = {
            "ino": P_INO.get(request),
            "offset": P_OFFSET.get(request),
            "limit": P_LIMIT.get(request),
        }
        return _json(await self._op("readdir", args))

    async def create(self, request: web.Request) -> web.Response:
        return _json(await self._op("create", await read_json(request, CREATE)), status=201)

    async def link(self, request: web.Request) -> web.Response:
        return _json(await self._op("link", await read_json(request, LINK)))

    async def unlink(self, request: web.Request) -> web.Response:
        return _removed(request, await self._op("unlink", await read_json(request, LOOKUP)))

    async def rmdir(self, request: web.Request) -> web.Response:
        return _removed(request, await self._op("rmdir", await read_json(request, LOOKUP)))

    async def rename(self, request: web.Request) -> web.Response:
        await self._op("rename", await read_json(request, RENAME))
        return web.Response(status=_NO_CONTENT)

    async def commit(self, request: web.Request) -> web.Response:
        ino = P_INO.get(request)
        doc = await read_json(request, COMMIT)
        return _json(await self._op("commit_manifest", {**doc, "ino": ino}))

    def _xattr_args(self, request: web.Request, name: Param | None) -> dict[str, Any]:
        args: dict[str, Any] = {"ino": P_INO.get(request), "uid": P_UID.get(request)}
        gids = P_GIDS.get(request)
        if gids is not None:
            args["gids"] = [int(g) for g in gids.split(",")]
        if name is not None:
            args["name"] = name.get(request)
        return args

    async def getxattr(self, request: web.Request) -> web.Response:
        """With ``?name=``: that attribute's value; without: the names."""
        args = self._xattr_args(request, P_XNAME)
        if args["name"] is None:
            del args["name"]
            return _json(await self._op("listxattr", args))
        return _json(await self._op("getxattr", args))

    async def setxattr(self, request: web.Request) -> web.Response:
        doc = await read_json(request, SETXATTR)
        return _json(await self._op("setxattr", {**doc, "ino": P_INO.get(request)}))

    async def removexattr(self, request: web.Request) -> web.Response:
        return _json(await self._op("removexattr", self._xattr_args(request, P_XNAME_REQ)))

    async def resolve(self, request: web.Request) -> web.Response:
        return _json((await self.svc.resolve(P_PATH_REQ.get(request))).to_json())

    async def put_path(self, request: web.Request) -> web.Response:
        doc = await read_json(request, PUT_PATH)
        attrs = await self.svc.put_file(
            req_str(doc, "path"),
            doc["manifest"],
            expected_version=opt_int(doc, "expected_version"),
            mode=doc.get("mode", 0o644),
            uid=doc.get("uid", 0),
            gid=doc.get("gid", 0),
            make_parents=opt_bool(doc, "make_parents", True),
        )
        return _json(attrs.to_json())

    async def delete_path(self, request: web.Request) -> web.Response:
        await self.svc.delete_path(P_PATH_REQ.get(request))
        return web.Response(status=_NO_CONTENT)


_NF = {404: ERROR_SCHEMA}
_NS_ERR = {404: ERROR_SCHEMA, 409: ERROR_SCHEMA}
_XATTR_ERR = {**_NS_ERR, 403: ERROR_SCHEMA}


def _routes(api: OpenAPI, v: _Views) -> list[Route]:
    """The REST route table (the WebSocket session is not REST: ``make_app`` adds it apart)."""
    inode = "/api/ns/inodes/{ino}"
    return [
        Route(
            "POST",
            "/api/peers/register",
            v.register,
            "Register (or re-register) a peer",
            {200: PEER},
            body=REGISTER,
        ),
        Route(
            "GET",
            "/api/peers",
            v.peers,
            "The live peers (If-None-Match with the last ETag: 304 while the set is the same)",
            {200: PEERS, 304: None},
        ),
        Route(
            "PUT",
            "/api/peers/status",
            v.status,
            "Heartbeat; 404 means register again",
            {200: PEER, **_NF},
            body=STATUS,
        ),
        Route(
            "DELETE",
            "/api/peers/{peer_id}",
            v.deregister,
            "Graceful deregistration",
            {204: None, **_NF},
            [P_PEER],
        ),
        Route(
            "GET",
            "/api/files/location",
            v.get_location,
            "Live peers holding a path or chunk (give exactly one)",
            {200: LOCATION},
            [P_PATH, P_CHUNK],
        ),
        Route(
            "PUT",
            "/api/files/location",
            v.put_location,
            "Add or remove location records: give exactly one of path, chunk, chunks (a batch)",
            {204: None, **_NF},
            body=LOCATION_PUT,
        ),
        Route("GET", "/api/stats", v.stats, "Counters", {200: ANY_OBJECT}),
        Route(
            "POST",
            "/api/sync",
            v.sync,
            "Barrier: answers once every change acknowledged before it is on disk",
            {204: None},
        ),
        Route("GET", "/api/health", v.health, "Liveness", {200: ANY_OBJECT}, public=True),
        Route(
            "GET",
            "/api/admin/status",
            v.admin_status,
            "Every recorded peer (live or not), namespace totals (fastcache status)",
            {200: ADMIN_STATUS},
        ),
        Route(
            "GET",
            "/api/admin/manifests",
            v.manifests,
            "Every inode's manifest, a page at a time in inode order (fsck, gc)",
            {200: MANIFEST_PAGE},
            [P_AFTER_INO, P_PAGE],
        ),
        Route("GET", "/api/openapi.json", api.handler, "This document", {200: ANY_OBJECT}),
        Route(
            "POST",
            "/api/ns/lookup",
            v.lookup,
            "Look a name up in a directory",
            {200: ATTRS, **_NS_ERR},
            body=LOOKUP,
        ),
        Route("GET", inode, v.getattr, "An inode's attributes", {200: ATTRS, **_NF}, [P_INO]),
        Route(
            "PATCH",
            inode,
            v.setattr,
            "Change attributes",
            {200: ATTRS, **_NS_ERR},
            [P_INO],
            body=SETATTR,
        ),
        Route(
            "GET",
            inode + "/entries",
            v.readdir,
            "List a directory from a resume cookie (attrs carry no manifest)",
            {200: ENTRIES, **_NS_ERR},
            [P_INO, P_OFFSET, P_LIMIT],
        ),
        Route(
            "POST",
            "/api/ns/create",
            v.create,
            "Create an inode and its entry",
            {201: CREATED, **_NS_ERR},
            body=CREATE,
        ),
        Route(
            "POST",
            "/api/ns/link",
            v.link,
            "Add a hard link",
            {200: ATTRS, 403: ERROR_SCHEMA, **_NS_ERR},
            body=LINK,
        ),
        Route(
            "POST",
            "/api/ns/unlink",
            v.unlink,
            "Remove a non-directory entry",
            {204: None, 200: REMOVED, **_NS_ERR},
            [P_REPLY],
            body=LOOKUP,
        ),
        Route(
            "POST",
            "/api/ns/rmdir",
            v.rmdir,
            "Remove an empty directory",
            {204: None, 200: REMOVED, **_NS_ERR},
            [P_REPLY],
            body=LOOKUP,
        ),
        Route(
            "POST",
            "/api/ns/rename",
            v.rename,
            "Move an entry, atomically and in O(1)",
            {204: None, **_NS_ERR},
            body=RENAME,
        ),
        Route(
            "PUT",
            inode + "/manifest",
            v.commit,
            "Commit a file's manifest; 409 if expected_version is stale",
            {200: ATTRS, **_NS_ERR},
            [P_INO],
            body=COMMIT,
        ),
        Route(
            "GET",
            inode + "/xattrs",
            v.getxattr,
            "An extended attribute's value (?name=), or without a name every name",
            {200: XATTR_GET, **_XATTR_ERR},
            [P_INO, P_XNAME, P_UID, P_GIDS],
        ),
        Route(
            "PUT",
            inode + "/xattrs",
            v.setxattr,
            "Set an extended attribute (flags: XATTR_CREATE, XATTR_REPLACE); 413: E2BIG",
            {200: ATTRS, 507: ERROR_SCHEMA, **_XATTR_ERR},
            [P_INO],
            body=SETXATTR,
        ),
        Route(
            "DELETE",
            inode + "/xattrs",
            v.removexattr,
            "Remove an extended attribute",
            {200: ATTRS, **_XATTR_ERR},
            [P_INO, P_XNAME_REQ, P_UID, P_GIDS],
        ),
        Route(
            "GET",
            "/api/ns/resolve",
            v.resolve,
            "Resolve a path to its inode",
            {200: ATTRS, **_NS_ERR},
            [P_PATH_REQ],
        ),
        Route(
            "PUT",
            "/api/ns/path",
            v.put_path,
            "Create or replace the file at a path (parents created)",
            {200: ATTRS, **_NS_ERR},
            body=PUT_PATH,
        ),
        Route(
            "DELETE",
            "/api/ns/path",
            v.delete_path,
            "Delete a file or an empty directory by path",
            {204: None, **_NS_ERR},
            [P_PATH_REQ],
        ),
        Route("GET", "/api/ns/statfs", v.statfs, "Filesystem counters", {200: ANY_OBJECT}),
    ]


async def _cleanup_loop(service: CoordinatorService, interval: float, hub: SessionHub) -> None:
    while True:
        await asyncio.sleep(interval)
        if hub.cluster is not None and not hub.cluster.is_leader:
            continue  # the cluster's leader drops timed-out peers, once for everyone
        try:
            gone = await service.cleanup_peers()
        except Exception:
            log.exception("peer cleanup failed; retrying in %.1fs", interval)
            continue
        for peer_id in gone:
            log.info("peer %s timed out: dropped with its location records", peer_id)


def make_app(
    config: CoordinatorConfig, service: CoordinatorService | None = None
) -> web.Application:
    """The coordinator app. Without ``service`` it opens one on ``config.store_url``."""
    api = OpenAPI("fastcache coordinator", __version__, bearer=config.token is not None)
    app = web.Application(client_max_size=config.max_body)
    views = _Views(app)
    routes = _routes(api, views)
    routes.append(metrics_route(lambda: app[METRICS].families(), public=config.metrics_public))
    requests = OpHistograms(route_name(r.method, r.path) for r in routes)
    open_paths = ("/api/health", METRICS_PATH) if config.metrics_public else ("/api/health",)
    app.middlewares.extend(
        [error_middleware(log), auth_middleware(config.token, open_paths), request_timer(requests)]
    )
    api.add_all(app.router, routes)
    # the WebSocket session is not REST: the OpenAPI document leaves it out (session.py
    # describes its frames); the auth middleware checks its token before the upgrade
    app.router.add_get("/api/session", views.session)
    interval = max(0.05, min(config.cleanup_interval, config.peer_timeout / 2))

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        owned = service is None
        svc = service or await CoordinatorService.open(
            config.store_url, config.peer_timeout, sync_interval=config.sync_interval
        )
        try:
            await svc.grant_grace()
            app[SERVICE] = svc
            hub = app[SESSIONS] = SessionHub(svc, NS_OPS, config.lease_term)
            app[METRICS] = CoordinatorCollector(svc, hub, requests)
            cluster = None
            if svc.store.shared:  # other coordinators may serve this namespace too
                cluster = Cluster(
                    svc.store,
                    config.lease_term,
                    hub.invalidate_remote,
                    lambda: hub.close_sessions("coordinator bus lost"),
                )
                await cluster.start()
                hub.attach(cluster)
            task = asyncio.create_task(_cleanup_loop(svc, interval, hub), name="peer-cleanup")
            sweep = asyncio.create_task(hub.sweep_loop(), name="lease-sweep")
            app[CLEANUP_TASK] = task
            yield
            for t in (task, sweep):
                t.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            await hub.close()
            if cluster is not None:
                await cluster.close()
            await svc.sync()  # a graceful stop leaves everything acknowledged on disk
            store = svc.store.counters()
            log.info(
                "synced on stop (%d transactions in %d commits, %d syncs)",
                store["transactions"],
                store["commits"],
                store["syncs"],
            )
        finally:
            if owned:
                await svc.close()  # syncs too

    app.cleanup_ctx.append(lifecycle)
    return app


async def serve(config: CoordinatorConfig) -> None:
    """Run the coordinator until SIGINT or SIGTERM, then stop gracefully."""
    runner = web.AppRunner(
        make_app(config),
        access_log=None,
        handle_signals=False,
        logger=protocol_logger("fastcache.coordinator.http"),
    )
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    try:
        site = web.TCPSite(runner, config.host, config.port)
        await site.start()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        log.info(
            "listening on %s (store %s, peer timeout %.1fs, sync interval %.3gs, token %s)",
            ", ".join(f"http://{h}:{p}" for h, p, *_ in runner.addresses),
            redacted_url(config.store_url),
            config.peer_timeout,
            config.sync_interval,
            "required" if config.token else "off",
        )
        await stop.wait()
        log.info("stopping")
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await runner.cleanup()
    log.info("stopped")
