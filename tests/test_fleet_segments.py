"""Fleet health filtered by device group and by Device OS version (and with a product
firmware version): the API's numbers equal a direct count of the stored facts of the
selected devices; unknown groups and malformed filters get Particle's error shape."""

from __future__ import annotations

import datetime as dt
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
from sqlalchemy import func, select

from corral.devices.models import Device, DeviceGroup, DeviceGroupMember
from corral.events.models import Event
from corral.fleet.rollups import minute_of
from corral.kit import clock
from corral.sessions.link import Hello
from helpers import add_device, bearer, owner_and_product, settle_fleet
from test_sessions_core import ScriptedLink

# device: (product firmware, Device OS, groups)
FLEET = {"0123456789abcdef0123cc01": (3, "6.2.0", ["beta"]),
         "0123456789abcdef0123cc02": (3, "5.9.0", ["beta", "north"]),
         "0123456789abcdef0123cc03": (5, "6.2.0", ["north"]),
         "0123456789abcdef0123cc04": (5, "6.2.0", [])}
IDS = list(FLEET)
FILTERS = [{"device_group": "beta"}, {"device_group": "north"},
           {"device_os_version": "6.2.0"}, {"device_os_version": "5.9.0"},
           {"device_group": "north", "product_fw": 5}, {"device_os_version": "6.2.0",
                                                        "product_fw": 3}]


@pytest.fixture
async def fleet(app: Any, client: Any, manual_clock: Any) -> AsyncIterator[dict[str, Any]]:
    """The devices above: each connects and publishes once; two publish again a minute
    later, the last one goes offline; the first answers a function call."""
    tok, prod = await owner_and_product(client)
    for did, (_fw, _os, groups) in FLEET.items():
        await add_device(app, did, prod["id"])
        r = await client.put(f"/v1/products/{prod['slug']}/devices/{did}",
                             headers=bearer(tok), json={"groups": groups})
        assert r.status_code == 200, r.text
    hub = app.state.runtime.hub
    ids = list(FLEET)
    links = [ScriptedLink() for _ in ids]
    links[0].functions["ok"] = lambda arg: 1
    sessions = []
    for did, link in zip(ids, links, strict=True):
        fw, os_version, _groups = FLEET[did]
        sessions.append(await hub.open(Hello(did, firmware_version=fw,
                                             system_version=os_version), link))
    await sessions[0].describe(functions=["ok"])
    for s in sessions:
        await s.publish("temp", "1")
    manual_clock.set(manual_clock.now() + dt.timedelta(minutes=1))
    for i in (0, 2):
        sessions[i].bucket.tokens = 4.0
        await sessions[i].publish("hum", "2")
    r = await client.post(f"/v1/devices/{ids[0]}/ok", headers=bearer(tok))
    assert r.status_code == 200, r.text
    await sessions[3].close("test: gone")
    await settle_fleet(app)
    yield {"token": tok, "product": prod, "sessions": sessions}
    for s in sessions[:3]:
        await s.close("done")


async def selected(app: Any, product_id: int, f: dict[str, Any]) -> set[str]:
    """The device IDs a filter selects, read directly from the devices and memberships."""
    async with app.state.sessionmaker() as db:
        q = select(Device.id).where(Device.product_id == product_id)
        if "device_group" in f:
            q = q.where(Device.id.in_(
                select(DeviceGroupMember.device_id).join(
                    DeviceGroup, DeviceGroup.id == DeviceGroupMember.group_id)
                .where(DeviceGroup.name == f["device_group"])))
        if "device_os_version" in f:
            q = q.where(Device.system_firmware_version == f["device_os_version"])
        if "product_fw" in f:
            q = q.where(Device.firmware_version == f["product_fw"])
        return set((await db.execute(q)).scalars())


