"""Ledgers over /v1 (Particle's Ledger API): definitions, instances (set, merge, delete),
limits, JSON Schema violations (422), versions and rollback, the effective document of a
device (owner < product < device, deep merge), roles and tenancy."""

from __future__ import annotations

from typing import Any

import httpx
from sqlalchemy import func, select

from corral.audit.models import AuditEntry
from corral.devices.models import Device
from corral.ledgers import service
from corral.ledgers.models import LedgerDefinition, LedgerVersion
from helpers import (
    add_device,
    add_role,
    assert_error,
    audit_actions,
    bearer,
    make_org,
    new_user,
    owner_and_product,
)

DEV = "0123456789abcdef0123a001"
DEV2 = "0123456789abcdef0123a002"
OTHER_DEV = "0123456789abcdef0123b001"


async def create(client: httpx.AsyncClient, tok: str, base: str = "/v1/ledgers",
                 **ledger: Any) -> httpx.Response:
    return await client.post(base, headers=bearer(tok), json={"ledger": ledger})


async def put(client: httpx.AsyncClient, tok: str, path: str, data: Any,
              mode: str | None = None) -> httpx.Response:
    params = {"set_mode": mode} if mode else {}
    return await client.put(path, headers=bearer(tok), params=params,
                            json={"instance": {"data": data}})


async def test_definitions_crud_and_validation(app, client):
    tok = await new_user(client, "ada@example.com")
    r = await create(client, tok, name="config", description="settings", scope="Product",
                     direction="CloudToDevice")
    assert r.status_code == 201, r.text
    d = r.json()["ledger"]
    assert (d["name"], d["description"], d["scope"], d["direction"], d["schema"],
            d["archived"]) == ("config", "settings", "Product", "CloudToDevice", None, False)
    # particle-api-js 12 spells directions Upstream / Downstream; flat bodies work too
    r = await client.post("/v1/ledgers", headers=bearer(tok),
                          json={"name": "sensors", "scope": "device", "direction": "Upstream"})
    assert r.status_code == 201 and r.json()["ledger"]["direction"] == "DeviceToCloud", r.text
    assert_error(await create(client, tok, name="config", scope="Owner"), 409, "ledger_exists")
    for bad in ({"name": "Upper", "scope": "Owner"}, {"name": "x" * 33, "scope": "Owner"},
                {"name": "a_b", "scope": "Owner"}, {"name": "ok"},
                {"name": "ok", "scope": "Galaxy"}, {"name": "ok", "scope": "Owner",
                                                   "direction": "Sideways"},
                {"name": "ok", "scope": "Owner", "colour": "red"},
                {"name": "ok", "scope": "Owner", "schema": "not an object"},
                {"name": "ok", "scope": "Owner", "schema": {"type": "nonsense"}},
                {"name": "ok", "scope": "Owner", "schema": {"minimum": "ten"}}):
        r = await create(client, tok, **bad)
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["ok"] is False
    r = await client.post("/v1/ledgers", content=b"{not json",
                          headers={**bearer(tok), "Content-Type": "application/json"})
    assert_error(r, 400, "invalid_json")

    r = await client.get("/v1/ledgers", headers=bearer(tok))
    assert [x["name"] for x in r.json()["ledger_definitions"]] == ["config", "sensors"]
    assert r.json()["meta"]["total"] == 2
    r = await client.get("/v1/ledgers", headers=bearer(tok), params={"scope": "Device"})
    assert [x["name"] for x in r.json()["ledger_definitions"]] == ["sensors"]
    r = await client.get("/v1/ledgers", headers=bearer(tok), params={"perPage": 1, "page": 2})
    assert [x["name"] for x in r.json()["ledger_definitions"]] == ["sensors"]

    r = await client.put("/v1/ledgers/config", headers=bearer(tok),
                         json={"ledger": {"description": "new", "schema": {"type": "object"}}})
    assert r.status_code == 200, r.text
    assert r.json()["ledger"]["description"] == "new"
    assert r.json()["ledger"]["schema"] == {"type": "object"}
    r = await client.put("/v1/ledgers/config", headers=bearer(tok), json={"scope": "Owner"})
    assert_error(r, 400, "invalid_request")  # scope cannot change
    assert_error(await client.put("/v1/ledgers/config", headers=bearer(tok), json={}), 400)
    assert_error(await client.get("/v1/ledgers/nope", headers=bearer(tok)), 404,
                 "ledger_not_found")

    r = await client.delete("/v1/ledgers/sensors", headers=bearer(tok))
    assert r.status_code == 200 and r.json() == {"ok": True}
    r = await client.get("/v1/ledgers", headers=bearer(tok), params={"archived": "true"})
    assert [(x["name"], x["archived"]) for x in r.json()["ledger_definitions"]] == [
        ("sensors", True)]
    r = await client.get("/v1/ledgers", headers=bearer(tok), params={"archived": "false"})
    assert [x["name"] for x in r.json()["ledger_definitions"]] == ["config"]
    actions = [e.action for e in await audit_actions(app, "ledger.")]
    assert actions == ["ledger.created", "ledger.created", "ledger.updated", "ledger.archived"]


