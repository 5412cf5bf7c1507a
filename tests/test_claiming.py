"""Claiming and unclaiming devices: people, product team members, customers."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select

from corral.audit.models import AuditEntry
from corral.devices.models import Device
from helpers import (
    add_device,
    add_role,
    assert_any_error,
    bearer,
    make_product,
    new_user,
    owner_with_products,
    user_id,
)

BELONGS = "That belongs to someone else."
DEV_A = "aaaaaaaaaaaaaaaaaaaaaaaa"
DEV_B = "bbbbbbbbbbbbbbbbbbbbbbbb"
DEV_C = "cccccccccccccccccccccccc"
PRODUCT_DEV = "0123456789abcdef01234567"
OTHER_DEV = "fedcba9876543210fedcba98"
CUSTOMER_PASSWORD = "customer secret 1"


# --- helpers shared with test_claim_codes.py and test_customers.py -------------------------

async def get_device(app, device_id: str) -> Device | None:
    async with app.state.sessionmaker() as db:
        return await db.get(Device, device_id)


async def make_customer(client, team_token: str, product: dict[str, Any], email: str,
                        password: str = CUSTOMER_PASSWORD) -> str:
    """Create a customer with a team member's token; returns the customer's token."""
    r = await client.post(f"/v1/products/{product['id']}/customers", headers=bearer(team_token),
                          json={"email": email, "password": password})
    assert r.status_code == 201, r.text
    return r.json()["access_token"]


async def audit_actions(app, action: str) -> list[AuditEntry]:
    async with app.state.sessionmaker() as db:
        return list((await db.execute(select(AuditEntry).where(AuditEntry.action == action)
                                      .order_by(AuditEntry.id))).scalars())


async def claim(client, token: str, device_id: str, **extra: Any):
    return await client.post("/v1/devices", headers=bearer(token),
                             json={"id": device_id, "request_transfer": False, **extra})


# --- claiming developer devices ---------------------------------------------------------------

async def test_claim_unknown_device_creates_developer_device(client, app):
    tok = await new_user(client, "ada@example.com")
    r = await claim(client, tok, DEV_A.upper())
    assert r.status_code == 200, r.text
    assert r.json() == {"ok": True, "deviceID": DEV_A, "claimed": True}
    d = await get_device(app, DEV_A)
    assert d is not None and d.product_id is None
    assert d.owner_user_id == await user_id(app, "ada@example.com") and d.customer_id is None
    assert d.claimed_at is not None
    [entry] = await audit_actions(app, "device.claimed")
    assert entry.target_id == DEV_A and entry.actor == "ada@example.com"
    # claiming it again is fine and changes nothing
    r = await claim(client, tok, DEV_A)
    assert r.status_code == 200 and r.json()["deviceID"] == DEV_A
    assert len(await audit_actions(app, "device.claimed")) == 1


async def test_claim_form_encoded(client, app):
    tok = await new_user(client, "ada@example.com")
    r = await client.post("/v1/devices", headers=bearer(tok),
                          data={"id": DEV_B, "request_transfer": "false"})
    assert r.status_code == 200, r.text
    assert r.json()["deviceID"] == DEV_B
    assert (await get_device(app, DEV_B)).owner_user_id is not None


async def test_someone_elses_device_is_403_with_the_cli_phrase(client, app):
    ada = await new_user(client, "ada@example.com")
    bob = await new_user(client, "bob@example.com")
    assert (await claim(client, ada, DEV_A)).status_code == 200
    for transfer in (False, True):
        r = await claim(client, bob, DEV_A, request_transfer=transfer)
        assert r.status_code == 403, r.text
        assert r.json() == {"ok": False, "error": "forbidden", "errors": [BELONGS],
                            "error_description": BELONGS}
    assert (await get_device(app, DEV_A)).owner_user_id == await user_id(app, "ada@example.com")


async def test_claim_bad_input_and_callers(client, app):
    tok = await new_user(client, "ada@example.com")
    for body in ({}, {"id": ""}, {"id": 5}, {"id": "abc"}, {"id": "g" * 24}, {"id": DEV_A + "0"}):
        assert_any_error(await client.post("/v1/devices", headers=bearer(tok), json=body), 400)
    assert_any_error(await client.post("/v1/devices", headers=bearer(tok),
                                       json={"id": DEV_A, "request_transfer": "maybe"}), 400)
    assert_any_error(await client.post("/v1/devices", json={"id": DEV_A}), 401)
    # API users cannot own devices
    p = await make_product(client, tok)
    r = await client.post(f"/v1/products/{p['id']}/team", headers=bearer(tok),
                          json={"friendly_name": "bot", "scopes": ["devices:update"]})
    api_tok = r.json()["created"]["tokens"][0]["token"]
    body = assert_any_error(await claim(client, api_tok, DEV_A), 403, "unauthorized")
    assert "API users" in body["error_description"]
    assert await get_device(app, DEV_A) is None


# --- product devices -----------------------------------------------------------------------

async def test_product_device_needs_a_role_with_devices_update(client, app):
    owner = await new_user(client, "owner@example.com")
    p = await make_product(client, owner)
    await add_device(app, PRODUCT_DEV, p["id"])
    viewer = await new_user(client, "viewer@example.com")
    await add_role(app, "viewer@example.com", p, "View-only")
    support = await new_user(client, "support@example.com")
    await add_role(app, "support@example.com", p, "Support")
    dev = await new_user(client, "dev@example.com")
    await add_role(app, "dev@example.com", p, "Developer")
    outsider = await new_user(client, "outsider@example.com")

    body = assert_any_error(await claim(client, outsider, PRODUCT_DEV), 404)
    assert body["error_description"] == "Device not found"
    body = assert_any_error(await claim(client, viewer, PRODUCT_DEV), 403, "forbidden")
    assert body["required"] == "devices:update"
    r = await claim(client, support, PRODUCT_DEV)
    assert r.status_code == 200, r.text
    d = await get_device(app, PRODUCT_DEV)
    assert d.owner_user_id == await user_id(app, "support@example.com")
    assert d.product_id == p["id"]
    # now it belongs to the Support member; the Developer gets the CLI phrase
    r = await claim(client, dev, PRODUCT_DEV)
    assert r.status_code == 403 and r.json()["errors"] == [BELONGS]
    # the outsider still cannot even see it
    assert_any_error(await claim(client, outsider, PRODUCT_DEV), 404)
    [entry] = await audit_actions(app, "device.claimed")
    assert entry.product_id == p["id"] and entry.org_id == p["org_id"]


async def test_denied_device_cannot_be_claimed(client, app):
    owner = await new_user(client, "owner@example.com")
    p = await make_product(client, owner)
    await add_device(app, PRODUCT_DEV, p["id"], denied=True)
    body = assert_any_error(await claim(client, owner, PRODUCT_DEV), 403, "forbidden")
    assert "denied" in body["error_description"]
    assert (await get_device(app, PRODUCT_DEV)).owner_user_id is None


async def test_customer_claims_only_devices_of_their_product(client, app):
    owner, (p, other) = await owner_with_products(client, app,
                                                  {"Widget": PRODUCT_DEV, "Other": OTHER_DEV})
    cust = await make_customer(client, owner, p, "cust@example.com")
    cust2 = await make_customer(client, owner, p, "cust2@example.com")
    assert (await claim(client, owner, DEV_A)).status_code == 200  # a developer device

    assert_any_error(await claim(client, cust, OTHER_DEV), 404)
    assert_any_error(await claim(client, cust, DEV_A), 404)
    assert_any_error(await claim(client, cust, DEV_B), 404)  # unknown ids are not created
    assert await get_device(app, DEV_B) is None
    r = await claim(client, cust, PRODUCT_DEV)
    assert r.status_code == 200, r.text
    assert r.json() == {"ok": True, "deviceID": PRODUCT_DEV, "claimed": True}
    d = await get_device(app, PRODUCT_DEV)
    assert d.customer_id is not None and d.owner_user_id is None and d.claimed_at is not None
    assert (await claim(client, cust, PRODUCT_DEV)).status_code == 200  # idempotent
    r = await claim(client, cust2, PRODUCT_DEV)
    assert r.status_code == 403 and r.json()["errors"] == [BELONGS]
    # a team member cannot take a customer's device either
    r = await claim(client, owner, PRODUCT_DEV)
    assert r.status_code == 403 and r.json()["errors"] == [BELONGS]
    [entry] = [e for e in await audit_actions(app, "device.claimed") if e.target_id == PRODUCT_DEV]
    assert entry.actor == "cust@example.com" and entry.details["customer"] == "cust@example.com"


# --- unclaiming --------------------------------------------------------------------------

async def test_unclaim_developer_device_deletes_it(client, app):
    ada = await new_user(client, "ada@example.com")
    bob = await new_user(client, "bob@example.com")
    assert (await claim(client, ada, DEV_A)).status_code == 200
    body = assert_any_error(await client.delete(f"/v1/devices/{DEV_A}", headers=bearer(bob)), 404)
    assert body["error_description"] == "Device not found"
    r = await client.delete(f"/v1/devices/{DEV_A.upper()}", headers=bearer(ada))
    assert r.status_code == 200 and r.json() == {"ok": True}
    assert await get_device(app, DEV_A) is None
    [entry] = await audit_actions(app, "device.unclaimed")
    assert entry.target_id == DEV_A and entry.details["deleted"] is True
    assert_any_error(await client.delete(f"/v1/devices/{DEV_A}", headers=bearer(ada)), 404)
    # now anyone may claim the id afresh
    assert (await claim(client, bob, DEV_A)).status_code == 200


async def test_unclaim_product_device_keeps_it_usable(client, app):
    owner = await new_user(client, "owner@example.com")
    p = await make_product(client, owner)
    await add_device(app, PRODUCT_DEV, p["id"], name="kept")
    viewer = await new_user(client, "viewer@example.com")
    await add_role(app, "viewer@example.com", p, "View-only")
    support = await new_user(client, "support@example.com")
    await add_role(app, "support@example.com", p, "Support")
    outsider = await new_user(client, "outsider@example.com")
    cust = await make_customer(client, owner, p, "cust@example.com")
    assert (await claim(client, cust, PRODUCT_DEV)).status_code == 200

    assert_any_error(await client.delete(f"/v1/devices/{PRODUCT_DEV}", headers=bearer(outsider)), 404)
    body = assert_any_error(await client.delete(f"/v1/devices/{PRODUCT_DEV}",
                                                headers=bearer(viewer)), 403)
    assert body["required"] == "devices:update"
    # the customer releases their own device
    r = await client.delete(f"/v1/devices/{PRODUCT_DEV}", headers=bearer(cust))
    assert r.status_code == 200 and r.json() == {"ok": True}
    d = await get_device(app, PRODUCT_DEV)
    assert d is not None and d.product_id == p["id"] and d.name == "kept"
    assert (d.owner_user_id, d.customer_id, d.claimed_at) == (None, None, None)
    # the customer no longer reaches it: another customer's device does not exist for them
    r = await client.delete(f"/v1/devices/{PRODUCT_DEV}", headers=bearer(cust))
    assert r.status_code == 404, r.text
    # a Support member claims it, and can be unclaimed by another team member
    assert (await claim(client, support, PRODUCT_DEV)).status_code == 200
    r = await client.delete(f"/v1/devices/{PRODUCT_DEV}", headers=bearer(owner))
    assert r.status_code == 200
    assert (await get_device(app, PRODUCT_DEV)).owner_user_id is None
    entries = await audit_actions(app, "device.unclaimed")
    assert [e.product_id for e in entries] == [p["id"], p["id"]]
    assert entries[0].actor == "cust@example.com" and entries[1].actor == "owner@example.com"


async def test_customer_cannot_unclaim_another_customers_device(client, app):
    owner = await new_user(client, "owner@example.com")
    p = await make_product(client, owner)
    await add_device(app, PRODUCT_DEV, p["id"])
    cust = await make_customer(client, owner, p, "cust@example.com")
    cust2 = await make_customer(client, owner, p, "cust2@example.com")
    assert (await claim(client, cust, PRODUCT_DEV)).status_code == 200
    r = await client.delete(f"/v1/devices/{PRODUCT_DEV}", headers=bearer(cust2))
    assert r.status_code == 404, r.text
    assert (await get_device(app, PRODUCT_DEV)).customer_id is not None


async def test_remove_product_device_owner(client, app):
    owner, (p, other) = await owner_with_products(client, app,
                                                  {"Widget": PRODUCT_DEV, "Other": OTHER_DEV})
    viewer = await new_user(client, "viewer@example.com")
    await add_role(app, "viewer@example.com", p, "View-only")
    cust = await make_customer(client, owner, p, "cust@example.com")
    assert (await claim(client, cust, PRODUCT_DEV)).status_code == 200

    url = f"/v1/products/{p['slug']}/devices/{PRODUCT_DEV}/owner"
    assert_any_error(await client.delete(url, headers=bearer(viewer)), 403)
    assert_any_error(await client.delete(url, headers=bearer(cust)), 403)  # a team route
    body = assert_any_error(await client.delete(
        f"/v1/products/{p['slug']}/devices/{OTHER_DEV}/owner", headers=bearer(owner)), 404)
    assert body["error_description"] == "Device not found"
    assert_any_error(await client.delete(f"/v1/products/{p['slug']}/devices/nope/owner",
                                         headers=bearer(owner)), 404)
    r = await client.delete(url, headers=bearer(owner))
    assert r.status_code == 200 and r.json() == {"ok": True}
    d = await get_device(app, PRODUCT_DEV)
    assert d.product_id == p["id"] and d.customer_id is None and d.claimed_at is None
    [entry] = await audit_actions(app, "device.unclaimed")
    assert entry.product_id == p["id"] and entry.details["customer_id"] is not None
    # unclaiming an unclaimed device is fine and records nothing
    assert (await client.delete(url, headers=bearer(owner))).status_code == 200
    assert len(await audit_actions(app, "device.unclaimed")) == 1
    # the released device can be claimed again
    assert (await claim(client, cust, PRODUCT_DEV)).status_code == 200
