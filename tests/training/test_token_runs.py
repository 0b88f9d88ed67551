"""token_classification runs through the training API: MiniLM fine-tuned on a span snapshot (written as labeling
writes it: packed texts, each line with its consensus `spans` and a null `label`), selected on validation entity F1,
exported with parity, scored on the test split beside the CoNLL-2003 dictionary baseline and, for a second run,
beside the first run's version in production (a registry stand-in serves it), which the registry's gate then
decides on by entity F1.

The synthetic sentences come from `cli.demo_data.entity_sentences` (faker names, companies, cities and dates in
templates we wrote). Both runs are trained once, by a module-scoped fixture, and every test reads their records.
"""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
import torch

from cli.demo_data import ENTITY_LABELS, ENTITY_TEMPLATES, entity_sentences
from services.registry.evaluation import read_evaluation
from services.registry.promotion import Candidate, Production, decide
from services.training.app import create_app, create_celery
from shared.artifacts import DATASETS_BUCKET, RAW_BUCKET, EvaluationReport, ModelMetadata, snapshot_prefix
from shared.events.celery_app import service_queues
from shared.settings import BUCKETS, Settings
from testkit.serving import RegistryStandIn
from tests.celery_workers import in_process_worker
from tests.conftest import INTERNAL_TOKEN
from tests.helpers import INTERNAL, eventually
from tests.training.support import published
from tests.training.test_evaluation import ids_digest, production_document, read_report

pytestmark = pytest.mark.timeout(300)

TENANT = "acme"  # production_document's
DATASET = "ds_news"
MODEL = "news"
LABELS = list(ENTITY_LABELS)
SPLIT_SIZES = {"train": 240, "validation": 25, "test": 40}
HYPERPARAMETERS = {"max_length": 48}  # the token recipe's defaults otherwise: 3 epochs, batch 16, 2e-4 / 2e-3
SECOND_RUN = {"max_length": 48, "epochs": 2, "seed": 7}  # another recipe, a shorter one: its quality is not tested


@dataclass
class TrainedRun:
    record: dict[str, Any]
    """GET /v1/runs/<id>"""
    payload: dict[str, Any]
    """Its training.completed payload."""
    report: dict[str, Any]
    """Its evaluation.json."""


@dataclass
class TokenRuns:
    settings: Settings
    storage: Any
    snapshot: dict[str, Any]
    lines: list[dict[str, Any]]
    texts: dict[str, str]
    first: TrainedRun
    second: TrainedRun


def write_span_snapshot(storage: Any, sentences: list[tuple[str, list[dict]]]) -> tuple[dict, list[dict], dict]:
    """Texts packed into one object and a manifest whose lines carry `spans` and a null `label`, as labeling writes
    a span dataset's snapshot (services/labeling/snapshots.py)."""
    storage.ensure_buckets(*BUCKETS)
    snapshot_id = f"snap_{uuid.uuid4().hex[:12]}"
    splits = [split for split, size in SPLIT_SIZES.items() for _ in range(size)]
    contents = [text.encode("utf-8") for text, _ in sentences]
    key = f"{TENANT}/{DATASET}/text/{uuid.uuid4().hex}.bin"
    storage.put(RAW_BUCKET, key, b"".join(contents))
    lines, texts, offset = [], {}, 0
    for number, ((text, spans), content, split) in enumerate(zip(sentences, contents, splits, strict=True)):
        item_id = f"itm_{number:06d}"
        ref = {
            "bucket": RAW_BUCKET,
            "key": key,
            "sha256": hashlib.sha256(content).hexdigest(),
            "offset": offset,
            "length": len(content),
        }
        offset += len(content)
        lines.append(
            {"item_id": item_id, "kind": "text", "content": ref, "label": None, "split": split, "spans": spans}
        )
        texts[item_id] = text
    manifest = "".join(json.dumps(line, sort_keys=True) + "\n" for line in lines).encode()
    prefix = snapshot_prefix(TENANT, DATASET, snapshot_id)
    info = storage.put(DATASETS_BUCKET, f"{prefix}/manifest.jsonl", manifest, content_type="application/x-ndjson")
    description = {
        "snapshot_id": snapshot_id,
        "dataset_id": DATASET,
        "tenant": TENANT,
        "task_type": "token_classification",
        "labels": LABELS,
        "label_counts": dict(Counter(span["label"] for _, spans in sentences for span in spans)),
        "split_counts": dict(Counter(splits)),
        "item_count": len(lines),
        "manifest_sha256": info.sha256,
        "created_at": datetime.now(UTC).isoformat(),
    }
    storage.put(DATASETS_BUCKET, f"{prefix}/snapshot.json", json.dumps(description).encode())
    return {"snapshot_id": snapshot_id}, lines, texts


