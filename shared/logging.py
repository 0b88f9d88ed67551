"""structlog JSON logging, configured once per process.

Every line carries `service`, and whatever context is bound for the work at hand (`trace_id`, `tenant`,
domain ids) through contextvars, so one `grep trace_id` across all services' logs tells a datum's story.
"""

from __future__ import annotations

import logging
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import structlog

TRACE_HEADER = "X-Request-ID"
"""The HTTP header a trace id travels in, into the platform and between its services."""

_configured = False


def configure_logging(service: str, level: str = "INFO", fmt: str = "json") -> None:
    """Route structlog and the standard library (Celery, gunicorn, werkzeug) through one JSON renderer.

    Once per process: the first call wins. `service` is the default for lines logged outside any request or
    event; the HTTP layer and the event consumer bind the handling service explicitly.
    """
    global _configured
    if _configured:
        return
    _configured = True
    structlog.configure(
        processors=[
            *_shared_processors(service),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            structlog.stdlib.ProcessorFormatter.wrap_for_formatter,
        ],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = json_formatter(service, fmt)
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # a library's warning is a JSON line too, not bare text on stderr
    for noisy in ("urllib3", "botocore", "werkzeug", "kombu", "amqp"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


def json_formatter(service: str, fmt: str = "json", *, logger_name: bool = False) -> logging.Formatter:
    """The formatter every handler uses: a standard library record becomes one JSON line (or, with
    `fmt="console"`, one readable line) carrying `service`, level, UTC timestamp and the bound context;
    with `logger_name`, also `logger`, the record's logger."""
    named = [structlog.stdlib.add_logger_name] if logger_name else []
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=False) if fmt == "console" else structlog.processors.JSONRenderer()
    )
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*_shared_processors(service), *named, structlog.stdlib.ExtraAdder()],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    )


def _shared_processors(service: str) -> list[Any]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_service(service),
    ]


def _add_service(service: str):
    def processor(_logger: Any, _name: str, event_dict: dict[str, Any]) -> dict[str, Any]:
        event_dict.setdefault("service", service)
        return event_dict

    return processor


def get_logger(name: str | None = None) -> structlog.stdlib.BoundLogger:
    return structlog.stdlib.get_logger(name)


def new_trace_id() -> str:
    return uuid.uuid4().hex


def current_context() -> dict[str, Any]:
    return structlog.contextvars.get_contextvars()


def current_trace_id() -> str | None:
    return current_context().get("trace_id")


@contextmanager
def log_context(**values: Any) -> Iterator[None]:
    """Bind values to every log line inside the block, restoring the previous context afterwards."""
    tokens = structlog.contextvars.bind_contextvars(**{k: v for k, v in values.items() if v is not None})
    try:
        yield
    finally:
        structlog.contextvars.reset_contextvars(**tokens)
