"""Inference's schemas (marshmallow): the registry's serving document, the friendly API and feedback."""

from __future__ import annotations

from typing import Any

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate, validates_schema

from shared.artifacts import RAW_BUCKET
from shared.events.catalog import TASK_TYPES, EntitySpan, ObjectRef
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
    subject_id = fields.String(
        load_default=None,
        allow_none=True,
        validate=validate.Length(min=1, max=200),
        metadata={
            "description": "The data subject these inputs are about (your own id, as on pushed items): kept on the "
            "logged predictions, so that `DELETE /v1/subjects/{subject_id}` at ingestion erases them too."
        },
    )

    @validates_schema
    def _one_kind(self, data: dict[str, Any], **_: Any) -> None:
        if sum(kind in data for kind in INPUT_KINDS) != 1:
            raise ValidationError("send either texts, images or references", field_name="_schema")


class EntitySchema(Schema):
    """One entity a token-classification model found: `text[start:end]` in Unicode code points (Python `str`
    indices, as ingestion's spans), on whole characters (grapheme boundaries)."""

    start = fields.Integer(required=True, validate=validate.Range(min=0))
    end = fields.Integer(required=True, validate=validate.Range(min=1))
    label = fields.String(required=True, metadata={"description": "One of the model's entity labels."})
    score = fields.Float(
        required=True, metadata={"description": "The mean probability of the decoded tags of its words (0..1)."}
    )
    text = fields.String(required=True, metadata={"description": "The entity as it reads in the text sent."})


class PredictionSchema(Schema):
    """A classifier answers `label`, `confidence` and `probabilities`; a token-classification model answers
    `entities`. Both carry the `prediction_id` that feedback names."""

    prediction_id = fields.String(
        allow_none=True,
        metadata={
            "description": "For feedback (`POST /v1/feedback`: `label` for a classifier, `spans` for a token model); "
            "null for a service acting for the tenant."
        },
    )
    label = fields.String()
    confidence = fields.Float()
    probabilities = fields.Dict(keys=fields.String(), values=fields.Float())
    entities = fields.List(
        fields.Nested(EntitySchema),
        metadata={"description": "Token classification: the entities of the text, in text order."},
    )


class PredictResponseSchema(Schema):
    model_name = fields.String()
    model_version = fields.Integer()
    predictions = fields.List(fields.Nested(PredictionSchema))


MAX_FEEDBACK_SPANS = 1000


class FeedbackSchema(Schema):
    """The correct answer for one logged prediction: exactly one of `label` (a classifier's prediction) and `spans`
    (a token-classification model's); the other kind answers 422 naming the field."""

    prediction_id = fields.String(required=True, validate=validate.Length(min=1, max=40))
    label = fields.String(
        validate=validate.Length(min=1, max=200), metadata={"description": "A classifier's prediction: its label."}
    )
    spans = fields.List(
        fields.Nested(EntitySpan),
        validate=validate.Length(max=MAX_FEEDBACK_SPANS),
        metadata={
            "description": "A token-classification model's prediction: every entity of the text, `{start, end, "
            "label}` in Unicode code points of the text sent (as the prediction's `entities`), no overlaps, on "
            "whole characters, labels among the model's; `[]`: the text has no entity. A span over text that was "
            "redacted from the log (the dataset's PII policy) is refused."
        },
    )

    @validates_schema
    def _exactly_one(self, data: dict[str, Any], **_: Any) -> None:
        if ("label" in data) == ("spans" in data):
            raise ValidationError(
                "send exactly one of `label` (a classifier's prediction) or `spans` (a token model's)",
                field_name="_schema",
            )


