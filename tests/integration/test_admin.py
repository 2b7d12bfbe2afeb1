"""The operator commands against real processes: ``fastcache status``, ``warmup``, ``fsck``
and ``gc`` run as the ``fastcache`` command (a subprocess, stdout a pipe) against a
coordinator, three client nodes and the session's SeaweedFS; S3 is changed behind
fastcache's back with botocore."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import botocore.session
import pytest
import xxhash

from fastcache.testing.cluster import Cluster, Proc, http, wait_for
from fastcache.tiers.peer import rank_peers
from tests.conftest import S3Fixture

TOKEN = "admin-secret"
MiB = 1 << 20


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory, s3: S3Fixture) -> Iterator[Cluster]:
    """A coordinator and three nodes with 1 MiB chunks and no peer replicas (a node holds
    only what it wrote or fetched), on a bucket of their own."""
    c = Cluster(tmp_path_factory.mktemp("admin"), s3.s3_config(), token=TOKEN)
    try:
        c.start_coordinator()
        procs = [c.start_client(extra=["--chunk-size", "1M", "--replication", "0"]) for _ in "123"]
        for proc in procs:
            proc.wait_healthy()
        c.wait_peers({p.name for p in procs})
        yield c
    finally:
        c.close()


def fastcache(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fastcache", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )


def s3_env(cluster: Cluster) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "FASTCACHE_"))}
    env["AWS_ACCESS_KEY_ID"] = cluster.s3.access_key or ""
    env["AWS_SECRET_ACCESS_KEY"] = cluster.s3.secret_key or ""
    env["FASTCACHE_TOKEN"] = TOKEN
    return env


def bucket_flags(cluster: Cluster) -> list[str]:
    return [
        "--coordinator",
        cluster.coordinator_url,
        "--s3-endpoint",
        cluster.s3.endpoint or "",
        "--bucket",
        cluster.s3.bucket,
    ]


def raw_s3(cluster: Cluster) -> Any:
    return botocore.session.get_session().create_client(
        "s3",
        endpoint_url=cluster.s3.endpoint,
        region_name="us-east-1",
        aws_access_key_id=cluster.s3.access_key,
        aws_secret_access_key=cluster.s3.secret_key,
    )


def bucket_keys(cluster: Cluster) -> set[str]:
    pages = raw_s3(cluster).get_paginator("list_objects_v2").paginate(Bucket=cluster.s3.bucket)
    return {obj["Key"] for page in pages for obj in page.get("Contents", ())}


def put_file(node: Proc, path: str, data: bytes) -> None:
    answer = http("PUT", f"{node.url}/api/files{path}", data, token=TOKEN)
    assert answer.status == 201, answer.body


def manifest(cluster: Cluster, path: str) -> dict[str, Any]:
    url = f"{cluster.coordinator_url}/api/ns/resolve?path={path}"
    doc = http("GET", url, token=TOKEN).json()
    return (
        doc["manifest"]
        or http("GET", f"{cluster.coordinator_url}/api/ns/inodes/{doc['ino']}", token=TOKEN).json()[
            "manifest"
        ]
    )


def uploaded(node: Proc) -> bool:
    return http("GET", f"{node.url}/api/cache?limit=0", token=TOKEN).json()["pending_uploads"] == 0


def nvme_chunks(node: Proc) -> set[str]:
    doc = http("GET", f"{node.url}/api/cache?limit=100000", token=TOKEN).json()
    return {e["digest"] for e in doc["entries"]}


def tier_hits(node: Proc) -> dict[str, int]:
    tiers = http("GET", f"{node.url}/api/cache/stats", token=TOKEN).json()["tiers"]
    return {role: tiers[role]["hits"] for role in ("nvme", "peer", "s3")}


# --- status --------------------------------------------------------------------------------
def test_status_lists_live_nodes_and_a_killed_one_as_dead(cluster: Cluster) -> None:
    extra = cluster.start_client(9, extra=["--chunk-size", "1M", "--replication", "0"])
    extra.wait_healthy()
    cluster.wait_peers({"client1", "client2", "client3", "client9"})

    def status() -> dict[str, Any]:
        done = fastcache(
            "status", "--coordinator", cluster.coordinator_url, "--json", "--token", TOKEN
        )
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    doc = status()
    nodes = {n["peer_id"]: n for n in doc["nodes"]}
    assert set(nodes) == {"client1", "client2", "client3", "client9"}
    assert all(n["alive"] for n in nodes.values())
    assert all(n["nvme_capacity"] > 0 for n in nodes.values())
    assert all(n["pending_uploads"] is not None for n in nodes.values())
    assert nodes["client9"]["url"] == extra.url
    assert doc["s3"]["buckets"] == [cluster.s3.bucket]
    assert doc["coordinators"][0]["reachable"] is True
    assert doc["namespace"]["directories"] >= 1  # the root

    extra.kill()
    doc = status()
    nodes = {n["peer_id"]: n for n in doc["nodes"]}
    assert nodes["client9"]["alive"] is False
    assert nodes["client9"]["error"]
    assert all(nodes[f"client{i}"]["alive"] for i in (1, 2, 3))

    human = fastcache("status", "--coordinator", cluster.coordinator_url, "--token", TOKEN)
    assert human.returncode == 0, human.stderr
    assert "client9" in human.stdout and "dead" in human.stdout
    assert cluster.s3.bucket in human.stdout
    # gone for the other tests (the coordinator would list it for its 60 s peer timeout)
    assert http("DELETE", f"{cluster.coordinator_url}/api/peers/client9", token=TOKEN).status == 204


def test_status_of_an_unreachable_coordinator_fails(cluster: Cluster) -> None:
    done = fastcache("status", "--coordinator", "http://127.0.0.1:9", "--json")
    assert done.returncode == 1
    assert json.loads(done.stdout)["coordinators"][0]["reachable"] is False


# --- warmup --------------------------------------------------------------------------------
def test_warmup_on_node2_serves_the_tree_with_no_peer_or_s3_fetch(cluster: Cluster) -> None:
    n1, n2 = cluster.client("client1"), cluster.client("client2")
    files = {
        "/warm/a": os.urandom(3 * MiB + 123),
        "/warm/sub/b": os.urandom(MiB + 1),
        "/warm/sub/deeper/c": b"small",
        "/warm/empty": b"",
        "/warm/dup": b"",
    }
    files["/warm/dup"] = files["/warm/a"][: 2 * MiB]  # shares two chunks with a
    for path, data in files.items():
        put_file(n1, path, data)

    done = fastcache("warmup", "--node", n2.url, "--threads", "4", "/warm", env=s3_env(cluster))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert any(line.startswith("warmup: 100.0%") for line in lines), done.stdout
    summary = lines[-1]
    assert "warmed 5 files" in summary
    assert "7 chunks fetched" in summary  # a: 4, b: 2, c: 1 (dup's two are a's first two)
    assert "0 failed" in summary

    before = tier_hits(n2)
    for path, data in files.items():
        assert http("GET", f"{n2.url}/api/files{path}", token=TOKEN).body == data
    after = tier_hits(n2)
    assert after["peer"] == before["peer"] and after["s3"] == before["s3"]
    # and the chunks are on node 2's NVMe (promoted in the background as the warmup fetched)
    wanted = {
        d
        for path in ("/warm/a", "/warm/sub/b", "/warm/sub/deeper/c")
        for d in manifest(cluster, path)["chunks"]
    }
    wait_for(lambda: wanted <= nvme_chunks(n2), message="warmed chunks on node 2's NVMe")

    again = fastcache("warmup", "--node", n2.url, "/warm/a", "/warm/sub", env=s3_env(cluster))
    assert again.returncode == 0, again.stderr
    assert "0 chunks fetched" in again.stdout and "7 already cached" in again.stdout


def test_warmup_cluster_puts_each_chunk_on_its_owner(cluster: Cluster) -> None:
    nodes = {name: cluster.client(name) for name in ("client1", "client2", "client3")}
    cluster.wait_peers(set(nodes))
    paths = [f"/cwarm/f{i}" for i in range(4)]
    for path in paths:
        put_file(nodes["client1"], path, os.urandom(2 * MiB + 9))
    chunks = {d for path in paths for d in manifest(cluster, path)["chunks"]}

    done = fastcache(
        "warmup",
        "--cluster",
        "--coordinator",
        cluster.coordinator_url,
        "/cwarm",
        env=s3_env(cluster),
    )
    assert done.returncode == 0, done.stderr
    assert "warmed 4 files" in done.stdout and "on 3 node(s)" in done.stdout
    for name in ("client2", "client3"):  # client1 wrote them all: it holds every chunk
        owned = {d for d in chunks if rank_peers(d, nodes)[0] == name}
        wait_for(
            lambda name=name, owned=owned: chunks & nvme_chunks(nodes[name]) == owned,
            message=f"{name} holds the chunks it owns, only those",
        )


def connected_to(pid: int, port: int) -> bool:
    """Whether process ``pid`` has an established TCP connection to ``port``."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        with contextlib.suppress(OSError):
            target = os.readlink(fd)
            if target.startswith("socket:["):
                inodes.add(target[len("socket:[") : -1])
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[3] == "01" and int(fields[2].split(":")[1], 16) == port and fields[9] in inodes:
            return True
    return False


