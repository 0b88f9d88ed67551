"""Ground truth for logged predictions: `prediction.labeled`, consumed by every inference HTTP process.

Labeling settles an item that came from a prediction (a user's feedback, or production traffic sampled for
labeling) and emits `prediction.labeled` with the prediction id and the consensus label. Inference owns the
prediction log, so inference joins it there: the row gets `true_label`, and live accuracy is a query over
the log (`monitoring.py`).

Inference runs no Celery worker (its HTTP processes hear promotions themselves, see `promotions.py`), so each
HTTP process runs this small consumer on the `inference` queue: competing consumers, one process handles
each event. Handling is the shared consumer's (`handle_once`: the inbox row and the update in one transaction,
so a redelivered event does nothing); messages are acknowledged only after that transaction, so a process that
dies mid-event leaves the message to Redis's visibility timeout and another process. A failing event is retried
here with the platform's backoff (`EVENT_MAX_RETRIES`), then dead-lettered (listable and replayable); an
event that can never succeed (another tenant's prediction) is dead-lettered at once. A label for a prediction
not written yet (it is still in another replica's buffer) is one such retry.
"""

from __future__ import annotations

import threading
from datetime import UTC, datetime
from typing import Any

from kombu import Exchange, Queue
from kombu.mixins import ConsumerMixin

from services.inference.metrics import InferenceMetrics
from services.inference.models import Prediction
from services.inference.promotions import envelope_of
from shared.backoff import backoff_delay
from shared.events.consumer import EventContext, EventHandlers, RejectEvent, handle_once, record_dead_letter
from shared.events.envelope import InvalidEvent, validate_envelope
from shared.logging import get_logger, log_context
from shared.runtime import Runtime

log = get_logger(__name__)

handlers = EventHandlers("inference")
STOP_CHECK_S = 0.25
MAX_RETRY_DELAY_S = 10.0


class PredictionNotLogged(Exception):
    """The labeled prediction is not in the log yet (or any more): retried, then dead-lettered."""


@handlers.on("prediction.labeled")
def on_prediction_labeled(ctx: EventContext) -> None:
    payload = ctx.payload
    row = ctx.session.get(Prediction, payload["prediction_id"])
    if row is None:
        raise PredictionNotLogged(f"prediction {payload['prediction_id']} is not in the prediction log")
    if row.tenant != ctx.envelope.tenant:
        raise RejectEvent(f"prediction {payload['prediction_id']} is not this tenant's")
    row.true_label = payload["label"]
    row.true_label_source = payload["source"]
    row.labeled_at = datetime.now(UTC)
    log.info(
        "prediction_ground_truth_recorded",
        prediction_id=row.id,
        model_name=row.model_name,
        model_version=row.model_version,
        predicted_label=row.predicted_label,
        true_label=row.true_label,
        source=row.true_label_source,
    )


class EventListener(ConsumerMixin):
    """Consumes the events the catalog sends to inference's own queue (not the broadcast), in this process."""

    def __init__(self, runtime: Runtime, metrics: InferenceMetrics) -> None:
        self.runtime = runtime
        self.metrics = metrics
        self.connection = runtime.celery.connection_for_read()
        self.subscribed = threading.Event()
        self._thread: threading.Thread | None = None

    def get_consumers(self, consumer_cls: Any, channel: Any) -> list[Any]:
        name = self.runtime.service
        queue = Queue(name, Exchange(name, type="direct"), routing_key=name)
        return [consumer_cls(queues=[queue], callbacks=[self.on_message], accept=["json"], prefetch_count=1)]

    def on_consume_ready(self, connection: Any, channel: Any, consumers: Any, **kwargs: Any) -> None:
        self.subscribed.set()
        log.info("inference_event_listener_subscribed", queue=self.runtime.service)

    def on_connection_error(self, exc: Exception, interval: float) -> None:
        self.subscribed.clear()
        log.warning("inference_event_listener_disconnected", error=str(exc)[:300], retry_in_s=interval)

    def on_message(self, body: Any, message: Any) -> None:
        try:
            self.handle(envelope_of(body), (message.headers or {}).get("task") or "")
        finally:
            message.ack()

    def handle(self, raw: Any, task: str) -> str:
        consumer = task or f"{self.runtime.service}.unknown"
        try:
            envelope = validate_envelope(raw)
        except InvalidEvent as exc:
            log.error("event_rejected", consumer=consumer, error=str(exc)[:500])
            record_dead_letter(self.runtime, consumer, raw, str(exc), 1)
            return "rejected"
        handler = handlers.handlers.get(envelope.type)
        consumer = f"{self.runtime.service}.{envelope.type}"
        if handler is None:
            record_dead_letter(self.runtime, consumer, raw, f"inference does not consume {envelope.type}", 1)
            return "rejected"
        settings = self.runtime.settings
        with log_context(
            service=self.runtime.service,
            trace_id=envelope.trace_id,
            tenant=envelope.tenant,
            event_id=envelope.event_id,
            event_type=envelope.type,
        ):
            attempt = 1
            while True:
                try:
                    outcome = handle_once(self.runtime, consumer, envelope, handler, use_inbox=True)
                except RejectEvent as exc:
                    log.error("event_rejected", consumer=consumer, error=str(exc))
                    record_dead_letter(self.runtime, consumer, raw, f"rejected: {exc}", attempt)
                    self.metrics.labels_received.labels("rejected").inc()
                    return "rejected"
                except Exception as exc:
                    if attempt > settings.event_max_retries or self.should_stop:
                        log.error("event_dead_lettered", consumer=consumer, attempts=attempt, error=repr(exc)[:500])
                        record_dead_letter(self.runtime, consumer, raw, repr(exc), attempt)
                        self.metrics.labels_received.labels("dead_lettered").inc()
                        return "dead_lettered"
                    delay = backoff_delay(attempt, settings.event_retry_backoff, MAX_RETRY_DELAY_S)
                    log.warning(
                        "event_retry_scheduled",
                        consumer=consumer,
                        attempt=attempt,
                        delay_s=round(delay, 2),
                        error=str(exc),
                    )
                    attempt += 1
                    threading.Event().wait(delay)
                    continue
                self.metrics.labels_received.labels(outcome).inc()
                log.info("event_handled" if outcome == "handled" else "event_duplicate_skipped", consumer=consumer)
                return outcome

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="inference-events", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.run(safety_interval=STOP_CHECK_S)
        except Exception:
            log.exception("inference_event_listener_stopped")

    def stop(self) -> None:
        self.should_stop = True
        if self._thread is not None:
            self._thread.join(5)
        self.connection.release()
