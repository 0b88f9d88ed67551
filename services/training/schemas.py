"""Training's request and response schemas (marshmallow), and the hyper-parameters with their validated defaults.

Hyper-parameters arrive from two places, `training.requested` and `POST /v1/runs`; both go through
`resolve_hyperparameters`, which rejects unknown names, out-of-range values and options that do not apply to
the task, and fills every default so that the run record states exactly what was trained.
"""

from __future__ import annotations

from typing import Any

from marshmallow import RAISE, Schema, ValidationError, fields, validate

from services.training.base_models import DEFAULT_BASE_MODELS, known_base_models
from services.training.config import RUN_LIMITS
from services.training.models import LAUNCH_EXTERNAL, LAUNCH_QUEUE, STATUSES
from shared.auth import TENANT_ID
from shared.events.catalog import TASK_TYPES, ObjectRef
from shared.schemas import Timestamp

NAME = validate.Regexp(
    r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}\Z",
    error="1-100 letters, digits, '.', '_' or '-', starting with a letter or digit",
)
TEXT = "text_classification"
IMAGE = "image_classification"
TAGGING = "token_classification"

TEXT_ONLY = (
    "max_length",
    "quantize",
    "token_dropout",
    "adversarial",
    "adversarial_epsilon",
    "layer_decay",
    "reinit_layers",
    "pooling",
    "wide",
    "wide_c",
)
ADVERSARIAL_METHODS = ("none", "fgm")
POOLINGS = ("mean", "cls")
IMAGE_ONLY = ("image_size", "augment", "horizontal_flip")
TOKEN_OPTIONS = ("max_length", "layer_decay", "reinit_layers")
"""The text options a token_classification run takes; the others shape a classifier's head or graph."""
CLASSIFIER_ONLY = ("trainable_layers",)
TEXT_ENCODER_LAYERS = 6
"""all-MiniLM-L6-v2's transformer layers: what `trainable_layers` counts for text."""
IMAGE_BACKBONE_STAGES = 4
"""The stages of the image backbones (ResNet-18's layer1..layer4, MobileNetV3's four resolutions; `image_model.py`
names them): what `trainable_layers` counts for images."""
DP_ONLY = ("dp_delta", "dp_max_grad_norm")
DP_MAX_LENGTH = 128
"""Text under differential privacy, when `max_length` is not given: a fixed length, because the default one is a
percentile of the train split's token lengths, a statistic of the private data."""


