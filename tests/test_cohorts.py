"""Cohorts over /v1: CRUD, validation, moving devices (each device in at most one cohort,
all-or-nothing), a cohort's release as devices see it (ahead of a higher group release),
the device list's ``cohort`` filter, roles and tenancy."""

from __future__ import annotations

from sqlalchemy import func, select

from corral.devices.cohort_models import CohortMember
from helpers import add_role, audit_actions, bearer, new_user, owner_and_product, seed
from test_firmware_api import device, group, release, upload

IDS = [f"{i:024x}" for i in range(0xC0, 0xC6)]


async def members(app) -> dict[str, int]:
    async with app.state.sessionmaker() as db:
        return {d: c for d, c in await db.execute(
            select(CohortMember.device_id, CohortMember.cohort_id))}


async def test_cohort_crud_and_validation(app, client):
    tok, p = await owner_and_product(client)
    base = f"/v1/products/{p['slug']}/cohorts"
    r = await client.post(base, headers=bearer(tok), json={"name": "early", "description": "x"})
    assert r.status_code == 201, r.text
    c = r.json()["cohort"]
    assert (c["name"], c["description"], c["firmware_version"], c["device_count"]) == (
        "early", "x", None, 0)
    assert (await client.post(base, headers=bearer(tok), data={"name": "late"})).status_code == 201
    r = await client.post(base, headers=bearer(tok), json={"name": "early"})
    assert r.status_code == 409 and r.json()["error"] == "cohort_exists"
    r = await client.get(base, headers=bearer(tok))
    assert [x["name"] for x in r.json()["cohorts"]] == ["early", "late"]
    r = await client.put(f"{base}/late", headers=bearer(tok), json={"name": "later"})
    assert r.status_code == 200 and r.json()["cohort"]["name"] == "later"
    assert (await client.get(f"{base}/late", headers=bearer(tok))).status_code == 404
    r = await client.put(f"{base}/later", headers=bearer(tok), json={"name": "early"})
    assert r.status_code == 409
    for body in ({}, {"name": "Upper"}, {"name": "x" * 65}, {"name": "ok", "size": 1},
                 {"name": "ok", "description": "d" * 501}, {"name": "ok", "firmware_version": 0},
                 {"name": "ok", "firmware_version": "v2"}, {"name": ["a"]}):
        r = await client.post(base, headers=bearer(tok), json=body)
        assert r.status_code == 400, (body, r.text)
        assert r.json()["ok"] is False
    r = await client.post(base, headers=bearer(tok), json={"name": "ok", "firmware_version": 9})
    assert r.status_code == 400 and r.json()["error"] == "firmware_not_found"
    assert (await client.put(f"{base}/later", headers=bearer(tok), json={})).status_code == 400
    r = await client.delete(f"{base}/later", headers=bearer(tok))
    assert r.status_code == 204
    assert (await client.get(f"{base}/later", headers=bearer(tok))).status_code == 404
    actions = [e.action for e in await audit_actions(app, "cohort.")]
    assert actions == ["cohort.created", "cohort.created", "cohort.updated", "cohort.deleted"]


async def test_moving_devices_is_exclusive_and_all_or_nothing(app, client):
    tok, p = await owner_and_product(client)
    _, other = await owner_and_product(client, "bob@example.com", name="Gadget")
    await seed(app, *[{"id": i, "product_id": p["id"]} for i in IDS],
               {"id": "f" * 24, "product_id": other["id"]})
    base = f"/v1/products/{p['slug']}/cohorts"
    for name in ("a", "b"):
        assert (await client.post(base, headers=bearer(tok), json={"name": name})).status_code == 201
    r = await client.put(f"{base}/a/devices", headers=bearer(tok), json={"add": IDS[:4]})
    assert r.status_code == 200, r.text
    assert r.json() == {"ok": True, "added": 4, "removed": 0, "device_count": 4}
    # into b: they leave a; out of b
    r = await client.put(f"{base}/b/devices", headers=bearer(tok),
                         json={"add": [IDS[2], IDS[3].upper(), IDS[4]]})
    assert r.json() == {"ok": True, "added": 3, "removed": 0, "device_count": 3}, r.text
    r = await client.put(f"{base}/b/devices", headers=bearer(tok),
                         json={"remove": [IDS[4], IDS[0]]})  # IDS[0] is not in b: ignored
    assert r.json()["removed"] == 1 and r.json()["device_count"] == 2
    counts = {c["name"]: c["device_count"] for c in (await client.get(
        base, headers=bearer(tok))).json()["cohorts"]}
    assert counts == {"a": 2, "b": 2}
    assert (await device(client, tok, p, IDS[2]))["cohort"] == "b"
    assert (await device(client, tok, p, IDS[5]))["cohort"] is None
    listed = await client.get(f"/v1/products/{p['slug']}/devices", headers=bearer(tok),
                              params={"cohort": "a", "sortAttr": "deviceId", "sortDir": "asc"})
    assert [d["id"] for d in listed.json()["devices"]] == IDS[:2]
    assert [d["cohort"] for d in listed.json()["devices"]] == ["a", "a"]
    before = await members(app)
    for body in ({"add": [IDS[5], "f" * 24]}, {"add": ["nope"]}, {},
                 {"add": [IDS[5]], "remove": [IDS[5]]}, {"add": "x" * 65},
                 {"add": [f"{i:024x}" for i in range(10_001)]}, {"move": [IDS[5]]}):
        r = await client.put(f"{base}/a/devices", headers=bearer(tok), json=body)
        assert r.status_code == 400, (str(body)[:60], r.text)
    assert await members(app) == before
    assert (await client.put(f"{base}/nope/devices", headers=bearer(tok),
                             json={"add": [IDS[5]]})).status_code == 404
    # deleting a cohort frees its devices
    assert (await client.delete(f"{base}/a", headers=bearer(tok))).status_code == 204
    async with app.state.sessionmaker() as db:
        assert (await db.execute(select(func.count()).select_from(CohortMember))).scalar() == 2


