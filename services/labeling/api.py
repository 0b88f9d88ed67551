"""Labeling's HTTP API: annotators (internal token), the annotation queue (annotator token), and the
dataset owner's views: tasks, stats, settings, review, snapshots and exports (partner key)."""

from __future__ import annotations

from typing import Any

from flask import Response, current_app, stream_with_context
from flask_smorest import Blueprint
from sqlalchemy import select

from services.labeling import queue, snapshots, stats
from services.labeling.annotators import create_annotator, current_annotator, require_annotator
from services.labeling.content import task_content
from services.labeling.models import Annotator, LabelingDataset, Lease, Snapshot, Task
from services.labeling.schemas import (
    AnnotateSchema,
    AnnotationSchema,
    AnnotatorCreateSchema,
    AnnotatorFiguresSchema,
    AnnotatorSchema,
    DatasetStateSchema,
    ExportQuery,
    IssuedAnnotatorSchema,
    LabelingSettingsSchema,
    NextTaskQuery,
    ResolveSchema,
    SnapshotListSchema,
    SnapshotSchema,
    StatsSchema,
    TaskForAnnotatorSchema,
    TaskListQuery,
    TaskListSchema,
    TaskSchema,
)
from shared.auth import current_principal, require_internal, require_partner_or_internal, requires_scope
from shared.errors import NotFound, Unprocessable
from shared.logging import current_trace_id, get_logger
from shared.ratelimit import TOO_MANY_REQUESTS
from shared.runtime import Runtime

log = get_logger(__name__)

datasets = Blueprint("labeling_datasets", __name__, url_prefix="/v1/datasets", description="Datasets being labeled")
tasks = Blueprint("tasks", __name__, url_prefix="/v1", description="The annotation queue")
annotators = Blueprint("annotators", __name__, url_prefix="/v1/annotators", description="Annotators")


def _runtime() -> Runtime:
    return current_app.extensions["flywheel"]


def _visible(tenant: str) -> bool:
    principal = current_principal()
    return principal.internal or principal.tenant == tenant


def owned_dataset(dataset_id: str) -> LabelingDataset:
    """The caller's dataset (any, for the internal token); another tenant's or an unknown id answers 404."""
    with _runtime().db.session() as session:
        dataset = session.get(LabelingDataset, dataset_id)
    if dataset is None or not _visible(dataset.tenant):
        raise NotFound(f"dataset {dataset_id} does not exist")
    return dataset


# -- annotators -------------------------------------------------------------------------------------------


@annotators.post("")
@require_internal
@annotators.arguments(AnnotatorCreateSchema)
@annotators.response(201, IssuedAnnotatorSchema)
def post_annotator(body: dict[str, Any]) -> dict[str, Any]:
    """Create an annotator for some of a tenant's datasets; its token is shown once."""
    runtime = _runtime()
    with runtime.db.session() as session:
        found = set(
            session.scalars(
                select(LabelingDataset.id).where(
                    LabelingDataset.id.in_(body["datasets"]), LabelingDataset.tenant == body["tenant"]
                )
            )
        )
    missing = sorted(set(body["datasets"]) - found)
    if missing:
        raise Unprocessable("unknown datasets for this tenant", {"fields": {"datasets": missing}})
    annotator, token = create_annotator(runtime, body["tenant"], body["name"], body["datasets"])
    log.info("annotator_created", annotator_id=annotator.id, tenant=annotator.tenant, datasets=annotator.datasets)
    return {"annotator": annotator, "token": token}


@annotators.get("")
@require_internal
@annotators.response(200, AnnotatorSchema(many=True))
def get_annotators() -> list[Annotator]:
    with _runtime().db.session() as session:
        return list(session.scalars(select(Annotator).order_by(Annotator.created_at)))


@annotators.get("/me")
@require_annotator
@annotators.response(200, AnnotatorFiguresSchema)
def get_me() -> dict[str, Any]:
    """Who you are and your own figures per dataset you may label: annotations, skips, agreement with consensus."""
    return stats.annotator_figures(_runtime(), current_annotator())


# -- the queue (annotators) -------------------------------------------------------------------------------


