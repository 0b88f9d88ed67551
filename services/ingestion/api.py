"""Ingestion's HTTP API: partners and keys (internal token); datasets, pushes, imports, items, usage (partner key).

The internal token also lists datasets (every tenant's, or one's), so that an operator's console can show them."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from flask import Response, current_app, g, request
from flask_smorest import Blueprint
from marshmallow import ValidationError
from sqlalchemy import or_, select, update
from sqlalchemy.exc import IntegrityError

from services.ingestion import erasure, idempotency, imports, invoices, items, metering, model_cost, pii, quotas
from services.ingestion.images import InvalidImage, prepare_image
from services.ingestion.ingest import Candidate, ingest_batch, text_candidate
from services.ingestion.models import ApiKey, Dataset, Import, Partner, utcnow
from services.ingestion.schemas import (
    PII_MODEL_UNAVAILABLE,
    ApiKeySchema,
    DatasetCreateSchema,
    DatasetListQuery,
    DatasetListSchema,
    DatasetSchema,
    DatasetUpdateSchema,
    DownloadQuery,
    DownloadSchema,
    ErasureListQuery,
    ErasureListSchema,
    ErasureSchema,
    ImportSchema,
    InvoiceListSchema,
    InvoiceQuery,
    IssuedKeySchema,
    ItemListQuery,
    ItemListSchema,
    ItemRetentionSchema,
    ItemSchema,
    KeyIssueSchema,
    KeyListSchema,
    KeyPrincipalSchema,
    KeyVerifySchema,
    MeterReportSchema,
    ModelCostQuery,
    ModelCostSchema,
    OperatorUsageQuery,
    PartnerCreateSchema,
    PartnerListSchema,
    PartnerSchema,
    PartnerUpdateSchema,
    PushResultSchema,
    PushSchema,
    TenantLimitsSchema,
    UsageExportQuery,
    UsageQuery,
    UsageSchema,
)
from shared import json_input
from shared.auth import (
    SCOPES,
    Principal,
    current_principal,
    generate_api_key,
    hash_api_key,
    normalise_scopes,
    require_internal,
    require_partner,
    require_partner_or_delegated,
    require_partner_or_internal,
    requires_scope,
)
from shared.errors import Conflict, NotFound, PayloadTooLarge, Unprocessable
from shared.logging import get_logger
from shared.ratelimit import TOO_MANY_REQUESTS
from shared.runtime import Runtime
from shared.schemas import PRINTABLE, ErrorSchema

log = get_logger(__name__)

PUSH_MAX_ITEMS = 1000
KIND_OF_TASK = {"text_classification": "text", "image_classification": "image", "token_classification": "text"}

partners = Blueprint("partners", __name__, url_prefix="/v1/partners", description="Partners and API keys")
internal = Blueprint("internal", __name__, url_prefix="/v1/internal", description="Service-to-service calls")
datasets = Blueprint("datasets", __name__, url_prefix="/v1/datasets", description="Datasets, pushes and imports")
item_routes = Blueprint("items", __name__, url_prefix="/v1", description="Items, imports and usage")
billing = Blueprint("billing", __name__, url_prefix="/v1/billing", description="Usage across tenants (operators)")


def _runtime() -> Runtime:
    return current_app.extensions["flywheel"]


def _tenant() -> str:
    return current_principal().tenant


# -- partners and keys (operators) -----------------------------------------------------------------------


LAST_USED_RESOLUTION = timedelta(minutes=1)
"""A key's `last_used_at` is written at most this often (and only when a key check misses the caches)."""


def _issue_key(
    session: Any,
    partner: Partner,
    scopes: list[str] | None = None,
    expires_at: datetime | None = None,
    replaces: str | None = None,
) -> tuple[ApiKey, str]:
    secret = generate_api_key()
    key = ApiKey(
        partner_id=partner.id,
        key_hash=hash_api_key(secret),
        prefix=secret[:10],
        scopes=[scope for scope in SCOPES if scope in set(scopes)] if scopes is not None else list(SCOPES),
        expires_at=expires_at,
        replaces=replaces,
    )
    session.add(key)
    session.flush()
    return key, secret


def _aware(moment: datetime | None) -> datetime | None:
    """SQLite hands timestamps back naive; every one we store is UTC."""
    return moment.replace(tzinfo=UTC) if moment is not None and moment.tzinfo is None else moment


