"""Subscription lifecycle rules (docs/billing.md, "Subscription and invoices").

* A subscription bills per team member (and per block of the plan) for the *upcoming*
  period, monthly or annually: the charge at a period's start pays for that period.
* Team size is reconciled by :func:`sync_seats` (every billing tick and every billing
  request): a member added or removed since the last count becomes a prorated debit or
  credit (an :class:`Adjustment`) taken up by the next invoice. Blocks and plan switches
  are prorated the same way when they are made; an interval switch applies from the next
  renewal.
* A failed renewal charge is retried every ``billing_retry_interval_s`` (3 days), at most
  ``billing_max_retries`` (3) times, with an e-mail to the organization's Owners and
  Administrators each time; after the last failed retry the organization is locked.
* Cancelling keeps access to the end of the paid period, then the organization is
  inactive. Reactivating within the period keeps the cycle; reactivating a locked or
  inactive organization charges now and starts a new cycle.
* Locked and inactive organizations answer ``402 subscription_inactive`` on their org and
  product routes (:func:`corral.billing.subscriptions.lock_check`, installed in the guards),
  billing excepted. Reading a subscription (and what the billing page shows) is in
  :mod:`corral.billing.subscriptions`.

Services never commit, with one exception made on purpose: a charge is written as
``pending`` and the transaction committed (:func:`corral.db.session.commit`) *before* the
provider is called, so a payment is never taken without a row that knows its idempotency
key. Everything else joins the caller's transaction.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from corral.audit import service as audit
from corral.auth.subject import Subject
from corral.billing.models import (
    ACTIVE,
    CANCELED,
    INACTIVE,
    INCOMPLETE,
    LOCKED,
    PAST_DUE,
    Adjustment,
    Charge,
    Invoice,
    InvoiceLine,
    Subscription,
)
from corral.billing.providers import ChargeResult, PaymentProvider, ProviderError
from corral.billing.schemas import BillingChange
from corral.billing.subscriptions import (
    billing_contacts,
    count_members,
    get_subscription,
    pending_adjustments,
)
from corral.billing.terms import (
    MAX_CATCH_UP,
    MONTHS,
    line_json,
    money,
    period_end,
    period_lines,
    period_total,
    prorate,
    seat_price,
)
from corral.db.session import after_commit, commit
from corral.kit import clock
from corral.kit.errors import BadRequest, Conflict, CorralError
from corral.mail import service as mail
from corral.metering import plans
from corral.metering.models import Plan
from corral.orgs.models import Organization
from corral.settings import Settings

log = logging.getLogger("corral.billing")

# how long after a provider error (not a decline) the charge is asked again, same key
PROVIDER_ERROR_RETRY = dt.timedelta(hours=1)
class PaymentDeclined(CorralError):
    """The payment was declined."""

    status = 402
    code = "payment_declined"


async def _notify(db: AsyncSession, settings: Settings, org_id: int, *, kind: str,
                  subject: str, body: str) -> None:
    org = await db.get(Organization, org_id)
    name = org.name if org else f"organization {org_id}"
    url = f"{settings.resolved_public_url()}/v1/orgs/{org.slug if org else org_id}/billing"
    text = f"{body}\n\nBilling of {name}: {url}\n"
    for to in await billing_contacts(db, org_id):
        mail.enqueue(db, to=to, subject=f"{subject} ({name})", body=text, kind=kind)


# --- seats, blocks, plan and interval changes ----------------------------------------------

def _in_period(sub: Subscription) -> bool:
    return (sub.status in (ACTIVE, PAST_DUE, CANCELED) and sub.current_period_start is not None
            and sub.current_period_end is not None)


def _adjust(db: AsyncSession, sub: Subscription, *, kind: str, description: str,
            amount: int, details: dict[str, Any]) -> Adjustment | None:
    if amount == 0:
        return None
    adj = Adjustment(org_id=sub.org_id, subscription_id=sub.id, kind=kind,
                     description=description, amount_cents=amount, details=details,
                     created_at=clock.now())
    db.add(adj)
    return adj


def _day(when: dt.datetime | None) -> str:
    return when.strftime("%Y-%m-%d") if when else "?"


async def sync_seats(db: AsyncSession, sub: Subscription, now: dt.datetime) -> int:
    """Count the team; a change since the last count becomes a prorated adjustment for the
    rest of the current period. Returns the change in members."""
    n = await count_members(db, sub.org_id)
    delta = n - sub.seats
    if delta == 0:
        return 0
    if _in_period(sub):
        assert sub.current_period_start and sub.current_period_end
        amount = prorate(delta * sub.seat_price_cents * MONTHS[sub.interval], now,
                         sub.current_period_start, sub.current_period_end)
        what = f"{abs(delta)} team member{'s' if abs(delta) != 1 else ''}"
        verb = "added" if delta > 0 else "removed"
        _adjust(db, sub, kind="members", amount=amount,
                description=f"{what} {verb} on {_day(now)} (prorated to "
                            f"{_day(sub.current_period_end)})",
                details={"from": sub.seats, "to": n, "at": clock.iso(now)})
    sub.seats = n
    return delta


async def _check_plan(db: AsyncSession, plan_code: Any) -> Plan:
    if not isinstance(plan_code, str) or not plan_code.strip():
        raise BadRequest("plan is required", code="invalid_plan")
    plan = await plans.get_plan(db, plan_code.strip().lower())
    if plan.code == plans.FREE:
        raise BadRequest("The Free plan needs no subscription; cancel the subscription to "
                         "return to it", code="invalid_plan")
    if not plan.self_service:
        raise BadRequest(f"The {plan.name} plan is not self-service; contact sales",
                         code="invalid_plan")
    return plan


def _check_blocks(plan: Plan, blocks: int) -> None:
    """The plan's block rules, checked before any money moves (set_org_plan checks the
    same when the plan is applied)."""
    if blocks < plan.min_blocks:
        raise BadRequest(f"The {plan.name} plan needs at least {plan.min_blocks} block(s)",
                         code="invalid_plan")
    if blocks and plan.block_devices == 0 and plan.block_data_ops == 0:
        raise BadRequest(f"The {plan.name} plan has no blocks", code="invalid_plan")


def _check_interval(value: Any) -> str:
    if value not in MONTHS:
        raise BadRequest("interval must be month or year", code="invalid_interval")
    return str(value)


async def _apply_plan(db: AsyncSession, sub: Subscription) -> None:
    """Put the organization on the subscription's plan and blocks (metering)."""
    await plans.set_org_plan(db, sub.org_id, sub.plan_code, blocks=sub.blocks)


