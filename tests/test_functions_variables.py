"""Function calls and variable reads: REST -> bus -> the device's session -> the device.

The device is a ``sessionkit.ScriptedDevice`` connected to the real hub; the request path
through ``device.<id>.request`` and the session core is the real one."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from corral.sessions import contract
from corral.sessions.link import DeviceError
from helpers import add_role, assert_error, bearer, new_user, owner_and_product
from sessionkit import WAIT, ScriptedDevice, connect, import_device, wait_for
from test_claiming import claim, make_customer

DEV = "0123456789abcdef0000ff01"
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


def led(arg: str) -> int:
    return {"on": 1, "off": 0}.get(arg, -1)


@pytest.fixture
async def shop(client, app) -> dict[str, Any]:
    """ada's product with DEV online; DEV has functions led/echo and four variables."""
    ada, p = await owner_and_product(client)
    await import_device(client, ada, p["id"], DEV)
    device = ScriptedDevice(
        functions={"led": led, "echo": lambda arg: len(arg)},
        variables={"count": ("int32", 42), "greeting": ("string", "hello"),
                   "temp": ("double", 25.5), "armed": ("bool", True)})
    session = await connect(app, DEV, device)
    yield {"ada": ada, "p": p, "device": device, "session": session}
    await session.close("test over")


async def call(client, token: str, fn: str, body: Any = None, *, path: str | None = None,
               form: bool = False, params: dict[str, str] | None = None):
    url = path or f"/v1/devices/{DEV}/{fn}"
    if form:
        return await client.post(url, headers=bearer(token), data=body, params=params)
    return await client.post(url, headers=bearer(token), json=body, params=params)


async def test_call_function_json_args_and_form_arg(client, shop):
    r = await call(client, shop["ada"], "led", {"args": "on"})  # particle-api-js sends args
    assert r.status_code == 200, r.text
    assert r.json() == {"id": DEV, "name": None, "connected": True, "return_value": 1}
    r = await call(client, shop["ada"], "led", {"arg": "off"}, form=True)  # the docs: arg
    assert r.json()["return_value"] == 0
    r = await call(client, shop["ada"], "echo", {"arg": 12345})
    assert r.json()["return_value"] == 5
    r = await call(client, shop["ada"], "echo")  # no body: an empty argument
    assert r.json()["return_value"] == 0
    assert shop["device"].calls == [("led", "on"), ("led", "off"), ("echo", "12345"), ("echo", "")]


async def test_call_function_raw_and_product_route(client, shop):
    p = shop["p"]
    r = await call(client, shop["ada"], "led", {"arg": "on"}, params={"format": "raw"})
    assert r.status_code == 200 and r.text == "1"
    assert r.headers["content-type"].startswith("text/plain")
    r = await call(client, shop["ada"], "led", {"arg": "off"},
                   path=f"/v1/products/{p['slug']}/devices/{DEV}/led")
    assert r.json() == {"id": DEV, "name": None, "connected": True, "return_value": 0}


async def test_function_errors(client, app, shop, settings):
    ada = shop["ada"]
    body = assert_error(await call(client, ada, "nope"), 404)
    assert body["error"] == "Function nope not found"  # Particle's body; the CLI reads it
    assert_error(await call(client, ada, "led", {"arg": ["on"]}), 400)
    settings.function_arg_max_bytes = 4
    body = assert_error(await call(client, ada, "led", {"arg": "12345"}), 400)
    assert "longer than 4 bytes" in body["error_description"]
    shop["device"].functions["led"] = lambda arg: DeviceError("the LED is broken")
    body = assert_error(await call(client, ada, "led", {"arg": "on"}), 400)
    assert "the LED is broken" in body["error_description"]
    body = assert_error(await call(client, ada, "x" * 65), 404)
    assert body["error"] == "Function not found"


async def test_device_timeout_is_408(client, shop, settings):
    settings.device_call_timeout_s = 0.2

    async def hang(arg: str) -> int:
        await asyncio.sleep(30)
        return 1

    shop["device"].functions["led"] = hang
    r = await asyncio.wait_for(call(client, shop["ada"], "led", {"arg": "on"}), WAIT)
    body = assert_error(r, 408)
    assert body["error"] == "Timed out."