@partners.post("")
@require_internal
@partners.arguments(PartnerCreateSchema)
@partners.response(201, IssuedKeySchema)
def create_partner(body: dict[str, Any]) -> dict[str, Any]:
    """Create a partner (a tenant) and its first API key, shown once."""
    try:
        with _runtime().db.session() as session:
            partner = Partner(**body)
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


@partners.patch("/<partner_id>")
@require_internal
@partners.arguments(PartnerUpdateSchema)
@partners.response(200, PartnerSchema)
def update_partner(body: dict[str, Any], partner_id: str) -> Partner:
    """Set a partner's daily quotas (null: unlimited)."""
    with _runtime().db.session() as session:
        partner = _partner(session, partner_id)
        for field, value in body.items():
            setattr(partner, field, value)
    log.info("partner_updated", partner_id=partner_id, **body)
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
@partners.arguments(KeyIssueSchema, required=False)
@partners.response(201, IssuedKeySchema)
def rotate_key(body: dict[str, Any], partner_id: str) -> dict[str, Any]:
    """Issue an additional key, with `scopes` and an optional `expires_at`. Rotation without downtime: name the old
    key in `replaces` and it keeps working for `grace_seconds` (default a day), then expires; both are live
    meanwhile. Without `replaces`, revoke the old key once the partner has switched over."""
    runtime = _runtime()
    now = utcnow()
    expires_at = _aware(body.get("expires_at"))
    if expires_at is not None and expires_at <= now:
        raise Unprocessable("expires_at must be in the future", {"fields": {"expires_at": ["in the past"]}})
    retired: ApiKey | None = None
    with runtime.db.session() as session:
        partner = _partner(session, partner_id)
        scopes = body.get("scopes")
        if body.get("replaces"):
            retired = session.get(ApiKey, body["replaces"])
            if retired is None or retired.partner_id != partner_id or retired.revoked_at is not None:
                raise NotFound(f"key {body['replaces']} is not a live key of partner {partner_id}")
            grace_end = now + timedelta(seconds=body.get("grace_seconds", 86400))
            old_expiry = _aware(retired.expires_at)
            if old_expiry is not None and old_expiry <= now:
                raise Conflict(f"key {retired.id} has already expired; issue a key without `replaces`")
            retired.expires_at = grace_end if old_expiry is None else min(old_expiry, grace_end)
            scopes = scopes if scopes is not None else retired.granted_scopes
        key, secret = _issue_key(session, partner, scopes, expires_at, retired.id if retired else None)
    if retired is not None:
        runtime.keys.forget(retired.key_hash)
        log.info("api_key_rotated", partner_id=partner_id, key_id=retired.id, expires_at=retired.expires_at)
    log.info("api_key_issued", partner_id=partner_id, key_id=key.id, scopes=key.scopes, expires_at=key.expires_at)
    return {"partner": partner, "key": key, "api_key": secret}


@partners.delete("/<partner_id>/keys/<key_id>")
@require_internal
@partners.response(200, ApiKeySchema)
def revoke_key(partner_id: str, key_id: str) -> ApiKey:
    """Revoke a key: refused here at once, by every other service within KEY_CACHE_SECONDS."""
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
    """Who a key hash belongs to (for the other services' key cache); 404 if unknown or revoked."""
    principal = lookup_key(_runtime(), body["key_hash"])
    if principal is None:
        raise NotFound("no active key has that hash")
    return {
        "tenant": principal.tenant,
        "key_id": principal.key_id,
        "scopes": sorted(principal.scopes),
        "expires_at": principal.expires_at,
    }


@internal.get("/tenants/<tenant>/limits")
@require_internal
@internal.response(200, TenantLimitsSchema)
def get_tenant_limits(tenant: str) -> dict[str, Any]:
    """A tenant's effective rate limits, monthly quotas and month-to-date usage (inference enforces them)."""
    return quotas.tenant_limits(_runtime(), tenant)


@internal.get("/usage/model-cost")
@require_internal
@internal.arguments(ModelCostQuery, location="query")
@internal.response(200, ModelCostSchema)
def get_model_cost(query: dict[str, Any]) -> dict[str, Any]:
    """What a model version cost to train (its run's compute) and costs to serve (the last 24 hours), priced."""
    runtime = _runtime()
    prices = invoices.PriceList.from_settings(runtime.settings)
    with runtime.db.read_session() as session:
        return model_cost.model_cost(session, prices, now=utcnow(), **query)


