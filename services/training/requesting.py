"""Requesting a run, the same way through both doors: `POST /v1/runs` and the `training.requested` event.

Each door turns what it received into a `RunSpec` and calls `request_run`, which validates the request and
fills its defaults, returns the identical run if one is queued, running or succeeded, or records a new run
and queues it for the training worker through the outbox (once its tenant has a running slot free), all in
the caller's transaction. A request that cannot become a run raises `InvalidRunRequest` before anything is
written: the API answers 422 with its fields, the consumer records a failed run with its reason (`reject`),
whose `training.failed` tells the producer. A request through the API beyond its tenant's queue limit raises
`TooManyRuns` (429), also before anything is written; an event is never refused (see `limits.py`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from marshmallow import ValidationError
from sqlalchemy.orm import Session

from services.training import limits, quotas, runs
from services.training.config import TrainingConfig
from services.training.models import LAUNCH_QUEUE, TrainingRun
from services.training.runs import RunRequest
from services.training.schemas import NAME, private_run_problems, resolve_base_model, resolve_hyperparameters
from services.training.search_space import resolve_search
from shared.logging import get_logger
from shared.runtime import Runtime

log = get_logger(__name__)


@dataclass(frozen=True)
class RunSpec:
    """A run as asked for. Unset options take their defaults: the model is named after the dataset, the base
    model and every hyper-parameter are the task's defaults."""

    tenant: str | None
    dataset_id: str
    snapshot_id: str
    manifest: dict[str, Any]
    task_type: str
    labels: list[str]
    reason: str
    source: str
    model_name: str | None = None
    base_model: str | None = None
    hyperparameters: dict[str, Any] | None = None
    launch: str = LAUNCH_QUEUE
    trace_id: str | None = None
    search: dict[str, Any] | None = None
    """A recipe search before training (`search_space.py`), or None."""

    def as_asked(self) -> RunRequest:
        """The request as it came, with what it left unset filled in but nothing validated."""
        return RunRequest(
            tenant=self.tenant or "",
            dataset_id=self.dataset_id,
            snapshot_id=self.snapshot_id,
            manifest=self.manifest,
            task_type=self.task_type,
            labels=list(self.labels),
            model_name=self.model_name or self.dataset_id,
            base_model=self.base_model or "",
            hyperparameters=self.hyperparameters or {},
            reason=self.reason,
            source=self.source,
            launch=self.launch,
            trace_id=self.trace_id,
            search=self.search,
        )


class InvalidRunRequest(Exception):
    """A request that cannot become a run: `reason` for a person, `fields` the problems of each bad field,
    and `request` as far as it could be resolved (what the record of the rejected run shows)."""

    def __init__(self, reason: str, fields: dict[str, Any], request: RunRequest) -> None:
        super().__init__(reason)
        self.reason = reason
        self.fields = fields
        self.request = request


def resolve(spec: RunSpec) -> RunRequest:
    """The request with its model name, base model and hyper-parameters validated and defaulted."""
    asked = spec.as_asked()
    errors: dict[str, Any] = {}
    base_model, hyperparameters, search = asked.base_model, asked.hyperparameters, asked.search
    try:
        NAME(asked.model_name)
    except ValidationError as exc:
        errors["model_name"] = _messages(exc)
    try:
        base_model = resolve_base_model(spec.task_type, spec.base_model)
    except ValidationError as exc:
        errors["base_model"] = _messages(exc)
    try:
        hyperparameters = resolve_hyperparameters(spec.task_type, spec.hyperparameters)
    except ValidationError as exc:
        errors["hyperparameters"] = exc.normalized_messages()
    try:
        search = resolve_search(spec.task_type, spec.search, launch=spec.launch)
    except ValidationError as exc:
        errors["search"] = exc.normalized_messages()
    errors.update(private_run_problems(hyperparameters, spec.search, spec.launch))
    request = replace(asked, base_model=base_model, hyperparameters=hyperparameters, search=search)
    if not spec.tenant:
        problem = "the training request carries no tenant; its producer must set one"
        raise InvalidRunRequest(problem, {"tenant": [problem]}, request)
    if spec.task_type == "token_classification" and not spec.labels:
        problem = "a tagger needs at least one entity label, the request has none"
        raise InvalidRunRequest(problem, {"labels": [problem]}, request)
    if spec.task_type != "token_classification" and len(set(spec.labels)) < 2:
        problem = f"a classifier needs at least two distinct labels, the request has {spec.labels}"
        raise InvalidRunRequest(problem, {"labels": [problem]}, request)
    if errors:
        reason = f"invalid training request: {errors}; fix it and request training again"
        raise InvalidRunRequest(reason, errors, request)
    return request


def _messages(exc: ValidationError) -> list[str]:
    return exc.messages if isinstance(exc.messages, list) else [str(exc.messages)]


def request_run(
    runtime: Runtime, session: Session, spec: RunSpec, *, force: bool = False, refuse_when_full: bool = True
) -> tuple[TrainingRun, bool]:
    """Record the run and queue it, or find the identical run already active or succeeded (and False); with
    `force`, train again regardless. Raises InvalidRunRequest, having written nothing, if it cannot run, and
    TooManyRuns if its tenant's queue is full and `refuse_when_full` (else the run is recorded and waits)."""
    request = resolve(spec)
    compute = quotas.compute_quota(runtime, request.tenant)  # asked of ingestion before the tenant's lock
    limits.lock_tenant(session, request.tenant)
    existing = None if force else runs.find_identical(session, request)
    if existing is not None:
        log.info(
            "training_request_duplicate", run_id=existing.id, status=existing.status, snapshot_id=existing.snapshot_id
        )
        return existing, False
    compute.refuse_if_exhausted(request)
    if refuse_when_full:
        limits.admit(session, request.tenant, TrainingConfig.of(runtime.settings))
    run = runs.create_run(session, request, force=force)
    if run.launch == LAUNCH_QUEUE and run.id not in runs.dispatch_waiting(runtime, session, run.tenant):
        runs.waiting_for_slot(runtime, run)
    log.info(
        "run_requested",
        run_id=run.id,
        snapshot_id=run.snapshot_id,
        model_name=run.model_name,
        launch=run.launch,
        source=run.source,
    )
    return run, True


def reject(runtime: Runtime, session: Session, problem: InvalidRunRequest) -> TrainingRun:
    """Record a request that cannot run as a failed run, and publish its `training.failed`."""
    run = runs.record_rejected(runtime, session, problem.request, problem.reason)
    log.warning("training_request_rejected", run_id=run.id, reason=problem.reason)
    return run
