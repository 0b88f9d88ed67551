"""Object storage for Flywheel artifacts: one interface, an S3 backend and a local file backend.

Every service reads and writes artifacts (datasets, checkpoints, ONNX exports) through :class:`ObjectStore`,
so the same code runs against MinIO/S3 in a deployment and against a plain directory on a laptop.
Each object carries the sha256 of its bytes, computed while the bytes stream in, so that a download can prove
it received exactly what was written.
"""

from __future__ import annotations

import abc
import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.utils import parsedate_to_datetime
from pathlib import Path
from typing import IO, Any, BinaryIO, cast
from urllib.parse import urlsplit
from xml.etree.ElementTree import ParseError

import certifi
import urllib3
from minio import Minio
from minio.error import MinioException, S3Error
from urllib3.util import Retry, Timeout

__all__ = [
    "CHUNK_SIZE",
    "SPOOL_MAX_SIZE",
    "FileStore",
    "IntegrityError",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStore",
    "S3Store",
    "StorageError",
    "create_store",
    "open_store",
    "validate_bucket",
    "validate_key",
]

CHUNK_SIZE = 1024 * 1024
"""Streams are read and written in pieces of this size so large artifacts never sit whole in memory."""

SPOOL_MAX_SIZE = 8 * 1024 * 1024
"""S3 uploads spool through memory up to this size, then through a temp file (length and sha256 go first)."""

DEFAULT_CONTENT_TYPE = "application/octet-stream"
SHA256_META = "sha256"
"""User metadata name of the sha256 on S3 (sent as ``x-amz-meta-sha256``)."""

RESERVED_PREFIX = ".fw-tmp-"
"""Names starting with this are in-flight temp files; keys may not use it so listings can skip them."""

_NOT_FOUND_CODES = frozenset({"NoSuchKey", "NoSuchBucket", "NoSuchObject", "ResourceNotFound"})
_BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_IPV4_RE = re.compile(r"^\d+\.\d+\.\d+\.\d+$")
_MAX_KEY_BYTES = 1024
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")


# --------------------------------------------------------------------------------------------------- types


@dataclass(frozen=True)
class ObjectInfo:
    """What a store knows about one object.

    ``sha256`` is the hex digest recorded at write time ("" if the object was written by something else and
    carries none). ``last_modified`` is None where the backend does not report it (an S3 ``put``).
    """

    bucket: str
    key: str
    size: int
    sha256: str
    content_type: str
    last_modified: datetime | None


class StorageError(Exception):
    """Base of every storage failure; the message says what failed and where."""


class ObjectNotFound(StorageError):
    """The bucket or the key does not exist."""

    def __init__(self, bucket: str, key: str, where: str) -> None:
        self.bucket = bucket
        self.key = key
        what = f"object {key!r}" if key else "bucket"
        super().__init__(f"{what} not found in bucket {bucket!r} at {where}")


class IntegrityError(StorageError):
    """Bytes do not match the sha256 they should have; nothing was stored or delivered."""

    def __init__(self, message: str, *, bucket: str, key: str, expected: str, actual: str) -> None:
        self.bucket = bucket
        self.key = key
        self.expected = expected
        self.actual = actual
        super().__init__(message)


# --------------------------------------------------------------------------------------------- validation


def validate_bucket(bucket: str) -> str:
    """Check an S3-style bucket name; both backends apply the same rules so code moves between them."""
    if not isinstance(bucket, str) or not _BUCKET_RE.match(bucket) or ".." in bucket or _IPV4_RE.match(bucket):
        raise ValueError(
            f"invalid bucket name {bucket!r}: use 3-63 lowercase letters, digits, '.' or '-', "
            "starting and ending with a letter or digit"
        )
    return bucket


