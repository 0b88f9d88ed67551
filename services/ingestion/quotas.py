"""Quotas, usage and rate limits per partner: what a tenant may push and predict.

- Item and byte quotas, per UTC day (`daily_item_quota`, `daily_byte_quota`) and per UTC month (`monthly_quotas`
  on `items_ingested` and `bytes_ingested`): checked here, in the push's transaction with the partner's row
  locked, against the day's usage and the meter store's month to date plus what running imports hold, so that
  concurrent pushes and imports cannot both pass one. A push past one is refused whole (429 with Retry-After
  until the next UTC midnight, or month: `quota_exhausted` naming the meter), since partial acceptance would make
  retries ambiguous; nothing of it is stored.
- The other monthly quotas are enforced by the services that do the work, which ask `tenant_limits` for them:
  `prediction_requests` and `prediction_rows` by inference, `annotations` by labeling, `training_cpu_seconds` and
  `training_gpu_seconds` by training.
- A bulk import is admitted whole (`admit_import`): before its first batch it counts what it would add and is
  refused if that would pass a quota of either period; else it holds that much on its own row (`Import.held_*`,
  written under the same lock), every batch's transaction spends from the hold what it meters, and the
  transaction that finishes the import releases the rest. A hold counts until `held_until`, moved on by each
  batch: one whose worker died and never came back lapses HOLD_SECONDS after its last move.
- Rate limits (`rate_limits`): pushes and imports per second per API key and per tenant, a token bucket in Redis
  (`shared.ratelimit`) that every replica shares; the deployment's defaults are RATE_LIMIT_* settings.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import case, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.ingestion import metering
from services.ingestion.models import Import, Partner, Usage, UsageRecord
from shared.auth import Principal
from shared.errors import RateLimited
from shared.logging import get_logger
from shared.ratelimit import Bucket, QuotaExhausted, RateLimiter, seconds_until_next_month
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
HOLD_SECONDS = 86400
"""How long an import's hold outlives its last move (admission or a batch): the hold of an import whose worker
died and never came back frees its room then."""


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


def check(session: Session, partner: Partner, items: int, size: int, *, importing: str | None = None) -> None:
    """Refuse early, before anything is stored, when the push (or a batch of the import `importing`) cannot fit
    today's or this month's quota beside what running imports hold."""
    if has_ingest_quota(partner):
        _check_ingest(session, partner, items, size, held_by_imports(session, partner.id, besides=importing))


def record(
    session: Session,
    partner: Partner,
    *,
    items: int,
    size: int,
    duplicates: int,
    rejected: int,
    pushes: int = 1,
    importing: str | None = None,
) -> None:
    """Count a push's outcome (or a batch's of the import `importing`, checked without its own hold: that is the
    room it was admitted with). With the partner's row locked, the day's and month's sums, the live holds and
    this push's are decided together: concurrent pushes and imports cannot overshoot a quota."""
    if has_ingest_quota(partner):
        partner = _locked_partner(session, partner.id)
        _check_ingest(session, partner, items, size, held_by_imports(session, partner.id, besides=importing))
    day = today()
    _ensure_row(session, partner.id, day)
    session.execute(
        update(Usage)
        .where(Usage.tenant == partner.id, Usage.day == day)
        .values(
            items=Usage.items + items,
            bytes=Usage.bytes + size,
            pushes=Usage.pushes + pushes,
            duplicates=Usage.duplicates + duplicates,
            rejected=Usage.rejected + rejected,
        )
    )


def has_ingest_quota(partner: Partner) -> bool:
    """Whether the tenant has an item or byte quota, of either period: its pushes and imports are counted."""
    daily = partner.daily_item_quota is not None or partner.daily_byte_quota is not None
    return daily or any(meter in INGESTED for meter in _monthly_quotas(partner))


def _locked_partner(session: Session, tenant: str) -> Partner:
    """The partner, its row locked to the end of the transaction: one push or import admission at a time per
    tenant (SQLite has no row locks; its write transactions are already one at a time)."""
    return session.scalars(
        select(Partner).where(Partner.id == tenant).with_for_update().execution_options(populate_existing=True)
    ).one()


def _check_ingest(session: Session, partner: Partner, items: int, size: int, held: tuple[int, int]) -> None:
    _check_monthly(session, partner, items, size, held)
    _check_daily(session, partner, items, size, held)


