"""A token_classification run's own steps, around the pipeline's shared ones (lease, trainer, checkpoints, publish).

- Data: the snapshot's manifest lines carry each item's consensus entities as `spans` (and a null `label`); the
  texts are fetched and verified like any text item's (`data.fetch_contents`), and every span is checked against
  its text by ingestion's rules (`shared.entities.span_errors`) and the run's entity labels.
- Training: MiniLM with a token head (`token_model.prepare_token_task`) under the shared `Trainer`; the epoch is
  selected, and training stopped early, on the validation split's entity F1 (`token_model.ValidationEntityF1`).
- Export: `token_export.export_token_model` (dynamic batch and sequence axes, parity with torch on the validation
  texts, else nothing is published); the folder's metrics are the served graph's on the validation split.
- Evaluation (`evaluation.json`): the candidate, the version in production (from its registered artifact, as
  served: `production.fetch_production`, `served.served_token_predictions`) and two baselines answer the test
  split, sorted by item id. Each is scored against the items' spans at the word level by seqeval in strict IOB2
  mode (`evaluate.entity_report`: entity precision, recall, F1, per type). The shared report format is the
  classification one, so a token report fills it this way:
  - `labels` are the entity labels; `y_true` is 0 for every item and an answer's `predictions` entry is 0 when its
    entities on that item are exactly the true ones (every extent and type), -1 otherwise (sentence exact match);
  - each model's `metrics` carry `entity_f1` and friends, and `entity_counts`: per item, true positives, false
    positives and false negatives per entity label (`tp`, `fp`, `fn`, in `labels` order) and `other_fp`
    (predicted entities of a label outside them: production trained on other labels). Summed, they give the
    micro and per-type scores; the registry's gate recomputes entity F1 and its paired bootstrap from them.
  - `baselines["majority"]` predicts no entity (the most frequent tag, `O`, everywhere: entity F1 0);
    `baselines["classical"]` is the CoNLL-2003 dictionary baseline (`baselines.EntityDictionary`) trained on the
    train split; `baseline_lift` is the candidate's entity F1 minus its.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from services.training.baselines import CLASSICAL, DICTIONARY_METHOD, EntityDictionary
from services.training.data import fetch_contents, read_manifest
from services.training.evaluate import entity_report
from services.training.export import (
    METADATA_FILE,
    MODEL_FILE,
    ModelPackage,
    code_version,
    file_entry,
    framework_versions,
)
from services.training.failures import DataError, ExportError
from services.training.runs import RunInfo
from services.training.served import Unscorable, score_production, served_token_predictions
from services.training.spec import PreparedTask
from services.training.token_export import export_token_model, token_export_spec
from services.training.token_model import (
    TokenItem,
    ValidationEntityF1,
    entity_counts,
    prepare_token_task,
    word_tags,
)
from shared.artifacts import SPLITS, EvaluationReport, ModelMetadata, item_ids_sha256
from shared.entities import Words, span_errors
from shared.logging import get_logger
from shared.runtime import Runtime

log = get_logger(__name__)

TASK_TYPE = "token_classification"
EVALUATION_SPLIT = "test"
MAJORITY = "majority"
NO_ENTITY_METHOD = "no_entities"


@dataclass(frozen=True)
class TokenExample:
    item_id: str
    text: str
    spans: list[dict[str, Any]]

    @property
    def item(self) -> TokenItem:
        return TokenItem(self.text, self.spans)


@dataclass
class TokenSnapshot:
    labels: list[str]
    """The entity labels."""
    train: list[TokenExample]
    validation: list[TokenExample]
    manifest_sha256: str
    test: list[TokenExample] = field(default_factory=list)
    """Sorted by item id: the order of the evaluation set."""
    label_counts: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per split, entities per entity label."""


