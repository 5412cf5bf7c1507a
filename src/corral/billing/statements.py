"""Monthly statements: every organization with a subscription gets one bill per calendar
month (UTC), whatever its term (docs/billing.md, "Monthly statements").

The seed: "While the term is generally one year, you will receive monthly bills that show
your data operation usage." A statement is an :class:`Invoice` with reason ``statement``
for the closed month ``[month start, next month start)``:

* usage lines (``usage``: per product; ``usage_total``: the organization against its
  plan's allowances): data operations, billable devices and cellular data, amount 0;
* charge lines (``charge``): every subscription invoice *due* that month (its period starts
  in the month: the first charge, renewals, a reactivation), with its amount and status.

Its total is what was billed that month: zero for the eleven months of an annual term with
no change, the renewal for a monthly term. A statement collects nothing itself (payments
belong to the invoices it lists): its status is ``paid`` when every listed invoice is paid
(or there is none), else ``issued``.

Exactly one per organization and month: its number is ``CRL-<org>-M<yyyymm>`` and invoice
numbers are unique, so a repeated or concurrent tick cannot add a second one. Statements
are written by the billing tick once the month has closed (plus :data:`STATEMENT_DELAY`,
so counters written at the boundary are in), for every month the subscription covered: a
paid subscription invoice's period overlaps it, or the organization was locked during it.
Months missed while the server was down are caught up, oldest first.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from corral.billing.models import Invoice, InvoiceLine, Subscription
from corral.billing.terms import MAX_CATCH_UP, Line
from corral.metering import plans, usage
from corral.metering.plans import EffectivePlan, add_months, month_start
from corral.products.models import Product

STATEMENT = "statement"
COVERING = ("subscribe", "renewal", "reactivation")  # reasons of invoices that pay a period
USAGE_KINDS = frozenset({"usage", "usage_total"})
# how long after a month's end its statement waits (usage counters are group-committed)
STATEMENT_DELAY = dt.timedelta(minutes=5)


def number(org_id: int, month: dt.date) -> str:
    return f"CRL-{org_id:06d}-M{month:%Y%m}"


def _at(day: dt.date) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)


def last_closed_month(now: dt.datetime) -> dt.date:
    """The newest month whose statement is due at ``now``."""
    return add_months(month_start((now - STATEMENT_DELAY).astimezone(dt.UTC).date()), -1)


def _mb(n_bytes: int) -> str:
    return f"{usage.cellular_mb(n_bytes):,.3f} MB"


def _pct(used: int | float, allowance: int | float) -> str:
    return f" ({100 * used / allowance:.1f} %)" if allowance else ""


def _whole_mb(n_bytes: int) -> int:
    return int((n_bytes + plans.MB // 2) // plans.MB)


async def usage_lines(db: AsyncSession, org_id: int, month: dt.date,
                      plan: EffectivePlan) -> list[Line]:
    """The month's usage per product, then the organization's totals against ``plan``."""
    scope = usage.Scope(org_id)
    end = add_months(month, 1)
    names = {p.id: p.name for p in (await db.execute(select(Product).where(
        Product.org_id == org_id).order_by(Product.id))).scalars()}
    rows = await usage.by_product(db, scope, month, end)
    billable = await usage.billable_by_product(db, scope, month)
    ids = sorted({*names, *(k for k in rows if k is not None),
                  *(k for k in billable if k is not None)})
    lines: list[Line] = []
    for pid in ids:
        name = f"{names[pid]} (product {pid})" if pid in names else f"deleted product {pid}"
        row = rows.get(pid) or usage.empty_totals()
        ops, devices, cell = usage.metric_ops(row, plan), billable.get(pid, 0), row["cellular_bytes"]
        lines += [Line("usage", f"Data operations, {name}: {ops:,}", ops, 0, 0),
                  Line("usage", f"Billable devices, {name}: {devices:,}", devices, 0, 0),
                  Line("usage", f"Cellular data, {name}: {_mb(cell)}", _whole_mb(cell), 0, 0)]
    month_row = await usage.totals(db, scope, month, end)
    ops, cell = usage.metric_ops(month_row, plan), month_row["cellular_bytes"]
    devices = sum(billable.values())
    unit = " (per started KiB)" if plan.per_kb else ""
    if plan.period == "year":
        start, pool_end = plan.period_bounds(month)
        to_date = await usage.totals(db, scope, start, end)
        years = f"contract year {start:%Y-%m} to {add_months(pool_end, -1):%Y-%m}"
        pooled_ops, pooled_cell = usage.metric_ops(to_date, plan), to_date["cellular_bytes"]
        ops_text = (f"Data operations{unit} this month: {ops:,}; {years}: {pooled_ops:,} of "
                    f"{plan.max_data_ops:,} included{_pct(pooled_ops, plan.max_data_ops)}")
        cell_text = (f"Cellular data this month: {_mb(cell)}; {years}: {_mb(pooled_cell)} of "
                     f"{plan.max_cellular_mb:,} MB included"
                     f"{_pct(pooled_cell, plan.max_cellular_bytes)}")
    else:
        ops_text = (f"Data operations{unit} this month: {ops:,} of {plan.max_data_ops:,} "
                    f"included{_pct(ops, plan.max_data_ops)}")
        cell_text = (f"Cellular data this month: {_mb(cell)} of {plan.max_cellular_mb:,} MB "
                     f"included{_pct(cell, plan.max_cellular_bytes)}")
    lines += [
        Line("usage_total", ops_text, ops, 0, 0),
        Line("usage_total", f"Billable devices this month: {devices:,} of "
                            f"{plan.max_devices:,} included{_pct(devices, plan.max_devices)}",
             devices, 0, 0),
        Line("usage_total", cell_text, _whole_mb(cell), 0, 0),
    ]
    return lines


async def _charges_due(db: AsyncSession, sub: Subscription, month: dt.date) -> list[Invoice]:
    return list((await db.execute(select(Invoice).where(
        Invoice.subscription_id == sub.id, Invoice.reason.in_(COVERING),
        Invoice.status != "void", Invoice.period_start >= _at(month),
        Invoice.period_start < _at(add_months(month, 1))).order_by(Invoice.id))).scalars())


def _charge_line(inv: Invoice) -> Line:
    day = "%Y-%m-%d"
    what = {"subscribe": "first period", "renewal": "renewal",
            "reactivation": "reactivation"}.get(inv.reason, inv.reason)
    return Line("charge", f"Invoice {inv.number}: {what} {inv.period_start.strftime(day)} to "
                          f"{inv.period_end.strftime(day)} ({inv.status})",
                1, inv.total_cents, inv.total_cents)


async def issue_statement(db: AsyncSession, sub: Subscription, month: dt.date,
                          now: dt.datetime) -> Invoice | None:
    """The statement of ``month`` for ``sub``'s organization, unless it exists already."""
    month = month_start(month)
    num = number(sub.org_id, month)
    if (await db.execute(select(Invoice.id).where(Invoice.number == num))).first():
        return None
    plan = await plans.effective_plan(db, sub.org_id)
    due = await _charges_due(db, sub, month)
    lines = [_charge_line(inv) for inv in due] + await usage_lines(db, sub.org_id, month, plan)
    total = sum(line.amount_cents for line in lines)
    settled = all(inv.status == "paid" for inv in due)
    inv = Invoice(org_id=sub.org_id, subscription_id=sub.id, number=num, reason=STATEMENT,
                  status="paid" if settled else "issued", currency=sub.currency,
                  total_cents=total, period_start=_at(month),
                  period_end=_at(add_months(month, 1)), issued_at=now,
                  paid_at=now if settled else None)
    db.add(inv)
    await db.flush()
    db.add_all([InvoiceLine(invoice_id=inv.id, kind=line.kind, description=line.description[:300],
                            quantity=line.quantity, unit_amount_cents=line.unit_amount_cents,
                            amount_cents=line.amount_cents) for line in lines])
    await db.flush()
    return inv