def _check_daily(session: Session, partner: Partner, items: int, size: int, held: tuple[int, int]) -> None:
    """Refuse what would pass a daily quota: the day's usage, plus what running imports hold, plus its own."""
    if partner.daily_item_quota is None and partner.daily_byte_quota is None:
        return
    usage = session.scalar(select(Usage).where(Usage.tenant == partner.id, Usage.day == today()))
    used_items, used_bytes = (usage.items, usage.bytes) if usage else (0, 0)
    for quota, limit, used, hold, amount in (
        ("item", partner.daily_item_quota, used_items, held[0], items),
        ("byte", partner.daily_byte_quota, used_bytes, held[1], size),
    ):
        if limit is not None and used + hold + amount > limit:
            also = f", {hold} held by running imports" if hold else ""
            raise RateLimited(
                f"daily {quota} quota of {limit} would be exceeded ({used} used today{also})",
                {"quota": f"{quota}s", "limit": limit},
                retry_after=seconds_until_tomorrow(),
            )


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


def _check_monthly(session: Session, partner: Partner, items: int, size: int, held: tuple[int, int]) -> None:
    """Refuse what would pass a monthly quota: month to date, plus what running imports hold, plus its own."""
    limits = {m: v for m, v in _monthly_quotas(partner).items() if m in INGESTED}
    if not limits:
        return
    used = month_to_date(session, partner.id, tuple(limits))
    for meter, hold, amount in (("items_ingested", held[0], items), ("bytes_ingested", held[1], size)):
        if meter in limits and used[meter] + hold + amount > limits[meter]:
            also = f", {hold} held by running imports" if hold else ""
            raise QuotaExhausted(
                f"the monthly quota of {limits[meter]} {meter} would be exceeded ({used[meter]} used this month{also})",
                {"meter": meter, "limit": limits[meter], "used": used[meter], "held": hold, "requested": amount},
                retry_after=seconds_until_next_month(),
            )


# -- imports, admitted whole ------------------------------------------------------------------------------


def _hold_deadline() -> datetime:
    return datetime.now(UTC) + timedelta(seconds=HOLD_SECONDS)


def held_by_imports(session: Session, tenant: str, *, besides: str | None = None) -> tuple[int, int]:
    """The items and bytes the tenant's running imports hold (their live holds), but `besides`'s."""
    query = select(func.coalesce(func.sum(Import.held_items), 0), func.coalesce(func.sum(Import.held_bytes), 0))
    query = query.where(Import.tenant == tenant, Import.held_until > datetime.now(UTC))
    if besides is not None:
        query = query.where(Import.id != besides)
    items, size = session.execute(query).one()
    return int(items), int(size)


def needs_hold(runtime: Runtime, tenant: str) -> bool:
    """Whether an import of the tenant must be counted and admitted against a quota before its first batch."""
    with runtime.db.read_session() as session:
        partner = session.get(Partner, tenant)
        return partner is not None and has_ingest_quota(partner)


def admit_import(runtime: Runtime, import_id: str, items: int, size: int) -> None:
    """Refuse the import whole if its `items` and `size` would pass one of its tenant's quotas, this month
    (QuotaExhausted) or today (RateLimited); else hold them on its row. Decided under the partner's row lock,
    as a push is, beside every other import's live hold: of two imports that fit only one at a time, the one
    decided second sees the first's hold and is refused."""
    with runtime.db.session() as session:
        record = session.get(Import, import_id)
        partner = _locked_partner(session, record.tenant)
        _check_ingest(session, partner, items, size, held_by_imports(session, record.tenant, besides=import_id))
        record.held_items, record.held_bytes, record.held_until = items, size, _hold_deadline()
    log.info("import_quota_held", items=items, bytes=size)


def resume_hold(runtime: Runtime, import_id: str) -> bool:
    """A resumed import (its worker died) keeps its hold if it is still live, moved on: True. False when it holds
    nothing (it lapsed, or was never taken): it is counted and admitted again."""
    with runtime.db.session() as session:
        moved = session.execute(
            update(Import)
            .where(Import.id == import_id, Import.held_until > datetime.now(UTC))
            .values(held_until=_hold_deadline())
        )
        kept = moved.rowcount == 1
    if kept:
        log.info("import_quota_hold_kept")
    return kept


def spend_hold(session: Session, import_id: str, items: int, size: int) -> None:
    """In a batch's transaction, which meters `items` and `size`: the import holds that much less (never below
    nothing), and its hold lasts HOLD_SECONDS from now."""
    session.execute(
        update(Import)
        .where(Import.id == import_id, Import.held_until.is_not(None))
        .values(
            held_items=case((Import.held_items > items, Import.held_items - items), else_=0),
            held_bytes=case((Import.held_bytes > size, Import.held_bytes - size), else_=0),
            held_until=_hold_deadline(),
        )
    )


def release_hold(record: Import) -> None:
    """In the transaction that finishes the import (succeeded or failed): it holds nothing more."""
    record.held_items = record.held_bytes = record.held_until = None


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
