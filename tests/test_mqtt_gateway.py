"""The MQTT gateway over real sockets: connect/auth, presence, device publishes, requests,
inbox deliveries, protocol hygiene. Clients: paho-mqtt (independent), corral's codec as a
byte-exact client, and mosquitto_pub/mosquitto_sub."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from typing import Any

import pytest
from sqlalchemy import update

import mqtt_helpers
from corral.events.writer import NewEvent
from corral.products.models import Product
from corral.sessions import contract
from corral.transports.mqtt.codec import (
    MQTT_5,
    MQTT_311,
    Connack,
    Disconnect,
    Pingresp,
    Puback,
    Publish,
    Unsuback,
    Unsubscribe,
)
from corral.transports.mqtt.properties import Properties
from corral.transports.mqtt.server import start_mqtt_listeners
from helpers import bearer
from mqtt_helpers import (
    DEV,
    DEV2,
    Paho,
    Raw,
    device_row,
    events,
    rotate_secret,
    statuses,
    t,
    until,
)

# the gateway fixtures shared by the MQTT test files (pytest finds them by name)
settings, gw = mqtt_helpers.settings, mqtt_helpers.gw

FOREIGN = "ffffffffffffffffffffffff"


async def raw(gw: Any, version: int = MQTT_5, **kw: Any) -> Raw:
    r = await Raw.open(gw.port, version)
    ack = await r.connect(DEV, gw.secret, **kw)
    assert ack.reason_code == 0, ack
    return r


# --- connecting ----------------------------------------------------------------------------------

@pytest.mark.parametrize("version", [4, 5])
async def test_paho_connects_presence_online_and_offline(gw, version):
    dev = Paho(gw.port, DEV, gw.secret, version=version)
    await dev.connect()
    row = await device_row(gw.app)
    assert row.online and row.transport == "mqtt" and row.last_handshake_at is not None
    assert await until(lambda: statuses(gw.app)) == ["online"]
    r = await gw.client.get(f"/v1/devices/{DEV}", headers=bearer(gw.token))
    assert r.status_code == 200 and r.json()["online"] is True
    await dev.disconnect()
    assert await until(lambda: _offline(gw.app)) == "client disconnected"
    assert await until(lambda: _statuses(gw.app, 2)) == ["online", "offline"]


async def _statuses(app: Any, n: int, device_id: str = DEV) -> list[str | None]:
    got = await statuses(app, device_id)
    return got if len(got) >= n else []


async def _offline(app: Any, device_id: str = DEV) -> str | None:
    row = await device_row(app, device_id)
    return None if row.online else row.last_disconnect_reason


async def test_v5_connack_properties_and_keepalive_cap(gw, settings):
    r = await Raw.open(gw.port)
    ack = await r.connect(DEV, gw.secret, keep_alive=0,
                          properties=Properties(session_expiry_interval=10**6))
    assert ack.reason_code == 0 and not ack.session_present
    p = ack.properties
    assert p.maximum_qos == 1 and p.retain_available == 0
    assert p.maximum_packet_size == settings.mqtt_max_packet_bytes
    assert p.receive_maximum == 64 and p.server_keep_alive == settings.mqtt_max_keepalive_s
    assert p.session_expiry_interval == settings.mqtt_session_expiry_s  # capped
    assert p.assigned_client_identifier is None
    await r.ping()
    r.close()


async def test_client_id_is_case_insensitive_and_username_optional_in_v5(gw):
    r = await Raw.open(gw.port)
    ack = await r.connect(DEV.upper(), gw.secret, username=None)
    assert ack.reason_code == 0
    assert (await device_row(gw.app)).online
    r.close()


@pytest.mark.parametrize(("version", "case", "code"), [
    (4, "wrong secret", 4), (5, "wrong secret", 0x86),
    (4, "unknown device", 4), (5, "unknown device", 0x86),
    (4, "no password", 4), (5, "no password", 0x86),
    (4, "other username", 4), (5, "other username", 0x86),
    (4, "bad client id", 2), (5, "bad client id", 0x85),
    (5, "empty client id", 0x85),
])
async def test_refused_credentials(gw, version, case, code):
    device, secret, kw = DEV, gw.secret, {}
    if case == "wrong secret":
        secret = gw.secret2
    elif case == "unknown device":
        device = FOREIGN
    elif case == "no password":
        secret = None
    elif case == "other username":
        kw = {"username": DEV2}
    elif case == "bad client id":
        kw = {"client_id": "not-a-device"}
    elif case == "empty client id":
        kw = {"client_id": ""}
    r = await Raw.open(gw.port, version)
    ack = await r.connect(device, secret, **kw)
    assert ack.reason_code == code
    assert await r.closed() == []
    assert not (await device_row(gw.app)).online
    assert await statuses(gw.app) == []


@pytest.mark.parametrize("state", ["quarantined", "denied"])
@pytest.mark.parametrize("version", [4, 5])
async def test_quarantined_or_denied_device_is_not_authorized(gw, version, state):
    """docs/mqtt.md: with its right secret, a quarantined or denied device is refused as
    not authorized (MQTT 5 0x87, MQTT 3.1.1 code 5), not as a bad password (0x86 / 4)."""
    async with gw.app.state.sessionmaker() as db:
        from corral.devices.models import Device
        await db.execute(update(Device).where(Device.id == DEV).values(**{state: True}))
        await db.commit()
    r = await Raw.open(gw.port, version)
    ack = await r.connect(DEV, gw.secret)
    assert ack.reason_code == (5 if version == 4 else 0x87)
    if version == 5:
        assert state[:6] in (ack.properties.reason_string or "").lower()
    assert await r.closed() == []
    assert not (await device_row(gw.app)).online


async def test_unsupported_protocol_version_gets_code_1(gw):
    r = await Raw.open(gw.port)
    # CONNECT, protocol "MQTT" level 3
    r.send_raw(bytes([0x10, 12, 0, 4]) + b"MQTT" + bytes([3, 2, 0, 60, 0, 0]))
    assert await r.reader.read(10) == b"\x20\x02\x00\x01"
    assert await r.reader.read(10) == b""


async def test_enhanced_auth_is_refused(gw):
    r = await Raw.open(gw.port)
    ack = await r.connect(DEV, gw.secret, properties=Properties(authentication_method="SCRAM"))
    assert ack.reason_code == 0x8C


# --- slow, broken and malicious clients ---------------------------------------------------------

async def test_slow_loris_without_connect_is_closed(gw):
    r = await Raw.open(gw.port)
    started = time.monotonic()
    assert await r.closed(within=3) == []
    assert 0.3 < time.monotonic() - started < 2.5
    # dribbling a CONNECT one byte at a time does not extend the deadline
    r = await Raw.open(gw.port)
    started = time.monotonic()
    from corral.transports.mqtt.codec import Connect, encode
    data = encode(Connect(client_id=DEV, username=DEV, password=b"x" * 50,
                          protocol_level=MQTT_311), MQTT_311)

    async def dribble() -> None:
        for b in data:
            r.send_raw(bytes([b]))
            await asyncio.sleep(0.05)

    task = asyncio.create_task(dribble())
    assert await r.closed(within=3) == []
    task.cancel()
    assert time.monotonic() - started < 2.0


@pytest.mark.parametrize("garbage", [
    b"\x00\x00\x00\x00",                          # packet type 0
    b"\x10\xff\xff\xff\xff\x7f",                  # remaining length longer than 4 bytes
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",          # HTTP
    b"\x30\x02\x00\x00",                          # PUBLISH before CONNECT
])
async def test_garbage_before_connect_closes_only_that_connection(gw, garbage):
    good = await raw(gw)
    bad = await Raw.open(gw.port)
    bad.send_raw(garbage)
    await bad.closed(within=3)
    ack = await good.publish(t("events", "still-here"), "1", packet_id=7)
    assert ack.packet_id == 7 and ack.reason_code == 0
    good.close()


@pytest.mark.parametrize("version", [4, 5])
async def test_malformed_packet_after_connect_closes_with_protocol_error(gw, version):
    other = Paho(gw.port, DEV2, gw.secret2)
    await other.connect()
    r = await raw(gw, version)
    r.send_raw(b"\x30\xff\xff\xff\xff\x01")  # bad remaining length
    seen = await r.closed()
    if version == 5:
        assert isinstance(seen[-1], Disconnect) and seen[-1].reason_code == 0x81
    else:
        assert seen == []
    reason = await until(lambda: _offline(gw.app))
    assert reason.startswith("protocol error")
    assert (await other.publish(t("events", "ok", DEV2), "1")).value == 0
    other.stop()


async def test_oversize_packet_is_refused_with_0x95(gw, settings):
    r = await raw(gw)
    big = b"x" * settings.mqtt_max_packet_bytes
    r.send(Publish(t("events", "big"), big, 1, packet_id=1))
    seen = await r.closed()
    assert isinstance(seen[-1], Disconnect) and seen[-1].reason_code == 0x95
    assert await events(gw.app, name="big") == []


async def test_keep_alive_expiry(gw):
    r = await Raw.open(gw.port, MQTT_311)
    started = time.monotonic()
    assert (await r.connect(DEV, gw.secret, keep_alive=1)).reason_code == 0
    await asyncio.sleep(0.6)
    await r.ping()  # traffic resets the timer
    assert await r.closed(within=4) == []
    assert 1.9 < time.monotonic() - started < 4
    assert await until(lambda: _offline(gw.app)) == "keep-alive timeout"


@pytest.mark.parametrize("version", [4, 5])
async def test_qos2_publish_closes(gw, version):
    r = await raw(gw, version)
    r.send(Publish(t("events", "q2"), b"1", 2, packet_id=3))
    seen = await r.closed()
    if version == 5:
        assert isinstance(seen[-1], Disconnect) and seen[-1].reason_code == 0x9B
    assert await events(gw.app, name="q2") == []


async def test_retained_publish_is_a_protocol_error_in_v5_and_ignored_in_v311(gw):
    r = await raw(gw, MQTT_311)
    r.send(Publish(t("events", "kept"), b"1", 1, retain=True, packet_id=1))
    assert (await r.recv_type(Puback)).packet_id == 1
    assert [e.data for e in await events(gw.app, name="kept")] == ["1"]
    r.close()
    r = await raw(gw)
    r.send(Publish(t("events", "kept"), b"2", 1, retain=True, packet_id=1))
    seen = await r.closed()
    assert isinstance(seen[-1], Disconnect) and seen[-1].reason_code == 0x9A


# --- device publishes ----------------------------------------------------------------------------

@pytest.mark.parametrize("version", [4, 5])
async def test_publish_qos0_and_qos1_stored(gw, version):
    dev = Paho(gw.port, DEV, gw.secret, version=version)
    await dev.connect()
    await dev.publish(t("events", "temp/inside"), "21.5", qos=0)
    rc = await dev.publish(t("events", "temp/outside"), "3.5", qos=1,
                           expiry=120 if version == 5 else None)
    assert rc.value == 0
    evs = await until(lambda: _names(gw.app, 2))
    assert [(e.name, e.data) for e in evs] == [("temp/inside", "21.5"), ("temp/outside", "3.5")]
    assert evs[1].ttl == (120 if version == 5 else 60) and evs[0].ttl == 60
    assert evs[1].product_id == gw.product["id"] and evs[1].source == "device"
    await dev.disconnect()


async def _names(app: Any, n: int) -> list[Any]:
    evs = [e for e in await events(app) if e.name != "spark/status"]
    return evs if len(evs) >= n else []


async def test_puback_only_after_commit(gw):
    r = await raw(gw)
    ack = await r.publish(t("events", "committed"), "yes", packet_id=42)
    assert ack.packet_id == 42 and ack.reason_code == 0
    # no waiting: the row is already committed when the PUBACK arrives
    assert [e.data for e in await events(gw.app, name="committed")] == ["yes"]
    r.close()


async def test_puback_waits_for_the_commit_but_pings_do_not(gw, monkeypatch):
    real = gw.hub.writer._commit

    async def slow(batch: Any) -> None:  # every batch commits 0.4 s late
        await asyncio.sleep(0.4)
        await real(batch)

    r = await raw(gw)
    monkeypatch.setattr(gw.hub.writer, "_commit", slow)
    started = time.monotonic()
    r.send(Publish(t("events", "slow"), b"1", 1, packet_id=5))
    await r.ping()  # answered while the commit is still pending
    assert time.monotonic() - started < 0.3
    ack = await r.recv_type(Puback)
    assert ack.packet_id == 5 and time.monotonic() - started >= 0.4
    assert [e.data for e in await events(gw.app, name="slow")] == ["1"]
    r.close()


async def test_a_publish_that_cannot_be_stored_is_never_acknowledged(gw, monkeypatch):
    async def broken(db: Any, rows: Any) -> list[int]:
        raise RuntimeError("disk full")

    v5 = await raw(gw, MQTT_5)
    monkeypatch.setattr(gw.hub.writer, "_insert", broken)
    ack = await v5.publish(t("events", "lost"), "1", packet_id=9)
    assert ack.reason_code == 0x83  # MQTT 5: refused in the PUBACK
    monkeypatch.undo()  # (connecting stores a spark/status event)
    v3 = await raw(gw, MQTT_311)
    monkeypatch.setattr(gw.hub.writer, "_insert", broken)
    v3.send(Publish(t("events", "lost"), b"2", 1, packet_id=10))
    before_close = await v3.closed()  # 3.1.1: no PUBACK, the connection is dropped
    assert not [p for p in before_close if isinstance(p, Puback)]
    assert await events(gw.app, name="lost") == []


async def test_pipelined_publishes_acked_in_order_and_stored_in_order(gw):
    r = await raw(gw)
    n = 200
    r.send(*[Publish(t("events", "seq"), str(i).encode(), 1, packet_id=i + 1)
             for i in range(n)])
    acks = [await r.recv_type(Puback) for _ in range(n)]
    assert [a.packet_id for a in acks] == list(range(1, n + 1))
    assert all(a.reason_code == 0 for a in acks)
    assert [e.data for e in await events(gw.app, name="seq")] == [str(i) for i in range(n)]
    await r.ping()
    r.close()


async def test_rate_limit_quota_exceeded_v5_and_silent_v311(gw, manual_clock):
    async with gw.app.state.sessionmaker() as db:
        await db.execute(update(Product).where(Product.id == gw.product["id"]).values(
            settings={"quarantine": True, "event_rate_per_s": 1, "event_rate_burst": 4}))
        await db.commit()
    r = await raw(gw)
    codes = [(await r.publish(t("events", "burst"), str(i), packet_id=i + 1)).reason_code
             for i in range(6)]
    assert codes == [0, 0, 0, 0, 0x97, 0x97]
    manual_clock.advance(2)
    assert (await r.publish(t("events", "burst"), "later", packet_id=9)).reason_code == 0
    assert [e.data for e in await events(gw.app, name="burst")] == ["0", "1", "2", "3", "later"]
    r.close()
    v3 = await raw(gw, MQTT_311)
    manual_clock.advance(10)
    for i in range(6):
        ack = await v3.publish(t("events", "v3burst"), str(i), packet_id=i + 1)
        assert ack.packet_id == i + 1  # acknowledged, nothing to signal in 3.1.1
    assert len(await events(gw.app, name="v3burst")) == 4
    assert gw.hub.discarded >= 4
    v3.close()


async def test_refused_content_reason_codes(gw):
    r = await raw(gw)
    big = "x" * 1025
    cases = [
        (t("events", "big"), big, 0x99),                      # over event_data_max_bytes
        (t("events", "spark/fake"), "1", 0x90),               # reserved name
        (t("events", "Particle-thing"), "1", 0x90),
        (t("events", "x" * 65), "1", 0x90),                   # name too long
        (t("events", "bin"), b"\xff\xfe", 0x99),               # not UTF-8
        (t("describe"), "{not json", 0x99),
        (t("describe"), '{"variables": {"t": "complex"}}', 0x99),
        (t("describe"), "[" * 5_000 + "]" * 5_000, 0x99),      # too deep to parse
        (t("describe"), '{"functions": ' + "[" * 900 + "]" * 900 + "}", 0x99),
        (t("diagnostics"), '{"a":' * 900 + "1" + "}" * 900, 0x99),  # parses, too deep
        (t("claim"), "NOSUCHCODE", 0x87),
    ]
    for i, (topic, payload, code) in enumerate(cases, start=1):
        ack = await r.publish(topic, payload, packet_id=i)
        assert (ack.packet_id, ack.reason_code) == (i, code), topic
        assert ack.properties.reason_string
    assert [e.name for e in await events(gw.app)] == ["spark/status"]
    await r.ping()  # still connected
    r.close()


async def test_v311_refused_content_is_acked_but_not_stored(gw):
    r = await raw(gw, MQTT_311)
    for i, topic in enumerate([t("events", "spark/x"), t("events", "ok")], start=1):
        assert (await r.publish(topic, "1", packet_id=i)).packet_id == i
    assert [e.name for e in await events(gw.app) if e.name != "spark/status"] == ["ok"]
    r.close()


async def test_acl_v5_publish_and_subscribe_refused_connection_stays(gw):
    r = await raw(gw)
    for i, topic in enumerate([t("events", "x", DEV2), "devices", "other/thing",
                               t("requests", "abc"), t("inbox", "x")], start=1):
        ack = await r.publish(topic, "1", packet_id=i)
        assert ack.reason_code == 0x87, topic
    r.send(Publish(t("events", "x", DEV2), b"qos0", 0))  # dropped silently
    codes = await r.subscribe(t("events", "#"), t("requests", "+", DEV2), "#",
                              t("inbox", "te+mp"), t("requests", "+"), t("inbox", "#"),
                              t("ota", "#"), "$share/g/" + t("inbox", "#"), packet_id=5)
    assert codes == (0x87, 0x87, 0x87, 0x87, 1, 1, 1, 0x9E)
    r.send(Unsubscribe(6, (t("inbox", "#"), t("inbox", "never"), t("events", "x", DEV2))))
    unsub = await r.recv_type(Unsuback)
    assert unsub.reason_codes == (0, 0x11, 0x87)
    await r.ping()
    assert await events(gw.app, device_id=DEV2) == []
    r.close()


async def test_acl_v311_subscribe_refused_0x80_publish_closes(gw):
    r = await raw(gw, MQTT_311)
    codes = await r.subscribe(t("requests", "+", DEV2), t("requests", "+"), qos=2)
    assert codes == (0x80, 1)  # QoS capped at 1
    r.send(Publish(t("events", "x", DEV2), b"1", 1, packet_id=2))
    assert await r.closed() == []
    assert (await until(lambda: _offline(gw.app))).startswith("not authorized")
    assert await events(gw.app, device_id=DEV2) == []


async def test_describe_shows_in_device_view_and_metering_ignores_it(gw):
    dev = Paho(gw.port, DEV, gw.secret)
    await dev.connect()
    body = {"functions": ["led", "reset"], "variables": {"temperature": "double", "on": "bool"},
            "firmware_version": 3, "system_version": "1.4.0", "ignored": 1}
    assert (await dev.publish(t("describe"), json.dumps(body))).value == 0
    r = await gw.client.get(f"/v1/devices/{DEV}", headers=bearer(gw.token))
    view = r.json()
    assert view["functions"] == ["led", "reset"]
    assert view["variables"] == {"temperature": "double", "on": "bool"}
    assert view["system_firmware_version"] == "1.4.0"
    await dev.disconnect()


# --- requests: functions and variables ----------------------------------------------------------

def answer(dev: Paho, msg: Any) -> None:
    """A device's request handler: led -> 1 (or error on "boom"), temperature -> 21.5."""
    if "/requests/" not in msg.topic:
        return
    rid = msg.topic.rsplit("/", 1)[1]
    req = json.loads(msg.payload)
    if req["kind"] == "function":
        reply = {"error": "it broke"} if req["arg"] == "boom" else {"return_value": len(req["arg"])}
    elif req["kind"] == "variable":
        reply = {"result": 21.5}
    else:
        dev.c.publish(f"devices/{DEV}/describe", json.dumps({"functions": ["led", "later"]}),
                      qos=1)
        return
    dev.c.publish(f"devices/{DEV}/replies/{rid}", json.dumps(reply), qos=1)


