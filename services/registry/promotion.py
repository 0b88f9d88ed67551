"""The promotion gate: does a newly registered version become `production`, or only `staging`?

The gate decides from the run's evaluation report (`evaluation.json`, read by services.registry.evaluation):
the candidate, the version in production when it was scored (its registered artifact, exactly as served) and
the baselines, each answering item by item on one frozen test split. Every number it compares is recomputed
here from those answers (services.registry.comparison), so both versions are always scored on the same items
and production is never judged by its own, older record.

Policy (per model, `PUT /v1/models/<name>/policy`; defaults in brackets):
- `primary_metric` [`macro_f1`, or `accuracy`]: the number compared.
- `margin` [0.01]: how much the candidate must beat production by.
- `confidence` [0.95]: the level of the confidence interval of the difference.
- `max_class_regression` [0.10]: the largest drop of any one class's F1 allowed.
- `min_score` [null: the score of the baseline `floor` names, on the same items]: the absolute floor.
- `floor` [`majority`, or `classical_baseline`]: which baseline sets the floor when `min_score` is null. The
  classical baseline is TF-IDF (text) or downscaled pixels (images) + logistic regression, trained on the run's
  train split; a report without one (a run from before it) falls back to the majority baseline, and says so.
- `min_test_items` [30]: below this many test items the gate does not decide on noise.
- `bootstrap_samples` [2000]: resamples of the paired bootstrap, seeded from the evaluation set's sha256 so
  that a decision is reproducible.
- `auto_promote` [true]: false sends every new version to `staging`; a person promotes by hand.

Conditions, each recorded in the decision with its numbers and whether it passed:
- (0) `min_test_items`: the evaluation set has at least `min_test_items` items; else "too small to decide".
- (a) `margin`: candidate - production on the primary metric >= `margin`.
- (b) `credible_improvement`: the paired-bootstrap interval of that difference, at `confidence`, lies above 0
  (for accuracy, McNemar's exact test on the discordant items is reported beside it).
- (c) `class_regression`: no class's F1 drops by more than `max_class_regression`.
- (d) `min_score`: the candidate's primary metric >= the floor.
The first version of a model (nothing in production) faces (0) and (d). A version is promoted only when every
condition it faces passes.

The gate does not decide, and stages the version for a person, when: the run has no evaluation report (a run
from before this gate) or its report fails verification; the report could not score production
(`production_error`); production moved while the candidate was evaluated (the report scored another version,
or another artifact, than the one in production now). While `production` runs a canary, automatic promotion
waits: the version goes to `staging`, so the gate never cuts short an experiment an operator started.

Every decision also records `baseline_lift`: the candidate's macro-F1 minus the classical baseline's on the same
items, recomputed from both answers (null when the report has no classical baseline), whatever the floor.

A token_classification model (`primary_metric` `entity_f1`, its only one) is decided the same way from its report's
per-item entity counts (services.registry.comparison): entity F1 micro over entities, the paired bootstrap over
items, the guard (c) per entity type, the floor from the baselines' entity F1 (`majority` predicts no entity,
`classical` is the CoNLL-2003 dictionary baseline), and `baseline_lift` in entity F1.

The decision is recorded on the version (`decision`), logged as `promotion_decided`, and its summary (`summary`)
is the reason of the alias change in the audit log and of the `model.promoted` event.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
from sqlalchemy import select
from sqlalchemy.orm import Session

from services.registry import comparison
from services.registry.aliases import Publish, change_alias, get_alias
from services.registry.evaluation import Evaluation, answers, entity_counts, is_entity_report
from services.registry.models import CLASSICAL_FLOOR, PRODUCTION, STAGING, ModelVersion, RegisteredModel
from shared.logging import get_logger

log = get_logger(__name__)

POLICY_ACTOR = "registry:promotion-policy"
MAJORITY = "majority"
CLASSICAL = "classical"
"""The names training gives its baselines in the report (services.training.comparison)."""
TIE = 1e-9
"""Differences this small are rounding, not a result: a candidate exactly at the margin clears it."""


@dataclass(frozen=True)
class Candidate:
    version: int
    run_id: str
    model_sha256: str | None


@dataclass(frozen=True)
class Production:
    """The version `production` points at as the gate decides, its model.onnx sha256, and whether it is a canary."""

    version: int
    model_sha256: str | None
    canary: bool


def _percent(confidence: float) -> str:
    return f"{confidence * 100:g}%"


def _condition(id_: str, name: str, passed: bool, detail: str, **numbers: Any) -> dict[str, Any]:
    return {"id": id_, "name": name, "passed": bool(passed), **numbers, "detail": detail}


def _with_extras(scores: dict[str, Any], reported: dict[str, Any]) -> dict[str, Any]:
    """The recomputed scores, plus the report's calibration number (it needs probabilities the gate never sees)."""
    ece = reported.get("ece")
    numeric = isinstance(ece, int | float) and not isinstance(ece, bool)
    return {**scores, "ece": float(ece) if numeric else None}


