"""The evaluation report a run publishes beside its model (`evaluation.json`): the candidate, the version in
production, a majority baseline and a classical one (TF-IDF or pixels + logistic regression, trained on the train
split), each scored item by item on the snapshot's frozen test split, and the candidate's lift over the latter.

Production is whatever a registry stand-in (the real serving contract, on a real socket) says it is: an earlier
run's published artifacts. The tests recompute every answer themselves, the way inference serves (ONNX Runtime,
PIL or the raw `tokenizers` tokenizer, the model's own metadata), and compare with the report.

Runs are kept small: a two-layer CNN on 16x16 digits, and for text a one-layer BERT with MiniLM's tokenizer.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from typing import Any

import numpy as np
import onnxruntime as ort
import pytest
import torch
from PIL import Image, ImageOps
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from tokenizers import Tokenizer
from torch import nn

from services.training.base_models import IMAGE_ARCHITECTURES, ImageArchitecture
from services.training.schemas import RunSchema
from shared.artifacts import EvaluationReport, model_run_prefix
from testkit.processes import free_port
from testkit.serving import RegistryStandIn
from tests.conftest import INTERNAL_TOKEN
from tests.helpers import eventually
from tests.training.support import all_runs, digit_items, published, request_training, text_items, write_snapshot

pytestmark = pytest.mark.timeout(240)

TENANT = "acme"
MODEL = "digits"
TINY_CNN = "tiny-cnn"
IMAGE_HP = {
    "epochs": 3,
    "batch_size": 16,
    "image_size": 16,
    "learning_rate": 1e-2,
    "head_learning_rate": 1e-2,
    "augment": False,
    "horizontal_flip": False,
    "early_stopping_patience": 0,
}


class TinyCNN(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1), nn.ReLU()
        )
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.head = nn.Linear(32, num_classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(pixels)).flatten(1))


@pytest.fixture
def tiny_cnn(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setitem(IMAGE_ARCHITECTURES, TINY_CNN, ImageArchitecture(TINY_CNN, TinyCNN, ("head.",)))
    return TINY_CNN


@pytest.fixture
def registry() -> Any:
    stand_in = RegistryStandIn(token=INTERNAL_TOKEN).start()
    yield stand_in
    stand_in.stop()


# -- data ----------------------------------------------------------------------------------------------------


def split_by_content(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each item's split from its content hash (as labeling assigns them): a fifth test, a fifth validation."""
    splits = ("test", "validation", "train", "train", "train")
    for item in items:
        item["split"] = splits[int(hashlib.sha256(item["content"]).hexdigest()[:8], 16) % 5]
    return items


