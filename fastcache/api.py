"""The client node's HTTP API: a thin aiohttp adapter over the manager and the coordinator.

Files (``/api/files/{path}``) are streamed both ways: an upload goes through the manager's
chunk writer as it arrives, a download is produced chunk by chunk with the next chunks
already being fetched. ``/api/chunks/{digest}`` is the peer-to-peer transfer: it serves and
stores this node's NVMe only, so a miss is a 404 and never recurses into other peers.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from collections.abc import Awaitable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from fastcache import __version__
from fastcache.cache.warmup import DEFAULT_THREADS, WarmProgress, Warmup
from fastcache.chunks import Manifest
from fastcache.config import ClientConfig
from fastcache.coordinator.model import max_file_size
from fastcache.errors import (
    BadRequest,
    ChunkNotFound,
    DataUnavailable,
    FastcacheError,
    IsADirectory,
    NotFound,
    PayloadTooLarge,
)
from fastcache.metrics.node import NodeCollector
from fastcache.paths import is_digest, normalize_path
from fastcache.tiers.base import verify
from fastcache.tiers.peer import PEER_HEADER
from fastcache.web.metrics import METRICS_PATH, metrics_route
from fastcache.web.middleware import auth_middleware, error_middleware
from fastcache.web.openapi import ERROR_SCHEMA, OpenAPI, Route
from fastcache.web.sendfile import send_file
from fastcache.web.validate import Param, read_json

if TYPE_CHECKING:
    from fastcache.cache.manager import CacheManager
    from fastcache.coordinator.client import CoordinatorClient
    from fastcache.coordinator.model import InodeAttrs
    from fastcache.mount.ops import Operations
    from fastcache.tiers.nvme import NvmeTier
    from fastcache.tiers.peer import PeerTier

log = logging.getLogger("fastcache.api")

STREAM_PIECE = 1 << 20  # bytes handed to the chunk writer per upload read


@dataclass
class NodeState:
    """What the API needs from the running node. ``peer`` is ``None`` when peers are off."""

    config: ClientConfig
    manager: CacheManager
    nvme: NvmeTier
    coordinator: CoordinatorClient
    peer: PeerTier | None = None
    started: float = field(default_factory=time.time)
    registered: bool = False
    # what peers told us directly through POST /api/peers/{id}/heartbeat
    peer_reports: dict[str, dict[str, Any]] = field(default_factory=dict)
    mount_ops: Operations | None = None  # the FUSE handlers, once mounted (their counters)

    @property
    def max_file_size(self) -> int:
        """``--max-file-size``, within what a manifest of this node's chunks can hold."""
        cdc = self.manager.cdc_params
        limit = max_file_size(self.config.cache.chunk_size, cdc.min if cdc is not None else None)
        return min(self.config.max_file_size, limit)


STATE = web.AppKey("state", NodeState)
# Threads that open chunk files and push them into peer sockets (``send_file``): their own,
# so that a peer slow to read cannot hold up the default executor's hashing.
SEND_POOL = web.AppKey("send_pool", ThreadPoolExecutor)

# --- schemas -----------------------------------------------------------------------------
PATH = Param("path", "path", {"type": "string"}, description="file path in the namespace")
DIGEST = Param(
    "digest", "path", {"type": "string", "pattern": "^[0-9a-f]{32}$"}, description="xxh3-128"
)
PEER_ID = Param("peerID", "path", {"type": "string", "minLength": 1})
LIMIT = Param(
    "limit", "query", {"type": "integer", "minimum": 0, "maximum": 100_000, "default": 1000}
)
AFTER = Param(
    "after",
    "query",
    {"type": "string", "pattern": "^[0-9a-f]{32}$"},
    description="list chunks after this digest (the previous page's next_after)",
)
EXPECTED_VERSION = Param(
    "expected_version",
    "query",
    {"type": "integer", "minimum": 0},
    description="fail with 409 unless the file is at this version (0: must not exist)",
)
FILE_SCHEMA = {
    "type": "object",
    "properties": {
        "path": {"type": "string"},
        "size": {"type": "integer"},
        "version": {"type": "integer"},
        "chunks": {"type": "integer"},
    },
}
SIZE_SCHEMA = {
    "type": "object",
    "properties": {"path": {"type": "string"}, "size": {"type": "integer"}},
}
PEER_SCHEMA = {
    "type": "object",
    "properties": {
        "peer_id": {"type": "string"},
        "url": {"type": "string"},
        "capacity": {"type": "integer"},
        "used": {"type": "integer"},
        "status": {"type": "string"},
    },
}
HEARTBEAT_BODY = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "used": {"type": "integer", "minimum": 0},
        "capacity": {"type": "integer", "minimum": 0},
    },
}
OBJECT = {"type": "object"}


