"""The HTTP servers' own lines come out as JSON naming the service (the e2e test checks whole processes)."""

from __future__ import annotations

import io
import json
import logging
import logging.config

import pytest
from gunicorn.config import Config

from shared.server_logging import GRANIAN_LOG_CONFIG, GunicornLogger, served_service


@pytest.mark.parametrize(
    ("argv", "service"),
    [
        (["gunicorn", "--bind=0.0.0.0:8001", "services.ingestion.app:create_app()"], "ingestion"),
        (["granian", "--factory", "services.inference.app:create_app"], "inference"),
        (["gunicorn", "myapp:app"], "server"),
    ],
)
def test_the_service_is_read_from_the_app_the_server_serves(argv: list[str], service: str) -> None:
    assert served_service(argv) == service


def _json_lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_gunicorn_lines_are_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["gunicorn", "services.registry.app:create_app()"])
    monkeypatch.delenv("LOG_FORMAT", raising=False)
    logger = GunicornLogger(Config())
    stream = io.StringIO()
    for handler in logger.error_log.handlers:
        handler.setStream(stream)
    logger.error("Worker (pid:%s) was sent SIGKILL! Perhaps out of memory?", 41)
    (line,) = _json_lines(stream)
    assert line["event"] == "Worker (pid:41) was sent SIGKILL! Perhaps out of memory?"
    assert (line["level"], line["service"], line["logger"]) == ("error", "registry", "gunicorn.error")
    assert line["timestamp"].endswith("Z")


def test_granian_log_configuration_formats_json(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("sys.argv", ["granian", "services.inference.app:create_app"])
    config = json.loads(GRANIAN_LOG_CONFIG.read_text())
    # granian merges this over its defaults key by key: it must name its own two loggers.
    assert set(config["loggers"]) == {"_granian", "granian.access"}
    granian_logger = logging.getLogger("_granian")
    saved = (granian_logger.handlers[:], granian_logger.propagate, granian_logger.level)
    try:
        logging.config.dictConfig(config)
        stream = io.StringIO()
        for handler in granian_logger.handlers:
            handler.setStream(stream)
        granian_logger.info("Listening at: %s", "http://127.0.0.1:8005")
        (line,) = _json_lines(stream)
        assert (line["event"], line["service"], line["logger"]) == (
            "Listening at: http://127.0.0.1:8005",
            "inference",
            "_granian",
        )
    finally:
        granian_logger.handlers[:], granian_logger.propagate, granian_logger.level = saved
