"""OAuth clients: product clients, personal clients, client_credentials tokens."""

from __future__ import annotations

import re
from typing import Any

import pytest
from sqlalchemy import select

from corral.auth.models import Membership, OAuthClient, User
from corral.kit.secrets import digest
from helpers import assert_any_error, bearer, make_client, make_product, new_user

CLIENT_ID = re.compile(r"^[a-z0-9_-]{3,40}$")


async def client_token(client, cid: str, secret: str) -> Any:
    return await client.post("/oauth/token", data={
        "grant_type": "client_credentials", "client_id": cid, "client_secret": secret})


async def test_create_product_client_shape_and_secret_once(client, app):
    tok = await new_user(client, "ada@example.com")
    p = await make_product(client, tok)
    r = await client.post(f"/v1/products/{p['id']}/clients", headers=bearer(tok), json={
        "name": "My Web App!", "type": "web", "redirect_uri": "https://example.com/cb",
        "scope": "products:get devices:list"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["ok"] is True
    c = body["client"]
    assert c["name"] == "My Web App!" and c["type"] == "web"
    assert c["redirect_uri"] == "https://example.com/cb"
    assert c["scope"] == "products:get devices:list"
    assert CLIENT_ID.match(c["id"]) and re.fullmatch(r"my-web-app-[0-9a-f]{6}", c["id"])
    secret = c["secret"]
    assert len(secret) >= 32
    # the secret is stored only as a digest and never shown again
    async with app.state.sessionmaker() as db:
        row = (await db.execute(select(OAuthClient).where(OAuthClient.client_id == c["id"]))
               ).scalar_one()
        assert row.secret_hash == digest(secret) and secret not in row.secret_hash
    r = await client.get(f"/v1/products/{p['slug']}/clients", headers=bearer(tok))
    assert r.status_code == 200, r.text
    listed = r.json()
    assert listed["ok"] is True
    assert [x["id"] for x in listed["clients"]] == [c["id"]]
    assert "secret" not in listed["clients"][0] and secret not in r.text
    r = await client.put(f"/v1/products/{p['id']}/clients/{c['id']}", headers=bearer(tok),
                         json={"name": "Renamed"})
    assert r.status_code == 200 and "secret" not in r.json()["client"] and secret not in r.text
    r = await client.get(f"/v1/products/{p['id']}/audit", headers=bearer(tok))
    assert secret not in r.text
    assert [e["action"] for e in r.json()["entries"]][:2] == ["client.updated", "client.created"]


async def test_create_client_form_encoded(client):
    tok = await new_user(client, "ada@example.com")
    p = await make_product(client, tok)
    r = await client.post(f"/v1/products/{p['id']}/clients", headers=bearer(tok),
                          data={"name": "cli", "type": "installed", "scope": "*:*"})
    assert r.status_code == 200, r.text
    c = r.json()["client"]
    assert c["type"] == "installed" and c["scope"] == "*:*" and c["redirect_uri"] is None


async def test_client_credentials_token_follows_scope(client):
    tok = await new_user(client, "ada@example.com")
    p = await make_product(client, tok, "Mine")
    other = await make_product(client, tok, "Other")
    reader = await make_client(client, tok, p["id"], name="reader", scope="products:get")
    r = await client_token(client, reader["id"], reader["secret"])
    assert r.status_code == 200, r.text
    ctok = r.json()["access_token"]
    assert "products:get" in r.json()["scope"].split()
    r = await client.get(f"/v1/products/{p['id']}", headers=bearer(ctok))
    assert r.status_code == 200 and r.json()["product"]["id"] == p["id"]
    assert_any_error(await client.put(f"/v1/products/{p['id']}", headers=bearer(ctok),
                                      json={"name": "x"}), 403)
    assert_any_error(await client.get(f"/v1/products/{other['id']}", headers=bearer(ctok)), 404)
    # without products:get the token cannot read the product
    lister = await make_client(client, tok, p["id"], name="lister", scope="devices:list")
    ltok = (await client_token(client, lister["id"], lister["secret"])).json()["access_token"]
    assert_any_error(await client.get(f"/v1/products/{p['id']}", headers=bearer(ltok)), 403)
    bare = await make_client(client, tok, p["id"], name="bare")
    btok = (await client_token(client, bare["id"], bare["secret"])).json()["access_token"]
    assert_any_error(await client.get(f"/v1/products/{p['id']}", headers=bearer(btok)), 403)
    wild = await make_client(client, tok, p["id"], name="wild", scope="*:*")
    wtok = (await client_token(client, wild["id"], wild["secret"])).json()["access_token"]
    assert (await client.get(f"/v1/products/{p['id']}", headers=bearer(wtok))).status_code == 200
    assert (await client.put(f"/v1/products/{p['id']}", headers=bearer(wtok),
                             json={"description": "by client"})).status_code == 200
    # a wrong secret is refused
    r = await client_token(client, reader["id"], "0" * 48)
    assert_any_error(r, 400, "invalid_client")


async def test_scope_change_revokes_tokens_and_none_clears(client):
    tok = await new_user(client, "ada@example.com")
    p = await make_product(client, tok)
    c = await make_client(client, tok, p["id"], name="app", scope="products:get")
    ctok = (await client_token(client, c["id"], c["secret"])).json()["access_token"]
    assert (await client.get(f"/v1/products/{p['id']}", headers=bearer(ctok))).status_code == 200
    # a rename keeps tokens
    r = await client.put(f"/v1/products/{p['id']}/clients/{c['id']}", headers=bearer(tok),
                         data={"name": "App 2"})
    assert r.status_code == 200 and r.json()["client"]["name"] == "App 2"
    assert (await client.get(f"/v1/products/{p['id']}", headers=bearer(ctok))).status_code == 200
    r = await client.put(f"/v1/products/{p['id']}/clients/{c['id']}", headers=bearer(tok),
                         json={"scope": "none"})
    assert r.status_code == 200, r.text
    assert r.json()["client"]["scope"] is None
    assert (await client.get(f"/v1/products/{p['id']}", headers=bearer(ctok))).status_code == 401
    ntok = (await client_token(client, c["id"], c["secret"])).json()["access_token"]
    assert_any_error(await client.get(f"/v1/products/{p['id']}", headers=bearer(ntok)), 403)
    assert_any_error(await client.put(f"/v1/products/{p['id']}/clients/{c['id']}", headers=bearer(tok),
                                      json={"scope": "bogus:scope"}), 400, "invalid_scope")
    assert_any_error(await client.put(f"/v1/products/{p['id']}/clients/{c['id']}", headers=bearer(tok),
                                      json={}), 400)
    assert_any_error(await client.put(f"/v1/products/{p['id']}/clients/{c['id']}", headers=bearer(tok),
                                      json={"name": ""}), 400)


async def test_delete_client_revokes_tokens(client):
    tok = await new_user(client, "ada@example.com")
    p = await make_product(client, tok)
    c = await make_client(client, tok, p["id"], name="app", scope="products:get")
    ctok = (await client_token(client, c["id"], c["secret"])).json()["access_token"]
    r = await client.delete(f"/v1/products/{p['id']}/clients/{c['id']}", headers=bearer(tok))
    assert r.status_code == 204 and r.content == b""
    assert (await client.get(f"/v1/products/{p['id']}", headers=bearer(ctok))).status_code == 401
    assert_any_error(await client_token(client, c["id"], c["secret"]), 400, "invalid_client")
    assert_any_error(await client.delete(f"/v1/products/{p['id']}/clients/{c['id']}",
                                         headers=bearer(tok)), 404)
    assert (await client.get(f"/v1/products/{p['id']}/clients",
                             headers=bearer(tok))).json()["clients"] == []


@pytest.mark.parametrize("body", [
    {"type": "installed"},
    {"name": "", "type": "installed"},
    {"name": "x" * 101, "type": "installed"},
    {"name": "app"},
    {"name": "app", "type": "desktop"},
    {"name": "app", "type": "web"},
    {"name": "app", "type": "web", "redirect_uri": "ftp://example.com/cb"},
    {"name": "app", "type": "web", "redirect_uri": "not a url"},
    {"name": "app", "type": "web", "redirect_uri": "https://"},
    {"name": "app", "type": "installed", "scope": "products:get teams.users:invite"},
    {"name": "app", "type": "installed", "scope": "root"},
    {"name": "app", "type": "installed", "scope": 5},
])
async def test_bad_client_input(client, app, body):
    tok = await new_user(client, "ada@example.com")
    p = await make_product(client, tok)
    assert_any_error(await client.post(f"/v1/products/{p['id']}/clients", headers=bearer(tok),
                                       json=body), 400)
    assert_any_error(await client.post("/v1/clients", headers=bearer(tok), json=body), 400)
    async with app.state.sessionmaker() as db:
        assert (await db.execute(select(OAuthClient))).first() is None


async def test_client_ids_stay_valid_for_odd_names(client):
    tok = await new_user(client, "ada@example.com")
    p = await make_product(client, tok)
    for name in ("!!!", "ÄÖÜ long name " * 7, "123", "a"):
        c = await make_client(client, tok, p["id"], name=name)
        assert CLIENT_ID.match(c["id"]), c["id"]
        r = await client_token(client, c["id"], c["secret"])
        assert r.status_code == 200, r.text


async def test_product_clients_are_tenant_scoped(client, app):
    a = await new_user(client, "ada@example.com")
    b = await new_user(client, "bob@example.com")
    pa = await make_product(client, a, "A")
    pb = await make_product(client, b, "B")
    ca = await make_client(client, a, pa["id"], name="a-app")
    # bob cannot see ada's product, nor reach her client through his own product
    assert_any_error(await client.get(f"/v1/products/{pa['id']}/clients", headers=bearer(b)), 404)
    for method in ("PUT", "DELETE"):
        r = await client.request(method, f"/v1/products/{pb['id']}/clients/{ca['id']}",
                                 headers=bearer(b), json={"name": "x"})
        assert_any_error(r, 404)
        # nor through the personal-client routes (a product client is not anyone's personal one)
        r = await client.request(method, f"/v1/clients/{ca['id']}", headers=bearer(a),
                                 json={"name": "x"})
        assert_any_error(r, 404)
    # a View-only member lists but may not create, change or delete
    async with app.state.sessionmaker() as db:
        uid = (await db.execute(select(User.id).where(User.username == "bob@example.com"))
               ).scalar_one()
        db.add(Membership(user_id=uid, org_id=pa["org_id"], product_id=pa["id"], role="View-only"))
        await db.commit()
    r = await client.get(f"/v1/products/{pa['id']}/clients", headers=bearer(b))
    assert r.status_code == 200 and [x["id"] for x in r.json()["clients"]] == [ca["id"]]
    assert_any_error(await client.post(f"/v1/products/{pa['id']}/clients", headers=bearer(b),
                                       json={"name": "x", "type": "installed"}), 403)
    assert_any_error(await client.put(f"/v1/products/{pa['id']}/clients/{ca['id']}", headers=bearer(b),
                                      json={"name": "x"}), 403)
    assert_any_error(await client.delete(f"/v1/products/{pa['id']}/clients/{ca['id']}",
                                         headers=bearer(b)), 403)


async def test_api_user_with_client_scopes(client):
    tok = await new_user(client, "ada@example.com")
    p = await make_product(client, tok)
    r = await client.post(f"/v1/products/{p['id']}/team", headers=bearer(tok), json={
        "friendly_name": "ops", "scopes": ["clients:list", "clients:create"]})
    api_tok = r.json()["created"]["tokens"][0]["token"]
    c = await make_client(client, api_tok, p["id"], name="made-by-bot", scope="products:get")
    r = await client.get(f"/v1/products/{p['id']}/clients", headers=bearer(api_tok))
    assert [x["id"] for x in r.json()["clients"]] == [c["id"]]
    assert_any_error(await client.delete(f"/v1/products/{p['id']}/clients/{c['id']}",
                                         headers=bearer(api_tok)), 403)
    # people-only personal clients
    assert_any_error(await client.get("/v1/clients", headers=bearer(api_tok)), 403, "unauthorized")
    assert_any_error(await client.post("/v1/clients", headers=bearer(api_tok),
                                       json={"name": "x", "type": "installed"}), 403)


async def test_personal_clients(client):
    a = await new_user(client, "ada@example.com")
    b = await new_user(client, "bob@example.com")
    p = await make_product(client, a)
    await make_client(client, a, p["id"], name="product-app")
    mine = await make_client(client, a, None, name="personal", type="web",
                             redirect_uri="http://localhost:8080/cb")
    assert mine["secret"] and "product_id" not in mine
    r = await client.get("/v1/clients", headers=bearer(a))
    assert r.status_code == 200, r.text
    assert [x["id"] for x in r.json()["clients"]] == [mine["id"]]
    assert mine["secret"] not in r.text
    assert (await client.get("/v1/clients", headers=bearer(b))).json()["clients"] == []
    assert_any_error(await client.put(f"/v1/clients/{mine['id']}", headers=bearer(b),
                                      json={"name": "x"}), 404)
    assert_any_error(await client.delete(f"/v1/clients/{mine['id']}", headers=bearer(b)), 404)
    r = await client.put(f"/v1/clients/{mine['id']}", headers=bearer(a),
                         data={"name": "renamed", "scope": "customers:create"})
    assert r.status_code == 200, r.text
    assert (r.json()["client"]["name"], r.json()["client"]["scope"]) == ("renamed", "customers:create")
    # a personal client's token is bound to no product
    ctok = (await client_token(client, mine["id"], mine["secret"])).json()["access_token"]
    assert_any_error(await client.get(f"/v1/products/{p['id']}", headers=bearer(ctok)), 404)
    r = await client.delete(f"/v1/clients/{mine['id']}", headers=bearer(a))
    assert r.status_code == 204
    assert (await client.get("/v1/clients", headers=bearer(a))).json()["clients"] == []
    assert (await client.get("/v1/clients")).status_code == 401