def validate_key(key: str) -> str:
    """Reject keys that are ambiguous on S3 or could escape the file backend's root.

    Refused: empty keys, a leading or trailing '/', empty, '.' or '..' segments, NUL, more than 1024 UTF-8
    bytes, and segments starting with the reserved temp-file prefix.
    """
    if not isinstance(key, str) or not key:
        raise ValueError("object key must be a non-empty string")
    if "\x00" in key:
        raise ValueError(f"object key {key!r} contains NUL")
    if key.startswith("/"):
        raise ValueError(f"object key {key!r} must not start with '/'")
    if len(key.encode("utf-8")) > _MAX_KEY_BYTES:
        raise ValueError(f"object key is longer than {_MAX_KEY_BYTES} bytes")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise ValueError(f"object key {key!r} has an empty, '.' or '..' path segment")
        if segment.startswith(RESERVED_PREFIX):
            raise ValueError(f"object key {key!r} uses the reserved prefix {RESERVED_PREFIX!r}")
    return key


def _check(bucket: str, key: str) -> None:
    validate_bucket(bucket)
    validate_key(key)


def _normalize_sha256(value: str | None) -> str | None:
    if value is None:
        return None
    digest = value.strip().lower()
    if not _SHA256_RE.match(digest):
        raise ValueError(f"expected_sha256 {value!r} is not a hex sha256 digest")
    return digest


def _iter_chunks(data: bytes | bytearray | memoryview | IO[bytes]) -> Iterator[bytes]:
    """Yield the input in CHUNK_SIZE pieces, whether it is bytes or a readable binary stream."""
    if isinstance(data, bytes | bytearray | memoryview):
        view = memoryview(data)
        for start in range(0, len(view), CHUNK_SIZE):
            yield bytes(view[start : start + CHUNK_SIZE])
        return
    while True:
        chunk = data.read(CHUNK_SIZE)
        if not chunk:
            return
        if not isinstance(chunk, bytes | bytearray):
            raise TypeError("put() needs bytes or a binary stream; read() returned text")
        yield bytes(chunk)


# -------------------------------------------------------------------------------------------- interface


