"""What inference should serve: each model's aliases and every version they point at.

The contract (`GET /v1/internal/serving[/<tenant>/<model_name>]`, internal token), one `<serving>` per model:

    {"tenant", "model_name", "dataset_id", "task_type",
     "aliases": {"<alias>": {"version": int, "weights": {"<version>": percent, …} or {} when not a canary}},
     "versions": {"<version>": {"version": int, "status": "ready"|"archived",
                                "artifacts": {"<filename>": {"bucket", "key", "sha256", "size"}},
                                "metadata": {…metadata.json…}}}}

`versions` holds exactly the versions that some alias (or canary weight) points at. Both endpoints answer only
for models with at least one alias: the list leaves the others out, and the per-model endpoint answers 404 for
a model that has nothing to serve (its last alias was removed, or it does not exist), which tells a replica
to unload it.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from services.registry.models import ModelAlias, ModelVersion, RegisteredModel


def _view(model: RegisteredModel, aliases: list[ModelAlias], versions: list[ModelVersion]) -> dict[str, Any]:
    pointed = set().union(*(alias.versions() for alias in aliases)) if aliases else set()
    return {
        "tenant": model.tenant,
        "model_name": model.name,
        "dataset_id": model.dataset_id,
        "task_type": model.task_type,
        "aliases": {
            alias.name: {"version": alias.version, "weights": dict(alias.weights)}
            for alias in sorted(aliases, key=lambda a: a.name)
        },
        "versions": {
            str(row.version): {
                "version": row.version,
                "status": row.status,
                "artifacts": row.artifacts,
                "metadata": row.model_metadata,
            }
            for row in sorted(versions, key=lambda v: v.version)
            if row.version in pointed
        },
    }


def _views(session: Session, models: list[RegisteredModel]) -> list[dict[str, Any]]:
    ids = [model.id for model in models]
    if not ids:
        return []
    aliases: dict[str, list[ModelAlias]] = defaultdict(list)
    for alias in session.scalars(select(ModelAlias).where(ModelAlias.model_id.in_(ids))):
        aliases[alias.model_id].append(alias)
    numbers = {number for group in aliases.values() for alias in group for number in alias.versions()}
    versions: dict[str, list[ModelVersion]] = defaultdict(list)
    if numbers:
        query = select(ModelVersion).where(ModelVersion.model_id.in_(ids), ModelVersion.version.in_(numbers))
        for row in session.scalars(query):
            versions[row.model_id].append(row)
    return [_view(model, aliases[model.id], versions[model.id]) for model in models]


def serving_for_all(session: Session) -> list[dict[str, Any]]:
    """Every model, of every tenant, that has at least one alias."""
    query = (
        select(RegisteredModel)
        .where(RegisteredModel.id.in_(select(ModelAlias.model_id)))
        .order_by(RegisteredModel.tenant, RegisteredModel.name)
    )
    return _views(session, list(session.scalars(query)))


def serving_for_model(session: Session, tenant: str, model_name: str) -> dict[str, Any] | None:
    """The model's serving view, or None when it does not exist or has no alias (nothing to serve)."""
    model = session.scalar(
        select(RegisteredModel).where(RegisteredModel.tenant == tenant, RegisteredModel.name == model_name)
    )
    if model is None:
        return None
    view = _views(session, [model])[0]
    return view if view["aliases"] else None
