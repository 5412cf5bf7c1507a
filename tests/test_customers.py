"""Customers: team and two-legged creation, shadow customers, customer tokens, list, update,
delete (tokens and claim codes revoked, devices released)."""

from __future__ import annotations

import base64
import re
from typing import Any

import pytest
from sqlalchemy import select

from corral.auth.models import AccessToken, Customer
from corral.devices.models import ClaimCode
from corral.kit.secrets import digest
from helpers import (
    add_device,
    add_role,
    assert_any_error,
    bearer,
    login,
    make_client,
    make_product,
    new_user,
)
from test_claiming import (
    CUSTOMER_PASSWORD,
    OTHER_DEV,
    PRODUCT_DEV,
    claim,
    get_device,
    make_customer,
)

TOKEN = re.compile(r"^[0-9a-f]{40}$")


async def get_customer(app, email: str) -> Customer | None:
    async with app.state.sessionmaker() as db:
        return (await db.execute(select(Customer).where(Customer.email == email))
                ).scalar_one_or_none()


async def product_audit(client, token: str, product: dict[str, Any]) -> list[dict[str, Any]]:
    r = await client.get(f"/v1/products/{product['id']}/audit", headers=bearer(token))
    assert r.status_code == 200, r.text
    return r.json()["entries"]


async def customer_grant(client, oauth_client: dict[str, Any], email: str, **extra: Any):
    return await client.post("/oauth/token", data={
        "grant_type": "client_credentials", "client_id": oauth_client["id"],
        "client_secret": oauth_client["secret"], "scope": f"customer={email}", **extra})


async def password_login(client, oauth_client: dict[str, Any], email: str, password: str):
    return await client.post("/oauth/token", data={
        "grant_type": "password", "username": email, "password": password,
        "client_id": oauth_client["id"], "client_secret": oauth_client["secret"]})


@pytest.fixture
async def shop(client, app) -> dict[str, Any]:
    """A product with an owner, a second product, and a product OAuth client."""
    owner = await new_user(client, "owner@example.com")
    p = await make_product(client, owner)
    other = await make_product(client, owner, "Other")
    oc = await make_client(client, owner, p)
    return {"owner": owner, "p": p, "other": other, "oc": oc}


# --- creating customers -------------------------------------------------------------------

async def test_team_member_creates_customer(client, app, shop, manual_clock):
    p = shop["p"]
    r = await client.post(f"/v1/products/{p['id']}/customers", headers=bearer(shop["owner"]),
                          json={"email": "Cust@Example.com", "password": CUSTOMER_PASSWORD})
    assert r.status_code == 201, r.text
    body = r.json()
    assert set(body) == {"token_type", "access_token", "refresh_token", "expires_in"}
    assert body["token_type"] == "bearer" and body["expires_in"] == 7776000
    assert TOKEN.match(body["access_token"]) and TOKEN.match(body["refresh_token"])
    cust = await get_customer(app, "cust@example.com")
    assert cust is not None and cust.product_id == p["id"]
    assert cust.password_hash.startswith("$argon2") and CUSTOMER_PASSWORD not in cust.password_hash
    async with app.state.sessionmaker() as db:
        row = (await db.execute(select(AccessToken).where(
            AccessToken.token_hash == digest(body["access_token"])))).scalar_one()
        assert row.customer_id == cust.id and row.user_id is None and row.scopes == []
    entries = await product_audit(client, shop["owner"], p)
    created = [e for e in entries if e["action"] == "customer.created"]
    assert len(created) == 1 and created[0]["target_id"] == "cust@example.com"
    assert created[0]["actor"] == "owner@example.com" and created[0]["details"]["shadow"] is False