class _Scoring:
    """The decision's numbers for one report: every model scored on the report's items, and the conditions."""

    def __init__(self, policy: dict[str, Any], report: dict[str, Any]) -> None:
        self.policy = policy
        self.metric = policy["primary_metric"]
        self.labels = report["labels"]
        self.y_true = answers(report["y_true"])
        self.items = len(self.y_true)
        self.report = report
        self.entities = is_entity_report(report)
        self.unit = "entity type" if self.entities else "class"

    def scores(self, scored: dict[str, Any]) -> dict[str, Any]:
        if self.entities:
            counts = entity_counts(self.report, scored)
            return _with_extras(comparison.entity_scores(counts, self.labels), scored["metrics"])
        return _with_extras(
            comparison.scores(self.y_true, answers(scored["predictions"]), self.labels), scored["metrics"]
        )

    def enough_items(self) -> dict[str, Any]:
        needed = int(self.policy["min_test_items"])
        if self.items >= needed:
            detail = f"{self.items} test items, at least {needed} required"
        else:
            detail = f"too small to decide: the test split has {self.items} items, the policy needs at least {needed}"
        return _condition("0", "min_test_items", self.items >= needed, detail, observed=self.items, threshold=needed)

    def margin(self, candidate: dict[str, Any], production: dict[str, Any], version: int | None) -> dict[str, Any]:
        margin = float(self.policy["margin"])
        difference = candidate[self.metric] - production[self.metric]
        passed = difference >= margin - TIE
        head = (
            f"{self.metric} {candidate[self.metric]:.4f} vs production v{version} {production[self.metric]:.4f} "
            f"on the same items: {difference:+.4f}"
        )
        detail = f"{head} >= margin {margin:g}" if passed else f"{head}, less than the margin {margin:g}"
        return _condition(
            "a",
            "margin",
            passed,
            detail,
            observed=difference,
            threshold=margin,
            candidate=candidate[self.metric],
            production=production[self.metric],
        )

    def credible(
        self, candidate_scored: dict[str, Any], production_scored: dict[str, Any]
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """Condition (b) and the decision's `difference`."""
        confidence = float(self.policy["confidence"])
        samples = int(self.policy["bootstrap_samples"])
        seed = comparison.seed_for(self.report["evaluation_set"]["sha256"])
        classes = len(self.labels)
        if self.entities:
            counts = entity_counts(self.report, candidate_scored), entity_counts(self.report, production_scored)
            value = comparison.entity_f1(counts[0]) - comparison.entity_f1(counts[1])
        else:
            candidate, production = answers(candidate_scored["predictions"]), answers(production_scored["predictions"])
            value = comparison.metric(self.metric, self.y_true, candidate, classes) - comparison.metric(
                self.metric, self.y_true, production, classes
            )
        difference: dict[str, Any] = {
            "metric": self.metric,
            "value": value,
            "ci_low": None,
            "ci_high": None,
            "confidence": confidence,
            "method": "paired_bootstrap",
            "samples": samples,
            "seed": seed,
        }
        if self.items == 0:
            detail = "no items to resample: the improvement cannot be shown"
            return _condition("b", "credible_improvement", False, detail, observed=None, threshold=0.0), difference
        if self.entities:
            interval = comparison.entity_bootstrap(*counts, samples=samples, confidence=confidence, seed=seed)
        else:
            interval = comparison.paired_bootstrap(
                self.metric,
                self.y_true,
                candidate,
                production,
                classes,
                samples=samples,
                confidence=confidence,
                seed=seed,
            )
        difference.update(ci_low=interval.low, ci_high=interval.high)
        passed = interval.low > 0
        span = f"[{interval.low:+.4f}, {interval.high:+.4f}]"
        how = f"paired bootstrap, {samples} resamples"
        interval_text = f"the {_percent(confidence)} interval of the difference {span}"
        if passed:
            detail = f"{interval_text} lies above 0 ({how})"
        elif interval.high <= 0:
            detail = f"no improvement: {interval_text} lies at or below 0 ({how})"
        else:
            detail = f"within noise: {interval_text} includes 0 ({how})"
        numbers: dict[str, Any] = {
            "observed": interval.low,
            "threshold": 0.0,
            "ci_low": interval.low,
            "ci_high": interval.high,
            "confidence": confidence,
            "method": "paired_bootstrap",
            "samples": samples,
            "seed": seed,
        }
        if self.metric == "accuracy":
            test = comparison.mcnemar(self.y_true, candidate, production)
            numbers.update(test)
            detail += (
                f"; McNemar's exact test p = {test['p_value']:.4g} ({test['only_candidate_right']} items only the "
                f"candidate gets right, {test['only_production_right']} only production)"
            )
        return _condition("b", "credible_improvement", passed, detail, **numbers), difference

    def class_regression(self, candidate: dict[str, Any], production: dict[str, Any]) -> dict[str, Any]:
        allowed = float(self.policy["max_class_regression"])
        rows = [
            {
                "label": label,
                "candidate": candidate["per_class"][label]["f1"],
                "production": production["per_class"][label]["f1"],
                "drop": production["per_class"][label]["f1"] - candidate["per_class"][label]["f1"],
                "support": candidate["per_class"][label]["support"],
            }
            for label in self.labels
        ]
        worst = max(rows, key=lambda row: row["drop"])
        failing = [row for row in rows if row["drop"] > allowed + TIE]
        if failing:
            each = ", ".join(
                f"{row['label']!r} {row['production']:.4f} -> {row['candidate']:.4f} (-{row['drop']:.4f})"
                for row in failing
            )
            detail = f"F1 drops by more than {allowed:g} for {self.unit} {each}"
        elif worst["drop"] > 0:
            detail = f"largest F1 drop: {self.unit} {worst['label']!r} -{worst['drop']:.4f}, within {allowed:g}"
        else:
            detail = f"no {self.unit}'s F1 drops (allowed: {allowed:g})"
        return _condition(
            "c",
            "class_regression",
            not failing,
            detail,
            observed=worst["drop"],
            threshold=allowed,
            worst_class=worst["label"],
            per_class=rows,
        )

    def floor(self, candidate: dict[str, Any], baselines: dict[str, dict[str, Any]]) -> dict[str, Any]:
        majority = baselines.get(MAJORITY)
        classical = baselines.get(CLASSICAL)
        wants_classical = self.policy["floor"] == CLASSICAL_FLOOR
        note, baseline = "", None
        if wants_classical and classical is None:
            note = "; the policy's floor is the classical baseline, which the report does not carry"
        if self.policy["min_score"] is not None:
            floor, source = float(self.policy["min_score"]), "the policy's min_score"
            note = ""
        elif wants_classical and classical is not None:
            floor, source, baseline = classical[self.metric], "the classical baseline on the same items", CLASSICAL
        elif majority is not None:
            floor, source, baseline = majority[self.metric], "the majority baseline on the same items", MAJORITY
        elif self.entities:  # predicting no entity scores 0: the floor of a report without baselines
            floor, source = 0.0, "no entity predicted (entity F1 0); the report carries no majority baseline"
        else:  # the best constant answer on this very set: a floor at least as high as a trained majority baseline
            most_common = np.full(self.items, np.bincount(self.y_true, minlength=len(self.labels)).argmax())
            floor = comparison.metric(self.metric, self.y_true, most_common, len(self.labels))
            source = "the evaluation set's most common class; the report carries no majority baseline"
        score = candidate[self.metric]
        passed = score >= floor - TIE
        relation = ">=" if passed else "is below"
        detail = f"{self.metric} {score:.4f} {relation} the floor {floor:.4f} ({source}{note})"
        lift = None if majority is None else score - majority[self.metric]
        return _condition(
            "d",
            "min_score",
            passed,
            detail,
            observed=score,
            threshold=floor,
            floor_source=source,
            floor_baseline=baseline,
            lift=lift,
        )


def _production_problems(report: dict[str, Any], production: Production | None, candidate: Candidate) -> list[str]:
    """Why the report's comparison is not with the production there is now (empty when it is)."""
    problems = []
    scored = report["production"]
    if report["production_error"]:
        which = f"production v{production.version}" if production is not None else "production"
        problems.append(f"{which} could not be scored on the test split: {report['production_error']}")
    elif scored is None and production is not None:
        problems.append(
            f"production moved: v{production.version} went into production after the candidate was scored "
            "with no version in production"
        )
    elif scored is not None and production is None:
        problems.append(
            f"production moved: the report scored v{scored['version']}, and no version is in production now"
        )
    elif scored is not None and production is not None:
        if scored["version"] != production.version:
            problems.append(
                f"production moved while the candidate was evaluated: the report scored v{scored['version']}, "
                f"production is v{production.version} now"
            )
        elif scored["model_sha256"] and production.model_sha256 and scored["model_sha256"] != production.model_sha256:
            problems.append(
                f"the report scored a model.onnx (sha256 {scored['model_sha256']}) other than production "
                f"v{production.version}'s registered one ({production.model_sha256})"
            )
    claimed = report["candidate"]
    if claimed["model_sha256"] and candidate.model_sha256 and claimed["model_sha256"] != candidate.model_sha256:
        problems.append(
            f"the report scored a model.onnx (sha256 {claimed['model_sha256']}) other than the run's verified one "
            f"({candidate.model_sha256})"
        )
    if claimed["run_id"] and claimed["run_id"] != candidate.run_id:
        problems.append(f"the report belongs to run {claimed['run_id']}, not to {candidate.run_id}")
    return problems


def _score(
    decision: dict[str, Any],
    policy: dict[str, Any],
    candidate: Candidate,
    production: Production | None,
    report: dict[str, Any],
) -> list[str]:
    """Fill the decision's numbers and conditions from the report; returns why the gate cannot decide, if it cannot."""
    scoring = _Scoring(policy, report)
    if scoring.entities != (scoring.metric == comparison.ENTITY_METRIC):
        kind = "a token_classification report (entity counts)" if scoring.entities else "a classification report"
        return [f"the policy's primary_metric {scoring.metric} cannot be computed from {kind}"]
    candidate_scores = scoring.scores(report["candidate"])
    baselines = {name: scoring.scores(scored) for name, scored in sorted(report["baselines"].items())}
    decision["evaluation_set"] = dict(report["evaluation_set"])
    decision["candidate"]["metrics"] = candidate_scores
    decision["baselines"] = baselines
    classical = baselines.get(CLASSICAL)
    lifted = _lift_metric(scoring.metric)
    decision["baseline_lift"] = None if classical is None else candidate_scores[lifted] - classical[lifted]
    conditions = [scoring.enough_items()]
    scored = report["production"]
    if scored is not None:
        production_scores = scoring.scores(scored)
        decision["production"] = {
            "version": scored["version"],
            "run_id": scored["run_id"],
            "metrics": production_scores,
        }
        conditions.append(scoring.margin(candidate_scores, production_scores, scored["version"]))
        credible, decision["difference"] = scoring.credible(report["candidate"], scored)
        conditions.append(credible)
        conditions.append(scoring.class_regression(candidate_scores, production_scores))
    elif report["production_error"]:
        version = production.version if production is not None else None
        decision["production"] = {
            "version": version,
            "run_id": None,
            "metrics": None,
            "error": report["production_error"],
        }
    conditions.append(scoring.floor(candidate_scores, baselines))
    decision["conditions"] = conditions
    return _production_problems(report, production, candidate)


def decide(
    policy: dict[str, Any], candidate: Candidate, production: Production | None, evaluation: Evaluation
) -> dict[str, Any]:
    """The gate's decision for `candidate` against what is in `production` now (None when nothing is)."""
    ref = evaluation.ref
    decision: dict[str, Any] = {
        "evaluation_set": None,
        "report": None if ref is None else {key: ref[key] for key in ("bucket", "key", "sha256")},
        "candidate": {"version": candidate.version, "run_id": candidate.run_id, "metrics": None},
        "production": None,
        "baselines": {},
        "difference": None,
        "baseline_lift": None,
        "conditions": [],
        "policy": dict(policy),
        "decided_at": datetime.now(UTC).isoformat(),
    }
    if evaluation.report is None:
        blockers = [str(evaluation.problem)]
    else:
        blockers = _score(decision, policy, candidate, production, evaluation.report)
    failed = [condition for condition in decision["conditions"] if not condition["passed"]]
    if blockers:
        verdict = f"the gate cannot decide: {'; '.join(blockers)}; a person decides"
    elif failed:
        verdict = "refused by " + "; ".join(f"({c['id']}) {c['name']}: {c['detail']}" for c in failed)
    elif production is None:
        verdict = f"no version is in production yet; v{candidate.version} passes every condition it faces"
    else:
        verdict = f"v{candidate.version} passes every condition against production v{production.version}"
    if not policy["auto_promote"]:
        outcome, reason = STAGING, f"automatic promotion is off for this model; promote by hand ({verdict})"
    elif production is not None and production.canary:
        outcome = STAGING
        reason = f"production is running a canary; automatic promotion waits until it ends ({verdict})"
    elif blockers or failed:
        outcome, reason = STAGING, verdict
    else:
        outcome, reason = PRODUCTION, verdict
    return {**decision, "outcome": outcome, "reason": reason}


def summary(decision: dict[str, Any]) -> str:
    """The decision in one readable paragraph: the audit log's and the model.promoted event's reason."""
    candidate = decision["candidate"]
    parts = [f"v{candidate['version']} -> {decision['outcome']}: {decision['reason']}."]
    evaluation_set = decision["evaluation_set"]
    if evaluation_set is not None:
        metric = decision["policy"]["primary_metric"]
        scored = (
            f" Scored on the {evaluation_set['split']} split of snapshot {evaluation_set['snapshot_id']} "
            f"({evaluation_set['items']} items, sha256 {evaluation_set['sha256'][:12]}): "
            f"{metric} {candidate['metrics'][metric]:.4f}"
        )
        production = decision["production"]
        if production is not None and production.get("metrics"):
            scored += (
                f" vs production v{production['version']} {production['metrics'][metric]:.4f} (recomputed on this set)"
            )
        difference = decision["difference"]
        if difference is not None and difference["ci_low"] is not None:
            scored += (
                f", difference {difference['value']:+.4f}, {_percent(difference['confidence'])} interval "
                f"[{difference['ci_low']:+.4f}, {difference['ci_high']:+.4f}]"
            )
        if decision.get("baseline_lift") is not None:
            scored += f"; {_lift_metric(metric)} lift over the classical baseline {decision['baseline_lift']:+.4f}"
        parts.append(scored + ".")
    if decision["conditions"]:
        each = "; ".join(
            f"({c['id']}) {c['name']} {'passed' if c['passed'] else 'FAILED'}" for c in decision["conditions"]
        )
        parts.append(f" Conditions: {each}.")
    return "".join(parts)


def _lift_metric(metric: str) -> str:
    """What `baseline_lift` measures: entity F1 for a token model, macro-F1 for a classifier."""
    return comparison.ENTITY_METRIC if metric == comparison.ENTITY_METRIC else "macro_f1"


def _production(session: Session, model: RegisteredModel) -> Production | None:
    current = get_alias(session, model.id, PRODUCTION)
    if current is None:
        return None
    row = session.scalar(
        select(ModelVersion).where(ModelVersion.model_id == model.id, ModelVersion.version == current.version)
    )
    sha256 = None if row is None else (row.artifacts.get("model.onnx") or {}).get("sha256")
    return Production(current.version, sha256, canary=bool(current.weights))


def gate_new_version(
    session: Session,
    model: RegisteredModel,
    candidate: ModelVersion,
    evaluation: Evaluation,
    *,
    publish: Publish,
    trace_id: str | None,
) -> dict[str, Any]:
    """Decide where a just-registered version goes, move that alias, and record the decision on the version.

    The caller holds the model's row lock, so the production version read here is the one being replaced.
    """
    production = _production(session, model)
    decision = decide(
        model.policy(),
        Candidate(candidate.version, candidate.run_id, (candidate.artifacts.get("model.onnx") or {}).get("sha256")),
        production,
        evaluation,
    )
    candidate.decision = decision
    metric = decision["policy"]["primary_metric"]
    difference = decision["difference"] or {}
    log.info(
        "promotion_decided",
        model_name=model.name,
        version=candidate.version,
        outcome=decision["outcome"],
        metric=metric,
        candidate_value=(decision["candidate"]["metrics"] or {}).get(metric),
        production_version=production.version if production is not None else None,
        production_value=((decision["production"] or {}).get("metrics") or {}).get(metric),
        difference=difference.get("value"),
        baseline_lift=decision["baseline_lift"],
        ci_low=difference.get("ci_low"),
        ci_high=difference.get("ci_high"),
        evaluation_items=(decision["evaluation_set"] or {}).get("items"),
        failed=[c["name"] for c in decision["conditions"] if not c["passed"]],
        reason=decision["reason"],
    )
    change_alias(
        session,
        model,
        decision["outcome"],
        version=candidate.version,
        weights={},
        action="auto_promote" if decision["outcome"] == PRODUCTION else "auto_stage",
        actor=POLICY_ACTOR,
        reason=f"promotion gate: {summary(decision)}",
        trace_id=trace_id,
        publish=publish,
    )
    return decision
