"""Fixtures of the registry's tests: the service itself (SQLite by default), a training-run factory, and the same
runs with the evaluation report training writes beside them."""

from __future__ import annotations

import pytest

from tests.conftest import RunningService
from tests.registry.evaluations import EvaluatedRuns
from tests.registry.support import RunFactory


@pytest.fixture
def registry(platform) -> RunningService:
    return platform("registry")


@pytest.fixture
def runs(registry: RunningService) -> RunFactory:
    return RunFactory(registry.runtime.storage)


@pytest.fixture
def evaluated(registry: RunningService, runs: RunFactory) -> EvaluatedRuns:
    return EvaluatedRuns(registry, runs)
