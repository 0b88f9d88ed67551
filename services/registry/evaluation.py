"""Reading a run's `evaluation.json` (shared.artifacts.EvaluationReport): verified, validated, consistent.

`read_evaluation` returns an `Evaluation`: the report when the gate can decide from it, or the reason it
cannot (`problem`). A report the gate cannot use does not refuse the version: the version is
registered and staged, and a person decides. Storage that does not answer raises (the consumer retries), as
for the run's other files.

What the gate requires of a report before it trusts a number in it:
- its bytes hash to the sha256 the event references, and to the one the store recorded when it was written;
- it matches the schema, answers in the model's labels, scores the `test` split (the validation split chose
  the candidate's epoch, so its score is optimistic), names its items by their digest
  (`shared.artifacts.item_ids_sha256`), and every list has one entry per item, with label indices in range
  (a prediction may be -1: a label outside the set's, always wrong);
- each model's own accuracy and macro-F1 in the report agree with what its predictions give (within `TOLERANCE`):
  a report whose summary and answers disagree is not one to promote on;
- a token_classification report (its candidate's metrics carry `entity_counts`) has, for every model, per-item
  entity counts over its labels, and each model's `entity_f1` is what its counts give.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from marshmallow import ValidationError

from services.registry import comparison
from shared.artifacts import EvaluationReport, item_ids_sha256
from shared.storage import ChecksumMismatch, ObjectNotFound, ObjectStore

GATE_SPLIT = "test"
UNKNOWN_LABEL = -1
"""A prediction naming a label outside the report's labels (production trained on other labels): always wrong."""
TOLERANCE = 1e-3
"""How far a report's own metric may be from the one its predictions give: room for rounding, not for error."""


@dataclass(frozen=True)
class Evaluation:
    """A report the gate can use (`report`), or why it cannot (`problem`); `ref` is the event's reference."""

    ref: dict[str, Any] | None
    report: dict[str, Any] | None = None
    problem: str | None = None


NO_REPORT = (
    "the run carries no evaluation report (it was trained before the gate compared versions on frozen test "
    "items), so the gate cannot compare it with production"
)


def _location(ref: dict[str, Any]) -> str:
    return f"{ref['bucket']}/{ref['key']}"


def read_evaluation(storage: ObjectStore, ref: dict[str, Any] | None, labels: list[str]) -> Evaluation:
    """The run's evaluation report, or why the gate cannot use it. Raises StorageError when storage is down.

    `labels` are the model's own (metadata.json): the report must answer in those labels, in that order.
    """
    if ref is None:
        return Evaluation(None, problem=NO_REPORT)
    location = _location(ref)
    try:
        data = storage.get_bytes(ref["bucket"], ref["key"])
    except ObjectNotFound:
        return Evaluation(ref, problem=f"evaluation.json is not in object storage at {location}")
    except ChecksumMismatch as exc:
        return Evaluation(ref, problem=f"evaluation.json failed verification: {exc}")
    except ValueError as exc:  # a bucket or key the store refuses to address
        return Evaluation(ref, problem=f"evaluation.json has an invalid location {location}: {exc}")
    digest = hashlib.sha256(data).hexdigest()
    if digest != str(ref["sha256"]).lower():
        return Evaluation(
            ref,
            problem=f"evaluation.json failed verification: sha256 mismatch at {location}: the event references "
            f"{ref['sha256']}, the stored bytes hash to {digest}",
        )
    try:
        report = EvaluationReport().load(json.loads(data))
    except (ValueError, ValidationError) as exc:
        detail = exc.messages if isinstance(exc, ValidationError) else str(exc)
        return Evaluation(ref, problem=f"evaluation.json does not match the EvaluationReport schema: {detail}")
    problem = _inconsistency(report)
    if problem is None and report["labels"] != list(labels):
        problem = f"the report's labels {report['labels']} are not the model's labels {list(labels)}"
    return Evaluation(ref, report=None if problem else report, problem=problem)


