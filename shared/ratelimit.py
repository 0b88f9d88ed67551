"""Fair use on the hot path: token-bucket rate limits and monthly quota counters, kept in Redis so that every
replica of a service shares them.

- **Rate limits** (`RateLimiter.acquire`): a bucket holds at most `burst` tokens and refills at `rate` per
  second; a request takes one token from each of its buckets (its API key's and its tenant's) in one Lua script,
  so either every bucket has a token and all are taken, or none is taken and the answer is how long until the
  emptiest one has one again (the 429's `Retry-After`). Time is Redis's own clock (`TIME`), the same for all
  replicas. A rate of 0 is no limit. So that a busy replica does not pay a Redis round trip per request, it takes
  a lease of several tokens per call and spends it locally within `LEASE_SECONDS`: a lease starts at one token and
  doubles each time the last one was spent in time, up to `LEASE_SECONDS` of the slowest bucket's rate (at most
  `MAX_LEASE`); a lease that lapsed unspent makes the next one half as large, so that quiet replicas do not
  drain a bucket with tokens they never use. One request thread at a time asks for the next lease; the others
  wait for its answer (one round trip) and spend from it, so a replica runs ahead of the bucket by one lease at
  most.
- **Quotas** (`QuotaCounter.reserve`): a month's count per (tenant, meter), in one Redis key that expires after
  the month; a request reserves what it will use before any work is done, and is refused whole if that would
  pass the quota (then nothing is counted). A request that fails afterwards gives its reservation back
  (`release`). The counter starts from the meter store's month-to-date figure (`seed`), so a flushed Redis
  does not forgive a month's usage.
- **A tenant's quotas** (`TenantQuotas`): the limits and month to date that ingestion keeps, asked over HTTP by
  the services that enforce them (labeling, training).

All fail open: when Redis does not answer, the request is served and `ratelimit_unavailable` is logged (when
ingestion cannot say a tenant's quotas, `tenant_limits_unavailable`), since refusing every partner because a
limiter is down would be worse than serving a burst unmetered by it; for the next `OPEN_SECONDS` no request
asks Redis at all, so that an unreachable Redis (a timeout, not a refusal) does not add its timeout to every
request.
"""

from __future__ import annotations

import calendar
import math
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis

from shared.client.http import ServiceClient
from shared.errors import RateLimited
from shared.logging import get_logger
from shared.schemas import ErrorSchema

log = get_logger(__name__)

PREFIX = "flywheel:ratelimit"
OPEN_SECONDS = 5.0
LEASE_SECONDS = 0.05
MAX_LEASE = 50
REFILL_WAIT_S = 1.0
"""How long a request waits at a time for another thread's lease refill (one round trip) before it looks again."""

# KEYS: the buckets; ARGV: the lease wanted, then (rate, burst) per bucket. Takes as many whole tokens as every
# bucket has, up to the lease, at least one. Returns {tokens taken (0: refused), wait seconds as a string, index of
# the bucket that refused (1-based, 0 when taken)}: Lua numbers cross into Redis as integers.
_BUCKET_SCRIPT = """
local now_parts = redis.call('TIME')
local now = tonumber(now_parts[1]) + tonumber(now_parts[2]) / 1000000
local want = tonumber(ARGV[1])
local tokens = {}
local least = nil
local wait, refused = 0, 0
for i, key in ipairs(KEYS) do
  local rate, burst = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  local state = redis.call('HMGET', key, 'tokens', 'at')
  local level, at = tonumber(state[1]), tonumber(state[2])
  if level == nil then level, at = burst, now end
  level = math.min(burst, level + math.max(0, now - at) * rate)
  tokens[i] = level
  if least == nil or level < least then least = level end
  if level < 1 then
    local need = (1 - level) / rate
    if need > wait then wait, refused = need, i end
  end
end
if refused > 0 then return {0, tostring(wait), refused} end
local take = math.min(want, math.floor(least))
for i, key in ipairs(KEYS) do
  local rate, burst = tonumber(ARGV[2 * i]), tonumber(ARGV[2 * i + 1])
  redis.call('HSET', key, 'tokens', tostring(tokens[i] - take), 'at', tostring(now))
  redis.call('PEXPIRE', key, math.ceil(burst / rate * 1000) + 1000)
end
return {take, '0', 0}
"""

# KEYS[1]: the counter; ARGV: amount, limit, ttl seconds. Returns the count before (and takes nothing) when the
# amount does not fit, else -1 after adding it.
_RESERVE_SCRIPT = """
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local amount, limit = tonumber(ARGV[1]), tonumber(ARGV[2])
if current + amount > limit then return current end
redis.call('INCRBY', KEYS[1], amount)
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[3]))
return -1
"""


