"""Products: create (nested/flat, JSON/form), list, get by id or slug, update, delete."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from corral.auth.models import Membership, OAuthClient, User
from corral.products import service as product_service
from helpers import add_member, assert_error, bearer, make_product, new_user


async def personal_slug(client, token: str) -> str:
    r = await client.get("/v1/user", headers=bearer(token))
    assert r.status_code == 200, r.text
    return r.json()["orgs"][0]["slug"]


async def test_create_nested_json_and_shape(client):
    tok = await new_user(client, "ada@example.com")
    r = await client.post("/v1/user/products", headers=bearer(tok), json={"product": {
        "name": "Weather Station", "description": "outdoor sensor", "platform_id": 12,
        "tags": ["outdoor", "v1"], "settings": {"location": {"opt_in": True}}}})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ok"] is True
    p = body["product"]
    org_slug = await personal_slug(client, tok)
    assert p["id"] == p["product_id"] and isinstance(p["id"], int)
    assert p["name"] == "Weather Station" and p["slug"] == "weather-station"
    assert p["description"] == "outdoor sensor" and p["platform_id"] == 12
    assert p["tags"] == ["outdoor", "v1"]
    assert p["organization"] == org_slug and isinstance(p["org_id"], int)
    assert p["subscription_id"] is None and p["user"] is None and p["groups"] == []
    assert p["settings"] == {"location": {"opt_in": True}, "known_application": {"opt_in": False},
                             "quarantine": True}
    assert p["requires_activation_codes"] is False and p["device_protection"] == "disabled"
    assert p["created_at"].endswith("Z") and p["updated_at"].endswith("Z")


async def test_create_flat_form_and_bracket_form(client):
    tok = await new_user(client, "ada@example.com")
    r = await client.post("/v1/user/products", headers=bearer(tok), data={
        "name": "Form Product", "platform_id": "6", "tags": ["a", "b"],
        "description": "via form", "settings": '{"quarantine": false}'})
    assert r.status_code == 200, r.text
    p = r.json()["product"]
    assert (p["name"], p["platform_id"], p["tags"]) == ("Form Product", 6, ["a", "b"])
    assert p["settings"]["quarantine"] is False
    r = await client.post("/v1/user/products", headers=bearer(tok), data={
        "product[name]": "Bracket", "product[platform_id]": "10", "product[tags]": "x,y",
        "product[settings][quarantine]": "false"})
    assert r.status_code == 200, r.text
    p = r.json()["product"]
    assert (p["name"], p["platform_id"], p["tags"]) == ("Bracket", 10, ["x", "y"])
    assert p["settings"]["quarantine"] is False
    # a flat JSON body works as well
    r = await client.post("/v1/user/products", headers=bearer(tok), json={"name": "Flat"})
    assert r.status_code == 200 and r.json()["product"]["platform_id"] == 0


async def test_create_in_org_route_and_list_everywhere(client):
    tok = await new_user(client, "ada@example.com")
    org = await personal_slug(client, tok)
    r = await client.post(f"/v1/orgs/{org}/products", headers=bearer(tok),
                          json={"product": {"name": "Org Product"}})
    assert r.status_code == 200, r.text
    pid = r.json()["product"]["id"]
    await make_product(client, tok, "Second")
    for path in ("/v1/user/products", "/v1/products", f"/v1/orgs/{org}/products"):
        r = await client.get(path, headers=bearer(tok))
        assert r.status_code == 200, r.text
        assert [p["name"] for p in r.json()["products"]] == ["Org Product", "Second"], path
    r = await client.get(f"/v1/products/{pid}", headers=bearer(tok))
    assert r.status_code == 200 and r.json()["product"]["name"] == "Org Product"


async def test_name_unique_per_org_case_insensitive_and_slugs(client):
    a = await new_user(client, "ada@example.com")
    b = await new_user(client, "bob@example.com")
    first = await make_product(client, a, "Tracker")
    r = await client.post("/v1/user/products", headers=bearer(a), json={"name": "  TRACKER "})
    assert_error(r, 409, "name_taken")
    # the same name in another organization is fine; the slug stays globally unique
    second = await make_product(client, b, "Tracker")
    third_owner = await new_user(client, "cy@example.com")
    third = await make_product(client, third_owner, "tracker")
    assert (first["slug"], second["slug"], third["slug"]) == ("tracker", "tracker-2", "tracker-3")
    # an all-digit name never makes an all-digit slug (ambiguous with ids)
    digits = await make_product(client, a, "12345")
    assert digits["slug"] == "p-12345"
    r = await client.get("/v1/products/p-12345", headers=bearer(a))
    assert r.status_code == 200 and r.json()["product"]["id"] == digits["id"]
    r = await client.get("/v1/products/TRACKER", headers=bearer(a))
    assert r.status_code == 200 and r.json()["product"]["id"] == first["id"]
    # bob reaches his own tracker by its slug, not ada's
    r = await client.get("/v1/products/tracker", headers=bearer(b))
    assert r.status_code == 404


@pytest.mark.parametrize("body", [
    {},
    {"product": {"name": ""}},
    {"product": {"name": "   "}},
    {"product": {"name": "x" * 101}},
    {"product": {"name": 5}},
    {"product": "not an object"},
    {"product": {"name": "ok", "platform_id": -1}},
    {"product": {"name": "ok", "platform_id": "abc"}},
    {"product": {"name": "ok", "platform_id": True}},
    {"product": {"name": "ok", "tags": [f"t{i}" for i in range(51)]}},
    {"product": {"name": "ok", "tags": [1, 2]}},
    {"product": {"name": "ok", "tags": {"a": 1}}},
    {"product": {"name": "ok", "description": "d" * 2001}},
    {"product": {"name": "ok", "settings": [1]}},
    {"product": {"name": "ok", "settings": "nope"}},
    {"product": {"name": "ok", "settings": {"location": True}}},
    {"product": {"name": "ok", "settings": {"quarantine": "maybe"}}},
])
async def test_bad_input_is_400_json(client, body):
    tok = await new_user(client, "ada@example.com")
    r = await client.post("/v1/user/products", headers=bearer(tok), json=body)
    assert_error(r, 400)
    r = await client.get("/v1/user/products", headers=bearer(tok))
    assert r.json()["products"] == []


async def test_malformed_json_and_limits_accepted(client):
    tok = await new_user(client, "ada@example.com")
    r = await client.post("/v1/user/products", headers={**bearer(tok),
                          "content-type": "application/json"}, content=b"{nope")
    assert_error(r, 400, "invalid_json")
    p = await make_product(client, tok, "x" * 100, description="d" * 2000,
                           tags=[f"t{i}" for i in range(50)])
    assert len(p["name"]) == 100 and len(p["tags"]) == 50


async def test_settings_keep_known_keys_only(client):
    tok = await new_user(client, "ada@example.com")
    p = await make_product(client, tok, settings={"quarantine": False, "evil": {"x": 1},
                                                  "location": {"opt_in": True, "junk": 1}})
    assert p["settings"] == {"location": {"opt_in": True}, "known_application": {"opt_in": False},
                             "quarantine": False}


async def test_update_product(client):
    tok = await new_user(client, "ada@example.com")
    p = await make_product(client, tok, "Alpha", settings={"location": {"opt_in": True}})
    await make_product(client, tok, "Beta")
    r = await client.put(f"/v1/products/{p['slug']}", headers=bearer(tok), json={
        "name": "Gamma", "description": "new", "tags": ["t"], "platform_id": 32,
        "settings": {"quarantine": False}})
    assert r.status_code == 200, r.text
    up = r.json()["product"]
    assert (up["name"], up["description"], up["tags"], up["platform_id"]) == (
        "Gamma", "new", ["t"], 32)
    assert up["slug"] == "alpha"  # slugs are stable
    assert up["settings"]["quarantine"] is False and up["settings"]["location"] == {"opt_in": True}
    # nested product body, form encoding
    r = await client.put(f"/v1/products/{p['id']}", headers=bearer(tok),
                         data={"product[description]": "form"})
    assert r.status_code == 200 and r.json()["product"]["description"] == "form"
    # renaming onto a sibling's name (any case) conflicts; renaming to own name is fine
    r = await client.put(f"/v1/products/{p['id']}", headers=bearer(tok), json={"name": "beta"})
    assert_error(r, 409, "name_taken")
    r = await client.put(f"/v1/products/{p['id']}", headers=bearer(tok), json={"name": "GAMMA"})
    assert r.status_code == 200 and r.json()["product"]["name"] == "GAMMA"
    assert_error(await client.put(f"/v1/products/{p['id']}", headers=bearer(tok), json={}), 400)
    assert_error(await client.put(f"/v1/products/{p['id']}", headers=bearer(tok),
                                  json={"platform_id": -3}), 400)
    r = await client.get(f"/v1/products/{p['id']}", headers=bearer(tok))
    assert r.json()["product"]["platform_id"] == 32


async def test_other_tenant_gets_404_and_no_token_401(client):
    a = await new_user(client, "ada@example.com")
    b = await new_user(client, "bob@example.com")
    p = await make_product(client, a)
    org = await personal_slug(client, a)
    for method, path in [("GET", f"/v1/products/{p['id']}"), ("PUT", f"/v1/products/{p['slug']}"),
                         ("DELETE", f"/v1/products/{p['id']}"),
                         ("GET", f"/v1/orgs/{org}/products"), ("POST", f"/v1/orgs/{org}/products")]:
        r = await client.request(method, path, headers=bearer(b), json={"name": "Hijack"})
        assert_error(r, 404)
    assert (await client.get("/v1/products", headers=bearer(b))).json()["products"] == []
    r = await client.get(f"/v1/products/{p['id']}")
    assert r.status_code == 401 and r.json()["error"] == "invalid_token"
    r = await client.post("/v1/user/products", json={"name": "x"})
    assert r.status_code == 401
    assert_error(await client.get("/v1/products/999999", headers=bearer(a)), 404)


async def test_roles_on_products(client, app):
    owner = await new_user(client, "ada@example.com")
    viewer = await new_user(client, "val@example.com")
    admin = await new_user(client, "al@example.com")
    dev = await new_user(client, "dev@example.com")
    p = await make_product(client, owner, "Shared")
    other = await make_product(client, owner, "Private")
    await add_member(app, "val@example.com", org_id=p["org_id"], product_id=p["id"],
                     role="View-only")
    await add_member(app, "al@example.com", org_id=p["org_id"], product_id=p["id"],
                     role="Administrator")
    await add_member(app, "dev@example.com", org_id=p["org_id"], product_id=None, role="Developer")
    # product-scope members see exactly that product; org-scope members see all of the org's
    r = await client.get("/v1/user/products", headers=bearer(viewer))
    assert [x["id"] for x in r.json()["products"]] == [p["id"]]
    r = await client.get("/v1/products", headers=bearer(dev))
    assert [x["id"] for x in r.json()["products"]] == [p["id"], other["id"]]
    assert (await client.get(f"/v1/products/{p['id']}", headers=bearer(viewer))).status_code == 200
    assert_error(await client.get(f"/v1/products/{other['id']}", headers=bearer(viewer)), 404)
    assert_error(await client.put(f"/v1/products/{p['id']}", headers=bearer(viewer),
                                  json={"name": "nope"}), 403, "forbidden")
    assert_error(await client.put(f"/v1/products/{p['id']}", headers=bearer(dev),
                                  json={"name": "nope"}), 403)
    assert_error(await client.delete(f"/v1/products/{p['id']}", headers=bearer(dev)), 403)
    r = await client.put(f"/v1/products/{p['id']}", headers=bearer(admin), json={"name": "Renamed"})
    assert r.status_code == 200, r.text
    # a product-scope role grants nothing in the organization
    org = p["organization"]
    assert_error(await client.get(f"/v1/orgs/{org}/products", headers=bearer(admin)), 404)
    assert_error(await client.post(f"/v1/orgs/{org}/products", headers=bearer(dev),
                                   json={"name": "x"}), 403)


async def _count(app, model, *where) -> int:
    async with app.state.sessionmaker() as db:
        return (await db.execute(select(func.count()).select_from(model).where(*where))).scalar_one()


async def test_delete_product_cascades(client, app):
    tok = await new_user(client, "ada@example.com")
    await new_user(client, "val@example.com")
    p = await make_product(client, tok, "Doomed")
    keep = await make_product(client, tok, "Keeper")
    await add_member(app, "val@example.com", org_id=p["org_id"], product_id=p["id"], role="View-only")
    r = await client.post(f"/v1/products/{p['id']}/team", headers=bearer(tok),
                          json={"friendly_name": "bot", "scopes": ["products:get"]})
    assert r.status_code == 200, r.text
    api_token = r.json()["created"]["tokens"][0]["token"]
    r = await client.post(f"/v1/products/{p['id']}/clients", headers=bearer(tok),
                          json={"name": "app", "type": "installed", "scope": "products:get"})
    assert r.status_code == 200, r.text
    r = await client.post(f"/v1/products/{keep['id']}/clients", headers=bearer(tok),
                          json={"name": "other", "type": "installed"})
    assert r.status_code == 200
    r = await client.delete(f"/v1/products/{p['slug']}", headers=bearer(tok))
    assert r.status_code == 204, r.text
    assert r.content == b""
    assert_error(await client.get(f"/v1/products/{p['id']}", headers=bearer(tok)), 404)
    assert (await client.get(f"/v1/products/{p['id']}", headers=bearer(api_token))).status_code == 401
    assert await _count(app, User, User.kind == "api") == 0
    assert await _count(app, OAuthClient) == 1
    assert await _count(app, Membership, Membership.product_id.is_not(None)) == 0
    assert [x["name"] for x in (await client.get("/v1/products", headers=bearer(tok))).json()[
        "products"]] == ["Keeper"]
    # the slug is free again
    again = await make_product(client, tok, "Doomed")
    assert again["slug"] == "doomed"


async def test_delete_checks_refuse_without_partial_writes(client, app, monkeypatch):
    tok = await new_user(client, "ada@example.com")
    p = await make_product(client, tok, "Busy")
    r = await client.post(f"/v1/products/{p['id']}/team", headers=bearer(tok),
                          json={"friendly_name": "bot", "scopes": ["products:get"]})
    api_token = r.json()["created"]["tokens"][0]["token"]
    seen: list[int] = []

    async def has_devices(db, product) -> str | None:
        seen.append(product.id)
        return "Remove the product's devices first (the product still has devices)"

    async def fine(db, product) -> str | None:
        return None

    monkeypatch.setattr(product_service, "DELETE_CHECKS", [fine, has_devices])
    r = await client.delete(f"/v1/products/{p['id']}", headers=bearer(tok))
    body = assert_error(r, 409, "product_not_empty")
    assert "still has devices" in body["error_description"]
    assert seen == [p["id"]]
    assert (await client.get(f"/v1/products/{p['id']}", headers=bearer(tok))).status_code == 200
    assert (await client.get(f"/v1/products/{p['id']}", headers=bearer(api_token))).status_code == 200
    monkeypatch.setattr(product_service, "DELETE_CHECKS", [fine])
    assert (await client.delete(f"/v1/products/{p['id']}", headers=bearer(tok))).status_code == 204


async def test_api_user_product_listing_and_people_only_create(client):
    tok = await new_user(client, "ada@example.com")
    p = await make_product(client, tok, "Mine")
    await make_product(client, tok, "Other")
    r = await client.post(f"/v1/products/{p['id']}/team", headers=bearer(tok),
                          json={"friendly_name": "reader", "scopes": ["products:get"]})
    reader = r.json()["created"]["tokens"][0]["token"]
    r = await client.post(f"/v1/products/{p['id']}/team", headers=bearer(tok),
                          json={"friendly_name": "lister", "scopes": ["devices:list"]})
    lister = r.json()["created"]["tokens"][0]["token"]
    for path in ("/v1/products", "/v1/user/products"):
        r = await client.get(path, headers=bearer(reader))
        assert [x["id"] for x in r.json()["products"]] == [p["id"]]
        # without products:get the product is not listed (same rule as GET /v1/products/{p})
        assert (await client.get(path, headers=bearer(lister))).json()["products"] == []
    r = await client.post("/v1/user/products", headers=bearer(reader), json={"name": "x"})
    assert_error(r, 403, "unauthorized")
    r = await client.post(f"/v1/orgs/{p['organization']}/products", headers=bearer(reader),
                          json={"name": "x"})
    assert_error(r, 403)


async def test_product_changes_are_audited(client):
    tok = await new_user(client, "ada@example.com")
    p = await make_product(client, tok, "Audited")
    await client.put(f"/v1/products/{p['id']}", headers=bearer(tok), json={"description": "x"})
    r = await client.get(f"/v1/products/{p['id']}/audit", headers=bearer(tok))
    assert r.status_code == 200, r.text
    entries = r.json()["entries"]
    assert [e["action"] for e in entries] == ["product.updated", "product.created"]
    assert entries[0]["details"] == {"fields": ["description"]}
    assert entries[1]["actor"] == "ada@example.com" and entries[1]["target_type"] == "product"
    await client.delete(f"/v1/products/{p['id']}", headers=bearer(tok))
    org = p["organization"]
    r = await client.get(f"/v1/orgs/{org}/audit", headers=bearer(tok))
    assert r.json()["entries"][0]["action"] == "product.deleted"


async def test_lost_uniqueness_race_is_409_not_500(client, monkeypatch):
    """Two creates racing past the name check: the database constraint answers 409."""
    tok = await new_user(client, "ada@example.com")
    await make_product(client, tok, "Racer")

    async def skip_check(*args, **kwargs) -> None:
        return None

    monkeypatch.setattr(product_service, "_check_name_free", skip_check)
    r = await client.post("/v1/user/products", headers=bearer(tok), json={"name": "racer"})
    assert_error(r, 409, "name_taken")
    p = await make_product(client, tok, "Other")
    r = await client.put(f"/v1/products/{p['id']}", headers=bearer(tok), json={"name": "RACER"})
    assert_error(r, 409, "name_taken")
    names = [x["name"] for x in (await client.get("/v1/products", headers=bearer(tok))).json()[
        "products"]]
    assert names == ["Racer", "Other"]