def answers(values: list[int]) -> np.ndarray:
    return np.asarray(values, dtype=np.int64)


def scored_models(report: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """Every model the report scores, by the name the gate uses for it."""
    named = [("candidate", report["candidate"])]
    if report["production"] is not None:
        named.append(("production", report["production"]))
    named += [(f"baseline {name}", scored) for name, scored in sorted(report["baselines"].items())]
    return named


def is_entity_report(report: dict[str, Any]) -> bool:
    """A token_classification model's report: its answers are per-item entity counts (services.training.token_runs)."""
    return isinstance((report["candidate"].get("metrics") or {}).get("entity_counts"), dict)


def entity_counts(report: dict[str, Any], scored: dict[str, Any]) -> comparison.EntityCounts:
    """A scored model's entity counts in a report `read_evaluation` accepted."""
    return comparison.entity_counts(scored["metrics"], report["labels"], len(report["item_ids"]))


def _entity_inconsistency(report: dict[str, Any]) -> str | None:
    """Every model of an entity report carries per-item entity counts, and its entity F1 is what they give."""
    for name, scored in scored_models(report):
        try:
            counts = entity_counts(report, scored)
        except ValueError as exc:
            return f"the report's {name} is not scored by entities: {exc}"
        claimed = scored["metrics"].get(comparison.ENTITY_METRIC)
        if isinstance(claimed, bool) or not isinstance(claimed, int | float):
            return f"the report's {name} claims no {comparison.ENTITY_METRIC}"
        actual = comparison.entity_f1(counts)
        if abs(claimed - actual) > TOLERANCE:
            return (
                f"the report's {comparison.ENTITY_METRIC} for the {name} ({claimed:.4f}) disagrees with its own "
                f"entity counts ({actual:.4f})"
            )
    return None


def _inconsistency(report: dict[str, Any]) -> str | None:
    items = len(report["item_ids"])
    labels = report["labels"]
    evaluation_set = report["evaluation_set"]
    if evaluation_set["split"] != GATE_SPLIT:
        return (
            f"the report scores the {evaluation_set['split']} split; the gate decides only on the test split, "
            "which training and model selection never saw"
        )
    entities = is_entity_report(report)
    if len(labels) < (1 if entities else 2) or len(set(labels)) != len(labels):
        return f"the report's labels {labels} are not {'one' if entities else 'two'} or more distinct labels"
    if evaluation_set["items"] != items:
        return f"the evaluation set declares {evaluation_set['items']} items, the report lists {items} item ids"
    if len(set(report["item_ids"])) != items:
        return "the report lists an item id more than once"
    if item_ids_sha256(report["item_ids"]) != evaluation_set["sha256"]:
        return (
            f"the evaluation set's sha256 {evaluation_set['sha256']} is not that of the item ids the report "
            f"scores ({item_ids_sha256(report['item_ids'])})"
        )
    lists = [("y_true", report["y_true"])] + [
        (f"{name} predictions", scored["predictions"]) for name, scored in scored_models(report)
    ]
    for what, values in lists:
        lowest = 0 if what == "y_true" else UNKNOWN_LABEL
        if len(values) != items:
            return f"the report's {what} have {len(values)} entries for {items} items"
        if any(not lowest <= value < len(labels) for value in values):
            return f"the report's {what} hold a label index outside {lowest}..{len(labels) - 1}"
    if entities:
        return _entity_inconsistency(report)
    y_true = answers(report["y_true"])
    for name, scored in scored_models(report):
        for metric in comparison.METRICS:
            claimed = scored["metrics"].get(metric)
            if isinstance(claimed, bool) or not isinstance(claimed, int | float):
                continue
            actual = comparison.metric(metric, y_true, answers(scored["predictions"]), len(labels))
            if abs(claimed - actual) > TOLERANCE:
                return (
                    f"the report's {metric} for the {name} ({claimed:.4f}) disagrees with its own predictions "
                    f"({actual:.4f})"
                )
    return None
