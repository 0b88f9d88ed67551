"""Object storage for Flywheel artifacts: one interface, an S3 backend and a local file backend.

Every service reads and writes artifacts (datasets, checkpoints, ONNX exports) through :class:`ObjectStore`,
so the same code runs against MinIO/S3 in a deployment and against a plain directory on a laptop.
Each object carries the sha256 of its bytes, computed while the bytes stream in, so that a download can prove
it received exactly what was written.

The package: `interface` (the abstract store, its errors, `ObjectInfo`, the key and bucket rules), `s3` (MinIO
and S3 through the minio SDK), `filesystem` (a local directory, `file://`) and `factory` (`create_store` from
the settings, `open_store` from a URL). Import from `shared.storage`, which re-exports the public names.
"""

from shared.storage.factory import create_store, open_store
from shared.storage.filesystem import FileStore
from shared.storage.interface import (
    CHUNK_SIZE,
    ChecksumMismatch,
    ObjectInfo,
    ObjectNotFound,
    ObjectStore,
    StorageError,
    sha256_stream,
    validate_bucket,
    validate_key,
)
from shared.storage.s3 import SPOOL_MAX_SIZE, S3Store

__all__ = [
    "CHUNK_SIZE",
    "SPOOL_MAX_SIZE",
    "ChecksumMismatch",
    "FileStore",
    "ObjectInfo",
    "ObjectNotFound",
    "ObjectStore",
    "S3Store",
    "StorageError",
    "create_store",
    "open_store",
    "sha256_stream",
    "validate_bucket",
    "validate_key",
]
