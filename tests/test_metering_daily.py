"""Usage per day (the console's chart): the metering tick records each organization's
month-to-date reading once a day, and a day's usage is the difference to the day before."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from sqlalchemy import select

from corral.metering import daily, plans
from corral.metering.models import UsageDay
from meteringkit import at, team_world, tick
from sessionkit import ScriptedDevice, connect, import_device

DEV = "0123456789abcdef0000da01"


@pytest.fixture
def settings(settings: Any) -> Any:
    return settings.model_copy(update={"event_rate_burst": 100_000,
                                       "event_rate_per_s": 100_000.0,
                                       "token_lifetime_s": 20 * 365 * 86400})


async def publish(session: Any, n: int) -> None:
    for i in range(n):
        await session.publish("temp", str(i))


async def series(app: Any, org_id: int, month: dt.date, until: dt.date) -> list[tuple[int, bool]]:
    async with app.state.sessionmaker() as db:
        plan = await plans.effective_plan(db, org_id)
        days = await daily.per_day(db, org_id, month, plan, until=until)
    return [(d.data_operations, d.recorded) for d in days]


async def test_each_day_shows_its_own_usage(client, app, manual_clock):
    manual_clock.set(at(2026, 3, 2, 9))
    w = await team_world(client, app)
    org_id = w["org_id"]
    await import_device(client, w["tokens"]["ada"], w["widget"]["id"], DEV)
    session = await connect(app, DEV, ScriptedDevice())
    await publish(session, 3)
    await tick(app)
    await publish(session, 2)
    await tick(app)  # the same day: its reading is replaced, not added
    manual_clock.set(at(2026, 3, 3, 18))
    await publish(session, 4)
    await tick(app)
    await tick(app)  # nothing new: nothing written
    manual_clock.set(at(2026, 3, 5, 8))  # no tick on the 4th
    await publish(session, 1)
    await tick(app)

    march = dt.date(2026, 3, 1)
    assert await series(app, org_id, march, dt.date(2026, 3, 5)) == [
        (0, False), (5, True), (4, True), (0, False), (1, True)]
    async with app.state.sessionmaker() as db:
        rows = (await db.execute(select(UsageDay).where(UsageDay.org_id == org_id)
                                 .order_by(UsageDay.day))).scalars().all()
    assert [(r.day.day, r.data_operations) for r in rows] == [(2, 5), (3, 9), (5, 10)]

    # a new month starts from zero
    manual_clock.set(at(2026, 4, 1, 1))
    await publish(session, 2)
    await tick(app)
    assert await series(app, org_id, dt.date(2026, 4, 1), dt.date(2026, 4, 1)) == [(2, True)]
    # the whole of March is still there, every day of it
    assert len(await series(app, org_id, march, dt.date(2026, 12, 31))) == 31
    await session.close("test over")