async def test_customer_token_reaches_only_its_own_things(client, app, shop):
    p, other, owner = shop["p"], shop["other"], shop["owner"]
    cust = await make_customer(client, owner, p, "cust@example.com")
    # team routes of its own product: 403; other products: 404
    for method, path in (("GET", f"/v1/products/{p['id']}/team"),
                         ("GET", f"/v1/products/{p['id']}/customers"),
                         ("GET", f"/v1/products/{p['id']}"),
                         ("PUT", f"/v1/products/{p['id']}/customers/cust@example.com"),
                         ("DELETE", f"/v1/products/{p['id']}/customers/cust@example.com")):
        r = await client.request(method, path, headers=bearer(cust), json={"password": "x" * 10})
        assert_any_error(r, 403, "forbidden")
    for path in (f"/v1/products/{other['id']}", f"/v1/products/{other['id']}/team",
                 f"/v1/products/{other['id']}/customers"):
        body = assert_any_error(await client.get(path, headers=bearer(cust)), 404)
        assert body["error_description"] == "Product not found"
    r = await client.post(f"/v1/products/{p['id']}/customers", headers=bearer(cust),
                          json={"email": "friend@example.com", "password": CUSTOMER_PASSWORD})
    assert_any_error(r, 403, "forbidden")
    assert_any_error(await client.post("/v1/user/products", headers=bearer(cust),
                                       json={"name": "Mine"}), 403)
    # its own devices only
    await add_device(app, PRODUCT_DEV, p["id"])
    await add_device(app, OTHER_DEV, other["id"])
    assert_any_error(await claim(client, cust, OTHER_DEV), 404)
    assert (await claim(client, cust, PRODUCT_DEV)).status_code == 200
    assert (await client.delete(f"/v1/devices/{PRODUCT_DEV}", headers=bearer(cust))
            ).status_code == 200


@pytest.mark.parametrize("how", ["form", "basic", "json"])
async def test_two_legged_creation(client, app, shop, how):
    p, oc = shop["p"], shop["oc"]
    url = f"/v1/products/{p['slug']}/customers"
    body = {"email": "cust@example.com", "password": CUSTOMER_PASSWORD}
    if how == "form":  # what particle-api-js createCustomer sends
        r = await client.post(url, data={**body, "grant_type": "client_credentials",
                                         "client_id": oc["id"], "client_secret": oc["secret"]})
    elif how == "basic":
        basic = base64.b64encode(f"{oc['id']}:{oc['secret']}".encode()).decode()
        r = await client.post(url, headers={"Authorization": f"Basic {basic}"}, data=body)
    else:
        r = await client.post(url, json={**body, "client_id": oc["id"],
                                         "client_secret": oc["secret"]})
    assert r.status_code == 201, r.text
    tok = r.json()["access_token"]
    async with app.state.sessionmaker() as db:
        row = (await db.execute(select(AccessToken).where(AccessToken.token_hash == digest(tok)))
               ).scalar_one()
        assert row.customer_id is not None and row.client == oc["id"]
    entries = await product_audit(client, shop["owner"], p)
    [created] = [e for e in entries if e["action"] == "customer.created"]
    assert created["actor"] == oc["id"] and created["details"]["via"] == "oauth_client"
    # the customer can log in through the product's client
    r = await password_login(client, oc, "cust@example.com", CUSTOMER_PASSWORD)
    assert r.status_code == 200, r.text
    r = await client.post(f"/v1/products/{p['id']}/device_claims",
                          headers=bearer(r.json()["access_token"]))
    assert r.status_code == 200, r.text


async def test_shadow_customer(client, app, shop):
    p, oc = shop["p"], shop["oc"]
    r = await client.post(f"/v1/products/{p['id']}/customers", data={
        "email": "shadow@example.com", "no_password": "true",
        "client_id": oc["id"], "client_secret": oc["secret"]})
    assert r.status_code == 201, r.text
    assert TOKEN.match(r.json()["access_token"])
    assert (await get_customer(app, "shadow@example.com")).password_hash is None
    # no password to log in with; the backend gets tokens with client credentials
    for pw in ("", "anything at all"):
        r = await password_login(client, oc, "shadow@example.com", pw)
        assert r.status_code == 400 and r.json()["error"] in ("invalid_grant", "invalid_request")
    r = await customer_grant(client, oc, "Shadow@Example.com")
    assert r.status_code == 200, r.text
    body = r.json()
    assert "scope" not in body and TOKEN.match(body["access_token"])
    cust_tok = body["access_token"]
    assert_any_error(await client.get(f"/v1/products/{p['id']}", headers=bearer(cust_tok)), 403)
    async with app.state.sessionmaker() as db:
        row = (await db.execute(select(AccessToken).where(
            AccessToken.token_hash == digest(cust_tok)))).scalar_one()
        assert row.customer_id is not None and row.scopes == []
    # a team member may not make shadow customers with a bearer token
    assert_any_error(await client.post(f"/v1/products/{p['id']}/customers",
                                       headers=bearer(shop["owner"]),
                                       json={"email": "s2@example.com", "no_password": True}), 400)


