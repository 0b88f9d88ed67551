"""Two models' answers on the same items: their scores, and how sure we can be that one beats the other.

Everything here works from per-item predictions (indices into the label list, -1 for an answer outside it:
always wrong, and no class's prediction), never from a model's own
summary, so the numbers the gate decides on are computed one way for every model on the set:

- `scores`: accuracy, macro-F1 and per-class precision, recall, F1 and support. Macro-F1 averages over the
  classes that occur in the labels or the predictions (scikit-learn's convention, which training's
  `evaluate.macro_f1` uses too).
- `paired_bootstrap`: a percentile confidence interval of `metric(candidate) - metric(production)`. Each
  resample draws item indices with replacement and scores *both* models on the same drawn items, so the
  interval reflects how the difference varies, not each score on its own. The generator is seeded from the
  evaluation set's sha256 (`seed_for`): the same report always gives the same interval.
- `mcnemar`: the exact test on the discordant pairs (items exactly one of the two models gets right), the
  classical paired test for accuracy.
- Token classification (entity F1): from per-item entity counts instead of per-item classes (`entity_scores`,
  `entity_bootstrap`, the same paired resampling of items); see the section at the end.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.stats import binomtest

METRICS = ("macro_f1", "accuracy")
RESAMPLE_CELLS = 1_000_000
"""Resamples are drawn in chunks of at most this many item indices, so memory stays flat whatever the set."""


@dataclass(frozen=True)
class Interval:
    low: float
    high: float
    samples: int
    seed: int


def seed_for(evaluation_set_sha256: str) -> int:
    """The bootstrap's seed: the first 52 bits of the evaluation set's sha256 (exact as a JSON number anywhere)."""
    return int(evaluation_set_sha256[:13], 16)


def _counts(y_true: np.ndarray, y_pred: np.ndarray, classes: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per row of a (resamples, items) pair of arrays: true positives, true counts and predicted counts per class.

    A prediction of -1 (a label outside the set's labels) is wrong and counts as no class's prediction.
    """
    rows = np.arange(y_true.shape[0])[:, None] * classes
    size = y_true.shape[0] * classes
    known = y_pred >= 0
    true = np.bincount((rows + y_true).ravel(), minlength=size).reshape(-1, classes)
    predicted = np.bincount((rows + np.where(known, y_pred, 0)).ravel(), weights=known.ravel(), minlength=size)
    hits = np.bincount((rows + y_true).ravel(), weights=(y_true == y_pred).ravel(), minlength=size)
    return hits.reshape(-1, classes), true, predicted.reshape(-1, classes)


def _f1(hits: np.ndarray, true: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    denominator = true + predicted
    return np.divide(2.0 * hits, denominator, out=np.zeros(hits.shape), where=denominator > 0)


def _metric(name: str, y_true: np.ndarray, y_pred: np.ndarray, classes: int) -> np.ndarray:
    """`name` per row of (resamples, items) arrays."""
    if name == "accuracy":
        return (y_true == y_pred).mean(axis=1)
    hits, true, predicted = _counts(y_true, y_pred, classes)
    present = (true + predicted) > 0
    return _f1(hits, true, predicted).sum(axis=1) / np.maximum(present.sum(axis=1), 1)


def metric(name: str, y_true: np.ndarray, y_pred: np.ndarray, classes: int) -> float:
    """One metric (`macro_f1` or `accuracy`) of one model on the whole set; 0.0 on an empty set."""
    if len(y_true) == 0:
        return 0.0
    return float(_metric(name, y_true[None, :], y_pred[None, :], classes)[0])


def scores(y_true: np.ndarray, y_pred: np.ndarray, labels: list[str]) -> dict[str, Any]:
    """Accuracy, macro-F1 and per-class precision/recall/F1/support; a score with nothing to divide by is 0."""
    classes = len(labels)
    if len(y_true) == 0:
        hits = true = predicted = np.zeros(classes)
    else:
        hits, true, predicted = (row[0] for row in _counts(y_true[None, :], y_pred[None, :], classes))
    precision = np.divide(hits, predicted, out=np.zeros(classes), where=predicted > 0)
    recall = np.divide(hits, true, out=np.zeros(classes), where=true > 0)
    f1 = _f1(hits, true, predicted)
    return {
        "accuracy": metric("accuracy", y_true, y_pred, classes),
        "macro_f1": metric("macro_f1", y_true, y_pred, classes),
        "per_class": {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(true[i]),
            }
            for i, label in enumerate(labels)
        },
    }