# --- helpers -----------------------------------------------------------------------------
def _state(request: web.Request) -> NodeState:
    return request.app[STATE]


def _path(request: web.Request) -> str:
    return normalize_path(request.match_info["path"])


def _digest(request: web.Request) -> str:
    d = request.match_info["digest"]
    if not is_digest(d):
        raise BadRequest("a chunk digest is 32 lowercase hex characters")
    return d


async def _file(state: NodeState, path: str) -> tuple[Manifest, InodeAttrs]:
    """The file's manifest (and its attributes) from the coordinator."""
    attrs = await state.coordinator.resolve(path)
    if attrs.type == "dir":
        raise IsADirectory(f"{path} is a directory")
    if attrs.type != "file":
        raise BadRequest(f"{path} is not a regular file")
    doc = attrs.manifest
    if doc is None and attrs.size:  # an answer without the manifest: ask for the inode
        doc = (await state.coordinator.getattr(attrs.ino)).manifest
        if doc is None:
            raise DataUnavailable(f"the coordinator has no manifest for {path}")
    if doc is None:  # an empty file
        doc = {"size": 0, "chunk_size": state.config.cache.chunk_size, "chunks": []}
    return Manifest.from_json(doc, attrs.version), attrs


class _Unsatisfiable(Exception):
    pass


_RANGE_BOUND = re.compile(r"[0-9]{0,19}")  # ASCII digits only, at most an int64


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """A single ``bytes=`` range as ``(start, end)`` (end exclusive), or ``None`` for the whole
    file (no header, or a unit other than bytes, which HTTP says to ignore).

    ``BadRequest`` (400) for a malformed ``bytes`` range: several ranges, anything but ASCII
    digits, a bound longer than 19 digits; ``_Unsatisfiable`` (416) for one that starts past
    the end or ends before it starts."""
    if not header:
        return None
    unit, _, spec = header.strip().partition("=")
    if unit.strip().lower() != "bytes":
        return None
    if "," in spec:
        raise BadRequest("only one byte range per request is supported")
    first, dash, last = spec.strip().partition("-")
    first, last = first.strip(), last.strip()
    if (
        not dash
        or (first == "" and last == "")
        or not _RANGE_BOUND.fullmatch(first)
        or not _RANGE_BOUND.fullmatch(last)
    ):
        raise BadRequest(f"malformed Range header: {header[:64]!r}")
    if first == "":
        suffix = int(last)
        if suffix == 0 or size == 0:
            raise _Unsatisfiable
        return max(0, size - suffix), size
    start = int(first)
    end = size if last == "" else int(last) + 1
    if end <= start or start >= size:
        raise _Unsatisfiable
    return start, min(end, size)


def _file_headers(manifest: Manifest) -> dict[str, str]:
    return {
        "Accept-Ranges": "bytes",
        "ETag": f'"{manifest.version}"',
        "X-Fastcache-Version": str(manifest.version),
        "Content-Type": "application/octet-stream",
    }


# --- files -------------------------------------------------------------------------------
async def get_file(request: web.Request) -> web.StreamResponse:
    state = _state(request)
    path = _path(request)
    manifest, _ = await _file(state, path)
    headers = _file_headers(manifest)
    try:
        byte_range = parse_range(request.headers.get("Range"), manifest.size)
    except _Unsatisfiable:
        headers["Content-Range"] = f"bytes */{manifest.size}"
        return web.json_response(
            {"error": "range not satisfiable", "kind": "RangeNotSatisfiable"},
            status=416,
            headers={"Content-Range": headers["Content-Range"]},
        )
    start, end = byte_range or (0, manifest.size)
    status = 200
    if byte_range is not None:
        status = 206
        headers["Content-Range"] = f"bytes {start}-{end - 1}/{manifest.size}"
    resp = web.StreamResponse(status=status, headers=headers)
    resp.content_length = end - start
    if request.method == "HEAD":
        await resp.prepare(request)
        return resp
    await resp.prepare(request)
    try:
        await _stream(state, manifest, start, end, resp)
    except ConnectionResetError:
        return resp  # the client went away
    except FastcacheError as exc:
        # The status line is gone already: cut the connection so the client sees a short
        # body instead of an error message spliced into the data.
        log.error("reading %s failed after %s was sent: %s", path, status, exc)
        if request.transport is not None:
            request.transport.close()
        return resp
    await resp.write_eof()
    return resp


