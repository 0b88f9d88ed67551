"""A worker's heartbeat files, as its Kubernetes probes read them (`flywheel-healthcheck --heartbeat`).

The worker is a service's real Celery worker on the real broker; the probe is the image's health check script,
run as a process the way the kubelet runs it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from shared.events.heartbeat import Heartbeat
from tests.helpers import eventually

HEALTHCHECK = Path(__file__).resolve().parents[2] / "deploy" / "healthcheck.py"


def probe(path: Path, max_age: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(HEALTHCHECK), "--heartbeat", str(path), "--max-age", str(max_age)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


def test_a_running_worker_is_alive_and_ready_then_neither_once_stopped(worker, settings) -> None:
    alive = settings.home / "heartbeat" / "labeling.alive"
    ready = settings.home / "heartbeat" / "labeling.ready"
    assert probe(alive).returncode == 1
    with worker("labeling"):
        eventually(lambda: alive.exists() and ready.exists(), what="the worker's heartbeat files")
        for path in (alive, ready):
            answer = probe(path)
            assert answer.returncode == 0, answer.stdout
            assert "heartbeat" in answer.stdout
    assert not alive.exists() and not ready.exists()
    gone = probe(alive)
    assert gone.returncode == 1 and "does not exist" in gone.stdout


def test_the_heartbeat_keeps_beating_and_readiness_follows_the_consumer(tmp_path: Path) -> None:
    heartbeat = Heartbeat(tmp_path, "training", interval=0.05)
    heartbeat.start()
    try:
        assert heartbeat.alive_path.exists() and not heartbeat.ready_path.exists()
        old = time.time() - 600
        os.utime(heartbeat.alive_path, (old, old))
        eventually(lambda: heartbeat.alive_path.stat().st_mtime > old + 500, what="the thread to touch it again")
        heartbeat.consumer_started()
        assert probe(heartbeat.ready_path).returncode == 0
        heartbeat.consumer_stopped()  # the broker connection was lost: unready, still alive
        assert not heartbeat.ready_path.exists()
        assert probe(heartbeat.alive_path).returncode == 0
    finally:
        heartbeat.stop()
    assert not heartbeat.alive_path.exists()


def test_a_stale_heartbeat_fails_the_probe(tmp_path: Path) -> None:
    path = tmp_path / "registry.alive"
    path.touch()
    assert probe(path, max_age=60).returncode == 0
    old = time.time() - 120
    os.utime(path, (old, old))
    answer = probe(path, max_age=60)
    assert answer.returncode == 1
    assert "stale heartbeat" in answer.stdout and "120s ago" in answer.stdout
