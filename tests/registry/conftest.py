"""Fixtures of the registry's tests: the service itself (SQLite by default) and a training-run factory."""

from __future__ import annotations

import pytest

from tests.conftest import RunningService
from tests.registry.support import RunFactory


@pytest.fixture
def registry(platform) -> RunningService:
    return platform("registry")


@pytest.fixture
def runs(registry: RunningService) -> RunFactory:
    return RunFactory(registry.runtime.storage)
