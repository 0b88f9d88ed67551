"""Ingestion's request and response schemas (marshmallow)."""

from __future__ import annotations

from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from shared.events.catalog import TASK_TYPES

NAME = validate.Regexp(r"^[A-Za-z0-9][A-Za-z0-9 ._-]{0,99}$", error="1-100 letters, digits, space, '.', '_' or '-'")


class PartnerCreateSchema(Schema):
    name = fields.String(required=True, validate=NAME)


class PartnerSchema(Schema):
    id = fields.String()
    name = fields.String()
    created_at = fields.DateTime()


class ApiKeySchema(Schema):
    id = fields.String()
    prefix = fields.String()
    created_at = fields.DateTime()
    revoked_at = fields.DateTime(allow_none=True)


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


class DatasetCreateSchema(Schema):
    name = fields.String(required=True, validate=NAME)
    task_type = fields.String(required=True, validate=validate.OneOf(TASK_TYPES))
    labels = fields.List(
        fields.String(validate=validate.Length(min=1, max=100)),
        required=True,
        validate=validate.Length(min=2, max=1000),
    )
    pii_policy = fields.String(load_default="off", validate=validate.OneOf(("off", "redact")))
    overlap = fields.Integer(load_default=1, validate=validate.Range(min=1, max=5))
    retrain_threshold = fields.Integer(load_default=None, allow_none=True, validate=validate.Range(min=1))

    @validates_schema
    def _unique_labels(self, data: dict, **_: object) -> None:
        if len(set(data["labels"])) != len(data["labels"]):
            raise ValidationError("labels must be unique", field_name="labels")


class DatasetSchema(Schema):
    id = fields.String()
    name = fields.String()
    task_type = fields.String()
    labels = fields.List(fields.String())
    pii_policy = fields.String()
    overlap = fields.Integer()
    retrain_threshold = fields.Integer(allow_none=True)
    created_at = fields.DateTime()


class TextItemSchema(Schema):
    text = fields.String(required=True, validate=validate.Length(min=1, max=100_000))
    label = fields.String(load_default=None, allow_none=True)
    metadata = fields.Dict(keys=fields.String(), load_default=dict)


class PushSchema(Schema):
    items = fields.List(fields.Nested(TextItemSchema), required=True, validate=validate.Length(min=1, max=1000))


class PushResultItemSchema(Schema):
    index = fields.Integer()
    status = fields.String()
    item_id = fields.String(allow_none=True)
    reason = fields.String(allow_none=True)


class PushResultSchema(Schema):
    accepted = fields.Integer()
    duplicates = fields.Integer()
    rejected = fields.Integer()
    items = fields.List(fields.Nested(PushResultItemSchema))
