"""The device SDK (``corral.device``) against corral's real MQTT server, over real sockets.

Functions and variables are called through the REST API, events land in the real database,
reconnects follow real drops. Two behaviours corral's server never shows (a server that stops
answering PINGREQ, a message on the OTA topic) are tested against a minimal MQTT server
written here on the same sans-IO codec.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import serialization
from sqlalchemy import select

from corral.device import (
    Backoff,
    ConnectError,
    Device,
    NotConnected,
    PublishRefused,
)
from corral.devices.models import Device as DeviceRow
from corral.events.models import Event
from corral.sessions import contract
from corral.transports.mqtt.codec import (
    MQTT_5,
    Connack,
    Connect,
    Decoder,
    Disconnect,
    Pingreq,
    Puback,
    Publish,
    Suback,
    Subscribe,
    encode,
)
from corral.transports.mqtt.server import MqttServer
from devicekit import WAIT, eventually, mqtt_listener, owner_product_devices
from helpers import bearer
from test_product_cas import ec_key, make_cert, name, new_ca, pem

FAST = {"reconnect_initial": 0.05, "reconnect_max": 0.2}


@pytest.fixture
async def mqtt(app: Any) -> AsyncIterator[Any]:
    async with mqtt_listener(app) as listener:
        yield listener


async def _row(app: Any, device_id: str) -> DeviceRow:
    async with app.state.sessionmaker() as db:
        row = await db.get(DeviceRow, device_id)
        assert row is not None
        return row


async def _events(app: Any, device_id: str, name: str | None = None) -> list[Event]:
    async with app.state.sessionmaker() as db:
        q = select(Event).where(Event.device_id == device_id).order_by(Event.id)
        if name is not None:
            q = q.where(Event.name == name)
        return list((await db.execute(q)).scalars())


async def _online(app: Any, device_id: str) -> bool:
    return (await _row(app, device_id)).online


# --- the import boundary ---------------------------------------------------------------------

def test_sdk_never_imports_the_server() -> None:
    """DESIGN §3: corral.device imports only itself and the wire codec."""
    code = ("import sys, corral.device, corral.device.simulator; "
            "print(' '.join(sorted(m for m in sys.modules if m.startswith(('corral', "
            "'sqlalchemy', 'fastapi')))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    allowed = ("corral.device", "corral.transports.mqtt.codec",
               "corral.transports.mqtt.properties", "corral.kit.errors")
    extra = [m for m in out if m not in ("corral", "corral.transports", "corral.transports.mqtt",
                                         "corral.kit") and not m.startswith(allowed)]
    assert "corral.device.client" in out and not extra, extra


# --- functions, variables, describe ----------------------------------------------------------

@pytest.mark.parametrize("protocol", [5, 4])
async def test_functions_variables_and_describe_through_rest(
        app: Any, client: httpx.AsyncClient, mqtt: Any, protocol: int) -> None:
    token, product, [(did, secret)] = await owner_product_devices(client)
    dev = Device(did, secret, "127.0.0.1", mqtt.port, protocol=protocol)
    state = {"led": "off"}
    calls: list[str] = []

    @dev.function("led")
    def led(arg: str) -> int:
        calls.append(arg)
        state["led"] = arg
        return 1 if arg == "on" else 0

    @dev.function("slow")
    async def slow(arg: str) -> int:
        await asyncio.sleep(0.01)
        return -(2**31)

    @dev.function("broken")
    def broken(arg: str) -> int:
        raise RuntimeError("the LED is on fire")

    @dev.function("wrong")
    def wrong(arg: str) -> int:
        return 2**31  # not an int32

    async def temperature() -> float:
        return 21.5

    dev.variable("temperature", "double", temperature)
    dev.variable("count", int, lambda: 42)
    dev.variable("label", "string", lambda: state["led"])
    dev.variable("on", bool, lambda: state["led"] == "on")
    dev.describe(firmware_version=3, system_version="1.0.0")

    async with asyncio.timeout(WAIT):
        await dev.connect()
    try:
        # describe reached the device row
        row = await _row(app, did)
        assert row.online and row.transport == "mqtt"
        assert row.functions == ["led", "slow", "broken", "wrong"]
        assert row.variables == {"temperature": "double", "count": "int32",
                                 "label": "string", "on": "bool"}
        assert row.firmware_version == 3 and row.system_firmware_version == "1.0.0"

        base = f"/v1/products/{product['slug']}/devices/{did}"
        h = bearer(token)
        r = await client.post(f"{base}/led", headers=h, json={"arg": "on"})
        assert r.status_code == 200 and r.json()["return_value"] == 1, r.text
        assert calls == ["on"]
        r = await client.post(f"/v1/devices/{did}/slow", headers=h, data={"args": "x"})
        assert r.status_code == 200 and r.json()["return_value"] == -(2**31), r.text
        r = await client.post(f"{base}/broken", headers=h, json={"arg": ""})
        assert r.status_code == 400 and "the LED is on fire" in r.json()["error_description"]
        r = await client.post(f"{base}/wrong", headers=h, json={"arg": ""})
        assert r.status_code >= 400 and "32-bit" in r.json()["error_description"], r.text

        expected = {"temperature": 21.5, "count": 42, "label": "on", "on": True}
        for name, value in expected.items():
            r = await client.get(f"{base}/{name}", headers=h)
            assert r.status_code == 200, r.text
            assert r.json()["result"] == value and type(r.json()["result"]) is type(value)

        # a change after connecting is described again
        dev.variable("extra", "string", lambda: "x")

        async def described() -> bool:
            return "extra" in (await _row(app, did)).variables

        await eventually(described)
    finally:
        await dev.close()


async def test_describe_request_and_variable_type_errors(app: Any, client: httpx.AsyncClient,
                                                         mqtt: Any) -> None:
    token, product, [(did, secret)] = await owner_product_devices(client)
    async with Device(did, secret, "127.0.0.1", mqtt.port) as dev:
        dev.variable("bad", "int32", lambda: "not a number")
        await eventually(lambda: _has_variable(app, did, "bad"))
        r = await client.get(f"/v1/devices/{did}/bad", headers=bearer(token))
        assert r.status_code >= 400 and "int32" in r.json()["error_description"], r.text
        # the cloud asks for a describe (bus control "describe"): the device re-sends it
        async with app.state.sessionmaker() as db:
            row = await db.get(DeviceRow, did)
            row.functions = []
            row.variables = {}
            await db.commit()
        await app.state.runtime.bus.publish(contract.control_subject(did), {"op": "describe"})
        await eventually(lambda: _has_variable(app, did, "bad"))


async def _has_variable(app: Any, did: str, name: str) -> bool:
    return name in ((await _row(app, did)).variables or {})


def test_registration_is_validated() -> None:
    dev = Device("0123456789abcdef01234567", "s")
    with pytest.raises(ValueError):
        dev.variable("x", "float64", lambda: 1)
    with pytest.raises(ValueError):
        dev.function("")
    with pytest.raises(ValueError):
        dev.subscribe("a+b", lambda n, d: None)
    for i in range(20):
        dev.function(f"f{i}")(lambda arg: 0)
    with pytest.raises(ValueError):
        dev.function("one-too-many")(lambda arg: 0)
    with pytest.raises(ValueError):
        Device("not-an-id", "s")
    with pytest.raises(ValueError):
        Device("0123456789abcdef01234567")  # neither a secret nor a certificate
    assert dev.describe_payload()["functions"][:2] == ["f0", "f1"]


# --- publishing --------------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", [5, 4])
async def test_qos1_publish_returns_after_the_event_is_stored(
        app: Any, client: httpx.AsyncClient, mqtt: Any, protocol: int) -> None:
    _token, _product, [(did, secret)] = await owner_product_devices(client)
    async with Device(did, secret, "127.0.0.1", mqtt.port, protocol=protocol) as dev:
        await dev.publish("temperature", "21.5", qos=1, ttl=120)
        # no waiting: QoS 1 returned after PUBACK, which corral sends after the commit
        [event] = await _events(app, did, "temperature")
        assert event.data == "21.5" and event.source == "device"
        assert event.ttl == (120 if protocol == 5 else 60)  # message expiry is MQTT 5 only
        await dev.publish("sim/bytes", b"\xc3\xa9t\xc3\xa9", qos=0)

        async def stored() -> bool:
            return len(await _events(app, did, "sim/bytes")) == 1

        await eventually(stored)
        assert (await _events(app, did, "sim/bytes"))[0].data == "été"
        for bad in ("", "has space", "spark/x", "Particle", "a+b", "x" * 65):
            with pytest.raises(ValueError):
                await dev.publish(bad, "1")
        with pytest.raises(ValueError):
            await dev.publish("ok", "1", qos=2)


async def test_rate_limited_publish_is_refused_with_its_reason_code(
        app: Any, client: httpx.AsyncClient, mqtt: Any, manual_clock: Any) -> None:
    """The clock stands still, so the bucket (burst 4) never refills."""
    _token, _product, [(did, secret)] = await owner_product_devices(client)
    async with Device(did, secret, "127.0.0.1", mqtt.port) as dev:
        for i in range(4):
            await dev.publish("burst", str(i))
        with pytest.raises(PublishRefused) as refused:
            await dev.publish("burst", "4")
        assert refused.value.reason_code == 0x97 and refused.value.reason == "Quota exceeded"
        assert dev.connected  # a refusal is not a disconnect
    assert [e.data for e in await _events(app, did, "burst")] == ["0", "1", "2", "3"]


async def test_publish_without_a_connection(app: Any, client: httpx.AsyncClient,
                                            mqtt: Any) -> None:
    _token, _product, [(did, secret)] = await owner_product_devices(client)
    dev = Device(did, secret, "127.0.0.1", mqtt.port)
    with pytest.raises(NotConnected):
        await dev.publish("x", "1")
    async with dev:
        pass
    with pytest.raises(NotConnected):
        await dev.publish("x", "1")


# --- subscriptions ---------------------------------------------------------------------------

@pytest.mark.parametrize("protocol", [5, 4])
async def test_subscribe_receives_events_by_prefix(app: Any, client: httpx.AsyncClient,
                                                   mqtt: Any, protocol: int) -> None:
    token, product, [(a_id, a_secret), (b_id, b_secret)] = await owner_product_devices(
        client, 2)
    got: list[tuple[str, str]] = []
    every: list[str] = []
    arrived = asyncio.Event()

    async def on_temp(name: str, data: str) -> None:
        got.append((name, data))
        arrived.set()

    listener = Device(a_id, a_secret, "127.0.0.1", mqtt.port, protocol=protocol)
    listener.subscribe("temp", on_temp)
    # everything, except the presence events of the other device
    listener.subscribe("", lambda name, data: None if name.startswith("spark/")
                       else every.append(name))
    async with listener, Device(b_id, b_secret, "127.0.0.1", mqtt.port) as sender:
        await sender.publish("humidity", "40")
        await sender.publish("temperature", "21.5")
        async with asyncio.timeout(WAIT):
            await arrived.wait()
        assert got == [("temperature", "21.5")]
        await eventually(lambda: _true(len(every) >= 2))
        assert every[:2] == ["humidity", "temperature"]
        # a subscription added while connected, and one dropped
        later: list[str] = []
        listener.subscribe("hum", lambda name, data: later.append(data))
        listener.unsubscribe("temp")
        await asyncio.sleep(0.2)  # the SUBSCRIBE is sent in the background
        await sender.publish("humidity", "41")
        await sender.publish("temperature", "22")
        await eventually(lambda: _true(later == ["41"] and len(every) >= 4))
        assert got == [("temperature", "21.5")]


async def _true(value: bool) -> bool:
    return value


# --- credentials ------------------------------------------------------------------------------

@pytest.mark.parametrize(("protocol", "code"), [(5, 0x86), (4, 4)])
async def test_wrong_secret_is_a_permanent_connect_error(
        app: Any, client: httpx.AsyncClient, mqtt: Any, protocol: int, code: int) -> None:
    _token, _product, [(did, _secret)] = await owner_product_devices(client)
    dev = Device(did, "wrong", "127.0.0.1", mqtt.port, protocol=protocol, **FAST)
    with pytest.raises(ConnectError) as err:
        async with asyncio.timeout(WAIT):
            await dev.connect()
    assert err.value.reason_code == code and err.value.permanent
    assert "Bad user name or password" in str(err.value)
    with pytest.raises(ConnectError):  # run_forever gives up on it instead of retrying
        async with asyncio.timeout(WAIT):
            await dev.run_forever()
    assert not dev.connected and dev.connects == 0


async def test_unknown_device_and_unreachable_server(app: Any, client: httpx.AsyncClient,
                                                     mqtt: Any) -> None:
    _token, _product, [(did, secret)] = await owner_product_devices(client)
    async with app.state.sessionmaker() as db:
        row = await db.get(DeviceRow, did)
        row.quarantined = True
        await db.commit()
    with pytest.raises(ConnectError) as err:
        await Device(did, secret, "127.0.0.1", mqtt.port).connect()
    assert err.value.reason_code == 0x87 and not err.value.permanent
    assert err.value.server_reason  # corral says why in the MQTT 5 reason string
    closed = Device(did, secret, "127.0.0.1", _free_port(), connect_timeout=2)
    with pytest.raises(ConnectError) as err:
        await closed.connect()
    assert err.value.reason_code is None and not err.value.permanent
    assert "cannot connect" in str(err.value)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- TLS -------------------------------------------------------------------------------------

async def test_tls_with_a_secret_and_with_a_client_certificate(
        app: Any, client: httpx.AsyncClient, tmp_path: Path) -> None:
    token, product, [(did, secret)] = await owner_product_devices(client)
    runtime = app.state.runtime
    server = MqttServer(runtime.hub, runtime.settings)
    listener = await server.listen("127.0.0.1", 0, tls=True)
    try:
        server_cert = runtime.settings.data_dir / "mqtt-tls" / "cert.pem"
        # a secret over TLS, the server certificate verified
        ctx = ssl.create_default_context(cafile=str(server_cert))
        async with Device(did, secret, "127.0.0.1", listener.port, tls=ctx) as dev:
            await dev.publish("secure", "1")
        assert [e.data for e in await _events(app, did, "secure")] == ["1"]

        # a client certificate from the product's CA, no secret: provisioned just in time
        ca, ca_key = new_ca("SDK Fleet CA")
        r = await client.post(f"/v1/products/{product['slug']}/certificate_authorities",
                              headers=bearer(token), json={"certificate": pem(ca)})
        assert r.status_code == 201, r.text
        assert await server.refresh_tls()
        new_id = "00112233445566778899aabb"
        key = ec_key()
        leaf = make_cert(subject=name(new_id, org="device"), key=key, issuer=ca.subject,
                         issuer_key=ca_key, ca=False)
        cert_path, key_path = tmp_path / "dev.pem", tmp_path / "dev.key"
        cert_path.write_text(pem(leaf))
        key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                               serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        ctx = ssl.create_default_context(cafile=str(server_cert))
        async with Device(new_id, None, "127.0.0.1", listener.port, tls=ctx,
                          client_cert=(cert_path, key_path)) as dev:
            await dev.publish("cert", "ok")
            row = await _row(app, new_id)
            assert row.product_id == product["id"] and row.online
        # a server certificate the device does not trust
        with pytest.raises(ConnectError) as err:
            await Device(did, secret, "127.0.0.1", listener.port,
                         tls=ssl.create_default_context()).connect()
        assert "CERTIFICATE_VERIFY_FAILED" in str(err.value)
    finally:
        await server.stop()


# --- presence, reconnects --------------------------------------------------------------------

async def test_close_is_a_clean_disconnect(app: Any, client: httpx.AsyncClient,
                                           mqtt: Any) -> None:
    _token, _product, [(did, secret)] = await owner_product_devices(client)
    reasons: list[str] = []
    dev = Device(did, secret, "127.0.0.1", mqtt.port)
    dev.on_disconnect(reasons.append)
    async with dev:
        assert await _online(app, did)
    assert reasons == ["closed by the device"] and not dev.connected

    async def offline() -> bool:
        return not await _online(app, did)

    await eventually(offline)
    statuses = [e.data for e in await _events(app, did, "spark/status")]
    assert statuses == ["online", "offline"]


async def test_run_forever_reconnects_after_the_server_drops_it(
        app: Any, client: httpx.AsyncClient, mqtt: Any) -> None:
    _token, _product, [(did, secret)] = await owner_product_devices(client)
    dev = Device(did, secret, "127.0.0.1", mqtt.port, **FAST)
    dropped: list[str] = []
    dev.on_disconnect(dropped.append)
    runner = asyncio.create_task(dev.run_forever())
    try:
        async with asyncio.timeout(WAIT):
            await dev.wait_connected()
        assert dev.connects == 1
        # the cloud disconnects the device: it comes back on its own
        await app.state.runtime.bus.publish(contract.control_subject(did),
                                            {"op": "disconnect", "reason": "test drop"})
        await eventually(lambda: _true(dev.connects == 2 and dev.connected))
        assert dropped and "disconnected by the server" in dropped[0]
        await dev.publish("after", "reconnect")
        assert await _online(app, did)
    finally:
        await dev.close()
        async with asyncio.timeout(WAIT):
            await runner  # close() ends run_forever normally
    assert not dev.connected


async def test_run_forever_backs_off_while_the_server_is_down(
        app: Any, client: httpx.AsyncClient) -> None:
    _token, _product, [(did, secret)] = await owner_product_devices(client)
    async with mqtt_listener(app) as first:
        port = first.port
        dev = Device(did, secret, "127.0.0.1", port, **FAST)
        runner = asyncio.create_task(dev.run_forever())
        async with asyncio.timeout(WAIT):
            await dev.wait_connected()
    # the listener is gone: attempts fail and the delays grow up to the cap
    await eventually(lambda: _true(dev.backoff.attempt >= 4))
    assert not dev.connected and dev.backoff.ceiling() == 0.2
    try:
        async with mqtt_listener(app, port):  # the server is back on the same port
            await eventually(lambda: _true(dev.connected and dev.connects == 2))
            assert await _online(app, did)
    finally:
        await dev.close()
        async with asyncio.timeout(WAIT):
            await runner


async def test_a_second_connection_replaces_the_first(app: Any, client: httpx.AsyncClient,
                                                      mqtt: Any) -> None:
    _token, _product, [(did, secret)] = await owner_product_devices(client)
    first = Device(did, secret, "127.0.0.1", mqtt.port)
    reasons: list[str] = []
    first.on_disconnect(reasons.append)
    await first.connect()
    async with Device(did, secret, "127.0.0.1", mqtt.port) as second:
        await eventually(lambda: _true(not first.connected))
        assert "Session taken over" in reasons[0]
        await second.publish("still", "here")
    await first.close()


async def test_persistent_session(app: Any, client: httpx.AsyncClient, mqtt: Any) -> None:
    _token, _product, [(did, secret)] = await owner_product_devices(client)
    dev = Device(did, secret, "127.0.0.1", mqtt.port, clean_session=False)
    async with dev:
        assert not dev.session_present
    async with dev:
        assert dev.session_present


async def test_claim(app: Any, client: httpx.AsyncClient, mqtt: Any) -> None:
    token, product, [(did, secret)] = await owner_product_devices(client)
    r = await client.post(f"/v1/products/{product['slug']}/device_claims",
                          headers=bearer(token))
    assert r.status_code == 200, r.text
    async with Device(did, secret, "127.0.0.1", mqtt.port) as dev:
        await dev.claim(r.json()["claim_code"])

        async def claimed() -> bool:
            return (await _row(app, did)).owner_user_id is not None

        await eventually(claimed)


# --- against a minimal server: dead server, OTA ------------------------------------------------

class TinyServer:
    """Just enough MQTT 5 server: accepts every CONNECT, acknowledges SUBSCRIBE/PUBLISH,
    answers PINGREQ only when ``pong`` is true, sends ``ota`` messages after SUBSCRIBE."""

    def __init__(self, *, pong: bool = True, ota: list[tuple[str, bytes]] | None = None,
                 connack_delay: float = 0.0) -> None:
        self.pong = pong
        self.connack_delay = connack_delay
        self.open = 0  # connections open now
        self.ota = ota or []
        self.connects = 0
        self.pings = 0
        self.writers: list[asyncio.StreamWriter] = []
        self.server: asyncio.Server | None = None
        self.port = 0

    async def __aenter__(self) -> TinyServer:
        self.server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        for w in self.writers:
            w.transport.abort()
        await self.server.wait_closed()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        self.open += 1
        try:
            await self._serve(reader, writer)
        finally:
            self.open -= 1

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        decoder = Decoder()
        while data := await reader.read(65536):
            for p in decoder.feed(data):
                if isinstance(p, Connect):
                    self.connects += 1
                    await asyncio.sleep(self.connack_delay)
                    writer.write(encode(Connack(), MQTT_5))
                elif isinstance(p, Subscribe):
                    writer.write(encode(Suback(p.packet_id, tuple(1 for _ in p.subscriptions)),
                                        MQTT_5))
                    for i, (sub, payload) in enumerate(self.ota, start=1):
                        writer.write(encode(Publish(f"devices/{DEAD_ID}/ota/{sub}", payload, 1,
                                                    packet_id=i), MQTT_5))
                elif isinstance(p, Publish) and p.qos == 1:
                    assert p.packet_id is not None
                    writer.write(encode(Puback(p.packet_id), MQTT_5))
                elif isinstance(p, Pingreq):
                    self.pings += 1
                    if self.pong:
                        writer.write(b"\xd0\x00")
                elif isinstance(p, Disconnect):
                    writer.close()
                    return


DEAD_ID = "00000000000000000000dead"


async def test_a_server_that_stops_answering_pings_is_left() -> None:
    async with TinyServer(pong=False) as server:
        dev = Device(DEAD_ID, "s", "127.0.0.1", server.port, keepalive=1, ping_timeout=0.3,
                     **FAST)
        reasons: list[str] = []
        dev.on_disconnect(reasons.append)
        runner = asyncio.create_task(dev.run_forever())
        try:
            await eventually(lambda: _true(server.connects >= 2))
        finally:
            await dev.close()
            async with asyncio.timeout(WAIT):
                await runner
        assert server.pings >= 1 and reasons[0] == "no PINGRESP within 0.3 s"


async def test_pings_keep_a_quiet_connection_alive() -> None:
    async with TinyServer(pong=True) as server:
        async with Device(DEAD_ID, "s", "127.0.0.1", server.port, keepalive=1,
                          ping_timeout=0.5) as dev:
            await eventually(lambda: _true(server.pings >= 2), within=4)
            assert dev.connected and server.connects == 1


async def test_close_while_connecting_wins() -> None:
    async with TinyServer(connack_delay=0.3) as server:
        dev = Device(DEAD_ID, "s", "127.0.0.1", server.port, **FAST)
        runner = asyncio.create_task(dev.run_forever())
        await eventually(lambda: _true(server.connects == 1))
        await dev.close()  # the CONNACK is still on its way
        async with asyncio.timeout(WAIT):
            await runner
        await eventually(lambda: _true(server.open == 0))
        assert not dev.connected and dev.connects == 0 and server.connects == 1


async def test_ota_handler_gets_the_ota_topic() -> None:
    got: list[tuple[str, bytes]] = []
    chunks = [("begin", b'{"size": 3}'), ("chunk/0", b"\x00\x01\x02")]
    async with TinyServer(ota=chunks) as server:
        dev = Device(DEAD_ID, "s", "127.0.0.1", server.port)

        @dev.on_ota
        async def ota(subtopic: str, payload: bytes) -> None:
            got.append((subtopic, payload))

        async with dev:
            await eventually(lambda: _true(len(got) == 2))
    assert got == chunks


# --- backoff ---------------------------------------------------------------------------------

def test_backoff_grows_with_jitter_up_to_the_cap_and_resets() -> None:
    values = iter([0.0, 1.0, 0.5, 1.0, 1.0, 0.0])
    b = Backoff(1.0, 8.0, rng=lambda: next(values))
    assert [b.next() for _ in range(6)] == [0.5, 2.0, 3.0, 8.0, 8.0, 4.0]
    b.reset()
    assert b.ceiling() == 1.0
    b.attempt = 10_000  # no overflow after very many failures
    assert b.ceiling() == 8.0
    with pytest.raises(ValueError):
        Backoff(0)


def test_reason_codes_read_well() -> None:
    err = ConnectError("Not authorized", reason_code=5, protocol=4)
    assert not err.permanent and "0x05" in str(err)
    assert json.dumps({"e": str(PublishRefused("t", 0x87))})
