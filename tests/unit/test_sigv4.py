"""The lean GET's SigV4 signature equals botocore's for the same request and time (the
integration tests show SeaweedFS accepts it and refuses a wrong key)."""

from __future__ import annotations

import calendar
import datetime

import pytest
from botocore.auth import S3SigV4Auth
from botocore.awsrequest import AWSRequest
from botocore.config import Config
from botocore.credentials import Credentials

from fastcache.tiers.sigv4 import SigV4Signer

WHEN = "20261130T235959Z"


def botocore_headers(
    host: str, path: str, region: str, token: str | None, monkeypatch: pytest.MonkeyPatch
) -> dict[str, str]:
    frozen = datetime.datetime.strptime(WHEN, "%Y%m%dT%H%M%SZ")
    monkeypatch.setattr("botocore.auth.get_current_datetime", lambda: frozen)
    request = AWSRequest(method="GET", url=f"http://{host}{path}")
    # as the cloud tier's client is configured: no SHA-256 of the payload
    request.context["client_config"] = Config(s3={"payload_signing_enabled": False})
    auth = S3SigV4Auth(Credentials("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG", token), "s3", region)
    auth.add_auth(request)
    return {k.lower(): v for k, v in request.headers.items()}


@pytest.mark.parametrize(
    ("host", "path", "region", "token"),
    [
        ("127.0.0.1:8333", "/bucket/chunks/" + "ab" * 16, "us-east-1", None),
        ("s3.example:9000", "/prefix/bucket-1/chunks/" + "0f" * 16, "eu-west-3", None),
        ("127.0.0.1:8333", "/b/chunks/" + "cd" * 16, "us-east-1", "a-session-token"),
    ],
)
def test_signature_matches_botocore(
    host: str, path: str, region: str, token: str | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    expected = botocore_headers(host, path, region, token, monkeypatch)
    when = calendar.timegm(datetime.datetime.strptime(WHEN, "%Y%m%dT%H%M%SZ").timetuple())
    signer = SigV4Signer("AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG", region, token)
    ours = {k.lower(): v for k, v in signer.get_headers(host, path, when).items()}
    assert ours["x-amz-date"] == expected["x-amz-date"] == WHEN
    assert ours["x-amz-content-sha256"] == expected["x-amz-content-sha256"] == "UNSIGNED-PAYLOAD"
    assert ours["authorization"] == expected["authorization"]
    if token is not None:
        assert ours["x-amz-security-token"] == token


def test_the_signing_key_follows_the_day() -> None:
    signer = SigV4Signer("AK", "SK", "us-east-1")
    day1 = signer.get_headers("h:1", "/b/k", 1_700_000_000)["Authorization"]
    day2 = signer.get_headers("h:1", "/b/k", 1_700_000_000 + 86_400)["Authorization"]
    assert day1 != day2 and "/20231114/" in day1 and "/20231115/" in day2
    assert signer.get_headers("h:1", "/b/k", 1_700_000_000)["Authorization"] == day1