def test_warmup_interrupted_exits_130_with_one_line(cluster: Cluster) -> None:
    """Ctrl-C while the node works (here: frozen, so the warmup is surely in flight)."""
    n3 = cluster.client("client3")
    put_file(cluster.client("client1"), "/intr/f", os.urandom(100))
    n3.signal(signal.SIGSTOP)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "fastcache", "warmup", "--node", n3.url, "/intr"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=s3_env(cluster),
        )
        port = int(n3.url.rsplit(":", 1)[1])
        wait_for(lambda: connected_to(proc.pid, port), message="warmup waiting on node 3")
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        n3.signal(signal.SIGCONT)
    assert proc.returncode == 130
    assert err.strip().splitlines() == [
        "fastcache warmup: interrupted at 0 of 0 chunks; run it again to resume"
    ]
    assert "Traceback" not in out


def test_warmup_of_a_missing_path_fails_with_the_error(cluster: Cluster) -> None:
    n2 = cluster.client("client2")
    done = fastcache("warmup", "--node", n2.url, "/no/such/tree", env=s3_env(cluster))
    assert done.returncode == 1
    assert "no/such/tree" in done.stderr


def test_warmup_endpoint_rejects_bad_input(cluster: Cluster) -> None:
    url = f"{cluster.client('client2').url}/api/warmup"
    for body in (b"{}", b'{"paths": []}', b'{"paths": ["/"], "threads": 0}', b"nope"):
        answer = http("POST", url, body, token=TOKEN)
        assert answer.status == 400, body
        assert "error" in answer.json()
    assert http("POST", url, b'{"paths": ["/"]}').status == 401