def digits_snapshot(storage: Any, labels: list[str], count: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    items = split_by_content(digit_items(count, digits=tuple(int(label) for label in labels)))
    snapshot = write_snapshot(
        storage, tenant=TENANT, dataset_id="ds_digits", task_type="image_classification", labels=labels, items=items
    )
    return snapshot, items


def manifest_lines(storage: Any, snapshot: dict[str, Any]) -> list[dict[str, Any]]:
    raw = storage.get_bytes(snapshot["manifest"]["bucket"], snapshot["manifest"]["key"])
    return [json.loads(line) for line in raw.decode().splitlines()]


def ids_digest(item_ids: list[str]) -> str:
    """The digest of a set of items, written out here as docs/evaluation.md defines it."""
    return hashlib.sha256("".join(f"{item_id}\n" for item_id in sorted(item_ids)).encode("utf-8")).hexdigest()


def train_digits(training: Any, snapshot: dict[str, Any], labels: list[str], base_model: str) -> tuple[Any, dict]:
    request_training(
        training,
        tenant=TENANT,
        dataset_id="ds_digits",
        snapshot=snapshot,
        task_type="image_classification",
        labels=labels,
        base_model=base_model,
        model_name=MODEL,
        hyperparameters=IMAGE_HP,
    )
    return wait_for_snapshot_run(training, snapshot)


def wait_for_snapshot_run(training: Any, snapshot: dict[str, Any]) -> tuple[Any, dict]:
    """The finished run of `snapshot` (it must have succeeded) and its training.completed payload."""

    def done() -> Any:
        runs = [run for run in all_runs(training) if run.snapshot_id == snapshot["snapshot_id"]]
        return next((run for run in runs if run.status in ("succeeded", "failed")), None)

    run = eventually(done, timeout=150, interval=0.2, what=f"the run of {snapshot['snapshot_id']}")
    assert run.status == "succeeded", run.failure_reason
    [completed] = published(training, "training.completed", run.id)
    return run, completed["payload"]


def read_report(storage: Any, payload: dict[str, Any]) -> dict[str, Any]:
    ref = payload["evaluation"]
    raw = storage.get_bytes(ref["bucket"], ref["key"])
    assert hashlib.sha256(raw).hexdigest() == ref["sha256"]
    report = json.loads(raw)
    assert EvaluationReport().validate(report) == {}
    return report


def production_document(storage: Any, payload: dict[str, Any], *, task_type: str, version: int = 1) -> dict:
    """The registry's serving document with `payload`'s run (a training.completed) as production `version`."""
    artifacts = {
        name: {**ref, "size": storage.stat(ref["bucket"], ref["key"]).size}
        for name, ref in payload["artifacts"].items()
    }
    return {
        "tenant": TENANT,
        "model_name": payload["model_name"],
        "dataset_id": payload["dataset_id"],
        "task_type": task_type,
        "aliases": {"production": {"version": version, "weights": {}}},
        "versions": {
            str(version): {
                "version": version,
                "status": "ready",
                "artifacts": artifacts,
                "metadata": payload["metadata"],
            }
        },
    }


# -- serving, as inference does it -------------------------------------------------------------------------------


def served_image_answers(storage: Any, payload: dict[str, Any], images: list[bytes]) -> tuple[list[str], np.ndarray]:
    """Labels and confidences of the payload's model on `images`, preprocessed as inference preprocesses."""
    metadata = payload["metadata"]
    spec = metadata["preprocessing"]
    height, width = spec["size"]
    mean = np.asarray(spec["mean"], dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec["std"], dtype=np.float32).reshape(-1, 1, 1)
    batch = []
    for data in images:
        with Image.open(io.BytesIO(data)) as image:
            rgb = ImageOps.exif_transpose(image).convert("RGB").resize((width, height), Image.Resampling.BILINEAR)
        pixels = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1) / 255.0
        batch.append((pixels - mean) / std)
    graph = storage.get_bytes("models", payload["artifacts"]["model.onnx"]["key"])
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    [logits] = session.run(["logits"], {"pixels": np.stack(batch).astype(np.float32)})
    return _answers(logits, metadata["labels"])