def lookup_key(runtime: Runtime, key_hash: str) -> Principal | None:
    """The principal of an unrevoked key (an expired one too: the verifier refuses it, saying so), and a note
    that it was used. This runs only when a key check misses a verifier's cache (once per KEY_CACHE_SECONDS per
    key and process), and writes `last_used_at` at most once per LAST_USED_RESOLUTION: never once per request."""
    with runtime.db.read_session() as session:
        key = session.scalar(select(ApiKey).where(ApiKey.key_hash == key_hash, ApiKey.revoked_at.is_(None)))
    if key is None:
        return None
    now = utcnow()
    last_used = _aware(key.last_used_at)
    if last_used is None or now - last_used >= LAST_USED_RESOLUTION:
        stale = now - LAST_USED_RESOLUTION
        with runtime.db.session() as session:
            session.execute(
                update(ApiKey)
                .where(ApiKey.id == key.id, or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < stale))
                .values(last_used_at=now)
            )
    return Principal(
        tenant=key.partner_id, key_id=key.id, scopes=normalise_scopes(key.scopes), expires_at=_aware(key.expires_at)
    )


# -- datasets ---------------------------------------------------------------------------------------------


@datasets.post("")
@require_partner
@requires_scope("admin")
@datasets.arguments(DatasetCreateSchema)
@datasets.response(201, DatasetSchema)
def create_dataset(body: dict[str, Any]) -> Dataset:
    runtime = _runtime()
    tenant = _tenant()
    pii.check_entity_labels(runtime, tenant, body["pii_entities"])
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


@datasets.get("")
@require_partner_or_internal
@requires_scope("read")
@datasets.arguments(DatasetListQuery, location="query")
@datasets.response(200, DatasetListSchema)
def list_datasets(query: dict[str, Any]) -> dict[str, Any]:
    """Datasets, oldest first: a partner's own, or (internal token) every tenant's, or one `tenant`'s."""
    principal = current_principal()
    tenant = query["tenant"]
    if not principal.internal:
        if tenant is not None and tenant != principal.tenant:
            raise NotFound(f"tenant {tenant!r} does not exist")
        tenant = principal.tenant
    statement = select(Dataset).order_by(Dataset.created_at)
    if tenant is not None:
        statement = statement.where(Dataset.tenant == tenant)
    with _runtime().db.session() as session:
        return {"datasets": session.scalars(statement).all()}


def tenant_dataset(runtime: Runtime, dataset_id: str) -> Dataset:
    """The caller's dataset; another tenant's id answers 404, exactly like an unknown one."""
    with runtime.db.read_session() as session:
        dataset = session.get(Dataset, dataset_id)
    if dataset is None or dataset.tenant != _tenant():
        raise NotFound(f"dataset {dataset_id} does not exist")
    return dataset


@datasets.get("/<dataset_id>")
@require_partner_or_delegated  # inference reads the PII policy for a tenant
@requires_scope("read")
@datasets.response(200, DatasetSchema)
def get_dataset(dataset_id: str) -> Dataset:
    return tenant_dataset(_runtime(), dataset_id)


@datasets.patch("/<dataset_id>")
@require_partner
@requires_scope("admin")
@datasets.arguments(DatasetUpdateSchema)
@datasets.response(200, DatasetSchema)
def update_dataset(body: dict[str, Any], dataset_id: str) -> Dataset:
    """Change the PII policy, overlap, retrain threshold, or add labels (labels are never removed: items
    and models already carry them)."""
    runtime = _runtime()
    dataset = tenant_dataset(runtime, dataset_id)
    if "labels" in body and not set(dataset.labels) <= set(body["labels"]):
        removed = sorted(set(dataset.labels) - set(body["labels"]))
        raise Unprocessable("labels can be added, not removed", {"fields": {"labels": [f"missing: {removed}"]}})
    if body.get("pii_entities"):
        pii.check_entity_labels(runtime, dataset.tenant, body["pii_entities"])
    with runtime.db.session() as session:
        # Locked, so that two changes at once get two revisions, in the order they commit.
        dataset = session.get(Dataset, dataset_id, with_for_update=not runtime.db.is_sqlite)
        for field, value in body.items():
            setattr(dataset, field, value)
        dataset.revision = dataset.current_revision + 1
        runtime.bus.publish(session, "dataset.changed", {"dataset": dataset.config()}, tenant=dataset.tenant)
    log.info("dataset_updated", dataset_id=dataset_id, fields=sorted(body))
    return dataset


