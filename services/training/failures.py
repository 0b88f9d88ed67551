"""Why a run stops without a model. Each carries a reason written for the person who has to act on it."""

from __future__ import annotations


class TrainingFailure(Exception):
    """The run cannot produce a model: bad data, a failed export check, unusable weights. Not retried."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class DataError(TrainingFailure):
    """The snapshot cannot be read or is unusable for training."""


class ExportError(TrainingFailure):
    """The trained model could not be exported, or the export does not reproduce the torch model."""


class RunInterrupted(Exception):
    """Training stopped on purpose before the end; the run's record says why."""


class RunCancelled(RunInterrupted):
    """An operator cancelled the run."""


class LeaseLost(RunInterrupted):
    """Another process took the run over (this one missed its heartbeats); this one must stop quietly."""