async def change_terms(db: AsyncSession, settings: Settings, *, sub: Subscription,
                       plan_code: str | None, blocks: int | None, interval: str | None,
                       now: dt.datetime) -> list[Adjustment]:
    """Switch plan and/or blocks now (prorated net adjustment) and/or the interval from the
    next renewal. The organization's metering plan follows at once."""
    new_plan = await _check_plan(db, plan_code) if plan_code is not None else None
    if interval is not None:
        interval = _check_interval(interval)
    changed_plan = new_plan is not None and new_plan.code != sub.plan_code
    new_blocks = sub.blocks if blocks is None else blocks
    if new_plan is not None and blocks is None and new_plan.block_price_cents == 0:
        new_blocks = 0
    if not changed_plan and new_blocks == sub.blocks:
        if interval is not None:
            sub.next_interval = None if interval == sub.interval else interval
        return []
    if sub.status not in (ACTIVE, PAST_DUE):
        raise Conflict(f"The subscription is {sub.status}; reactivate it before changing "
                       "its plan or blocks", code="subscription_not_active")
    before = period_total(sub)
    old = (sub.plan_code, sub.blocks)
    if new_plan is not None:
        sub.plan_code = new_plan.code
        sub.block_price_cents = new_plan.block_price_cents
        sub.seat_price_cents = seat_price(settings, new_plan.code)
    _check_blocks(new_plan or await plans.get_plan(db, sub.plan_code), new_blocks)
    sub.blocks = new_blocks
    await _apply_plan(db, sub)
    if interval is not None:
        sub.next_interval = None if interval == sub.interval else interval
    out: list[Adjustment] = []
    if _in_period(sub):
        assert sub.current_period_start and sub.current_period_end
        amount = prorate(period_total(sub) - before, now, sub.current_period_start,
                         sub.current_period_end)
        if changed_plan:
            desc = f"Plan changed from {old[0]} to {sub.plan_code}"
            if new_blocks != old[1]:
                desc += f", blocks {old[1]} to {new_blocks}"
        else:
            desc = f"Blocks changed from {old[1]} to {new_blocks}"
        adj = _adjust(db, sub, kind="plan" if changed_plan else "blocks", amount=amount,
                      description=f"{desc} on {_day(now)} (prorated to "
                                  f"{_day(sub.current_period_end)})",
                      details={"from": {"plan": old[0], "blocks": old[1]},
                               "to": {"plan": sub.plan_code, "blocks": new_blocks},
                               "at": clock.iso(now)})
        if adj is not None:
            out.append(adj)
    return out


