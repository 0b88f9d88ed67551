"""Events ingestion consumes: the other services' usage records, for the meter store, and their reports of their
parts of an erasure, for its report."""

from __future__ import annotations

from services.ingestion import erasure, metering
from shared.events.consumer import EventContext, EventHandlers
from shared.logging import get_logger

log = get_logger(__name__)

handlers = EventHandlers("ingestion")


@handlers.on("usage.recorded")
def usage_recorded(context: EventContext) -> None:
    """Keep the records; ids already stored (a redelivery, a replayed dead letter) insert nothing."""
    records = context.payload["records"]
    metering.record(context.session, records, source=context.payload["source"])
    log.info("usage_records_received", source=context.payload["source"], records=len(records))


@handlers.on("erasure.step_completed")
def erasure_step_completed(context: EventContext) -> None:
    """A service's part of an erasure: kept once per (service, step), whichever event carried it."""
    payload = context.payload
    new = erasure.record_step(context.session, context.envelope.tenant, payload)
    log.info(
        "erasure_step_recorded" if new else "erasure_step_already_recorded",
        erasure_id=payload["erasure_id"],
        service=payload["service"],
        step=payload["step"],
        counts=payload["counts"],
    )
