"""``SessionClient``: a node's one persistent metadata session with the coordinator.

A WebSocket to ``<coordinator>/api/session`` (the protocol is in ``session.py``): one reader
task, request ids with futures, any number of requests in flight, answers in any order, and
reconnection with capped exponential back-off. Given several coordinator URLs, a connection
that fails moves on to the next coordinator at once; the back-off starts after a whole round
failed. Leases never cross coordinators: a lost session voids them all (``on_reset``) and the
next one starts empty. The namespace methods have the names,
arguments and return types of ``CoordinatorClient``'s, so either can serve a node; errors are
the same ``fastcache.errors`` classes. ``lookup_leased`` / ``getattr_leased`` /
``readdir_leased`` also return the lease the coordinator granted: until ``Leased.deadline``
(this process's ``time.monotonic``) the answer may be served from a cache, provided the cache
is filled in the same step as the call returns (no ``await`` in between) and entries are
dropped when ``on_invalidate`` names their keys (``leases.attr_key`` and friends).

Callbacks (plain functions or coroutine functions):
- ``on_invalidate(keys)``: the coordinator is about to acknowledge a change to ``keys``; drop
  them. The push is acked once the callback returns.
- ``on_reset()``: the session was lost; every lease is void, drop them all. The client
  reconnects by itself; calls made meanwhile wait for it up to their timeout, then raise
  ``TierUnavailable``. A read in flight when the session is lost is sent again on the next
  one; a change in flight raises ``TierUnavailable`` (its outcome is unknown).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import inspect
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import count
from types import TracebackType
from typing import Any, Generic, TypeVar

import aiohttp
import msgspec

from fastcache.coordinator.leases import attr_key, entry_key, list_key
from fastcache.coordinator.model import MAX_LOCATION_BATCH, Entry, InodeAttrs, entry_from_row
from fastcache.errors import (
    FastcacheError,
    NotFound,
    TierUnavailable,
    Unauthorized,
    error_from_kind,
)

__all__ = ["Leased", "SessionClient"]

log = logging.getLogger("fastcache.session")

CONNECT_TIMEOUT = 2.0
TOTAL_TIMEOUT = 15.0
BACKOFF_MIN = 0.05
BACKOFF_MAX = 2.0
HEARTBEAT = 5.0  # seconds between pings; a coordinator silent for this long is lost
MAX_ANSWER = 64 << 20  # a 10,000-entry listing is a few MiB
PUSH_LOG = 4096  # recent pushes remembered to void answers they overtook

V = TypeVar("V")
Callback = Callable[..., Any]


@dataclass(frozen=True)
class Leased(Generic[V]):
    """An answer and its lease: serve ``value`` from a cache until ``deadline`` (monotonic),
    unless invalidated earlier. ``deadline`` 0: no lease (do not cache)."""

    value: V
    deadline: float
    term: float

    @property
    def valid(self) -> bool:
        return time.monotonic() < self.deadline


class _Lost(Exception):
    """The session went away before the answer came."""


def _with_manifest(row: list[Any]) -> Entry:
    """A listing row that ends with the file's manifest (or ``None``)."""
    if not isinstance(row, list) or not row or not isinstance(row[-1], dict | None):
        raise ValueError("a listing row with manifests ends with one or with null")
    entry = entry_from_row(row[:-1])
    entry.attrs.manifest = row[-1]
    return entry