async def direct(app: Any, product_id: int, ids: set[str]) -> dict[str, Any]:
    """The stored facts of ``ids``: device events per minute, connects and disconnects
    (the cloud's spark/status events), devices and online now, per firmware version."""
    async with app.state.sessionmaker() as db:
        events = (await db.execute(select(Event.published_at).where(
            Event.product_id == product_id, Event.source == "device",
            Event.device_id.in_(ids), ~Event.name.like("spark%"),
            ~Event.name.like("particle%")))).scalars().all()
        status = Counter((await db.execute(select(Event.data).where(
            Event.product_id == product_id, Event.source == "cloud",
            Event.name == "spark/status", Event.device_id.in_(ids)))).scalars())
        devices = (await db.execute(select(Device.firmware_version, Device.online).where(
            Device.id.in_(ids)))).all()
    per_fw: dict[int | None, list[int]] = {}
    for fw, online in devices:
        per_fw.setdefault(fw, [0, 0])
        per_fw[fw][0] += 1
        per_fw[fw][1] += int(bool(online))
    return {"per_minute": Counter(minute_of(clock.aware(t)) for t in events),  # type: ignore[arg-type]
            "connects": status["online"], "disconnects": status["offline"],
            "total": len(devices), "online": sum(int(bool(o)) for _f, o in devices),
            "firmware": {fw: tuple(v) for fw, v in per_fw.items()}}


@pytest.mark.parametrize("f", FILTERS, ids=lambda f: "&".join(f"{k}={v}" for k, v in f.items()))
async def test_filtered_numbers_equal_a_direct_count(app, client, fleet, f):
    tok, prod = fleet["token"], fleet["product"]
    ids = await selected(app, prod["id"], f)
    assert ids and ids != set(FLEET)  # some of the devices, not all
    want = await direct(app, prod["id"], ids)
    now = clock.now()
    window = {"start_date": clock.iso(now - dt.timedelta(minutes=10)),
              "end_date": clock.iso(now + dt.timedelta(minutes=2))}

    r = await client.get(f"/v1/products/{prod['slug']}/metrics/events", headers=bearer(tok),
                         params={**f, **window, "bucket_size": 60})
    assert r.status_code == 200, r.text
    got = Counter({dt.datetime.fromisoformat(b["time"].replace("Z", "+00:00")): b["received"]
                   for b in r.json()["events"] if b["received"]})
    assert got == want["per_minute"]

    r = await client.get(f"/v1/products/{prod['id']}/metrics/online", headers=bearer(tok),
                         params={**f, **window, "bucket_size": 60})
    assert r.status_code == 200, r.text
    assert max(b["count"] for b in r.json()["online"]) == sum(
        1 for s in fleet["sessions"][:3] if s.device_id in ids)  # sampled while online

    r = await client.get(f"/v1/products/{prod['id']}/fleet/health", headers=bearer(tok),
                         params=f)
    assert r.status_code == 200, r.text
    h = r.json()
    assert h["devices"]["total"] == want["total"] and h["devices"]["online"] == want["online"]
    assert {x["version"]: (x["devices"], x["online"]) for x in h["firmware"]} \
        == want["firmware"]
    assert h["events"]["received"] == sum(want["per_minute"].values())
    assert (h["connections"]["connects"], h["connections"]["disconnects"]) == (
        want["connects"], want["disconnects"])
    assert h["functions"]["success"] == (1 if IDS[0] in ids else 0)
    assert h["top"]["disconnects"] == [
        {"device_id": d, "disconnects": 1} for d in sorted(ids) if d == IDS[3]]
    # disconnect reasons per group / Device OS version; not per firmware version
    gone = [{"reason": "test: gone", "count": 1}]
    if "product_fw" in f:
        assert h["filter"]["unfiltered"] == ["connections.reasons"]
        assert h["connections"]["reasons"] == (gone if "device_os_version" in f else [])
    else:
        assert h["filter"]["unfiltered"] == []
        assert h["connections"]["reasons"] == (gone if IDS[3] in ids else [])
    assert h["filter"]["device_os_version"] == f.get("device_os_version")
    assert h["filter"]["product_fw"] == f.get("product_fw")
    assert (h["filter"]["device_group_id"] is None) == ("device_group" not in f)