# --- invoices and charges ------------------------------------------------------------------

async def _next_number(db: AsyncSession, org_id: int) -> str:
    # monthly statements have numbers of their own (CRL-<org>-M<yyyymm>, billing.statements)
    n = (await db.execute(select(func.count(Invoice.id)).where(
        Invoice.org_id == org_id, Invoice.reason != "statement"))).scalar_one()
    return f"CRL-{org_id:06d}-{int(n) + 1:04d}"


async def _issue(db: AsyncSession, sub: Subscription, *, reason: str, start: dt.datetime,
                 end: dt.datetime, now: dt.datetime) -> Invoice:
    """An open invoice for the period ``[start, end)`` at the current terms, taking up every
    pending adjustment. A net credit larger than the period's price is carried forward."""
    plan = await plans.get_plan(db, sub.plan_code)
    inv = Invoice(org_id=sub.org_id, subscription_id=sub.id, number=await _next_number(db, sub.org_id),
                  reason=reason, status="open", currency=sub.currency, total_cents=0,
                  period_start=start, period_end=end, issued_at=now)
    db.add(inv)
    await db.flush()
    lines = [InvoiceLine(invoice_id=inv.id, **line_json(line))
             for line in period_lines(sub, plan.name)]
    for adj in await pending_adjustments(db, sub):
        adj.invoice_id = inv.id
        lines.append(InvoiceLine(invoice_id=inv.id, kind="adjustment" if adj.kind != "credit"
                                 else "credit", description=adj.description, quantity=1,
                                 unit_amount_cents=adj.amount_cents,
                                 amount_cents=adj.amount_cents))
    total = sum(line.amount_cents for line in lines)
    if total < 0:
        lines.append(InvoiceLine(invoice_id=inv.id, kind="credit_carried",
                                 description="Credit carried to the next invoice", quantity=1,
                                 unit_amount_cents=-total, amount_cents=-total))
        db.add(Adjustment(org_id=sub.org_id, subscription_id=sub.id, kind="credit",
                          description=f"Credit carried from invoice {inv.number}",
                          amount_cents=total, details={"invoice": inv.number}, created_at=now))
        total = 0
    db.add_all(lines)
    inv.total_cents = total
    if total == 0:
        inv.status, inv.paid_at = "paid", now
    await db.flush()
    return inv


