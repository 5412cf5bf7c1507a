"""Claim codes: creation (people, customers, product paths) and redemption by a device."""

from __future__ import annotations

import datetime as dt
import re

from sqlalchemy import delete, select

from corral.devices import claims
from corral.devices.models import ClaimCode
from corral.kit.secrets import digest
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
from test_claiming import (
    DEV_A,
    DEV_B,
    OTHER_DEV,
    PRODUCT_DEV,
    audit_actions,
    claim,
    get_device,
    make_customer,
)

URLSAFE = re.compile(r"^[A-Za-z0-9_-]{1,63}$")
ICCID = "89014103211118510720"
IMEI = "352099001761481"


async def code_row(app, code: str) -> ClaimCode | None:
    async with app.state.sessionmaker() as db:
        return (await db.execute(select(ClaimCode).where(ClaimCode.code_hash == digest(code)))
                ).scalar_one_or_none()


async def redeem(app, device_id: str, code: str) -> claims.ClaimResult:
    async with app.state.sessionmaker() as db:
        result = await claims.redeem_claim_code(db, device_id=device_id, code=code)
        await db.commit()
        return result


async def new_code(client, token: str, path: str = "/v1/device_claims", **body) -> dict:
    r = await client.post(path, headers=bearer(token), json=body)
    assert r.status_code == 200, r.text
    return r.json()


# --- creating codes ----------------------------------------------------------------------

async def test_person_claim_code_shape_and_storage(client, app, manual_clock):
    tok = await new_user(client, "ada@example.com")
    assert (await claim(client, tok, DEV_B)).status_code == 200
    assert (await claim(client, tok, DEV_A)).status_code == 200
    body = await new_code(client, tok)
    assert set(body) == {"claim_code", "device_ids"}
    code = body["claim_code"]
    assert URLSAFE.match(code) and len(code) >= 32
    assert body["device_ids"] == [DEV_A, DEV_B]
    row = await code_row(app, code)
    assert row is not None and code not in row.code_hash
    assert row.user_id == await user_id(app, "ada@example.com")
    assert row.customer_id is None and row.product_id is None and row.used_at is None
    assert row.expires_at == manual_clock.now() + dt.timedelta(hours=24)
    [entry] = await audit_actions(app, "claim_code.created")
    assert entry.actor == "ada@example.com" and code not in str(entry.details)
    # every request gets a fresh code
    assert (await new_code(client, tok))["claim_code"] != code


async def test_iccid_and_imei_become_the_code(client, app):
    ada = await new_user(client, "ada@example.com")
    bob = await new_user(client, "bob@example.com")
    assert (await new_code(client, ada, iccid=ICCID))["claim_code"] == ICCID
    assert (await new_code(client, ada, imei=IMEI))["claim_code"] == IMEI
    # asking again replaces one's own pending code; someone else holds a code of their own
    r = await client.post("/v1/device_claims", headers=bearer(ada), data={"iccid": ICCID})
    assert r.status_code == 200 and r.json()["claim_code"] == ICCID
    assert (await new_code(client, bob, iccid=ICCID))["claim_code"] == ICCID
    async with app.state.sessionmaker() as db:
        rows = (await db.execute(select(ClaimCode).where(ClaimCode.code_hash == digest(ICCID))
                                 .order_by(ClaimCode.id))).scalars().all()
        assert [r.user_id for r in rows] == [await user_id(app, "ada@example.com"),
                                             await user_id(app, "bob@example.com")]
    for body in ({"iccid": ICCID, "imei": IMEI}, {"iccid": "12ab"}, {"iccid": 5},
                 {"imei": "1" * 30}, {"imei": ["1"]}):
        assert_any_error(await client.post("/v1/device_claims", headers=bearer(ada), json=body), 400)


async def test_callers_of_device_claims(client, app):
    owner = await new_user(client, "owner@example.com")
    p = await make_product(client, owner)
    assert_any_error(await client.post("/v1/device_claims"), 401)
    r = await client.post(f"/v1/products/{p['id']}/team", headers=bearer(owner),
                          json={"friendly_name": "bot", "scopes": ["devices:update"]})
    api_tok = r.json()["created"]["tokens"][0]["token"]
    assert_any_error(await client.post("/v1/device_claims", headers=bearer(api_tok)), 403,
                     "unauthorized")
    # on the product path the scope passes, but an API user still cannot own devices
    body = assert_any_error(await client.post(f"/v1/products/{p['id']}/device_claims",
                                              headers=bearer(api_tok)), 400, "unauthorized")
    assert "API users" in body["error_description"]
    # a customer's plain code is bound to their product
    cust = await make_customer(client, owner, p, "cust@example.com")
    await add_device(app, PRODUCT_DEV, p["id"])
    assert (await claim(client, cust, PRODUCT_DEV)).status_code == 200
    body = await new_code(client, cust)
    assert body["device_ids"] == [PRODUCT_DEV]
    row = await code_row(app, body["claim_code"])
    assert row.customer_id is not None and row.user_id is None and row.product_id == p["id"]