# -- pushes -----------------------------------------------------------------------------------------------

PUSH_BODY = {
    "description": "A JSON batch of items, or multipart image files (form fields `label`, `metadata` apply to all).",
    "required": True,
    "content": {
        "application/json": {"schema": PushSchema},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {
                    "files": {"type": "array", "items": {"type": "string", "format": "binary"}},
                    "label": {"type": "string"},
                    "metadata": {"type": "string", "description": "a JSON object"},
                    "subject_id": {"type": "string", "description": "the data subject of every file (erasable by it)"},
                },
            }
        },
    },
}


@datasets.post("/<dataset_id>/items")
@require_partner
@requires_scope("push")
@datasets.doc(
    requestBody=PUSH_BODY,
    parameters=[{"in": "header", "name": "Idempotency-Key", "schema": {"type": "string"}, "required": False}],
)
@datasets.response(200, PushResultSchema)
@datasets.alt_response(429, **TOO_MANY_REQUESTS)
@datasets.alt_response(503, **PII_MODEL_UNAVAILABLE)
def push_items(dataset_id: str) -> Any:
    """Push items. Each one comes back `accepted` (with its id), `duplicate` (with the existing id) or
    `rejected` (with the reason). With an `Idempotency-Key`, a retry returns the first response."""
    runtime = _runtime()
    dataset = tenant_dataset(runtime, dataset_id)
    quotas.admit(runtime, current_principal())
    identity = dataset_id.encode() + b"\0" + request.get_data(cache=True)

    def work() -> dict[str, Any]:
        candidates = _candidates_from_request(dataset)
        return ingest_batch(runtime, dataset, candidates).as_response()

    body, replayed = idempotency.run_once(
        runtime, dataset.tenant, request.headers.get("Idempotency-Key"), identity, work
    )
    response = current_app.json.response(PushResultSchema().dump(body))
    if replayed:
        response.headers["Idempotent-Replayed"] = "true"
    return response


def _candidates_from_request(dataset: Dataset) -> list[Candidate]:
    expected = KIND_OF_TASK[dataset.task_type]
    if request.mimetype == "multipart/form-data":
        return _multipart_candidates(dataset, expected)
    payload = request.get_json(silent=False)
    if not isinstance(payload, dict):
        raise Unprocessable("the body must be a JSON object with an `items` list")
    if isinstance(payload.get("items"), list) and len(payload["items"]) > PUSH_MAX_ITEMS:
        raise PayloadTooLarge(
            f"a push holds at most {PUSH_MAX_ITEMS} items; use /imports for more", {"items": len(payload["items"])}
        )
    loaded = PushSchema().load(payload)
    errors: dict[str, Any] = {}
    candidates: list[Candidate] = []
    for index, item in enumerate(loaded["items"]):
        present = "text" if "text" in item else "image"
        if present != expected:
            errors[str(index)] = {present: [f"this dataset takes {expected} items"]}
        elif present == "text":
            candidates.append(
                text_candidate(
                    index,
                    item["text"],
                    pii_policy=dataset.pii_policy,
                    pii_entities=dataset.pii_entities,
                    label=item["label"],
                    metadata=item["metadata"],
                    entity_spans=item["spans"],
                    subject_id=item["subject_id"],
                )
            )
        else:
            try:
                info, stored, stripped = prepare_image(item["image"])  # metadata (EXIF, GPS...) removed
            except InvalidImage as exc:
                errors[str(index)] = {"image": [str(exc)]}
                continue
            candidates.append(
                Candidate(
                    index,
                    "image",
                    stored,
                    info.content_type,
                    item["label"],
                    item["metadata"],
                    stripped,
                    subject_id=item["subject_id"],
                )
            )
    if errors:
        raise ValidationError({"items": errors})
    return candidates


