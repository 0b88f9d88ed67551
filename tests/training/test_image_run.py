"""An image run end to end on real data: scikit-learn's handwritten digits reach >= 0.90 validation accuracy."""

from __future__ import annotations

import hashlib
import io
import json

import numpy as np
import onnxruntime as ort
import pytest
from PIL import Image

from tests.training.support import digit_items, published, request_training, wait_for_run, write_snapshot

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

LABELS = [str(d) for d in range(10)]


def test_digits_train_from_scratch_to_090_accuracy_and_serve_as_onnx(worker, logs) -> None:
    items = digit_items(1000)
    with worker("training") as training:
        snapshot = write_snapshot(
            training.storage,
            tenant="acme",
            dataset_id="ds_digits",
            task_type="image_classification",
            labels=LABELS,
            items=items,
        )
        request_training(
            training,
            tenant="acme",
            dataset_id="ds_digits",
            snapshot=snapshot,
            task_type="image_classification",
            labels=LABELS,
            base_model="resnet18",
            hyperparameters={
                "epochs": 4,
                "batch_size": 64,
                "image_size": 16,
                "learning_rate": 3e-3,
                "head_learning_rate": 3e-3,
                # Random crops of an 8x8 glyph cut strokes off, and a mirrored digit is another glyph: this run
                # trains without augmentation (on by default; the other image runs use it).
                "augment": False,
                "horizontal_flip": False,
                "early_stopping_patience": 0,
            },
        )
        run = wait_for_run(training, status=("succeeded", "failed"), timeout=160)
        assert run.status == "succeeded", run.failure_reason
        [completed] = published(training, "training.completed", run.id)
        artifacts = completed["payload"]["artifacts"]
        metadata = json.loads(training.storage.get_bytes("models", artifacts["metadata.json"]["key"]))
        graph = training.storage.get_bytes("models", artifacts["model.onnx"]["key"])

    assert run.metrics["accuracy"] >= 0.90, run.metrics
    assert run.metrics["macro_f1"] >= 0.88, run.metrics
    assert run.metrics["items"] == 200
    # No weights were imported for resnet18 here: the run says it started from scratch.
    assert run.base_weights["weights"] == "scratch"
    assert "no weights imported for resnet18" in run.base_weights["note"]
    assert metadata["lineage"]["base_model"]["weights"] == "scratch"
    assert metadata["preprocessing"] == {
        **metadata["preprocessing"],
        "kind": "image",
        "size": [16, 16],
        "channels": 3,
        "mean": [0.485, 0.456, 0.406],
        "std": [0.229, 0.224, 0.225],
    }
    assert metadata["inputs"] == [{"name": "pixels", "datatype": "FP32", "shape": [-1, 3, 16, 16]}]
    assert metadata["export"]["parity"]["passed"]
    assert hashlib.sha256(graph).hexdigest() == metadata["files"]["model.onnx"]["sha256"]

    # Serve the graph as inference will (RGB, bilinear resize, scale, normalise): it reads the digits.
    validation = [item for item in items if item["split"] == "validation"]
    pixels = np.stack([_preprocess(item["content"], metadata["preprocessing"]) for item in validation])
    session = ort.InferenceSession(graph, providers=["CPUExecutionProvider"])
    [logits] = session.run(["logits"], {"pixels": pixels})
    predicted = [LABELS[i] for i in logits.argmax(axis=1)]
    accuracy = np.mean([p == item["label"] for p, item in zip(predicted, validation, strict=True)])
    assert accuracy == pytest.approx(run.metrics["accuracy"], abs=1e-9)
    assert session.run(["logits"], {"pixels": pixels[:1]})[0].shape == (1, 10)  # dynamic batch axis

    epochs = logs.find(event="run_epoch_finished", run_id=run.id)
    assert len(epochs) == 4


def _preprocess(png: bytes, spec: dict) -> np.ndarray:
    with Image.open(io.BytesIO(png)) as image:
        resized = image.convert("RGB").resize(tuple(spec["size"][::-1]), Image.Resampling.BILINEAR)
    chw = (np.asarray(resized, dtype=np.float32) / 255.0).transpose(2, 0, 1)
    mean = np.asarray(spec["mean"], dtype=np.float32).reshape(-1, 1, 1)
    std = np.asarray(spec["std"], dtype=np.float32).reshape(-1, 1, 1)
    return (chw - mean) / std
