"""The client API of one real node process (coordinator and SeaweedFS behind it): ranges,
HEAD, the size route, streaming uploads in bounded memory, bad input, and a schemathesis run.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.client import HTTPConnection
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import xxhash

from fastcache.chunks import digest
from fastcache.testing.cluster import Answer, Cluster, Proc, http
from tests.helpers import rss_bytes

TOKEN = "api-test-token"
MiB = 1 << 20
CHUNK = 4 * MiB
STREAM_SIZE = 1 << 30  # the streaming upload: 1 GiB
UPLOAD_MEMORY = 64 * MiB  # the node's --upload-memory: chunks waiting for S3 kept in memory
RSS_BUDGET = UPLOAD_MEMORY + 236 * MiB


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, s3) -> Iterator[Proc]:  # type: ignore[no-untyped-def]
    root = tmp_path_factory.mktemp("client-api")
    cluster = Cluster(root, s3.s3_config(), token=TOKEN, heartbeat_interval=1.0)
    try:
        cluster.start_coordinator()
        node = cluster.start_client(extra=["--upload-memory", f"{UPLOAD_MEMORY}"])
        node.wait_healthy()
        cluster.wait_peers({node.name})
        yield node
    finally:
        cluster.close()


def call(node: Proc, method: str, path: str, body: bytes | None = None, **kw: object) -> Answer:
    kw.setdefault("token", TOKEN)
    return http(method, node.url + path, body, **kw)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def big(node: Proc) -> bytes:
    """A 9 MiB + 5 file: three chunks, the last one short."""
    data = os.urandom(2 * CHUNK + MiB + 5)
    answer = call(node, "PUT", "/api/files/ranges/big.bin", data)
    assert answer.status == 201, answer.body
    assert answer.json() == {
        "path": "/ranges/big.bin",
        "size": len(data),
        "version": 1,
        "chunks": 3,
    }
    return data


# --- ranges, HEAD, size ------------------------------------------------------------------
@pytest.mark.parametrize(
    ("header", "lo", "hi"),
    [
        ("bytes=0-0", 0, 1),
        ("bytes=100-199", 100, 200),
        (f"bytes={CHUNK - 10}-{CHUNK + 10}", CHUNK - 10, CHUNK + 11),  # across a chunk edge
        (f"bytes={CHUNK - 1}-{2 * CHUNK + 1}", CHUNK - 1, 2 * CHUNK + 2),  # three chunks
        ("bytes=-10", -10, None),
        (f"bytes={2 * CHUNK}-", 2 * CHUNK, None),
        ("bytes=5-999999999999", 5, None),  # clamped to the end
    ],
)
def test_range(node: Proc, big: bytes, header: str, lo: int, hi: int | None) -> None:
    answer = call(node, "GET", "/api/files/ranges/big.bin", headers={"Range": header})
    expected = big[lo:hi]
    assert answer.status == 206
    assert answer.body == expected
    start = lo % len(big)
    end = start + len(expected) - 1
    assert answer.headers["Content-Range"] == f"bytes {start}-{end}/{len(big)}"
    assert int(answer.headers["Content-Length"]) == len(expected)


@pytest.mark.parametrize(
    "header", ["bytes=9437189-", "bytes=99999999-100000000", "bytes=-0", "bytes=5-2"]
)
def test_unsatisfiable_range(node: Proc, big: bytes, header: str) -> None:
    answer = call(node, "GET", "/api/files/ranges/big.bin", headers={"Range": header})
    assert answer.status == 416
    assert answer.headers["Content-Range"] == f"bytes */{len(big)}"
    assert "error" in answer.json()


def test_another_unit_is_ignored(node: Proc, big: bytes) -> None:
    answer = call(node, "GET", "/api/files/ranges/big.bin", headers={"Range": "items=0-5"})
    assert answer.status == 200
    assert answer.body == big


@pytest.mark.parametrize(
    "header",
    [
        "bytes=0-1,5-6",  # several ranges
        "bytes=x-y",
        "bytes=-",
        "bytes=5",
        "bytes=\u00b2-",  # a Unicode digit: str.isdigit() says yes, int() of it fails
        "bytes=\u0661-\u0662",  # Arabic-Indic digits
        "bytes=" + "9" * 5000 + "-",  # longer than int() parses by default
        "bytes=1-" + "9" * 20,  # past any int64
    ],
)
def test_malformed_range_is_a_client_error(node: Proc, big: bytes, header: str) -> None:
    raw = header.encode("utf-8").decode("latin-1")  # as the bytes would arrive on the wire
    answer = call(node, "GET", "/api/files/ranges/big.bin", headers={"Range": raw})
    assert answer.status == 400, answer.body[:200]
    assert "error" in answer.json()


def test_head_and_size(node: Proc, big: bytes) -> None:
    head = call(node, "HEAD", "/api/files/ranges/big.bin")
    assert head.status == 200 and head.body == b""
    assert int(head.headers["Content-Length"]) == len(big)
    assert head.headers["Accept-Ranges"] == "bytes"
    assert call(node, "HEAD", "/api/files/ranges/nothing-here").status == 404
    size = call(node, "GET", "/api/files/ranges/big.bin/size")
    assert size.status == 200 and size.json()["size"] == len(big)
    # a file really called "size" is still reachable, and its /size route too
    assert call(node, "PUT", "/api/files/size", b"12345").status == 201
    assert call(node, "GET", "/api/files/size").body == b"12345"
    assert call(node, "GET", "/api/files/size/size").json()["size"] == 5
    assert call(node, "GET", "/api/files/missing/size").status == 404


def test_put_replaces_and_delete_removes(node: Proc) -> None:
    assert call(node, "PUT", "/api/files/cycle.txt", b"one").json()["version"] == 1
    second = call(node, "PUT", "/api/files/cycle.txt", b"two!")
    assert second.json()["version"] == 2 and second.json()["size"] == 4
    stale = call(node, "PUT", "/api/files/cycle.txt?expected_version=1", b"three")
    assert stale.status == 409
    assert call(node, "GET", "/api/files/cycle.txt").body == b"two!"
    assert call(node, "DELETE", "/api/files/cycle.txt").status == 200
    assert call(node, "GET", "/api/files/cycle.txt").status == 404
    assert call(node, "DELETE", "/api/files/cycle.txt").status == 404


def test_cache_lists_the_chunks_this_node_holds(node: Proc) -> None:
    data = os.urandom(2 * CHUNK + 77)
    assert call(node, "PUT", "/api/files/listed.bin", data).status == 201
    want = {digest(data[i : i + CHUNK]) for i in range(0, len(data), CHUNK)}
    seen: list[str] = []
    after = ""
    while True:  # one chunk per page: the pagination itself is exercised
        page = call(node, "GET", f"/api/cache?limit=1{after}").json()
        seen += [e["digest"] for e in page["entries"]]
        assert all(e["size"] > 0 for e in page["entries"])
        if page["next_after"] is None:
            break
        after = f"&after={page['next_after']}"
    assert want <= set(seen)
    assert seen == sorted(seen) and len(seen) == len(set(seen))
    assert call(node, "GET", "/api/cache?after=nothex").status == 400


def test_empty_file(node: Proc) -> None:
    assert call(node, "PUT", "/api/files/empty", b"").json()["chunks"] == 0
    answer = call(node, "GET", "/api/files/empty")
    assert answer.status == 200 and answer.body == b""
    assert call(node, "GET", "/api/files/empty", headers={"Range": "bytes=0-"}).status == 416


# --- streaming in bounded memory ---------------------------------------------------------
def _blocks(total: int) -> Iterator[bytes]:
    """``total`` bytes, 1 MiB at a time, every block distinct (no dedup shortcut)."""
    base = bytearray(os.urandom(MiB))
    for i in range(total // MiB):
        base[:8] = i.to_bytes(8, "little")
        yield bytes(base)


class PeakRss:
    """Samples a process's RSS on a thread until stopped; the peak is what counts."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.start = rss_bytes(pid)
        self.peak = self.start
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):  # sampling period, not synchronisation
            self.peak = max(self.peak, rss_bytes(self.pid))

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes(self.pid))

    @property
    def growth(self) -> int:
        return self.peak - self.start


