"""Registry's request and response schemas (marshmallow); they also make the OpenAPI document."""

from __future__ import annotations

from typing import Any

from marshmallow import Schema, ValidationError, fields, pre_load, validate, validates_schema

from services.registry.models import (
    DEFAULT_BOOTSTRAP_SAMPLES,
    DEFAULT_CONFIDENCE,
    DEFAULT_FLOOR,
    DEFAULT_MAX_CLASS_REGRESSION,
    DEFAULT_MIN_TEST_ITEMS,
    DEFAULT_PRIMARY_METRIC,
    DEFAULT_PROMOTION_MARGIN,
    FLOORS,
    PRIMARY_METRICS,
)
from shared.artifacts import SPLITS
from shared.auth import TENANT_ID
from shared.schemas import Timestamp

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


POLICY_DOCS = {
    "primary_metric": f"The metric compared: {' or '.join(PRIMARY_METRICS)} (default {DEFAULT_PRIMARY_METRIC}); "
    "a token_classification model is compared on entity_f1 (seqeval strict entity F1, micro), its default and "
    "only choice, and its per-class guard (c) is per entity type.",
    "margin": f"Condition (a): candidate - production must be at least this (default {DEFAULT_PROMOTION_MARGIN}).",
    "auto_promote": "False sends every new version to staging; a person promotes by hand (default true).",
    "confidence": "Condition (b): the level of the paired-bootstrap interval of the difference, whose lower bound "
    f"must be above 0 (default {DEFAULT_CONFIDENCE}).",
    "max_class_regression": "Condition (c): the largest drop of any one class's F1 allowed "
    f"(default {DEFAULT_MAX_CLASS_REGRESSION}).",
    "min_score": "Condition (d): the floor the candidate's primary metric must reach; null (the default) means the "
    "score of the baseline `floor` names (the majority baseline by default) on the same test items.",
    "floor": "Condition (d), when min_score is null: which baseline's score on the same test items is the floor: "
    "majority (always the train split's most frequent label) or classical_baseline (TF-IDF or pixels + logistic "
    "regression trained on the same train split; a report without one falls back to the majority baseline) "
    f"(default {DEFAULT_FLOOR}).",
    "min_test_items": "Condition (0): fewer test items than this and the gate does not decide "
    f"(default {DEFAULT_MIN_TEST_ITEMS}).",
    "bootstrap_samples": "Resamples of the paired bootstrap, seeded from the evaluation set's sha256 "
    f"(default {DEFAULT_BOOTSTRAP_SAMPLES}).",
}
POLICY_FIELDS = tuple(POLICY_DOCS)
RETIRED_POLICY_FIELDS = {
    "require_same_split": "retired: the gate now always scores the candidate and production on the same frozen "
    "test items, so there is no other split to require",
}


def _doc(name: str) -> dict[str, Any]:
    return {"metadata": {"description": POLICY_DOCS[name]}}


class PolicySchema(Schema):
    """The promotion policy the gate applies (services.registry.promotion), defaults filled in."""

    primary_metric = fields.String(**_doc("primary_metric"))
    margin = fields.Float(**_doc("margin"))
    auto_promote = fields.Boolean(**_doc("auto_promote"))
    confidence = fields.Float(**_doc("confidence"))
    max_class_regression = fields.Float(**_doc("max_class_regression"))
    min_score = fields.Float(allow_none=True, **_doc("min_score"))
    floor = fields.String(validate=validate.OneOf(FLOORS), **_doc("floor"))
    min_test_items = fields.Integer(**_doc("min_test_items"))
    bootstrap_samples = fields.Integer(**_doc("bootstrap_samples"))


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
    created_at = Timestamp()
    updated_at = Timestamp()


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
    """Change some fields of the promotion policy; the others keep their value. Unknown fields are refused."""

    tenant = _tenant(required=True)
    primary_metric = fields.String(validate=validate.OneOf(PRIMARY_METRICS), **_doc("primary_metric"))
    margin = fields.Float(validate=validate.Range(min=0.0, max=1.0), **_doc("margin"))
    auto_promote = fields.Boolean(**_doc("auto_promote"))
    confidence = fields.Float(validate=validate.Range(min=0.5, max=0.999), **_doc("confidence"))
    max_class_regression = fields.Float(validate=validate.Range(min=0.0, max=1.0), **_doc("max_class_regression"))
    min_score = fields.Float(allow_none=True, validate=validate.Range(min=0.0, max=1.0), **_doc("min_score"))
    floor = fields.String(validate=validate.OneOf(FLOORS), **_doc("floor"))
    min_test_items = fields.Integer(
        strict=True, validate=validate.Range(min=1, max=1_000_000), **_doc("min_test_items")
    )
    bootstrap_samples = fields.Integer(
        strict=True, validate=validate.Range(min=100, max=20_000), **_doc("bootstrap_samples")
    )
    actor = _actor()

    @pre_load
    def _retired(self, data: Any, **_: Any) -> Any:
        if isinstance(data, dict):
            retired = {name: [why] for name, why in RETIRED_POLICY_FIELDS.items() if name in data}
            if retired:
                raise ValidationError(retired)
        return data

    @validates_schema
    def _something(self, data: dict[str, Any], **_: Any) -> None:
        if not set(data) & set(POLICY_FIELDS):
            raise ValidationError(f"give at least one policy field to change: {', '.join(POLICY_FIELDS)}")


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