def load_token_snapshot(store: Any, manifest: dict[str, Any], labels: list[str], *, snapshot_id: str) -> TokenSnapshot:
    lines = read_manifest(store, manifest, snapshot_id=snapshot_id)
    if not lines:
        raise DataError(
            f"snapshot {snapshot_id} is empty: its manifest lists no labeled items. "
            "Label some items, create a new snapshot, then request training again."
        )
    for line in lines:
        if line["kind"] != "text":
            raise DataError(
                f"item {line['item_id']} of snapshot {snapshot_id} is {line['kind']!r} content, "
                "but a token_classification run trains on 'text' items only"
            )
        if line.get("spans") is None:
            raise DataError(
                f"item {line['item_id']} of snapshot {snapshot_id} carries no spans: a token_classification run "
                "trains on a span dataset's snapshot, whose lines hold each item's consensus entities"
            )
        unknown = sorted({span["label"] for span in line["spans"]} - set(labels))
        if unknown:
            raise DataError(
                f"item {line['item_id']} of snapshot {snapshot_id} has entities labeled {unknown}, which are not "
                f"among the run's entity labels {labels}: request training with the dataset's current labels"
            )
    contents = fetch_contents(store, [line["content"] for line in lines], [line["item_id"] for line in lines])
    splits: dict[str, list[TokenExample]] = {split: [] for split in SPLITS}
    for line, content in zip(lines, contents, strict=True):
        try:
            text = content.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(f"item {line['item_id']} of snapshot {snapshot_id} is not UTF-8 text: {exc}") from exc
        spans = sorted(line["spans"], key=lambda span: (span["start"], span["end"]))
        errors = span_errors(text, spans)
        if errors:
            raise DataError(f"item {line['item_id']} of snapshot {snapshot_id} has invalid spans: {errors}")
        splits[line["split"]].append(TokenExample(line["item_id"], text, spans))
    splits["test"].sort(key=lambda example: example.item_id)
    for split in ("train", "validation"):
        if not splits[split]:
            raise DataError(
                f"snapshot {snapshot_id} has no items in its {split} split ({len(lines)} items in all): "
                "a run needs both a train and a validation split; snapshot again once both have labeled items"
            )
    counts = {
        split: {label: sum(span["label"] == label for e in examples for span in e.spans) for label in labels}
        for split, examples in splits.items()
    }
    return TokenSnapshot(
        labels=list(labels),
        train=splits["train"],
        validation=splits["validation"],
        test=splits["test"],
        manifest_sha256=manifest["sha256"],
        label_counts=counts,
    )


def prepare_token_run(data: TokenSnapshot, hyperparameters: dict[str, Any], base_model: str) -> PreparedTask:
    """The tagger and its data in the shape the pipeline's trainer takes."""
    prepared = prepare_token_task(
        [example.item for example in data.train],
        [example.item for example in data.validation],
        data.labels,
        hyperparameters,
        base_model,
    )
    scorer = ValidationEntityF1(
        prepared.tokenizer, prepared.val_set.items, prepared.tags, prepared.max_length, hyperparameters["batch_size"]
    )
    return PreparedTask(
        model=prepared.model,
        train_set=prepared.train_set,
        val_set=prepared.val_set,
        train_collate=prepared.collate,
        eval_collate=prepared.collate,
        head_prefixes=prepared.head_prefixes,
        base_model=prepared.base_model,
        export=token_export_spec(prepared.max_length, prepared.tokenizer),
        lr_scale=prepared.lr_scale,
        embedding_parameter=prepared.embedding_parameter,
        chosen={"max_length": prepared.max_length, "tags": prepared.tags, "selection_metric": "entity_f1"},
        train_label_counts=prepared.train_tag_counts,
        selection_score=scorer,
        tagger=prepared,
    )


# -------------------------------------------------------------------------------------------------- export


