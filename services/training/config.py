"""Training's own settings, read from `shared.settings.Settings`, and the intervals that follow from them.

- **The lease** (`TRAINING_LEASE_SECONDS`): how long a run's execution may go without renewing its lease
  before it is taken for dead. Every live training worker sweeps for such runs and queues them again; they
  resume from their last checkpoint. The heartbeat renews the lease several times within it, and the sweep
  runs several times within it, so a dead worker's run is queued again within about one lease and a sweep.
- **Per-tenant limits**: runs of one tenant that may wait in the queue (`POST /v1/runs` beyond it answers
  429 `too_many_runs`), and runs of one tenant that may hold a worker at once (the others wait, in order,
  and are sent to the queue as slots free). 0 turns a limit off.
"""

from __future__ import annotations

from dataclasses import dataclass

from shared.settings import Settings

HEARTBEAT_SECONDS = 2.0
"""The heartbeat's period at most; with a short lease it beats five times per lease."""
SWEEP_SECONDS = 5.0
"""The orphan sweep's period at most; with a short lease it sweeps four times per lease."""

MAX_QUEUED = "max_queued_runs_per_tenant"
MAX_RUNNING = "max_running_runs_per_tenant"
RUN_LIMITS = (MAX_QUEUED, MAX_RUNNING)
"""The limits' names, as errors and log lines give them."""


@dataclass(frozen=True)
class TrainingConfig:
    lease_seconds: float
    max_queued_runs_per_tenant: int
    max_running_runs_per_tenant: int

    @classmethod
    def of(cls, settings: Settings) -> TrainingConfig:
        return cls(
            lease_seconds=settings.training_lease_seconds,
            max_queued_runs_per_tenant=settings.training_max_queued_runs_per_tenant,
            max_running_runs_per_tenant=settings.training_max_running_runs_per_tenant,
        )

    @property
    def heartbeat_seconds(self) -> float:
        return min(HEARTBEAT_SECONDS, self.lease_seconds / 5)

    @property
    def sweep_seconds(self) -> float:
        return min(SWEEP_SECONDS, self.lease_seconds / 4)