def _covered(month: dt.date, periods: Iterable[tuple[dt.datetime, dt.datetime]],
             locked_at: dt.datetime | None) -> bool:
    start, end = _at(month), _at(add_months(month, 1))
    if locked_at is not None and start <= locked_at < end:
        return True
    return any(ps < end and pe > start for ps, pe in periods)


async def due_months(db: AsyncSession, sub: Subscription, now: dt.datetime) -> list[dt.date]:
    """The closed months still without a statement that ``sub`` covered, oldest first (at
    most ``MAX_CATCH_UP``)."""
    newest = last_closed_month(now)
    periods = [(r.period_start, r.period_end) for r in (await db.execute(
        select(Invoice.period_start, Invoice.period_end).where(
            Invoice.subscription_id == sub.id, Invoice.reason.in_(COVERING),
            Invoice.status == "paid"))).all()]
    starts = [ps for ps, _ in periods] + ([sub.locked_at] if sub.locked_at else [])
    if not starts:
        return []
    first = month_start(min(starts).astimezone(dt.UTC).date())
    last = (await db.execute(select(func.max(Invoice.period_start)).where(
        Invoice.subscription_id == sub.id, Invoice.reason == STATEMENT))).scalar_one_or_none()
    if last is not None:
        first = max(first, add_months(month_start(last.astimezone(dt.UTC).date()), 1))
    out: list[dt.date] = []
    month = first
    while month <= newest and len(out) < MAX_CATCH_UP:
        if _covered(month, periods, sub.locked_at):
            out.append(month)
        month = add_months(month, 1)
    return out


async def issue_due(db: AsyncSession, sub: Subscription, now: dt.datetime) -> list[Invoice]:
    """Write every statement ``sub`` is owed at ``now`` (the caller commits)."""
    out = []
    for month in await due_months(db, sub, now):
        inv = await issue_statement(db, sub, month, now)
        if inv is not None:
            out.append(inv)
    return out


__all__ = ["STATEMENT", "USAGE_KINDS", "due_months", "issue_due", "issue_statement",
           "last_closed_month", "number", "usage_lines"]
