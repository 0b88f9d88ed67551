"""structlog JSON logging, configured once per process.

Every line carries `service`, and whatever context is bound for the work at hand (`trace_id`, `tenant`,
domain ids) through contextvars, so one `grep trace_id` across all services' logs tells a datum's story.
"""

from __future__ import annotations

import logging
import os
import queue
import sys
import threading
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, TextIO

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
    handler = LineWriter(sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    logging.captureWarnings(True)  # a library's warning is a JSON line too, not bare text on stderr
    for noisy in ("urllib3", "botocore", "werkzeug", "kombu", "amqp"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))


class LineWriter(logging.Handler):
    """A handler that never makes a logging thread wait for another: the line is formatted on the thread that
    logged it, with no lock held, and handed to one writer thread that owns the stream.

    `logging.StreamHandler` formats and writes under its handler lock. Under load that lock is where request
    threads queue: a thread that loses the interpreter lock mid-line keeps every other thread's line waiting
    (37% of an inference request thread's samples at concurrency 32, docs/performance.md). Here `emit` is
    `format` plus a `SimpleQueue.put`, which is atomic; the writer drains whatever has queued and writes it in
    one call, so a busy process makes fewer, larger writes. Context (`trace_id`, bound values) is read at
    format time on the logging thread, as before.

    The standard library's `QueueHandler` formats under the same handler lock, and its `QueueListener` writes a
    record per call and has no thread in a forked child, hence this class.

    `flush` waits until every line queued before it is written; `logging.shutdown` calls it at exit. After a
    fork (Celery's prefork pool) the child gets its own queue and writer thread: the parent's queued lines
    stay the parent's to write.
    """

    FLUSH_TIMEOUT_S = 5.0
    MAX_BATCH = 512

    def __init__(self, stream: TextIO) -> None:
        super().__init__()
        self.stream = stream
        self._start()
        os.register_at_fork(after_in_child=self._start)

    def _start(self) -> None:
        self._lines: queue.SimpleQueue[str | threading.Event] = queue.SimpleQueue()
        threading.Thread(target=self._write_lines, args=(self._lines,), name="log-writer", daemon=True).start()

    def handle(self, record: logging.LogRecord) -> logging.LogRecord | bool:
        # Handler.handle would take the handler lock around emit; nothing here needs it.
        accepted = self.filter(record)
        if accepted:
            if isinstance(accepted, logging.LogRecord):
                record = accepted
            self.emit(record)
        return accepted

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:
            self.handleError(record)
            return
        self._lines.put(line)

    def flush(self) -> None:
        done = threading.Event()
        self._lines.put(done)
        done.wait(self.FLUSH_TIMEOUT_S)

    def _write_lines(self, lines: queue.SimpleQueue[str | threading.Event]) -> None:
        while True:
            batch, flushed = [], []
            item = lines.get()
            while True:
                (flushed if isinstance(item, threading.Event) else batch).append(item)
                if len(batch) >= self.MAX_BATCH:
                    break
                try:
                    item = lines.get_nowait()
                except queue.Empty:
                    break
            if batch:
                try:
                    self.stream.write("\n".join(batch) + "\n")
                    self.stream.flush()
                except (OSError, ValueError):  # a closed or broken stream: the lines have nowhere to go
                    pass
            for done in flushed:
                done.set()


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