def test_streaming_upload_and_download_in_bounded_memory(node: Proc) -> None:
    url = urlsplit(node.url)
    expected = xxhash.xxh3_128()
    sent = 0

    def body() -> Iterator[bytes]:
        nonlocal sent
        for block in _blocks(STREAM_SIZE):
            expected.update(block)
            sent += len(block)
            yield block

    conn = HTTPConnection(url.hostname, url.port, timeout=300)
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Length": str(STREAM_SIZE)}
    with PeakRss(node.pid) as upload:
        conn.request("PUT", "/api/files/stream/big.bin", body=body(), headers=headers)
        resp = conn.getresponse()
        answer = json.loads(resp.read())
    assert resp.status == 201, answer
    assert answer["size"] == STREAM_SIZE == sent
    assert answer["chunks"] == STREAM_SIZE // CHUNK
    assert upload.growth < RSS_BUDGET, f"upload grew RSS by {upload.growth / MiB:.0f} MiB"

    got = xxhash.xxh3_128()
    received = 0
    with PeakRss(node.pid) as download:
        conn.request(
            "GET", "/api/files/stream/big.bin", headers={"Authorization": headers["Authorization"]}
        )
        resp = conn.getresponse()
        assert resp.status == 200
        while piece := resp.read(MiB):
            got.update(piece)
            received += len(piece)
    conn.close()
    assert received == STREAM_SIZE
    assert got.hexdigest() == expected.hexdigest()
    assert download.growth < RSS_BUDGET, f"download grew RSS by {download.growth / MiB:.0f} MiB"
    assert call(node, "DELETE", "/api/files/stream/big.bin").status == 200