@pytest.mark.parametrize("body", [
    {},
    {"email": "not-an-email", "password": CUSTOMER_PASSWORD},
    {"email": 5, "password": CUSTOMER_PASSWORD},
    {"email": "a@example.com"},
    {"email": "a@example.com", "password": "short"},
    {"email": "a@example.com", "password": 12345678},
    {"email": "a@example.com", "password": "x" * 300},
    {"email": "a@example.com", "password": CUSTOMER_PASSWORD, "no_password": True},
    {"email": "a@example.com", "no_password": "perhaps"},
])
async def test_create_validation(client, app, shop, body):
    oc = shop["oc"]
    r = await client.post(f"/v1/products/{shop['p']['id']}/customers",
                          json={**body, "client_id": oc["id"], "client_secret": oc["secret"]})
    assert_any_error(r, 400)
    async with app.state.sessionmaker() as db:
        assert (await db.execute(select(Customer))).first() is None


async def test_email_unique_per_product(client, app, shop):
    p, other, owner = shop["p"], shop["other"], shop["owner"]
    await make_customer(client, owner, p, "cust@example.com")
    r = await client.post(f"/v1/products/{p['id']}/customers", headers=bearer(owner),
                          json={"email": "CUST@example.com", "password": CUSTOMER_PASSWORD})
    body = assert_any_error(r, 409, "customer_exists")
    assert "already exists" in body["error_description"]
    # the same e-mail may be a customer of another product
    await make_customer(client, owner, other, "cust@example.com")


async def test_client_credentials_checks(client, app, shop):
    p, other, owner = shop["p"], shop["other"], shop["owner"]
    body = {"email": "cust@example.com", "password": CUSTOMER_PASSWORD}
    url = f"/v1/products/{p['id']}/customers"
    # wrong secret, unknown client, missing secret
    oc = shop["oc"]
    assert_any_error(await client.post(url, data={**body, "client_id": oc["id"],
                                                  "client_secret": "0" * 48}), 400, "invalid_client")
    assert_any_error(await client.post(url, data={**body, "client_id": "no-such-client",
                                                  "client_secret": "x"}), 400, "invalid_client")
    assert_any_error(await client.post(url, data={**body, "client_id": oc["id"]}), 400)
    # a client of another product does not see this one
    far = await make_client(client, owner, other, name="far")
    r = await client.post(url, data={**body, "client_id": far["id"], "client_secret": far["secret"]})
    assert assert_any_error(r, 404)["error_description"] == "Product not found"
    # a client limited to other scopes may not create customers; customers:create may
    reader = await make_client(client, owner, p, name="reader", scope="products:get")
    r = await client.post(url, data={**body, "client_id": reader["id"],
                                     "client_secret": reader["secret"]})
    assert assert_any_error(r, 403, "forbidden")["required"] == "customers:create"
    maker = await make_client(client, owner, p, name="maker", scope="customers:create")
    r = await client.post(url, data={**body, "client_id": maker["id"],
                                     "client_secret": maker["secret"]})
    assert r.status_code == 201, r.text
    # neither a token nor client credentials
    assert_any_error(await client.post(url, json=body), 401)


