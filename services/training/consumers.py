"""Events training consumes: `training.requested` records a run (once) and hands it to the training queue."""

from __future__ import annotations

from typing import Any

from marshmallow import ValidationError

from services.training import runs
from services.training.runs import RunRequest
from services.training.schemas import NAME, resolve_base_model, resolve_hyperparameters
from shared.events.consumer import EventContext, EventHandlers
from shared.logging import get_logger

log = get_logger(__name__)

handlers = EventHandlers("training")


@handlers.on("training.requested")
def on_training_requested(ctx: EventContext) -> None:
    """Idempotent twice over: the inbox drops a redelivered event, and an identical request (same snapshot,
    model, base model and hyper-parameters) that is queued, running or succeeded is not trained again."""
    payload = ctx.payload
    task_type = payload["task_type"]
    base_model = payload.get("base_model")
    hyperparameters: dict[str, Any] = payload.get("hyperparameters") or {}
    model_name = payload.get("model_name") or payload["dataset_id"]
    problem = None
    try:
        NAME(model_name)
        base_model = resolve_base_model(task_type, base_model)
        hyperparameters = resolve_hyperparameters(task_type, hyperparameters)
    except ValidationError as exc:
        problem = f"invalid training request: {exc.normalized_messages()}; fix it and request training again"
    if len(set(payload["labels"])) < 2:
        problem = f"a classifier needs at least two distinct labels, the request has {payload['labels']}"
    if not ctx.envelope.tenant:
        problem = "the training request carries no tenant; its producer must set one"
    request = RunRequest(
        tenant=ctx.envelope.tenant or "",
        dataset_id=payload["dataset_id"],
        snapshot_id=payload["snapshot_id"],
        manifest=payload["manifest"],
        task_type=task_type,
        labels=list(payload["labels"]),
        model_name=model_name,
        base_model=base_model or "",
        hyperparameters=hyperparameters,
        reason=payload["reason"],
        source="event",
        trace_id=ctx.envelope.trace_id,
    )
    if problem is not None:
        run = runs.record_rejected(ctx.runtime, ctx.session, request, problem)
        log.warning("training_request_rejected", run_id=run.id, reason=problem)
        return
    run, created = runs.create_run(ctx.session, request)
    if not created:
        log.info("training_request_duplicate", run_id=run.id, status=run.status, snapshot_id=run.snapshot_id)
        return
    runs.dispatch_after_commit(ctx.runtime, ctx.session, run.id)
    log.info("run_requested", run_id=run.id, snapshot_id=run.snapshot_id, model_name=run.model_name)