def paired_bootstrap(
    name: str,
    y_true: np.ndarray,
    candidate: np.ndarray,
    production: np.ndarray,
    classes: int,
    *,
    samples: int,
    confidence: float,
    seed: int,
) -> Interval:
    """The percentile interval, at `confidence`, of `name(candidate) - name(production)` over paired resamples."""
    items = len(y_true)
    rng = np.random.default_rng(seed)
    chunk = max(1, RESAMPLE_CELLS // max(items, 1))
    differences = []
    for start in range(0, samples, chunk):
        drawn = rng.integers(0, items, size=(min(chunk, samples - start), items))
        truth = y_true[drawn]
        differences.append(
            _metric(name, truth, candidate[drawn], classes) - _metric(name, truth, production[drawn], classes)
        )
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(np.concatenate(differences), [tail, 1.0 - tail])
    return Interval(low=float(low), high=float(high), samples=samples, seed=seed)


def mcnemar(y_true: np.ndarray, candidate: np.ndarray, production: np.ndarray) -> dict[str, Any]:
    """McNemar's exact test: of the items exactly one model gets right, is the split further from even than chance?"""
    candidate_right, production_right = candidate == y_true, production == y_true
    only_candidate = int((candidate_right & ~production_right).sum())
    only_production = int((production_right & ~candidate_right).sum())
    discordant = only_candidate + only_production
    p_value = float(binomtest(only_candidate, discordant, 0.5).pvalue) if discordant else 1.0
    return {"only_candidate_right": only_candidate, "only_production_right": only_production, "p_value": p_value}


# ------------------------------------------------------------------------------------- token classification
# A token_classification report answers per item with entity counts (services.training.token_runs): per entity
# label, true positives, false positives and false negatives, plus `other_fp` (entities of a label outside the
# report's). Entity F1 is micro over entities, as seqeval's strict mode computes it: 2 TP / (2 TP + FP + FN).

ENTITY_METRIC = "entity_f1"


@dataclass(frozen=True)
class EntityCounts:
    tp: np.ndarray
    """(items, labels)"""
    fp: np.ndarray
    fn: np.ndarray
    other_fp: np.ndarray
    """(items,)"""

    @property
    def items(self) -> int:
        return len(self.other_fp)


def entity_counts(metrics: dict[str, Any], labels: list[str], items: int) -> EntityCounts:
    """A scored model's `entity_counts`, checked to have one row per item and one column per label; raises
    ValueError saying what is wrong."""
    raw = metrics.get("entity_counts")
    if not isinstance(raw, dict):
        raise ValueError("it carries no entity_counts")
    if raw.get("labels") != list(labels):
        raise ValueError(f"its entity_counts are over labels {raw.get('labels')}, not {list(labels)}")
    arrays = {}
    for name in ("tp", "fp", "fn"):
        try:
            array = np.asarray(raw.get(name), dtype=np.int64)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"its entity_counts.{name} are not counts") from exc
        if array.shape != (items, len(labels)) or (array < 0).any():
            raise ValueError(f"its entity_counts.{name} are not {items} rows of {len(labels)} counts")
        arrays[name] = array
    try:
        other = np.asarray(raw.get("other_fp", [0] * items), dtype=np.int64)
    except (TypeError, ValueError) as exc:
        raise ValueError("its entity_counts.other_fp are not counts") from exc
    if other.shape != (items,) or (other < 0).any():
        raise ValueError(f"its entity_counts.other_fp are not {items} counts")
    return EntityCounts(arrays["tp"], arrays["fp"], arrays["fn"], other)


def _micro_f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denominator = 2.0 * tp + fp + fn
    return np.divide(2.0 * tp, denominator, out=np.zeros(np.shape(tp)), where=denominator > 0)


def entity_f1(counts: EntityCounts) -> float:
    tp, fn = counts.tp.sum(), counts.fn.sum()
    return float(_micro_f1(np.asarray(tp), np.asarray(counts.fp.sum() + counts.other_fp.sum()), np.asarray(fn)))


def entity_scores(counts: EntityCounts, labels: list[str]) -> dict[str, Any]:
    """Micro entity precision, recall and F1, and per entity type (under `per_class`, as the class guard reads)."""
    tp, fp, fn = counts.tp.sum(axis=0), counts.fp.sum(axis=0), counts.fn.sum(axis=0)
    predicted = tp.sum() + fp.sum() + counts.other_fp.sum()
    true = tp.sum() + fn.sum()
    f1 = _micro_f1(tp, fp, fn)
    return {
        "entity_precision": float(tp.sum() / predicted) if predicted else 0.0,
        "entity_recall": float(tp.sum() / true) if true else 0.0,
        ENTITY_METRIC: entity_f1(counts),
        "exact_match": float(((counts.fp.sum(1) + counts.fn.sum(1) + counts.other_fp) == 0).mean())
        if counts.items
        else 0.0,
        "per_class": {
            label: {
                "precision": float(tp[i] / (tp[i] + fp[i])) if tp[i] + fp[i] else 0.0,
                "recall": float(tp[i] / (tp[i] + fn[i])) if tp[i] + fn[i] else 0.0,
                "f1": float(f1[i]),
                "support": int(tp[i] + fn[i]),
            }
            for i, label in enumerate(labels)
        },
    }


def entity_bootstrap(
    candidate: EntityCounts, production: EntityCounts, *, samples: int, confidence: float, seed: int
) -> Interval:
    """The percentile interval of entity F1(candidate) - entity F1(production) over paired resamples of items."""
    items = candidate.items
    totals = [
        (counts.tp.sum(1), counts.fp.sum(1) + counts.other_fp, counts.fn.sum(1)) for counts in (candidate, production)
    ]
    rng = np.random.default_rng(seed)
    chunk = max(1, RESAMPLE_CELLS // max(items, 1))
    differences = []
    for start in range(0, samples, chunk):
        drawn = rng.integers(0, items, size=(min(chunk, samples - start), items))
        (ctp, cfp, cfn), (ptp, pfp, pfn) = totals
        differences.append(
            _micro_f1(ctp[drawn].sum(1), cfp[drawn].sum(1), cfn[drawn].sum(1))
            - _micro_f1(ptp[drawn].sum(1), pfp[drawn].sum(1), pfn[drawn].sum(1))
        )
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(np.concatenate(differences), [tail, 1.0 - tail])
    return Interval(low=float(low), high=float(high), samples=samples, seed=seed)