async def test_unfiltered_health_is_the_whole_product(app, client, fleet):
    tok, prod = fleet["token"], fleet["product"]
    r = await client.get(f"/v1/products/{prod['id']}/fleet/health", headers=bearer(tok))
    h = r.json()
    want = await direct(app, prod["id"], set(FLEET))
    assert h["devices"]["total"] == 4 and h["events"]["received"] == 6
    assert h["connections"]["connects"] == want["connects"] == 4
    assert h["filter"] == {"product_fw": None, "device_group_id": None,
                           "device_os_version": None, "unfiltered": []}


async def test_a_device_counts_under_the_groups_it_is_in_when_flushed(app, client, fleet):
    """Joining a group later adds the device's later counts to the group, not its past."""
    tok, prod = fleet["token"], fleet["product"]
    rt = app.state.runtime
    last = IDS[2]  # in "north" only
    r = await client.put(f"/v1/products/{prod['slug']}/devices/{last}", headers=bearer(tok),
                         json={"groups": ["north", "beta"]})
    assert r.status_code == 200, r.text
    rt.fleet._segments.clear()  # the membership cache (60 s) would hide the change
    s = fleet["sessions"][2]
    s.bucket.tokens = 4.0
    await s.publish("late", "3")
    await settle_fleet(app, sample=False)
    r = await client.get(f"/v1/products/{prod['id']}/fleet/health", headers=bearer(tok),
                         params={"device_group": "beta"})
    # beta's own two devices published 1 + 2 events; the newcomer only its latest one
    assert r.json()["events"]["received"] == 4
    assert r.json()["devices"]["total"] == 3


@pytest.mark.parametrize(("params", "status", "error"), [
    ({"device_group": "nope"}, 404, "group_not_found"),
    ({"device_group": "Beta!"}, 400, "bad_request"),
    ({"device_group": "x" * 65}, 400, "bad_request"),
    ({"device_os_version": "6.2.0; drop"}, 400, "bad_request"),
    ({"device_os_version": "1" * 33}, 400, "bad_request"),
    ({"device_group": "beta", "device_os_version": "6.2.0"}, 400, "bad_request"),
    ({"product_fw": "-1", "device_group": "beta"}, 400, "bad_request"),
])
async def test_bad_filters(app, client, params, status, error):
    tok, prod = await owner_and_product(client)
    await add_device(app, IDS[0], prod["id"])
    r = await client.put(f"/v1/products/{prod['slug']}/devices/{IDS[0]}",
                         headers=bearer(tok), json={"groups": ["beta"]})
    assert r.status_code == 200, r.text
    for path in ("metrics/online", "metrics/events", "metrics/functions", "metrics/variables",
                 "fleet/health"):
        r = await client.get(f"/v1/products/{prod['id']}/{path}", headers=bearer(tok),
                             params=params)
        assert r.status_code == status, (path, r.text)
        body = r.json()
        assert body["ok"] is False and body["error"] == error, body


async def test_another_products_group_is_not_found(app, client):
    tok, prod = await owner_and_product(client)
    _other_tok, other = await owner_and_product(client, "bob@example.com", name="Gadget")
    async with app.state.sessionmaker() as db:
        db.add(DeviceGroup(product_id=other["id"], name="theirs"))
        await db.commit()
        assert (await db.execute(select(func.count()).select_from(DeviceGroup))
                ).scalar_one() == 1
    r = await client.get(f"/v1/products/{prod['id']}/metrics/events", headers=bearer(tok),
                         params={"device_group": "theirs"})
    assert r.status_code == 404 and r.json()["error"] == "group_not_found", r.text


