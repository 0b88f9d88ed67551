"""A text run end to end: `training.requested` in, MiniLM fine-tuned, verified ONNX model folder and
`training.completed` out."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from tokenizers import Tokenizer

from shared.artifacts import ModelMetadata, model_run_prefix
from tests.helpers import INTERNAL
from tests.training.support import published, request_training, text_items, wait_for_run, write_snapshot

pytestmark = [pytest.mark.timeout(180), pytest.mark.slow]

LABELS = ["databases", "numerics", "web"]
HYPERPARAMETERS = {
    "epochs": 3,
    "batch_size": 32,
    "freeze_encoder": True,
    "max_length": 32,
    "head_learning_rate": 1e-2,
    "early_stopping_patience": 0,
    "quantize": True,
}


def test_a_text_run_converges_and_publishes_a_verified_onnx_model(platform, worker, logs) -> None:
    api = platform("training")
    with worker("training") as training:
        snapshot = write_snapshot(
            training.storage,
            tenant="acme",
            dataset_id="ds_docs",
            task_type="text_classification",
            labels=LABELS,
            items=text_items(per_label=100),
        )
        request_training(
            training,
            tenant="acme",
            dataset_id="ds_docs",
            snapshot=snapshot,
            task_type="text_classification",
            labels=LABELS,
            hyperparameters=HYPERPARAMETERS,
            trace_id="trace-text-run",
        )
        run = wait_for_run(training, status=("succeeded", "failed"), timeout=150)
        assert run.status == "succeeded", run.failure_reason

        # The recipe converged: the loss fell and the served graph classifies held-out docstrings well.
        losses = [epoch["train_loss"] for epoch in run.history]
        assert len(losses) == HYPERPARAMETERS["epochs"]
        assert losses[-1] < losses[0] * 0.8, losses
        metrics = run.metrics
        assert metrics["accuracy"] >= 0.75, metrics
        assert metrics["macro_f1"] >= 0.75, metrics
        assert set(metrics["per_class"]) == set(LABELS)
        assert sum(map(sum, metrics["confusion_matrix"]["matrix"])) == metrics["items"] == 75
        assert 0.0 <= metrics["ece"] <= 1.0
        assert run.base_weights["weights"] == "pretrained"
        assert len(run.base_weights["sha256"]) == 64

        # Exactly one training.completed, carrying the request's trace id; every file is where it says.
        [completed] = published(training, "training.completed", run.id)
        assert completed["trace_id"] == "trace-text-run"
        assert completed["tenant"] == "acme"
        payload = completed["payload"]
        artifacts = payload["artifacts"]
        prefix = model_run_prefix("acme", "ds_docs", run.id)
        assert {ref["key"] for ref in artifacts.values()} == {f"{prefix}/{name}" for name in artifacts}
        blobs = {name: training.storage.get_bytes(ref["bucket"], ref["key"]) for name, ref in artifacts.items()}
        for name, ref in artifacts.items():
            assert hashlib.sha256(blobs[name]).hexdigest() == ref["sha256"], name
        metadata = json.loads(blobs["metadata.json"])
        assert ModelMetadata().validate(metadata) == {}
        assert metadata == payload["metadata"]
        assert set(metadata["files"]) == set(artifacts) - {"metadata.json"}
        for name, entry in metadata["files"].items():
            assert entry == {"sha256": hashlib.sha256(blobs[name]).hexdigest(), "size": len(blobs[name])}
        assert metadata["labels"] == LABELS
        assert metadata["task_type"] == "text_classification"
        assert [i["name"] for i in metadata["inputs"]] == ["input_ids", "attention_mask"]
        assert metadata["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 3]}]
        preprocessing = metadata["preprocessing"]
        assert preprocessing["kind"] == "text" and preprocessing["max_length"] == 32
        assert "tokenizer.json" in preprocessing["tokenizer_files"]
        assert set(preprocessing["tokenizer_files"]) <= set(artifacts)
        lineage = metadata["lineage"]
        assert lineage["run_id"] == run.id and lineage["snapshot_id"] == snapshot["snapshot_id"]
        assert lineage["manifest"]["sha256"] == snapshot["manifest"]["sha256"]
        assert lineage["base_model"]["name"] == "all-minilm-l6-v2"
        assert lineage["code_version"].startswith("flywheel")
        assert metadata["hyperparameters"]["max_length"] == 32
        assert metadata["hyperparameters"]["warmup_ratio"] == 0.1  # defaults are filled in and recorded
        parity = metadata["export"]["parity"]
        assert parity["passed"] and parity["max_abs_diff"] <= 1e-4 and parity["items"] == 75

        # Quantization was tried and decided by the rule: kept only if macro-F1 fell by at most 0.01.
        quantization = metadata["export"]["quantization"]
        assert quantization["accepted"] == (quantization["macro_f1_drop"] <= 0.01)
        assert ("model.fp32.onnx" in artifacts) == quantization["accepted"]

        # The graph has dynamic batch and sequence axes and runs as inference will feed it.
        graph = onnx.load_from_string(blobs["model.onnx"])
        dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.graph.input}
        assert all(isinstance(axis, str) for axis in dims["input_ids"]), dims
        tokenizer = Tokenizer.from_str(blobs["tokenizer.json"].decode())
        session = ort.InferenceSession(blobs["model.onnx"], providers=["CPUExecutionProvider"])
        for texts in (["Return the HTTP status line."], ["Compute the inverse of a matrix.", "Open a cursor", "x"]):
            encoded = tokenizer.encode_batch([text.lower() for text in texts])
            width = max(len(e.ids) for e in encoded)
            ids = np.array([e.ids + [0] * (width - len(e.ids)) for e in encoded], dtype=np.int64)
            mask = np.array([[1] * len(e.ids) + [0] * (width - len(e.ids)) for e in encoded], dtype=np.int64)
            [logits] = session.run(["logits"], {"input_ids": ids, "attention_mask": mask})
            assert logits.shape == (len(texts), 3)

    # One log line per epoch, with the numbers an operator watches, bound to the request's trace.
    epochs = logs.find(event="run_epoch_finished", run_id=run.id)
    assert [line["epoch"] for line in epochs] == [1, 2, 3]
    assert all(line["trace_id"] == "trace-text-run" and line["tenant"] == "acme" for line in epochs)
    assert all(line["samples_per_second"] > 0 and "eta_seconds" in line and "loss" in line for line in epochs)

    # The run API shows the same story.
    body = api.client.get(f"/v1/runs/{run.id}", headers=INTERNAL).get_json()
    assert body["status"] == "succeeded"
    assert body["progress"]["epoch"] == 3 and body["progress"]["epochs"] == 3
    assert body["progress"]["samples_per_second"] > 0
    assert body["metrics"]["accuracy"] == metrics["accuracy"]
    assert body["artifacts"]["model.onnx"]["key"] == f"{prefix}/model.onnx"