async def call(gw: Any, body: dict[str, Any], wait: float = 5.0) -> dict[str, Any]:
    msg = await gw.hub.bus.request(contract.request_subject(DEV), {**body, "timeout": wait},
                                   timeout=wait + 2)
    return msg.json()  # type: ignore[no-any-return]


@pytest.mark.parametrize("version", [4, 5])
async def test_function_call_and_variable_read_through_the_bus(gw, version):
    dev = Paho(gw.port, DEV, gw.secret, version=version)
    dev.handlers.append(answer)
    await dev.connect()
    describe = {"functions": ["led"], "variables": {"temperature": "double"}}
    await dev.publish(t("describe"), json.dumps(describe))
    # not listening for requests yet
    reply = await call(gw, {"kind": "function", "name": "led", "arg": "on"})
    assert reply["ok"] is False and "does not accept requests" in reply["error_description"]
    assert (await dev.subscribe(t("requests", "+")))[0].value == 1
    assert await call(gw, {"kind": "function", "name": "led", "arg": "on!"}) == {
        "ok": True, "return_value": 3}
    assert await call(gw, {"kind": "variable", "name": "temperature"}) == {
        "ok": True, "result": 21.5, "type": "double"}
    failed = await call(gw, {"kind": "function", "name": "led", "arg": "boom"})
    assert failed["ok"] is False and "it broke" in failed["error_description"]
    # the device asked to describe itself again (through the control subject)
    await gw.hub.bus.publish(contract.control_subject(DEV), {"op": "describe"})
    await until(lambda: _functions(gw.app, ["led", "later"]), what="re-describe")
    await dev.disconnect()


