"""The Particle TCP gateway over real sockets, with corral's own device-side implementation:
handshake and key checks, Hello and describes, presence, publish, subscribe and delivery,
functions and variables through REST, time, pings, Goodbye, admission (quarantine), robustness
(each bad connection closes alone), MQTT and Particle devices side by side, and OTA."""

from __future__ import annotations

import asyncio
import dataclasses
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
    result = await gw.listener.connection(DEV).send_firmware(image(3000), fast=True,
                                                              missing_wait_s=0.3)
    assert result.ok and result.resent == 1, result
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
    assert not result.ok and "refused the update (4.00)" in result.reason
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
    cfg = settings.model_copy(update={"mqtt_port": 0, "mqtt_tls_port": 0,
                                      "particle_port": port})
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
    finally:
        await runtime.stop()
