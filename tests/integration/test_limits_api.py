"""The maximum file size over HTTP, against real processes: the client API answers 413 from
the ``Content-Length`` alone, the coordinator refuses a manifest or a size beyond it (400);
both as ``{"error": ...}`` JSON (``docs/limits.md``)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from http.client import HTTPConnection
from urllib.parse import urlsplit

import pytest

from fastcache.config import DEFAULT_CHUNK_SIZE
from fastcache.coordinator.model import MAX_FILE_SIZE, max_file_size
from fastcache.testing.cluster import Cluster, http
from tests.integration.test_http_details import error_json

TOKEN = "limits-token"
MiB = 1 << 20


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, s3: object) -> Iterator[Cluster]:
    """client1 at the defaults (4 MiB chunks: 64 GiB files), client2 with --max-file-size 1M."""
    c = Cluster(tmp_path_factory.mktemp("http-limits"), s3.s3_config(), token=TOKEN)  # type: ignore[attr-defined]
    try:
        c.start_coordinator()
        procs = [c.start_client(), c.start_client(extra=["--max-file-size", "1M"])]
        for proc in procs:
            proc.wait_healthy()
        yield c
    finally:
        c.close()


def put_headers_only(url: str, path: str, length: int) -> tuple[int, str]:
    """A PUT announcing ``length`` bytes, answered before any of them is sent."""
    parts = urlsplit(url)
    conn = HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.putrequest("PUT", path)
        conn.putheader("Authorization", f"Bearer {TOKEN}")
        conn.putheader("Content-Length", str(length))
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, json.loads(resp.read())["error"]
    finally:
        conn.close()


def test_node_refuses_a_file_beyond_the_maximum(cluster: Cluster) -> None:
    node = cluster.client("client1")
    limit = max_file_size(DEFAULT_CHUNK_SIZE)  # 64 GiB, though --max-file-size is 1T
    for length in (limit + 1, (1 << 63) - 1):
        status, error = put_headers_only(node.url, "/api/files/limits/huge.bin", length)
        assert (status, str(limit) in error) == (413, True)
    assert http("GET", f"{node.url}/api/files/limits/huge.bin", token=TOKEN).status == 404


def test_max_file_size_flag(cluster: Cluster) -> None:
    node = cluster.client("client2")
    assert put_headers_only(node.url, "/api/files/limits/a.bin", MiB + 1)[0] == 413
    # a streamed body (no length announced) is cut off once it passes the limit
    chunks = (b"z" * (256 * 1024) for _ in range(8))
    answer = http("PUT", f"{node.url}/api/files/limits/b.bin", chunks, token=TOKEN)  # type: ignore[arg-type]
    assert str(MiB) in error_json(answer, 413)
    answer = http("PUT", f"{node.url}/api/files/limits/c.bin", b"z" * MiB, token=TOKEN)
    assert answer.status == 201, answer.body  # exactly the limit is allowed
    for name, status in (("a", 404), ("b", 404), ("c", 200)):
        got = http("GET", f"{node.url}/api/files/limits/{name}.bin", token=TOKEN)
        assert got.status == status


def test_coordinator_refuses_a_manifest_beyond_the_maximum(cluster: Cluster) -> None:
    base = cluster.coordinator_url
    created = http(
        "POST",
        f"{base}/api/ns/create",
        json.dumps({"parent": 1, "name": "limits-f", "type": "file"}).encode(),
        token=TOKEN,
    )
    assert created.status == 201, created.body
    ino = created.json()["ino"]
    size, chunk = MAX_FILE_SIZE + 1, 1 << 40
    manifest = {"size": size, "chunk_size": chunk, "chunks": ["0" * 32, "1" * 32]}
    body = json.dumps({"manifest": manifest, "expected_version": 0}).encode()
    answer = http("PUT", f"{base}/api/ns/inodes/{ino}/manifest", body, token=TOKEN)
    assert "maximum file size" in error_json(answer, 400)
    for too_big in (MAX_FILE_SIZE + 1, (1 << 63) - 1):
        body = json.dumps({"size": too_big}).encode()
        error_json(http("PATCH", f"{base}/api/ns/inodes/{ino}", body, token=TOKEN), 400)
    attrs = http("GET", f"{base}/api/ns/inodes/{ino}", token=TOKEN).json()
    assert (attrs["size"], attrs["version"]) == (0, 0)
