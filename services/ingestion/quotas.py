"""Daily quotas and usage per partner, counted atomically in the same transaction as the items they admit.

A push that would take the partner past its daily item or byte quota is refused whole (429 with
Retry-After until the next UTC midnight): partial acceptance would make retries ambiguous.
"""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from sqlalchemy import select, true, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from services.ingestion.models import Partner, Usage
from shared.errors import RateLimited


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
    """Refuse early, before anything is stored, when the push cannot fit today's quota."""
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