def export_token_package(
    *,
    folder: Path,
    model: torch.nn.Module,
    prepared: PreparedTask,
    data: TokenSnapshot,
    identity: dict[str, Any],
    lineage: dict[str, Any],
    hyperparameters: dict[str, Any],
    training: dict[str, Any],
) -> ModelPackage:
    """Export the trained tagger (parity checked), then describe it with the served graph's validation scores."""
    tagger = prepared.tagger
    metadata = export_token_model(
        model,
        tagger.tokenizer,
        tagger.tags,
        data.labels,
        tagger.max_length,
        folder,
        [example.text for example in data.validation],
        model_name=identity["model_name"],
        lineage={**lineage, "code_version": code_version(), "frameworks": framework_versions()},
        hyperparameters=hyperparameters,
    )
    try:
        validation = _scored(folder, metadata, data.validation, data.labels, run_id=None, sha256=None)
    except Unscorable as exc:
        raise ExportError(f"the exported tagger cannot be scored as it will be served: {exc}") from exc
    metrics = {
        name: value for name, value in validation["metrics"].items() if name not in ("entity_counts", "exact_match")
    }
    metrics["evaluated_on"] = "validation split, scored by ONNX Runtime on the served graph"
    metadata.update(
        metrics=metrics,
        training=training,
        export={"parity": metadata["parity"], "served_file": MODEL_FILE},
        created_at=datetime.now(UTC).isoformat(),
    )
    errors = ModelMetadata().validate(metadata)
    if errors:
        raise ExportError(f"the model metadata does not follow the shared ModelMetadata format: {errors}")
    (folder / METADATA_FILE).write_text(json.dumps(metadata, indent=2, sort_keys=True))
    files = {path.name: file_entry(path) for path in sorted(folder.iterdir()) if path.name != METADATA_FILE}
    return ModelPackage(folder=folder, files=files, metadata=metadata, metrics=metrics)


# ---------------------------------------------------------------------------------------------- evaluation


def evaluate_token_test_split(
    runtime: Runtime, run: RunInfo, data: TokenSnapshot, package: ModelPackage
) -> dict[str, Any]:
    """The run's EvaluationReport for a tagger: candidate, production (or why not) and both baselines."""
    examples = sorted(data.test, key=lambda example: example.item_id)
    item_ids = [example.item_id for example in examples]
    labels = list(data.labels)
    evaluation_set = {
        "snapshot_id": run.snapshot_id,
        "split": EVALUATION_SPLIT,
        "items": len(examples),
        "sha256": item_ids_sha256(item_ids),
    }
    log.info("run_evaluation_started", split=EVALUATION_SPLIT, items=len(examples), sha256=evaluation_set["sha256"])
    model_sha256 = package.files[MODEL_FILE]["sha256"]
    try:
        answers = served_token_predictions(package.folder, package.metadata, [e.text for e in examples])
    except Unscorable as exc:
        raise ExportError(f"the exported tagger cannot be scored as it will be served: {exc}") from exc
    candidate = _score_answers(examples, answers, labels, run_id=run.id, sha256=model_sha256)
    production, production_error = _production(runtime, run, labels, examples)
    words = [answer[0] for answer in answers]
    dictionary = EntityDictionary([(e.text, e.spans) for e in data.train], labels)
    found = [dictionary.entities(example.text) for example in examples]
    classical = _score_spans(examples, words, found, labels, run_id=run.id, method=DICTIONARY_METHOD)
    classical["metrics"]["dictionary_entries"] = len(dictionary)
    majority = _score_spans(examples, words, [[] for _ in examples], labels, run_id=run.id, method=NO_ENTITY_METHOD)
    report = {
        "evaluation_set": evaluation_set,
        "labels": labels,
        "item_ids": item_ids,
        "y_true": [0] * len(examples),
        "candidate": candidate,
        "production": production,
        "production_error": production_error,
        "baselines": {MAJORITY: majority, CLASSICAL: classical},
        "baseline_lift": candidate["metrics"]["entity_f1"] - classical["metrics"]["entity_f1"],
        "input_stats": None,  # token predictions are not monitored for drift (docs/ner.md)
    }
    errors = EvaluationReport().validate(report)
    if errors:
        raise ExportError(f"the evaluation report does not follow the shared EvaluationReport format: {errors}")
    log.info(
        "run_evaluation_finished",
        split=EVALUATION_SPLIT,
        items=len(examples),
        sha256=evaluation_set["sha256"],
        candidate_entity_f1=round(candidate["metrics"]["entity_f1"], 4),
        production_entity_f1=None if production is None else round(production["metrics"]["entity_f1"], 4),
        production_version=production["version"] if production else None,
        production_error=production_error,
        classical_entity_f1=round(classical["metrics"]["entity_f1"], 4),
        baseline_lift=round(report["baseline_lift"], 4),
    )
    return report