async def _functions(app: Any, expected: list[str]) -> bool:
    return (await device_row(app)).functions == expected


async def test_function_timeout_and_disconnect_fail_pending_calls(gw):
    r = await raw(gw)
    await r.publish(t("describe"), json.dumps({"functions": ["slow"]}), packet_id=1)
    assert await r.subscribe(t("requests", "#"), qos=0, packet_id=2) == (0,)
    reply = await call(gw, {"kind": "function", "name": "slow", "arg": ""}, wait=0.3)
    assert reply["status"] == 408
    req = await r.recv_type(Publish)
    assert req.qos == 0 and json.loads(req.payload) == {"kind": "function", "name": "slow",
                                                       "arg": ""}
    # an answer to a forgotten request is harmless
    rid = req.topic.rsplit("/", 1)[1]
    assert (await r.publish(t("replies", rid), '{"return_value": 1}', packet_id=3)
            ).reason_code == 0
    pending = asyncio.create_task(call(gw, {"kind": "function", "name": "slow", "arg": ""}))
    await r.recv_type(Publish)
    r.close()
    reply = await asyncio.wait_for(pending, 5)
    assert reply["ok"] is False and "disconnected" in reply["error_description"]


# --- events to the device (inbox) ---------------------------------------------------------------

async def cloud_event(gw: Any, name: str, data: str) -> None:
    await gw.app.state.runtime.writer.write(NewEvent(
        name=name, data=data, source="cloud", product_id=gw.product["id"],
        org_id=gw.product["org_id"]))