async def test_a_cohort_release_targets_its_devices_ahead_of_groups(app, client):
    tok, p = await owner_and_product(client)
    await seed(app, *[{"id": i, "product_id": p["id"]} for i in IDS[:3]])
    for v in (3, 5, 7):
        assert (await upload(client, tok, p, v)).status_code == 201
    await group(client, tok, p, "beta", IDS[0], IDS[1])
    assert (await release(client, tok, p, version=7, groups=["beta"])).status_code == 200
    assert (await release(client, tok, p, version=5, product_default=True)).status_code == 200
    base = f"/v1/products/{p['slug']}/cohorts"
    r = await client.post(base, headers=bearer(tok), json={"name": "slow", "firmware_version": 3})
    assert r.status_code == 201 and r.json()["cohort"]["firmware_version"] == 3, r.text
    await client.put(f"{base}/slow/devices", headers=bearer(tok), json={"add": [IDS[0], IDS[2]]})

    async def targets() -> list[int | None]:
        return [(await device(client, tok, p, i))["targeted_firmware_release_version"]
                for i in IDS[:3]]

    # IDS[0]: cohort v3 beats group v7; IDS[1]: group v7; IDS[2]: cohort v3 beats default v5
    assert await targets() == [3, 7, 3]
    r = await client.put(f"{base}/slow", headers=bearer(tok), json={"firmware_version": None})
    assert r.status_code == 200 and r.json()["cohort"]["firmware_version"] is None
    assert await targets() == [7, 7, 5]
    r = await client.put(f"{base}/slow", headers=bearer(tok), data={"firmware_version": "5"})
    assert r.status_code == 200, r.text
    assert await targets() == [5, 7, 5]


async def test_roles_and_tenancy(app, client):
    tok, p = await owner_and_product(client)
    bob, _ = await owner_and_product(client, "bob@example.com", name="Gadget")
    base = f"/v1/products/{p['slug']}/cohorts"
    assert (await client.post(base, headers=bearer(tok), json={"name": "a"})).status_code == 201
    # another tenant: not found
    assert (await client.get(base, headers=bearer(bob))).status_code == 404
    assert (await client.get(f"{base}/a", headers=bearer(bob))).status_code == 404
    # support sees cohorts, may not change them; a release needs firmware:release
    sup = await new_user(client, "sue@example.com")
    await add_role(app, "sue@example.com", p, "Support")
    assert (await client.get(base, headers=bearer(sup))).status_code == 200
    r = await client.post(base, headers=bearer(sup), json={"name": "b"})
    assert r.status_code == 403 and r.json()["required"] == "cohorts:create"


async def test_a_firmware_release_keeps_cohort_releases_in_its_preview(app, client):
    """The impact preview of a product-default release does not count a cohort's devices
    as retargeted: their cohort's release still decides."""
    tok, p = await owner_and_product(client)
    await seed(app, *[{"id": i, "product_id": p["id"], "firmware_version": 1} for i in IDS[:3]])
    for v in (3, 9):
        assert (await upload(client, tok, p, v)).status_code == 201
    base = f"/v1/products/{p['slug']}/cohorts"
    assert (await client.post(base, headers=bearer(tok),
                              json={"name": "held", "firmware_version": 3})).status_code == 201
    await client.put(f"{base}/held/devices", headers=bearer(tok), json={"add": [IDS[0]]})
    r = await client.get(f"/v1/products/{p['id']}/impact", headers=bearer(tok), params={
        "action": "edit_groups_for_firmware", "firmware_version": 9, "product_default": "true"})
    assert r.status_code == 200, r.text
    assert r.json()["devices"]["firmware_update"]["total"] == 2, r.text  # not IDS[0]
    assert (await release(client, tok, p, version=9, product_default=True)).status_code == 200
    assert [(await device(client, tok, p, i))["targeted_firmware_release_version"]
            for i in IDS[:3]] == [3, 9, 9]
