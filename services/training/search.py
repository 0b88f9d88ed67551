"""A run's recipe search: optuna trials on the training workers, bounded by trials and wall time.

- **One study per run**, in the training service's own database (optuna's RDB storage on the same SQLAlchemy
  URL, PostgreSQL or SQLite), so trials on several workers share it: the sampler (TPE) sees every finished
  trial, the pruner (median or successive halving) compares a trial's validation macro-F1 at each epoch with
  the others' at the same epoch.
- **Trials are slots** (`training_trials`), created with the search, each queued as a `training.trial` task on
  the training queue through the outbox. Whoever takes a slot first runs it: another worker, or the run's own
  execution, which, while it waits, runs the slots nobody has taken (so one worker alone never waits on
  itself). A trial trains on the train split and is scored on validation only: it never sees the test split
  (it is dropped before the model is built), which stays held out for the chosen model's evaluation.
- **Bounded.** Each trial stops at the search's deadline (`max_seconds` after it started; recorded as pruned);
  at the deadline the run stops waiting: slots never taken are skipped, and a trial whose worker went silent is
  failed a grace period later. A trial ends once: complete, pruned, failed or skipped, with its params,
  validation macro-F1 per epoch and seconds.
- **The winner** is the complete trial with the best validation macro-F1. Its values become the run's
  hyper-parameters, and the run then trains, exports, evaluates on the test split and publishes as any other
  run. With `keep_winner`, `training.recipe_chosen` (in the transaction that records the choice) tells labeling
  to keep those values in the dataset's training settings for later cycles.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import optuna
from sqlalchemy import select, update
from sqlalchemy.exc import OperationalError

from services.training import runs
from services.training.data import load_snapshot
from services.training.failures import LeaseLost, RunInterrupted, TrainingFailure
from services.training.models import (
    RUNNING,
    TRIAL_COMPLETE,
    TRIAL_ENDED,
    TRIAL_FAILED,
    TRIAL_PRUNED,
    TRIAL_RUNNING,
    TRIAL_SKIPPED,
    TRIAL_WAITING,
    TrainingRun,
    TrainingTrial,
    utcnow,
)
from services.training.preparation import prepare_task
from services.training.runs import RunInfo
from services.training.search_space import TRIAL_TASK
from services.training.trainer import EpochReport, FitResult, Recipe, Trainer, TrainerHooks, seed_everything
from shared.logging import get_logger, log_context
from shared.runtime import Runtime

log = get_logger(__name__)

GRACE_SECONDS = 30.0
"""After the deadline, how long a trial taken by another worker has to record its end before it is failed."""
POLL_SECONDS = 0.5

optuna.logging.set_verbosity(optuna.logging.WARNING)  # our own log lines say what each trial did


class TrialStopped(RunInterrupted):
    """A trial ends before its last epoch: pruned by the pruner, or out of the search's wall time."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


# ------------------------------------------------------------------------------------------------- study


def _storage(runtime: Runtime) -> optuna.storages.RDBStorage:
    url = runtime.db.engine.url.render_as_string(hide_password=False)
    engine_kwargs: dict[str, Any] = {"pool_pre_ping": True}
    if runtime.db.is_sqlite:
        engine_kwargs["connect_args"] = {"timeout": 30}
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)
    except OperationalError:
        # Two workers opening the first study of a fresh database both create optuna's tables; one loses the
        # race (its CREATE TABLE finds the table there) and, the tables now being there, opens it again.
        return optuna.storages.RDBStorage(url, engine_kwargs=engine_kwargs)


def pruner_named(name: str) -> optuna.pruners.BasePruner:
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=2)
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0)
    return optuna.pruners.NopPruner()


def open_study(runtime: Runtime, run: RunInfo, slot: int = 0) -> optuna.Study:
    """The run's study. Its sampler is seeded per trial slot: trials asked at once on several workers, each with
    its own sampler, must not all draw the same first values."""
    settings = run.search["settings"]
    seed = (run.hyperparameters["seed"] * 1009 + slot) % 2**32
    return optuna.create_study(
        storage=_storage(runtime),
        study_name=f"flywheel-{run.id}",
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=seed, constant_liar=True),
        pruner=pruner_named(settings["pruner"]),
        load_if_exists=True,
    )


def distributions(space: dict[str, dict[str, Any]]) -> dict[str, optuna.distributions.BaseDistribution]:
    found: dict[str, optuna.distributions.BaseDistribution] = {}
    for name, bounds in sorted(space.items()):
        if "choices" in bounds:
            found[name] = optuna.distributions.CategoricalDistribution(bounds["choices"])
        elif isinstance(bounds["low"], int) and isinstance(bounds["high"], int):
            found[name] = optuna.distributions.IntDistribution(bounds["low"], bounds["high"], log=bounds["log"])
        else:
            found[name] = optuna.distributions.FloatDistribution(bounds["low"], bounds["high"], log=bounds["log"])
    return found


