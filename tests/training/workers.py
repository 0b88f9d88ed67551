"""Training workers as real processes: `flywheel worker training` (solo pool, prefetch 1) in a subprocess, as
deployed, against the test's Redis, S3 endpoint and SQLite database, so that a test can SIGKILL one."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shared.settings import Settings
from tests.conftest import INTERNAL_TOKEN

REPO = Path(__file__).resolve().parents[2]


def worker_environment(settings: Settings, **overrides: str) -> dict[str, str]:
    """The environment of a training worker process of the test platform `settings` describes."""
    return {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", str(settings.home)),
        "PYTHONPATH": str(REPO),
        "FLYWHEEL_HOME": str(settings.home),
        "REDIS_URL": settings.redis_url,
        "S3_ENDPOINT": settings.s3_endpoint,
        "S3_ACCESS_KEY": settings.s3_access_key,
        "S3_SECRET_KEY": settings.s3_secret_key,
        "FLYWHEEL_INTERNAL_TOKEN": INTERNAL_TOKEN,
        "TRAINING_DATABASE_URL": f"sqlite:///{settings.home / 'db' / 'training.sqlite3'}",
        "OUTBOX_RELAY_INTERVAL": "0.5",
        "LOG_LEVEL": "INFO",
        "OMP_NUM_THREADS": "1",  # see tests/training/conftest.py
        "PYTHONUNBUFFERED": "1",
        **overrides,
    }


@contextmanager
def worker_process(settings: Settings, log_path: Path, **env: str) -> Iterator[subprocess.Popen]:
    """A training worker process, its output appended to `log_path`; `env` overrides its environment."""
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "cli.main", "worker", "training"],
            cwd=REPO,
            env=worker_environment(settings, **env),
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        yield process
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
