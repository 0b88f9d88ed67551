"""The log handler's writer thread: every line arrives whole and in each thread's order, with the context of the
thread that logged it; a stalled stream never stalls the thread that logs; a forked child writes its own lines."""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import uuid
from pathlib import Path

import pytest

from shared.logging import DirectLine, LineWriter, configure_logging, get_logger, json_formatter, log_context


def writer_logger(stream) -> tuple[logging.Logger, LineWriter]:
    handler = LineWriter(stream)
    handler.setFormatter(json_formatter("tests"))
    logger = logging.getLogger(f"tests.line-writer.{uuid.uuid4().hex}")
    logger.propagate = False
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    return logger, handler


def test_lines_from_many_threads_arrive_whole_in_order_with_their_own_context() -> None:
    stream = io.StringIO()
    logger, handler = writer_logger(stream)

    def work(thread: int) -> None:
        with log_context(trace_id=f"trace-{thread}"):
            for n in range(200):
                logger.info("line %d of thread %d", n, thread)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    handler.flush()
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    assert len(lines) == 16 * 200
    seen: dict[str, list[int]] = {}
    for line in lines:
        n, thread = (int(word) for word in line["event"].split() if word.isdigit())
        assert line["trace_id"] == f"trace-{thread}" and line["service"] == "tests"
        seen.setdefault(line["trace_id"], []).append(n)
    assert seen == {f"trace-{t}": list(range(200)) for t in range(16)}


class StalledStream(io.StringIO):
    """A stream whose writes wait until it is released, like a full pipe nobody reads."""

    def __init__(self) -> None:
        super().__init__()
        self.released = threading.Event()
        self.writing = threading.Event()

    def write(self, text: str) -> int:
        self.writing.set()
        assert self.released.wait(30), "the test never released the stream"
        return super().write(text)


def test_a_stalled_stream_does_not_stall_the_threads_that_log() -> None:
    stream = StalledStream()
    logger, handler = writer_logger(stream)
    logger.info("first")
    assert stream.writing.wait(10)  # the writer thread is now stuck inside write()
    done = threading.Event()

    def log_more() -> None:
        for n in range(500):
            logger.info("more %d", n)
        done.set()

    threading.Thread(target=log_more).start()
    assert done.wait(10), "logging waited for the stalled stream"  # with StreamHandler it would hang here
    assert stream.getvalue() == ""
    stream.released.set()
    handler.flush()
    events = [json.loads(line)["event"] for line in stream.getvalue().splitlines()]
    assert events == ["first", *(f"more {n}" for n in range(500))]


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_child_writes_its_own_lines_once(tmp_path: Path) -> None:
    path = tmp_path / "service.log"
    with path.open("a", buffering=1) as stream:
        logger, handler = writer_logger(stream)
        logger.info("before the fork")
        handler.flush()
        pid = os.fork()
        if pid == 0:  # the child: a Celery prefork worker's situation
            try:
                logger.info("from the child")
                handler.flush()
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        logger.info("after the fork")
        handler.flush()
    events = [json.loads(line)["event"] for line in path.read_text().splitlines()]
    assert events == ["before the fork", "from the child", "after the fork"]


def test_a_direct_line_is_the_line_logging_writes() -> None:
    """`DirectLine` (the request line) skips the standard library's records, not its output: where the root's one
    handler is this process's `LineWriter` it writes the very line `logging` would, context included; with any
    other handler present it logs through `logging`, so that handler sees the line."""
    configure_logging("tests")
    root = logging.getLogger()
    saved = root.handlers[:]
    stream = io.StringIO()
    handler = LineWriter(stream)
    handler.setFormatter(json_formatter("tests"))
    root.handlers[:] = [handler]
    name = f"tests.direct.{uuid.uuid4().hex}"
    try:
        with log_context(trace_id="trace-direct", tenant="acme"):
            get_logger(name).info("http_request", model="m", rows=2, status=200)
            DirectLine(name).info("http_request", model="m", rows=2, status=200)
        handler.flush()
        through_logging, direct = (json.loads(line) for line in stream.getvalue().splitlines())
        assert list(direct) == list(through_logging)  # the same keys, in the same order
        assert {k: v for k, v in direct.items() if k != "timestamp"} == {
            k: v for k, v in through_logging.items() if k != "timestamp"
        }
        assert direct["trace_id"] == "trace-direct" and direct["tenant"] == "acme" and direct["rows"] == 2
        records: list[logging.LogRecord] = []
        capture = logging.Handler()
        capture.emit = records.append  # type: ignore[method-assign]
        root.addHandler(capture)
        DirectLine(name).info("http_request", status=404)
        assert [record.msg["status"] for record in records] == [404]  # type: ignore[index]
    finally:
        root.handlers[:] = saved
