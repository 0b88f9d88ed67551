"""Labeling's request and response schemas (marshmallow)."""

from __future__ import annotations

from marshmallow import Schema, fields, validate

from shared.auth import TENANT_ID
from shared.schemas import Timestamp


class TaskSchema(Schema):
    id = fields.Integer()
    item_id = fields.String()
    dataset_id = fields.String()
    kind = fields.String()
    sha256 = fields.String()
    source = fields.String(metadata={"description": "ingestion | feedback"})
    status = fields.String(metadata={"description": "open | done | review | withdrawn"})
    priority = fields.Integer()
    required = fields.Integer(metadata={"description": "labels this task needs (overlap, plus escalations)"})
    prelabel = fields.String(allow_none=True)
    prelabel_confidence = fields.Float(allow_none=True)
    prelabel_model = fields.String(allow_none=True)
    prelabel_version = fields.Integer(allow_none=True)
    feedback = fields.Dict(allow_none=True)
    consensus_label = fields.String(allow_none=True)
    consensus_source = fields.String(allow_none=True, metadata={"description": "vote | model_auto | review"})
    agreement = fields.Float(allow_none=True)
    created_at = Timestamp()


class TaskForAnnotatorSchema(TaskSchema):
    text = fields.String(allow_none=True, metadata={"description": "the item's text (text datasets)"})
    labels = fields.List(fields.String(), metadata={"description": "the dataset's label set to choose from"})
    lease_expires_at = Timestamp()


class TaskListQuery(Schema):
    limit = fields.Integer(load_default=100, validate=validate.Range(min=1, max=1000))
    after = fields.Integer(load_default=0, validate=validate.Range(min=0))
    status = fields.String(validate=validate.OneOf(("open", "done", "review", "withdrawn")))


class TaskListSchema(Schema):
    tasks = fields.List(fields.Nested(TaskSchema))
    next_after = fields.Integer(allow_none=True)


class NextTaskQuery(Schema):
    lease_seconds = fields.Integer(load_default=300, validate=validate.Range(min=5, max=3600))


class AnnotateSchema(Schema):
    label = fields.String(required=True, validate=validate.Length(min=1, max=200))


class AnnotationSchema(Schema):
    id = fields.Integer()
    task_id = fields.Integer()
    annotator_id = fields.String()
    source = fields.String()
    label = fields.String(allow_none=True)
    skipped = fields.Boolean()
    task_status = fields.String()
    consensus_label = fields.String(allow_none=True)


class ResolveSchema(Schema):
    label = fields.String(required=True, validate=validate.Length(min=1, max=200))


class AnnotatorCreateSchema(Schema):
    tenant = fields.String(required=True, validate=[TENANT_ID, validate.Length(max=40)])
    name = fields.String(required=True, validate=validate.Length(min=1, max=200))
    datasets = fields.List(fields.String(), required=True, validate=validate.Length(min=1, max=1000))


class AnnotatorSchema(Schema):
    id = fields.String()
    tenant = fields.String()
    name = fields.String()
    datasets = fields.List(fields.String())
    active = fields.Boolean()
    created_at = Timestamp()


class IssuedAnnotatorSchema(Schema):
    annotator = fields.Nested(AnnotatorSchema)
    token = fields.String(metadata={"description": "Shown once; only its hash is stored."})


class LabelingSettingsSchema(Schema):
    auto_accept_threshold = fields.Float(allow_none=True, validate=validate.Range(min=0.5, max=1.0))
    training_base_model = fields.String(
        allow_none=True, metadata={"description": "base model for retrain-policy runs (training validates it)"}
    )
    training_hyperparameters = fields.Dict(
        keys=fields.String(), allow_none=True, metadata={"description": "hyper-parameters for retrain-policy runs"}
    )
    min_agreement = fields.Float(validate=validate.Range(min=0.0, max=0.99))
    max_extra_annotations = fields.Integer(validate=validate.Range(min=0, max=5))


class DatasetStateSchema(Schema):
    id = fields.String()
    tenant = fields.String()
    name = fields.String()
    task_type = fields.String()
    labels = fields.List(fields.String())
    overlap = fields.Integer()
    retrain_threshold = fields.Integer(allow_none=True)
    auto_accept_threshold = fields.Float(allow_none=True)
    min_agreement = fields.Float()
    max_extra_annotations = fields.Integer()
    labels_since_snapshot = fields.Integer()
    training_base_model = fields.String(allow_none=True)
    training_hyperparameters = fields.Dict(allow_none=True)
    production_model = fields.String(allow_none=True)
    production_version = fields.Integer(allow_none=True)


class StatsSchema(Schema):
    dataset_id = fields.String()
    tasks = fields.Dict(keys=fields.String(), values=fields.Integer())
    label_counts = fields.Dict(keys=fields.String(), values=fields.Integer())
    percent_agreement = fields.Float(allow_none=True)
    fleiss_kappa = fields.Float(allow_none=True)
    items_in_agreement_stats = fields.Integer()
    annotators = fields.List(fields.Dict())
    labels_since_snapshot = fields.Integer()


class SnapshotSchema(Schema):
    id = fields.String()
    dataset_id = fields.String()
    status = fields.String()
    reason = fields.String()
    manifest_key = fields.String(allow_none=True)
    manifest_sha256 = fields.String(allow_none=True)
    item_count = fields.Integer(allow_none=True)
    label_counts = fields.Dict(allow_none=True)
    split_counts = fields.Dict(
        allow_none=True, metadata={"description": "Items per split: train, validation and test (0 when empty)."}
    )
    split_sha256 = fields.Dict(
        keys=fields.String(),
        values=fields.String(),
        allow_none=True,
        metadata={
            "description": "Per split, the sha256 of its item ids sorted, one per line (each followed by a newline), "
            "UTF-8: the identity of the frozen items a model is evaluated on. Null on snapshots taken before the "
            "test split existed."
        },
    )
    failure = fields.String(allow_none=True)
    created_at = Timestamp()


class SnapshotListSchema(Schema):
    snapshots = fields.List(fields.Nested(SnapshotSchema))


class ExportQuery(Schema):
    format = fields.String(load_default="jsonl", validate=validate.OneOf(("jsonl", "csv")))