async def test_team_roles_for_customer_routes(client, app, shop):
    p, owner = shop["p"], shop["owner"]
    viewer = await new_user(client, "viewer@example.com")
    await add_role(app, "viewer@example.com", p, "View-only")
    support = await new_user(client, "support@example.com")
    await add_role(app, "support@example.com", p, "Support")
    outsider = await new_user(client, "outsider@example.com")
    await make_customer(client, owner, p, "cust@example.com")
    body = {"email": "new@example.com", "password": CUSTOMER_PASSWORD}
    base = f"/v1/products/{p['id']}/customers"
    assert assert_any_error(await client.post(base, headers=bearer(support), json=body),
                            403)["required"] == "customers:create"
    assert_any_error(await client.post(base, headers=bearer(outsider), json=body), 404)
    assert (await client.get(base, headers=bearer(viewer))).status_code == 200
    assert_any_error(await client.get(base, headers=bearer(outsider)), 404)
    assert_any_error(await client.put(f"{base}/cust@example.com", headers=bearer(viewer),
                                      json={"password": "new password 1"}), 403)
    r = await client.put(f"{base}/cust@example.com", headers=bearer(support),
                         json={"password": "new password 1"})
    assert r.status_code == 200 and r.json() == {"ok": True}
    assert_any_error(await client.delete(f"{base}/cust@example.com", headers=bearer(support)), 403)


# --- listing -----------------------------------------------------------------------------

async def test_list_customers_with_devices_and_paging(client, app, shop):
    p, other, owner = shop["p"], shop["other"], shop["owner"]
    toks = {}
    for i in range(3):
        toks[i] = await make_customer(client, owner, p, f"c{i}@example.com")
    await make_customer(client, owner, other, "elsewhere@example.com")
    await add_device(app, PRODUCT_DEV, p["id"])
    await add_device(app, "0123456789abcdef00000000", p["id"])
    assert (await claim(client, toks[1], PRODUCT_DEV)).status_code == 200
    assert (await claim(client, toks[1], "0123456789abcdef00000000")).status_code == 200

    r = await client.get(f"/v1/products/{p['slug']}/customers", headers=bearer(owner))
    assert r.status_code == 200, r.text
    body = r.json()
    assert [c["username"] for c in body["customers"]] == [f"c{i}@example.com" for i in range(3)]
    assert body["customers"][1]["devices"] == ["0123456789abcdef00000000", PRODUCT_DEV]
    assert body["customers"][0]["devices"] == [] and isinstance(body["customers"][0]["id"], int)
    assert body["meta"]["total_pages"] == 1
    r = await client.get(f"/v1/products/{p['id']}/customers", headers=bearer(owner),
                         params={"page": 2, "per_page": 2})
    body = r.json()
    assert [c["username"] for c in body["customers"]] == ["c2@example.com"]
    assert body["meta"]["total_pages"] == 2
    r = await client.get(f"/v1/products/{p['id']}/customers", headers=bearer(owner),
                         params={"perPage": 1})
    assert len(r.json()["customers"]) == 1 and r.json()["meta"]["total_pages"] == 3
    for bad in ({"page": 0}, {"per_page": "x"}, {"per_page": 100000}):
        assert_any_error(await client.get(f"/v1/products/{p['id']}/customers",
                                          headers=bearer(owner), params=bad), 400)


# --- update and delete ---------------------------------------------------------------------

async def test_update_customer_password(client, app, shop):
    p, oc, owner = shop["p"], shop["oc"], shop["owner"]
    await make_customer(client, owner, p, "cust@example.com")
    base = f"/v1/products/{p['id']}/customers"
    r = await client.put(f"{base}/CUST@example.com", headers=bearer(owner),
                         data={"password": "brand new secret"})
    assert r.status_code == 200 and r.json() == {"ok": True}
    assert (await password_login(client, oc, "cust@example.com", CUSTOMER_PASSWORD)
            ).status_code == 400
    assert (await password_login(client, oc, "cust@example.com", "brand new secret")
            ).status_code == 200
    assert_any_error(await client.put(f"{base}/cust@example.com", headers=bearer(owner),
                                      json={"password": "short"}), 400)
    assert_any_error(await client.put(f"{base}/cust@example.com", headers=bearer(owner), json={}), 400)
    body = assert_any_error(await client.put(f"{base}/nobody@example.com", headers=bearer(owner),
                                             json={"password": "brand new secret"}), 404)
    assert body["error_description"] == "Customer not found"
    # a customer of another product is not found here
    await make_customer(client, owner, shop["other"], "far@example.com")
    assert_any_error(await client.put(f"{base}/far@example.com", headers=bearer(owner),
                                      json={"password": "brand new secret"}), 404)
    entries = await product_audit(client, owner, p)
    assert [e["action"] for e in entries].count("customer.updated") == 1


