"""Reading the registry: models and versions as the API shows them, filtered, paged and compared.

Filters on tags and metrics run in Python over one model's rows (or one tenant's models): JSON columns do not
filter the same way on SQLite and PostgreSQL, and a model has hundreds of versions, not millions.
"""

from __future__ import annotations

import math
from collections import defaultdict
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from services.registry.aliases import model_aliases
from services.registry.models import ModelAlias, ModelVersion, RegisteredModel
from shared.errors import NotFound


def find_model(session: Session, tenant: str, name: str) -> RegisteredModel:
    """The tenant's model; another tenant's model answers exactly like a missing one."""
    model = session.scalar(
        select(RegisteredModel).where(RegisteredModel.tenant == tenant, RegisteredModel.name == name)
    )
    if model is None:
        raise NotFound(f"model {name!r} does not exist")
    return model


def find_version(session: Session, model: RegisteredModel, number: int) -> ModelVersion:
    row = session.scalar(select(ModelVersion).where(ModelVersion.model_id == model.id, ModelVersion.version == number))
    if row is None:
        raise NotFound(f"version {number} of model {model.name!r} does not exist")
    return row


def matches_tag(tags: dict[str, Any], wanted: str | None) -> bool:
    """`key` matches a tag's presence, `key:value` its value."""
    if not wanted:
        return True
    key, sep, value = wanted.partition(":")
    return key in tags and (not sep or str(tags[key]) == value)


def finite(raw: Any) -> float | None:
    """`raw` as a float when it is a finite number (not a bool), else None."""
    if isinstance(raw, bool) or not isinstance(raw, int | float) or not math.isfinite(raw):
        return None
    return float(raw)


def numeric(metrics: dict[str, Any], name: str) -> float | None:
    return finite(metrics.get(name))


def alias_map(aliases: list[ModelAlias]) -> dict[str, dict[str, Any]]:
    return {alias.name: {"version": alias.version, "weights": dict(alias.weights)} for alias in aliases}


def model_view(model: RegisteredModel, aliases: list[ModelAlias], version_count: int) -> dict[str, Any]:
    return {
        "id": model.id,
        "tenant": model.tenant,
        "name": model.name,
        "dataset_id": model.dataset_id,
        "task_type": model.task_type,
        "description": model.description,
        "tags": dict(model.tags),
        "policy": model.policy(),
        "aliases": alias_map(aliases),
        "latest_version": model.last_version or None,
        "version_count": version_count,
        "created_at": model.created_at,
        "updated_at": model.updated_at,
    }


def version_view(model: RegisteredModel, row: ModelVersion, aliases: list[ModelAlias]) -> dict[str, Any]:
    metadata = row.model_metadata
    return {
        "model_name": model.name,
        "version": row.version,
        "run_id": row.run_id,
        "status": row.status,
        "dataset_id": row.dataset_id,
        "snapshot_id": row.snapshot_id,
        "task_type": metadata.get("task_type"),
        "metrics": row.metrics,
        "lineage": row.lineage,
        "artifacts": row.artifacts,
        "signature": {"inputs": metadata.get("inputs", []), "outputs": metadata.get("outputs", [])},
        "labels": metadata.get("labels", []),
        "preprocessing": metadata.get("preprocessing", {}),
        "opset": metadata.get("opset"),
        "tags": dict(row.tags),
        "aliases": sorted(alias.name for alias in aliases if row.version in alias.versions()),
        "decision": row.decision or None,
        "baseline_lift": finite((row.decision or {}).get("baseline_lift")),
        "created_at": row.created_at,
        "archived_at": row.archived_at,
        "archive_reason": row.archive_reason,
    }


def describe_model(session: Session, model: RegisteredModel) -> dict[str, Any]:
    count = session.scalar(select(func.count()).select_from(ModelVersion).where(ModelVersion.model_id == model.id))
    return model_view(model, model_aliases(session, model.id), count or 0)


def describe_version(session: Session, model: RegisteredModel, row: ModelVersion) -> dict[str, Any]:
    return version_view(model, row, model_aliases(session, model.id))


def list_models(
    session: Session,
    tenant: str,
    *,
    tag: str | None = None,
    alias: str | None = None,
    dataset_id: str | None = None,
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[dict[str, Any]], int]:
    """The tenant's models by name, and how many match in all."""
    query = select(RegisteredModel).where(RegisteredModel.tenant == tenant).order_by(RegisteredModel.name)
    if dataset_id:
        query = query.where(RegisteredModel.dataset_id == dataset_id)
    if alias:
        query = query.where(RegisteredModel.id.in_(select(ModelAlias.model_id).where(ModelAlias.name == alias)))
    models = [model for model in session.scalars(query) if matches_tag(model.tags, tag)]
    page = models[offset : offset + limit]
    ids = [model.id for model in page]
    aliases: dict[str, list[ModelAlias]] = defaultdict(list)
    counts: dict[str, int] = {}
    if ids:
        for row in session.scalars(select(ModelAlias).where(ModelAlias.model_id.in_(ids)).order_by(ModelAlias.name)):
            aliases[row.model_id].append(row)
        counts = dict(
            session.execute(
                select(ModelVersion.model_id, func.count())
                .where(ModelVersion.model_id.in_(ids))
                .group_by(ModelVersion.model_id)
            ).all()
        )
    return [model_view(model, aliases[model.id], counts.get(model.id, 0)) for model in page], len(models)


