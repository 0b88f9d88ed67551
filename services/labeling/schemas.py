"""Labeling's request and response schemas (marshmallow)."""

from __future__ import annotations

from typing import Any

from marshmallow import Schema, ValidationError, fields, validate, validates_schema

from shared.auth import TENANT_ID
from shared.events.catalog import EntitySpan
from shared.schemas import Timestamp

MAX_SPANS = 1000
SPANS_DESCRIPTION = (
    "token_classification: the entities, `{start, end, label}` with `text[start:end]` in Unicode code points (not "
    "UTF-16 units), in text order, no overlaps, each boundary on a character (grapheme) boundary; `[]`: no entity"
)


def _spans_field(description: str, **options: Any) -> fields.List:
    return fields.List(
        fields.Nested(EntitySpan),
        validate=validate.Length(max=MAX_SPANS),
        metadata={"description": description},
        **options,
    )


class _OneAnswer(Schema):
    """A class `label` (classification datasets) or entity `spans` (token_classification), exactly one of them."""

    @validates_schema
    def _exactly_one(self, data: dict[str, Any], **_: Any) -> None:
        if ("label" in data) == ("spans" in data):
            raise ValidationError(
                "send exactly one of `label` (classification datasets) or `spans` (token_classification)",
                field_name="_schema",
            )


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
    prelabel_spans = _spans_field(
        "token_classification: the production model's entities, shown as pre-labels (null: no guess)", allow_none=True
    )
    feedback = fields.Dict(allow_none=True)
    consensus_label = fields.String(allow_none=True, metadata={"description": "the decided class label"})
    consensus_spans = _spans_field(
        "token_classification: the entities consensus kept, in text order (null until decided)", allow_none=True
    )
    consensus_source = fields.String(allow_none=True, metadata={"description": "vote | model_auto | review"})
    agreement = fields.Float(allow_none=True)
    created_at = Timestamp()


class TaskForAnnotatorSchema(TaskSchema):
    text = fields.String(
        allow_none=True, metadata={"description": "the item's text (text and token_classification datasets)"}
    )
    task_type = fields.String(
        metadata={
            "description": "the dataset's task type: text_classification and image_classification take a `label`, "
            "token_classification takes `spans`"
        }
    )
    labels = fields.List(
        fields.String(),
        metadata={"description": "the dataset's label set to choose from (token_classification: the entity labels)"},
    )
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


class AnnotateSchema(_OneAnswer):
    """Your answer: `label` for a classification task, `spans` for a token_classification one (a 422 otherwise)."""

    label = fields.String(
        validate=validate.Length(min=1, max=200),
        metadata={"description": "the class label (classification datasets), one of the dataset's labels"},
    )
    spans = _spans_field(SPANS_DESCRIPTION)


class AnnotationSchema(Schema):
    id = fields.Integer()
    task_id = fields.Integer()
    annotator_id = fields.String()
    source = fields.String()
    label = fields.String(allow_none=True, metadata={"description": "your class label (null: spans, or a skip)"})
    spans = _spans_field("token_classification: your entities in text order (null: a skip)", allow_none=True)
    skipped = fields.Boolean()
    task_status = fields.String(metadata={"description": "open | done | review | withdrawn"})
    consensus_label = fields.String(allow_none=True)
    consensus_spans = _spans_field(
        "token_classification: the task's consensus entities once decided (null until then)", allow_none=True
    )


class ResolveSchema(_OneAnswer):
    """The owner's decision: `label` for a classification task, `spans` for a token_classification one."""

    label = fields.String(validate=validate.Length(min=1, max=200), metadata={"description": "the class label"})
    spans = _spans_field(SPANS_DESCRIPTION)


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
    tasks = fields.Dict(keys=fields.String(), values=fields.Integer(), metadata={"description": "tasks per status"})
    label_counts = fields.Dict(
        keys=fields.String(),
        values=fields.Integer(),
        metadata={
            "description": "decided tasks per consensus label; token_classification: consensus entities per label"
        },
    )
    percent_agreement = fields.Float(
        allow_none=True,
        metadata={"description": "mean pairwise agreement on class labels (null for token_classification)"},
    )
    fleiss_kappa = fields.Float(allow_none=True, metadata={"description": "null for token_classification"})
    items_in_agreement_stats = fields.Integer(metadata={"description": "items with two or more class labels"})
    entity_f1 = fields.Float(
        allow_none=True,
        metadata={
            "description": "token_classification: entity-level F1 between annotators (exact offsets and label), "
            "averaged over every pair of annotators of every item with two or more annotations; null otherwise"
        },
    )
    items_in_entity_f1 = fields.Integer(metadata={"description": "items that entity_f1 is averaged over"})
    annotators = fields.List(
        fields.Dict(),
        metadata={
            "description": "per annotator: `labels` on decided tasks and `agreement_with_consensus`, the share of "
            "them equal to the consensus (the same label, or the very same set of spans)"
        },
    )
    labels_since_snapshot = fields.Integer()


class AnnotatorDatasetFiguresSchema(Schema):
    dataset_id = fields.String()
    name = fields.String()
    task_type = fields.String()
    labels = fields.List(fields.String(), metadata={"description": "the dataset's labels (entity labels for spans)"})
    annotations = fields.Integer(metadata={"description": "your labels (or span sets) in this dataset, skips apart"})
    skips = fields.Integer(metadata={"description": "tasks you passed on"})
    decided = fields.Integer(metadata={"description": "your annotations on tasks that reached consensus"})
    agreed = fields.Integer(metadata={"description": "of those, how many equal the consensus"})
    agreement_with_consensus = fields.Float(
        allow_none=True,
        metadata={
            "description": "agreed / decided: the share of your labels (span sets: exact offsets and labels, all of "
            "them) on decided tasks that equal the consensus; null before any of your tasks is decided"
        },
    )


class AnnotatorFiguresSchema(Schema):
    id = fields.String()
    name = fields.String()
    tenant = fields.String()
    datasets = fields.List(
        fields.Nested(AnnotatorDatasetFiguresSchema),
        metadata={"description": "every dataset you may label, with your figures in it"},
    )


class SnapshotSchema(Schema):
    id = fields.String()
    dataset_id = fields.String()
    status = fields.String()
    reason = fields.String()
    manifest_key = fields.String(allow_none=True)
    manifest_sha256 = fields.String(allow_none=True)
    item_count = fields.Integer(allow_none=True)
    label_counts = fields.Dict(
        allow_none=True,
        metadata={"description": "items per consensus label; token_classification: consensus entities per label"},
    )
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
    erased_items = fields.Function(
        lambda snapshot: snapshot.erased_items or 0,
        metadata={
            "type": "integer",
            "description": "Items of this snapshot erased since it was taken (an item's, a data subject's or a "
            "retention erasure): their content is gone, so training on this snapshot fails; the next snapshot "
            "leaves them out.",
        },
    )
    created_at = Timestamp()


class SnapshotListSchema(Schema):
    snapshots = fields.List(fields.Nested(SnapshotSchema))


class ExportQuery(Schema):
    format = fields.String(load_default="jsonl", validate=validate.OneOf(("jsonl", "csv")))
