"""Ingestion's request and response schemas (marshmallow)."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from services.ingestion import metering, quotas, spans
from shared.auth import SCOPES, TENANT_ID
from shared.events.catalog import TASK_TYPES, EntitySpan
from shared.schemas import PRINTABLE, ErrorDetailSchema, ErrorSchema, Timestamp

NAME = validate.Regexp(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,99}$", error="1-100 letters, digits, space, '.', '_' or '-'")
MAX_TEXT_CHARS = 100_000
MAX_METADATA_KEYS = 50


class Base64Bytes(fields.Field):
    """A base64 string on the wire, bytes in Python; bad base64 is a field error, not a crash."""

    def _deserialize(self, value: Any, attr: str | None, data: Any, **kwargs: Any) -> bytes:
        if not isinstance(value, str):
            raise ValidationError("must be a base64 string")
        try:
            return base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise ValidationError("is not valid base64") from exc

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> str | None:
        return None if value is None else base64.b64encode(value).decode("ascii")


def _metadata_field() -> fields.Dict:
    return fields.Dict(
        keys=fields.String(validate=validate.Length(min=1, max=100)),
        load_default=dict,
        validate=validate.Length(max=MAX_METADATA_KEYS),
        metadata={"description": "Partner metadata kept with the item (at most 50 keys)."},
    )


class RateLimitsSchema(Schema):
    """Requests per second (a token bucket, burst twice the rate); absent or null: the deployment's default
    (RATE_LIMIT_*); 0: no limit."""

    inference_per_key = fields.Float(allow_none=True, validate=validate.Range(min=0, max=1e6))
    inference_per_tenant = fields.Float(allow_none=True, validate=validate.Range(min=0, max=1e6))
    ingestion_per_key = fields.Float(allow_none=True, validate=validate.Range(min=0, max=1e6))
    ingestion_per_tenant = fields.Float(allow_none=True, validate=validate.Range(min=0, max=1e6))


def _monthly_quotas_field() -> fields.Dict:
    return fields.Dict(
        keys=fields.String(validate=validate.OneOf(quotas.MONTHLY_QUOTA_METERS)),
        values=fields.Integer(validate=validate.Range(min=0, max=2**62)),
        allow_none=True,
        metadata={
            "description": "meter -> limit per UTC month, of "
            f"{', '.join(quotas.MONTHLY_QUOTA_METERS)}; absent: no quota. Training compute is known only after a "
            "run, so no run starts once the month's training_*_seconds have reached their quota"
        },
    )


class QuotaFields(Schema):
    daily_item_quota = fields.Integer(allow_none=True, validate=validate.Range(min=0))
    daily_byte_quota = fields.Integer(allow_none=True, validate=validate.Range(min=0))
    rate_limits = fields.Nested(RateLimitsSchema, allow_none=True)
    monthly_quotas = _monthly_quotas_field()


class PartnerCreateSchema(QuotaFields):
    name = fields.String(required=True, validate=NAME)


class PartnerUpdateSchema(QuotaFields):
    item_retention_days = fields.Integer(
        allow_none=True,
        validate=validate.Range(min=1, max=36_500),
        metadata={"description": "raw items older than this are erased (an erasure of kind retention); null: kept"},
    )


class PartnerSchema(Schema):
    id = fields.String()
    name = fields.String()
    daily_item_quota = fields.Integer(allow_none=True)
    daily_byte_quota = fields.Integer(allow_none=True)
    rate_limits = fields.Nested(RateLimitsSchema, allow_none=True)
    monthly_quotas = fields.Dict(keys=fields.String(), values=fields.Integer(), allow_none=True)
    item_retention_days = fields.Integer(allow_none=True, metadata={"description": "null: raw items are kept"})
    created_at = Timestamp()


class ApiKeySchema(Schema):
    id = fields.String()
    prefix = fields.String()
    created_at = Timestamp()
    revoked_at = Timestamp(allow_none=True)
    scopes = fields.List(
        fields.String(), attribute="granted_scopes", metadata={"description": f"what the key may do, of {list(SCOPES)}"}
    )
    expires_at = Timestamp(allow_none=True, metadata={"description": "refused (401 key_expired) from then on"})
    last_used_at = Timestamp(
        allow_none=True, metadata={"description": "when a service last checked the key (to about a minute)"}
    )
    replaces = fields.String(allow_none=True, metadata={"description": "the key this one rotated out"})


class KeyIssueSchema(Schema):
    """A new key for a partner: its scopes, an optional expiry, and optionally the key it rotates out."""

    scopes = fields.List(
        fields.String(validate=validate.OneOf(SCOPES)),
        validate=validate.Length(min=1),
        load_default=None,
        metadata={"description": "default: every scope (of the replaced key, when `replaces` names one)"},
    )
    expires_at = Timestamp(load_default=None, allow_none=True, metadata={"description": "must be in the future"})
    replaces = fields.String(
        load_default=None,
        allow_none=True,
        validate=validate.Length(max=40),
        metadata={"description": "a live key of the partner that this one rotates out: it expires after the grace"},
    )
    grace_seconds = fields.Integer(
        load_default=86400,
        validate=validate.Range(min=0, max=90 * 86400),
        metadata={"description": "with `replaces`: how long the old key keeps working (0: refused at once)"},
    )


class IssuedKeySchema(Schema):
    partner = fields.Nested(PartnerSchema)
    key = fields.Nested(ApiKeySchema)
    api_key = fields.String(metadata={"description": "Shown once; only its hash is stored."})


class KeyListSchema(Schema):
    keys = fields.List(fields.Nested(ApiKeySchema))


class PartnerListSchema(Schema):
    partners = fields.List(fields.Nested(PartnerSchema))


class KeyVerifySchema(Schema):
    key_hash = fields.String(required=True, validate=validate.Length(equal=64))


class KeyPrincipalSchema(Schema):
    tenant = fields.String()
    key_id = fields.String()
    scopes = fields.List(fields.String())
    expires_at = Timestamp(allow_none=True)


def _validate_labels(labels: list[str]) -> None:
    if len(set(labels)) != len(labels):
        raise ValidationError("labels must be unique")


LABEL = fields.String(validate=validate.Length(min=1, max=100))


class PiiEntitiesSchema(Schema):
    model = fields.String(
        required=True,
        validate=validate.Length(min=1, max=200),
        metadata={"description": "a token_classification model of yours; its production version scans the text"},
    )
    labels = fields.List(
        LABEL,
        required=True,
        validate=[validate.Length(min=1, max=100), _validate_labels],
        metadata={"description": "its entity labels that are PII: each found entity becomes `[LABEL]`"},
    )


PII_ENTITIES_DOC = (
    "With `pii_policy: redact`, the entities of these labels that this token model of yours finds are redacted too "
    "(`[PER]` ...), besides the patterns; null: patterns only. While the model cannot answer, pushes are refused "
    "(503, Retry-After) rather than stored unscanned."
)


PII_MODEL_UNAVAILABLE: dict[str, Any] = {
    "schema": ErrorSchema,
    "description": "The dataset's PII policy names a model of yours (`pii_entities`) that cannot scan the text now "
    "(`details.pii_entities.reason`: `unreachable`, `not_served` (no production version loaded), `refused`); "
    "nothing of the push was stored. Retry after `Retry-After` seconds.",
    "headers": {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}},
}
"""The 503 answer of a push, for its OpenAPI document."""


class DatasetCreateSchema(Schema):
    name = fields.String(required=True, validate=NAME)
    task_type = fields.String(required=True, validate=validate.OneOf(TASK_TYPES))
    labels = fields.List(LABEL, required=True, validate=[validate.Length(min=2, max=1000), _validate_labels])
    pii_policy = fields.String(load_default="off", validate=validate.OneOf(("off", "redact")))
    pii_entities = fields.Nested(
        PiiEntitiesSchema, load_default=None, allow_none=True, metadata={"description": PII_ENTITIES_DOC}
    )
    overlap = fields.Integer(load_default=1, validate=validate.Range(min=1, max=5))
    retrain_threshold = fields.Integer(load_default=None, allow_none=True, validate=validate.Range(min=1))


class DatasetUpdateSchema(Schema):
    labels = fields.List(LABEL, validate=[validate.Length(min=2, max=1000), _validate_labels])
    pii_policy = fields.String(validate=validate.OneOf(("off", "redact")))
    pii_entities = fields.Nested(PiiEntitiesSchema, allow_none=True, metadata={"description": PII_ENTITIES_DOC})
    overlap = fields.Integer(validate=validate.Range(min=1, max=5))
    retrain_threshold = fields.Integer(allow_none=True, validate=validate.Range(min=1))


class DatasetSchema(Schema):
    id = fields.String()
    tenant = fields.String(metadata={"description": "the partner that owns the dataset"})
    name = fields.String()
    task_type = fields.String()
    labels = fields.List(fields.String())
    pii_policy = fields.String()
    pii_entities = fields.Nested(PiiEntitiesSchema, allow_none=True, metadata={"description": PII_ENTITIES_DOC})
    overlap = fields.Integer()
    retrain_threshold = fields.Integer(allow_none=True)
    revision = fields.Integer(
        attribute="current_revision",
        metadata={"description": "1 when created, one more at every change (`dataset.changed` carries it too)"},
    )
    created_at = Timestamp()


class DatasetListQuery(Schema):
    tenant = fields.String(
        load_default=None,
        validate=TENANT_ID,
        metadata={
            "description": "internal token: only this tenant's datasets (default: every tenant's). A partner key "
            "sees its own only: its own tenant is accepted, any other answers 404, like an unknown id."
        },
    )


class DatasetListSchema(Schema):
    datasets = fields.List(fields.Nested(DatasetSchema))


class PushItemSchema(Schema):
    """One item: `text` for a text dataset, `image` (base64) for an image dataset; a token_classification item
    is a `text` with optional entity `spans` (character offsets in Unicode code points, see docs/ner.md)."""

    text = fields.String(validate=validate.Length(min=1, max=MAX_TEXT_CHARS))
    image = Base64Bytes(metadata={"description": "base64-encoded PNG, JPEG, WEBP, GIF or BMP"})
    label = fields.String(load_default=None, allow_none=True)
    spans = fields.List(
        fields.Nested(EntitySpan),
        load_default=None,
        allow_none=True,
        validate=validate.Length(max=spans.MAX_SPANS),
        metadata={
            "description": "token_classification: the entities, `{start, end, label}` with `text[start:end]` in "
            "Unicode code points; no overlaps; each boundary on a character (grapheme) boundary"
        },
    )
    metadata = _metadata_field()
    subject_id = fields.String(
        load_default=None,
        allow_none=True,
        validate=[validate.Length(min=1, max=200), PRINTABLE],
        metadata={
            "description": "The data subject the item is about, your own id for them (a customer, a user): "
            "`DELETE /v1/subjects/{subject_id}` erases every item of theirs and their logged predictions."
        },
    )

    @validates_schema
    def _one_content(self, data: dict[str, Any], **_: Any) -> None:
        if ("text" in data) == ("image" in data):
            raise ValidationError("give exactly one of 'text' or 'image'", field_name="_schema")

    @validates_schema
    def _spans_fit_text(self, data: dict[str, Any], **_: Any) -> None:
        if data.get("spans") and "image" in data:
            raise ValidationError("spans are for text items", field_name="spans")
        errors = spans.span_errors(data.get("text", ""), data.get("spans") or [])
        if errors:
            raise ValidationError(errors, field_name="spans")


class ImportLineSchema(PushItemSchema):
    pass


class PushSchema(Schema):
    items = fields.List(fields.Nested(PushItemSchema), required=True, validate=validate.Length(min=1))


class PushResultItemSchema(Schema):
    index = fields.Integer()
    status = fields.String(metadata={"description": "accepted | duplicate | rejected"})
    item_id = fields.String(allow_none=True)
    reason = fields.String(allow_none=True)


class PushResultSchema(Schema):
    accepted = fields.Integer()
    duplicates = fields.Integer()
    rejected = fields.Integer()
    items = fields.List(fields.Nested(PushResultItemSchema))


class ItemSchema(Schema):
    id = fields.String()
    dataset_id = fields.String()
    kind = fields.String()
    sha256 = fields.String()
    content_type = fields.String()
    length = fields.Integer(data_key="size")
    label = fields.String(allow_none=True)
    spans = fields.List(
        fields.Nested(EntitySpan), allow_none=True, metadata={"description": "token_classification: entity spans"}
    )
    metadata = fields.Dict(attribute="item_metadata")
    redactions = fields.Dict()
    subject_id = fields.String(allow_none=True, metadata={"description": "the data subject, as pushed"})
    created_at = Timestamp()


class ItemListQuery(Schema):
    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=1000))
    cursor = fields.String(load_default=None)
    kind = fields.String(validate=validate.OneOf(("text", "image")))
    label = fields.String()
    labeled = fields.Boolean()


class ItemListSchema(Schema):
    items = fields.List(fields.Nested(ItemSchema))
    next_cursor = fields.String(allow_none=True)


class DownloadSchema(Schema):
    url = fields.String()
    expires_at = Timestamp()


class DownloadQuery(Schema):
    expires = fields.Integer(required=True)
    signature = fields.String(required=True, validate=validate.Regexp(r"^[0-9a-f]{64}$"))


class ImportSchema(Schema):
    id = fields.String()
    dataset_id = fields.String()
    format = fields.String()
    size = fields.Integer()
    status = fields.String(metadata={"description": "queued | running | succeeded | failed"})
    total = fields.Integer(allow_none=True)
    processed = fields.Integer()
    accepted = fields.Integer()
    duplicates = fields.Integer()
    rejected = fields.Integer()
    errors = fields.List(fields.Dict(), metadata={"description": "the first 1,000 per-line errors"})
    failure = fields.String(allow_none=True, metadata={"description": "why a failed import stopped"})
    error = fields.Nested(
        ErrorDetailSchema,
        allow_none=True,
        metadata={
            "description": "a failed import's error, as a refused request would carry it. An import that would "
            "pass a quota is refused before its first batch and stores nothing: `quota_exhausted` for a monthly "
            "quota (`details.meter` names the meter), `rate_limited` for a daily one (`details.quota`)"
        },
    )
    created_at = Timestamp()
    finished_at = Timestamp(allow_none=True)


PERIOD = validate.Regexp(
    r"^(19[7-9][0-9]|2[0-9]{3})-(0[1-9]|1[0-2])$", error="a billing period is a month, YYYY-MM, from 1970 to 2999"
)


class UsageQuery(Schema):
    days = fields.Integer(load_default=30, validate=validate.Range(min=1, max=366))
    period = fields.String(
        load_default=None, validate=PERIOD, metadata={"description": "a month (YYYY-MM, UTC); replaces `days`"}
    )
    bucket = fields.String(load_default="day", validate=validate.OneOf(metering.BUCKETS))
    by = fields.List(
        fields.String(validate=validate.OneOf(metering.GROUPS)),
        load_default=list,
        metadata={"description": "group the meters by model and/or version (repeat the parameter)"},
    )


class OperatorUsageQuery(UsageQuery):
    tenant = fields.String(load_default=None, validate=TENANT_ID)


class UsageExportQuery(Schema):
    period = fields.String(required=True, validate=PERIOD)
    tenant = fields.String(load_default=None, validate=TENANT_ID)
    format = fields.String(load_default="cloudevents", validate=validate.OneOf(("cloudevents", "csv")))


class MeterTotalSchema(Schema):
    tenant = fields.String()
    meter = fields.String(metadata={"description": "items_ingested, bytes_ingested, prediction_rows, ..."})
    bucket = fields.String(metadata={"description": "the hour (RFC 3339), day (YYYY-MM-DD) or month (YYYY-MM)"})
    model = fields.String(allow_none=True)
    version = fields.String(allow_none=True)
    value = fields.Float()
    records = fields.Integer()


class MeterReportSchema(Schema):
    start = Timestamp(data_key="from")
    end = Timestamp(data_key="to")
    bucket = fields.String()
    by = fields.List(fields.String())
    meters = fields.List(fields.Nested(MeterTotalSchema))


class UsageDaySchema(Schema):
    day = fields.Date()
    items = fields.Integer()
    bytes = fields.Integer()
    pushes = fields.Integer()
    duplicates = fields.Integer()
    rejected = fields.Integer()


class UsageSchema(Schema):
    tenant = fields.String()
    daily_item_quota = fields.Integer(allow_none=True)
    daily_byte_quota = fields.Integer(allow_none=True)
    days = fields.List(fields.Nested(UsageDaySchema))
    report = fields.Nested(MeterReportSchema, metadata={"description": "every meter of the window, in buckets"})


class DecimalString(fields.String):
    """An exact decimal, as a string on the wire ("12.50"): money is never a binary float."""

    def _serialize(self, value: Any, attr: str | None, obj: Any, **kwargs: Any) -> str | None:
        return None if value is None else str(value)


class InvoiceQuery(Schema):
    period = fields.String(required=True, validate=PERIOD, metadata={"description": "the billing month, YYYY-MM"})
    tenant = fields.String(load_default=None, validate=TENANT_ID)


class InvoiceLineSchema(Schema):
    meter = fields.String(metadata={"description": "the meter priced (prediction_rows, bytes_stored, ...)"})
    price = fields.String(metadata={"description": "the price list's entry (per_1k_predictions, per_gb_month, ...)"})
    usage = DecimalString(metadata={"description": "the meter's raw total over the period (rows, seconds, bytes)"})
    quantity = DecimalString(metadata={"description": "what is billed, in `unit` (6 decimals, rounded half up)"})
    unit = fields.String(metadata={"description": "1k predictions, CPU-hour, GPU-hour, GB-month, ..."})
    unit_price = DecimalString()
    amount = DecimalString(metadata={"description": "quantity times unit_price, rounded half up to cents"})


class InvoiceSchema(Schema):
    tenant = fields.String()
    period = fields.String()
    start = Timestamp(data_key="from")
    end = Timestamp(data_key="to")
    currency = fields.String()
    lines = fields.List(fields.Nested(InvoiceLineSchema))
    total = DecimalString(metadata={"description": "the sum of the lines' amounts"})


class PriceSchema(Schema):
    name = fields.String()
    meter = fields.String()
    unit = fields.String()
    unit_price = fields.String()


class PriceListSchema(Schema):
    currency = fields.String()
    prices = fields.List(fields.Nested(PriceSchema))


class InvoiceListSchema(Schema):
    period = fields.String()
    price_list = fields.Nested(PriceListSchema)
    invoices = fields.List(fields.Nested(InvoiceSchema))


class TenantLimitsSchema(Schema):
    """What another service enforces for a tenant: effective rate limits, monthly quotas, this month's usage."""

    tenant = fields.String()
    rate_limits = fields.Nested(RateLimitsSchema)
    monthly_quotas = fields.Dict(
        keys=fields.String(),
        values=fields.Integer(),
        metadata={"description": f"meter -> limit per UTC month, of {', '.join(quotas.MONTHLY_QUOTA_METERS)}"},
    )
    used = fields.Dict(
        keys=fields.String(),
        values=fields.Integer(),
        metadata={"description": "month to date per meter with a quota, from the meter store"},
    )


