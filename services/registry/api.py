"""Registry's HTTP API.

Reads (models, versions, compare, download URLs, audit, refused registrations) take a partner key, scoped to the
partner's own models (another tenant's model answers 404), or the internal token with a `tenant` field. Changes
to what serves (promote, canary, rollback, alias removal, archive, promotion policy) need the internal token and
name the tenant in the request. `GET /v1/internal/serving…` tells inference what to serve (internal token).
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from flask import current_app
from flask_smorest import Blueprint
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from services.registry import browse, cost, serving
from services.registry.aliases import (
    Publish,
    change_alias,
    check_alias_name,
    lock_model,
    model_aliases,
    rollback_alias,
    set_alias,
    validation_error,
)
from services.registry.models import (
    ARCHIVED,
    AliasChange,
    RefusedRegistration,
    RegisteredModel,
    primary_metrics_for,
    utcnow,
)
from services.registry.schemas import (
    POLICY_FIELDS,
    AliasChangeResultSchema,
    AliasDeleteQuery,
    AliasUpdateSchema,
    ArchiveSchema,
    AuditListSchema,
    AuditQuery,
    CompareQuery,
    CompareSchema,
    DownloadQuery,
    DownloadSchema,
    ModelListQuery,
    ModelListSchema,
    ModelSchema,
    ModelUpdateSchema,
    PolicyUpdateSchema,
    RefusalListSchema,
    RefusalQuery,
    RollbackSchema,
    ServingListSchema,
    ServingSchema,
    TenantQuery,
    VersionListQuery,
    VersionListSchema,
    VersionSchema,
    VersionUpdateSchema,
)
from shared.auth import current_principal, require_internal, require_partner_or_internal, requires_scope
from shared.errors import Conflict, NotFound
from shared.logging import current_trace_id, get_logger
from shared.runtime import Runtime
from shared.storage import ObjectNotFound

log = get_logger(__name__)

models = Blueprint("registry_models", __name__, url_prefix="/v1/models", description="Models, versions, aliases")
refusals = Blueprint(
    "registry_refusals", __name__, url_prefix="/v1/refused-registrations", description="Runs not registered, and why"
)
internal = Blueprint("registry_internal", __name__, url_prefix="/v1/internal", description="What inference serves")

POLICY_COLUMNS = {"margin": "promotion_margin"}
"""Policy fields stored under another column name; the others are columns of the same name."""


def _runtime() -> Runtime:
    return current_app.extensions["flywheel"]


def _tenant(explicit: str | None) -> str:
    """The tenant a request acts on: a partner's own, or the one the internal token names."""
    principal = current_principal()
    if principal.internal:
        if not explicit:
            raise validation_error("tenant", "required with the internal token")
        return explicit
    if explicit and explicit != principal.tenant:
        raise NotFound(f"tenant {explicit!r} does not exist")
    return principal.tenant


def _actor(claimed: str | None = None) -> str:
    """Who made a change, for the audit log: the credential used, plus whom the caller says it acts for."""
    principal = current_principal()
    who = "internal-token" if principal.internal else f"partner:{principal.tenant}:{principal.key_id}"
    return f"{who}:{claimed}" if claimed else who


def _publisher(session: Session, tenant: str) -> Publish:
    runtime = _runtime()
    return lambda event_type, payload: runtime.bus.publish(session, event_type, payload, tenant=tenant)


def _next_offset(offset: int, count: int, total: int) -> int | None:
    return offset + count if offset + count < total else None


def _change_view(model: RegisteredModel, change: AliasChange) -> dict[str, Any]:
    return {
        "id": change.id,
        "model_name": model.name,
        "alias": change.alias,
        "action": change.action,
        "from_version": change.from_version,
        "from_weights": change.from_weights,
        "to_version": change.to_version,
        "to_weights": change.to_weights,
        "actor": change.actor,
        "reason": change.reason,
        "trace_id": change.trace_id,
        "created_at": change.created_at,
    }


def _change_result(session: Session, model: RegisteredModel, change: AliasChange | None) -> dict[str, Any]:
    return {
        "changed": change is not None,
        "change": None if change is None else _change_view(model, change),
        "model": browse.describe_model(session, model),
    }


# -- models ------------------------------------------------------------------------------------------------


@models.get("")
@require_partner_or_internal
@requires_scope("read")
@models.arguments(ModelListQuery, location="query")
@models.response(200, ModelListSchema)
def list_models(query: dict[str, Any]) -> dict[str, Any]:
    """The tenant's models with their aliases, filtered by tag, alias or dataset, paged by offset."""
    tenant = _tenant(query["tenant"])
    with _runtime().db.session() as session:
        page, total = browse.list_models(
            session,
            tenant,
            tag=query["tag"],
            alias=query["alias"],
            dataset_id=query["dataset_id"],
            limit=query["limit"],
            offset=query["offset"],
        )
    return {"models": page, "total": total, "next_offset": _next_offset(query["offset"], len(page), total)}


