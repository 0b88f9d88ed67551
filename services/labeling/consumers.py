"""Events labeling consumes, and the tasks it queues for itself (snapshot builds, pre-labels)."""

from __future__ import annotations

import hashlib
from typing import Any

from sqlalchemy import select

from services.labeling import assist, erasure, redaction, snapshots
from services.labeling.models import Annotation, LabelingDataset, Task
from services.labeling.queue import BUILD_SNAPSHOT_TASK, apply_consensus, queue_snapshot
from services.labeling.spans import canonical, is_span_dataset, span_errors
from shared.db import insert_if_absent
from shared.events.consumer import EventContext, EventHandlers, RejectEvent
from shared.logging import get_logger, log_context
from shared.runtime import Runtime

log = get_logger(__name__)

handlers = EventHandlers("labeling")

FEEDBACK_PRIORITY = 100
SAMPLE_PRIORITY = 50
"""Production traffic sampled for labeling comes after feedback, before the unlabeled pool: it is the loop's
fresh test data, and live accuracy waits for it."""


def _locked_dataset(ctx: EventContext, dataset_id: str, *, share: bool = False) -> LabelingDataset | None:
    """The dataset's row, read again and locked until the event's transaction ends (`share`: against changes only,
    for a consumer that reads the settings and never writes the row): a consumer that applies the dataset's PII
    policy runs one at a time with those that change it, so a task made meanwhile is either made under the new
    policy or there when the change scans the queue."""
    if ctx.runtime.db.is_sqlite:  # one writer at a time already
        return ctx.session.get(LabelingDataset, dataset_id, populate_existing=True)
    return ctx.session.get(LabelingDataset, dataset_id, with_for_update={"read": share}, populate_existing=True)


def _upsert_dataset(ctx: EventContext, config: dict[str, Any], *, lock: bool) -> tuple[LabelingDataset, bool]:
    """The dataset, its settings (PII policy included) taken from the event's `config` unless the row already
    holds a newer revision (events arrive out of order: a retry, two workers). `lock`: hold the row exclusively
    to the end of the transaction whatever the config says (a change of settings); otherwise it is locked only
    when the config changes it, so that pushes to one dataset are not handled one at a time. Returns the row and
    whether its settings are the config's."""
    settings = _settings(config)
    insert_if_absent(
        ctx.session,
        LabelingDataset,
        {
            "id": config["dataset_id"],
            "tenant": ctx.envelope.tenant,
            **settings,
            "labels_since_snapshot": 0,
            "min_agreement": 0.5,
            "max_extra_annotations": 2,
        },
    )
    dataset = (
        _locked_dataset(ctx, config["dataset_id"]) if lock else ctx.session.get(LabelingDataset, config["dataset_id"])
    )
    if dataset is None or dataset.tenant != ctx.envelope.tenant:
        raise RejectEvent(f"dataset {config['dataset_id']} is not tenant {ctx.envelope.tenant}'s")
    changes = _changes(dataset, config)
    if changes and not lock:  # about to write: exclusive from here, and read again
        dataset = _locked_dataset(ctx, dataset.id) or dataset
        changes = _changes(dataset, config)
    if changes is None:
        log.info(
            "dataset_config_superseded",
            dataset_id=dataset.id,
            revision=config["revision"],
            held=dataset.config_revision,
        )
        return dataset, False
    for column, value in changes.items():
        setattr(dataset, column, value)
    ctx.session.flush()
    return dataset, True


def _changes(dataset: LabelingDataset, config: dict[str, Any]) -> dict[str, Any] | None:
    """The columns the event's config changes on the row; None when the row holds a newer revision than the
    event's."""
    revision = config.get("revision")
    if revision is not None and dataset.config_revision is not None and revision < dataset.config_revision:
        return None
    return {column: value for column, value in _settings(config).items() if getattr(dataset, column) != value}


def _settings(config: dict[str, Any]) -> dict[str, Any]:
    """The dataset columns an event's config sets."""
    settings = {
        "name": config["name"],
        "task_type": config["task_type"],
        "labels": list(config["labels"]),
        "overlap": config["overlap"],
        "retrain_threshold": config["retrain_threshold"],
    }
    if config.get("revision") is not None:
        settings["config_revision"] = config["revision"]
    if config.get("pii_policy") is not None:  # an event from before the policy was carried says nothing of it
        settings["pii_policy"] = config["pii_policy"]
        settings["pii_entities"] = config.get("pii_entities")
    return settings


