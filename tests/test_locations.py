"""Stored location points: `loc` events of opted-in products, one data operation per point,
and the location routes."""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import pytest
from sqlalchemy import select

from corral.events.writer import StoredEvent
from corral.kit import clock
from corral.locations import service
from corral.locations.models import LocationPoint
from corral.metering import ledger
from corral.metering.models import UsageCounter
from corral.sessions.link import Hello
from helpers import add_device, bearer, new_user, owner_and_product
from test_sessions_core import ScriptedLink

DEV = "0123456789abcdef0123aaaa"
DEV2 = "0123456789abcdef0123bbbb"
T0 = dt.datetime(2026, 11, 21, 12, 0, tzinfo=dt.UTC)


def tracker(lat: float, lon: float, *, fix: int | None = None, **extra: Any) -> str:
    loc = {"lck": 1, "lat": lat, "lon": lon, "alt": 12.5, "h_acc": 4.0, "hd": 90.0,
           "spd": 1.5, **extra}
    if fix is not None:
        loc["time"] = fix
    return json.dumps({"cmd": "loc", "time": fix, "loc": loc, "trig": ["lock"], "req_id": 1})


@pytest.fixture
async def setup(client: Any, app: Any) -> dict[str, Any]:
    tok, prod = await owner_and_product(client, settings={"location": {"opt_in": True}})
    await add_device(app, DEV, prod["id"], name="truck-1")
    await add_device(app, DEV2, prod["id"], name="truck-2")
    return {"token": tok, "product": prod}


async def publish_and_store(app: Any, device_id: str, *payloads: str) -> None:
    hub = app.state.runtime.hub
    session = await hub.open(Hello(device_id), ScriptedLink())
    for data in payloads:
        await session.publish("loc", data)
    await app.state.runtime.locations.drain()
    await session.close("test over")


async def points(app: Any) -> list[LocationPoint]:
    async with app.state.sessionmaker() as db:
        return list((await db.execute(select(LocationPoint).order_by(LocationPoint.id)))
                    .scalars())


async def usage(app: Any, device_id: str) -> UsageCounter:
    async with app.state.sessionmaker() as db:
        await ledger.fold_pending(db)
        await db.commit()
        return (await db.execute(select(UsageCounter).where(
            UsageCounter.device_id == device_id))).scalar_one()


def test_parse_point_reads_the_tracker_format_and_plain_positions() -> None:
    fix = int(T0.timestamp()) - 30
    p = service.parse_point(tracker(47.5, 8.25, fix=fix), T0)
    assert p is not None
    assert (p["lat"], p["lon"], p["alt"], p["accuracy_m"], p["heading"], p["speed"]) == (
        47.5, 8.25, 12.5, 4.0, 90.0, 1.5)
    assert p["at"] == T0 - dt.timedelta(seconds=30) and p["gps_lock"] is True
    plain = service.parse_point('{"lat": -33.9, "lon": 151.2}', T0)
    assert plain is not None and plain["at"] == T0 and plain["alt"] is None
    assert service.parse_point(tracker(1, 2, lck=0), T0)["gps_lock"] is False  # type: ignore[index]
    # a fix time far in the future or before 2000 is not believed: the publish time is used
    assert service.parse_point(tracker(1, 2, fix=int(T0.timestamp()) + 10**7), T0)["at"] == T0  # type: ignore[index]


@pytest.mark.parametrize("data", [
    None, "", "not json", "[1, 2]", '{"loc": "x"}', '{"lat": 91, "lon": 0}',
    '{"lat": 0, "lon": -180.5}', '{"lat": "1", "lon": 2}', '{"lat": true, "lon": 2}',
    '{"lat": NaN, "lon": 2}', '{"lat": 1e999, "lon": 2}', '{"lon": 2}',
])
def test_parse_point_refuses_what_is_not_a_position(data: str | None) -> None:
    assert service.parse_point(data, T0) is None


async def test_a_loc_event_stores_a_point_counted_as_one_data_operation(app, setup):
    await publish_and_store(app, DEV, tracker(47.5, 8.25), '{"lat": 47.6, "lon": 8.3}',
                            "not a position")
    got = await points(app)
    assert [(p.device_id, p.lat, p.lon) for p in got] == [(DEV, 47.5, 8.25), (DEV, 47.6, 8.3)]
    assert all(p.product_id == setup["product"]["id"] for p in got)
    u = await usage(app, DEV)
    # three publishes (one data operation each) and two stored points (one each)
    assert (u.events_published, u.location_points, u.data_operations) == (3, 2, 5)


