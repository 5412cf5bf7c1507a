"""SSE event streams over real sockets: Particle's exact wire format, keep-alives, prefix
filtering, scoping by the caller's rights, presence events, and cleanup on disconnect.

Events come from a device connected to the real session hub (``sessionkit.ScriptedDevice``)
and from the publish API; a live uvicorn server streams them to an httpx client."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import pytest

from corral.bus.inprocess import InProcessBus
from corral.events.api import EventStream
from helpers import add_role, assert_error, bearer, new_user, owner_and_product
from sessionkit import (
    WAIT,
    ScriptedDevice,
    connect,
    import_device,
    live_server,
    sse,
    wait_for,
)
from test_claiming import claim, make_customer

DEV = "0123456789abcdef0000cc01"
DEV2 = "0123456789abcdef0000cc02"
BOB_DEV = "0123456789abcdef0000dd01"
ISO_MS = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z$")


@pytest.fixture
async def world(client, app) -> dict[str, Any]:
    """ada owns product Widget with DEV and DEV2; bob owns product Gadget with BOB_DEV."""
    ada, widget = await owner_and_product(client, "ada@example.com")
    bob, gadget = await owner_and_product(client, "bob@example.com", name="Gadget")
    await import_device(client, ada, widget["id"], DEV)
    await import_device(client, ada, widget["id"], DEV2)
    await import_device(client, bob, gadget["id"], BOB_DEV)
    return {"ada": ada, "bob": bob, "widget": widget, "gadget": gadget}


async def publish(client, token: str, name: str, data: str | None = None,
                  path: str = "/v1/devices/events") -> None:
    r = await client.post(path, headers=bearer(token), json={"name": name, "data": data})
    assert r.status_code == 200 and r.json() == {"ok": True}, r.text


async def test_wire_format_is_particles(client, app, world):
    p = world["widget"]
    async with live_server(app) as base:
        async with sse(base, f"/v1/products/{p['id']}/events", world["ada"]) as s:
            r = s.response
            assert r.status_code == 200
            assert r.headers["content-type"] == "text/event-stream"
            assert r.headers["cache-control"] == "no-cache"
            assert await s.read(5) == b":ok\n\n"
            session = await connect(app, DEV, ScriptedDevice())
            name, body = await s.event()
            assert (name, body["data"]) == ("spark/status", "online")
            await session.publish("temperature", "25.34")
            name, body = await s.event()
            assert name == "temperature"
            assert list(body) == ["data", "ttl", "published_at", "coreid"]
            assert body["data"] == "25.34" and body["ttl"] == 60 and body["coreid"] == DEV
            assert ISO_MS.match(body["published_at"]), body
            frame = (f'event: temperature\ndata: {{"data":"25.34","ttl":60,'
                     f'"published_at":"{body["published_at"]}","coreid":"{DEV}"}}\n\n').encode()
            assert s.received.endswith(frame), s.received
            assert s.received.startswith(b":ok\n\nevent: spark/status\ndata: ")
            await session.close("test over")


async def test_keepalive_newline_when_idle(client, app, world, settings):
    settings.sse_keepalive_s = 0.2
    loop = asyncio.get_running_loop()
    async with live_server(app) as base:
        async with sse(base, f"/v1/products/{world['widget']['id']}/events?nonce=1387.99",
                       world["ada"]) as s:
            assert await s.read(5) == b":ok\n\n"
            started = loop.time()
            for _ in range(3):
                assert await s.read(1, within=2) == b"\n"
            assert loop.time() - started >= 0.5  # one per idle period, not a flood
            # an event resets the idle timer; keep-alives resume after it
            await publish(client, world["ada"], "ping", "1",
                          path=f"/v1/products/{world['widget']['id']}/events")
            assert (await s.event())[0] == "ping"
            assert await s.read(1, within=2) == b"\n"


async def test_default_keepalive_is_under_particles_15_s_limit(settings):
    assert 0 < settings.sse_keepalive_s <= 10


async def test_prefix_filter_is_a_literal_case_sensitive_prefix(client, app, world, settings):
    settings.event_rate_burst = 10  # five publishes at once; not testing the rate limit here
    p = world["widget"]["id"]
    async with live_server(app) as base:
        session = await connect(app, DEV, ScriptedDevice())
        async with sse(base, f"/v1/products/{p}/events/temp", world["ada"]) as s:
            assert await s.read(5) == b":ok\n\n"
            for name in ("humidity", "temperature", "Temp", "tem", "temp"):
                await session.publish(name, "x")
            assert [(await s.event())[0] for _ in range(2)] == ["temperature", "temp"]
            await s.quiet(0.3)
        await session.close("test over")


async def test_prefix_with_slash_percent_encoded(client, app, world):
    async with live_server(app) as base:
        # particle-api-js encodes the name with encodeURIComponent
        async with sse(base, "/v1/devices/events/a%2Fb?nonce=0.5", world["ada"]) as s:
            assert await s.read(5) == b":ok\n\n"
            for name in ("a/c", "a/bc", "a/b/c"):
                await publish(client, world["ada"], name, "1")
            assert [(await s.event())[0] for _ in range(2)] == ["a/bc", "a/b/c"]
            await s.quiet(0.2)


async def test_my_stream_sees_only_my_devices_and_publishes(client, app, world):
    ada, bob = world["ada"], world["bob"]
    assert (await claim(client, ada, DEV)).status_code == 200
    assert (await claim(client, bob, BOB_DEV)).status_code == 200
    async with live_server(app) as base:
        async with sse(base, "/v1/devices/events", ada) as a, \
                sse(base, "/v1/events/x", bob) as b:
            assert await a.read(5) == b":ok\n\n" and await b.read(5) == b":ok\n\n"
            mine = await connect(app, DEV, ScriptedDevice())
            theirs = await connect(app, BOB_DEV, ScriptedDevice())
            unclaimed = await connect(app, DEV2, ScriptedDevice())
            assert (await a.event())[0] == "spark/status"  # ada's DEV came online
            for s in (mine, theirs, unclaimed):
                await s.publish("x-from-device", s.device_id)
            await publish(client, bob, "x-bob-api", "1")
            await publish(client, ada, "x-ada-api", "2")
            name, body = await a.event()
            assert (name, body["coreid"]) == ("x-from-device", DEV)
            name, body = await a.event()
            assert (name, body["coreid"], body["data"]) == ("x-ada-api", "api", "2")
            await a.quiet(0.2)
            name, body = await b.event()  # prefix "x": bob's device, then bob's API publish
            assert (name, body["coreid"]) == ("x-from-device", BOB_DEV)
            assert (await b.event())[0] == "x-bob-api"
            await b.quiet(0.2)
            for s in (mine, theirs, unclaimed):
                await s.close("test over")


async def test_product_stream_is_scoped_to_the_product(client, app, world):
    ada, bob = world["ada"], world["bob"]
    widget, gadget = world["widget"], world["gadget"]
    async with live_server(app) as base:
        async with sse(base, f"/v1/products/{widget['slug']}/events", ada) as s:
            assert await s.read(5) == b":ok\n\n"
            other = await connect(app, BOB_DEV, ScriptedDevice())
            await other.publish("secret", "bob's")
            await publish(client, bob, "secret", "bob's", path=f"/v1/products/{gadget['id']}/events")
            await publish(client, ada, "public", "ada's", path=f"/v1/products/{widget['id']}/events")
            name, body = await s.event()
            assert (name, body["data"], body["coreid"]) == ("public", "ada's", "api")
            await s.quiet(0.2)
            await other.close("test over")
        # another tenant's product: a JSON 404, never a stream
        async with sse(base, f"/v1/products/{widget['id']}/events", bob) as s:
            assert s.response.status_code == 404
            assert s.response.headers["content-type"] == "application/json"
            assert s.response.json()["error_description"] == "Product not found"


async def test_device_streams_show_one_device(client, app, world):
    ada, p = world["ada"], world["widget"]["id"]
    async with live_server(app) as base:
        one = await connect(app, DEV, ScriptedDevice())
        two = await connect(app, DEV2, ScriptedDevice())
        async with sse(base, f"/v1/devices/{DEV}/events", ada) as d, \
                sse(base, f"/v1/products/{p}/devices/{DEV2}/events/b", ada) as pd:
            assert await d.read(5) == b":ok\n\n" and await pd.read(5) == b":ok\n\n"
            await two.publish("a", "2")
            await one.publish("a", "1")
            await two.publish("b", "2")
            name, body = await d.event()
            assert (name, body["coreid"], body["data"]) == ("a", DEV, "1")
            name, body = await pd.event()
            assert (name, body["coreid"]) == ("b", DEV2)
            await d.quiet(0.2)
            await pd.quiet(0.0)
        await one.close("test over")
        await two.close("test over")


async def test_device_and_product_device_streams_cross_tenant(client, world):
    bob, widget, gadget = world["bob"], world["widget"], world["gadget"]
    for path in (f"/v1/devices/{DEV}/events", f"/v1/devices/{DEV}/events/a"):
        body = assert_error(await client.get(path, headers=bearer(bob)), 404)
        assert body["error_description"] == "Device not found"
    # a device of bob's own product, asked for through ada's product path (and vice versa)
    body = assert_error(await client.get(f"/v1/products/{gadget['id']}/devices/{DEV}/events",
                                         headers=bearer(bob)), 404)
    assert body["error_description"] == "Device not found"
    body = assert_error(await client.get(f"/v1/products/{widget['id']}/devices/{BOB_DEV}/events",
                                         headers=bearer(bob)), 404)
    assert body["error_description"] == "Product not found"


async def test_org_streams(client, app, world):
    ada, widget = world["ada"], world["widget"]
    org = widget["org_id"]
    async with live_server(app) as base:
        one = await connect(app, DEV, ScriptedDevice())
        async with sse(base, f"/v1/orgs/{org}/events", ada) as o, \
                sse(base, f"/v1/orgs/{org}/devices/{DEV}/events/t", ada) as od:
            assert await o.read(5) == b":ok\n\n" and await od.read(5) == b":ok\n\n"
            other = await connect(app, BOB_DEV, ScriptedDevice())  # bob's org
            await other.publish("temp", "bob")
            await one.publish("temp", "ada")
            await publish(client, ada, "org-wide", "1", path=f"/v1/orgs/{org}/events")
            assert [(await o.event())[0] for _ in range(2)] == ["temp", "org-wide"]
            name, body = await od.event()
            assert (name, body["coreid"]) == ("temp", DEV)
            await o.quiet(0.2)
            await od.quiet(0.0)
            await other.close("test over")
        await one.close("test over")
    bob = world["bob"]
    assert_error(await client.get(f"/v1/orgs/{org}/events", headers=bearer(bob)), 404)
    body = assert_error(await client.get(
        f"/v1/orgs/{world['gadget']['org_id']}/devices/{DEV}/events", headers=bearer(bob)), 404)
    assert body["error_description"] == "Device not found"


async def test_roles_and_api_users(client, app, world):
    ada, widget = world["ada"], world["widget"]
    viewer = await new_user(client, "viewer@example.com")
    await add_role(app, "viewer@example.com", widget, "View-only")
    r = await client.post(f"/v1/products/{widget['id']}/team", headers=bearer(ada),
                          json={"friendly_name": "backend", "scopes": ["devices:list"]})
    assert r.status_code == 200, r.text
    api = r.json()["created"]["tokens"][0]["token"]
    async with live_server(app) as base:
        async with sse(base, f"/v1/products/{widget['id']}/events", viewer) as s:
            assert s.response.status_code == 200 and await s.read(5) == b":ok\n\n"
    body = assert_error(await client.get(f"/v1/products/{widget['id']}/events",
                                         headers=bearer(api)), 403)
    assert body["required"] == "events:get"
    # product-bound tokens have no "own devices": 403, JSON
    for path in ("/v1/devices/events", "/v1/events/temp"):
        assert_error(await client.get(path, headers=bearer(api)), 403, "unauthorized")


async def test_customer_stream(client, app, world):
    ada, widget = world["ada"], world["widget"]
    cust = await make_customer(client, ada, widget, "cust@example.com")
    other = await make_customer(client, ada, widget, "other@example.com")
    assert (await claim(client, cust, DEV)).status_code == 200
    async with live_server(app) as base:
        async with sse(base, "/v1/devices/events", cust) as c, \
                sse(base, "/v1/devices/events", other) as o, \
                sse(base, f"/v1/devices/{DEV}/events", cust) as cd:
            for s in (c, o, cd):
                assert await s.read(5) == b":ok\n\n"
            session = await connect(app, DEV, ScriptedDevice())
            for s in (c, cd):
                assert (await s.event())[0] == "spark/status"
            await session.publish("mine", "1")
            await publish(client, other, "not-mine", "2")
            for s in (c, cd):
                assert (await s.event())[0] == "mine"
            assert (await o.event())[0] == "not-mine"
            await c.quiet(0.2)
            await session.close("test over")
    assert_error(await client.get(f"/v1/devices/{DEV}/events", headers=bearer(other)), 404)
    assert_error(await client.get(f"/v1/products/{widget['id']}/events", headers=bearer(cust)),
                 403)


async def test_online_and_offline_status_events(client, app, world):
    async with live_server(app) as base:
        async with sse(base, f"/v1/devices/{DEV}/events/spark/status", world["ada"]) as s:
            assert await s.read(5) == b":ok\n\n"
            session = await connect(app, DEV, ScriptedDevice())
            name, body = await s.event()
            assert (name, body["data"], body["coreid"]) == ("spark/status", "online", DEV)
            await session.close("link lost")
            name, body = await s.event()
            assert (name, body["data"], body["coreid"]) == ("spark/status", "offline", DEV)


async def test_disconnect_removes_the_bus_subscription(client, app, world):
    bus = app.state.runtime.bus
    baseline = bus.subscription_count
    p = world["widget"]["id"]
    async with live_server(app) as base:
        async with sse(base, f"/v1/products/{p}/events", world["ada"]) as a, \
                sse(base, "/v1/devices/events/x", world["ada"]) as b, \
                sse(base, f"/v1/devices/{DEV}/events", world["ada"]) as c:
            for s in (a, b, c):
                assert await s.read(5) == b":ok\n\n"
            assert bus.subscription_count == baseline + 3
        await wait_for(lambda: bus.subscription_count == baseline)
        # an error answer never subscribes
        async with sse(base, "/v1/events", world["ada"]) as s:
            assert s.response.status_code == 400
        assert bus.subscription_count == baseline


async def test_no_database_connection_is_held_while_streaming(client, app, world):
    pool = app.state.runtime.engine.pool
    async with live_server(app) as base:
        async with sse(base, f"/v1/products/{world['widget']['id']}/events", world["ada"]) as s:
            assert await s.read(5) == b":ok\n\n"
            assert pool.checkedout() == 0


async def test_errors_are_json_not_streams(client, world):
    r = await client.get("/v1/events?nonce=1", headers=bearer(world["ada"]))
    assert r.status_code == 400
    assert r.json() == {"ok": False, "error": "event prefix filter is required",
                        "error_description": "event prefix filter is required"}
    r = await client.get("/v1/devices/events")
    assert r.status_code == 401 and r.headers["content-type"] == "application/json"
    assert_error(await client.get("/v1/devices/events/" + "x" * 65, headers=bearer(world["ada"])),
                 400)


async def test_in_process_client_gets_the_first_bytes(client, world):
    """The conftest client ends a stream after ``:ok``: route-walking tests never hang."""
    r = await client.get("/v1/devices/events", headers=bearer(world["ada"]))
    assert r.status_code == 200 and r.content == b":ok\n\n"


async def test_slow_client_loses_the_oldest_events():
    """The stream's own queue is bounded (``sse_queue_max``): the oldest frames go first."""
    async with InProcessBus() as bus:
        stream = EventStream(bus, "ev.*.7.*.*.*", None, keepalive_s=30, queue_max=3)
        sent: list[bytes] = []
        unblock = asyncio.Event()
        disconnect = asyncio.Event()

        async def receive() -> dict[str, Any]:
            await disconnect.wait()
            return {"type": "http.disconnect"}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body":
                sent.append(message["body"])
                if len(sent) == 2:  # the client stops reading after the first event
                    await unblock.wait()

        task = asyncio.create_task(stream({"type": "http"}, receive, send))
        await wait_for(lambda: bus.subscription_count == 1)

        def payload(i: int) -> dict[str, Any]:
            return {"id": i, "name": f"e{i}", "data": str(i), "ttl": 60,
                    "published_at": "2026-01-01T00:00:00.000Z", "coreid": "api"}

        await bus.publish("ev.1.7.0.0.api", payload(0))
        await wait_for(lambda: len(sent) == 2)
        for i in range(1, 8):
            await bus.publish("ev.1.7.0.0.api", payload(i))
        await wait_for(lambda: stream.dropped == 4)
        assert len(stream.queue) == 3
        unblock.set()
        await wait_for(lambda: len(sent) == 3)
        names = re.findall(rb"event: (e\d)", b"".join(sent))
        assert names == [b"e0", b"e5", b"e6", b"e7"]
        disconnect.set()
        await asyncio.wait_for(task, WAIT)
        assert bus.subscription_count == 0


async def test_stream_while_shutting_down_is_a_json_503(client, app, world):
    await app.state.runtime.bus.close()
    r = await client.get("/v1/devices/events", headers=bearer(world["ada"]))
    assert_error(r, 503, "unavailable")