def _multipart_candidates(dataset: Dataset, expected: str) -> list[Candidate]:
    if expected != "image":
        raise Unprocessable("multipart uploads are for image datasets; push text as JSON")
    files = [f for name in request.files for f in request.files.getlist(name)]
    if not files:
        raise Unprocessable("no files in the multipart body", {"fields": {"files": ["at least one file is required"]}})
    if len(files) > PUSH_MAX_ITEMS:
        raise PayloadTooLarge(f"a push holds at most {PUSH_MAX_ITEMS} files; use /imports for more")
    label = request.form.get("label") or None
    subject_id = request.form.get("subject_id") or None
    if subject_id is not None and len(subject_id) > 200:
        raise ValidationError({"subject_id": ["at most 200 characters"]})
    try:
        metadata = json_input.loads(request.form.get("metadata") or "{}")
    except json.JSONDecodeError as exc:
        raise ValidationError({"metadata": [f"not valid JSON: {exc.msg}"]}) from exc
    if not isinstance(metadata, dict):
        raise ValidationError({"metadata": ["must be a JSON object"]})
    errors: dict[str, Any] = {}
    candidates: list[Candidate] = []
    for index, upload in enumerate(files):
        data = upload.read()
        try:
            info, stored, stripped = prepare_image(data)  # metadata (EXIF, GPS...) removed
        except InvalidImage as exc:
            errors[upload.filename or str(index)] = [str(exc)]
            continue
        meta = {**metadata, "filename": upload.filename} if upload.filename else dict(metadata)
        candidates.append(
            Candidate(index, "image", stored, info.content_type, label, meta, stripped, subject_id=subject_id)
        )
    if errors:
        raise ValidationError({"files": errors})
    return candidates


# -- bulk imports -----------------------------------------------------------------------------------------


@datasets.post("/<dataset_id>/imports")
@require_partner
@requires_scope("push")
@datasets.doc(
    requestBody={
        "description": "A JSONL file (one item per line, as in a push) or a zip of images (top-level folder = "
        "label), as the raw body (Content-Type application/x-ndjson or application/zip) or a multipart `file`.",
        "required": True,
        "content": {
            "application/x-ndjson": {"schema": {"type": "string", "format": "binary"}},
            "application/zip": {"schema": {"type": "string", "format": "binary"}},
            # token_classification datasets: `token tag` lines in BIO (IOB2), blank line between sentences.
            "text/x-conll": {"schema": {"type": "string", "format": "binary"}},
        },
    }
)
@datasets.response(202, ImportSchema)
@datasets.alt_response(429, **TOO_MANY_REQUESTS)
def create_import(dataset_id: str) -> Import:
    """Upload a bulk import; a worker processes it. Follow it at `GET /v1/imports/{id}`."""
    runtime = _runtime()
    dataset = tenant_dataset(runtime, dataset_id)
    quotas.admit(runtime, current_principal())
    request.max_content_length = imports.MAX_IMPORT_BYTES
    if request.mimetype == "multipart/form-data":
        upload = request.files.get("file")
        if upload is None:
            raise Unprocessable("send the file in a multipart field named `file`")
        fmt = imports.import_format(upload.mimetype, upload.filename)
        return imports.create_import(runtime, dataset, upload.stream, fmt, g.get("trace_id"))
    fmt = imports.import_format(request.mimetype)
    return imports.create_import(runtime, dataset, request.stream, fmt, g.get("trace_id"))


@item_routes.get("/imports/<import_id>")
@require_partner
@requires_scope("push")
@item_routes.response(200, ImportSchema)
def get_import(import_id: str) -> Import:
    with _runtime().db.session() as session:
        record = session.get(Import, import_id)
    if record is None or record.tenant != _tenant():
        raise NotFound(f"import {import_id} does not exist")
    return record


# -- items and usage --------------------------------------------------------------------------------------


@datasets.get("/<dataset_id>/items")
@require_partner
@requires_scope("read")
@datasets.arguments(ItemListQuery, location="query")
@datasets.response(200, ItemListSchema)
def list_items(query: dict[str, Any], dataset_id: str) -> dict[str, Any]:
    """The dataset's items, oldest first, paged with `cursor` (the previous page's `next_cursor`)."""
    runtime = _runtime()
    tenant_dataset(runtime, dataset_id)
    return items.list_items(runtime, _tenant(), dataset_id, query)