@pytest.mark.parametrize("version", [4, 5])
async def test_inbox_prefix_subscription_receives_cloud_events(gw, version):
    dev = Paho(gw.port, DEV, gw.secret, version=version)
    await dev.connect()
    assert (await dev.subscribe(t("inbox", "temp"), qos=1))[0].value == 1
    await cloud_event(gw, "humidity", "40")
    await cloud_event(gw, "temperature", "21")
    # an event from the other device of the product arrives too
    other = Paho(gw.port, DEV2, gw.secret2)
    await other.connect()
    await other.publish(t("events", "temp/2", DEV2), "22")
    await until(lambda: len(dev.messages) >= 2, what="deliveries")
    await asyncio.sleep(0.1)
    got = [(m.topic, m.payload.decode(), m.qos) for m in dev.messages]
    assert got == [(t("inbox", "temperature"), "21", 1), (t("inbox", "temp/2"), "22", 1)]
    if version == 5:
        props = dict(dev.messages[1].properties.UserProperty)
        assert props["coreid"] == DEV2 and props["published_at"].endswith("Z")
    other.stop()
    await dev.disconnect()


async def test_unsubscribe_stops_deliveries(gw):
    r = await raw(gw)
    assert await r.subscribe(t("inbox", "#"), qos=0) == (0,)
    await cloud_event(gw, "a", "1")
    assert (await r.recv_type(Publish)).topic == t("inbox", "a")
    r.send(Unsubscribe(2, (t("inbox", "#"),)))
    assert (await r.recv_type(Unsuback)).reason_codes == (0,)
    await cloud_event(gw, "b", "2")
    await asyncio.sleep(0.2)
    r.send_raw(b"\xc0\x00")
    assert isinstance(await r.recv(), Pingresp)  # nothing delivered in between
    r.close()