@handlers.on("dataset.changed")
def on_dataset_changed(ctx: EventContext) -> None:
    """The dataset's settings (`_upsert_dataset`: an event older than the settings held changes nothing); a PII
    policy turned on (or naming other entities) redacts the text of its production tasks without consensus
    (`redaction.on_policy_changed`)."""
    config = ctx.payload["dataset"]
    dataset, applied = _upsert_dataset(ctx, config, lock=True)
    if applied and config.get("pii_policy") is not None:
        redaction.on_policy_changed(ctx.runtime, ctx.session, dataset)
    log.info("dataset_configured", dataset_id=config["dataset_id"], revision=config.get("revision"), applied=applied)


@handlers.on("item.ingested")
def on_item_ingested(ctx: EventContext) -> None:
    """One task per new item; a partner's label (or entity spans) counts as one annotation (source `partner`)."""
    dataset, _ = _upsert_dataset(ctx, ctx.payload["dataset"], lock=False)
    items = ctx.payload["items"]
    known = set(ctx.session.scalars(select(Task.item_id).where(Task.item_id.in_([i["item_id"] for i in items]))))
    created: list[Task] = []
    for item in items:
        if item["item_id"] in known:
            continue
        content = item["content"]
        task = Task(
            item_id=item["item_id"],
            tenant=ctx.envelope.tenant,
            dataset_id=dataset.id,
            kind=item["kind"],
            bucket=content["bucket"],
            object_key=content["key"],
            sha256=content["sha256"],
            offset=content.get("offset"),
            length=content.get("length"),
            source="ingestion",
            status="open",
            priority=0,
            required=dataset.overlap,
        )
        ctx.session.add(task)
        created.append(task)
    ctx.session.flush()
    partner_labeled = 0
    for task, item in zip(created, [i for i in items if i["item_id"] not in known], strict=True):
        answer = _partner_answer(dataset, item)
        if answer is not None:
            ctx.session.add(Annotation(task_id=task.id, annotator_id="partner", source="partner", **answer))
            ctx.session.flush()
            apply_consensus(ctx.runtime, ctx.session, task, dataset)
            partner_labeled += 1
    if dataset.production_model and created:
        assist.queue_prelabels(ctx.runtime, ctx.session, [t.id for t in created if t.status == "open"])
    log.info(
        "tasks_created",
        dataset_id=dataset.id,
        created=len(created),
        received=len(items),
        partner_labeled=partner_labeled,
    )


def _partner_answer(dataset: LabelingDataset, item: dict[str, Any]) -> dict[str, Any] | None:
    """What a pushed item says of itself: its class label, or for token classification its entity spans (`[]`:
    labeled, no entity), when they fit the dataset's labels; None for an unlabeled item."""
    if is_span_dataset(dataset.task_type):
        marked = item.get("spans")
        if marked is None or any(span["label"] not in dataset.labels for span in marked):
            return None
        return {"spans": canonical(marked)}
    if item.get("label") in dataset.labels:
        return {"label": item["label"]}
    return None


@handlers.on("item.deleted")
def on_item_deleted(ctx: EventContext) -> None:
    """An erased item leaves the queue and every future snapshot, its annotations go, and the snapshots that
    held it are marked (`erasure.py`); the erasure's report gets labeling's counts."""
    payload = ctx.payload
    counts = erasure.erase_items(ctx.runtime, ctx.session, ctx.envelope.tenant, payload["item_ids"])
    if payload.get("erasure_id") is not None:
        ctx.publish("erasure.step_completed", erasure.step_report(payload["erasure_id"], ctx.envelope.event_id, counts))
    log.info("tasks_withdrawn", dataset_id=payload["dataset_id"], erasure_id=payload.get("erasure_id"), **counts)


@handlers.on("prediction.erased")
def on_prediction_erased(ctx: EventContext) -> None:
    """Inference erased logged predictions (a data subject's): the tasks made from them go like an item's."""
    payload = ctx.payload
    counts = erasure.erase_predictions(ctx.runtime, ctx.session, ctx.envelope.tenant, payload["prediction_ids"])
    ctx.publish("erasure.step_completed", erasure.step_report(payload["erasure_id"], ctx.envelope.event_id, counts))
    log.info("prediction_tasks_withdrawn", erasure_id=payload["erasure_id"], **counts)


@handlers.on("model.promoted")
def on_model_promoted(ctx: EventContext) -> None:
    """Remember the dataset's production model and pre-label its open tasks with it."""
    payload = ctx.payload
    if payload["alias"] != "production":
        return
    dataset = ctx.session.get(LabelingDataset, payload["dataset_id"])
    if dataset is None or dataset.tenant != ctx.envelope.tenant:
        log.warning("promotion_for_unknown_dataset", dataset_id=payload["dataset_id"])
        return
    dataset.production_model = payload["model_name"] if payload["version"] is not None else None
    dataset.production_version = payload["version"]
    if dataset.production_model is None:
        return
    open_ids = list(ctx.session.scalars(select(Task.id).where(Task.dataset_id == dataset.id, Task.status == "open")))
    assist.queue_prelabels(ctx.runtime, ctx.session, open_ids)
    log.info("production_model_set", dataset_id=dataset.id, model=payload["model_name"], version=payload["version"])


