"""The HTTP servers' own lines (gunicorn's and granian's start-up, worker restarts, timeouts) as JSON.

The apps log through `shared.logging`, but the servers around them log before any app exists, through their
own loggers, in plain text: a log pipeline that parses JSON drops exactly the lines that say a worker was
killed. Both servers are pointed here instead, so every line a service process prints is one JSON object
with `service`, `level`, `timestamp` and, for these lines, `logger` (which server said it):

    gunicorn --logger-class=shared.server_logging.GunicornLogger ... 'services.registry.app:create_app()'
    granian --log-config=shared/granian_logging.json ... services.inference.app:create_app

`service` is read from the app the command serves (`services.<name>.app`), so the same flag fits every
service. LOG_FORMAT=console prints readable lines instead, as the apps do.
"""

from __future__ import annotations

import logging
import os
import re
import sys
from pathlib import Path

from gunicorn.glogging import Logger

from shared.logging import json_formatter

GRANIAN_LOG_CONFIG = Path(__file__).with_name("granian_logging.json")
_APP = re.compile(r"\bservices\.([a-z_]+)\.app\b")


def served_service(argv: list[str] | None = None) -> str:
    """The service whose app this server process serves, from its command line; "server" if none."""
    for arg in sys.argv if argv is None else argv:
        found = _APP.search(arg)
        if found:
            return found.group(1)
    return "server"


def formatter() -> logging.Formatter:
    """A `logging.config` factory (granian's `--log-config` names it) for this process's server lines."""
    return json_formatter(served_service(), os.environ.get("LOG_FORMAT", "json"), logger_name=True)


class GunicornLogger(Logger):
    """gunicorn's logger with its handlers formatting JSON; what it logs and where are unchanged."""

    def setup(self, cfg) -> None:  # type: ignore[no-untyped-def]
        super().setup(cfg)
        line_format = formatter()
        for log in (self.error_log, self.access_log):
            for handler in log.handlers:
                handler.setFormatter(line_format)
