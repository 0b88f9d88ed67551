"""The storage interface: the abstract store, its errors, the object info and the key and bucket rules.

Both backends (`shared.storage.s3`, `shared.storage.filesystem`) implement :class:`ObjectStore` and apply the
same validation, so code moves between them unchanged.
"""

from __future__ import annotations

import abc
import contextlib
import hashlib
import io
import os
import re
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any, BinaryIO

CHUNK_SIZE = 1024 * 1024
"""Streams are read and written in pieces of at most this size so large artifacts never sit whole in memory."""

DEFAULT_CONTENT_TYPE = "application/octet-stream"

RESERVED_PREFIX = ".fw-tmp-"
"""Names starting with this are in-flight temp files; keys may not use it so listings can skip them."""

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
    encryption: str | None = None
    """The server-side encryption the store reports for the object (`AES256` for SSE-S3, `aws:kms`), None if
    none (or a backend that has none: the file store)."""


class StorageError(Exception):
    """Base of every storage failure; the message says what failed and where."""


class ObjectNotFound(StorageError):
    """The bucket or the key does not exist."""

    def __init__(self, bucket: str, key: str, where: str) -> None:
        self.bucket = bucket
        self.key = key
        what = f"object {key!r}" if key else "bucket"
        super().__init__(f"{what} not found in bucket {bucket!r} at {where}")


class ChecksumMismatch(StorageError):
    """Bytes do not match the sha256 they should have, or carry none to check; nothing was stored or delivered.

    Named for what it is, apart from SQLAlchemy's ``IntegrityError`` (a database constraint), which the same
    modules often catch.
    """

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


class _HashingReader(io.RawIOBase):
    """Reads ``source`` for :func:`hashlib.file_digest`, copying each piece into ``copy_to`` and counting it."""

    def __init__(self, source: IO[bytes], copy_to: IO[bytes] | None) -> None:
        super().__init__()
        self._source = source
        self._copy_to = copy_to
        self.size = 0

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        chunk = self._source.read(min(len(buffer), CHUNK_SIZE))
        if not chunk:
            return 0
        if not isinstance(chunk, bytes | bytearray):
            raise TypeError("expected bytes or a binary stream; read() returned text")
        size = len(chunk)
        buffer[:size] = chunk
        if self._copy_to is not None:
            self._copy_to.write(chunk)
        self.size += size
        return size


def sha256_stream(source: IO[bytes], copy_to: IO[bytes] | None = None) -> tuple[str, int]:
    """The hex sha256 and the length of what ``source`` yields, in one pass of reads of at most CHUNK_SIZE.

    With ``copy_to`` every piece is also written there, so a copy is hashed while it streams, never read again.
    """
    reader = _HashingReader(source, copy_to)
    return hashlib.file_digest(reader, "sha256").hexdigest(), reader.size


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

        If ``expected_sha256`` is given and the bytes hash differently, raise ChecksumMismatch and store nothing.
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
        """Stream the object to ``path`` atomically; on a sha256 mismatch raise ChecksumMismatch, leave no file.

        With ``verify`` an object that carries no recorded sha256 is refused too (ChecksumMismatch): an artifact
        that cannot be checked is not trusted.

        The bytes are hashed while they stream into a temp file beside ``path``, which is renamed into place only
        once verified, so a reader never sees a partial or corrupt artifact at ``path``. Returns the object's
        info; with ``verify`` its ``sha256`` and ``size`` are those of the bytes now at ``path``, for the caller
        to compare with its own reference without reading the file again.
        """
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with self._open(bucket, key) as (stream, info):
            fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
            try:
                with os.fdopen(fd, "wb") as out:
                    sha256, size = sha256_stream(stream, out)
                if verify:
                    self._verify(info, sha256, size)
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
            raise ChecksumMismatch(
                f"cannot verify {where}: no sha256 recorded with the object",
                bucket=info.bucket,
                key=info.key,
                expected="",
                actual=actual_sha256,
            )
        if actual_sha256 != info.sha256 or actual_size != info.size:
            raise ChecksumMismatch(
                f"integrity check failed for {where}: expected sha256 {info.sha256} ({info.size} bytes), "
                f"got {actual_sha256} ({actual_size} bytes)",
                bucket=info.bucket,
                key=info.key,
                expected=info.sha256,
                actual=actual_sha256,
            )

    def _mismatch(self, bucket: str, key: str, expected: str, actual: str) -> ChecksumMismatch:
        return ChecksumMismatch(
            f"refusing to store {self.describe}/{bucket}/{key}: expected sha256 {expected}, data hashes to {actual}",
            bucket=bucket,
            key=key,
            expected=expected,
            actual=actual,
        )

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.describe}>"