async def test_instances_set_merge_delete_versions_rollback(app, client):
    tok, p = await owner_and_product(client)
    await add_device(app, DEV, p["id"], name="kitchen")
    await create(client, tok, name="config", scope="Device", direction="CloudToDevice")
    path = f"/v1/ledgers/config/instances/{DEV}"
    assert_error(await client.get(path, headers=bearer(tok)), 404, "ledger_instance_not_found")

    r = await put(client, tok, path, {"a": 1, "net": {"ssid": "x", "retries": 3}})
    assert r.status_code == 200, r.text
    inst = r.json()["instance"]
    assert inst["scope"] == {"type": "Device", "value": DEV, "name": "kitchen"}
    assert inst["version"] == 1 and inst["updated_by"] == "ada@example.com"
    assert inst["size_bytes"] == len(b'{"a":1,"net":{"ssid":"x","retries":3}}')
    # Merge: objects merge key by key at any depth; everything else replaces
    r = await put(client, tok, path, {"net": {"ssid": "y"}, "b": [1]}, mode="Merge")
    assert r.json()["instance"]["data"] == {"a": 1, "net": {"ssid": "y", "retries": 3},
                                            "b": [1]}
    r = await put(client, tok, path, {"only": True})  # Replace (the default)
    assert r.json()["instance"]["data"] == {"only": True}
    assert r.json()["instance"]["version"] == 3
    r = await client.get(path, headers=bearer(tok))
    assert r.json()["instance"]["data"] == {"only": True}

    r = await client.get(f"{path}/versions", headers=bearer(tok))
    vs = r.json()["versions"]
    assert [(v["version"], v["op"]) for v in vs] == [(3, "set"), (2, "merge"), (1, "set")]
    assert vs[0]["replaced_at"] is None and vs[1]["replaced_at"] == vs[0]["created_at"]
    assert r.json()["meta"] == {"has_more": False}
    r = await client.get(f"{path}/versions", headers=bearer(tok), params={"limit": 1})
    assert [v["version"] for v in r.json()["versions"]] == [3]
    assert r.json()["meta"] == {"has_more": True}
    r = await client.get(f"{path}/versions/1", headers=bearer(tok))
    assert r.json()["instance"]["data"] == {"a": 1, "net": {"ssid": "x", "retries": 3}}
    assert_error(await client.get(f"{path}/versions/9", headers=bearer(tok)), 404,
                 "ledger_version_not_found")
    assert_error(await client.get(f"{path}/versions/x", headers=bearer(tok)), 400)

    r = await client.post(f"{path}/rollback", headers=bearer(tok), json={"version": 1})
    assert r.status_code == 200, r.text
    assert r.json()["instance"]["version"] == 4
    assert r.json()["instance"]["data"] == {"a": 1, "net": {"ssid": "x", "retries": 3}}
    assert_error(await client.post(f"{path}/rollback", headers=bearer(tok),
                                   json={"version": 99}), 404, "ledger_version_not_found")
    assert_error(await client.post(f"{path}/rollback", headers=bearer(tok), json={}), 400)

    r = await client.delete(path, headers=bearer(tok))
    assert r.json() == {"ok": True, "version": 5}
    assert_error(await client.get(path, headers=bearer(tok)), 404, "ledger_instance_not_found")
    assert_error(await client.delete(path, headers=bearer(tok)), 404)
    r = await client.get("/v1/ledgers/config/instances", headers=bearer(tok))
    assert r.json()["instances"] == [] and r.json()["meta"]["total"] == 0
    # deleted documents keep their history; a later write continues the numbering
    r = await put(client, tok, path, {"again": 1})
    assert r.json()["instance"]["version"] == 6
    r = await client.get(f"{path}/versions", headers=bearer(tok))
    assert [(v["version"], v["op"], v["restored_from"]) for v in r.json()["versions"]] == [
        (6, "set", None), (5, "delete", None), (4, "rollback", 1), (3, "set", None),
        (2, "merge", None), (1, "set", None)]
    assert r.json()["versions"][1]["data"] is None

    # every write is one version row and one audit entry
    async with app.state.sessionmaker() as db:
        n_versions = (await db.execute(select(func.count()).select_from(LedgerVersion))).scalar()
        n_audit = (await db.execute(select(func.count()).select_from(AuditEntry).where(
            AuditEntry.action.startswith("ledger.instance.")))).scalar()
    assert n_versions == n_audit == 6

    r = await client.get("/v1/ledgers/config/instances", headers=bearer(tok))
    assert [i["scope"]["value"] for i in r.json()["instances"]] == [DEV]
    assert r.json()["meta"]["total"] == 1