class FeedbackResultSchema(Schema):
    prediction_id = fields.String()
    model_name = fields.String()
    model_version = fields.Integer()
    predicted_label = fields.String(allow_none=True, metadata={"description": "Null for a token model's."})
    correct_label = fields.String(allow_none=True, metadata={"description": "Null for span feedback."})
    predicted_spans = fields.List(
        fields.Nested(EntitySpan),
        allow_none=True,
        metadata={
            "description": "A token model's prediction: the entities it answered, as logged (offsets of the text "
            "sent; an entity over redacted text is not kept); null for a classifier's."
        },
    )
    correct_spans = fields.List(
        fields.Nested(EntitySpan),
        allow_none=True,
        metadata={"description": "The spans given, in text order (offsets of the text sent); null for a label."},
    )
    event_id = fields.String(
        allow_none=True, metadata={"description": "The prediction.feedback event, if emitted now."}
    )


# -- the KServe v2 protocol (services/inference/v2.py), as answered: documentation only, the routes build it ------


class V2ErrorSchema(Schema):
    """The protocol's error shape, which the standard clients read (not the platform's envelope)."""

    error = fields.String(required=True)


class V2ServerMetadataSchema(Schema):
    name = fields.String(required=True)
    version = fields.String(required=True, metadata={"description": "onnxruntime's version"})
    extensions = fields.List(fields.String(), required=True)


class V2LiveSchema(Schema):
    live = fields.Boolean(required=True)


class V2ReadySchema(Schema):
    ready = fields.Boolean(required=True)
    error = fields.String(metadata={"description": "why not, when not ready"})


class V2ModelReadySchema(V2ReadySchema):
    name = fields.String(required=True)
    version = fields.String(metadata={"description": "for a version's readiness"})


class V2TensorMetadataSchema(Schema):
    name = fields.String(required=True)
    datatype = fields.String(required=True, metadata={"description": "FP32, INT64, BYTES, ..."})
    shape = fields.List(fields.Integer(), required=True, metadata={"description": "-1 = any size"})


class V2ModelMetadataSchema(Schema):
    name = fields.String(required=True)
    versions = fields.List(fields.String(), required=True)
    platform = fields.String(required=True)
    inputs = fields.List(fields.Nested(V2TensorMetadataSchema), required=True)
    outputs = fields.List(fields.Nested(V2TensorMetadataSchema), required=True)
    flywheel = fields.Dict(
        required=True,
        metadata={
            "description": "which routing serves, which the registry wants, each version's state, the labels "
            "(and, for a token-classification model, `tags`: the IOB2 tags of the logits' last axis, in order)"
        },
    )


class V2ConfigTensorSchema(Schema):
    name = fields.String(required=True)
    data_type = fields.String(required=True)
    dims = fields.List(fields.Integer(), required=True)


class V2ModelConfigSchema(Schema):
    """Triton's model configuration extension."""

    name = fields.String(required=True)
    platform = fields.String(required=True)
    backend = fields.String(required=True)
    version_policy = fields.Dict(required=True)
    max_batch_size = fields.Integer(required=True)
    input = fields.List(fields.Nested(V2ConfigTensorSchema), required=True)
    output = fields.List(fields.Nested(V2ConfigTensorSchema), required=True)
    dynamic_batching = fields.Dict(required=True)
    instance_group = fields.List(fields.Dict(), required=True)


class V2RequestInputSchema(Schema):
    name = fields.String(required=True)
    shape = fields.List(fields.Integer(), required=True)
    datatype = fields.String(required=True)
    data = fields.List(fields.Raw(), metadata={"description": "row-major, flat or nested; absent with binary data"})
    parameters = fields.Dict(metadata={"description": "`binary_data_size` for the binary tensor data extension"})


class V2RequestOutputSchema(Schema):
    name = fields.String(required=True)
    parameters = fields.Dict(metadata={"description": "`binary_data`, `classification`"})


class V2InferRequestSchema(Schema):
    id = fields.String()
    parameters = fields.Dict(metadata={"description": "`request_key` (sticky canary routing), `binary_data_output`"})
    inputs = fields.List(fields.Nested(V2RequestInputSchema), required=True)
    outputs = fields.List(fields.Nested(V2RequestOutputSchema))


class V2ResponseOutputSchema(Schema):
    name = fields.String(required=True)
    shape = fields.List(fields.Integer(), required=True)
    datatype = fields.String(required=True)
    data = fields.List(fields.Raw(), metadata={"description": "flat, row-major; absent when sent as binary data"})
    parameters = fields.Dict(metadata={"description": "`binary_data_size` of this output's bytes after the JSON"})


