"""Consensus over several annotators, and the agreement statistics that say how far to trust it.

A task needs `required` labels (the dataset's overlap, grown by escalations). Once it has them, a strict
majority above `min_agreement` decides. A tie or a weak majority escalates the task to one more annotator,
up to `overlap + max_extra_annotations`; past that it goes to review, where an operator decides.

Agreement: percent agreement (the mean pairwise agreement within items) and Fleiss' kappa, generalised to
items rated by different numbers of annotators (each item's agreement uses its own count).

Token classification (entity spans, docs/ner.md): `decide_spans` is the same majority rule per entity (same
offsets and label), and `pairwise_entity_f1` the agreement between annotators at the entity level.
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


# ------------------------------------------------------------------------------ token classification: spans

Span = tuple[int, int, str]
"""An entity as annotators mark it: (start, end, label), offsets in Unicode code points."""


@dataclass(frozen=True)
class SpanDecision:
    outcome: str  # pending | consensus | escalate | review
    spans: tuple[Span, ...] | None = None
    agreement: float | None = None
    """The share of the annotators' votes on the item's distinct spans that went with the decision."""
    disputed: tuple[Span, ...] = ()
    """Spans neither a majority marked nor a majority left out: what the next annotator is asked to settle."""


def decide_spans(
    annotations: Sequence[Iterable[Span]], *, required: int, ceiling: int, min_agreement: float
) -> SpanDecision:
    """Entity-level consensus of a token-classification task: each distinct span (same offsets and label) is kept
    when more than `min_agreement` of the annotators marked it, dropped when more than `min_agreement` did not;
    any other span is a disagreement, and the task escalates (or goes to review at `ceiling`) as a tie does for a
    class label. An item every annotator leaves without entities reaches consensus on no spans."""
    if len(annotations) < required:
        return SpanDecision("pending")
    marked = [set(spans) for spans in annotations]
    n = len(marked)
    votes = Counter(span for spans in marked for span in spans)
    kept, disputed, agreeing = [], [], 0
    for span, count in votes.items():
        if n == 1 or count / n > min_agreement:
            kept.append(span)
            agreeing += count
        elif (n - count) / n > min_agreement:
            agreeing += n - count
        else:
            disputed.append(span)
    agreement = agreeing / (n * len(votes)) if votes else 1.0
    if not disputed:
        return SpanDecision("consensus", tuple(sorted(kept)), agreement)
    outcome = "escalate" if required < ceiling else "review"
    return SpanDecision(outcome, None, agreement, tuple(sorted(disputed)))


def entity_f1(first: Iterable[Span], second: Iterable[Span]) -> float:
    """Entity-level F1 of one annotator's spans against another's (exact offsets and label; symmetric). Two
    annotators who both mark no entity agree fully."""
    a, b = set(first), set(second)
    if not a and not b:
        return 1.0
    return 2 * len(a & b) / (len(a) + len(b))


def pairwise_entity_f1(items: Iterable[Sequence[Iterable[Span]]]) -> tuple[float | None, int]:
    """(Mean entity F1 over every pair of annotators of each item, items used), over items with two or more
    annotations: the span counterpart of percent agreement."""
    scores: list[float] = []
    used = 0
    for item in items:
        marked = [set(spans) for spans in item]
        if len(marked) < 2:
            continue
        used += 1
        scores.extend(entity_f1(marked[i], marked[j]) for i in range(len(marked)) for j in range(i + 1, len(marked)))
    return (sum(scores) / len(scores) if scores else None), used
