"""Early stopping really stops: with patience, a validation curve that turns ends training before its last epoch,
and the model keeps the weights of the epoch it chose.

The model is a single threshold `t`: it predicts class 1 for an input x > t. Every train item pulls `t` down, and
AdamW moves it by about the learning rate each step, so `t` sweeps down across the validation inputs: first past
class-1 items (validation improves), then past class-0 items (it gets worse). A real training run, whose
validation curve is known in advance.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset

from services.training.trainer import Recipe, Trainer

pytestmark = pytest.mark.timeout(60)

START = 10.0
# Validation: class 1 at 9, 7 and 5 is won as t passes them; class 0 at 3 and 2 is lost after; -20 is always right.
VALIDATION = [(9.0, 1), (7.0, 1), (5.0, 1), (3.0, 0), (2.0, 0), (-20.0, 0)]
TRAIN = [(0.0, 1)] * 4 + [(-30.0, 0)] * 4


class Threshold(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.threshold = nn.Parameter(torch.tensor(START))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([torch.zeros_like(x), x - self.threshold], dim=1)


class Points(Dataset):
    def __init__(self, points: list[tuple[float, int]]) -> None:
        self.points = points

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, index: int) -> tuple[float, int]:
        return self.points[index]


def collate(items: list[tuple[float, int]]) -> dict[str, torch.Tensor]:
    return {
        "x": torch.tensor([x for x, _ in items], dtype=torch.float32),
        "labels": torch.tensor([label for _, label in items], dtype=torch.long),
    }


def recipe(patience: int, epochs: int = 12) -> Recipe:
    return Recipe(
        epochs=epochs,
        batch_size=len(TRAIN),  # one step per epoch: t moves about one learning rate per epoch
        learning_rate=1.6,
        head_learning_rate=1.6,
        weight_decay=0.0,
        warmup_ratio=0.0,
        max_grad_norm=100.0,
        early_stopping_patience=patience,
        seed=0,
        num_workers=0,
    )


def fit(patience: int) -> tuple[Trainer, object]:
    model = Threshold()
    trainer = Trainer(model, Points(TRAIN), Points(VALIDATION), collate, recipe(patience), device=torch.device("cpu"))
    return trainer, trainer.fit()


def test_a_validation_curve_that_turns_stops_training_at_patience_and_keeps_the_best_epoch() -> None:
    trainer, result = fit(patience=2)
    scores = [epoch["macro_f1"] for epoch in result.history]
    best = scores.index(max(scores))
    # The curve turned: it rose to its best epoch, then fell for `patience` epochs, and training stopped there.
    assert 0 < best < len(scores) - 1, scores
    assert scores[best + 1] < scores[best], scores
    assert result.stopped_early and result.epochs_run == best + 1 + 2 < recipe(2).epochs, scores
    assert len(result.history) == result.epochs_run
    assert result.best_epoch == best + 1 == result.history[best]["epoch"]
    assert result.best_macro_f1 == max(scores)
    assert [epoch["improved"] for epoch in result.history][best + 1 :] == [False, False]
    # The model that comes out is the chosen epoch's, not the last one's.
    threshold = trainer.core.threshold.item()
    assert 3.0 < threshold < 5.0, threshold  # past the class-1 items at 5, 7, 9; not yet past class 0 at 3


def test_without_patience_the_same_curve_runs_every_epoch() -> None:
    _, result = fit(patience=0)
    assert not result.stopped_early and result.epochs_run == recipe(0).epochs
    scores = [epoch["macro_f1"] for epoch in result.history]
    assert max(scores) > scores[-1], "the curve turns: only early stopping ends on its best"