# --- bad input ---------------------------------------------------------------------------
GOOD = b"the real chunk"
GOOD_DIGEST = digest(GOOD)
BAD_INPUT = [
    # (id, method, path, body, headers, token, status)
    ("traversal", "GET", "/api/files/a/%2E%2E/b", None, {}, TOKEN, 400),
    ("traversal-root", "GET", "/api/files/%2E%2E/etc/passwd", None, {}, TOKEN, 400),
    ("dot-segment", "PUT", "/api/files/a/%2E/b", b"x", {}, TOKEN, 400),
    ("nul", "PUT", "/api/files/a%00b", b"x", {}, TOKEN, 400),
    ("empty-segment", "PUT", "/api/files/a//b", b"x", {}, TOKEN, 400),
    ("name-too-long", "PUT", "/api/files/" + "n" * 300, b"x", {}, TOKEN, 400),
    ("directory", "GET", "/api/files/ranges", None, {}, TOKEN, 409),
    ("missing", "GET", "/api/files/no/such/file", None, {}, TOKEN, 404),
    ("delete-root", "DELETE", "/api/files/", None, {}, TOKEN, 400),
    ("version-type", "PUT", "/api/files/v?expected_version=abc", b"x", {}, TOKEN, 400),
    ("version-negative", "PUT", "/api/files/v?expected_version=-1", b"x", {}, TOKEN, 400),
    ("limit-type", "GET", "/api/cache?limit=lots", None, {}, TOKEN, 400),
    (
        "file-too-large",
        "PUT",
        "/api/files/huge",
        None,
        {"Content-Length": str(1 << 50)},
        TOKEN,
        413,
    ),
    ("chunk-too-large", "PUT", f"/api/chunks/{GOOD_DIGEST}", b"x" * (5 * MiB), {}, TOKEN, 413),
    ("chunk-mismatch", "PUT", f"/api/chunks/{GOOD_DIGEST}", b"not the real chunk", {}, TOKEN, 400),
    ("digest-short", "GET", "/api/chunks/abc123", None, {}, TOKEN, 400),
    ("digest-upper", "GET", "/api/chunks/" + "A" * 32, None, {}, TOKEN, 400),
    ("digest-nonhex", "PUT", "/api/chunks/" + "g" * 32, GOOD, {}, TOKEN, 400),
    ("chunk-not-local", "GET", f"/api/chunks/{'0' * 32}", None, {}, TOKEN, 404),
    ("json-malformed", "POST", "/api/peers/client1/heartbeat", b"{not json", {}, TOKEN, 400),
    ("json-array", "POST", "/api/peers/client1/heartbeat", b"[1, 2]", {}, TOKEN, 400),
    (
        "json-wrong-type",
        "POST",
        "/api/peers/client1/heartbeat",
        b'{"used": "lots"}',
        {},
        TOKEN,
        400,
    ),
    ("json-negative", "POST", "/api/peers/client1/heartbeat", b'{"used": -5}', {}, TOKEN, 400),
    ("json-unknown-field", "POST", "/api/peers/client1/heartbeat", b'{"x": 1}', {}, TOKEN, 400),
    ("json-too-large", "POST", "/api/peers/client1/heartbeat", b" " * (5 * MiB), {}, TOKEN, 413),
    ("unknown-peer", "GET", "/api/peers/nobody", None, {}, TOKEN, 404),
    ("unknown-peer-heartbeat", "POST", "/api/peers/nobody/heartbeat", b"{}", {}, TOKEN, 404),
    ("no-token", "GET", "/api/cache/stats", None, {}, None, 401),
    ("wrong-token", "GET", "/api/files/ranges/big.bin", None, {}, "not-the-token", 401),
    ("wrong-scheme", "GET", "/api/peers", None, {"Authorization": f"Basic {TOKEN}"}, None, 401),
    ("method", "PATCH", "/api/cache", b"{}", {}, TOKEN, 405),
]


