"""Billable devices (first online, later months, SIM deactivation, every product) and
cellular data, walked through months with the injected clock; the ledger's counting rules."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

import mqtt_helpers
from corral.metering import ledger, usage
from corral.metering.ledger import Usage
from corral.orgs.models import Organization
from helpers import bearer, seed
from meteringkit import at, counters, give_sim, team_world, tick
from sessionkit import ScriptedDevice, connect, import_device

A = "0123456789abcdef0000bb01"
B = "0123456789abcdef0000bb02"
C = "0123456789abcdef0000bb03"
D = "0123456789abcdef0000bb04"
ICCID_B = "89014103211118510720"


gw = mqtt_helpers.gw  # the MQTT gateway fixture


@pytest.fixture
def settings(settings: Any) -> Any:
    return settings.model_copy(update={"event_rate_burst": 100_000,
                                       "event_rate_per_s": 100_000.0,
                                       "token_lifetime_s": 20 * 365 * 86400})


async def billable(app: Any, org_id: int, month: dt.date) -> set[str]:
    async with app.state.sessionmaker() as db:
        org = await db.get(Organization, org_id)
        assert org is not None
        return await usage.billable_device_ids(db, await usage.scope_of(db, org), month)


async def sim(client: Any, token: str, product: Any, iccid: str, action: str) -> Any:
    return await client.put(f"/v1/products/{product}/sims/{iccid}", headers=bearer(token),
                            json={"action": action})


async def test_billable_from_first_online_and_in_later_months_across_products(
        client, app, manual_clock):
    manual_clock.set(at(2026, 1, 15))
    w = await team_world(client, app)
    ada, org_id = w["tokens"]["ada"], w["org_id"]
    for device, product in ((A, w["widget"]), (B, w["widget"]), (C, w["gadget"]),
                            (D, w["gadget"])):
        await import_device(client, ada, product["id"], device)  # imported: not billable yet
    assert await billable(app, org_id, dt.date(2026, 1, 1)) == set()
    s = await connect(app, A, ScriptedDevice())
    await s.close("bye")  # offline for good
    manual_clock.set(at(2026, 3, 31, 23))
    s = await connect(app, C, ScriptedDevice())  # the other product
    await s.close("bye")
    assert await billable(app, org_id, dt.date(2026, 1, 1)) == {A}
    assert await billable(app, org_id, dt.date(2026, 2, 1)) == {A}  # offline, still billable
    assert await billable(app, org_id, dt.date(2026, 3, 1)) == {A, C}
    assert await billable(app, org_id, dt.date(2027, 8, 1)) == {A, C}  # B, D never online
    result = await tick(app)
    assert result.orgs[org_id].billable_devices == 2


async def test_a_sim_deactivated_for_a_whole_month_is_not_billable(client, app, manual_clock):
    manual_clock.set(at(2026, 1, 10))
    w = await team_world(client, app)
    ada, org_id, widget = w["tokens"]["ada"], w["org_id"], w["widget"]
    await import_device(client, ada, widget["id"], B)
    await give_sim(app, B, ICCID_B)  # the device reported its SIM
    s = await connect(app, B, ScriptedDevice())
    await s.close("bye")
    manual_clock.set(at(2026, 1, 20))
    r = await sim(client, ada, widget["slug"], ICCID_B, "deactivate")
    assert r.status_code == 200, r.text
    assert r.json()["sim"]["status"] == "inactive_user_deactivated"
    # deactivated part of January: billable in January (no proration); all of Feb and
    # March: not billable; reactivated on April 3rd: billable in April
    manual_clock.set(at(2026, 4, 3))
    assert (await sim(client, ada, widget["slug"], ICCID_B, "reactivate")).status_code == 200
    assert await billable(app, org_id, dt.date(2026, 1, 1)) == {B}
    assert await billable(app, org_id, dt.date(2026, 2, 1)) == set()
    assert await billable(app, org_id, dt.date(2026, 3, 1)) == set()
    assert await billable(app, org_id, dt.date(2026, 4, 1)) == {B}
    # deactivated from mid-May on: billable in May, not in June, July...
    manual_clock.set(at(2026, 5, 15))
    assert (await sim(client, ada, widget["slug"], ICCID_B, "deactivate")).status_code == 200
    manual_clock.set(at(2026, 7, 15))
    assert await billable(app, org_id, dt.date(2026, 5, 1)) == {B}
    assert await billable(app, org_id, dt.date(2026, 6, 1)) == set()
    assert await billable(app, org_id, dt.date(2026, 7, 1)) == set()  # still deactivated
    assert (await tick(app)).orgs.get(org_id) is None  # nothing used, nothing billable


async def test_sim_routes_validate_and_stay_in_scope(client, app):
    w = await team_world(client, app)
    ada, widget = w["tokens"]["ada"], w["widget"]
    await seed(app, {"id": B, "product_id": widget["id"], "platform_id": 12})
    await give_sim(app, B, ICCID_B)
    r = await sim(client, ada, widget["slug"], "12345", "deactivate")
    assert r.status_code == 400 and r.json()["error"] == "invalid_iccid"
    r = await sim(client, ada, widget["slug"], ICCID_B, "explode")
    assert r.status_code == 400 and r.json()["error"] == "invalid_action"
    r = await sim(client, ada, w["gadget"]["slug"], ICCID_B, "deactivate")  # other product
    assert r.status_code == 404 and r.json()["ok"] is False
    r = await sim(client, ada, widget["slug"], ICCID_B, "reactivate")
    assert r.status_code == 409 and r.json()["error"] == "sim_active"
    assert (await sim(client, ada, widget["slug"], ICCID_B, "deactivate")).status_code == 200
    r = await sim(client, ada, widget["slug"], ICCID_B, "deactivate")
    assert r.status_code == 409 and r.json()["error"] == "sim_deactivated"
    r = await client.get(f"/v1/products/{widget['slug']}/sims/{ICCID_B}", headers=bearer(ada))
    assert r.json()["sim"]["status"] == "inactive_user_deactivated"
    # the user route only reaches the caller's own devices
    r = await client.put(f"/v1/sims/{ICCID_B}", headers=bearer(ada), json={"action": "activate"})
    assert r.status_code == 404
    r = await sim(client, w["tokens"]["sup"], widget["slug"], ICCID_B, "activate")
    assert r.status_code == 403 and r.json()["error"] == "forbidden"  # Developer and up


async def test_user_sim_route_for_own_devices(client, app):
    w = await team_world(client, app)
    from helpers import user_id

    uid = await user_id(app, "dev@example.com")
    await seed(app, {"id": D, "owner_user_id": uid, "platform_id": 13})
    await give_sim(app, D, ICCID_B)
    tok = w["tokens"]["dev"]
    r = await client.put(f"/v1/sims/{ICCID_B}", headers=bearer(tok), data={"action": "deactivate"})
    assert r.status_code == 200, r.text
    r = await client.get(f"/v1/sims/{ICCID_B}", headers=bearer(tok))
    assert r.json()["sim"]["last_device_id"] == D
    r = await client.get(f"/v1/sims/{ICCID_B}", headers=bearer(w["tokens"]["ada"]))
    assert r.status_code == 404


async def test_cellular_devices_count_session_bytes_others_do_not(client, app, manual_clock):
    manual_clock.set(at(2026, 8, 8))
    w = await team_world(client, app)
    ada, widget = w["tokens"]["ada"], w["widget"]
    await seed(app, {"id": A, "product_id": widget["id"], "platform_id": 13, "cellular": True},
               {"id": B, "product_id": widget["id"], "platform_id": 12})
    cell = await connect(app, A, ScriptedDevice())
    wifi = await connect(app, B, ScriptedDevice())
    for s in (cell, wifi):
        s.count_bytes(40_000)  # a batch is handed to the writer at once
        s.count_bytes(123)  # the rest on close
    await cell.close("bye")
    await wifi.close("bye")
    rows = {c.device_id: c for c in await counters(app)}
    assert rows[A].cellular_bytes == 40_123 and rows[A].data_operations == 0
    assert B not in rows or rows[B].cellular_bytes == 0
    result = await tick(app)
    assert result.orgs[w["org_id"]].cellular_bytes == 40_123
    r = await client.get(f"/v1/orgs/{w['org']['slug']}/usage", headers=bearer(ada))
    assert r.json()["usage"]["cellular_mb"] == 0.04


async def test_cellular_allowance_pauses_a_free_organization(client, app, manual_clock):
    from meteringkit import set_plan_terms

    manual_clock.set(at(2026, 9, 9))
    w = await team_world(client, app)
    await set_plan_terms(app, "free", max_cellular_mb=1)
    await seed(app, {"id": A, "product_id": w["widget"]["id"], "platform_id": 13,
                     "cellular": True})
    cell = await connect(app, A, ScriptedDevice())
    cell.count_bytes(1_000_000)
    await cell.close("bye")
    result = await tick(app)
    assert "cellular data" in result.paused[w["org_id"]]
    assert [f.threshold for f in result.fired if f.metric == "cellular_data"] == [70, 90, 100]


def test_ledger_rules():
    now = at(2026, 1, 1)
    items = [Usage(A, "publish", payload_bytes=800, at=now),
             Usage(A, "publish", payload_bytes=1300, at=now),
             Usage(A, "delivery", payload_bytes=0, at=now),
             Usage(A, "function", at=now), Usage(A, "variable", at=now),
             Usage(A, "location", at=now), Usage(A, "location", at=now),
             Usage(A, "discarded", payload_bytes=99, at=now),
             Usage(A, "cellular", payload_bytes=5000, at=now),
             Usage(A, "publish", at=at(2026, 2, 1))]
    rows = {r["period"]: r for r in ledger.fold(items)}
    jan = rows[dt.date(2026, 1, 1)]
    assert jan["data_operations"] == 7  # 2 publishes, 1 delivery, 1 function, 1 variable, 2 points
    assert jan["data_operations_kb"] == 8  # the 1300-byte publish is 2
    assert (jan["location_points"], jan["events_discarded"], jan["cellular_bytes"]) == (2, 1, 5000)
    assert rows[dt.date(2026, 2, 1)]["data_operations"] == 1
    assert ledger.uncounted_name("particle/device/updates") and ledger.uncounted_name("Spark/x")
    assert not ledger.uncounted_name("temperature")
    with pytest.raises(ValueError):
        Usage(A, "webhook")  # type: ignore[arg-type]


async def test_mqtt_transport_counts_a_cellular_devices_traffic(app, client, gw):
    from sqlalchemy import update

    from corral.devices.models import Device
    from mqtt_helpers import DEV, DEV2, Raw, until

    async with app.state.sessionmaker() as db:
        await db.execute(update(Device).where(Device.id == DEV).values(cellular=True))
        await db.commit()
    for device, secret in ((DEV, gw.secret), (DEV2, gw.secret2)):
        raw = await Raw.open(gw.port)
        assert (await raw.connect(device, secret)).reason_code == 0
        for i in range(3):
            ack = await raw.publish(f"devices/{device}/events/temp", "x" * 500, packet_id=i + 1)
            assert ack.reason_code == 0
        raw.close()

    async def counted() -> int:
        rows = {c.device_id: c.cellular_bytes for c in await counters(app)}
        return rows.get(DEV, 0)

    n = await until(counted, what="the cellular device's bytes")
    assert n > 3 * 500  # three publishes and their acknowledgements, at least
    assert {c.device_id: c.cellular_bytes for c in await counters(app)}.get(DEV2, 0) == 0


async def test_a_device_moved_mid_month_is_billed_where_it_is_now(client, app, manual_clock):
    from sqlalchemy import update

    from corral.devices.models import Device

    manual_clock.set(at(2026, 10, 1))
    w = await team_world(client, app)
    await seed(app, {"id": A, "product_id": w["widget"]["id"], "platform_id": 12})
    s = await connect(app, A, ScriptedDevice())
    await s.publish("temp", "1")
    await s.publish("temp", "2")  # the row exists: its tenancy is known and kept
    async with app.state.sessionmaker() as db:
        await db.execute(update(Device).where(Device.id == A).values(
            product_id=w["gadget"]["id"]))
        await db.commit()
    await s.refresh()
    await s.publish("temp", "3")
    [row] = await counters(app, A)
    assert (row.product_id, row.data_operations) == (w["gadget"]["id"], 3)
    await s.close("bye")
