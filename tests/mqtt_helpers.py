"""Helpers for the MQTT gateway tests: a raw codec client (exact packets), a paho-mqtt
wrapper (an independent client), device set-up through the API and database probes."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Awaitable, Callable
from types import SimpleNamespace
from typing import Any

import paho.mqtt.client as paho
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.properties import Properties as PahoProperties
from paho.mqtt.subscribeoptions import SubscribeOptions
from sqlalchemy import select

from corral.devices.models import Device
from corral.events.models import Event
from corral.transports.mqtt.codec import (
    MQTT_5,
    Connack,
    Connect,
    Decoder,
    Packet,
    Pingreq,
    Puback,
    Publish,
    Subscribe,
    Subscription,
    encode,
)
from corral.transports.mqtt.properties import EMPTY, Properties
from corral.transports.mqtt.server import MqttServer
from helpers import add_devices, bearer, owner_and_product

DEV = "0123456789abcdef01234567"
DEV2 = "0123456789abcdef0123abcd"


async def until(pred: Callable[[], Any], within: float = 5.0, what: str = "condition") -> Any:
    """Poll ``pred`` (sync or async) until it is truthy; its value."""
    try:
        async with asyncio.timeout(within):
            while True:
                value = pred()
                if isinstance(value, Awaitable):
                    value = await value
                if value:
                    return value
                await asyncio.sleep(0.01)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


# --- the world: an owner, a product, devices with MQTT secrets ---------------------------------

async def rotate_secret(client: Any, token: str, product: dict[str, Any], device_id: str) -> str:
    r = await client.post(f"/v1/products/{product['slug']}/devices/{device_id}/mqtt_secret",
                          headers=bearer(token))
    assert r.status_code == 200, r.text
    return str(r.json()["mqtt_secret"])


async def device_row(app: Any, device_id: str = DEV) -> Device:
    async with app.state.sessionmaker() as db:
        d = await db.get(Device, device_id)
        assert d is not None
        return d


async def events(app: Any, device_id: str | None = DEV, name: str | None = None) -> list[Event]:
    async with app.state.sessionmaker() as db:
        q = select(Event).order_by(Event.id)
        if device_id is not None:
            q = q.where(Event.device_id == device_id)
        if name is not None:
            q = q.where(Event.name == name)
        return list((await db.execute(q)).scalars())


async def statuses(app: Any, device_id: str = DEV) -> list[str | None]:
    return [e.data for e in await events(app, device_id, "spark/status")]


# --- a raw client on corral's own codec --------------------------------------------------------

class Raw:
    """A byte-exact MQTT client: send any packet (or garbage), read packets one by one."""

    opened: list[Raw] = []

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                 version: int) -> None:
        self.reader, self.writer, self.version = reader, writer, version
        Raw.opened.append(self)
        self.decoder = Decoder(version)
        self.inbox: list[Packet] = []

    @classmethod
    async def open(cls, port: int, version: int = MQTT_5, **kw: Any) -> Raw:
        reader, writer = await asyncio.open_connection("127.0.0.1", port, **kw)
        return cls(reader, writer, version)

    def send(self, *packets: Packet) -> None:
        self.writer.write(b"".join(encode(p, self.version) for p in packets))

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def recv(self, within: float = 5.0) -> Packet:
        async with asyncio.timeout(within):
            while not self.inbox:
                data = await self.reader.read(65536)
                if not data:
                    raise EOFError("the server closed the connection")
                self.inbox.extend(self.decoder.feed(data))
        return self.inbox.pop(0)

    async def recv_type(self, kind: type, within: float = 5.0) -> Any:
        """The next packet of type ``kind`` (others are skipped)."""
        async with asyncio.timeout(within):
            while True:
                p = await self.recv(within)
                if isinstance(p, kind):
                    return p

    async def closed(self, within: float = 5.0) -> list[Packet]:
        """Wait for the server to close; the packets that came before the close."""
        seen: list[Packet] = []
        async with asyncio.timeout(within):
            while True:
                try:
                    seen.append(await self.recv(within))
                except (EOFError, ConnectionError):
                    self.close()
                    return seen

    async def connect(self, device_id: str | None, secret: str | None, *,
                      client_id: str | None = None, keep_alive: int = 60, clean: bool = True,
                      properties: Properties = EMPTY, will: Any = None,
                      username: str | None = "") -> Connack:
        user = device_id if username == "" else username
        self.send(Connect(client_id=(device_id or "") if client_id is None else client_id,
                          clean_start=clean, keep_alive=keep_alive, username=user,
                          password=secret.encode() if secret is not None else None,
                          will=will, properties=properties, protocol_level=self.version))
        p = await self.recv()
        assert isinstance(p, Connack), p
        return p

    async def publish(self, topic: str, payload: bytes | str = b"", *, qos: int = 1,
                      packet_id: int = 1, properties: Properties = EMPTY) -> Puback | None:
        if isinstance(payload, str):
            payload = payload.encode()
        self.send(Publish(topic, payload, qos, packet_id=packet_id if qos else None,
                          properties=properties))
        if not qos:
            return None
        return await self.recv_type(Puback)  # type: ignore[no-any-return]

    async def subscribe(self, *filters: str, qos: int = 1, packet_id: int = 1) -> tuple[int, ...]:
        self.send(Subscribe(packet_id, tuple(Subscription(f, qos) for f in filters)))
        from corral.transports.mqtt.codec import Suback
        ack = await self.recv_type(Suback)
        assert ack.packet_id == packet_id
        return ack.reason_codes  # type: ignore[no-any-return]

    async def ping(self) -> None:
        from corral.transports.mqtt.codec import Pingresp
        self.send(Pingreq())
        await self.recv_type(Pingresp)

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.transport.abort()

    @classmethod
    def close_all(cls) -> None:
        """Abort every raw connection a test opened (fixture teardown)."""
        for r in cls.opened:
            r.close()
        cls.opened.clear()


# --- paho-mqtt, the independent client -----------------------------------------------------------

class Paho:
    """paho-mqtt 2.x on its own thread, observed from the test's event loop."""

    def __init__(self, port: int, device_id: str, secret: str | None, *, version: int = 5,
                 clean: bool = True, client_id: str | None = None, keepalive: int = 60) -> None:
        self.port, self.keepalive, self.version, self.clean = port, keepalive, version, clean
        proto = paho.MQTTv5 if version == 5 else paho.MQTTv311
        kwargs: dict[str, Any] = {}
        if version != 5:
            kwargs["clean_session"] = clean
        self.c = paho.Client(CallbackAPIVersion.VERSION2,
                             client_id=device_id if client_id is None else client_id,
                             protocol=proto, **kwargs)
        if secret is not None:
            self.c.username_pw_set(device_id, secret)
        self.lock = threading.Lock()
        self.connack: Any = None
        self.connack_props: Any = None
        self.session_present: bool | None = None
        self.disconnected: Any = None
        self.disconnect_props: Any = None
        self.messages: list[paho.MQTTMessage] = []
        self.acks: dict[int, Any] = {}
        self.subacks: dict[int, list[Any]] = {}
        self.handlers: list[Callable[[Paho, paho.MQTTMessage], None]] = []
        self.c.on_connect = self._on_connect
        self.c.on_disconnect = self._on_disconnect
        self.c.on_message = self._on_message
        self.c.on_publish = self._on_publish
        self.c.on_subscribe = self._on_subscribe

    def _on_connect(self, c: Any, u: Any, flags: Any, rc: Any, props: Any = None) -> None:
        self.connack, self.connack_props = rc, props
        self.session_present = bool(flags.session_present)

    def _on_disconnect(self, c: Any, u: Any, flags: Any, rc: Any, props: Any = None) -> None:
        self.disconnected, self.disconnect_props = rc, props

    def _on_message(self, c: Any, u: Any, msg: paho.MQTTMessage) -> None:
        with self.lock:
            self.messages.append(msg)
        for h in self.handlers:
            h(self, msg)

    def _on_publish(self, c: Any, u: Any, mid: int, rc: Any, props: Any) -> None:
        self.acks[mid] = rc

    def _on_subscribe(self, c: Any, u: Any, mid: int, rcs: Any, props: Any) -> None:
        self.subacks[mid] = list(rcs)

    async def connect(self, *, session_expiry: int | None = None, expect_ok: bool = True) -> Any:
        props = None
        if self.version == 5:
            props = PahoProperties(paho.PacketTypes.CONNECT)
            if session_expiry is not None:
                props.SessionExpiryInterval = session_expiry
        kwargs: dict[str, Any] = {"properties": props} if self.version == 5 else {}
        if self.version == 5:
            kwargs["clean_start"] = self.clean
        self.c.reconnect_delay_set(60, 120)  # no automatic reconnects in tests
        await asyncio.to_thread(self.c.connect, "127.0.0.1", self.port, self.keepalive, **kwargs)
        self.c.loop_start()
        await until(lambda: self.connack is not None or self.disconnected is not None,
                    what="CONNACK")
        if expect_ok:
            assert self.connack is not None and not self.connack.is_failure, self.connack
        return self.connack

    async def publish(self, topic: str, payload: str | bytes, qos: int = 1,
                      expiry: int | None = None) -> Any:
        props = None
        if expiry is not None:
            props = PahoProperties(paho.PacketTypes.PUBLISH)
            props.MessageExpiryInterval = expiry
        info = self.c.publish(topic, payload, qos=qos, properties=props)
        if not qos:
            return None
        await until(lambda: info.mid in self.acks, what="PUBACK")
        return self.acks[info.mid]

    async def subscribe(self, topic: str, qos: int = 1) -> list[Any]:
        if self.version == 5:
            rc, mid = self.c.subscribe(topic, options=SubscribeOptions(qos=qos))
        else:
            rc, mid = self.c.subscribe(topic, qos=qos)
        assert rc == paho.MQTT_ERR_SUCCESS
        await until(lambda: mid in self.subacks, what="SUBACK")
        return self.subacks[mid]

    async def disconnect(self) -> None:
        self.c.disconnect()
        await until(lambda: self.disconnected is not None, what="disconnect")
        self.stop()

    def stop(self) -> None:
        self.c.loop_stop()
        with contextlib.suppress(Exception):
            self.c.socket() and self.c.socket().close()  # type: ignore[func-returns-value]


