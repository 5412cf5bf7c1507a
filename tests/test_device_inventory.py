"""The product inventory: list (paging, filters, sorting), get, update, remove; own devices."""

from __future__ import annotations

import datetime as dt
from typing import Any

import pytest
from sqlalchemy import event, select

from corral.accounts.service import issue_token
from corral.auth.models import AccessToken, Customer, User
from corral.devices import service
from corral.devices.models import DeviceGroup, DeviceGroupMember
from corral.kit import clock
from corral.kit.secrets import digest, new_short_id
from helpers import (
    add_role,
    audit_actions,
    bearer,
    device_count,
    load,
    new_user,
    owner_and_product,
    post_ids,
    seed,
    user_id,
)

T0 = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)


def hexid(n: int) -> str:
    return f"{n:024x}"


async def listing(client, token: str, product: Any, **params: Any) -> dict[str, Any]:
    r = await client.get(f"/v1/products/{product}/devices", headers=bearer(token), params=params)
    assert r.status_code == 200, r.text
    return r.json()


def ids_of(body: dict[str, Any]) -> list[str]:
    return [d["id"] for d in body["devices"]]


async def fleet(app, product_id: int) -> list[dict[str, Any]]:
    """Nine devices: distinct, tied and missing last_heard; names, serials, firmware, flags."""
    rows = [
        {"id": hexid(1), "last_heard": T0 + dt.timedelta(minutes=5), "name": "alpha",
         "firmware_version": 3, "serial_number": "P0SN-0001", "online": True},
        {"id": hexid(2), "last_heard": T0 + dt.timedelta(minutes=1), "name": "bravo",
         "firmware_version": 1, "serial_number": "P0SN-0002"},
        {"id": hexid(3), "last_heard": T0 + dt.timedelta(minutes=9), "name": "charlie",
         "firmware_version": 2, "development": True},
        {"id": hexid(4), "last_heard": T0 + dt.timedelta(minutes=3), "name": "delta_1",
         "quarantined": True},
        {"id": hexid(5), "last_heard": T0 + dt.timedelta(minutes=7), "name": "echo",
         "firmware_version": 2, "online": True},
        {"id": hexid(6), "last_heard": T0, "name": "foxtrot", "firmware_version": 1},
        {"id": hexid(7), "last_heard": T0, "name": "golf"},
        {"id": "abcdef" + "0" * 18, "name": "hotel-big"},
        {"id": "abcd00" + "0" * 18},
    ]
    await seed(app, *[{"product_id": product_id, "platform_id": 12, **r} for r in rows])
    return rows


def _key(row: dict[str, Any], attr: str) -> Any:
    return row.get(attr)


def expected_order(rows: list[dict[str, Any]], attr: str, desc: bool) -> list[Any]:
    """The documented order of the sort key: missing values sort as the smallest."""
    present = sorted((r for r in rows if r.get(attr) is not None), key=lambda r: r[attr],
                     reverse=desc)
    missing = [r for r in rows if r.get(attr) is None]
    ordered = present + missing if desc else missing + present
    return [r.get(attr) for r in ordered]


async def test_list_shape_default_sort_and_meta(app, client):
    tok, p = await owner_and_product(client)
    rows = await fleet(app, p["id"])
    body = await listing(client, tok, p["slug"])
    assert body["meta"] == {"total_pages": 1, "total": 9, "page": 1, "per_page": 25}
    assert body["customers"] == []
    got = {d["id"]: d for d in body["devices"]}
    d = got[hexid(3)]
    for field in ("id", "name", "last_heard", "online", "platform_id", "groups",
                  "firmware_version", "desired_firmware_version", "development",
                  "quarantined", "denied", "owner", "serial_number", "notes", "product_id"):
        assert field in d, field
    assert d["product_id"] == p["id"] and d["development"] is True and d["groups"] == []
    # default: last connection, newest first; never-connected devices last
    heard = [x["last_heard"] for x in body["devices"]]
    want = [clock.iso(v) for v in expected_order(rows, "last_heard", True)]
    assert heard == want
    assert ids_of(body)[:3] == [hexid(3), hexid(5), hexid(1)]


