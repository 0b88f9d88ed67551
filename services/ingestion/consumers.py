"""Events ingestion consumes: the other services' usage records, for the meter store."""

from __future__ import annotations

from services.ingestion import metering
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