async def test_limits_bad_input_and_archived(app, client):
    tok, p = await owner_and_product(client)
    await add_device(app, DEV, p["id"])
    await create(client, tok, name="synced", scope="Device", direction="CloudToDevice")
    await create(client, tok, name="cloud", scope="Device", direction="CloudOnly")
    synced, cloud = (f"/v1/ledgers/{n}/instances/{DEV}" for n in ("synced", "cloud"))
    just = {"v": "x" * (16 * 1024 - 8)}  # {"v":"..."} is exactly 16 KB
    assert service.size_of(just) == 16 * 1024
    assert (await put(client, tok, synced, just)).status_code == 200
    r = await put(client, tok, synced, {"v": "x" * (16 * 1024 - 7)})
    body = assert_error(r, 413, "ledger_too_large")
    assert body["limit_bytes"] == 16 * 1024
    r = await put(client, tok, cloud, {"v": "x" * 500_000})
    assert r.status_code == 200, r.text
    r = await put(client, tok, cloud, {"v": "x" * (1024 * 1024)})
    assert_error(r, 413, "ledger_too_large")
    # a merge that grows past the limit is refused too, and changes nothing
    r = await put(client, tok, synced, {"w": "y" * 100}, mode="Merge")
    assert_error(r, 413, "ledger_too_large")
    assert (await client.get(synced, headers=bearer(tok))).json()["instance"]["version"] == 1
    # the cloud-only ledger cannot start syncing while it holds a document over 16 KB
    r = await client.put("/v1/ledgers/cloud", headers=bearer(tok),
                         json={"direction": "CloudToDevice"})
    assert_error(r, 409, "ledger_too_large")

    for bad in ({"instance": {"data": [1, 2]}}, {"instance": {"data": "text"}},
                {"instance": {}}, {"instance": "nope"}, {}):
        r = await client.put(synced, headers=bearer(tok), json=bad)
        assert r.status_code == 400, (bad, r.text)
    r = await client.put(synced, headers={**bearer(tok), "Content-Type": "application/json"},
                         content=b'{"instance": {"data": {"a": }}')
    assert_error(r, 400, "invalid_json")
    assert_error(await put(client, tok, synced, {"a": 1}, mode="Sometimes"), 400)
    assert_error(await put(client, tok, "/v1/ledgers/nope/instances/x", {"a": 1}), 404,
                 "ledger_not_found")
    # scope values: wrong shape, unknown device, a level the ledger does not have
    assert_error(await put(client, tok, "/v1/ledgers/synced/instances/zz", {"a": 1}), 404,
                 "scope_value_not_found")
    assert_error(await put(client, tok, f"/v1/ledgers/synced/instances/{OTHER_DEV}", {"a": 1}),
                 404, "scope_value_not_found")
    assert_error(await put(client, tok, "/v1/ledgers/synced/instances/galaxy:1", {"a": 1}),
                 400, "invalid_scope_value")
    await create(client, tok, name="prod", scope="Product")
    assert_error(await put(client, tok, f"/v1/ledgers/prod/instances/device:{DEV}", {"a": 1}),
                 400, "invalid_scope_value")

    assert (await client.delete("/v1/ledgers/synced", headers=bearer(tok))).status_code == 200
    assert_error(await put(client, tok, synced, {"a": 1}), 409, "ledger_archived")
    assert (await client.get(synced, headers=bearer(tok))).status_code == 200  # still readable


