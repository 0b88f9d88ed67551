"""Training's HTTP API: start runs (internal token), follow them (partner key or internal token), cancel them.

A partner sees its own runs only; another tenant's run answers 404, exactly like an unknown id.
"""

from __future__ import annotations

from typing import Any

from flask import current_app
from flask_smorest import Blueprint
from marshmallow import ValidationError
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from services.training import runs as run_lifecycle
from services.training.data import manifest_ref, read_snapshot_info
from services.training.failures import DataError
from services.training.limits import RETRY_AFTER_SECONDS
from services.training.models import TrainingRun
from services.training.requesting import InvalidRunRequest, RunSpec, request_run
from services.training.schemas import RunCreateSchema, RunLimitErrorSchema, RunListQuery, RunListSchema, RunSchema
from shared.auth import current_principal, require_internal, require_partner_or_internal, requires_scope
from shared.errors import NotFound, Unprocessable
from shared.logging import current_trace_id
from shared.runtime import Runtime

runs = Blueprint("training_runs", __name__, url_prefix="/v1/runs", description="Training runs")


def _runtime() -> Runtime:
    return current_app.extensions["flywheel"]


def _visible_run(session: Any, run_id: str) -> TrainingRun:
    run = session.scalar(select(TrainingRun).where(TrainingRun.id == run_id))
    principal = current_principal()
    if run is None or (not principal.internal and run.tenant != principal.tenant):
        raise NotFound(f"run {run_id} does not exist")
    return run


@runs.post("")
@require_internal
@runs.arguments(RunCreateSchema)
@runs.response(202, RunSchema, description="The run was created and queued (or recorded for an external launcher).")
@runs.alt_response(200, schema=RunSchema, description="An identical run is already active or succeeded.")
@runs.alt_response(
    429,
    schema=RunLimitErrorSchema,
    description="The tenant already has `max_queued_runs_per_tenant` runs queued "
    "(TRAINING_MAX_QUEUED_RUNS_PER_TENANT): `too_many_runs`, retry once one of them has started; or its month's "
    "training compute has reached a monthly quota: `quota_exhausted`, `details.meter` naming it "
    "(`training_cpu_seconds`, `training_gpu_seconds`), until the next month. Nothing was recorded or queued.",
    headers={
        "Retry-After": {
            "description": f"seconds to wait before retrying ({RETRY_AFTER_SECONDS}; a quota: until the next month)",
            "schema": {"type": "integer"},
        }
    },
)
def create_run(body: dict[str, Any]) -> tuple[TrainingRun, int]:
    """Train a model on a dataset snapshot. Hyper-parameters default per task; every one is validated.

    A run beyond its tenant's running slots (`max_running_runs_per_tenant`) is accepted and waits, queued,
    with `dispatched_at` null, until one of the tenant's runs ends."""
    runtime = _runtime()
    try:
        info = read_snapshot_info(runtime.storage, body["tenant"], body["dataset_id"], body["snapshot_id"])
    except DataError as exc:
        raise Unprocessable(exc.reason, {"fields": {"snapshot_id": [exc.reason]}}) from exc
    spec = RunSpec(
        tenant=body["tenant"],
        dataset_id=body["dataset_id"],
        snapshot_id=body["snapshot_id"],
        manifest=manifest_ref(body["tenant"], body["dataset_id"], body["snapshot_id"], info["manifest_sha256"]),
        task_type=info["task_type"],
        labels=list(info["labels"]),
        reason=body["reason"],
        source="api",
        model_name=body["model_name"],
        base_model=body["base_model"],
        hyperparameters=body["hyperparameters"],
        launch=body["launch"],
        trace_id=current_trace_id(),
        search=body["search"],
    )
    try:
        with runtime.db.session() as session:
            run, created = request_run(runtime, session, spec, force=body["force"])
    except InvalidRunRequest as exc:
        raise ValidationError(exc.fields) from exc
    except IntegrityError:  # an identical request committed first
        with runtime.db.session() as session:
            run, created = request_run(runtime, session, spec)
    return run, 202 if created else 200


@runs.get("")
@require_partner_or_internal
@requires_scope("read")
@runs.arguments(RunListQuery, location="query")
@runs.response(200, RunListSchema)
def list_runs(query: dict[str, Any]) -> dict[str, Any]:
    """Runs, oldest first, paged by the `after` cursor; a partner sees its own only."""
    principal = current_principal()
    statement = select(TrainingRun).where(TrainingRun.seq > query["after"])
    if not principal.internal:
        statement = statement.where(TrainingRun.tenant == principal.tenant)
    for name in ("tenant", "status", "dataset_id", "snapshot_id", "model_name"):
        if name in query:
            statement = statement.where(getattr(TrainingRun, name) == query[name])
    with _runtime().db.session() as session:
        found = session.scalars(statement.order_by(TrainingRun.seq).limit(query["limit"])).all()
    next_after = found[-1].seq if len(found) == query["limit"] else None
    return {"runs": found, "next_after": next_after}


@runs.get("/<run_id>")
@require_partner_or_internal
@requires_scope("read")
@runs.response(200, RunSchema)
def get_run(run_id: str) -> TrainingRun:
    """Status, epoch and step, loss, throughput, ETA, metrics and artifacts of one run."""
    with _runtime().db.session() as session:
        return _visible_run(session, run_id)


@runs.post("/<run_id>/cancel")
@require_internal
@runs.response(202, RunSchema)
def cancel_run(run_id: str) -> TrainingRun:
    """Stop a run: a queued run is cancelled at once, a running one at its next training step."""
    runtime = _runtime()
    with runtime.db.session() as session:
        run = _visible_run(session, run_id)
        run_lifecycle.request_cancel(runtime, session, run, who="an operator")
    return run
