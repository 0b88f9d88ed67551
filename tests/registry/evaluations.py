"""Evaluation reports for the registry's tests: real `evaluation.json` files in S3, built from answers we choose.

`EvaluatedRuns` writes a run folder with `RunFactory` and, beside it, the report training writes: the candidate's
answers on a frozen test split, those of the version in production now (asked from the registry's API, as the
training worker does, and re-answered on this set from that run's own quality), a majority baseline and, when
asked for, a classical one with the candidate's `baseline_lift` over it. The
metrics inside each report are computed with scikit-learn, independently of the registry's own arithmetic.

A model's answers come from a `Quality`: per class, the share of items it gets right, and where its mistakes
start, so two models can err on the same items (nested mistakes) or on different ones (discordant pairs).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn import metrics as sk

from shared.artifacts import MODELS_BUCKET, EvaluationReport, item_ids_sha256, model_run_prefix
from tests.conftest import RunningService
from tests.helpers import INTERNAL
from tests.registry.support import RunFactory

LABELS = ["neg", "pos"]
CONFIDENCE = 0.9
"""Every answer's confidence in these reports: enough to give each model a real calibration error."""


def balanced(items: int, classes: int = len(LABELS)) -> list[int]:
    """`items` true labels, the classes taking turns."""
    return [i % classes for i in range(items)]


@dataclass(frozen=True)
class Quality:
    """How a model answers: per class the share it gets right (`right`, one rate or one per class) and the rank,
    within the class, of its first mistake (`start`); a wrong answer names the next class, or, with `unknown`,
    a label outside the set's (-1, as training writes for a production model trained on other labels)."""

    right: float | dict[int, float]
    start: int = 0
    unknown: bool = False

    def answers(self, y_true: list[int], classes: int) -> list[int]:
        ranks: dict[int, int] = {}
        members = {k: sum(1 for y in y_true if y == k) for k in range(classes)}
        predictions = []
        for label in y_true:
            rank = ranks[label] = ranks.get(label, -1) + 1
            rate = self.right[label] if isinstance(self.right, dict) else self.right
            wrong = members[label] - round(rate * members[label])
            is_wrong = (rank - self.start) % members[label] < wrong
            mistake = -1 if self.unknown else (label + 1) % classes
            predictions.append(mistake if is_wrong else label)
        return predictions


