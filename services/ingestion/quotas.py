"""Quotas, usage and rate limits per partner: what a tenant may push and predict.

- Daily quotas (`daily_item_quota`, `daily_byte_quota`), counted atomically in the same transaction as the items
  they admit: a push that would take the partner past one is refused whole (429 with Retry-After until the next
  UTC midnight), since partial acceptance would make retries ambiguous.
- Monthly quotas per meter (`monthly_quotas`): `items_ingested` and `bytes_ingested` are checked here, in the
  push's transaction, against the meter store's month to date plus what running imports hold (the partner's row
  locked, so concurrent pushes cannot both pass); the others are enforced by the services that do the work,
  which ask `tenant_limits` for them: `prediction_requests` and `prediction_rows` by inference, `annotations` by
  labeling, `training_cpu_seconds` and `training_gpu_seconds` by training. An exhausted quota answers 429
  `quota_exhausted` naming the meter, and nothing of the request is stored.
- A bulk import is admitted whole (`import_hold`): before its first batch it counts what it would add and is
  refused if that would pass a quota; else it holds that much (`shared.ratelimit.QuotaHolds`, in Redis) until it
  ends, spending the hold as its batches are metered, so that no push or other import takes the room it needs.
- Rate limits (`rate_limits`): pushes and imports per second per API key and per tenant, a token bucket in Redis
  (`shared.ratelimit`) that every replica shares; the deployment's defaults are RATE_LIMIT_* settings.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from datetime import UTC, date, datetime, timedelta
from typing import Any

from flask import current_app, has_app_context
from sqlalchemy import func, select, true, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.ingestion import metering
from services.ingestion.models import Partner, Usage, UsageRecord
from shared.auth import Principal
from shared.errors import RateLimited
from shared.logging import get_logger
from shared.ratelimit import Bucket, QuotaExhausted, QuotaHolds, RateLimiter, seconds_until_next_month
from shared.runtime import Runtime
from shared.settings import Settings

log = get_logger(__name__)

INGESTED = ("items_ingested", "bytes_ingested")
MONTHLY_QUOTA_METERS = (
    *INGESTED,
    "prediction_requests",
    "prediction_rows",
    "annotations",
    "training_cpu_seconds",
    "training_gpu_seconds",
)
"""The meters a monthly quota can cap: checked before the work by the service that does it (training compute,
known only after a run: no run starts once the month's compute has reached the quota)."""
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


def _check_monthly(
    session: Session, partner: Partner, items: int, size: int, held: dict[str, int] | None = None
) -> None:
    """Refuse a push (or an import) that would pass a monthly quota: month to date, plus what running imports
    hold (`held`; by default every import's but the one this thread ingests for), plus its own."""
    limits = {m: v for m, v in _monthly_quotas(partner).items() if m in INGESTED}
    if not limits:
        return
    used = month_to_date(session, partner.id, tuple(limits))
    held = {meter: 0 for meter in limits} | (held if held is not None else _held_by_others(partner.id, tuple(limits)))
    for meter, amount in (("items_ingested", items), ("bytes_ingested", size)):
        if meter in limits and used[meter] + held[meter] + amount > limits[meter]:
            also = f", {held[meter]} held by running imports" if held[meter] else ""
            raise QuotaExhausted(
                f"the monthly quota of {limits[meter]} {meter} would be exceeded ({used[meter]} used this month{also})",
                {"meter": meter, "limit": limits[meter], "used": used[meter], "held": held[meter], "requested": amount},
                retry_after=seconds_until_next_month(),
            )


# -- imports, admitted whole ------------------------------------------------------------------------------

_importing: ContextVar[tuple[QuotaHolds, str] | None] = ContextVar("importing", default=None)
"""The holds and the import whose batches this thread ingests: its own hold is the room its batches use."""


def _holds(runtime: Runtime) -> QuotaHolds:
    holds = getattr(runtime, "quota_holds", None)
    if holds is None:
        holds = runtime.quota_holds = QuotaHolds(runtime.redis, runtime.service)  # type: ignore[attr-defined]
    return holds


def _held_by_others(tenant: str, meters: tuple[str, ...]) -> dict[str, int]:
    """What running imports hold of the meters, but the one this thread ingests for (a push: every import)."""
    importing = _importing.get()
    if importing is not None:
        holds, holder = importing
        return holds.held(tenant, meters, besides=holder)
    if has_app_context() and "flywheel" in current_app.extensions:  # a push, on the HTTP path
        return _holds(current_app.extensions["flywheel"]).held(tenant, meters)
    return {meter: 0 for meter in meters}


class ImportHold:
    """What one bulk import holds of its tenant's monthly items and bytes quotas while it runs."""

    def __init__(self, runtime: Runtime, tenant: str, import_id: str) -> None:
        self.runtime, self.tenant, self.holder = runtime, tenant, import_id
        self.holds = _holds(runtime)
        with runtime.db.read_session() as session:
            partner = session.get(Partner, tenant)
            quotas = _monthly_quotas(partner) if partner is not None else {}
        self.meters = tuple(meter for meter in INGESTED if meter in quotas)

    @property
    def needed(self) -> bool:
        """Whether the tenant has a quota the import must be counted against."""
        return bool(self.meters)

    def admit(self, items: int, size: int, *, resuming: bool) -> None:
        """Refuse the import whole (QuotaExhausted) if its `items` and `size` would pass a quota; else hold them.
        Decided under the partner's row lock, as a push is: a push or import decided after sees the hold. A
        resumed import was admitted when it started: it holds what it has left, unchecked."""
        with self.runtime.db.session() as session:
            session.execute(select(Partner.id).where(Partner.id == self.tenant).with_for_update())
            partner = session.get(Partner, self.tenant)
            if not resuming:
                held = self.holds.held(self.tenant, self.meters, besides=self.holder)
                _check_monthly(session, partner, items, size, held)
            self.holds.hold(self.tenant, self.holder, self._amounts(items, size))
        log.info("import_quota_held", items=items, bytes=size, resumed=resuming)

    def spend(self, items: int, size: int) -> None:
        """A batch's items are metered now (its transaction committed): hold that much less."""
        if self.needed:
            self.holds.spend(self.tenant, self.holder, self._amounts(items, size))

    def release(self) -> None:
        if self.needed:
            self.holds.release(self.tenant, self.holder, self.meters)

    def _amounts(self, items: int, size: int) -> dict[str, int]:
        return {meter: {"items_ingested": items, "bytes_ingested": size}[meter] for meter in self.meters}


@contextmanager
def import_hold(runtime: Runtime, tenant: str, import_id: str) -> Iterator[ImportHold]:
    """For an import's whole run: its batches are checked against the quota without its own hold, which is
    released when the block ends (succeeded, failed or crashed)."""
    hold = ImportHold(runtime, tenant, import_id)
    token = _importing.set((hold.holds, import_id))
    try:
        yield hold
    finally:
        _importing.reset(token)
        hold.release()


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