async def test_paging_per_page_and_perpage_cover_every_device_once(app, client):
    tok, p = await owner_and_product(client)
    await fleet(app, p["id"])
    full = ids_of(await listing(client, tok, p["slug"], per_page=100))
    for sort in ("lastConnection", "deviceName", "firmwareVersion", "deviceId"):
        for direction in ("asc", "desc"):
            all_ids = ids_of(await listing(client, tok, p["slug"], per_page=100, sortAttr=sort,
                                           sortDir=direction))
            walked: list[str] = []
            for page in range(1, 6):
                key = "per_page" if page % 2 else "perPage"
                body = await listing(client, tok, p["slug"], page=page, sortAttr=sort,
                                     sortDir=direction, **{key: 2})
                assert body["meta"]["total_pages"] == 5 and body["meta"]["per_page"] == 2
                walked += ids_of(body)
            assert walked == all_ids, (sort, direction)
            assert sorted(walked) == sorted(full)
    body = await listing(client, tok, p["slug"], page=9, per_page=2)
    assert body["devices"] == [] and body["meta"]["total"] == 9


async def test_sorting_by_each_attribute(app, client):
    tok, p = await owner_and_product(client)
    rows = await fleet(app, p["id"])
    for attr, field in (("deviceName", "name"), ("firmwareVersion", "firmware_version"),
                        ("lastConnection", "last_heard")):
        for direction in ("asc", "desc"):
            body = await listing(client, tok, p["slug"], sortAttr=attr, sortDir=direction)
            got = [d[field] for d in body["devices"]]
            want = expected_order(rows, field, direction == "desc")
            if field == "last_heard":
                want = [clock.iso(v) for v in want]
            assert got == want, (attr, direction)
    body = await listing(client, tok, p["slug"], sortAttr="deviceId", sortDir="asc")
    assert ids_of(body) == sorted(r["id"] for r in rows)
    # a filtered listing (few matches: sorted after filtering) keeps exactly the same order,
    # ties included, as the indexed path over the whole product
    for attr in ("deviceName", "firmwareVersion", "lastConnection", "deviceId"):
        for direction in ("asc", "desc"):
            q = {"sortAttr": attr, "sortDir": direction}
            everything = ids_of(await listing(client, tok, p["slug"], **q))
            filtered = ids_of(await listing(client, tok, p["slug"], quarantined="false", **q))
            assert filtered == [i for i in everything if i != hexid(4)], q
            page2 = await listing(client, tok, p["slug"], quarantined="false", page=2,
                                  per_page=3, **q)
            assert ids_of(page2) == filtered[3:6]
    body = await listing(client, tok, p["slug"], sortAttr="deviceId", sortDir="desc")
    assert ids_of(body) == sorted((r["id"] for r in rows), reverse=True)


async def test_filters(app, client):
    tok, p = await owner_and_product(client)
    await fleet(app, p["id"])
    q = {"sortAttr": "deviceId", "sortDir": "asc"}
    assert ids_of(await listing(client, tok, p["slug"], deviceId="ABCD", **q)) == [
        "abcd00" + "0" * 18, "abcdef" + "0" * 18]
    assert ids_of(await listing(client, tok, p["slug"], deviceId="abcdef", **q)) == [
        "abcdef" + "0" * 18]
    assert ids_of(await listing(client, tok, p["slug"], deviceId=hexid(4), **q)) == [hexid(4)]
    assert ids_of(await listing(client, tok, p["slug"], deviceId="zz", **q)) == []
    assert ids_of(await listing(client, tok, p["slug"], deviceName="ELT", **q)) == [hexid(4)]
    assert ids_of(await listing(client, tok, p["slug"], deviceName="_", **q)) == [hexid(4)]
    assert ids_of(await listing(client, tok, p["slug"], deviceName="big", **q)) == [
        "abcdef" + "0" * 18]
    assert ids_of(await listing(client, tok, p["slug"], serialNumber="sn-000", **q)) == [
        hexid(1), hexid(2)]
    assert ids_of(await listing(client, tok, p["slug"], quarantined="true", **q)) == [hexid(4)]
    assert len(ids_of(await listing(client, tok, p["slug"], quarantined="false", **q))) == 8
    assert ids_of(await listing(client, tok, p["slug"], online="true", **q)) == [
        hexid(1), hexid(5)]
    assert ids_of(await listing(client, tok, p["slug"], development="1", **q)) == [hexid(3)]
    body = await listing(client, tok, p["slug"], online="true", deviceName="echo")
    assert ids_of(body) == [hexid(5)] and body["meta"]["total"] == 1


