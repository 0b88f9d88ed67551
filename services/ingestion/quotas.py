"""Quotas, usage and rate limits per partner: what a tenant may push and predict.

- Daily quotas (`daily_item_quota`, `daily_byte_quota`), counted atomically in the same transaction as the items
  they admit: a push that would take the partner past one is refused whole (429 with Retry-After until the next
  UTC midnight), since partial acceptance would make retries ambiguous.
- Monthly quotas per meter (`monthly_quotas`): `items_ingested` and `bytes_ingested` are checked here, in the
  push's transaction, against the meter store's month to date (the partner's row locked, so concurrent pushes
  cannot both pass); `prediction_requests` and `prediction_rows` are enforced by inference, which asks
  `tenant_limits` for them. An exhausted quota answers 429 `quota_exhausted` naming the meter, and nothing of
  the request is stored.
- Rate limits (`rate_limits`): pushes and imports per second per API key and per tenant, a token bucket in Redis
  (`shared.ratelimit`) that every replica shares; the deployment's defaults are RATE_LIMIT_* settings.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import func, select, true, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.ingestion import metering
from services.ingestion.models import Partner, Usage, UsageRecord
from shared.auth import Principal
from shared.errors import RateLimited
from shared.ratelimit import Bucket, QuotaExhausted, RateLimiter, seconds_until_next_month
from shared.runtime import Runtime
from shared.settings import Settings

MONTHLY_QUOTA_METERS = ("items_ingested", "bytes_ingested", "prediction_requests", "prediction_rows")
"""The meters a monthly quota can cap: those checked before the work, on the request paths."""
RATE_LIMITS = ("inference_per_key", "inference_per_tenant", "ingestion_per_key", "ingestion_per_tenant")


def today() -> date:
    return datetime.now(UTC).date()


def seconds_until_tomorrow() -> int:
    now = datetime.now(UTC)
    tomorrow = datetime.combine(now.date() + timedelta(days=1), datetime.min.time(), tzinfo=UTC)
    return max(1, int((tomorrow - now).total_seconds()))


def _ensure_row(session: Session, tenant: str, day: date) -> None:
    exists = session.scalar(select(Usage.id).where(Usage.tenant == tenant, Usage.day == day))
    if exists is None:
        try:
            with session.begin_nested():
                session.add(Usage(tenant=tenant, day=day, items=0, bytes=0, pushes=0, duplicates=0, rejected=0))
        except IntegrityError:
            pass  # a concurrent push created it first


def check(session: Session, partner: Partner, items: int, size: int) -> None:
    """Refuse early, before anything is stored, when the push cannot fit today's or this month's quota."""
    _check_monthly(session, partner, items, size)
    if partner.daily_item_quota is None and partner.daily_byte_quota is None:
        return
    usage = session.scalar(select(Usage).where(Usage.tenant == partner.id, Usage.day == today()))
    used_items, used_bytes = (usage.items, usage.bytes) if usage else (0, 0)
    _refuse_if_over(partner, used_items + items, used_bytes + size)


def _refuse_if_over(partner: Partner, items: int, size: int) -> None:
    if partner.daily_item_quota is not None and items > partner.daily_item_quota:
        raise RateLimited(
            f"daily item quota of {partner.daily_item_quota} would be exceeded",
            {"quota": "items", "limit": partner.daily_item_quota},
            retry_after=seconds_until_tomorrow(),
        )
    if partner.daily_byte_quota is not None and size > partner.daily_byte_quota:
        raise RateLimited(
            f"daily byte quota of {partner.daily_byte_quota} would be exceeded",
            {"quota": "bytes", "limit": partner.daily_byte_quota},
            retry_after=seconds_until_tomorrow(),
        )


def record(
    session: Session, partner: Partner, *, items: int, size: int, duplicates: int, rejected: int, pushes: int = 1
) -> None:
    """Count a push's outcome; the conditional update makes concurrent pushes unable to overshoot a quota."""
    if _monthly_quotas(partner):
        # one push at a time per tenant with a monthly quota: the month's sum and this push's are decided together
        session.execute(select(Partner.id).where(Partner.id == partner.id).with_for_update())
        _check_monthly(session, partner, items, size)
    day = today()
    _ensure_row(session, partner.id, day)
    within = true()
    if partner.daily_item_quota is not None:
        within = within & (Usage.items + items <= partner.daily_item_quota)
    if partner.daily_byte_quota is not None:
        within = within & (Usage.bytes + size <= partner.daily_byte_quota)
    result = session.execute(
        update(Usage)
        .where(Usage.tenant == partner.id, Usage.day == day, within)
        .values(
            items=Usage.items + items,
            bytes=Usage.bytes + size,
            pushes=Usage.pushes + pushes,
            duplicates=Usage.duplicates + duplicates,
            rejected=Usage.rejected + rejected,
        )
    )
    if result.rowcount == 0:
        usage = session.scalar(select(Usage).where(Usage.tenant == partner.id, Usage.day == day))
        _refuse_if_over(partner, usage.items + items, usage.bytes + size)
        raise RateLimited("daily quota exceeded", retry_after=seconds_until_tomorrow())


