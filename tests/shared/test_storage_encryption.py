"""Encryption at rest: with S3_SERVER_SIDE_ENCRYPTION every object is written with SSE-S3, and the store (moto in
server mode here, over real HTTP, as MinIO in a deployment) reports it on HEAD and GET."""

from __future__ import annotations

import base64
import os
import uuid
from pathlib import Path

import pytest

from shared.settings import Settings
from shared.storage import ObjectStore, create_store
from testkit.s3 import S3Server
from tests.helpers import bearer, create_dataset, create_partner
from tests.ingestion.conftest import png


def s3_store(server: S3Server, *, encrypt: bool) -> ObjectStore:
    return create_store(
        s3_endpoint=server.endpoint,
        s3_access_key=server.access_key,
        s3_secret_key=server.secret_key,
        s3_secure=False,
        s3_region="us-east-1",
        file_root=Path("/nonexistent-unused"),
        s3_server_side_encryption=encrypt,
    )


def raw_encryption_header(store: ObjectStore, bucket: str, key: str) -> str | None:
    """What the S3 endpoint itself answers to a HEAD, read through the SDK without our store in between."""
    return store.client.stat_object(bucket, key).metadata.get("x-amz-server-side-encryption")  # type: ignore[attr-defined]


@pytest.mark.parametrize("size", [1_000, 6 * 1024 * 1024], ids=["single-part", "multipart"])
def test_objects_are_written_with_sse_s3_and_read_back_unchanged(s3_server: S3Server, size: int) -> None:
    store = s3_store(s3_server, encrypt=True)
    bucket = f"t-{uuid.uuid4().hex[:16]}"
    store.ensure_buckets(bucket)
    data = os.urandom(size)
    written = store.put(bucket, "a/object.bin", data)
    assert written.encryption == "AES256"
    assert raw_encryption_header(store, bucket, "a/object.bin") == "AES256"
    assert store.stat(bucket, "a/object.bin").encryption == "AES256"
    assert store.get_bytes(bucket, "a/object.bin") == data


def test_without_the_setting_objects_are_not_encrypted(s3_server: S3Server) -> None:
    """The control: the header above comes from our request, not from a store that encrypts everything anyway."""
    store = s3_store(s3_server, encrypt=False)
    bucket = f"t-{uuid.uuid4().hex[:16]}"
    store.ensure_buckets(bucket)
    assert store.put(bucket, "plain", b"x").encryption is None
    assert raw_encryption_header(store, bucket, "plain") is None
    assert store.stat(bucket, "plain").encryption is None


def test_the_setting_reaches_every_object_a_service_writes(platform) -> None:
    ingestion = platform("ingestion", s3_server_side_encryption=True)
    issued = create_partner(ingestion.client)
    dataset = create_dataset(
        ingestion.client, issued["api_key"], name="photos", task_type="image_classification", labels=["cat", "dog"]
    )
    pushed = ingestion.client.post(
        f"/v1/datasets/{dataset['id']}/items",
        json={"items": [{"image": base64.b64encode(png()).decode(), "label": "cat"}]},
        headers=bearer(issued["api_key"]),
    )
    assert pushed.status_code == 200, pushed.get_json()
    store = ingestion.runtime.storage
    stored = list(store.list("raw", prefix=f"{issued['partner']['id']}/"))
    assert stored, "the push wrote an object"
    for info in stored:
        assert raw_encryption_header(store, info.bucket, info.key) == "AES256", info.key


def test_the_setting_is_read_from_the_environment() -> None:
    assert Settings.from_env({"S3_SERVER_SIDE_ENCRYPTION": "true"}).s3_server_side_encryption is True
    assert Settings.from_env({}).s3_server_side_encryption is False
