"""The device-session core, driven directly through a scripted DeviceLink (no transport).

The transports are tested over real sockets in their own files; these tests pin down what
every transport inherits: admission, presence, publish rules, rate limits, metering,
request/reply through the bus, replacement of an older session, the gate seam."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import pytest
from sqlalchemy import select

from corral.auth.models import User
from corral.bus.base import NoResponders
from corral.devices.models import Device
from corral.events.models import Event
from corral.events.writer import NewEvent
from corral.metering import ledger
from corral.metering.ledger import ops_per_kb, period_of
from corral.metering.models import UsageCounter
from corral.sessions import contract
from corral.sessions.core import SessionHub
from corral.sessions.link import DeviceError, DeviceFacts, Hello, Refused, coerce_variable
from helpers import add_device, load, owner_and_product

DEV = "0123456789abcdef01234567"
DEV2 = "0123456789abcdef01234568"
WAIT = 5


class ScriptedLink:
    """A DeviceLink whose device behaviour the test scripts."""

    transport = "test"

    def __init__(self) -> None:
        self.functions: dict[str, Any] = {}
        self.variables: dict[str, Any] = {}
        self.delivered: list[tuple[str, str | None, str]] = []
        self.disconnected: list[str] = []
        self.describe_requests = 0
        self.delivery = asyncio.Event()

    async def call_function(self, name: str, arg: str) -> int:
        fn = self.functions[name]
        result = fn(arg)
        if asyncio.iscoroutine(result):
            result = await result
        return result  # type: ignore[no-any-return]

    async def read_variable(self, name: str) -> Any:
        value = self.variables[name]
        if isinstance(value, Exception):
            raise value
        return value

    async def deliver_event(self, name: str, data: str | None, *, published_at: str,
                            ttl: int, coreid: str) -> None:
        self.delivered.append((name, data, coreid))
        self.delivery.set()

    async def request_describe(self) -> None:
        self.describe_requests += 1

    async def disconnect(self, reason: str) -> None:
        self.disconnected.append(reason)


@pytest.fixture
def hub(app: Any) -> SessionHub:
    return app.state.runtime.hub


@pytest.fixture
async def product(client: Any, app: Any) -> dict[str, Any]:
    _tok, prod = await owner_and_product(client)
    await add_device(app, DEV, prod["id"])
    await add_device(app, DEV2, prod["id"])
    return prod


async def events(app: Any, **where: Any) -> list[Event]:
    async with app.state.sessionmaker() as db:
        q = select(Event).order_by(Event.id)
        for k, v in where.items():
            q = q.where(getattr(Event, k) == v)
        return list((await db.execute(q)).scalars().all())


async def usage(app: Any, device_id: str) -> UsageCounter | None:
    async with app.state.sessionmaker() as db:
        await ledger.fold_pending(db)
        await db.commit()
        return (await db.execute(select(UsageCounter).where(
            UsageCounter.device_id == device_id))).scalar_one_or_none()


async def test_open_marks_online_and_close_marks_offline_with_reason(app, hub, product,
                                                                     manual_clock):
    link = ScriptedLink()
    s = await hub.open(Hello(DEV, remote="10.0.0.7", firmware_version=3,
                             system_version="1.2.3"), link)
    d = await load(app, DEV)
    assert d.online and d.last_handshake_at == manual_clock.now() == d.first_online_at
    assert d.last_ip_address == "10.0.0.7" and d.firmware_version == 3
    assert d.system_firmware_version == "1.2.3" and d.transport == "test"
    assert hub.sessions[DEV] is s and s.facts.product_id == product["id"]
    first = d.first_online_at

    manual_clock.advance(seconds=30)
    await s.close("keep-alive timeout")
    await s.close("again")  # idempotent
    d = await load(app, DEV)
    assert not d.online and d.last_heard == manual_clock.now()
    assert d.last_disconnect_reason == "keep-alive timeout" and d.first_online_at == first
    assert DEV not in hub.sessions
    status = [(e.name, e.data, e.device_id) for e in await events(app, name="spark/status")]
    assert status == [("spark/status", "online", DEV), ("spark/status", "offline", DEV)]


@pytest.mark.parametrize(("setup", "code"), [
    ({"quarantined": True}, "quarantined"),
    ({"denied": True}, "denied"),
])
async def test_refused_devices_do_not_go_online(app, hub, client, setup, code):
    _tok, prod = await owner_and_product(client)
    await add_device(app, DEV, prod["id"], **setup)
    with pytest.raises(Refused) as exc:
        await hub.open(Hello(DEV), ScriptedLink())
    assert exc.value.code == code
    assert not (await load(app, DEV)).online and DEV not in hub.sessions


async def test_unknown_device_is_refused(hub):
    with pytest.raises(Refused) as exc:
        await hub.open(Hello(DEV), ScriptedLink())
    assert exc.value.code == "unknown_device"


async def test_a_reconnect_replaces_the_older_session_and_keeps_the_device_online(
        app, hub, product, manual_clock):
    old_link, new_link = ScriptedLink(), ScriptedLink()
    old = await hub.open(Hello(DEV), old_link)
    manual_clock.advance(seconds=1)
    new = await hub.open(Hello(DEV), new_link)
    await asyncio.sleep(0.05)  # the bus delivers the kick to the old session's control sub
    assert old.closed and not new.closed and hub.sessions[DEV] is new
    assert old_link.disconnected and "Replaced" in old_link.disconnected[0]
    assert (await load(app, DEV)).online
    # a late close of the old session must not mark the device offline
    await old.close("connection lost")
    assert (await load(app, DEV)).online
    names = [e.data for e in await events(app, name="spark/status")]
    assert names == ["online", "online"]


async def test_publish_stores_counts_and_fans_out(app, hub, product):
    s = await hub.open(Hello(DEV), ScriptedLink())
    got: list[dict[str, Any]] = []
    seen = asyncio.Event()

    async def on_event(msg: Any) -> None:
        got.append(msg.json())
        seen.set()

    await hub.bus.subscribe(contract.stream_pattern(product_id=product["id"]), on_event)
    event_id = await s.publish("temp", "21.5", ttl=120)
    await asyncio.wait_for(seen.wait(), WAIT)
    [row] = await events(app, name="temp")
    assert row.id == event_id and row.data == "21.5" and row.ttl == 120
    assert row.product_id == product["id"] and row.device_id == DEV
    assert got[-1]["name"] == "temp" and got[-1]["coreid"] == DEV and got[-1]["id"] == event_id
    u = await usage(app, DEV)
    assert u.events_published == 1 and u.data_operations == 1 and u.payload_bytes == 4


@pytest.mark.parametrize(("name", "data", "code"), [
    ("", "x", "invalid"),
    ("a" * 65, "x", "invalid"),
    ("has space", "x", "invalid"),
    ("spark/x", "x", "invalid"),
    ("Particle-thing", "x", "invalid"),
    ("ok", "x" * 1025, "too_large"),
    ("ok", b"\xff\xfe", "invalid"),
    ("ok", "nul\x00", "invalid"),
])
async def test_publish_validation(app, hub, product, name, data, code):
    s = await hub.open(Hello(DEV), ScriptedLink())
    with pytest.raises(Refused) as exc:
        await s.publish(name, data)
    assert exc.value.code == code
    assert [e.name for e in await events(app)] == ["spark/status"]  # nothing stored
    assert await usage(app, DEV) is None


async def test_product_setting_raises_the_data_limit(app, hub, client):
    tok, prod = await owner_and_product(client)
    r = await client.put(f"/v1/products/{prod['id']}", headers={"Authorization": f"Bearer {tok}"},
                         json={"settings": {"event_data_max_bytes": 4096}})
    assert r.status_code == 200, r.text
    await add_device(app, DEV, prod["id"])
    s = await hub.open(Hello(DEV), ScriptedLink())
    assert await s.publish("big", "x" * 4000) > 0
    with pytest.raises(Refused):
        await s.publish("big", "x" * 4097)


async def test_rate_limit_allows_bursts_of_4_then_1_per_second(app, hub, product, manual_clock):
    s = await hub.open(Hello(DEV), ScriptedLink())
    for i in range(4):
        await s.publish("burst", str(i))
    with pytest.raises(Refused) as exc:
        await s.publish("burst", "5")
    assert exc.value.code == "rate_limited"
    manual_clock.advance(seconds=1)
    await s.publish("burst", "6")
    with pytest.raises(Refused):
        await s.publish("burst", "7")
    manual_clock.advance(seconds=4)
    for i in range(4):
        await s.publish("burst", f"again-{i}")
    assert s.discarded == 2
    assert len(await events(app, name="burst")) == 9
    for _ in range(50):
        u = await usage(app, DEV)
        if u and u.events_discarded == 2:
            break
        await asyncio.sleep(0.02)
    assert u.events_published == 9 and u.events_discarded == 2 and u.data_operations == 9


async def test_system_events_are_not_metered_or_limited(app, hub, product):
    s = await hub.open(Hello(DEV), ScriptedLink())
    for _ in range(6):
        await s.publish("spark/device/last_reset", "power_down", system=True)
    assert len(await events(app, name="spark/device/last_reset")) == 6
    assert await usage(app, DEV) is None


async def test_describe_is_validated_and_stored(app, hub, product):
    s = await hub.open(Hello(DEV), ScriptedLink())
    await s.describe(functions=["led", "reset", "led"], variables={"t": "double", "n": "int"},
                     firmware_version=7, system_version="5.0.1", updates_enabled=False)
    d = await load(app, DEV)
    assert d.functions == ["led", "reset"] and d.variables == {"t": "double", "n": "int32"}
    assert d.firmware_version == 7 and d.system_firmware_version == "5.0.1"
    assert d.firmware_updates_enabled is False
    for bad in ({"functions": "led"}, {"variables": {"x": "blob"}},
                {"functions": [f"f{i}" for i in range(21)]}, {"firmware_version": -1},
                {"functions": [""]}):
        with pytest.raises(Refused):
            await s.describe(**bad)
    assert (await load(app, DEV)).functions == ["led", "reset"]


async def test_function_call_and_variable_read_through_the_bus(app, hub, product):
    link = ScriptedLink()
    link.functions["led"] = lambda arg: 1 if arg == "on" else 0
    link.variables.update({"t": 21, "n": "42", "label": 7, "on": 1})
    s = await hub.open(Hello(DEV), link)
    await s.describe(functions=["led"], variables={"t": "double", "n": "int32",
                                                   "label": "string", "on": "bool"})
    subject = contract.request_subject(DEV)

    async def ask(body: dict[str, Any]) -> dict[str, Any]:
        return (await hub.bus.request(subject, body, timeout=WAIT)).json()

    assert await ask({"kind": "function", "name": "led", "arg": "on"}) == {
        "ok": True, "return_value": 1}
    assert (await ask({"kind": "variable", "name": "t"}))["result"] == 21.0
    assert (await ask({"kind": "variable", "name": "n"}))["result"] == 42
    assert (await ask({"kind": "variable", "name": "label"}))["result"] == "7"
    assert (await ask({"kind": "variable", "name": "on"}))["result"] is True
    missing = await ask({"kind": "function", "name": "nope"})
    assert missing["status"] == 404 and missing["error_description"] == "Function nope not found"
    assert (await ask({"kind": "variable", "name": "zz"}))["status"] == 404
    assert (await ask({"kind": "function", "name": "led", "arg": "x" * 1025}))["status"] == 400
    assert (await ask({"kind": "dance", "name": "led"}))["status"] == 400
    for raw in (b"not json", b"[1, 2]", b'{"kind": "function"}', b'"text"'):  # malformed
        r = (await hub.bus.request(subject, raw, timeout=WAIT)).json()
        assert r == {"ok": False, "status": 400, "error": "invalid_request",
                     "error_description": "Malformed request"}, raw
    u = await usage(app, DEV)
    assert u.function_calls == 1 and u.variable_reads == 4 and u.data_operations == 5


async def test_a_described_function_answers_while_its_description_is_stored(app, hub, product,
                                                                            monkeypatch):
    """The live session takes a description at once: whoever sees the stored one (or asks
    before it is stored) can call what it lists; no 404 in between."""
    link = ScriptedLink()
    link.functions["led"] = lambda arg: 1
    s = await hub.open(Hello(DEV), link)
    release, storing = asyncio.Event(), asyncio.Event()
    write = hub.writer.write

    async def held(*args: Any, **kw: Any) -> Any:
        if kw.get("change") is not None:  # the description (the call's usage goes through)
            storing.set()
            await release.wait()
        return await write(*args, **kw)

    monkeypatch.setattr(hub.writer, "write", held)
    describing = asyncio.ensure_future(s.describe(functions=["led"]))
    async with asyncio.timeout(WAIT):
        await storing.wait()
        r = (await hub.bus.request(contract.request_subject(DEV),
                                   {"kind": "function", "name": "led"}, timeout=WAIT)).json()
        assert r == {"ok": True, "return_value": 1}
        assert (await load(app, DEV)).functions in (None, [])  # not stored yet
        release.set()
        await describing
    assert (await load(app, DEV)).functions == ["led"]


async def test_calls_time_out_and_device_errors_are_reported(app, hub, product):
    link = ScriptedLink()

    async def slow(arg: str) -> int:
        await asyncio.sleep(10)
        return 0

    def broken(arg: str) -> int:
        raise DeviceError("no LED")

    link.functions.update({"slow": slow, "broken": broken, "huge": lambda a: 2**40})
    s = await hub.open(Hello(DEV), link)
    await s.describe(functions=["slow", "broken", "huge"])
    subject = contract.request_subject(DEV)
    r = (await hub.bus.request(subject, {"kind": "function", "name": "slow", "timeout": 0.1},
                               timeout=WAIT)).json()
    assert r["status"] == 408 and r["error_description"] == "Timed out."
    r = (await hub.bus.request(subject, {"kind": "function", "name": "broken"},
                               timeout=WAIT)).json()
    assert r["status"] == 400 and "no LED" in r["error_description"]
    r = (await hub.bus.request(subject, {"kind": "function", "name": "huge"}, timeout=WAIT)).json()
    assert r["status"] == 502
    assert await usage(app, DEV) is None  # nothing succeeded, nothing counted


async def test_no_session_means_no_responders(app, hub, product):
    with pytest.raises(NoResponders):
        await hub.bus.request(contract.request_subject(DEV), {"kind": "function", "name": "x"},
                              timeout=1)


async def test_subscribed_devices_receive_scope_events_and_deliveries_are_counted(
        app, hub, product, client):
    a, b = ScriptedLink(), ScriptedLink()
    sa = await hub.open(Hello(DEV), a)
    sb = await hub.open(Hello(DEV2), b)
    await sb.subscribe("temp")
    # an event of another product must not arrive
    _tok2, other = await owner_and_product(client, "bob@example.com")
    await hub.writer.write(NewEvent(name="temperature", data="elsewhere",
                                    product_id=other["id"], source="cloud"))
    await sa.publish("humidity", "55")  # no matching prefix
    await sa.publish("temperature", "21")
    await asyncio.wait_for(b.delivery.wait(), WAIT)
    await asyncio.sleep(0.05)
    assert b.delivered == [("temperature", "21", DEV)]
    assert a.delivered == []
    u = await usage(app, DEV2)
    assert u.events_delivered == 1 and u.data_operations == 1
    await sb.unsubscribe("temp")
    await sa.publish("temperature", "22")
    await asyncio.sleep(0.1)
    assert len(b.delivered) == 1


async def test_refresh_after_a_claim_changes_the_scope(app, hub, product, client):
    s = await hub.open(Hello(DEV), ScriptedLink())
    assert s.facts.owner_user_id is None
    async with app.state.sessionmaker() as db:
        uid = (await db.execute(select(User.id))).scalars().first()
        d = await db.get(Device, DEV)
        d.owner_user_id = uid
        await db.commit()
    await hub.bus.publish(contract.control_subject(DEV), {"op": "refresh"})
    for _ in range(50):
        if s.facts.owner_user_id == uid:
            break
        await asyncio.sleep(0.02)
    assert s.facts.owner_user_id == uid and s.facts.product_id == product["id"]


async def test_control_disconnect_closes_the_session(app, hub, product):
    link = ScriptedLink()
    s = await hub.open(Hello(DEV), link)
    await hub.bus.publish(contract.control_subject(DEV), {"op": "disconnect", "reason": "bye"})
    for _ in range(500):  # bounded: 10 s (a loaded machine delivers the signal late)
        if s.closed:
            break
        await asyncio.sleep(0.02)
    assert s.closed and link.disconnected == ["bye"]
    for _ in range(500):  # the offline fact is written after the close: wait for it
        d = await load(app, DEV)
        if not d.online:
            break
        await asyncio.sleep(0.02)
    assert not d.online and d.last_disconnect_reason == "bye"


async def test_the_gate_can_pause_device_traffic(app, hub, product):
    class Paused:
        def refuse(self, facts: DeviceFacts, kind: str) -> str | None:
            return "The monthly data operations are used up"

    link = ScriptedLink()
    link.functions["led"] = lambda a: 1
    s = await hub.open(Hello(DEV), link)
    await s.describe(functions=["led"])
    hub.gate = Paused()
    with pytest.raises(Refused) as exc:
        await s.publish("temp", "1")
    assert exc.value.code == "paused"
    r = (await hub.bus.request(contract.request_subject(DEV),
                               {"kind": "function", "name": "led"}, timeout=WAIT)).json()
    assert r["status"] == 403 and r["error"] == "communication_paused"
    # system events still flow (presence, OTA status)
    await s.publish("spark/status/x", "y", system=True)


async def test_presence_flush_writes_last_heard(app, hub, product, manual_clock):
    s = await hub.open(Hello(DEV), ScriptedLink())
    manual_clock.advance(seconds=42)
    s.heard()
    await hub.flush_presence()
    assert (await load(app, DEV)).last_heard == manual_clock.now()


async def test_hub_stop_marks_sessions_offline(app, hub, product):
    link = ScriptedLink()
    await hub.open(Hello(DEV), link)
    await hub.stop()
    d = await load(app, DEV)
    assert not d.online and d.last_disconnect_reason == "The server is shutting down"
    assert link.disconnected == ["The server is shutting down"]
    with pytest.raises(Refused):
        await hub.open(Hello(DEV), ScriptedLink())


async def test_start_resets_presence_left_by_a_crash(app, hub, product):
    await hub.open(Hello(DEV), ScriptedLink())
    fresh = SessionHub(hub.settings, hub.sessionmaker, hub.bus, hub.writer)
    await fresh.start()
    try:
        d = await load(app, DEV)
        assert not d.online and d.last_disconnect_reason == "The server restarted"
    finally:
        await fresh.stop()


def test_variable_coercion():
    assert coerce_variable("true", "bool") is True and coerce_variable(0, "bool") is False
    assert coerce_variable(3.0, "int32") == 3 and coerce_variable("17", "int32") == 17
    assert coerce_variable(1, "double") == 1.0 and coerce_variable("2.5", "double") == 2.5
    assert coerce_variable(2.5, "string") == "2.5"
    for value, vtype in ((2**31, "int32"), ("x", "int32"), (float("nan"), "double"),
                         ("maybe", "bool"), (None, "string"), ([1], "double")):
        with pytest.raises(DeviceError):
            coerce_variable(value, vtype)


def test_metering_rules():
    assert [ops_per_kb(n) for n in (0, 800, 1024, 1025, 1300, 16384)] == [1, 1, 1, 2, 2, 16]
    assert period_of(dt.datetime(2026, 3, 31, 23, 59, tzinfo=dt.UTC)) == dt.date(2026, 3, 1)


async def _wait_offline(app: Any, device_id: str) -> None:
    """Until the session's close has recorded the device offline (close runs after the
    bus delivered the control message)."""
    for _ in range(200):
        d = await load(app, device_id)
        if not d.online:
            return
        await asyncio.sleep(0.02)


async def test_denying_or_rotating_credentials_disconnects_the_live_session(app, hub, client):
    tok, prod = await owner_and_product(client)
    await add_device(app, DEV, prod["id"])
    await add_device(app, DEV2, prod["id"])
    auth = {"Authorization": f"Bearer {tok}"}
    a, b = ScriptedLink(), ScriptedLink()
    sa = await hub.open(Hello(DEV), a)
    sb = await hub.open(Hello(DEV2), b)
    r = await client.request("DELETE", f"/v1/products/{prod['id']}/devices/{DEV}", headers=auth,
                             json={"deny": True})
    assert r.status_code in (200, 204), r.text
    await _wait_offline(app, DEV)
    assert sa.closed and a.disconnected == ["The device was denied by its product"]
    assert not sb.closed
    r = await client.post(f"/v1/products/{prod['id']}/devices/{DEV2}/mqtt_secret", headers=auth)
    assert r.status_code == 200, r.text
    await _wait_offline(app, DEV2)
    assert sb.closed and b.disconnected == ["The device's credentials changed"]
    assert (await load(app, DEV2)).last_disconnect_reason == "The device's credentials changed"


async def test_a_rolled_back_change_does_not_touch_the_session(app, hub, client):
    tok, prod = await owner_and_product(client)
    await add_device(app, DEV, prod["id"])
    s = await hub.open(Hello(DEV), ScriptedLink())
    # deny with an invalid extra body field: the request fails, nothing is committed or sent
    r = await client.request("DELETE", f"/v1/products/{prod['id']}/devices/{DEV}x",
                             headers={"Authorization": f"Bearer {tok}"}, json={"deny": True})
    assert r.status_code >= 400
    await asyncio.sleep(0.1)
    assert not s.closed


async def test_a_call_in_flight_fails_at_once_when_the_device_leaves(app, hub, product):
    link = ScriptedLink()
    started = asyncio.Event()

    async def hang(arg: str) -> int:
        started.set()
        await asyncio.sleep(30)
        return 0

    link.functions["hang"] = hang
    s = await hub.open(Hello(DEV), link)
    await s.describe(functions=["hang"])
    call = asyncio.create_task(hub.bus.request(contract.request_subject(DEV),
                                               {"kind": "function", "name": "hang"}, timeout=20))
    await asyncio.wait_for(started.wait(), WAIT)
    await s.close("connection lost")
    reply = (await asyncio.wait_for(call, 2)).json()
    assert reply["status"] == 404 and reply["error"] == "device_offline"


async def test_system_events_are_not_delivered_and_system_prefixes_join_no_fanout(
        app, hub, product):
    a, b = ScriptedLink(), ScriptedLink()
    sa = await hub.open(Hello(DEV), a)
    before = hub.bus.subscription_count
    await sa.subscribe("spark")
    await sa.subscribe("particle")
    assert hub.bus.subscription_count == before  # no fan-out for system prefixes
    await sa.subscribe("")  # everything else in scope
    assert hub.bus.subscription_count == before + 1
    sb = await hub.open(Hello(DEV2), b)  # publishes spark/status online for DEV2
    await sb.publish("temperature", "20")
    await asyncio.wait_for(a.delivery.wait(), WAIT)
    await asyncio.sleep(0.05)
    assert [name for name, _data, _coreid in a.delivered] == ["temperature"]