async def test_shadow_customer_gets_a_password(client, app, shop):
    p, oc = shop["p"], shop["oc"]
    r = await client.post(f"/v1/products/{p['id']}/customers", data={
        "email": "shadow@example.com", "no_password": "1",
        "client_id": oc["id"], "client_secret": oc["secret"]})
    assert r.status_code == 201, r.text
    r = await client.put(f"/v1/products/{p['id']}/customers/shadow@example.com",
                         headers=bearer(shop["owner"]), json={"password": "now i have one"})
    assert r.status_code == 200, r.text
    assert (await password_login(client, oc, "shadow@example.com", "now i have one")
            ).status_code == 200


async def test_delete_customer_revokes_and_releases(client, app, shop):
    p, oc, owner = shop["p"], shop["oc"], shop["owner"]
    cust = await make_customer(client, owner, p, "cust@example.com")
    cust2 = (await customer_grant(client, oc, "cust@example.com")).json()["access_token"]
    await add_device(app, PRODUCT_DEV, p["id"])
    assert (await claim(client, cust, PRODUCT_DEV)).status_code == 200
    r = await client.post("/v1/device_claims", headers=bearer(cust))
    assert r.status_code == 200
    code = r.json()["claim_code"]
    base = f"/v1/products/{p['id']}/customers"

    r = await client.delete(f"{base}/cust@example.com", headers=bearer(owner))
    assert r.status_code == 200 and r.json() == {"ok": True}
    assert await get_customer(app, "cust@example.com") is None
    for tok in (cust, cust2):
        assert_any_error(await client.get(f"/v1/products/{p['id']}", headers=bearer(tok)), 401)
    async with app.state.sessionmaker() as db:
        assert (await db.execute(select(ClaimCode).where(ClaimCode.code_hash == digest(code)))
                ).first() is None
        assert (await db.execute(select(AccessToken).where(AccessToken.customer_id.is_not(None)))
                ).first() is None
    d = await get_device(app, PRODUCT_DEV)
    assert d is not None and d.product_id == p["id"]
    assert d.customer_id is None and d.claimed_at is None
    entries = await product_audit(client, owner, p)
    [deleted] = [e for e in entries if e["action"] == "customer.deleted"]
    assert deleted["details"] == {"tokens_revoked": 2, "claim_codes_revoked": 1,
                                  "devices_released": 1}
    assert_any_error(await client.delete(f"{base}/cust@example.com", headers=bearer(owner)), 404)
    # the address is free again
    await make_customer(client, owner, p, "cust@example.com")


# --- /oauth/token for customers ------------------------------------------------------------

async def test_password_grant_for_customers(client, app, shop):
    p, oc, owner = shop["p"], shop["oc"], shop["owner"]
    await make_customer(client, owner, p, "cust@example.com")
    r = await password_login(client, oc, "Cust@Example.com", CUSTOMER_PASSWORD)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["expires_in"] > 0 and TOKEN.match(body["refresh_token"])
    async with app.state.sessionmaker() as db:
        row = (await db.execute(select(AccessToken).where(
            AccessToken.token_hash == digest(body["access_token"])))).scalar_one()
        assert row.customer_id is not None and row.user_id is None and row.client == oc["id"]
    body = assert_any_error(await password_login(client, oc, "cust@example.com", "wrong password"),
                            400, "invalid_grant")
    assert body["error_description"] == "User credentials are invalid"
    # customers are not people: other clients do not log them in
    r = await client.post("/oauth/token", data={
        "grant_type": "password", "username": "cust@example.com", "password": CUSTOMER_PASSWORD,
        "client_id": "particle-api", "client_secret": "particle-api"})
    assert_any_error(r, 400, "invalid_grant")
    far = await make_client(client, owner, shop["other"], name="far")
    assert_any_error(await password_login(client, far, "cust@example.com", CUSTOMER_PASSWORD),
                     400, "invalid_grant")
    # people still log in through a product client
    r = await password_login(client, oc, "owner@example.com", "correct horse battery")
    assert r.status_code == 200, r.text
    r = await client.get("/v1/user", headers=bearer(r.json()["access_token"]))
    assert r.status_code == 200 and r.json()["username"] == "owner@example.com"