def served_text_answers(storage: Any, payload: dict[str, Any], texts: list[str]) -> tuple[list[str], np.ndarray]:
    metadata = payload["metadata"]
    spec = metadata["preprocessing"]
    tokenizer = Tokenizer.from_str(storage.get_bytes("models", payload["artifacts"]["tokenizer.json"]["key"]).decode())
    tokenizer.enable_truncation(spec["max_length"])
    tokenizer.no_padding()
    graph = storage.get_bytes("models", payload["artifacts"]["model.onnx"]["key"])
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    logits = []
    for text in texts:  # one at a time: no padding at all
        encoding = tokenizer.encode(text.lower() if spec["lowercase"] else text)
        ids = np.asarray([encoding.ids], dtype=np.int64)
        [row] = session.run(["logits"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        logits.append(row[0])
    return _answers(np.stack(logits), metadata["labels"])


def _answers(logits: np.ndarray, labels: list[str]) -> tuple[list[str], np.ndarray]:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    probabilities = shifted / shifted.sum(axis=1, keepdims=True)
    return [labels[i] for i in probabilities.argmax(axis=1)], probabilities.max(axis=1)


def classical_answers(
    task_type: str, train: list[dict[str, Any]], test: list[dict[str, Any]], labels: list[str]
) -> list[str]:
    """The classical baseline, written out here as docs/training.md defines it: fitted on the train items only."""
    if task_type == "text_classification":
        features = [[item["content"].decode() for item in items] for items in (train, test)]
        pipeline = make_pipeline(
            TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True),
            LogisticRegression(C=100.0, max_iter=3000, random_state=0),
        )
    else:

        def pixels(item: dict[str, Any]) -> np.ndarray:
            with Image.open(io.BytesIO(item["content"])) as image:
                rgb = ImageOps.exif_transpose(image).convert("RGB").resize((16, 16), Image.Resampling.BILINEAR)
            return np.asarray(rgb, dtype=np.float32).reshape(-1) / 255.0

        features = [np.stack([pixels(item) for item in items]) for items in (train, test)]
        pipeline = make_pipeline(StandardScaler(), LogisticRegression(C=0.01, max_iter=3000, random_state=0))
    pipeline.fit(features[0], [item["label"] for item in train])
    return [str(label) for label in pipeline.predict(features[1])]


def assert_classical_baseline(
    report: dict[str, Any], run: Any, payload: dict[str, Any], expected: list[str], method: str
) -> None:
    """The report's classical baseline gives `expected` on the test items; the run and its event carry its lift."""
    classical = report["baselines"]["classical"]
    assert named(report, classical) == expected
    assert classical["metrics"]["method"] == method and classical["run_id"] == run.id
    truth = [report["labels"][y] for y in report["y_true"]]
    assert classical["metrics"]["macro_f1"] == pytest.approx(f1_score(truth, expected, average="macro"))
    lift = report["candidate"]["metrics"]["macro_f1"] - classical["metrics"]["macro_f1"]
    assert report["baseline_lift"] == pytest.approx(lift)
    assert payload["metrics"]["baseline_lift"] == pytest.approx(lift)
    assert payload["metrics"]["baseline"] == {
        "name": "classical",
        "method": method,
        "items": len(truth),
        "accuracy": classical["metrics"]["accuracy"],
        "macro_f1": classical["metrics"]["macro_f1"],
    }
    # The run's record, as the run API shows it.
    shown = RunSchema().dump(run)
    assert shown["baseline_lift"] == pytest.approx(lift)
    assert shown["baseline"]["method"] == method and shown["baseline"]["macro_f1"] == classical["metrics"]["macro_f1"]


def named(report: dict[str, Any], scored: dict[str, Any]) -> list[str | None]:
    return [report["labels"][p] if p >= 0 else None for p in scored["predictions"]]


def accuracy(report: dict[str, Any], answers: list[str | None]) -> float:
    truth = [report["labels"][y] for y in report["y_true"]]
    return sum(a == t for a, t in zip(answers, truth, strict=True)) / len(truth)


# -- tests ---------------------------------------------------------------------------------------------------


def test_a_first_run_scores_the_candidate_and_a_majority_baseline_on_exactly_the_test_items(
    worker, registry, tiny_cnn, logs
) -> None:
    labels = ["0", "1", "2"]
    with worker("training", registry_url=registry.url) as training:
        snapshot, items = digits_snapshot(training.storage, labels, 180)
        run, payload = train_digits(training, snapshot, labels, tiny_cnn)
        report = read_report(training.storage, payload)
        lines = manifest_lines(training.storage, snapshot)
        served_labels, served_confidence = served_image_answers(
            training.storage, payload, [item["content"] for item in _in_id_order(lines, items, "test")]
        )

    test_ids = sorted(line["item_id"] for line in lines if line["split"] == "test")
    counts = Counter(line["split"] for line in lines)
    assert counts["test"] >= 20 and counts["validation"] >= 20, counts

    # Exactly the snapshot's test items, in id order, named by the digest of their ids.
    assert report["evaluation_set"] == {
        "snapshot_id": snapshot["snapshot_id"],
        "split": "test",
        "items": len(test_ids),
        "sha256": ids_digest(test_ids),
    }
    assert report["item_ids"] == test_ids
    by_id = {line["item_id"]: line for line in lines}
    assert [report["labels"][y] for y in report["y_true"]] == [by_id[i]["label"] for i in test_ids]
    assert report["labels"] == labels

    # The test items' inputs, measured as inference measures a prediction's: the baseline of input drift.
    stats = report["input_stats"]
    assert set(stats) == {"width", "height", "brightness"}
    assert all(len(values) == len(test_ids) for values in stats.values())
    assert all(0.0 <= value <= 1.0 for value in stats["brightness"]) and len(set(stats["brightness"])) > 1

    # No production yet: nothing to compare with, and no error either (the registry answered 404).
    assert report["production"] is None and report["production_error"] is None
    assert registry.requests >= 1

    # The candidate, scored as it will be served: the same answers inference gives on those items.
    candidate = report["candidate"]
    assert candidate["run_id"] == run.id and candidate["version"] is None
    assert candidate["model_sha256"] == payload["artifacts"]["model.onnx"]["sha256"]
    assert named(report, candidate) == served_labels
    np.testing.assert_allclose(candidate["confidences"], served_confidence, atol=1e-5)
    assert candidate["metrics"]["accuracy"] == accuracy(report, served_labels)
    assert candidate["metrics"]["items"] == len(test_ids)
    assert set(candidate["metrics"]["per_class"]) == set(labels)
    assert sum(c["support"] for c in candidate["metrics"]["per_class"].values()) == len(test_ids)
    assert 0.0 <= candidate["metrics"]["ece"] <= 1.0

    # The majority baseline answers the train split's most frequent label everywhere.
    train_counts = Counter(line["label"] for line in lines if line["split"] == "train")
    majority_label = max(labels, key=lambda label: (train_counts[label], -labels.index(label)))
    majority = report["baselines"]["majority"]
    assert set(named(report, majority)) == {majority_label}
    truth = [report["labels"][y] for y in report["y_true"]]
    assert majority["metrics"]["accuracy"] == truth.count(majority_label) / len(truth)
    assert majority["metrics"]["per_class"][majority_label]["recall"] == 1.0

    # The classical baseline: logistic regression on the train items' pixels, nothing else.
    assert_classical_baseline(
        report,
        run,
        payload,
        classical_answers(
            "image_classification",
            _in_id_order(lines, items, "train"),
            _in_id_order(lines, items, "test"),
            labels,
        ),
        "pixels_logistic_regression",
    )

    # The payload: validation metrics as before, the candidate's test metrics, and the epoch early stopping chose.
    metrics = payload["metrics"]
    assert metrics["items"] == counts["validation"] and metrics["test"] == candidate["metrics"]
    best = max(run.history, key=lambda epoch: epoch["macro_f1"])
    assert metrics["best_epoch"] == best["epoch"] == payload["metadata"]["training"]["best_epoch"]
    # Test items reached neither training nor selection: the run trained on train and selected on validation.
    training_record = payload["metadata"]["training"]
    assert training_record["train_items"] == counts["train"]
    assert training_record["validation_items"] == counts["validation"]
    assert training_record["test_items"] == counts["test"]
    assert payload["metadata"]["export"]["parity"]["items"] == counts["validation"]
    assert payload["evaluation"]["key"] == f"{model_run_prefix(TENANT, MODEL, run.id)}/evaluation.json"
    assert "evaluation.json" not in payload["artifacts"]

    [finished_line] = logs.find(event="run_evaluation_finished", run_id=run.id)
    assert finished_line["items"] == len(test_ids) and finished_line["production"] is None
    assert finished_line["candidate"]["accuracy"] == round(candidate["metrics"]["accuracy"], 4)


def test_production_is_rescored_from_its_artifact_on_the_new_test_split(worker, registry, tiny_cnn) -> None:
    first_labels = ["0", "1", "2"]
    # The dataset gained a label since production was trained, listed first: indices shift, names do not.
    second_labels = ["3", "0", "1", "2"]
    with worker("training", registry_url=registry.url) as training:
        first_snapshot, _ = digits_snapshot(training.storage, first_labels, 150)
        first_run, first = train_digits(training, first_snapshot, first_labels, tiny_cnn)
        registry.serve(production_document(training.storage, first, task_type="image_classification"))

        second_snapshot, items = digits_snapshot(training.storage, second_labels, 240)
        request_training(
            training,
            tenant=TENANT,
            dataset_id="ds_digits",
            snapshot=second_snapshot,
            task_type="image_classification",
            labels=second_labels,
            base_model=tiny_cnn,
            model_name=MODEL,
            hyperparameters=IMAGE_HP,
        )
        second_run, second = wait_for_snapshot_run(training, second_snapshot)
        report = read_report(training.storage, second)
        lines = manifest_lines(training.storage, second_snapshot)
        test_items = _in_id_order(lines, items, "test")
        production_labels, production_confidence = served_image_answers(
            training.storage, first, [item["content"] for item in test_items]
        )

    test_ids = sorted(line["item_id"] for line in lines if line["split"] == "test")
    assert report["evaluation_set"]["sha256"] == ids_digest(test_ids)
    assert report["production_error"] is None
    production = report["production"]
    assert production["version"] == 1 and production["run_id"] == first_run.id
    assert production["model_sha256"] == first["artifacts"]["model.onnx"]["sha256"]

    # Its answers are what its ONNX graph gives on these items, mapped to the candidate's labels by name.
    assert named(report, production) == production_labels
    np.testing.assert_allclose(production["confidences"], production_confidence, atol=1e-5)
    assert production["metrics"]["accuracy"] == accuracy(report, production_labels)
    # It never knew "3": every "3" counts against it.
    threes = report["y_true"].count(report["labels"].index("3"))
    assert threes > 0
    assert production["metrics"]["per_class"]["3"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": threes}
    assert production["metrics"]["accuracy"] <= 1 - threes / len(test_ids)

    # Recomputed, not copied: its numbers here are not the ones it recorded on its own validation split.
    recorded = first["metrics"]
    assert (production["metrics"]["accuracy"], production["metrics"]["macro_f1"]) != (
        recorded["accuracy"],
        recorded["macro_f1"],
    )
    assert production["metrics"]["items"] == len(test_ids) != recorded["items"]

    # The candidate and the baseline are scored on the very same items.
    assert len(report["candidate"]["predictions"]) == len(production["predictions"]) == len(test_ids)
    assert second["metrics"]["test"] == report["candidate"]["metrics"]
    assert second_run.id != first_run.id


def test_a_tampered_production_artifact_is_reported_and_the_run_still_publishes(worker, registry, tiny_cnn) -> None:
    labels = ["0", "1", "2"]
    with worker("training", registry_url=registry.url) as training:
        first_snapshot, _ = digits_snapshot(training.storage, labels, 120)
        _, first = train_digits(training, first_snapshot, labels, tiny_cnn)
        registry.serve(production_document(training.storage, first, task_type="image_classification"))
        graph = first["artifacts"]["model.onnx"]
        # Someone replaces the registered graph in storage (storage records the new bytes' own sha256).
        original = training.storage.get_bytes(graph["bucket"], graph["key"])
        training.storage.put(graph["bucket"], graph["key"], original + b"\x00")

        second_snapshot, _ = digits_snapshot(training.storage, labels, 150)
        request_training(
            training,
            tenant=TENANT,
            dataset_id="ds_digits",
            snapshot=second_snapshot,
            task_type="image_classification",
            labels=labels,
            base_model=tiny_cnn,
            model_name=MODEL,
            hyperparameters={**IMAGE_HP, "seed": 7},
        )
        _, second = wait_for_snapshot_run(training, second_snapshot)
        report = read_report(training.storage, second)

    assert report["production"] is None
    error = report["production_error"]
    assert "model.onnx" in error and graph["sha256"] in error and "not scored" in error
    assert report["candidate"]["metrics"]["items"] == report["evaluation_set"]["items"] > 0
    assert "majority" in report["baselines"]


def test_an_unreachable_registry_is_reported_as_a_production_error(worker, tiny_cnn) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    labels = ["0", "1", "2"]
    with worker("training", registry_url=closed) as training:
        snapshot, _ = digits_snapshot(training.storage, labels, 90)
        _, payload = train_digits(training, snapshot, labels, tiny_cnn)
        report = read_report(training.storage, payload)
    assert report["production"] is None
    assert closed in report["production_error"] and "did not answer" in report["production_error"]


def test_a_text_production_version_is_scored_with_its_own_tokenizer_as_served(worker, registry, tiny_bert) -> None:
    labels = ["databases", "numerics", "web"]
    hp = {"epochs": 2, "batch_size": 32, "max_length": 24, "head_learning_rate": 1e-2, "early_stopping_patience": 0}
    items = split_by_content(text_items(per_label=40))
    with worker("training", registry_url=registry.url) as training:
        first_snapshot = write_snapshot(
            training.storage,
            tenant=TENANT,
            dataset_id="ds_docs",
            task_type="text_classification",
            labels=labels,
            items=items[: len(items) // 2] + items[len(items) // 2 :: 2],
        )
        request = {
            "tenant": TENANT,
            "dataset_id": "ds_docs",
            "task_type": "text_classification",
            "labels": labels,
            "base_model": tiny_bert,
            "model_name": "docs",
            "hyperparameters": hp,
        }
        request_training(training, snapshot=first_snapshot, **request)
        _, first = wait_for_snapshot_run(training, first_snapshot)
        registry.serve(production_document(training.storage, first, task_type="text_classification"))

        second_snapshot = write_snapshot(
            training.storage,
            tenant=TENANT,
            dataset_id="ds_docs",
            task_type="text_classification",
            labels=labels,
            items=items,
        )
        request_training(training, snapshot=second_snapshot, **request)
        second_run, second = wait_for_snapshot_run(training, second_snapshot)
        report = read_report(training.storage, second)
        lines = manifest_lines(training.storage, second_snapshot)
        texts = [item["content"].decode() for item in _in_id_order(lines, items, "test")]
        production_labels, production_confidence = served_text_answers(training.storage, first, texts)
        candidate_labels, candidate_confidence = served_text_answers(training.storage, second, texts)

    assert report["production_error"] is None
    assert report["production"]["model_sha256"] == first["artifacts"]["model.onnx"]["sha256"]
    assert named(report, report["production"]) == production_labels
    np.testing.assert_allclose(report["production"]["confidences"], production_confidence, atol=1e-4)
    assert named(report, report["candidate"]) == candidate_labels
    np.testing.assert_allclose(report["candidate"]["confidences"], candidate_confidence, atol=1e-4)
    assert report["evaluation_set"]["items"] == len(texts) > 0
    expected = classical_answers(
        "text_classification", _in_id_order(lines, items, "train"), _in_id_order(lines, items, "test"), labels
    )
    assert_classical_baseline(report, second_run, second, expected, "tfidf_logistic_regression")


def _in_id_order(lines: list[dict[str, Any]], items: list[dict[str, Any]], split: str) -> list[dict[str, Any]]:
    """The snapshot's items of `split` in item-id order (the manifest names item i of `items` itm_<i>)."""
    ids = sorted(line["item_id"] for line in lines if line["split"] == split)
    return [items[int(item_id.removeprefix("itm_"))] for item_id in ids]
