"""Aliases: named pointers at versions (`production`, `staging`, any name), canaries, rollback, and their audit.

Every change goes through `change_alias`, which (in the caller's transaction, under the model's row lock)
moves the alias, writes an `alias_changes` row (who, when, from, to, why) and emits `model.promoted`, so an
alias never moves without its audit record and its event, and neither exists for a change that rolled back.

A canary is an alias whose `weights` split traffic between exactly two versions, e.g. {"3": 90, "4": 10}. Its
`version` is the stable side: the version the alias pointed at before the canary when that one is part of the
split, else the heavier one. Inference routes by `weights` when they are present, by `version` otherwise.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.registry.models import READY, AliasChange, ModelAlias, ModelVersion, RegisteredModel
from shared.errors import Conflict, NotFound, Unprocessable
from shared.logging import get_logger

log = get_logger(__name__)

Publish = Callable[[str, dict[str, Any]], Any]
"""Emits an event in the caller's transaction: `ctx.publish` in a consumer, the bus in an HTTP handler."""

ALIAS_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")
CANARY_SIZE = 2


def validation_error(field: str, message: str) -> Unprocessable:
    return Unprocessable(
        f"the request does not validate: {field}: {message}",
        {"fields": {field: [message]}},
        code="validation_failed",
    )


def check_alias_name(name: str) -> str:
    if not ALIAS_NAME.match(name):
        raise validation_error("alias", "1-63 lowercase letters, digits, '_' or '-', starting with a letter")
    return name


def lock_model(session: Session, tenant: str, name: str) -> RegisteredModel:
    """The tenant's model, row-locked until the transaction ends; another tenant's model is not found."""
    model = session.scalar(
        select(RegisteredModel)
        .where(RegisteredModel.tenant == tenant, RegisteredModel.name == name)
        .with_for_update()
        .execution_options(populate_existing=True)
    )
    if model is None:
        raise NotFound(f"model {name!r} does not exist")
    return model


def get_alias(session: Session, model_id: str, name: str) -> ModelAlias | None:
    return session.scalar(select(ModelAlias).where(ModelAlias.model_id == model_id, ModelAlias.name == name))


def model_aliases(session: Session, model_id: str) -> list[ModelAlias]:
    return list(session.scalars(select(ModelAlias).where(ModelAlias.model_id == model_id).order_by(ModelAlias.name)))


def validate_weights(weights: dict[str, Any]) -> dict[str, int]:
    """Canary weights: exactly two distinct versions, integer percentages from 1 to 99 that sum to 100."""
    if len(weights) != CANARY_SIZE:
        raise validation_error("weights", f"a canary splits traffic between exactly {CANARY_SIZE} versions")
    normalized: dict[str, int] = {}
    for key, percent in weights.items():
        if not str(key).isdigit() or int(key) < 1:
            raise validation_error("weights", f"{key!r} is not a version number")
        if isinstance(percent, bool) or not isinstance(percent, int) or not 1 <= percent <= 99:
            raise validation_error("weights", f"the weight of version {key} must be an integer from 1 to 99")
        if str(int(key)) in normalized:
            raise validation_error("weights", f"version {int(key)} appears twice")
        normalized[str(int(key))] = percent
    total = sum(normalized.values())
    if total != 100:
        raise validation_error("weights", f"weights must sum to 100, these sum to {total}")
    return normalized


def canary_main_version(weights: dict[str, int], current: int | None) -> int:
    """The stable side of a split: the alias's current version if it takes part, else the heavier one."""
    if current is not None and str(current) in weights:
        return current
    heaviest = max(weights, key=lambda v: (weights[v], -int(v)))  # a tie goes to the older version
    return int(heaviest)


def _require_servable(session: Session, model: RegisteredModel, versions: set[int], *, field: str) -> None:
    rows = {
        row.version: row
        for row in session.scalars(
            select(ModelVersion).where(ModelVersion.model_id == model.id, ModelVersion.version.in_(versions))
        )
    }
    for number in sorted(versions):
        row = rows.get(number)
        if row is None:
            if field == "weights":
                raise validation_error("weights", f"version {number} of model {model.name!r} does not exist")
            raise NotFound(f"version {number} of model {model.name!r} does not exist")
        if row.status != READY:
            raise Conflict(f"version {number} of model {model.name!r} is {row.status}; an alias cannot point at it")