class EvaluationSetSchema(Schema):
    """The frozen items a decision scored both versions on: one split of one snapshot."""

    snapshot_id = fields.String()
    split = fields.String(validate=validate.OneOf(SPLITS))
    items = fields.Integer()
    sha256 = fields.String(metadata={"description": "Of the ordered item ids; also seeds the bootstrap."})


class ReportRefSchema(Schema):
    bucket = fields.String()
    key = fields.String()
    sha256 = fields.String()


class ClassScoreSchema(Schema):
    precision = fields.Float()
    recall = fields.Float()
    f1 = fields.Float()
    support = fields.Integer(metadata={"description": "Items of this class in the evaluation set."})


class ScoresSchema(Schema):
    """One model's scores on the evaluation set, recomputed by the registry from its per-item answers."""

    accuracy = fields.Float(metadata={"description": "Classifiers."})
    macro_f1 = fields.Float(metadata={"description": "Classifiers."})
    ece = fields.Float(allow_none=True, metadata={"description": "Expected calibration error, as the report gives it."})
    per_class = fields.Dict(
        keys=fields.String(),
        values=fields.Nested(ClassScoreSchema),
        metadata={"description": "Per class; for a token_classification model, per entity type."},
    )
    entity_f1 = fields.Float(
        metadata={"description": "token_classification: entity F1, micro over entities (seqeval strict)."}
    )
    entity_precision = fields.Float(metadata={"description": "token_classification."})
    entity_recall = fields.Float(metadata={"description": "token_classification."})
    exact_match = fields.Float(
        metadata={"description": "token_classification: share of items whose entities are all exactly right."}
    )


class ScoredVersionSchema(Schema):
    version = fields.Integer(allow_none=True)
    run_id = fields.String(allow_none=True)
    metrics = fields.Nested(ScoresSchema, allow_none=True, metadata={"description": "On the evaluation set."})
    error = fields.String(allow_none=True, metadata={"description": "Why production could not be scored."})


class DifferenceSchema(Schema):
    """candidate - production on the primary metric, with its paired-bootstrap confidence interval."""

    metric = fields.String()
    value = fields.Float()
    ci_low = fields.Float(allow_none=True)
    ci_high = fields.Float(allow_none=True)
    confidence = fields.Float()
    method = fields.String(metadata={"description": "paired_bootstrap: both scored on the same resampled items."})
    samples = fields.Integer()
    seed = fields.Integer(metadata={"description": "From the evaluation set's sha256: the same report, the same CI."})


class ClassChangeSchema(Schema):
    label = fields.String()
    candidate = fields.Float(metadata={"description": "The candidate's F1 for this class."})
    production = fields.Float(metadata={"description": "Production's F1 for this class, on the same items."})
    drop = fields.Float(metadata={"description": "production - candidate; negative when the class improved."})
    support = fields.Integer()


