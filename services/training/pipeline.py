"""One execution of a run: lease → (recipe search) → snapshot → model → train (resuming from a checkpoint) →
export → evaluate → publish.

A run with a `search` first settles its recipe (`search.py`: optuna trials on the training workers, on the
train and validation splits only); the winner's hyper-parameters are then trained like any other run's.
Training fits the snapshot's train split and selects its epoch on validation; the exported, verified graph is
then scored on the test split beside the version in production and a majority baseline (`comparison.py`), and
`evaluation.json` is published with the model folder for the registry's gate. A token_classification run reads
its spans, exports and evaluates by its own steps (`token_runs.py`: entity F1 selects its epoch and is its
metric; its classical baseline is the CoNLL-2003 dictionary), and shares the rest.

`execute_run` is the single entry point, called by the worker's `training.run` task and by every rank of a
torchrun job (`services.training.distributed`). Whatever happens, the run ends in exactly one recorded
outcome: succeeded with `training.completed`; failed or cancelled with `training.failed` and a reason (its
`outcome` says which); or, for a transient storage error, released for another attempt that resumes from the
last checkpoint.
"""

from __future__ import annotations

import contextlib
import enum
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.exc import OperationalError
from torch.utils.data import DataLoader

from services.training import runs, search
from services.training.baselines import CLASSICAL
from services.training.checkpoints import CheckpointStore
from services.training.comparison import EVALUATION_FILE, evaluate_on_test_split, report_bytes
from services.training.data import load_snapshot
from services.training.export import ModelPackage, build_package
from services.training.failures import LeaseLost, RunCancelled, RunInterrupted, TrainingFailure
from services.training.models import CANCELLED, SUCCEEDED
from services.training.preparation import prepare_task
from services.training.runs import Heartbeat, LiveProgress, RunInfo
from services.training.token_runs import TASK_TYPE as TOKEN_TASK
from services.training.token_runs import evaluate_token_test_split, export_token_package, load_token_snapshot
from services.training.trainer import EpochReport, FitResult, Recipe, Trainer, TrainerHooks, seed_everything
from services.training.world import World
from shared.artifacts import MODELS_BUCKET, model_run_prefix
from shared.db import DatabaseUnavailable
from shared.logging import get_logger, log_context
from shared.runtime import Runtime
from shared.storage import ChecksumMismatch, ObjectNotFound, StorageError

log = get_logger(__name__)

MAX_ATTEMPTS = 5
"""Executions of one run (worker deaths and transient storage errors included) before it is failed."""


@dataclass
class Published:
    """What a run publishes: the model folder's files, the evaluation report, and the metrics in both."""

    package: ModelPackage
    artifacts: dict[str, dict[str, Any]]
    evaluation: dict[str, Any]
    """The ObjectRef of evaluation.json."""
    metrics: dict[str, Any]
    """Validation metrics (as exported), plus `test` (the candidate on the test split), `best_epoch`, `baseline`
    (the classical baseline on the test split) and `baseline_lift` (the candidate's test macro-F1, or entity F1 for a
    token run, minus its)."""


class Outcome(enum.Enum):
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"
    HELD = "held"  # another live execution holds the run: try again later
    RETRY = "retry"  # a transient error: released, try again later
    STOPPED = "stopped"  # the run is finished, gone, or was taken over: nothing to do


def execute_run(runtime: Runtime, run_id: str, *, world: World | None = None) -> Outcome:
    world = world or World()
    owner = runs.new_lease_owner()
    claim = runs.claim(runtime, run_id, owner, world_size=world.world_size) if world.is_main else None
    claim = world.broadcast(claim)
    if claim.outcome != "acquired":
        log.info("run_not_started", run_id=run_id, outcome=claim.outcome)
        return {"held": Outcome.HELD, "cancelled": Outcome.CANCELLED}.get(claim.outcome, Outcome.STOPPED)
    run = claim.run
    with log_context(service="training", run_id=run.id, tenant=run.tenant, trace_id=run.trace_id):
        if run.attempts > MAX_ATTEMPTS and world.is_main:
            runs.fail(runtime, run.id, owner, f"gave up after {MAX_ATTEMPTS} attempts; see the logs of run {run.id}")
            runs.forget_owner(owner)
            return Outcome.FAILED
        log.info("run_started", attempt=run.attempts, world_size=world.world_size, rank=world.rank)
        try:
            return _execute(runtime, run, owner, world)
        finally:
            runs.forget_owner(owner)


