"""What the metering tests share: plan terms edited as data, ticks, counters, worlds."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import select, update

from corral.events.models import Event
from corral.mail.models import OutboxMail
from corral.metering import ledger
from corral.metering.models import Notification, Plan, UsageAlert, UsageCounter
from corral.metering.tasks import TickResult
from helpers import add_member, bearer, make_org, new_user

UTC = dt.UTC


def at(year: int, month: int, day: int = 1, hour: int = 12) -> dt.datetime:
    return dt.datetime(year, month, day, hour, tzinfo=UTC)


async def set_plan_terms(app: Any, code: str, **terms: Any) -> None:
    """Edit a plan row (plan terms are data)."""
    async with app.state.sessionmaker() as db:
        await db.execute(update(Plan).where(Plan.code == code).values(**terms))
        await db.commit()


async def give_sim(app: Any, device_id: str, iccid: str) -> None:
    """``device_id`` reported the SIM ``iccid`` (what its describe records)."""
    from corral.devices.models import Device
    from corral.metering import sims

    async with app.state.sessionmaker() as db:
        device = await db.get(Device, device_id)
        assert device is not None
        await sims.attach(db, device, iccid)
        await db.commit()


async def tick(app: Any, now: dt.datetime | None = None) -> TickResult:
    return await app.state.runtime.metering.tick(now)


async def fold(app: Any) -> int:
    """Fold the committed usage deltas into the counters (what the metering tick does first)."""
    async with app.state.sessionmaker() as db:
        n = await ledger.fold_pending(db)
        await db.commit()
    return n


async def counters(app: Any, device_id: str | None = None) -> list[UsageCounter]:
    """The device's counter rows, after folding the deltas committed so far."""
    await fold(app)
    async with app.state.sessionmaker() as db:
        q = select(UsageCounter).order_by(UsageCounter.device_id, UsageCounter.period)
        if device_id is not None:
            q = q.where(UsageCounter.device_id == device_id)
        return list((await db.execute(q)).scalars())


async def alerts(app: Any, org_id: int | None = None) -> list[UsageAlert]:
    async with app.state.sessionmaker() as db:
        q = select(UsageAlert).order_by(UsageAlert.period, UsageAlert.metric,
                                        UsageAlert.threshold)
        if org_id is not None:
            q = q.where(UsageAlert.org_id == org_id)
        return list((await db.execute(q)).scalars())


async def notifications(app: Any, org_id: int) -> list[Notification]:
    async with app.state.sessionmaker() as db:
        return list((await db.execute(select(Notification).where(
            Notification.org_id == org_id).order_by(Notification.id))).scalars())


async def mails(app: Any, kind: str = "usage.threshold") -> list[OutboxMail]:
    async with app.state.sessionmaker() as db:
        return list((await db.execute(select(OutboxMail).where(
            OutboxMail.kind == kind).order_by(OutboxMail.id))).scalars())


async def events(app: Any, name: str) -> list[Event]:
    async with app.state.sessionmaker() as db:
        return list((await db.execute(select(Event).where(Event.name == name)
                                      .order_by(Event.id))).scalars())


async def org_product(client: Any, token: str, org: str, name: str) -> dict[str, Any]:
    r = await client.post(f"/v1/orgs/{org}/products", headers=bearer(token),
                          json={"product": {"name": name, "platform_id": 12}})
    assert r.status_code in (200, 201), r.text
    return r.json()["product"]


async def team_world(client: Any, app: Any) -> dict[str, Any]:
    """Organization "Acme" owned by ada with products Widget and Gadget, plus cy
    (Administrator), dev (Developer), sup (Support) and view (View-only) on the organization."""
    ada = await new_user(client, "ada@example.com")
    org = await make_org(client, ada, "Acme")
    widget = await org_product(client, ada, org["slug"], "Widget")
    gadget = await org_product(client, ada, org["slug"], "Gadget")
    tokens = {"ada": ada}
    for name, role in (("cy", "Administrator"), ("dev", "Developer"), ("sup", "Support"),
                       ("view", "View-only")):
        tokens[name] = await new_user(client, f"{name}@example.com")
        await add_member(app, f"{name}@example.com", org_id=org["id"], role=role)
    return {"tokens": tokens, "org": org, "org_id": org["id"], "product": widget,
            "widget": widget, "gadget": gadget}