class ConditionSchema(Schema):
    """One condition of the gate, its numbers and whether it passed; which numbers depends on the condition."""

    id = fields.String(metadata={"description": "0, a, b, c or d, as the registry's documentation names them."})
    name = fields.String(
        validate=validate.OneOf(("min_test_items", "margin", "credible_improvement", "class_regression", "min_score")),
        metadata={"description": "The policy field the condition applies."},
    )
    passed = fields.Boolean()
    observed = fields.Float(
        allow_none=True,
        metadata={
            "description": "What was measured: items (0), the difference (a), the interval's lower bound (b), the "
            "largest per-class F1 drop (c), the candidate's score (d)."
        },
    )
    threshold = fields.Float(allow_none=True, metadata={"description": "What it was held against."})
    detail = fields.String(metadata={"description": "The condition in words, with its numbers."})
    candidate = fields.Float(metadata={"description": "(a) the candidate's primary metric."})
    production = fields.Float(metadata={"description": "(a) production's primary metric on the same items."})
    ci_low = fields.Float(metadata={"description": "(b)"})
    ci_high = fields.Float(metadata={"description": "(b)"})
    confidence = fields.Float(metadata={"description": "(b)"})
    method = fields.String(metadata={"description": "(b)"})
    samples = fields.Integer(metadata={"description": "(b)"})
    seed = fields.Integer(metadata={"description": "(b)"})
    p_value = fields.Float(metadata={"description": "(b) accuracy only: McNemar's exact test, for reference."})
    only_candidate_right = fields.Integer(metadata={"description": "(b) accuracy only: discordant items."})
    only_production_right = fields.Integer(metadata={"description": "(b) accuracy only: discordant items."})
    worst_class = fields.String(metadata={"description": "(c) the class whose F1 dropped most."})
    per_class = fields.List(fields.Nested(ClassChangeSchema), metadata={"description": "(c)"})
    floor_source = fields.String(metadata={"description": "(d) where the floor comes from."})
    lift = fields.Float(allow_none=True, metadata={"description": "(d) candidate - majority baseline."})
    floor_baseline = fields.String(
        allow_none=True, metadata={"description": "(d) the baseline whose score is the floor (null: min_score)."}
    )


class DecisionSchema(Schema):
    """The promotion gate's decision: on which items, both versions' scores there, the difference, the conditions."""

    evaluation_set = fields.Nested(EvaluationSetSchema, allow_none=True)
    report = fields.Nested(ReportRefSchema, allow_none=True, metadata={"description": "The evaluation.json used."})
    candidate = fields.Nested(ScoredVersionSchema)
    production = fields.Nested(
        ScoredVersionSchema, allow_none=True, metadata={"description": "Recomputed on the same evaluation set."}
    )
    baselines = fields.Dict(
        keys=fields.String(), values=fields.Nested(ScoresSchema), metadata={"description": "majority, …"}
    )
    difference = fields.Nested(DifferenceSchema, allow_none=True)
    baseline_lift = fields.Float(
        allow_none=True,
        metadata={
            "description": "The candidate's macro-F1 (token_classification: entity F1) minus the classical "
            "baseline's on the evaluation set, recomputed from both answers; null when the report has no classical "
            "baseline."
        },
    )
    conditions = fields.List(fields.Nested(ConditionSchema))
    policy = fields.Nested(PolicySchema, metadata={"description": "The policy the decision applied."})
    outcome = fields.String(validate=validate.OneOf(("production", "staging")))
    reason = fields.String()
    decided_at = fields.String(metadata={"format": "date-time"})


class TrainingCostSchema(Schema):
    run_id = fields.String()
    meter = fields.String(metadata={"description": "training_cpu_seconds or training_gpu_seconds"})
    device = fields.String(allow_none=True)
    seconds = fields.String(metadata={"description": "device-seconds (a decimal), times the run's world size"})
    unit = fields.String(metadata={"description": "CPU-hour or GPU-hour"})
    unit_price = fields.String()
    cost = fields.String(metadata={"description": "seconds / 3600 x unit_price, a decimal"})


class ServingCostSchema(Schema):
    window_hours = fields.Integer()
    predictions = fields.String(metadata={"description": "rows this version predicted in the window"})
    compute_seconds = fields.String()
    compute_seconds_per_1k = fields.String(allow_none=True, metadata={"description": "null without traffic"})
    compute_cost_per_1k = fields.String(allow_none=True, metadata={"description": "at the CPU-hour price"})
    price_per_1k = fields.String(metadata={"description": "what 1,000 predictions are billed"})


