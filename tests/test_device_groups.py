"""Device groups: CRUD, validation, device membership, batch add/remove."""

from __future__ import annotations

from sqlalchemy import func, select

from corral.devices.models import DeviceGroupMember
from helpers import add_role, audit_actions, bearer, new_user, owner_and_product, seed


def hexid(n: int) -> str:
    return f"{n:024x}"


async def member_count(app) -> int:
    async with app.state.sessionmaker() as db:
        return int((await db.execute(
            select(func.count()).select_from(DeviceGroupMember))).scalar_one())


async def test_group_crud(app, client):
    tok, p = await owner_and_product(client)
    base = f"/v1/products/{p['slug']}/groups"
    r = await client.post(base, headers=bearer(tok),
                          json={"name": "north-east_1", "color": "#A1B2C3",
                                "description": "the yard"})
    assert r.status_code == 201, r.text
    g = r.json()["group"]
    assert (g["name"], g["color"], g["description"]) == ("north-east_1", "#a1b2c3", "the yard")
    assert g["fw_version"] is None and g["device_count"] == 0
    r = await client.post(base, headers=bearer(tok), data={"name": "south"})
    assert r.status_code == 201 and r.json()["group"]["color"].startswith("#")
    r = await client.post(base, headers=bearer(tok), json={"name": "south"})
    assert r.status_code == 409 and r.json()["error"] == "group_exists"

    r = await client.get(base, headers=bearer(tok))
    assert r.status_code == 200
    assert [x["name"] for x in r.json()["groups"]] == ["north-east_1", "south"]
    r = await client.get(base, headers=bearer(tok), params={"name": "EAST"})
    assert [x["name"] for x in r.json()["groups"]] == ["north-east_1"]
    r = await client.get(base, headers=bearer(tok), params={"name": "%"})
    assert r.json()["groups"] == []

    r = await client.get(f"{base}/south", headers=bearer(tok))
    assert r.status_code == 200 and r.json()["group"]["name"] == "south"
    r = await client.put(f"{base}/south", headers=bearer(tok),
                         json={"name": "south-2", "color": "#000000"})
    assert r.status_code == 200, r.text
    assert (r.json()["group"]["name"], r.json()["group"]["color"]) == ("south-2", "#000000")
    assert (await client.get(f"{base}/south", headers=bearer(tok))).status_code == 404
    r = await client.put(f"{base}/south-2", headers=bearer(tok), json={"name": "north-east_1"})
    assert r.status_code == 409
    r = await client.put(f"{base}/south-2", headers=bearer(tok), json={})
    assert r.status_code == 400
    r = await client.delete(f"{base}/south-2", headers=bearer(tok))
    assert r.status_code == 204
    assert (await client.get(f"{base}/south-2", headers=bearer(tok))).status_code == 404
    actions = [e.action for e in await audit_actions(app, "group.")]
    assert actions == ["group.created", "group.created", "group.updated", "group.deleted"]


async def test_group_validation(app, client):
    tok, p = await owner_and_product(client)
    base = f"/v1/products/{p['slug']}/groups"
    for body in ({}, {"name": "Upper"}, {"name": "has space"}, {"name": "x" * 65},
                 {"name": "ok", "color": "red"}, {"name": "ok", "color": "#12345"},
                 {"name": "ok", "description": "d" * 501}, {"name": "ok", "size": 3},
                 {"name": ["a"]}):
        r = await client.post(base, headers=bearer(tok), json=body)
        assert r.status_code == 400, (body, r.text)
    r = await client.get(f"{base}/nope", headers=bearer(tok))
    assert r.status_code == 404 and r.json()["error_description"] == "Group not found"


async def test_group_permissions_and_tenancy(app, client):
    tok, p = await owner_and_product(client)
    other_tok, other = await owner_and_product(client, "bob@example.com", name="Gadget")
    r = await client.post(f"/v1/products/{p['slug']}/groups", headers=bearer(tok),
                          json={"name": "mine"})
    assert r.status_code == 201
    r = await client.get(f"/v1/products/{p['slug']}/groups/mine", headers=bearer(other_tok))
    assert r.status_code == 404 and r.json()["error_description"] == "Product not found"
    r = await client.get(f"/v1/products/{other['slug']}/groups/mine", headers=bearer(other_tok))
    assert r.status_code == 404 and r.json()["error_description"] == "Group not found"
    support = await new_user(client, "sue@example.com")
    await add_role(app, "sue@example.com", p, "Support")
    assert (await client.get(f"/v1/products/{p['slug']}/groups",
                             headers=bearer(support))).status_code == 200
    r = await client.post(f"/v1/products/{p['slug']}/groups", headers=bearer(support),
                          json={"name": "theirs"})
    assert r.status_code == 403 and r.json()["required"] == "groups:create"


