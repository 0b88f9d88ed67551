"""Process supervision for `flywheel up`: start processes, and start again whichever exits.

`Supervisor` starts each `ProcessSpec` in its own process group and watches it: one that exits is started again
after its `RestartPolicy` backoff (1 s, 2 s, 4 s … 30 s; afresh once it has stayed up a minute), one not ready in
time is killed and counts as an exit. `Platform` is the state file (FLYWHEEL_HOME/run/state.json) the supervisor
keeps current: under which pid each process runs, how often it was restarted and how it last ended, which
`flywheel down` and `flywheel status` read. What is started, and how, is the launcher's business (launcher.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shared.backoff import backoff_delay
from shared.logging import get_logger

log = get_logger(__name__)

READY_TIMEOUT_SECONDS = 90.0
STOP_GRACE_SECONDS = 10.0
POLL_SECONDS = 0.25

Say = Callable[[str], None]


def _silent(_line: str) -> None:
    pass


class LaunchError(Exception):
    """A reason `flywheel up` cannot proceed, worded for the operator."""


@dataclass(frozen=True)
class RestartPolicy:
    """When the supervisor starts an exited process again: `base`, 2·base, 4·base … seconds after it exited,
    never later than `cap`; a process that had been ready for `stable_after` seconds starts the schedule afresh,
    one that keeps exiting is retried every `cap` seconds for as long as it takes. A restarted process not ready
    within `ready_timeout` is killed, and that counts as one more exit."""

    base: float = 1.0
    cap: float = 30.0
    stable_after: float = 60.0
    ready_timeout: float = READY_TIMEOUT_SECONDS

    def delay(self, attempt: int) -> float:
        # No jitter: a handful of local processes have no thundering herd to spread, and the operator reads
        # the schedule in the log.
        return backoff_delay(attempt, self.base, self.cap, jitter=False)


@dataclass
class Platform:
    home: Path
    redis_url: str
    internal_token: str
    ports: dict[str, int]
    processes: dict[str, int] = field(default_factory=dict)  # name -> pid (each its own process group)
    started_at: float = field(default_factory=time.time)
    supervisor: int | None = None  # the pid of the process that restarts the others
    restarts: dict[str, int] = field(default_factory=dict)
    last_exits: dict[str, str] = field(default_factory=dict)  # name -> how it last ended, e.g. "killed by SIGKILL"

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
            "supervisor": self.supervisor,
            "restarts": self.restarts,
            "last_exits": self.last_exits,
        }
        partial = self.state_file.with_suffix(".json.partial")
        partial.write_text(json.dumps(data, indent=2))
        partial.replace(self.state_file)  # the supervisor rewrites it while `status` reads it: never half a file

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
            supervisor=data.get("supervisor"),
            restarts={k: int(v) for k, v in data.get("restarts", {}).items()},
            last_exits=dict(data.get("last_exits", {})),
        )

    def worker_ready_file(self, service: str) -> Path:
        """Written by the service's worker once it consumes (`READY_FILE_ENV`); `up` waits for it."""
        return self.home / "run" / f"{service}-worker.ready"

    def workers(self) -> list[str]:
        """The services whose worker this platform started."""
        return [name.removesuffix("-worker") for name in self.processes if name.endswith("-worker")]

    def alive(self) -> dict[str, int]:
        return {name: pid for name, pid in self.processes.items() if pid_alive(pid)}

    def supervisor_alive(self) -> bool:
        return self.supervisor is not None and pid_alive(self.supervisor)


def pid_alive(pid: int) -> bool:
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


def spawn(
    command: list[str], log_path: Path, env: dict[str, str], *, pass_fds: tuple[int, ...] = ()
) -> subprocess.Popen[bytes]:
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log_file:
        return subprocess.Popen(
            command,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,  # its own process group: stopped as a whole, survives our Ctrl-C handling
            close_fds=True,
            pass_fds=pass_fds,
        )


def tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def describe_exit(returncode: int) -> str:
    """How a process ended, for people: `exit 1`, `killed by SIGKILL`."""
    return f"killed by {_signal_name(-returncode)}" if returncode < 0 else f"exit {returncode}"