def _prediction_task(
    dataset: LabelingDataset, item_id: str, prediction: dict, model_name: str, *, source: str, priority: int
) -> Task:
    """An open task for a logged prediction (fed back, or sampled from production traffic), pre-labeled with what
    the model answered and tagged with the version that answered, so its consensus can go back as ground truth."""
    content = prediction["input"]
    confidence = prediction.get("confidence")
    return Task(
        item_id=item_id,
        tenant=dataset.tenant,
        dataset_id=dataset.id,
        kind="image" if dataset.task_type == "image_classification" else "text",
        bucket=content["bucket"],
        object_key=content["key"],
        sha256=content["sha256"],
        offset=content.get("offset"),
        length=content.get("length"),
        source=source,
        status="open",
        priority=priority,
        required=dataset.overlap,
        prelabel=prediction["predicted_label"] or None,
        prelabel_confidence=confidence,
        prelabel_model=model_name,
        prelabel_version=prediction["model_version"],
        uncertainty=None if confidence is None else 1.0 - confidence,
        prediction_id=prediction["prediction_id"],
    )


@handlers.on("prediction.feedback")
def on_prediction_feedback(ctx: EventContext) -> None:
    """A user's correction becomes a high-priority task: a class label's pre-labeled with what was served and the
    fix; corrected entity spans' (token classification) pre-labeled with the corrected spans."""
    payload = ctx.payload
    dataset = _locked_dataset(ctx, payload["dataset_id"], share=True)
    if dataset is None or dataset.tenant != ctx.envelope.tenant:
        raise RejectEvent(f"feedback names dataset {payload['dataset_id']}, unknown for this tenant")
    spans = payload.get("correct_spans")
    if (spans is not None) != is_span_dataset(dataset.task_type):
        given = "entity spans" if spans is not None else "a class label"
        raise RejectEvent(f"feedback gives {given} for {dataset.task_type} dataset {dataset.id}")
    if spans is None and payload["correct_label"] not in dataset.labels:
        raise RejectEvent(f"feedback label {payload['correct_label']!r} is not in the dataset's label set")
    item_id = f"fb_{payload['prediction_id']}"[:60]
    if ctx.session.scalar(select(Task.id).where(Task.item_id == item_id)) is not None:
        return
    if spans is not None:
        _span_feedback_task(ctx, dataset, item_id, payload)
        return
    if dataset.task_type == "text_classification":  # the dataset's PII policy, if inference's log predates it
        reference = redaction.feedback_input(ctx.runtime, dataset, payload["prediction_id"], payload["input"])
        payload = {**payload, "input": reference}
    task = _prediction_task(
        dataset, item_id, payload, payload["model_name"], source="feedback", priority=FEEDBACK_PRIORITY
    )
    task.feedback = {"correct_label": payload["correct_label"], "prediction_id": payload["prediction_id"]}
    ctx.session.add(task)
    log.info("feedback_task_created", dataset_id=dataset.id, prediction_id=payload["prediction_id"])


def _span_feedback_task(ctx: EventContext, dataset: LabelingDataset, item_id: str, payload: dict[str, Any]) -> None:
    """A span task pre-labeled with the corrected entities, checked against the fed-back text and the dataset's
    entity labels (a span that does not fit dead-letters the event); where the dataset's PII policy makes labeling
    redact the text, the spans are moved onto the redacted text (one over a redacted range is dropped)."""
    reference = payload["input"]
    data = redaction.read_bytes(ctx.runtime, reference)
    if hashlib.sha256(data).hexdigest() != reference["sha256"]:
        raise RejectEvent(f"the input of prediction {payload['prediction_id']} does not match its sha256 (erased?)")
    text = data.decode("utf-8")
    errors = span_errors(text, payload["correct_spans"], dataset.labels)
    if errors:
        raise RejectEvent(f"the feedback's spans do not fit the text or the dataset's entity labels: {errors}")
    stored, redacted = redaction.span_feedback_input(ctx.runtime, dataset, payload["prediction_id"], reference, text)

    correct = redaction.moved_spans(redacted, payload["correct_spans"])
    predicted = redaction.moved_spans(redacted, payload.get("predicted_spans") or [])
    task = _prediction_task(
        dataset,
        item_id,
        {**payload, "input": stored},
        payload["model_name"],
        source="feedback",
        priority=FEEDBACK_PRIORITY,
    )
    task.prelabel_spans = correct
    task.feedback = {"correct_spans": correct, "predicted_spans": predicted, "prediction_id": payload["prediction_id"]}
    ctx.session.add(task)
    log.info(
        "feedback_task_created",
        dataset_id=dataset.id,
        prediction_id=payload["prediction_id"],
        entities=len(correct),
        dropped=len(payload["correct_spans"]) - len(correct),
    )


