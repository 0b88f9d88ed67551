"""Inference's monitoring API (partner key; everything is the caller's own):

- `GET /v1/predictions`: the prediction log, newest first, filtered by model, version, time range, confidence
  range, predicted label, ground truth present, API; paged by `cursor` (keyset on time and id, stable while
  new predictions arrive). `GET /v1/predictions/{id}`: one.
- `GET /v1/monitoring/models/{name}`: windows and versions side by side (traffic, latency, live quality, drift
  against the evaluation baseline, input statistics, shadow agreement), resources and active alerts.
- `POST /v1/monitoring/models/{name}/evaluate`: evaluate the policy now (the schedule does it by itself).
- `GET|PUT /v1/monitoring/models/{name}/policy`, `GET /v1/monitoring/alerts`, `GET|PUT /v1/monitoring/retention`.
"""

from __future__ import annotations

import base64
import binascii
import json
from datetime import datetime
from typing import Any

from flask_smorest import Blueprint
from sqlalchemy import and_, or_, select

from services.inference.models import Prediction
from services.inference.request_log import annotate, install_request_annotations
from services.inference.schemas import (
    AlertListSchema,
    AlertQuerySchema,
    EvaluationResultSchema,
    LoggedPredictionSchema,
    MonitoringQuerySchema,
    MonitoringReportSchema,
    MonitorPolicySchema,
    PredictionPageSchema,
    PredictionQuerySchema,
    RetentionSchema,
)
from services.inference.server import InferenceServer, current_server
from shared.auth import current_principal, require_partner, require_partner_or_delegated, requires_scope
from shared.errors import NotFound, Unprocessable
from shared.logging import get_logger

log = get_logger(__name__)

predictions = Blueprint(
    "inference_predictions", __name__, url_prefix="/v1/predictions", description="The prediction log"
)
monitoring = Blueprint(
    "inference_monitoring", __name__, url_prefix="/v1/monitoring", description="Live quality, drift, policies, alerts"
)
for _blueprint in (predictions, monitoring):
    install_request_annotations(_blueprint)


def _written(server: InferenceServer) -> None:
    """Write this process's buffered predictions first, so that a query sees what this replica answered."""
    try:
        server.prediction_log.flush()
    except Exception as exc:  # storage or database down: answer from what is written; the writer retries
        log.warning("prediction_log_flush_before_query_failed", error=str(exc)[:300])


def _cursor(row: Prediction) -> str:
    return base64.urlsafe_b64encode(json.dumps([row.created_at.isoformat(), row.id]).encode()).decode()


def _after(cursor: str) -> tuple[datetime, str]:
    try:
        created, prediction_id = json.loads(base64.urlsafe_b64decode(cursor.encode()))
        return datetime.fromisoformat(created), str(prediction_id)
    except (ValueError, TypeError, binascii.Error) as exc:
        raise Unprocessable("cursor is not one this API gave", {"fields": {"cursor": ["invalid"]}}) from exc


def _describe(row: Prediction) -> dict[str, Any]:
    return {
        "id": row.id,
        "model_name": row.model_name,
        "model_version": row.model_version,
        "api": row.api,
        "input_kind": row.input_kind,
        "input": row.input_ref(),
        "predicted_label": row.predicted_label,
        "confidence": row.confidence,
        "outputs": row.outputs,
        "entities": row.entities,
        "latency_ms": row.latency_ms,
        "input_stats": row.input_stats,
        "sampled": bool(row.sampled),
        "feedback_label": row.feedback_label,
        "feedback_spans": row.feedback_spans,
        "true_label": row.true_label,
        "true_label_source": row.true_label_source,
        "subject_id": row.subject_id,
        "trace_id": row.trace_id,
        "created_at": row.created_at,
    }


@predictions.get("")
@require_partner
@requires_scope("read")
@predictions.arguments(PredictionQuerySchema, location="query")
@predictions.response(200, PredictionPageSchema)
def list_predictions(query: dict[str, Any]) -> dict[str, Any]:
    """Your logged predictions, newest first, filtered and paged."""
    server = current_server()
    _written(server)
    statement = select(Prediction).where(Prediction.tenant == current_principal().tenant)
    filters = {
        "model": lambda v: Prediction.model_name == v,
        "version": lambda v: Prediction.model_version == v,
        "since": lambda v: Prediction.created_at >= v,
        "until": lambda v: Prediction.created_at < v,
        "min_confidence": lambda v: Prediction.confidence >= v,
        "max_confidence": lambda v: Prediction.confidence <= v,
        "label": lambda v: Prediction.predicted_label == v,
        "labeled": lambda v: Prediction.true_label.is_not(None) if v else Prediction.true_label.is_(None),
        "api": lambda v: Prediction.api == v,
    }
    for name, condition in filters.items():
        if name in query:
            statement = statement.where(condition(query[name]))
    if "cursor" in query:
        created, prediction_id = _after(query["cursor"])
        statement = statement.where(
            or_(Prediction.created_at < created, and_(Prediction.created_at == created, Prediction.id < prediction_id))
        )
    limit = query["limit"]
    with server.runtime.db.session() as session:
        rows = session.scalars(
            statement.order_by(Prediction.created_at.desc(), Prediction.id.desc()).limit(limit + 1)
        ).all()
    page = rows[:limit]
    return {
        "predictions": [_describe(row) for row in page],
        "next_cursor": _cursor(page[-1]) if len(rows) > limit else None,
    }