async def _stream(
    state: NodeState, manifest: Manifest, start: int, end: int, resp: web.StreamResponse
) -> None:
    """Write ``[start, end)`` chunk by chunk, keeping ``readahead`` chunk reads in flight."""
    offsets = manifest.offsets()
    spans = iter(manifest.spans(start, end - start))
    window = max(1, state.config.readahead_chunks)
    inflight: deque[asyncio.Task[bytes]] = deque()
    manager = state.manager

    def launch() -> bool:
        span = next(spans, None)
        if span is None:
            return False
        index, off, length = span
        coro: Awaitable[bytes] = manager.read_range(manifest, offsets[index] + off, length)
        inflight.append(asyncio.ensure_future(coro))
        return True

    try:
        while len(inflight) < window and launch():
            pass
        while inflight:
            data = await inflight.popleft()
            launch()
            await resp.write(data)
    finally:
        for task in inflight:
            task.cancel()
        if inflight:
            await asyncio.gather(*inflight, return_exceptions=True)


async def head_file(request: web.Request) -> web.StreamResponse:
    return await get_file(request)


async def file_size(request: web.Request) -> web.Response:
    state = _state(request)
    path = _path(request)
    manifest, _ = await _file(state, path)
    return web.json_response({"path": path, "size": manifest.size, "version": manifest.version})


async def put_file(request: web.Request) -> web.Response:
    """Stream the body through the chunk writer, then commit the manifest at the coordinator."""
    state = _state(request)
    path = _path(request)
    if path == "/":
        raise IsADirectory("/ is a directory")
    expected = EXPECTED_VERSION.get(request)
    limit = state.max_file_size
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(f"file larger than {limit} bytes")
    writer = state.manager.writer()
    total = 0
    try:
        async for piece in request.content.iter_chunked(STREAM_PIECE):
            total += len(piece)
            if total > limit:
                raise PayloadTooLarge(f"file larger than {limit} bytes")
            await writer.write(piece)
        manifest: Manifest = await writer.finish()
    except BaseException:
        await writer.abort()
        raise
    # before the commit: once the file is visible, so are its chunks still only on our NVMe
    await state.manager.publish(manifest.chunks)
    attrs = await state.coordinator.put_file(
        path, manifest.to_json(), expected_version=expected, make_parents=True
    )
    version = getattr(attrs, "version", manifest.version)
    try:
        await state.coordinator.add_location(state.config.peer_id, path=path)
    except FastcacheError as exc:  # the namespace commit is what counts
        log.warning("recording %s at the coordinator failed: %s", path, exc)
    return web.json_response(
        {"path": path, "size": manifest.size, "version": version, "chunks": len(manifest.chunks)},
        status=201,
    )


async def delete_file(request: web.Request) -> web.Response:
    state = _state(request)
    path = _path(request)
    if path == "/":
        raise BadRequest("cannot delete the root")
    await state.coordinator.delete_path(path)
    return web.json_response({"path": path, "deleted": True})


# --- peers -------------------------------------------------------------------------------
def _peer_json(peer: Any) -> dict[str, Any]:
    return peer.to_json() if hasattr(peer, "to_json") else dict(peer)


async def list_peers(request: web.Request) -> web.Response:
    peers = await _state(request).coordinator.list_peers()
    return web.json_response({"peers": [_peer_json(p) for p in peers]})


async def _find_peer(state: NodeState, peer_id: str) -> Any:
    for peer in await state.coordinator.list_peers():
        if _peer_json(peer).get("peer_id") == peer_id:
            return peer
    raise NotFound(f"no live peer {peer_id!r}")