@datasets.get("/<dataset_id>/tasks/next")
@require_annotator
@datasets.arguments(NextTaskQuery, location="query")
@datasets.response(200, TaskForAnnotatorSchema)
@datasets.alt_response(204, description="Nothing left to label for you right now.")
def get_next_task(query: dict[str, Any], dataset_id: str) -> Any:
    """Lease the next task to label: feedback first, then the model's least confident guesses."""
    runtime = _runtime()
    annotator = current_annotator()
    if dataset_id not in annotator.datasets:
        raise NotFound(f"dataset {dataset_id} does not exist")
    task = queue.next_task(runtime, annotator.id, dataset_id, query["lease_seconds"])
    if task is None:
        return Response(status=204)
    with runtime.db.session() as session:
        lease = session.scalar(select(Lease).where(Lease.task_id == task.id, Lease.annotator_id == annotator.id))
        dataset = session.get(LabelingDataset, dataset_id)
        task.labels = list(dataset.labels)
        task.task_type = dataset.task_type
    text = None
    if task.kind == "text":
        text = task_content(runtime.storage, task).decode("utf-8", errors="replace")
    task.text = text  # shown to the annotator beside the task, not stored on it
    task.lease_expires_at = lease.expires_at
    return task


def _annotation_response(task: Task, annotation: Any) -> dict[str, Any]:
    return {
        "id": annotation.id,
        "task_id": task.id,
        "annotator_id": annotation.annotator_id,
        "source": annotation.source,
        "label": annotation.label,
        "spans": annotation.spans,
        "skipped": annotation.skipped,
        "task_status": task.status,
        "consensus_label": task.consensus_label,
        "consensus_spans": task.consensus_spans,
    }


@tasks.post("/tasks/<int:task_id>/annotations")
@require_annotator
@tasks.arguments(AnnotateSchema)
@tasks.response(201, AnnotationSchema)
@tasks.alt_response(200, schema=AnnotationSchema, description="An edit of your earlier label.")
@tasks.alt_response(429, **TOO_MANY_REQUESTS)
def post_annotation(body: dict[str, Any], task_id: int) -> Any:
    """Label a task you hold a lease on, or change your label before consensus: a class `label`, or for a
    token_classification task its entity `spans` (`[]` when the text has none). A new label that would pass the
    tenant's monthly `annotations` quota is refused (429 `quota_exhausted`) and recorded nowhere; an edit never is."""
    annotator = current_annotator()
    task, annotation, created = queue.annotate(
        _runtime(),
        annotator.id,
        task_id,
        body.get("label"),
        spans=body.get("spans"),
        allowed_datasets=annotator.datasets,
    )
    return _annotation_response(task, annotation), 201 if created else 200


@tasks.post("/tasks/<int:task_id>/skip")
@require_annotator
@tasks.response(200, AnnotationSchema)
def post_skip(task_id: int) -> dict[str, Any]:
    """Pass on a task: it is not handed to you again and goes back to the queue for others."""
    annotator = current_annotator()
    task, annotation, _ = queue.annotate(_runtime(), annotator.id, task_id, None, allowed_datasets=annotator.datasets)
    return _annotation_response(task, annotation)


@tasks.get("/tasks/<int:task_id>/content")
@require_annotator
@tasks.doc(responses={200: {"description": "The item's bytes (image or UTF-8 text)."}})
def get_task_content(task_id: int) -> Response:
    runtime = _runtime()
    annotator = current_annotator()
    with runtime.db.session() as session:
        task = session.get(Task, task_id)
    if task is None or task.dataset_id not in annotator.datasets:
        raise NotFound(f"task {task_id} does not exist")
    return Response(
        task_content(runtime.storage, task),
        mimetype="text/plain" if task.kind == "text" else "application/octet-stream",
    )


# -- the dataset owner's views ----------------------------------------------------------------------------


@datasets.get("/<dataset_id>")
@require_partner_or_internal
@requires_scope("read")
@datasets.response(200, DatasetStateSchema)
def get_dataset_state(dataset_id: str) -> LabelingDataset:
    return owned_dataset(dataset_id)


@datasets.patch("/<dataset_id>/settings")
@require_partner_or_internal
@requires_scope("admin")
@datasets.arguments(LabelingSettingsSchema)
@datasets.response(200, DatasetStateSchema)
def patch_settings(body: dict[str, Any], dataset_id: str) -> LabelingDataset:
    """Labeling's own settings: auto-accept threshold (off by default), minimum agreement, escalations."""
    owned_dataset(dataset_id)
    with _runtime().db.session() as session:
        dataset = session.get(LabelingDataset, dataset_id)
        for field, value in body.items():
            setattr(dataset, field, value)
    log.info("labeling_settings_changed", dataset_id=dataset_id, **body)
    return dataset


