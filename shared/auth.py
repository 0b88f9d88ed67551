"""Credentials: partner API keys (owned by ingestion, stored hashed) and the internal operator token.

Every service verifies a partner key through `KeyVerifier`: ingestion looks it up in its own database,
the others ask ingestion over HTTP (through the one service-to-service client, `shared.client.ServiceClient`) and
cache the answer for `KEY_CACHE_SECONDS` (30 s by default), so a revoked key stops working everywhere within that
time. An unknown key is remembered for `NEGATIVE_CACHE_SECONDS` at most, so a key issued a moment ago works soon.

A key carries scopes (`SCOPES`) and may expire: both travel with the verified principal, so the cache never
outlives an expiry (it is checked on every request) and every route checks the scope it declares with
`requires_scope` (a partner route that declares none needs `admin`). The internal token is compared as a SHA-256
digest (`FLYWHEEL_INTERNAL_TOKEN_SHA256`, or the digest of `FLYWHEEL_INTERNAL_TOKEN`); docs/security.md has the
scope of every route.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from functools import wraps
from typing import Any

import requests
from cachetools import TTLCache
from flask import current_app, g, request
from marshmallow import validate

from shared.client.http import ApiError, ServiceClient
from shared.errors import BadRequest, Forbidden, ServiceUnavailable, Unauthorized
from shared.logging import get_logger, log_context
from shared.schemas import ErrorSchema

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


SCOPES = ("push", "label", "predict", "read", "admin")
"""What a partner key may do: `push` data, `label` (resolve tasks), `predict`, `read` what is theirs, `admin`
(change datasets, settings, policies; erase). A key is issued with all of them unless it names fewer."""
ALL_SCOPES = frozenset(SCOPES)
DEFAULT_SCOPE = "admin"
"""The scope a partner route needs when it declares none: the most restrictive, so an undeclared route fails closed."""


@dataclass(frozen=True)
class Principal:
    tenant: str
    key_id: str | None = None
    internal: bool = False
    scopes: frozenset[str] = ALL_SCOPES
    expires_at: datetime | None = None

    def expired(self, now: datetime | None = None) -> bool:
        return self.expires_at is not None and self.expires_at <= (now or datetime.now(UTC))


def normalise_scopes(scopes: Iterable[str] | None) -> frozenset[str]:
    """A key's stored scopes; None (a key issued before scopes existed) means every scope."""
    return ALL_SCOPES if scopes is None else frozenset(scopes) & ALL_SCOPES


INTERNAL = Principal(tenant="*", internal=True)


def generate_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    """Keys are 256-bit random tokens, so one SHA-256 is a sound at-rest hash (no dictionary to guess from)."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def generate_internal_token() -> str:
    return secrets.token_urlsafe(32)


def hash_internal_token(token: str) -> str:
    """The digest services compare a presented operator token against (a random 256-bit token: one SHA-256)."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def internal_token_digest(settings: Any) -> str:
    """FLYWHEEL_INTERNAL_TOKEN_SHA256 if configured, else the digest of FLYWHEEL_INTERNAL_TOKEN; empty: none."""
    configured = (getattr(settings, "internal_token_sha256", "") or "").strip().lower()
    if configured:
        return configured
    return hash_internal_token(settings.internal_token) if settings.internal_token else ""


KeyLookup = Callable[[str], Principal | None]
Headers = Mapping[str, str]
"""A request's headers: anything with a case-insensitive `get` (werkzeug's `Headers`, `EnvironHeaders`)."""


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
        expires = principal.expires_at
        if expires is not None and principal.expired():
            log.info("api_key_expired_refused", key_id=principal.key_id, expired_at=expires.isoformat())
            raise Unauthorized(
                f"this API key expired at {expires.isoformat()}; ask for a new one",
                {"key_id": principal.key_id, "expired_at": expires.isoformat()},
                code="key_expired",
            )
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
        return principal_from_verification(body)


def principal_from_verification(body: dict[str, Any]) -> Principal:
    """The principal in ingestion's answer to a key check (an older ingestion sends no scopes: all of them)."""
    expires = body.get("expires_at")
    return Principal(
        tenant=body["tenant"],
        key_id=body["key_id"],
        scopes=normalise_scopes(body.get("scopes")),
        expires_at=datetime.fromisoformat(expires) if expires else None,
    )


def _bearer(headers: Headers) -> str | None:
    header = headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return headers.get("X-API-Key") or None


def _is_internal(runtime: Any, presented: str) -> bool:
    expected = internal_token_digest(runtime.settings)
    return bool(expected) and hmac.compare_digest(hash_internal_token(presented).encode(), expected.encode())


