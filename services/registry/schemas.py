"""Registry's request and response schemas (marshmallow); they also make the OpenAPI document."""

from __future__ import annotations

from typing import Any

from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from shared.auth import TENANT_ID

TENANT_DOC = "Required with the internal token (which tenant's model); a partner key implies its own tenant."
ACTOR_DOC = "Who asks (an operator's login, a pipeline's name); recorded in the audit log beside the token used."


def _tenant(required: bool = False) -> fields.String:
    optional: dict[str, Any] = {} if required else {"load_default": None}
    return fields.String(required=required, validate=TENANT_ID, metadata={"description": TENANT_DOC}, **optional)


def _reason() -> fields.String:
    return fields.String(
        required=True,
        validate=validate.Length(min=1, max=2000),
        metadata={"description": "Why; kept in the audit log."},
    )


def _actor() -> fields.String:
    return fields.String(
        load_default=None, validate=validate.Length(min=1, max=150), metadata={"description": ACTOR_DOC}
    )


class TenantQuery(Schema):
    tenant = _tenant()


class PageQuery(Schema):
    tenant = _tenant()
    limit = fields.Integer(load_default=50, validate=validate.Range(min=1, max=500))
    offset = fields.Integer(load_default=0, validate=validate.Range(min=0))


class ModelListQuery(PageQuery):
    tag = fields.String(load_default=None, metadata={"description": "`key` (has the tag) or `key:value`."})
    alias = fields.String(load_default=None, metadata={"description": "Only models that have this alias."})
    dataset_id = fields.String(load_default=None)


class AliasStateSchema(Schema):
    version = fields.Integer()
    weights = fields.Dict(keys=fields.String(), values=fields.Integer())


class PolicySchema(Schema):
    primary_metric = fields.String()
    margin = fields.Float()
    auto_promote = fields.Boolean()
    require_same_split = fields.Boolean()


class ModelSchema(Schema):
    id = fields.String()
    tenant = fields.String()
    name = fields.String()
    dataset_id = fields.String()
    task_type = fields.String()
    description = fields.String()
    tags = fields.Dict(keys=fields.String(), values=fields.String())
    policy = fields.Nested(PolicySchema)
    aliases = fields.Dict(keys=fields.String(), values=fields.Nested(AliasStateSchema))
    latest_version = fields.Integer(allow_none=True)
    version_count = fields.Integer()
    created_at = fields.DateTime()
    updated_at = fields.DateTime()


class ModelListSchema(Schema):
    models = fields.List(fields.Nested(ModelSchema))
    total = fields.Integer()
    next_offset = fields.Integer(allow_none=True)


class TagsField(fields.Dict):
    def __init__(self, **kwargs: Any) -> None:
        super().__init__(
            keys=fields.String(validate=validate.Length(min=1, max=100)),
            values=fields.String(validate=validate.Length(max=500)),
            validate=validate.Length(max=50),
            **kwargs,
        )


class ModelUpdateSchema(Schema):
    tenant = _tenant()
    description = fields.String(validate=validate.Length(max=5000))
    tags = TagsField(metadata={"description": "Replaces the model's tags."})


class PolicyUpdateSchema(Schema):
    tenant = _tenant(required=True)
    primary_metric = fields.String(validate=validate.Length(min=1, max=100))
    margin = fields.Float(validate=validate.Range(min=0.0, max=1.0))
    auto_promote = fields.Boolean()
    require_same_split = fields.Boolean()
    actor = _actor()

    @validates_schema
    def _something(self, data: dict[str, Any], **_: Any) -> None:
        if not set(data) & {"primary_metric", "margin", "auto_promote", "require_same_split"}:
            raise ValidationError("give at least one policy field to change")


class VersionListQuery(PageQuery):
    tag = fields.String(load_default=None, metadata={"description": "`key` (has the tag) or `key:value`."})
    alias = fields.String(load_default=None, metadata={"description": "Only versions this alias points at."})
    status = fields.String(load_default=None, validate=validate.OneOf(("ready", "archived")))
    metric = fields.String(load_default=None, metadata={"description": "Metric for the bounds and ordering."})
    min_metric = fields.Float(load_default=None)
    max_metric = fields.Float(load_default=None)
    order_by = fields.String(load_default="version", validate=validate.OneOf(("version", "metric")))


class SignatureSchema(Schema):
    inputs = fields.List(fields.Dict())
    outputs = fields.List(fields.Dict())


class ArtifactSchema(Schema):
    bucket = fields.String()
    key = fields.String()
    sha256 = fields.String()
    size = fields.Integer()


class VersionSchema(Schema):
    model_name = fields.String()
    version = fields.Integer()
    run_id = fields.String()
    status = fields.String()
    dataset_id = fields.String()
    snapshot_id = fields.String()
    task_type = fields.String()
    metrics = fields.Dict()
    lineage = fields.Dict()
    artifacts = fields.Dict(keys=fields.String(), values=fields.Nested(ArtifactSchema))
    signature = fields.Nested(SignatureSchema)
    labels = fields.List(fields.String())
    preprocessing = fields.Dict()
    opset = fields.Integer(allow_none=True)
    tags = fields.Dict(keys=fields.String(), values=fields.String())
    aliases = fields.List(fields.String())
    decision = fields.Dict(allow_none=True, metadata={"description": "The promotion gate's decision and numbers."})
    created_at = fields.DateTime()
    archived_at = fields.DateTime(allow_none=True)
    archive_reason = fields.String(allow_none=True)


