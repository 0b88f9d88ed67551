"""Events inference's Celery worker consumes.

`model.promoted` is broadcast to every inference replica. The worker process holds no ONNX sessions: the HTTP
processes hear the same broadcast themselves and load the new version (see `promotions.py`). The worker's
handler records the promotion in the worker's log, so the event's trace shows every replica received it.
"""

from __future__ import annotations

from shared.events.consumer import EventContext, EventHandlers
from shared.logging import get_logger

log = get_logger(__name__)

handlers = EventHandlers("inference")


@handlers.on("model.promoted")
def on_model_promoted(ctx: EventContext) -> None:
    payload = ctx.payload
    log.info(
        "model_promotion_observed",
        model_name=payload["model_name"],
        alias=payload["alias"],
        version=payload.get("version"),
        previous_version=payload.get("previous_version"),
        weights=payload.get("weights") or {},
        reason=payload["reason"],
    )
