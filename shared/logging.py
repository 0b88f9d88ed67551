"""structlog JSON logging, configured once per process.

Every line carries `service`, and whatever context is bound for the work at hand (`trace_id`, `tenant`,
domain ids) through contextvars, so one `grep trace_id` across all services' logs tells a datum's story.
"""

from __future__ import annotations

import logging
import os
import queue
import random
import sys
import threading
import time
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
    one call, so a busy process makes fewer, larger writes (it gathers lines for `LINGER_S` after each write).
    Context (`trace_id`, bound values) is read at format time on the logging thread, as before.

    The standard library's `QueueHandler` formats under the same handler lock, and its `QueueListener` writes a
    record per call and has no thread in a forked child, hence this class.

    `flush` waits until every line queued before it is written; `logging.shutdown` calls it at exit. After a
    fork (Celery's prefork pool) the child gets its own queue and writer thread: the parent's queued lines
    stay the parent's to write.
    """

    FLUSH_TIMEOUT_S = 5.0
    MAX_BATCH = 512
    LINGER_S = 0.05
    """After a write, the writer waits this long for more lines before it writes again. Woken for every line, it
    took the interpreter lock once per line from the request threads of a busy process (at 2,600 small v2
    requests/s, one run served 17% more with no request lines at all; within its round-to-round spread). A line
    is written at most this much later; `flush` (and so `logging.shutdown` at exit) waits for it."""

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
        self.put(line)

    def put(self, line: str) -> None:
        """A line formatted elsewhere (`DirectLine`), written like the rest."""
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
            if batch:
                time.sleep(self.LINGER_S)  # let the next lines gather: one wake-up per LINGER_S, not one per line


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


class DirectLine:
    """A logger for a line written many times a second (the HTTP layer's `http_request`, one per request): the
    same JSON line the standard library route writes, through the same processors, without that route's record
    machinery. Through `logging`, a line costs a caller lookup (a walk up the stack), a `LogRecord`, the handler
    chain, and `ProcessorFormatter`'s copy of the record; those were most of the line's cost, about a tenth of a
    small v2 request's time under the interpreter lock (docs/performance.md).

    It takes the direct route only where the standard library would hand the line to this process's
    `LineWriter` and nothing else: the logger and its ancestors have no handlers or filters of their own but the
    root's one `LineWriter`, and the level is enabled. Anywhere else (a test capturing records, a handler a
    deployment added) it logs through `logging` as any other line."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.stdlib = logging.getLogger(name)
        self.fallback = get_logger(name)

    def info(self, event: str, **fields: Any) -> None:
        writer = self._writer(logging.INFO)
        chain = structlog.get_config()["processors"]
        if (
            writer is None
            or not isinstance(writer.formatter, structlog.stdlib.ProcessorFormatter)
            or not chain
            or chain[-1] is not structlog.stdlib.ProcessorFormatter.wrap_for_formatter
        ):  # no LineWriter to hand the line to, or not `configure_logging`'s chain: nothing here to mirror
            self.fallback.info(event, **fields)
            return
        formatter = writer.formatter
        fields["event"] = event  # what structlog's bound logger builds: the call's keywords, then the event
        try:
            for processor in chain[:-1]:  # the last wraps the event for `ProcessorFormatter`: rendered here instead
                fields = processor(self.stdlib, "info", fields)
            fields.update(_record=None, _from_structlog=True)  # what `ProcessorFormatter.format` adds, and removes
            for processor in formatter.processors:
                fields = processor(self.stdlib, "info", fields)
        except Exception:
            self.fallback.exception("direct_line_failed", line_event=event)
            return
        writer.put(fields)

    def _writer(self, level: int) -> LineWriter | None:
        if not self.stdlib.isEnabledFor(level):
            return None
        found: LineWriter | None = None
        current: logging.Logger | None = self.stdlib
        while current is not None:
            if current.filters:
                return None
            if current.handlers:
                if found is not None or current.parent is not None or len(current.handlers) != 1:
                    return None
                handler = current.handlers[0]
                if not isinstance(handler, LineWriter) or handler.filters or handler.level > level:
                    return None
                found = handler
            if not current.propagate:
                break
            current = current.parent
        return found


def new_trace_id() -> str:
    """32 random hex digits, as `uuid4().hex` has. Not from `os.urandom`: a trace id is no secret (it is echoed to
    the caller and written in every line), and `urandom` lets go of the interpreter lock for its system call, so a
    request thread of a busy process waited to take it back once per request for nothing. `random` is reseeded
    in every forked child, so worker processes do not repeat each other's ids."""
    return f"{random.getrandbits(128):032x}"


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
