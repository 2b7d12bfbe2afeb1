"""AWS Signature Version 4 for the two requests the cloud tier makes without botocore: a
GET and a PUT of an object, path-style, with no query.

Signed headers: ``host``, ``x-amz-content-sha256``, ``x-amz-date``, the caller's own
``x-amz-*`` headers (the PUT's checksum) and ``x-amz-security-token`` with temporary
credentials; the payload is ``UNSIGNED-PAYLOAD`` (a PUT carries a CRC the server checks
instead). The signing key is derived once per UTC day. Costs a few µs per request, where
botocore's request building and signing cost ~1 ms of CPU.
"""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping
from urllib.parse import quote

_ALGORITHM = "AWS4-HMAC-SHA256"
_UNSIGNED = "UNSIGNED-PAYLOAD"


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


class SigV4Signer:
    """Signs object requests for one set of static credentials, one region, service ``s3``."""

    def __init__(
        self, access_key: str, secret_key: str, region: str, token: str | None = None
    ) -> None:
        self._access_key = access_key
        self._secret = ("AWS4" + secret_key).encode()
        self._region = region
        self._token = token
        self._day = ""
        self._key = b""

    def get_headers(self, host: str, path: str, now: float | None = None) -> dict[str, str]:
        """The headers of a signed ``GET path`` to ``host`` (``host[:port]``) at ``now``."""
        return self.headers("GET", host, path, now=now)

    def headers(
        self,
        method: str,
        host: str,
        path: str,
        amz: Mapping[str, str] | None = None,
        now: float | None = None,
    ) -> dict[str, str]:
        """The headers of a signed ``method path`` to ``host`` at ``now``: ``amz`` (extra
        ``x-amz-*`` headers, lower-case names) signed and returned with the others."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(time.time() if now is None else now))
        day = stamp[:8]
        if day != self._day:
            key = _hmac(self._secret, day)
            for part in (self._region, "s3", "aws4_request"):
                key = _hmac(key, part)
            self._day, self._key = day, key
        signed_values = {"x-amz-content-sha256": _UNSIGNED, "x-amz-date": stamp}
        if amz:
            signed_values.update(amz)
        if self._token is not None:
            signed_values["x-amz-security-token"] = self._token
        names = sorted(["host", *signed_values])
        values = {"host": host, **signed_values}
        canonical_headers = "".join(f"{n}:{values[n]}\n" for n in names)
        signed = ";".join(names)
        canonical = (
            f"{method}\n{quote(path, safe='/~')}\n\n{canonical_headers}\n{signed}\n{_UNSIGNED}"
        )
        scope = f"{day}/{self._region}/s3/aws4_request"
        hashed = hashlib.sha256(canonical.encode()).hexdigest()
        to_sign = f"{_ALGORITHM}\n{stamp}\n{scope}\n{hashed}"
        signature = hmac.new(self._key, to_sign.encode(), hashlib.sha256).hexdigest()
        signed_values["Authorization"] = (
            f"{_ALGORITHM} Credential={self._access_key}/{scope}, "
            f"SignedHeaders={signed}, Signature={signature}"
        )
        return signed_values