class ObjectStore(abc.ABC):
    """The storage interface every service uses; backends differ only in where the bytes go."""

    @property
    @abc.abstractmethod
    def describe(self) -> str:
        """Where this store points, for logs and error messages (``s3://host:port`` or ``file:///path``)."""

    @abc.abstractmethod
    def ensure_buckets(self, *buckets: str) -> None:
        """Create the buckets that do not exist yet; safe to call at every start."""

    @abc.abstractmethod
    def put(
        self,
        bucket: str,
        key: str,
        data: bytes | BinaryIO,
        *,
        content_type: str = DEFAULT_CONTENT_TYPE,
        expected_sha256: str | None = None,
    ) -> ObjectInfo:
        """Store ``data`` under ``key``, streaming a file-like in 1 MiB chunks and recording its sha256.

        If ``expected_sha256`` is given and the bytes hash differently, raise IntegrityError and store nothing.
        """

    @abc.abstractmethod
    def _open(self, bucket: str, key: str) -> contextlib.AbstractContextManager[tuple[IO[bytes], ObjectInfo]]:
        """Open the object for streaming and return its info taken from the same read (no separate stat)."""

    @abc.abstractmethod
    def get_range(self, bucket: str, key: str, offset: int, length: int) -> bytes:
        """``length`` bytes from ``offset`` (one item of a packed object), without reading the rest."""

    @abc.abstractmethod
    def stat(self, bucket: str, key: str) -> ObjectInfo:
        """Info about one object, or ObjectNotFound."""

    @abc.abstractmethod
    def list(self, bucket: str, prefix: str = "") -> Iterator[ObjectInfo]:
        """All objects whose key starts with ``prefix`` (a plain string prefix), recursively, sorted by key."""

    @abc.abstractmethod
    def delete(self, bucket: str, key: str) -> None:
        """Remove an object; a missing key is not an error (a missing bucket is)."""

    @abc.abstractmethod
    def url(self, bucket: str, key: str, expires: timedelta = timedelta(minutes=15)) -> str:
        """A URL another process can fetch the object from, or ObjectNotFound."""

    @abc.abstractmethod
    def ping(self) -> None:
        """Raise StorageError quickly if the store cannot serve requests (backs ``/readyz``)."""

    @contextlib.contextmanager
    def open(self, bucket: str, key: str) -> Iterator[IO[bytes]]:
        """Yield a readable binary stream of the object; read it in chunks, it is not loaded whole."""
        with self._open(bucket, key) as (stream, _info):
            yield stream

    def get_bytes(self, bucket: str, key: str, *, verify: bool = True) -> bytes:
        """The whole object in memory, checked against its recorded sha256 unless ``verify`` is False."""
        with self._open(bucket, key) as (stream, info):
            data = stream.read()
        if verify:
            self._verify(info, hashlib.sha256(data).hexdigest(), len(data))
        return data

    def download(self, bucket: str, key: str, path: str | os.PathLike[str], *, verify: bool = True) -> ObjectInfo:
        """Stream the object to ``path`` atomically; on a sha256 mismatch raise IntegrityError, leave no file.

        With ``verify`` an object that carries no recorded sha256 is refused too (IntegrityError): an artifact
        that cannot be checked is not trusted.

        The bytes land in a temp file beside ``path`` and are renamed into place only once verified, so a
        reader never sees a partial or corrupt artifact at ``path``.
        """
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with self._open(bucket, key) as (stream, info):
            fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
            try:
                digest = hashlib.sha256()
                size = 0
                with os.fdopen(fd, "wb") as out:
                    for chunk in _iter_chunks(stream):
                        digest.update(chunk)
                        size += len(chunk)
                        out.write(chunk)
                if verify:
                    self._verify(info, digest.hexdigest(), size)
                os.replace(tmp_name, target)
            except BaseException:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(tmp_name)
                raise
        return info

    def exists(self, bucket: str, key: str) -> bool:
        """True if the object exists (a missing bucket counts as missing)."""
        try:
            self.stat(bucket, key)
        except ObjectNotFound:
            return False
        return True

    def _verify(self, info: ObjectInfo, actual_sha256: str, actual_size: int) -> None:
        where = f"{self.describe}/{info.bucket}/{info.key}"
        if not info.sha256:
            raise IntegrityError(
                f"cannot verify {where}: no sha256 recorded with the object",
                bucket=info.bucket,
                key=info.key,
                expected="",
                actual=actual_sha256,
            )
        if actual_sha256 != info.sha256 or actual_size != info.size:
            raise IntegrityError(
                f"integrity check failed for {where}: expected sha256 {info.sha256} ({info.size} bytes), "
                f"got {actual_sha256} ({actual_size} bytes)",
                bucket=info.bucket,
                key=info.key,
                expected=info.sha256,
                actual=actual_sha256,
            )

    def _mismatch(self, bucket: str, key: str, expected: str, actual: str) -> IntegrityError:
        return IntegrityError(
            f"refusing to store {self.describe}/{bucket}/{key}: expected sha256 {expected}, data hashes to {actual}",
            bucket=bucket,
            key=key,
            expected=expected,
            actual=actual,
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe}>"


# ----------------------------------------------------------------------------------------------- S3


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
    ) -> None:
        self._endpoint = endpoint
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
                digest = hashlib.sha256()
                size = 0
                for chunk in _iter_chunks(data):
                    digest.update(chunk)
                    size += len(chunk)
                    body.write(chunk)
                sha256 = digest.hexdigest()
                body.seek(0)
            if expected is not None and expected != sha256:
                raise self._mismatch(bucket, key, expected, sha256)
            with self._errors("put", bucket, key):
                self._client.put_object(
                    bucket,
                    key,
                    cast(BinaryIO, body),
                    size,
                    content_type=content_type,
                    metadata={SHA256_META: sha256},
                    num_parallel_uploads=1,  # one part in memory at a time
                )
        return ObjectInfo(bucket, key, size, sha256, content_type, None)

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


# --------------------------------------------------------------------------------------------- file


