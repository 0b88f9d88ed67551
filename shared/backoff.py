"""The one backoff formula: exponential, capped, with jitter so that many retriers never fall into step.

A Celery task that simply retries uses Celery's own `retry_backoff` / `retry_jitter` options; everything else
that waits before trying again (an event consumer's retry countdown, a failed model load, a reconcile loop)
asks `backoff_delay` how long.
"""

from __future__ import annotations

import random


def backoff_delay(attempt: int, base: float, cap: float, *, jitter: bool = True) -> float:
    """Seconds to wait before try `attempt + 1`: base, 2·base, 4·base … never above `cap`.

    With jitter the delay is drawn from the upper half of that ceiling: spread out, yet never much shorter
    than the schedule promises.
    """
    ceiling = min(base * 2 ** max(attempt - 1, 0), cap)
    if not jitter:
        return ceiling
    return ceiling * random.uniform(0.5, 1.0)  # noqa: S311 - jitter, not security