async def test_schema_violations_answer_422(app, client):
    tok, p = await owner_and_product(client)
    schema = {"type": "object", "required": ["interval"],
              "properties": {"interval": {"type": "integer", "minimum": 1},
                             "mode": {"enum": ["fast", "slow"]}},
              "additionalProperties": False}
    r = await create(client, tok, name="cfg", scope="Product", direction="CloudToDevice",
                     schema=schema)
    assert r.status_code == 201 and r.json()["ledger"]["schema"] == schema
    path = f"/v1/ledgers/cfg/instances/{p['slug']}"
    r = await put(client, tok, path, {"interval": 0, "mode": "medium", "extra": 1})
    assert r.status_code == 422, r.text
    body = r.json()
    assert body["message"] == "Invalid Schema" and body["description"]
    assert body["error"] == "invalid_schema" and body["ok"] is False
    assert sorted((v["path"], v["keyword"]) for v in body["violations"]) == [
        ("/", "additionalProperties"), ("/interval", "minimum"), ("/mode", "enum")]
    r = await put(client, tok, path, {"interval": 5, "mode": "fast"})
    assert r.status_code == 200, r.text
    assert r.json()["instance"]["scope"]["value"] == str(p["id"])  # slug resolves to the id
    # a merge is judged on the merged document
    r = await put(client, tok, path, {"interval": "often"}, mode="Merge")
    assert r.status_code == 422
    assert [v["path"] for v in r.json()["violations"]] == ["/interval"]
    # a later, stricter schema also guards rollback
    await put(client, tok, path, {"interval": 7})
    await client.put("/v1/ledgers/cfg", headers=bearer(tok),
                     json={"schema": {**schema, "required": ["interval", "mode"]}})
    r = await client.post(f"{path}/rollback", headers=bearer(tok), json={"version": 2})
    assert r.status_code == 422 and r.json()["violations"][0]["keyword"] == "required"
    r = await client.post(f"{path}/rollback", headers=bearer(tok), json={"version": 1})
    assert r.status_code == 200 and r.json()["instance"]["version"] == 3


async def test_effective_document_owner_product_device(app, client):
    tok, p = await owner_and_product(client)
    _, p2 = await owner_and_product(client, "ada2@example.com", name="Other")
    await add_device(app, DEV, p["id"])
    await add_device(app, DEV2, p["id"])
    await create(client, tok, name="cfg", scope="Device", direction="CloudToDevice")
    base = "/v1/ledgers/cfg/instances"
    r = await put(client, tok, f"{base}/owner", {"rate": 1, "net": {"ssid": "home", "tries": 3},
                                                 "tags": ["a"]})
    assert r.status_code == 200, r.text
    assert r.json()["instance"]["scope"]["type"] == "Owner"
    assert r.json()["instance"]["scope"]["value"] == f"owner:{p['org_id']}"
    r = await put(client, tok, f"{base}/product:{p['slug']}", {"net": {"ssid": "shop"},
                                                               "tags": ["b"]})
    assert r.status_code == 200, r.text
    assert r.json()["instance"]["scope"]["value"] == f"product:{p['id']}"
    await put(client, tok, f"{base}/{DEV}", {"net": {"tries": 9}, "rate": None})
    # another user's product is not in this sandbox
    assert_error(await put(client, tok, f"{base}/product:{p2['id']}", {"x": 1}), 404,
                 "scope_value_not_found")

    async with app.state.sessionmaker() as db:
        ledger = (await db.execute(select(LedgerDefinition))).scalar_one()
        dev, dev2 = await db.get(Device, DEV), await db.get(Device, DEV2)
        assert dev is not None and dev2 is not None
        data, versions = await service.effective_for_device(db, dev, ledger)
        # device over product over owner; objects merge deeply, lists and null replace
        assert data == {"rate": None, "net": {"ssid": "shop", "tries": 9}, "tags": ["b"]}
        assert versions == (1, 1, 1)
        data2, versions2 = await service.effective_for_device(db, dev2, ledger)
        assert data2 == {"rate": 1, "net": {"ssid": "shop", "tries": 3}, "tags": ["b"]}
        assert versions2 == (1, 1, 0)
        assert [d.name for d in await service.definitions_for_device(db, dev)] == ["cfg"]
        assert await service.definitions_for_device(db, dev, "CloudOnly") == []
    # deleting the product default changes the device's version tuple and its document
    await client.delete(f"{base}/product:{p['id']}", headers=bearer(tok))
    async with app.state.sessionmaker() as db:
        dev = await db.get(Device, DEV)
        assert dev is not None
        data, versions = await service.effective_for_device(db, dev, ledger)
        assert data == {"rate": None, "net": {"ssid": "home", "tries": 9}, "tags": ["a"]}
        assert versions == (1, 2, 1)