def deadline_of(search: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(search["started_at"]) + timedelta(seconds=search["settings"]["max_seconds"])


# ------------------------------------------------------------------------------------------ the records


def start(runtime: Runtime, run_id: str, owner: str) -> dict[str, Any]:
    """Create the trial slots and queue one `training.trial` per slot, once (a resumed run keeps its search).
    Returns the run's search record."""
    with runtime.db.session() as session:
        run = runs.held_run(session, run_id, owner)
        if run is None:
            raise LeaseLost(run_id)
        search = dict(run.search)
        if "started_at" not in search:
            search.update(state="searching", started_at=utcnow().isoformat())
            for number in range(search["settings"]["trials"]):
                session.add(TrainingTrial(run_id=run_id, number=number, state=TRIAL_WAITING, params={}, history=[]))
                runtime.bus.enqueue(session, TRIAL_TASK, [run_id, number], queue=runs.RUN_QUEUE)
            run.search = search
            log.info("run_search_started", trials=search["settings"]["trials"], **_bounds(search))
    return search


def _bounds(search: dict[str, Any]) -> dict[str, Any]:
    return {"max_seconds": search["settings"]["max_seconds"], "pruner": search["settings"]["pruner"]}


def claim_trial(runtime: Runtime, run_id: str, owner: str, number: int | None = None) -> int | None:
    """Take a waiting slot (this one, or the lowest) of a run that is still running; its number, or None."""
    with runtime.db.session() as session:
        live = session.scalar(
            select(TrainingRun.id).where(
                TrainingRun.id == run_id, TrainingRun.status == RUNNING, TrainingRun.cancel_requested.is_(False)
            )
        )
        if live is None:
            return None
        statement = select(TrainingTrial.number).where(
            TrainingTrial.run_id == run_id, TrainingTrial.state == TRIAL_WAITING
        )
        if number is not None:
            statement = statement.where(TrainingTrial.number == number)
        for candidate in session.scalars(statement.order_by(TrainingTrial.number)).all():
            taken = session.execute(
                update(TrainingTrial)
                .where(
                    TrainingTrial.run_id == run_id,
                    TrainingTrial.number == candidate,
                    TrainingTrial.state == TRIAL_WAITING,
                )
                .values(state=TRIAL_RUNNING, owner=owner, started_at=utcnow())
            ).rowcount
            if taken:
                return candidate
    return None


def _update_trial(runtime: Runtime, run_id: str, number: int, owner: str, **values: Any) -> bool:
    with runtime.db.session() as session:
        return bool(
            session.execute(
                update(TrainingTrial)
                .where(
                    TrainingTrial.run_id == run_id,
                    TrainingTrial.number == number,
                    TrainingTrial.owner == owner,
                    TrainingTrial.state == TRIAL_RUNNING,
                )
                .values(**values)
            ).rowcount
        )


def _run_is_live(runtime: Runtime, run_id: str) -> bool:
    with runtime.db.read_session() as session:
        row = session.execute(
            select(TrainingRun.status, TrainingRun.cancel_requested).where(TrainingRun.id == run_id)
        ).first()
    return row is not None and row.status == RUNNING and not row.cancel_requested


def _trials(runtime: Runtime, run_id: str) -> list[TrainingTrial]:
    with runtime.db.read_session() as session:
        return list(
            session.scalars(
                select(TrainingTrial).where(TrainingTrial.run_id == run_id).order_by(TrainingTrial.number)
            ).all()
        )


def _close_unfinished(runtime: Runtime, run: RunInfo, *, silent: bool) -> None:
    """At the deadline: skip the slots nobody took; with `silent`, also fail the trials still not ended."""
    states = (TRIAL_WAITING, TRIAL_RUNNING) if silent else (TRIAL_WAITING,)
    study = None
    for trial in _trials(runtime, run.id):
        if trial.state not in states:
            continue
        if trial.state == TRIAL_WAITING:
            state, reason = TRIAL_SKIPPED, "not started within the search's wall time"
        else:
            state, reason = TRIAL_FAILED, f"its worker ({trial.owner}) recorded no end within the search's wall time"
        with runtime.db.session() as session:
            ended = session.execute(
                update(TrainingTrial)
                .where(TrainingTrial.seq == trial.seq, TrainingTrial.state == trial.state)
                .values(state=state, reason=reason, finished_at=utcnow())
            ).rowcount
        if ended and trial.study_trial is not None:
            study = study or open_study(runtime, run)
            study.tell(trial.study_trial, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
        if ended:
            log.info("run_trial_ended", trial=trial.number, state=state, reason=reason)


# ------------------------------------------------------------------------------------------------ trials


class TrialHooks(TrainerHooks):
    """Reports each epoch's validation macro-F1 to optuna and records it; stops the trial when the pruner says
    so, at the deadline, or when its run is no longer running (or `outer` has a reason to stop)."""

    def __init__(
        self,
        runtime: Runtime,
        run: RunInfo,
        number: int,
        owner: str,
        trial: optuna.Trial,
        deadline: datetime,
        outer: Callable[[], RunInterrupted | None],
    ) -> None:
        self.runtime = runtime
        self.run = run
        self.number = number
        self.owner = owner
        self.trial = trial
        self.deadline = deadline
        self.outer = outer
        self.history: list[dict[str, Any]] = []

    def interruption(self) -> RunInterrupted | None:
        stop = self.outer()
        if stop is not None:
            return stop
        if datetime.now(UTC) >= self.deadline:
            return TrialStopped(f"the search's wall time ran out after {len(self.history)} epoch(s)")
        return None

    def on_epoch_end(self, report: EpochReport, checkpoint: dict[str, Any], best_state: dict | None) -> None:
        self.history.append(
            {"epoch": report.epoch, "macro_f1": round(report.macro_f1, 6), "val_loss": round(report.val_loss, 6)}
        )
        self.trial.report(report.macro_f1, report.epoch)
        if not _update_trial(self.runtime, self.run.id, self.number, self.owner, history=list(self.history)):
            raise TrialStopped("the trial's record was closed (the search ended without it)")
        log.info("run_trial_epoch_finished", trial=self.number, epoch=report.epoch, macro_f1=round(report.macro_f1, 4))
        if not report.finished and self.trial.should_prune():
            raise TrialStopped(f"pruned after epoch {report.epoch}: validation macro-F1 {report.macro_f1:.4f}")
        if not _run_is_live(self.runtime, self.run.id):
            raise TrialStopped("its run is no longer running (cancelled or ended)")


def _fit(runtime: Runtime, run: RunInfo, hooks: TrialHooks) -> FitResult:
    """Train the trial's recipe on the train split, selecting on validation; the test split is dropped first."""
    hp = run.hyperparameters
    data = load_snapshot(runtime.storage, run.manifest, run.labels, run.task_type, snapshot_id=run.snapshot_id)
    data = replace(data, test=[])  # held out means held out: a trial never sees it
    seed_everything(hp["seed"])
    prepared = prepare_task(runtime, run, data)
    trainer = Trainer(
        prepared.model,
        prepared.train_set,
        prepared.val_set,
        prepared.train_collate,
        Recipe.from_hyperparameters(hp, data.train_label_counts()),
        hooks=hooks,
        eval_collate=prepared.eval_collate,
        head_prefixes=prepared.head_prefixes,
        lr_scale=prepared.lr_scale,
        embedding_parameter=prepared.embedding_parameter,
    )
    return trainer.fit()


def run_trial(
    runtime: Runtime, run: RunInfo, number: int, owner: str, outer: Callable[[], RunInterrupted | None]
) -> str:
    """Run one claimed trial to its end and record it; returns its state. Re-raises `outer`'s interruption
    (the run's own execution was cancelled or lost its lease) after recording the trial as failed."""
    started = time.monotonic()
    study = open_study(runtime, run, number)
    trial = study.ask(distributions(run.search["settings"]["space"]))
    params = dict(trial.params)
    _update_trial(runtime, run.id, number, owner, params=params, study_trial=trial.number)
    hooks = TrialHooks(runtime, run, number, owner, trial, deadline_of(run.search), outer)
    log.info("run_trial_started", trial=number, study_trial=trial.number, params=params)
    value, reason, state = None, None, TRIAL_COMPLETE
    interrupted: RunInterrupted | None = None
    try:
        fit = _fit(runtime, replace(run, hyperparameters={**run.hyperparameters, **params}), hooks)
        value = fit.best_macro_f1
        study.tell(trial, value)
    except TrialStopped as stopped:
        state, reason = TRIAL_PRUNED, stopped.reason
        study.tell(trial, state=optuna.trial.TrialState.PRUNED)
    except Exception as exc:
        state = TRIAL_FAILED
        reason = getattr(exc, "reason", None) or f"{exc.__class__.__name__}: {str(exc)[:300]}"
        if isinstance(exc, RunInterrupted):
            interrupted, reason = exc, f"its run stopped ({exc.__class__.__name__}) while the trial trained"
        study.tell(trial, state=optuna.trial.TrialState.FAIL)
        if not isinstance(exc, RunInterrupted | TrainingFailure):
            log.exception("run_trial_crashed", trial=number, error=repr(exc)[:300])
    seconds = round(time.monotonic() - started, 3)
    best = max((h["macro_f1"] for h in hooks.history), default=None)
    _update_trial(
        runtime,
        run.id,
        number,
        owner,
        state=state,
        reason=reason,
        seconds=seconds,
        validation_macro_f1=value if value is not None else best,
        finished_at=utcnow(),
    )
    log.info("run_trial_ended", trial=number, state=state, reason=reason, seconds=seconds, macro_f1=value)
    if interrupted is not None:
        raise interrupted
    return state


def execute_trial(runtime: Runtime, run_id: str, number: int) -> str:
    """The `training.trial` task: run slot `number` of the run's search, unless someone took it already."""
    owner = runs.new_lease_owner()
    if claim_trial(runtime, run_id, owner, number) is None:
        log.info("run_trial_not_started", run_id=run_id, trial=number, reason="taken, ended, or its run stopped")
        return "taken"
    with runtime.db.read_session() as session:
        run = RunInfo.of(session.scalar(select(TrainingRun).where(TrainingRun.id == run_id)))
    with log_context(service="training", run_id=run.id, tenant=run.tenant, trace_id=run.trace_id):
        return run_trial(runtime, run, number, owner, lambda: None)


# ------------------------------------------------------------------------------------------- the search


def settle(runtime: Runtime, run: RunInfo, owner: str, outer: Callable[[], RunInterrupted | None]) -> RunInfo:
    """The run's recipe, searched if it has not been yet: start the search, take part in it until every trial
    ended or the deadline passed, choose the best complete trial and record it. Returns the run with the
    winner's hyper-parameters. Raises TrainingFailure when no trial completed."""
    if run.search.get("chosen") is not None:
        return run  # a resumed run: its hyper-parameters already are the winner's
    open_study(runtime, run)  # the study exists before any trial is queued to use it
    search = start(runtime, run.id, owner)
    run = replace(run, search=search)
    deadline = deadline_of(search)
    while True:
        stop = outer()
        if stop is not None:
            raise stop
        if datetime.now(UTC) < deadline:
            number = claim_trial(runtime, run.id, owner)
            if number is not None:
                run_trial(runtime, run, number, owner, outer)
                continue
        else:
            _close_unfinished(runtime, run, silent=False)
        trials = _trials(runtime, run.id)
        if all(trial.state in TRIAL_ENDED for trial in trials):
            break
        if datetime.now(UTC) >= deadline + timedelta(seconds=GRACE_SECONDS):
            _close_unfinished(runtime, run, silent=True)
            trials = _trials(runtime, run.id)
            break
        time.sleep(POLL_SECONDS)
    return _choose(runtime, run, owner, trials)


def _choose(runtime: Runtime, run: RunInfo, owner: str, trials: list[TrainingTrial]) -> RunInfo:
    search = dict(run.search)
    finished = utcnow()
    search.update(
        finished_at=finished.isoformat(),
        seconds=round((finished - datetime.fromisoformat(search["started_at"])).total_seconds(), 3),
    )
    complete = [trial for trial in trials if trial.state == TRIAL_COMPLETE]
    if not complete:
        states = {trial.number: trial.state for trial in trials}
        reason = (
            f"the recipe search completed no trial within {search['settings']['max_seconds']} s (trial states: "
            f"{states}); allow more max_seconds, or fewer epochs, and request the run again"
        )
        _record_choice(runtime, run, owner, {**search, "state": "failed", "chosen": None}, None)
        raise TrainingFailure(reason)
    best = max(complete, key=lambda trial: (trial.validation_macro_f1, -trial.number))
    chosen = {"trial": best.number, "params": best.params, "validation_macro_f1": best.validation_macro_f1}
    search.update(state="chosen", chosen=chosen)
    hyperparameters = {**run.hyperparameters, **best.params}
    _record_choice(runtime, run, owner, search, hyperparameters)
    log.info("run_search_chosen", **chosen, seconds=search["seconds"], trials=len(trials))
    return replace(run, search=search, hyperparameters=hyperparameters)


def _record_choice(
    runtime: Runtime, run: RunInfo, owner: str, search: dict[str, Any], hyperparameters: dict[str, Any] | None
) -> None:
    with runtime.db.session() as session:
        held = runs.held_run(session, run.id, owner)
        if held is None:
            raise LeaseLost(run.id)
        held.search = search
        if hyperparameters is None:
            return
        held.hyperparameters = hyperparameters
        held.epochs = hyperparameters["epochs"]
        if search["settings"]["keep_winner"]:
            payload = {
                "run_id": run.id,
                "dataset_id": run.dataset_id,
                "snapshot_id": run.snapshot_id,
                "model_name": run.model_name,
                "hyperparameters": search["chosen"]["params"],
                "validation_macro_f1": search["chosen"]["validation_macro_f1"],
            }
            runtime.bus.publish(session, "training.recipe_chosen", payload, tenant=run.tenant, trace_id=run.trace_id)
