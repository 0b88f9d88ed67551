"""Invoices: a billing period's usage per tenant, priced by the deployment's price list, in exact decimals.

The price list is configuration (`PRICE_LIST`: a JSON object, or the path of a JSON file); what it omits keeps
the defaults below. Each price turns one meter into an invoice line: the meter's total over the period in the
price's unit (thousands of predictions, CPU- or GPU-hours, GB-months, thousands of annotations or items), times
the unit price. Arithmetic is `Decimal` throughout: a quantity is kept to `QUANTITY_PLACES` decimals, an amount
is rounded half-up to the currency's cents, and the total is the sum of the rounded amounts, so that the lines
of an invoice always add up to its total.

GB-month: `bytes_stored` is measured once a day per tenant (`storage.py`); a period's GB-months are the sum of
its daily measurements, in GB (10^9 bytes), divided by the number of days in the period, so a tenant that kept
2 GB all month pays for 2 GB-months, one that kept it for half the month for 1.
"""

from __future__ import annotations

import calendar
import json
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from services.ingestion import metering
from services.ingestion.models import UsageRecord
from shared.settings import Settings

QUANTITY_PLACES = Decimal("0.000001")
CENTS = Decimal("0.01")
GB = Decimal(10**9)


@dataclass(frozen=True)
class Price:
    """How one price turns a meter's raw total into a billed quantity: raw / `divisor`, per unit."""

    name: str  # the price list's key
    meter: str
    unit: str
    divisor: Decimal
    default: Decimal
    per_day_of_period: bool = False  # a level measured daily (bytes stored): averaged over the period's days


PRICES = (
    Price("per_1k_predictions", "prediction_rows", "1k predictions", Decimal(1000), Decimal("0.50")),
    Price("per_cpu_hour", "training_cpu_seconds", "CPU-hour", Decimal(3600), Decimal("0.10")),
    Price("per_gpu_hour", "training_gpu_seconds", "GPU-hour", Decimal(3600), Decimal("2.50")),
    Price("per_gb_month", "bytes_stored", "GB-month", GB, Decimal("0.023"), per_day_of_period=True),
    Price("per_1k_annotations", "annotations", "1k annotations", Decimal(1000), Decimal("0")),
    Price("per_1k_items", "items_ingested", "1k items", Decimal(1000), Decimal("0.05")),
)
DEFAULT_CURRENCY = "USD"


class PriceListError(ValueError):
    """PRICE_LIST is not a valid price list: the service refuses to start rather than bill wrongly."""


@dataclass(frozen=True)
class PriceList:
    currency: str
    prices: dict[str, Decimal]  # price name -> unit price

    @classmethod
    def from_settings(cls, settings: Settings) -> PriceList:
        return cls.parse(settings.price_list)

    @classmethod
    def parse(cls, raw: str) -> PriceList:
        text = raw.strip()
        if text and not text.startswith("{"):
            try:
                text = Path(text).expanduser().read_text()
            except OSError as exc:
                raise PriceListError(f"PRICE_LIST names a file that cannot be read: {exc}") from exc
        try:
            given = json.loads(text, parse_float=Decimal) if text else {}
        except json.JSONDecodeError as exc:
            raise PriceListError(f"PRICE_LIST is not valid JSON: {exc.msg}") from exc
        if not isinstance(given, dict):
            raise PriceListError("PRICE_LIST must be a JSON object")
        known = {price.name for price in PRICES} | {"currency"}
        unknown = sorted(set(given) - known)
        if unknown:
            raise PriceListError(f"PRICE_LIST has unknown prices {unknown}; known: {sorted(known)}")
        currency = given.get("currency", DEFAULT_CURRENCY)
        if not (isinstance(currency, str) and len(currency) == 3 and currency.isalpha()):
            raise PriceListError("PRICE_LIST currency must be a three-letter ISO 4217 code")
        prices = {}
        for price in PRICES:
            value = given.get(price.name, price.default)
            try:
                amount = Decimal(str(value)) if not isinstance(value, bool) else None
            except InvalidOperation:
                amount = None
            if amount is None or not amount.is_finite() or amount < 0:
                raise PriceListError(f"PRICE_LIST {price.name} must be a non-negative number, not {value!r}")
            prices[price.name] = amount
        return cls(currency=currency.upper(), prices=prices)

    def as_dict(self) -> dict[str, Any]:
        return {
            "currency": self.currency,
            "prices": [
                {"name": p.name, "meter": p.meter, "unit": p.unit, "unit_price": str(self.prices[p.name])}
                for p in PRICES
            ],
        }


def _decimal(value: float) -> Decimal:
    """A stored meter total as the decimal it stands for (values are kept to 6 places by their producers)."""
    rounded = round(float(value), 6)
    return Decimal(int(rounded)) if rounded.is_integer() else Decimal(repr(rounded))


def _totals(session: Session, start: Any, end: Any, tenant: str | None) -> dict[str, dict[str, Decimal]]:
    query = (
        select(UsageRecord.tenant, UsageRecord.meter, func.sum(UsageRecord.value))
        .where(UsageRecord.time >= start, UsageRecord.time < end)
        .group_by(UsageRecord.tenant, UsageRecord.meter)
    )
    if tenant is not None:
        query = query.where(UsageRecord.tenant == tenant)
    totals: dict[str, dict[str, Decimal]] = {}
    for row_tenant, meter, total in session.execute(query):
        totals.setdefault(row_tenant, {})[meter] = _decimal(total)
    return totals


def invoice_lines(prices: PriceList, totals: dict[str, Decimal], days: int) -> list[dict[str, Any]]:
    lines = []
    for price in PRICES:
        raw = totals.get(price.meter)
        if not raw:
            continue
        divisor = price.divisor * (days if price.per_day_of_period else 1)
        quantity = (raw / divisor).quantize(QUANTITY_PLACES, rounding=ROUND_HALF_UP)
        unit_price = prices.prices[price.name]
        lines.append(
            {
                "meter": price.meter,
                "price": price.name,
                "usage": raw,
                "quantity": quantity,
                "unit": price.unit,
                "unit_price": unit_price,
                "amount": (quantity * unit_price).quantize(CENTS, rounding=ROUND_HALF_UP),
            }
        )
    return lines


def invoices(session: Session, prices: PriceList, period: str, tenant: str | None = None) -> list[dict[str, Any]]:
    """One invoice per tenant with usage in `period` (`YYYY-MM`), or for `tenant` alone (even without usage)."""
    start, end = metering.month_window(period)
    days = calendar.monthrange(start.year, start.month)[1]
    totals = _totals(session, start, end, tenant)
    names = sorted({tenant} if tenant is not None else set(totals))
    result = []
    for name in names:
        lines = invoice_lines(prices, totals.get(name, {}), days)
        result.append(
            {
                "tenant": name,
                "period": period,
                "start": start,
                "end": end,
                "currency": prices.currency,
                "lines": lines,
                "total": sum((line["amount"] for line in lines), Decimal("0.00")),
            }
        )
    return result
