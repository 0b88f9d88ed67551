"""Consensus over several annotators, and the agreement statistics that say how far to trust it.

A task needs `required` labels (the dataset's overlap, grown by escalations). Once it has them, a strict
majority above `min_agreement` decides. A tie or a weak majority escalates the task to one more annotator,
up to `overlap + max_extra_annotations`; past that it goes to review, where an operator decides.

Agreement: percent agreement (the mean pairwise agreement within items) and Fleiss' kappa, generalised to
items rated by different numbers of annotators (each item's agreement uses its own count).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Decision:
    outcome: str  # pending | consensus | escalate | review
    label: str | None = None
    agreement: float | None = None


def decide(labels: Sequence[str], *, required: int, ceiling: int, min_agreement: float) -> Decision:
    """What a task's labels add up to. `ceiling` is the most annotations it may ever ask for."""
    if len(labels) < required:
        return Decision("pending")
    counts = Counter(labels).most_common()
    top_label, top_count = counts[0]
    agreement = top_count / len(labels)
    tie = len(counts) > 1 and counts[1][1] == top_count
    if not tie and (len(labels) == 1 or agreement > min_agreement):
        return Decision("consensus", top_label, agreement)
    if required < ceiling:
        return Decision("escalate", None, agreement)
    return Decision("review", None, agreement)


def fleiss_kappa(items: Iterable[Counter[str]]) -> tuple[float | None, float | None, int]:
    """(Fleiss' kappa, percent agreement, items used) over items with at least two ratings each."""
    rated = [counts for counts in items if sum(counts.values()) >= 2]
    if not rated:
        return None, None, 0
    per_item: list[float] = []
    totals: Counter[str] = Counter()
    all_ratings = 0
    for counts in rated:
        n = sum(counts.values())
        per_item.append((sum(c * c for c in counts.values()) - n) / (n * (n - 1)))
        totals.update(counts)
        all_ratings += n
    observed = sum(per_item) / len(per_item)
    expected = sum((count / all_ratings) ** 2 for count in totals.values())
    kappa = None if expected >= 1.0 else (observed - expected) / (1 - expected)
    return kappa, observed, len(rated)