def _production(
    runtime: Runtime, run: RunInfo, labels: list[str], examples: list[TokenExample]
) -> tuple[dict[str, Any] | None, str | None]:
    return score_production(
        runtime,
        run,
        lambda version: _scored(
            version.folder,
            version.metadata,
            examples,
            labels,
            run_id=version.run_id,
            sha256=version.model_sha256,
            version=version.version,
        ),
    )


def _scored(
    folder: Path,
    metadata: dict[str, Any],
    examples: list[TokenExample],
    labels: list[str],
    *,
    run_id: str | None,
    sha256: str | None,
    version: int | None = None,
) -> dict[str, Any]:
    answers = served_token_predictions(folder, metadata, [example.text for example in examples])
    return _score_answers(examples, answers, labels, run_id=run_id, sha256=sha256, version=version)


def _score_answers(
    examples: list[TokenExample],
    answers: list[tuple[Words, list[str], list[dict[str, Any]]]],
    labels: list[str],
    *,
    run_id: str | None,
    sha256: str | None,
    version: int | None = None,
) -> dict[str, Any]:
    """A served model's answers: its decoded word tags against the true ones on its own words."""
    true_tags = [word_tags(words, example.spans) for example, (words, _, _) in zip(examples, answers, strict=True)]
    predicted = [tags for _, tags, _ in answers]
    confidences = [min((e["score"] for e in entities), default=1.0) for _, _, entities in answers]
    return _scored_model(true_tags, predicted, confidences, labels, run_id=run_id, sha256=sha256, version=version)


def _score_spans(
    examples: list[TokenExample],
    words: list[Words],
    spans: list[list[dict[str, Any]]],
    labels: list[str],
    *,
    run_id: str,
    method: str,
) -> dict[str, Any]:
    """A baseline's entities, put on the candidate's words as the truth is, and scored the same way."""
    true_tags = [word_tags(w, example.spans) for w, example in zip(words, examples, strict=True)]
    predicted = [word_tags(w, found) for w, found in zip(words, spans, strict=True)]
    scored = _scored_model(true_tags, predicted, [1.0] * len(examples), labels, run_id=run_id, sha256=None)
    scored["metrics"]["method"] = method
    return scored


def _scored_model(
    true_tags: list[list[str]],
    predicted: list[list[str]],
    confidences: list[float],
    labels: list[str],
    *,
    run_id: str | None,
    sha256: str | None,
    version: int | None = None,
) -> dict[str, Any]:
    known = set(labels)
    counts: dict[str, list[Any]] = {"tp": [], "fp": [], "fn": [], "other_fp": []}
    for truth, tags in zip(true_tags, predicted, strict=True):
        item = entity_counts(truth, tags, labels)
        for name in ("tp", "fp", "fn"):
            counts[name].append(item[name])
        counts["other_fp"].append(sum(1 for tag in tags if tag.startswith("B-") and tag[2:] not in known))
    exact = [
        not any(fp) and not any(fn) and not other
        for fp, fn, other in zip(counts["fp"], counts["fn"], counts["other_fp"], strict=True)
    ]
    report = entity_report(true_tags, predicted)
    per_type = {label: report["per_type"].get(label, _empty_type(true_tags, label)) for label in labels}
    metrics = {
        **report,
        "per_type": per_type,
        "items": len(true_tags),
        "exact_match": sum(exact) / len(exact) if exact else 0.0,
        "entity_counts": {"labels": list(labels), **counts},
    }
    return {
        "version": version,
        "run_id": run_id,
        "model_sha256": sha256,
        "predictions": [0 if hit else -1 for hit in exact],
        "confidences": [float(c) for c in confidences],
        "metrics": metrics,
    }


def _empty_type(true_tags: list[list[str]], label: str) -> dict[str, Any]:
    """A type seqeval does not list (neither true nor predicted on these items): nothing to score."""
    support = sum(1 for tags in true_tags for tag in tags if tag == f"B-{label}")
    return {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": support}