class FileStore(ObjectStore):
    """Local backend: ``<root>/<bucket>/<key>`` holds the bytes, durable on disk.

    Metadata (sha256, size, content type) lives in a sidecar tree ``<root>/.meta/<bucket>/<key>.json`` that
    listings never see. Writes go to a temp file in the target directory, are fsynced and renamed into place;
    the data and sidecar renames happen under a per-bucket ``flock`` so readers and concurrent writers (other
    processes included) always see a matching pair. Bucket names cannot start with '.', so ``.meta`` and
    ``.locks`` never collide with a bucket. A key cannot be both an object and a prefix of another key here
    (``a`` and ``a/b``); that conflict raises StorageError.
    """

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self._root = Path(root).expanduser().resolve()

    @property
    def root(self) -> Path:
        return self._root

    @property
    def describe(self) -> str:
        return self._root.as_uri()

    # ---- paths and locking

    def _bucket_dir(self, bucket: str) -> Path:
        return self._root / validate_bucket(bucket)

    def path_for(self, bucket: str, key: str) -> Path:
        """The file holding the object's bytes (it may not exist); never outside the bucket directory."""
        validate_key(key)
        base = self._bucket_dir(bucket)
        path = base.joinpath(*key.split("/"))
        if os.path.commonpath([base, os.path.normpath(path)]) != str(base):  # belt and braces
            raise ValueError(f"object key {key!r} escapes the bucket directory")
        return path

    def _meta_path(self, bucket: str, key: str) -> Path:
        parts = key.split("/")
        return self._root.joinpath(".meta", bucket, *parts[:-1], parts[-1] + ".json")

    def _require_bucket(self, bucket: str, key: str = "") -> Path:
        base = self._bucket_dir(bucket)
        if not base.is_dir():
            raise ObjectNotFound(bucket, key, self.describe)
        return base

    @contextlib.contextmanager
    def _lock(self, bucket: str, *, exclusive: bool) -> Iterator[None]:
        lock_dir = self._root / ".locks"
        lock_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(lock_dir / bucket, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield
        finally:
            os.close(fd)  # closing releases the lock

    @contextlib.contextmanager
    def _errors(self, action: str, bucket: str, key: str) -> Iterator[None]:
        try:
            yield
        except (StorageError, ValueError):
            raise
        except (IsADirectoryError, NotADirectoryError, FileExistsError) as exc:
            raise StorageError(
                f"{action} {self.describe}/{bucket}/{key} failed: the key collides with an existing object "
                f"or prefix (the file backend cannot hold both 'a' and 'a/b'): {exc}"
            ) from exc
        except OSError as exc:
            raise StorageError(f"{action} {self.describe}/{bucket}/{key} failed: {exc}") from exc

    @staticmethod
    def _fsync_dir(path: Path) -> None:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    @staticmethod
    def _temp_in(directory: Path) -> tuple[int, str]:
        """A temp file in ``directory``; retried because a concurrent delete may prune the empty directory."""
        for attempt in range(5):
            directory.mkdir(parents=True, exist_ok=True)
            try:
                return tempfile.mkstemp(prefix=RESERVED_PREFIX, dir=directory)
            except FileNotFoundError:
                if attempt == 4:
                    raise
        raise AssertionError("unreachable")

    # ---- metadata

    def _read_info(self, bucket: str, key: str, stream: IO[bytes]) -> ObjectInfo:
        """Build info from an open data file and its sidecar; call under the bucket lock."""
        st = os.fstat(stream.fileno())
        meta: dict[str, Any] = {}
        with contextlib.suppress(FileNotFoundError, ValueError):
            meta = json.loads(self._meta_path(bucket, key).read_text("utf-8"))
        sha256 = str(meta.get("sha256") or "")
        if not sha256:  # a file dropped in by hand: hash it so verification still works
            digest = hashlib.sha256()
            for chunk in _iter_chunks(stream):
                digest.update(chunk)
            stream.seek(0)
            sha256 = digest.hexdigest()
        return ObjectInfo(
            bucket=bucket,
            key=key,
            size=st.st_size,
            sha256=sha256,
            content_type=str(meta.get("content_type") or DEFAULT_CONTENT_TYPE),
            last_modified=datetime.fromtimestamp(st.st_mtime, tz=UTC),
        )

    # ---- interface

    def ensure_buckets(self, *buckets: str) -> None:
        for bucket in buckets:
            with self._errors("create bucket", bucket, ""):
                self._bucket_dir(bucket).mkdir(parents=True, exist_ok=True)

    def put(
        self,
        bucket: str,
        key: str,
        data: bytes | BinaryIO,
        *,
        content_type: str = DEFAULT_CONTENT_TYPE,
        expected_sha256: str | None = None,
    ) -> ObjectInfo:
        target = self.path_for(bucket, key)
        expected = _normalize_sha256(expected_sha256)
        self._require_bucket(bucket, key)
        meta_path = self._meta_path(bucket, key)
        temps: list[str] = []
        with self._errors("put", bucket, key):
            try:
                fd, data_tmp = self._temp_in(target.parent)
                temps.append(data_tmp)
                digest = hashlib.sha256()
                size = 0
                with os.fdopen(fd, "wb") as out:
                    for chunk in _iter_chunks(data):
                        digest.update(chunk)
                        size += len(chunk)
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                sha256 = digest.hexdigest()
                if expected is not None and expected != sha256:
                    raise self._mismatch(bucket, key, expected, sha256)

                fd, meta_tmp = self._temp_in(meta_path.parent)
                temps.append(meta_tmp)
                with os.fdopen(fd, "w", encoding="utf-8") as out:
                    json.dump({"sha256": sha256, "size": size, "content_type": content_type}, out)
                    out.flush()
                    os.fsync(out.fileno())

                with self._lock(bucket, exclusive=True):
                    os.replace(data_tmp, target)
                    os.replace(meta_tmp, meta_path)
                    temps.clear()
                    mtime = os.stat(target).st_mtime
                self._fsync_dir(target.parent)
                self._fsync_dir(meta_path.parent)
            finally:
                for name in temps:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(name)
        return ObjectInfo(bucket, key, size, sha256, content_type, datetime.fromtimestamp(mtime, tz=UTC))

    @contextlib.contextmanager
    def _open(self, bucket: str, key: str) -> Iterator[tuple[IO[bytes], ObjectInfo]]:
        path = self.path_for(bucket, key)
        self._require_bucket(bucket, key)
        with self._errors("get", bucket, key):
            with self._lock(bucket, exclusive=False):
                try:
                    stream = open(path, "rb")  # noqa: SIM115 - closed below, after the caller is done
                except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
                    raise ObjectNotFound(bucket, key, self.describe) from exc
                try:
                    info = self._read_info(bucket, key, stream)
                except BaseException:
                    stream.close()
                    raise
            with stream:
                yield stream, info

    def get_range(self, bucket: str, key: str, offset: int, length: int) -> bytes:
        if offset < 0 or length < 0:
            raise ValueError("offset and length must not be negative")
        with self._open(bucket, key) as (stream, _info):
            stream.seek(offset)
            return stream.read(length)

    def stat(self, bucket: str, key: str) -> ObjectInfo:
        with self._open(bucket, key) as (_stream, info):
            return info

    def list(self, bucket: str, prefix: str = "") -> Iterator[ObjectInfo]:
        base = self._require_bucket(bucket)
        if "\x00" in prefix:
            raise ValueError("prefix contains NUL")
        # Walk only the directory the prefix pins down; the rest of the prefix filters names.
        start = base
        for part in prefix.split("/")[:-1]:
            if part in ("", ".", ".."):
                return
            start = start / part
        keys: list[str] = []
        with self._errors("list", bucket, prefix):
            for dirpath, dirnames, filenames in os.walk(start):
                dirnames[:] = [d for d in dirnames if not d.startswith(RESERVED_PREFIX)]
                rel = Path(dirpath).relative_to(base).as_posix()
                for name in filenames:
                    if name.startswith(RESERVED_PREFIX):
                        continue
                    key = name if rel == "." else f"{rel}/{name}"
                    if key.startswith(prefix):
                        keys.append(key)
        for key in sorted(keys):
            try:
                yield self.stat(bucket, key)
            except ObjectNotFound:
                continue  # deleted while we were listing

    def delete(self, bucket: str, key: str) -> None:
        path = self.path_for(bucket, key)
        base = self._require_bucket(bucket, key)
        meta_path = self._meta_path(bucket, key)
        with self._errors("delete", bucket, key), self._lock(bucket, exclusive=True):
            for victim in (path, meta_path):
                with contextlib.suppress(FileNotFoundError, NotADirectoryError, IsADirectoryError):
                    os.unlink(victim)
            # Prune emptied directories so a later put of a key equal to the old prefix can succeed.
            for leaf, stop in ((path.parent, base), (meta_path.parent, self._root / ".meta" / bucket)):
                while leaf != stop and stop in leaf.parents:
                    try:
                        leaf.rmdir()
                    except OSError as exc:
                        if exc.errno in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
                            break
                        raise
                    leaf = leaf.parent

    def url(self, bucket: str, key: str, expires: timedelta = timedelta(minutes=15)) -> str:
        """A ``file://`` URL of the object's bytes; ``expires`` has no meaning for local files."""
        self.stat(bucket, key)
        return self.path_for(bucket, key).as_uri()

    def ping(self) -> None:
        if not self._root.is_dir():
            raise StorageError(f"object store {self.describe} is not a directory")
        if not os.access(self._root, os.R_OK | os.W_OK | os.X_OK):
            raise StorageError(f"object store {self.describe} is not readable and writable")


# ------------------------------------------------------------------------------------------- factory


def _parse_endpoint(endpoint: str, secure: bool) -> tuple[str, bool]:
    """Accept ``host:port`` or ``http(s)://host:port``; a scheme, when given, decides TLS."""
    endpoint = endpoint.strip()
    if "://" not in endpoint:
        return endpoint.rstrip("/"), secure
    parts = urlsplit(endpoint)
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"S3 endpoint {endpoint!r} must be host:port or an http(s):// URL")
    if parts.path not in ("", "/") or parts.query or not parts.netloc:
        raise ValueError(f"S3 endpoint {endpoint!r} must not carry a path or query")
    return parts.netloc, parts.scheme == "https"