class HyperparametersSchema(Schema):
    """Every knob of the recipe. `None` means "the task's default" (see `TASK_DEFAULTS`)."""

    class Meta:
        unknown = RAISE

    epochs = fields.Integer(validate=validate.Range(min=1, max=200))
    batch_size = fields.Integer(validate=validate.Range(min=1, max=1024))
    learning_rate = fields.Float(
        validate=validate.Range(min=0, max=1, min_inclusive=False),
        metadata={"description": "AdamW learning rate of the pretrained encoder or backbone."},
    )
    head_learning_rate = fields.Float(
        validate=validate.Range(min=0, max=1, min_inclusive=False),
        metadata={"description": "AdamW learning rate of the classification head."},
    )
    weight_decay = fields.Float(validate=validate.Range(min=0, max=1))
    warmup_ratio = fields.Float(
        validate=validate.Range(min=0, max=0.5),
        metadata={"description": "Share of all steps spent in linear warm-up before the cosine decay."},
    )
    max_grad_norm = fields.Float(validate=validate.Range(min=0, max=100, min_inclusive=False))
    early_stopping_patience = fields.Integer(
        validate=validate.Range(min=0, max=100),
        metadata={
            "description": "Epochs without a better validation macro-F1 (token classification: entity F1) before "
            "stopping; 0 turns it off."
        },
    )
    seed = fields.Integer(validate=validate.Range(min=0, max=2**31 - 1))
    class_weighted_loss = fields.Boolean()
    freeze_encoder = fields.Boolean(
        metadata={
            "description": "Train only the classification head (and the top trainable_layers layers); the rest of "
            "the encoder (or backbone) stays as loaded."
        }
    )
    trainable_layers = fields.Integer(
        validate=validate.Range(min=0, max=TEXT_ENCODER_LAYERS),
        metadata={
            "description": "text and image classification, with freeze_encoder true or dp_epsilon: the top encoder "
            f"layers (text, 0..{TEXT_ENCODER_LAYERS}) or last backbone stages (images, 0..{IMAGE_BACKBONE_STAGES}) "
            "that train too, at learning_rate; 0 trains the head alone. An image stage's BatchNorm layers stay "
            "frozen in eval mode (DP-SGD cannot train them; frozen, they mix no statistics across a batch)"
        },
    )
    dropout = fields.Float(validate=validate.Range(min=0, max=0.9))
    num_workers = fields.Integer(
        allow_none=True,
        validate=validate.Range(min=0, max=32),
        metadata={"description": "DataLoader workers; null picks 0 on CPU and up to 4 (pinned memory) on a GPU."},
    )
    label_smoothing = fields.Float(
        validate=validate.Range(min=0, max=0.5),
        metadata={"description": "Share of each label's probability spread evenly over all classes in the loss."},
    )
    max_length = fields.Integer(
        allow_none=True,
        validate=validate.Range(min=8, max=512),
        metadata={
            "description": "text and token models: word pieces kept per text; null chooses it from the data: the "
            "95th percentile of the train split's token lengths, within 16..256 (the run's metadata records the value "
            "used); a token_classification run keeps 128 by default, and 128 for null"
        },
    )
    token_dropout = fields.Float(
        validate=validate.Range(min=0, max=0.5),
        metadata={"description": "text only: share of word pieces replaced by [MASK] in training batches"},
    )
    adversarial = fields.String(
        validate=validate.OneOf(ADVERSARIAL_METHODS),
        metadata={
            "description": "text only: fgm adds, at every step, the loss on word embeddings moved by "
            "adversarial_epsilon along their gradient (Fast Gradient Method); none turns it off"
        },
    )
    adversarial_epsilon = fields.Float(
        validate=validate.Range(min=0, max=10, min_inclusive=False),
        metadata={"description": "text only: the L2 norm of FGM's perturbation of the embedding matrix"},
    )
    layer_decay = fields.Float(
        validate=validate.Range(min=0.1, max=1.0),
        metadata={
            "description": "text and token models: layer-wise learning-rate decay; each encoder layer learns at "
            "this times the rate of the one above it (1 turns it off)"
        },
    )
    reinit_layers = fields.Integer(
        validate=validate.Range(min=0, max=6),
        metadata={"description": "text and token models: top encoder layers given fresh weights before fine-tuning"},
    )
    pooling = fields.String(
        validate=validate.OneOf(POOLINGS),
        metadata={"description": "text only: mean of the token states, or the [CLS] token's state"},
    )
    wide = fields.Boolean(
        metadata={
            "description": "text only: serve the average of the head's probabilities and those of a logistic "
            "regression on the word pieces' TF-IDF, fitted on the train split (Wide & Deep, one graph)"
        }
    )
    wide_c = fields.Float(
        validate=validate.Range(min=0.001, max=10000),
        metadata={"description": "text only: C (inverse L2 strength) of the wide layer's logistic regression"},
    )
    quantize = fields.Boolean(
        metadata={"description": "text only: ship an int8 dynamic-quantized graph if macro-F1 drops by <= 0.01"}
    )
    dp_epsilon = fields.Float(
        allow_none=True,
        validate=validate.Range(min=0.1, max=100),
        metadata={
            "description": "differential privacy (DP-SGD with opacus) with this target epsilon over the run; null "
            "turns it off. The classification head trains, and the top trainable_layers layers (the rest of the "
            "encoder or backbone is frozen), without class weights; text runs need wide false and a fixed "
            "max_length (128 unless given)"
        },
    )
    dp_delta = fields.Float(
        allow_none=True,
        validate=validate.Range(min=0, max=0.01, min_inclusive=False),
        metadata={"description": "with dp_epsilon: the target delta; null is 1/n^1.1 (n train items), at most 1e-5"},
    )
    dp_max_grad_norm = fields.Float(
        validate=validate.Range(min=0, max=100, min_inclusive=False),
        metadata={"description": "with dp_epsilon: the L2 norm each item's gradient is clipped to (DP-SGD)"},
    )
    image_size = fields.Integer(validate=validate.Range(min=16, max=1024), metadata={"description": "image only"})
    augment = fields.Boolean(metadata={"description": "image only: random resized crop and colour jitter (train)"})
    horizontal_flip = fields.Boolean(metadata={"description": "image only: random horizontal flips (train)"})