async def test_no_reply_on_the_bus_is_408(client, app, shop, settings):
    """A node that holds the session but never answers (e.g. it died mid-request)."""
    settings.device_call_timeout_s = 0.1
    await shop["session"].close("moved to a node that hangs")

    async def silent(_msg: Any) -> None:
        return None

    sub = await app.state.runtime.bus.subscribe(contract.request_subject(DEV), silent)
    try:
        r = await asyncio.wait_for(call(client, shop["ada"], "led", {"arg": "on"}), WAIT)
    finally:
        await sub.unsubscribe()
    assert assert_error(r, 408)["error"] == "Timed out."


async def test_offline_device_is_404_not_connected(client, shop):
    await shop["session"].close("gone")
    for r in (await call(client, shop["ada"], "led", {"arg": "on"}),
              await client.get(f"/v1/devices/{DEV}/count", headers=bearer(shop["ada"]))):
        body = assert_error(r, 404)
        assert body["error"] == "Device is not connected"
        assert "access token" not in body["error_description"]  # would log the CLI out


async def test_read_variables(client, shop):
    ada = shop["ada"]
    expected = {"count": 42, "greeting": "hello", "temp": 25.5, "armed": True}
    for name, value in expected.items():
        r = await client.get(f"/v1/devices/{DEV}/{name}", headers=bearer(ada))
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["name"], body["result"]) == (name, value)
        info = body["coreInfo"]
        assert info["deviceID"] == DEV and info["connected"] is True
        assert info["product_id"] == shop["p"]["id"] and info["name"] is None
        assert ISO_MS.match(info["last_handshake_at"]) and ISO_MS.match(info["last_heard"])
    raw = {"count": "42", "greeting": "hello", "temp": "25.5", "armed": "true"}
    for name, text in raw.items():
        r = await client.get(f"/v1/devices/{DEV}/{name}?format=raw", headers=bearer(ada))
        assert r.status_code == 200 and r.text == text
        assert r.headers["content-type"].startswith("text/plain")
    r = await client.get(f"/v1/products/{shop['p']['id']}/devices/{DEV}/temp",
                         headers=bearer(ada))
    assert r.json()["result"] == 25.5
    assert shop["device"].reads == [*expected, *raw, "temp"]


async def test_variable_errors(client, shop):
    ada = shop["ada"]
    body = assert_error(await client.get(f"/v1/devices/{DEV}/nope", headers=bearer(ada)), 404)
    assert body["error"] == "Variable not found"
    shop["device"].variables["count"] = ("int32", "not a number")
    body = assert_error(await client.get(f"/v1/devices/{DEV}/count", headers=bearer(ada)), 502)
    assert "not a int32" in body["error_description"]


async def test_who_may_call(client, app, shop):
    p = shop["p"]
    viewer = await new_user(client, "viewer@example.com")
    await add_role(app, "viewer@example.com", p, "View-only")
    support = await new_user(client, "support@example.com")
    await add_role(app, "support@example.com", p, "Support")
    bob = await new_user(client, "bob@example.com")
    body = assert_error(await call(client, viewer, "led", {"arg": "on"}), 403, "forbidden")
    assert body["required"] == "devices.function:call"
    body = assert_error(await client.get(f"/v1/devices/{DEV}/count", headers=bearer(viewer)), 403)
    assert body["required"] == "devices.variable:get"
    assert (await call(client, support, "led", {"arg": "on"})).json()["return_value"] == 1
    for r in (await call(client, bob, "led", {"arg": "on"}),
              await client.get(f"/v1/devices/{DEV}/count", headers=bearer(bob)),
              await call(client, bob, "led", path=f"/v1/products/{p['id']}/devices/{DEV}/led")):
        assert_error(r, 404)
    # a customer reaches the device claimed to them, another customer does not
    cust = await make_customer(client, shop["ada"], p, "cust@example.com")
    other = await make_customer(client, shop["ada"], p, "other@example.com")
    assert_error(await call(client, cust, "led", {"arg": "on"}), 404)
    assert (await claim(client, cust, DEV)).status_code == 200
    assert (await call(client, cust, "led", {"arg": "on"})).json()["return_value"] == 1
    r = await client.get(f"/v1/devices/{DEV}/greeting", headers=bearer(cust))
    assert r.json()["result"] == "hello"
    assert_error(await call(client, other, "led", {"arg": "on"}), 404)