class V2InferResponseSchema(Schema):
    model_name = fields.String(required=True)
    model_version = fields.String(required=True)
    id = fields.String()
    parameters = fields.Dict()
    outputs = fields.List(fields.Nested(V2ResponseOutputSchema), required=True)


# -- the prediction log's query API ----------------------------------------------------------------------------


class PredictionQuerySchema(Schema):
    """Filters of `GET /v1/predictions` (all optional; the caller's own predictions only), newest first."""

    model = fields.String(validate=validate.Length(min=1, max=200))
    version = fields.Integer(validate=validate.Range(min=0))
    since = fields.AwareDateTime(metadata={"description": "ISO 8601 with a zone; created at or after."})
    until = fields.AwareDateTime(metadata={"description": "ISO 8601 with a zone; created before."})
    min_confidence = fields.Float(validate=validate.Range(min=0.0, max=1.0))
    max_confidence = fields.Float(validate=validate.Range(min=0.0, max=1.0))
    label = fields.String(validate=validate.Length(min=1, max=200), metadata={"description": "Predicted label."})
    labeled = fields.Boolean(metadata={"description": "Only predictions whose ground truth arrived (or not)."})
    api = fields.String(validate=validate.OneOf(("predict", "v2")))
    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=1000))
    cursor = fields.String(
        validate=validate.Length(min=1, max=300), metadata={"description": "`next_cursor` of the previous page."}
    )

    @validates_schema
    def _ranges(self, data: dict[str, Any], **_: Any) -> None:
        if "since" in data and "until" in data and data["since"] >= data["until"]:
            raise ValidationError("since must be before until", field_name="since")
        if data.get("min_confidence", 0.0) > data.get("max_confidence", 1.0):
            raise ValidationError("min_confidence must not exceed max_confidence", field_name="min_confidence")


class LoggedPredictionSchema(Schema):
    id = fields.String()
    model_name = fields.String()
    model_version = fields.Integer()
    api = fields.String()
    input_kind = fields.String()
    input = fields.Dict(metadata={"description": "The input by reference: {bucket, key, sha256, offset, length}."})
    predicted_label = fields.String(allow_none=True, metadata={"description": "Null for a token model's (and v2)."})
    confidence = fields.Float(
        allow_none=True,
        metadata={"description": "A token model's: its least sure entity's score (null without entities)."},
    )
    outputs = fields.Dict(
        metadata={
            "description": "A classifier's `probabilities`; a token model's `redacted` (where the stored text was "
            "redacted: `[start, end, stored_start, stored_end]` per replaced range)."
        }
    )
    entities = fields.List(
        fields.Dict(),
        allow_none=True,
        metadata={
            "description": "A token model's entities `{start, end, label, score}` on the stored text (null for a "
            "classifier's)."
        },
    )
    latency_ms = fields.Float()
    input_stats = fields.Dict(allow_none=True)
    sampled = fields.Boolean()
    feedback_label = fields.String(allow_none=True)
    feedback_spans = fields.List(
        fields.Nested(EntitySpan), allow_none=True, metadata={"description": "Span feedback, on the stored text."}
    )
    true_label = fields.String(allow_none=True, metadata={"description": "Ground truth settled by labeling."})
    true_label_source = fields.String(allow_none=True)
    subject_id = fields.String(allow_none=True, metadata={"description": "The request's data subject, if given."})
    trace_id = fields.String()
    created_at = fields.DateTime()


class PredictionPageSchema(Schema):
    predictions = fields.List(fields.Nested(LoggedPredictionSchema))
    next_cursor = fields.String(allow_none=True, metadata={"description": "Pass as `cursor` for the next page."})


# -- monitoring ------------------------------------------------------------------------------------------------


