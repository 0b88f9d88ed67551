"""Publishing through a transactional outbox, and the relay that delivers what a failed publish left behind.

`publish(session, ...)` only writes an outbox row in the caller's transaction. When that transaction commits,
the rows it wrote are sent to Redis at once (the fast path). If Redis is down the commit still succeeds, the
rows stay unsent, and the relay thread delivers them when Redis answers again. A row can be sent twice (a
crash between send and mark); consumers are idempotent by event_id, so that is safe.

The same outbox carries a service's own queued work (`enqueue`): a Celery task name and its arguments,
sent to the service's queue with the same guarantees.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from celery import Celery
from kombu import Exchange
from sqlalchemy import delete, event, select, update
from sqlalchemy.orm import Session

from shared.events.catalog import CATALOG, broadcast_queue, task_name
from shared.events.envelope import Envelope, InvalidEvent, make_envelope
from shared.events.tables import event_tables
from shared.logging import get_logger

if TYPE_CHECKING:  # shared.db builds its tables from shared.events: the bus needs the type only
    from shared.db import Database

log = get_logger(__name__)

_PENDING_KEY = "flywheel_outbox_pending"
# One immediate second try on a fresh connection: when Redis comes back, each pooled connection is stale and would
# fail one send ("Connection closed by server"), costing a relay interval each. A broker that is really down fails
# both tries at once, and the row waits in the outbox as before.
SEND_RETRY: dict[str, Any] = {
    "retry": True,
    "retry_policy": {"max_retries": 1, "interval_start": 0, "interval_step": 0},
}
TASK_PREFIX = "task:"
# After a failed send, requests stop trying the broker inline for this long (a connection attempt to a dead
# broker can take seconds); the relay thread keeps retrying in the background and delivers.
FAST_PATH_BACKOFF_SECONDS = 15.0
OUTBOX_RETENTION = timedelta(hours=24)
PRUNE_EVERY_SECONDS = 300.0


class EventBus:
    def __init__(self, service: str, celery: Celery, db: Database, *, relay_interval: float = 2.0) -> None:
        self.service = service
        self.celery = celery
        self.db = db
        self.tables = event_tables(db.metadata)
        self.relay_interval = relay_interval
        self._broker_down_until = 0.0
        self._relay: threading.Thread | None = None
        self._stop = threading.Event()
        event.listen(db._sessions, "after_commit", self._after_commit)
        event.listen(db._sessions, "after_rollback", self._after_rollback)

    # -- producing -------------------------------------------------------------------------------------

    def publish(
        self,
        session: Session,
        event_type: str,
        payload: dict[str, Any],
        *,
        tenant: str | None,
        trace_id: str | None = None,
    ) -> Envelope:
        """Record an event in the caller's transaction; it is sent only if that transaction commits."""
        return self.publish_envelope(session, self.envelope(event_type, payload, tenant=tenant, trace_id=trace_id))

    def envelope(
        self, event_type: str, payload: dict[str, Any], *, tenant: str | None, trace_id: str | None = None
    ) -> Envelope:
        """Build and validate an event of this service's ahead of the transaction that publishes it (the
        validation of a large batch then holds no database lock)."""
        spec = CATALOG.get(event_type)
        if spec is None:
            raise InvalidEvent(f"unknown event type {event_type!r}")
        if self.service not in spec.producers:
            raise InvalidEvent(f"{self.service} does not produce {event_type}; {', '.join(spec.producers)} does")
        return make_envelope(event_type, payload, tenant=tenant, trace_id=trace_id)

    def publish_envelope(self, session: Session, envelope: Envelope) -> Envelope:
        session.execute(
            self.tables.outbox.insert().values(
                event_id=envelope.event_id,
                event_type=envelope.type,
                envelope=envelope.to_dict(),
                created_at=datetime.now(UTC),
                attempts=0,
            )
        )
        session.info.setdefault(_PENDING_KEY, []).append(envelope.event_id)
        return envelope

    def enqueue(self, session: Session, task: str, args: list[Any], *, queue: str | None = None) -> str:
        """Queue one of this service's own Celery tasks through the outbox: it is sent only if the caller's
        transaction commits, and still sent (by the relay) if Redis is down at that moment."""
        task_id = str(uuid.uuid4())
        session.execute(
            self.tables.outbox.insert().values(
                event_id=task_id,
                event_type=f"{TASK_PREFIX}{task}",
                envelope={"task": task, "args": args, "queue": queue or self.service, "task_id": task_id},
                created_at=datetime.now(UTC),
                attempts=0,
            )
        )
        session.info.setdefault(_PENDING_KEY, []).append(task_id)
        return task_id

    def send(self, message: dict[str, Any], consumer: str) -> None:
        """Put one message on the bus for one consumer service (no outbox: used by the relay and replays)."""
        spec = CATALOG[message["type"]]
        name = task_name(consumer, spec.name)
        options: dict[str, Any] = dict(SEND_RETRY)
        if consumer in spec.broadcast_to:
            # The fan-out exchange must be declared by the publishing connection too: with Redis, an exchange
            # this process never declared is taken for a direct one, and the message lands in a list that no
            # subscriber reads.
            exchange = Exchange(broadcast_queue(consumer), type="fanout")
            options.update(exchange=exchange, routing_key=broadcast_queue(consumer), declare=[exchange])
        else:
            options["queue"] = consumer
        self.celery.send_task(name, args=[message], **options)

    # -- delivering ------------------------------------------------------------------------------------

    def _after_commit(self, session: Session) -> None:
        if session.in_nested_transaction():  # a SAVEPOINT released; the real commit is still to come
            return
        pending = session.info.pop(_PENDING_KEY, None)
        if not pending or time.monotonic() < self._broker_down_until:
            return  # the relay delivers these
        if not self.deliver(event_ids=pending) and self._broker_down_until > time.monotonic():
            self._broker_down_until = time.monotonic() + FAST_PATH_BACKOFF_SECONDS

    def _after_rollback(self, session: Session) -> None:
        if not session.in_nested_transaction():
            session.info.pop(_PENDING_KEY, None)

    def deliver(self, *, event_ids: Iterable[str] | None = None, older_than: float = 0.0, limit: int = 500) -> int:
        """Send unsent outbox rows (the given ones, or the oldest) and mark them sent. Returns how many went."""
        outbox = self.tables.outbox
        query = select(outbox.c.id, outbox.c.envelope).where(outbox.c.sent_at.is_(None)).order_by(outbox.c.id)
        if event_ids is not None:
            query = query.where(outbox.c.event_id.in_(list(event_ids)))
        if older_than:
            query = query.where(outbox.c.created_at < datetime.now(UTC) - timedelta(seconds=older_than))
        with self.db.session() as session:
            rows = session.execute(query.limit(limit)).all()
        sent: list[int] = []
        try:
            for row_id, message in rows:
                if "task" in message:
                    self.celery.send_task(
                        message["task"],
                        args=message["args"],
                        queue=message["queue"],
                        task_id=message["task_id"],
                        **SEND_RETRY,
                    )
                else:
                    for consumer in CATALOG[message["type"]].consumers:
                        self.send(message, consumer)
                sent.append(row_id)
            self._broker_down_until = 0.0  # the broker answers: requests may deliver inline again
        except Exception as exc:
            self._broker_down_until = max(self._broker_down_until, time.monotonic() + self.relay_interval)
            log.warning("outbox_delivery_failed", error=str(exc), pending=len(rows) - len(sent))
            self._record_failure(rows[len(sent)][0], exc)
        if sent:
            with self.db.session() as session:
                session.execute(update(outbox).where(outbox.c.id.in_(sent)).values(sent_at=datetime.now(UTC)))
        return len(sent)

    def _record_failure(self, row_id: int, exc: Exception) -> None:
        outbox = self.tables.outbox
        try:
            with self.db.session() as session:
                session.execute(
                    update(outbox)
                    .where(outbox.c.id == row_id)
                    .values(attempts=outbox.c.attempts + 1, last_error=str(exc)[:2000])
                )
        except Exception as db_exc:  # the database may be the thing that is down
            log.warning("outbox_failure_not_recorded", error=str(db_exc))

    def pending_count(self) -> int:
        outbox = self.tables.outbox
        with self.db.session() as session:
            return len(session.execute(select(outbox.c.id).where(outbox.c.sent_at.is_(None))).all())

    # -- the relay -------------------------------------------------------------------------------------

    def start_relay(self) -> None:
        """Start the background sweep (once per process) that delivers rows the fast path could not."""
        if self._relay is not None and self._relay.is_alive():
            return
        self._stop.clear()
        self._relay = threading.Thread(target=self._relay_loop, name=f"{self.service}-outbox-relay", daemon=True)
        self._relay.start()

    def stop_relay(self) -> None:
        self._stop.set()
        if self._relay is not None:
            self._relay.join(timeout=5)

    def prune(self, older_than: timedelta = OUTBOX_RETENTION) -> int:
        """Forget sent events after the retention period (they stay a while for debugging and replay)."""
        outbox = self.tables.outbox
        with self.db.session() as session:
            result = session.execute(
                delete(outbox).where(outbox.c.sent_at.is_not(None), outbox.c.sent_at < datetime.now(UTC) - older_than)
            )
        return result.rowcount or 0

    def _relay_loop(self) -> None:
        last_prune = 0.0
        while not self._stop.wait(self.relay_interval):
            try:
                while self.deliver(older_than=self.relay_interval) >= 500:
                    pass
                if time.monotonic() - last_prune > PRUNE_EVERY_SECONDS:
                    last_prune = time.monotonic()
                    pruned = self.prune()
                    if pruned:
                        log.info("outbox_pruned", rows=pruned)
            except Exception as exc:  # keep sweeping whatever breaks: the relay is the safety net
                log.warning("outbox_relay_sweep_failed", error=str(exc))
