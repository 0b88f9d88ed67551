"""Fixtures of the deployment tests: the five services' real Flask apps, built once for the session."""

from __future__ import annotations

import importlib
from collections.abc import Iterator

import pytest
from flask import Flask

from shared.settings import SERVICES, Settings


@pytest.fixture(scope="package")  # closed when tests/deploy ends: inference's listener must not outlive it
def service_apps(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Flask]]:
    """Each service's app from its own `create_app(settings)`: SQLite and the file store under a temp
    FLYWHEEL_HOME, the test Redis as broker. Only their routes are read (and /healthz asked)."""
    home = tmp_path_factory.mktemp("flywheel-home")
    settings = Settings(home=home, redis_url=redis_url, internal_token="deploy-tests")
    apps = {name: importlib.import_module(f"services.{name}.app").create_app(settings) for name in SERVICES}
    yield apps
    for app in apps.values():
        for extension in ("inference", "flywheel"):  # inference's model server holds threads of its own
            if hasattr(app.extensions.get(extension), "close"):
                app.extensions[extension].close()