async def _attempt(db: AsyncSession, provider: PaymentProvider, sub: Subscription,
                   inv: Invoice, now: dt.datetime) -> ChargeResult:
    """One payment attempt for ``inv``. The charge row (with its idempotency key) is
    committed before the provider is asked; an attempt whose answer never arrived (pending)
    or was a provider error is asked again with the same key."""
    if inv.status == "paid":
        return ChargeResult("succeeded")
    if not sub.customer_ref or not sub.payment_method_ref:
        result = ChargeResult("declined", decline_code="no_payment_method",
                              message="No payment method on file")
        done = (await db.execute(select(func.count(Charge.id)).where(
            Charge.invoice_id == inv.id))).scalar_one()
        db.add(Charge(invoice_id=inv.id, org_id=sub.org_id, attempt=int(done) + 1,
                      amount_cents=inv.total_cents, currency=inv.currency,
                      provider=provider.name, status="declined", created_at=now,
                      finished_at=now, decline_code=result.decline_code,
                      message=result.message,
                      idempotency_key=f"corral-{inv.number}-{int(done) + 1}"))
        return result
    charge = (await db.execute(select(Charge).where(
        Charge.invoice_id == inv.id, Charge.status.in_(("pending", "error")))
        .order_by(Charge.id.desc()).limit(1))).scalar_one_or_none()
    if charge is None:
        done = (await db.execute(select(func.count(Charge.id)).where(
            Charge.invoice_id == inv.id))).scalar_one()
        attempt = int(done) + 1
        charge = Charge(invoice_id=inv.id, org_id=sub.org_id, attempt=attempt,
                        amount_cents=inv.total_cents, currency=inv.currency,
                        provider=provider.name, status="pending", created_at=now,
                        idempotency_key=f"corral-{inv.number}-{attempt}")
        db.add(charge)
    charge.status = "pending"
    # the pending row is durable before any money moves (commit, not release: the session's
    # objects must stay attached for what follows)
    await commit(db)
    try:
        result = await provider.charge(
            customer=sub.customer_ref, method=sub.payment_method_ref,
            amount_cents=charge.amount_cents, currency=charge.currency,
            idempotency_key=charge.idempotency_key,
            description=f"corral invoice {inv.number}")
    except Exception as exc:  # a broken adapter must not leave the row pending forever
        log.exception("payment provider failed for invoice %s", inv.number)
        result = ChargeResult("error", message=f"{type(exc).__name__}: {exc}"[:500])
    charge.status = result.status
    charge.provider_ref = result.ref
    charge.decline_code = result.decline_code
    charge.message = result.message
    charge.finished_at = clock.now()
    if result.succeeded:
        inv.status, inv.paid_at = "paid", clock.now()
    return result


def _start_cycle(sub: Subscription, now: dt.datetime) -> None:
    if sub.next_interval:
        sub.interval, sub.next_interval = sub.next_interval, None
    sub.cycle_anchor = now
    sub.current_period_start = now
    sub.current_period_end = period_end(now, now, sub.interval)


def _activate(sub: Subscription) -> None:
    sub.status = ACTIVE
    sub.retry_count = 0
    sub.next_retry_at = None
    sub.locked_at = None
    sub.cancel_at_period_end = False
    sub.canceled_at = None


async def _open_invoice(db: AsyncSession, sub: Subscription) -> Invoice | None:
    return (await db.execute(select(Invoice).where(
        Invoice.subscription_id == sub.id, Invoice.status == "open")
        .order_by(Invoice.id.desc()).limit(1))).scalar_one_or_none()


# --- payment method ------------------------------------------------------------------------