class MonitorPolicySchema(Schema):
    """A model's monitoring policy; `PUT` changes only the fields it sends."""

    window_s = fields.Integer(validate=validate.Range(min=60, max=30 * 86400))
    schedule_s = fields.Integer(validate=validate.Range(min=10, max=7 * 86400))
    min_samples = fields.Integer(validate=validate.Range(min=10, max=1_000_000))
    min_labeled = fields.Integer(validate=validate.Range(min=1, max=1_000_000))
    prediction_drift_threshold = fields.Float(validate=validate.Range(min=0.0, max=1.0))
    confidence_drift_threshold = fields.Float(validate=validate.Range(min=0.0, max=1.0))
    drift_p_value = fields.Float(validate=validate.Range(min=0.0, max=1.0))
    accuracy_drop_threshold = fields.Float(validate=validate.Range(min=0.0, max=1.0))
    input_drift_threshold = fields.Float(
        validate=validate.Range(min=0.0, max=1.0),
        metadata={"description": "KS statistic of text length or image brightness above which input_drift fires."},
    )
    unknown_rate_threshold = fields.Float(
        validate=validate.Range(min=0.0, max=1.0),
        metadata={"description": "Change of the mean unknown-token rate above which unknown_token_drift fires."},
    )
    retrain_every_s = fields.Integer(allow_none=True, validate=validate.Range(min=3600))
    sample_rate = fields.Float(validate=validate.Range(min=0.0, max=1.0))
    shadow_version = fields.Integer(allow_none=True, validate=validate.Range(min=0))
    shadow_rate = fields.Float(validate=validate.Range(min=0.0, max=1.0))


class MonitoringQuerySchema(Schema):
    windows = fields.Integer(load_default=6, validate=validate.Range(min=1, max=96))
    window_s = fields.Integer(
        validate=validate.Range(min=60, max=30 * 86400), metadata={"description": "Default: the policy's window."}
    )


class MonitoringReportSchema(Schema):
    model_name = fields.String()
    window_s = fields.Float()
    policy = fields.Nested(MonitorPolicySchema)
    versions = fields.List(
        fields.Dict(),
        metadata={
            "description": "Per version: role, evaluation baseline (with the means of its input_stats, or null "
            "when its report recorded none), resources (this process)."
        },
    )
    windows = fields.List(
        fields.Dict(),
        metadata={
            "description": "Oldest first: start, end, and per version predictions, latency, quality (labeled, "
            "correct, accuracy, ci_low, ci_high, macro_f1 from sampled labels; feedback_labeled), drift "
            "(class_distribution, prediction_js, prediction_chi2_pvalue, confidence_ks, confidence_ks_pvalue), inputs, "
            "input_drift (judged; chars_ks, brightness_ks and their p-values, unknown_rate, baseline_unknown_rate, "
            "unknown_rate_diff; or a note why not judged); shadow per shadow "
            "version."
        },
    )
    alerts = fields.List(fields.Dict())


class AlertSchema(Schema):
    id = fields.String()
    model_name = fields.String()
    model_version = fields.Integer()
    kind = fields.String(
        metadata={
            "description": "prediction_drift, confidence_drift, input_drift, unknown_token_drift, accuracy_drop "
            "or schedule."
        }
    )
    reason = fields.String()
    value = fields.Float(allow_none=True)
    threshold = fields.Float(allow_none=True)
    samples = fields.Integer()
    details = fields.Dict()
    active = fields.Boolean()
    event_id = fields.String(allow_none=True, metadata={"description": "The model.degraded event it emitted."})
    created_at = fields.String()
    resolved_at = fields.String(allow_none=True)


class AlertQuerySchema(Schema):
    model = fields.String(validate=validate.Length(min=1, max=200))
    active = fields.Boolean()
    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=1000))


class AlertListSchema(Schema):
    alerts = fields.List(fields.Nested(AlertSchema))


class EvaluationResultSchema(Schema):
    evaluated_at = fields.String()
    versions = fields.List(fields.Dict())
    fired = fields.List(fields.Nested(AlertSchema))


class RetentionSchema(Schema):
    days = fields.Integer(required=True, validate=validate.Range(min=1, max=3650))
