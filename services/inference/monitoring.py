"""What a model's served versions are doing, per version and time window, computed from the prediction log.

For each window (`window_s` long, newest last) and each version that answered in it:

- **traffic and resources**: logged predictions, p50/p99 latency (the log's `latency_ms`), and this process's
  totals for the loaded version (rows, batches, seconds in ONNX Runtime, queue rejections, session memory);
- **live quality**: of the predictions whose ground truth arrived (`prediction.labeled`), how many were right,
  accuracy with its 95% Wilson interval (`scipy.stats.binomtest`) and macro-F1 (scikit-learn), beside the
  version's evaluation baseline (`baseline.py`);
- **drift** against that baseline: the Jensen-Shannon distance (base 2, 0..1; `scipy.spatial.distance`)
  between the predicted-class distribution and the baseline's with the chi-square test of homogeneity of their
  counts (`scipy.stats.chi2_contingency`), and the two-sample Kolmogorov-Smirnov test of
  the confidences (`scipy.stats.ks_2samp`);
- **inputs**: mean text length, tokens and unknown-token rate; mean image width, height and brightness;
- **input drift** against the baseline's inputs (the evaluation set's, when its report recorded them): the
  two-sample KS test of text length (`chars`) and of image `brightness`, and the difference of the mean
  unknown-token rate from the baseline's (a report without input statistics: not judged, and said so);
- **shadow**: for a staged version that shadowed production, how often it agreed with the answer that was
  returned, and its accuracy where labels arrived (beside production's on the same predictions).

Only predictions with a predicted label count: the friendly API's classifier answers. A v2 tensor request has none,
nor has a token-classification prediction (its answer is entity spans, logged as `entities`): their rows are
listed by the prediction log's API but left out of every figure here, which are per class or per confidence of one
label.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
from scipy import stats
from scipy.spatial import distance
from sklearn.metrics import f1_score
from sqlalchemy import select
from sqlalchemy.orm import Session

from services.inference.baseline import Baseline
from services.inference.models import Prediction, ShadowPrediction

CONFIDENCE = 0.95
MAX_ROWS = 200_000
"""Rows one report reads at most (newest first); a busier model's windows are computed on its newest rows."""
INPUT_STATS = ("chars", "tokens", "unknown_rate", "width", "height", "brightness")
INPUT_KS = ("chars", "brightness")
"""The input statistics whose distribution is compared with the baseline's (two-sample KS)."""
NO_INPUT_BASELINE = (
    "no input drift judged: this version's evaluation report holds no input statistics (written before training "
    "recorded them, or no evaluation report)"
)


@dataclass
class Row:
    id: str
    version: int
    label: str
    confidence: float | None
    latency_ms: float
    true_label: str | None
    input_stats: dict[str, Any] | None
    created_at: datetime
    true_label_source: str | None = None  # "sample" or "feedback"


def load_rows(session: Session, tenant: str, model_name: str, since: datetime, until: datetime) -> list[Row]:
    query = (
        select(
            Prediction.id,
            Prediction.model_version,
            Prediction.predicted_label,
            Prediction.confidence,
            Prediction.latency_ms,
            Prediction.true_label,
            Prediction.input_stats,
            Prediction.created_at,
            Prediction.true_label_source,
        )
        .where(
            Prediction.tenant == tenant,
            Prediction.model_name == model_name,
            Prediction.created_at >= since,
            Prediction.created_at < until,
            Prediction.predicted_label.is_not(None),
        )
        .order_by(Prediction.created_at.desc())
        .limit(MAX_ROWS)
    )
    return [Row(*values) for values in session.execute(query).all()]


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def quality(rows: list[Row], labels: list[str] | None = None) -> dict[str, Any]:
    """Live quality from the ground truth of sampled predictions. Feedback labels are counted apart and left out:
    people send feedback mostly when an answer was wrong, so counting it would report a version's mistakes as its
    accuracy (the demo sends feedback for wrong answers only: live accuracy 0)."""
    labeled = [row for row in rows if row.true_label is not None and row.true_label_source != "feedback"]
    n = len(labeled)
    correct = sum(row.label == row.true_label for row in labeled)
    result: dict[str, Any] = {"labeled": n, "correct": correct, "accuracy": None, "ci_low": None, "ci_high": None}
    result["feedback_labeled"] = sum(row.true_label is not None and row.true_label_source == "feedback" for row in rows)
    result["macro_f1"] = None
    if n:
        interval = stats.binomtest(correct, n).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
        y_true = [row.true_label for row in labeled]
        y_pred = [row.label for row in labeled]
        present = sorted(set(y_true) | set(y_pred))
        result.update(
            accuracy=correct / n,
            ci_low=float(interval.low),
            ci_high=float(interval.high),
            macro_f1=float(f1_score(y_true, y_pred, labels=present, average="macro", zero_division=0)),
        )
    return result