def report_metrics(y_true: list[int], predictions: list[int], labels: list[str]) -> dict[str, Any]:
    """What training writes beside each model's answers, computed by scikit-learn."""
    if not y_true:  # scikit-learn refuses an empty set; training reports zeros, as here
        zero = {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
        return {"accuracy": 0.0, "macro_f1": 0.0, "ece": 0.0, "per_class": {label: dict(zero) for label in labels}}
    truth, answered = np.asarray(y_true), np.asarray(predictions)
    precision, recall, f1, support = sk.precision_recall_fscore_support(
        truth, answered, labels=np.arange(len(labels)), zero_division=0
    )
    accuracy = float(sk.accuracy_score(truth, answered))
    present = np.union1d(truth, answered[answered >= 0])
    return {
        "accuracy": accuracy,
        # over the classes true or predicted here; an unknown label (-1) is no class (training's convention)
        "macro_f1": float(sk.f1_score(truth, answered, labels=present, average="macro", zero_division=0)),
        "ece": abs(accuracy - CONFIDENCE),
        "per_class": {
            label: {
                "precision": float(precision[i]),
                "recall": float(recall[i]),
                "f1": float(f1[i]),
                "support": int(support[i]),
            }
            for i, label in enumerate(labels)
        },
    }


def scored(y_true: list[int], predictions: list[int], labels: list[str], **identity: Any) -> dict[str, Any]:
    return {
        "version": identity.get("version"),
        "run_id": identity.get("run_id"),
        "model_sha256": identity.get("model_sha256"),
        "predictions": predictions,
        "confidences": [CONFIDENCE] * len(predictions),
        "metrics": report_metrics(y_true, predictions, labels),
    }


@dataclass
class EvaluatedRuns:
    registry: RunningService
    runs: RunFactory
    items: int = 200
    qualities: dict[str, Quality] = field(default_factory=dict)
    """Each run's quality by run id, to answer again as production on a later candidate's set."""

    def _relabel(self, payload: dict[str, Any], labels: list[str]) -> None:
        metadata = payload["metadata"]
        metadata["labels"] = labels
        metadata["outputs"][0]["shape"] = [-1, len(labels)]
        ref = payload["artifacts"]["metadata.json"]
        info = self.runs.storage.put(ref["bucket"], ref["key"], json.dumps(metadata, sort_keys=True).encode())
        ref["sha256"] = info.sha256

    def production_now(self, tenant: str, model_name: str) -> dict[str, Any] | None:
        """The version `production` points at, as the registry's API tells it: {version, run_id, model_sha256}."""
        model = self.registry.client.get(f"/v1/models/{model_name}", query_string={"tenant": tenant}, headers=INTERNAL)
        if model.status_code == 404:
            return None
        alias = model.get_json()["aliases"].get("production")
        if alias is None:
            return None
        version = self.registry.client.get(
            f"/v1/models/{model_name}/versions/{alias['version']}", query_string={"tenant": tenant}, headers=INTERNAL
        ).get_json()
        return {
            "version": version["version"],
            "run_id": version["run_id"],
            "model_sha256": version["artifacts"]["model.onnx"]["sha256"],
        }

    def __call__(
        self,
        tenant: str,
        model_name: str = "reviews-clf",
        *,
        quality: Quality | float | None = None,
        labels: list[str] | None = None,
        y_true: list[int] | None = None,
        production_error: str | None = None,
        classical: Quality | None = None,
        edit: Callable[[dict[str, Any]], None] | None = None,
        **run: Any,
    ) -> dict[str, Any]:
        """A run folder plus its evaluation.json; returns the training.completed payload that references both.

        `quality` defaults to the run's macro_f1 (so a run's record and its answers tell one story); `labels`
        replaces the model's labels (metadata.json is rewritten to match); `y_true` defaults to a balanced set
        of `items`; `production_error` says production could not be scored; `classical` adds a classical baseline
        answering with that quality (and the report's `baseline_lift`), as training writes today; `edit` changes
        the report before it is written (to break it on purpose).
        """
        payload = self.runs(tenant, model_name, **run)
        if labels is not None:
            self._relabel(payload, labels)
        if not isinstance(quality, Quality):
            quality = Quality(quality if quality is not None else run.get("macro_f1", 0.8))
        self.qualities[payload["run_id"]] = quality
        labels = payload["metadata"]["labels"]
        y_true = y_true if y_true is not None else balanced(self.items, len(labels))
        item_ids = [f"item-{i:05d}" for i in range(len(y_true))]
        production = None if production_error else self.production_now(tenant, model_name)
        report = {
            "evaluation_set": {
                "snapshot_id": payload["snapshot_id"],
                "split": "test",
                "items": len(item_ids),
                "sha256": item_ids_sha256(item_ids),
            },
            "labels": labels,
            "item_ids": item_ids,
            "y_true": y_true,
            "candidate": scored(
                y_true,
                quality.answers(y_true, len(labels)),
                labels,
                run_id=payload["run_id"],
                model_sha256=payload["artifacts"]["model.onnx"]["sha256"],
            ),
            "production": None
            if production is None
            else scored(
                y_true, self.qualities[production["run_id"]].answers(y_true, len(labels)), labels, **production
            ),
            "production_error": production_error,
            "baselines": {"majority": scored(y_true, [0] * len(y_true), labels)},
        }
        if classical is not None:
            baseline = scored(y_true, classical.answers(y_true, len(labels)), labels)
            baseline["metrics"]["method"] = "tfidf_logistic_regression"
            report["baselines"]["classical"] = baseline
            report["baseline_lift"] = report["candidate"]["metrics"]["macro_f1"] - baseline["metrics"]["macro_f1"]
        assert not EvaluationReport().validate(report), EvaluationReport().validate(report)
        if edit is not None:
            edit(report)
        key = f"{model_run_prefix(tenant, model_name, payload['run_id'])}/evaluation.json"
        info = self.runs.storage.put(MODELS_BUCKET, key, json.dumps(report).encode())
        payload["evaluation"] = {"bucket": MODELS_BUCKET, "key": info.key, "sha256": info.sha256}
        return payload
