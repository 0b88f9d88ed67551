"""Formats of the artifacts that cross service boundaries through object storage.

Events carry references to these (bucket/key + sha256); this module says where they live and what is in
them, so that the producer and the consumer read one definition.

- A **dataset snapshot** (labeling → training): `datasets/<tenant>/<dataset_id>/snapshots/<snapshot_id>/`
  holding `manifest.jsonl` (one `ManifestLine` per labeled item) and `snapshot.json` (`SnapshotInfo`).
  A snapshot is immutable once written.
- A **model version folder** (training → registry → inference), laid out like Triton's model repository:
  `models/<tenant>/<model_name>/runs/<run_id>/` holding `model.onnx`, `metadata.json` (`ModelMetadata`) and,
  for text models, the tokenizer files. Every file's sha256 travels in `training.completed`.
"""

from __future__ import annotations

from marshmallow import EXCLUDE, Schema, fields, validate

from shared.events.catalog import TASK_TYPES, ObjectRef

DATASETS_BUCKET = "datasets"
MODELS_BUCKET = "models"
BASE_MODELS_BUCKET = "base-models"
CHECKPOINTS_BUCKET = "checkpoints"
RAW_BUCKET = "raw"

SPLITS = ("train", "validation")


def snapshot_prefix(tenant: str, dataset_id: str, snapshot_id: str) -> str:
    return f"{tenant}/{dataset_id}/snapshots/{snapshot_id}"


def model_run_prefix(tenant: str, model_name: str, run_id: str) -> str:
    return f"{tenant}/{model_name}/runs/{run_id}"


def checkpoint_key(tenant: str, run_id: str) -> str:
    return f"{tenant}/{run_id}/checkpoint.pt"


class ManifestLine(Schema):
    """One labeled item of a snapshot. Content is read from `content` (a byte range of an object for
    packed text items), and verified against `content.sha256`, which is the sha256 of the item's bytes."""

    class Meta:
        unknown = EXCLUDE

    item_id = fields.String(required=True)
    kind = fields.String(required=True, validate=validate.OneOf(("text", "image")))
    content = fields.Nested(ObjectRef, required=True)
    label = fields.String(required=True)
    split = fields.String(required=True, validate=validate.OneOf(SPLITS))


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