class ModelCostQuery(Schema):
    tenant = fields.String(required=True, validate=TENANT_ID)
    model = fields.String(required=True, validate=validate.Length(min=1, max=200))
    version = fields.Integer(required=True, validate=validate.Range(min=1, max=2**31 - 1))
    run_id = fields.String(required=True, validate=validate.Length(min=1, max=190))


class TrainingCostSchema(Schema):
    run_id = fields.String()
    meter = fields.String(metadata={"description": "training_cpu_seconds or training_gpu_seconds"})
    device = fields.String(allow_none=True)
    seconds = DecimalString(metadata={"description": "device-seconds, times the run's world size"})
    unit = fields.String()
    unit_price = DecimalString()
    cost = DecimalString()


class ServingCostSchema(Schema):
    window_hours = fields.Integer()
    predictions = DecimalString(metadata={"description": "rows predicted by this version in the window"})
    compute_seconds = DecimalString()
    compute_seconds_per_1k = DecimalString(allow_none=True, metadata={"description": "null without traffic"})
    compute_cost_per_1k = DecimalString(allow_none=True, metadata={"description": "at the CPU-hour price"})
    price_per_1k = DecimalString(metadata={"description": "what 1,000 predictions are billed"})


class ModelCostSchema(Schema):
    currency = fields.String()
    training = fields.Nested(TrainingCostSchema, allow_none=True, metadata={"description": "null: not metered"})
    serving = fields.Nested(ServingCostSchema)


