"""Events the registry consumes: a finished training run becomes the model's next version."""

from __future__ import annotations

from services.registry.versions import register_training_run
from shared.events.consumer import EventContext, EventHandlers

handlers = EventHandlers("registry")


@handlers.on("training.completed")
def on_training_completed(ctx: EventContext) -> None:
    """Register the run (verified, numbered, gated); a refusal is recorded, not raised, so it is not retried."""
    register_training_run(
        ctx.session,
        ctx.runtime.storage,
        tenant=ctx.envelope.tenant,
        payload=ctx.payload,
        event_id=ctx.envelope.event_id,
        trace_id=ctx.envelope.trace_id,
        publish=ctx.publish,
    )
