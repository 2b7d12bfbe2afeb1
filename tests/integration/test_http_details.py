"""HTTP details of both services, against real processes with a cluster token: the bearer
scheme in any case, the OpenAPI document public, client mistakes logged as one WARNING line
(an aborted upload, malformed HTTP, bad JSON)."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from urllib.parse import urlsplit

import pytest

from fastcache.testing.cluster import Answer, Cluster, http
from fastcache.testing.polling import wait_until

TOKEN = "details-token"
MiB = 1 << 20
# a log line: timestamp, level, tag; or the command line the harness writes before a start
LOG_LINE = re.compile(
    r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR) \[|--- |$)"
)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, s3: object) -> Iterator[Cluster]:
    c = Cluster(tmp_path_factory.mktemp("http-details"), s3.s3_config(), token=TOKEN)  # type: ignore[attr-defined]
    try:
        c.start(1)
        yield c
    finally:
        c.close()


@pytest.fixture(params=["coordinator", "node"])
def url(request: pytest.FixtureRequest, cluster: Cluster) -> str:
    return cluster.coordinator_url if request.param == "coordinator" else cluster.clients[0].url


def log_of(cluster: Cluster, name: str) -> str:
    proc = cluster.coordinator if name == "coordinator" else cluster.client(name)
    assert proc is not None
    return proc.log_path.read_text(errors="replace")


def raw(url: str, data: bytes, hang_up: bool = False) -> bytes:
    """Send ``data`` on a fresh connection; what comes back until the server closes (nothing
    with ``hang_up``: the connection is closed right after sending)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=30) as sock:
        sock.sendall(data)
        if hang_up:
            return b""
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def assert_one_line_records(text: str) -> None:
    """Every line of a log is a record of its own: no traceback, no continuation."""
    strays = [line for line in text.splitlines() if not LOG_LINE.match(line)]
    assert not strays, "\n".join(strays[:20])
    assert "Traceback" not in text


def error_json(answer: Answer, status: int) -> str:
    assert answer.status == status, answer.body[:300]
    assert answer.headers["Content-Type"].startswith("application/json")
    message = answer.json()["error"]
    assert isinstance(message, str) and message
    return message


# --- Authorization ---------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER", "bEaReR"])
def test_bearer_scheme_in_any_case(url: str, scheme: str) -> None:
    answer = http("GET", f"{url}/api/peers", headers={"Authorization": f"{scheme} {TOKEN}"})
    assert answer.status == 200, answer.body[:300]
    assert "peers" in answer.json()


@pytest.mark.parametrize(
    "header",
    [
        None,
        "Bearer",
        "Bearer ",
        f"Bearer{TOKEN}",
        f"Basic {TOKEN}",
        TOKEN,
        "Bearer wrong",
        f"Bearer {TOKEN}x",
        "\u00ff\u00fe",
    ],
)
def test_malformed_or_wrong_authorization_is_401_json(url: str, header: str | None) -> None:
    headers = {} if header is None else {"Authorization": header}
    error_json(http("GET", f"{url}/api/peers", headers=headers), 401)


def test_openapi_is_public_and_says_what_is(url: str) -> None:
    """Without the token: the document and every route it marks public (``security: []``)
    answer; every other route is 401. Checked over each GET route without parameters."""
    answer = http("GET", f"{url}/api/openapi.json")
    assert answer.status == 200
    doc = answer.json()
    assert doc["security"] == [{"bearer": []}]
    public = set()
    for path, ops in doc["paths"].items():
        op = ops.get("get")
        if op is None or "{" in path:
            continue
        if op.get("security") == []:
            public.add(path)
            assert http("GET", f"{url}{path}").status == 200, path
        else:
            assert "401" in op["responses"], path
            error_json(http("GET", f"{url}{path}"), 401)
    assert {"/api/health", "/api/openapi.json"} <= public


# --- client mistakes in the log ----------------------------------------------------------
def test_aborted_upload_is_one_warning_line(cluster: Cluster) -> None:
    node = cluster.clients[0]
    head = (
        "PUT /api/files/aborted/upload.bin HTTP/1.1\r\n"
        "Host: node\r\n"
        f"Authorization: Bearer {TOKEN}\r\n"
        f"Content-Length: {MiB}\r\n\r\n"
    )
    raw(node.url, head.encode() + bytes(MiB // 2), hang_up=True)
    line = wait_until(
        lambda: next((s for s in log_of(cluster, "client1").splitlines() if "aborted/" in s), None),
        timeout=30,
        message="the aborted upload in the node's log",
    )
    assert " WARNING [API] PUT /api/files/aborted/upload.bin from 127.0.0.1: " in line
    assert "the client went away" in line
    # the node goes on serving, and the half upload left no file behind
    assert http("GET", f"{node.url}/api/health").status == 200
    assert http("GET", f"{node.url}/api/files/aborted/upload.bin", token=TOKEN).status == 404
    assert (
        http("PUT", f"{node.url}/api/files/aborted/ok.bin", b"x" * 1000, token=TOKEN).status == 201
    )
    assert http("GET", f"{node.url}/api/files/aborted/ok.bin", token=TOKEN).body == b"x" * 1000
    assert_one_line_records(log_of(cluster, "client1"))


@pytest.mark.parametrize("name", ["coordinator", "client1"])
def test_malformed_http_and_bad_json_are_one_warning_line(cluster: Cluster, name: str) -> None:
    proc = cluster.coordinator if name == "coordinator" else cluster.client(name)
    assert proc is not None
    reply = raw(proc.url, b"GET /api/health HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n")
    assert re.match(rb"HTTP/1\.[01] 400 ", reply), reply[:200]  # aiohttp's own answer
    path = "/api/ns/lookup" if name == "coordinator" else "/api/peers/client1/heartbeat"
    answer = http("POST", proc.url + path, b'{"bad json', token=TOKEN)
    assert "not valid JSON" in error_json(answer, 400)
    tag = "[COORDINATOR]" if name == "coordinator" else "[API]"
    wanted = [
        "WARNING [HTTP] Error handling request from 127.0.0.1: malformed HTTP: ",
        f"WARNING {tag} POST {path} from 127.0.0.1: 400 request body is not valid JSON",
    ]
    if name == "coordinator":  # the coordinator's aiohttp logger is its own
        wanted[0] = "WARNING [COORDINATOR] Error handling request from 127.0.0.1: malformed HTTP"

    def logged() -> bool:
        text = log_of(cluster, name)
        return all(w in text for w in wanted)

    wait_until(logged, timeout=30, message=f"the warnings in {name}'s log")
    assert_one_line_records(log_of(cluster, name))
    assert http("GET", f"{proc.url}/api/health").status == 200
