"""The metadata session: one WebSocket per node, binary msgpack frames, leases, push invalidation.

``GET /api/session`` upgrades to a WebSocket once the cluster token checks out (the REST auth
middleware's rule: a wrong token is a 401 JSON answer before any upgrade). Then every frame is
binary, one msgpack map:

- request (node → coordinator): ``{"id": int, "op": str, "args": {...}}``; the ops and their
  argument schemas are the REST API's (``app.py`` builds both from one table, so both paths
  run the same validation and the same service call);
- answer: ``{"id": n, "ok": result}`` or ``{"id": n, "error": message, "kind": class name}``
  (``kind`` is the ``fastcache.errors`` class, as in the REST answers); an answer that grants
  a lease adds ``"lease": seconds``;
- push (coordinator → node): ``{"push": "invalidate", "seq": n, "keys": [...]}``, answered by
  ``{"ack": n}`` once the node has dropped those keys.

Requests are handled each in its own task and answered in any order. A malformed request
(wrong types, unknown op, bad arguments, no id) gets an error frame (``id`` null if it had
none) and the session lives on. A text frame, a frame over ``max_frame`` bytes or bytes that
are not msgpack at all close the session with a close code and a reason.

Leases (``leases.py``): lookup, getattr and readdir answers grant the asking session leases on
``entry:<parent>:<name>`` (a negative answer too), ``attr:<ino>`` and ``list:<ino>`` for
``lease_term`` seconds. Every namespace change, over the session or REST, calls ``invalidate``
(the service's ``on_change`` hook) after its commit and before its answer: each OTHER session
holding an unexpired lease on a changed key is pushed those keys, and the change waits for its
ack or for its lease to run out, whichever comes first. So a frozen node delays a conflicting
change by at most the lease term. A session that closes drops all its leases.

Two races are closed so a lease never covers a stale answer:
- the lease on what a read is about (``entry:``, ``attr:`` of getattr, ``list:``) is recorded
  *before* the read: a change committed after that finds it and pushes; the node drops any
  answer whose request was sent before a push it received (``session_client.py``);
- leases on what the read found (the ``attr:`` of a looked-up inode, of listed children) are
  recorded after it, so the answer carries no lease if one of those keys changed since the
  read began.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from itertools import count
from typing import Any

import msgspec
from aiohttp import WSCloseCode, WSMsgType, web

from fastcache.coordinator.cluster import Cluster
from fastcache.coordinator.leases import LeaseTable, attr_key, entry_key, list_key
from fastcache.coordinator.model import DEFAULT_READDIR
from fastcache.coordinator.service import CoordinatorService
from fastcache.errors import BadRequest, FastcacheError, NotFound, TierUnavailable, error_kind
from fastcache.web.validate import validate

__all__ = ["MAX_FRAME", "Op", "SessionHub"]

log = logging.getLogger("fastcache.coordinator.session")

MAX_FRAME = 1 << 20  # bytes; a larger frame closes the session (1009)
MAX_INFLIGHT = 1024  # requests one session may have in flight; more are refused (retry)
RECENT_HORIZON = 10.0  # seconds changes are remembered for reads in flight (then: no lease)
CLOSE_UNSUPPORTED = WSCloseCode.UNSUPPORTED_DATA  # 1003: a text frame
CLOSE_UNDECODABLE = WSCloseCode.INVALID_TEXT  # 1007: payload that is not msgpack
_REASONS = {
    WSCloseCode.MESSAGE_TOO_BIG: f"frame larger than {MAX_FRAME} bytes",
    WSCloseCode.PROTOCOL_ERROR: "websocket protocol error",
}


@dataclass(frozen=True)
class Op:
    """A namespace operation as both APIs see it: its argument schema and its one service call
    (returns what goes on the wire: JSON-able dicts, lists, numbers, strings, ``None``)."""

    schema: Mapping[str, Any]
    run: Callable[[CoordinatorService, dict[str, Any]], Awaitable[Any]]


# the session a request task serves (``None`` for REST): the change's author is not pushed
_ORIGIN: contextvars.ContextVar[Session | None] = contextvars.ContextVar(
    "fastcache_session_origin", default=None
)
# the change numbers (``SessionHub._remember``) the request task made itself: a lease it
# takes is not void because of its own change
_MINE: contextvars.ContextVar[set[int] | None] = contextvars.ContextVar(
    "fastcache_session_mine", default=None
)
_encode = msgspec.msgpack.Encoder().encode
_decode = msgspec.msgpack.Decoder().decode


class _Socket(web.WebSocketResponse):
    """A WebSocketResponse whose protocol-error closes (e.g. 1009 too big) carry a reason."""

    async def close(
        self, *, code: int = WSCloseCode.OK, message: bytes = b"", drain: bool = True
    ) -> bool:
        if not message and code in _REASONS:
            message = _REASONS[code].encode()
        return await super().close(code=code, message=message, drain=drain)


class Session:
    """One node's connection: its socket, its request tasks, its pushes waiting for acks."""

    def __init__(self, sid: int, ws: web.WebSocketResponse, remote: str | None) -> None:
        self.sid = sid
        self.ws = ws
        self.remote = remote
        self.tasks: set[asyncio.Task[None]] = set()
        self.acks: dict[int, asyncio.Future[None]] = {}
        self.closed = False

    def __repr__(self) -> str:
        return f"<session {self.sid} from {self.remote}>"

    async def send(self, doc: dict[str, Any]) -> bool:
        """Send one frame; ``False`` if the socket is gone (the answer is lost with it)."""
        if self.closed or self.ws.closed:
            return False
        try:
            await self.ws.send_bytes(_encode(doc))
        except (ConnectionError, RuntimeError):
            return False
        return True