def _execute(runtime: Runtime, run: RunInfo, owner: str, world: World) -> Outcome:
    progress = LiveProgress()
    heartbeat = Heartbeat(runtime, run.id, owner, progress) if world.is_main else None
    checkpoints = CheckpointStore(runtime.storage, run.tenant, run.id)
    try:
        with heartbeat or contextlib.nullcontext():
            if run.search is not None and world.is_main:  # a search runs on the queue's workers only
                run = search.settle(runtime, run, owner, lambda: _interruption(run.id, heartbeat))
            published = _train_and_export(runtime, run, owner, world, progress, heartbeat, checkpoints)
        if published is None:
            return Outcome.SUCCEEDED
        payload = {
            "run_id": run.id,
            "dataset_id": run.dataset_id,
            "snapshot_id": run.snapshot_id,
            "model_name": run.model_name,
            "artifacts": published.artifacts,
            "metrics": published.metrics,
            "metadata": published.package.metadata,
            "evaluation": published.evaluation,
        }
        ended = runs.complete(runtime, run.id, owner, payload=payload, metrics=published.metrics)
        if ended:
            checkpoints.delete()
        if ended == SUCCEEDED and run.task_type == TOKEN_TASK:
            metrics = published.metrics
            log.info(
                "run_published",
                model_name=run.model_name,
                entity_f1=round(metrics["entity_f1"], 4),
                test_entity_f1=round(metrics["test"]["entity_f1"], 4),
                test_items=metrics["test"]["items"],
                best_epoch=metrics["best_epoch"],
                baseline_lift=round(metrics["baseline_lift"], 4),
                files=sorted(published.artifacts),
            )
            return Outcome.SUCCEEDED
        if ended == SUCCEEDED:
            metrics = published.metrics
            log.info(
                "run_published",
                model_name=run.model_name,
                accuracy=round(metrics["accuracy"], 4),
                macro_f1=round(metrics["macro_f1"], 4),
                test_accuracy=round(metrics["test"]["accuracy"], 4),
                test_macro_f1=round(metrics["test"]["macro_f1"], 4),
                test_items=metrics["test"]["items"],
                best_epoch=metrics["best_epoch"],
                baseline_lift=None if metrics["baseline_lift"] is None else round(metrics["baseline_lift"], 4),
                files=sorted(published.artifacts),
            )
            return Outcome.SUCCEEDED
        return Outcome.CANCELLED if ended == CANCELLED else Outcome.STOPPED
    except RunCancelled:
        if world.is_main and runs.cancelled(runtime, run.id, owner, "cancelled by an operator during training"):
            checkpoints.delete()
        return Outcome.CANCELLED
    except LeaseLost:
        log.warning("run_lease_lost", action="stopping; the execution that took the run over continues it")
        return Outcome.STOPPED
    except RunInterrupted:
        return Outcome.STOPPED
    except TrainingFailure as failure:
        log.warning("run_failed_reason", reason=failure.reason)
        if world.is_main:
            runs.fail(runtime, run.id, owner, failure.reason)
        return Outcome.FAILED
    except StorageError as exc:
        if isinstance(exc, ObjectNotFound | ChecksumMismatch) or run.attempts >= MAX_ATTEMPTS:
            reason = f"object storage failed: {exc}; check that {runtime.storage.describe} is reachable, then retrain"
            if world.is_main:
                runs.fail(runtime, run.id, owner, reason)
            return Outcome.FAILED
        log.warning("run_transient_error", error=str(exc)[:500], attempt=run.attempts, action="retrying")
        if world.is_main:
            runs.release(runtime, run.id, owner)
        return Outcome.RETRY
    except (OperationalError, DatabaseUnavailable) as exc:
        log.warning("run_transient_error", error=str(exc)[:500], attempt=run.attempts, action="retrying")
        if world.is_main:
            with contextlib.suppress(Exception):  # the lease expires by itself if the database stays away
                runs.release(runtime, run.id, owner)
        return Outcome.RETRY
    except Exception as exc:
        log.exception("run_crashed", error=repr(exc)[:500])
        if world.is_main:
            reason = (
                f"the training run crashed ({exc.__class__.__name__}: {str(exc)[:300]}); "
                f"the traceback is in the training worker's log under run_id {run.id}"
            )
            runs.fail(runtime, run.id, owner, reason)
        return Outcome.FAILED