async def set_payment_method(db: AsyncSession, provider: PaymentProvider, sub: Subscription,
                             org: Organization, method: Any) -> None:
    """Store a payment method token with the provider (creating the customer first)."""
    if not isinstance(method, str) or not method.strip() or len(method) > 100:
        raise BadRequest("payment_method must be a payment method token from the payment "
                         "provider (e.g. pm_card_visa)", code="invalid_payment_method")
    try:
        if not sub.customer_ref or sub.provider != provider.name:
            contacts = await billing_contacts(db, org.id)
            sub.customer_ref = await provider.create_customer(
                org_id=org.id, name=org.name, email=contacts[0] if contacts else None)
            sub.provider = provider.name
        pm = await provider.attach_method(customer=sub.customer_ref, method=method.strip())
    except ProviderError as exc:
        raise CorralError(exc.message, code=exc.code, status=402) from exc
    sub.payment_method_ref = pm.ref
    sub.payment_method_label = pm.label


# --- lifecycle ---------------------------------------------------------------------------------

@dataclass
class Outcome:
    """What a lifecycle call did: the subscription, the invoice it charged (if any) and the
    provider's answer; ``declined`` means the API answers 402 (the state is committed)."""

    sub: Subscription
    invoice: Invoice | None = None
    result: ChargeResult | None = None

    @property
    def declined(self) -> bool:
        return self.result is not None and not self.result.succeeded


async def subscribe(db: AsyncSession, settings: Settings, provider: PaymentProvider, *,
                    org: Organization, actor: Subject, ip: str, plan_code: Any,
                    interval: Any, blocks: Any, payment_method: Any,
                    pause_devices_when_locked: bool | None, now: dt.datetime) -> Outcome:
    """Start a subscription: charge the first period now; the cycle starts today."""
    if org.personal:
        raise BadRequest("A personal organization (sandbox) stays on the Free plan; create "
                         "an organization to subscribe", code="personal_org")
    plan = await _check_plan(db, plan_code if plan_code is not None else "basic")
    interval = _check_interval(interval if interval is not None else "month")
    if blocks is None:
        blocks = max(plan.min_blocks, 1 if plan.block_price_cents else 0)
    _check_blocks(plan, blocks)
    sub = await get_subscription(db, org.id, lock=True)
    if sub is not None and sub.status != INCOMPLETE:
        raise Conflict(f"This organization already has a subscription ({sub.status}); change "
                       "it with PUT, or reactivate it", code="already_subscribed")
    if sub is None:
        sub = Subscription(org_id=org.id, status=INCOMPLETE, provider=provider.name,
                           currency=settings.billing_currency.lower(), plan_code=plan.code,
                           interval=interval)
        db.add(sub)
        await db.flush()
    sub.plan_code, sub.interval, sub.next_interval = plan.code, interval, None
    sub.seat_price_cents = seat_price(settings, plan.code)
    sub.block_price_cents = plan.block_price_cents
    sub.blocks = blocks
    sub.seats = await count_members(db, org.id)
    if pause_devices_when_locked is not None:
        sub.pause_devices_when_locked = pause_devices_when_locked
    if payment_method is not None:
        await set_payment_method(db, provider, sub, org, payment_method)
    if not sub.payment_method_ref:
        raise BadRequest("payment_method is required to subscribe",
                         code="payment_method_required")
    await _void_open(db, sub)
    inv, result = await _charge_new_cycle(db, provider, sub, "subscribe", now)
    if result.succeeded:
        audit.record(db, actor=actor, ip=ip, action="billing.subscribed", org_id=org.id,
                     target_type="subscription", target_id=sub.id,
                     details={"plan": sub.plan_code, "interval": sub.interval,
                              "seats": sub.seats, "blocks": sub.blocks,
                              "invoice": inv.number, "amount_cents": inv.total_cents})
    else:  # the organization stays on the plan it had; PUT again with another card
        await _void_open(db, sub)
    return Outcome(sub, inv, result)


async def _charge_new_cycle(db: AsyncSession, provider: PaymentProvider, sub: Subscription,
                            reason: str, now: dt.datetime) -> tuple[Invoice, ChargeResult]:
    """Invoice a period starting now and charge it; paid, the subscription is active on a
    new cycle with its plan applied (a first subscription, a reactivation when inactive)."""
    end = period_end(now, now, sub.interval)
    inv = await _issue(db, sub, reason=reason, start=now, end=end, now=now)
    result = await _attempt(db, provider, sub, inv, now)
    if result.succeeded:
        _activate(sub)
        _start_cycle(sub, now)
        await _apply_plan(db, sub)
    return inv, result