_COMMON_DEFAULTS: dict[str, Any] = {
    "weight_decay": 0.01,
    "max_grad_norm": 1.0,
    "early_stopping_patience": 3,
    "seed": 42,
    "class_weighted_loss": True,
    "freeze_encoder": False,
    "dropout": 0.1,
    "num_workers": None,
    "label_smoothing": 0.0,
    "dp_epsilon": None,
    "dp_delta": None,
    "dp_max_grad_norm": 1.0,
}
TASK_DEFAULTS: dict[str, dict[str, Any]] = {
    TEXT: {
        **_COMMON_DEFAULTS,
        "epochs": 4,
        "batch_size": 32,
        "learning_rate": 5e-5,
        "head_learning_rate": 2e-3,
        "warmup_ratio": 0.1,
        "max_length": None,
        "quantize": False,
        "token_dropout": 0.0,
        "adversarial": "none",
        "adversarial_epsilon": 1.0,
        "layer_decay": 1.0,
        "reinit_layers": 0,
        "pooling": "mean",
        "wide": True,
        "wide_c": 10.0,
        "trainable_layers": 0,
    },
    # The recipe tests/training/test_token_classification.py measured (docs/ner.md, "Training runs"): 3 epochs,
    # batch 16, 2e-4 / head 2e-3, no class weights (balanced weights over tags over-predicted entities). Long
    # enough texts are not truncated by default (128 word pieces); early stopping watches validation entity F1.
    TAGGING: {
        **_COMMON_DEFAULTS,
        "epochs": 3,
        "batch_size": 16,
        "learning_rate": 2e-4,
        "head_learning_rate": 2e-3,
        "warmup_ratio": 0.1,
        "class_weighted_loss": False,
        "max_length": 128,
        "layer_decay": 1.0,
        "reinit_layers": 0,
    },
    IMAGE: {
        **_COMMON_DEFAULTS,
        "epochs": 10,
        "batch_size": 64,
        "learning_rate": 1e-3,
        "head_learning_rate": 1e-3,
        "warmup_ratio": 0.05,
        "image_size": 224,
        "augment": True,
        "horizontal_flip": True,
        "trainable_layers": 0,
    },
}


def resolve_hyperparameters(task_type: str, raw: dict[str, Any] | None) -> dict[str, Any]:
    """The complete hyper-parameters of a run: validated values over the task's defaults.

    Raises marshmallow's ValidationError with one message per bad field.
    """
    if task_type not in TASK_DEFAULTS:
        raise ValidationError(f"unknown task type {task_type!r}; expected one of {list(TASK_TYPES)}", "task_type")
    raw = raw or {}
    schema = HyperparametersSchema()
    errors: dict[str, Any] = dict(schema.validate(raw))
    for name, why in _foreign_options(task_type).items():
        if name in raw:
            errors.setdefault(name, []).append(why)
    if task_type == TAGGING and raw.get("dp_epsilon") is not None:
        errors.setdefault("dp_epsilon", []).append("differential privacy is not available for token_classification")
    if errors:
        raise ValidationError(errors)
    resolved = {**TASK_DEFAULTS[task_type], **schema.load(raw)}
    _resolve_privacy(task_type, raw, resolved)
    if resolved.get("adversarial", "none") != "none" and resolved["freeze_encoder"]:
        raise ValidationError({"adversarial": ["needs a trainable encoder: freeze_encoder is true"]})
    _check_trainable_layers(task_type, resolved)
    return resolved


