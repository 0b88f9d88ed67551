"""The event catalog: every event on the bus, its payload schema, who produces it and who consumes it.

This file is the contract between services (our `demo.proto`): read it to find every producer and consumer.
Payloads carry references (bucket/key + sha256) and ids, never blobs. A payload field holds JSON values
only (no datetimes, no bytes), so what a consumer receives is exactly what the producer sent.

Delivery: each consumer service has one Celery queue named after it; an event is sent, by task name
`<consumer>.<event type>`, to the queue of every consumer listed here. An event `broadcast_to` a consumer reaches
every replica of it (a fan-out exchange) instead of one worker.
"""

from __future__ import annotations

from dataclasses import dataclass

from marshmallow import Schema, ValidationError, fields, validate, validates_schema

TASK_TYPES = ("text_classification", "image_classification", "token_classification")


class EntitySpan(Schema):
    """One entity of a token_classification item: `text[start:end]` in Unicode code points (Python `str`
    indices, not UTF-16 units nor UTF-8 bytes), labeled with one of the dataset's entity labels."""

    start = fields.Integer(required=True, validate=validate.Range(min=0))
    end = fields.Integer(required=True, validate=validate.Range(min=1))
    label = fields.String(required=True, validate=validate.Length(min=1, max=100))


class ObjectRef(Schema):
    """Where an artifact lives: object storage bucket/key, its sha256, and optionally a byte range in it."""

    bucket = fields.String(required=True)
    key = fields.String(required=True)
    sha256 = fields.String(required=True, validate=validate.Length(equal=64))
    offset = fields.Integer(load_default=None, allow_none=True, validate=validate.Range(min=0))
    length = fields.Integer(load_default=None, allow_none=True, validate=validate.Range(min=0))


class DatasetConfig(Schema):
    dataset_id = fields.String(required=True)
    name = fields.String(required=True)
    task_type = fields.String(required=True, validate=validate.OneOf(TASK_TYPES))
    labels = fields.List(fields.String(), required=True, validate=validate.Length(min=2))
    overlap = fields.Integer(required=True, validate=validate.Range(min=1, max=5))
    retrain_threshold = fields.Integer(required=True, allow_none=True, validate=validate.Range(min=1))
    # The PII policy (None: sent by a release from before it was carried); labeling redacts its queue when it
    # turns on (services/labeling/redaction.py).
    pii_policy = fields.String(load_default=None, allow_none=True, validate=validate.OneOf(("off", "redact")))
    pii_entities = fields.Dict(load_default=None, allow_none=True)
    # The dataset's revision at ingestion (1 when created, one more at every change; None: sent by a release from
    # before it was carried). Events can arrive out of order (a retry, two workers): a consumer keeps the newest.
    revision = fields.Integer(load_default=None, allow_none=True, validate=validate.Range(min=1))


class IngestedItem(Schema):
    item_id = fields.String(required=True)
    kind = fields.String(required=True, validate=validate.OneOf(("text", "image")))
    content = fields.Nested(ObjectRef, required=True)
    label = fields.String(load_default=None, allow_none=True)
    metadata = fields.Dict(load_default=dict)
    # token_classification only: the item's entity spans when it came labeled, else None.
    spans = fields.List(fields.Nested(EntitySpan), load_default=None, allow_none=True)


class ItemIngested(Schema):
    """One push's accepted items, in one event: the bus carries a batch of references, not one per item."""

    dataset = fields.Nested(DatasetConfig, required=True)
    items = fields.List(fields.Nested(IngestedItem), required=True, validate=validate.Length(min=1))


class ItemDeleted(Schema):
    """Items of one dataset erased (a partner's request, a data subject's, or the tenant's retention period)."""

    dataset_id = fields.String(required=True)
    item_ids = fields.List(fields.String(), required=True, validate=validate.Length(min=1))
    # The erasure record (`ers_…`) whose report the consumers' `erasure.step_completed` fill; None in events
    # from before erasure reports, which consumers still handle (they report nothing).
    erasure_id = fields.String(load_default=None, allow_none=True)
    # The partner-given data subject, when the erasure is a subject's.
    subject_id = fields.String(load_default=None, allow_none=True)


class ErasureRequested(Schema):
    """A data subject's erasure: inference erases the subject's logged predictions (and their feedback)."""

    erasure_id = fields.String(required=True)
    subject_id = fields.String(required=True, validate=validate.Length(min=1, max=200))


