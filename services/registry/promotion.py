"""The promotion gate: does a newly registered version become `production`, or only `staging`?

Policy (per model, changed with `PUT /v1/models/<name>/policy`):
- `primary_metric` (default `macro_f1`) is the number compared; `margin` (default 0.01) is how much the
  candidate must beat production by: it is promoted when `candidate - production >= margin` and
  `candidate > production`.
- The first version of a model, with nothing in production, becomes `production`.
- `auto_promote: false` sends every new version to `staging`; a person promotes by hand.
- While `production` runs a canary (a weighted split), automatic promotion waits: the new version goes to
  `staging` so that the gate never cuts short an experiment an operator started.

The same validation split. Two versions are compared fairly only when both were evaluated on the validation
split of the same dataset snapshot. By default the gate compares anyway when the snapshots differ (a newer
snapshot is the normal case in the loop: more labels, a new split), and says so: the decision records
`same_validation_split: false`, both snapshot ids, and its reason ends with a warning. A model whose policy sets
`require_same_split: true` never auto-promotes across snapshots: such a candidate goes to `staging` with that
reason, and a person decides.

Every decision is recorded on the version (`decision`), with the metric, both values, the delta, the margin,
the snapshots and the policy it applied, and logged as `promotion_decided`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.registry.aliases import Publish, change_alias, get_alias
from services.registry.models import PRODUCTION, STAGING, ModelVersion, RegisteredModel
from shared.logging import get_logger

log = get_logger(__name__)

POLICY_ACTOR = "registry:promotion-policy"


@dataclass(frozen=True)
class Evaluation:
    """One version's result on its validation split."""

    version: int
    metrics: dict[str, Any]
    snapshot_id: str

    def value(self, metric: str) -> float | None:
        raw = self.metrics.get(metric)
        if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
            return None
        return float(raw)


def decide(
    policy: dict[str, Any],
    candidate: Evaluation,
    production: Evaluation | None,
    *,
    production_is_canary: bool = False,
) -> dict[str, Any]:
    """The gate's decision for `candidate` against the current `production` (None when there is none)."""
    metric = policy["primary_metric"]
    margin = float(policy["margin"])
    value = candidate.value(metric)
    decision: dict[str, Any] = {
        "metric": metric,
        "margin": margin,
        "policy": dict(policy),
        "candidate": {"version": candidate.version, "value": value, "snapshot_id": candidate.snapshot_id},
        "production": None,
        "delta": None,
        "same_validation_split": None,
        "decided_at": datetime.now(UTC).isoformat(),
    }

    def outcome(alias: str, reason: str) -> dict[str, Any]:
        return {**decision, "outcome": alias, "reason": reason}

    if value is None:
        return outcome(STAGING, f"v{candidate.version} reports no numeric {metric}; it cannot be gated")
    if not policy["auto_promote"]:
        return outcome(STAGING, "automatic promotion is off for this model; promote by hand")
    if production is None:
        return outcome(PRODUCTION, f"no version is in production yet; v{candidate.version} becomes production")
    current = production.value(metric)
    same_split = candidate.snapshot_id == production.snapshot_id
    decision["production"] = {"version": production.version, "value": current, "snapshot_id": production.snapshot_id}
    decision["same_validation_split"] = same_split
    if production_is_canary:
        return outcome(STAGING, "production is running a canary; automatic promotion waits until it ends")
    if current is None:
        return outcome(STAGING, f"production v{production.version} reports no numeric {metric}; promote by hand")
    delta = round(value - current, 9)
    decision["delta"] = delta
    split_note = (
        ""
        if same_split
        else f" (warning: evaluated on different validation splits: snapshot {candidate.snapshot_id} "
        f"vs {production.snapshot_id})"
    )
    if not same_split and policy["require_same_split"]:
        return outcome(
            STAGING,
            f"v{candidate.version} was evaluated on snapshot {candidate.snapshot_id}, production v{production.version} "
            f"on {production.snapshot_id}; this model's policy compares only on the same validation split",
        )
    comparison = f"{metric} {value:.4f} vs production v{production.version} {current:.4f} (delta {delta:+.4f})"
    if delta > 0 and delta >= margin:
        return outcome(PRODUCTION, f"{comparison} beats production by at least the margin {margin}{split_note}")
    return outcome(STAGING, f"{comparison} does not beat production by the margin {margin}{split_note}")


def gate_new_version(
    session: Session, model: RegisteredModel, candidate: ModelVersion, *, publish: Publish, trace_id: str | None
) -> dict[str, Any]:
    """Decide where a just-registered version goes, move that alias, and record the decision on the version.

    The caller holds the model's row lock, so the production version read here is the one being replaced.
    """
    current = get_alias(session, model.id, PRODUCTION)
    production = None
    if current is not None:
        row = session.scalar(
            select(ModelVersion).where(ModelVersion.model_id == model.id, ModelVersion.version == current.version)
        )
        if row is not None:
            production = Evaluation(row.version, row.metrics, row.snapshot_id)
    decision = decide(
        model.policy(),
        Evaluation(candidate.version, candidate.metrics, candidate.snapshot_id),
        production,
        production_is_canary=bool(current is not None and current.weights),
    )
    candidate.decision = decision
    log.info(
        "promotion_decided",
        model_name=model.name,
        version=candidate.version,
        outcome=decision["outcome"],
        metric=decision["metric"],
        candidate_value=decision["candidate"]["value"],
        production_version=(decision["production"] or {}).get("version"),
        production_value=(decision["production"] or {}).get("value"),
        delta=decision["delta"],
        margin=decision["margin"],
        same_validation_split=decision["same_validation_split"],
    )
    change_alias(
        session,
        model,
        decision["outcome"],
        version=candidate.version,
        weights={},
        action="auto_promote" if decision["outcome"] == PRODUCTION else "auto_stage",
        actor=POLICY_ACTOR,
        reason=f"promotion gate: {decision['reason']}",
        trace_id=trace_id,
        publish=publish,
    )
    return decision