class VersionListSchema(Schema):
    versions = fields.List(fields.Nested(VersionSchema))
    total = fields.Integer()
    next_offset = fields.Integer(allow_none=True)


class VersionUpdateSchema(Schema):
    tenant = _tenant()
    tags = TagsField(required=True, metadata={"description": "Replaces the version's tags."})


class CompareQuery(Schema):
    tenant = _tenant()
    a = fields.Integer(required=True, validate=validate.Range(min=1))
    b = fields.Integer(required=True, validate=validate.Range(min=1))


class ComparedSideSchema(Schema):
    version = fields.Integer()
    run_id = fields.String()
    snapshot_id = fields.String()
    status = fields.String()
    created_at = fields.DateTime()


class MetricRowSchema(Schema):
    name = fields.String()
    a = fields.Raw(allow_none=True)
    b = fields.Raw(allow_none=True)
    delta = fields.Float(allow_none=True, metadata={"description": "b - a, where both are numbers."})


class CompareSchema(Schema):
    model_name = fields.String()
    primary_metric = fields.String()
    a = fields.Nested(ComparedSideSchema)
    b = fields.Nested(ComparedSideSchema)
    same_validation_split = fields.Boolean()
    metrics = fields.List(fields.Nested(MetricRowSchema))


class DownloadQuery(Schema):
    tenant = _tenant()
    expires_in = fields.Integer(
        load_default=900, validate=validate.Range(min=30, max=3600), metadata={"description": "Seconds."}
    )


class DownloadFileSchema(Schema):
    url = fields.String()
    sha256 = fields.String()
    size = fields.Integer()


class DownloadSchema(Schema):
    model_name = fields.String()
    version = fields.Integer()
    expires_at = fields.DateTime()
    files = fields.Dict(keys=fields.String(), values=fields.Nested(DownloadFileSchema))


class AliasUpdateSchema(Schema):
    tenant = _tenant(required=True)
    version = fields.Integer(validate=validate.Range(min=1), metadata={"description": "Point the alias at it."})
    weights = fields.Dict(
        keys=fields.String(),
        values=fields.Raw(),
        metadata={"description": 'A canary: two versions and integer percentages summing to 100, {"3": 90, "4": 10}.'},
    )
    reason = _reason()
    actor = _actor()

    @validates_schema
    def _version_or_weights(self, data: dict[str, Any], **_: Any) -> None:
        if ("version" in data) == bool(data.get("weights")):
            raise ValidationError("give either version or weights (a canary), not both", field_name="version")


class AliasDeleteQuery(Schema):
    tenant = _tenant(required=True)
    reason = _reason()
    actor = _actor()


class RollbackSchema(Schema):
    tenant = _tenant(required=True)
    alias = fields.String(load_default="production")
    reason = _reason()
    actor = _actor()


class ArchiveSchema(Schema):
    tenant = _tenant(required=True)
    reason = _reason()
    actor = _actor()


class AliasChangeSchema(Schema):
    id = fields.Integer()
    model_name = fields.String()
    alias = fields.String()
    action = fields.String(metadata={"description": "auto_promote, auto_stage, promote, canary, rollback or remove."})
    from_version = fields.Integer(allow_none=True)
    from_weights = fields.Dict(keys=fields.String(), values=fields.Integer())
    to_version = fields.Integer(allow_none=True)
    to_weights = fields.Dict(keys=fields.String(), values=fields.Integer())
    actor = fields.String()
    reason = fields.String()
    trace_id = fields.String(allow_none=True)
    created_at = fields.DateTime()


class AliasChangeResultSchema(Schema):
    changed = fields.Boolean(metadata={"description": "False when the alias was already in that state."})
    change = fields.Nested(AliasChangeSchema, allow_none=True)
    model = fields.Nested(ModelSchema)


class AuditQuery(PageQuery):
    alias = fields.String(load_default=None)


class AuditListSchema(Schema):
    changes = fields.List(fields.Nested(AliasChangeSchema))
    total = fields.Integer()
    next_offset = fields.Integer(allow_none=True)


class RefusalQuery(PageQuery):
    model_name = fields.String(load_default=None)


class RefusalSchema(Schema):
    id = fields.Integer()
    tenant = fields.String(allow_none=True)
    model_name = fields.String()
    dataset_id = fields.String(allow_none=True)
    run_id = fields.String()
    event_id = fields.String(allow_none=True)
    trace_id = fields.String(allow_none=True)
    reason = fields.String()
    details = fields.Dict()
    created_at = fields.DateTime()


class RefusalListSchema(Schema):
    refusals = fields.List(fields.Nested(RefusalSchema))
    total = fields.Integer()
    next_offset = fields.Integer(allow_none=True)


class ServedVersionSchema(Schema):
    version = fields.Integer()
    status = fields.String()
    artifacts = fields.Dict(keys=fields.String(), values=fields.Nested(ArtifactSchema))
    metadata = fields.Dict(metadata={"description": "The content of metadata.json."})


class ServingSchema(Schema):
    tenant = fields.String()
    model_name = fields.String()
    dataset_id = fields.String()
    task_type = fields.String()
    aliases = fields.Dict(keys=fields.String(), values=fields.Nested(AliasStateSchema))
    versions = fields.Dict(keys=fields.String(), values=fields.Nested(ServedVersionSchema))


class ServingListSchema(Schema):
    models = fields.List(fields.Nested(ServingSchema))
