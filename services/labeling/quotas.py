"""The monthly `annotations` quota: a labelled annotation is billable work, so one that would pass its tenant's
quota is refused (429 `quota_exhausted` naming the meter, Retry-After until the next month) and nothing of it is
recorded or metered.

The quota and the month to date are ingestion's (`shared.ratelimit.TenantQuotas`, kept KEY_CACHE_SECONDS). A
billable answer reserves one annotation on the tenant's Redis counter (`shared.ratelimit.QuotaCounter`, started
from the meter store's month to date, so a flushed Redis does not forgive the month) inside the transaction that
records it, and gives it back if that transaction then fails. Only what the meter bills counts: a new label, or a
skip later labelled; an edit of a label is the same record and is never refused.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from shared.ratelimit import QuotaCounter, TenantQuotas
from shared.runtime import Runtime

METER = "annotations"


class AnnotationQuota:
    def __init__(self, runtime: Runtime) -> None:
        settings = runtime.settings
        self.quotas = TenantQuotas(
            settings.ingestion_url, settings.internal_token, (METER,), ttl=max(1.0, settings.key_cache_seconds)
        )
        self.counter = QuotaCounter(runtime.redis, runtime.service)

    def limit(self, tenant: str) -> int | None:
        """The tenant's monthly annotations quota (None: none, or ingestion cannot say), its counter started."""
        found = self.quotas.get(tenant)
        if found is None or METER not in found[0]:
            return None
        limits, used = found
        self.counter.seed(tenant, METER, used[METER])
        return limits[METER]

    @contextmanager
    def reservation(self, tenant: str, limit: int | None) -> Iterator[Reservation]:
        """For the block that records an answer: what it `take`s is given back if the block raises (its
        transaction, opened inside this block, rolled back)."""
        reservation = Reservation(self.counter, tenant, limit)
        try:
            yield reservation
        except BaseException:
            reservation.give_back()
            raise


class Reservation:
    def __init__(self, counter: QuotaCounter, tenant: str, limit: int | None) -> None:
        self.counter, self.tenant, self.limit = counter, tenant, limit
        self.taken: dict[str, int] = {}

    def take(self) -> None:
        """One annotation, or QuotaExhausted (429) having taken nothing."""
        if self.limit is not None:
            self.taken = self.counter.reserve(self.tenant, {METER: 1}, {METER: self.limit})

    def give_back(self) -> None:
        if self.taken:
            self.counter.release(self.tenant, self.taken)
            self.taken = {}


def of(runtime: Runtime) -> AnnotationQuota:
    """The process's annotation quota guard, made on first use."""
    guard = getattr(runtime, "annotation_quota", None)
    if guard is None:
        guard = runtime.annotation_quota = AnnotationQuota(runtime)  # type: ignore[attr-defined]
    return guard