@pytest.mark.parametrize("f", FILTERS, ids=lambda f: "&".join(f"{k}={v}" for k, v in f.items()))
async def test_an_organizations_filtered_health_equals_a_direct_count(app, client, fleet, f):
    """``/v1/orgs/:org/fleet/health`` takes the product filters: the product's row and the
    sum count the selected devices only."""
    tok, prod = fleet["token"], fleet["product"]
    ids = await selected(app, prod["id"], f)
    want = await direct(app, prod["id"], ids)
    r = await client.get(f"/v1/orgs/{prod['org_id']}/fleet/health", headers=bearer(tok),
                         params=f)
    assert r.status_code == 200, r.text
    body = r.json()
    [row] = body["products"]
    got = {k: row[k] for k in ("devices", "online", "events", "connects", "disconnects")}
    assert got == {"devices": want["total"], "online": want["online"],
                   "events": sum(want["per_minute"].values()),
                   "connects": want["connects"], "disconnects": want["disconnects"]}
    assert row["calls"] == (1 if IDS[0] in ids else 0)
    assert {k: body["total"][k] for k in got} == got
    assert body["filter"] == {"product_fw": f.get("product_fw"),
                              "device_group": f.get("device_group"),
                              "device_os_version": f.get("device_os_version")}


@pytest.mark.parametrize(("params", "status", "error"), [
    ({"device_group": "nope"}, 404, "group_not_found"),
    ({"device_group": "Bad Name"}, 400, "bad_request"),
    ({"device_group": "beta", "device_os_version": "6.2.0"}, 400, "bad_request"),
    ({"device_os_version": "6.2.0;drop"}, 400, "bad_request"),
    ({"product_fw": "x"}, 400, "bad_request"),
])
async def test_an_organizations_bad_filters(app, client, fleet, params, status, error):
    tok, prod = fleet["token"], fleet["product"]
    r = await client.get(f"/v1/orgs/{prod['org_id']}/fleet/health", headers=bearer(tok),
                         params=params)
    assert r.status_code == status, r.text
    assert r.json()["error"] == error


async def test_an_organizations_group_filter_leaves_out_products_without_it(app, client,
                                                                          fleet):
    tok, prod = fleet["token"], fleet["product"]
    r = await client.post("/v1/user/products", headers=bearer(tok),
                          json={"product": {"name": "No Groups", "platform_id": 12}})
    assert r.status_code == 200, r.text
    r = await client.get(f"/v1/orgs/{prod['org_id']}/fleet/health", headers=bearer(tok))
    assert len(r.json()["products"]) == 2
    r = await client.get(f"/v1/orgs/{prod['org_id']}/fleet/health", headers=bearer(tok),
                         params={"device_group": "beta"})
    assert r.status_code == 200, r.text
    assert [p["slug"] for p in r.json()["products"]] == [prod["slug"]]


async def test_an_organizations_group_filter_takes_a_dynamic_group_by_its_query(
        app, client, fleet):
    """A product's dynamic group of the requested name selects the devices matching its
    query now (as the product's own fleet health does); another product's static group of
    that name still selects its members."""
    tok, prod = fleet["token"], fleet["product"]
    r = await client.post(f"/v1/products/{prod['slug']}/groups", headers=bearer(tok),
                          json={"name": "live", "query": "online"})
    assert r.status_code == 201, r.text
    r = await client.post("/v1/user/products", headers=bearer(tok),
                          json={"product": {"name": "Static Live", "platform_id": 12}})
    assert r.status_code == 200, r.text
    other = r.json()["product"]
    r = await client.post(f"/v1/products/{other['slug']}/groups", headers=bearer(tok),
                          json={"name": "live"})
    assert r.status_code == 201, r.text
    async with app.state.sessionmaker() as db:
        online = set((await db.execute(select(Device.id).where(
            Device.product_id == prod["id"], Device.online.is_(True)))).scalars())
    assert online and online != set(FLEET)
    r = await client.get(f"/v1/orgs/{prod['org_id']}/fleet/health", headers=bearer(tok),
                         params={"device_group": "live"})
    assert r.status_code == 200, r.text
    rows = {p["slug"]: p for p in r.json()["products"]}
    assert (rows[prod["slug"]]["devices"], rows[prod["slug"]]["online"]) \
        == (len(online), len(online))
    assert "events" in rows[prod["slug"]]["unfiltered"]
    assert (rows[other["slug"]]["devices"], rows[other["slug"]]["unfiltered"]) == (0, [])
    # the product's own view agrees
    r = await client.get(f"/v1/products/{prod['id']}/fleet/health", headers=bearer(tok),
                         params={"device_group": "live"})
    assert r.json()["devices"]["total"] == len(online)
