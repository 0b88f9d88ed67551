"""Differential privacy as a training option: DP-SGD (Abadi et al., 2016) with opacus, on the classification head
and, with `trainable_layers`, the top layers of the encoder or backbone.

With `dp_epsilon` set, the encoder or backbone is frozen (`schemas.py` sees to it) except its top
`trainable_layers` transformer layers (text) or last stages (images, their BatchNorm layers kept frozen in eval
mode: `image_model.ImageClassifier` says why); the model names them (`trained_blocks`), and every step that trains
them and the head is private with respect to the train split:

- batches are drawn by Poisson sampling (opacus's `DPDataLoader`: each item joins each batch independently with
  probability q = 1 / steps per epoch), which is the sampling the accountant assumes;
- per-sample gradients come from opacus's `GradSampleModule` (hooks on the trainable layers: the head's linear
  layers, and the trained blocks' linear, LayerNorm and convolution layers; the frozen layers are not hooked and,
  frozen in eval mode, mix no statistics across the batch; a trainable BatchNorm is refused, `check_trainable`);
- `DPOptimizer` clips each item's gradient to `dp_max_grad_norm` (L2, over all trainable parameters together),
  sums them, adds Gaussian noise of standard deviation noise multiplier x clipping norm and divides by the expected
  batch;
- the noise multiplier is the smallest one for which the RDP accountant, over all the run's planned steps, stays
  within (`dp_epsilon`, `dp_delta`) (`opacus.accountants.utils.get_noise_multiplier`, tolerance 0.01): it does not
  depend on how many layers train, only the signal per coordinate does (the same clipping norm is spread over more
  parameters);
- the epsilon spent is the accountant's over the steps actually taken (early stopping takes fewer), recorded on
  the run and in the model's metadata (`privacy_record`), with what was trained (`trained`, `trained_modules`).

The validation split picks the epoch kept and stops the run early: it is not the train split, so that costs the
train split no privacy (choosing among private iterates is post-processing), but the validation items themselves
are not protected. The test split is never seen by training.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

ACCOUNTANT = "rdp"
EPSILON_TOLERANCE = 0.01
MAX_DEFAULT_DELTA = 1e-5
ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + list(range(64, 1025, 8))
"""RDP orders: opacus's defaults plus higher ones, which large budgets over few steps need for a tight bound."""


def default_delta(train_items: int) -> float:
    """1 / n^1.1 (below 1/n, as a meaningful delta must be), and at most 1e-5."""
    return min(MAX_DEFAULT_DELTA, float(max(1, train_items)) ** -1.1)


@dataclass(frozen=True)
class TrainedPart:
    """What a private run trains: the head, and the blocks of the body its model names (`trained_blocks`)."""

    head: tuple[str, ...] = ("head",)
    blocks: tuple[str, ...] = ()
    description: str = ""
    parameters: int = 0

    @property
    def summary(self) -> str:
        return f"head + {self.description}" if self.blocks else "head"


@dataclass(frozen=True)
class PrivacyBudget:
    epsilon: float
    delta: float | None
    """None: `default_delta` of the train split's size."""
    max_grad_norm: float

    @classmethod
    def from_hyperparameters(cls, hp: dict[str, Any]) -> PrivacyBudget | None:
        if hp.get("dp_epsilon") is None:
            return None
        return cls(epsilon=hp["dp_epsilon"], delta=hp.get("dp_delta"), max_grad_norm=hp.get("dp_max_grad_norm", 1.0))


