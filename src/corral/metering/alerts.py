"""Usage warnings at 70 %, 90 % and 100 % of an allowance, each fired exactly once.

A threshold fires once per (organization, allowance period, metric, threshold): the row in
``usage_alerts`` (unique on those four) is inserted in the same transaction as the e-mails
to the organization's Administrators and Owners (outbox) and the notification, so a crash
or a second node can neither skip nor repeat them. After that transaction commits, the
metering service stores an event named :data:`EVENT_NAME` in the organization's event
stream (a system name: it is not a data operation and devices never receive it).

Metrics: ``data_operations`` (per operation, or per started KiB on a per-KB plan) and
``cellular_data`` (bytes of cellular devices' session traffic against the pooled MB).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
from typing import Any

from sqlalchemy import select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from corral.auth.policy import Role
from corral.events.writer import NewEvent
from corral.kit import clock
from corral.mail.service import enqueue
from corral.metering.models import Notification, UsageAlert
from corral.metering.plans import EffectivePlan
from corral.orgs import service as orgs

THRESHOLDS = (70, 90, 100)
METRICS = ("data_operations", "cellular_data")
EVENT_NAME = "particle/usage/threshold"
RESUMED_EVENT = "particle/usage/resumed"
_LABEL = {"data_operations": "data operations", "cellular_data": "cellular data"}
BILLING_ROLES = (Role.ADMINISTRATOR, Role.OWNER)


@dataclasses.dataclass(frozen=True, slots=True)
class Fired:
    """A threshold that fired (its notification and e-mails are in the transaction)."""

    org_id: int
    owner_user_id: int | None  # personal organizations: the user (their event stream)
    period: dt.date
    metric: str
    threshold: int
    used: int
    allowance: int
    paused: bool

    def event(self) -> NewEvent:
        data = {"metric": self.metric, "threshold": self.threshold, "used": self.used,
                "allowance": self.allowance, "period": self.period.isoformat(),
                "paused": self.paused}
        return NewEvent(name=EVENT_NAME, data=json.dumps(data, separators=(",", ":")),
                        source="cloud", org_id=self.org_id, owner_user_id=self.owner_user_id,
                        private=True)


def crossed(used: int, allowance: int) -> list[int]:
    """The thresholds ``used`` has reached (none for an allowance of 0: nothing to warn of)."""
    if allowance <= 0:
        return []
    return [t for t in THRESHOLDS if used * 100 >= allowance * t]


async def fired_since(db: AsyncSession, since: dt.date) -> set[tuple[int, dt.date, str, int]]:
    rows = (await db.execute(select(UsageAlert.org_id, UsageAlert.period, UsageAlert.metric,
                                    UsageAlert.threshold)
                             .where(UsageAlert.period >= since))).all()
    return {(int(r[0]), r[1], str(r[2]), int(r[3])) for r in rows}


async def _insert_once(db: AsyncSession, values: dict[str, Any]) -> bool:
    """Insert the alert row unless it exists; True when this call inserted it."""
    ins: Any = postgresql.insert if db.get_bind().dialect.name == "postgresql" else sqlite.insert
    stmt = ins(UsageAlert).values(**values).on_conflict_do_nothing(
        index_elements=["org_id", "period", "metric", "threshold"])
    result = await db.execute(stmt)
    return bool(result.rowcount)  # type: ignore[attr-defined]


async def fire(db: AsyncSession, *, org_id: int, owner_user_id: int | None, org_name: str,
               plan: EffectivePlan, period: dt.date, period_end: dt.date, metric: str,
               used: int, allowance: int, public_url: str,
               known: set[tuple[int, dt.date, str, int]] | None = None) -> list[Fired]:
    """Record each threshold ``used`` has reached that is not recorded yet, with its
    e-mails and notification (no commit). Returns what fired in this call. ``known``
    (from :func:`fired_since`) skips thresholds already recorded without a write."""
    out: list[Fired] = []
    now = clock.now()
    for threshold in crossed(used, allowance):
        if known is not None and (org_id, period, metric, threshold) in known:
            continue
        if not await _insert_once(db, {"org_id": org_id, "period": period, "metric": metric,
                                       "threshold": threshold, "used": used,
                                       "allowance": allowance, "created_at": now}):
            continue
        paused = threshold >= 100 and plan.pause_at_limit
        f = Fired(org_id, owner_user_id, period, metric, threshold, used, allowance, paused)
        title, body = _message(f, org_name, plan, period_end, public_url)
        db.add(Notification(org_id=org_id, kind="usage.threshold", title=title, body=body,
                            details={"metric": metric, "threshold": threshold, "used": used,
                                     "allowance": allowance, "period": period.isoformat(),
                                     "paused": paused},
                            created_at=now))
        for user, member in await orgs.list_team(db, org_id=org_id, product_id=None):
            if Role.parse(member.role) in BILLING_ROLES and user.kind == "user":
                enqueue(db, to=user.username, subject=title, body=body, kind="usage.threshold")
        out.append(f)
    return out


def _message(f: Fired, org_name: str, plan: EffectivePlan, period_end: dt.date,
             public_url: str) -> tuple[str, str]:
    what = _LABEL[f.metric]
    if f.metric == "cellular_data":
        amount = f"{f.used / 1_000_000:.1f} MB of {f.allowance / 1_000_000:.0f} MB"
    else:
        amount = f"{f.used:,} of {f.allowance:,}"
    title = f"{org_name}: {f.threshold}% of this period's {what} used"
    lines = [f"The organization {org_name} has used {amount} {what} "
             f"({f.threshold}% or more) in the period that started {f.period.isoformat()}."]
    if f.paused:
        lines.append(f"Device communication is paused until {period_end.isoformat()} "
                     "(devices stay connected and still receive firmware updates). "
                     "Upgrade the plan or add blocks to resume it now.")
    elif f.threshold >= 100 and plan.plan_code == "basic":
        lines.append("Add blocks to raise the allowance.")
    lines.append(f"Usage: {public_url}/v1/orgs/{f.org_id}/usage")
    return title, "\n\n".join(lines)


async def resumed(db: AsyncSession, org_id: int, reason: str) -> None:
    """A notification that paused communication resumed (no commit)."""
    db.add(Notification(org_id=org_id, kind="usage.resumed",
                        title="Device communication resumed", body=reason,
                        details={}, created_at=clock.now()))


def notification_json(n: Notification) -> dict[str, Any]:
    return {"id": n.id, "type": "notification", "kind": n.kind, "title": n.title,
            "body": n.body, "details": n.details or {}, "state": "read" if n.read_at else "unread",
            "created_at": clock.iso(n.created_at), "read_at": clock.iso(n.read_at)}


__all__ = ["EVENT_NAME", "METRICS", "THRESHOLDS", "Fired", "crossed", "fire", "fired_since",
           "notification_json"]