def _check_trainable_layers(task_type: str, resolved: dict[str, Any]) -> None:
    """`trainable_layers` unfreezes the top of a frozen encoder: without a frozen one every layer trains already."""
    layers = resolved.get("trainable_layers", 0)
    if not layers:
        return
    if not resolved["freeze_encoder"]:
        raise ValidationError(
            {"trainable_layers": ["applies with freeze_encoder true or dp_epsilon only: otherwise every layer trains"]}
        )
    if task_type == IMAGE and layers > IMAGE_BACKBONE_STAGES:
        raise ValidationError(
            {"trainable_layers": [f"the image backbones have {IMAGE_BACKBONE_STAGES} stages: at most that many"]}
        )


def _resolve_privacy(task_type: str, raw: dict[str, Any], resolved: dict[str, Any]) -> None:
    """With `dp_epsilon`, only the head (and the top `trainable_layers` layers) trains, privately (`privacy.py`):
    what would learn from the train split outside DP-SGD is refused when asked for, and turned off when it is only
    a default."""
    if resolved["dp_epsilon"] is None:
        errors = {name: ["applies with dp_epsilon only"] for name in DP_ONLY if name in raw}
        if errors:
            raise ValidationError(errors)
        return
    refused = {
        "freeze_encoder": (
            False,
            "differential privacy trains the classification head and the top trainable_layers layers only: the "
            "rest of the encoder is frozen",
        ),
        "class_weighted_loss": (True, "class weights are the train split's label counts, which DP-SGD does not cover"),
        "wide": (True, "the wide layer's logistic regression is fitted on the train split without privacy"),
    }
    errors = {name: [why] for name, (value, why) in refused.items() if raw.get(name) is value}
    if resolved.get("adversarial", "none") != "none":
        errors["adversarial"] = ["needs a trainable encoder; differential privacy freezes it"]
    if errors:
        raise ValidationError(errors)
    resolved.update(freeze_encoder=True, class_weighted_loss=False)
    if task_type == TEXT:
        resolved["wide"] = False
        resolved["max_length"] = resolved["max_length"] or DP_MAX_LENGTH


def private_run_problems(hyperparameters: dict[str, Any], search: Any, launch: str) -> dict[str, list[str]]:
    """What a run with differential privacy cannot also have: a recipe search (every trial would learn from the
    train split, and the accountant covers one training), or a distributed launch (DP-SGD runs on one process)."""
    if not isinstance(hyperparameters, dict) or hyperparameters.get("dp_epsilon") is None:
        return {}
    problems = {}
    if search is not None:
        problems["search"] = ["a recipe search's trials would each spend the privacy budget: not with dp_epsilon"]
    if launch != LAUNCH_QUEUE:
        problems["launch"] = ["differential privacy trains on one process: launch must be queue"]
    return problems


def _foreign_options(task_type: str) -> dict[str, str]:
    """The options the task does not take, each with the reason it is refused."""
    if task_type == TEXT:
        return {name: "applies to image models only" for name in IMAGE_ONLY}
    if task_type == IMAGE:
        return {name: "applies to text models only" for name in TEXT_ONLY}
    foreign = {name: "applies to image models only" for name in IMAGE_ONLY}
    foreign.update(
        {name: "applies to text classification models only" for name in TEXT_ONLY if name not in TOKEN_OPTIONS}
    )
    foreign.update({name: "applies to text and image classification models only" for name in CLASSIFIER_ONLY})
    return foreign


