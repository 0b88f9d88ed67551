"""Choosing and building a store: from the settings (`create_store`) or from a URL (`open_store`)."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from shared.storage.filesystem import FileStore
from shared.storage.interface import ObjectStore
from shared.storage.s3 import S3Store


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
    s3_server_side_encryption: bool = False,
) -> ObjectStore:
    """The S3 backend when ``s3_endpoint`` is set, else the file backend rooted at ``file_root``.

    ``s3_server_side_encryption`` writes every S3 object with SSE-S3; the file backend has no such thing (its
    directory is as protected as the disk it is on), so it is ignored there."""
    if s3_endpoint:
        host, secure = _parse_endpoint(s3_endpoint, s3_secure)
        return S3Store(
            host,
            s3_access_key,
            s3_secret_key,
            secure=secure,
            region=s3_region or "us-east-1",
            server_side_encryption=s3_server_side_encryption,
        )
    return FileStore(file_root)


def open_store(target: str, *, access_key: str = "", secret_key: str = "", region: str = "us-east-1") -> ObjectStore:
    """Open a store from a URL or a path.

    ``file:///dir`` or a plain path -> FileStore; ``s3://host:port`` or ``http://host:port`` -> S3Store over
    HTTP; ``s3+https://host:port`` or ``https://host:port`` -> S3Store over TLS.
    """
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