@models.get("/<model_name>")
@require_partner_or_internal
@requires_scope("read")
@models.arguments(TenantQuery, location="query")
@models.response(200, ModelSchema)
def get_model(query: dict[str, Any], model_name: str) -> dict[str, Any]:
    with _runtime().db.session() as session:
        return browse.describe_model(session, browse.find_model(session, _tenant(query["tenant"]), model_name))


@models.patch("/<model_name>")
@require_partner_or_internal
@requires_scope("admin")
@models.arguments(ModelUpdateSchema)
@models.response(200, ModelSchema)
def update_model(body: dict[str, Any], model_name: str) -> dict[str, Any]:
    """Change the model's description or replace its tags."""
    with _runtime().db.session() as session:
        model = lock_model(session, _tenant(body.get("tenant")), model_name)
        if "description" in body:
            model.description = body["description"]
        if "tags" in body:
            model.tags = dict(body["tags"])
        session.flush()
        log.info("model_updated", model_name=model_name, fields=sorted(set(body) - {"tenant"}), actor=_actor())
        return browse.describe_model(session, model)


@models.put("/<model_name>/policy")
@require_internal
@models.arguments(PolicyUpdateSchema)
@models.response(200, ModelSchema)
def update_policy(body: dict[str, Any], model_name: str) -> dict[str, Any]:
    """The promotion gate's policy: the fields given change, the others keep their value.

    `primary_metric` (`macro_f1` or `accuracy` for a classifier, `entity_f1` for a token_classification model:
    another answers 422), `margin`, `confidence`, `max_class_regression`, `min_score` (null: the baseline `floor`
    names, `majority` or `classical_baseline`), `min_test_items`, `bootstrap_samples`, `auto_promote`; each is
    described in the schema. The retired `require_same_split`, and any unknown field, is refused with 422.
    """
    with _runtime().db.session() as session:
        model = lock_model(session, body["tenant"], model_name)
        allowed = primary_metrics_for(model.task_type)
        if "primary_metric" in body and body["primary_metric"] not in allowed:
            raise validation_error(
                "primary_metric",
                f"a {model.task_type} model is compared on {' or '.join(allowed)}, not {body['primary_metric']}",
            )
        before = model.policy()
        for name in POLICY_FIELDS:
            if name in body:
                setattr(model, POLICY_COLUMNS.get(name, name), body[name])
        session.flush()
        log.info(
            "promotion_policy_updated",
            model_name=model_name,
            tenant=model.tenant,
            before=before,
            after=model.policy(),
            actor=_actor(body["actor"]),
        )
        return browse.describe_model(session, model)


# -- versions ----------------------------------------------------------------------------------------------


@models.get("/<model_name>/versions")
@require_partner_or_internal
@requires_scope("read")
@models.arguments(VersionListQuery, location="query")
@models.response(200, VersionListSchema)
def list_versions(query: dict[str, Any], model_name: str) -> dict[str, Any]:
    """Versions newest first, or best first with `order_by=metric`; filtered by tag, alias, status, metric."""
    with _runtime().db.session() as session:
        model = browse.find_model(session, _tenant(query["tenant"]), model_name)
        page, total = browse.list_versions(
            session,
            model,
            tag=query["tag"],
            alias=query["alias"],
            status=query["status"],
            metric=query["metric"],
            min_metric=query["min_metric"],
            max_metric=query["max_metric"],
            order_by=query["order_by"],
            limit=query["limit"],
            offset=query["offset"],
        )
    return {"versions": page, "total": total, "next_offset": _next_offset(query["offset"], len(page), total)}


@models.get("/<model_name>/versions/<int:version>")
@require_partner_or_internal
@requires_scope("read")
@models.arguments(TenantQuery, location="query")
@models.response(200, VersionSchema)
def get_version(query: dict[str, Any], model_name: str, version: int) -> dict[str, Any]:
    """One version: metrics, lineage, verified files, signature, labels, preprocessing, gate decision, and its
    `cost`: what it cost to train, what it costs to serve at current traffic, and what it gained."""
    tenant = _tenant(query["tenant"])
    with _runtime().db.session() as session:
        model = browse.find_model(session, tenant, model_name)
        view = browse.describe_version(session, model, browse.find_version(session, model, version))
    return view | {"cost": cost.version_cost(_runtime(), tenant, view)}