def resolve_base_model(task_type: str, base_model: str | None) -> str:
    if task_type not in DEFAULT_BASE_MODELS:
        raise ValidationError(f"no base model trains {task_type} runs", "base_model")
    name = base_model or DEFAULT_BASE_MODELS[task_type]
    known = known_base_models(task_type)
    if name not in known:
        raise ValidationError(f"unknown base model {name!r} for {task_type}; choose one of {known}", "base_model")
    return name


# ------------------------------------------------------------------------------------------------ requests

MAX_TRIALS = 50
MIN_SEARCH_SECONDS = 10
MAX_SEARCH_SECONDS = 24 * 3600
PRUNERS = ("median", "successive_halving", "none")


class SearchRequestSchema(Schema):
    """A recipe search before the run trains (`search_space.py` checks the space against the task)."""

    class Meta:
        unknown = RAISE

    trials = fields.Integer(
        required=True,
        validate=validate.Range(min=1, max=MAX_TRIALS),
        metadata={"description": "trials to run at most (each a task on the training queue)"},
    )
    max_seconds = fields.Integer(
        required=True,
        validate=validate.Range(min=MIN_SEARCH_SECONDS, max=MAX_SEARCH_SECONDS),
        metadata={
            "description": "wall time of the whole search: a trial still training then stops (recorded as pruned), "
            "one not yet started is skipped; the winner's final training comes after"
        },
    )
    space = fields.Dict(
        keys=fields.String(),
        load_default=dict,
        metadata={
            "description": 'per parameter, {"low", "high", "log"} or {"choices": [...]} replacing the task\'s '
            "default range, or null to leave it out of the search; searchable: learning_rate, epochs, "
            "max_length (text), batch_size, weight_decay, dropout (text), label_smoothing (images)"
        },
    )
    pruner = fields.String(
        load_default="median",
        validate=validate.OneOf(PRUNERS),
        metadata={"description": "how bad trials stop early, on their validation macro-F1 per epoch"},
    )
    keep_winner = fields.Boolean(
        load_default=False,
        metadata={"description": "write the winning values into the dataset's training_hyperparameters (labeling)"},
    )


class RunCreateSchema(Schema):
    tenant = fields.String(required=True, validate=TENANT_ID)
    dataset_id = fields.String(required=True, validate=NAME)
    snapshot_id = fields.String(required=True, validate=NAME)
    model_name = fields.String(load_default=None, allow_none=True, validate=NAME)
    base_model = fields.String(load_default=None, allow_none=True)
    hyperparameters = fields.Dict(keys=fields.String(), load_default=dict)
    reason = fields.String(load_default="requested through the run API", validate=validate.Length(min=1, max=500))
    launch = fields.String(
        load_default=LAUNCH_QUEUE,
        validate=validate.OneOf((LAUNCH_QUEUE, LAUNCH_EXTERNAL)),
        metadata={
            "description": "queue: the training worker runs it; external: a torchrun Job runs "
            "`python -m services.training.distributed RUN_ID`."
        },
    )
    force = fields.Boolean(
        load_default=False,
        metadata={"description": "Train again even if an identical request already ran or is running."},
    )
    search = fields.Nested(
        SearchRequestSchema,
        load_default=None,
        allow_none=True,
        metadata={
            "description": "A recipe search before training; the run then trains, evaluates and publishes the "
            "winning trial's recipe as usual"
        },
    )


class RunListQuery(Schema):
    status = fields.String(validate=validate.OneOf(STATUSES))
    tenant = fields.String(validate=TENANT_ID, metadata={"description": "a partner sees its own"})
    dataset_id = fields.String()
    snapshot_id = fields.String()
    model_name = fields.String()
    limit = fields.Integer(load_default=50, validate=validate.Range(min=1, max=200))
    after = fields.Integer(load_default=0, validate=validate.Range(min=0))