@pytest.mark.parametrize("few_matches", [20_000, 1], ids=["small groups", "large groups"])
async def test_group_filter_and_groups_in_objects(app, client, monkeypatch, few_matches):
    """Small groups are collected then sorted; large ones (more members than FEW_MATCHES)
    are probed per device along the sort index and counted on the membership: same
    answers, totals included, in every order and combined with another filter."""
    monkeypatch.setattr(service, "FEW_MATCHES", few_matches)
    tok, p = await owner_and_product(client)
    await fleet(app, p["id"])
    for did, groups in ((hexid(1), ["north"]), (hexid(2), ["north", "south"]),
                        (hexid(3), ["south"])):
        r = await client.put(f"/v1/products/{p['slug']}/devices/{did}", headers=bearer(tok),
                             json={"groups": groups})
        assert r.status_code == 200, r.text
    q = {"sortAttr": "deviceId", "sortDir": "asc"}
    body = await listing(client, tok, p["slug"], groups="north", **q)
    assert ids_of(body) == [hexid(1), hexid(2)]
    assert body["devices"][1]["groups"] == ["north", "south"]
    assert ids_of(await listing(client, tok, p["slug"], groups="north,south", **q)) == [
        hexid(1), hexid(2), hexid(3)]
    assert ids_of(await listing(client, tok, p["slug"], groups="nowhere", **q)) == []
    both = await listing(client, tok, p["slug"], groups="north,south")  # last heard, desc
    assert sorted(ids_of(both)) == [hexid(1), hexid(2), hexid(3)]
    assert both["meta"]["total"] == 3  # a device in both groups counted once
    body = await listing(client, tok, p["slug"], groups="south", sortAttr="deviceId",
                         sortDir="desc")
    assert ids_of(body) == [hexid(3), hexid(2)] and body["meta"]["total"] == 2
    body = await listing(client, tok, p["slug"], groups="north", deviceId=hexid(2))
    assert ids_of(body) == [hexid(2)] and body["meta"]["total"] == 1


async def test_bad_query_values_are_400(app, client):
    tok, p = await owner_and_product(client)
    for params in ({"page": "0"}, {"page": "x"}, {"per_page": "1001"}, {"perPage": "0"},
                   {"sortAttr": "color"}, {"sortDir": "up"}, {"quarantined": "maybe"},
                   {"online": "2"}, {"development": "yes please"}):
        r = await client.get(f"/v1/products/{p['slug']}/devices", headers=bearer(tok),
                             params=params)
        assert r.status_code == 400, (params, r.text)
        assert r.json()["ok"] is False


async def test_owners_and_customers_in_listing_without_n_plus_1(app, client):
    tok, p = await owner_and_product(client)
    await new_user(client, "dev@example.com")
    await add_role(app, "dev@example.com", p, "Developer")
    dev = await user_id(app, "dev@example.com")
    async with app.state.sessionmaker() as db:
        customer = Customer(product_id=p["id"], email="cust@example.com", password_hash=None)
        db.add(customer)
        await db.commit()
        cid = customer.id
    rows = [{"id": hexid(100 + i), "product_id": p["id"], "owner_user_id": dev if i % 3 == 0
             else None, "customer_id": cid if i % 3 == 1 else None} for i in range(60)]
    await seed(app, *rows)
    async with app.state.sessionmaker() as db:
        g = DeviceGroup(product_id=p["id"], name="all")
        db.add(g)
        await db.flush()
        db.add_all([DeviceGroupMember(device_id=r["id"], group_id=g.id) for r in rows])
        await db.commit()

    statements: list[str] = []
    engine = app.state.runtime.engine.sync_engine

    def count(*args: Any) -> None:
        statements.append(args[2])

    async def counted(per_page: int) -> tuple[dict[str, Any], int]:
        statements.clear()
        event.listen(engine, "before_cursor_execute", count)
        try:
            body = await listing(client, tok, p["slug"], per_page=per_page, sortAttr="deviceId",
                                 sortDir="asc")
        finally:
            event.remove(engine, "before_cursor_execute", count)
        return body, len(statements)

    await counted(1)  # both counted requests then find the product in the tenant cache
    small, n_small = await counted(5)
    big, n_big = await counted(60)
    assert n_small == n_big, (n_small, n_big)  # no per-device queries
    assert big["customers"] == [{"id": cid, "username": "cust@example.com"}]
    by_id = {d["id"]: d for d in big["devices"]}
    assert by_id[hexid(100)]["owner"] == "dev@example.com"
    assert by_id[hexid(101)]["owner"] == "cust@example.com"
    assert by_id[hexid(102)]["owner"] is None
    assert all(d["groups"] == ["all"] for d in big["devices"])


