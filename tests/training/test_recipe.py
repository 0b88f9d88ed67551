"""The recipe's parts, without services: metrics, hyper-parameter defaults, the schedule, and resuming."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from marshmallow import ValidationError
from sklearn.metrics import accuracy_score, confusion_matrix, f1_score, precision_score, recall_score
from torch import nn
from torch.utils.data import TensorDataset

from services.training import gpu_check
from services.training.evaluate import classification_report, expected_calibration_error
from services.training.schemas import TASK_DEFAULTS, resolve_hyperparameters
from services.training.trainer import Recipe, Trainer, TrainerHooks, balanced_class_weights

pytestmark = pytest.mark.timeout(60)


def test_metrics_agree_with_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    labels = ["a", "b", "c", "d"]
    y_true = rng.integers(0, 3, 200)  # class "d" never occurs
    logits = rng.normal(size=(200, 4)) + np.eye(4)[y_true] * 1.5
    y_pred = logits.argmax(1)
    report = classification_report(logits, y_true, labels)
    assert report["accuracy"] == pytest.approx(accuracy_score(y_true, y_pred))
    assert report["macro_f1"] == pytest.approx(f1_score(y_true, y_pred, average="macro"))
    everything = list(range(4))
    precision = precision_score(y_true, y_pred, labels=everything, average=None, zero_division=0)
    recall = recall_score(y_true, y_pred, labels=everything, average=None, zero_division=0)
    for i, label in enumerate(labels):
        assert report["per_class"][label]["precision"] == pytest.approx(precision[i])
        assert report["per_class"][label]["recall"] == pytest.approx(recall[i])
    assert report["confusion_matrix"]["matrix"] == confusion_matrix(y_true, y_pred, labels=everything).tolist()
    assert report["per_class"]["d"]["support"] == 0
    json.dumps(report)  # stored with the run and sent in events: plain JSON


def test_macro_f1_leaves_out_a_class_nobody_saw_and_counts_one_only_predicted() -> None:
    labels = ["a", "b", "c", "d"]
    y_true = np.array([0, 0, 1, 1])
    perfect = classification_report(np.eye(4)[[0, 0, 1, 1]], y_true, labels)
    # "c" and "d" are neither true nor predicted: a perfect model scores 1, not the 0.5 of averaging them in.
    assert perfect["macro_f1"] == 1.0 and perfect["accuracy"] == 1.0
    assert perfect["per_class"]["c"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    # One item of "b" predicted as "c": "c" now counts, with F1 0, in the mean over a, b and c.
    wrong = classification_report(np.eye(4)[[0, 0, 1, 2]], y_true, labels)
    assert wrong["macro_f1"] == pytest.approx((1.0 + 2 / 3 + 0.0) / 3)
    assert wrong["confusion_matrix"]["matrix"] == [[2, 0, 0, 0], [0, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]]
    empty = classification_report(np.zeros((0, 4)), np.zeros(0, dtype=np.int64), labels)
    assert empty["macro_f1"] == 0.0 and empty["accuracy"] == 0.0 and empty["items"] == 0
    assert empty["confusion_matrix"]["matrix"] == [[0] * 4] * 4


def test_expected_calibration_error() -> None:
    # Always 90% confident, right 60% of the time: miscalibrated by 0.3.
    probabilities = np.tile([0.9, 0.1], (10, 1))
    y_true = np.array([0] * 6 + [1] * 4)
    assert expected_calibration_error(probabilities, y_true) == pytest.approx(0.3)
    assert expected_calibration_error(np.tile([1.0, 0.0], (4, 1)), np.zeros(4, dtype=int)) == pytest.approx(0.0)


def test_hyperparameters_fill_per_task_defaults_and_reject_what_does_not_apply() -> None:
    text = resolve_hyperparameters("text_classification", {"epochs": 2})
    assert text == {**TASK_DEFAULTS["text_classification"], "epochs": 2}
    image = resolve_hyperparameters("image_classification", None)
    assert image["image_size"] == 224 and "max_length" not in image
    with pytest.raises(ValidationError) as error:
        resolve_hyperparameters("image_classification", {"quantize": True, "batch_size": 0, "lr": 1})
    assert set(error.value.messages) == {"quantize", "batch_size", "lr"}


def test_class_weights_balance_the_classes() -> None:
    weights = balanced_class_weights([30, 10, 0])
    assert weights == pytest.approx([40 / 60, 40 / 20, 0.0])
    assert 30 * weights[0] == pytest.approx(10 * weights[1])


class Keep(TrainerHooks):
    def __init__(self) -> None:
        self.checkpoints: list[bytes] = []
        self.reports = []

    def on_epoch_end(self, report, checkpoint, best_state) -> None:
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        self.checkpoints.append(buffer.getvalue())
        self.reports.append(report)


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.2))
        self.head = nn.Linear(16, 3)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(features))


def collate(items):
    return {"features": torch.stack([x for x, _ in items]), "labels": torch.stack([y for _, y in items])}


def trainer(hooks: TrainerHooks, epochs: int = 4) -> Trainer:
    torch.manual_seed(1)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(120, 6, generator=generator)
    y = (x[:, 0] > 0).long() + (x[:, 1] > 1).long()
    recipe = Recipe(
        epochs=epochs,
        batch_size=16,
        learning_rate=1e-2,
        head_learning_rate=3e-2,
        weight_decay=0.01,
        warmup_ratio=0.25,
        max_grad_norm=1.0,
        early_stopping_patience=0,
        seed=3,
        class_weights=balanced_class_weights(torch.bincount(y[:90], minlength=3).tolist()),
    )
    return Trainer(Mlp(), TensorDataset(x[:90], y[:90]), TensorDataset(x[90:], y[90:]), collate, recipe, hooks=hooks)


def test_schedule_and_parameter_groups() -> None:
    t = trainer(TrainerHooks())
    warmup = int(t.total_steps * 0.25)
    factors = [t._lr_factor(step) for step in range(t.total_steps)]
    assert factors[0] == pytest.approx(1 / warmup) and factors[warmup - 1] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(factors[warmup:], factors[warmup + 1 :], strict=False))
    assert factors[-1] < 0.01
    groups = {(g["initial_lr"], g["weight_decay"]): len(g["params"]) for g in t.optimizer.param_groups}
    assert groups == {(1e-2, 0.0): 1, (1e-2, 0.01): 1, (3e-2, 0.0): 1, (3e-2, 0.01): 1}


def test_a_resumed_fit_ends_exactly_where_an_uninterrupted_one_does() -> None:
    straight = Keep()
    full = trainer(straight)
    result = full.fit()
    assert result.epochs_run == 4 and len(straight.reports) == 4
    assert straight.reports[-1].train_loss < straight.reports[0].train_loss

    # Resume from the checkpoint after epoch 2, read back as the pipeline reads it (weights_only).
    checkpoint = torch.load(io.BytesIO(straight.checkpoints[1]), weights_only=True)
    best = checkpoint["model"] if checkpoint["best_epoch"] == 2 else None
    resumed_hooks = Keep()
    resumed = trainer(resumed_hooks)
    resumed_result = resumed.fit(checkpoint, best)
    assert resumed_result.resumed_from_epoch == 2 and len(resumed_hooks.reports) == 2
    assert [r.train_loss for r in resumed_hooks.reports] == [r.train_loss for r in straight.reports[2:]]
    final_straight = torch.load(io.BytesIO(straight.checkpoints[-1]), weights_only=True)["model"]
    final_resumed = torch.load(io.BytesIO(resumed_hooks.checkpoints[-1]), weights_only=True)["model"]
    for name, tensor in final_straight.items():
        assert torch.equal(tensor, final_resumed[name]), name


def test_augmentation_applies_to_training_images_only() -> None:
    from PIL import Image

    from services.training.image_model import eval_transform, train_transform

    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (8, 8, 3), dtype=np.uint8))
    augmented = train_transform(16, augment=True, horizontal_flip=True)
    torch.manual_seed(0)
    views = [augmented(image) for _ in range(4)]
    assert all(view.shape == (3, 16, 16) for view in views)
    assert any(not torch.equal(views[0], view) for view in views[1:])
    plain = eval_transform(16)
    assert torch.equal(plain(image), plain(image))
    assert torch.equal(train_transform(16, augment=False, horizontal_flip=False)(image), plain(image))


def test_gpu_check_reports_the_machine(capsys) -> None:
    code = gpu_check.main()
    report = json.loads(capsys.readouterr().out)
    if torch.cuda.is_available():
        assert code == (0 if report["ok"] else 1)
    else:
        assert code == 0 and report == {
            "gpu": False,
            "message": "no GPU present: torch sees no CUDA device; nothing to check",
        }
