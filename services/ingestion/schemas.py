"""Ingestion's request and response schemas (marshmallow)."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from services.ingestion import metering
from shared.auth import TENANT_ID
from shared.events.catalog import TASK_TYPES
from shared.schemas import Timestamp

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


class QuotaFields(Schema):
    daily_item_quota = fields.Integer(allow_none=True, validate=validate.Range(min=0))
    daily_byte_quota = fields.Integer(allow_none=True, validate=validate.Range(min=0))


class PartnerCreateSchema(QuotaFields):
    name = fields.String(required=True, validate=NAME)


class PartnerUpdateSchema(QuotaFields):
    pass


class PartnerSchema(Schema):
    id = fields.String()
    name = fields.String()
    daily_item_quota = fields.Integer(allow_none=True)
    daily_byte_quota = fields.Integer(allow_none=True)
    created_at = Timestamp()


class ApiKeySchema(Schema):
    id = fields.String()
    prefix = fields.String()
    created_at = Timestamp()
    revoked_at = Timestamp(allow_none=True)


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


def _validate_labels(labels: list[str]) -> None:
    if len(set(labels)) != len(labels):
        raise ValidationError("labels must be unique")


LABEL = fields.String(validate=validate.Length(min=1, max=100))


class DatasetCreateSchema(Schema):
    name = fields.String(required=True, validate=NAME)
    task_type = fields.String(required=True, validate=validate.OneOf(TASK_TYPES))
    labels = fields.List(LABEL, required=True, validate=[validate.Length(min=2, max=1000), _validate_labels])
    pii_policy = fields.String(load_default="off", validate=validate.OneOf(("off", "redact")))
    overlap = fields.Integer(load_default=1, validate=validate.Range(min=1, max=5))
    retrain_threshold = fields.Integer(load_default=None, allow_none=True, validate=validate.Range(min=1))


class DatasetUpdateSchema(Schema):
    labels = fields.List(LABEL, validate=[validate.Length(min=2, max=1000), _validate_labels])
    pii_policy = fields.String(validate=validate.OneOf(("off", "redact")))
    overlap = fields.Integer(validate=validate.Range(min=1, max=5))
    retrain_threshold = fields.Integer(allow_none=True, validate=validate.Range(min=1))


class DatasetSchema(Schema):
    id = fields.String()
    name = fields.String()
    task_type = fields.String()
    labels = fields.List(fields.String())
    pii_policy = fields.String()
    overlap = fields.Integer()
    retrain_threshold = fields.Integer(allow_none=True)
    created_at = Timestamp()


class DatasetListSchema(Schema):
    datasets = fields.List(fields.Nested(DatasetSchema))


class PushItemSchema(Schema):
    """One item: `text` for a text dataset, `image` (base64) for an image dataset."""

    text = fields.String(validate=validate.Length(min=1, max=MAX_TEXT_CHARS))
    image = Base64Bytes(metadata={"description": "base64-encoded PNG, JPEG, WEBP, GIF or BMP"})
    label = fields.String(load_default=None, allow_none=True)
    metadata = _metadata_field()

    @validates_schema
    def _one_content(self, data: dict[str, Any], **_: Any) -> None:
        if ("text" in data) == ("image" in data):
            raise ValidationError("give exactly one of 'text' or 'image'", field_name="_schema")


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
    metadata = fields.Dict(attribute="item_metadata")
    redactions = fields.Dict()
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
    failure = fields.String(allow_none=True)
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