class SessionHub:
    """Every open session, the lease table, and the push-invalidation protocol."""

    def __init__(
        self,
        service: CoordinatorService,
        ops: Mapping[str, Op],
        lease_term: float = 2.0,
        *,
        max_frame: int = MAX_FRAME,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.service = service
        self.ops = ops
        self.max_frame = max_frame
        self.leases = LeaseTable(lease_term, clock)
        self._clock = clock
        self.sessions: dict[int, Session] = {}
        self._ids = count(1)
        self._push_seq = count(1)
        # changes remembered for reads in flight: key -> change number, and their log
        self._changes = 0
        self._recent: dict[str, int] = {}
        self._recent_log: deque[tuple[float, int, list[str]]] = deque()
        self.counters = {
            "opened": 0,
            "closed": 0,
            "frames_in": 0,
            "frames_out": 0,
            "requests": 0,
            "errors": 0,
            "bad_frames": 0,
            "closed_bad": 0,
            "pushes": 0,
            "acks": 0,
            "push_timeouts": 0,
            "void_leases": 0,
        }
        self.by_op: Counter[str] = Counter()  # requests per op (unknown ops not counted)
        self.cluster: Cluster | None = None  # the other coordinators (``attach``)
        service.on_change = self.invalidate

    def attach(self, cluster: Cluster) -> None:
        """Share invalidations with the other coordinators of the cluster: changes made here
        reach their sessions (``Cluster.spread``), theirs reach ours (``invalidate_remote``),
        and no lease is granted while the cluster may be missing changes."""
        self.cluster = cluster

    @property
    def may_lease(self) -> bool:
        return self.cluster is None or self.cluster.may_lease

    async def close_sessions(self, reason: str) -> None:
        """Close every session: their nodes drop all leases and reconnect."""
        for sess in list(self.sessions.values()):
            with contextlib.suppress(Exception):
                await sess.ws.close(code=WSCloseCode.TRY_AGAIN_LATER, message=reason.encode())

    @property
    def lease_term(self) -> float:
        return self.leases.term

    def stats(self) -> dict[str, Any]:
        return {
            **self.counters,
            "open": len(self.sessions),
            "lease_term": self.leases.term,
            "leases": len(self.leases),
            "leases_granted": self.leases.granted,
            "ops": dict(self.by_op),
            **({"cluster": self.cluster.stats()} if self.cluster is not None else {}),
        }

    async def close(self) -> None:
        """At shutdown: close every session (nodes reconnect to the next coordinator)."""
        for sess in list(self.sessions.values()):
            with contextlib.suppress(Exception):
                await sess.ws.close(code=WSCloseCode.GOING_AWAY, message=b"coordinator stopping")

    async def sweep_loop(self) -> None:
        """Forget expired leases and old change records, once per lease term."""
        while True:
            await asyncio.sleep(max(self.leases.term, 0.5))
            self.leases.sweep()
            self._trim_recent()

    # --- the socket ----------------------------------------------------------------------
    async def handle(self, request: web.Request) -> web.StreamResponse:
        """``GET /api/session``: the auth middleware has checked the token already."""
        ws = _Socket(max_msg_size=self.max_frame, compress=False, autoping=True)
        await ws.prepare(request)
        sess = Session(next(self._ids), ws, request.remote)
        self.sessions[sess.sid] = sess
        self.counters["opened"] += 1
        log.info("session %d opened from %s", sess.sid, sess.remote)
        reason = "closed by the node"
        try:
            while True:
                msg = await ws.receive()
                if msg.type is WSMsgType.BINARY:
                    self.counters["frames_in"] += 1
                    if not await self._frame(sess, msg.data):
                        reason = "undecodable frame"
                        break
                elif msg.type is WSMsgType.TEXT:
                    self.counters["frames_in"] += 1
                    self.counters["closed_bad"] += 1
                    reason = "text frame"
                    await ws.close(code=CLOSE_UNSUPPORTED, message=b"binary msgpack frames only")
                    break
                elif msg.type is WSMsgType.ERROR:
                    self.counters["closed_bad"] += 1
                    reason = f"protocol error: {msg.data}"
                    break  # aiohttp has closed it with the code (1009 for a huge frame)
                else:  # CLOSE, CLOSING, CLOSED
                    break
        except Exception:
            log.exception("session %d failed", sess.sid)
            reason = "internal error"
        finally:
            await self._drop(sess, reason)
        return ws

    async def _drop(self, sess: Session, reason: str) -> None:
        sess.closed = True
        self.sessions.pop(sess.sid, None)
        dropped = self.leases.drop_holder(sess)
        for fut in sess.acks.values():
            if not fut.done():
                fut.set_result(None)  # its leases are gone: nobody waits on it any more
        sess.acks.clear()
        self.counters["closed"] += 1
        if not sess.ws.closed:
            with contextlib.suppress(Exception):
                await sess.ws.close()
        log.info("session %d closed (%s), %d leases dropped", sess.sid, reason, dropped)

    async def _frame(self, sess: Session, data: bytes) -> bool:
        """Handle one binary frame; ``False`` when it closed the session."""
        try:
            doc = _decode(data)
        except (msgspec.DecodeError, ValueError, RecursionError):
            self.counters["closed_bad"] += 1
            await sess.ws.close(code=CLOSE_UNDECODABLE, message=b"frame is not msgpack")
            return False
        rid = doc.get("id") if isinstance(doc, dict) else None
        if not isinstance(rid, int) or isinstance(rid, bool):
            if isinstance(doc, dict) and "ack" in doc and len(doc) == 1:
                self._ack(sess, doc["ack"])
                return True
            self.counters["bad_frames"] += 1
            await self._reply(sess, None, BadRequest("a request is a map with an integer id"))
            return True
        if len(sess.tasks) >= MAX_INFLIGHT:
            await self._reply(sess, rid, TierUnavailable("too many requests in flight"))
            return True
        task = asyncio.create_task(self._request(sess, rid, doc))
        sess.tasks.add(task)
        task.add_done_callback(sess.tasks.discard)
        return True

    def _ack(self, sess: Session, seq: Any) -> None:
        fut = sess.acks.pop(seq, None) if isinstance(seq, int) else None
        if fut is not None and not fut.done():
            fut.set_result(None)
            self.counters["acks"] += 1

    async def _reply(
        self, sess: Session, rid: int | None, exc: BaseException, lease: float | None = None
    ) -> None:
        if isinstance(exc, FastcacheError):
            doc: dict[str, Any] = {"id": rid, "error": str(exc), "kind": error_kind(exc)}
        else:
            log.error("session %d: unexpected error", sess.sid, exc_info=exc)
            doc = {"id": rid, "error": "internal error", "kind": "InternalError"}
        if lease is not None:
            doc["lease"] = lease
        self.counters["errors"] += 1
        if await sess.send(doc):
            self.counters["frames_out"] += 1

    # --- one request ---------------------------------------------------------------------
    async def _request(self, sess: Session, rid: int, doc: dict[str, Any]) -> None:
        _ORIGIN.set(sess)  # this task's context: the change's author is not pushed
        _MINE.set(set())
        self.counters["requests"] += 1
        try:
            name, args = doc.get("op"), doc.get("args", {})
            op = self.ops.get(name) if isinstance(name, str) else None
            if op is None:
                self.counters["bad_frames"] += 1
                raise BadRequest(f"unknown op {name!r}")
            self.by_op[name] += 1  # type: ignore[index]
            if set(doc) - {"id", "op", "args"}:
                raise BadRequest("a request has only id, op and args")
            validate(args, op.schema, "args")
            grant = _LEASED.get(name)
            if grant is None:
                result, lease = await op.run(self.service, args), None
            else:
                result, lease = await grant(self, sess, op, args)
        except Exception as exc:
            lease = getattr(exc, "_fastcache_lease", None)
            await self._reply(sess, rid, exc, lease)
        else:
            answer: dict[str, Any] = {"id": rid, "ok": result}
            if lease is not None:
                answer["lease"] = lease
            if await sess.send(answer):
                self.counters["frames_out"] += 1

    async def _leased_read(
        self,
        sess: Session,
        before: list[str],
        read: Awaitable[Any],
        after: Callable[[Any], list[str]],
        negative: bool = False,
    ) -> tuple[Any, float]:
        """Grant ``before`` and run the read; then grant ``after(result)`` unless one of those
        keys changed while the read ran (then the answer carries lease 0)."""
        if not self.may_lease:  # the cluster may be missing changes: answer, lease nothing
            return await read, 0.0
        start = self._changes
        began = self._clock()
        self.leases.grant(sess, before)
        try:
            result = await read
        except NotFound as exc:
            if negative:  # "no such name" is cached too, under the entry's lease
                exc._fastcache_lease = self.leases.term  # type: ignore[attr-defined]
            raise
        found = after(result)
        if found:
            mine = _MINE.get() or ()
            stale = self._clock() - began > RECENT_HORIZON or any(
                self._recent.get(k, 0) > start and self._recent[k] not in mine for k in found
            )
            if stale:
                self.counters["void_leases"] += 1
                return result, 0.0
            self.leases.grant(sess, found)
        return result, self.leases.term

    # --- push invalidation ---------------------------------------------------------------
    def _remember(self, keys: list[str]) -> None:
        self._changes += 1
        mine = _MINE.get()
        if mine is not None:
            mine.add(self._changes)
        for k in keys:
            self._recent[k] = self._changes
        self._recent_log.append((self._clock(), self._changes, keys))
        self._trim_recent()

    def _trim_recent(self) -> None:
        horizon = self._clock() - RECENT_HORIZON
        log_ = self._recent_log
        while log_ and log_[0][0] < horizon:
            _, number, keys = log_.popleft()
            for k in keys:
                if self._recent.get(k) == number:
                    del self._recent[k]

    async def invalidate(self, keys: list[str]) -> None:
        """The service's ``on_change`` hook: tell every other holder of a lease on ``keys``,
        here and on the other coordinators, and wait for their acks or their leases' expiry;
        then drop those lease records."""
        if self.cluster is None:
            await self._invalidate(keys, _ORIGIN.get())
        else:
            await asyncio.gather(self._invalidate(keys, _ORIGIN.get()), self.cluster.spread(keys))

    async def invalidate_remote(self, keys: list[str]) -> None:
        """A change committed on another coordinator touched ``keys``: every holder here is
        pushed (the change's author is a session of that coordinator)."""
        await self._invalidate(keys, None)

    async def _invalidate(self, keys: list[str], origin: Session | None) -> None:
        self._remember(keys)
        held = self.leases.holders(keys, exclude=origin)
        if not held:
            return
        waits = []
        for h in held:
            sess: Session = h.holder  # type: ignore[assignment]
            # every key of the change, not only the held ones: a holder of ``list:<dir>``
            # may have told its kernel that a name in it does not exist (a negative entry)
            waits.append(self._push(sess, keys, h.deadline))
        await asyncio.gather(*waits)
        for h in held:
            self.leases.drop(h.holder, h.expiries)

    async def _push(self, sess: Session, keys: list[str], deadline: float) -> None:
        seq = next(self._push_seq)
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        sess.acks[seq] = fut
        self.counters["pushes"] += 1

        async def send_and_wait() -> None:
            if await sess.send({"push": "invalidate", "seq": seq, "keys": keys}):
                self.counters["frames_out"] += 1
                await fut
            # a send that failed: the session is closing and its leases go with it

        try:
            await asyncio.wait_for(send_and_wait(), max(0.0, deadline - self._clock()))
        except TimeoutError:
            self.counters["push_timeouts"] += 1
            log.warning("session %d did not ack invalidation %d in time", sess.sid, seq)
        finally:
            sess.acks.pop(seq, None)


async def _lookup(hub: SessionHub, sess: Session, op: Op, a: dict[str, Any]) -> Any:
    return await hub._leased_read(
        sess,
        [entry_key(a["parent"], a["name"])],
        op.run(hub.service, a),
        lambda doc: [attr_key(doc["ino"])],
        negative=True,
    )


async def _getattr(hub: SessionHub, sess: Session, op: Op, a: dict[str, Any]) -> Any:
    return await hub._leased_read(
        sess, [attr_key(a["ino"])], op.run(hub.service, a), lambda doc: []
    )


async def _readdir(hub: SessionHub, sess: Session, op: Op, a: dict[str, Any]) -> Any:
    """A listing as compact rows (``model.entry_from_row``), not the REST maps; with
    ``manifests``, each row ends with a small file's manifest (``service.readdir_rows``)."""

    async def read() -> dict[str, Any]:
        offset, limit = a.get("offset") or 0, a.get("limit") or DEFAULT_READDIR
        manifests = bool(a.get("manifests"))
        return {"rows": await hub.service.readdir_rows(a["ino"], offset, limit, manifests)}

    return await hub._leased_read(
        sess,
        [list_key(a["ino"])],
        read(),
        lambda doc: [attr_key(row[2]) for row in doc["rows"]],
    )


async def _create(hub: SessionHub, sess: Session, op: Op, a: dict[str, Any]) -> Any:
    """The creator leases what it made (the new name, the new inode's attributes): another
    node's unlink or chmod of it reaches the creator's cache too. A new directory's listing
    (empty) is leased to it as well, and a listing of the parent it holds is renewed: its
    next lookups of names about to be created there (``mkdir -p``, ``tar -x``) are answered
    on the node. The answer names those listings in ``lists``."""
    parent_list = list_key(a["parent"])
    lists: list[int] = []

    def after(doc: dict[str, Any]) -> list[str]:
        keys = [attr_key(doc["ino"])]
        if doc["type"] == "dir":
            keys.append(list_key(doc["ino"]))
            lists.append(doc["ino"])
        if hub.leases.expiry(sess, parent_list) is not None:
            keys.append(parent_list)
            lists.append(a["parent"])
        return keys

    result, lease = await hub._leased_read(
        sess, [entry_key(a["parent"], a["name"])], op.run(hub.service, a), after
    )
    if lease:
        result["lists"] = lists
    return result, lease


_LEASED: dict[str, Callable[..., Awaitable[tuple[Any, float | None]]]] = {
    "lookup": _lookup,
    "getattr": _getattr,
    "readdir": _readdir,
    "create": _create,
}