def _exit_fields(returncode: int) -> dict[str, Any]:
    """How a process ended, for the log: its exit code, or the signal that ended it."""
    if returncode < 0:
        return {"exit_code": None, "signal": _signal_name(-returncode)}
    return {"exit_code": returncode, "signal": None}


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return f"signal {number}"


def _has_exited(process: subprocess.Popen[bytes]) -> bool:
    """Whether our child has exited, without reaping it: until it is reaped its pid, which is its process
    group's id, cannot be given to another process, so the rest of its group can still be signalled safely."""
    try:
        return os.waitid(os.P_PID, process.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:  # reaped already
        return True


def signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


# --- Supervision: start processes, and start again whichever exits --------------------------------------------


@dataclass
class ProcessSpec:
    """One process the supervisor keeps running: how to start it, where it logs, how to tell that it is ready."""

    name: str
    command: list[str]
    env: dict[str, str]
    log_path: Path
    ready: Callable[[], bool]
    ready_file: Path | None = None  # removed before each start: the process writes it once ready

    def spawn(self) -> subprocess.Popen[bytes]:
        if self.ready_file is not None:
            self.ready_file.unlink(missing_ok=True)
        return spawn(self.command, self.log_path, self.env)


@dataclass
class _Child:
    spec: ProcessSpec
    process: subprocess.Popen[bytes]
    started_at: float  # time.monotonic()
    ready_at: float | None = None
    attempt: int = 0  # exits in a row without staying up: the backoff's exponent
    restarts: int = 0
    restart_at: float | None = None  # set while it is down: when it starts again
    delay: float = 0.0  # the backoff it waits (or waited) before its latest start
    gave_up_waiting: bool = False  # killed for not being ready in time

    @property
    def name(self) -> str:
        return self.spec.name


class Supervisor:
    """Starts processes and keeps them running: one that exits is started again after its backoff (see
    `RestartPolicy`), and the platform's state file says under which pid each runs, how often it was restarted
    and how it last ended. Every exit and restart is a log line; `say` tells a person watching."""

    def __init__(self, platform: Platform, *, policy: RestartPolicy | None = None, say: Say = _silent) -> None:
        self.platform = platform
        self.policy = policy or RestartPolicy()
        self.say = say
        self.children: dict[str, _Child] = {}

    def launch(self, spec: ProcessSpec) -> None:
        """Start `spec` for the first time; `wait_ready` or `run` watch it from then on."""
        child = _Child(spec, spec.spawn(), time.monotonic())
        self.children[spec.name] = child
        self._record(child)

    def wait_ready(self, names: Iterable[str], timeout: float, stopping: Callable[[], bool]) -> None:
        """Start-up: block until each of `names` is ready. Nothing is restarted yet: a process that exits now
        (a port taken, a bad setting) would only exit again, so `LaunchError` says why, with its log's end."""
        pending = set(names)
        deadline = time.monotonic() + timeout
        while True:
            for child in self.children.values():
                if child.process.poll() is not None:
                    ended = describe_exit(child.process.returncode)
                    raise LaunchError(
                        f"{child.name} exited during start-up ({ended}); last lines of its log:\n"
                        f"{tail(child.spec.log_path)}"
                    )
            for name in sorted(pending):
                if self.children[name].spec.ready():
                    pending.discard(name)
                    self._mark_ready(self.children[name], time.monotonic())
            if not pending:
                return
            if stopping():
                raise LaunchError("stopped before the platform was ready")
            if time.monotonic() > deadline:
                log_dir = self.children[min(pending)].spec.log_path.parent
                raise LaunchError(f"not ready after {timeout:.0f}s: {', '.join(sorted(pending))}; logs in {log_dir}")
            time.sleep(POLL_SECONDS)

    def run(self, stopping: Callable[[], bool]) -> None:
        """Keep every process running until `stopping()` says otherwise."""
        while not stopping():
            self.check()
            time.sleep(POLL_SECONDS)

    def check(self) -> None:
        """One round: note who exited, start again whoever's backoff is over, probe whoever is not ready yet."""
        for child in self.children.values():
            now = time.monotonic()
            if child.restart_at is not None:
                if now >= child.restart_at:
                    self._restart(child)
            elif _has_exited(child.process):
                self._exited(child, now)
            elif child.ready_at is None:
                self._probe(child, now)

    def stop(self) -> None:
        stop_processes(self.platform, say=self.say)

    def _exited(self, child: _Child, now: float) -> None:
        # What is left of its group (an HTTP server's own workers, still holding its port) goes with it, while
        # the unreaped leader keeps the group's id from being reused.
        signal_group(child.process.pid, signal.SIGKILL)
        returncode = child.process.wait()
        stayed_up = child.ready_at is not None and now - child.ready_at >= self.policy.stable_after
        child.attempt = 1 if stayed_up else child.attempt + 1
        child.delay = self.policy.delay(child.attempt)
        child.restart_at = now + child.delay
        ended = f"not ready in {self.policy.ready_timeout:g}s" if child.gave_up_waiting else describe_exit(returncode)
        self.platform.last_exits[child.name] = ended
        self.platform.save()
        log.warning(
            "process_exited",
            process=child.name,
            pid=child.process.pid,
            **_exit_fields(returncode),
            ended=ended,
            up_s=round(now - child.started_at, 1),
            attempt=child.attempt,
            restart_in_s=child.delay,
        )
        if child.delay >= self.policy.cap:
            log.warning(
                "process_keeps_exiting",
                process=child.name,
                attempt=child.attempt,
                retry_every_s=self.policy.cap,
                message=(
                    f"{child.name} keeps exiting: retried every {self.policy.cap:g}s until it stays up "
                    f"{self.policy.stable_after:g}s; see {child.spec.log_path}"
                ),
            )
        self.say(f"{child.name} exited ({ended}); restarting in {child.delay:g}s (attempt {child.attempt})")

    def _restart(self, child: _Child) -> None:
        previous = child.process
        child.process = child.spec.spawn()
        child.started_at = time.monotonic()
        child.ready_at = None
        child.restart_at = None
        child.gave_up_waiting = False
        child.restarts += 1
        self._record(child)
        log.warning(
            "process_restarted",
            process=child.name,
            pid=child.process.pid,
            previous_pid=previous.pid,
            **_exit_fields(previous.returncode),
            attempt=child.attempt,
            delay_s=child.delay,
            restarts=child.restarts,
        )
        self.say(f"{child.name} restarted (pid {child.process.pid})")

    def _probe(self, child: _Child, now: float) -> None:
        if child.spec.ready():
            self._mark_ready(child, now)
        elif now - child.started_at > self.policy.ready_timeout:
            log.warning(
                "process_not_ready", process=child.name, pid=child.process.pid, waited_s=self.policy.ready_timeout
            )
            child.gave_up_waiting = True
            signal_group(child.process.pid, signal.SIGKILL)  # the next round sees it exit, and restarts it

    def _mark_ready(self, child: _Child, now: float) -> None:
        child.ready_at = now
        log.info("process_ready", process=child.name, pid=child.process.pid, after_s=round(now - child.started_at, 1))
        self.say(f"  {child.name} ready")

    def _record(self, child: _Child) -> None:
        self.platform.processes[child.name] = child.process.pid
        self.platform.restarts[child.name] = child.restarts
        self.platform.save()


def stop_processes(platform: Platform, *, say: Say = _silent) -> None:
    """SIGTERM every process group (workers first so they finish their task), then SIGKILL stragglers; remove
    the state file."""
    order = sorted(platform.processes, key=lambda name: (name == "redis", not name.endswith("-worker")))
    for name in order:
        signal_group(platform.processes[name], signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_SECONDS
    while time.monotonic() < deadline and platform.alive():
        time.sleep(0.1)
    for name, pid in platform.alive().items():
        say(f"  {name} did not stop in {STOP_GRACE_SECONDS:.0f}s; killing it")
        signal_group(pid, signal.SIGKILL)
    # Reap whatever is left in each group (the HTTP servers' and celery's children).
    for pid in platform.processes.values():
        signal_group(pid, signal.SIGKILL)
    platform.state_file.unlink(missing_ok=True)
    for service in platform.workers():
        platform.worker_ready_file(service).unlink(missing_ok=True)
