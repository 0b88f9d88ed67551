"""Formats of the artifacts that cross service boundaries through object storage.

Events carry references to these (bucket/key + sha256); this module says where they live and what is in
them, so that the producer and the consumer read one definition.

- A **dataset snapshot** (labeling → training): `datasets/<tenant>/<dataset_id>/snapshots/<snapshot_id>/`
  holding `manifest.jsonl` (one `ManifestLine` per labeled item) and `snapshot.json` (`SnapshotInfo`).
  A snapshot is immutable once written.
- A **model version folder** (training → registry → inference), laid out like Triton's model repository:
  `models/<tenant>/<model_name>/runs/<run_id>/` holding `model.onnx`, `metadata.json` (`ModelMetadata`) and,
  for text models, the tokenizer files. Every file's sha256 travels in `training.completed`.
- An **evaluation report** (training → registry): `evaluation.json` (`EvaluationReport`) in the same folder: the
  candidate, the production version it would replace (its registered artifact, exactly as served) and the
  baselines, each scored item by item on one frozen test split. The registry's gate decides from it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

from marshmallow import EXCLUDE, Schema, fields, validate

from shared.events.catalog import TASK_TYPES, EntitySpan, ObjectRef

DATASETS_BUCKET = "datasets"
MODELS_BUCKET = "models"
BASE_MODELS_BUCKET = "base-models"
CHECKPOINTS_BUCKET = "checkpoints"
RAW_BUCKET = "raw"

SPLITS = ("train", "validation", "test")
"""train: fitting; validation: model selection and early stopping; test: the promotion gate's, never seen by
training or selection. An item's split is a function of its dataset and content hash alone (labeling's
`split_for`), so it keeps its split across snapshots."""


def item_ids_sha256(item_ids: Iterable[str]) -> str:
    """The digest that names a set of items: sha256 of their ids sorted, each followed by a newline, in UTF-8.

    A snapshot records it per split (`SnapshotInfo.split_sha256`) and an evaluation set carries it
    (`EvaluationSet.sha256`): equal digests mean the very same items. No items hash the empty string."""
    return hashlib.sha256("".join(f"{item_id}\n" for item_id in sorted(item_ids)).encode("utf-8")).hexdigest()


def snapshot_prefix(tenant: str, dataset_id: str, snapshot_id: str) -> str:
    return f"{tenant}/{dataset_id}/snapshots/{snapshot_id}"


def model_run_prefix(tenant: str, model_name: str, run_id: str) -> str:
    return f"{tenant}/{model_name}/runs/{run_id}"


def checkpoint_key(tenant: str, run_id: str) -> str:
    return f"{tenant}/{run_id}/checkpoint.pt"


class ManifestLine(Schema):
    """One labeled item of a snapshot. Content is read from `content` (a byte range of an object for
    packed text items), and verified against `content.sha256`, which is the sha256 of the item's bytes.

    A classification item carries its `label`. A token_classification item carries its consensus entities as
    `spans` (`[]`: labeled, no entity), in text order, and a null `label`; lines of other task types have no
    `spans`."""

    class Meta:
        unknown = EXCLUDE

    item_id = fields.String(required=True)
    kind = fields.String(required=True, validate=validate.OneOf(("text", "image")))
    content = fields.Nested(ObjectRef, required=True)
    label = fields.String(required=True, allow_none=True)
    split = fields.String(required=True, validate=validate.OneOf(SPLITS))
    spans = fields.List(fields.Nested(EntitySpan), allow_none=True)


class SnapshotInfo(Schema):
    class Meta:
        unknown = EXCLUDE

    snapshot_id = fields.String(required=True)
    dataset_id = fields.String(required=True)
    tenant = fields.String(required=True)
    task_type = fields.String(required=True, validate=validate.OneOf(TASK_TYPES))
    labels = fields.List(fields.String(), required=True)
    label_counts = fields.Dict(keys=fields.String(), values=fields.Integer(), required=True)
    split_counts = fields.Dict(keys=fields.String(), values=fields.Integer(), required=True)
    # split -> item_ids_sha256 of the split's item ids; absent from snapshots written before the test split.
    split_sha256 = fields.Dict(keys=fields.String(), values=fields.String(), load_default=dict)
    item_count = fields.Integer(required=True)
    manifest_sha256 = fields.String(required=True)
    created_at = fields.String(required=True)


class TextPreprocessing(Schema):
    kind = fields.Constant("text")
    tokenizer_files = fields.List(fields.String(), required=True)
    max_length = fields.Integer(required=True)
    lowercase = fields.Boolean(load_default=True)


class ImagePreprocessing(Schema):
    kind = fields.Constant("image")
    size = fields.List(fields.Integer(), required=True, validate=validate.Length(equal=2))
    mean = fields.List(fields.Float(), required=True, validate=validate.Length(equal=3))
    std = fields.List(fields.Float(), required=True, validate=validate.Length(equal=3))
    channels = fields.Integer(load_default=3)


class ModelMetadata(Schema):
    """`metadata.json` beside `model.onnx`: everything needed to serve, compare and trace the model."""

    class Meta:
        unknown = EXCLUDE

    model_name = fields.String(required=True)
    task_type = fields.String(required=True, validate=validate.OneOf(TASK_TYPES))
    labels = fields.List(fields.String(), required=True)
    inputs = fields.List(fields.Dict(), required=True)  # [{"name", "datatype", "shape"}], -1 = dynamic
    outputs = fields.List(fields.Dict(), required=True)
    opset = fields.Integer(required=True)
    preprocessing = fields.Dict(required=True)  # TextPreprocessing or ImagePreprocessing
    metrics = fields.Dict(required=True)  # accuracy, macro_f1, per_class, confusion, ece, ...
    lineage = fields.Dict(required=True)  # run_id, snapshot_id, manifest sha256, base model + sha256, ...
    hyperparameters = fields.Dict(required=True)
    files = fields.Dict(keys=fields.String(), values=fields.Dict(), required=True)  # name -> {sha256, size}


class EvaluationSet(Schema):
    """The frozen items two versions are compared on: one split of one snapshot."""

    snapshot_id = fields.String(required=True)
    split = fields.String(required=True, validate=validate.OneOf(SPLITS))
    items = fields.Integer(required=True, validate=validate.Range(min=0))
    sha256 = fields.String(required=True, validate=validate.Length(equal=64))  # of the ordered item ids, one per line


class ScoredModel(Schema):
    """One model's answers on the evaluation set, item by item in the set's order, and its metrics there."""

    class Meta:
        unknown = EXCLUDE

    version = fields.Integer(load_default=None, allow_none=True)  # registry version; None for the candidate
    run_id = fields.String(load_default=None, allow_none=True)
    model_sha256 = fields.String(load_default=None, allow_none=True)  # the model.onnx that gave these answers
    predictions = fields.List(fields.Integer(), required=True)  # index into EvaluationReport.labels
    confidences = fields.List(fields.Float(), load_default=list)
    metrics = fields.Dict(required=True)  # accuracy, macro_f1, per_class {label: {precision, recall, f1, support}}, ece


class EvaluationReport(Schema):
    """`evaluation.json`: everything the promotion gate needs, computed on one evaluation set."""

    class Meta:
        unknown = EXCLUDE

    evaluation_set = fields.Nested(EvaluationSet, required=True)
    labels = fields.List(fields.String(), required=True)
    item_ids = fields.List(fields.String(), required=True)
    y_true = fields.List(fields.Integer(), required=True)
    candidate = fields.Nested(ScoredModel, required=True)
    # The version in production when the candidate was scored; None when there was none, or it could not be
    # scored (`production_error` says why: say, its artifact failed verification).
    production = fields.Nested(ScoredModel, load_default=None, allow_none=True)
    production_error = fields.String(load_default=None, allow_none=True)
    # "majority" (the train split's most frequent label) and "classical" (TF-IDF or pixels + logistic regression,
    # trained on the same train split); reports written before the classical baseline hold only "majority".
    baselines = fields.Dict(keys=fields.String(), values=fields.Nested(ScoredModel), load_default=dict)
    # The candidate's macro-F1 minus the classical baseline's on these items; None without a classical baseline.
    baseline_lift = fields.Float(load_default=None, allow_none=True)
    # The evaluation set's inputs as inference's monitoring measures each prediction's, item by item in the set's
    # order: text `chars`, `tokens`, `unknown_rate`; image `width`, `height`, `brightness`. The baseline of input
    # drift; None in reports written before it was recorded (inference then judges no input drift).
    input_stats = fields.Dict(
        keys=fields.String(), values=fields.List(fields.Float()), load_default=None, allow_none=True
    )
