"""Erasure that reaches every copy: an item's, a data subject's, or what a tenant's retention period no longer keeps.

Ingestion owns the erasure record (`ers_…`) and its report. It erases what it holds itself, the items' rows and
content (an image object is deleted; a text packed with others is overwritten with zero bytes in place, so its
neighbours' offsets stay valid), in the same transaction as the `item.deleted` events (one per dataset and batch)
that carry the erasure's id. A subject's erasure also emits `erasure.requested`, for inference's prediction log.

Every consumer reports its part with `erasure.step_completed`, naming the event it handled as its step. The
report keeps one row per (service, step), so a redelivered report counts once, and the erasure is completed when
every step it expects has reported: ingestion's own, one labeling step per `item.deleted`, inference's, and the
labeling steps inference's step set off (`expects`).

The retention sweep (a daemon thread of the ingestion worker, like the storage meter) erases each tenant's items
older than its `item_retention_days` through the same path, as an erasure of kind `retention`.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.ingestion.models import Erasure, ErasureStep, Item, Partner
from shared.errors import NotFound
from shared.events.catalog import ERASURE_SERVICES
from shared.events.consumer import RejectEvent
from shared.logging import get_logger
from shared.periodic import run_in_worker
from shared.runtime import Runtime

log = get_logger(__name__)

BATCH_ITEMS = 500
"""Items erased per transaction (and at most per `item.deleted`)."""
SWEEP_MAX_BATCHES = 20
"""A retention sweep erases at most this many batches per tenant; the next sweep goes on."""
RETENTION_SWEEP_INTERVAL_S = 3600.0
INGESTION_STEP = "items"


def _ref(service: str, step: str) -> dict[str, str]:
    return {"service": service, "step": step}


def _aware(moment: datetime | None) -> datetime | None:
    """SQLite hands timestamps back naive; every one we store is UTC."""
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment


# -- starting erasures ---------------------------------------------------------------------------------------


def erase_item(runtime: Runtime, tenant: str, item_id: str) -> Erasure:
    """Erase one item (a partner's request): its content and row now, its copies through `item.deleted`."""
    with runtime.db.session() as session:
        item = session.get(Item, item_id)
        if item is None or item.tenant != tenant:
            raise NotFound(f"item {item_id} does not exist")
        erasure = Erasure(tenant=tenant, kind="item", item_id=item_id, expected=[_ref("ingestion", INGESTION_STEP)])
        session.add(erasure)
        session.flush()
        counts = _erase_batch(runtime, session, erasure, [item_id])
        if not counts["items"]:  # a deletion that held the pack's lock before us took it: nothing was erased
            raise NotFound(f"item {item_id} does not exist")
        _finish_ingestion(session, erasure, counts)
    log.info("item_erased", erasure_id=erasure.id, item_id=item_id, **counts)
    return erasure


def erase_subject(runtime: Runtime, tenant: str, subject_id: str) -> Erasure:
    """Erase every item of the tenant's data subject, and (through inference) the subject's logged predictions.
    A subject with no items is still an erasure: its predictions may be logged."""
    with runtime.db.session() as session:
        erasure = Erasure(
            tenant=tenant, kind="subject", subject_id=subject_id, expected=[_ref("ingestion", INGESTION_STEP)]
        )
        session.add(erasure)
        session.flush()
        requested = runtime.bus.publish(
            session, "erasure.requested", {"erasure_id": erasure.id, "subject_id": subject_id}, tenant=tenant
        )
        erasure.expected = [*erasure.expected, _ref("inference", requested.event_id)]
    statement = select(Item.id).where(Item.tenant == tenant, Item.subject_id == subject_id)
    counts = _erase_all(runtime, erasure.id, statement, max_batches=None)
    with runtime.db.session() as session:
        erasure = _locked(session, erasure.id)
        _finish_ingestion(session, erasure, counts)
    log.info("subject_erased", erasure_id=erasure.id, subject_id=subject_id, **counts)
    return erasure


def sweep_retention(runtime: Runtime, now: datetime | None = None) -> int:
    """Erase each tenant's items older than its `item_retention_days`; returns how many items went."""
    now = now or datetime.now(UTC)
    with runtime.db.read_session() as session:
        tenants = session.execute(
            select(Partner.id, Partner.item_retention_days).where(Partner.item_retention_days.is_not(None))
        ).all()
    erased = 0
    for tenant, days in tenants:
        cutoff = now - timedelta(days=days)
        statement = select(Item.id).where(Item.tenant == tenant, Item.created_at < cutoff)
        with runtime.db.read_session() as session:
            if session.scalar(statement.limit(1)) is None:
                continue
        erased += _erase_expired(runtime, tenant, cutoff, statement)
    return erased


def _erase_expired(runtime: Runtime, tenant: str, cutoff: datetime, statement: Any) -> int:
    with runtime.db.session() as session:
        erasure = Erasure(tenant=tenant, kind="retention", cutoff=cutoff, expected=[_ref("ingestion", INGESTION_STEP)])
        session.add(erasure)
    counts = _erase_all(runtime, erasure.id, statement, max_batches=SWEEP_MAX_BATCHES)
    with runtime.db.session() as session:
        erasure = _locked(session, erasure.id)
        if not counts["items"]:  # another worker's sweep erased them first: no report of nothing
            session.delete(erasure)
            return 0
        _finish_ingestion(session, erasure, counts)
    log.info("retention_items_erased", erasure_id=erasure.id, tenant=tenant, cutoff=cutoff.isoformat(), **counts)
    return counts["items"]


# -- erasing content ---------------------------------------------------------------------------------------------


def _erase_all(runtime: Runtime, erasure_id: str, statement: Any, *, max_batches: int | None) -> dict[str, int]:
    """Erase what `statement` (item ids) selects, a batch per transaction, until nothing is left (or the cap)."""
    totals = {"items": 0, "objects": 0, "bytes": 0}
    batches = 0
    while max_batches is None or batches < max_batches:
        with runtime.db.session() as session:
            erasure = _locked(session, erasure_id)
            item_ids = list(session.scalars(statement.order_by(Item.created_at, Item.id).limit(BATCH_ITEMS)))
            if not item_ids:
                break
            counts = _erase_batch(runtime, session, erasure, item_ids)
        for name, value in counts.items():
            totals[name] += value
        batches += 1
    return totals


def _erase_batch(runtime: Runtime, session: Session, erasure: Erasure, item_ids: list[str]) -> dict[str, int]:
    """Erase these items' content and rows, and emit one `item.deleted` per dataset (in this transaction).

    Every row sharing an object is locked first (packs in key order): two erasures touching one pack must not
    overwrite each other, and an item another erasure took while we waited is simply no longer there."""
    wanted = set(item_ids)
    located = session.execute(select(Item.bucket, Item.object_key).where(Item.id.in_(item_ids)))
    objects = sorted({(bucket, key) for bucket, key in located})
    counts = {"items": 0, "objects": 0, "bytes": 0}
    by_dataset: dict[str, list[str]] = defaultdict(list)
    for bucket, key in objects:
        sharing = session.scalars(
            select(Item).where(Item.bucket == bucket, Item.object_key == key).order_by(Item.id).with_for_update()
        ).all()
        erased = [row for row in sharing if row.id in wanted and row.tenant == erasure.tenant]
        if not erased:
            continue
        kept = [row for row in sharing if row not in erased]
        if kept and all(row.offset is not None for row in erased):
            pack = bytearray(runtime.storage.get_bytes(bucket, key, verify=False))
            for row in erased:
                pack[row.offset : row.offset + row.length] = bytes(row.length)
            stored = runtime.storage.put(bucket, key, bytes(pack))
            for neighbour in kept:
                neighbour.object_sha256 = stored.sha256
        else:
            runtime.storage.delete(bucket, key)
        counts["objects"] += 1
        for row in erased:
            counts["items"] += 1
            counts["bytes"] += row.length
            by_dataset[row.dataset_id].append(row.id)
            session.delete(row)
    expected = list(erasure.expected)
    for dataset_id, erased_ids in sorted(by_dataset.items()):
        payload = {
            "dataset_id": dataset_id,
            "item_ids": sorted(erased_ids),
            "erasure_id": erasure.id,
            "subject_id": erasure.subject_id,
        }
        envelope = runtime.bus.publish(session, "item.deleted", payload, tenant=erasure.tenant)
        expected.append(_ref("labeling", envelope.event_id))
    erasure.expected = expected
    return counts


# -- the report ----------------------------------------------------------------------------------------------------


def _locked(session: Session, erasure_id: str) -> Erasure:
    erasure = session.get(Erasure, erasure_id, with_for_update=True)
    if erasure is None:
        raise NotFound(f"erasure {erasure_id} does not exist")
    return erasure


def _finish_ingestion(session: Session, erasure: Erasure, counts: dict[str, int]) -> None:
    session.add(ErasureStep(erasure_id=erasure.id, service="ingestion", step=INGESTION_STEP, counts=counts))
    session.flush()
    _complete_if_done(session, erasure)


def record_step(session: Session, tenant: str | None, payload: dict[str, Any]) -> bool:
    """Keep a service's report of its part (once per service and step); True if it was new."""
    erasure = session.get(Erasure, payload["erasure_id"], with_for_update=True)
    if erasure is None or erasure.tenant != tenant:
        raise RejectEvent(f"erasure {payload['erasure_id']} is not this tenant's")
    known = session.scalar(
        select(ErasureStep.id).where(
            ErasureStep.erasure_id == erasure.id,
            ErasureStep.service == payload["service"],
            ErasureStep.step == payload["step"],
        )
    )
    if known is not None:
        return False
    session.add(
        ErasureStep(erasure_id=erasure.id, service=payload["service"], step=payload["step"], counts=payload["counts"])
    )
    expected = list(erasure.expected)
    for ref in payload.get("expects", []):  # received payloads are as sent: no defaults filled in
        if ref not in expected:
            expected.append(dict(ref))
    erasure.expected = expected
    session.flush()
    _complete_if_done(session, erasure)
    return True


def _complete_if_done(session: Session, erasure: Erasure) -> None:
    done = {(step.service, step.step) for step in _steps(session, erasure.id)}
    if erasure.status != "completed" and all((ref["service"], ref["step"]) in done for ref in erasure.expected):
        erasure.status = "completed"
        erasure.completed_at = datetime.now(UTC)
        log.info("erasure_completed", erasure_id=erasure.id, kind=erasure.kind)


def _steps(session: Session, erasure_id: str) -> list[ErasureStep]:
    return list(session.scalars(select(ErasureStep).where(ErasureStep.erasure_id == erasure_id)))


def tenant_erasure(runtime: Runtime, tenant: str, erasure_id: str) -> dict[str, Any]:
    """The erasure's report, for its tenant; another tenant's id answers 404 like an unknown one."""
    with runtime.db.read_session() as session:
        erasure = session.get(Erasure, erasure_id)
        if erasure is None or erasure.tenant != tenant:
            raise NotFound(f"erasure {erasure_id} does not exist")
        return report(erasure, _steps(session, erasure_id))


def list_erasures(runtime: Runtime, tenant: str, query: dict[str, Any]) -> dict[str, Any]:
    statement = select(Erasure).where(Erasure.tenant == tenant)
    if query.get("kind"):
        statement = statement.where(Erasure.kind == query["kind"])
    with runtime.db.read_session() as session:
        erasures = session.scalars(statement.order_by(Erasure.created_at.desc()).limit(query["limit"])).all()
        steps: dict[str, list[ErasureStep]] = defaultdict(list)
        if erasures:
            ids = [erasure.id for erasure in erasures]
            for step in session.scalars(select(ErasureStep).where(ErasureStep.erasure_id.in_(ids))):
                steps[step.erasure_id].append(step)
    return {"erasures": [report(erasure, steps[erasure.id]) for erasure in erasures]}


def report(erasure: Erasure, steps: list[ErasureStep]) -> dict[str, Any]:
    """What was removed where: per service, its steps' counts summed, and whether all its steps reported."""
    done = {(step.service, step.step): step for step in steps}
    services: dict[str, Any] = {}
    for service in ERASURE_SERVICES:
        expected = [ref["step"] for ref in erasure.expected if ref["service"] == service]
        if not expected:
            continue
        finished = [done[(service, step)] for step in expected if (service, step) in done]
        counts: dict[str, int] = {}
        for step in finished:
            for name, value in step.counts.items():
                counts[name] = counts.get(name, 0) + value
        services[service] = {
            "status": "completed" if len(finished) == len(expected) else "running",
            "steps": len(expected),
            "steps_completed": len(finished),
            "counts": counts,
            "completed_at": max((_aware(step.completed_at) for step in finished), default=None)
            if len(finished) == len(expected)
            else None,
        }
    return {
        "id": erasure.id,
        "kind": erasure.kind,
        "status": erasure.status,
        "subject_id": erasure.subject_id,
        "item_id": erasure.item_id,
        "cutoff": _aware(erasure.cutoff),
        "created_at": _aware(erasure.created_at),
        "completed_at": _aware(erasure.completed_at),
        "services": services,
    }


# -- the retention sweep -------------------------------------------------------------------------------------------


def register(runtime: Runtime) -> None:
    """The retention sweep, every RETENTION_SWEEP_INTERVAL_S in the ingestion worker."""
    run_in_worker(runtime, "ingestion-retention-sweep", lambda: sweep_retention(runtime), RETENTION_SWEEP_INTERVAL_S)