async def test_event_names_that_cannot_be_topics_are_skipped(gw):
    r = await raw(gw)
    await r.subscribe(t("inbox", "#"), qos=0)
    await cloud_event(gw, "a+b", "x")
    await cloud_event(gw, "ok", "y")
    p = await r.recv_type(Publish)
    assert p.topic == t("inbox", "ok")
    r.close()


async def test_v5_client_maximum_packet_size_is_respected(gw):
    r = await Raw.open(gw.port)
    assert (await r.connect(DEV, gw.secret,
                            properties=Properties(maximum_packet_size=200))).reason_code == 0
    await r.subscribe(t("inbox", "#"), qos=0)
    await cloud_event(gw, "big", "x" * 500)
    await cloud_event(gw, "small", "x")
    assert (await r.recv_type(Publish)).topic == t("inbox", "small")
    r.close()


# --- claim -----------------------------------------------------------------------------------

async def test_claim_code_claims_the_device(gw):
    r = await gw.client.post("/v1/device_claims", headers=bearer(gw.token), json={})
    code = r.json()["claim_code"]
    dev = await raw(gw)
    assert (await dev.publish(t("claim"), code)).reason_code == 0
    assert (await device_row(gw.app)).owner_user_id is not None
    dev.close()


# --- duplicates, shutdown, listeners ------------------------------------------------------------

