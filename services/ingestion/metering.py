"""The meter store: usage records of every billable action, kept once per (tenant, record id), summed into
reports (per hour, day or month, per meter, optionally per model and version) and exported for billing.

Ingestion owns it because it owns the tenants (partners) and already answers `GET /v1/usage`: its own pushes
are metered in the push's transaction, the other services' work arrives as `usage.recorded` events. A record's
id is stable (derived from the work, or drawn once by its producer and kept through retries), so a redelivered
or replayed event inserts nothing new: the unique (tenant, record_id) constraint makes counting idempotent.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Iterable, Iterator
from datetime import UTC, date, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from services.ingestion.models import UsageRecord, utcnow

BUCKETS = ("hour", "day", "month")
GROUPS = ("model", "version")
_SQLITE_FORMATS = {"hour": "%Y-%m-%dT%H:00:00Z", "day": "%Y-%m-%d", "month": "%Y-%m"}
_POSTGRES_FORMATS = {"hour": 'YYYY-MM-DD"T"HH24":00:00Z"', "day": "YYYY-MM-DD", "month": "YYYY-MM"}
CSV_COLUMNS = ("id", "time", "tenant", "meter", "value", "model", "version", "source", "dimensions")
CLOUDEVENT_TYPE_PREFIX = "io.flywheel.usage."


def _utc(value: str | datetime) -> datetime:
    moment = datetime.fromisoformat(value) if isinstance(value, str) else value
    return moment.astimezone(UTC)


def record(session: Session, records: Iterable[dict[str, Any]], source: str) -> None:
    """Store usage records (catalog `UsageRecord` dicts) in the caller's transaction; known ids are skipped."""
    now = utcnow()
    rows = [
        {
            "tenant": item["subject"],
            "record_id": item["id"],
            "meter": item["meter"],
            "time": _utc(item["time"]),
            "value": float(item["value"]),
            "model": item.get("dimensions", {}).get("model"),
            "version": item.get("dimensions", {}).get("version"),
            "dimensions": dict(item.get("dimensions", {})),
            "source": source,
            "recorded_at": now,
        }
        for item in records
    ]
    if not rows:
        return
    dialect = session.get_bind().dialect.name
    module = postgresql if dialect == "postgresql" else sqlite
    session.execute(module.insert(UsageRecord).on_conflict_do_nothing(index_elements=["tenant", "record_id"]), rows)


def usage_record(record_id: str, meter: str, tenant: str, value: float, **dimensions: str) -> dict[str, Any]:
    """A record of this service's own work, in the catalog's shape."""
    return {
        "id": record_id,
        "meter": meter,
        "subject": tenant,
        "time": datetime.now(UTC).isoformat(),
        "value": value,
        "dimensions": dimensions,
    }


def month_window(period: str) -> tuple[datetime, datetime]:
    """`2026-12` → [2026-12-01, 2027-01-01) in UTC (the schema has checked the format)."""
    year, month = (int(part) for part in period.split("-"))
    start = datetime(year, month, 1, tzinfo=UTC)
    end = datetime(year + (month == 12), month % 12 + 1, 1, tzinfo=UTC)
    return start, end


def days_window(days: int, today: date) -> tuple[datetime, datetime]:
    end = datetime.combine(today + timedelta(days=1), datetime.min.time(), tzinfo=UTC)
    return end - timedelta(days=days), end


def _bucket(session: Session, bucket: str) -> ColumnElement[str]:
    if session.get_bind().dialect.name == "postgresql":
        return func.to_char(func.timezone("UTC", UsageRecord.time), _POSTGRES_FORMATS[bucket])
    return func.strftime(_SQLITE_FORMATS[bucket], UsageRecord.time)


def _number(value: float) -> float | int:
    rounded = round(value, 6)
    return int(rounded) if rounded.is_integer() else rounded


def report(
    session: Session,
    *,
    tenant: str | None,
    start: datetime,
    end: datetime,
    bucket: str,
    by: Iterable[str] = (),
) -> list[dict[str, Any]]:
    """Totals per (tenant, meter, bucket[, model][, version]) over [start, end); one tenant's or all."""
    groups = [getattr(UsageRecord, name) for name in GROUPS if name in set(by)]
    label = _bucket(session, bucket).label("bucket")
    keys = [UsageRecord.tenant, UsageRecord.meter, label, *groups]
    query = (
        select(*keys, func.sum(UsageRecord.value), func.count())
        .where(UsageRecord.time >= start, UsageRecord.time < end)
        .group_by(*keys)
        .order_by(*keys)
    )
    if tenant is not None:
        query = query.where(UsageRecord.tenant == tenant)
    rows = []
    for row in session.execute(query):
        entry = {"tenant": row[0], "meter": row[1], "bucket": row[2]}
        entry.update({column.key: row[3 + index] for index, column in enumerate(groups)})
        entry.update(value=_number(row[-2]), records=row[-1])
        rows.append(entry)
    return rows


def records(session: Session, *, tenant: str | None, start: datetime, end: datetime) -> Iterator[UsageRecord]:
    query = (
        select(UsageRecord)
        .where(UsageRecord.time >= start, UsageRecord.time < end)
        .order_by(UsageRecord.time, UsageRecord.id)
    )
    if tenant is not None:
        query = query.where(UsageRecord.tenant == tenant)
    yield from session.scalars(query.execution_options(yield_per=1000))


def _rfc3339(moment: datetime) -> str:
    return _utc(moment if moment.tzinfo else moment.replace(tzinfo=UTC)).isoformat().replace("+00:00", "Z")


def cloudevent(row: UsageRecord) -> dict[str, Any]:
    """A record as a CloudEvents 1.0 event (structured JSON), as OpenMeter or Lago ingest it."""
    return {
        "specversion": "1.0",
        "id": row.record_id,
        "source": f"/flywheel/{row.source}",
        "type": CLOUDEVENT_TYPE_PREFIX + row.meter,
        "subject": row.tenant,
        "time": _rfc3339(row.time),
        "datacontenttype": "application/json",
        "data": {"meter": row.meter, "value": _number(row.value), **row.dimensions},
    }


def cloudevents_lines(rows: Iterable[UsageRecord]) -> Iterator[str]:
    for row in rows:
        yield json.dumps(cloudevent(row), separators=(",", ":")) + "\n"


def csv_lines(rows: Iterable[UsageRecord]) -> Iterator[str]:
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(CSV_COLUMNS)
    for row in rows:
        writer.writerow(
            [
                row.record_id,
                _rfc3339(row.time),
                row.tenant,
                row.meter,
                _number(row.value),
                row.model or "",
                row.version or "",
                row.source,
                json.dumps(row.dimensions, sort_keys=True),
            ]
        )
        yield buffer.getvalue()
        buffer.seek(0)
        buffer.truncate()