def list_versions(
    session: Session,
    model: RegisteredModel,
    *,
    tag: str | None = None,
    alias: str | None = None,
    status: str | None = None,
    metric: str | None = None,
    min_metric: float | None = None,
    max_metric: float | None = None,
    order_by: str = "version",
    limit: int = 50,
    offset: int = 0,
) -> tuple[list[dict[str, Any]], int]:
    """The model's versions, newest first (or best first by `metric`), and how many match in all.

    `metric` defaults to the model's primary metric; with a metric bound or `order_by=metric`, versions that
    lack a numeric value for it are left out.
    """
    aliases = model_aliases(session, model.id)
    query = select(ModelVersion).where(ModelVersion.model_id == model.id).order_by(ModelVersion.version.desc())
    if status:
        query = query.where(ModelVersion.status == status)
    if alias:
        pointed = set().union(*(a.versions() for a in aliases if a.name == alias))
        query = query.where(ModelVersion.version.in_(pointed))
    rows = [row for row in session.scalars(query) if matches_tag(row.tags, tag)]
    name = metric or model.primary_metric
    if min_metric is not None or max_metric is not None or order_by == "metric":
        rows = [row for row in rows if numeric(row.metrics, name) is not None]
    if min_metric is not None:
        rows = [row for row in rows if numeric(row.metrics, name) >= min_metric]  # type: ignore[operator]
    if max_metric is not None:
        rows = [row for row in rows if numeric(row.metrics, name) <= max_metric]  # type: ignore[operator]
    if order_by == "metric":
        rows.sort(key=lambda row: (-numeric(row.metrics, name), -row.version))  # type: ignore[operator]
    page = rows[offset : offset + limit]
    return [version_view(model, row, aliases) for row in page], len(rows)


def flatten_metrics(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested metric dicts (per-class scores) as dotted names: {"per_class": {"pos": {"f1": …}}} → per_class.pos.f1."""
    flat: dict[str, Any] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_metrics(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _own_evaluation(row: ModelVersion) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
    """The evaluation set this version's own gate decision scored it on, and its scores there."""
    decision = row.decision or {}
    scores = (decision.get("candidate") or {}).get("metrics")
    if not decision.get("evaluation_set") or not scores:
        return None, None
    return decision["evaluation_set"], scores


def _compared_side(row: ModelVersion) -> dict[str, Any]:
    evaluation_set, scores = _own_evaluation(row)
    return {
        "version": row.version,
        "run_id": row.run_id,
        "snapshot_id": row.snapshot_id,
        "status": row.status,
        "created_at": row.created_at,
        "evaluation_set": evaluation_set,
        "scores": scores,
    }


def _scored_together(
    a: ModelVersion, b: ModelVersion
) -> tuple[dict[str, Any], int | None, dict[str, Any], dict[str, Any]] | None:
    """(the set, the version whose decision scored both, a's scores, b's scores) when both were scored on the
    same items, else None.

    A decision scores its candidate and the production version it would replace, so the newer of the two is the
    one whose decision may have scored the other. Failing that, two versions whose own decisions scored them on
    sets with the same sha256 were scored on the very same items (no one decision scored both: `None`).
    """
    for judge, other in sorted(((a, b), (b, a)), key=lambda pair: -pair[0].version):
        decision = judge.decision or {}
        production = decision.get("production") or {}
        candidate_scores = (decision.get("candidate") or {}).get("metrics")
        if not (decision.get("evaluation_set") and candidate_scores and production.get("metrics")):
            continue
        if production.get("version") == other.version:
            pair = (
                (candidate_scores, production["metrics"]) if judge is a else (production["metrics"], candidate_scores)
            )
            return decision["evaluation_set"], judge.version, *pair
    (set_a, scores_a), (set_b, scores_b) = _own_evaluation(a), _own_evaluation(b)
    if set_a and set_b and set_a["sha256"] == set_b["sha256"]:
        return set_a, None, scores_a, scores_b  # type: ignore[return-value]
    return None


def _delta(a: Any, b: Any) -> float | None:
    value_a, value_b = finite(a), finite(b)
    return None if value_a is None or value_b is None else round(value_b - value_a, 9)


def _shared_evaluation(a: ModelVersion, b: ModelVersion) -> dict[str, Any] | None:
    together = _scored_together(a, b)
    if together is None:
        return None
    evaluation_set, scored_by, scores_a, scores_b = together
    return {
        "evaluation_set": evaluation_set,
        "scored_by": scored_by,
        "metrics": [
            {
                "name": name,
                "a": scores_a.get(name),
                "b": scores_b.get(name),
                "delta": _delta(scores_a.get(name), scores_b.get(name)),
            }
            for name in (("entity_f1", "ece") if "entity_f1" in scores_a else ("accuracy", "macro_f1", "ece"))
        ],
        "per_class": [
            {
                "label": label,
                "support": row["support"],
                "a": row["f1"],
                "b": scores_b["per_class"][label]["f1"],
                "delta": _delta(row["f1"], scores_b["per_class"][label]["f1"]),
            }
            for label, row in scores_a["per_class"].items()
            if label in scores_b["per_class"]
        ],
    }


def compare_versions(model: RegisteredModel, a: ModelVersion, b: ModelVersion) -> dict[str, Any]:
    """Two versions side by side: on one evaluation set when a gate decision scored both, and their own records."""
    flat_a, flat_b = flatten_metrics(a.metrics), flatten_metrics(b.metrics)
    rows = [
        {
            "name": name,
            "a": flat_a.get(name),
            "b": flat_b.get(name),
            "delta": _delta(flat_a.get(name), flat_b.get(name)),
        }
        for name in sorted(set(flat_a) | set(flat_b))
    ]
    evaluation = _shared_evaluation(a, b)
    return {
        "model_name": model.name,
        "primary_metric": model.primary_metric,
        "a": _compared_side(a),
        "b": _compared_side(b),
        "same_evaluation_set": evaluation is not None,
        "evaluation": evaluation,
        "same_validation_split": a.snapshot_id == b.snapshot_id,
        "metrics": rows,
    }