async def get_peer(request: web.Request) -> web.Response:
    state = _state(request)
    peer_id = PEER_ID.get(request)
    doc = _peer_json(await _find_peer(state, peer_id))
    if peer_id in state.peer_reports:
        doc["reported"] = state.peer_reports[peer_id]
    if state.peer is not None and peer_id != state.config.peer_id:
        doc["breaker"] = state.peer.breaker(peer_id).state
    return web.json_response(doc)


async def peer_heartbeat(request: web.Request) -> web.Response:
    """A peer says it is alive (e.g. back from a restart): close its circuit breaker."""
    state = _state(request)
    peer_id = PEER_ID.get(request)
    body: dict[str, Any] = {}
    if request.can_read_body:
        body = await read_json(request, HEARTBEAT_BODY)
    await _find_peer(state, peer_id)
    state.peer_reports[peer_id] = {**body, "at": time.time()}
    if state.peer is not None and peer_id != state.config.peer_id:
        state.peer.breaker(peer_id).success()
    return web.json_response({"peer_id": peer_id, "ok": True})


# --- cache -------------------------------------------------------------------------------
def cache_stats_doc(state: NodeState) -> dict[str, Any]:
    doc: dict[str, Any] = dict(state.manager.stats())
    tiers = dict(doc.get("tiers") or {})
    for tier in (state.nvme, state.peer):
        if tier is not None and tier.name not in tiers:
            tiers[tier.name] = tier.stats()
    doc["tiers"] = tiers
    return doc


async def cache_info(request: web.Request) -> web.Response:
    state = _state(request)
    limit = LIMIT.get(request)
    entries = [
        {"digest": d, "size": n, "pinned": pinned}
        for d, n, pinned in state.nvme.entries(AFTER.get(request), limit)
    ]
    nvme = state.nvme.stats()
    return web.json_response(
        {
            "peer_id": state.config.peer_id,
            "chunk_size": state.config.cache.chunk_size,
            "capacity": nvme.get("capacity"),
            "used": nvme.get("used"),
            "chunks": nvme.get("chunks"),
            "pinned": nvme.get("pinned"),
            "pending_uploads": state.manager.pending_uploads(),
            "entries": entries,
            "next_after": entries[-1]["digest"] if limit and len(entries) == limit else None,
        }
    )


async def cache_stats(request: web.Request) -> web.Response:
    return web.json_response(cache_stats_doc(_state(request)))


# --- warmup ------------------------------------------------------------------------------
WARMUP_BODY = {
    "type": "object",
    "required": ["paths"],
    "additionalProperties": False,
    "properties": {
        "paths": {
            "type": "array",
            "minItems": 1,
            "maxItems": 1000,
            "items": {"type": "string", "minLength": 1, "maxLength": 4096},
            "description": "files or directories (walked recursively) in the namespace",
        },
        "threads": {"type": "integer", "minimum": 1, "maximum": 64, "default": DEFAULT_THREADS},
        "owned_only": {
            "type": "boolean",
            "description": "only the chunks this node owns (a cluster-wide warmup asks every node)",
        },
    },
}
WARMUP_EVENT = {
    "type": "object",
    "description": "one JSON object per line: event plan, then progress (every 0.25 s), then "
    "done; counters files, chunks, bytes, files_done, chunks_done, bytes_done, "
    "fetched_chunks, fetched_bytes, cached_chunks, failed_chunks, errors",
    "properties": {"event": {"type": "string", "enum": ["plan", "progress", "done"]}},
}


async def warmup(request: web.Request) -> web.StreamResponse:
    """Fetch the chunks of ``paths`` into this node's NVMe; progress streamed as NDJSON.

    A missing path is a 404 before anything is streamed. Closing the connection stops it."""
    state = _state(request)
    doc = await read_json(request, WARMUP_BODY)
    wanted = None
    peer = state.peer
    if doc.get("owned_only") and peer is not None:
        peer.invalidate_peers()  # owners from the live nodes of now, as the caller saw them
        await peer.live_peers()

        def wanted(digest: str) -> bool:
            return peer.owner(digest) in (None, peer.self_id)

    job = Warmup(
        state.manager, state.coordinator, doc.get("threads", DEFAULT_THREADS), wanted=wanted
    )
    await job.plan([normalize_path(p) for p in doc["paths"]])
    resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
    await resp.prepare(request)

    async def send(event: str, progress: WarmProgress) -> None:
        await resp.write(orjson.dumps({"event": event, **progress.to_json()}) + b"\n")

    try:
        await send("plan", job.progress)
        await send("done", await job.run(lambda p: send("progress", p)))
        await resp.write_eof()
    except ConnectionResetError:
        pass  # the client went away: run() has stopped its fetches
    return resp


