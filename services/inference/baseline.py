"""A version's own evaluation baseline: what its predictions and confidences looked like on its test split.

Training writes `evaluation.json` (shared.artifacts.EvaluationReport) into the version's model folder, beside
`model.onnx`; its `candidate` is this very graph scored item by item on the snapshot's frozen test split
(predicted label index and confidence per item) with its accuracy and macro-F1 there. That is the baseline
drift and live quality are measured against: nothing new is recorded by training for it. The report is
accepted only if it validates and its candidate's `model_sha256` is the served `model.onnx`'s sha256 (the
report describes this graph, not another run's).

The report's optional `input_stats` (training records them since input drift was added: per test item, text
`chars`, `tokens`, `unknown_rate` or image `width`, `height`, `brightness`, measured as inference measures each
prediction's) is the baseline of input drift. A report written before holds none: no input drift is judged for
that version, and the monitoring report says so.

A version without a usable report (older runs, or a folder without one) falls back to its `metadata.json`
validation metrics: the class distribution of the validation confusion matrix's columns and its accuracy,
without a confidence or input baseline; `source` says which.
"""

from __future__ import annotations

import json
import posixpath
import threading
from dataclasses import dataclass
from typing import Any

import numpy as np
from marshmallow import ValidationError

from shared.artifacts import EvaluationReport
from shared.logging import get_logger
from shared.storage import ObjectStore, StorageError

log = get_logger(__name__)

EVALUATION_FILE = "evaluation.json"
GRAPH_FILE = "model.onnx"


@dataclass(frozen=True)
class Baseline:
    labels: list[str]
    class_distribution: dict[str, float]
    confidences: np.ndarray | None
    accuracy: float | None
    macro_f1: float | None
    items: int
    source: str
    inputs: dict[str, np.ndarray] | None = None
    """Per input statistic, its values on the evaluation set; None when the report recorded none."""

    def describe(self) -> dict[str, Any]:
        return {
            "input_stats": {name: float(values.mean()) for name, values in self.inputs.items() if values.size}
            if self.inputs is not None
            else None,
            "source": self.source,
            "items": self.items,
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "class_distribution": self.class_distribution,
            "confidence_mean": float(self.confidences.mean())
            if self.confidences is not None and self.confidences.size
            else None,
        }


def _distribution(counts: np.ndarray, labels: list[str]) -> dict[str, float]:
    total = counts.sum()
    return {label: float(count / total) if total else 0.0 for label, count in zip(labels, counts, strict=True)}


def from_report(report: dict[str, Any]) -> Baseline:
    labels = list(report["labels"])
    candidate = report["candidate"]
    predictions = np.asarray([p for p in candidate["predictions"] if p >= 0], dtype=np.int64)
    counts = np.bincount(predictions, minlength=len(labels))[: len(labels)]
    confidences = np.asarray(candidate.get("confidences") or [], dtype=np.float64)
    metrics = candidate["metrics"]
    evaluation_set = report["evaluation_set"]
    recorded = report.get("input_stats")
    inputs = {name: np.asarray(values, dtype=np.float64) for name, values in recorded.items()} if recorded else None
    return Baseline(
        labels=labels,
        class_distribution=_distribution(counts, labels),
        confidences=confidences if confidences.size else None,
        accuracy=metrics.get("accuracy"),
        macro_f1=metrics.get("macro_f1"),
        items=len(candidate["predictions"]),
        source=f"{EVALUATION_FILE} ({evaluation_set['split']} split of {evaluation_set['snapshot_id']})",
        inputs=inputs,
    )


def from_metadata(metadata: dict[str, Any]) -> Baseline | None:
    metrics = metadata.get("metrics") or {}
    labels = list(metadata.get("labels") or [])
    matrix = (metrics.get("confusion_matrix") or {}).get("matrix")
    if not labels or not matrix:
        return None
    counts = np.asarray(matrix, dtype=np.float64).sum(axis=0)
    if counts.shape != (len(labels),) or counts.sum() == 0:
        return None
    return Baseline(
        labels=labels,
        class_distribution=_distribution(counts, labels),
        confidences=None,
        accuracy=metrics.get("accuracy"),
        macro_f1=metrics.get("macro_f1"),
        items=int(counts.sum()),
        source="metadata.json (validation split; no confidence baseline)",
    )


class Baselines:
    """Each loaded version's baseline, read once from object storage and kept by (tenant, model, version, sha)."""

    def __init__(self, storage: ObjectStore) -> None:
        self.storage = storage
        self._cache: dict[tuple[str, str, int, str], Baseline | None] = {}
        self._lock = threading.Lock()

    def get(
        self, tenant: str, model_name: str, version: int, artifacts: dict[str, Any], metadata: dict[str, Any]
    ) -> Baseline | None:
        graph = artifacts.get(GRAPH_FILE) or {}
        key = (tenant, model_name, version, str(graph.get("sha256")))
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        baseline = self._read(graph, metadata)
        if baseline is not None or graph:
            with self._lock:
                self._cache[key] = baseline
        return baseline

    def _read(self, graph: dict[str, Any], metadata: dict[str, Any]) -> Baseline | None:
        if graph.get("key"):
            location = posixpath.join(posixpath.dirname(graph["key"]), EVALUATION_FILE)
            try:
                report = EvaluationReport().load(json.loads(self.storage.get_bytes(graph["bucket"], location)))
            except StorageError as exc:
                log.info("evaluation_baseline_unavailable", key=location, error=str(exc)[:200])
            except (ValueError, ValidationError) as exc:
                log.warning("evaluation_baseline_invalid", key=location, error=str(exc)[:300])
            else:
                if report["candidate"].get("model_sha256") == graph.get("sha256"):
                    return from_report(report)
                log.warning("evaluation_baseline_mismatch", key=location, reason="its candidate is another graph")
        return from_metadata(metadata)
