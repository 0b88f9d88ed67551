"""The Python client of Flywheel's public APIs, used by the CLI, the demo and the end-to-end tests."""

from shared.client.api import (
    Flywheel,
    InferenceClient,
    IngestionClient,
    LabelingClient,
    RegistryClient,
    TrainingClient,
)
from shared.client.http import ApiError, ServiceClient, answer_or_none, wait_for

__all__ = [
    "ApiError",
    "Flywheel",
    "InferenceClient",
    "IngestionClient",
    "LabelingClient",
    "RegistryClient",
    "ServiceClient",
    "TrainingClient",
    "answer_or_none",
    "wait_for",
]
