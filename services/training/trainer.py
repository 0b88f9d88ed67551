"""The training recipe: AdamW, linear warm-up then cosine decay, gradient clipping, class-weighted loss with
optional label smoothing, optional adversarial training on the embeddings (FGM), layer-wise learning rates,
early stopping on validation macro-F1 (or the task's own score: entity F1 for token classification), fixed
seeds; CUDA with bf16 autocast and pinned-memory loaders on a GPU;
optionally differential privacy (DP-SGD on the head and any top layers the model trains, `privacy.py`).

`Trainer` knows nothing of runs, storage or events: it trains a model whose `forward` takes the batch's
tensors by name (`input_ids`/`attention_mask`, or `pixels`) and returns logits, and tells its hooks what
happened (each step, each epoch, with a checkpoint to keep). The pipeline turns those calls into progress
records, checkpoints in object storage and log lines; the benchmark runs it with no hooks at all.
"""

from __future__ import annotations

import contextlib
import math
import os
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler

from services.training.evaluate import macro_f1
from services.training.failures import RunInterrupted
from services.training.privacy import PrivacyBudget, PrivateSGD
from services.training.world import World

PROGRESS_EVERY_STEPS = 10


@dataclass(frozen=True)
class Recipe:
    epochs: int
    batch_size: int
    learning_rate: float
    head_learning_rate: float
    weight_decay: float
    warmup_ratio: float
    max_grad_norm: float
    early_stopping_patience: int
    seed: int
    class_weights: list[float] | None = None
    num_workers: int | None = None
    label_smoothing: float = 0.0
    adversarial: str = "none"
    """"fgm": after each backward pass, perturb the embeddings along their gradient and add that loss too."""
    adversarial_epsilon: float = 1.0
    privacy: PrivacyBudget | None = None
    """DP-SGD's budget, or None: per-sample clipping and noise replace the global gradient clipping."""

    @classmethod
    def from_hyperparameters(cls, hp: dict[str, Any], train_label_counts: list[int] | None = None) -> Recipe:
        weights = (
            balanced_class_weights(train_label_counts) if hp["class_weighted_loss"] and train_label_counts else None
        )
        return cls(
            epochs=hp["epochs"],
            batch_size=hp["batch_size"],
            learning_rate=hp["learning_rate"],
            head_learning_rate=hp["head_learning_rate"],
            weight_decay=hp["weight_decay"],
            warmup_ratio=hp["warmup_ratio"],
            max_grad_norm=hp["max_grad_norm"],
            early_stopping_patience=hp["early_stopping_patience"],
            seed=hp["seed"],
            class_weights=weights,
            num_workers=hp["num_workers"],
            label_smoothing=hp.get("label_smoothing", 0.0),
            adversarial=hp.get("adversarial", "none"),
            adversarial_epsilon=hp.get("adversarial_epsilon", 1.0),
            privacy=PrivacyBudget.from_hyperparameters(hp),
        )


def balanced_class_weights(counts: list[int]) -> list[float]:
    """n / (k * n_c) per class (scikit-learn's "balanced"); a class without train items weighs 0."""
    total = sum(counts)
    present = sum(1 for c in counts if c > 0)
    return [total / (present * c) if c > 0 else 0.0 for c in counts]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


@dataclass
class EpochReport:
    epoch: int
    epochs: int
    train_loss: float
    val_loss: float
    accuracy: float
    macro_f1: float
    samples_per_second: float
    train_seconds: float
    epoch_seconds: float
    eta_seconds: float
    learning_rate: float
    improved: bool
    finished: bool
    best_macro_f1: float
    best_epoch: int
    selection_score: float | None = None
    """The task's own validation score (token classification: entity F1), which then selects the epoch and stops
    early in macro-F1's place; None: macro-F1 selects. `best_macro_f1` is the best selecting score either way."""

    def as_dict(self) -> dict[str, Any]:
        return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in asdict(self).items()}


class TrainerHooks:
    """What the trainer tells the outside world. The defaults do nothing."""

    def interruption(self) -> RunInterrupted | None:
        """An exception to stop training with (cancelled, lease lost), checked before every step."""
        return None

    def on_step(self, step: int, steps: int, loss: float, samples_per_second: float) -> None:
        """Every few steps, with the running mean loss of the epoch."""

    def on_epoch_end(self, report: EpochReport, checkpoint: dict[str, Any], best_state: dict | None) -> None:
        """After each epoch (rank 0 only): the checkpoint to keep, and the weights of the best epoch so far."""


@dataclass
class FitResult:
    history: list[dict[str, Any]]
    best_epoch: int
    best_macro_f1: float
    epochs_run: int
    stopped_early: bool
    resumed_from_epoch: int | None
    samples_per_second: float
    privacy: dict[str, Any] | None = None
    """With DP-SGD, its record (`PrivateSGD.record`): the epsilon spent over the steps taken, and how."""