async def health(request: web.Request) -> web.Response:
    state = _state(request)
    return web.json_response(
        {
            "status": "ok",
            "peer_id": state.config.peer_id,
            "version": __version__,
            "registered": state.registered,
            "uptime": round(time.time() - state.started, 3),
            "mount": str(state.config.mount) if state.config.mount else None,
        }
    )


# --- chunks (peer transfers) -------------------------------------------------------------
async def get_chunk(request: web.Request) -> web.StreamResponse:
    """This node's NVMe copy only, unless ``?fetch=1`` (see below)."""
    state = _state(request)
    d = _digest(request)
    caller = request.headers.get(PEER_HEADER)
    if caller and state.peer is not None:
        state.peer.heard_from(caller)
    if request.method == "HEAD":
        size = await state.nvme.size(d)
        resp = web.StreamResponse(status=200)
        resp.content_length = size
        resp.content_type = "application/octet-stream"
        await resp.prepare(request)
        return resp
    if request.query.get("fetch") == "1":
        # Fetch-through: we own this chunk (rendezvous), so we read it for the cluster,
        # through our own tiers (S3 included), joining a fetch already in flight. One hop:
        # this never asks another node to fetch it in turn.
        try:
            data = await state.manager.read_chunk_for_peer(d)
        except DataUnavailable as exc:  # a miss for the asker (who then tries S3 itself),
            raise ChunkNotFound(str(exc)) from None  # not a failure of this node
    else:
        # Straight from the chunk file to the socket (not verified here: the asker verifies
        # every chunk it receives, so this would only hash it a second time).
        path_for = getattr(state.nvme, "path_for", None)
        size = state.nvme.chunk_size(d) if path_for is not None else None
        if size is not None:
            sent = await send_file(request, path_for(d), size, request.app[SEND_POOL])
            if sent is not None:
                return sent
        data = await state.nvme.read(d)
    return web.Response(body=data, content_type="application/octet-stream")


async def put_chunk(request: web.Request) -> web.Response:
    """Store a chunk a peer sends us, verified. A replica is only cached; with ``?pending=1``
    (the sender could not keep it: its NVMe failed) it is stored like our own write: pinned
    and journaled until this node has uploaded it to S3."""
    state = _state(request)
    d = _digest(request)
    data = await request.read()
    try:
        verify(d, data, "the request body")
    except FastcacheError as exc:
        raise BadRequest(str(exc)) from None
    if request.query.get("pending") == "1":
        await state.manager.write_chunk(d, data)
    else:
        await state.nvme.write(d, data)
    return web.json_response({"digest": d, "size": len(data)}, status=201)


# --- the app -----------------------------------------------------------------------------
def make_app(state: NodeState) -> web.Application:
    config = state.config
    max_body = max(config.max_body, config.cache.chunk_size + 64 * 1024)
    app = web.Application(
        client_max_size=max_body,
        middlewares=[
            error_middleware(log),
            auth_middleware(config.token, open_paths=_open_paths(config)),
        ],
    )
    app[STATE] = state
    app[SEND_POOL] = ThreadPoolExecutor(max_workers=16, thread_name_prefix="send")

    async def stop_pool(app: web.Application) -> None:
        app[SEND_POOL].shutdown(wait=False)

    app.on_cleanup.append(stop_pool)
    api = OpenAPI(title="fastcache client", version=__version__, bearer=config.token is not None)
    api.add_all(app.router, _routes(api, NodeCollector(state), config.metrics_public))
    _openapi_paths(api)
    return app


OCTET = None  # a binary body: documented without a JSON schema
_FILE_ERRORS = {404: ERROR_SCHEMA, 409: ERROR_SCHEMA}