# -- erasures (services/ingestion/erasure.py) -----------------------------------------------------------------

ERASURE_KINDS = ("item", "subject", "retention")


class ErasureServiceSchema(Schema):
    status = fields.String(metadata={"description": "running | completed: every step of this service reported"})
    steps = fields.Integer(metadata={"description": "the parts of the work this service was given so far"})
    steps_completed = fields.Integer()
    counts = fields.Dict(
        keys=fields.String(),
        values=fields.Integer(),
        metadata={
            "description": "what the service removed, summed over its steps. ingestion: `items`, `objects` "
            "(deleted, or for packed texts rewritten with the item's bytes zeroed), `bytes`; labeling: "
            "`tasks_withdrawn`, `annotations_deleted`, `snapshots_marked`, `objects` (redacted feedback copies); "
            "inference: `predictions_deleted`, `feedback_records`, `ground_truth_records`, `shadow_answers`, "
            "`input_bytes` (the logged inputs, zeroed)"
        },
    )
    completed_at = Timestamp(allow_none=True)


class ErasureSchema(Schema):
    id = fields.String(metadata={"description": "ers_…: GET /v1/erasures/{id} is the report"})
    kind = fields.String(metadata={"description": "item | subject | retention"})
    status = fields.String(metadata={"description": "running | completed (every service's every step reported)"})
    subject_id = fields.String(allow_none=True)
    item_id = fields.String(allow_none=True)
    cutoff = Timestamp(allow_none=True, metadata={"description": "retention: items created before this went"})
    created_at = Timestamp()
    completed_at = Timestamp(allow_none=True)
    services = fields.Dict(
        keys=fields.String(),
        values=fields.Nested(ErasureServiceSchema),
        metadata={"description": "per service (ingestion, labeling, inference), what it removed, once each"},
    )


class ErasureListQuery(Schema):
    kind = fields.String(validate=validate.OneOf(ERASURE_KINDS))
    limit = fields.Integer(load_default=50, validate=validate.Range(min=1, max=500))


class ErasureListSchema(Schema):
    erasures = fields.List(fields.Nested(ErasureSchema), metadata={"description": "newest first"})


class ItemRetentionSchema(Schema):
    item_retention_days = fields.Integer(
        required=True,
        allow_none=True,
        validate=validate.Range(min=1, max=36_500),
        metadata={"description": "raw items older than this many days are erased by a daily sweep; null: kept"},
    )