class SessionClient:
    def __init__(
        self,
        base_url: str | Sequence[str],
        token: str | None = None,
        *,
        on_invalidate: Callback | None = None,
        on_reset: Callback | None = None,
        timeout: float = TOTAL_TIMEOUT,
        connect_timeout: float = CONNECT_TIMEOUT,
        backoff_min: float = BACKOFF_MIN,
        backoff_max: float = BACKOFF_MAX,
        heartbeat: float | None = HEARTBEAT,
    ) -> None:
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        self._urls = [u.rstrip("/") for u in urls]
        if not self._urls:
            raise ValueError("SessionClient needs at least one URL")
        self._at = 0  # the coordinator the session is (or is next) opened with
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.on_invalidate = on_invalidate
        self.on_reset = on_reset
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.heartbeat = heartbeat
        self.lease_term: float | None = None  # the last term the coordinator granted
        self.connects = 0  # sessions opened so far (1 + reconnections)
        self._ws: aiohttp.ClientWebSocketResponse | None = None
        self._http: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._connected = asyncio.Event()
        self._changed = asyncio.Event()  # set on every connect attempt's outcome
        self._error: FastcacheError | None = None
        self._closing = False
        self._ids = count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._pushes = 0
        self._push_log: deque[tuple[int, frozenset[str]]] = deque(maxlen=PUSH_LOG)
        self._encode = msgspec.msgpack.Encoder().encode
        self._decode = msgspec.msgpack.Decoder().decode

    # --- lifecycle -----------------------------------------------------------------------
    async def start(self, wait: bool = True) -> SessionClient:
        """Start the connection task; with ``wait``, until the first session is up (or the
        timeout: then ``TierUnavailable``, and it keeps trying)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="coordinator-session")
        if wait:
            await self._wait_connected(asyncio.get_running_loop().time() + self.timeout)
        return self

    async def __aenter__(self) -> SessionClient:
        try:
            return await self.start()
        except BaseException:
            await self.close()  # no __aexit__ follows a failed __aenter__
            raise

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._ws is not None:
            await self._ws.close()
        if self._http is not None:
            await self._http.close()
            self._http = None
        self._fail_pending()

    @property
    def base_url(self) -> str:
        """The coordinator the session is (or will next be) opened with."""
        return self._urls[self._at]

    @property
    def url(self) -> str:
        return self.base_url + "/api/session"

    @property
    def connected(self) -> bool:
        return self._connected.is_set()

    def _fail_pending(self) -> None:
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(_Lost())
        self._pending.clear()

    async def _run(self) -> None:
        delay = self.backoff_min
        failed = 0  # connection attempts failed in a row
        while not self._closing:
            if self._http is None or self._http.closed:
                self._http = aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(
                        total=None, connect=self.connect_timeout, sock_connect=self.connect_timeout
                    )
                )
            connected = False
            try:
                ws = await self._http.ws_connect(
                    self.url,
                    headers=self._headers,
                    max_msg_size=MAX_ANSWER,
                    heartbeat=self.heartbeat,
                    compress=0,
                )
            except aiohttp.WSServerHandshakeError as exc:
                if exc.status == 401:
                    self._error = Unauthorized("coordinator refused the session: wrong token")
                else:
                    self._error = TierUnavailable(f"session handshake failed: HTTP {exc.status}")
            except (aiohttp.ClientError, OSError, TimeoutError) as exc:
                self._error = TierUnavailable(
                    f"coordinator {self.base_url} unreachable: {exc or type(exc).__name__}"
                )
            else:
                delay, failed, connected = self.backoff_min, 0, True
                self._error = None
                self._ws = ws
                self.connects += 1
                self._connected.set()
                self._poke()
                reason = "closed"
                try:
                    reason = await self._read(ws)
                finally:
                    self._connected.clear()
                    self._ws = None
                    self._fail_pending()
                    self._error = TierUnavailable(f"session lost ({reason}); reconnecting")
                    with contextlib.suppress(Exception):
                        await ws.close()
                if not self._closing:
                    log.warning("coordinator session lost (%s): dropping every lease", reason)
                    await self._call_back(self.on_reset)
            self._poke()
            if self._closing:
                break
            if not connected:
                failed += 1
                if len(self._urls) > 1:
                    self._at = (self._at + 1) % len(self._urls)
                    log.info("trying the next coordinator, %s", self.base_url)
                if failed % len(self._urls):
                    continue  # the rest of the round first, without waiting
            await asyncio.sleep(delay)
            delay = min(delay * 2, self.backoff_max)

    def _poke(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _call_back(self, fn: Callback | None, *args: Any) -> None:
        if fn is None:
            return
        try:
            result = fn(*args)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("session callback %r failed", fn)

    async def _read(self, ws: aiohttp.ClientWebSocketResponse) -> str:
        """Dispatch frames until the socket closes; the reason it closed."""
        async for msg in ws:
            if msg.type is not aiohttp.WSMsgType.BINARY:
                continue
            try:
                doc = self._decode(msg.data)
            except msgspec.DecodeError:
                log.error("undecodable frame from the coordinator: closing the session")
                await ws.close(code=aiohttp.WSCloseCode.INVALID_TEXT, message=b"not msgpack")
                return "undecodable frame"
            if not isinstance(doc, dict):
                continue
            if "push" in doc:
                await self._push(ws, doc)
                continue
            fut = self._pending.pop(doc.get("id"), None)  # type: ignore[arg-type]
            if fut is not None and not fut.done():
                fut.set_result(doc)
            elif doc.get("id") is None and "error" in doc:
                log.warning("coordinator refused a frame: %s", doc.get("error"))
        code = ws.close_code
        exc = ws.exception()
        return f"code {code}" + (f": {exc}" if exc else "")

    async def _push(self, ws: aiohttp.ClientWebSocketResponse, doc: dict[str, Any]) -> None:
        keys = doc.get("keys")
        if doc.get("push") != "invalidate" or not isinstance(keys, list):
            return
        self._pushes += 1
        self._push_log.append((self._pushes, frozenset(keys)))
        await self._call_back(self.on_invalidate, keys)
        with contextlib.suppress(ConnectionError, RuntimeError):
            await ws.send_bytes(self._encode({"ack": doc.get("seq")}))

    def _overtaken(self, epoch: int, keys: Iterable[str]) -> bool:
        """Did a push received after push number ``epoch`` name one of ``keys``?"""
        if self._pushes == epoch:
            return False
        if not self._push_log or self._push_log[0][0] > epoch + 1:
            return True  # forgotten: assume the worst
        wanted = set(keys)
        return any(n > epoch and not wanted.isdisjoint(k) for n, k in self._push_log)

    # --- calls ---------------------------------------------------------------------------
    async def _wait_connected(self, deadline: float) -> aiohttp.ClientWebSocketResponse:
        loop = asyncio.get_running_loop()
        while True:
            ws = self._ws
            if ws is not None and self._connected.is_set() and not ws.closed:
                return ws
            if self._closing:
                raise TierUnavailable("session client closed")
            if isinstance(self._error, Unauthorized):
                raise Unauthorized(str(self._error))
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise self._error or TierUnavailable("no session with the coordinator")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def _call(self, op: str, args: dict[str, Any], *, retry: bool = False) -> Any:
        """One request; the answer frame (``ok`` and maybe ``lease``), or the domain error."""
        if self._task is None:
            await self.start(wait=False)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.timeout
        while True:
            ws = await self._wait_connected(deadline)
            rid = next(self._ids)
            fut: asyncio.Future[dict[str, Any]] = loop.create_future()
            self._pending[rid] = fut
            sent = time.monotonic()
            epoch = self._pushes
            try:
                await ws.send_bytes(self._encode({"id": rid, "op": op, "args": args}))
                async with asyncio.timeout_at(deadline):
                    doc = await fut
            except (_Lost, ConnectionError, RuntimeError) as exc:
                if retry:
                    continue  # a read: ask again on the next session
                raise TierUnavailable(
                    f"coordinator session lost during {op}; its outcome is unknown"
                ) from exc
            except TimeoutError:
                raise TierUnavailable(f"coordinator did not answer {op} in time") from None
            finally:
                self._pending.pop(rid, None)
            doc["_sent"], doc["_epoch"] = sent, epoch
            if "error" in doc:
                exc = error_from_kind(doc.get("kind"), 500, str(doc["error"]))
                exc.answer = doc  # type: ignore[attr-defined]
                raise exc
            return doc

    def _lease(self, doc: dict[str, Any], keys: Iterable[str]) -> tuple[float, float]:
        term = doc.get("lease")
        if not term:
            return 0.0, 0.0
        self.lease_term = float(term)
        if self._overtaken(doc["_epoch"], keys):
            return 0.0, float(term)
        return doc["_sent"] + float(term), float(term)

    # --- namespace: leased reads ---------------------------------------------------------
    async def lookup_leased(self, parent: int, name: str) -> Leased[InodeAttrs | None]:
        """``lookup`` with its lease; ``value`` ``None`` for "no such name" (leased too)."""
        key = entry_key(parent, name)
        try:
            doc = await self._call("lookup", {"parent": parent, "name": name}, retry=True)
        except NotFound as exc:
            answer = getattr(exc, "answer", None)
            if answer is None or "lease" not in answer:
                raise
            return Leased(None, *self._lease(answer, [key]))
        attrs = InodeAttrs.from_json(doc["ok"])
        return Leased(attrs, *self._lease(doc, [key, attr_key(attrs.ino)]))

    async def getattr_leased(self, ino: int) -> Leased[InodeAttrs]:
        doc = await self._call("getattr", {"ino": ino}, retry=True)
        return Leased(InodeAttrs.from_json(doc["ok"]), *self._lease(doc, [attr_key(ino)]))

    async def readdir_leased(
        self, ino: int, offset: int = 0, limit: int = 1000, manifests: bool = False
    ) -> Leased[list[Entry]]:
        """A listing batch and its lease (on the listing and on every entry's attributes).
        ``manifests``: small files' attributes come with their manifest (what an open
        needs), the others without."""
        args: dict[str, Any] = {"ino": ino, "offset": offset, "limit": limit}
        if manifests:
            args["manifests"] = True
        doc = await self._call("readdir", args, retry=True)
        rows = doc["ok"]["rows"]
        if manifests:
            entries = [_with_manifest(row) for row in rows]
        else:
            entries = [entry_from_row(row) for row in rows]
        keys = [list_key(ino), *(attr_key(e.attrs.ino) for e in entries)]
        return Leased(entries, *self._lease(doc, keys))

    # --- namespace: CoordinatorClient's methods ------------------------------------------
    async def lookup(self, parent: int, name: str) -> InodeAttrs:
        doc = await self._call("lookup", {"parent": parent, "name": name}, retry=True)
        return InodeAttrs.from_json(doc["ok"])

    async def getattr(self, ino: int) -> InodeAttrs:
        return (await self.getattr_leased(ino)).value

    async def readdir(self, ino: int, offset: int = 0, limit: int = 1000) -> list[Entry]:
        return (await self.readdir_leased(ino, offset, limit)).value

    async def setattr(
        self,
        ino: int,
        *,
        mode: int | None = None,
        uid: int | None = None,
        gid: int | None = None,
        size: int | None = None,
        atime_ns: int | None = None,
        mtime_ns: int | None = None,
    ) -> InodeAttrs:
        fields = {
            "mode": mode,
            "uid": uid,
            "gid": gid,
            "size": size,
            "atime_ns": atime_ns,
            "mtime_ns": mtime_ns,
        }
        args: dict[str, Any] = {k: v for k, v in fields.items() if v is not None}
        args["ino"] = ino
        return InodeAttrs.from_json((await self._call("setattr", args))["ok"])

    async def create(
        self,
        parent: int,
        name: str,
        type: str = "file",
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        rdev: int = 0,
        target: str | None = None,
    ) -> InodeAttrs:
        attrs, _, _ = await self.create_entry(parent, name, type, mode, uid, gid, rdev, target)
        return attrs

    async def create_entry(
        self,
        parent: int,
        name: str,
        type: str = "file",
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        rdev: int = 0,
        target: str | None = None,
    ) -> tuple[InodeAttrs, InodeAttrs | None, int | None]:
        args: dict[str, Any] = {
            "parent": parent,
            "name": name,
            "type": type,
            "mode": mode,
            "uid": uid,
            "gid": gid,
            "rdev": rdev,
        }
        if target is not None:
            args["target"] = target
        attrs, parent_after, before, _ = (await self.create_entry_leased(**args)).value
        return attrs, parent_after, before

    async def create_entry_leased(
        self,
        parent: int,
        name: str,
        type: str = "file",
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        rdev: int = 0,
        target: str | None = None,
    ) -> Leased[tuple[InodeAttrs, InodeAttrs | None, int | None, list[int]]]:
        """``create_entry`` with the creator's lease on the new name and inode; the last item
        names the directories whose whole listing the lease covers too (a new directory,
        and the parent when this node held a lease on its listing: renewed)."""
        args: dict[str, Any] = {
            "parent": parent,
            "name": name,
            "type": type,
            "mode": mode,
            "uid": uid,
            "gid": gid,
            "rdev": rdev,
        }
        if target is not None:
            args["target"] = target
        answer = await self._call("create", args)
        doc = answer["ok"]
        parent_doc = doc.pop("parent_attrs", None)
        before = doc.pop("parent_version_before", None)
        lists = [int(ino) for ino in doc.pop("lists", ())]
        attrs = InodeAttrs.from_json(doc)
        parent_after = None if parent_doc is None else InodeAttrs.from_json(parent_doc)
        keys = [entry_key(parent, name), attr_key(attrs.ino), *map(list_key, lists)]
        return Leased((attrs, parent_after, before, lists), *self._lease(answer, keys))

    async def mkdir(
        self, parent: int, name: str, mode: int = 0o755, uid: int = 0, gid: int = 0
    ) -> InodeAttrs:
        return await self.create(parent, name, "dir", mode, uid, gid)

    async def symlink(
        self, parent: int, name: str, target: str, uid: int = 0, gid: int = 0
    ) -> InodeAttrs:
        return await self.create(parent, name, "symlink", 0o777, uid, gid, target=target)

    async def link(self, ino: int, new_parent: int, new_name: str) -> InodeAttrs:
        args = {"ino": ino, "new_parent": new_parent, "new_name": new_name}
        return InodeAttrs.from_json((await self._call("link", args))["ok"])

    async def unlink(self, parent: int, name: str) -> None:
        await self._call("unlink", {"parent": parent, "name": name})

    async def rmdir(self, parent: int, name: str) -> None:
        await self._call("rmdir", {"parent": parent, "name": name})

    async def remove_entry(
        self, parent: int, name: str, *, is_dir: bool
    ) -> tuple[InodeAttrs | None, int | None]:
        """unlink (or rmdir): the parent's attributes after it and its version before it."""
        args = {"parent": parent, "name": name, "is_dir": is_dir}
        doc = (await self._call("remove_entry", args))["ok"]
        return InodeAttrs.from_json(doc["parent_attrs"]), doc["parent_version_before"]

    async def rename(
        self,
        parent: int,
        name: str,
        new_parent: int,
        new_name: str,
        *,
        noreplace: bool = False,
        exchange: bool = False,
    ) -> None:
        args = {
            "parent": parent,
            "name": name,
            "new_parent": new_parent,
            "new_name": new_name,
            "noreplace": noreplace,
            "exchange": exchange,
        }
        await self._call("rename", args)

    async def touch_atimes(self, atimes: list[tuple[int, int]]) -> int:
        """Read access times to move forward (``relatime``); how many moved."""
        doc = await self._call("touch_atimes", {"atimes": [list(a) for a in atimes]})
        return int(doc["ok"]["moved"])

    async def rename_entry(
        self, parent: int, name: str, new_parent: int, new_name: str
    ) -> list[InodeAttrs]:
        """``rename``; the attributes of the directories involved as it left them."""
        args = {"parent": parent, "name": name, "new_parent": new_parent, "new_name": new_name}
        doc = await self._call("rename_entry", args)
        return [InodeAttrs.from_json(p) for p in doc["ok"]["parents"]]

    async def commit_manifest(
        self,
        ino: int,
        manifest: dict[str, Any],
        expected_version: int,
        *,
        holder: str | None = None,
        held: Iterable[str] = (),
    ) -> InodeAttrs:
        args: dict[str, Any] = {
            "ino": ino,
            "manifest": manifest,
            "expected_version": expected_version,
        }
        names = list(dict.fromkeys(held))
        if names and holder is not None:
            if len(names) > MAX_LOCATION_BATCH:  # too many for one commit: record them first
                for start in range(0, len(names), MAX_LOCATION_BATCH):
                    chunk = names[start : start + MAX_LOCATION_BATCH]
                    await self._call("add_locations", {"peer_id": holder, "chunks": chunk})
            else:
                args["holder"] = holder
                args["held"] = names
        return InodeAttrs.from_json((await self._call("commit_manifest", args))["ok"])

    # --- extended attributes (values travel as base64, as over REST) ---------------------
    @staticmethod
    def _xattr_args(ino: int, uid: int | None, gids: Sequence[int], **more: Any) -> dict[str, Any]:
        args: dict[str, Any] = {"ino": ino, **more}
        if uid is not None:
            args["uid"] = uid
            args["gids"] = list(gids)
        return args

    async def getxattr(
        self, ino: int, name: str, *, uid: int | None = None, gids: Sequence[int] = ()
    ) -> bytes:
        args = self._xattr_args(ino, uid, gids, name=name)
        return base64.b64decode((await self._call("getxattr", args, retry=True))["ok"]["value"])

    async def listxattr(
        self, ino: int, *, uid: int | None = None, gids: Sequence[int] = ()
    ) -> list[str]:
        args = self._xattr_args(ino, uid, gids)
        return list((await self._call("listxattr", args, retry=True))["ok"]["names"])

    async def setxattr(
        self,
        ino: int,
        name: str,
        value: bytes,
        flags: int = 0,
        *,
        uid: int | None = None,
        gids: Sequence[int] = (),
    ) -> InodeAttrs:
        args = self._xattr_args(
            ino, uid, gids, name=name, value=base64.b64encode(value).decode(), flags=flags
        )
        return InodeAttrs.from_json((await self._call("setxattr", args))["ok"])

    async def removexattr(
        self, ino: int, name: str, *, uid: int | None = None, gids: Sequence[int] = ()
    ) -> InodeAttrs:
        args = self._xattr_args(ino, uid, gids, name=name)
        return InodeAttrs.from_json((await self._call("removexattr", args))["ok"])

    async def statfs(self) -> dict[str, int]:
        return dict((await self._call("statfs", {}, retry=True))["ok"])

    async def sync(self) -> None:
        """Barrier: every change acknowledged before it is on the coordinator's disk."""
        await self._call("sync", {}, retry=True)

    async def request(self, op: str, args: dict[str, Any]) -> Any:
        """A raw request (tools and tests): the ``ok`` value, or the domain error."""
        return (await self._call(op, args))["ok"]