async def test_duplicate_client_id_takes_over(gw):
    first = await raw(gw)
    second = await raw(gw)
    seen = await first.closed()
    assert isinstance(seen[-1], Disconnect) and seen[-1].reason_code == 0x8E
    assert (await second.publish(t("events", "after"), "1")).reason_code == 0
    await asyncio.sleep(0.1)
    assert (await device_row(gw.app)).online
    assert await statuses(gw.app) == ["online", "online"]  # no offline in between
    second.close()
    assert await until(lambda: _offline(gw.app)) == "connection lost"


async def test_paho_v311_takeover(gw):
    a = Paho(gw.port, DEV, gw.secret, version=4)
    await a.connect()
    b = Paho(gw.port, DEV, gw.secret, version=4)
    await b.connect()
    await until(lambda: a.disconnected is not None, what="first dropped")
    assert (await b.publish(t("events", "b"), "1")).value == 0
    a.stop()
    await b.disconnect()


async def test_listener_stop_disconnects_with_shutdown(app, gw):
    r = await raw(gw)
    v3 = Paho(gw.port, DEV2, gw.secret2, version=4)
    await v3.connect()
    await gw.server.stop()
    seen = await r.closed()
    assert isinstance(seen[-1], Disconnect) and seen[-1].reason_code == 0x8B
    assert await until(lambda: _offline(app)) == "The server is shutting down"
    assert await until(lambda: _offline(app, DEV2)) == "The server is shutting down"
    v3.stop()
    with pytest.raises(OSError):
        await Raw.open(gw.port)