class PredictionErased(Schema):
    """Logged predictions inference erased: labeling withdraws the tasks made from them (feedback, samples)."""

    erasure_id = fields.String(required=True)
    prediction_ids = fields.List(fields.String(), required=True, validate=validate.Length(min=1, max=1000))


ERASURE_SERVICES = ("ingestion", "labeling", "inference")


class ErasureStepRef(Schema):
    service = fields.String(required=True, validate=validate.OneOf(ERASURE_SERVICES))
    step = fields.String(required=True, validate=validate.Length(min=1, max=100))


class ErasureStepCompleted(Schema):
    """One service finished its part of an erasure: ingestion keeps the counts in the erasure's report, once per
    (service, step) however often the event arrives. `step` is the id of the event whose work this was (an
    `item.deleted`, an `erasure.requested`, a `prediction.erased`); `expects` names the steps this one set off
    further down the line (inference's `prediction.erased` events, each a labeling step), so the report knows to
    wait for them."""

    erasure_id = fields.String(required=True)
    service = fields.String(required=True, validate=validate.OneOf(ERASURE_SERVICES))
    step = fields.String(required=True, validate=validate.Length(min=1, max=100))
    counts = fields.Dict(keys=fields.String(), values=fields.Integer(validate=validate.Range(min=0)), required=True)
    expects = fields.List(fields.Nested(ErasureStepRef), load_default=list)


class DatasetChanged(Schema):
    dataset = fields.Nested(DatasetConfig, required=True)


class SnapshotCreated(Schema):
    dataset_id = fields.String(required=True)
    snapshot_id = fields.String(required=True)
    manifest = fields.Nested(ObjectRef, required=True)
    label_counts = fields.Dict(keys=fields.String(), values=fields.Integer(), required=True)
    item_count = fields.Integer(required=True)


class TrainingRequested(Schema):
    dataset_id = fields.String(required=True)
    snapshot_id = fields.String(required=True)
    manifest = fields.Nested(ObjectRef, required=True)
    task_type = fields.String(required=True, validate=validate.OneOf(TASK_TYPES))
    labels = fields.List(fields.String(), required=True)
    reason = fields.String(required=True)
    model_name = fields.String(load_default=None, allow_none=True)
    base_model = fields.String(load_default=None, allow_none=True)
    hyperparameters = fields.Dict(load_default=dict)
    # A recipe search before training ({trials, max_seconds, space, pruner, keep_winner}; training validates it),
    # or None for a run with the given hyper-parameters.
    search = fields.Dict(load_default=None, allow_none=True)


class TrainingCompleted(Schema):
    run_id = fields.String(required=True)
    dataset_id = fields.String(required=True)
    snapshot_id = fields.String(required=True)
    model_name = fields.String(required=True)
    artifacts = fields.Dict(keys=fields.String(), values=fields.Nested(ObjectRef), required=True)
    # Validation metrics (accuracy, macro_f1, …), plus `test` (the candidate on the test split), `best_epoch`,
    # `baseline` ({name, method, items, accuracy, macro_f1} of the classical baseline on the test split, or None)
    # and `baseline_lift` (test macro-F1 minus the baseline's, or None), and `privacy` (with differential privacy,
    # the DP-SGD record: target and spent `epsilon`, `delta`, noise multiplier, clipping norm, steps; else None).
    metrics = fields.Dict(required=True)
    metadata = fields.Dict(required=True)
    # shared.artifacts.EvaluationReport: candidate and production scored on the snapshot's frozen test split.
    # None only from runs published before the gate compared on frozen items (the gate stages those).
    evaluation = fields.Nested(ObjectRef, load_default=None, allow_none=True)


class TrainingFailed(Schema):
    run_id = fields.String(required=True)
    dataset_id = fields.String(required=True)
    snapshot_id = fields.String(load_default=None, allow_none=True)
    reason = fields.String(required=True)
    # "cancelled" when an operator stopped the run: an alert on failures can tell the two apart.
    outcome = fields.String(load_default="failed", validate=validate.OneOf(("failed", "cancelled")))


class RecipeChosen(Schema):
    """A run's recipe search chose its winner and the request asked to keep it (`keep_winner`): labeling lays
    these values over the dataset's `training_hyperparameters`, so later retrain cycles train with them."""

    run_id = fields.String(required=True)
    dataset_id = fields.String(required=True)
    snapshot_id = fields.String(required=True)
    model_name = fields.String(required=True)
    # Only the searched hyper-parameters, with the winning trial's values.
    hyperparameters = fields.Dict(keys=fields.String(), required=True)
    validation_macro_f1 = fields.Float(required=True)


