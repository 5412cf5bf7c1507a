"""Enterprise terms, set by an operator (``corral admin enterprise``; docs/billing.md,
"Enterprise contracts").

Enterprise is not self-service: its maximums (devices, data operations and cellular data
pooled over the contract year, optionally storage) are contracted, and the contract's price
is invoiced outside corral. :func:`put_on_enterprise` puts an organization on the plan with
those maximums (metering's ``org_plans``) and gives it a subscription on the contract's
annual cycle at price zero, so it renews itself with zero invoices and gets the monthly
statements every subscription gets (usage against the contracted maximums). Running it
again updates the terms; the cycle keeps its anchor unless ``contract_start`` changes.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from corral.audit import service as audit
from corral.billing import service, subscriptions, terms
from corral.billing.models import (
    ACTIVE,
    CANCELED,
    INCOMPLETE,
    PAST_DUE,
    Adjustment,
    Invoice,
    InvoiceLine,
    Subscription,
)
from corral.kit.errors import BadRequest, Conflict, NotFound
from corral.metering import plans
from corral.orgs import service as orgs
from corral.settings import Settings

ENTERPRISE = "enterprise"
CONTRACT_PROVIDER = "contract"  # no payment provider: the contract is invoiced outside corral


def _midnight(day: dt.date) -> dt.datetime:
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC)


async def put_on_enterprise(
    db: AsyncSession, settings: Settings, *, org_key: str, max_devices: int,
    max_data_ops: int, max_cellular_mb: int, max_storage_mb: int | None = None,
    contract_start: dt.date | None = None, per_kb: bool | None = None,
    pause_at_limit: bool | None = None, replace: bool = False, actor_label: str,
    now: dt.datetime,
) -> Subscription:
    """Put organization ``org_key`` (id or slug) on Enterprise with these maximums. A live
    self-service subscription is refused unless ``replace`` (it ends without a refund and
    its pending adjustments are dropped). No commit."""
    org = await orgs.get_org(db, org_key)
    if org is None:
        raise NotFound(f"There is no organization {org_key!r}", code="org_not_found")
    if org.personal:
        raise BadRequest("A personal organization (sandbox) stays on the Free plan",
                         code="personal_org")
    today = now.astimezone(dt.UTC).date()
    if contract_start is not None and contract_start > today:
        raise BadRequest("contract_start may not be in the future", code="invalid_plan")
    sub = await subscriptions.get_subscription(db, org.id, lock=True)
    live = sub is not None and sub.status in (ACTIVE, PAST_DUE, CANCELED)
    if sub is not None and live and sub.plan_code != ENTERPRISE and not replace:
        raise Conflict(f"{org.slug} has a self-service subscription ({sub.plan_code}, "
                       f"{sub.status}); replace it explicitly (no refund)",
                       code="already_subscribed")
    # metering's plan row first: it checks the terms (all three maximums, whole numbers)
    row_start = contract_start
    if row_start is None and sub is not None and sub.plan_code == ENTERPRISE \
            and sub.cycle_anchor is not None:
        row_start = sub.cycle_anchor.astimezone(dt.UTC).date()
    await plans.set_org_plan(db, org.id, ENTERPRISE, blocks=0, max_devices=max_devices,
                             max_data_ops=max_data_ops, max_cellular_mb=max_cellular_mb,
                             max_storage_mb=max_storage_mb,
                             contract_start=row_start or today, per_kb=per_kb,
                             pause_at_limit=pause_at_limit)
    anchor = _midnight(row_start or today)
    before = (sub.plan_code, sub.status) if sub is not None else None
    if sub is None:
        sub = Subscription(org_id=org.id, status=INCOMPLETE, provider=CONTRACT_PROVIDER,
                           currency=settings.billing_currency.lower(), plan_code=ENTERPRISE,
                           interval="year")
        db.add(sub)
        await db.flush()
    same_cycle = (sub.plan_code == ENTERPRISE and sub.status in (ACTIVE, PAST_DUE)
                  and sub.cycle_anchor == anchor)
    sub.plan_code, sub.interval, sub.next_interval = ENTERPRISE, "year", None
    sub.base_price_cents = sub.seat_price_cents = sub.block_price_cents = 0
    sub.blocks = 0
    sub.seats = await subscriptions.count_members(db, org.id)
    if not sub.payment_method_ref:
        sub.provider = CONTRACT_PROVIDER
    if not same_cycle:
        await service._void_open(db, sub)
        start = anchor
        while terms.add_months(start, 12) <= now:  # the contract year containing now
            start = terms.add_months(start, 12)
        end = terms.period_end(anchor, start, "year")
        sub.cycle_anchor, sub.current_period_start, sub.current_period_end = anchor, start, end
        await _contract_invoice(db, sub, start, end, now)
    service._activate(sub)
    audit.record(db, actor=None, actor_label=actor_label, ip=None, action="billing.enterprise",
                 org_id=org.id, target_type="subscription", target_id=sub.id,
                 details={"max_devices": max_devices, "max_data_ops": max_data_ops,
                          "max_cellular_mb": max_cellular_mb,
                          "max_storage_mb": max_storage_mb,
                          "contract_start": anchor.date().isoformat(),
                          "replaced": list(before) if before and before[0] != ENTERPRISE
                          and replace else None})
    return sub


async def _contract_invoice(db: AsyncSession, sub: Subscription, start: dt.datetime,
                            end: dt.datetime, now: dt.datetime) -> Invoice:
    """A paid zero invoice for the contract year (the period the statements cover); the
    replaced subscription's pending adjustments are listed on it, not charged."""
    day = "%Y-%m-%d"
    inv = Invoice(org_id=sub.org_id, subscription_id=sub.id,
                  number=await service._next_number(db, sub.org_id), reason="subscribe",
                  status="paid", currency=sub.currency, total_cents=0, period_start=start,
                  period_end=end, issued_at=now, paid_at=now)
    db.add(inv)
    await db.flush()
    lines: list[dict[str, Any]] = [{
        "kind": "plan", "description": f"Enterprise contract {start.strftime(day)} to "
                                       f"{end.strftime(day)} (invoiced under the contract)",
        "quantity": 1, "unit_amount_cents": 0, "amount_cents": 0}]
    pending = (await db.execute(select(Adjustment).where(
        Adjustment.subscription_id == sub.id, Adjustment.invoice_id.is_(None))
        .order_by(Adjustment.id))).scalars()
    for adj in pending:
        adj.invoice_id = inv.id
        lines.append({"kind": "adjustment",
                      "description": f"Not charged (replaced by the Enterprise contract): "
                                     f"{adj.description}"[:300],
                      "quantity": 1, "unit_amount_cents": 0, "amount_cents": 0})
    db.add_all([InvoiceLine(invoice_id=inv.id, **line) for line in lines])
    await db.flush()
    return inv
