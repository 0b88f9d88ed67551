"""The daily bytes-stored meter: what each tenant keeps in object storage, measured once per UTC day.

Every bucket a tenant's data lives in is laid out `<tenant>/...` (raw items, dataset snapshots, checkpoints,
exported models; see `shared.artifacts`), so a tenant's bytes are the sizes of the objects under its prefix,
listed bucket by bucket. Each measurement is one `bytes_stored` usage record per (tenant, day, bucket) whose id
names the day and the bucket (`bytes_stored.2026-12-01.raw`): the meter store keeps one row per (tenant, id), so
a second measurement on the same day (another worker replica, a restart, an operator's run) stores nothing, and
the first measurement of the day is the day's figure. Invoices price the level per GB-month (`invoices.py`).

The ingestion worker measures when it starts and then every `STORAGE_METER_INTERVAL_S` (an hour by default),
each time only the tenants not measured yet today: a daemon thread, started and stopped as a step of the
worker (a Celery bootstep), so that every worker replica runs one and no HTTP process does.
"""

from __future__ import annotations

from datetime import UTC, date, datetime

from sqlalchemy import select

from services.ingestion import metering
from services.ingestion.models import Partner, UsageRecord
from shared.artifacts import CHECKPOINTS_BUCKET, DATASETS_BUCKET, MODELS_BUCKET, RAW_BUCKET
from shared.logging import get_logger
from shared.periodic import run_in_worker
from shared.runtime import Runtime

log = get_logger(__name__)

METER = "bytes_stored"
TENANT_BUCKETS = (RAW_BUCKET, DATASETS_BUCKET, CHECKPOINTS_BUCKET, MODELS_BUCKET)


def record_id(day: date, bucket: str) -> str:
    return f"{METER}.{day.isoformat()}.{bucket}"


def _measured(runtime: Runtime, day: date) -> set[str]:
    """Tenants whose every bucket has today's record."""
    ids = [record_id(day, bucket) for bucket in TENANT_BUCKETS]
    with runtime.db.read_session() as session:
        rows = session.execute(select(UsageRecord.tenant, UsageRecord.record_id).where(UsageRecord.record_id.in_(ids)))
        found: dict[str, set[str]] = {}
        for tenant, rid in rows:
            found.setdefault(tenant, set()).add(rid)
    return {tenant for tenant, seen in found.items() if len(seen) == len(ids)}


def measure_tenant(runtime: Runtime, tenant: str, day: date) -> dict[str, int]:
    """Bytes under the tenant's prefix in each bucket, stored as the day's records; returns bucket -> bytes."""
    sizes: dict[str, int] = {}
    counts: dict[str, int] = {}
    for bucket in TENANT_BUCKETS:
        sizes[bucket] = counts[bucket] = 0
        for info in runtime.storage.list(bucket, prefix=f"{tenant}/"):
            sizes[bucket] += info.size
            counts[bucket] += 1
    now = datetime.now(UTC)
    # when it was measured (the day's first measurement is the one kept); a past day's at its last second
    when = (now if now.date() == day else datetime.combine(day, datetime.max.time(), tzinfo=UTC)).isoformat()
    records = [
        {
            "id": record_id(day, bucket),
            "meter": METER,
            "subject": tenant,
            "time": when,
            "value": sizes[bucket],
            "dimensions": {"bucket": bucket, "objects": str(counts[bucket])},
        }
        for bucket in TENANT_BUCKETS
    ]
    with runtime.db.session() as session:
        metering.record(session, records, source="ingestion")
    return sizes


def measure_storage(runtime: Runtime, day: date | None = None) -> int:
    """Measure every tenant not measured yet on `day` (today, UTC); returns how many were measured."""
    day = day or datetime.now(UTC).date()
    done = _measured(runtime, day)
    with runtime.db.read_session() as session:
        tenants = [tenant for tenant in session.scalars(select(Partner.id).order_by(Partner.id)) if tenant not in done]
    for tenant in tenants:
        sizes = measure_tenant(runtime, tenant, day)
        log.info("storage_measured", tenant=tenant, day=day.isoformat(), bytes=sum(sizes.values()), buckets=sizes)
    return len(tenants)


def register(runtime: Runtime) -> None:
    """The daily meter, every STORAGE_METER_INTERVAL_S in the ingestion worker."""
    run_in_worker(
        runtime, "ingestion-storage-meter", lambda: measure_storage(runtime), runtime.settings.storage_meter_interval_s
    )
