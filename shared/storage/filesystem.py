"""The local backend: a directory tree on disk, reached as ``file://``."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any, BinaryIO

from shared.storage.interface import (
    DEFAULT_CONTENT_TYPE,
    RESERVED_PREFIX,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    StorageError,
    _normalize_sha256,
    sha256_stream,
    validate_bucket,
    validate_key,
)


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
            sha256 = hashlib.file_digest(stream, "sha256").hexdigest()
            stream.seek(0)
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
                source = io.BytesIO(data) if isinstance(data, bytes | bytearray | memoryview) else data
                with os.fdopen(fd, "wb") as out:
                    sha256, size = sha256_stream(source, out)
                    out.flush()
                    os.fsync(out.fileno())
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
