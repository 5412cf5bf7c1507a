"""Reading an organization's subscription: the lookups the guards and the lifecycle share,
the shut status every org and product route checks, team members and billing contacts, and
what the billing API and the console show (:func:`overview`). The rules that change a
subscription are in :mod:`corral.billing.service`."""

from __future__ import annotations

from typing import Any

from sqlalchemy import distinct, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from corral.auth.models import Membership, User
from corral.auth.policy import Role
from corral.billing import locks
from corral.billing.models import ACTIVE, LOCKED, SHUT, Adjustment, Subscription
from corral.billing.terms import MONTHS, period_lines
from corral.kit import clock
from corral.kit.errors import CorralError
from corral.metering import plans
from corral.orgs.models import Organization

# org routes a locked or inactive organization still answers (the billing page itself,
# and the organization's name so the console can show the "inactive subscription" page)
ALLOWED_WHEN_SHUT = frozenset({"orgs:get", "orgs.billing:get", "orgs.billing:update"})


class SubscriptionInactive(CorralError):
    """This organization's subscription is inactive."""

    status = 402
    code = "subscription_inactive"



# --- reading -----------------------------------------------------------------------------------

async def get_subscription(db: AsyncSession, org_id: int, *, lock: bool = False
                           ) -> Subscription | None:
    q = select(Subscription).where(Subscription.org_id == org_id)
    if lock:
        q = q.with_for_update()
    return (await db.execute(q)).scalar_one_or_none()


async def lock_check(db: AsyncSession, org_id: int, permission: str) -> None:
    """Refuse an org or product route of a locked or inactive organization (one indexed
    lookup of the subscription's status). Installed in :mod:`corral.auth.guards`, with
    :func:`shut_status_sql` / :func:`judge_shut` for guards that read it with the tenant."""
    if permission in ALLOWED_WHEN_SHUT:
        return
    judge_shut((await locks.shut_statuses(db, (org_id,))).get(org_id), org_id, permission)


def shut_status_sql(org_id: Any) -> Any:
    """The organization's shut status (``locked`` / ``inactive``) or NULL, as a scalar
    subquery on ``org_id`` (a column of the guard's query)."""
    return (select(Subscription.status)
            .where(Subscription.org_id == org_id, Subscription.status.in_(SHUT))
            .limit(1).scalar_subquery())


def judge_shut(status: Any, org_id: int, permission: str) -> None:
    if permission in ALLOWED_WHEN_SHUT:
        return
    if status is not None:
        why = ("three payment attempts failed" if status == LOCKED
               else "the subscription was cancelled and its period has ended")
        raise SubscriptionInactive(
            f"This organization's subscription is inactive ({why}). Its data is kept; an "
            f"Owner or Administrator can reactivate it: POST /v1/orgs/{org_id}/billing/"
            f"reactivate", subscription_status=status)


async def paused_orgs(db: AsyncSession) -> dict[int, str]:
    """Organizations whose devices pause because the subscription is locked or inactive
    and its ``pause_devices_when_locked`` setting says so (a usage-gate pause source)."""
    rows = (await db.execute(select(Subscription.org_id, Subscription.status).where(
        Subscription.status.in_(SHUT), Subscription.pause_devices_when_locked.is_(True)
    ))).all()
    return {org_id: f"subscription_{status}" for org_id, status in rows}


async def count_members(db: AsyncSession, org_id: int) -> int:
    """Team members billed: the people (not API users) with a role in the organization or
    one of its products, each counted once; at least one."""
    n = (await db.execute(
        select(func.count(distinct(Membership.user_id)))
        .join(User, User.id == Membership.user_id)
        .where(Membership.org_id == org_id, User.kind == "user"))).scalar_one()
    return max(1, int(n))


async def billing_contacts(db: AsyncSession, org_id: int) -> list[str]:
    """The organization's Owners and Administrators (who see billing), by address."""
    rows = (await db.execute(
        select(User.username).join(Membership, Membership.user_id == User.id)
        .where(Membership.org_id == org_id, Membership.product_id.is_(None),
               Membership.role.in_([Role.OWNER.label, Role.ADMINISTRATOR.label]),
               User.kind == "user").order_by(User.username))).scalars()
    return list(dict.fromkeys(rows))


async def pending_adjustments(db: AsyncSession, sub: Subscription) -> list[Adjustment]:
    return list((await db.execute(select(Adjustment).where(
        Adjustment.subscription_id == sub.id, Adjustment.invoice_id.is_(None))
        .order_by(Adjustment.id))).scalars())


# --- JSON ----------------------------------------------------------------------------------

def subscription_json(sub: Subscription) -> dict[str, Any]:
    return {
        "status": sub.status, "plan": sub.plan_code, "interval": sub.interval,
        "next_interval": sub.next_interval, "currency": sub.currency,
        "seat_price_cents": sub.seat_price_cents, "base_price_cents": sub.base_price_cents,
        "block_price_cents": sub.block_price_cents, "seats": sub.seats, "blocks": sub.blocks,
        "current_period_start": clock.iso(sub.current_period_start),
        "current_period_end": clock.iso(sub.current_period_end),
        "cancel_at_period_end": sub.cancel_at_period_end,
        "canceled_at": clock.iso(sub.canceled_at),
        "retry_count": sub.retry_count, "next_retry_at": clock.iso(sub.next_retry_at),
        "locked_at": clock.iso(sub.locked_at),
        "pause_devices_when_locked": sub.pause_devices_when_locked,
        "payment_method": ({"label": sub.payment_method_label, "provider": sub.provider}
                           if sub.payment_method_ref else None),
    }


# --- e-mail --------------------------------------------------------------------------------

async def overview(db: AsyncSession, org: Organization) -> dict[str, Any]:
    """What ``GET /v1/orgs/{org}/billing`` answers and the console's billing page shows:
    the plan, the subscription, team members, pending adjustments and the next charge as
    estimated today."""
    sub = await get_subscription(db, org.id)
    effective = await plans.effective_plan(db, org.id)
    out: dict[str, Any] = {
        "organization": {"id": org.id, "slug": org.slug, "name": org.name},
        "plan": plans.effective_json(effective),
        "subscription": subscription_json(sub) if sub else None,
        "team_members": await count_members(db, org.id),
        "upcoming": None, "pending_adjustments": [],
    }
    if sub is None:
        return out
    pending = await pending_adjustments(db, sub)
    out["pending_adjustments"] = [
        {"kind": a.kind, "description": a.description, "amount_cents": a.amount_cents,
         "created_at": clock.iso(a.created_at)} for a in pending]
    if sub.status == ACTIVE and sub.current_period_end is not None:
        # what the next renewal would charge at today's terms (members counted now)
        plan = await plans.get_plan(db, sub.plan_code)
        lines = period_lines(sub, plan.name)
        members = out["team_members"]
        total = sum(line.amount_cents for line in lines) + sum(a.amount_cents for a in pending)
        total += (members - sub.seats) * sub.seat_price_cents * MONTHS[sub.interval]
        out["upcoming"] = {"at": clock.iso(sub.current_period_end),
                           "estimated_total_cents": max(0, total),
                           "currency": sub.currency}
    return out