async def test_call_by_device_name(client, shop):
    ada = shop["ada"]
    assert (await claim(client, ada, DEV)).status_code == 200
    r = await client.put(f"/v1/devices/{DEV}", headers=bearer(ada), json={"name": "porch"})
    assert r.status_code == 200, r.text
    r = await call(client, ada, "led", {"arg": "on"}, path="/v1/devices/porch/led")
    assert r.json() == {"id": DEV, "name": "porch", "connected": True, "return_value": 1}
    r = await client.get("/v1/devices/porch/greeting", headers=bearer(ada))
    assert r.json()["coreInfo"]["name"] == "porch"


async def test_other_device_routes_are_not_shadowed(client, shop):
    ada, p = shop["ada"], shop["p"]
    r = await client.get(f"/v1/devices/{DEV}", headers=bearer(ada))
    assert r.status_code == 200 and r.json()["id"] == DEV and "coreInfo" not in r.json()
    r = await client.get(f"/v1/devices/{DEV}/events", headers=bearer(ada))
    assert r.status_code == 200 and r.content == b":ok\n\n"
    r = await client.get(f"/v1/devices/{DEV}/event_log", headers=bearer(ada))
    assert r.status_code == 200 and "events" in r.json()
    r = await client.get(f"/v1/products/{p['id']}/devices/{DEV}/credentials", headers=bearer(ada))
    assert r.status_code == 200 and "coreInfo" not in r.json()
    r = await client.get("/v1/devices/events", headers=bearer(ada))
    assert r.status_code == 200 and r.content == b":ok\n\n"
    assert shop["device"].reads == []  # none of these reached the device


async def test_no_database_connection_is_held_during_a_call(client, app, shop):
    """The request waiting on the device holds no pooled connection. Other work (the usage
    writer's flush of this very call, presence) may hold one for a moment, so the check is
    that the pool empties while the call is still pending, not a single reading."""
    pool = app.state.runtime.engine.pool
    release = asyncio.Event()

    async def slow(arg: str) -> int:
        await release.wait()
        return 7

    shop["device"].functions["led"] = slow
    pending = asyncio.ensure_future(call(client, shop["ada"], "led", {"arg": "on"}))
    try:
        await wait_for(lambda: bool(shop["device"].calls))
        await wait_for(lambda: pool.checkedout() == 0)
        assert not pending.done()
    finally:
        release.set()
    r = await asyncio.wait_for(pending, WAIT)
    assert r.json()["return_value"] == 7


async def test_call_while_shutting_down_is_503(client, app, shop):
    await app.state.runtime.bus.close()
    assert_error(await call(client, shop["ada"], "led", {"arg": "on"}), 503, "unavailable")


async def test_a_call_reads_the_device_and_its_product_in_one_query(client, app, shop):
    """The device guard reads the device, its product, the caller's role and the tenant
    facts in one statement (cached token); the call's count is the writer's INSERT+COMMIT."""
    from sqlalchemy import event

    sent: list[str] = []

    def seen(conn: Any, cursor: Any, statement: str, *args: Any) -> None:
        sent.append(" ".join(statement.split())[:40])

    engine = app.state.runtime.engine.sync_engine
    assert (await call(client, shop["ada"], "led", {"arg": "on"})).status_code == 200
    event.listen(engine, "before_cursor_execute", seen)
    try:
        r = await call(client, shop["ada"], "led", {"arg": "on"})
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    assert r.status_code == 200 and r.json()["return_value"] == 1
    # (on PostgreSQL the pool's pre-ping, SELECT 1, comes with each connection checkout)
    selects = [s for s in sent if s.upper().startswith("SELECT") and s != "SELECT 1"]
    assert len(selects) == 1 and selects[0].startswith("SELECT devices.id"), sent