@models.patch("/<model_name>/versions/<int:version>")
@require_partner_or_internal
@requires_scope("admin")
@models.arguments(VersionUpdateSchema)
@models.response(200, VersionSchema)
def update_version(body: dict[str, Any], model_name: str, version: int) -> dict[str, Any]:
    """Replace a version's tags."""
    with _runtime().db.session() as session:
        model = lock_model(session, _tenant(body.get("tenant")), model_name)
        row = browse.find_version(session, model, version)
        row.tags = dict(body["tags"])
        session.flush()
        log.info("model_version_tagged", model_name=model_name, version=version, tags=row.tags, actor=_actor())
        return browse.describe_version(session, model, row)


@models.get("/<model_name>/compare")
@require_partner_or_internal
@requires_scope("read")
@models.arguments(CompareQuery, location="query")
@models.response(200, CompareSchema)
def compare(query: dict[str, Any], model_name: str) -> dict[str, Any]:
    """Two versions side by side: per class on the same evaluation set when one's gate decision scored the other.

    `evaluation` holds both versions' scores on that set (`b - a` per metric and per class) and names it; it is
    null when no decision scored the two on the same items, and each side then shows its own evaluation set and
    scores. `metrics` lists each version's own training record, flattened.
    """
    with _runtime().db.session() as session:
        model = browse.find_model(session, _tenant(query["tenant"]), model_name)
        a = browse.find_version(session, model, query["a"])
        b = browse.find_version(session, model, query["b"])
        return browse.compare_versions(model, a, b)


@models.get("/<model_name>/versions/<int:version>/download")
@require_partner_or_internal
@requires_scope("read")
@models.arguments(DownloadQuery, location="query")
@models.response(200, DownloadSchema)
def download(query: dict[str, Any], model_name: str, version: int) -> dict[str, Any]:
    """Short-lived URLs (presigned on S3) for each of the version's files, with the sha256 to check them by."""
    runtime = _runtime()
    with runtime.db.session() as session:
        model = browse.find_model(session, _tenant(query["tenant"]), model_name)
        row = browse.find_version(session, model, version)
    expires = timedelta(seconds=query["expires_in"])
    files = {}
    for name, ref in sorted(row.artifacts.items()):
        try:
            url = runtime.storage.url(ref["bucket"], ref["key"], expires)
        except ObjectNotFound as exc:
            raise NotFound(f"file {name} of version {version} is no longer in object storage") from exc
        files[name] = {"url": url, "sha256": ref["sha256"], "size": ref["size"]}
    log.info("model_download_issued", model_name=model_name, version=version, expires_in=query["expires_in"])
    return {
        "model_name": model_name,
        "version": version,
        "expires_at": datetime.now(UTC) + expires,
        "files": files,
    }


@models.post("/<model_name>/versions/<int:version>/archive")
@require_internal
@models.arguments(ArchiveSchema)
@models.response(200, VersionSchema)
def archive(body: dict[str, Any], model_name: str, version: int) -> dict[str, Any]:
    """Retire a version; refused (409) while any alias or canary weight points at it. Files are kept."""
    with _runtime().db.session() as session:
        model = lock_model(session, body["tenant"], model_name)
        row = browse.find_version(session, model, version)
        if row.status == ARCHIVED:
            return browse.describe_version(session, model, row)
        pointing = [alias.name for alias in model_aliases(session, model.id) if version in alias.versions()]
        if pointing:
            raise Conflict(
                f"version {version} of model {model_name!r} cannot be archived: alias "
                f"{', '.join(pointing)} points at it; move the alias first",
                {"aliases": pointing},
            )
        row.status = ARCHIVED
        row.archived_at = utcnow()
        row.archive_reason = body["reason"]
        session.flush()
        log.info(
            "model_version_archived",
            model_name=model_name,
            tenant=model.tenant,
            version=version,
            reason=body["reason"],
            actor=_actor(body["actor"]),
        )
        return browse.describe_version(session, model, row)


# -- aliases -----------------------------------------------------------------------------------------------


@models.put("/<model_name>/aliases/<alias>")
@require_internal
@models.arguments(AliasUpdateSchema)
@models.response(200, AliasChangeResultSchema)
def put_alias(body: dict[str, Any], model_name: str, alias: str) -> dict[str, Any]:
    """Promote: point the alias at `version`; or start a canary with `weights` ({"3": 90, "4": 10}).

    Audited and announced with `model.promoted`; a request that changes nothing answers `changed: false`.
    """
    check_alias_name(alias)
    with _runtime().db.session() as session:
        model = lock_model(session, body["tenant"], model_name)
        change = set_alias(
            session,
            model,
            alias,
            version=body.get("version"),
            weights=body.get("weights"),
            actor=_actor(body["actor"]),
            reason=body["reason"],
            trace_id=current_trace_id(),
            publish=_publisher(session, model.tenant),
        )
        return _change_result(session, model, change)