def drift(rows: list[Row], baseline: Baseline | None) -> dict[str, Any]:
    labels = baseline.labels if baseline else sorted({row.label for row in rows})
    counts = np.asarray([sum(row.label == label for row in rows) for label in labels], dtype=np.float64)
    observed = {
        label: float(c / counts.sum()) if counts.sum() else 0.0 for label, c in zip(labels, counts, strict=True)
    }
    confidences = np.asarray([row.confidence for row in rows if row.confidence is not None], dtype=np.float64)
    result: dict[str, Any] = {
        "class_distribution": observed,
        "confidence_mean": float(confidences.mean()) if confidences.size else None,
        "prediction_js": None,
        "prediction_chi2_pvalue": None,
        "confidence_ks": None,
        "confidence_ks_pvalue": None,
    }
    if baseline is None or not rows:
        return result
    expected = np.asarray([baseline.class_distribution.get(label, 0.0) for label in labels])
    if counts.sum() and expected.sum():
        result["prediction_js"] = float(distance.jensenshannon(counts / counts.sum(), expected, base=2))
        result["prediction_chi2_pvalue"] = _homogeneity_pvalue(counts, expected * baseline.items)
    if baseline.confidences is not None and confidences.size:
        test = stats.ks_2samp(confidences, baseline.confidences)
        result["confidence_ks"] = float(test.statistic)
        result["confidence_ks_pvalue"] = float(test.pvalue)
    return result


def _homogeneity_pvalue(window: np.ndarray, baseline: np.ndarray) -> float | None:
    """Whether the window's predicted classes and the baseline's could be one distribution: the p-value of the
    chi-square test of homogeneity on their counts (`scipy.stats.chi2_contingency`). A distance alone cannot
    tell: a baseline of 50 test items over 10 classes is itself so noisy that the distance between two samples
    of the same distribution is often above 0.2. Classes neither side predicted are left out."""
    table = np.vstack([window, np.round(baseline)])
    table = table[:, table.sum(axis=0) > 0]
    if table.shape[1] < 2 or (table.sum(axis=1) == 0).any():
        return None
    return float(stats.chi2_contingency(table).pvalue)


def inputs(rows: list[Row]) -> dict[str, float | None]:
    values: dict[str, list[float]] = defaultdict(list)
    for row in rows:
        for name, value in (row.input_stats or {}).items():
            if isinstance(value, int | float):
                values[name].append(float(value))
    return {name: float(np.mean(values[name])) if values[name] else None for name in INPUT_STATS if name in values}


def _values(rows: list[Row], name: str) -> np.ndarray:
    values = [(row.input_stats or {}).get(name) for row in rows]
    return np.asarray([value for value in values if isinstance(value, int | float)], dtype=np.float64)


