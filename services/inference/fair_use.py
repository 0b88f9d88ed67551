"""Fair use on the prediction path: per-key and per-tenant rate limits, and monthly quotas on predictions.

A partner's request, before any work: one token from its API key's bucket and its tenant's (a token bucket in
Redis, `shared.ratelimit`, shared by every replica), then, if the tenant has monthly quotas on
`prediction_requests` or `prediction_rows`, a reservation of the request (1) and its rows against them. A refusal
is a 429 (`rate_limited` with Retry-After, or `quota_exhausted` naming the meter) and nothing is inferred,
logged or metered; a request that fails after its reservation gives it back.

The limits are the tenant's settings, kept by ingestion (`GET /v1/internal/tenants/{tenant}/limits`), cached
here for KEY_CACHE_SECONDS like a verified key. When ingestion cannot say, the deployment's defaults
(RATE_LIMIT_INFERENCE_*) apply and no quota is enforced until it can: serving goes on.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from cachetools import TTLCache
from flask import request

from shared.auth import Principal
from shared.client.http import ServiceClient
from shared.logging import get_logger
from shared.ratelimit import Bucket, QuotaCounter, RateLimiter
from shared.runtime import Runtime

log = get_logger(__name__)

QUOTA_METERS = ("prediction_requests", "prediction_rows")
INPUT_FIELDS = ("texts", "images", "references", "inputs")


@dataclass(frozen=True)
class TenantLimits:
    per_key: float
    per_tenant: float
    quotas: dict[str, int] = field(default_factory=dict)


@dataclass
class Reservation:
    """What a request reserved of its tenant's monthly quotas; `release` gives it back if the work failed."""

    counter: QuotaCounter | None = None
    tenant: str = ""
    taken: dict[str, int] = field(default_factory=dict)

    def release(self) -> None:
        if self.counter is not None and self.taken:
            self.counter.release(self.tenant, self.taken)
            self.taken = {}


class FairUse:
    def __init__(self, runtime: Runtime) -> None:
        settings = runtime.settings
        self.defaults = TenantLimits(settings.rate_limit_inference_per_key, settings.rate_limit_inference_per_tenant)
        self.limiter = RateLimiter(runtime.redis, runtime.service)
        self.quotas = QuotaCounter(runtime.redis, runtime.service)
        self.client = ServiceClient(settings.ingestion_url, settings.internal_token, timeout=2.0)
        self._cache: TTLCache[str, TenantLimits] = TTLCache(maxsize=100_000, ttl=max(1.0, settings.key_cache_seconds))
        self._lock = threading.Lock()
        self._fetching = threading.Lock()

    def limits(self, tenant: str) -> TenantLimits:
        with self._lock:
            known = self._cache.get(tenant)
        if known is not None:
            return known
        with self._fetching:  # one fetch at a time: the requests that arrive meanwhile wait for its answer
            with self._lock:
                known = self._cache.get(tenant)
            if known is not None:
                return known
            return self._fetch(tenant)

    def _fetch(self, tenant: str) -> TenantLimits:
        try:
            body = self.client.get(f"/v1/internal/tenants/{tenant}/limits")
            rates = body["rate_limits"]
            found = TenantLimits(
                float(rates["inference_per_key"]),
                float(rates["inference_per_tenant"]),
                {m: int(v) for m, v in body.get("monthly_quotas", {}).items() if m in QUOTA_METERS},
            )
            for meter in found.quotas:  # start this month's counter from the meter store, unless one runs
                self.quotas.seed(tenant, meter, int(body.get("used", {}).get(meter, 0)))
        except Exception as exc:  # ingestion away, or a stand-in without the endpoint: the defaults serve
            log.warning("tenant_limits_unavailable", tenant=tenant, error=str(exc)[:200])
            found = self.defaults
        with self._lock:
            self._cache[tenant] = found
        return found

    def admit(self, principal: Principal, rows: int) -> Reservation:
        """Rate limits, then quotas: raises RateLimited/QuotaExhausted (429) having taken nothing."""
        if principal.internal:  # another service acting for the tenant (pre-labels): not partner traffic
            return Reservation()
        limits = self.limits(principal.tenant)
        buckets = [Bucket.per_second("tenant", principal.tenant, limits.per_tenant)]
        if principal.key_id:
            buckets.insert(0, Bucket.per_second("key", principal.key_id, limits.per_key))
        self.limiter.acquire(buckets)
        if not limits.quotas:
            return Reservation()
        amounts = {"prediction_requests": 1, "prediction_rows": max(1, rows)}
        taken = self.quotas.reserve(principal.tenant, amounts, limits.quotas)
        return Reservation(self.quotas, principal.tenant, taken)


def of(server: Any) -> FairUse:
    """The server's fair-use guard, made on first use (one per process, like the server itself)."""
    guard = getattr(server, "fair_use", None)
    if guard is None:
        guard = server.fair_use = FairUse(server.runtime)
    return guard


def requested_rows() -> int:
    """How many predictions the friendly API's request asks for, before it is parsed for real."""
    if request.mimetype == "multipart/form-data":
        return sum(len(request.files.getlist(name)) for name in request.files)
    return rows_in(request.get_json(silent=True))


def rows_in(payload: Any) -> int:
    """How many predictions a JSON request's parsed body (None: none, or not JSON) asks for, before validation."""
    if isinstance(payload, dict):
        for name in INPUT_FIELDS:
            if isinstance(payload.get(name), list):
                return len(payload[name])
    return 1
