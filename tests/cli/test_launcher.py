"""`flywheel up` brings five services (and the workers of those that run one) up as real processes, refuses to
start twice, and stops cleanly."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from cli.launcher import services_with_workers
from shared.settings import SERVICES

pytestmark = [pytest.mark.slow, pytest.mark.timeout(240)]


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for sock in sockets:
        sock.bind(("127.0.0.1", 0))
    ports = [sock.getsockname()[1] for sock in sockets]
    for sock in sockets:
        sock.close()
    return ports


def flywheel(env: dict[str, str], *args: str, timeout: float = 150) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture
def launcher_env(tmp_path: Path, redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_PORT")}
    env.update(FLYWHEEL_HOME=str(tmp_path / "home"), REDIS_URL=redis_url)
    env.pop("FLYWHEEL_INTERNAL_TOKEN", None)
    env.pop("S3_ENDPOINT", None)
    for service, port in zip(SERVICES, free_ports(len(SERVICES)), strict=True):
        env[f"{service.upper()}_PORT"] = str(port)
    return env


def test_up_detach_status_refuse_twice_and_down(launcher_env: dict[str, str], tmp_path: Path) -> None:
    workers = services_with_workers()
    assert "inference" not in workers and "labeling" in workers  # inference's HTTP processes hear promotions
    started = time.monotonic()
    up = flywheel(launcher_env, "up", "--detach")
    elapsed = time.monotonic() - started
    state_file = tmp_path / "home" / "run" / "state.json"
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert elapsed < 90, f"took {elapsed:.0f}s to be ready"
        for service in SERVICES:
            assert f"{service} ready" in up.stdout
            if service in workers:
                assert f"{service}-worker ready" in up.stdout, "up returns once every worker consumes"
            else:
                assert f"{service}-worker" not in up.stdout, f"{service} runs no worker"
            assert f"http://127.0.0.1:{launcher_env[f'{service.upper()}_PORT']}" in up.stdout
        console = f"http://127.0.0.1:{launcher_env['LABELING_PORT']}/console/"
        assert f"console  {console}" in up.stdout
        page = requests.get(console, timeout=10)
        assert page.status_code == 200 and "<title>Flywheel console</title>" in page.text
        token_file = tmp_path / "home" / "internal-token"
        assert f"internal token in {token_file}" in up.stdout
        assert oct(token_file.stat().st_mode & 0o777) == "0o600"

        status = flywheel(launcher_env, "status")
        assert status.returncode == 0, status.stdout
        assert status.stdout.count(" ready") == len(SERVICES)

        again = flywheel(launcher_env, "up", "--detach")
        assert again.returncode == 1
        assert "already running" in again.stderr and "flywheel down" in again.stderr
        assert "Traceback" not in again.stderr

        recorded = json.loads(state_file.read_text())
        pids = recorded["processes"]
        assert set(pids) == set(SERVICES) | {f"{s}-worker" for s in workers}
        assert group_alive(recorded["supervisor"]), "a supervisor watches the detached platform"
        pids["supervisor"] = recorded["supervisor"]
    finally:
        down = flywheel(launcher_env, "down", timeout=60)
    assert down.returncode == 0, down.stdout + down.stderr
    assert not state_file.exists() and not list(state_file.parent.glob("*.ready"))
    assert not [name for name, pid in pids.items() if group_alive(pid)], "processes left behind"
    stopped = flywheel(launcher_env, "status")
    assert stopped.returncode == 1
    assert "down" in stopped.stdout


def test_a_taken_port_is_a_clear_error(launcher_env: dict[str, str]) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", int(launcher_env["LABELING_PORT"])))
        blocker.listen()
        result = flywheel(launcher_env, "up", "--detach")
    assert result.returncode == 1
    assert f"port {launcher_env['LABELING_PORT']} (labeling) already in use" in result.stderr
    assert "Traceback" not in result.stderr


def test_foreground_with_a_private_redis_stops_everything_on_ctrl_c(
    launcher_env: dict[str, str], tmp_path: Path
) -> None:
    (closed,) = free_ports(1)
    launcher_env["REDIS_URL"] = f"redis://127.0.0.1:{closed}/0"  # nothing answers there
    process = subprocess.Popen(
        [sys.executable, "-u", "-m", "cli.main", "up"],
        env=launcher_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            output.append(line)
            if "Press Ctrl-C" in line:
                break
        text = "".join(output)
        assert "Press Ctrl-C" in text, text
        assert re.search(r"started a private one at redis://127\.0\.0\.1:\d+/0", text), text
        recorded = json.loads((tmp_path / "home" / "run" / "state.json").read_text())
        pids = {**recorded["processes"], "supervisor": recorded["supervisor"]}
        assert "redis" in pids
        process.send_signal(subprocess.signal.SIGINT)
        rest, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, rest
    assert "Flywheel stopped." in rest
    assert not [name for name, pid in pids.items() if group_alive(pid)], "processes left behind"