async def test_product_claim_codes(client, app):
    owner = await new_user(client, "owner@example.com")
    p = await make_product(client, owner)
    other = await make_product(client, owner, "Other")
    viewer = await new_user(client, "viewer@example.com")
    await add_role(app, "viewer@example.com", p, "View-only")
    outsider = await new_user(client, "outsider@example.com")
    cust = await make_customer(client, owner, p, "cust@example.com")
    other_cust = await make_customer(client, owner, other, "far@example.com")
    path = f"/v1/products/{p['slug']}/device_claims"

    body = await new_code(client, owner, path)
    row = await code_row(app, body["claim_code"])
    assert row.product_id == p["id"] and row.user_id == await user_id(app, "owner@example.com")
    body = await new_code(client, cust, path, imei=IMEI)
    assert body == {"claim_code": IMEI, "device_ids": []}
    row = await code_row(app, IMEI)
    assert row.customer_id is not None and row.product_id == p["id"]
    assert_any_error(await client.post(path, headers=bearer(viewer)), 403, "forbidden")
    body = assert_any_error(await client.post(path, headers=bearer(outsider)), 404)
    assert body["error_description"] == "Product not found"
    assert_any_error(await client.post(path, headers=bearer(other_cust)), 404)
    assert_any_error(await client.post(f"/v1/products/{other['id']}/device_claims",
                                       headers=bearer(cust)), 404)
    entries = await audit_actions(app, "claim_code.created")
    assert [e.product_id for e in entries] == [p["id"], p["id"]]


# --- redeeming codes -----------------------------------------------------------------------

async def test_redeem_person_code(client, app):
    tok = await new_user(client, "ada@example.com")
    code = (await new_code(client, tok))["claim_code"]
    await add_device(app, DEV_A)  # a developer device that connected, not yet claimed
    result = await redeem(app, DEV_A.upper(), code)
    assert result.ok and result.reason is None and result.changed
    assert result.user_id == await user_id(app, "ada@example.com")
    d = await get_device(app, DEV_A)
    assert d.owner_user_id == result.user_id and d.claimed_at is not None
    row = await code_row(app, code)
    assert row.used_at is not None and row.device_id == DEV_A
    [entry] = await audit_actions(app, "device.claimed")
    assert entry.actor == "ada@example.com" and entry.details["via"] == "claim_code"
    # the same device repeating itself is fine; another device cannot reuse the code
    again = await redeem(app, DEV_A, code)
    assert again.ok and not again.changed
    await add_device(app, DEV_B)
    used = await redeem(app, DEV_B, code)
    assert not used.ok and used.reason == claims.REDEEM_USED
    assert (await get_device(app, DEV_B)).owner_user_id is None
    assert len(await audit_actions(app, "device.claimed")) == 1


async def test_redeem_expired_and_bad_input(client, app, manual_clock):
    tok = await new_user(client, "ada@example.com")
    code = (await new_code(client, tok))["claim_code"]
    await add_device(app, DEV_A)
    assert (await redeem(app, "nope", code)).reason == claims.REDEEM_INVALID_DEVICE
    assert (await redeem(app, DEV_A, "")).reason == claims.REDEEM_UNKNOWN_CODE
    assert (await redeem(app, DEV_A, "x" * 64)).reason == claims.REDEEM_UNKNOWN_CODE
    assert (await redeem(app, DEV_A, code + "x")).reason == claims.REDEEM_UNKNOWN_CODE
    assert (await redeem(app, DEV_B, code)).reason == claims.REDEEM_UNKNOWN_DEVICE
    manual_clock.advance(hours=24)
    expired = await redeem(app, DEV_A, code)
    assert not expired.ok and expired.reason == claims.REDEEM_EXPIRED
    assert (await get_device(app, DEV_A)).owner_user_id is None
    assert (await code_row(app, code)).used_at is None


async def test_redeem_just_before_expiry(client, app, manual_clock):
    tok = await new_user(client, "ada@example.com")
    code = (await new_code(client, tok))["claim_code"]
    await add_device(app, DEV_A)
    manual_clock.advance(hours=23, minutes=59)
    assert (await redeem(app, DEV_A, code)).ok


async def test_redeem_refuses_someone_elses_device(client, app):
    ada = await new_user(client, "ada@example.com")
    bob = await new_user(client, "bob@example.com")
    assert (await claim(client, bob, DEV_A)).status_code == 200
    code = (await new_code(client, ada))["claim_code"]
    result = await redeem(app, DEV_A, code)
    assert not result.ok and result.reason == claims.SOMEONE_ELSE
    assert (await get_device(app, DEV_A)).owner_user_id == await user_id(app, "bob@example.com")
    assert (await code_row(app, code)).used_at is None