# --- fsck and gc ---------------------------------------------------------------------------
def test_fsck_finds_a_chunk_deleted_from_s3_and_repair_restores_it(cluster: Cluster) -> None:
    n1 = cluster.client("client1")
    data = os.urandom(2 * MiB + 77)
    put_file(n1, "/fsck/victim", data)
    wait_for(lambda: uploaded(n1), message="node 1 uploads done")
    victim = manifest(cluster, "/fsck/victim")["chunks"][1]
    raw_s3(cluster).delete_object(Bucket=cluster.s3.bucket, Key=f"chunks/{victim}")

    env = s3_env(cluster)
    found = fastcache("fsck", *bucket_flags(cluster), "--json", env=env)
    assert found.returncode == 1, found.stderr
    report = json.loads(found.stdout)
    assert [(p["digest"], p["what"]) for p in report["problems"]] == [(victim, "missing")]

    fixed = fastcache("fsck", *bucket_flags(cluster), "--repair", "--json", env=env)
    assert fixed.returncode == 0, fixed.stderr
    problems = json.loads(fixed.stdout)["problems"]
    assert [(p["digest"], p["repaired_from"]) for p in problems] == [(victim, n1.url)]
    body = raw_s3(cluster).get_object(Bucket=cluster.s3.bucket, Key=f"chunks/{victim}")["Body"]
    assert xxhash.xxh3_128_hexdigest(body.read()) == victim

    clean = fastcache("fsck", *bucket_flags(cluster), "--verify-data", env=env)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    assert "0 problems" in clean.stdout


