#!/usr/bin/env python3
"""Health check for whatever Flywheel process a container of the image runs.

The image's HEALTHCHECK and docker-compose call it without arguments; it finds out what the container runs:

- an HTTP service (a gunicorn or granian process): GET http://127.0.0.1:<its --bind or --port port>/healthz
  (`--ready`: /readyz);
- a worker (`flywheel worker <service>`): the worker process is alive and the broker at REDIS_URL answers
  (the Celery config turns remote control off, so there is no ping to send to the worker itself);
- `--url URL`: that URL answers 200;
- `--heartbeat FILE [--max-age SECONDS]`: a worker's heartbeat file (shared/events/heartbeat.py) was touched
  less than SECONDS ago. Kubernetes probes workers this way: it reads one file's age, and asks nothing of the
  broker, so a Redis outage does not restart every worker.

Exit status 0 means healthy, 1 not; one line on stdout says why. Kubernetes probes the HTTP paths directly.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

TIMEOUT_SECONDS = 4.0
HEARTBEAT_MAX_AGE_SECONDS = 60.0
LIVENESS_PATH = "/healthz"
READINESS_PATH = "/readyz"


@dataclass(frozen=True)
class Process:
    kind: str  # "http" or "worker"
    port: int = 0
    service: str = ""


def classify(argv: list[str]) -> Process | None:
    """What one command line is: an HTTP server (gunicorn or granian, with its port), a Flywheel worker, or
    neither."""
    if not argv:
        return None
    names = [Path(arg).name for arg in argv[:3]]
    if "gunicorn" in names or "granian" in names:
        port = _bind_port(argv)
        return Process("http", port=port) if port else None
    for index, arg in enumerate(argv[:-1]):
        is_cli = Path(arg).name == "flywheel" or arg == "cli.main"
        if is_cli and argv[index + 1] == "worker":
            service = argv[index + 2] if index + 2 < len(argv) else ""
            return Process("worker", service=service)
    return None


def _bind_port(argv: list[str]) -> int:
    for index, arg in enumerate(argv):
        value = ""
        if arg in {"--bind", "-b", "--port"} and index + 1 < len(argv):
            value = argv[index + 1]
        elif arg.startswith(("--bind=", "--port=")):
            value = arg.split("=", 1)[1]
        if value:
            port = value.rsplit(":", 1)[-1]
            return int(port) if port.isdigit() else 0
    return 0


def running_processes(proc: Path = Path("/proc")) -> Iterable[Process]:
    own = os.getpid()
    for entry in proc.iterdir():
        if not entry.name.isdigit() or int(entry.name) == own:
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        found = classify([part.decode(errors="replace") for part in raw.split(b"\0") if part])
        if found is not None:
            yield found


def check_url(url: str) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT_SECONDS) as response:  # noqa: S310 - our own loopback URL
            return response.status == 200, f"{url} answered {response.status}"
    except urllib.error.HTTPError as exc:
        return False, f"{url} answered {exc.code}"
    except OSError as exc:
        return False, f"{url} did not answer: {exc}"


def check_broker(redis_url: str) -> tuple[bool, str]:
    import redis

    try:
        redis.Redis.from_url(redis_url, socket_connect_timeout=TIMEOUT_SECONDS, socket_timeout=TIMEOUT_SECONDS).ping()
    except redis.RedisError as exc:
        return False, f"the broker does not answer: {exc.__class__.__name__}"
    return True, "worker running, broker answers"


def check_heartbeat(path: Path, max_age: float) -> tuple[bool, str]:
    try:
        age = time.time() - path.stat().st_mtime
    except OSError:
        return False, f"no heartbeat: {path} does not exist"
    if age > max_age:
        return False, f"stale heartbeat: {path} was last touched {age:.0f}s ago (more than {max_age:.0f}s)"
    return True, f"heartbeat {age:.0f}s old"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ready", action="store_true", help="HTTP services: check /readyz instead of /healthz")
    parser.add_argument("--url", help="check this URL instead of finding the process")
    parser.add_argument("--heartbeat", type=Path, help="check that this heartbeat file is fresh")
    parser.add_argument("--max-age", type=float, default=HEARTBEAT_MAX_AGE_SECONDS, help="with --heartbeat")
    args = parser.parse_args(argv)
    if args.heartbeat:
        healthy, why = check_heartbeat(args.heartbeat, args.max_age)
    elif args.url:
        healthy, why = check_url(args.url)
    else:
        processes = list(running_processes())
        http = next((p for p in processes if p.kind == "http"), None)
        worker = next((p for p in processes if p.kind == "worker"), None)
        if http is not None:
            healthy, why = check_url(f"http://127.0.0.1:{http.port}{READINESS_PATH if args.ready else LIVENESS_PATH}")
        elif worker is not None:
            healthy, why = check_broker(os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0"))
        else:
            healthy, why = False, "no Flywheel HTTP server or worker is running in this container"
    print(why)
    return 0 if healthy else 1


if __name__ == "__main__":
    sys.exit(main())
