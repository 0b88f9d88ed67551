"""The Celery app factory: one configuration for every service's producer and worker.

JSON only (never pickle), late acknowledgement, redelivery when a worker dies, prefetch 1 so a long task
never holds others hostage, and a visibility timeout above the longest task so Redis does not redeliver a
task that is still running. Every worker keeps a heartbeat its probes read (shared/events/heartbeat.py).
"""

from __future__ import annotations

from celery import Celery
from kombu import Exchange, Queue
from kombu.common import Broadcast

from shared.events.catalog import CATALOG, broadcast_queue
from shared.events.heartbeat import install_heartbeat
from shared.settings import SERVICES, Settings


def service_queues(service: str) -> list[str]:
    """Queues a service's worker consumes: its own, plus its broadcast queue if any event fans out to it."""
    queues = [service]
    if any(service in spec.broadcast_to for spec in CATALOG.values()):
        queues.append(broadcast_queue(service))
    return queues


def make_celery(settings: Settings, service: str) -> Celery:
    app = Celery(f"flywheel-{service}", broker=settings.redis_url, set_as_current=False)
    broadcast_services = sorted({s for spec in CATALOG.values() for s in spec.broadcast_to})
    app.conf.update(
        task_serializer="json",
        accept_content=["json"],
        result_serializer="json",
        result_backend=None,
        task_ignore_result=True,
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        task_acks_on_failure_or_timeout=True,
        worker_prefetch_multiplier=1,
        worker_hijack_root_logger=False,
        worker_redirect_stdouts=False,
        worker_send_task_events=False,
        worker_enable_remote_control=False,
        broker_connection_retry_on_startup=True,
        # A Redis blip must not abort a training run half-way: the run's lease and heartbeat already guard it
        # against a redelivered copy. (Celery 5 warns until this is said explicitly; 6 changes the default.)
        worker_cancel_long_running_tasks_on_connection_loss=False,
        broker_connection_timeout=3,
        broker_channel_error_retry=True,
        broker_transport_options={
            "visibility_timeout": settings.visibility_timeout,
            "socket_connect_timeout": 3,
            "socket_timeout": 10,
            "retry_on_timeout": True,
            "health_check_interval": 10,
        },
        task_default_queue=service,
        task_queues=[
            *(Queue(name, Exchange(name, type="direct"), routing_key=name) for name in SERVICES),
            # Bound with the routing key the bus publishes with (Redis fan-out subscribes by exchange/key).
            *(Broadcast(broadcast_queue(name), routing_key=broadcast_queue(name)) for name in broadcast_services),
        ],
        task_create_missing_queues=True,
        timezone="UTC",
        enable_utc=True,
    )
    # Files the worker's liveness and readiness probes read (FLYWHEEL_HOME/heartbeat/<service>.alive|.ready).
    install_heartbeat(app, settings.home / "heartbeat", service)
    return app