def _raw(
    node: Proc,
    method: str,
    path: str,
    body: bytes | None,
    headers: dict[str, str],
    token: str | None,
) -> Answer:
    """http.client, so paths (``%2E%2E``, ``//``) and lying headers go out untouched."""
    url = urlsplit(node.url)
    conn = HTTPConnection(url.hostname, url.port, timeout=30)
    sent = dict(headers)
    if token:
        sent["Authorization"] = f"Bearer {token}"
    try:
        conn.putrequest(method, path, skip_accept_encoding=True)
        for key, value in sent.items():
            conn.putheader(key, value)
        if body is not None and "Content-Length" not in sent:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return Answer(resp.status, resp.read(), dict(resp.headers))
    finally:
        conn.close()


@pytest.mark.parametrize(
    ("method", "path", "body", "headers", "token", "status"),
    [case[1:] for case in BAD_INPUT],
    ids=[case[0] for case in BAD_INPUT],
)
def test_bad_input(
    node: Proc,
    big: bytes,
    method: str,
    path: str,
    body: bytes | None,
    headers: dict[str, str],
    token: str | None,
    status: int,
) -> None:
    answer = _raw(node, method, path, body, headers, token)
    assert answer.status == status, answer.body[:300]
    doc = answer.json()
    assert isinstance(doc["error"], str) and doc["error"]
    assert "Traceback" not in doc["error"]
    assert node.alive()


def test_still_healthy_after_bad_input(node: Proc, big: bytes) -> None:
    for case in BAD_INPUT:
        _raw(node, *case[1:-1])
    assert call(node, "GET", "/api/health", token=None).status == 200
    assert call(node, "GET", "/api/files/ranges/big.bin").body == big
    # the chunk PUT that matched nothing stored nothing; the right body is accepted
    assert call(node, "GET", f"/api/chunks/{GOOD_DIGEST}").status == 404
    assert call(node, "PUT", f"/api/chunks/{GOOD_DIGEST}", GOOD).status == 201
    assert call(node, "GET", f"/api/chunks/{GOOD_DIGEST}").body == GOOD
    assert call(node, "HEAD", f"/api/chunks/{GOOD_DIGEST}").headers["Content-Length"] == str(
        len(GOOD)
    )


# --- schemathesis ------------------------------------------------------------------------
def test_schemathesis_finds_no_server_errors(node: Proc, tmp_path: Path) -> None:
    exe = shutil.which("schemathesis") or str(Path(sys.executable).parent / "schemathesis")
    cmd = [
        exe,
        "run",
        f"{node.url}/api/openapi.json",
        "--checks",
        "not_a_server_error",
        "--max-examples",
        "15",
        "--header",
        f"Authorization: Bearer {TOKEN}",
        "--request-timeout",
        "30",
        "--seed",
        "1",
        "--report-dir",
        str(tmp_path),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=150, cwd=tmp_path)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert call(node, "GET", "/api/health", token=None).status == 200


def test_chunk_gets_on_one_kept_alive_connection(node: Proc) -> None:
    """The chunk endpoint sends bodies with ``sendfile``: whole chunks, back to back on one
    connection (a miss in between), each exactly its Content-Length."""
    chunks = [os.urandom(CHUNK), os.urandom(CHUNK - 7)]
    names = [digest(c) for c in chunks]
    for name, data in zip(names, chunks, strict=True):
        assert call(node, "PUT", f"/api/chunks/{name}", data).status == 201
    conn = HTTPConnection(*urlsplit(node.url).netloc.split(":"), timeout=30)
    try:
        first_sock = None
        for i in [0, 1, None, 0, 1]:
            name = names[i] if i is not None else digest(b"never stored")
            conn.request("GET", f"/api/chunks/{name}", headers={"Authorization": f"Bearer {TOKEN}"})
            resp = conn.getresponse()
            body = resp.read()
            first_sock = first_sock or conn.sock
            if i is None:
                assert resp.status == 404
            else:
                assert resp.status == 200 and body == chunks[i]
                assert resp.getheader("Content-Length") == str(len(chunks[i]))
        assert conn.sock is first_sock  # http.client reconnects silently: it did not
    finally:
        conn.close()
