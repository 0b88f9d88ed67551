"""The evaluation report (`evaluation.json`, `shared.artifacts.EvaluationReport`): the candidate, the version in
production and a majority-class baseline, each scored item by item on the snapshot's test split.

The evaluation set is the snapshot's test split, sorted by item id; its digest is `item_ids_sha256` of those ids,
the one the snapshot records for its test split. Training and selection never saw these items (`data.py`).

- The candidate is scored from the folder export has just verified, as it will be served (`served.py`).
- The production version is scored from its registered artifact (`production.py`), with its own preprocessing;
  its label indices are mapped to the candidate's labels by name, and an answer the candidate's labels do not
  hold is wrong (-1). When it cannot be scored, `production_error` says why and the run goes on: the registry's
  gate decides what a candidate without a comparison gets.
- `baselines["majority"]` always answers the train split's most frequent label, with that label's train share as
  its confidence.
- `baselines["classical"]` is TF-IDF + logistic regression (text) or logistic regression on downscaled pixels
  (images), trained on the train split (`baselines.py`); `baseline_lift` is the candidate's macro-F1 minus its
  macro-F1 on the same items (None when the train split cannot fit it: fewer than two classes).

Metrics per model are `evaluate.prediction_report`'s: accuracy, macro_f1, per_class, ece, on the same items.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from services.training.baselines import CLASSICAL, NoBaseline, fit_classical
from services.training.data import Example, SnapshotData
from services.training.evaluate import input_statistics, prediction_report
from services.training.export import MODEL_FILE, ModelPackage
from services.training.failures import ExportError
from services.training.production import ProductionVersion
from services.training.runs import RunInfo
from services.training.served import Unscorable, score_production, served_inputs, served_probabilities
from services.training.text_model import load_tokenizer
from shared.artifacts import EvaluationReport, item_ids_sha256
from shared.logging import get_logger
from shared.runtime import Runtime

log = get_logger(__name__)

EVALUATION_FILE = "evaluation.json"
EVALUATION_SPLIT = "test"
MAJORITY = "majority"


def evaluate_on_test_split(runtime: Runtime, run: RunInfo, data: SnapshotData, package: ModelPackage) -> dict[str, Any]:
    """The run's EvaluationReport: candidate, production (or why not) and the majority baseline on one set."""
    examples = sorted(data.test, key=lambda example: example.item_id)
    item_ids = [example.item_id for example in examples]
    y_true = np.asarray([example.label for example in examples], dtype=np.int64)
    labels = list(data.labels)
    evaluation_set = {
        "snapshot_id": run.snapshot_id,
        "split": EVALUATION_SPLIT,
        "items": len(examples),
        "sha256": item_ids_sha256(item_ids),
    }
    log.info("run_evaluation_started", split=EVALUATION_SPLIT, items=len(examples), sha256=evaluation_set["sha256"])
    try:
        probabilities = served_probabilities(package.folder, package.metadata, examples)
    except Unscorable as exc:
        raise ExportError(f"the exported model cannot be scored as it will be served: {exc}") from exc
    model_sha256 = package.files[MODEL_FILE]["sha256"]
    candidate = _scored(y_true, probabilities, package.metadata["labels"], labels, run_id=run.id, sha256=model_sha256)
    production, production_error = _production(runtime, run, labels, examples, y_true)
    baselines = {MAJORITY: majority_baseline(data, y_true, run_id=run.id)}
    classical = classical_baseline(run.task_type, data, examples, y_true, run_id=run.id)
    if classical is not None:
        baselines[CLASSICAL] = classical
    report = {
        "evaluation_set": evaluation_set,
        "labels": labels,
        "item_ids": item_ids,
        "y_true": y_true.tolist(),
        "candidate": candidate,
        "production": production,
        "production_error": production_error,
        "baselines": baselines,
        "baseline_lift": baseline_lift(candidate, classical),
        "input_stats": _input_stats(package, examples),
    }
    errors = EvaluationReport().validate(report)
    if errors:
        raise ExportError(f"the evaluation report does not follow the shared EvaluationReport format: {errors}")
    log.info(
        "run_evaluation_finished",
        split=EVALUATION_SPLIT,
        items=len(examples),
        sha256=evaluation_set["sha256"],
        candidate=_summary(candidate),
        production=_summary(production) if production else None,
        production_version=production["version"] if production else None,
        production_error=production_error,
        majority=_summary(baselines[MAJORITY]),
        classical=_summary(classical) if classical else None,
        baseline_lift=None if report["baseline_lift"] is None else round(report["baseline_lift"], 4),
    )
    return report