class GainSchema(Schema):
    outcome = fields.String(allow_none=True)
    metric = fields.String(allow_none=True)
    difference = fields.Float(allow_none=True, metadata={"description": "candidate minus production, same items"})
    ci_low = fields.Float(allow_none=True)
    ci_high = fields.Float(allow_none=True)
    baseline_lift = fields.Float(allow_none=True)


class VersionCostSchema(Schema):
    currency = fields.String()
    training = fields.Nested(TrainingCostSchema, allow_none=True, metadata={"description": "null: not metered"})
    serving = fields.Nested(ServingCostSchema)
    gain = fields.Nested(GainSchema, allow_none=True, metadata={"description": "null: no gate decision"})
    training_cost_per_point = fields.String(
        allow_none=True,
        metadata={"description": "training cost per percentage point of the metric gained; null unless it gained"},
    )


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
    decision = fields.Nested(
        DecisionSchema, allow_none=True, metadata={"description": "The promotion gate's decision and numbers."}
    )
    baseline_lift = fields.Float(
        allow_none=True,
        metadata={
            "description": "What fine-tuning earned: the version's test macro-F1 minus the classical baseline's "
            "(TF-IDF or pixels + logistic regression, trained on the same train split), as the gate recomputed it; "
            "null when its run carried no classical baseline."
        },
    )
    created_at = Timestamp()
    archived_at = Timestamp(allow_none=True)
    archive_reason = fields.String(allow_none=True)
    cost = fields.Nested(
        VersionCostSchema,
        allow_none=True,
        metadata={
            "description": "GET of one version only: its training and serving cost and its gain (null: "
            "the meters could not be read)"
        },
    )


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
    created_at = Timestamp()
    evaluation_set = fields.Nested(
        EvaluationSetSchema,
        allow_none=True,
        metadata={"description": "The set this version's own gate decision scored it on (null: none)."},
    )
    scores = fields.Nested(ScoresSchema, allow_none=True, metadata={"description": "Its scores on that set."})


class ClassRowSchema(Schema):
    label = fields.String()
    support = fields.Integer()
    a = fields.Float(metadata={"description": "Version a's F1 for this class."})
    b = fields.Float(metadata={"description": "Version b's F1 for this class."})
    delta = fields.Float(metadata={"description": "b - a."})


class MetricRowSchema(Schema):
    name = fields.String()
    a = fields.Raw(allow_none=True)
    b = fields.Raw(allow_none=True)
    delta = fields.Float(allow_none=True, metadata={"description": "b - a, where both are numbers."})


class SharedEvaluationSchema(Schema):
    """Both versions on one evaluation set: the one a gate decision scored them on side by side."""

    evaluation_set = fields.Nested(EvaluationSetSchema)
    scored_by = fields.Integer(
        allow_none=True,
        metadata={
            "description": "The version whose gate decision scored both; null when each version's own decision "
            "scored it on the very same items (equal sha256)."
        },
    )
    metrics = fields.List(
        fields.Nested(MetricRowSchema),
        metadata={"description": "accuracy, macro_f1, ece (a token_classification model: entity_f1, ece)."},
    )
    per_class = fields.List(fields.Nested(ClassRowSchema))


class CompareSchema(Schema):
    model_name = fields.String()
    primary_metric = fields.String()
    a = fields.Nested(ComparedSideSchema)
    b = fields.Nested(ComparedSideSchema)
    same_evaluation_set = fields.Boolean(
        metadata={
            "description": "True when both were scored on the same items: one's gate decision scored the other, "
            "or their own decisions scored them on sets with equal sha256."
        }
    )
    evaluation = fields.Nested(
        SharedEvaluationSchema,
        allow_none=True,
        metadata={"description": "Both versions on that set; null when no decision scored them on the same items."},
    )
    same_validation_split = fields.Boolean(
        metadata={"description": "Whether both training records (`metrics`) come from the same snapshot."}
    )
    metrics = fields.List(
        fields.Nested(MetricRowSchema),
        metadata={
            "description": "Each version's own training record (its validation split), flattened; comparable only "
            "when same_validation_split is true."
        },
    )


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
    expires_at = Timestamp()
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
    created_at = Timestamp()


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
    created_at = Timestamp()


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
