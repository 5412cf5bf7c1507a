"""Stored event history (a corral extension): /v1/products/:p/event_log,
/v1/orgs/:org/event_log and /v1/devices/:id/event_log. Newest first, filters, paging,
tenancy, and 400 for bad parameters."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest

from corral.kit import clock
from helpers import assert_error, bearer, new_user, owner_and_product
from sessionkit import ScriptedDevice, connect, import_device
from test_claiming import claim, make_customer

DEV = "0123456789abcdef0000ab01"
DEV2 = "0123456789abcdef0000ab02"


@pytest.fixture
async def shop(client, app, manual_clock) -> dict[str, Any]:
    """ada's product with DEV and DEV2; a minute apart: DEV online, DEV temp=1, an API
    publish cfg, DEV2 online, DEV2 temp=2, DEV humidity=3."""
    ada, p = await owner_and_product(client)
    await import_device(client, ada, p["id"], DEV)
    await import_device(client, ada, p["id"], DEV2)
    start = manual_clock.now()
    one = await connect(app, DEV, ScriptedDevice())  # spark/status online
    manual_clock.advance(minutes=1)
    await one.publish("temp", "1")
    manual_clock.advance(minutes=1)
    r = await client.post(f"/v1/products/{p['id']}/events", headers=bearer(ada),
                          json={"name": "cfg", "data": "x", "ttl": 5})
    assert r.status_code == 200, r.text
    manual_clock.advance(minutes=1)
    two = await connect(app, DEV2, ScriptedDevice())
    manual_clock.advance(minutes=1)
    await two.publish("temp", "2")
    manual_clock.advance(minutes=1)
    await one.publish("humidity", "3")
    yield {"ada": ada, "p": p, "start": start, "one": one, "two": two}
    await one.close("test over")
    await two.close("test over")


def names(body: dict[str, Any]) -> list[str]:
    return [f"{e['name']}={e['data']}" for e in body["events"]]


async def log(client, token: str, path: str, **params: Any) -> dict[str, Any]:
    r = await client.get(path, headers=bearer(token), params=params)
    assert r.status_code == 200, r.text
    return r.json()


async def test_product_log_newest_first_in_particles_shape(client, shop):
    body = await log(client, shop["ada"], f"/v1/products/{shop['p']['slug']}/event_log")
    assert names(body) == ["humidity=3", "temp=2", "spark/status=online", "cfg=x", "temp=1",
                           "spark/status=online"]
    assert body["next_before_id"] is None
    cfg = body["events"][3]
    assert set(cfg) == {"id", "name", "data", "ttl", "published_at", "coreid"}
    assert (cfg["coreid"], cfg["ttl"]) == ("api", 5)
    assert cfg["published_at"] == clock.iso(shop["start"] + dt.timedelta(minutes=2))
    assert body["events"][0]["coreid"] == DEV and body["events"][1]["coreid"] == DEV2
    ids = [e["id"] for e in body["events"]]
    assert ids == sorted(ids, reverse=True)


async def test_filters_and_paging(client, shop):
    path, ada, start = f"/v1/products/{shop['p']['id']}/event_log", shop["ada"], shop["start"]
    assert names(await log(client, ada, path, name="te")) == ["temp=2", "temp=1"]
    assert names(await log(client, ada, path, name="Temp")) == []  # case-sensitive
    assert names(await log(client, ada, path, device_id=DEV2.upper())) == [
        "temp=2", "spark/status=online"]
    since = clock.iso(start + dt.timedelta(minutes=1))
    until = (start + dt.timedelta(minutes=4)).isoformat()  # an offset instead of Z
    assert names(await log(client, ada, path, since=since, until=until)) == [
        "spark/status=online", "cfg=x", "temp=1"]
    page = await log(client, ada, path, limit=4)
    assert len(page["events"]) == 4 and page["next_before_id"] == page["events"][-1]["id"]
    rest = await log(client, ada, path, limit=4, before_id=page["next_before_id"])
    assert names(page) + names(rest) == names(await log(client, ada, path))
    assert rest["next_before_id"] is None


@pytest.mark.parametrize("params", [
    {"limit": "0"}, {"limit": "1001"}, {"limit": "many"}, {"before_id": "0"},
    {"before_id": "x"}, {"since": "yesterday"}, {"until": "2026-13-01T00:00:00Z"},
    {"since": "2026-02-01T00:00:00Z", "until": "2026-01-01T00:00:00Z"},
    {"device_id": "xyz"}, {"name": "x" * 65},
])
async def test_bad_parameters_are_400(client, shop, params):
    r = await client.get(f"/v1/products/{shop['p']['id']}/event_log", headers=bearer(shop["ada"]),
                         params=params)
    assert_error(r, 400)


async def test_org_log(client, shop):
    ada, org = shop["ada"], shop["p"]["org_id"]
    r = await client.post(f"/v1/orgs/{org}/events", headers=bearer(ada), json={"name": "org"})
    assert r.status_code == 200
    body = await log(client, ada, f"/v1/orgs/{org}/event_log", limit=3)
    assert names(body) == ["org=None", "humidity=3", "temp=2"]


async def test_device_log(client, shop):
    body = await log(client, shop["ada"], f"/v1/devices/{DEV}/event_log", name="temp")
    assert names(body) == ["temp=1"]
    r = await client.get(f"/v1/devices/{DEV}/event_log", headers=bearer(shop["ada"]),
                         params={"device_id": DEV2})
    assert_error(r, 400)


async def test_other_tenants_get_404(client, shop):
    bob = await new_user(client, "bob@example.com")
    p = shop["p"]
    for path, what in ((f"/v1/products/{p['id']}/event_log", "Product not found"),
                       (f"/v1/orgs/{p['org_id']}/event_log", "Organization not found"),
                       (f"/v1/devices/{DEV}/event_log", "Device not found")):
        body = assert_error(await client.get(path, headers=bearer(bob)), 404)
        assert body["error_description"] == what


async def test_customer_sees_only_what_happened_while_the_device_was_theirs(client, app, shop,
                                                                             manual_clock):
    cust = await make_customer(client, shop["ada"], shop["p"], "cust@example.com")
    assert (await claim(client, cust, DEV)).status_code == 200
    await shop["one"].refresh()  # the session learns its new tenancy (as after a claim)
    manual_clock.advance(minutes=1)
    await shop["one"].publish("temp", "4")
    body = await log(client, cust, f"/v1/devices/{DEV}/event_log")
    assert names(body) == ["temp=4"]
    # the product team still sees the device's whole history
    body = await log(client, shop["ada"], f"/v1/devices/{DEV}/event_log", name="temp")
    assert names(body) == ["temp=4", "temp=1"]
    assert_error(await client.get(f"/v1/products/{shop['p']['id']}/event_log",
                                  headers=bearer(cust)), 403)