def change_alias(
    session: Session,
    model: RegisteredModel,
    alias: str,
    *,
    version: int | None,
    weights: dict[str, int],
    action: str,
    actor: str,
    reason: str,
    trace_id: str | None,
    publish: Publish,
) -> AliasChange | None:
    """Point `alias` at `version` (a canary when `weights` is given), or remove it when `version` is None.

    Returns the audit record, or None when the alias already is in that state (nothing changes, nothing is
    emitted). The caller holds the model's row lock.
    """
    check_alias_name(alias)
    current = get_alias(session, model.id, alias)
    from_version = current.version if current is not None else None
    from_weights = dict(current.weights) if current is not None else {}
    if version is None and current is None:
        raise NotFound(f"model {model.name!r} has no alias {alias!r}")
    if (from_version, from_weights) == (version, weights):
        return None
    if version is not None:
        _require_servable(session, model, {version, *(int(v) for v in weights)}, field="weights" if weights else "")
        if current is None:
            current = ModelAlias(
                model_id=model.id, name=alias, version=version, weights=dict(weights), updated_by=actor
            )
            session.add(current)
        else:
            current.version = version
            current.weights = dict(weights)
            current.updated_by = actor
    elif current is not None:
        session.delete(current)
    change = AliasChange(
        model_id=model.id,
        tenant=model.tenant,
        alias=alias,
        action=action,
        from_version=from_version,
        from_weights=from_weights,
        to_version=version,
        to_weights=dict(weights),
        actor=actor,
        reason=reason,
        trace_id=trace_id,
    )
    session.add(change)
    session.flush()
    publish(
        "model.promoted",
        {
            "model_name": model.name,
            "dataset_id": model.dataset_id,
            "alias": alias,
            "version": version,
            "previous_version": from_version,
            "weights": dict(weights),
            "reason": reason,
        },
    )
    log.info(
        "model_promoted" if version is not None else "alias_removed",
        model_name=model.name,
        alias=alias,
        version=version,
        previous_version=from_version,
        weights=dict(weights),
        action=action,
        actor=actor,
        reason=reason,
    )
    return change


def set_alias(
    session: Session,
    model: RegisteredModel,
    alias: str,
    *,
    version: int | None,
    weights: dict[str, Any] | None,
    actor: str,
    reason: str,
    trace_id: str | None,
    publish: Publish,
) -> AliasChange | None:
    """A manual promotion (`version`) or a canary (`weights`), as an operator asks for it."""
    check_alias_name(alias)
    if weights:
        split = validate_weights(weights)
        current = get_alias(session, model.id, alias)
        main = canary_main_version(split, current.version if current is not None else None)
        return change_alias(
            session,
            model,
            alias,
            version=main,
            weights=split,
            action="canary",
            actor=actor,
            reason=reason,
            trace_id=trace_id,
            publish=publish,
        )
    if version is None:
        raise validation_error("version", "give a version, or weights for a canary")
    return change_alias(
        session,
        model,
        alias,
        version=version,
        weights={},
        action="promote",
        actor=actor,
        reason=reason,
        trace_id=trace_id,
        publish=publish,
    )


def rollback_alias(
    session: Session,
    model: RegisteredModel,
    alias: str,
    *,
    actor: str,
    reason: str,
    trace_id: str | None,
    publish: Publish,
) -> AliasChange:
    """Put the alias back where it was before its current state was set (one step of history per call).

    The target is the `from` side of the latest change, other than a rollback, that produced the alias's
    current state; rolling back repeatedly walks further back (v3 → v2 → v1), it does not toggle.
    """
    current = get_alias(session, model.id, alias)
    if current is None:
        raise Conflict(f"model {model.name!r} has no alias {alias!r} to roll back")
    history = session.scalars(
        select(AliasChange)
        .where(AliasChange.model_id == model.id, AliasChange.alias == alias, AliasChange.action != "rollback")
        .order_by(AliasChange.id.desc())
    )
    state = (current.version, dict(current.weights))
    for change in history:
        if (change.to_version, dict(change.to_weights)) == state:
            target_version, target_weights = change.from_version, dict(change.from_weights)
            break
    else:
        raise Conflict(f"alias {alias!r} of model {model.name!r} has no earlier state to roll back to")
    if target_version is None:
        raise Conflict(
            f"before v{current.version}, alias {alias!r} of model {model.name!r} pointed at nothing; "
            "remove the alias instead"
        )
    why = f"rollback of {alias} from v{current.version} to v{target_version}"
    change = change_alias(
        session,
        model,
        alias,
        version=target_version,
        weights=target_weights,
        action="rollback",
        actor=actor,
        reason=f"{why}: {reason}" if reason else why,
        trace_id=trace_id,
        publish=publish,
    )
    if change is None:  # history says the state differs, so this cannot be a no-op
        raise Conflict(f"alias {alias!r} of model {model.name!r} is already at its previous state")
    return change
