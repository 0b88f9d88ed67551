"""How every HTTP process of every inference replica learns that a model was promoted.

The ONNX sessions live in the HTTP (granian) processes, so the HTTP processes are the ones that must hear
`model.promoted`; inference runs no Celery worker at all. The design:

1. **Each HTTP process subscribes to the broadcast itself.** `model.promoted` is fanned out by the bus on the
   `inference.broadcast` exchange (a kombu fan-out exchange: Redis PUBLISH/PSUBSCRIBE). `PromotionListener`
   is a small kombu consumer thread in each HTTP process with its own exclusive, auto-deleted queue bound to
   that exchange, so every process of every replica receives its own copy, with no hop through another
   process. It validates the envelope against the catalog (`validate_envelope`), drops a redelivery by
   `event_id` (a bounded per-process set, like the shared consumer's broadcast dedupe) and asks the
   repository to fetch that model's serving document and load what changed, on the loader thread, so the
   listener never blocks. The event carries only which model moved; the registry's serving document is the
   truth, so events arriving out of order or twice converge to the same state.
2. **A periodic reconcile is the safety net.** Fan-out over Redis is fire-and-forget: a process that is
   disconnected (restarting, network blip) when an event is published never sees it. So each process
   reconciles against `GET /v1/internal/serving` at start (retrying with backoff while the registry is
   down; `/v2/health/ready` stays false until it has answered once), again immediately whenever the listener
   reconnects, and every `reconcile_interval_s` (30 s) otherwise. A missed promotion is thus applied within
   one interval, and a failed version is retried on a backoff.

Rejected alternatives: a Celery worker relaying to the HTTP processes (over Redis pub/sub or HTTP) adds a hop
that fails when the worker is down or busy, and must still fan out to every HTTP process; polling alone makes
every promotion wait for the poll interval.
"""

from __future__ import annotations

import threading
from typing import Any

from kombu.common import Broadcast
from kombu.mixins import ConsumerMixin

from services.inference.metrics import InferenceMetrics
from services.inference.repository import ModelRepository
from shared.backoff import backoff_delay
from shared.events.catalog import broadcast_queue
from shared.events.consumer import RecentIds
from shared.events.envelope import InvalidEvent, validate_envelope
from shared.logging import get_logger, log_context
from shared.runtime import Runtime

log = get_logger(__name__)

EVENT_TYPE = "model.promoted"
STOP_CHECK_S = 0.25
RECONCILE_RETRY_S = 1.0


def envelope_of(body: Any) -> Any:
    """The event envelope inside a Celery task message (protocol 2 body: [args, kwargs, embed]; or v1)."""
    if isinstance(body, list | tuple) and body and isinstance(body[0], list | tuple) and body[0]:
        return body[0][0]
    if isinstance(body, dict) and isinstance(body.get("args"), list | tuple) and body["args"]:
        return body["args"][0]
    return body


class PromotionListener(ConsumerMixin):
    def __init__(self, runtime: Runtime, repository: ModelRepository, metrics: InferenceMetrics) -> None:
        self.runtime = runtime
        self.repository = repository
        self.metrics = metrics
        self.connection = runtime.celery.connection_for_read()
        self.seen = RecentIds()
        self.subscribed = threading.Event()
        self._thread: threading.Thread | None = None
        self._subscriptions = 0

    def get_consumers(self, consumer_cls: Any, channel: Any) -> list[Any]:
        # Redis fan-out publishes on "<exchange>/<routing key>"; binding with the pattern "*" hears every routing
        # key the producer may use (kombu's fanout_patterns), so this listener does not depend on that choice.
        queue = Broadcast(broadcast_queue(self.runtime.service), routing_key="*")
        return [consumer_cls(queues=[queue], callbacks=[self.on_message], accept=["json"], no_ack=True)]

    def on_consume_ready(self, connection: Any, channel: Any, consumers: Any, **kwargs: Any) -> None:
        self._subscriptions += 1
        self.subscribed.set()
        log.info("promotion_listener_subscribed", exchange=broadcast_queue(self.runtime.service))
        if self._subscriptions > 1:  # events published while we were away are lost: catch up now
            self.repository.request_reconcile()

    def on_connection_error(self, exc: Exception, interval: float) -> None:
        self.subscribed.clear()
        log.warning("promotion_listener_disconnected", error=str(exc)[:300], retry_in_s=interval)

    def on_message(self, body: Any, message: Any) -> None:
        try:
            envelope = validate_envelope(envelope_of(body))
        except InvalidEvent as exc:
            log.error("promotion_event_rejected", error=str(exc)[:500], task=(message.headers or {}).get("task"))
            return
        if envelope.type != EVENT_TYPE:
            return
        if not self.seen.add(envelope.event_id):
            log.info("promotion_event_duplicate_skipped", event_id=envelope.event_id)
            return
        self.metrics.promotions.inc()
        payload = envelope.payload
        with log_context(trace_id=envelope.trace_id, tenant=envelope.tenant, event_id=envelope.event_id):
            log.info(
                "model_promotion_received",
                model_name=payload["model_name"],
                alias=payload["alias"],
                version=payload.get("version"),
                previous_version=payload.get("previous_version"),
                weights=payload.get("weights") or {},
            )
            if envelope.tenant:
                self.repository.request_sync(envelope.tenant, payload["model_name"], force=True)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="inference-promotions", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self.run(safety_interval=STOP_CHECK_S)
        except Exception:  # never let the listener die silently; the reconcile poll still covers promotions
            log.exception("promotion_listener_stopped")

    def stop(self) -> None:
        self.should_stop = True
        if self._thread is not None:
            self._thread.join(5)
        self.connection.release()


class Reconciler:
    """Reconciles at start (backing off while the registry is down), then every `interval` seconds."""

    def __init__(self, repository: ModelRepository, interval: float) -> None:
        self.repository = repository
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="inference-reconcile", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        delay, failures = 0.0, 0
        while not self._stop.wait(delay):
            future = self.repository.request_reconcile()
            succeeded = self.repository.reconciled.is_set()
            if future is not None:
                try:
                    succeeded = bool(future.result())
                except Exception as exc:  # cancelled at shutdown, or an unexpected failure: try again later
                    log.warning("serving_reconcile_error", error=repr(exc)[:300])
                    succeeded = False
            if succeeded:
                delay, failures = self.interval, 0
            else:
                failures += 1
                delay = backoff_delay(failures, RECONCILE_RETRY_S, self.interval, jitter=False)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