@models.delete("/<model_name>/aliases/<alias>")
@require_internal
@models.arguments(AliasDeleteQuery, location="query")
@models.response(200, AliasChangeResultSchema)
def delete_alias(query: dict[str, Any], model_name: str, alias: str) -> dict[str, Any]:
    """Remove an alias; `model.promoted` carries `version: null`."""
    check_alias_name(alias)
    with _runtime().db.session() as session:
        model = lock_model(session, query["tenant"], model_name)
        change = change_alias(
            session,
            model,
            alias,
            version=None,
            weights={},
            action="remove",
            actor=_actor(query["actor"]),
            reason=query["reason"],
            trace_id=current_trace_id(),
            publish=_publisher(session, model.tenant),
        )
        return _change_result(session, model, change)


@models.post("/<model_name>/rollback")
@require_internal
@models.arguments(RollbackSchema)
@models.response(200, AliasChangeResultSchema)
def rollback(body: dict[str, Any], model_name: str) -> dict[str, Any]:
    """One call: put `production` (or `alias`) back on the version it pointed at before its current one."""
    alias = check_alias_name(body["alias"])
    with _runtime().db.session() as session:
        model = lock_model(session, body["tenant"], model_name)
        change = rollback_alias(
            session,
            model,
            alias,
            actor=_actor(body["actor"]),
            reason=body["reason"],
            trace_id=current_trace_id(),
            publish=_publisher(session, model.tenant),
        )
        return _change_result(session, model, change)


@models.get("/<model_name>/audit")
@require_partner_or_internal
@requires_scope("read")
@models.arguments(AuditQuery, location="query")
@models.response(200, AuditListSchema)
def audit(query: dict[str, Any], model_name: str) -> dict[str, Any]:
    """Every alias change of the model, newest first: who, when, from, to, why."""
    with _runtime().db.session() as session:
        model = browse.find_model(session, _tenant(query["tenant"]), model_name)
        condition = [AliasChange.model_id == model.id]
        if query["alias"]:
            condition.append(AliasChange.alias == query["alias"])
        total = session.scalar(select(func.count()).select_from(AliasChange).where(*condition)) or 0
        changes = session.scalars(
            select(AliasChange)
            .where(*condition)
            .order_by(AliasChange.id.desc())
            .offset(query["offset"])
            .limit(query["limit"])
        ).all()
        page = [_change_view(model, change) for change in changes]
    return {"changes": page, "total": total, "next_offset": _next_offset(query["offset"], len(page), total)}


# -- refused registrations ---------------------------------------------------------------------------------


@refusals.get("")
@require_partner_or_internal
@requires_scope("read")
@refusals.arguments(RefusalQuery, location="query")
@refusals.response(200, RefusalListSchema)
def list_refusals(query: dict[str, Any]) -> dict[str, Any]:
    """Training runs the registry refused to register (a file failed verification, say), newest first."""
    condition = [RefusedRegistration.tenant == _tenant(query["tenant"])]
    if query["model_name"]:
        condition.append(RefusedRegistration.model_name == query["model_name"])
    with _runtime().db.session() as session:
        total = session.scalar(select(func.count()).select_from(RefusedRegistration).where(*condition)) or 0
        rows = session.scalars(
            select(RefusedRegistration)
            .where(*condition)
            .order_by(RefusedRegistration.id.desc())
            .offset(query["offset"])
            .limit(query["limit"])
        ).all()
    return {"refusals": rows, "total": total, "next_offset": _next_offset(query["offset"], len(rows), total)}


# -- serving (inference reads this) ------------------------------------------------------------------------


@internal.get("/serving")
@require_internal
@internal.response(200, ServingListSchema)
def serving_all() -> dict[str, Any]:
    """Every model of every tenant that has at least one alias, with the versions its aliases point at."""
    with _runtime().db.session() as session:
        return {"models": serving.serving_for_all(session)}


@internal.get("/serving/<tenant>/<model_name>")
@require_internal
@internal.response(200, ServingSchema)
def serving_one(tenant: str, model_name: str) -> dict[str, Any]:
    """One model's aliases and served versions; 404 when it has nothing to serve (no alias) or does not exist."""
    with _runtime().db.session() as session:
        view = serving.serving_for_model(session, tenant, model_name)
    if view is None:
        raise NotFound(f"model {model_name!r} of tenant {tenant!r} has nothing to serve (no alias, or no such model)")
    return view