def usage_by_day(session: Session, tenant: str, since: date) -> list[Usage]:
    return list(
        session.scalars(select(Usage).where(Usage.tenant == tenant, Usage.day >= since).order_by(Usage.day.desc()))
    )


# -- monthly quotas and rate limits -----------------------------------------------------------------------


def _monthly_quotas(partner: Partner) -> dict[str, int]:
    return {meter: int(limit) for meter, limit in (partner.monthly_quotas or {}).items() if limit is not None}


def month_to_date(session: Session, tenant: str, meters: list[str] | tuple[str, ...]) -> dict[str, int]:
    """The meter store's totals for this UTC month (records already counted; not the request at hand)."""
    if not meters:
        return {}
    start, end = metering.month_window(datetime.now(UTC).strftime("%Y-%m"))
    rows = session.execute(
        select(UsageRecord.meter, func.sum(UsageRecord.value))
        .where(UsageRecord.tenant == tenant, UsageRecord.meter.in_(meters))
        .where(UsageRecord.time >= start, UsageRecord.time < end)
        .group_by(UsageRecord.meter)
    )
    used = {meter: 0 for meter in meters}
    used.update({meter: int(total or 0) for meter, total in rows})
    return used


def _check_monthly(session: Session, partner: Partner, items: int, size: int) -> None:
    limits = {m: v for m, v in _monthly_quotas(partner).items() if m in ("items_ingested", "bytes_ingested")}
    if not limits:
        return
    used = month_to_date(session, partner.id, tuple(limits))
    for meter, amount in (("items_ingested", items), ("bytes_ingested", size)):
        if meter in limits and used[meter] + amount > limits[meter]:
            raise QuotaExhausted(
                f"the monthly quota of {limits[meter]} {meter} would be exceeded ({used[meter]} used this month)",
                {"meter": meter, "limit": limits[meter], "used": used[meter], "requested": amount},
                retry_after=seconds_until_next_month(),
            )


def rate_limits(partner: Partner | None, settings: Settings) -> dict[str, float]:
    """The partner's requests per second per key and per tenant: its own `rate_limits`, else the defaults."""
    own = (partner.rate_limits if partner is not None else None) or {}
    return {
        name: float(own[name]) if own.get(name) is not None else float(getattr(settings, f"rate_limit_{name}"))
        for name in RATE_LIMITS
    }


def tenant_limits(runtime: Runtime, tenant: str) -> dict[str, Any]:
    """What inference enforces for a tenant (asked over HTTP, cached there): rates, quotas, month to date."""
    with runtime.db.read_session() as session:
        partner = session.get(Partner, tenant)
        quotas = _monthly_quotas(partner) if partner is not None else {}
        used = month_to_date(session, tenant, tuple(quotas))
    limits = rate_limits(partner, runtime.settings)
    return {"tenant": tenant, "rate_limits": limits, "monthly_quotas": quotas, "used": used}


def _limiter(runtime: Runtime) -> RateLimiter:
    limiter = getattr(runtime, "rate_limiter", None)
    if limiter is None:
        limiter = runtime.rate_limiter = RateLimiter(runtime.redis, runtime.service)  # type: ignore[attr-defined]
    return limiter


def admit(runtime: Runtime, principal: Principal) -> None:
    """A push or an import: one token from the key's bucket and the tenant's, or 429 with Retry-After."""
    with runtime.db.read_session() as session:
        partner = session.get(Partner, principal.tenant)
    limits = rate_limits(partner, runtime.settings)
    buckets = [Bucket.per_second("tenant", principal.tenant, limits["ingestion_per_tenant"])]
    if principal.key_id:
        buckets.insert(0, Bucket.per_second("key", principal.key_id, limits["ingestion_per_key"]))
    _limiter(runtime).acquire(buckets)
