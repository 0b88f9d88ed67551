"""`flywheel up` keeps what it starts running: a process that exits is started again after its backoff, the
restart is logged and counted in `flywheel status`, and `flywheel down` (or Ctrl-C) still stops everything, even
once the supervisor itself has died."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from cli.supervisor import LaunchError, Platform, ProcessSpec, RestartPolicy, Supervisor
from tests.cli.test_launcher import flywheel, group_alive, launcher_env

__all__ = ["launcher_env"]


# --- The supervisor on its own, over small real processes --------------------------------------------------------


def python_spec(tmp_path: Path, name: str, code: str, ready: Callable[[], bool] = lambda: True) -> ProcessSpec:
    return ProcessSpec(name, [sys.executable, "-c", code], dict(os.environ), tmp_path / f"{name}.log", ready)


@pytest.fixture
def supervised(tmp_path: Path) -> Iterator[Callable[[ProcessSpec, RestartPolicy, float], Platform]]:
    """Supervise one process for a while (in a thread, as the supervisor process would), then stop it."""
    supervisors: list[Supervisor] = []

    def run(spec: ProcessSpec, policy: RestartPolicy, seconds: float) -> Platform:
        platform = Platform(home=tmp_path / "home", redis_url="", internal_token="", ports={})
        supervisor = Supervisor(platform, policy=policy)
        supervisors.append(supervisor)
        supervisor.launch(spec)
        stop = threading.Event()
        thread = threading.Thread(target=supervisor.run, args=(stop.is_set,))
        thread.start()
        time.sleep(seconds)
        stop.set()
        thread.join(timeout=10)
        assert not thread.is_alive(), "the supervisor did not stop when asked"
        return Platform.load(platform.home)

    yield run
    for supervisor in supervisors:
        supervisor.stop()


@pytest.mark.timeout(60)
def test_a_process_that_keeps_exiting_is_retried_ever_later_then_at_the_cap(tmp_path, supervised, logs) -> None:
    spec = python_spec(tmp_path, "crasher", "raise SystemExit(3)")
    platform = supervised(spec, RestartPolicy(base=0.1, cap=0.4, stable_after=30), 3.0)

    restarts = logs.find(event="process_restarted", process="crasher")
    assert len(restarts) >= 4, restarts
    assert [line["attempt"] for line in restarts] == list(range(1, len(restarts) + 1))
    assert [line["delay_s"] for line in restarts[:4]] == [0.1, 0.2, 0.4, 0.4], "base, 2 x base, 4 x base, then the cap"
    assert all(line["exit_code"] == 3 and line["signal"] is None for line in restarts)
    assert [line["previous_pid"] for line in restarts[1:]] == [line["pid"] for line in restarts[:-1]]
    crashing = logs.find(event="process_keeps_exiting", process="crasher")
    assert crashing and crashing[0]["retry_every_s"] == 0.4 and "retried every 0.4s" in crashing[0]["message"]
    assert platform.restarts["crasher"] == len(restarts)
    assert platform.last_exits["crasher"] == "exit 3"
    assert platform.processes["crasher"] == restarts[-1]["pid"]


@pytest.mark.timeout(60)
def test_a_process_that_stayed_up_starts_its_backoff_afresh(tmp_path, supervised, logs) -> None:
    spec = python_spec(tmp_path, "sleeper", "import time; time.sleep(0.8)")
    supervised(spec, RestartPolicy(base=0.1, cap=10, stable_after=0.3), 3.5)

    restarts = logs.find(event="process_restarted", process="sleeper")
    assert len(restarts) >= 2, restarts
    assert all(line["attempt"] == 1 and line["delay_s"] == 0.1 for line in restarts), restarts
    assert all(line["exit_code"] == 0 for line in restarts), "an exit that is not a crash is unexpected too"


@pytest.mark.timeout(60)
def test_a_process_never_ready_is_killed_and_retried(tmp_path, supervised, logs) -> None:
    spec = python_spec(tmp_path, "stuck", "import time; time.sleep(60)", ready=lambda: False)
    platform = supervised(spec, RestartPolicy(base=0.1, cap=1, ready_timeout=0.5), 2.0)

    assert logs.find(event="process_not_ready", process="stuck")
    restarted = logs.find(event="process_restarted", process="stuck")
    assert restarted and restarted[0]["signal"] == "SIGKILL"
    assert platform.last_exits["stuck"] == "not ready in 0.5s"


def test_a_process_that_exits_during_start_up_fails_it_with_its_log(tmp_path) -> None:
    platform = Platform(home=tmp_path / "home", redis_url="", internal_token="", ports={})
    supervisor = Supervisor(platform)
    code = "print('no such setting: FOO'); raise SystemExit(2)"
    supervisor.launch(python_spec(tmp_path, "broken", code, ready=lambda: False))
    try:
        with pytest.raises(LaunchError, match=r"broken exited during start-up \(exit 2\)") as failure:
            supervisor.wait_ready(["broken"], timeout=30, stopping=lambda: False)
        assert "no such setting: FOO" in str(failure.value)
        assert Platform.load(platform.home).restarts == {"broken": 0}, "nothing is restarted during start-up"
    finally:
        supervisor.stop()


# --- The whole platform -----------------------------------------------------------------------------------------


def state(home: Path) -> dict:
    return json.loads((home / "run" / "state.json").read_text())


def wait_for(condition: Callable[[], bool], seconds: float, what: str) -> float:
    """Seconds until `condition()` holds; fails the test after `seconds`."""
    started = time.monotonic()
    while not condition():
        if time.monotonic() - started > seconds:
            pytest.fail(f"{what}: not within {seconds:.0f}s")
        time.sleep(0.2)
    return time.monotonic() - started


def http_ready(port: int) -> bool:
    try:
        return requests.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200
    except requests.RequestException:
        return False


def supervisor_log(home: Path) -> list[dict]:
    lines = (home / "logs" / "supervisor.log").read_text().splitlines()
    return [json.loads(line) for line in lines if line.startswith("{")]


def process_row(status_output: str, name: str) -> list[str]:
    """The cells of `name`'s row in `flywheel status`'s process table: pid, state, restarts, last exit."""
    match = re.search(rf"^{re.escape(name)}\s+(\d+)\s+(\w+)\s+(\d+)\s+(.+)$", status_output, re.MULTILINE)
    assert match, status_output
    return list(match.groups())


RESTARTED_WITHIN_SECONDS = 60.0
"""The first restart waits 1 s; the rest is a service's own start-up on a busy 2-core machine."""


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_detached_platform_restarts_killed_processes_and_down_stops_everything(
    launcher_env: dict[str, str], tmp_path: Path
) -> None:
    home = tmp_path / "home"
    up = flywheel(launcher_env, "up", "--detach")
    assert up.returncode == 0, up.stdout + up.stderr
    seen: dict[str, int] = {}
    try:
        before = state(home)
        seen.update(before["processes"], supervisor=before["supervisor"])
        assert group_alive(before["supervisor"]), "the supervisor outlives `up --detach`"
        killed = {name: before["processes"][name] for name in ("training-worker", "inference")}
        for pid in killed.values():
            os.kill(pid, signal.SIGKILL)

        def back(name: str) -> Callable[[], bool]:
            def check() -> bool:
                pid = state(home)["processes"][name]
                if pid == killed[name]:
                    return False
                if name == "inference":
                    return http_ready(before["ports"]["inference"])
                ready_file = home / "run" / "training-worker.ready"  # written once the new worker consumes
                return ready_file.exists() and ready_file.read_text() == str(pid)

            return check

        wait_for(back("training-worker"), RESTARTED_WITHIN_SECONDS, "the training worker back and consuming")
        wait_for(back("inference"), RESTARTED_WITHIN_SECONDS, "inference back and ready")
        after = state(home)
        seen.update({f"{name} (restarted)": after["processes"][name] for name in killed})

        lines = supervisor_log(home)
        for name, pid in killed.items():
            (restarted,) = [line for line in lines if line["event"] == "process_restarted" and line["process"] == name]
            assert restarted["previous_pid"] == pid and restarted["signal"] == "SIGKILL"
            assert restarted["exit_code"] is None and restarted["attempt"] == 1 and restarted["delay_s"] == 1.0
            assert restarted["pid"] == after["processes"][name] and restarted["service"] == "supervisor"
            assert after["restarts"][name] == 1

        status = flywheel(launcher_env, "status")
        assert status.returncode == 0, status.stdout
        for name in killed:
            assert process_row(status.stdout, name) == [
                str(after["processes"][name]),
                "running",
                "1",
                "killed by SIGKILL",
            ]
        assert process_row(status.stdout, "labeling-worker")[1:] == ["running", "0", "-"]
        assert f"supervisor pid {after['supervisor']} restarts what exits" in status.stdout

        # Should the supervisor itself die, its processes run on unsupervised, and `down` still stops them.
        os.kill(after["supervisor"], signal.SIGKILL)
        wait_for(lambda: not group_alive(after["supervisor"]), 10, "the supervisor gone")
        orphaned = flywheel(launcher_env, "status")
        assert orphaned.returncode == 0, orphaned.stdout
        assert "supervisor not running" in orphaned.stdout
    finally:
        down = flywheel(launcher_env, "down", timeout=90)
    assert down.returncode == 0, down.stdout + down.stderr
    assert "Flywheel stopped." in down.stdout
    assert not (home / "run" / "state.json").exists()
    assert not [name for name, pid in seen.items() if group_alive(pid)], "processes left behind"


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_foreground_platform_restarts_a_killed_server_and_stops_on_ctrl_c(
    launcher_env: dict[str, str], tmp_path: Path
) -> None:
    home = tmp_path / "home"
    process = subprocess.Popen(
        [sys.executable, "-u", "-m", "cli.main", "up"],
        env=launcher_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []

    def read_until(text: str) -> None:
        while (line := process.stdout.readline()) and text not in line:
            output.append(line)
        assert line, "".join(output)
        output.append(line)

    seen: dict[str, int] = {}
    try:
        read_until("Press Ctrl-C")
        before = state(home)
        seen.update(before["processes"], supervisor=before["supervisor"])
        os.kill(before["processes"]["labeling"], signal.SIGKILL)  # gunicorn's master: its worker holds the port
        started = time.monotonic()
        read_until("labeling exited (killed by SIGKILL); restarting in 1s (attempt 1)")
        read_until("labeling restarted")
        read_until("  labeling ready")
        assert time.monotonic() - started < RESTARTED_WITHIN_SECONDS
        after = state(home)
        assert after["restarts"]["labeling"] == 1 and after["last_exits"]["labeling"] == "killed by SIGKILL"
        assert http_ready(before["ports"]["labeling"])
        seen["labeling (restarted)"] = after["processes"]["labeling"]
        process.send_signal(signal.SIGINT)
        rest, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, rest
    assert "Stopping…" in rest and "Flywheel stopped." in rest
    assert not [name for name, pid in seen.items() if group_alive(pid)], "processes left behind"
