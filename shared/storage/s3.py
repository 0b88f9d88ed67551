"""The S3 backend (MinIO, AWS, moto) through the minio SDK.

With `server_side_encryption` every object is written with SSE-S3 (`x-amz-server-side-encryption: AES256`): the
store encrypts it at rest with its own keys (MinIO: through its KMS, `MINIO_KMS_SECRET_KEY` or KES) and decrypts it
for any authorised reader, so nothing else changes. A store that cannot encrypt refuses the write, which surfaces
as a StorageError (503 at the HTTP edge) instead of an object silently stored in clear.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import tempfile
from collections.abc import Iterator
from datetime import timedelta
from email.utils import parsedate_to_datetime
from typing import IO, Any, BinaryIO, cast
from xml.etree.ElementTree import ParseError

import certifi
import urllib3
from minio import Minio
from minio.error import MinioException, S3Error
from minio.sse import SseS3
from urllib3.util import Retry, Timeout

from shared.storage.interface import (
    DEFAULT_CONTENT_TYPE,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    StorageError,
    _check,
    _normalize_sha256,
    sha256_stream,
    validate_bucket,
)

SPOOL_MAX_SIZE = 8 * 1024 * 1024
"""S3 uploads spool through memory up to this size, then through a temp file (length and sha256 go first)."""

SHA256_META = "sha256"
"""User metadata name of the sha256 on S3 (sent as ``x-amz-meta-sha256``)."""

SSE_HEADER = "x-amz-server-side-encryption"

_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NoSuchObject", "ResourceNotFound"})


class S3Store(ObjectStore):
    """S3-compatible backend (MinIO, AWS, moto) through the minio SDK.

    The HTTP pool uses short timeouts and few retries so an unreachable store fails in seconds, and a fixed
    region so the SDK never spends a round trip asking for a bucket's location.
    """

    def __init__(
        self,
        endpoint: str,
        access_key: str,
        secret_key: str,
        *,
        secure: bool = False,
        region: str = "us-east-1",
        connect_timeout: float = 3.0,
        read_timeout: float = 30.0,
        retries: int = 2,
        server_side_encryption: bool = False,
    ) -> None:
        self._endpoint = endpoint
        self._sse = SseS3() if server_side_encryption else None
        self._secure = secure
        self._region = region
        self._client = self._make_client(
            Timeout(connect=connect_timeout, read=read_timeout),
            Retry(
                total=retries,
                connect=retries,
                read=retries,
                backoff_factor=0.2,
                status_forcelist=(500, 502, 503, 504),
            ),
            access_key,
            secret_key,
        )
        # /readyz must answer fast: one attempt, tight timeouts.
        self._ping_client = self._make_client(
            Timeout(connect=min(connect_timeout, 2.0), read=min(read_timeout, 3.0)),
            Retry(total=0, redirect=0, raise_on_status=False),
            access_key,
            secret_key,
        )

    def _make_client(self, timeout: Timeout, retry: Retry, access_key: str, secret_key: str) -> Minio:
        pool = urllib3.PoolManager(
            timeout=timeout,
            retries=retry,
            maxsize=10,
            cert_reqs="CERT_REQUIRED",
            ca_certs=os.environ.get("SSL_CERT_FILE") or certifi.where(),
        )
        return Minio(
            self._endpoint,
            access_key=access_key or None,
            secret_key=secret_key or None,
            secure=self._secure,
            region=self._region,
            http_client=pool,
        )

    @property
    def client(self) -> Minio:
        """The underlying minio client, for tooling and tests that need raw S3 access."""
        return self._client

    @property
    def describe(self) -> str:
        return f"{'s3+https' if self._secure else 's3'}://{self._endpoint}"

    @property
    def encrypts(self) -> bool:
        """Whether every object this store writes asks for server-side encryption (SSE-S3)."""
        return self._sse is not None

    @contextlib.contextmanager
    def _errors(self, action: str, bucket: str, key: str = "") -> Iterator[None]:
        """Translate SDK and transport errors into StorageError/ObjectNotFound with the location attached."""
        try:
            yield
        except S3Error as exc:
            if exc.code in _NOT_FOUND_CODES:
                raise ObjectNotFound(bucket, key, self.describe) from exc
            raise StorageError(f"{action} {self.describe}/{bucket}/{key} failed: {exc.code}: {exc}") from exc
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise StorageError(f"{action} {self.describe}/{bucket}/{key} failed: {exc}") from exc
        except ParseError as exc:  # the SDK could not read the endpoint's XML error answer
            raise StorageError(f"{action} {self.describe}/{bucket}/{key} failed: unreadable answer: {exc}") from exc

    def _info(self, bucket: str, key: str, headers: Any) -> ObjectInfo:
        modified = headers.get("last-modified")
        return ObjectInfo(
            bucket=bucket,
            key=key,
            size=int(headers.get("content-length") or 0),
            sha256=(headers.get(f"x-amz-meta-{SHA256_META}") or "").lower(),
            content_type=headers.get("content-type") or DEFAULT_CONTENT_TYPE,
            last_modified=parsedate_to_datetime(modified) if modified else None,
            encryption=headers.get(SSE_HEADER) or None,
        )

    def ensure_buckets(self, *buckets: str) -> None:
        for bucket in buckets:
            validate_bucket(bucket)
            with self._errors("create bucket", bucket):
                if self._client.bucket_exists(bucket):
                    continue
                try:
                    self._client.make_bucket(bucket)
                except S3Error as exc:  # another process created it first
                    if exc.code not in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                        raise

    def put(
        self,
        bucket: str,
        key: str,
        data: bytes | BinaryIO,
        *,
        content_type: str = DEFAULT_CONTENT_TYPE,
        expected_sha256: str | None = None,
    ) -> ObjectInfo:
        _check(bucket, key)
        expected = _normalize_sha256(expected_sha256)
        # S3 wants the length up front and the sha256 goes in the request headers, so a stream is hashed
        # while it spools (memory up to SPOOL_MAX_SIZE, a temp file beyond); bytes are already in memory.
        with contextlib.ExitStack() as stack:
            if isinstance(data, bytes | bytearray | memoryview):
                body: IO[bytes] = io.BytesIO(data)
                size = len(body.getbuffer())
                sha256 = hashlib.sha256(data).hexdigest()
            else:
                body = stack.enter_context(tempfile.SpooledTemporaryFile(max_size=SPOOL_MAX_SIZE))
                sha256, size = sha256_stream(data, body)
                body.seek(0)
            if expected is not None and expected != sha256:
                raise self._mismatch(bucket, key, expected, sha256)
            with self._errors("put", bucket, key):
                written = self._client.put_object(
                    bucket,
                    key,
                    cast(BinaryIO, body),
                    size,
                    content_type=content_type,
                    metadata={SHA256_META: sha256},
                    sse=self._sse,
                    num_parallel_uploads=1,  # one part in memory at a time
                )
        encryption = (getattr(written, "http_headers", None) or {}).get(SSE_HEADER) or None
        return ObjectInfo(bucket, key, size, sha256, content_type, None, encryption)

    @contextlib.contextmanager
    def _open(self, bucket: str, key: str) -> Iterator[tuple[IO[bytes], ObjectInfo]]:
        _check(bucket, key)
        with self._errors("get", bucket, key):
            response = self._client.get_object(bucket, key)
        try:
            info = self._info(bucket, key, response.headers)
            try:
                yield cast(IO[bytes], response), info
            except (MinioException, urllib3.exceptions.HTTPError) as exc:  # the body broke off mid-stream
                raise StorageError(f"read {self.describe}/{bucket}/{key} failed: {exc}") from exc
        finally:
            response.close()
            response.release_conn()

    def get_range(self, bucket: str, key: str, offset: int, length: int) -> bytes:
        _check(bucket, key)
        if offset < 0 or length < 0:
            raise ValueError("offset and length must not be negative")
        if length == 0:
            self.stat(bucket, key)
            return b""
        with self._errors("get", bucket, key):
            response = self._client.get_object(bucket, key, offset=offset, length=length)
            try:
                return response.read()
            finally:
                response.close()
                response.release_conn()

    def stat(self, bucket: str, key: str) -> ObjectInfo:
        _check(bucket, key)
        with self._errors("stat", bucket, key):
            obj = self._client.stat_object(bucket, key)
        return self._info(bucket, key, obj.metadata)

    def list(self, bucket: str, prefix: str = "") -> Iterator[ObjectInfo]:
        validate_bucket(bucket)
        # include_user_meta lets MinIO return the sha256 in the listing; other servers need a HEAD per object.
        with self._errors("list", bucket, prefix):
            for obj in self._client.list_objects(bucket, prefix=prefix or None, recursive=True, include_user_meta=True):
                key = obj.object_name
                if key is None or obj.is_dir:
                    continue
                meta = {k.lower(): v for k, v in (obj.metadata or {}).items()}
                sha256 = meta.get(f"x-amz-meta-{SHA256_META}")
                content_type = meta.get("content-type")
                if sha256 and content_type:
                    yield ObjectInfo(bucket, key, obj.size or 0, sha256.lower(), content_type, obj.last_modified)
                    continue
                try:
                    yield self.stat(bucket, key)
                except ObjectNotFound:
                    continue  # deleted between the listing and the stat

    def delete(self, bucket: str, key: str) -> None:
        _check(bucket, key)
        with self._errors("delete", bucket, key):
            try:
                self._client.remove_object(bucket, key)
            except S3Error as exc:
                if exc.code not in ("NoSuchKey", "NoSuchObject"):  # a missing bucket still raises
                    raise

    def url(self, bucket: str, key: str, expires: timedelta = timedelta(minutes=15)) -> str:
        self.stat(bucket, key)  # a presigned URL for a missing object would only fail later, elsewhere
        with self._errors("presign", bucket, key):
            return self._client.presigned_get_object(bucket, key, expires=expires)

    def ping(self) -> None:
        try:
            self._ping_client.list_buckets()
        except S3Error as exc:
            raise StorageError(f"object store {self.describe} refused the request: {exc.code}: {exc}") from exc
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise StorageError(f"object store {self.describe} is unreachable: {exc}") from exc
