"""The `flywheel models` commands talk to a real registry: its fixtures serve here too."""

from tests.registry.conftest import registry, runs

__all__ = ["registry", "runs"]
