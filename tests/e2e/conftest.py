"""The platform the end-to-end tests run against: `flywheel up --detach` in a child process, every service on a
free port, against the tests' Redis and S3 endpoint; stopped with `flywheel down` when the test ends."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cli.launcher import detached_platform
from tests.conftest import INTERNAL_TOKEN


@pytest.fixture
def running_platform(tmp_path: Path, redis_url: str, s3_server) -> Iterator[tuple[dict[str, str], Path]]:
    env = dict(
        os.environ,
        REDIS_URL=redis_url,
        FLYWHEEL_INTERNAL_TOKEN=INTERNAL_TOKEN,
        S3_ENDPOINT=s3_server.endpoint,
        S3_ACCESS_KEY=s3_server.access_key,
        S3_SECRET_KEY=s3_server.secret_key,
        KEY_CACHE_SECONDS="2",
        EVENT_RETRY_BACKOFF="0.5",
    )
    with detached_platform(tmp_path / "home", env, timeout=180) as urls:
        yield urls, tmp_path / "home" / "logs"
