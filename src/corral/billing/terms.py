"""Time and money of a subscription: calendar periods, proration, prices and the lines of
one whole period at the current terms."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from corral.billing.models import InvoiceLine, Subscription
from corral.settings import Settings

MONTHS = {"month": 1, "year": 12}
MAX_CATCH_UP = 240  # periods one tick may renew for one subscription (a long outage)


def add_months(when: dt.datetime, n: int) -> dt.datetime:
    """``when`` plus ``n`` calendar months, the day clamped to the month's last day."""
    index = when.year * 12 + when.month - 1 + n
    year, month = divmod(index, 12)
    month += 1
    days = (dt.date(year + (month == 12), month % 12 + 1, 1) - dt.timedelta(days=1)).day
    return when.replace(year=year, month=month, day=min(when.day, days))


def period_end(anchor: dt.datetime, start: dt.datetime, interval: str) -> dt.datetime:
    """The end of the period starting at ``start`` in the cycle anchored at ``anchor``:
    the first whole number of intervals after ``anchor`` that lies beyond ``start`` (so a
    cycle started on Jan 31 runs to Feb 28, then Mar 31)."""
    months = MONTHS[interval]
    elapsed = (start.year - anchor.year) * 12 + start.month - anchor.month
    n = max(1, elapsed // months)
    while add_months(anchor, n * months) <= start:
        n += 1
    return add_months(anchor, n * months)


def prorate(amount_cents: int, now: dt.datetime, start: dt.datetime, end: dt.datetime) -> int:
    """The share of ``amount_cents`` (for the whole period) left from ``now`` to ``end``,
    rounded to the cent (half away from zero)."""
    total = (end - start).total_seconds()
    left = min(max((end - now).total_seconds(), 0.0), total)
    if total <= 0 or left <= 0:
        return 0
    share = Fraction(amount_cents) * Fraction(round(left)) / Fraction(round(total))
    rounded = int(abs(share) + Fraction(1, 2))
    return rounded if share >= 0 else -rounded


def money(cents: int, currency: str) -> str:
    sign = "-" if cents < 0 else ""
    return f"{sign}{abs(cents) // 100:,}.{abs(cents) % 100:02d} {currency.upper()}"


def seat_price(settings: Settings, plan_code: str) -> int:
    if plan_code == "enterprise":  # contracted; invoiced outside corral (billing.enterprise)
        return 0
    prices = settings.billing_seat_price_cents
    return int(prices.get(plan_code, prices.get("default", 0)))


@dataclass(frozen=True)
class Line:
    kind: str
    description: str
    quantity: int
    unit_amount_cents: int
    amount_cents: int


def period_lines(sub: Subscription, plan_name: str) -> list[Line]:
    """The plan, members and blocks lines of one whole period at the current terms."""
    months = MONTHS[sub.interval]
    per = "year" if sub.interval == "year" else "month"
    lines = [Line("plan", f"{plan_name} plan, billed per {per}", 1,
                  sub.base_price_cents * months, sub.base_price_cents * months)]
    unit = sub.seat_price_cents * months
    lines.append(Line("members", f"Team members ({money(sub.seat_price_cents, sub.currency)}"
                      f" per member per month)", sub.seats, unit, unit * sub.seats))
    if sub.blocks:
        unit = sub.block_price_cents * months
        lines.append(Line("blocks", f"Blocks ({money(sub.block_price_cents, sub.currency)} "
                          f"per block per month)", sub.blocks, unit, unit * sub.blocks))
    return lines


def period_total(sub: Subscription) -> int:
    return sum(line.amount_cents for line in period_lines(sub, ""))


def line_json(line: InvoiceLine | Line) -> dict[str, Any]:
    return {"kind": line.kind, "description": line.description, "quantity": line.quantity,
            "unit_amount_cents": line.unit_amount_cents, "amount_cents": line.amount_cents}
