"""Publishing events through the API: POST /v1/devices/events, /v1/products/:p/events and
/v1/orgs/:org/events. ``{"ok": true}`` means the row is committed; fan-out to streams and
subscribed devices follows the commit; API publishes are not metered."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from sqlalchemy import func, select

from corral.events.models import Event
from corral.metering.models import UsageCounter, UsageDelta
from helpers import (
    add_role,
    assert_error,
    bearer,
    make_product,
    new_user,
    owner_and_product,
    user_id,
)
from sessionkit import WAIT, ScriptedDevice, connect, import_device, wait_for
from test_claiming import make_customer

DEV = "0123456789abcdef0000ee01"


async def stored(app: Any, **where: Any) -> list[Event]:
    async with app.state.sessionmaker() as db:
        q = select(Event).order_by(Event.id)
        for k, v in where.items():
            q = q.where(getattr(Event, k) == v)
        return list((await db.execute(q)).scalars().all())


async def post(client, token: str, body: Any, path: str = "/v1/devices/events", *,
               form: bool = False):
    if form:
        return await client.post(path, headers=bearer(token), data=body)
    if isinstance(body, bytes):
        return await client.post(path, headers={**bearer(token),
                                                "content-type": "application/json"},
                                 content=body)
    return await client.post(path, headers=bearer(token), json=body)


async def test_user_publish_is_committed_before_ok(client, app, manual_clock):
    ada = await new_user(client, "ada@example.com")
    r = await post(client, ada, {"name": "myevt", "data": "hello"})
    assert r.status_code == 200 and r.json() == {"ok": True}
    [e] = await stored(app)  # no waiting: the answer came after the commit
    assert (e.name, e.data, e.ttl, e.private, e.source) == ("myevt", "hello", 60, True, "cloud")
    assert e.device_id is None and e.product_id is None and e.org_id is None
    assert e.owner_user_id == await user_id(app, "ada@example.com") and e.customer_id is None
    assert e.published_at == manual_clock.now()


async def test_form_body_private_and_ttl(client, app):
    ada = await new_user(client, "ada@example.com")
    r = await post(client, ada, {"name": "f/orm", "data": "1 2", "private": "false", "ttl": "5"},
                   form=True)
    assert r.status_code == 200, r.text
    r = await post(client, ada, {"name": "nodata"})
    assert r.status_code == 200, r.text
    first, second = await stored(app)
    assert (first.name, first.data, first.private, first.ttl) == ("f/orm", "1 2", False, 5)
    assert (second.name, second.data) == ("nodata", None)


@pytest.mark.parametrize(("body", "message"), [
    ({}, "name is required"),
    ({"name": ""}, "name is required"),
    ({"name": "has space"}, "printable ASCII"),
    ({"name": "x" * 65}, "printable ASCII"),
    ({"name": "temp\u00e9"}, "printable ASCII"),
    ({"name": 7}, "name: Input should be a valid string"),
    ({"name": "spark/status"}, "reserved"),
    ({"name": "Particle/device/x"}, "reserved"),
    ({"name": "ok", "data": "x" * 1025}, "limit is 1024"),
    (b'{"name": "ok", "data": "\\ud800"}', "Unicode"),  # a lone surrogate
    ({"name": "ok", "ttl": -1}, "ttl"),
    ({"name": "ok", "ttl": "soon"}, "ttl"),
    ({"name": "ok", "private": "maybe"}, "private"),
])
async def test_bad_publishes_are_400(client, app, body, message):
    ada = await new_user(client, "ada@example.com")
    err = assert_error(await post(client, ada, body), 400)
    assert message in err["error_description"], err
    assert await stored(app) == []


async def test_data_shapes_and_size_limit(client, app, settings):
    ada = await new_user(client, "ada@example.com")
    for data in ("x" * 1024, 42, True, {"a": [1, 2]}, "ünï"):
        assert (await post(client, ada, {"name": "d", "data": data})).status_code == 200
    assert [e.data for e in await stored(app)] == ["x" * 1024, "42", "true", '{"a":[1,2]}', "ünï"]
    settings.event_data_max_bytes = 8
    assert_error(await post(client, ada, {"name": "d", "data": "ü" * 5}), 400)  # 10 bytes


async def test_product_publish(client, app):
    ada, p = await owner_and_product(client, settings={"event_data_max_bytes": 4})
    r = await post(client, ada, {"name": "cfg", "data": "abcd", "private": True},
                   f"/v1/products/{p['slug']}/events")
    assert r.status_code == 200 and r.json() == {"ok": True}, r.text
    [e] = await stored(app)
    assert (e.product_id, e.org_id, e.owner_user_id, e.device_id) == (p["id"], p["org_id"],
                                                                     None, None)
    # the product's own data limit applies
    err = assert_error(await post(client, ada, {"name": "cfg", "data": "abcde"},
                                  f"/v1/products/{p['id']}/events"), 400)
    assert "limit is 4" in err["error_description"]


async def test_product_publish_permissions(client, app):
    ada, p = await owner_and_product(client)
    path = f"/v1/products/{p['id']}/events"
    viewer = await new_user(client, "viewer@example.com")
    await add_role(app, "viewer@example.com", p, "View-only")
    dev = await new_user(client, "dev@example.com")
    await add_role(app, "dev@example.com", p, "Developer")
    bob = await new_user(client, "bob@example.com")
    await make_product(client, bob, "Gadget")
    body = assert_error(await post(client, viewer, {"name": "x"}, path), 403, "forbidden")
    assert body["required"] == "events:send"
    assert_error(await post(client, bob, {"name": "x"}, path), 404)
    assert (await post(client, dev, {"name": "x"}, path)).status_code == 200
    r = await client.post(f"/v1/products/{p['id']}/team", headers=bearer(ada),
                          json={"friendly_name": "backend", "scopes": ["events:send"]})
    api = r.json()["created"]["tokens"][0]["token"]
    assert (await post(client, api, {"name": "y"}, path)).status_code == 200
    # an API user has no personal stream to publish to
    assert_error(await post(client, api, {"name": "y"}), 403, "unauthorized")
    assert [e.name for e in await stored(app)] == ["x", "y"]


async def test_org_publish(client, app):
    ada, p = await owner_and_product(client)
    org = p["org_id"]
    viewer = await new_user(client, "viewer@example.com")
    await add_role(app, "viewer@example.com", p, "View-only", org=True)
    assert_error(await post(client, viewer, {"name": "o"}, f"/v1/orgs/{org}/events"), 403)
    r = await post(client, ada, {"name": "o", "data": "1"}, f"/v1/orgs/{org}/events")
    assert r.status_code == 200 and r.json() == {"ok": True}, r.text
    [e] = await stored(app)
    assert (e.org_id, e.product_id, e.owner_user_id) == (org, None, None)
    bob = await new_user(client, "bob@example.com")
    assert_error(await post(client, bob, {"name": "o"}, f"/v1/orgs/{org}/events"), 404)


async def test_customer_publish_is_tagged_with_the_customer(client, app):
    ada, p = await owner_and_product(client)
    cust = await make_customer(client, ada, p, "cust@example.com")
    assert (await post(client, cust, {"name": "c", "data": "1"})).status_code == 200
    [e] = await stored(app)
    assert e.customer_id is not None and e.owner_user_id is None
    assert (e.product_id, e.org_id) == (p["id"], p["org_id"])
    # customers cannot publish to the product as a whole
    assert_error(await post(client, cust, {"name": "c"}, f"/v1/products/{p['id']}/events"), 403)


async def test_publishes_are_not_metered(client, app):
    ada, p = await owner_and_product(client)
    await post(client, ada, {"name": "a", "data": "1"})
    await post(client, ada, {"name": "b", "data": "1"}, f"/v1/products/{p['id']}/events")
    await post(client, ada, {"name": "c", "data": "1"}, f"/v1/orgs/{p['org_id']}/events")
    assert len(await stored(app)) == 3
    async with app.state.sessionmaker() as db:
        assert (await db.execute(select(func.count()).select_from(UsageCounter))).scalar() == 0
        assert (await db.execute(select(func.count()).select_from(UsageDelta))).scalar() == 0


async def test_product_publish_reaches_subscribed_devices(client, app):
    ada, p = await owner_and_product(client)
    await import_device(client, ada, p["id"], DEV)
    device = ScriptedDevice()
    session = await connect(app, DEV, device)
    await asyncio.wait_for(session.subscribe("cfg/"), WAIT)
    await post(client, ada, {"name": "other", "data": "0"}, f"/v1/products/{p['id']}/events")
    await post(client, ada, {"name": "cfg/led", "data": "on"}, f"/v1/products/{p['id']}/events")
    await wait_for(lambda: bool(device.delivered))
    assert device.delivered == [("cfg/led", "on")]
    await session.close("test over")


async def test_publish_while_the_writer_is_stopped_is_503(client, app):
    ada = await new_user(client, "ada@example.com")
    await app.state.runtime.writer.stop()
    body = assert_error(await post(client, ada, {"name": "late"}), 503, "unavailable")
    assert "shutting down" in body["error_description"]
