"""Admission of connecting devices: quarantine, approval, denial, auto-approval."""

from __future__ import annotations

from sqlalchemy import update

from corral.devices import service
from corral.devices.models import Device
from corral.products.models import Product
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

NEW = "feedfacefeedfacefeedface"


async def admit(app, device_id: str, product_id: int | None, **kw) -> service.Admission:
    async with app.state.sessionmaker() as db:
        result = await service.admit(db, device_id=device_id, product_id=product_id, **kw)
        await db.commit()
    return result


async def set_quarantine(app, product_id: int, on: bool) -> None:
    async with app.state.sessionmaker() as db:
        product = await db.get(Product, product_id)
        product.settings = {**product.settings, "quarantine": on}
        await db.commit()


async def test_unknown_device_is_quarantined_then_approved(app, client):
    tok, p = await owner_and_product(client)
    a = await admit(app, NEW.upper(), p["id"], platform_id=13)
    assert a.decision == "quarantined" and a.device is not None and a.device.id == NEW
    d = await load(app, NEW)
    assert d.product_id == p["id"] and d.quarantined and d.platform_id == 13
    assert d.imported_at is None
    # it keeps being quarantined until approved
    assert (await admit(app, NEW, p["id"])).decision == "quarantined"
    assert await device_count(app) == 1
    r = await client.get(f"/v1/products/{p['slug']}/devices", headers=bearer(tok),
                         params={"quarantined": "true"})
    assert [x["id"] for x in r.json()["devices"]] == [NEW]
    # approve = import it
    body = (await post_ids(client, tok, p["slug"], id=NEW)).json()
    assert body["updatedDeviceIds"] == [NEW]
    assert not (await load(app, NEW)).quarantined
    assert (await admit(app, NEW, p["id"])).decision == "accepted"
    assert [e.action for e in await audit_actions(app, "device.")] == ["device.quarantined"]


async def test_approve_with_put_quarantined_false(app, client):
    tok, p = await owner_and_product(client)
    await admit(app, NEW, p["id"])
    r = await client.put(f"/v1/products/{p['slug']}/devices/{NEW}", headers=bearer(tok),
                         json={"quarantined": False})
    assert r.status_code == 200 and r.json()["quarantined"] is False, r.text
    assert (await admit(app, NEW, p["id"])).decision == "accepted"


async def test_deny_then_refused_and_reapproved(app, client):
    tok, p = await owner_and_product(client)
    await admit(app, NEW, p["id"])
    # particle-api-js removeDevice({product, deny: true}) sends JSON {"deny": true}
    r = await client.request("DELETE", f"/v1/products/{p['slug']}/devices/{NEW}",
                             headers=bearer(tok), json={"deny": True})
    assert r.status_code == 204, r.text
    a = await admit(app, NEW, p["id"])
    assert a.decision == "denied" and not a.accepted
    assert (await admit(app, NEW, None)).decision == "denied"  # its own product decides
    d = await load(app, NEW)
    assert d.denied and not d.quarantined and d.product_id == p["id"]
    r = await client.get(f"/v1/products/{p['slug']}/devices/{NEW}", headers=bearer(tok))
    assert r.json()["denied"] is True
    # importing it again approves it
    body = (await post_ids(client, tok, p["slug"], id=NEW)).json()
    assert body["updatedDeviceIds"] == [NEW]
    assert (await admit(app, NEW, p["id"])).decision == "accepted"


async def test_auto_approve_when_quarantine_is_off(app, client):
    tok, p = await owner_and_product(client, settings={"quarantine": False})
    a = await admit(app, NEW, p["id"])
    assert a.decision == "accepted" and a.device is not None and not a.device.quarantined
    d = await load(app, NEW)
    assert d.product_id == p["id"] and d.platform_id == 12 and not d.quarantined
    entries = await audit_actions(app, "device.auto_approved")
    assert len(entries) == 1 and entries[0].target_id == NEW
    assert entries[0].product_id == p["id"]
    # the setting can change later; known devices are unaffected
    await set_quarantine(app, p["id"], True)
    assert (await admit(app, NEW, p["id"])).decision == "accepted"


async def test_wrong_product_unknown_product_and_unknown_device(app, client):
    tok, p = await owner_and_product(client)
    _, other = await owner_and_product(client, "bob@example.com", name="Gadget")
    await seed(app, {"id": NEW, "product_id": other["id"]})
    a = await admit(app, NEW, p["id"])
    assert a.decision == "wrong_product" and str(other["id"]) in a.reason
    assert (await load(app, NEW)).product_id == other["id"]
    assert (await admit(app, NEW, 999_999)).decision == "unknown_product"
    assert (await admit(app, "0" * 24, None)).decision == "unknown_device"
    assert (await admit(app, "not-a-device", p["id"])).decision == "unknown_device"
    assert (await admit(app, NEW, None)).decision == "accepted"
    assert await device_count(app) == 1


async def test_developer_devices_claiming_a_product(app, client):
    tok, p = await owner_and_product(client)
    await new_user(client, "dev@example.com")
    await new_user(client, "stranger@example.com")
    await add_role(app, "dev@example.com", p, "Developer")
    dev = await user_id(app, "dev@example.com")
    stranger = await user_id(app, "stranger@example.com")
    mine, theirs = "1" * 24, "2" * 24
    await seed(app, {"id": mine, "owner_user_id": dev}, {"id": theirs, "owner_user_id": stranger})
    # a team member's developer device flashed with product firmware joins (quarantined)
    a = await admit(app, mine, p["id"])
    assert a.decision == "quarantined"
    d = await load(app, mine)
    assert d.product_id == p["id"] and d.owner_user_id == dev
    # someone outside the team cannot push a device into the product
    assert (await admit(app, theirs, p["id"])).decision == "wrong_product"
    assert (await load(app, theirs)).product_id is None
    # with no product claimed, a developer device is simply accepted
    assert (await admit(app, theirs, None)).decision == "accepted"


async def test_admission_of_a_device_created_meanwhile(app, client):
    """Two connections racing: the insert that loses decides on the row that won."""
    tok, p = await owner_and_product(client)
    async with app.state.sessionmaker() as db:
        first = await service.admit(db, device_id=NEW, product_id=p["id"])
        await db.commit()
    assert first.decision == "quarantined"
    async with app.state.sessionmaker() as db:
        # the row exists already: the ignoring insert reports 0 rows and admit re-decides
        stmt = service._insert_ignoring_existing(db, {"id": NEW, "product_id": p["id"]})
        res = await db.execute(stmt)
        assert res.rowcount == 0
        await db.execute(update(Device).where(Device.id == NEW).values(quarantined=False))
        again = await service.admit(db, device_id=NEW, product_id=p["id"])
        await db.commit()
    assert again.decision == "accepted"
