"""A version's cost and return, for its version view: what it cost to train and costs to serve (from ingestion's
meter store, priced by the deployment's price list) beside what it gained (its gate decision's difference in the
primary metric over production, and its lift over the classical baseline).

The meters live in ingestion, so the registry asks it (`GET /v1/internal/usage/model-cost`, internal token,
through the one service-to-service client); when ingestion does not answer, the view carries `cost: null` rather
than failing, says so in the log, and does not ask again for `RETRY_AFTER_S` (a view must not wait on a
missing ingestion each time).
"""

from __future__ import annotations

import time
from decimal import Decimal, InvalidOperation
from typing import Any

from shared.client.http import ServiceClient
from shared.logging import get_logger
from shared.runtime import Runtime

log = get_logger(__name__)

TIMEOUT_S = 3.0
RETRY_AFTER_S = 30.0
MODEL_COST_PATH = "/v1/internal/usage/model-cost"


def _client(runtime: Runtime) -> ServiceClient:
    client = getattr(runtime, "ingestion_client", None)
    if client is None:
        settings = runtime.settings
        client = ServiceClient(settings.ingestion_url, settings.internal_token, timeout=TIMEOUT_S)
        runtime.ingestion_client = client  # type: ignore[attr-defined]
    return client


def gain(view: dict[str, Any]) -> dict[str, Any] | None:
    """The gate's verdict in numbers: the primary metric's difference over production, with its interval."""
    decision = view.get("decision") or {}
    difference = decision.get("difference") or {}
    if not decision:
        return None
    return {
        "outcome": decision.get("outcome"),
        "metric": difference.get("metric") or (decision.get("policy") or {}).get("primary_metric"),
        "difference": difference.get("value"),
        "ci_low": difference.get("ci_low"),
        "ci_high": difference.get("ci_high"),
        "baseline_lift": view.get("baseline_lift"),
    }


def _per_point(training: dict[str, Any] | None, gained: dict[str, Any] | None) -> str | None:
    """Training cost per percentage point of the metric gained: the price of a retrain's improvement."""
    if not training or not gained or not isinstance(gained.get("difference"), int | float):
        return None
    points = Decimal(repr(gained["difference"])) * 100
    if points <= 0:
        return None
    try:
        return str((Decimal(training["cost"]) / points).quantize(Decimal("0.000001")))
    except (InvalidOperation, KeyError):
        return None


def version_cost(runtime: Runtime, tenant: str, view: dict[str, Any]) -> dict[str, Any] | None:
    if time.monotonic() < getattr(runtime, "model_cost_unavailable_until", 0.0):
        return None
    params = {"tenant": tenant, "model": view["model_name"], "version": view["version"], "run_id": view["run_id"]}
    try:
        found = _client(runtime).get(MODEL_COST_PATH, params=params)
    except Exception as exc:  # ingestion away: the view still answers, without its cost
        runtime.model_cost_unavailable_until = time.monotonic() + RETRY_AFTER_S  # type: ignore[attr-defined]
        log.warning("model_cost_unavailable", model_name=view["model_name"], version=view["version"], error=str(exc))
        return None
    gained = gain(view)
    return {**found, "gain": gained, "training_cost_per_point": _per_point(found.get("training"), gained)}