@predictions.get("/<prediction_id>")
@require_partner
@requires_scope("read")
@predictions.response(200, LoggedPredictionSchema)
def get_prediction(prediction_id: str) -> dict[str, Any]:
    server = current_server()
    if server.prediction_log.is_pending(prediction_id):
        _written(server)
    with server.runtime.db.session() as session:
        row = session.get(Prediction, prediction_id)
    if row is None or row.tenant != current_principal().tenant:
        raise NotFound(f"prediction {prediction_id} does not exist")
    return _describe(row)


@monitoring.get("/models/<name>")
@require_partner_or_delegated  # the console's operator pages read it for the tenant they picked
@requires_scope("read")
@monitoring.arguments(MonitoringQuerySchema, location="query")
@monitoring.response(200, MonitoringReportSchema)
def model_report(query: dict[str, Any], name: str) -> dict[str, Any]:
    """Windows and versions side by side: traffic, latency, live quality, drift, inputs, shadow, resources."""
    server = current_server()
    model = server.model(current_principal().tenant, name)
    annotate(model=name)
    window_s = query.get("window_s") or server.monitor.policy(model.tenant, name)["window_s"]
    _written(server)
    return server.monitor.report(model, windows=query["windows"], window_s=window_s)


@monitoring.post("/models/<name>/evaluate")
@require_partner
@requires_scope("admin")
@monitoring.response(200, EvaluationResultSchema)
def evaluate_now(name: str) -> dict[str, Any]:
    """Evaluate the model's policy on its last window now; alerts that fire emit `model.degraded`."""
    server = current_server()
    annotate(model=name)
    model = server.model(current_principal().tenant, name)
    _written(server)
    return server.monitor.evaluate(model)


@monitoring.get("/models/<name>/policy")
@require_partner
@requires_scope("read")
@monitoring.response(200, MonitorPolicySchema)
def get_policy(name: str) -> dict[str, Any]:
    server = current_server()
    server.model(current_principal().tenant, name)
    return server.monitor.policy(current_principal().tenant, name)


@monitoring.put("/models/<name>/policy")
@require_partner
@requires_scope("admin")
@monitoring.arguments(MonitorPolicySchema)
@monitoring.response(200, MonitorPolicySchema)
def put_policy(body: dict[str, Any], name: str) -> dict[str, Any]:
    """Change some of the model's policy: thresholds, minimum samples, schedule, sampling, shadow traffic."""
    server = current_server()
    model = server.model(current_principal().tenant, name)
    shadow = body.get("shadow_version")
    if shadow is not None and shadow not in model.state.versions:
        raise Unprocessable(
            f"version {shadow} of {name!r} is not loaded here; give it an alias (staging, say) first",
            {"fields": {"shadow_version": ["not loaded"]}},
        )
    return server.monitor.set_policy(model.tenant, name, body)


@monitoring.get("/alerts")
@require_partner_or_delegated
@requires_scope("read")
@monitoring.arguments(AlertQuerySchema, location="query")
@monitoring.response(200, AlertListSchema)
def list_alerts(query: dict[str, Any]) -> dict[str, Any]:
    monitor = current_server().monitor
    return {
        "alerts": monitor.alerts(current_principal().tenant, query.get("model"), query.get("active"), query["limit"])
    }


@monitoring.get("/retention")
@require_partner
@requires_scope("read")
@monitoring.response(200, RetentionSchema)
def get_retention() -> dict[str, Any]:
    return {"days": current_server().monitor.retention_days(current_principal().tenant)}


@monitoring.put("/retention")
@require_partner
@requires_scope("admin")
@monitoring.arguments(RetentionSchema)
@monitoring.response(200, RetentionSchema)
def put_retention(body: dict[str, Any]) -> dict[str, Any]:
    """How many days your prediction log is kept (rows and packed inputs)."""
    return {"days": current_server().monitor.set_retention(current_principal().tenant, body["days"])}