async def test_without_opt_in_nothing_is_stored_or_counted(app, client):
    _tok, prod = await owner_and_product(client, "bob@example.com")
    await add_device(app, DEV2, prod["id"])
    await publish_and_store(app, DEV2, tracker(10, 20))
    assert await points(app) == []
    u = await usage(app, DEV2)
    assert (u.events_published, u.location_points, u.data_operations) == (1, 0, 1)


async def test_the_same_event_is_never_stored_or_counted_twice(app, setup):
    await publish_and_store(app, DEV, tracker(1, 2))
    [p] = await points(app)
    prod = setup["product"]
    replay = StoredEvent(id=p.event_id, published_at=clock.now(), name="loc",
                         data=tracker(1, 2), ttl=60, source="device", device_id=DEV,
                         product_id=prod["id"], org_id=None, owner_user_id=None,
                         customer_id=None, private=True)
    async with app.state.sessionmaker() as db:
        assert await service.store(db, [replay, replay]) == 0
        await db.commit()
    assert len(await points(app)) == 1
    assert (await usage(app, DEV)).location_points == 1


async def test_location_routes_list_the_newest_point_and_the_track(app, client, setup):
    tok, prod = setup["token"], setup["product"]
    await publish_and_store(app, DEV, '{"lat": 1, "lon": 2}', '{"lat": 3, "lon": 4}')
    await publish_and_store(app, DEV2, '{"lat": 5, "lon": 6}')
    r = await client.get(f"/v1/products/{prod['id']}/locations", headers=bearer(tok))
    assert r.status_code == 200, r.text
    body = r.json()
    by_device = {loc["device_id"]: loc for loc in body["locations"]}
    assert by_device[DEV]["geometry"] == {"type": "Point", "coordinates": [4.0, 3.0]}
    assert by_device[DEV]["device_name"] == "truck-1" and by_device[DEV2]["gps_lock"] is True
    assert body["meta"]["total"] == 2 and body["meta"]["total_pages"] == 1
    r = await client.get(f"/v1/products/{prod['slug']}/locations?per_page=1&page=2",
                         headers=bearer(tok))
    assert len(r.json()["locations"]) == 1 and r.json()["meta"]["total_pages"] == 2
    r = await client.get(f"/v1/products/{prod['id']}/locations/{DEV.upper()}",
                         headers=bearer(tok))
    track = r.json()["location"]
    assert track["geometry"] == {"type": "LineString", "coordinates": [[2.0, 1.0], [4.0, 3.0]]}
    assert len(track["timestamps"]) == 2
    # a window before any point: an empty track, and no device in the list
    old = "2001-01-01T00:00:00Z,2001-01-02T00:00:00Z"
    r = await client.get(f"/v1/products/{prod['id']}/locations/{DEV}?date_range={old}",
                         headers=bearer(tok))
    assert r.json()["location"]["geometry"]["coordinates"] == []
    r = await client.get(f"/v1/products/{prod['id']}/locations?date_range={old}",
                         headers=bearer(tok))
    assert r.json()["locations"] == []


@pytest.mark.parametrize(("query", "status"), [
    ("date_range=yesterday", 400),
    ("date_range=2026-01-02T00:00:00Z,2026-01-01T00:00:00Z", 400),
    ("per_page=0", 400),
    ("per_page=101", 400),
    ("page=x", 400),
    ("device_id=nope", 400),
])
async def test_bad_location_queries_get_particle_errors(client, setup, query, status):
    r = await client.get(f"/v1/products/{setup['product']['id']}/locations?{query}",
                         headers=bearer(setup["token"]))
    assert r.status_code == status and r.json()["ok"] is False and r.json()["error"]


async def test_unknown_and_foreign_devices_have_no_track(app, client, setup):
    tok, prod = setup["token"], setup["product"]
    for did in ("ffffffffffffffffffffffff", "not-an-id"):
        r = await client.get(f"/v1/products/{prod['id']}/locations/{did}", headers=bearer(tok))
        assert r.status_code == 404
    other = await new_user(client, "eve@example.com")
    r = await client.get(f"/v1/products/{prod['id']}/locations", headers=bearer(other))
    assert r.status_code == 404  # another tenant's product does not exist for them