TOO_MANY_REQUESTS: dict[str, Any] = {
    "schema": ErrorSchema,
    "description": "A rate limit (`rate_limited`: requests per second per API key or per tenant) or a monthly "
    "quota (`quota_exhausted`, `details.meter` naming the meter) refuses the request; nothing of it was done. "
    "Retry after `Retry-After` seconds.",
    "headers": {
        "Retry-After": {
            "description": "seconds until the bucket has a token again, or until the next month (a quota)",
            "schema": {"type": "integer"},
        }
    },
}
"""The 429 answer of a rate-limited operation, for its OpenAPI document (`@blp.alt_response(429, **...)`)."""


class QuotaExhausted(RateLimited):
    """A monthly quota would be passed: 429 naming the meter, with Retry-After until the next month."""

    code = "quota_exhausted"


@dataclass(frozen=True)
class Bucket:
    """One limit a request counts against: `scope` names it in errors (`key`, `tenant`)."""

    scope: str
    identity: str
    rate: float  # tokens per second; 0: no limit
    burst: float

    @classmethod
    def per_second(cls, scope: str, identity: str, rate: float, burst_seconds: float = 2.0) -> Bucket:
        return cls(scope, identity, rate, max(1.0, rate * burst_seconds))


class _Breaker:
    """After a Redis failure, skip Redis for OPEN_SECONDS (fail open without waiting on it)."""

    def __init__(self, service: str) -> None:
        self.service = service
        self._open_until = 0.0

    @property
    def open(self) -> bool:
        return time.monotonic() < self._open_until

    def failed(self, exc: Exception) -> None:
        self._open_until = time.monotonic() + OPEN_SECONDS
        log.warning("ratelimit_unavailable", service=self.service, error=str(exc)[:200], skip_s=OPEN_SECONDS)


@dataclass
class _Lease:
    """Tokens this replica took from a set of buckets and spends locally until `until`."""

    left: int = 0
    until: float = 0.0
    size: int = 0
    refill: threading.Event | None = None
    """Set while one request thread asks Redis for the next lease; the others wait for it instead of asking too."""