# ----------------------------------------------------------------------------------------------- responses


class ProgressSchema(Schema):
    epoch = fields.Integer(metadata={"description": "epochs completed"})
    epochs = fields.Integer()
    step = fields.Integer(metadata={"description": "optimizer steps completed in the current epoch"})
    steps = fields.Integer(metadata={"description": "optimizer steps per epoch"})
    loss = fields.Float(allow_none=True)
    samples_per_second = fields.Float(allow_none=True)
    eta_seconds = fields.Float(allow_none=True)


class EntityTypeScoreSchema(Schema):
    precision = fields.Float()
    recall = fields.Float()
    f1 = fields.Float()
    support = fields.Integer(metadata={"description": "true entities of the type"})


class BaselineSchema(Schema):
    """The classical baseline a run trained on its train split, scored on the same test items as the model."""

    name = fields.String(metadata={"description": "classical"})
    method = fields.String(
        metadata={
            "description": "tfidf_logistic_regression (text), pixels_logistic_regression (images) or "
            "conll2003_dictionary (token classification: every string that was an entity in the train split, "
            "tagged with its most frequent type, longest match first, on word boundaries)"
        }
    )
    items = fields.Integer(metadata={"description": "test items scored"})
    accuracy = fields.Float(metadata={"description": "classification runs"})
    macro_f1 = fields.Float(metadata={"description": "classification runs"})
    entity_precision = fields.Float(metadata={"description": "token classification runs (seqeval, strict IOB2)"})
    entity_recall = fields.Float(metadata={"description": "token classification runs (seqeval, strict IOB2)"})
    entity_f1 = fields.Float(metadata={"description": "token classification runs (seqeval, strict IOB2, micro)"})
    per_type = fields.Dict(
        keys=fields.String(),
        values=fields.Nested(EntityTypeScoreSchema),
        metadata={"description": "token classification runs: scores per entity type"},
    )


class TrialSchema(Schema):
    """One trial of a run's recipe search."""

    number = fields.Integer()
    state = fields.String(
        metadata={
            "description": "waiting, running, complete, pruned (stopped early by the pruner or by the search's "
            "wall time), failed, or skipped (not started within the wall time)"
        }
    )
    study_trial = fields.Integer(allow_none=True, metadata={"description": "its number in the run's optuna study"})
    params = fields.Dict(metadata={"description": "the values this trial tried"})
    history = fields.List(
        fields.Dict(), metadata={"description": "per epoch: epoch, validation macro_f1 (what the pruner saw), val_loss"}
    )
    validation_macro_f1 = fields.Float(allow_none=True, metadata={"description": "the best epoch's"})
    seconds = fields.Float(allow_none=True)
    reason = fields.String(allow_none=True, metadata={"description": "why it was pruned, failed or skipped"})
    started_at = Timestamp(allow_none=True)
    finished_at = Timestamp(allow_none=True)


class ChosenTrialSchema(Schema):
    trial = fields.Integer()
    params = fields.Dict()
    validation_macro_f1 = fields.Float()


class SearchSettingsSchema(Schema):
    trials = fields.Integer()
    max_seconds = fields.Integer()
    pruner = fields.String()
    keep_winner = fields.Boolean()
    space = fields.Dict(
        metadata={"description": "the ranges searched, the task's defaults with the request's over them"}
    )


class SearchRecordSchema(Schema):
    """A run's recipe search: what was asked, how it went, and every trial."""

    settings = fields.Nested(SearchSettingsSchema)
    state = fields.String(metadata={"description": "waiting, searching, chosen, or failed (no trial completed)"})
    started_at = fields.String(allow_none=True)
    finished_at = fields.String(allow_none=True)
    seconds = fields.Float(allow_none=True, metadata={"description": "wall time of the search"})
    chosen = fields.Nested(
        ChosenTrialSchema,
        allow_none=True,
        metadata={"description": "the complete trial with the best validation macro-F1; its values are trained"},
    )
    trials = fields.List(fields.Nested(TrialSchema))


