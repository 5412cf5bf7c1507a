"""API users: product-scoped programmatic identities with explicit scopes and one token."""

from __future__ import annotations

import re
from typing import Any

import pytest
from sqlalchemy import select

from corral.auth.models import AccessToken, Membership, User
from corral.auth.policy import API_USER_SCOPES
from helpers import assert_error, bearer, make_product, new_user

USERNAME = re.compile(r"^[a-z0-9-]+\+[0-9a-f]{6}@api\.corral\.local$")


async def make_api_user(client, token: str, product: int | str, scopes: list[str],
                        name: str = "CI Bot") -> dict[str, Any]:
    r = await client.post(f"/v1/products/{product}/team", headers=bearer(token),
                          json={"friendly_name": name, "scopes": scopes})
    assert r.status_code == 200, r.text
    return r.json()["created"]


async def test_create_api_user_shape_and_token(client):
    tok = await new_user(client, "ada@example.com")
    p = await make_product(client, tok)
    r = await client.post(f"/v1/products/{p['id']}/team", headers=bearer(tok),
                          json={"friendly_name": "CI Bot", "scopes": ["products:get", "devices:list"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ok"] is True
    created = body["created"]
    assert USERNAME.match(created["username"]) and created["username"].startswith("ci-bot+")
    assert created["friendly_name"] == "CI Bot" and created["is_programmatic"] is True
    assert created["scopes"] == ["products:get", "devices:list"]
    assert len(created["tokens"]) == 1
    api_tok = created["tokens"][0]["token"]
    assert re.fullmatch(r"[0-9a-f]{40}", api_tok)
    r = await client.get(f"/v1/products/{p['slug']}", headers=bearer(api_tok))
    assert r.status_code == 200 and r.json()["product"]["id"] == p["id"]
    # the token never expires
    r = await client.get("/v1/access_tokens/current", headers=bearer(api_tok))
    assert r.status_code == 200, r.text
    assert r.json()["expires_at"] is None and r.json()["client"] == "corral-api-user"


async def test_create_api_user_form_encoded(client):
    tok = await new_user(client, "ada@example.com")
    p = await make_product(client, tok)
    r = await client.post(f"/v1/products/{p['id']}/team", headers=bearer(tok),
                          data={"friendly_name": "Form Bot", "scopes": ["products:get", "devices:get"]})
    assert r.status_code == 200, r.text
    assert r.json()["created"]["scopes"] == ["products:get", "devices:get"]
    r = await client.post(f"/v1/products/{p['id']}/team", headers=bearer(tok),
                          data={"friendly_name": "Comma Bot", "scopes": "products:get,devices:get"})
    assert r.status_code == 200 and r.json()["created"]["scopes"] == ["products:get", "devices:get"]


async def test_scope_enforcement(client):
    tok = await new_user(client, "ada@example.com")
    p = await make_product(client, tok, "Mine")
    other = await make_product(client, tok, "Other")
    bob = await new_user(client, "bob@example.com")
    bobs = await make_product(client, bob, "Bobs")
    lister = (await make_api_user(client, tok, p["id"], ["devices:list"]))["tokens"][0]["token"]
    assert_error(await client.put(f"/v1/products/{p['id']}", headers=bearer(lister),
                                  json={"name": "x"}), 403, "forbidden")
    assert_error(await client.get(f"/v1/products/{p['id']}", headers=bearer(lister)), 403)
    assert_error(await client.delete(f"/v1/products/{p['id']}", headers=bearer(lister)), 403)
    # another product, even in the same organization, does not exist for it
    for q in (other["id"], other["slug"], bobs["id"]):
        assert_error(await client.get(f"/v1/products/{q}", headers=bearer(lister)), 404)
        assert_error(await client.put(f"/v1/products/{q}", headers=bearer(lister),
                                      json={"name": "x"}), 404)
    updater = (await make_api_user(client, tok, p["id"], ["products:update"]))["tokens"][0]["token"]
    r = await client.put(f"/v1/products/{p['id']}", headers=bearer(updater), json={"name": "New"})
    assert r.status_code == 200, r.text
    # API users never manage the team, even to make more API users
    r = await client.post(f"/v1/products/{p['id']}/team", headers=bearer(updater),
                          json={"friendly_name": "x", "scopes": ["products:get"]})
    assert_error(r, 403)
    # nor call people-only endpoints
    assert_error(await client.get("/v1/user", headers=bearer(updater)), 403, "unauthorized")


@pytest.mark.parametrize("body", [
    {"friendly_name": "bot", "scopes": []},
    {"friendly_name": "bot", "scopes": ["nope:nope"]},
    {"friendly_name": "bot", "scopes": ["products:get", "teams.users:invite"]},
    {"friendly_name": "bot", "scopes": ["products:remove"]},
    {"friendly_name": "bot", "scopes": ["audit:list"]},
    {"friendly_name": "bot", "scopes": ["orgs:get"]},
    {"friendly_name": "bot", "scopes": "devices:list,bogus"},
    {"friendly_name": "bot", "scopes": [1]},
    {"friendly_name": "bot", "scopes": {"a": 1}},
    {"friendly_name": "", "scopes": ["products:get"]},
    {"friendly_name": "   ", "scopes": ["products:get"]},
    {"friendly_name": "x" * 101, "scopes": ["products:get"]},
    {"friendly_name": 7, "scopes": ["products:get"]},
    {"scopes": ["products:get"]},
    {"friendly_name": "bot"},
])
async def test_bad_api_user_input(client, app, body):
    tok = await new_user(client, "ada@example.com")
    p = await make_product(client, tok)
    assert_error(await client.post(f"/v1/products/{p['id']}/team", headers=bearer(tok), json=body),
                 400)
    async with app.state.sessionmaker() as db:
        assert (await db.execute(select(User).where(User.kind == "api"))).first() is None


async def test_every_api_user_scope_is_accepted(client):
    tok = await new_user(client, "ada@example.com")
    p = await make_product(client, tok)
    created = await make_api_user(client, tok, p["id"], sorted(API_USER_SCOPES))
    assert sorted(created["scopes"]) == sorted(API_USER_SCOPES)


async def test_update_scopes_rotates_token(client):
    tok = await new_user(client, "ada@example.com")
    p = await make_product(client, tok)
    created = await make_api_user(client, tok, p["id"], ["devices:list"])
    name, old = created["username"], created["tokens"][0]["token"]
    # renaming alone keeps the token
    r = await client.put(f"/v1/products/{p['id']}/team/{name}", headers=bearer(tok),
                         json={"friendly_name": "Renamed"})
    assert r.status_code == 200, r.text
    upd = r.json()["updated"]
    assert upd["friendly_name"] == "Renamed" and "tokens" not in upd
    assert_error(await client.get(f"/v1/products/{p['id']}", headers=bearer(old)), 403)
    # a scope change rotates it (POST is accepted too, as the docs say)
    r = await client.post(f"/v1/products/{p['id']}/team/{name}", headers=bearer(tok),
                          json={"scopes": ["products:get"]})
    assert r.status_code == 200, r.text
    upd = r.json()["updated"]
    assert upd["scopes"] == ["products:get"] and upd["is_programmatic"] is True
    new = upd["tokens"][0]["token"]
    assert new != old
    assert (await client.get(f"/v1/products/{p['id']}", headers=bearer(old))).status_code == 401
    assert (await client.get(f"/v1/products/{p['id']}", headers=bearer(new))).status_code == 200
    # form encoding; bad scopes change nothing
    assert_error(await client.put(f"/v1/products/{p['id']}/team/{name}", headers=bearer(tok),
                                  data={"scopes": "teams.users:remove"}), 400)
    assert_error(await client.put(f"/v1/products/{p['id']}/team/{name}", headers=bearer(tok),
                                  json={}), 400)
    assert (await client.get(f"/v1/products/{p['id']}", headers=bearer(new))).status_code == 200


async def test_regenerate_token(client):
    tok = await new_user(client, "ada@example.com")
    p = await make_product(client, tok)
    created = await make_api_user(client, tok, p["id"], ["products:get"])
    name, old = created["username"], created["tokens"][0]["token"]
    r = await client.put(f"/v1/products/{p['slug']}/team/{name}/token", headers=bearer(tok))
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ok"] is True and body["updated"]["username"] == name
    new = body["updated"]["tokens"][0]["token"]
    assert (await client.get(f"/v1/products/{p['id']}", headers=bearer(old))).status_code == 401
    assert (await client.get(f"/v1/products/{p['id']}", headers=bearer(new))).status_code == 200
    # a person has no API token here
    assert_error(await client.put(f"/v1/products/{p['id']}/team/ada@example.com/token",
                                  headers=bearer(tok)), 404)


async def test_delete_api_user(client, app):
    tok = await new_user(client, "ada@example.com")
    p = await make_product(client, tok)
    created = await make_api_user(client, tok, p["id"], ["products:get"])
    name, api_tok = created["username"], created["tokens"][0]["token"]
    r = await client.delete(f"/v1/products/{p['id']}/team/{name}", headers=bearer(tok))
    assert r.status_code == 200 and r.json() == {"ok": True}
    assert (await client.get(f"/v1/products/{p['id']}", headers=bearer(api_tok))).status_code == 401
    assert_error(await client.delete(f"/v1/products/{p['id']}/team/{name}", headers=bearer(tok)), 404)
    async with app.state.sessionmaker() as db:
        assert (await db.execute(select(User).where(User.kind == "api"))).first() is None
        assert (await db.execute(select(AccessToken).where(
            AccessToken.client == "corral-api-user"))).first() is None


async def test_api_user_of_another_product_is_404(client):
    tok = await new_user(client, "ada@example.com")
    p = await make_product(client, tok, "One")
    q = await make_product(client, tok, "Two")
    name = (await make_api_user(client, tok, q["id"], ["products:get"]))["username"]
    base = f"/v1/products/{p['id']}/team/{name}"
    assert_error(await client.put(base, headers=bearer(tok), json={"scopes": ["devices:list"]}), 404)
    assert_error(await client.put(f"{base}/token", headers=bearer(tok)), 404)
    assert_error(await client.delete(base, headers=bearer(tok)), 404)
    # and another tenant cannot reach the product at all
    bob = await new_user(client, "bob@example.com")
    assert_error(await client.delete(f"/v1/products/{q['id']}/team/{name}", headers=bearer(bob)), 404)
    assert_error(await client.post(f"/v1/products/{q['id']}/team", headers=bearer(bob),
                                   json={"friendly_name": "x", "scopes": ["products:get"]}), 404)


async def test_only_administrators_create_api_users(client, app):
    tok = await new_user(client, "ada@example.com")
    dev = await new_user(client, "dev@example.com")
    p = await make_product(client, tok)
    async with app.state.sessionmaker() as db:
        uid = (await db.execute(select(User.id).where(User.username == "dev@example.com"))).scalar_one()
        db.add(Membership(user_id=uid, org_id=p["org_id"], product_id=p["id"], role="Developer"))
        await db.commit()
    r = await client.post(f"/v1/products/{p['id']}/team", headers=bearer(dev),
                          json={"friendly_name": "x", "scopes": ["products:get"]})
    assert_error(r, 403, "forbidden")
    async with app.state.sessionmaker() as db:
        m = (await db.execute(select(Membership).where(
            Membership.user_id == uid, Membership.product_id == p["id"]))).scalar_one()
        m.role = "Administrator"
        await db.commit()
    created = await make_api_user(client, dev, p["id"], ["products:get"])
    assert created["is_programmatic"] is True


async def test_api_user_audit_has_no_secrets(client):
    tok = await new_user(client, "ada@example.com")
    p = await make_product(client, tok)
    created = await make_api_user(client, tok, p["id"], ["products:get"])
    name, first = created["username"], created["tokens"][0]["token"]
    r = await client.put(f"/v1/products/{p['id']}/team/{name}", headers=bearer(tok),
                         json={"scopes": ["devices:list"]})
    second = r.json()["updated"]["tokens"][0]["token"]
    r = await client.put(f"/v1/products/{p['id']}/team/{name}/token", headers=bearer(tok))
    third = r.json()["updated"]["tokens"][0]["token"]
    await client.delete(f"/v1/products/{p['id']}/team/{name}", headers=bearer(tok))
    r = await client.get(f"/v1/products/{p['id']}/audit", headers=bearer(tok))
    entries = r.json()["entries"]
    assert [e["action"] for e in entries][:4] == [
        "apiuser.deleted", "apiuser.token_rotated", "apiuser.updated", "apiuser.created"]
    assert all(e["target_id"] == name for e in entries[:4])
    assert entries[3]["details"] == {"friendly_name": "CI Bot", "scopes": ["products:get"]}
    text = r.text
    for secret in (first, second, third):
        assert secret not in text
