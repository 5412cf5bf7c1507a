"""Device vitals: reports from sessions (never data operations), the MQTT device SDK over a
real socket, asking a device for fresh vitals, and the /v1/diagnostics routes in Particle's
shapes."""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
from typing import Any

import pytest
from sqlalchemy import select

from corral.device import Device as SdkDevice
from corral.device import PublishRefused
from corral.events.models import Event
from corral.fleet import vitals
from corral.fleet.models import DeviceVitals
from corral.fleet.report import pick
from corral.fleet.tasks import fleet_retention
from corral.kit import clock
from corral.metering import ledger
from corral.metering.models import UsageCounter
from corral.sessions.link import Hello, Refused
from devicekit import eventually, mqtt_listener, owner_product_devices
from helpers import add_device, bearer, new_user, owner_and_product
from test_sessions_core import ScriptedLink

DEV = "0123456789abcdef0123aaaa"
OTHER = "0123456789abcdef0123bbbb"
DATE_ERROR = "start_date and end_date must be ISO8601 formatted"


def report(rssi: int = -60, used: int = 40_000, rtt: int = 100, **extra: Any) -> dict[str, Any]:
    return {"device": {"network": {"signal": {"rssi": rssi, "strength": 70}},
                       "cloud": {"coap": {"round_trip": rtt}, "disconnects": 1},
                       "system": {"uptime": 30, "memory": {"used": used, "total": 160_000}},
                       **extra},
            "service": {"device": {"status": "ok"}}}


@pytest.fixture
async def setup(client: Any, app: Any) -> dict[str, Any]:
    tok, prod = await owner_and_product(client)
    await add_device(app, DEV, prod["id"], name="probe")
    return {"token": tok, "product": prod}


async def send(app: Any, device_id: str, *docs: dict[str, Any]) -> None:
    session = await app.state.runtime.hub.open(Hello(device_id), ScriptedLink())
    for doc in docs:
        await session.vitals(json.dumps(doc))
    await app.state.runtime.vitals.drain()
    await session.close("test over")


async def stored(app: Any) -> list[DeviceVitals]:
    async with app.state.sessionmaker() as db:
        return list((await db.execute(select(DeviceVitals).order_by(DeviceVitals.id)))
                    .scalars())


def test_parse_takes_json_objects_of_at_most_4_kib() -> None:
    assert vitals.parse('{"device": {}}') == {"device": {}}
    for bad in (None, "", "[1]", "nope", "1", b"\xff{}", "{" + " " * 5000 + "}"):
        with pytest.raises(vitals.BadVitals):
            vitals.parse(bad)


async def test_a_report_is_stored_as_an_event_and_as_vitals_never_as_a_data_operation(
        app, setup):
    await send(app, DEV, report(rssi=-71))
    [row] = await stored(app)
    assert row.device_id == DEV and row.product_id == setup["product"]["id"]
    assert pick(row.payload, "device.network.signal.rssi") == -71
    async with app.state.sessionmaker() as db:
        names = list((await db.execute(select(Event.name).where(Event.device_id == DEV)))
                     .scalars())
    assert vitals.EVENT in names
    async with app.state.sessionmaker() as db:
        await ledger.fold_pending(db)
        await db.commit()
        usage = (await db.execute(select(UsageCounter).where(
            UsageCounter.device_id == DEV))).scalars().all()
    assert sum(u.data_operations for u in usage) == 0


async def test_bad_and_too_frequent_reports_are_refused(app, setup):
    session = await app.state.runtime.hub.open(Hello(DEV), ScriptedLink())
    for bad, code in (("[]", "invalid"), ("{", "invalid"), ("x" * 5000, "too_large")):
        with pytest.raises(Refused) as err:
            await session.vitals(bad)
        assert err.value.code == code
    for _ in range(3):  # a burst of 3, then one per 10 s
        await session.vitals("{}")
    with pytest.raises(Refused) as err:
        await session.vitals("{}")
    assert err.value.code == "rate_limited"
    await session.close("test over")
    await app.state.runtime.vitals.drain()
    assert len(await stored(app)) == 3


