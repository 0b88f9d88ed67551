"""Inference's schemas (marshmallow): the registry's serving document, the friendly API and feedback."""

from __future__ import annotations

from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate, validates_schema

from shared.artifacts import RAW_BUCKET
from shared.events.catalog import TASK_TYPES, ObjectRef
from shared.storage import validate_key

# -- the registry's serving document (GET /v1/internal/serving[/<tenant>/<model_name>]) -----------------------


class ArtifactSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    bucket = fields.String(required=True)
    key = fields.String(required=True)
    sha256 = fields.String(required=True, validate=validate.Regexp(r"^[0-9a-f]{64}$"))
    size = fields.Integer(load_default=None, allow_none=True, validate=validate.Range(min=0))


class ServedVersionSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    version = fields.Integer(required=True, validate=validate.Range(min=0))
    artifacts = fields.Dict(keys=fields.String(), values=fields.Nested(ArtifactSchema), required=True)
    metadata = fields.Dict(load_default=dict)
    status = fields.String(load_default="ready")


class AliasSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    version = fields.Integer(required=True, allow_none=True)
    weights = fields.Dict(
        keys=fields.String(), values=fields.Integer(validate=validate.Range(min=0)), load_default=dict
    )


class ServingDocumentSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    tenant = fields.String(required=True)
    model_name = fields.String(required=True)
    dataset_id = fields.String(required=True)
    task_type = fields.String(required=True, validate=validate.OneOf(TASK_TYPES))
    aliases = fields.Dict(keys=fields.String(), values=fields.Nested(AliasSchema), required=True)
    versions = fields.Dict(keys=fields.String(), values=fields.Nested(ServedVersionSchema), required=True)


# -- the friendly API -----------------------------------------------------------------------------------------

INPUT_KINDS = ("texts", "images", "references")


def _object_key(key: str) -> None:
    try:
        validate_key(key)
    except ValueError as exc:
        raise ValidationError(str(exc)) from exc


class StoredInputSchema(ObjectRef):
    """One input by reference: an item the tenant already has in object storage (bucket/key, the sha256 of the
    item's own bytes, and its byte range in the object), as `item.ingested` and `prediction.feedback` carry it."""

    bucket = fields.String(
        required=True, validate=validate.Equal(RAW_BUCKET, error="stored inputs are read from the {other!r} bucket")
    )
    key = fields.String(
        required=True,
        validate=_object_key,
        metadata={"description": "Under the tenant's own prefix (`<tenant>/...`); another tenant's key answers 404."},
    )
    sha256 = fields.String(
        required=True,
        validate=validate.Regexp(r"^[0-9a-f]{64}\Z"),
        metadata={"description": "Of the input's bytes (the range, not the whole object); checked before use."},
    )


class PredictRequestSchema(Schema):
    """JSON body of `POST /v1/models/{name}:predict`: texts, base64 images, or (a service acting for a tenant)
    references to inputs already in object storage; multipart sends image files."""

    texts = fields.List(fields.String(validate=validate.Length(min=1, max=100_000)), validate=validate.Length(min=1))
    images = fields.List(fields.String(validate=validate.Length(min=1)), validate=validate.Length(min=1))
    references = fields.List(
        fields.Nested(StoredInputSchema),
        validate=validate.Length(min=1),
        metadata={
            "description": "For the internal token with X-Flywheel-Tenant only (labeling's pre-labels): inputs read "
            "from the tenant's raw items, each checked against its sha256, then taken as the model's kind (UTF-8 "
            "text or an image). A partner key sending references is refused (403)."
        },
    )
    version = fields.Integer(load_default=None, allow_none=True, validate=validate.Range(min=0))
    request_key = fields.String(
        load_default=None,
        allow_none=True,
        validate=validate.Length(min=1, max=200),
        metadata={"description": "Sticky canary routing: the same key always reaches the same version."},
    )

    @validates_schema
    def _one_kind(self, data: dict[str, Any], **_: Any) -> None:
        if sum(kind in data for kind in INPUT_KINDS) != 1:
            raise ValidationError("send either texts, images or references", field_name="_schema")


class PredictionSchema(Schema):
    prediction_id = fields.String(
        allow_none=True, metadata={"description": "For feedback; null for a service acting for the tenant."}
    )
    label = fields.String()
    confidence = fields.Float()
    probabilities = fields.Dict(keys=fields.String(), values=fields.Float())


class PredictResponseSchema(Schema):
    model_name = fields.String()
    model_version = fields.Integer()
    predictions = fields.List(fields.Nested(PredictionSchema))


class FeedbackSchema(Schema):
    prediction_id = fields.String(required=True, validate=validate.Length(min=1, max=40))
    label = fields.String(required=True, validate=validate.Length(min=1, max=200))


class FeedbackResultSchema(Schema):
    prediction_id = fields.String()
    model_name = fields.String()
    model_version = fields.Integer()
    predicted_label = fields.String(allow_none=True)
    correct_label = fields.String()
    event_id = fields.String(
        allow_none=True, metadata={"description": "The prediction.feedback event, if emitted now."}
    )