def test_deep_merge_rule():
    base = {"a": {"b": {"c": 1, "d": 2}, "l": [1, 2]}, "s": "x", "o": {"k": 1}}
    top = {"a": {"b": {"c": 3}, "l": [3]}, "s": {"now": "object"}, "o": None}
    assert service.deep_merge(base, top) == {
        "a": {"b": {"c": 3, "d": 2}, "l": [3]}, "s": {"now": "object"}, "o": None}
    assert base["a"]["b"] == {"c": 1, "d": 2}  # inputs untouched


async def test_org_routes_roles_and_tenancy(app, client):
    owner = await new_user(client, "owner@example.com")
    org = await make_org(client, owner)
    r = await client.post(f"/v1/orgs/{org['slug']}/products", headers=bearer(owner),
                          json={"name": "Fleet"})
    assert r.status_code in (200, 201), r.text
    product = r.json()["product"]
    await add_device(app, DEV, product["id"])
    base = f"/v1/orgs/{org['slug']}/ledgers"
    r = await create(client, owner, base, name="cfg", scope="Device",
                     direction="CloudToDevice")
    assert r.status_code == 201, r.text
    assert (await put(client, owner, f"{base}/cfg/instances/{DEV}", {"a": 1})).status_code == 200
    # the org's ledger is not in the owner's sandbox, and the names are per owner
    assert_error(await client.get("/v1/ledgers/cfg", headers=bearer(owner)), 404)
    assert (await create(client, owner, name="cfg", scope="Owner")).status_code == 201

    for role in ("View-only", "Support", "Developer"):
        name = f"{role.lower()}@example.com"
        tok = await new_user(client, name)
        await add_role(app, name, product, role, org=True)
        r = await client.get(f"{base}/cfg/instances/{DEV}", headers=bearer(tok))
        assert r.status_code == 200, (role, r.text)
        r = await put(client, tok, f"{base}/cfg/instances/{DEV}", {"by": role})
        assert r.status_code == (200 if role == "Developer" else 403), (role, r.text)
        r = await create(client, tok, base, name=f"x-{role.lower()}", scope="Owner")
        assert r.status_code == (201 if role == "Developer" else 403), (role, r.text)

    # another tenant: the org, its ledgers and its devices do not exist for them
    bob = await new_user(client, "bob@example.com")
    assert_error(await client.get(f"{base}/cfg", headers=bearer(bob)), 404)
    assert_error(await client.get(f"{base}/cfg/instances/{DEV}", headers=bearer(bob)), 404)
    await add_device(app, OTHER_DEV, None, owner_user_id=None)
    await create(client, bob, name="mine", scope="Device")
    assert_error(await put(client, bob, f"/v1/ledgers/mine/instances/{DEV}", {"a": 1}), 404,
                 "scope_value_not_found")
    assert_error(await put(client, bob, f"/v1/ledgers/mine/instances/{OTHER_DEV}", {"a": 1}),
                 404, "scope_value_not_found")


async def test_sandbox_device_without_product(app, client):
    from helpers import user_id

    tok = await new_user(client, "ada@example.com")
    await add_device(app, DEV, None, owner_user_id=await user_id(app, "ada@example.com"))
    await create(client, tok, name="notes", scope="Device")
    r = await put(client, tok, f"/v1/ledgers/notes/instances/{DEV.upper()}", {"n": 1})
    assert r.status_code == 200, r.text
    assert r.json()["instance"]["scope"]["value"] == DEV


