"""Consuming events: validate the envelope, handle each event once, retry with backoff, then dead-letter.

A service declares its handlers with `EventHandlers.on(event_type)`; `register_tasks` turns each into a
Celery task named `<service>.<event type>` on the service's queue. The handler runs inside one database
transaction together with an `event_inbox` row keyed by (consumer, event_id): a redelivered event finds its
row and is skipped, and a handler that fails leaves neither its writes nor the row behind.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from shared.backoff import backoff_delay
from shared.events.catalog import CATALOG, task_name
from shared.events.envelope import Envelope, InvalidEvent, validate_envelope
from shared.events.tables import event_tables
from shared.logging import get_logger, log_context

if TYPE_CHECKING:
    from shared.runtime import Runtime

log = get_logger(__name__)

MAX_BACKOFF_SECONDS = 300.0


class RejectEvent(Exception):
    """Raised by a handler for an event that can never succeed (it names an unknown label, say): the event
    goes to the dead letters at once instead of being retried."""


@dataclass
class EventContext:
    """What a handler gets: the event, its transaction, and the service's runtime."""

    envelope: Envelope
    session: Session
    runtime: Runtime

    @property
    def payload(self) -> dict[str, Any]:
        return self.envelope.payload

    def publish(self, event_type: str, payload: dict[str, Any], *, tenant: str | None = None) -> Envelope:
        """Emit a follow-up event in the same transaction, carrying this event's trace id and tenant."""
        return self.runtime.bus.publish(
            self.session,
            event_type,
            payload,
            tenant=tenant if tenant is not None else self.envelope.tenant,
            trace_id=self.envelope.trace_id,
        )


Handler = Callable[[EventContext], None]


class EventHandlers:
    """The events one service consumes, and the function that handles each."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.handlers: dict[str, Handler] = {}

    def on(self, event_type: str) -> Callable[[Handler], Handler]:
        spec = CATALOG.get(event_type)
        if spec is None or self.service not in spec.consumers:
            raise ValueError(f"the catalog does not list {self.service} as a consumer of {event_type!r}")

        def decorator(handler: Handler) -> Handler:
            self.handlers[event_type] = handler
            return handler

        return decorator

    def register_tasks(self, runtime: Runtime) -> None:
        for event_type, handler in self.handlers.items():
            _register(runtime, event_type, handler)


def _register(runtime: Runtime, event_type: str, handler: Handler) -> None:
    name = task_name(runtime.service, event_type)
    broadcast = runtime.service in CATALOG[event_type].broadcast_to
    seen = RecentIds() if broadcast else None
    settings = runtime.settings

    @runtime.celery.task(name=name, bind=True, max_retries=None, acks_late=True, ignore_result=True, shared=False)
    def consume(task: Any, message: Any) -> str:
        attempt = task.request.retries + 1
        try:
            envelope = validate_envelope(message)
        except InvalidEvent as exc:
            log.error("event_rejected", consumer=name, error=str(exc))
            record_dead_letter(runtime, name, message, str(exc), attempt)
            return "rejected"
        if envelope.type != event_type:
            error = f"task {name} received a {envelope.type} event"
            log.error("event_rejected", consumer=name, error=error)
            record_dead_letter(runtime, name, message, error, attempt)
            return "rejected"
        with log_context(
            service=runtime.service,
            trace_id=envelope.trace_id,
            tenant=envelope.tenant,
            event_id=envelope.event_id,
            event_type=event_type,
        ):
            if seen is not None and not seen.add(envelope.event_id):
                log.info("event_duplicate_skipped", consumer=name)
                return "duplicate"
            try:
                outcome = handle_once(runtime, name, envelope, handler, use_inbox=seen is None)
            except RejectEvent as exc:
                log.error("event_rejected", consumer=name, error=str(exc))
                record_dead_letter(runtime, name, message, f"rejected: {exc}", attempt)
                return "rejected"
            except Exception as exc:
                if seen is not None:
                    seen.discard(envelope.event_id)
                if attempt > settings.event_max_retries:
                    log.error("event_dead_lettered", consumer=name, attempts=attempt, error=repr(exc))
                    record_dead_letter(runtime, name, message, repr(exc), attempt)
                    return "dead_lettered"
                delay = backoff_delay(attempt, settings.event_retry_backoff, MAX_BACKOFF_SECONDS)
                log.warning(
                    "event_retry_scheduled", consumer=name, attempt=attempt, delay_s=round(delay, 2), error=repr(exc)
                )
                raise task.retry(exc=exc, countdown=delay) from exc
            log.info("event_handled" if outcome == "handled" else "event_duplicate_skipped", consumer=name)
            return outcome


def handle_once(runtime: Runtime, consumer: str, envelope: Envelope, handler: Handler, *, use_inbox: bool) -> str:
    """Run the handler and record the event as handled, atomically. Returns 'handled' or 'duplicate'."""
    inbox = event_tables(runtime.db.metadata).inbox
    already = select(inbox.c.id).where(inbox.c.consumer == consumer, inbox.c.event_id == envelope.event_id)
    try:
        with runtime.db.session() as session:
            if use_inbox:
                if session.execute(already).first() is not None:
                    return "duplicate"
                session.execute(
                    inbox.insert().values(consumer=consumer, event_id=envelope.event_id, handled_at=datetime.now(UTC))
                )
            handler(EventContext(envelope=envelope, session=session, runtime=runtime))
    except IntegrityError:
        # A concurrent delivery of the same event committed first: its inbox row is there now.
        with runtime.db.session() as session:
            if use_inbox and session.execute(already).first() is not None:
                return "duplicate"
        raise
    return "handled"


def record_dead_letter(runtime: Runtime, consumer: str, message: Any, error: str, attempts: int) -> None:
    dead_letters = event_tables(runtime.db.metadata).dead_letters
    event_id = message.get("event_id") if isinstance(message, dict) else None
    event_type = message.get("type") if isinstance(message, dict) else None
    with runtime.db.session() as session:
        session.execute(
            dead_letters.insert().values(
                consumer=consumer,
                event_id=str(event_id)[:36] if event_id else None,
                event_type=str(event_type)[:100] if event_type else None,
                message=message if isinstance(message, dict) else {"raw": repr(message)[:10000]},
                error=error[:10000],
                attempts=attempts,
                created_at=datetime.now(UTC),
                replay_count=0,
            )
        )


class RecentIds:
    """A bounded, thread-safe set of recently handled event ids (per-process dedupe for broadcast events)."""

    def __init__(self, capacity: int = 10_000) -> None:
        self.capacity = capacity
        self._ids: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, event_id: str) -> bool:
        with self._lock:
            if event_id in self._ids:
                return False
            self._ids[event_id] = None
            if len(self._ids) > self.capacity:
                self._ids.popitem(last=False)
            return True

    def discard(self, event_id: str) -> None:
        with self._lock:
            self._ids.pop(event_id, None)
