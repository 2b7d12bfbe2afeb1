"""``CoordinatorClient``: the async HTTP client of the coordinator, used by nodes and FUSE.

One kept-alive ``ClientSession``, short timeouts, idempotent GETs retried once on a
connection error. Given several coordinator URLs (one cluster, one database), a call that
cannot reach its coordinator moves to the next: any call whose connection was refused (it was
never sent), and idempotent ones after any connection error. Later calls stay on the
coordinator that answered. Error answers come back as the domain errors the service raised
(``NotFound``, ``Exists``, ``Conflict``…); a coordinator that cannot be reached raises
``TierUnavailable``.

A call that returned has been committed by the coordinator (it survives the coordinator's
crash); ``sync()`` returns once everything acknowledged before it is on the coordinator's
disk (it survives power loss): what a node's ``fsync``/``syncfs`` waits for.
"""

from __future__ import annotations

import base64
from collections.abc import Iterable, Sequence
from types import TracebackType
from typing import Any
from urllib.parse import quote

import aiohttp
import orjson

from fastcache.coordinator.model import MAX_LOCATION_BATCH, Entry, InodeAttrs, PeerInfo
from fastcache.errors import TierUnavailable, error_from_kind, error_from_status

__all__ = ["CoordinatorClient"]

CONNECT_TIMEOUT = 2.0
TOTAL_TIMEOUT = 15.0