async def _void_open(db: AsyncSession, sub: Subscription) -> None:
    """Void an unpaid invoice (a locked period that will not be collected, or a first
    charge that was declined) and hand its adjustments back to the next invoice."""
    inv = await _open_invoice(db, sub)
    if inv is None:
        return
    inv.status = "uncollectible" if inv.reason == "renewal" else "void"
    adjs = (await db.execute(select(Adjustment).where(
        Adjustment.invoice_id == inv.id))).scalars()
    for adj in adjs:
        adj.invoice_id = None


async def cancel(db: AsyncSession, settings: Settings, *, org: Organization, actor: Subject,
                 ip: str, now: dt.datetime) -> Subscription:
    """Cancel: access continues to the end of the paid period, then the organization is
    inactive. A subscription whose current period is unpaid (past due) ends now."""
    sub = await get_subscription(db, org.id, lock=True)
    if sub is None or sub.status == INCOMPLETE:
        raise Conflict("This organization has no subscription to cancel",
                       code="no_subscription")
    if sub.status in (CANCELED, INACTIVE, LOCKED):
        raise Conflict(f"The subscription is already {sub.status}", code="already_canceled")
    sub.canceled_at = now
    if sub.status == PAST_DUE:
        await _void_open(db, sub)
        await _deactivate(db, settings, sub, status=INACTIVE, now=now, notify=False)
    else:
        sub.status = CANCELED
        sub.cancel_at_period_end = True
    audit.record(db, actor=actor, ip=ip, action="billing.canceled", org_id=org.id,
                 target_type="subscription", target_id=sub.id,
                 details={"access_until": clock.iso(sub.current_period_end)
                          if sub.status == CANCELED else clock.iso(now)})
    return sub


async def _deactivate(db: AsyncSession, settings: Settings, sub: Subscription, *, status: str,
                      now: dt.datetime, notify: bool = True) -> None:
    """Lock or make inactive: data stays and the plan's allowances are not changed, so
    devices keep working as before, unless ``pause_devices_when_locked`` pauses them
    (:func:`paused_orgs`)."""
    sub.status = status
    sub.next_retry_at = None
    sub.cancel_at_period_end = False
    if status == LOCKED:
        sub.locked_at = now
    wake = db.info.get("metering_wake")
    if wake is not None and sub.pause_devices_when_locked:
        after_commit(db, wake)  # the usage gate asks paused_orgs again at once
    if notify and status == LOCKED:
        await _notify(db, settings, sub.org_id, kind="billing.locked",
                      subject="Your organization is locked",
                      body="We could not charge your payment method after "
                           f"{settings.billing_max_retries} retries, so the organization is "
                           "locked. Its products, devices and data are kept. An Owner or "
                           "Administrator can update the payment method and reactivate the "
                           "subscription from the billing page.")
    elif notify:
        await _notify(db, settings, sub.org_id, kind="billing.inactive",
                      subject="Your subscription has ended",
                      body="Your cancelled subscription reached the end of its paid period "
                           "and the organization is now inactive. Its data is kept; "
                           "reactivate the subscription at any time to resume access.")