async def test_person_who_is_also_a_customer(client, app, shop):
    p, oc, owner = shop["p"], shop["oc"], shop["owner"]
    await new_user(client, "both@example.com")
    await make_customer(client, owner, p, "both@example.com")
    r = await password_login(client, oc, "both@example.com", CUSTOMER_PASSWORD)
    assert r.status_code == 200
    assert_any_error(await client.get("/v1/user", headers=bearer(r.json()["access_token"])), 403)
    person = await login(client, "both@example.com")
    assert (await client.get("/v1/user", headers=bearer(person))).status_code == 200


async def test_client_credentials_customer_scope(client, app, shop):
    p, oc, owner = shop["p"], shop["oc"], shop["owner"]
    await make_customer(client, owner, p, "cust@example.com")
    await make_customer(client, owner, shop["other"], "far@example.com")
    r = await customer_grant(client, oc, "cust@example.com", expires_in="3600")
    assert r.status_code == 200, r.text
    assert r.json()["expires_in"] == 3600
    tok = r.json()["access_token"]
    assert_any_error(await client.get(f"/v1/products/{p['id']}/customers", headers=bearer(tok)), 403)
    for scope in ("customer=nobody@example.com", "customer=far@example.com", "customer=",
                  "devices:list", "user=cust@example.com"):
        r = await client.post("/oauth/token", data={
            "grant_type": "client_credentials", "client_id": oc["id"],
            "client_secret": oc["secret"], "scope": scope})
        assert_any_error(r, 400, "invalid_scope")
    # without a scope the client still gets its own (client) token
    r = await client.post("/oauth/token", data={
        "grant_type": "client_credentials", "client_id": oc["id"], "client_secret": oc["secret"]})
    assert r.status_code == 200
    async with app.state.sessionmaker() as db:
        row = (await db.execute(select(AccessToken).where(
            AccessToken.token_hash == digest(r.json()["access_token"])))).scalar_one()
        assert row.customer_id is None and row.oauth_client_id is not None


async def test_refreshed_customer_token_stays_a_customer_token(client, app):
    """A refresh keeps the customer identity (and so the customer's devices)."""
    from helpers import bearer, new_user

    owner = await new_user(client, "refresh-owner@example.com")
    r = await client.post("/v1/user/products", headers=bearer(owner), json={"name": "Refresher"})
    slug = r.json()["product"]["slug"]
    r = await client.post(f"/v1/products/{slug}/clients", headers=bearer(owner),
                          json={"name": "app", "type": "installed"})
    cl = r.json()["client"]
    r = await client.post(f"/v1/products/{slug}/customers",
                          data={"email": "cu@example.com", "password": "customer-pass",
                                "client_id": cl["id"], "client_secret": cl["secret"]})
    assert r.status_code == 201, r.text
    first = r.json()
    issued_to = (await client.get("/v1/access_tokens/current",
                                  headers=bearer(first["access_token"]))).json()["client"]
    assert issued_to == cl["id"]
    r = await client.post("/oauth/token", data={
        "grant_type": "refresh_token", "refresh_token": first["refresh_token"],
        "client_id": cl["id"], "client_secret": cl["secret"]})
    assert r.status_code == 200, r.text
    token = r.json()["access_token"]
    r = await client.get("/v1/access_tokens/current", headers=bearer(token))
    assert r.status_code == 200
    r = await client.post("/v1/device_claims", headers=bearer(token))
    assert r.status_code == 200, r.text  # only a customer (or person) may ask for a claim code
