"""The harness's S3 housekeeping against the real SeaweedFS: a finished system's bucket goes."""

from __future__ import annotations

from typing import Any

from bench.systems import S3Admin


def test_delete_bucket_drops_a_bucket_with_objects_in_it(s3: Any) -> None:
    admin = S3Admin(s3.endpoint, s3.access_key, s3.secret_key)
    bucket = s3.new_bucket()
    admin.create_bucket(bucket)
    admin._client.put_object(Bucket=bucket, Key="chunks/a", Body=b"x" * 1000)
    assert admin.object_size(bucket, "chunks/a") == 1000
    admin.delete_bucket(bucket)
    names = {b["Name"] for b in admin._client.list_buckets()["Buckets"]}
    assert bucket not in names
    admin.delete_bucket(bucket)  # already gone: no error
