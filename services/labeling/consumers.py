"""Events labeling consumes: datasets as ingestion configures them, and ingested items to label."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from services.labeling.models import LabelingDataset, Task
from shared.events.consumer import EventContext, EventHandlers
from shared.logging import get_logger

log = get_logger(__name__)

handlers = EventHandlers("labeling")


def _upsert_dataset(ctx: EventContext, config: dict[str, Any]) -> None:
    dataset = ctx.session.get(LabelingDataset, config["dataset_id"])
    if dataset is None:
        dataset = LabelingDataset(id=config["dataset_id"], tenant=ctx.envelope.tenant)
        ctx.session.add(dataset)
    dataset.name = config["name"]
    dataset.task_type = config["task_type"]
    dataset.labels = list(config["labels"])
    dataset.overlap = config["overlap"]
    dataset.retrain_threshold = config["retrain_threshold"]


@handlers.on("dataset.changed")
def on_dataset_changed(ctx: EventContext) -> None:
    _upsert_dataset(ctx, ctx.payload["dataset"])
    log.info("dataset_configured", dataset_id=ctx.payload["dataset"]["dataset_id"])


@handlers.on("item.ingested")
def on_item_ingested(ctx: EventContext) -> None:
    _upsert_dataset(ctx, ctx.payload["dataset"])
    dataset_id = ctx.payload["dataset"]["dataset_id"]
    items = ctx.payload["items"]
    known = set(ctx.session.scalars(select(Task.item_id).where(Task.item_id.in_([item["item_id"] for item in items]))))
    created = 0
    for item in items:
        if item["item_id"] in known:
            continue
        content = item["content"]
        ctx.session.add(
            Task(
                item_id=item["item_id"],
                tenant=ctx.envelope.tenant,
                dataset_id=dataset_id,
                kind=item["kind"],
                bucket=content["bucket"],
                object_key=content["key"],
                sha256=content["sha256"],
                offset=content.get("offset"),
                length=content.get("length"),
                partner_label=item.get("label"),
            )
        )
        created += 1
    log.info("tasks_created", dataset_id=dataset_id, created=created, received=len(items))