def test_gc_lists_an_orphan_in_a_dry_run_and_deletes_only_it(cluster: Cluster) -> None:
    n1 = cluster.client("client1")
    put_file(n1, "/gc/kept", os.urandom(MiB + 5))
    wait_for(lambda: uploaded(n1), message="node 1 uploads done")
    orphan_data = os.urandom(1000)
    orphan = xxhash.xxh3_128_hexdigest(orphan_data)
    key = f"chunks/{orphan}"
    raw_s3(cluster).put_object(Bucket=cluster.s3.bucket, Key=key, Body=orphan_data)
    before = bucket_keys(cluster)
    env = s3_env(cluster)

    young = fastcache("gc", *bucket_flags(cluster), "--json", env=env)  # default grace: 1 h
    assert young.returncode == 0, young.stderr
    assert json.loads(young.stdout)["orphan_count"] == 0
    assert json.loads(young.stdout)["young_kept"] == 1

    dry = fastcache("gc", *bucket_flags(cluster), "--grace", "0", env=env)
    assert dry.returncode == 0, dry.stderr
    assert f"would delete (dry run; --delete to delete): chunk {orphan}" in dry.stdout
    assert dry.stdout.count("would delete") == 1
    assert bucket_keys(cluster) == before

    gone = fastcache("gc", *bucket_flags(cluster), "--grace", "0", "--delete", "--json", env=env)
    assert gone.returncode == 0, gone.stderr
    report = json.loads(gone.stdout)
    assert [o["digest"] for o in report["orphans"]] == [orphan]
    assert report["deleted"] == 1
    assert bucket_keys(cluster) == before - {key}
    kept = manifest(cluster, "/gc/kept")["chunks"]
    assert {f"chunks/{d}" for d in kept} <= bucket_keys(cluster)


def test_manifest_pages_cover_every_file_once(cluster: Cluster) -> None:
    n1 = cluster.client("client1")
    for i in range(3):
        put_file(n1, f"/pages/f{i}", os.urandom(10 + i))
    url = f"{cluster.coordinator_url}/api/admin/manifests"
    whole = http("GET", url, token=TOKEN).json()
    assert whole["next_after"] is None
    seen: list[int] = []
    after = 0
    while after is not None:
        page = http("GET", f"{url}?limit=2&after={after}", token=TOKEN).json()
        assert len(page["files"]) <= 2
        seen += [f["ino"] for f in page["files"]]
        after = page["next_after"]
    assert seen == [f["ino"] for f in whole["files"]] == sorted(set(seen))
    wanted = {manifest(cluster, f"/pages/f{i}")["chunks"][0] for i in range(3)}
    assert wanted <= {d for f in whole["files"] for d in f["manifest"]["chunks"]}
    for bad in ("limit=0", "limit=1001", "after=-1", "after=x"):
        answer = http("GET", f"{url}?{bad}", token=TOKEN)
        assert answer.status == 400 and "error" in answer.json(), bad
    assert http("GET", url).status == 401
    assert http("GET", f"{cluster.coordinator_url}/api/admin/status").status == 401


def test_fsck_verify_data_finds_a_chunk_overwritten_in_s3(cluster: Cluster) -> None:
    """Same length, other bytes: a HEAD cannot tell, a GET hashed against the name can."""
    n1 = cluster.client("client1")
    put_file(n1, "/fsck/rotten", os.urandom(MiB + 3))
    wait_for(lambda: uploaded(n1), message="node 1 uploads done")
    victim = manifest(cluster, "/fsck/rotten")["chunks"][0]
    key = f"chunks/{victim}"
    raw_s3(cluster).put_object(Bucket=cluster.s3.bucket, Key=key, Body=os.urandom(MiB))
    env = s3_env(cluster)

    assert fastcache("fsck", *bucket_flags(cluster), env=env).returncode == 0  # sizes match
    found = fastcache("fsck", *bucket_flags(cluster), "--verify-data", "--json", env=env)
    assert found.returncode == 1, found.stderr
    problems = json.loads(found.stdout)["problems"]
    assert [(p["digest"], p["what"]) for p in problems] == [(victim, "corrupt")]

    fixed = fastcache("fsck", *bucket_flags(cluster), "--verify-data", "--repair", env=env)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    assert f"corrupt: chunk {victim}" in fixed.stdout and f"repaired from {n1.url}" in fixed.stdout
    body = raw_s3(cluster).get_object(Bucket=cluster.s3.bucket, Key=key)["Body"].read()
    assert xxhash.xxh3_128_hexdigest(body) == victim