def create_store(
    *,
    s3_endpoint: str | None,
    s3_access_key: str,
    s3_secret_key: str,
    s3_secure: bool,
    s3_region: str,
    file_root: Path,
) -> ObjectStore:
    """The S3 backend when ``s3_endpoint`` is set, else the file backend rooted at ``file_root``."""
    if s3_endpoint:
        host, secure = _parse_endpoint(s3_endpoint, s3_secure)
        return S3Store(host, s3_access_key, s3_secret_key, secure=secure, region=s3_region or "us-east-1")
    return FileStore(file_root)


def open_store(
    target: str | os.PathLike[str] | Any,
    *,
    access_key: str = "",
    secret_key: str = "",
    region: str = "us-east-1",
) -> ObjectStore:
    """Open a store from a URL or path, or from a settings object.

    Strings: ``file:///dir`` or a plain path -> FileStore; ``s3://host:port`` or ``http://host:port`` ->
    S3Store over HTTP; ``s3+https://host:port`` or ``https://host:port`` -> S3Store over TLS.
    Anything else is read like settings: attributes ``s3_endpoint``, ``s3_access_key``, ``s3_secret_key``,
    ``s3_secure``, ``s3_region`` and ``file_root``, passed to :func:`create_store`.
    """
    if isinstance(target, os.PathLike):
        return FileStore(target)
    if isinstance(target, str):
        parts = urlsplit(target)
        scheme = parts.scheme.lower()
        if scheme in ("", "file"):
            return FileStore(parts.path if scheme else target)
        secure = {"s3": False, "http": False, "s3+https": True, "https": True}.get(scheme)
        if secure is None:
            raise ValueError(f"unsupported store URL {target!r}")
        if not parts.netloc or parts.path not in ("", "/"):
            raise ValueError(f"store URL {target!r} must be scheme://host:port")
        return S3Store(parts.netloc, access_key, secret_key, secure=secure, region=region)
    return create_store(
        s3_endpoint=getattr(target, "s3_endpoint", None),
        s3_access_key=getattr(target, "s3_access_key", ""),
        s3_secret_key=getattr(target, "s3_secret_key", ""),
        s3_secure=bool(getattr(target, "s3_secure", False)),
        s3_region=getattr(target, "s3_region", "us-east-1"),
        file_root=Path(target.file_root),
    )
