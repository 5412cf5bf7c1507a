"""Warnings at 70/90/100 %, the Free plan's pause and resume, upgrades, the device cap, and
annual pooling: walked through months and years with the injected clock.

Plan terms are data, so the tests shrink the Free plan's allowance by editing its row (a
100,000-operation month would take too long to publish)."""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
from typing import Any

import pytest

from corral.db.session import commit
from corral.metering import plans
from corral.metering.alerts import EVENT_NAME
from corral.sessions.link import Refused
from helpers import assert_error, bearer, seed, user_id
from meteringkit import (
    alerts,
    at,
    counters,
    events,
    mails,
    notifications,
    set_plan_terms,
    team_world,
    tick,
)
from mqtt_helpers import until
from sessionkit import ScriptedDevice, connect, import_device

DEV = "0123456789abcdef0000aa01"
DEV2 = "0123456789abcdef0000aa02"
DEV3 = "0123456789abcdef0000aa03"


@pytest.fixture
def settings(settings: Any) -> Any:
    return settings.model_copy(update={"event_rate_burst": 100_000,
                                       "event_rate_per_s": 100_000.0,
                                       "token_lifetime_s": 20 * 365 * 86400,
                                       "event_data_max_bytes": 4096})


async def online(client: Any, app: Any, token: str, product: dict[str, Any], device_id: str,
                 **device: Any) -> Any:
    await import_device(client, token, product["id"], device_id)
    return await connect(app, device_id, ScriptedDevice(**device))


async def publish(session: Any, n: int, name: str = "temp") -> None:
    for i in range(n):
        await session.publish(name, str(i))


def thresholds(rows: list[Any], metric: str = "data_operations") -> list[tuple[str, int]]:
    return [(r.period.isoformat(), r.threshold) for r in rows if r.metric == metric]


async def test_free_plan_warnings_once_each_pause_at_limit_and_resume_next_month(
        client, app, manual_clock):
    manual_clock.set(at(2026, 1, 10))
    w = await team_world(client, app)
    ada, org_id = w["tokens"]["ada"], w["org_id"]
    await set_plan_terms(app, "free", max_data_ops=10)
    session = await online(client, app, ada, w["widget"], DEV, functions={"f": lambda a: 1})
    await tick(app)

    await publish(session, 6)
    await tick(app)
    assert await alerts(app, org_id) == []  # 60 %
    await publish(session, 1)
    fired = (await tick(app)).fired
    assert [(f.metric, f.threshold) for f in fired] == [("data_operations", 70)]
    await tick(app)  # nothing new: each threshold fires once
    await publish(session, 2)
    await tick(app)
    assert thresholds(await alerts(app, org_id)) == [("2026-01-01", 70), ("2026-01-01", 90)]

    # the last allowed operation, then the gate refuses at once (no refresh needed)
    await publish(session, 1)
    with pytest.raises(Refused) as refused:
        await session.publish("temp", "over")
    assert refused.value.code == "paused"
    assert "used up" in refused.value.reason
    result = await tick(app)
    assert org_id in result.paused
    assert thresholds(await alerts(app, org_id)) == [
        ("2026-01-01", 70), ("2026-01-01", 90), ("2026-01-01", 100)]
    assert sum(c.data_operations for c in await counters(app, DEV)) == 10  # not one more

    # function calls are refused with a clear reason; the device stays connected
    r = await client.post(f"/v1/devices/{DEV}/f", headers=bearer(ada), json={"arg": "x"})
    body = assert_error(r, 403, "communication_paused")
    assert "paused" in body["error_description"]
    assert not session.closed
    # system traffic (the cloud's own events, OTA's) is not gated
    await session.publish("spark/device/diagnostics/update", "{}", system=True)

    # e-mails went to the Owner and the Administrator only, once per threshold
    sent = await mails(app)
    assert sorted({m.to_addr for m in sent}) == ["ada@example.com", "cy@example.com"]
    assert len(sent) == 6 and any("paused" in m.body for m in sent if "100%" in m.subject)
    notes = await notifications(app, org_id)
    assert [n.details["threshold"] for n in notes] == [70, 90, 100]
    evs = await events(app, EVENT_NAME)
    assert [e.org_id for e in evs] == [org_id] * 3
    assert '"threshold":100' in (evs[-1].data or "") and '"paused":true' in (evs[-1].data or "")

    # a new month is a new allowance: communication resumes, warnings fire afresh
    manual_clock.set(at(2026, 2, 1, 0))
    result = await tick(app)
    assert org_id not in result.paused and result.resumed == [org_id]
    await publish(session, 7)
    await tick(app)
    assert thresholds(await alerts(app, org_id))[-1] == ("2026-02-01", 70)
    assert [n.kind for n in await notifications(app, org_id)][-2:] == [
        "usage.resumed", "usage.threshold"]
    await session.close("test over")