async def test_credentials_change_kicks_the_device(gw):
    r = await raw(gw)
    await rotate_secret(gw.client, gw.token, gw.product, DEV)
    seen = await r.closed()
    assert isinstance(seen[-1], Disconnect) and seen[-1].reason_code == 0x98
    assert "credentials" in (await until(lambda: _offline(gw.app))).lower()


async def test_start_mqtt_listeners_from_settings(app, settings, unused_tcp_port):
    hub = app.state.runtime.hub
    assert await start_mqtt_listeners(
        hub, settings.model_copy(update={"mqtt_port": 0, "mqtt_tls_port": 0})) == []
    listeners = await start_mqtt_listeners(
        hub, settings.model_copy(update={"mqtt_port": unused_tcp_port, "mqtt_tls_port": 0}),
        host="127.0.0.1")
    try:
        assert [x.port for x in listeners] == [unused_tcp_port]
        r = await Raw.open(unused_tcp_port)
        assert isinstance(await r.connect(DEV, "x"), Connack)
    finally:
        for x in listeners:
            await x.stop()


async def test_backpressure_drops_a_device_that_does_not_read(gw):
    import socket
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", gw.port))
    sock.setblocking(False)
    reader, writer = await asyncio.open_connection(sock=sock)
    r = Raw(reader, writer, MQTT_5)
    assert (await r.connect(DEV, gw.secret)).reason_code == 0
    await r.subscribe(t("inbox", "#"), qos=0)
    gw.server.drain_timeout_s = 0.3
    conn = next(iter(gw.server.connections))
    data = "x" * 1000

    async def flood() -> None:
        for _ in range(20_000):
            await conn.deliver_event("flood", data, published_at="", ttl=60, coreid=DEV2)
            if conn.closing:
                return

    await asyncio.wait_for(flood(), 10)
    reason = await until(lambda: _offline(gw.app))
    assert reason == "the device does not read what it is sent"
    r.close()


async def test_metrics_count_connections_and_refusals(gw):
    r = await raw(gw)
    await r.publish(t("events", "x", DEV2), "1")
    r.close()
    text = (await gw.client.get("/metrics")).text
    assert 'corral_mqtt_connects_total{result="accepted"}' in text
    assert 'corral_mqtt_refusals_total{reason="not_authorized",what="publish"}' in text
    assert "corral_mqtt_packets_received_total" in text


# --- mosquitto's own clients --------------------------------------------------------------------

needs_mosquitto = pytest.mark.skipif(shutil.which("mosquitto_pub") is None,
                                     reason="mosquitto clients not installed")


async def run(*args: str, within: float = 10.0) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), within)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    return proc.returncode or 0, out.decode()


@needs_mosquitto
@pytest.mark.parametrize("version", ["mqttv311", "mqttv5"])
async def test_mosquitto_pub_qos1(gw, version):
    rc, out = await run("mosquitto_pub", "-h", "127.0.0.1", "-p", str(gw.port), "-V", version,
                        "-i", DEV, "-u", DEV, "-P", gw.secret, "-q", "1",
                        "-t", t("events", "temperature"), "-m", "21.5")
    assert rc == 0, out
    assert [e.data for e in await events(gw.app, name="temperature")] == ["21.5"]
    assert await until(lambda: _offline(gw.app)) == "client disconnected"
    rc, out = await run("mosquitto_pub", "-h", "127.0.0.1", "-p", str(gw.port), "-V", version,
                        "-i", DEV, "-u", DEV, "-P", "wrong", "-q", "1",
                        "-t", t("events", "temperature"), "-m", "0")
    assert rc != 0