def train_through_the_api(runtime: Any, client: Any, snapshot: dict[str, Any], hyperparameters: dict) -> TrainedRun:
    body = {
        "tenant": TENANT,
        "dataset_id": DATASET,
        "snapshot_id": snapshot["snapshot_id"],
        "model_name": MODEL,
        "hyperparameters": hyperparameters,
    }
    created = client.post("/v1/runs", json=body, headers=INTERNAL)
    assert created.status_code == 202, created.get_json()
    run_id = created.get_json()["id"]

    def finished() -> dict[str, Any] | None:
        record = client.get(f"/v1/runs/{run_id}", headers=INTERNAL).get_json()
        return record if record["status"] in ("succeeded", "failed") else None

    record = eventually(finished, timeout=240, interval=0.5, what=f"run {run_id} to finish")
    assert record["status"] == "succeeded", record["failure_reason"]
    [completed] = published(runtime, "training.completed", run_id)
    return TrainedRun(record, completed["payload"], read_report(runtime.storage, completed["payload"]))


@pytest.fixture(scope="module")
def token_runs(tmp_path_factory: pytest.TempPathFactory, redis_url: str, s3_server: Any) -> Iterator[TokenRuns]:
    """Two runs on one snapshot: the first with nothing in production, the second with the first in production."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # see tests/training/conftest.py
    settings = Settings(
        home=tmp_path_factory.mktemp("token-runs") / "home",
        redis_url=redis_url,
        s3_endpoint=s3_server.endpoint,
        s3_access_key=s3_server.access_key,
        s3_secret_key=s3_server.secret_key,
        internal_token=INTERNAL_TOKEN,
        outbox_relay_interval=0.5,
        log_level="INFO",
    )
    registry = RegistryStandIn(token=INTERNAL_TOKEN).start()
    settings = Settings(**{**settings.__dict__, "registry_url": registry.url})
    celery = create_celery(settings)
    runtime = celery.flywheel_runtime
    runtime.bus.start_relay()
    app = create_app(settings)
    try:
        sentences = entity_sentences(sum(SPLIT_SIZES.values()), seed=11, templates=ENTITY_TEMPLATES)
        snapshot, lines, texts = write_span_snapshot(runtime.storage, sentences)
        with in_process_worker(celery, concurrency=1, queues=service_queues("training"), shutdown_timeout=30):
            started = time.monotonic()
            first = train_through_the_api(runtime, app.test_client(), snapshot, HYPERPARAMETERS)
            registry.serve(production_document(runtime.storage, first.payload, task_type="token_classification"))
            second = train_through_the_api(runtime, app.test_client(), snapshot, SECOND_RUN)
            test, baseline = first.record["metrics"]["test"], first.record["baseline"]
            print(  # docs/ner.md's figures
                f"two token runs in {time.monotonic() - started:.0f} s; first: test entity F1 {test['entity_f1']:.3f} "
                f"(P {test['entity_precision']:.3f} R {test['entity_recall']:.3f}, per type "
                f"{ {k: round(v['f1'], 3) for k, v in test['per_type'].items()} }), dictionary baseline "
                f"{baseline['entity_f1']:.3f} (P {baseline['entity_precision']:.3f} "
                f"R {baseline['entity_recall']:.3f}); "
                f"second: {second.record['metrics']['test']['entity_f1']:.3f} vs production "
                f"{second.report['production']['metrics']['entity_f1']:.3f}"
            )
        yield TokenRuns(settings, runtime.storage, snapshot, lines, texts, first, second)
    finally:
        registry.stop()
        app.extensions["flywheel"].close()
        runtime.close()
        torch.set_num_threads(before)


def test_a_token_run_publishes_a_tagger_that_beats_the_dictionary_baseline(token_runs: TokenRuns) -> None:
    run = token_runs.first
    record, metadata = run.record, run.payload["metadata"]
    assert record["task_type"] == "token_classification" and record["base_model"] == "all-minilm-l6-v2"
    assert record["hyperparameters"]["learning_rate"] == 2e-4 and record["hyperparameters"]["max_length"] == 48
    assert record["hyperparameters"]["class_weighted_loss"] is False

    # The exported tagger: dynamic batch and sequence axes, IOB2 tags, parity with torch, valid shared metadata.
    assert ModelMetadata().validate(metadata) == {}
    assert metadata["task_type"] == "token_classification" and metadata["labels"] == LABELS
    assert metadata["tags"][0] == "O" and len(metadata["tags"]) == 1 + 2 * len(LABELS)
    assert metadata["outputs"][0]["shape"] == [-1, -1, len(metadata["tags"])]
    assert metadata["parity"]["passed"] and metadata["parity"]["argmax_mismatches"] == 0
    assert {"model.onnx", "tokenizer.json", "metadata.json"} <= set(run.payload["artifacts"])

    # The epoch was selected on validation entity F1, which the history records per epoch.
    training = metadata["training"]
    assert training["chosen"]["selection_metric"] == "entity_f1"
    history = training["history"]
    assert len(history) == record["hyperparameters"]["epochs"] == 3
    best = max(history, key=lambda epoch: epoch["selection_score"])
    assert training["best_epoch"] == best["epoch"] == record["metrics"]["best_epoch"]
    assert training["best_validation_entity_f1"] == pytest.approx(best["selection_score"])

    # The record: entity scores on validation and test, per type, and the dictionary baseline on the same items.
    metrics, test = record["metrics"], record["metrics"]["test"]
    assert 0.0 <= metrics["entity_f1"] <= 1.0 and set(metrics["per_type"]) == set(LABELS)
    assert test["items"] == SPLIT_SIZES["test"] and set(test["per_type"]) == set(LABELS)
    baseline = record["baseline"]
    assert baseline["name"] == "classical" and baseline["method"] == "conll2003_dictionary"
    assert baseline["items"] == SPLIT_SIZES["test"]
    assert record["baseline_lift"] == pytest.approx(test["entity_f1"] - baseline["entity_f1"])
    assert test["entity_f1"] >= 0.75, test
    assert test["entity_f1"] > baseline["entity_f1"] + 0.2, (test, baseline)


def test_the_report_scores_each_model_on_exactly_the_test_items(token_runs: TokenRuns) -> None:
    report = token_runs.first.report
    assert EvaluationReport().validate(report) == {}
    test_ids = sorted(line["item_id"] for line in token_runs.lines if line["split"] == "test")
    assert report["item_ids"] == test_ids
    assert report["evaluation_set"]["sha256"] == ids_digest(test_ids) and report["labels"] == LABELS
    assert report["production"] is None and report["production_error"] is None

    true_entities = sum(len(line["spans"]) for line in token_runs.lines if line["split"] == "test")
    for scored in (report["candidate"], report["baselines"]["classical"], report["baselines"]["majority"]):
        counts = scored["metrics"]["entity_counts"]
        # Every true entity is found or missed, by each model, on the same items.
        assert sum(map(sum, counts["tp"])) + sum(map(sum, counts["fn"])) == true_entities
        # An item counts as exactly right (prediction 0) only with no false positive and no false negative.
        assert len(scored["predictions"]) == len(test_ids)
        for prediction, fp, fn in zip(scored["predictions"], counts["fp"], counts["fn"], strict=True):
            assert prediction == (0 if not any(fp) and not any(fn) else -1)
    assert report["baselines"]["majority"]["metrics"]["entity_f1"] == 0.0

    # The dictionary baseline holds every train entity's string, and finds those that come back in the test split.
    def surfaces(split: str) -> list[str]:
        return [
            token_runs.texts[line["item_id"]][span["start"] : span["end"]]
            for line in token_runs.lines
            if line["split"] == split
            for span in line["spans"]
        ]

    classical = report["baselines"]["classical"]["metrics"]
    assert classical["dictionary_entries"] == len(set(surfaces("train")))
    repeated = [surface for surface in surfaces("test") if surface in set(surfaces("train"))]
    assert repeated and sum(map(sum, classical["entity_counts"]["tp"])) > 0


def test_a_second_run_is_gated_against_production_on_entity_f1(token_runs: TokenRuns) -> None:
    first, second = token_runs.first, token_runs.second
    report = second.report
    assert report["production_error"] is None
    production = report["production"]
    assert production["version"] == 1 and production["run_id"] == first.record["id"]
    assert production["model_sha256"] == first.payload["artifacts"]["model.onnx"]["sha256"]
    # Same snapshot, same test items: production from its registered artifact scores what it scored as a candidate.
    assert report["evaluation_set"] == first.report["evaluation_set"]
    assert production["metrics"]["entity_f1"] == pytest.approx(first.record["metrics"]["test"]["entity_f1"])
    assert production["predictions"] == first.report["candidate"]["predictions"]

    # The registry reads the report from storage and decides on entity F1, recomputed from the per-item counts.
    evaluation = read_evaluation(token_runs.storage, second.payload["evaluation"], LABELS)
    assert evaluation.problem is None
    policy = {
        "primary_metric": "entity_f1",
        "margin": 0.01,
        "auto_promote": True,
        "confidence": 0.95,
        "max_class_regression": 0.10,
        "min_score": None,
        "floor": "classical_baseline",
        "min_test_items": 30,
        "bootstrap_samples": 500,
    }
    candidate = Candidate(2, second.record["id"], second.payload["artifacts"]["model.onnx"]["sha256"])
    decision = decide(policy, candidate, Production(1, production["model_sha256"], canary=False), evaluation)
    candidate_f1 = report["candidate"]["metrics"]["entity_f1"]
    assert decision["candidate"]["metrics"]["entity_f1"] == pytest.approx(candidate_f1)
    assert decision["production"]["metrics"]["entity_f1"] == pytest.approx(production["metrics"]["entity_f1"])
    assert decision["difference"]["metric"] == "entity_f1"
    assert decision["difference"]["value"] == pytest.approx(candidate_f1 - production["metrics"]["entity_f1"])
    assert decision["difference"]["ci_low"] <= decision["difference"]["value"] <= decision["difference"]["ci_high"]
    conditions = {condition["name"]: condition for condition in decision["conditions"]}
    assert set(conditions) == {"min_test_items", "margin", "credible_improvement", "class_regression", "min_score"}
    assert [row["label"] for row in conditions["class_regression"]["per_class"]] == LABELS
    assert conditions["min_score"]["threshold"] == pytest.approx(
        report["baselines"]["classical"]["metrics"]["entity_f1"]
    )
    assert conditions["min_score"]["passed"]
    assert decision["baseline_lift"] == pytest.approx(report["baseline_lift"])
    assert conditions["credible_improvement"]["passed"] == (decision["difference"]["ci_low"] > 0)
    assert decision["outcome"] == ("production" if all(c["passed"] for c in conditions.values()) else "staging")