class RunSchema(Schema):
    id = fields.String()
    seq = fields.Integer()
    tenant = fields.String()
    dataset_id = fields.String()
    snapshot_id = fields.String()
    manifest = fields.Nested(ObjectRef)
    task_type = fields.String()
    labels = fields.List(fields.String())
    model_name = fields.String()
    base_model = fields.String()
    base_weights = fields.Dict(allow_none=True)
    hyperparameters = fields.Dict()
    reason = fields.String()
    source = fields.String()
    launch = fields.String()
    status = fields.String()
    cancel_requested = fields.Boolean()
    failure_reason = fields.String(allow_none=True)
    attempts = fields.Integer(
        metadata={
            "description": "executions started so far: a takeover from a dead worker and a retry after a transient "
            "error each add one; the run fails once it would exceed 5"
        }
    )
    dispatched_at = Timestamp(
        allow_none=True,
        metadata={
            "description": "when the run was last sent to the training queue; null while it waits for one of "
            "its tenant's running slots (max_running_runs_per_tenant), and for an externally launched run"
        },
    )
    resumed_from_epoch = fields.Integer(allow_none=True)
    world_size = fields.Integer()
    device = fields.String(allow_none=True)
    progress = fields.Nested(ProgressSchema)
    history = fields.List(fields.Dict())
    metrics = fields.Dict(
        allow_none=True,
        metadata={
            "description": "The served graph's validation metrics (classification: accuracy, macro_f1, per_class, "
            "...; token classification: entity_precision, entity_recall, entity_f1 and per_type, seqeval strict "
            "IOB2), `test` (the same on the test split), best_epoch, baseline and baseline_lift"
        },
    )
    baseline = fields.Nested(
        BaselineSchema, allow_none=True, metadata={"description": "null until the run publishes, or without one"}
    )
    baseline_lift = fields.Float(
        allow_none=True,
        metadata={
            "description": "The model's test macro-F1 (token classification: entity F1) minus the classical "
            "baseline's on the same items: what fine-tuning earned over ten lines of scikit-learn (null until the "
            "run publishes)"
        },
    )
    artifacts = fields.Dict(allow_none=True)
    search = fields.Nested(
        SearchRecordSchema,
        attribute="search_record",
        allow_none=True,
        metadata={"description": "null for a run without a recipe search"},
    )
    created_at = Timestamp()
    started_at = Timestamp(allow_none=True)
    finished_at = Timestamp(allow_none=True)
    updated_at = Timestamp()


class RunListSchema(Schema):
    runs = fields.List(fields.Nested(RunSchema))
    next_after = fields.Integer(allow_none=True)


class RunLimitDetailsSchema(Schema):
    limit = fields.Raw(
        metadata={
            "description": "too_many_runs: the limit reached (one of " + ", ".join(RUN_LIMITS) + "); "
            "quota_exhausted: the monthly quota, in the meter's unit",
            "oneOf": [{"type": "string", "enum": list(RUN_LIMITS)}, {"type": "integer"}],
        }
    )
    value = fields.Integer(metadata={"description": "too_many_runs: the limit's value"})
    tenant = fields.String()
    meter = fields.String(metadata={"description": "quota_exhausted: the meter whose monthly quota is reached"})
    used = fields.Integer(metadata={"description": "quota_exhausted: used this month"})
    requested = fields.Integer(metadata={"description": "quota_exhausted: what the request asked for"})


class RunLimitErrorBodySchema(Schema):
    code = fields.String(validate=validate.OneOf(("too_many_runs", "quota_exhausted")))
    message = fields.String()
    details = fields.Nested(RunLimitDetailsSchema)


class RunLimitErrorSchema(Schema):
    """The error envelope of a request refused by one of its tenant's run limits."""

    error = fields.Nested(RunLimitErrorBodySchema, required=True)