class RateLimiter:
    def __init__(self, client: redis.Redis, service: str) -> None:
        self.client = client
        self.service = service
        self._script = client.register_script(_BUCKET_SCRIPT)
        self._breaker = _Breaker(service)
        self._leases: dict[tuple[str, ...], _Lease] = {}
        self._lock = threading.Lock()

    def _spend_or_refill(self, keys: tuple[str, ...], most: int) -> tuple[int, threading.Event | None]:
        """Spend a token of this replica's lease: (0, None). Or, when it is spent or lapsed: (the size of the next
        lease, None) for the one thread that is to ask Redis for it, and (0, the refill to wait for) for the rest."""
        now = time.monotonic()
        with self._lock:
            lease = self._leases.get(keys)
            if lease is None:
                if len(self._leases) > 10_000:  # forget the lapsed ones
                    self._leases = {k: v for k, v in self._leases.items() if v.until > now or v.refill}
                lease = self._leases[keys] = _Lease()
            if lease.left > 0 and now < lease.until:
                lease.left -= 1
                return 0, None
            if lease.refill is not None:
                return 0, lease.refill
            lease.refill = threading.Event()
            spent_in_time = lease.size > 0 and now < lease.until
            return (min(most, lease.size * 2) if spent_in_time else max(1, lease.size // 2)), None

    def _refilled(self, keys: tuple[str, ...], taken: int) -> None:
        """The refill landed (`taken` tokens, 0: refused or failed): the asking request spends one of them."""
        with self._lock:
            lease = self._leases.setdefault(keys, _Lease())
            if taken:
                lease.left, lease.until, lease.size = taken - 1, time.monotonic() + LEASE_SECONDS, taken
            refill, lease.refill = lease.refill, None
        if refill is not None:
            refill.set()

    def acquire(self, buckets: Sequence[Bucket]) -> None:
        """Take a token from every bucket (from this replica's lease if it holds one), or raise RateLimited
        (429, Retry-After) and take none."""
        limited = [bucket for bucket in buckets if bucket.rate > 0]
        if not limited:
            return
        keys = tuple(f"{PREFIX}:{self.service}:{b.scope}:{b.identity}" for b in limited)
        most = max(1, min(MAX_LEASE, int(min(b.rate for b in limited) * LEASE_SECONDS)))
        while True:
            if self._breaker.open:
                return
            lease, pending = self._spend_or_refill(keys, most)
            if pending is None:
                break
            pending.wait(REFILL_WAIT_S)  # then spend from the new lease, or be the one to ask for the next
        if not lease:
            return
        args: list[Any] = [lease]
        for bucket in limited:
            args += [bucket.rate, bucket.burst]
        taken = 0
        try:
            answer, wait, refused = self._script(keys=list(keys), args=args)
            taken = int(answer)
        except redis.RedisError as exc:
            self._breaker.failed(exc)
            return
        finally:
            self._refilled(keys, taken)  # this request spends one; the others waited for it
        if not taken:
            bucket = limited[int(refused) - 1]
            seconds = float(wait)
            raise RateLimited(
                f"rate limit of {bucket.rate:g} requests per second per {bucket.scope} reached; retry later",
                {"limit": bucket.scope, "rate_per_second": bucket.rate, "burst": bucket.burst},
                retry_after=max(1, math.ceil(seconds)),
            )


def month_of(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m")


def seconds_until_next_month(moment: datetime | None = None) -> int:
    now = (moment or datetime.now(UTC)).astimezone(UTC)
    days = calendar.monthrange(now.year, now.month)[1]
    end = datetime(now.year + (now.month == 12), now.month % 12 + 1, 1, tzinfo=UTC)
    return max(1, min(days * 86400, math.ceil((end - now).total_seconds())))


class QuotaCounter:
    """Month-to-date counts per (tenant, meter) in Redis, reserved before the work they count."""

    def __init__(self, client: redis.Redis, service: str) -> None:
        self.client = client
        self.service = service
        self._reserve = client.register_script(_RESERVE_SCRIPT)
        self._breaker = _Breaker(service)

    def _key(self, tenant: str, meter: str, month: str) -> str:
        return f"{PREFIX}:quota:{tenant}:{meter}:{month}"

    def seed(self, tenant: str, meter: str, used: int) -> None:
        """Start this month's counter from the meter store's figure, unless a counter is already running."""
        if self._breaker.open:
            return
        try:
            key = self._key(tenant, meter, month_of(datetime.now(UTC)))
            self.client.set(key, int(used), nx=True, ex=seconds_until_next_month() + 86400)
        except redis.RedisError as exc:
            self._breaker.failed(exc)

    def reserve(self, tenant: str, amounts: dict[str, int], limits: dict[str, int]) -> dict[str, int]:
        """Count `amounts` (meter -> n) against the month's `limits`; all of them or none (QuotaExhausted).
        Returns what was reserved, to `release` if the work then fails."""
        month = month_of(datetime.now(UTC))
        ttl = seconds_until_next_month() + 86400
        taken: dict[str, int] = {}
        if self._breaker.open:
            return taken
        try:
            for meter, amount in amounts.items():
                limit = limits.get(meter)
                if limit is None or amount <= 0:
                    continue
                before = int(self._reserve(keys=[self._key(tenant, meter, month)], args=[amount, limit, ttl]))
                if before >= 0:
                    self.release(tenant, taken)
                    raise QuotaExhausted(
                        f"the monthly quota of {limit} {meter} is exhausted ({before} used this month)",
                        {"meter": meter, "limit": limit, "used": before, "requested": amount},
                        retry_after=seconds_until_next_month(),
                    )
                taken[meter] = amount
        except redis.RedisError as exc:
            self._breaker.failed(exc)
        return taken

    def release(self, tenant: str, taken: dict[str, int]) -> None:
        month = month_of(datetime.now(UTC))
        try:
            for meter, amount in taken.items():
                self.client.decrby(self._key(tenant, meter, month), amount)
        except redis.RedisError as exc:
            self._breaker.failed(exc)


class TenantQuotas:
    """A tenant's monthly quotas on some meters and its month to date, as ingestion keeps them
    (`GET /v1/internal/tenants/{tenant}/limits`), for the services that enforce them; kept `ttl` seconds
    (0: asked every time). When ingestion cannot say, `get` answers None and the caller enforces no quota
    (serving goes on, `tenant_limits_unavailable` is logged)."""

    def __init__(self, ingestion_url: str, internal_token: str, meters: Sequence[str], *, ttl: float = 0.0) -> None:
        self.client = ServiceClient(ingestion_url, internal_token, timeout=2.0)
        self.meters = tuple(meters)
        self.ttl = ttl
        self._known: dict[str, tuple[float, tuple[dict[str, int], dict[str, int]] | None]] = {}
        self._lock = threading.Lock()

    def get(self, tenant: str) -> tuple[dict[str, int], dict[str, int]] | None:
        """(meter -> limit, meter -> used this month) for this object's meters that have a quota, or None."""
        if not self.client.base_url:  # no ingestion to ask (a service run alone): no quota to enforce
            return None
        now = time.monotonic()
        with self._lock:
            known = self._known.get(tenant)
        if known is not None and now < known[0]:
            return known[1]
        found: tuple[dict[str, int], dict[str, int]] | None
        try:
            body = self.client.get(f"/v1/internal/tenants/{tenant}/limits")
            limits = {m: int(v) for m, v in (body.get("monthly_quotas") or {}).items() if m in self.meters}
            used = {m: int((body.get("used") or {}).get(m, 0)) for m in limits}
            found = (limits, used)
        except Exception as exc:  # ingestion away: no quota is enforced until it answers again
            log.warning("tenant_limits_unavailable", tenant=tenant, error=str(exc)[:200])
            found = None
        if self.ttl > 0:
            with self._lock:
                if len(self._known) > 100_000:
                    self._known.clear()
                self._known[tenant] = (now + self.ttl, found)
        return found