async def reactivate(db: AsyncSession, settings: Settings, provider: PaymentProvider, *,
                     org: Organization, actor: Subject, ip: str, payment_method: Any,
                     now: dt.datetime) -> Outcome:
    """Cancelled but within the period: resume, same cycle, charged at its next start.
    Locked or inactive: charge now for a new period and start a new cycle today.
    Past due: try the unpaid invoice again now (a success ends the retries)."""
    sub = await get_subscription(db, org.id, lock=True)
    if sub is None or sub.status == INCOMPLETE:
        raise Conflict("This organization has no subscription; subscribe with PUT "
                       f"/v1/orgs/{org.slug}/billing", code="no_subscription")
    await advance(db, settings, provider, sub, now)  # a period may have just ended
    if payment_method is not None:
        await set_payment_method(db, provider, sub, org, payment_method)
    if sub.status == ACTIVE:
        raise Conflict("The subscription is active", code="already_active")
    if sub.status == CANCELED:
        _activate(sub)
        audit.record(db, actor=actor, ip=ip, action="billing.reactivated", org_id=org.id,
                     target_type="subscription", target_id=sub.id,
                     details={"kept_cycle": True})
        return Outcome(sub)
    if sub.status == PAST_DUE:
        inv = await _open_invoice(db, sub)
        if inv is None:  # nothing owed after all
            _activate(sub)
            return Outcome(sub)
        result = await _attempt(db, provider, sub, inv, now)
        if result.succeeded:
            _activate(sub)
            audit.record(db, actor=actor, ip=ip, action="billing.paid", org_id=org.id,
                         target_type="invoice", target_id=inv.id,
                         details={"invoice": inv.number})
        return Outcome(sub, inv, result)
    # locked or inactive: a new cycle from today
    await _void_open(db, sub)
    sub.seats = await count_members(db, org.id)
    sub.seat_price_cents = seat_price(settings, sub.plan_code)
    sub.block_price_cents = (await plans.get_plan(db, sub.plan_code)).block_price_cents
    if sub.next_interval:
        sub.interval, sub.next_interval = sub.next_interval, None
    inv, result = await _charge_new_cycle(db, provider, sub, "reactivation", now)
    if result.succeeded:
        audit.record(db, actor=actor, ip=ip, action="billing.reactivated", org_id=org.id,
                     target_type="subscription", target_id=sub.id,
                     details={"kept_cycle": False, "invoice": inv.number,
                              "amount_cents": inv.total_cents})
    else:
        await _void_open(db, sub)
    return Outcome(sub, inv, result)


async def update(db: AsyncSession, settings: Settings, provider: PaymentProvider, *,
                 org: Organization, actor: Subject, ip: str, req: BillingChange,
                 now: dt.datetime) -> Outcome:
    """PUT billing: subscribe when there is no subscription yet; otherwise change the
    payment method, plan, blocks, interval or the pause setting."""
    blocks, pause = req.blocks, req.pause_devices_when_locked
    sub = await get_subscription(db, org.id, lock=True)
    if sub is None or sub.status == INCOMPLETE:
        return await subscribe(db, settings, provider, org=org, actor=actor, ip=ip,
                               plan_code=req.plan, interval=req.interval,
                               blocks=blocks, payment_method=req.payment_method,
                               pause_devices_when_locked=pause, now=now)
    await advance(db, settings, provider, sub, now)
    if req.payment_method is not None:
        await set_payment_method(db, provider, sub, org, req.payment_method)
        if sub.status == PAST_DUE:
            sub.next_retry_at = now  # the next tick tries the new card
    if pause is not None:
        sub.pause_devices_when_locked = pause
    if any(v is not None for v in (req.plan, blocks, req.interval)):
        await change_terms(db, settings, sub=sub, plan_code=req.plan, blocks=blocks,
                           interval=req.interval, now=now)
    changed = req.model_dump(include={"plan", "blocks", "interval",
                                      "pause_devices_when_locked"}, exclude_none=True)
    audit.record(db, actor=actor, ip=ip, action="billing.updated", org_id=org.id,
                 target_type="subscription", target_id=sub.id,
                 details=changed | ({"payment_method": sub.payment_method_label}
                                   if req.payment_method is not None else {}))
    return Outcome(sub)


# --- the clock's side: renewals, retries, period ends --------------------------------------

