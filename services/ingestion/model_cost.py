"""What a model version cost to train and costs to serve, from the meter store, priced by the price list.

- Training: the run's own usage record (`<run_id>.compute`, sent by training when the run ended): device-seconds
  on a CPU or GPU meter, the device named, priced per CPU- or GPU-hour.
- Serving, at current traffic: the version's `prediction_rows` and `prediction_compute_seconds` over the last
  `SERVING_WINDOW` (24 hours), as compute seconds per 1,000 predictions, what that compute costs at the CPU-hour
  price, and what 1,000 predictions are billed (the price list's `per_1k_predictions`).

The registry asks for it (`GET /v1/internal/usage/model-cost`) and adds what the version gained (its gate's
metric difference) to its version view.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from services.ingestion.invoices import PriceList
from services.ingestion.models import UsageRecord

SERVING_WINDOW = timedelta(hours=24)
HOUR = Decimal(3600)
MONEY_PLACES = Decimal("0.000001")  # costs per run or per 1k predictions are small: kept to micro-units
SECONDS_PLACES = Decimal("0.001")


def _decimal(value: float) -> Decimal:
    rounded = round(float(value), 6)
    return Decimal(int(rounded)) if rounded.is_integer() else Decimal(repr(rounded))


def training_cost(session: Session, prices: PriceList, tenant: str, run_id: str) -> dict[str, Any] | None:
    row = session.scalar(
        select(UsageRecord).where(UsageRecord.tenant == tenant, UsageRecord.record_id == f"{run_id}.compute")
    )
    if row is None:
        return None
    seconds = _decimal(row.value)
    gpu = row.meter == "training_gpu_seconds"
    price = prices.prices["per_gpu_hour" if gpu else "per_cpu_hour"]
    return {
        "run_id": run_id,
        "meter": row.meter,
        "device": row.dimensions.get("device"),
        "seconds": seconds,
        "unit_price": price,
        "unit": "GPU-hour" if gpu else "CPU-hour",
        "cost": (seconds / HOUR * price).quantize(MONEY_PLACES, rounding=ROUND_HALF_UP),
    }


def serving_cost(
    session: Session, prices: PriceList, tenant: str, model: str, version: int, now: datetime
) -> dict[str, Any]:
    start = now - SERVING_WINDOW
    totals = dict(
        session.execute(
            select(UsageRecord.meter, func.sum(UsageRecord.value))
            .where(UsageRecord.tenant == tenant, UsageRecord.model == model, UsageRecord.version == str(version))
            .where(UsageRecord.time >= start, UsageRecord.time < now)
            .where(UsageRecord.meter.in_(("prediction_rows", "prediction_compute_seconds")))
            .group_by(UsageRecord.meter)
        ).all()
    )
    rows = _decimal(totals.get("prediction_rows") or 0)
    compute = _decimal(totals.get("prediction_compute_seconds") or 0)
    per_1k = (compute / rows * 1000).quantize(SECONDS_PLACES, rounding=ROUND_HALF_UP) if rows else None
    compute_cost = (
        (per_1k / HOUR * prices.prices["per_cpu_hour"]).quantize(MONEY_PLACES, rounding=ROUND_HALF_UP)
        if per_1k is not None
        else None
    )
    return {
        "window_hours": int(SERVING_WINDOW.total_seconds() // 3600),
        "predictions": rows,
        "compute_seconds": compute,
        "compute_seconds_per_1k": per_1k,
        "compute_cost_per_1k": compute_cost,
        "price_per_1k": prices.prices["per_1k_predictions"],
    }


def model_cost(
    session: Session, prices: PriceList, *, tenant: str, model: str, version: int, run_id: str, now: datetime
) -> dict[str, Any]:
    return {
        "currency": prices.currency,
        "training": training_cost(session, prices, tenant, run_id),
        "serving": serving_cost(session, prices, tenant, model, version, now),
    }