class PrivateSGD:
    """DP-SGD for one training run: the noise for its budget, and opacus's wrappers of its model, optimizer and
    train loader."""

    def __init__(
        self,
        budget: PrivacyBudget,
        *,
        train_items: int,
        steps_per_epoch: int,
        epochs: int,
        trained: TrainedPart | None = None,
    ) -> None:
        self.budget = budget
        self.trained = trained or TrainedPart()
        self.train_items = train_items
        self.steps_per_epoch = steps_per_epoch
        self.sample_rate = 1.0 / steps_per_epoch
        self.expected_batch_size = max(1, round(train_items * self.sample_rate))
        self.delta = budget.delta if budget.delta is not None else default_delta(train_items)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # "optimal order is the largest alpha": ALPHAS go far
            from opacus.accountants.utils import get_noise_multiplier

            self.noise_multiplier = float(
                get_noise_multiplier(
                    target_epsilon=budget.epsilon,
                    target_delta=self.delta,
                    sample_rate=self.sample_rate,
                    steps=steps_per_epoch * epochs,
                    accountant=ACCOUNTANT,
                    epsilon_tolerance=EPSILON_TOLERANCE,
                    alphas=ALPHAS,
                )
            )

    @staticmethod
    def check_trainable(model: nn.Module, head_prefixes: tuple[str, ...], distributed: bool) -> TrainedPart:
        """DP-SGD here trains, on one process, the head and the blocks the model names in `trained_blocks` (the text
        and image classifiers set them from `trainable_layers`), never a BatchNorm layer."""
        if distributed:
            raise ValueError("differential privacy trains on one process; launch the run on the queue")
        blocks = tuple(getattr(model, "trained_blocks", ()))
        allowed = head_prefixes + tuple(f"{block}." for block in blocks)
        trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
        body = [name for name, _ in trainable if not name.startswith(allowed)]
        if body:
            raise ValueError(f"differential privacy trains the head and the named blocks only; {body[0]} is trainable")
        for name, module in model.named_modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm) and any(
                p.requires_grad for p in module.parameters()
            ):
                raise ValueError(f"DP-SGD cannot train BatchNorm ({name}): it mixes statistics across the batch")
        description = getattr(model, "trained_description", "") if blocks else ""
        return TrainedPart(
            head=tuple(prefix.rstrip(".") for prefix in head_prefixes),
            blocks=blocks,
            description=description,
            parameters=sum(p.numel() for _, p in trainable),
        )

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """Per-sample gradients on every trainable layer (the head's and the trained blocks'); `strict=False` because
        the frozen body may hold buffers (BatchNorm statistics in eval mode), which opacus's strict check refuses
        even when frozen (`check_trainable` has refused a trainable BatchNorm)."""
        from opacus import GradSampleModule

        # The lowest trained block's input needs no gradient (the frozen layers below it made it): torch says its
        # backward hooks then see the outputs' gradients only, which is all opacus's per-sample gradients need.
        warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
        for module in model.modules():
            # An in-place activation on a hooked layer's output (MobileNet's Hardswish after its first classifier
            # layer) breaks the backward hooks; out of place, it computes the same values.
            if getattr(module, "inplace", False) is True:
                module.inplace = False
        return GradSampleModule(model, batch_first=True, loss_reduction="mean", strict=False)

    def wrap_optimizer(self, optimizer: torch.optim.Optimizer) -> torch.optim.Optimizer:
        from opacus.optimizers import DPOptimizer

        return DPOptimizer(
            optimizer,
            noise_multiplier=self.noise_multiplier,
            max_grad_norm=self.budget.max_grad_norm,
            expected_batch_size=self.expected_batch_size,
            loss_reduction="mean",
        )

    def wrap_loader(self, loader: DataLoader, generator: torch.Generator) -> DataLoader:
        """Poisson sampling with the trainer's generator (seeded per epoch: a seed gives the same batches)."""
        from opacus.data_loader import DPDataLoader

        return DPDataLoader.from_data_loader(loader, generator=generator)

    def epsilon_spent(self, steps: int) -> float:
        if steps <= 0:
            return 0.0
        from opacus.accountants import RDPAccountant

        accountant = RDPAccountant()
        accountant.history = [(self.noise_multiplier, self.sample_rate, steps)]
        return float(accountant.get_epsilon(delta=self.delta, alphas=ALPHAS))

    def record(self, epochs_run: int) -> dict[str, Any]:
        """What the run records (`metadata.training.privacy`, the run's `metrics.privacy`)."""
        steps = epochs_run * self.steps_per_epoch
        return {
            "mechanism": "dp-sgd",
            "library": "opacus",
            "accountant": ACCOUNTANT,
            "target_epsilon": self.budget.epsilon,
            "epsilon": round(self.epsilon_spent(steps), 6),
            "delta": self.delta,
            "delta_source": "given" if self.budget.delta is not None else "default",
            "noise_multiplier": round(self.noise_multiplier, 6),
            "max_grad_norm": self.budget.max_grad_norm,
            "sampling": "poisson",
            "sample_rate": round(self.sample_rate, 6),
            "expected_batch_size": self.expected_batch_size,
            "steps": steps,
            "train_items": self.train_items,
            "trained": self.trained.summary,
            "trained_modules": [*self.trained.blocks, *self.trained.head],
            "trainable_parameters": self.trained.parameters,
        }