@handlers.on("prediction.sampled")
def on_prediction_sampled(ctx: EventContext) -> None:
    """Production predictions the model's sampling policy picked become tasks tagged with the version that made
    them; their consensus goes back to inference as ground truth (`prediction.labeled`)."""
    payload = ctx.payload
    dataset = _locked_dataset(ctx, payload["dataset_id"], share=True)
    if dataset is None or dataset.tenant != ctx.envelope.tenant:
        raise RejectEvent(f"sampled predictions name dataset {payload['dataset_id']}, unknown for this tenant")
    items = payload["items"]
    item_ids = {f"sp_{item['prediction_id']}"[:60]: item for item in items}
    known = set(ctx.session.scalars(select(Task.item_id).where(Task.item_id.in_(list(item_ids)))))
    created = [
        _prediction_task(dataset, item_id, item, payload["model_name"], source="sample", priority=SAMPLE_PRIORITY)
        for item_id, item in item_ids.items()
        if item_id not in known
    ]
    ctx.session.add_all(created)
    ctx.session.flush()
    if dataset.pii_redacted_with is not None:  # sampled before the policy was on, queued after labeling applied it
        redaction.redact_tasks(ctx.runtime, ctx.session, dataset, [t for t in created if t.kind == "text"])
    log.info("sampled_tasks_created", dataset_id=dataset.id, created=len(item_ids) - len(known), received=len(items))


@handlers.on("model.degraded")
def on_model_degraded(ctx: EventContext) -> None:
    """A monitoring alert: freeze the current consensus and request a retrain that records the alert's reason.
    The new version goes through the promotion gate like any other."""
    payload = ctx.payload
    dataset = ctx.session.get(LabelingDataset, payload["dataset_id"])
    if dataset is None or dataset.tenant != ctx.envelope.tenant:
        raise RejectEvent(f"the alert names dataset {payload['dataset_id']}, unknown for this tenant")
    version = f"{payload['model_name']} v{payload['model_version']}"
    reason = f"monitoring: {payload['reason']} (alert {payload['alert_id']}, {version})"
    snapshot = queue_snapshot(
        ctx.runtime, ctx.session, dataset, reason="monitoring", trigger_training=True, training_reason=reason[:500]
    )
    log.info(
        "monitoring_retrain_requested",
        dataset_id=dataset.id,
        snapshot_id=snapshot.id,
        alert_id=payload["alert_id"],
        kind=payload["kind"],
        model_name=payload["model_name"],
        model_version=payload["model_version"],
    )


def register_tasks(runtime: Runtime) -> None:
    @runtime.celery.task(name=BUILD_SNAPSHOT_TASK, acks_late=True, ignore_result=True, shared=False)
    def build_snapshot(snapshot_id: str) -> str:
        with log_context(service=runtime.service, snapshot_id=snapshot_id):
            return snapshots.build_snapshot(runtime, snapshot_id).status

    inference = assist.inference_client(runtime)

    @runtime.celery.task(name=assist.PRELABEL_TASK, acks_late=True, ignore_result=True, shared=False)
    def prelabel(task_ids: list[int], trace_id: str | None = None) -> int:
        with log_context(service=runtime.service, trace_id=trace_id):
            return assist.prelabel(runtime, inference, task_ids)


@handlers.on("training.recipe_chosen")
def on_recipe_chosen(ctx: EventContext) -> None:
    """A training run's recipe search asked to keep its winner (`keep_winner`): lay the winning values over the
    dataset's training hyper-parameters, so that later retrain cycles train with them."""
    payload = ctx.payload
    dataset = ctx.session.get(LabelingDataset, payload["dataset_id"])
    if dataset is None or dataset.tenant != ctx.envelope.tenant:
        raise RejectEvent(f"the search's run names dataset {payload['dataset_id']}, unknown for this tenant")
    dataset.training_hyperparameters = {**(dataset.training_hyperparameters or {}), **payload["hyperparameters"]}
    log.info(
        "dataset_recipe_kept",
        dataset_id=dataset.id,
        run_id=payload["run_id"],
        hyperparameters=payload["hyperparameters"],
        validation_macro_f1=payload["validation_macro_f1"],
    )