@item_routes.get("/items/<item_id>")
@require_partner
@requires_scope("read")
@item_routes.response(200, ItemSchema)
def get_item(item_id: str) -> Any:
    return items.tenant_item(_runtime(), _tenant(), item_id)


@item_routes.get("/items/<item_id>/download")
@require_partner
@requires_scope("read")
@item_routes.response(200, DownloadSchema)
def get_download_url(item_id: str) -> dict[str, Any]:
    """A signed URL for the item's content, valid 15 minutes, usable without the API key."""
    runtime = _runtime()
    item = items.tenant_item(runtime, _tenant(), item_id)
    return items.download_url(runtime, request.host_url, item)


@item_routes.get("/items/<item_id>/content")
@item_routes.arguments(DownloadQuery, location="query")
@item_routes.doc(security=[], description="Authenticated by the signature of a URL from /download.")
def get_content(query: dict[str, Any], item_id: str) -> Response:
    runtime = _runtime()
    item = items.signed_content(runtime, item_id, query["expires"], query["signature"])
    return Response(items.read_content(runtime, item), mimetype=item.content_type.split(";")[0])


# -- erasure and retention (services/ingestion/erasure.py) ------------------------------------------------


@item_routes.delete("/items/<item_id>")
@require_partner
@requires_scope("admin")
@item_routes.response(202, ErasureSchema)
def delete_item(item_id: str) -> dict[str, Any]:
    """Erase an item: its content and record now, its labeling tasks, annotations and snapshot entries as
    labeling gets to them. The answer is the erasure; `GET /v1/erasures/{id}` reports what went where."""
    runtime = _runtime()
    done = erasure.erase_item(runtime, _tenant(), item_id)
    return erasure.tenant_erasure(runtime, _tenant(), done.id)


@item_routes.delete("/subjects/<path:subject_id>")
@require_partner
@requires_scope("admin")
@item_routes.response(202, ErasureSchema)
@item_routes.alt_response(
    422,
    schema=ErrorSchema,
    description="Not a subject id: over 200 characters, or holding control characters (`details.fields.subject_id`).",
)
def erase_subject(subject_id: str) -> dict[str, Any]:
    """Erase a data subject (the `subject_id` given on push, import and `:predict`): every item of theirs, as
    `DELETE /v1/items/{id}` does, and their logged predictions and feedback at inference. A subject with
    nothing stored is an erasure too (its report counts zeros)."""
    try:
        PRINTABLE(subject_id)
    except ValidationError as exc:
        raise Unprocessable("not a subject id", {"fields": {"subject_id": exc.messages}}) from None
    if len(subject_id) > 200:
        raise Unprocessable("a subject id has at most 200 characters", {"fields": {"subject_id": ["too long"]}})
    runtime = _runtime()
    done = erasure.erase_subject(runtime, _tenant(), subject_id)
    return erasure.tenant_erasure(runtime, _tenant(), done.id)


@item_routes.get("/erasures")
@require_partner
@requires_scope("admin")
@item_routes.arguments(ErasureListQuery, location="query")
@item_routes.response(200, ErasureListSchema)
def list_erasures(query: dict[str, Any]) -> dict[str, Any]:
    """The tenant's erasures, newest first (the retention sweep's among them), each with its report."""
    return erasure.list_erasures(_runtime(), _tenant(), query)


@item_routes.get("/erasures/<erasure_id>")
@require_partner
@requires_scope("admin")
@item_routes.response(200, ErasureSchema)
def get_erasure(erasure_id: str) -> dict[str, Any]:
    """An erasure's report: per service, what it removed, filled in as each service finishes its part."""
    return erasure.tenant_erasure(_runtime(), _tenant(), erasure_id)


@item_routes.get("/retention")
@require_partner
@requires_scope("read")
@item_routes.response(200, ItemRetentionSchema)
def get_item_retention() -> dict[str, Any]:
    """How many days raw items are kept (null: until erased)."""
    with _runtime().db.read_session() as session:
        return {"item_retention_days": session.get(Partner, _tenant()).item_retention_days}