@datasets.get("/<dataset_id>/tasks")
@require_partner_or_internal
@requires_scope("read")
@datasets.arguments(TaskListQuery, location="query")
@datasets.response(200, TaskListSchema)
def list_tasks(query: dict[str, Any], dataset_id: str) -> dict[str, Any]:
    """The dataset's labeling tasks in creation order, paged by the `after` cursor."""
    owned_dataset(dataset_id)
    statement = select(Task).where(Task.dataset_id == dataset_id, Task.id > query["after"])
    if "status" in query:
        statement = statement.where(Task.status == query["status"])
    with _runtime().db.session() as session:
        found = session.scalars(statement.order_by(Task.id).limit(query["limit"])).all()
    next_after = found[-1].id if len(found) == query["limit"] else None
    return {"tasks": found, "next_after": next_after}


@tasks.post("/tasks/<int:task_id>/resolve")
@require_partner_or_internal
@requires_scope("label")
@tasks.arguments(ResolveSchema)
@tasks.response(200, TaskSchema)
def post_resolve(body: dict[str, Any], task_id: int) -> Task:
    """Decide a task that annotators could not agree on (status `review`)."""
    tenant = None if current_principal().internal else current_principal().tenant
    return queue.resolve(_runtime(), task_id, tenant, body.get("label"), body.get("spans"))


@datasets.get("/<dataset_id>/stats")
@require_partner_or_internal
@requires_scope("read")
@datasets.response(200, StatsSchema)
def get_stats(dataset_id: str) -> dict[str, Any]:
    """Task counts, label distribution, percent agreement, Fleiss' kappa (pairwise entity F1 for token
    classification), and per-annotator agreement."""
    return stats.dataset_stats(_runtime(), owned_dataset(dataset_id))


@datasets.post("/<dataset_id>/snapshots")
@require_partner_or_internal
@requires_scope("admin")
@datasets.response(201, SnapshotSchema)
def post_snapshot(dataset_id: str) -> Snapshot:
    """Freeze the current consensus into an immutable dataset version (manifest in object storage)."""
    runtime = _runtime()
    owned_dataset(dataset_id)
    with runtime.db.session() as session:
        dataset = session.get(LabelingDataset, dataset_id)
        snapshot = Snapshot(
            id=snapshots.new_snapshot_id(),
            tenant=dataset.tenant,
            dataset_id=dataset.id,
            reason="manual",
            trigger_training=False,
            trace_id=current_trace_id(),
        )
        session.add(snapshot)
    built = snapshots.build_snapshot(runtime, snapshot.id)
    if built.status != "ready":
        with runtime.db.session() as session:
            session.delete(session.get(Snapshot, snapshot.id))
        raise Unprocessable(f"cannot take a snapshot: {built.failure}")
    return built


@datasets.get("/<dataset_id>/snapshots")
@require_partner_or_internal
@requires_scope("read")
@datasets.response(200, SnapshotListSchema)
def list_snapshots(dataset_id: str) -> dict[str, Any]:
    owned_dataset(dataset_id)
    with _runtime().db.session() as session:
        found = session.scalars(
            select(Snapshot).where(Snapshot.dataset_id == dataset_id).order_by(Snapshot.created_at.desc())
        )
        return {"snapshots": found.all()}


def owned_snapshot(snapshot_id: str) -> Snapshot:
    with _runtime().db.session() as session:
        snapshot = session.get(Snapshot, snapshot_id)
    if snapshot is None or not _visible(snapshot.tenant):
        raise NotFound(f"snapshot {snapshot_id} does not exist")
    return snapshot


@tasks.get("/snapshots/<snapshot_id>")
@require_partner_or_internal
@requires_scope("read")
@tasks.response(200, SnapshotSchema)
def get_snapshot(snapshot_id: str) -> Snapshot:
    return owned_snapshot(snapshot_id)


@tasks.get("/snapshots/<snapshot_id>/export")
@require_partner_or_internal
@requires_scope("read")
@tasks.arguments(ExportQuery, location="query")
@tasks.doc(responses={200: {"description": "JSONL or CSV, one labeled item per line, text inline."}})
def export_snapshot(query: dict[str, Any], snapshot_id: str) -> Response:
    runtime = _runtime()
    snapshot = owned_snapshot(snapshot_id)
    snapshots.read_manifest(runtime, snapshot)  # fail before streaming starts, with a proper error
    mimetype = "application/x-ndjson" if query["format"] == "jsonl" else "text/csv"
    body = stream_with_context(snapshots.export(runtime, snapshot, query["format"]))
    response = Response(body, mimetype=mimetype)
    response.headers["Content-Disposition"] = f'attachment; filename="{snapshot_id}.{query["format"]}"'
    return response