def input_drift(rows: list[Row], baseline: Baseline | None) -> dict[str, Any]:
    """KS of text length and brightness against the baseline's inputs, and the unknown-token rate's change."""
    if baseline is None or baseline.inputs is None:
        return {"judged": False, "note": NO_INPUT_BASELINE}
    result: dict[str, Any] = {"judged": True}
    for name in INPUT_KS:
        expected, observed = baseline.inputs.get(name), _values(rows, name)
        if expected is None or not expected.size or not observed.size:
            continue
        test = stats.ks_2samp(observed, expected)
        result[f"{name}_ks"], result[f"{name}_ks_pvalue"] = float(test.statistic), float(test.pvalue)
    expected, observed = baseline.inputs.get("unknown_rate"), _values(rows, "unknown_rate")
    if expected is not None and expected.size and observed.size:
        result["unknown_rate"], result["baseline_unknown_rate"] = float(observed.mean()), float(expected.mean())
        result["unknown_rate_diff"] = float(observed.mean() - expected.mean())
    return result


def latency(rows: list[Row]) -> dict[str, float | None]:
    if not rows:
        return {"p50_ms": None, "p99_ms": None}
    values = np.asarray([row.latency_ms for row in rows], dtype=np.float64)
    return {"p50_ms": float(np.percentile(values, 50)), "p99_ms": float(np.percentile(values, 99))}


def shadow(session: Session, tenant: str, model_name: str, since: datetime, until: datetime) -> dict[int, Any]:
    """Per shadow version: answered, failed, agreement with the returned answer, and accuracy beside production's."""
    query = (
        select(
            ShadowPrediction.model_version,
            ShadowPrediction.predicted_label,
            ShadowPrediction.error,
            ShadowPrediction.latency_ms,
            Prediction.predicted_label,
            Prediction.true_label,
            Prediction.model_version,
        )
        .join(Prediction, Prediction.id == ShadowPrediction.prediction_id)
        .where(
            ShadowPrediction.tenant == tenant,
            ShadowPrediction.model_name == model_name,
            ShadowPrediction.created_at >= since,
            ShadowPrediction.created_at < until,
        )
        .limit(MAX_ROWS)
    )
    grouped: dict[int, list[Any]] = defaultdict(list)
    for values in session.execute(query).all():
        grouped[values[0]].append(values)
    report: dict[int, Any] = {}
    for version, answers in grouped.items():
        ok = [a for a in answers if a[2] is None]
        labeled = [a for a in ok if a[5] is not None]
        report[version] = {
            "shadowed": len(answers),
            "failed": len(answers) - len(ok),
            "agreement": sum(a[1] == a[4] for a in ok) / len(ok) if ok else None,
            "production_versions": sorted({a[6] for a in answers}),
            "latency": {
                "p50_ms": float(np.percentile([a[3] for a in ok], 50)) if ok else None,
                "p99_ms": float(np.percentile([a[3] for a in ok], 99)) if ok else None,
            },
            "labeled": len(labeled),
            "accuracy": sum(a[1] == a[5] for a in labeled) / len(labeled) if labeled else None,
            "production_accuracy": sum(a[4] == a[5] for a in labeled) / len(labeled) if labeled else None,
        }
    return report


def window_bounds(now: datetime, window_s: float, windows: int) -> list[tuple[datetime, datetime]]:
    """`windows` consecutive windows ending now, oldest first."""
    width = timedelta(seconds=window_s)
    return [(now - width * (windows - i), now - width * (windows - i - 1)) for i in range(windows)]


def version_window(rows: list[Row], baseline: Baseline | None) -> dict[str, Any]:
    return {
        "predictions": len(rows),
        "latency": latency(rows),
        "quality": quality(rows),
        "drift": drift(rows, baseline),
        "inputs": inputs(rows),
        "input_drift": input_drift(rows, baseline),
    }


def split_rows(rows: list[Row], bounds: list[tuple[datetime, datetime]]) -> list[dict[int, list[Row]]]:
    """Rows grouped by window, then by version."""
    grouped: list[dict[int, list[Row]]] = [defaultdict(list) for _ in bounds]
    for row in rows:
        created = _aware(row.created_at)
        for index, (start, end) in enumerate(bounds):
            if start <= created < end:
                grouped[index][row.version].append(row)
                break
    return grouped
