"""Ingestion's HTTP API: partners and keys (internal token), datasets and pushes (partner key)."""

from __future__ import annotations

from typing import Any

from flask import current_app
from flask_smorest import Blueprint
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from services.ingestion.models import ApiKey, Dataset, Partner, utcnow
from services.ingestion.push import push_text_items
from services.ingestion.schemas import (
    ApiKeySchema,
    DatasetCreateSchema,
    DatasetSchema,
    IssuedKeySchema,
    KeyListSchema,
    KeyPrincipalSchema,
    KeyVerifySchema,
    PartnerCreateSchema,
    PartnerListSchema,
    PushResultSchema,
    PushSchema,
)
from shared.auth import current_principal, generate_api_key, hash_api_key, require_internal, require_partner
from shared.errors import Conflict, NotFound
from shared.logging import get_logger
from shared.runtime import Runtime

log = get_logger(__name__)

partners = Blueprint("partners", __name__, url_prefix="/v1/partners", description="Partners and API keys")
internal = Blueprint("internal", __name__, url_prefix="/v1/internal", description="Service-to-service calls")
datasets = Blueprint("datasets", __name__, url_prefix="/v1/datasets", description="Datasets and pushes")


def _runtime() -> Runtime:
    return current_app.extensions["flywheel"]


def _issue_key(session: Any, partner: Partner) -> tuple[ApiKey, str]:
    secret = generate_api_key()
    key = ApiKey(partner_id=partner.id, key_hash=hash_api_key(secret), prefix=secret[:10])
    session.add(key)
    session.flush()
    return key, secret


@partners.post("")
@require_internal
@partners.arguments(PartnerCreateSchema)
@partners.response(201, IssuedKeySchema)
def create_partner(body: dict[str, Any]) -> dict[str, Any]:
    try:
        with _runtime().db.session() as session:
            partner = Partner(name=body["name"])
            session.add(partner)
            session.flush()
            key, secret = _issue_key(session, partner)
    except IntegrityError as exc:
        raise Conflict(f"a partner named {body['name']!r} already exists") from exc
    log.info("partner_created", partner_id=partner.id, key_id=key.id)
    return {"partner": partner, "key": key, "api_key": secret}


@partners.get("")
@require_internal
@partners.response(200, PartnerListSchema)
def list_partners() -> dict[str, Any]:
    with _runtime().db.session() as session:
        return {"partners": session.scalars(select(Partner).order_by(Partner.created_at)).all()}


def _partner(session: Any, partner_id: str) -> Partner:
    partner = session.get(Partner, partner_id)
    if partner is None:
        raise NotFound(f"partner {partner_id} does not exist")
    return partner


@partners.get("/<partner_id>/keys")
@require_internal
@partners.response(200, KeyListSchema)
def list_keys(partner_id: str) -> dict[str, Any]:
    with _runtime().db.session() as session:
        _partner(session, partner_id)
        keys = session.scalars(select(ApiKey).where(ApiKey.partner_id == partner_id).order_by(ApiKey.created_at))
        return {"keys": keys.all()}


@partners.post("/<partner_id>/keys")
@require_internal
@partners.response(201, IssuedKeySchema)
def rotate_key(partner_id: str) -> dict[str, Any]:
    """Issue an additional key; revoke the old one once the partner has switched over."""
    with _runtime().db.session() as session:
        partner = _partner(session, partner_id)
        key, secret = _issue_key(session, partner)
    log.info("api_key_issued", partner_id=partner_id, key_id=key.id)
    return {"partner": partner, "key": key, "api_key": secret}


@partners.delete("/<partner_id>/keys/<key_id>")
@require_internal
@partners.response(200, ApiKeySchema)
def revoke_key(partner_id: str, key_id: str) -> ApiKey:
    runtime = _runtime()
    with runtime.db.session() as session:
        key = session.get(ApiKey, key_id)
        if key is None or key.partner_id != partner_id:
            raise NotFound(f"key {key_id} does not exist for partner {partner_id}")
        if key.revoked_at is None:
            key.revoked_at = utcnow()
    runtime.keys.forget(key.key_hash)
    log.info("api_key_revoked", partner_id=partner_id, key_id=key_id)
    return key


@internal.post("/keys/verify")
@require_internal
@internal.arguments(KeyVerifySchema)
@internal.response(200, KeyPrincipalSchema)
def verify_key(body: dict[str, Any]) -> dict[str, Any]:
    principal = lookup_key(_runtime(), body["key_hash"])
    if principal is None:
        raise NotFound("no active key has that hash")
    return {"tenant": principal.tenant, "key_id": principal.key_id}


def lookup_key(runtime: Runtime, key_hash: str):
    from shared.auth import Principal

    with runtime.db.session() as session:
        key = session.scalar(select(ApiKey).where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None)))
        return None if key is None else Principal(tenant=key.partner_id, key_id=key.id)


@datasets.post("")
@require_partner
@datasets.arguments(DatasetCreateSchema)
@datasets.response(201, DatasetSchema)
def create_dataset(body: dict[str, Any]) -> Dataset:
    runtime = _runtime()
    tenant = current_principal().tenant
    try:
        with runtime.db.session() as session:
            dataset = Dataset(tenant=tenant, **body)
            session.add(dataset)
            session.flush()
            runtime.bus.publish(session, "dataset.changed", {"dataset": dataset.config()}, tenant=tenant)
    except IntegrityError as exc:
        raise Conflict(f"you already have a dataset named {body['name']!r}") from exc
    log.info("dataset_created", dataset_id=dataset.id, task_type=dataset.task_type)
    return dataset


def tenant_dataset(runtime: Runtime, dataset_id: str) -> Dataset:
    """The caller's dataset; another tenant's id answers 404, exactly like an unknown one."""
    with runtime.db.session() as session:
        dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.tenant != current_principal().tenant:
        raise NotFound(f"dataset {dataset_id} does not exist")
    return dataset


@datasets.get("/<dataset_id>")
@require_partner
@datasets.response(200, DatasetSchema)
def get_dataset(dataset_id: str) -> Dataset:
    return tenant_dataset(_runtime(), dataset_id)


@datasets.post("/<dataset_id>/items")
@require_partner
@datasets.arguments(PushSchema)
@datasets.response(200, PushResultSchema)
def push_items(body: dict[str, Any], dataset_id: str) -> dict[str, Any]:
    runtime = _runtime()
    dataset = tenant_dataset(runtime, dataset_id)
    return push_text_items(runtime, dataset, body["items"]).as_response()