async def test_diagnostics_routes_in_particles_shapes(app, client, setup):
    tok, prod = setup["token"], setup["product"]
    r = await client.get(f"/v1/diagnostics/{DEV}/last", headers=bearer(tok))
    assert r.status_code == 404, r.text
    await send(app, DEV, report(rssi=-50, used=10), report(rssi=-70, used=30))
    r = await client.get(f"/v1/diagnostics/{DEV}/last", headers=bearer(tok))
    assert r.status_code == 200, r.text
    last = r.json()["diagnostics"]
    assert last["deviceID"] == DEV and last["payload"]["device"]["network"]["signal"]["rssi"] == -70
    assert dt.datetime.fromisoformat(last["updated_at"].replace("Z", "+00:00"))
    r = await client.get(f"/v1/products/{prod['slug']}/diagnostics/{DEV}", headers=bearer(tok))
    assert r.status_code == 200, r.text
    assert [d["payload"]["device"]["system"]["memory"]["used"]
            for d in r.json()["diagnostics"]] == [10, 30]
    # CSV: one line per report, every diagnostic by its dotted path
    r = await client.get(f"/v1/diagnostics/{DEV}", headers={**bearer(tok), "Accept": "text/csv"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/csv")
    lines = list(csv.DictReader(io.StringIO(r.text)))
    assert [x["device.network.signal.rssi"] for x in lines] == ["-50", "-70"]
    assert lines[0]["deviceID"] == DEV and lines[0]["service.device.status"] == "ok"
    # a window that ends before the reports holds none
    r = await client.get(f"/v1/diagnostics/{DEV}", headers=bearer(tok), params={
        "start_date": "2020-01-01T00:00:00Z", "end_date": "2020-01-02T00:00:00Z"})
    assert r.json() == {"diagnostics": []}
    r = await client.get(f"/v1/diagnostics/{DEV}/metadata", headers=bearer(tok))
    meta = r.json()["diagnostics_metadata"]
    assert meta["device.network.signal.rssi"]["units"] == "dBm"
    assert {"title", "type", "priority", "describes", "messages"} <= set(
        meta["device.power.battery.charge"])
    r = await client.get(f"/v1/products/{prod['id']}/diagnostics/{DEV}/summary",
                         headers=bearer(tok), params={"limit": 5})
    assert r.status_code == 200, r.text
    s = r.json()
    assert s["deviceID"] == DEV and s["hasBattery"] is False
    assert s["memoryAvailable"] == 160_000 - 30
    assert sum(x["count"] for x in s["samples"]) == 2
    assert {"bucketSize", "startDate", "endDate"} <= set(s)


@pytest.mark.parametrize("params", [
    {"start_date": "yesterday"}, {"end_date": "2026-13-45"},
    {"start_date": "2026-01-10T00:00:00Z", "end_date": "2026-01-01T00:00:00Z"},
    {"start_date": "2026-01-01T00:00:00Z", "end_date": "2026-03-01T00:00:00Z"},
])
async def test_bad_dates_get_particles_error(client, setup, params):
    for path in (f"/v1/diagnostics/{DEV}", f"/v1/diagnostics/{DEV}/summary"):
        r = await client.get(path, headers=bearer(setup["token"]), params=params)
        assert r.status_code == 400, r.text
        body = r.json()
        assert body["error"] == "bad_request" and body["description"] == DATE_ERROR


async def test_other_tenants_see_no_vitals(app, client, setup):
    await send(app, DEV, report())
    stranger = await new_user(client, "eve@example.com")
    for path in (f"/v1/diagnostics/{DEV}/last", f"/v1/diagnostics/{DEV}"):
        r = await client.get(path, headers=bearer(stranger))
        assert r.status_code == 404, r.text
    r = await client.post(f"/v1/diagnostics/{DEV}/update", headers=bearer(stranger))
    assert r.status_code == 404


async def test_an_offline_device_cannot_be_asked(client, setup):
    r = await client.post(f"/v1/diagnostics/{DEV}/update", headers=bearer(setup["token"]))
    assert r.status_code == 404 and r.json()["error"] == "device_offline"


async def test_retention_drops_old_vitals(app, setup, settings):
    await send(app, DEV, report())
    async with app.state.sessionmaker() as db:
        [row] = (await db.execute(select(DeviceVitals))).scalars().all()
        row.at = clock.now() - dt.timedelta(days=settings.vitals_retention_days + 1)
        await db.commit()
    await send(app, DEV, report(rssi=-40))
    out = await fleet_retention(app.state.sessionmaker, settings)
    assert out["device_vitals"] == 1
    [left] = await stored(app)
    assert pick(left.payload, "device.network.signal.rssi") == -40


async def test_the_sdk_sends_vitals_when_asked_over_mqtt(app, client):
    token, product, [(did, secret)] = await owner_product_devices(client)
    async with mqtt_listener(app) as listener:
        dev = SdkDevice(did, secret, "127.0.0.1", listener.port)
        asked = []

        def current() -> dict[str, Any]:
            asked.append(1)
            return report(rssi=-55 - len(asked))

        dev.vitals(current)
        async with dev:
            await dev.send_vitals()  # unasked: stored at once (QoS 1 acked after commit)
            await app.state.runtime.vitals.drain()
            assert len(await stored(app)) == 1
            r = await client.post(f"/v1/products/{product['slug']}/diagnostics/{did}/update",
                                  headers=bearer(token))
            assert r.status_code == 202 and r.json() == {"ok": True}, r.text

            async def two() -> bool:
                await app.state.runtime.vitals.drain()
                return len(await stored(app)) == 2

            await eventually(two)
            r = await client.get(f"/v1/diagnostics/{did}/last", headers=bearer(token))
            assert r.json()["diagnostics"]["payload"]["device"]["network"]["signal"][
                "rssi"] == -57
            # a report that is not an object is refused (MQTT 5 PUBACK), nothing stored
            with pytest.raises(PublishRefused) as refused:
                await dev.send_vitals([1, 2])  # type: ignore[arg-type]
            assert refused.value.reason_code == 0x99  # Payload format invalid
        assert len(await stored(app)) == 2


async def test_the_sdk_reports_soon_after_connecting_then_periodically(app, client,
                                                                       monkeypatch):
    import corral.device.client as sdk

    monkeypatch.setattr(sdk, "FIRST_VITALS_WITHIN_S", 0.05)
    token, _product, [(did, secret)] = await owner_product_devices(client)
    with pytest.raises(ValueError):
        SdkDevice(did, secret).vitals(lambda: {}, every=1)
    async with mqtt_listener(app) as listener:
        dev = SdkDevice(did, secret, "127.0.0.1", listener.port)
        dev.vitals(lambda: report(rssi=-44), every=3600)
        async with dev:
            async def one() -> bool:
                await app.state.runtime.vitals.drain()
                return len(await stored(app)) == 1

            await eventually(one)
    r = await client.get(f"/v1/diagnostics/{did}/last", headers=bearer(token))
    assert r.json()["diagnostics"]["payload"]["device"]["network"]["signal"]["rssi"] == -44