async def test_get_product_device_and_tenancy(app, client):
    tok, p = await owner_and_product(client)
    await fleet(app, p["id"])
    r = await client.get(f"/v1/products/{p['slug']}/devices/{hexid(1).upper()}",
                         headers=bearer(tok))
    assert r.status_code == 200, r.text
    assert r.json()["id"] == hexid(1) and r.json()["groups"] == []
    other_tok, other = await owner_and_product(client, "bob@example.com", name="Gadget")
    # a device of another product is not found through this product
    r = await client.get(f"/v1/products/{other['slug']}/devices/{hexid(1)}",
                         headers=bearer(other_tok))
    assert r.status_code == 404
    r = await client.get(f"/v1/products/{p['slug']}/devices/{hexid(1)}",
                         headers=bearer(other_tok))
    assert r.status_code == 404 and r.json()["error_description"] == "Product not found"
    r = await client.get(f"/v1/products/{p['slug']}/devices/not-an-id", headers=bearer(tok))
    assert r.status_code == 404


async def test_update_product_device_fields(app, client):
    tok, p = await owner_and_product(client)
    await fleet(app, p["id"])
    url = f"/v1/products/{p['slug']}/devices/{hexid(2)}"
    r = await client.put(url, headers=bearer(tok), json={"name": "new_name-1"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"id", "name", "updated_at"} and body["name"] == "new_name-1"
    r = await client.put(url, headers=bearer(tok), data={"notes": "in the barn"})
    assert r.status_code == 200 and r.json()["notes"] == "in the barn"
    r = await client.put(url, headers=bearer(tok), json={"notes": None})
    assert r.status_code == 200 and r.json()["notes"] is None
    r = await client.put(url, headers=bearer(tok), json={
        "development": True, "firmware_updates_forced": True, "groups": ["b", "a"]})
    assert r.status_code == 200, r.text
    assert r.json()["groups"] == ["a", "b"] and r.json()["development"] is True
    d = await load(app, hexid(2))
    assert d.name == "new_name-1" and d.notes is None and d.development
    assert d.firmware_updates_forced
    # groups are absolute
    r = await client.put(url, headers=bearer(tok), json={"groups": ["b"]})
    assert r.json()["groups"] == ["b"]
    got = await client.get(url, headers=bearer(tok))
    assert got.json()["groups"] == ["b"]
    assert len(await audit_actions(app, "device.updated")) == 5


async def test_update_product_device_refusals(app, client):
    tok, p = await owner_and_product(client)
    await fleet(app, p["id"])
    url = f"/v1/products/{p['slug']}/devices/{hexid(2)}"
    for body, code in (({"name": "has space"}, "invalid_request"),
                       ({"name": ""}, "invalid_request"),
                       ({"name": "x" * 65}, "invalid_request"),
                       ({"name": hexid(9)}, "invalid_request"),
                       ({"notes": "n" * 1001}, "invalid_request"),
                       ({"development": "sometimes"}, "invalid_request"),
                       ({"groups": ["Upper"]}, "invalid_request"),
                       ({"quarantined": True}, "invalid_request"),
                       ({"signal": "1"}, "invalid_request"),
                       ({}, "invalid_request"),
                       # firmware locks (issue 6): a version that is not a number, and
                       # flash with no version to flash (the rest: tests/test_firmware_api.py)
                       ({"desired_firmware_version": "three"}, "invalid_request"),
                       ({"flash": True}, "invalid_request")):
        r = await client.put(url, headers=bearer(tok), json=body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["error"] == code, (body, r.json())
    # nothing was half-applied by a request that also had a bad field
    r = await client.put(url, headers=bearer(tok), json={"name": "ok", "development": "?"})
    assert r.status_code == 400
    assert (await load(app, hexid(2))).name == "bravo"


async def test_development_needs_release_permission(app, client):
    tok, p = await owner_and_product(client)
    await fleet(app, p["id"])
    support = await new_user(client, "sue@example.com")
    await add_role(app, "sue@example.com", p, "Support")
    url = f"/v1/products/{p['slug']}/devices/{hexid(2)}"
    r = await client.put(url, headers=bearer(support), json={"name": "renamed"})
    assert r.status_code == 200, r.text
    r = await client.put(url, headers=bearer(support), json={"development": True})
    assert r.status_code == 403 and r.json()["required"] == "firmware:release"
    dev = await new_user(client, "dev@example.com")
    await add_role(app, "dev@example.com", p, "Developer")
    r = await client.put(url, headers=bearer(dev), json={"development": True})
    assert r.status_code == 200 and r.json()["development"] is True
    # Support may not remove devices
    r = await client.request("DELETE", url, headers=bearer(support))
    assert r.status_code == 403


async def test_remove_product_devices(app, client):
    tok, p = await owner_and_product(client)
    await fleet(app, p["id"])
    await new_user(client, "dev@example.com")
    await add_role(app, "dev@example.com", p, "Developer")
    dev = await user_id(app, "dev@example.com")
    await seed(app, {"id": hexid(50), "product_id": p["id"], "owner_user_id": dev,
                     "development": True, "name": "mine"})
    r = await client.put(f"/v1/products/{p['slug']}/devices/{hexid(50)}", headers=bearer(tok),
                         json={"groups": ["g"]})
    assert r.status_code == 200
    # unowned: forgotten
    r = await client.request("DELETE", f"/v1/products/{p['slug']}/devices/{hexid(1)}",
                             headers=bearer(tok), json={})
    assert r.status_code == 204 and r.content == b""
    assert await load(app, hexid(1)) is None
    # owned: stays its owner's developer device, out of the product and its groups
    r = await client.request("DELETE", f"/v1/products/{p['slug']}/devices/{hexid(50)}",
                             headers=bearer(tok))
    assert r.status_code == 204
    d = await load(app, hexid(50))
    assert d.product_id is None and d.owner_user_id == dev and not d.development
    async with app.state.sessionmaker() as db:
        assert (await db.execute(select(DeviceGroupMember))).first() is None
    # deny (form encoding): stays, denied
    r = await client.request("DELETE", f"/v1/products/{p['slug']}/devices/{hexid(4)}",
                             headers=bearer(tok), data={"deny": "true"})
    assert r.status_code == 204
    d = await load(app, hexid(4))
    assert d.product_id == p["id"] and d.denied and not d.quarantined
    r = await client.request("DELETE", f"/v1/products/{p['slug']}/devices/{hexid(1)}",
                             headers=bearer(tok))
    assert r.status_code == 404
    actions = [e.action for e in await audit_actions(app, "device.")]
    assert actions.count("device.removed") == 2 and actions.count("device.denied") == 1


async def test_product_delete_refused_while_devices_remain(app, client):
    tok, p = await owner_and_product(client)
    assert (await post_ids(client, tok, p["slug"], id=hexid(1))).status_code == 200
    r = await client.delete(f"/v1/products/{p['slug']}", headers=bearer(tok))
    assert r.status_code == 409 and r.json()["error"] == "product_not_empty"
    assert "1 device" in r.json()["error_description"]
    r = await client.request("DELETE", f"/v1/products/{p['slug']}/devices/{hexid(1)}",
                             headers=bearer(tok))
    assert r.status_code == 204
    assert (await client.delete(f"/v1/products/{p['slug']}", headers=bearer(tok))
            ).status_code == 204
    assert await device_count(app) == 0


# --- a user's own devices (sandbox routes) -----------------------------------------------------

async def test_my_devices_sorted_by_handshake(app, client):
    tok = await new_user(client, "ada@example.com")
    other = await new_user(client, "bob@example.com")
    ada = await user_id(app, "ada@example.com")
    bob = await user_id(app, "bob@example.com")
    await seed(app,
               {"id": hexid(1), "owner_user_id": ada, "platform_id": 6,
                "last_handshake_at": T0},
               {"id": hexid(2), "owner_user_id": ada, "platform_id": 6},
               {"id": hexid(3), "owner_user_id": ada, "platform_id": 6,
                "last_handshake_at": T0 + dt.timedelta(hours=1)},
               {"id": hexid(4), "owner_user_id": bob, "platform_id": 6})
    r = await client.get("/v1/devices", headers=bearer(tok))
    assert r.status_code == 200, r.text
    body = r.json()
    assert isinstance(body, list) and [d["id"] for d in body] == [hexid(3), hexid(1), hexid(2)]
    assert body[0]["product_id"] == 6 and body[0]["owner"] == "ada@example.com"
    assert "groups" not in body[0]
    r = await client.get("/v1/devices", headers=bearer(other))
    assert [d["id"] for d in r.json()] == [hexid(4)]


async def test_my_devices_for_api_users_and_customers(app, client):
    tok, p = await owner_and_product(client)
    r = await client.post(f"/v1/products/{p['slug']}/team", headers=bearer(tok),
                          json={"friendly_name": "bot", "scopes": ["devices:list"]})
    assert r.status_code == 200, r.text
    api_token = r.json()["tokens"][0]["token"] if "tokens" in r.json() else None
    if api_token is None:
        async with app.state.sessionmaker() as db:
            bot = (await db.execute(select(User).where(User.kind == "api"))).scalar_one()
            api_token = issue_token(db, app.state.settings, user_id=bot.id, client="t",
                                    expires_at=None).access_token
            await db.commit()
    r = await client.get("/v1/devices", headers=bearer(api_token))
    assert r.status_code == 403 and r.json()["error"] == "unauthorized"
    # a customer sees the devices claimed to them
    async with app.state.sessionmaker() as db:
        customer = Customer(product_id=p["id"], email="cust@example.com", password_hash=None)
        db.add(customer)
        await db.flush()
        cust_token = new_short_id(20)
        db.add(AccessToken(public_id=new_short_id(8), token_hash=digest(cust_token),
                           client="t", customer_id=customer.id, created_at=clock.now()))
        await db.commit()
        cid = customer.id
    await seed(app, {"id": hexid(1), "product_id": p["id"], "customer_id": cid},
               {"id": hexid(2), "product_id": p["id"]})
    r = await client.get("/v1/devices", headers=bearer(cust_token))
    assert r.status_code == 200 and [d["id"] for d in r.json()] == [hexid(1)]
    r = await client.get(f"/v1/devices/{hexid(1)}", headers=bearer(cust_token))
    assert r.status_code == 200 and r.json()["owner"] == "cust@example.com"
    # another device of the product: refused (access.py answers 403 for customers)
    r = await client.get(f"/v1/devices/{hexid(2)}", headers=bearer(cust_token))
    assert r.status_code in (403, 404) and "owner" not in r.json()


async def test_get_and_rename_own_device(app, client):
    tok = await new_user(client, "ada@example.com")
    other = await new_user(client, "bob@example.com")
    ada = await user_id(app, "ada@example.com")
    await seed(app, {"id": hexid(1), "owner_user_id": ada, "name": "kitchen"},
               {"id": hexid(2), "owner_user_id": ada, "name": "garage"})
    r = await client.get("/v1/devices/kitchen", headers=bearer(tok))
    assert r.status_code == 200 and r.json()["id"] == hexid(1)
    assert "groups" not in r.json()
    r = await client.get(f"/v1/devices/{hexid(1).upper()}", headers=bearer(tok))
    assert r.status_code == 200 and r.json()["name"] == "kitchen"
    assert (await client.get(f"/v1/devices/{hexid(1)}", headers=bearer(other))).status_code == 404
    r = await client.put(f"/v1/devices/{hexid(1)}", headers=bearer(tok), data={"name": "pantry"})
    assert r.status_code == 200, r.text
    assert r.json()["name"] == "pantry" and r.json()["updated_at"].endswith("Z")
    r = await client.put("/v1/devices/pantry", headers=bearer(tok), json={"name": "garage"})
    assert r.status_code == 400 and r.json()["error"] == "name_taken"
    r = await client.put("/v1/devices/pantry", headers=bearer(tok),
                         json={"notes": "hi", "firmware_updates_forced": True})
    assert r.status_code == 200 and r.json()["firmware_updates_forced"] is True
    r = await client.put("/v1/devices/pantry", headers=bearer(tok), json={"development": True})
    assert r.status_code == 400  # a product field, not on the sandbox route
    r = await client.put(f"/v1/devices/{hexid(1)}", headers=bearer(other), json={"name": "x"})
    assert r.status_code == 404


async def test_product_device_through_sandbox_route(app, client):
    tok, p = await owner_and_product(client)
    await fleet(app, p["id"])
    r = await client.put(f"/v1/products/{p['slug']}/devices/{hexid(1)}", headers=bearer(tok),
                         json={"groups": ["west"]})
    assert r.status_code == 200
    r = await client.get(f"/v1/devices/{hexid(1)}", headers=bearer(tok))
    assert r.status_code == 200 and r.json()["groups"] == ["west"]
    assert r.json()["firmware_version"] == 3
    viewer = await new_user(client, "vic@example.com")
    await add_role(app, "vic@example.com", p, "View-only")
    assert (await client.get(f"/v1/devices/{hexid(1)}", headers=bearer(viewer))
            ).status_code == 200
    r = await client.put(f"/v1/devices/{hexid(1)}", headers=bearer(viewer), json={"name": "v"})
    assert r.status_code == 403