class CoordinatorClient:
    def __init__(
        self,
        base_url: str | Sequence[str],
        token: str | None = None,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        self._urls = [u.rstrip("/") for u in urls]
        if not self._urls:
            raise ValueError("CoordinatorClient needs at least one URL")
        self._at = 0  # the coordinator calls go to
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._peer_list: tuple[str, list[PeerInfo]] | None = None  # (ETag, peers)
        self._json_headers = {**self._headers, "Content-Type": "application/json"}
        self._session = session
        self._owns_session = session is None
        self._timeout = aiohttp.ClientTimeout(total=TOTAL_TIMEOUT, connect=CONNECT_TIMEOUT)

    @property
    def base_url(self) -> str:
        """The coordinator calls go to now."""
        return self._urls[self._at]

    async def __aenter__(self) -> CoordinatorClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
        self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            # created lazily: a ClientSession needs the running loop
            self._session = aiohttp.ClientSession(
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(limit=64, keepalive_timeout=30),
            )
            self._owns_session = True
        return self._session

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, Any] | None = None,
        body: Any = None,
        idempotent: bool = False,
        headers: dict[str, str] | None = None,
        seen: dict[str, Any] | None = None,
    ) -> Any:
        """One call; the decoded JSON answer (``None`` for 204 and 304), or the domain error.
        ``headers``: more request headers; ``seen``: filled with the answer's ``status`` and
        ``etag``."""
        query = {k: str(v) for k, v in (params or {}).items() if v is not None}
        retry_sent = idempotent or method == "GET"
        sent = self._headers if body is None else self._json_headers
        if headers:
            sent = {**sent, **headers}
        data = None if body is None else orjson.dumps(body)
        # each coordinator once, the first one twice (e.g. a kept-alive connection it closed)
        tries = [self._at, *((self._at + i) % len(self._urls) for i in range(len(self._urls)))]
        for n, at in enumerate(tries):
            url = self._urls[at] + path
            try:
                async with self._get_session().request(
                    method, url, params=query, data=data, headers=sent, timeout=self._timeout
                ) as resp:
                    raw = await resp.read()
                    status = resp.status
                    if seen is not None:
                        seen["status"], seen["etag"] = status, resp.headers.get("ETag")
            except aiohttp.ClientConnectionError as exc:
                never_sent = isinstance(exc, aiohttp.ClientConnectorError)
                if n + 1 < len(tries) and (never_sent or retry_sent):
                    continue
                raise TierUnavailable(f"coordinator {self._urls[at]} unreachable: {exc}") from exc
            except (TimeoutError, aiohttp.ClientError) as exc:
                if n + 1 < len(tries) and retry_sent and tries[n + 1] != at:
                    continue  # a slow coordinator: try another one, not the same again
                raise TierUnavailable(
                    f"coordinator {self._urls[at]} failed: {exc or type(exc).__name__}"
                ) from exc
            self._at = at
            break
        if status == 204 or not raw:
            if status >= 400:
                raise error_from_status(status, f"HTTP {status}")
            return None
        try:
            doc = orjson.loads(raw)
        except ValueError:
            doc = None
        if status >= 400:
            if isinstance(doc, dict) and isinstance(doc.get("error"), str):
                raise error_from_kind(doc.get("kind"), status, doc["error"])
            raise error_from_status(status, raw[:200].decode("utf-8", "replace"))
        if doc is None:
            raise TierUnavailable(f"coordinator answered {status} with a body that is not JSON")
        return doc

    # --- peers ---------------------------------------------------------------------------
    async def register_peer(self, peer_id: str, url: str, capacity: int, used: int = 0) -> PeerInfo:
        doc = await self._request(
            "POST",
            "/api/peers/register",
            body={"peer_id": peer_id, "url": url, "capacity": capacity, "used": used},
        )
        return PeerInfo.from_json(doc)

    async def list_peers(self) -> list[PeerInfo]:
        """The live peers. Asked again with the last answer's ETag: an unchanged peer set
        costs the coordinator a 304 and no body (every node asks every few seconds)."""
        seen: dict[str, Any] = {}
        cached = self._peer_list
        ask = {"If-None-Match": cached[0]} if cached is not None else None
        doc = await self._request("GET", "/api/peers", headers=ask, seen=seen)
        if seen.get("status") == 304 and cached is not None:
            return list(cached[1])
        peers = [PeerInfo.from_json(p) for p in doc["peers"]]
        etag = seen.get("etag")
        self._peer_list = None if etag is None else (etag, peers)
        return list(peers)

    async def heartbeat(
        self, peer_id: str, used: int | None = None, status: str | None = None
    ) -> PeerInfo:
        """``NotFound`` means the coordinator forgot us: register again."""
        body: dict[str, Any] = {"peer_id": peer_id}
        if used is not None:
            body["used"] = used
        if status is not None:
            body["status"] = status
        return PeerInfo.from_json(await self._request("PUT", "/api/peers/status", body=body))

    async def deregister_peer(self, peer_id: str) -> None:
        await self._request("DELETE", f"/api/peers/{quote(peer_id, safe='')}")

    # --- locations -----------------------------------------------------------------------
    async def get_locations(
        self, *, path: str | None = None, chunk: str | None = None
    ) -> list[PeerInfo]:
        """The live peers recorded as holding ``path`` or ``chunk``."""
        doc = await self._request(
            "GET", "/api/files/location", params={"path": path, "chunk": chunk}
        )
        return [PeerInfo.from_json(p) for p in doc["peers"]]

    async def add_location(
        self, peer_id: str, *, path: str | None = None, chunk: str | None = None
    ) -> None:
        await self._put_location("add", peer_id, path, chunk)

    async def remove_location(
        self, peer_id: str, *, path: str | None = None, chunk: str | None = None
    ) -> None:
        await self._put_location("remove", peer_id, path, chunk)

    async def add_locations(self, peer_id: str, *, chunks: Iterable[str]) -> None:
        """Record ``peer_id`` as a holder of every chunk: one request, one transaction per
        ``MAX_LOCATION_BATCH`` chunks."""
        await self._put_locations("add", peer_id, chunks)

    async def remove_locations(self, peer_id: str, *, chunks: Iterable[str]) -> None:
        await self._put_locations("remove", peer_id, chunks)

    async def _put_locations(self, action: str, peer_id: str, chunks: Iterable[str]) -> None:
        names = list(dict.fromkeys(chunks))
        for start in range(0, len(names), MAX_LOCATION_BATCH):
            body = {
                "peer_id": peer_id,
                "action": action,
                "chunks": names[start : start + MAX_LOCATION_BATCH],
            }
            await self._request("PUT", "/api/files/location", body=body)

    async def _put_location(
        self, action: str, peer_id: str, path: str | None, chunk: str | None
    ) -> None:
        body: dict[str, Any] = {"peer_id": peer_id, "action": action}
        if path is not None:
            body["path"] = path
        if chunk is not None:
            body["chunk"] = chunk
        await self._request("PUT", "/api/files/location", body=body)

    async def stats(self) -> dict[str, Any]:
        return dict(await self._request("GET", "/api/stats"))

    async def health(self) -> dict[str, Any]:
        return dict(await self._request("GET", "/api/health"))

    # --- operator tools ------------------------------------------------------------------
    async def admin_status(self) -> dict[str, Any]:
        """Every recorded peer with ``live``, namespace totals, the peer timeout."""
        return dict(await self._request("GET", "/api/admin/status"))

    async def manifests(
        self, after: int = 0, limit: int | None = None
    ) -> tuple[list[tuple[int, dict[str, Any]]], int | None]:
        """One page of ``(ino, manifest)`` after inode ``after``, and the next ``after``
        (``None`` after the last page)."""
        doc = await self._request(
            "GET", "/api/admin/manifests", params={"after": after, "limit": limit}
        )
        return [(f["ino"], f["manifest"]) for f in doc["files"]], doc["next_after"]

    async def sync(self) -> None:
        """Barrier: returns once every change the coordinator acknowledged before it (to any
        client) is on its disk. Retried once on a dropped connection, like a GET."""
        await self._request("POST", "/api/sync", idempotent=True)

    # --- namespace -----------------------------------------------------------------------
    async def lookup(self, parent: int, name: str) -> InodeAttrs:
        doc = await self._request("POST", "/api/ns/lookup", body={"parent": parent, "name": name})
        return InodeAttrs.from_json(doc)

    async def getattr(self, ino: int) -> InodeAttrs:
        return InodeAttrs.from_json(await self._request("GET", f"/api/ns/inodes/{ino}"))

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
        body = {k: v for k, v in fields.items() if v is not None}
        return InodeAttrs.from_json(
            await self._request("PATCH", f"/api/ns/inodes/{ino}", body=body)
        )

    async def readdir(self, ino: int, offset: int = 0, limit: int = 1000) -> list[Entry]:
        """Up to ``limit`` entries after cookie ``offset``; pass the last ``Entry.offset`` on."""
        doc = await self._request(
            "GET", f"/api/ns/inodes/{ino}/entries", params={"offset": offset, "limit": limit}
        )
        return [Entry.from_json(e) for e in doc["entries"]]

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
        """``create``, plus the parent's attributes after it and its version before it
        (``None`` from a coordinator that does not send them)."""
        body: dict[str, Any] = {
            "parent": parent,
            "name": name,
            "type": type,
            "mode": mode,
            "uid": uid,
            "gid": gid,
            "rdev": rdev,
        }
        if target is not None:
            body["target"] = target
        doc = await self._request("POST", "/api/ns/create", body=body)
        parent_doc = doc.get("parent_attrs")
        return (
            InodeAttrs.from_json(doc),
            None if parent_doc is None else InodeAttrs.from_json(parent_doc),
            doc.get("parent_version_before"),
        )

    async def mkdir(
        self, parent: int, name: str, mode: int = 0o755, uid: int = 0, gid: int = 0
    ) -> InodeAttrs:
        return await self.create(parent, name, "dir", mode, uid, gid)

    async def symlink(
        self, parent: int, name: str, target: str, uid: int = 0, gid: int = 0
    ) -> InodeAttrs:
        return await self.create(parent, name, "symlink", 0o777, uid, gid, target=target)

    async def link(self, ino: int, new_parent: int, new_name: str) -> InodeAttrs:
        body = {"ino": ino, "new_parent": new_parent, "new_name": new_name}
        return InodeAttrs.from_json(await self._request("POST", "/api/ns/link", body=body))

    async def unlink(self, parent: int, name: str) -> None:
        await self._request("POST", "/api/ns/unlink", body={"parent": parent, "name": name})

    async def rmdir(self, parent: int, name: str) -> None:
        await self._request("POST", "/api/ns/rmdir", body={"parent": parent, "name": name})

    async def remove_entry(
        self, parent: int, name: str, *, is_dir: bool
    ) -> tuple[InodeAttrs | None, int | None]:
        """unlink (or rmdir): the parent's attributes after it and its version before it."""
        doc = await self._request(
            "POST",
            "/api/ns/rmdir" if is_dir else "/api/ns/unlink",
            params={"reply": "true"},
            body={"parent": parent, "name": name},
        )
        if not isinstance(doc, dict) or doc.get("parent_attrs") is None:
            return None, None  # a coordinator that answers 204 only
        return InodeAttrs.from_json(doc["parent_attrs"]), doc.get("parent_version_before")

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
        body = {
            "parent": parent,
            "name": name,
            "new_parent": new_parent,
            "new_name": new_name,
            "noreplace": noreplace,
            "exchange": exchange,
        }
        await self._request("POST", "/api/ns/rename", body=body)

    async def commit_manifest(
        self,
        ino: int,
        manifest: dict[str, Any],
        expected_version: int,
        *,
        holder: str | None = None,
        held: Iterable[str] = (),
    ) -> InodeAttrs:
        """Commit new content; ``Conflict`` if someone committed since ``expected_version``.

        ``holder`` (a peer id) and ``held`` (digests only that peer has yet): recorded as
        chunk locations in the commit's transaction, in place of a separate publish.
        """
        body: dict[str, Any] = {"manifest": manifest, "expected_version": expected_version}
        names = list(dict.fromkeys(held))
        if names and holder is not None:
            if len(names) > MAX_LOCATION_BATCH:  # too many for one commit: record them first
                await self.add_locations(holder, chunks=names)
            else:
                body["holder"] = holder
                body["held"] = names
        return InodeAttrs.from_json(
            await self._request("PUT", f"/api/ns/inodes/{ino}/manifest", body=body)
        )

    # --- extended attributes (values travel as base64) -------------------------------------
    # ``uid``/``gids``: check Linux's permission rules for that caller; without: none.
    @staticmethod
    def _who(uid: int | None, gids: Sequence[int]) -> dict[str, Any]:
        return {"uid": uid, "gids": ",".join(map(str, gids)) if gids else None}

    async def getxattr(
        self, ino: int, name: str, *, uid: int | None = None, gids: Sequence[int] = ()
    ) -> bytes:
        params = {"name": name, **self._who(uid, gids)}
        doc = await self._request("GET", f"/api/ns/inodes/{ino}/xattrs", params=params)
        return base64.b64decode(doc["value"])

    async def listxattr(
        self, ino: int, *, uid: int | None = None, gids: Sequence[int] = ()
    ) -> list[str]:
        params = self._who(uid, gids)
        doc = await self._request("GET", f"/api/ns/inodes/{ino}/xattrs", params=params)
        return list(doc["names"])

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
        body: dict[str, Any] = {"name": name, "value": base64.b64encode(value).decode()}
        if flags:
            body["flags"] = flags
        if uid is not None:
            body["uid"] = uid
            body["gids"] = list(gids)
        doc = await self._request("PUT", f"/api/ns/inodes/{ino}/xattrs", body=body)
        return InodeAttrs.from_json(doc)

    async def removexattr(
        self, ino: int, name: str, *, uid: int | None = None, gids: Sequence[int] = ()
    ) -> InodeAttrs:
        params = {"name": name, **self._who(uid, gids)}
        doc = await self._request("DELETE", f"/api/ns/inodes/{ino}/xattrs", params=params)
        return InodeAttrs.from_json(doc)

    async def resolve(self, path: str) -> InodeAttrs:
        return InodeAttrs.from_json(
            await self._request("GET", "/api/ns/resolve", params={"path": path})
        )

    async def put_file(
        self,
        path: str,
        manifest: dict[str, Any],
        expected_version: int | None = None,
        mode: int = 0o644,
        uid: int = 0,
        gid: int = 0,
        make_parents: bool = True,
    ) -> InodeAttrs:
        body = {
            "path": path,
            "manifest": manifest,
            "expected_version": expected_version,
            "mode": mode,
            "uid": uid,
            "gid": gid,
            "make_parents": make_parents,
        }
        return InodeAttrs.from_json(await self._request("PUT", "/api/ns/path", body=body))

    async def delete_path(self, path: str) -> None:
        await self._request("DELETE", "/api/ns/path", params={"path": path})

    async def statfs(self) -> dict[str, int]:
        return dict(await self._request("GET", "/api/ns/statfs"))