def _train_and_export(
    runtime: Runtime,
    run: RunInfo,
    owner: str,
    world: World,
    progress: LiveProgress,
    heartbeat: Heartbeat | None,
    checkpoints: CheckpointStore,
) -> Published | None:
    hp = run.hyperparameters
    tokens = run.task_type == TOKEN_TASK
    data: Any = (
        load_token_snapshot(runtime.storage, run.manifest, run.labels, snapshot_id=run.snapshot_id)
        if tokens
        else load_snapshot(runtime.storage, run.manifest, run.labels, run.task_type, snapshot_id=run.snapshot_id)
    )
    seed_everything(hp["seed"])  # the new head (and a from-scratch backbone) start from seeded weights
    prepared = prepare_task(runtime, run, data)
    counts = prepared.train_label_counts if prepared.train_label_counts is not None else data.train_label_counts()
    recipe = Recipe.from_hyperparameters(hp, counts)
    hooks = RunHooks(runtime, run, owner, progress, heartbeat, checkpoints)
    trainer = Trainer(
        prepared.model,
        prepared.train_set,
        prepared.val_set,
        prepared.train_collate,
        recipe,
        world=world,
        hooks=hooks,
        eval_collate=prepared.eval_collate,
        head_prefixes=prepared.head_prefixes,
        lr_scale=prepared.lr_scale,
        embedding_parameter=prepared.embedding_parameter,
        selection_score=prepared.selection_score,
    )
    progress.steps = trainer.steps_per_epoch
    if world.is_main:
        started = runs.record_start(
            runtime,
            run.id,
            owner,
            base_weights=prepared.base_model,
            device=str(trainer.device),
            world_size=world.world_size,
            epochs=recipe.epochs,
            steps=trainer.steps_per_epoch,
        )
        if not started:
            raise LeaseLost(run.id)
        log.info(
            "run_data_loaded",
            train_items=len(data.train),
            validation_items=len(data.validation),
            test_items=len(data.test),
            label_counts=data.label_counts,
            base_model=prepared.base_model["name"],
            base_weights=prepared.base_model["weights"],
            device=str(trainer.device),
            chosen=prepared.chosen,
        )
    resume = checkpoints.load()
    if resume is not None:
        log.info("run_resumed", from_epoch=resume[0]["epoch"], finished=resume[0]["finished"])
        hooks.epochs_left = recipe.epochs - resume[0]["epoch"]
        if world.is_main:
            runs.record_start(runtime, run.id, owner, resumed_from_epoch=resume[0]["epoch"])
    hooks.epoch_started = time.monotonic()
    fit = trainer.fit(*resume) if resume is not None else trainer.fit()
    if not world.is_main:
        return None
    hooks.check()
    if tokens:
        return _export_and_evaluate_tagger(runtime, run, data, prepared, trainer, fit, world, hooks)
    with tempfile.TemporaryDirectory(prefix=f"{run.id}-") as tmp:
        batches = list(
            DataLoader(prepared.val_set, batch_size=recipe.batch_size, collate_fn=prepared.eval_collate, shuffle=False)
        )
        package = build_package(
            folder=Path(tmp) / "model",
            model=trainer.core,
            spec=prepared.export,
            batches=batches,
            labels=data.labels,
            quantize=bool(hp.get("quantize")),
            identity={"model_name": run.model_name, "task_type": run.task_type},
            lineage=_lineage(run, data.manifest_sha256, prepared.base_model, world, str(trainer.device)),
            hyperparameters=hp,
            training={**_training_summary(fit, data), "chosen": prepared.chosen},
        )
        hooks.check()
        report = evaluate_on_test_split(runtime, run, data, package)
        hooks.check()
        evaluation = _upload_evaluation(runtime, run, report)
        artifacts = _upload(runtime, run, package)
    metrics = {
        **package.metrics,
        "test": report["candidate"]["metrics"],
        "best_epoch": fit.best_epoch,
        "baseline": _baseline_summary(report),
        "baseline_lift": report["baseline_lift"],
        "privacy": fit.privacy,
    }
    return Published(package=package, artifacts=artifacts, evaluation=evaluation, metrics=metrics)