def report_bytes(report: dict[str, Any]) -> bytes:
    return json.dumps(EvaluationReport().dump(report), indent=2).encode()


def majority_baseline(data: SnapshotData, y_true: np.ndarray, *, run_id: str) -> dict[str, Any]:
    """Always the train split's most frequent label (the first of the labels on a tie)."""
    counts = data.train_label_counts()
    majority = int(np.argmax(counts))
    share = counts[majority] / max(1, sum(counts))
    predictions = np.full(len(y_true), majority, dtype=np.int64)
    confidences = np.full(len(y_true), share, dtype=np.float64)
    return {
        "version": None,
        "run_id": run_id,
        "model_sha256": None,
        "predictions": predictions.tolist(),
        "confidences": confidences.tolist(),
        "metrics": {**prediction_report(y_true, predictions, confidences, data.labels), "label": data.labels[majority]},
    }


def classical_baseline(
    task_type: str, data: SnapshotData, examples: list[Example], y_true: np.ndarray, *, run_id: str
) -> dict[str, Any] | None:
    """The classical baseline trained on the train split and scored on `examples`; None when it cannot fit."""
    try:
        answers = fit_classical(task_type, data.train, examples)
    except NoBaseline as exc:
        log.info("run_baseline_skipped", baseline=CLASSICAL, reason=str(exc))
        return None
    return {
        "version": None,
        "run_id": run_id,
        "model_sha256": None,
        "predictions": answers.predictions.tolist(),
        "confidences": [float(c) for c in answers.confidences],
        "metrics": {
            **prediction_report(y_true, answers.predictions, answers.confidences, data.labels),
            "method": answers.method,
        },
    }


def baseline_lift(candidate: dict[str, Any], classical: dict[str, Any] | None) -> float | None:
    """The candidate's macro-F1 minus the classical baseline's, on the same items."""
    if classical is None:
        return None
    return float(candidate["metrics"]["macro_f1"] - classical["metrics"]["macro_f1"])


def _production(
    runtime: Runtime, run: RunInfo, labels: list[str], examples: list[Example], y_true: np.ndarray
) -> tuple[dict[str, Any] | None, str | None]:
    def score(version: ProductionVersion) -> dict[str, Any]:
        probabilities = served_probabilities(version.folder, version.metadata, examples)
        unknown = sorted(set(labels) - set(version.metadata["labels"]))
        if unknown:
            log.info("run_production_lacks_labels", version=version.version, labels=unknown, action="counted as wrong")
        return _scored(
            y_true,
            probabilities,
            version.metadata["labels"],
            labels,
            run_id=version.run_id,
            sha256=version.model_sha256,
            version=version.version,
        )

    return score_production(runtime, run, score)


def _scored(
    y_true: np.ndarray,
    probabilities: np.ndarray,
    model_labels: list[str],
    labels: list[str],
    *,
    run_id: str | None,
    sha256: str,
    version: int | None = None,
) -> dict[str, Any]:
    """A model's answers on the set: its argmax mapped to `labels` by name (-1 when they lack it)."""
    index = {label: i for i, label in enumerate(labels)}
    best = probabilities.argmax(axis=1)
    predictions = np.asarray([index.get(model_labels[b], -1) for b in best], dtype=np.int64)
    confidences = probabilities.max(axis=1) if len(best) else np.zeros(0)
    return {
        "version": version,
        "run_id": run_id,
        "model_sha256": sha256,
        "predictions": predictions.tolist(),
        "confidences": [float(c) for c in confidences],
        "metrics": prediction_report(y_true, predictions, confidences, labels),
    }


def _summary(scored: dict[str, Any]) -> dict[str, float]:
    metrics = scored["metrics"]
    return {name: round(metrics[name], 4) for name in ("accuracy", "macro_f1", "ece")}


def _input_stats(package: ModelPackage, examples: list[Example]) -> dict[str, list[float]] | None:
    """The test items' input statistics, measured as inference measures each prediction: the baseline its input
    drift is judged against (services/inference/monitoring.py)."""
    spec = package.metadata.get("preprocessing") or {}
    try:
        build = served_inputs(package.folder, package.metadata)
        unknown = load_tokenizer(package.folder).unk_token_id if spec.get("kind") == "text" else None
        contents = [example.content for example in examples]
        return input_statistics(spec, contents, lambda start, stop: build(examples[start:stop]), unknown)
    except Exception as exc:  # the monitoring baseline is optional: without it inference judges no input drift
        log.warning("run_input_statistics_failed", error=f"{type(exc).__name__}: {exc}")
        return None