TENANT_HEADER = "X-Flywheel-Tenant"


def authenticate(
    *, partner: bool, internal: bool, delegated: bool = False, headers: Headers | None = None, runtime: Any = None
) -> Principal:
    """The caller's principal from its request's headers (the current Flask request's, unless given) and the
    service's runtime (the current app's, unless given)."""
    headers = request.headers if headers is None else headers
    runtime = current_app.extensions["flywheel"] if runtime is None else runtime
    presented = _bearer(headers)
    if presented is None:
        raise Unauthorized("missing credentials: send 'Authorization: Bearer <key>'")
    if delegated and _is_internal(runtime, presented):
        tenant = (headers.get(TENANT_HEADER) or "").strip()
        if not tenant:
            raise Unauthorized(f"the internal token acts for a tenant here: send the {TENANT_HEADER} header")
        if not re.match(TENANT_PATTERN, tenant):
            raise BadRequest(f"{TENANT_HEADER} must be {TENANT_ERROR}")
        return Principal(tenant=tenant, internal=True)
    if internal and _is_internal(runtime, presented):
        return INTERNAL
    if partner and presented.startswith(KEY_PREFIX):
        return runtime.keys.verify(presented)
    raise Unauthorized("this endpoint needs the internal token" if not partner else "invalid credentials")


def check_scope(principal: Principal, scope: str) -> None:
    """A partner key without `scope` is refused (403, naming it); the internal token has every scope."""
    if principal.internal or scope in principal.scopes:
        return
    log.info("api_key_scope_refused", key_id=principal.key_id, missing_scope=scope)
    raise Forbidden(
        f"this API key lacks the '{scope}' scope this endpoint needs",
        {"missing_scope": scope, "key_scopes": sorted(principal.scopes), "key_id": principal.key_id},
        code="missing_scope",
    )


@contextmanager
def scoped(principal: Principal, scope: str | None) -> Iterator[None]:
    """The work a principal does on a route: its tenant bound to every log line inside, once its key is known to
    hold the route's scope (None: a route that checks none)."""
    with log_context(tenant=principal.tenant if principal.tenant != "*" else None):
        if scope is not None:
            check_scope(principal, scope)
        yield


def requires_scope(scope: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Declares the scope a partner key needs for a route; put it right under the `require_*` guard, which checks
    it before anything else runs (arguments are parsed after it)."""
    if scope not in ALL_SCOPES:
        raise ValueError(f"unknown scope {scope!r}; scopes are {SCOPES}")

    def decorator(view: Callable[..., Any]) -> Callable[..., Any]:
        view._flywheel_scope = scope  # type: ignore[attr-defined]
        return view

    return decorator


FORBIDDEN_RESPONSE = {"description": "The API key lacks the scope this endpoint needs (`details.missing_scope`)."}


def _guard(
    *, partner: bool, internal: bool, delegated: bool = False
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    def decorator(view: Callable[..., Any]) -> Callable[..., Any]:
        scope = getattr(view, "_flywheel_scope", DEFAULT_SCOPE) if partner else None

        @wraps(view)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            principal = authenticate(partner=partner, internal=internal, delegated=delegated)
            g.principal = principal
            with scoped(principal, scope):
                return view(*args, **kwargs)

        wrapper._flywheel_auth = {  # type: ignore[attr-defined]
            "partner": partner,
            "internal": internal or delegated,
            "delegated": delegated,
            "scope": scope,
        }
        if scope is not None:
            _document_forbidden(wrapper)
        return wrapper

    return decorator


def _document_forbidden(view: Callable[..., Any]) -> None:
    """Adds the 403 answer to the operation's OpenAPI document (flask-smorest reads `_apidoc`)."""
    doc = dict(getattr(view, "_apidoc", {}))
    response = dict(doc.get("response", {}))
    responses = dict(response.get("responses", {}))
    if 403 not in responses:
        responses[403] = [{**FORBIDDEN_RESPONSE, "schema": ErrorSchema, "content_type": None}]
    doc["response"] = {**response, "responses": responses}
    view._apidoc = doc  # type: ignore[attr-defined]


require_partner = _guard(partner=True, internal=False)
require_internal = _guard(partner=False, internal=True)
require_partner_or_internal = _guard(partner=True, internal=True)
# A partner, or another service acting for one: the internal token plus the X-Flywheel-Tenant header (labeling
# asking inference for pre-labels of a tenant's items). The view sees that tenant as the principal's.
require_partner_or_delegated = _guard(partner=True, internal=False, delegated=True)


def current_principal() -> Principal:
    return g.principal
