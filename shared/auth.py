"""Credentials: partner API keys (owned by ingestion, stored hashed) and the internal operator token.

Every service verifies a partner key through `KeyVerifier`: ingestion looks it up in its own database,
the others ask ingestion over HTTP and cache the answer for `KEY_CACHE_SECONDS` (30 s by default), so a
revoked key stops working everywhere within that time.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any

import requests
from flask import current_app, g, request
from marshmallow import validate

from shared.errors import BadRequest, ServiceUnavailable, Unauthorized
from shared.logging import get_logger, log_context

log = get_logger(__name__)

KEY_PREFIX = "fwk_"
NEGATIVE_CACHE_SECONDS = 5.0
TENANT_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}\Z"  # \Z: "$" would let a trailing newline through
TENANT_ERROR = "a tenant id: 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
TENANT_ID = validate.Regexp(TENANT_PATTERN, error=TENANT_ERROR)
"""Every tenant id a caller names (the internal token acting for a tenant) is checked against this before it
reaches a query or an object key: partner ids (`ptn_…`) match it, and nothing that could upset a storage
key or an S3 XML answer does."""


@dataclass(frozen=True)
class Principal:
    tenant: str
    key_id: str | None = None
    internal: bool = False


INTERNAL = Principal(tenant="*", internal=True)


def generate_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    """Keys are 256-bit random tokens, so one SHA-256 is a sound at-rest hash (no dictionary to guess from)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_internal_token() -> str:
    return secrets.token_urlsafe(32)


KeyLookup = Callable[[str], Principal | None]


class KeyVerifier:
    """Resolves a presented key to its principal, with a short time-to-live cache per key hash."""

    def __init__(self, lookup: KeyLookup, ttl_seconds: float) -> None:
        self.lookup = lookup
        self.ttl = ttl_seconds
        self._cache: dict[str, tuple[Principal | None, float]] = {}
        self._lock = threading.Lock()

    def verify(self, key: str) -> Principal:
        digest = hash_api_key(key)
        now = time.monotonic()
        with self._lock:
            cached = self._cache.get(digest)
        if cached is not None and cached[1] > now:
            principal = cached[0]
        else:
            principal = self.lookup(digest)
            ttl = self.ttl if principal is not None else min(self.ttl, NEGATIVE_CACHE_SECONDS)
            with self._lock:
                if len(self._cache) > 100_000:
                    self._cache.clear()
                self._cache[digest] = (principal, now + ttl)
        if principal is None:
            raise Unauthorized("invalid or revoked API key")
        return principal

    def forget(self, key_hash: str) -> None:
        with self._lock:
            self._cache.pop(key_hash, None)


class HttpKeyLookup:
    """Asks the ingestion service, which owns partners and keys, who a key hash belongs to."""

    def __init__(self, ingestion_url: str, internal_token: str, timeout: float = 3.0) -> None:
        self.url = ingestion_url.rstrip("/") + "/v1/internal/keys/verify"
        self.internal_token = internal_token
        self.timeout = timeout
        self.session = requests.Session()

    def __call__(self, key_hash: str) -> Principal | None:
        try:
            response = self.session.post(
                self.url,
                json={"key_hash": key_hash},
                headers={"Authorization": f"Bearer {self.internal_token}"},
                timeout=self.timeout,
            )
        except requests.RequestException as exc:
            raise ServiceUnavailable("cannot verify the API key: the ingestion service does not answer") from exc
        if response.status_code == 404:
            return None
        if response.status_code != 200:
            raise ServiceUnavailable(f"cannot verify the API key: ingestion answered {response.status_code}")
        body = response.json()
        return Principal(tenant=body["tenant"], key_id=body["key_id"])


def _bearer() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return request.headers.get("X-API-Key") or None


def _is_internal(presented: str) -> bool:
    token = current_app.extensions["flywheel"].settings.internal_token
    return bool(token) and hmac.compare_digest(presented.encode(), token.encode())


TENANT_HEADER = "X-Flywheel-Tenant"


def authenticate(*, partner: bool, internal: bool, delegated: bool = False) -> Principal:
    presented = _bearer()
    if presented is None:
        raise Unauthorized("missing credentials: send 'Authorization: Bearer <key>'")
    if delegated and _is_internal(presented):
        tenant = (request.headers.get(TENANT_HEADER) or "").strip()
        if not tenant:
            raise Unauthorized(f"the internal token acts for a tenant here: send the {TENANT_HEADER} header")
        if not re.match(TENANT_PATTERN, tenant):
            raise BadRequest(f"{TENANT_HEADER} must be {TENANT_ERROR}")
        return Principal(tenant=tenant, internal=True)
    if internal and _is_internal(presented):
        return INTERNAL
    if partner and presented.startswith(KEY_PREFIX):
        return current_app.extensions["flywheel"].keys.verify(presented)
    raise Unauthorized("this endpoint needs the internal token" if not partner else "invalid credentials")


def _guard(
    *, partner: bool, internal: bool, delegated: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorator(view: Callable[..., Any]) -> Callable[..., Any]:
        @wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            principal = authenticate(partner=partner, internal=internal, delegated=delegated)
            g.principal = principal
            with log_context(tenant=principal.tenant if principal.tenant != "*" else None):
                return view(*args, **kwargs)

        wrapper._flywheel_auth = {  # type: ignore[attr-defined]
            "partner": partner,
            "internal": internal or delegated,
        }
        return wrapper

    return decorator


require_partner = _guard(partner=True, internal=False)
require_internal = _guard(partner=False, internal=True)
require_partner_or_internal = _guard(partner=True, internal=True)
# A partner, or another service acting for one: the internal token plus the X-Flywheel-Tenant header (labeling
# asking inference for pre-labels of a tenant's items). The view sees that tenant as the principal's.
require_partner_or_delegated = _guard(partner=True, internal=False, delegated=True)


def current_principal() -> Principal:
    return g.principal
