"""Monthly quotas on training compute (`training_cpu_seconds`, `training_gpu_seconds`).

A run's compute is known only when it ends (its `usage.recorded`, `runs.compute_usage`), so the check is
"already exhausted": a new run is refused while the tenant's month to date on a compute meter with a quota has
reached that quota, whichever device the run would get (a worker picks it later). The last run admitted may take
the month past its quota; none starts after. The figures are ingestion's meter store
(`GET /v1/internal/tenants/{tenant}/limits`, asked for every request: runs are rare and a cached figure would
let one more through), so a run's compute counts once ingestion has consumed its usage event.

- Through the API (`POST /v1/runs`) a refused run is 429 `quota_exhausted` naming the meter, and nothing is
  recorded or queued.
- A `training.requested` event (the retrain policy) has no caller to answer: its run is recorded as failed with
  the quota in its reason (`training.failed` tells the producer), and never trained.

When ingestion cannot answer, no compute quota is enforced (training goes on; `tenant_limits_unavailable`).
An identical run already queued, running or succeeded is still returned: it costs nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.orm import Session

from services.training import runs
from services.training.models import TrainingRun
from services.training.runs import RunRequest
from shared.logging import get_logger
from shared.ratelimit import QuotaExhausted, TenantQuotas, seconds_until_next_month
from shared.runtime import Runtime

log = get_logger(__name__)

METERS = ("training_cpu_seconds", "training_gpu_seconds")


class ComputeQuotaExhausted(QuotaExhausted):
    """429 `quota_exhausted`; `request` is the run that was refused (what a refused event's record shows)."""

    def __init__(self, message: str, details: dict, request: RunRequest) -> None:
        super().__init__(message, details, retry_after=seconds_until_next_month())
        self.request = request


@dataclass(frozen=True)
class ComputeQuota:
    tenant: str
    limits: dict[str, int] = field(default_factory=dict)
    used: dict[str, int] = field(default_factory=dict)

    def refuse_if_exhausted(self, request: RunRequest) -> None:
        for meter in METERS:
            if meter in self.limits and self.used.get(meter, 0) >= self.limits[meter]:
                limit, used = self.limits[meter], self.used.get(meter, 0)
                raise ComputeQuotaExhausted(
                    f"the monthly quota of {limit} {meter} is exhausted ({used} used this month): no run starts "
                    "until the next month or a higher quota",
                    {"meter": meter, "limit": limit, "used": used},
                    request,
                )


def compute_quota(runtime: Runtime, tenant: str | None) -> ComputeQuota:
    """The tenant's compute quotas and month to date (none when it has none or ingestion cannot say); asked
    before any lock is taken."""
    if not tenant:
        return ComputeQuota("")
    lookup = getattr(runtime, "compute_quotas", None)
    if lookup is None:
        settings = runtime.settings
        lookup = runtime.compute_quotas = TenantQuotas(settings.ingestion_url, settings.internal_token, METERS)  # type: ignore[attr-defined]
    found = lookup.get(tenant)
    return ComputeQuota(tenant, *found) if found is not None else ComputeQuota(tenant)


def record_refused(runtime: Runtime, session: Session, refused: ComputeQuotaExhausted) -> TrainingRun:
    """A requested run the quota refuses: a failed run whose reason names the quota, and its `training.failed`."""
    run = runs.record_rejected(runtime, session, refused.request, refused.message)
    log.warning("training_request_over_quota", run_id=run.id, meter=refused.details["meter"], reason=refused.message)
    return run