async def test_device_counts_and_delete_removes_memberships(app, client):
    tok, p = await owner_and_product(client)
    await seed(app, *[{"id": hexid(i), "product_id": p["id"]} for i in range(1, 4)])
    for i, groups in ((1, ["a", "b"]), (2, ["a"]), (3, [])):
        r = await client.put(f"/v1/products/{p['slug']}/devices/{hexid(i)}", headers=bearer(tok),
                             json={"groups": groups})
        assert r.status_code == 200, r.text
    r = await client.get(f"/v1/products/{p['slug']}/groups", headers=bearer(tok))
    assert {g["name"]: g["device_count"] for g in r.json()["groups"]} == {"a": 2, "b": 1}
    r = await client.get(f"/v1/products/{p['slug']}/groups/a", headers=bearer(tok))
    assert r.json()["group"]["device_count"] == 2
    assert (await client.delete(f"/v1/products/{p['slug']}/groups/a",
                                headers=bearer(tok))).status_code == 204
    assert await member_count(app) == 1
    r = await client.get(f"/v1/products/{p['slug']}/devices/{hexid(1)}", headers=bearer(tok))
    assert r.json()["groups"] == ["b"]


async def test_batch_add_and_remove(app, client):
    tok, p = await owner_and_product(client)
    await seed(app, *[{"id": hexid(i), "product_id": p["id"]} for i in range(1, 6)])
    url = f"/v1/products/{p['slug']}/devices"
    r = await client.put(url, headers=bearer(tok), json={
        "action": "groups", "devices": [hexid(1), hexid(2).upper(), hexid(3)],
        "metadata": {"add": ["east", "west"]}})
    assert r.status_code == 200 and r.json() == {"ok": True}, r.text
    assert await member_count(app) == 6
    # adding again is harmless; removing takes them out
    r = await client.put(url, headers=bearer(tok), json={
        "action": "groups", "devices": [hexid(1), hexid(4)],
        "metadata": {"add": ["east"], "remove": ["west", "unknown"]}})
    assert r.status_code == 200, r.text
    r = await client.get(url, headers=bearer(tok), params={"sortAttr": "deviceId",
                                                           "sortDir": "asc"})
    groups = {d["id"]: d["groups"] for d in r.json()["devices"]}
    assert groups == {hexid(1): ["east"], hexid(2): ["east", "west"], hexid(3): ["east", "west"],
                      hexid(4): ["east"], hexid(5): []}
    entries = await audit_actions(app, "devices.groups_updated")
    assert len(entries) == 2 and entries[0].details["devices"] == 3


async def test_batch_refusals_write_nothing(app, client):
    tok, p = await owner_and_product(client)
    _, other = await owner_and_product(client, "bob@example.com", name="Gadget")
    await seed(app, {"id": hexid(1), "product_id": p["id"]},
               {"id": hexid(2), "product_id": other["id"]})
    url = f"/v1/products/{p['slug']}/devices"
    r = await client.put(url, headers=bearer(tok), json={
        "action": "groups", "devices": [hexid(1), hexid(2), hexid(3)],
        "metadata": {"add": ["new-group"]}})
    assert r.status_code == 400, r.text
    assert r.json()["deviceIds"] == [hexid(2), hexid(3)]
    r = await client.get(f"/v1/products/{p['slug']}/groups", headers=bearer(tok))
    assert r.json()["groups"] == []  # the group was not created either
    assert await member_count(app) == 0
    for body in ({"action": "rename", "devices": [hexid(1)]},
                 {"action": "groups", "devices": [], "metadata": {"add": ["a"]}},
                 {"action": "groups", "devices": ["nope"], "metadata": {"add": ["a"]}},
                 {"action": "groups", "devices": [hexid(1)], "metadata": {}},
                 {"action": "groups", "devices": [hexid(1)], "metadata": {"add": ["Bad"]}},
                 {"action": "groups", "devices": [hexid(1)],
                  "metadata": {"add": ["a"], "remove": ["a"]}},
                 {"action": "groups", "devices": [hexid(1)], "metadata": "nope"},
                 {"action": "groups", "devices": [hexid(i) for i in range(10_001)],
                  "metadata": {"add": ["a"]}}):
        r = await client.put(url, headers=bearer(tok), json=body)
        assert r.status_code == 400, (str(body)[:80], r.text)
    assert await member_count(app) == 0


async def test_batch_many_devices(app, client):
    tok, p = await owner_and_product(client)
    ids = [hexid(i) for i in range(1, 10_001)]
    await seed(app, *[{"id": i, "product_id": p["id"]} for i in ids])
    r = await client.put(f"/v1/products/{p['slug']}/devices", headers=bearer(tok), json={
        "action": "groups", "devices": ids, "metadata": {"add": ["fleet", "all"]}})
    assert r.status_code == 200, r.text
    assert await member_count(app) == 20_000
    r = await client.get(f"/v1/products/{p['slug']}/groups/fleet", headers=bearer(tok))
    assert r.json()["group"]["device_count"] == 10_000
    r = await client.put(f"/v1/products/{p['slug']}/devices", headers=bearer(tok), json={
        "action": "groups", "devices": ids[:5000], "metadata": {"remove": ["fleet"]}})
    assert r.status_code == 200
    assert await member_count(app) == 15_000
