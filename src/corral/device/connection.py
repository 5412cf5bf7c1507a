"""One MQTT connection of a :class:`~corral.device.client.Device`: opening it (TCP, TLS,
CONNECT, CONNACK), its socket, packet identifiers, acknowledgement waiters, keepalive pings
and tasks. A reconnect makes a new one. What the device *does* with the connection (its
topics, handlers and answers) is :mod:`corral.device.client`'s."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any

from corral.device.errors import ConnectError, NotConnected, PublishRefused, reason_name
from corral.transports.mqtt.codec import (
    Connack,
    Connect,
    Decoder,
    Packet,
    Pingreq,
    Pingresp,
    Puback,
    Publish,
    Suback,
    Subscribe,
    Subscription,
    Unsuback,
    Unsubscribe,
    encode,
)
from corral.transports.mqtt.properties import EMPTY, Properties, ProtocolError


@dataclass(frozen=True)
class Dial:
    """How to open a connection: where, how to authenticate, which protocol."""

    device_id: str
    secret: str | None
    host: str
    port: int
    tls: ssl.SSLContext | None
    server_hostname: str | None
    protocol: int
    keepalive: int
    clean_session: bool
    session_expiry: int
    connect_timeout: float
    max_packet_size: int
    ack_timeout: float


@dataclass(eq=False)
class Connection:
    """One MQTT connection's state; a reconnect makes a new one."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    version: int
    keepalive: int
    receive_maximum: int
    decoder: Decoder
    last_tx: float
    last_rx: float
    ack_timeout: float = 30.0
    pending: dict[int, asyncio.Future[Packet]] = field(default_factory=dict)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    done: asyncio.Event = field(default_factory=asyncio.Event)  # the connection is dead
    finished: asyncio.Event = field(default_factory=asyncio.Event)  # ... and cleaned up
    ready: bool = False  # subscribed and described
    reason: str = ""
    pong: asyncio.Future[None] | None = None
    next_pid: int = 0
    inflight: asyncio.Semaphore | None = None
    opened_at: float = 0.0
    session_present: bool = False  # from the CONNACK

    def send(self, packet: Packet) -> None:
        if self.done.is_set():
            raise NotConnected(f"the connection is closed ({self.reason})")
        self.writer.write(encode(packet, self.version))
        self.last_tx = asyncio.get_running_loop().time()

    def new_pid(self) -> int:
        for _ in range(0xFFFF):
            self.next_pid = self.next_pid % 0xFFFF + 1
            if self.next_pid not in self.pending:
                return self.next_pid
        raise NotConnected("no free packet identifier")

    def spawn(self, coro: Awaitable[Any], name: str) -> None:
        task = asyncio.ensure_future(coro)
        task.set_name(name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def lose(self, reason: str) -> None:
        """Mark the connection dead (idempotent): fail waiters, drop the socket."""
        if self.done.is_set():
            return
        self.reason = self.reason or reason
        self.done.set()
        # a waiter may be cancelled before it wakes up: mark the exceptions as retrieved so
        # asyncio does not log "Future exception was never retrieved" for them
        waiters: list[asyncio.Future[Any]] = [*self.pending.values()]
        if self.pong is not None:
            waiters.append(self.pong)
        for fut in waiters:
            if not fut.done():
                fut.set_exception(NotConnected(f"the connection ended: {self.reason}"))
                fut.exception()
        self.pending.clear()
        with contextlib.suppress(Exception):
            self.writer.transport.abort()

    # --- packets that the server acknowledges -----------------------------------------------

    async def request(self, packet_id: int, packet: Packet) -> Packet:
        """Send a packet that the server acknowledges with the same packet id."""
        fut: asyncio.Future[Packet] = asyncio.get_running_loop().create_future()
        self.pending[packet_id] = fut
        try:
            self.send(packet)
            await self.writer.drain()
            async with asyncio.timeout(self.ack_timeout):
                return await fut
        except (ConnectionError, OSError) as exc:
            self.lose(f"write failed: {exc}")
            raise NotConnected(f"the connection ended: {self.reason}") from exc
        finally:
            if self.pending.get(packet_id) is fut:
                del self.pending[packet_id]

    async def publish(self, topic: str, payload: bytes, qos: int,
                      props: Properties = EMPTY) -> None:
        """QoS 0: written; QoS 1: acknowledged (:class:`PublishRefused` with the reason)."""
        if qos == 0:
            self.send(Publish(topic, payload, 0, properties=props))
            try:
                await self.writer.drain()
            except (ConnectionError, OSError) as exc:
                self.lose(f"write failed: {exc}")
                raise NotConnected(f"the connection ended: {self.reason}") from exc
            return
        assert self.inflight is not None
        async with self.inflight:
            pid = self.new_pid()
            ack = await self.request(pid, Publish(topic, payload, 1, packet_id=pid,
                                                  properties=props))
        if isinstance(ack, Puback) and ack.reason_code >= 0x80:
            raise PublishRefused(topic, ack.reason_code, ack.properties.reason_string)

    async def subscribe(self, filters: list[str], qos: int) -> tuple[int, ...]:
        """Subscribe; the SUBACK's reason code for each filter."""
        pid = self.new_pid()
        ack = await self.request(pid, Subscribe(pid, tuple(Subscription(f, qos)
                                                           for f in filters)))
        if not isinstance(ack, Suback):
            raise NotConnected(f"SUBSCRIBE answered with {type(ack).__name__}")
        return tuple(ack.reason_codes)

    async def unsubscribe(self, topic_filter: str) -> None:
        pid = self.new_pid()
        await self.request(pid, Unsubscribe(pid, (topic_filter,)))

    def settle(self, packet: Packet) -> bool:
        """Hand an acknowledgement or a PINGRESP to its waiter; False for other packets."""
        if isinstance(packet, Puback | Suback | Unsuback):
            fut = self.pending.pop(packet.packet_id, None)
            if fut is not None and not fut.done():
                fut.set_result(packet)
            return True
        if isinstance(packet, Pingresp):
            if self.pong is not None and not self.pong.done():
                self.pong.set_result(None)
            return True
        return False

    async def keepalive_loop(self, ping_timeout: float | None) -> None:
        """Ping when nothing was sent or received for ``keepalive`` seconds; a PINGRESP that
        does not come within the ping timeout means the server is gone."""
        loop = asyncio.get_running_loop()
        interval = float(self.keepalive)
        timeout = ping_timeout or min(30.0, max(1.0, interval / 2))
        while not self.done.is_set():
            due = min(self.last_tx, self.last_rx) + interval
            now = loop.time()
            if now < due:
                await asyncio.sleep(due - now)
                continue
            self.pong = loop.create_future()
            try:
                self.send(Pingreq())
                async with asyncio.timeout(timeout):
                    await self.pong
            except TimeoutError:
                self.lose(f"no PINGRESP within {timeout:g} s")
                return
            except (NotConnected, ConnectionError, OSError):
                return
            self.last_rx = loop.time()


async def open_connection(d: Dial) -> tuple[Connection, list[Packet]]:
    """TCP (+TLS), CONNECT, CONNACK: the connection and any packets that came right after
    the CONNACK. Raises :class:`ConnectError` when refused or unreachable."""
    loop = asyncio.get_running_loop()
    where = f"{d.host}:{d.port}"
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(d.connect_timeout):
            reader, writer = await asyncio.open_connection(
                d.host, d.port, ssl=d.tls,
                server_hostname=(d.server_hostname or d.host) if d.tls else None)
            props = EMPTY
            if d.protocol == 5 and not d.clean_session:
                props = Properties(session_expiry_interval=d.session_expiry)
            username = d.device_id if d.secret is not None else None
            writer.write(encode(Connect(
                client_id=d.device_id, clean_start=d.clean_session,
                keep_alive=d.keepalive, username=username,
                password=d.secret.encode("utf-8") if d.secret is not None else None,
                properties=props, protocol_level=d.protocol), d.protocol))
            await writer.drain()
            decoder = Decoder(d.protocol, d.max_packet_size)
            packets: list[Packet] = []
            while not packets:
                data = await reader.read(65536)
                if not data:
                    raise ConnectError(f"{where} closed the connection before CONNACK")
                packets = decoder.feed(data)
    except ConnectError:
        if writer is not None:
            writer.transport.abort()
        raise
    except TimeoutError:
        if writer is not None:
            writer.transport.abort()
        raise ConnectError(f"no answer from {where} within {d.connect_timeout:g} s") \
            from None
    except ProtocolError as exc:
        assert writer is not None
        writer.transport.abort()
        raise ConnectError(f"{where} sent a malformed answer: {exc.message}") from None
    except (OSError, ssl.SSLError) as exc:
        if writer is not None:
            writer.transport.abort()
        raise ConnectError(f"cannot connect to {where}: {exc}") from exc
    except BaseException:  # cancelled: do not leave the socket open
        if writer is not None:
            writer.transport.abort()
        raise
    ack = packets[0]
    if not isinstance(ack, Connack):
        writer.transport.abort()
        raise ConnectError(f"{where} answered CONNECT with {type(ack).__name__}")
    if ack.reason_code:
        writer.transport.abort()
        raise ConnectError(reason_name(ack.reason_code, d.protocol),
                           reason_code=ack.reason_code, protocol=d.protocol,
                           server_reason=ack.properties.reason_string)
    keepalive = d.keepalive
    if ack.properties.server_keep_alive is not None:
        keepalive = ack.properties.server_keep_alive
    receive_max = ack.properties.receive_maximum or 65535
    now = loop.time()
    conn = Connection(reader=reader, writer=writer, version=d.protocol, keepalive=keepalive,
                      receive_maximum=receive_max, decoder=decoder, last_tx=now, last_rx=now,
                      ack_timeout=d.ack_timeout, opened_at=now,
                      session_present=ack.session_present)
    conn.inflight = asyncio.Semaphore(min(receive_max, 1024))
    return conn, packets[1:]