def _export_and_evaluate_tagger(
    runtime: Runtime,
    run: RunInfo,
    data: Any,
    prepared: Any,
    trainer: Trainer,
    fit: FitResult,
    world: World,
    hooks: RunHooks,
) -> Published:
    """A token run's export (`token_export`, parity checked), its test-split report and its record's metrics."""
    hp = run.hyperparameters
    with tempfile.TemporaryDirectory(prefix=f"{run.id}-") as tmp:
        package = export_token_package(
            folder=Path(tmp) / "model",
            model=trainer.core,
            prepared=prepared,
            data=data,
            identity={"model_name": run.model_name, "task_type": run.task_type},
            lineage=_lineage(run, data.manifest_sha256, prepared.base_model, world, str(trainer.device)),
            hyperparameters=hp,
            training={
                **{k: v for k, v in _training_summary(fit, data).items() if k != "best_validation_macro_f1"},
                "best_validation_entity_f1": fit.best_macro_f1,  # the selecting score (Trainer.selection_score)
                "chosen": prepared.chosen,
            },
        )
        hooks.check()
        report = evaluate_token_test_split(runtime, run, data, package)
        hooks.check()
        evaluation = _upload_evaluation(runtime, run, report)
        artifacts = _upload(runtime, run, package)
    test = {name: value for name, value in report["candidate"]["metrics"].items() if name != "entity_counts"}
    metrics = {
        **package.metrics,
        "test": test,
        "best_epoch": fit.best_epoch,
        "baseline": _entity_baseline_summary(report),
        "baseline_lift": report["baseline_lift"],
        "privacy": fit.privacy,
    }
    return Published(package=package, artifacts=artifacts, evaluation=evaluation, metrics=metrics)


