"""Nothing is published unless ONNX Runtime reproduces the torch model: logits within 1e-4, same argmax."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch import nn

from services.training.base_models import IMAGE_ARCHITECTURES, ImageArchitecture
from services.training.export import compare, export_onnx, onnx_logits, onnx_session, require_parity
from services.training.failures import ExportError
from services.training.image_model import INPUT_NAME, ImageClassifier
from services.training.spec import ExportSpec
from tests.training.support import all_runs, digit_items, published, request_training, wait_for_run, write_snapshot

pytestmark = pytest.mark.timeout(120)


class SmallCNN(nn.Module):
    def __init__(self, num_classes: int) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(8, num_classes)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(pixels))


class CentredLogits(SmallCNN):
    """A small CNN that centres its logits with a Python float. Tracing bakes the example batch's mean into
    the graph as a constant (the classic "converting a tensor to a Python float" export bug), so the exported
    graph drifts from the torch model on every other batch."""

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        logits = super().forward(pixels)
        return logits - float(logits.mean())


def image_spec(size: int) -> ExportSpec:
    return ExportSpec(
        input_names=[INPUT_NAME],
        inputs=[{"name": INPUT_NAME, "datatype": "FP32", "shape": [-1, 3, size, size]}],
        dynamic_axes={INPUT_NAME: {0: "batch"}, "logits": {0: "batch"}},
        preprocessing={},
    )


@pytest.mark.filterwarnings("ignore:Converting a tensor with requires_grad=True to a scalar")
def test_a_broken_export_fails_the_run_and_publishes_nothing(worker, monkeypatch) -> None:
    monkeypatch.setitem(IMAGE_ARCHITECTURES, "centred", ImageArchitecture("centred", CentredLogits, ("head.",)))
    labels = ["0", "1", "2"]
    with worker("training") as training:
        snapshot = write_snapshot(
            training.storage,
            tenant="acme",
            dataset_id="ds_digits",
            task_type="image_classification",
            labels=labels,
            items=digit_items(60, digits=(0, 1, 2)),
        )
        request_training(
            training,
            tenant="acme",
            dataset_id="ds_digits",
            snapshot=snapshot,
            task_type="image_classification",
            labels=labels,
            base_model="centred",
            hyperparameters={"epochs": 1, "image_size": 16, "batch_size": 4},
        )
        run = wait_for_run(training, status=("succeeded", "failed"), timeout=90)
        assert run.status == "failed"
        assert "does not reproduce the trained model" in run.failure_reason
        assert "largest logit difference" in run.failure_reason and "Nothing was published" in run.failure_reason
        [failed] = published(training, "training.failed", run.id)
        assert failed["payload"]["reason"] == run.failure_reason
        assert published(training, "training.completed") == []
        assert list(training.storage.list("models", f"acme/ds_digits/runs/{run.id}/")) == []
        assert [r.id for r in all_runs(training)] == [run.id]


def test_parity_holds_for_a_faithful_export_and_catches_a_corrupted_graph(tmp_path) -> None:
    torch.manual_seed(0)
    model = ImageClassifier(SmallCNN(4), freeze_backbone=False, head_prefixes=()).eval()
    batches = [{INPUT_NAME: torch.randn(n, 3, 32, 32)} for n in (8, 3, 1)]
    spec = image_spec(32)
    path = tmp_path / "model.onnx"
    export_onnx(model, batches[0], path, spec)
    with torch.inference_mode():
        reference = np.concatenate([model(**batch).numpy() for batch in batches])
    faithful = compare(reference, onnx_logits(onnx_session(path), batches, [INPUT_NAME]))
    assert faithful.passed and faithful.items == 12 and faithful.max_abs_diff <= 1e-4
    require_parity(faithful)

    graph = onnx.load(str(path))
    [bias] = [t for t in graph.graph.initializer if t.name.endswith("head.bias")]
    nudged = numpy_helper.to_array(bias) + np.float32(0.01)  # a bias shifted by 0.01: small, but not equal
    bias.CopyFrom(numpy_helper.from_array(nudged.astype(np.float32), bias.name))
    onnx.save(graph, str(tmp_path / "corrupt.onnx"))
    corrupt = compare(reference, onnx_logits(onnx_session(tmp_path / "corrupt.onnx"), batches, [INPUT_NAME]))
    assert not corrupt.passed and corrupt.max_abs_diff == pytest.approx(0.01, rel=1e-3)
    with pytest.raises(ExportError, match="does not reproduce"):
        require_parity(corrupt)