async def _failed(db: AsyncSession, settings: Settings, sub: Subscription, inv: Invoice,
                  result: ChargeResult, now: dt.datetime, *, first: bool) -> None:
    """Book a declined renewal attempt: schedule a retry, or lock after the last one."""
    if result.status == "error":  # the provider could not be asked; not the card's fault
        sub.status = PAST_DUE
        sub.next_retry_at = now + PROVIDER_ERROR_RETRY
        return
    if not first:
        sub.retry_count += 1
    amount = money(inv.total_cents, inv.currency)
    reason = result.message or "declined"
    if sub.retry_count >= settings.billing_max_retries:
        await _void_open(db, sub)  # uncollectible; its adjustments wait for a reactivation
        await _deactivate(db, settings, sub, status=LOCKED, now=now)
        return
    sub.status = PAST_DUE
    sub.next_retry_at = now + dt.timedelta(seconds=settings.billing_retry_interval_s)
    left = settings.billing_max_retries - sub.retry_count
    what = "charge" if first else f"retry {sub.retry_count} of {settings.billing_max_retries}"
    await _notify(db, settings, sub.org_id, kind="billing.payment_failed",
                  subject="Payment failed",
                  body=f"We could not charge {amount} for invoice {inv.number} ({what}): "
                       f"{reason}\n\nWe will try again on {_day(sub.next_retry_at)} "
                       f"({left} more attempt{'s' if left != 1 else ''}); after that the "
                       "organization is locked. Update the payment method on the billing "
                       "page to avoid an interruption.")


async def advance(db: AsyncSession, settings: Settings, provider: PaymentProvider,
                  sub: Subscription, now: dt.datetime) -> None:
    """Bring one subscription up to ``now``: seat count, period ends (renewal charge, or
    inactive after a cancel), due retries and the lock. Idempotent."""
    if sub.status in (ACTIVE, PAST_DUE, CANCELED):
        await sync_seats(db, sub, now)
    for _ in range(MAX_CATCH_UP):
        end = sub.current_period_end
        if sub.status == CANCELED and end is not None and now >= end:
            await _deactivate(db, settings, sub, status=INACTIVE, now=now)
            return
        if sub.status == ACTIVE and end is not None and now >= end:
            # the charge at a period's start pays for the period that starts
            assert sub.cycle_anchor is not None
            if sub.next_interval:
                sub.interval, sub.next_interval = sub.next_interval, None
                sub.cycle_anchor = end
            start, new_end = end, period_end(sub.cycle_anchor, end, sub.interval)
            sub.current_period_start, sub.current_period_end = start, new_end
            sub.seat_price_cents = seat_price(settings, sub.plan_code)
            sub.block_price_cents = (await plans.get_plan(db, sub.plan_code)).block_price_cents
            inv = await _issue(db, sub, reason="renewal", start=start, end=new_end, now=now)
            sub.status, sub.next_retry_at = PAST_DUE, now  # until the answer is booked
            result = await _attempt(db, provider, sub, inv, now)
            if result.succeeded:
                _activate(sub)
                continue
            await _failed(db, settings, sub, inv, result, now, first=True)
            return
        if sub.status == PAST_DUE and sub.next_retry_at is not None and now >= sub.next_retry_at:
            due = await _open_invoice(db, sub)
            if due is None:
                _activate(sub)
                continue
            prior = (await db.execute(select(Charge.status).where(
                Charge.invoice_id == due.id).order_by(Charge.id))).scalars().all()
            first = not any(s == "declined" for s in prior)
            result = await _attempt(db, provider, sub, due, now)
            if result.succeeded:
                _activate(sub)
                await _notify(db, settings, sub.org_id, kind="billing.payment_succeeded",
                              subject="Payment received",
                              body=f"We charged {money(due.total_cents, due.currency)} for "
                                   f"invoice {due.number}. Thank you.")
                continue
            await _failed(db, settings, sub, due, result, now, first=first)
            return
        return