# --- the gateway fixture shared by the MQTT test files (import `settings`, `gw` and `t`) ------

@pytest.fixture
def settings(settings: Any) -> Any:
    return settings.model_copy(update={
        "mqtt_connect_timeout_s": 0.5, "event_rate_burst": 1000, "event_rate_per_s": 1000.0,
        "mqtt_session_expiry_s": 60, "presence_flush_s": 0.05})


@pytest.fixture
async def gw(app: Any, client: Any) -> Any:
    """A plain listener on a free port, product Widget with devices DEV and DEV2 (secrets)."""
    hub = app.state.runtime.hub
    server = MqttServer(hub, app.state.settings)
    listener = await server.listen("127.0.0.1", 0)
    token, product = await owner_and_product(client)
    await add_devices(app, product["id"], DEV, DEV2)
    secret = await rotate_secret(client, token, product, DEV)
    secret2 = await rotate_secret(client, token, product, DEV2)
    try:
        yield SimpleNamespace(app=app, client=client, hub=hub, server=server,
                              port=listener.port, token=token, product=product,
                              secret=secret, secret2=secret2)
    finally:
        Raw.close_all()
        await server.stop()


def t(kind: str, rest: str = "", device: str = DEV) -> str:
    return f"devices/{device}/{kind}" + (f"/{rest}" if rest else "")
