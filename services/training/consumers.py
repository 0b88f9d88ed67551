"""Events training consumes: `training.requested` records a run (once) and hands it to the training queue."""

from __future__ import annotations

from services.training.quotas import ComputeQuotaExhausted, record_refused
from services.training.requesting import InvalidRunRequest, RunSpec, reject, request_run
from shared.events.consumer import EventContext, EventHandlers

handlers = EventHandlers("training")


@handlers.on("training.requested")
def on_training_requested(ctx: EventContext) -> None:
    """Idempotent twice over: the inbox drops a redelivered event, and an identical request (same snapshot,
    model, base model and hyper-parameters) that is queued, running or succeeded is not trained again.
    A request beyond its tenant's queue limit is still recorded: it waits for a running slot like any other
    run (an event has no caller to tell to retry; see `limits.py`)."""
    payload = ctx.payload
    spec = RunSpec(
        tenant=ctx.envelope.tenant,
        dataset_id=payload["dataset_id"],
        snapshot_id=payload["snapshot_id"],
        manifest=payload["manifest"],
        task_type=payload["task_type"],
        labels=list(payload["labels"]),
        reason=payload["reason"],
        source="event",
        model_name=payload.get("model_name"),
        base_model=payload.get("base_model"),
        hyperparameters=payload.get("hyperparameters"),
        search=payload.get("search"),
        trace_id=ctx.envelope.trace_id,
    )
    try:
        request_run(ctx.runtime, ctx.session, spec, refuse_when_full=False)
    except InvalidRunRequest as problem:
        reject(ctx.runtime, ctx.session, problem)
    except ComputeQuotaExhausted as refused:  # the month's compute quota is spent: recorded failed, never trained
        record_refused(ctx.runtime, ctx.session, refused)