@item_routes.put("/retention")
@require_partner
@requires_scope("admin")
@item_routes.arguments(ItemRetentionSchema)
@item_routes.response(200, ItemRetentionSchema)
def put_item_retention(body: dict[str, Any]) -> dict[str, Any]:
    """Keep raw items this many days (null: until erased). The ingestion worker's sweep erases older items,
    as erasures of kind `retention`, each with its report. Predictions have their own retention at inference."""
    with _runtime().db.session() as session:
        session.get(Partner, _tenant()).item_retention_days = body["item_retention_days"]
    log.info("item_retention_changed", tenant=_tenant(), days=body["item_retention_days"])
    return body


@item_routes.get("/usage")
@require_partner
@requires_scope("read")
@item_routes.arguments(UsageQuery, location="query")
@item_routes.response(200, UsageSchema)
def get_usage(query: dict[str, Any]) -> dict[str, Any]:
    """The partner's own usage: accepted items and bytes per UTC day with its quotas (`days`), and every meter
    (items, bytes, annotations, training compute, predictions) summed per hour, day or month (`report`),
    optionally per model and version, over the last `days` days or a billing `period`."""
    runtime = _runtime()
    with runtime.db.session() as session:
        partner = session.get(Partner, _tenant())
        days = quotas.usage_by_day(session, partner.id, quotas.today() - timedelta(days=query["days"] - 1))
        report = _meter_report(session, partner.id, query)
    return {
        "tenant": partner.id,
        "daily_item_quota": partner.daily_item_quota,
        "daily_byte_quota": partner.daily_byte_quota,
        "days": days,
        "report": report,
    }


def _window(query: dict[str, Any]) -> tuple[Any, Any]:
    if query.get("period"):
        return metering.month_window(query["period"])
    return metering.days_window(query["days"], quotas.today())


def _meter_report(session: Any, tenant: str | None, query: dict[str, Any]) -> dict[str, Any]:
    start, end = _window(query)
    by = [name for name in metering.GROUPS if name in query["by"]]
    meters = metering.report(session, tenant=tenant, start=start, end=end, bucket=query["bucket"], by=by)
    return {"start": start, "end": end, "bucket": query["bucket"], "by": by, "meters": meters}


@billing.get("/usage")
@require_internal
@billing.arguments(OperatorUsageQuery, location="query")
@billing.response(200, MeterReportSchema)
def operator_usage(query: dict[str, Any]) -> dict[str, Any]:
    """Every tenant's meters (or one `tenant`'s), per hour, day or month, optionally per model and version."""
    with _runtime().db.read_session() as session:
        return _meter_report(session, query["tenant"], query)


@billing.get("/export")
@require_internal
@billing.arguments(UsageExportQuery, location="query")
@billing.response(
    200,
    content_type="application/x-ndjson",
    description="One CloudEvents 1.0 JSON event per line (format=cloudevents), or CSV with a header (format=csv).",
)
def export_usage(query: dict[str, Any]) -> Response:
    """A billing period's usage records, each once, as CloudEvents JSON lines (for OpenMeter or Lago) or CSV."""
    start, end = metering.month_window(query["period"])
    with _runtime().db.read_session() as session:
        rows = list(metering.records(session, tenant=query["tenant"], start=start, end=end))
    if query["format"] == "csv":
        body, mimetype = "".join(metering.csv_lines(rows)), "text/csv"
    else:
        body, mimetype = "".join(metering.cloudevents_lines(rows)), "application/x-ndjson"
    filename = f"usage-{query['period']}.{'csv' if query['format'] == 'csv' else 'jsonl'}"
    return Response(body, mimetype=mimetype, headers={"Content-Disposition": f"attachment; filename={filename}"})


@billing.get("/invoices")
@require_internal
@billing.arguments(InvoiceQuery, location="query")
@billing.response(200, InvoiceListSchema)
def list_invoices(query: dict[str, Any]) -> dict[str, Any]:
    """Invoice lines per tenant for a billing period (or one `tenant`'s): each priced meter's total in its unit
    (1k predictions, CPU-hour, GPU-hour, GB-month ...) times the price list's unit price, in exact decimals."""
    prices = invoices.PriceList.from_settings(_runtime().settings)
    with _runtime().db.read_session() as session:
        found = invoices.invoices(session, prices, query["period"], tenant=query["tenant"])
    return {"period": query["period"], "price_list": prices.as_dict(), "invoices": found}