def _entity_baseline_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The dictionary baseline's entity scores on the test split, for a token run's record."""
    metrics = report["baselines"][CLASSICAL]["metrics"]
    return {
        "name": CLASSICAL,
        "method": metrics["method"],
        "items": metrics["items"],
        "entity_precision": metrics["entity_precision"],
        "entity_recall": metrics["entity_recall"],
        "entity_f1": metrics["entity_f1"],
        "per_type": metrics["per_type"],
    }


def _baseline_summary(report: dict[str, Any]) -> dict[str, Any] | None:
    """The classical baseline's numbers on the test split, for the run's record (its answers stay in the report)."""
    classical = report["baselines"].get(CLASSICAL)
    if classical is None:
        return None
    metrics = classical["metrics"]
    return {
        "name": CLASSICAL,
        "method": metrics["method"],
        "items": metrics["items"],
        "accuracy": metrics["accuracy"],
        "macro_f1": metrics["macro_f1"],
    }


def _lineage(
    run: RunInfo, manifest_sha256: str, base_model: dict[str, Any], world: World, device: str
) -> dict[str, Any]:
    return {
        "run_id": run.id,
        "tenant": run.tenant,
        "dataset_id": run.dataset_id,
        "snapshot_id": run.snapshot_id,
        "manifest": {"bucket": run.manifest["bucket"], "key": run.manifest["key"], "sha256": manifest_sha256},
        "base_model": base_model,
        "world_size": world.world_size,
        "device": device,
    }


def _training_summary(fit: FitResult, data: Any) -> dict[str, Any]:
    return {
        "epochs_run": fit.epochs_run,
        "best_epoch": fit.best_epoch,
        "best_validation_macro_f1": fit.best_macro_f1,
        "stopped_early": fit.stopped_early,
        "resumed_from_epoch": fit.resumed_from_epoch,
        "train_items": len(data.train),
        "validation_items": len(data.validation),
        "test_items": len(data.test),
        "label_counts": data.label_counts,
        "history": fit.history,
        "privacy": fit.privacy,
    }


def _upload_evaluation(runtime: Runtime, run: RunInfo, report: dict[str, Any]) -> dict[str, Any]:
    """evaluation.json into the run's model folder, before the folder's files (metadata.json last)."""
    key = f"{model_run_prefix(run.tenant, run.model_name, run.id)}/{EVALUATION_FILE}"
    info = runtime.storage.put(MODELS_BUCKET, key, report_bytes(report), content_type="application/json")
    return {"bucket": MODELS_BUCKET, "key": info.key, "sha256": info.sha256}


def _upload(runtime: Runtime, run: RunInfo, package: ModelPackage) -> dict[str, dict[str, Any]]:
    prefix = model_run_prefix(run.tenant, run.model_name, run.id)
    artifacts = {}
    # metadata.json goes last: a folder with metadata is a complete folder.
    names = sorted(path.name for path in package.folder.iterdir())
    names.sort(key=lambda name: name == "metadata.json")
    for name in names:
        with (package.folder / name).open("rb") as stream:
            content_type = "application/json" if name.endswith(".json") else "application/octet-stream"
            info = runtime.storage.put(MODELS_BUCKET, f"{prefix}/{name}", stream, content_type=content_type)
        artifacts[name] = {"bucket": MODELS_BUCKET, "key": info.key, "sha256": info.sha256}
    return artifacts


def _interruption(run_id: str, heartbeat: Heartbeat | None) -> RunInterrupted | None:
    """Why the execution must stop now (its lease was taken over, an operator cancelled), or None."""
    if heartbeat is None:
        return None
    if heartbeat.lost.is_set():
        return LeaseLost(run_id)
    if heartbeat.cancelled.is_set():
        return RunCancelled(run_id)
    return None


class RunHooks(TrainerHooks):
    """Turns the trainer's news into checkpoints, progress records, log lines, and stops it when asked."""

    def __init__(
        self,
        runtime: Runtime,
        run: RunInfo,
        owner: str,
        progress: LiveProgress,
        heartbeat: Heartbeat | None,
        checkpoints: CheckpointStore,
    ) -> None:
        self.runtime = runtime
        self.run = run
        self.owner = owner
        self.progress = progress
        self.heartbeat = heartbeat
        self.checkpoints = checkpoints
        self.epoch_started = time.monotonic()
        self.last_epoch_seconds: float | None = None
        self.epochs_left = run.hyperparameters["epochs"]

    def interruption(self) -> RunInterrupted | None:
        return _interruption(self.run.id, self.heartbeat)

    def check(self) -> None:
        interruption = self.interruption()
        if interruption is not None:
            raise interruption

    def on_step(self, step: int, steps: int, loss: float, samples_per_second: float) -> None:
        progress = self.progress
        progress.step, progress.steps, progress.loss = step, steps, loss
        progress.samples_per_second = samples_per_second
        per_step = (time.monotonic() - self.epoch_started) / max(step, 1)
        epoch_seconds = self.last_epoch_seconds or per_step * steps
        progress.eta_seconds = (steps - step) * per_step + epoch_seconds * max(self.epochs_left - 1, 0)

    def on_epoch_end(self, report: EpochReport, checkpoint: dict[str, Any], best_state: dict | None) -> None:
        self.check()
        self.checkpoints.save(checkpoint, best_state)
        metrics = {"accuracy": report.accuracy, "macro_f1": report.macro_f1, "val_loss": report.val_loss}
        if not runs.record_epoch(self.runtime, self.run.id, self.owner, checkpoint["history"], metrics):
            raise LeaseLost(self.run.id)
        log.info(
            "run_epoch_finished",
            epoch=report.epoch,
            epochs=report.epochs,
            loss=round(report.train_loss, 5),
            val_loss=round(report.val_loss, 5),
            accuracy=round(report.accuracy, 4),
            macro_f1=round(report.macro_f1, 4),
            samples_per_second=round(report.samples_per_second, 1),
            eta_seconds=round(report.eta_seconds, 1),
            learning_rate=report.learning_rate,
            improved=report.improved,
            **({} if report.selection_score is None else {"selection_score": round(report.selection_score, 4)}),
        )
        self.last_epoch_seconds = report.epoch_seconds
        self.epochs_left = report.epochs - report.epoch
        self.epoch_started = time.monotonic()