@dataclass
class _Progress:
    epoch: int = 0
    best_macro_f1: float = -1.0
    best_epoch: int = 0
    bad_epochs: int = 0
    finished: bool = False
    history: list[dict[str, Any]] = field(default_factory=list)


class Trainer:
    def __init__(
        self,
        model: nn.Module,
        train_set: Dataset,
        val_set: Dataset,
        collate: Callable[[list[Any]], dict[str, torch.Tensor]],
        recipe: Recipe,
        *,
        device: torch.device | None = None,
        world: World | None = None,
        hooks: TrainerHooks | None = None,
        eval_collate: Callable[[list[Any]], dict[str, torch.Tensor]] | None = None,
        head_prefixes: tuple[str, ...] = ("head.",),
        lr_scale: Callable[[str], float] | None = None,
        embedding_parameter: str | None = None,
        selection_score: Callable[[np.ndarray, np.ndarray], float] | None = None,
    ) -> None:
        self.head_prefixes = head_prefixes
        self.selection_score = selection_score
        """Scores the validation split from its logits and labels, in the loader's order (see EpochReport)."""
        self.lr_scale = lr_scale or (lambda _name: 1.0)
        self.world = world or World()
        self.device = device or self.world.device()
        self.recipe = recipe
        self.hooks = hooks or TrainerHooks()
        self.core = model.to(self.device)
        self.model = self.world.wrap(self.core, self.device)
        cuda = self.device.type == "cuda"
        workers = recipe.num_workers if recipe.num_workers is not None else (min(4, os.cpu_count() or 1) if cuda else 0)
        self.generator = torch.Generator()
        if self.world.distributed:
            self.sampler: Any = DistributedSampler(
                train_set, num_replicas=self.world.world_size, rank=self.world.rank, shuffle=True, seed=recipe.seed
            )
        else:
            self.sampler = RandomSampler(train_set, generator=self.generator)
        shard = len(self.sampler)
        # BatchNorm cannot train on a batch of one: drop a last batch of exactly one item.
        self.train_loader = DataLoader(
            train_set,
            batch_size=recipe.batch_size,
            sampler=self.sampler,
            collate_fn=collate,
            num_workers=workers,
            pin_memory=cuda,
            drop_last=shard % recipe.batch_size == 1 and shard > 1,
            persistent_workers=workers > 0,
        )
        self.val_loader = DataLoader(
            val_set,
            batch_size=recipe.batch_size,
            sampler=SequentialSampler(val_set),
            collate_fn=eval_collate or collate,
            num_workers=workers,
            pin_memory=cuda,
        )
        self.steps_per_epoch = len(self.train_loader)
        self.total_steps = self.steps_per_epoch * recipe.epochs
        self.privacy = self._private_sgd(len(train_set))
        weights = torch.tensor(recipe.class_weights, dtype=torch.float32) if recipe.class_weights else None
        self.criterion = nn.CrossEntropyLoss(
            weight=weights.to(self.device) if weights is not None else None, label_smoothing=recipe.label_smoothing
        )
        self.adversary = (
            FGM(self.core, embedding_parameter, recipe.adversarial_epsilon) if recipe.adversarial == "fgm" else None
        )
        self.optimizer = torch.optim.AdamW(self._param_groups(), fused=cuda)
        if self.privacy is not None:
            self.optimizer = self.privacy.wrap_optimizer(self.optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, self._lr_factor)
        self.progress = _Progress()
        self.best_state: dict[str, torch.Tensor] | None = None

    # -- setup ------------------------------------------------------------------------------------------

    def _private_sgd(self, train_items: int) -> PrivateSGD | None:
        """With a privacy budget: Poisson-sampled batches and per-sample gradients (the optimizer is wrapped once
        it exists). The number of steps per epoch stays the one of the plain loader."""
        if self.recipe.privacy is None:
            return None
        trained = PrivateSGD.check_trainable(self.core, self.head_prefixes, self.world.distributed)
        privacy = PrivateSGD(
            self.recipe.privacy,
            train_items=train_items,
            steps_per_epoch=self.steps_per_epoch,
            epochs=self.recipe.epochs,
            trained=trained,
        )
        self.train_loader = privacy.wrap_loader(self.train_loader, self.generator)
        self.model = privacy.wrap_model(self.core)
        return privacy

    def _param_groups(self) -> list[dict[str, Any]]:
        """Head vs body learning rates, the body's scaled per layer (`lr_scale`, layer-wise decay); no weight decay
        on biases and normalisation weights."""
        groups: dict[tuple[bool, bool, float], list[nn.Parameter]] = {}
        for name, param in self.core.named_parameters():
            if param.requires_grad:
                is_head = name.startswith(self.head_prefixes)
                scale = 1.0 if is_head else float(self.lr_scale(name))
                groups.setdefault((is_head, param.ndim > 1, scale), []).append(param)
        recipe = self.recipe
        return [
            {
                "params": params,
                "lr": recipe.head_learning_rate if is_head else recipe.learning_rate * scale,
                "weight_decay": recipe.weight_decay if decays else 0.0,
            }
            for (is_head, decays, scale), params in sorted(groups.items())
        ]

    def _lr_factor(self, step: int) -> float:
        warmup = int(self.total_steps * self.recipe.warmup_ratio)
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, self.total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    # -- the loop ---------------------------------------------------------------------------------------

    def fit(self, resume: dict[str, Any] | None = None, resume_best: dict[str, Any] | None = None) -> FitResult:
        seed_everything(self.recipe.seed)
        resumed_from = None
        if resume is not None:
            self._restore(resume, resume_best)
            resumed_from = self.progress.epoch
        speeds = []
        while not self.progress.finished and self.progress.epoch < self.recipe.epochs:
            report = self._epoch(self.progress.epoch)
            if report is not None:
                speeds.append(report.samples_per_second)
        if self.best_state is not None:
            load_trainable_state(self.core, self.best_state)
        return FitResult(
            history=list(self.progress.history),
            best_epoch=self.progress.best_epoch,
            best_macro_f1=self.progress.best_macro_f1,
            epochs_run=self.progress.epoch,
            stopped_early=self.progress.epoch < self.recipe.epochs,
            resumed_from_epoch=resumed_from,
            samples_per_second=float(np.mean(speeds)) if speeds else 0.0,
            privacy=self.privacy.record(self.progress.epoch) if self.privacy is not None else None,
        )

    def _epoch(self, epoch: int) -> EpochReport | None:
        started = time.perf_counter()
        # Seeding per epoch makes a resumed run see the same order and augmentations it would have seen.
        torch.manual_seed(self.recipe.seed + epoch)
        self.generator.manual_seed(self.recipe.seed + epoch)
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)
        self.model.train()
        loss_sum = torch.zeros((), device=self.device)
        samples = 0
        for step, batch in enumerate(self.train_loader, start=1):
            self._check_interruption()
            labels = batch.pop("labels").to(self.device, non_blocking=True)
            inputs = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
            loss = self._loss(inputs, labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.adversary is not None:
                self.adversary.attack()
                self._loss(inputs, labels).backward()  # the adversarial loss's gradients add to the clean ones
                self.adversary.restore()
            if self.privacy is None:  # DP-SGD's optimizer clips each item's gradient itself
                nn.utils.clip_grad_norm_(self.core.parameters(), self.recipe.max_grad_norm)
            self.optimizer.step()
            self.scheduler.step()
            loss_sum += loss.detach()
            samples += len(labels)
            if step % PROGRESS_EVERY_STEPS == 0 or step == self.steps_per_epoch:
                elapsed = time.perf_counter() - started
                self.hooks.on_step(
                    step, self.steps_per_epoch, loss_sum.item() / step, samples * self.world.world_size / elapsed
                )
        train_seconds = time.perf_counter() - started
        train_loss = loss_sum.item() / max(1, self.steps_per_epoch)
        speed = samples * self.world.world_size / train_seconds if train_seconds > 0 else 0.0
        report = self._evaluate_epoch(epoch, train_loss, speed, train_seconds, started) if self.world.is_main else None
        improved, finished = self.world.broadcast((report.improved, report.finished) if report else None)
        progress = self.progress
        progress.epoch = epoch + 1
        progress.finished = finished
        progress.bad_epochs = 0 if improved else progress.bad_epochs + 1
        if report is not None:
            progress.history.append(report.as_dict())
            if improved:
                progress.best_macro_f1 = report.macro_f1 if report.selection_score is None else report.selection_score
                progress.best_epoch = report.epoch
                self.best_state = trainable_state(self.core)
            self.hooks.on_epoch_end(report, self.checkpoint(), self.best_state)
        return report

    def _evaluate_epoch(
        self, epoch: int, train_loss: float, speed: float, train_seconds: float, started: float
    ) -> EpochReport:
        progress = self.progress
        logits, labels = predict(self.core, self.val_loader, self.device)
        val_loss = float(nn.functional.cross_entropy(torch.from_numpy(logits), torch.from_numpy(labels)))
        argmax_f1 = macro_f1(labels, logits.argmax(1))
        selection = self.selection_score(logits, labels) if self.selection_score is not None else None
        score = argmax_f1 if selection is None else selection
        improved = score > progress.best_macro_f1 + 1e-6
        bad_epochs = 0 if improved else progress.bad_epochs + 1
        patience = self.recipe.early_stopping_patience
        finished = epoch + 1 >= self.recipe.epochs or (patience > 0 and bad_epochs >= patience)
        epoch_seconds = time.perf_counter() - started
        seconds = [h["epoch_seconds"] for h in progress.history] + [epoch_seconds]
        return EpochReport(
            epoch=epoch + 1,
            epochs=self.recipe.epochs,
            train_loss=train_loss,
            val_loss=val_loss,
            accuracy=float((logits.argmax(1) == labels).mean()),
            macro_f1=argmax_f1,
            samples_per_second=speed,
            train_seconds=train_seconds,
            epoch_seconds=epoch_seconds,
            eta_seconds=0.0 if finished else float(np.mean(seconds)) * (self.recipe.epochs - epoch - 1),
            learning_rate=self.scheduler.get_last_lr()[-1],
            improved=improved,
            finished=finished,
            best_macro_f1=max(score, progress.best_macro_f1),
            best_epoch=epoch + 1 if improved else progress.best_epoch,
            selection_score=selection,
        )

    def _loss(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        with _autocast(self.device):
            logits = self.model(**inputs)
        return self.criterion(logits.float(), labels)

    def _check_interruption(self) -> None:
        interruption = self.hooks.interruption() if self.world.is_main else None
        if self.world.any(interruption is not None, self.device):
            raise interruption or RunInterrupted("rank 0 stopped the run")

    # -- checkpoints ------------------------------------------------------------------------------------

    def checkpoint(self) -> dict[str, Any]:
        """Everything needed to continue after the last finished epoch (frozen weights are not repeated)."""
        progress = self.progress
        return {
            "format": 1,
            "epoch": progress.epoch,
            "finished": progress.finished,
            "best_macro_f1": progress.best_macro_f1,
            "best_epoch": progress.best_epoch,
            "bad_epochs": progress.bad_epochs,
            "history": progress.history,
            "model": trainable_state(self.core),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
        }

    def _restore(self, checkpoint: dict[str, Any], best: dict[str, Any] | None) -> None:
        load_trainable_state(self.core, checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        self.progress = _Progress(
            epoch=checkpoint["epoch"],
            best_macro_f1=checkpoint["best_macro_f1"],
            best_epoch=checkpoint["best_epoch"],
            bad_epochs=checkpoint["bad_epochs"],
            finished=checkpoint["finished"],
            history=list(checkpoint["history"]),
        )
        self.best_state = best


class FGM:
    """Fast Gradient Method (Miyato et al., 2017) on the input embeddings: after the clean backward pass, move the
    embedding matrix by `epsilon` along its gradient, normalised (`attack`), so a second pass sees the inputs
    perturbed in the direction that hurts most; `restore` puts the weights back before the optimizer steps."""

    def __init__(self, model: nn.Module, parameter: str | None, epsilon: float) -> None:
        named = dict(model.named_parameters())
        if parameter is None or parameter not in named:
            raise ValueError(f"adversarial training needs the model's embedding parameter; {parameter!r} is not one")
        self.parameter = named[parameter]
        self.epsilon = epsilon
        self.backup: torch.Tensor | None = None

    @torch.no_grad()
    def attack(self) -> None:
        grad = self.parameter.grad
        if grad is None:
            return
        norm = torch.linalg.vector_norm(grad)
        if norm == 0 or not torch.isfinite(norm):
            return
        self.backup = self.parameter.detach().clone()
        self.parameter.add_(grad, alpha=float(self.epsilon / norm))

    @torch.no_grad()
    def restore(self) -> None:
        if self.backup is not None:
            self.parameter.copy_(self.backup)
            self.backup = None


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters that train, plus buffers (BatchNorm statistics), copied to the CPU."""
    trainable = {name for name, param in model.named_parameters() if param.requires_grad}
    buffers = {name for name, _ in model.named_buffers()}
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items() if k in trainable | buffers}


def load_trainable_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    result = model.load_state_dict(state, strict=False)
    frozen = {name for name, param in model.named_parameters() if not param.requires_grad}
    missing = [k for k in result.missing_keys if k not in frozen]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"checkpoint does not fit the model: missing {missing[:3]}, unexpected {result.unexpected_keys[:3]}"
        )


def predict(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    """Logits (fp32) and labels of every item the loader yields, in order."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    with torch.inference_mode(), _autocast(device):
        for batch in loader:
            labels.append(batch.pop("labels").numpy())
            inputs = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
            logits.append(model(**inputs).float().cpu().numpy())
    model.train(was_training)
    if not logits:
        return np.zeros((0, 0), dtype=np.float32), np.zeros((0,), dtype=np.int64)
    return np.concatenate(logits), np.concatenate(labels)


def _autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
