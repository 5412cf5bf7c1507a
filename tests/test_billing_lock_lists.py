"""Cross-organization lists and a locked or inactive organization (billing.locks): products
of a shut organization are left out of ``GET /v1/products`` and ``/v1/user/products`` (they
answer 402 when opened); a device of such a product stays in its owner's ``GET /v1/devices``
(its owner still reaches it) but carries ``subscription_status``, as the organization does
in ``GET /v1/orgs``."""

from __future__ import annotations

from typing import Any

import test_billing_lifecycle as life
from helpers import add_device, add_member, assert_error, bearer, login, make_org, new_user
from meteringkit import org_product

mc, org = life.mc, life.org
Org, subscribe = life.Org, life.subscribe

LOCKED_DEV = "bb0000000000000000000001"
OPEN_DEV = "bb0000000000000000000002"


async def world(o: Org) -> dict[str, Any]:
    """Org "Acme Inc" (subscribed, product Widget) and org "Open Co" (no subscription,
    product Gizmo), both owned by the owner; dev@ is a Developer of both and owns one device
    in each product."""
    token = await o.token()
    widget = await org_product(o.client, token, o.slug, "Widget")
    other = await make_org(o.client, token, "Open Co")
    gizmo = await org_product(o.client, token, other["slug"], "Gizmo")
    await new_user(o.client, "dev@example.com")
    dev_id = await _user_id(o, "dev@example.com")
    await add_member(o.app, "dev@example.com", org_id=o.id, role="Developer")
    await add_member(o.app, "dev@example.com", org_id=other["id"], role="Developer")
    await add_device(o.app, LOCKED_DEV, widget["id"], owner_user_id=dev_id)
    await add_device(o.app, OPEN_DEV, gizmo["id"], owner_user_id=dev_id)
    return {"widget": widget, "gizmo": gizmo, "other": other}


async def _user_id(o: Org, username: str) -> int:
    from sqlalchemy import select

    from corral.auth.models import User
    async with o.app.state.sessionmaker() as db:
        return int((await db.execute(select(User.id).where(User.username == username))
                    ).scalar_one())


async def product_slugs(o: Org, username: str, path: str = "/v1/products") -> list[str]:
    r = await o.client.get(path, headers=bearer(await login(o.client, username)))
    assert r.status_code == 200, r.text
    return [p["slug"] for p in r.json()["products"]]


async def my_devices(o: Org, username: str) -> dict[str, dict[str, Any]]:
    r = await o.client.get("/v1/devices", headers=bearer(await login(o.client, username)))
    assert r.status_code == 200, r.text
    return {d["id"]: d for d in r.json()}


async def org_marks(o: Org, username: str) -> dict[str, str | None]:
    r = await o.client.get("/v1/orgs", headers=bearer(await login(o.client, username)))
    assert r.status_code == 200, r.text
    return {x["slug"]: x.get("subscription_status") for x in r.json()["organizations"]}


async def lock(o: Org) -> None:
    assert (await subscribe(o, interval="month", blocks=1)).status_code == 200
    o.fake.decline_always = True
    await o.walk(31 + 9)
    assert (await o.sub())["status"] == "locked"


async def test_lists_follow_the_lock(org: Org):
    w = await world(org)
    both = [w["widget"]["slug"], w["gizmo"]["slug"]]
    assert await product_slugs(org, org.owner) == both
    devices = await my_devices(org, "dev@example.com")
    assert set(devices) == {LOCKED_DEV, OPEN_DEV}
    assert not any("subscription_status" in d for d in devices.values())

    await lock(org)
    for user in (org.owner, "dev@example.com"):
        assert await product_slugs(org, user) == [w["gizmo"]["slug"]]
        assert await product_slugs(org, user, "/v1/user/products") == [w["gizmo"]["slug"]]
    # what the list leaves out answers 402 when opened; what it keeps opens
    token = await login(org.client, org.owner)
    assert_error(await org.client.get(f"/v1/products/{w['widget']['slug']}",
                                      headers=bearer(token)), 402, "subscription_inactive")
    r = await org.client.get(f"/v1/products/{w['gizmo']['slug']}", headers=bearer(token))
    assert r.status_code == 200, r.text

    devices = await my_devices(org, "dev@example.com")
    assert set(devices) == {LOCKED_DEV, OPEN_DEV}
    assert devices[LOCKED_DEV]["subscription_status"] == "locked"
    for user in (org.owner, "dev@example.com"):  # kept in the list, marked
        marks = await org_marks(org, user)
        assert (marks[org.slug], marks[w["other"]["slug"]]) == ("locked", None)
    assert "subscription_status" not in devices[OPEN_DEV]
    dev_token = await login(org.client, "dev@example.com")
    r = await org.client.get(f"/v1/devices/{LOCKED_DEV}", headers=bearer(dev_token))
    assert r.status_code == 200, r.text  # its owner still reaches it
    assert_error(await org.client.get(f"/v1/products/{w['widget']['slug']}/devices",
                                      headers=bearer(dev_token)), 402, "subscription_inactive")

    # reactivated: back in the lists, unmarked
    org.fake.decline_always = False
    r = await org.req("POST", "/billing/reactivate")
    assert r.status_code == 200, r.text
    assert await product_slugs(org, org.owner) == both
    assert "subscription_status" not in (await my_devices(org, "dev@example.com"))[LOCKED_DEV]
    assert not any((await org_marks(org, org.owner)).values())


async def test_an_inactive_org_is_left_out_too_and_api_users_see_nothing(org: Org):
    w = await world(org)
    r = await org.client.post(f"/v1/products/{w['widget']['slug']}/team",
                              headers=bearer(await org.token()),
                              json={"friendly_name": "bot", "scopes": ["products:get"]})
    assert r.status_code == 200, r.text
    bot = r.json()["created"]["tokens"][0]["token"]
    r = await org.client.get("/v1/products", headers=bearer(bot))
    assert [p["slug"] for p in r.json()["products"]] == [w["widget"]["slug"]]

    assert (await subscribe(org, interval="month", blocks=1)).status_code == 200
    assert (await org.req("POST", "/billing/cancel")).status_code == 200
    assert await product_slugs(org, org.owner) == [w["widget"]["slug"], w["gizmo"]["slug"]]
    await org.walk(32)  # the paid month ended: inactive
    assert (await org.sub())["status"] == "inactive"
    assert await product_slugs(org, org.owner) == [w["gizmo"]["slug"]]
    r = await org.client.get("/v1/products", headers=bearer(bot))
    assert r.status_code == 200 and r.json()["products"] == []
    devices = await my_devices(org, "dev@example.com")
    assert devices[LOCKED_DEV]["subscription_status"] == "inactive"
    assert (await org_marks(org, "dev@example.com"))[org.slug] == "inactive"