@needs_mosquitto
async def test_mosquitto_sub_receives_requests_and_events(gw):
    proc = await asyncio.create_subprocess_exec(
        "mosquitto_sub", "-h", "127.0.0.1", "-p", str(gw.port), "-V", "mqttv5", "-i", DEV,
        "-u", DEV, "-P", gw.secret, "-q", "1", "-v", "-C", "2",
        "-t", t("requests", "+"), "-t", t("inbox", "#"),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        # what the test relies on is the session's subscriptions (the device is online by
        # then: the session commits that before its CONNACK). mosquitto_sub starts, connects
        # and subscribes on its own schedule: a loaded machine may take seconds (5 s was
        # missed once), so the deadline is generous; a client that ended says why
        async def subscribed() -> bool:
            if proc.returncode is not None:
                assert proc.stdout is not None
                raise AssertionError(f"mosquitto_sub ended: {(await proc.stdout.read())!r}")
            return _requests_subscribed(gw)

        await until(subscribed, within=60.0, what="mosquitto_sub's subscriptions")
        assert await _online(gw.app)
        await cloud_event(gw, "hello", "world")
        await gw.hub.bus.publish(contract.control_subject(DEV), {"op": "describe"})
        out, _ = await asyncio.wait_for(proc.communicate(), 60)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    lines = sorted(out.decode().splitlines())
    assert lines[0] == f"{t('inbox', 'hello')} world"
    assert lines[1].startswith(t("requests", "")) and lines[1].endswith('{"kind":"describe"}')


async def _online(app: Any) -> bool:
    return (await device_row(app)).online


def _requests_subscribed(gw: Any) -> bool:
    state = gw.server.sessions.get(DEV)
    return bool(state and state.requests_qos is not None and state.inbox)


async def test_suback_for_v311_wildcards_and_ota(gw):
    r = await raw(gw, MQTT_311)
    codes = await r.subscribe(t("requests", "#"), t("ota", "#"), t("inbox", "a/b"))
    assert codes == (1, 1, 1)
    await r.ping()
    r.close()


async def test_fuzzed_packets_never_break_the_server(gw, caplog):
    """Mutated valid packets after CONNECT and random bytes before it: each connection ends
    or carries on, nothing is logged as an error, and a bystander keeps working."""
    import random

    from corral.transports.mqtt.codec import Pingreq, Subscribe, Subscription, encode

    rng = random.Random(20240611)
    bystander = await raw(gw)
    for version in (MQTT_311, MQTT_5):
        valid = [
            encode(Publish(t("events", "fz", DEV2), b"data", 1, packet_id=5), version),
            encode(Publish(t("describe", "", DEV2), b'{"functions":["a"]}', 0), version),
            encode(Subscribe(3, (Subscription(t("inbox", "#", DEV2), 1),)), version),
            encode(Unsubscribe(4, (t("inbox", "#", DEV2),)), version),
            encode(Puback(9), version),
            encode(Disconnect(), version),
        ]
        for _ in range(40):
            r = await Raw.open(gw.port, version)
            if rng.random() < 0.8:
                assert (await r.connect(DEV2, gw.secret2)).reason_code == 0
                data = bytearray(rng.choice(valid))
                for _ in range(rng.randint(1, 3)):
                    data[rng.randrange(len(data))] = rng.randrange(256)
                r.send_raw(bytes(data))
            else:
                r.send_raw(rng.randbytes(rng.randint(1, 64)))
            r.send(Pingreq())
            try:
                async with asyncio.timeout(0.3):
                    while not isinstance(await r.recv(), Pingresp):
                        pass
            except Exception:
                pass
            r.close()
    assert (await bystander.publish(t("events", "alive"), "1", packet_id=77)).reason_code == 0
    errors = [rec for rec in caplog.records if rec.levelno >= 40]
    assert errors == [], [rec.getMessage() for rec in errors]


@pytest.mark.parametrize(("version", "code"), [(4, 3), (5, 0x88)])
async def test_a_failing_backend_refuses_connect_as_unavailable(gw, monkeypatch, caplog,
                                                               version, code):
    async def broken(device_id: str, secret: str) -> bool:
        raise RuntimeError("database is down")

    monkeypatch.setattr(gw.hub, "authenticate_secret", broken)
    r = await Raw.open(gw.port, version)
    assert (await r.connect(DEV, gw.secret)).reason_code == code
    assert await r.closed() == []
    assert any("database is down" in (rec.exc_text or str(rec.exc_info)) for rec in caplog.records
               if rec.levelno >= 40)
