"""Which organizations are shut (subscription locked or inactive): the one query behind the
guards' refusal (:func:`corral.billing.subscriptions.lock_check`) and the marks on cross-org lists
(``GET /v1/products``, ``/v1/user/products``, ``/v1/devices``).

Imports only billing's tables, so list queries in other domains can use it without pulling
in the billing lifecycle."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from corral.billing.models import SHUT, Subscription

# the key a list item of a shut organization carries (absent otherwise, so the items of
# every other organization keep Particle's shape)
MARK = "subscription_status"


async def shut_statuses(db: AsyncSession, org_ids: Iterable[int]) -> dict[int, str]:
    """org id -> ``locked`` | ``inactive`` for those of ``org_ids`` whose subscription is
    shut; organizations with a live subscription or none are left out."""
    ids = sorted({int(i) for i in org_ids})
    if not ids:
        return {}
    out: dict[int, str] = {}
    for i in range(0, len(ids), 500):
        rows = (await db.execute(select(Subscription.org_id, Subscription.status).where(
            Subscription.org_id.in_(ids[i:i + 500]), Subscription.status.in_(SHUT)))).all()
        out.update({int(org_id): str(status) for org_id, status in rows})
    return out


async def subscriptions(db: AsyncSession, org_ids: Iterable[int]) -> dict[int, dict[str, str]]:
    """org id -> ``{"plan", "status"}`` of its subscription, for those of ``org_ids`` that
    have one (what ``corral whoami`` and ``corral orgs list`` show)."""
    ids = sorted({int(i) for i in org_ids})
    out: dict[int, dict[str, str]] = {}
    for i in range(0, len(ids), 500):
        rows = (await db.execute(select(
            Subscription.org_id, Subscription.plan_code, Subscription.status).where(
            Subscription.org_id.in_(ids[i:i + 500])))).all()
        out.update({int(o): {"plan": str(plan), "status": str(status)}
                    for o, plan, status in rows})
    return out


def mark(item: dict[str, Any], status: str | None) -> dict[str, Any]:
    """Add the shut mark to one list item (in place) when ``status`` is set."""
    if status:
        item[MARK] = status
    return item