async def test_a_whole_year_fires_each_threshold_once_per_month(client, app, manual_clock):
    manual_clock.set(at(2026, 1, 2))
    w = await team_world(client, app)
    org_id = w["org_id"]
    await set_plan_terms(app, "free", max_data_ops=10)
    session = await online(client, app, w["tokens"]["ada"], w["widget"], DEV)
    paused_months = 0
    for month in range(1, 13):
        manual_clock.set(at(2026, month, 3))
        await tick(app)
        await publish(session, 10)
        with pytest.raises(Refused):
            await session.publish("temp", "over")
        for _ in range(3):  # repeated refreshes change nothing
            result = await tick(app)
        paused_months += org_id in result.paused
        manual_clock.set(at(2026, month, 28, 23))
        assert org_id in (await tick(app)).paused  # paused until the month ends
    assert paused_months == 12
    rows = thresholds(await alerts(app, org_id))
    assert rows == [(f"2026-{m:02d}-01", t) for m in range(1, 13) for t in (70, 90, 100)]
    per_month = {c.period.month: c.data_operations for c in await counters(app, DEV)}
    assert per_month == {m: 10 for m in range(1, 13)}
    sent = await mails(app)  # the Owner and the Administrator, once per threshold and month
    assert len(sent) == 12 * 3 * 2
    assert sorted({m.to_addr for m in sent}) == ["ada@example.com", "cy@example.com"]
    manual_clock.set(at(2027, 1, 1, 0))
    assert org_id not in (await tick(app)).paused
    await session.publish("temp", "new year")
    await session.close("test over")


async def test_adding_blocks_resumes_paused_devices_at_once(client, app, manual_clock):
    manual_clock.set(at(2026, 5, 5))
    w = await team_world(client, app)
    org_id = w["org_id"]
    await set_plan_terms(app, "free", max_data_ops=3)
    session = await online(client, app, w["tokens"]["ada"], w["widget"], DEV)
    await tick(app)
    await publish(session, 3)
    assert org_id in (await tick(app)).paused
    metering = app.state.runtime.metering
    metering._wake.clear()
    async with app.state.sessionmaker() as db:
        await plans.set_org_plan(db, org_id, "basic", blocks=2)
        await commit(db)  # the request boundary's commit runs the after-commit wake-up
    assert metering._wake.is_set()  # the background loop refreshes at once
    result = await tick(app)
    assert org_id not in result.paused
    state = result.orgs[org_id]
    assert (state.plan.max_data_ops, state.plan.max_devices, state.plan.max_cellular_mb) == (
        1_440_000, 200, 1080)
    await publish(session, 5)  # Basic never pauses
    await session.close("test over")


async def test_gate_budget_holds_between_refreshes_and_counts_what_passed(client, app,
                                                                          manual_clock):
    manual_clock.set(at(2026, 3, 3))
    w = await team_world(client, app)
    await set_plan_terms(app, "free", max_data_ops=5)
    session = await online(client, app, w["tokens"]["ada"], w["widget"], DEV)
    await tick(app)
    await publish(session, 2)
    # a refresh while operations flow: what passed since it began stays spent
    gate = app.state.runtime.gate
    await tick(app)
    await publish(session, 3)
    with pytest.raises(Refused):
        await session.publish("temp", "6th")
    assert gate.refused >= 1
    assert sum(c.data_operations for c in await counters(app, DEV)) == 5
    await session.close("test over")


async def test_device_cap_refuses_new_devices_across_products_not_known_ones(
        client, app, manual_clock):
    manual_clock.set(at(2026, 4, 1))
    w = await team_world(client, app)
    ada = w["tokens"]["ada"]
    await set_plan_terms(app, "free", max_devices=2)
    await tick(app)
    s1 = await online(client, app, ada, w["widget"], DEV)
    s2 = await online(client, app, ada, w["gadget"], DEV2)  # the cap spans products
    with pytest.raises(Refused) as refused:
        await online(client, app, ada, w["widget"], DEV3)
    assert refused.value.code == "device_limit" and "allows 2 devices" in refused.value.reason
    await tick(app)  # the stored counts agree with what the gate admitted
    with pytest.raises(Refused):
        await connect(app, DEV3, ScriptedDevice())
    # devices that have been online before are not new: they reconnect under any cap
    await s1.close("bye")
    await set_plan_terms(app, "free", max_devices=1)
    await tick(app)
    s1 = await connect(app, DEV, ScriptedDevice())
    assert not s1.closed
    # an upgrade raises the cap
    async with app.state.sessionmaker() as db:
        await plans.set_org_plan(db, w["org_id"], "basic", blocks=1)
        await db.commit()
    await tick(app)
    s3 = await connect(app, DEV3, ScriptedDevice())
    for s in (s1, s2, s3):
        await s.close("test over")