async def test_product_routes_reach_only_the_products_documents(app, client):
    from test_api_users import make_api_user

    tok, p = await owner_and_product(client)
    r = await client.post("/v1/user/products", headers=bearer(tok),
                          json={"product": {"name": "Sibling"}})
    sibling = r.json()["product"]
    await add_device(app, DEV, p["id"])
    await add_device(app, DEV2, sibling["id"])
    await create(client, tok, name="cfg", scope="Device", direction="CloudToDevice")
    for value in ("owner", f"product:{p['id']}", DEV, f"product:{sibling['id']}", DEV2):
        assert (await put(client, tok, f"/v1/ledgers/cfg/instances/{value}",
                          {"v": value})).status_code == 200
    bot = (await make_api_user(client, tok, p["id"], [
        "ledgers:list", "ledgers:get", "ledgers.instances:get", "ledgers.instances:set"]
    ))["tokens"][0]["token"]
    base = f"/v1/products/{p['slug']}/ledgers"
    r = await client.get(base, headers=bearer(bot))
    assert [d["name"] for d in r.json()["ledger_definitions"]] == ["cfg"], r.text
    r = await client.get(f"{base}/cfg/instances", headers=bearer(bot))
    assert sorted(i["scope"]["value"] for i in r.json()["instances"]) == sorted(
        [f"product:{p['id']}", DEV])
    r = await put(client, bot, f"{base}/cfg/instances/{DEV}", {"by": "bot"}, mode="Merge")
    assert r.status_code == 200 and r.json()["instance"]["data"] == {"v": DEV, "by": "bot"}
    assert r.json()["instance"]["updated_by"]  # the API user's label
    r = await client.post(f"{base}/cfg/instances/product:{p['slug']}/rollback",
                          headers=bearer(bot), json={"version": 1})
    assert r.status_code == 200, r.text
    # the owner's document and the sibling product's are not this product's
    for value in ("owner", f"owner:{p['org_id']}", f"product:{sibling['id']}", DEV2):
        assert_error(await client.get(f"{base}/cfg/instances/{value}", headers=bearer(bot)),
                     404, "scope_value_not_found")
        assert_error(await put(client, bot, f"{base}/cfg/instances/{value}", {"x": 1}), 404)
    # a cloud-only document of exactly 1 MB fits through the product route too
    await create(client, tok, name="big", scope="Product", direction="CloudOnly")
    r = await put(client, bot, f"{base}/big/instances/{p['id']}",
                  {"v": "x" * (1024 * 1024 - 8)})
    assert r.status_code == 200 and r.json()["instance"]["size_bytes"] == 1024 * 1024, r.text
    # definitions are managed in the organization / sandbox only
    assert (await create(client, bot, base, name="new", scope="Owner")).status_code == 405
    # a scope the API user lacks
    reader = (await make_api_user(client, tok, p["id"], ["ledgers.instances:get"], name="ro")
              )["tokens"][0]["token"]
    r = await put(client, reader, f"{base}/cfg/instances/{DEV}", {"x": 1})
    assert_error(r, 403)
    assert (await client.get(f"{base}/cfg/instances/{DEV}", headers=bearer(reader))
            ).status_code == 200


def _nested(levels: int) -> Any:
    """A document of ``levels`` objects, one inside the other."""
    doc: Any = 1
    for _ in range(levels):
        doc = {"a": doc}
    return doc


async def test_a_document_nested_too_deeply_is_a_400_and_stores_nothing(app, client):
    """A body that parses but nests past MAX_JSON_DEPTH answered 500 (the answer's and the
    database's encoders recurse through it); now Particle's 400 ``invalid_json``, as a body
    too deep to parse already was. The body wraps the document in two objects. A form whose
    field names nest as deeply answered 500 too (the NUL check recursed through them)."""
    tok, p = await owner_and_product(client)
    await add_device(app, DEV, p["id"])
    await create(client, tok, name="config", scope="Device", direction="CloudToDevice")
    path = f"/v1/ledgers/config/instances/{DEV}"
    for levels in (300, 900, 63):
        assert_error(await put(client, tok, path, _nested(levels)), 400, "invalid_json")
    raw = '{"instance": {"data": ' + '{"a":' * 5_000 + "1" + "}" * 5_000 + "}}"
    r = await client.put(path, headers={**bearer(tok), "content-type": "application/json"},
                         content=raw)
    assert_error(r, 400, "invalid_json")
    # a form's bracketed names nest as deeply: ``instance[data][a][a]...``
    for levels in (3_000, 63):
        r = await client.put(path, headers=bearer(tok),
                             data={"instance[data]" + "[a]" * levels: "1"})
        assert_error(r, 400, "invalid_request")
    async with app.state.sessionmaker() as db:
        assert (await db.execute(select(func.count()).select_from(LedgerVersion))
                ).scalar_one() == 0
    r = await put(client, tok, path, _nested(62))  # 64 levels with the body's two
    assert r.status_code == 200, r.text