def _routes(api: OpenAPI, collector: NodeCollector, metrics_public: bool) -> list[Route]:
    """The client API's route table, in match order: the ``/size`` form before the
    catch-all file path, or it would never win."""
    files = "/api/files/{path:.*}"
    chunk = "/api/chunks/{digest}"
    return [
        Route(
            "GET",
            files + "/size",
            file_size,
            "File size",
            {200: SIZE_SCHEMA, **_FILE_ERRORS},
            [PATH],
        ),
        Route(
            "GET",
            files,
            get_file,
            "Read a file (Range supported)",
            {200: OCTET, 206: OCTET, 416: ERROR_SCHEMA, **_FILE_ERRORS},
            [PATH],
        ),
        Route(
            "HEAD", files, head_file, "File metadata", {200: OCTET, 404: OCTET, 409: OCTET}, [PATH]
        ),
        Route(
            "PUT",
            files,
            put_file,
            "Write a file (streamed body)",
            {201: FILE_SCHEMA, 409: ERROR_SCHEMA, 413: ERROR_SCHEMA},
            [PATH, EXPECTED_VERSION],
        ),
        Route("DELETE", files, delete_file, "Delete a file", {200: OBJECT, **_FILE_ERRORS}, [PATH]),
        Route("GET", "/api/peers", list_peers, "Live peers", {200: OBJECT}),
        Route(
            "GET",
            "/api/peers/{peerID}",
            get_peer,
            "One peer",
            {200: PEER_SCHEMA, 404: ERROR_SCHEMA},
            [PEER_ID],
        ),
        Route(
            "POST",
            "/api/peers/{peerID}/heartbeat",
            peer_heartbeat,
            "A peer announces it is alive",
            {200: OBJECT, 404: ERROR_SCHEMA},
            [PEER_ID],
            body=HEARTBEAT_BODY,
        ),
        Route(
            "GET",
            "/api/cache",
            cache_info,
            "The chunks this node caches (digest order, paginated with after)",
            {200: OBJECT},
            [LIMIT, AFTER],
        ),
        Route("GET", "/api/cache/stats", cache_stats, "Cache and tier counters", {200: OBJECT}),
        Route(
            "POST",
            "/api/warmup",
            warmup,
            "Fetch files or trees into this node's NVMe (fastcache warmup); NDJSON progress",
            {200: WARMUP_EVENT, 400: ERROR_SCHEMA, 404: ERROR_SCHEMA},
            body=WARMUP_BODY,
        ),
        Route("GET", "/api/health", health, "Liveness", {200: OBJECT}, public=True),
        Route(
            "GET",
            chunk,
            get_chunk,
            "A chunk from this node's NVMe (?fetch=1: read through this node's tiers)",
            {200: OCTET, 404: ERROR_SCHEMA},
            [DIGEST],
        ),
        Route(
            "HEAD",
            chunk,
            get_chunk,
            "Whether this node holds a chunk",
            {200: OCTET, 404: OCTET},
            [DIGEST],
        ),
        Route(
            "PUT",
            chunk,
            put_chunk,
            "Store a replica (verified)",
            {201: OBJECT, 413: ERROR_SCHEMA},
            [DIGEST],
        ),
        Route("GET", "/api/openapi.json", api.handler, "This document", {200: OBJECT}, public=True),
        metrics_route(collector.families, public=metrics_public),
    ]


def _open_paths(config: ClientConfig) -> tuple[str, ...]:
    """What is answered without the token."""
    return ("/api/health", METRICS_PATH) if config.metrics_public else ("/api/health",)


def _openapi_paths(api: OpenAPI) -> None:
    """aiohttp's ``{path:.*}`` is not OpenAPI: publish it as ``{path}``; declare the binary
    bodies the builder cannot express."""
    for route in [p for p in api.paths if ":" in p]:
        api.paths[route.replace("{path:.*}", "{path}")] = api.paths.pop(route)
    for route, ops in api.paths.items():
        if route.startswith("/api/files/") and not route.endswith("/size") and "put" in ops:
            ops["put"]["requestBody"] = {
                "required": False,
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                },
            }
        if route.startswith("/api/chunks/") and "put" in ops:
            ops["put"]["requestBody"] = {
                "required": True,
                "content": {
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}
                },
            }
            ops["put"]["responses"].setdefault("400", {"description": "Body does not match"})


__all__ = ["STATE", "NodeState", "cache_stats_doc", "make_app", "parse_range"]