async def test_own_devices_use_the_personal_organizations_free_plan(client, app,
                                                                      manual_clock):
    manual_clock.set(at(2026, 6, 1))
    w = await team_world(client, app)
    uid = await user_id(app, "ada@example.com")
    await seed(app, {"id": DEV, "owner_user_id": uid, "platform_id": 12})
    await set_plan_terms(app, "free", max_data_ops=4)
    await tick(app)
    session = await connect(app, DEV, ScriptedDevice())
    await publish(session, 4)
    with pytest.raises(Refused):
        await session.publish("temp", "over")
    result = await tick(app)
    personal = [org for org, s in result.orgs.items() if s.data_operations == 4]
    assert len(personal) == 1 and personal[0] != w["org_id"]
    assert personal[0] in result.paused and w["org_id"] not in result.paused
    await session.close("test over")


async def test_enterprise_pools_annually_from_the_contract_and_never_pauses(
        client, app, manual_clock):
    manual_clock.set(at(2026, 3, 20))
    w = await team_world(client, app)
    org_id = w["org_id"]
    async with app.state.sessionmaker() as db:
        await plans.set_org_plan(db, org_id, "enterprise", max_devices=10, max_data_ops=20,
                                 max_cellular_mb=1, max_storage_mb=500,
                                 contract_start=dt.date(2026, 3, 15))
        await db.commit()
        p = await plans.effective_plan(db, org_id)
    assert (p.period, p.max_storage_mb) == ("year", 500)
    assert p.period_bounds(dt.date(2027, 2, 28)) == (dt.date(2026, 3, 1), dt.date(2027, 3, 1))
    session = await online(client, app, w["tokens"]["ada"], w["widget"], DEV)
    await publish(session, 10)
    assert not (await tick(app)).fired  # 50 % of the year
    manual_clock.set(at(2026, 9, 1))
    await publish(session, 5)
    assert [(f.period.isoformat(), f.threshold) for f in (await tick(app)).fired] == [
        ("2026-03-01", 70)]
    manual_clock.set(at(2027, 2, 27))
    await publish(session, 10)  # 125 %: warned, not paused
    result = await tick(app)
    assert [f.threshold for f in result.fired] == [90, 100] and org_id not in result.paused
    manual_clock.set(at(2027, 3, 1, 0))  # a new contract year
    result = await tick(app)
    assert result.orgs[org_id].data_operations == 0
    assert result.orgs[org_id].period_start == dt.date(2027, 3, 1)
    await session.close("test over")


async def test_per_kb_plan_setting_counts_started_kilobytes(client, app, manual_clock):
    manual_clock.set(at(2026, 7, 7))
    w = await team_world(client, app)
    org_id = w["org_id"]
    async with app.state.sessionmaker() as db:
        await plans.set_org_plan(db, org_id, "basic", blocks=1, per_kb=True)
        await db.commit()
    session = await online(client, app, w["tokens"]["ada"], w["widget"], DEV)
    await session.publish("big", "x" * 1300)  # 2 operations per KiB
    await session.publish("small", "x" * 10)  # 1
    result = await tick(app)
    assert result.orgs[org_id].data_operations == 3
    [row] = await counters(app, DEV)
    assert (row.data_operations, row.data_operations_kb) == (2, 3)
    await session.close("test over")


async def test_set_org_plan_validates_terms(client, app):
    w = await team_world(client, app)
    async with app.state.sessionmaker() as db:
        for code, kw in (("gold", {}), ("basic", {"blocks": 0}), ("basic", {"blocks": -1}),
                         ("free", {"blocks": 2}), ("enterprise", {"max_devices": 5}),
                         ("basic", {"blocks": 1, "colour": "red"}),
                         ("enterprise", {"max_devices": 1, "max_data_ops": "many",
                                         "max_cellular_mb": 1})):
            with pytest.raises(Exception) as exc:
                await plans.set_org_plan(db, w["org_id"], code, **kw)
            assert getattr(exc.value, "status", None) in (400, 404), (code, kw)
        assert (await plans.effective_plan(db, w["org_id"])).plan_code == "free"


async def test_background_loop_refreshes_when_woken(app):
    metering = app.state.runtime.metering
    metering.settings = metering.settings.model_copy(update={"metering_refresh_s": 3600})
    task = asyncio.get_running_loop().create_task(metering._run())
    try:
        before = metering.ticks
        metering.wake()  # what a committed plan change does
        await until(lambda: metering.ticks > before, 5, "a refresh after the wake-up")
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