class ModelVersionCreated(Schema):
    model_name = fields.String(required=True)
    version = fields.Integer(required=True)
    run_id = fields.String(required=True)
    metrics = fields.Dict(required=True)


class ModelPromoted(Schema):
    model_name = fields.String(required=True)
    dataset_id = fields.String(required=True)
    alias = fields.String(required=True)
    version = fields.Integer(required=True, allow_none=True)
    previous_version = fields.Integer(load_default=None, allow_none=True)
    weights = fields.Dict(keys=fields.String(), values=fields.Integer(), load_default=dict)
    reason = fields.String(required=True)


class PredictionFeedback(Schema):
    """A user's correction of one logged prediction: a classifier's `correct_label`, or a token-classification
    model's `correct_spans` (every entity of the text, `[]` for none; offsets of the text at `input`), exactly one
    of them; the labels of a token prediction are null and its answer is in `predicted_spans`."""

    prediction_id = fields.String(required=True)
    model_name = fields.String(required=True)
    model_version = fields.Integer(required=True)
    dataset_id = fields.String(required=True)
    input = fields.Nested(ObjectRef, required=True)
    predicted_label = fields.String(required=True, allow_none=True)
    correct_label = fields.String(required=True, allow_none=True)
    confidence = fields.Float(load_default=None, allow_none=True)
    predicted_spans = fields.List(fields.Nested(EntitySpan), load_default=None, allow_none=True)
    correct_spans = fields.List(fields.Nested(EntitySpan), load_default=None, allow_none=True)

    @validates_schema
    def _one_correction(self, data: dict, **_: object) -> None:
        if (data.get("correct_label") is None) == (data.get("correct_spans") is None):
            raise ValidationError("exactly one of correct_label and correct_spans", field_name="correct_label")


class SampledPrediction(Schema):
    prediction_id = fields.String(required=True)
    model_version = fields.Integer(required=True)
    input = fields.Nested(ObjectRef, required=True)
    predicted_label = fields.String(required=True)
    confidence = fields.Float(load_default=None, allow_none=True)


class PredictionSampled(Schema):
    """Production predictions the model's sampling policy sends to labeling (fresh test data), in one event per
    prediction-log flush; each names the version that answered."""

    model_name = fields.String(required=True)
    dataset_id = fields.String(required=True)
    items = fields.List(fields.Nested(SampledPrediction), required=True, validate=validate.Length(min=1))


class PredictionLabeled(Schema):
    """Labeling settled (by annotators' consensus or an owner's review; never the model's own auto-accept) an
    item that came from a prediction: its ground truth, for live accuracy."""

    prediction_id = fields.String(required=True)
    model_name = fields.String(required=True, allow_none=True)
    model_version = fields.Integer(load_default=None, allow_none=True)
    dataset_id = fields.String(required=True)
    label = fields.String(required=True)
    source = fields.String(required=True, validate=validate.OneOf(("feedback", "sample")))


class ModelDegraded(Schema):
    """A monitoring policy threshold was crossed: labeling freezes a snapshot and requests a retrain whose run
    records `reason`; the new version then goes through the promotion gate like any other."""

    model_name = fields.String(required=True)
    model_version = fields.Integer(required=True)
    dataset_id = fields.String(required=True)
    alert_id = fields.String(required=True)
    # prediction_drift, confidence_drift, input_drift, unknown_token_drift, accuracy_drop or schedule: the first
    # alert of the evaluation (`reason` joins them all); labeling forwards the reason, whatever the kind.
    kind = fields.String(required=True)
    reason = fields.String(required=True, validate=validate.Length(min=1, max=400))
    value = fields.Float(load_default=None, allow_none=True)
    threshold = fields.Float(load_default=None, allow_none=True)
    samples = fields.Integer(required=True)


USAGE_METERS = (
    "items_ingested",
    "bytes_ingested",
    "annotations",
    "training_cpu_seconds",
    "training_gpu_seconds",
    "prediction_requests",
    "prediction_rows",
    "prediction_compute_seconds",
    "bytes_stored",  # measured by ingestion once a day per tenant (a level, not a sum: priced per GB-month)
)


class UsageRecord(Schema):
    """One measurement of a billable action. `id` is stable: the producer derives it from the work (a run's id,
    an annotation's id) or draws it once and keeps it through retries, so a redelivered or replayed event is
    counted once (the meter store keeps one row per (subject, id))."""

    id = fields.String(required=True, validate=validate.Length(min=1, max=200))
    meter = fields.String(required=True, validate=validate.OneOf(USAGE_METERS))
    subject = fields.String(required=True, validate=validate.Length(min=1, max=64))  # the tenant
    time = fields.AwareDateTime(required=True)  # RFC 3339, when the work was done
    value = fields.Float(required=True, allow_nan=False, validate=validate.Range(min=0))
    # model, version, device, dataset_id ...: what a report can group by
    dimensions = fields.Dict(keys=fields.String(), values=fields.String(), load_default=dict)


