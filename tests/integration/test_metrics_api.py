"""A coordinator process started with ``--metrics-public``: ``/metrics`` answers without
the token (every other route still wants it), parses, times the requests it served and is
documented as public."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from fastcache.testing.cluster import Cluster, http

TOKEN = "public-metrics-token"


def test_metrics_public_on_the_coordinator(tmp_path: Path, s3: object) -> None:
    cluster = Cluster(
        tmp_path,
        s3.s3_config(),  # type: ignore[attr-defined]
        token=TOKEN,
        coordinator_flags=["--metrics-public"],
    )
    with cluster:
        url = cluster.start_coordinator().url
        assert http("GET", f"{url}/api/stats").status == 401
        assert http("GET", f"{url}/api/stats", token=TOKEN).status == 200
        answer = http("GET", f"{url}/metrics")
        assert answer.status == 200, answer.body
        families = {f.name: f for f in text_string_to_metric_families(answer.body.decode())}
        served = {
            s.labels["route"]: s.value
            for s in families["fastcache_coordinator_requests"].samples
            if s.name.endswith("_total")
        }
        assert served["GET /api/stats"] == 1  # the 401 never reached a handler
        seconds = families["fastcache_coordinator_request_seconds"]
        assert seconds.type == "histogram"
        timed = {s.labels["route"]: s.value for s in seconds.samples if s.name.endswith("_count")}
        assert timed["GET /api/stats"] == 1
        assert timed["GET /api/health"] >= 1  # the start-up's health checks
        assert families["fastcache_coordinator_sessions"].samples[0].value == 0
        assert families["fastcache_coordinator_peers"].type == "gauge"
        doc = http("GET", f"{url}/api/openapi.json").json()
        assert doc["paths"]["/metrics"]["get"]["security"] == []
        assert "401" not in doc["paths"]["/metrics"]["get"]["responses"]