async def test_redeem_customer_code(client, app):
    owner, (p, other) = await owner_with_products(client, app,
                                                  {"Widget": PRODUCT_DEV, "Other": OTHER_DEV})
    await add_device(app, DEV_A)
    cust = await make_customer(client, owner, p, "cust@example.com")
    code = (await new_code(client, cust))["claim_code"]

    assert (await redeem(app, OTHER_DEV, code)).reason == claims.REDEEM_WRONG_PRODUCT
    assert (await redeem(app, DEV_A, code)).reason == claims.REDEEM_WRONG_PRODUCT
    result = await redeem(app, PRODUCT_DEV, code)
    assert result.ok and result.customer_id is not None and result.user_id is None
    d = await get_device(app, PRODUCT_DEV)
    assert d.customer_id == result.customer_id and d.owner_user_id is None
    # the customer now reaches the device (e.g. may unclaim it)
    r = await client.delete(f"/v1/devices/{PRODUCT_DEV}", headers=bearer(cust))
    assert r.status_code == 200, r.text


async def test_redeem_product_bound_person_code(client, app):
    owner = await new_user(client, "owner@example.com")
    p = await make_product(client, owner)
    await add_device(app, PRODUCT_DEV, p["id"])
    await add_device(app, DEV_A)
    code = (await new_code(client, owner, f"/v1/products/{p['id']}/device_claims"))["claim_code"]
    assert (await redeem(app, DEV_A, code)).reason == claims.REDEEM_WRONG_PRODUCT
    result = await redeem(app, PRODUCT_DEV, code)
    assert result.ok
    assert (await get_device(app, PRODUCT_DEV)).owner_user_id == await user_id(
        app, "owner@example.com")


async def test_redeem_person_code_on_a_product_they_cannot_see(client, app):
    owner = await new_user(client, "owner@example.com")
    p = await make_product(client, owner)
    await add_device(app, PRODUCT_DEV, p["id"])
    outsider = await new_user(client, "outsider@example.com")
    code = (await new_code(client, outsider))["claim_code"]
    result = await redeem(app, PRODUCT_DEV, code)
    assert not result.ok and result.reason == claims.NOT_FOUND
    assert (await get_device(app, PRODUCT_DEV)).owner_user_id is None


async def test_redeem_iccid_code(client, app):
    tok = await new_user(client, "ada@example.com")
    iccid = "8901410321111851072f"  # some ICCIDs end in a hex F; stored upper-case
    assert (await new_code(client, tok, iccid=iccid))["claim_code"] == iccid.upper()
    await add_device(app, DEV_A, cellular=True, iccid=iccid.upper())
    assert (await redeem(app, DEV_A, iccid)).ok
    assert (await get_device(app, DEV_A)).owner_user_id is not None


async def test_iccid_code_cannot_be_squatted_across_tenants(client, app):
    """Another tenant creating a claim code equal to a device's ICCID neither blocks the
    device's real owner (it was a 409 claim_code_taken for 24 hours) nor claims the device."""
    owner, (p,) = await owner_with_products(client, app, {"Tracker": PRODUCT_DEV})
    async with app.state.sessionmaker() as db:
        from corral.devices.models import Device
        d = await db.get(Device, PRODUCT_DEV)
        d.iccid, d.cellular = ICCID, True
        await db.commit()
    squatter = await new_user(client, "squatter@example.com")
    assert (await new_code(client, squatter, iccid=ICCID))["claim_code"] == ICCID
    # the owner still gets the code (newer than the squatter's, then older: both orders)
    assert (await new_code(client, owner, iccid=ICCID))["claim_code"] == ICCID
    assert (await new_code(client, squatter, iccid=ICCID))["claim_code"] == ICCID
    result = await redeem(app, PRODUCT_DEV, ICCID)
    assert result.ok and result.user_id == await user_id(app, "owner@example.com")
    assert (await get_device(app, PRODUCT_DEV)).owner_user_id == result.user_id
    # the squatter's code alone never claims it
    async with app.state.sessionmaker() as db:
        await db.execute(delete(ClaimCode).where(
            ClaimCode.user_id == await user_id(app, "owner@example.com")))
        d = await db.get(Device, PRODUCT_DEV)
        d.owner_user_id = None
        await db.commit()
    refused = await redeem(app, PRODUCT_DEV, ICCID)
    assert not refused.ok and refused.user_id == await user_id(app, "squatter@example.com")
    assert (await get_device(app, PRODUCT_DEV)).owner_user_id is None
