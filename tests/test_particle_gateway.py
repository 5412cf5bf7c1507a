"""The Particle TCP gateway over real sockets, with corral's own device-side implementation:
handshake and key checks, Hello and describes, presence, publish, subscribe and delivery,
functions and variables through REST, time, pings, Goodbye, admission (quarantine), robustness
(each bad connection closes alone), MQTT and Particle devices side by side, and OTA."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import socket
import zlib
from collections.abc import AsyncIterator
from types import SimpleNamespace
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from corral.device import Device as MqttDevice
from corral.devices.models import Device as DeviceRow
from corral.kit import clock
from corral.products.models import Product
from corral.transports.particle import coap, crypto
from corral.transports.particle.coap import Message
from corral.transports.particle.device import ParticleDevice
from corral.transports.particle.keys import key_path
from corral.transports.particle.server import (
    ParticleListener,
    decode_variable,
    start_particle_listener,
    system_version_text,
)
from devicekit import mqtt_listener, provision
from helpers import bearer, owner_and_product
from mqtt_helpers import DEV, DEV2, device_row, events, statuses, until
from sessionkit import live_server, sse

WAIT = 5.0
NEW = "0123456789abcdef0123ffff"
_KEYS: dict[str, rsa.RSAPrivateKey] = {}


def key(name: str, bits: int = 1024) -> rsa.RSAPrivateKey:
    """Test keys, made once per run."""
    if name not in _KEYS:
        _KEYS[name] = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return _KEYS[name]


def pub_pem(k: rsa.RSAPrivateKey) -> str:
    return k.public_key().public_bytes(serialization.Encoding.PEM,
                                       serialization.PublicFormat.SubjectPublicKeyInfo).decode()


@pytest.fixture
def settings(settings):
    return settings.model_copy(update={
        "event_rate_burst": 1000, "event_rate_per_s": 1000.0, "presence_flush_s": 0.05,
        "particle_handshake_timeout_s": 1.0, "device_call_timeout_s": 3.0})


@pytest.fixture
async def gw(app, client, settings) -> AsyncIterator[Any]:
    """The Particle listener on a free port; product Widget with DEV and DEV2, their keys
    registered over the API."""
    path = key_path(settings.data_dir)  # a premade server key (making one takes a while)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(key("server", 2048).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()))
    listener = await start_particle_listener(app.state.runtime.hub, settings, host="127.0.0.1",
                                             port=0)
    token, product = await owner_and_product(client, platform_id=6)
    r = await client.post(f"/v1/products/{product['id']}/devices", headers=bearer(token),
                          json={"ids": [DEV, DEV2]})
    assert r.status_code == 200, r.text
    for did, name in ((DEV, "dev"), (DEV2, "dev2")):
        r = await client.post(f"/v1/provisioning/{did}", headers=bearer(token),
                              json={"publicKey": pub_pem(key(name))})
        assert r.status_code == 200, r.text
    devices: list[ParticleDevice] = []

    def device(did: str = DEV, keyname: str = "dev", **kw: Any) -> ParticleDevice:
        d = ParticleDevice(did, key(keyname), listener.server_key.public_key(),
                           product_id=product["id"], **kw)
        devices.append(d)
        return d

    try:
        yield SimpleNamespace(app=app, client=client, hub=app.state.runtime.hub,
                              listener=listener, port=listener.port, token=token,
                              product=product, device=device)
    finally:
        for d in devices:
            await d.close()
        await listener.stop()


def echo_device(gw: Any, did: str = DEV, keyname: str = "dev", **kw: Any) -> ParticleDevice:
    state: dict[str, Any] = {"counter": 7, "last": "", "on": True, "temp": 21.5}

    def echo(arg: str) -> int:
        state["last"] = arg
        return len(arg)

    dev = gw.device(did, keyname, functions={"echo": echo, "fail": lambda a: -1},
                    variables={"counter": ("int32", lambda: state["counter"]),
                               "lastArg": ("string", lambda: state["last"]),
                               "on": ("bool", lambda: state["on"]),
                               "temp": ("double", lambda: state["temp"])}, **kw)
    dev.state = state  # type: ignore[attr-defined]
    return dev


async def online(gw: Any, did: str = DEV) -> bool:
    return bool((await device_row(gw.app, did)).online)


async def offline_reason(gw: Any, did: str = DEV) -> str | None:
    row = await device_row(gw.app, did)
    return None if row.online else row.last_disconnect_reason


async def healthy(gw: Any, dev: ParticleDevice, did: str) -> None:
    """``dev`` still works: a function call through REST and a stored publish."""
    r = await gw.client.post(f"/v1/devices/{did}/echo", headers=bearer(gw.token),
                             data={"arg": "still-here"})
    assert r.status_code == 200 and r.json()["return_value"] == 10, r.text
    dev.publish("alive", "yes")
    await until(lambda: events(gw.app, did, "alive"), what="the event")


# --- connecting ----------------------------------------------------------------------------------

async def test_connect_hello_describe_online(gw):
    dev = echo_device(gw, product_version=42, system_version=6200)
    await dev.connect("127.0.0.1", gw.port)
    row = await device_row(gw.app)
    assert row.online and row.transport == "particle"
    assert row.firmware_version == 42 and row.system_firmware_version == "6.2.0"
    assert row.last_ip_address == "127.0.0.1"
    await until(lambda: statuses(gw.app), what="online status")
    r = await gw.client.get(f"/v1/devices/{DEV}", headers=bearer(gw.token))
    body = r.json()
    assert body["online"] is True and body["functions"] == ["echo", "fail"]
    assert body["variables"] == {"counter": "int32", "lastArg": "string", "on": "bool",
                                 "temp": "double"}
    conn = gw.listener.connection(DEV)
    assert conn is not None and conn.session is gw.hub.sessions[DEV]
    await dev.goodbye()
    assert await until(lambda: offline_reason(gw)) == "goodbye"
    assert await until(lambda: _statuses(gw, 2)) == ["online", "offline"]


async def _statuses(gw: Any, n: int) -> list[str | None]:
    got = await statuses(gw.app)
    return got if len(got) >= n else []


async def test_a_known_device_without_a_registered_key_is_refused(gw, caplog):
    caplog.set_level(logging.INFO, "corral.particle")
    async with gw.app.state.sessionmaker() as db:
        (await db.get(DeviceRow, DEV)).public_key_der = None
        await db.commit()
    dev = echo_device(gw, keyname="other")
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
        await dev.handshake("127.0.0.1", gw.port)
    assert not await online(gw)
    await until(lambda: "or none is registered" in caplog.text, what="log")
    assert (await device_row(gw.app, DEV)).public_key_der is None  # nothing was pinned


async def test_wrong_key_is_refused_after_the_handshake(gw, caplog):
    caplog.set_level(logging.INFO, "corral.particle")
    dev = gw.device(DEV, "intruder")
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
        await dev.handshake("127.0.0.1", gw.port)
    assert not await online(gw)
    await until(lambda: "not the one registered for it" in caplog.text, what="log")
    # a device whose registered key is RSA-2048 cannot be a Particle TCP device either
    r = await gw.client.post(f"/v1/provisioning/{DEV2}", headers=bearer(gw.token),
                             json={"publicKey": pub_pem(key("big", 2048))})
    assert r.status_code == 200
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
        await gw.device(DEV2, "dev2").handshake("127.0.0.1", gw.port)


async def test_a_bulk_key_upload_ends_the_sessions_of_the_devices_whose_key_changed(gw):
    """``POST /v1/products/:p/device_keys`` as ``POST /v1/provisioning/:id`` does: a device
    whose key is replaced must handshake again with the new key (its live session was made
    with the old one); a device listed with the key it already has keeps its session."""
    replaced, kept = echo_device(gw), echo_device(gw, DEV2, "dev2")
    await replaced.connect("127.0.0.1", gw.port)
    await kept.connect("127.0.0.1", gw.port)
    assert await online(gw) and await online(gw, DEV2)
    r = await gw.client.post(f"/v1/products/{gw.product['id']}/device_keys",
                             headers=bearer(gw.token), json={"keys": [
                                 {"device_id": DEV, "public_key": pub_pem(key("dev-new"))},
                                 {"device_id": DEV2, "public_key": pub_pem(key("dev2"))}]})
    assert r.status_code == 200 and r.json()["updated"] == 2, r.text
    assert await until(lambda: offline_reason(gw), what="the replaced device offline") == \
        "The device's credentials changed"
    await until(replaced.closed.is_set, what="the replaced device's connection closed")
    # DEV2 kept its key: nothing told its session to end
    assert not kept.closed.is_set() and await online(gw, DEV2)
    await healthy(gw, kept, DEV2)
    # the old key no longer opens a session; the new one does
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
        await gw.device(DEV, "dev").handshake("127.0.0.1", gw.port)
    again = echo_device(gw, DEV, "dev-new")
    await again.connect("127.0.0.1", gw.port)
    await healthy(gw, again, DEV)


async def test_unknown_device_is_quarantined_or_auto_approved(gw):
    dev = gw.device(NEW, "new")
    with pytest.raises(Exception, match="closed"):
        await dev.connect("127.0.0.1", gw.port)
    row = await device_row(gw.app, NEW)
    assert row.quarantined and not row.online and row.product_id == gw.product["id"]
    assert row.public_key_der == key("new").public_key().public_bytes(  # pinned on first use
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    # from now on only that key is accepted for it
    with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
        await gw.device(NEW, "impostor").handshake("127.0.0.1", gw.port)
    r = await gw.client.get(f"/v1/products/{gw.product['id']}/devices",
                            headers=bearer(gw.token), params={"quarantined": "true"})
    assert NEW in {d["id"] for d in r.json()["devices"]}
    # the product auto-approves unknown devices: the next one is admitted
    async with gw.app.state.sessionmaker() as db:
        product = await db.get(Product, gw.product["id"])
        product.settings = {**product.settings, "quarantine": False}
        await db.commit()
    other = "0123456789abcdef0123eeee"
    dev2 = gw.device(other, "new2")
    await dev2.connect("127.0.0.1", gw.port)
    assert await online(gw, other)


async def test_developer_device_hello_without_a_product(gw, app):
    # Device OS sends its platform id as the product id when the firmware sets none: a
    # device of the product is still admitted on its own record
    dev = gw.device(DEV, "dev", platform_id=6)
    dev.product_id = 6
    await dev.connect("127.0.0.1", gw.port)
    assert await online(gw)


# --- traffic -------------------------------------------------------------------------------------

async def test_publish_time_and_system_events(gw):
    dev = echo_device(gw)
    await dev.connect("127.0.0.1", gw.port)
    dev.publish("temp", "21.5", ttl=120)
    dev.publish("particle/device/updates/enabled", "true")
    assert await dev.publish_confirmed("confirmed", "x") == coap.CHANGED
    assert await dev.publish_confirmed("bad name", "x") == coap.BAD_REQUEST
    [temp] = await until(lambda: events(gw.app, DEV, "temp"), what="temp")
    assert temp.data == "21.5" and temp.ttl == 120
    assert await until(lambda: events(gw.app, DEV, "particle/device/updates/enabled"))
    assert await events(gw.app, DEV, "confirmed")
    now = int(clock.now().timestamp())
    assert abs(await dev.time() - now) <= 2
    await dev.ping()


async def test_functions_and_variables_through_rest(gw):
    dev = echo_device(gw)
    await dev.connect("127.0.0.1", gw.port)
    h = bearer(gw.token)
    r = await gw.client.post(f"/v1/devices/{DEV}/echo", headers=h, data={"arg": "hello-vdev"})
    assert r.status_code == 200 and r.json()["return_value"] == 10, r.text
    assert dev.state["last"] == "hello-vdev"  # type: ignore[attr-defined]
    r = await gw.client.post(f"/v1/devices/{DEV}/fail", headers=h, data={"arg": ""})
    assert r.json()["return_value"] == -1
    for name, value in (("counter", 7), ("lastArg", "hello-vdev"), ("on", True),
                        ("temp", 21.5)):
        r = await gw.client.get(f"/v1/devices/{DEV}/{name}", headers=h)
        assert r.status_code == 200 and r.json()["result"] == value, r.text
    # many calls at once, each answered with its own token
    rs = await asyncio.gather(*(gw.client.post(f"/v1/devices/{DEV}/echo", headers=h,
                                               data={"arg": "x" * i}) for i in range(1, 20)))
    assert [r.json()["return_value"] for r in rs] == list(range(1, 20))


async def test_subscribe_and_receive_cloud_events(gw):
    dev = echo_device(gw)
    await dev.connect("127.0.0.1", gw.port)
    dev.subscribe("ping")
    await until(lambda: gw.hub.sessions[DEV].prefixes >= {"particle", "spark", "ping"})
    r = await gw.client.post(f"/v1/products/{gw.product['id']}/events", headers=bearer(gw.token),
                             data={"name": "ping/x", "data": "from-cloud"})
    assert r.status_code == 200, r.text
    r = await gw.client.post(f"/v1/products/{gw.product['id']}/events", headers=bearer(gw.token),
                             data={"name": "other", "data": "no"})
    async with asyncio.timeout(WAIT):
        assert await dev.events.get() == ("ping/x", "from-cloud")
    await asyncio.sleep(0.1)
    assert dev.events.empty()


async def test_server_initiated_describe_one_type_at_a_time(gw):
    dev = echo_device(gw, describe_on_connect=False)
    await dev.connect("127.0.0.1", gw.port)
    assert (await device_row(gw.app)).functions in (None, [])
    await gw.hub.sessions[DEV].link.request_describe()

    async def described() -> bool:
        return (await device_row(gw.app)).functions == ["echo", "fail"]

    assert await until(described)


async def test_vitals_from_a_metrics_describe_published_and_requested(gw):
    """A metrics describe (``POST /d?4``, Device OS's publishVitals) is stored as vitals; the
    REST refresh asks the device with ``GET /d?4``; a device's own
    ``spark/device/diagnostics/update`` event is stored too. None is a data operation."""
    dev = echo_device(gw)
    await dev.connect("127.0.0.1", gw.port)
    dev.vitals = {"device": {"network": {"signal": {"rssi": -61}}}}
    assert (await dev.publish_vitals()).code == coap.CHANGED
    dev.vitals = lambda: {"device": {"network": {"signal": {"rssi": -62}}}}
    r = await gw.client.post(f"/v1/diagnostics/{DEV}/update", headers=bearer(gw.token))
    assert r.status_code == 202, r.text
    dev.publish("spark/device/diagnostics/update", '{"device": {"system": {"uptime": 5}}}')

    async def three() -> list[Any]:
        await gw.app.state.runtime.vitals.drain()
        r = await gw.client.get(f"/v1/diagnostics/{DEV}", headers=bearer(gw.token))
        got = r.json()["diagnostics"]
        return got if len(got) == 3 else []

    got = await until(three, what="three vitals reports")
    assert sorted(json.dumps(d["payload"], sort_keys=True) for d in got) == sorted([
        '{"device": {"network": {"signal": {"rssi": -61}}}}',
        '{"device": {"network": {"signal": {"rssi": -62}}}}',
        '{"device": {"system": {"uptime": 5}}}'])
    # a binary metrics describe (Device OS's own encoding) is acknowledged, not stored
    assert (await dev.send_request(coap.POST, (b"d",), (bytes((4,)),),
                                   b"\x00\x00\x01\x00")).code == coap.CHANGED
    await healthy(gw, dev, DEV)
    r = await gw.client.get(f"/v1/diagnostics/{DEV}", headers=bearer(gw.token))
    assert len(r.json()["diagnostics"]) == 3


async def test_pings_and_keep_alive_timeout(gw):
    gw.listener.ping_interval_s = 0.1
    gw.listener.keepalive_timeout_s = 0.5
    dev = echo_device(gw)
    await dev.connect("127.0.0.1", gw.port)
    await until(lambda: dev.server_pings >= 2, what="server pings")
    await asyncio.sleep(0.6)
    assert await online(gw)  # answered pings keep it alive
    dev._task.cancel()  # the device stops answering
    assert await until(lambda: offline_reason(gw)) == "keep-alive timeout"


# --- robustness: a bad connection closes alone -----------------------------------------------------

async def _connected_pair(gw: Any) -> tuple[ParticleDevice, ParticleDevice]:
    good = echo_device(gw, DEV2, "dev2")
    await good.connect("127.0.0.1", gw.port)
    bad = echo_device(gw)
    return good, bad


async def _raw(gw: Any) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", gw.port)


async def _assert_closed(reader: asyncio.StreamReader) -> None:
    async with asyncio.timeout(WAIT):
        while await reader.read(4096):
            pass


@pytest.mark.parametrize("case", ["wrong nonce", "truncated", "garbage", "silent"])
async def test_bad_handshakes_close_alone(gw, case, caplog):
    caplog.set_level(logging.INFO, "corral.particle")
    good, bad = await _connected_pair(gw)
    if case == "wrong nonce":
        with pytest.raises((asyncio.IncompleteReadError, ConnectionError)):
            await bad.handshake("127.0.0.1", gw.port, nonce_override=os.urandom(40))
        expected = "wrong nonce"
    else:
        reader, writer = await _raw(gw)
        await reader.readexactly(40)
        if case == "truncated":
            writer.write(os.urandom(100))
            writer.write_eof()
            expected = "truncated handshake (100 of 256 bytes)"
        elif case == "garbage":
            writer.write(os.urandom(256))
            expected = "protocol error"
        else:
            expected = "handshake timeout"
        await _assert_closed(reader)
        writer.close()
    await until(lambda: expected in caplog.text, what=expected)
    assert not await online(gw)
    await healthy(gw, good, DEV2)


@pytest.mark.parametrize("case", ["length prefix", "padding", "coap", "unknown code",
                                  "message id gap", "not a hello"])
async def test_bad_session_messages_close_alone(gw, case):
    good, bad = await _connected_pair(gw)
    if case == "not a hello":
        await bad.handshake("127.0.0.1", gw.port)
        bad.start()
        bad.publish("early", "x")
        assert await bad.wait_closed() == "the server closed the connection"
        await healthy(gw, good, DEV2)
        return
    await bad.connect("127.0.0.1", gw.port)
    assert await online(gw)
    if case == "length prefix":
        bad.send_raw(b"\x00\x05hello")
        expected = "protocol error: bad frame length 5"
    elif case == "padding":
        ch = bad.channel
        assert ch is not None
        enc = Cipher(algorithms.AES(ch.send._algorithm.key), modes.CBC(ch.send.iv)).encryptor()
        block = enc.update(b"\x50\x02\x00\x00" + b"\x00" * 12) + enc.finalize()  # pad byte 0
        bad.send_raw(b"\x00\x10" + block)
        expected = "protocol error: bad PKCS#7 padding"
    elif case == "coap":
        bad.send_plain(b"\x9f\x02")  # version 2, and too short
        expected = "protocol error"
    elif case == "unknown code":
        bad.send(Message(coap.NON, 0xE0, bad.next_mid()))  # 7.00
        expected = "unknown CoAP code 7.00"
    else:
        bad.next_mid()
        bad.publish("skipped", "x")
        expected = "message id gap"
    reason = await until(lambda: offline_reason(gw), what="offline")
    assert reason.startswith(expected), reason
    assert await bad.wait_closed() == "the server closed the connection"
    assert not await events(gw.app, DEV, "skipped")
    await healthy(gw, good, DEV2)


async def test_a_device_that_stops_reading_is_dropped_alone(gw):
    gw.listener.drain_timeout_s = 0.3
    good, bad = await _connected_pair(gw)
    await bad.connect("127.0.0.1", gw.port)
    bad._task.cancel()  # reads nothing from now on
    link = gw.hub.sessions[DEV].link
    data = "x" * 1000
    async with asyncio.timeout(20):
        while not link.closing:
            await link.deliver_event("flood", data, published_at="", ttl=60, coreid="")
    reason = await until(lambda: offline_reason(gw), what="offline")
    assert reason == "the device does not read what it is sent"
    await healthy(gw, good, DEV2)


# --- same product, two transports ------------------------------------------------------------------

async def test_mqtt_and_particle_devices_in_one_product(gw, app, client):
    [(mqtt_id, secret)] = await provision(client, gw.token, gw.product["id"])
    p = echo_device(gw)
    await p.connect("127.0.0.1", gw.port)
    async with mqtt_listener(app) as mqtt, live_server(app) as base:
        m = MqttDevice(mqtt_id, secret, "127.0.0.1", mqtt.port)

        @m.function("echo")
        def echo(arg: str) -> int:
            return len(arg) + 100

        async with m:
            await until(lambda: online(gw, mqtt_id))
            r = await client.get(f"/v1/products/{gw.product['id']}/devices",
                                 headers=bearer(gw.token))
            listed = {d["id"]: d for d in r.json()["devices"]}
            assert listed[DEV]["online"] and listed[mqtt_id]["online"]
            assert set(listed[DEV]) == set(listed[mqtt_id])
            for did, expected in ((DEV, 3), (mqtt_id, 103)):
                r = await client.post(f"/v1/devices/{did}/echo", headers=bearer(gw.token),
                                      data={"arg": "abc"})
                assert r.json()["return_value"] == expected, r.text
            async with sse(base, f"/v1/products/{gw.product['id']}/events/mixed",
                           gw.token) as s:
                assert await s.read(5) == b":ok\n\n"
                p.publish("mixed", "from-particle")
                name1, ev1 = await s.event()
                await m.publish("mixed", "from-mqtt")
                name2, ev2 = await s.event()
            assert (name1, ev1["coreid"], ev1["data"]) == ("mixed", DEV, "from-particle")
            assert (name2, ev2["coreid"], ev2["data"]) == ("mixed", mqtt_id, "from-mqtt")
            assert set(ev1) == set(ev2)


# --- OTA -------------------------------------------------------------------------------------------

def image(size: int = 1564) -> bytes:
    body = bytes((i * 7) % 251 for i in range(size - 4))
    return body + zlib.crc32(body).to_bytes(4, "big")


async def test_ota_legacy_and_progress(gw):
    dev = echo_device(gw)
    await dev.connect("127.0.0.1", gw.port)
    progress: list[tuple[int, int]] = []
    conn = gw.listener.connection(DEV)
    result = await conn.send_firmware(image(), progress=lambda s, t: progress.append((s, t)))
    assert result.ok and result.chunks == 4 and result.bytes_sent == 1564, result
    assert dev.updates == [image()]
    assert progress == [(512, 1564), (1024, 1564), (1536, 1564), (1564, 1564)]
    await healthy(gw, dev, DEV)


async def test_ota_fast_with_a_missing_chunk(gw):
    dev = echo_device(gw, fast_ota=True)
    await dev.connect("127.0.0.1", gw.port)
    dev.drop_chunks = {1}
    dev.received = []
    result = await gw.listener.connection(DEV).send_firmware(image(3000), fast=True)
    assert result.ok and result.resent == 1, result
    # Device OS names what is missing only after UpdateDone: ACK 4.00, then CON GET /c
    done = [coap.decode(raw) for raw in dev.received if raw[1] == coap.PUT]
    assert len(done) == 2
    assert dev.updates == [image(3000)]


async def test_ota_refused_and_too_large(gw):
    dev = echo_device(gw, max_binary_size=1000)
    await dev.connect("127.0.0.1", gw.port)
    conn = gw.listener.connection(DEV)
    result = await conn.send_firmware(image(2000))
    assert not result.ok and "larger than the device accepts" in result.reason
    assert dev.updates == []
    dev.max_binary_size = 10_000  # the device itself refuses a size it cannot hold
    conn.hello = dataclasses.replace(conn.hello, max_binary_size=0)
    result = await conn.send_firmware(image(20_000))
    assert not result.ok and "refused the update (5.03)" in result.reason
    await healthy(gw, dev, DEV)


# --- pieces ----------------------------------------------------------------------------------------

def test_value_decoding_and_versions():
    assert decode_variable(b"\xff\xff\xff\xfe", "int32") == -2
    assert decode_variable(b"\x01", "bool") is True
    assert decode_variable(b"\x00\x00\x00\x00\x00\x00\x35\x40", "double") == 21.0
    assert decode_variable(b"hi", "string") == "hi"
    assert system_version_text(6200) == "6.2.0" and system_version_text(5802) == "5.8.2"
    assert system_version_text(1512) == "1512"


async def test_runtime_starts_the_particle_listener(settings, database_url):
    from corral.mail.backends import LogBackend
    from corral.web.app import Runtime, create_app
    from dbreset import truncate_all

    await truncate_all(database_url)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        udp_port = s.getsockname()[1]
    cfg = settings.model_copy(update={"mqtt_port": 0, "mqtt_tls_port": 0,
                                      "particle_port": port, "particle_udp_port": udp_port})
    runtime = Runtime(cfg, mail_backend=LogBackend())
    app = create_app(cfg, runtime=runtime)
    await runtime.start(app, migrate_db=False, background=False)
    try:
        await runtime.start_transports()
        [listener] = [t for t in runtime.transports if isinstance(t, ParticleListener)]
        assert listener.port == port and key_path(cfg.data_dir).exists()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert len(await asyncio.wait_for(reader.readexactly(crypto.NONCE_LEN), WAIT)) == 40
        writer.close()
        # and the Gen 3 (DTLS/UDP) listener: a ClientHello gets its HelloVerifyRequest
        from corral.transports.particle import dtls
        from corral.transports.particle.keys import udp_key_path
        from corral.transports.particle.udp import ParticleUdpListener

        [udp] = [t for t in runtime.transports if isinstance(t, ParticleUdpListener)]
        assert udp.port == udp_port and udp_key_path(cfg.data_dir).exists()
        hello = dtls.ClientHandshake(udp.server_key, udp.server_key.public_key()).start()
        loop = asyncio.get_running_loop()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setblocking(False)
            s.connect(("127.0.0.1", udp_port))
            s.send(hello)
            reply = await asyncio.wait_for(loop.sock_recv(s, 2048), WAIT)
        [rec] = dtls.parse_records(reply)
        assert dtls.parse_handshake(rec.fragment)[0].msg_type == dtls.HELLO_VERIFY_REQUEST
    finally:
        await runtime.stop()


@pytest.mark.parametrize("fast", [True, False])
async def test_ota_chunks_have_the_byte_layout_device_os_reads(gw, fast):
    """Device OS reads a chunk's CRC and index at fixed offsets that assume a 1-byte token
    (chunked_transfer.cpp handle_chunk starts at byte 7): every chunk, fast or not, is
    ``T b1 63 44 crc32(4) [02 index(2)] ff data`` (particle-device-protocol-udp.md §5.2)."""
    dev = echo_device(gw, fast_ota=fast)
    await dev.connect("127.0.0.1", gw.port)
    dev.received = []
    data = image(1300)
    result = await gw.listener.connection(DEV).send_firmware(data, fast=fast)
    assert result.ok, result
    chunks = [raw for raw in dev.received if raw[1] == coap.POST and b"\xb1c" in raw[4:8]]
    assert len(chunks) == 3
    for index, raw in enumerate(chunks):
        part = data[index * 512:(index + 1) * 512]
        assert raw[0] == (0x51 if fast else 0x41)  # version 1, NON/CON, token length 1
        assert raw[5:8] == b"\xb1c\x44"
        assert raw[8:12] == zlib.crc32(part).to_bytes(4, "big")
        if fast:
            assert raw[12:15] == b"\x02" + index.to_bytes(2, "big")
            assert raw[15] == 0xFF and raw[16:] == part
        else:
            assert raw[12] == 0xFF and raw[13:] == part
    assert dev.updates == [data]


# --- the door: silent connections and one greedy address ----------------------------------------

@contextlib.asynccontextmanager
async def small_door(gw: Any, settings: Any, **update: Any) -> AsyncIterator[Any]:
    """A second listener with 8 handshake slots, 4 per address (and ``update``)."""
    cfg = settings.model_copy(update={"particle_max_handshakes": 8,
                                      "particle_max_handshakes_per_address": 4, **update})
    listener = await start_particle_listener(gw.hub, cfg, host="127.0.0.1", port=0)
    try:
        yield listener
    finally:
        await listener.stop()


async def test_silent_connections_hold_no_handshake_slot(gw, settings):
    """Issue 14, defect 5: connections that never answer the nonce must not keep devices
    out (with 128 of them a real device needed 19 s, with 1,000 it never got in): they
    hold no handshake slot, and each is closed at its handshake timeout."""
    async with small_door(gw, settings) as door:
        silent = [await asyncio.open_connection("127.0.0.1", door.port) for _ in range(200)]
        dev = echo_device(gw)
        started = asyncio.get_running_loop().time()
        await dev.connect("127.0.0.1", door.port)
        assert asyncio.get_running_loop().time() - started < 1.0  # the timeout is 1 s
        assert await online(gw)
        for reader, _w in silent:  # each is closed at its own timeout
            await _assert_closed(reader)
        for _r, writer in silent:
            writer.close()
        await until(lambda: len(door.connections) == 1, what="only the device left")
        await healthy(gw, dev, DEV)


async def test_one_address_cannot_take_every_handshake_slot(gw, settings):
    """Peers that complete the RSA exchange and then stay silent hold a slot until their
    timeout; from one address they get at most ``particle_max_handshakes_per_address`` of
    them, and a device from another address is served at once."""
    async with small_door(gw, settings, particle_handshake_timeout_s=10.0) as door:
        greedy = [gw.device(f"00000000000000000000{i:04x}", "attacker") for i in range(8)]
        held = [asyncio.ensure_future(g.handshake("127.0.0.1", door.port)) for g in greedy]
        await until(lambda: sum(t.done() for t in held) == 4, what="four handshakes")
        await asyncio.sleep(0.3)
        assert sum(t.done() for t in held) == 4  # the other four wait for a slot
        dev = echo_device(gw)
        started = asyncio.get_running_loop().time()
        await dev.connect("127.0.0.1", door.port, local_host="127.0.0.2")
        assert asyncio.get_running_loop().time() - started < 3.0
        assert (await device_row(gw.app)).last_ip_address == "127.0.0.2"
        for t in held:
            t.cancel()
        await asyncio.gather(*held, return_exceptions=True)
        await healthy(gw, dev, DEV)


async def test_a_cellular_device_reports_its_iccid_in_the_system_describe(gw):
    """Device OS sends the SIM's ICCID in its protobuf system describe (field 3): the device
    becomes cellular with that SIM, and the SIM shows among the product's."""
    iccid = "89014103211118510799"
    dev = echo_device(gw, iccid=iccid)
    await dev.connect("127.0.0.1", gw.port)

    async def cellular() -> bool:
        row = await device_row(gw.app)
        return bool(row.cellular and row.iccid == iccid)

    await until(cellular, what="the ICCID")
    r = await gw.client.get(f"/v1/products/{gw.product['id']}/sims", headers=bearer(gw.token))
    assert [s["iccid"] for s in r.json()["sims"]] == [iccid]
    assert r.json()["sims"][0]["last_device_id"] == DEV
    await healthy(gw, dev, DEV)


def test_system_iccid_from_protobuf_and_json() -> None:
    from corral.transports.particle.server import system_iccid

    raw = b"89014103211118510799"
    # a module entry (field 1) first, then imei (2) and iccid (3)
    pb = b"\x0a\x02\x08\x04" + b"\x12\x03123" + bytes((0x1a, len(raw))) + raw
    assert system_iccid(pb, protobuf=True) == raw.decode()
    assert system_iccid(b'{"iccid": "8901410321111851079"}', protobuf=False) == \
        "8901410321111851079"
    assert system_iccid(b"", protobuf=True) is None
    assert system_iccid(b"\x0a\xff", protobuf=True) is None  # truncated: ignored
    assert system_iccid(b'{"m": []}', protobuf=False) is None


def test_a_describe_nested_too_deeply_is_refused_like_any_malformed_one() -> None:
    """The server's describe and system-describe readers: JSON too deep to parse raised
    RecursionError (the device's message failed with a traceback); one nested past
    MAX_JSON_DEPTH is refused as invalid too."""
    from corral.sessions.link import Refused
    from corral.transports.particle.server import app_describe, system_iccid

    too_deep = b"{" + b'"a":{' * 5_000 + b"}" * 5_001
    past_bound = b'{"f": [], "x":' + b'{"a":' * 65 + b"1" + b"}" * 66
    for payload in (too_deep, past_bound):
        with pytest.raises(Refused):
            app_describe(payload)
        assert system_iccid(payload, protobuf=False) is None
