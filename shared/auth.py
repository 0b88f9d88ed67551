"""Credentials: partner API keys (owned by ingestion, stored hashed) and the internal operator token.

Every service verifies a partner key through `KeyVerifier`: ingestion looks it up in its own database,
the others ask ingestion over HTTP (through the one service-to-service client, `shared.client.ServiceClient`) and
cache the answer for `KEY_CACHE_SECONDS` (30 s by default), so a revoked key stops working everywhere within that
time. An unknown key is remembered for `NEGATIVE_CACHE_SECONDS` at most, so a key issued a moment ago works soon.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from functools import wraps
from typing import Any

import requests
from cachetools import TTLCache
from flask import current_app, g, request
from marshmallow import validate

from shared.client.http import ApiError, ServiceClient
from shared.errors import BadRequest, ServiceUnavailable, Unauthorized
from shared.logging import get_logger, log_context

log = get_logger(__name__)

KEY_PREFIX = "fwk_"
NEGATIVE_CACHE_SECONDS = 5.0
MAX_CACHED_KEYS = 100_000
"""Per cache (known keys, unknown keys): beyond it the least recently used entry makes room."""
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
        self._known: TTLCache[str, Principal] = TTLCache(maxsize=MAX_CACHED_KEYS, ttl=ttl_seconds)
        self._unknown: TTLCache[str, bool] = TTLCache(
            maxsize=MAX_CACHED_KEYS, ttl=min(ttl_seconds, NEGATIVE_CACHE_SECONDS)
        )
        self._lock = threading.Lock()  # a TTLCache is not thread-safe; the lookup itself runs outside the lock

    def verify(self, key: str) -> Principal:
        digest = hash_api_key(key)
        with self._lock:
            principal = self._known.get(digest)
            unknown = principal is None and digest in self._unknown
        if principal is None and not unknown:
            principal = self.lookup(digest)
            with self._lock:
                if principal is not None:
                    self._known[digest] = principal
                else:
                    self._unknown[digest] = True
        if principal is None:
            raise Unauthorized("invalid or revoked API key")
        return principal

    def forget(self, key_hash: str) -> None:
        with self._lock:
            self._known.pop(key_hash, None)
            self._unknown.pop(key_hash, None)


VERIFY_KEY_PATH = "/v1/internal/keys/verify"


class HttpKeyLookup:
    """Asks the ingestion service, which owns partners and keys, who a key hash belongs to."""

    def __init__(self, ingestion_url: str, internal_token: str, timeout: float = 3.0) -> None:
        self.client = ServiceClient(ingestion_url, internal_token, timeout=timeout)

    def __call__(self, key_hash: str) -> Principal | None:
        try:
            # A POST that only reads: safe to resend on a fresh connection.
            body = self.client.post(VERIFY_KEY_PATH, json={"key_hash": key_hash}, idempotent=True)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise ServiceUnavailable(f"cannot verify the API key: ingestion answered {exc.status}") from exc
        except requests.RequestException as exc:
            raise ServiceUnavailable("cannot verify the API key: the ingestion service does not answer") from exc
        if not isinstance(body, dict):
            raise ServiceUnavailable("cannot verify the API key: ingestion answered something other than an object")
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