class UsageRecorded(Schema):
    """A batch of usage records (an inference flush spans tenants: each record names its own subject)."""

    source = fields.String(required=True, validate=validate.OneOf(("labeling", "training", "inference")))
    records = fields.List(fields.Nested(UsageRecord), required=True, validate=validate.Length(min=1, max=1000))


@dataclass(frozen=True)
class EventSpec:
    name: str
    version: int
    schema: type[Schema]
    producer: str
    consumers: tuple[str, ...]
    broadcast_to: tuple[str, ...] = ()
    """Consumers whose every replica must see the event (a fan-out exchange), not just one worker."""
    doc: str = ""
    also_produced_by: tuple[str, ...] = ()
    """Further producers of a shared-purpose event (usage records come from the service that did the work)."""

    @property
    def producers(self) -> tuple[str, ...]:
        return (self.producer, *self.also_produced_by)


_SPECS = (
    EventSpec("item.ingested", 1, ItemIngested, "ingestion", ("labeling",), doc="items stored and accepted"),
    EventSpec(
        "item.deleted",
        1,
        ItemDeleted,
        "ingestion",
        ("labeling",),
        doc="items erased (request, data subject, retention); labeling withdraws their tasks, marks snapshots",
    ),
    EventSpec(
        "erasure.requested",
        1,
        ErasureRequested,
        "ingestion",
        ("inference",),
        doc="a data subject's erasure; inference erases the subject's logged predictions and feedback",
    ),
    EventSpec(
        "prediction.erased",
        1,
        PredictionErased,
        "inference",
        ("labeling",),
        doc="logged predictions erased; labeling withdraws the tasks made from them",
    ),
    EventSpec(
        "erasure.step_completed",
        1,
        ErasureStepCompleted,
        "labeling",
        ("ingestion",),
        also_produced_by=("inference",),
        doc="a service's part of an erasure done, with its counts; ingestion fills the erasure's report",
    ),
    EventSpec("dataset.changed", 1, DatasetChanged, "ingestion", ("labeling",), doc="label set or policy changed"),
    EventSpec("dataset.snapshot_created", 1, SnapshotCreated, "labeling", (), doc="immutable dataset version"),
    EventSpec("training.requested", 1, TrainingRequested, "labeling", ("training",), doc="retrain policy fired"),
    EventSpec("training.completed", 1, TrainingCompleted, "training", ("registry",), doc="verified ONNX export"),
    EventSpec("training.failed", 1, TrainingFailed, "training", (), doc="run failed or cancelled, with a reason"),
    EventSpec("training.recipe_chosen", 1, RecipeChosen, "training", ("labeling",), doc="a search's winner, to keep"),
    EventSpec("model.version_created", 1, ModelVersionCreated, "registry", (), doc="new registered version"),
    EventSpec(
        "model.promoted",
        1,
        ModelPromoted,
        "registry",
        ("labeling", "inference"),
        broadcast_to=("inference",),
        doc="an alias moved; every inference replica reloads",
    ),
    EventSpec("prediction.feedback", 1, PredictionFeedback, "inference", ("labeling",), doc="a user's correction"),
    EventSpec(
        "prediction.sampled", 1, PredictionSampled, "inference", ("labeling",), doc="production traffic to label"
    ),
    EventSpec(
        "prediction.labeled", 1, PredictionLabeled, "labeling", ("inference",), doc="ground truth for a prediction"
    ),
    EventSpec("model.degraded", 1, ModelDegraded, "inference", ("labeling",), doc="a monitoring policy fired"),
    EventSpec(
        "usage.recorded",
        1,
        UsageRecorded,
        "inference",
        ("ingestion",),
        also_produced_by=("labeling", "training"),
        doc="billable work done (predictions, annotations, training compute); ingestion keeps the meters",
    ),
)

CATALOG: dict[str, EventSpec] = {spec.name: spec for spec in _SPECS}


def task_name(consumer: str, event_type: str) -> str:
    """The Celery task name that delivers `event_type` to `consumer`'s queue."""
    return f"{consumer}.{event_type}"


def broadcast_queue(service: str) -> str:
    return f"{service}.broadcast"
