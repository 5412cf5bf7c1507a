"""corral's MQTT server: the device gateway transport (MQTT 3.1.1 and 5, plain and TLS).

Not a broker: each device talks to the cloud only, on its own topics (docs/mqtt.md). A
connection authenticates (MQTT secret, or a TLS client certificate from a product CA), opens
a :class:`~corral.sessions.core.DeviceSession` and translates packets to session calls; the
connection itself is the session's :class:`~corral.sessions.core.DeviceLink`.

Per connection, one task reads and dispatches packets in order. Device publishes run as
tasks started in arrival order (so the event writer batches their commits) and are
acknowledged in that same order by an acker task, each PUBACK only after its commit. At
most ``RECEIVE_MAXIMUM`` publishes are in flight; beyond that the reader stops reading
(backpressure), without counting that wait against the keep-alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Final, cast

from cryptography import x509
from prometheus_client import Counter, Gauge

from corral.sessions import contract
from corral.sessions.core import (
    DeviceError,
    DeviceSession,
    FirmwareImage,
    FirmwareProgress,
    Hello,
    Refused,
    SessionHub,
    TransferResult,
    UpdateNotice,
    check_event_name,
)
from corral.settings import Settings
from corral.transports.listening import close_server
from corral.transports.mqtt import topics
from corral.transports.mqtt.codec import (
    MQTT_5,
    MQTT_311,
    Auth,
    Connack,
    Connect,
    Decoder,
    Disconnect,
    Packet,
    Pingreq,
    Pingresp,
    Puback,
    Publish,
    Suback,
    Subscribe,
    Unsuback,
    Unsubscribe,
    encode,
)
from corral.transports.mqtt.properties import (
    EMPTY,
    UNSUPPORTED_PROTOCOL_VERSION,
    Properties,
    ProtocolError,
)
from corral.transports.mqtt.tls import TlsContexts

log = logging.getLogger("corral.mqtt")

RECEIVE_MAXIMUM: Final = 64  # device publishes in flight per connection (advertised in v5)
OUTBOUND_INFLIGHT: Final = 32  # unacknowledged QoS 1 messages to a device
OUTBOUND_QUEUE: Final = 1000  # further QoS 1 messages waiting for the window (oldest dropped)
READ_SIZE: Final = 65_536
WRITE_BUFFER_HIGH: Final = 256 * 1024  # above this, writers wait for the device to read
TLS_REFRESH_S: Final = 5.0
SWEEP_S: Final = 60.0

# v3.1.1 CONNACK return codes
V3_UNACCEPTABLE_PROTOCOL: Final = 1
V3_IDENTIFIER_REJECTED: Final = 2
V3_SERVER_UNAVAILABLE: Final = 3
V3_BAD_CREDENTIALS: Final = 4
V3_NOT_AUTHORIZED: Final = 5
# v5 reason codes
RC_NO_SUBSCRIPTION: Final = 0x11
RC_NORMAL_WITH_WILL: Final = 0x04
RC_UNSPECIFIED: Final = 0x80
RC_PROTOCOL_ERROR: Final = 0x82
RC_IMPLEMENTATION: Final = 0x83
RC_CLIENT_ID_INVALID: Final = 0x85
RC_BAD_CREDENTIALS: Final = 0x86
RC_NOT_AUTHORIZED: Final = 0x87
RC_SERVER_UNAVAILABLE: Final = 0x88
RC_SERVER_BUSY: Final = 0x89
RC_BAD_AUTH_METHOD: Final = 0x8C
RC_KEEP_ALIVE_TIMEOUT: Final = 0x8D
RC_SESSION_TAKEN_OVER: Final = 0x8E
RC_SHUTTING_DOWN: Final = 0x8B
RC_TOPIC_FILTER_INVALID: Final = 0x8F
RC_TOPIC_NAME_INVALID: Final = 0x90
RC_TOPIC_ALIAS_INVALID: Final = 0x94
RC_QUOTA_EXCEEDED: Final = 0x97
RC_ADMINISTRATIVE: Final = 0x98
RC_PAYLOAD_INVALID: Final = 0x99
RC_RETAIN_NOT_SUPPORTED: Final = 0x9A
RC_QOS_NOT_SUPPORTED: Final = 0x9B
RC_SHARED_NOT_SUPPORTED: Final = 0x9E
RC_SUB_IDS_NOT_SUPPORTED: Final = 0xA1

# What a refused device publish becomes in an MQTT 5 PUBACK.
PUBACK_CODES: Final[dict[str, int]] = {
    "rate_limited": RC_QUOTA_EXCEEDED,
    "paused": RC_QUOTA_EXCEEDED,
    "invalid": RC_PAYLOAD_INVALID,
    "too_large": RC_PAYLOAD_INVALID,
}

# --- metrics ----------------------------------------------------------------------------------

CONNECTIONS = Gauge("corral_mqtt_connections", "Open MQTT connections", ["listener"])
SESSIONS = Gauge("corral_mqtt_device_sessions", "Devices connected over MQTT")
CONNECTS = Counter("corral_mqtt_connects_total", "MQTT connection attempts by outcome",
                   ["result"])
PACKETS_IN = Counter("corral_mqtt_packets_received_total", "MQTT packets received", ["type"])
PACKETS_OUT = Counter("corral_mqtt_packets_sent_total", "MQTT packets sent", ["type"])
REFUSALS = Counter("corral_mqtt_refusals_total", "Refused MQTT publishes and subscriptions",
                   ["what", "reason"])
CLOSES = Counter("corral_mqtt_closes_total", "Ended MQTT connections by cause", ["cause"])
DROPPED = Counter("corral_mqtt_dropped_messages_total",
                  "Messages to devices dropped (queue full, too large, undeliverable topic)")

_PACKET_NAMES = ("connect", "connack", "publish", "puback", "pubrec", "pubrel", "pubcomp",
                 "subscribe", "suback", "unsubscribe", "unsuback", "pingreq", "pingresp",
                 "disconnect", "auth")
_IN = {n: PACKETS_IN.labels(n) for n in _PACKET_NAMES}
_OUT = {n: PACKETS_OUT.labels(n) for n in _PACKET_NAMES}


OTA_STATES: Final = ("downloading", "applied", "failed")


def _kind(packet: Packet) -> str:
    return type(packet).__name__.lower()


class _Close(Exception):
    """End the connection: ``code`` is the v5 DISCONNECT reason (None: no DISCONNECT)."""

    def __init__(self, reason: str, code: int | None = None, *, will: bool = True,
                 cause: str = "protocol") -> None:
        super().__init__(reason)
        self.reason, self.code, self.will, self.cause = reason, code, will, cause


# --- persistent session state -------------------------------------------------------------------

@dataclass(slots=True)
class Outbound:
    """A QoS 1 message to a device. ``keep``: resend it on a resumed session (event
    deliveries); requests are not resent (their callers gave up when the connection ended)."""

    topic: str
    payload: bytes
    properties: Properties = EMPTY
    keep: bool = True
    packet_id: int = 0


@dataclass(slots=True)
class SessionState:
    """What MQTT keeps for a device across connections (clean session = 0)."""

    device_id: str
    expiry_s: int = 0  # kept this long after the connection ends (0: discarded then)
    requests_qos: int | None = None
    ota_qos: int | None = None
    inbox: dict[str, int] = field(default_factory=dict)  # prefix -> granted QoS
    inflight: dict[int, Outbound] = field(default_factory=dict)
    queued: deque[Outbound] = field(default_factory=deque)
    next_id: int = 0
    owner: Connection | None = None
    expires_at: float = 0.0
    dropped: int = 0

    def allocate_id(self) -> int:
        while True:
            self.next_id = self.next_id % 0xFFFF + 1
            if self.next_id not in self.inflight:
                return self.next_id


# --- one connection ---------------------------------------------------------------------------

class Connection:
    """One device connection; the session core's link to the device."""

    transport = "mqtt"

    def __init__(self, server: MqttServer, listener: MqttListener,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.server = server
        self.listener = listener
        self.hub = server.hub
        self.settings = server.settings
        self.reader = reader
        self.writer = writer
        peer = writer.get_extra_info("peername")
        self.peer_ip: str | None = peer[0] if isinstance(peer, tuple) and peer else None
        self.version = MQTT_311
        self.device_id = ""
        self.session: DeviceSession | None = None
        self.state: SessionState | None = None
        self.decoder = Decoder(max_packet_size=server.settings.mqtt_max_packet_bytes)
        self.keepalive = server.settings.mqtt_max_keepalive_s
        self.client_max_packet: int | None = None
        self.client_receive_max = OUTBOUND_INFLIGHT
        self.problem_info = True
        self.will: tuple[str, bytes, int] | None = None  # event name, data, ttl
        self.connect_expiry = 0  # the session expiry the CONNECT asked for (v5)
        self.closing = False  # nothing more is written
        self.kicked = False  # the hub ends the core session (it called disconnect)
        self.end_reason: str | None = None
        self.end_cause = "lost"
        self.send_will = False
        self.connack_sent = False
        self.ready = asyncio.Event()  # CONNACK sent, or the connection is closing
        self.pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        # publishes waiting for their acknowledgement, in arrival order; the awaitable gives
        # an event id (stored: success) or a (reason code, reason) pair
        self.acks: asyncio.Queue[tuple[Publish, Awaitable[Any]] | None] = asyncio.Queue()
        self.slots = asyncio.Semaphore(RECEIVE_MAXIMUM)
        self.acker: asyncio.Task[None] | None = None
        self._corked: list[bytes] | None = None  # packets gathered for one write
        self.control = asyncio.Lock()  # describe and claim run one at a time, in order
        # firmware: the device's ota/status reports while a transfer waits for them
        self.ota_status: asyncio.Queue[dict[str, Any]] | None = None
        self.task: asyncio.Task[None] | None = None
        self.done = asyncio.Event()

    def __repr__(self) -> str:
        return f"<mqtt.Connection {self.device_id or '?'} from {self.peer_ip}>"

    # -- lifecycle -------------------------------------------------------------------------------

    async def run(self) -> None:
        self.task = asyncio.current_task()
        gauge = CONNECTIONS.labels(self.listener.name)
        gauge.inc()
        self.server.connections.add(self)
        self.listener.connections.add(self)
        try:
            try:
                await self._serve()
            except Exception:
                log.exception("MQTT connection %r failed", self)
                self._end("internal error", cause="error")
            finally:
                try:
                    await self._finish()
                except Exception:
                    log.exception("MQTT connection %r did not end cleanly", self)
        finally:
            self._close_transport()
            self.server.connections.discard(self)
            self.listener.connections.discard(self)
            gauge.dec()
            CLOSES.labels(self.end_cause).inc()
            self.done.set()

    async def _serve(self) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.mqtt_connect_timeout_s
        got = await self._read_connect(deadline)
        if got is None:
            return
        connect, early = got
        try:
            accepted = await self._accept(connect)
        except Exception:
            log.exception("MQTT CONNECT of %r from %s failed", self.device_id or "?",
                          self.peer_ip)
            if not self.connack_sent:
                await self._refuse(V3_SERVER_UNAVAILABLE, RC_SERVER_UNAVAILABLE,
                                   "the server is unavailable", "error")
            return
        if accepted:
            await self._loop(early)

    def _end(self, reason: str, *, will: bool = False, cause: str = "lost") -> None:
        """Record why the connection ends (the first reason wins)."""
        if self.end_reason is None:
            self.end_reason, self.send_will, self.end_cause = reason, will, cause

    async def shutdown(self, reason: str) -> None:
        """Close from the server side (listener stopping) and wait for the cleanup."""
        self._end(reason, cause="shutdown")
        if self.connack_sent and self.version == MQTT_5:
            self._send(Disconnect(RC_SHUTTING_DOWN, self._reason_props(reason)))
        self._close_transport()
        try:
            async with asyncio.timeout(10.0):
                await self.done.wait()
        except TimeoutError:
            if self.task is not None:
                self.task.cancel()

    async def _finish(self) -> None:
        """After the read loop: settle in-flight publishes, fail pending requests, publish
        the will, keep or drop the MQTT session state, close the core session."""
        session = self.session
        if self.acker is not None:
            self.acks.put_nowait(None)
            try:
                async with asyncio.timeout(10.0):
                    await asyncio.shield(self.acker)
            except TimeoutError:
                self.acker.cancel()
        self.closing = True
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(DeviceError("the device disconnected"))
        # let the callers' request handlers answer before the core session closes (closing
        # unsubscribes, which cancels a handler still waiting for its device)
        for _ in range(20):
            if not self.pending:
                break
            await asyncio.sleep(0)
        await asyncio.sleep(0)
        if session is None:
            return
        SESSIONS.dec()
        if self.will is not None and self.send_will and not self.kicked:
            name, data, ttl = self.will
            try:
                await session.publish(name, data, ttl=ttl)
            except Refused as exc:
                log.info("will of %s not published: %s", self.device_id, exc.reason)
        self.server.release_state(self)
        if not self.kicked:
            await session.close(self.end_reason or "connection lost")

    # -- output ---------------------------------------------------------------------------------

    def _send(self, packet: Packet) -> bool:
        if self.closing:
            return False
        data = encode(packet, self.version)
        if self.client_max_packet is not None and len(data) > self.client_max_packet:
            DROPPED.inc()
            return False
        if self._corked is not None:
            self._corked.append(data)
        else:
            self.writer.write(data)
        if self.session is not None:
            self.session.count_bytes(len(data))
        _OUT[_kind(packet)].inc()
        return True

    def _uncork(self) -> None:
        """Write what was sent while corked, in one write (one syscall for many acks)."""
        out, self._corked = self._corked, None
        if out and not self.closing:
            self.writer.write(b"".join(out))

    async def _flush(self) -> None:
        """Wait while the device is slow to read; drop it when it does not read at all."""
        if self.closing or self.writer.transport.get_write_buffer_size() <= WRITE_BUFFER_HIGH:
            return
        try:
            async with asyncio.timeout(self.server.drain_timeout_s):
                await self.writer.drain()
        except TimeoutError:
            self._end("the device does not read what it is sent", cause="backpressure")
            self._abort()
        except (ConnectionError, OSError):
            self._end("connection lost")
            self._abort()

    def _close_transport(self) -> None:
        self.closing = True
        self.ready.set()
        transport = self.writer.transport
        if transport.is_closing():
            return
        transport.close()
        # a peer that does not read would keep the close (and our reader) pending
        asyncio.get_running_loop().call_later(2.0, transport.abort)

    def _abort(self) -> None:
        self.closing = True
        self.ready.set()
        with contextlib.suppress(Exception):
            self.writer.transport.abort()

    def _reason_props(self, reason: str | None) -> Properties:
        if reason and self.version == MQTT_5 and self.problem_info:
            return Properties(reason_string=reason[:200])
        return EMPTY

    # -- CONNECT ----------------------------------------------------------------------------------

    async def _read_connect(self, deadline: float) -> tuple[Connect, list[Packet]] | None:
        try:
            async with asyncio.timeout_at(deadline):
                while True:
                    data = await self.reader.read(READ_SIZE)
                    if not data:
                        self._end("closed before CONNECT", cause="no_connect")
                        return None
                    try:
                        packets = self.decoder.feed(data)
                    except ProtocolError as exc:
                        if exc.reason_code == UNSUPPORTED_PROTOCOL_VERSION:
                            self.writer.write(b"\x20\x02\x00\x01")  # 3.1.1 style, code 1
                        CONNECTS.labels("malformed").inc()
                        self._end(f"protocol error: {exc.message}", cause="protocol")
                        log.info("MQTT CONNECT from %s refused: %s", self.peer_ip, exc.message)
                        return None
                    if packets:
                        first = packets[0]
                        assert isinstance(first, Connect)  # the decoder guarantees it
                        _IN["connect"].inc()
                        return first, packets[1:]
        except TimeoutError:
            CONNECTS.labels("timeout").inc()
            self._end("no CONNECT in time", cause="no_connect")
            log.info("MQTT client %s sent no CONNECT within %ss", self.peer_ip,
                     self.settings.mqtt_connect_timeout_s)
        except OSError as exc:
            self._end(f"connection lost before CONNECT: {exc!r}", cause="no_connect")
        return None

    async def _refuse(self, v3: int, v5: int, reason: str, result: str) -> bool:
        CONNECTS.labels(result).inc()
        log.info("MQTT CONNECT of %r from %s refused (%s): %s", self.device_id or "?",
                 self.peer_ip, result, reason)
        code = v5 if self.version == MQTT_5 else v3
        self._send(Connack(False, code, self._reason_props(reason)))
        self._end(f"refused: {reason}", cause="refused")
        with contextlib.suppress(Exception):
            async with asyncio.timeout(1.0):
                await self.writer.drain()
        return False

    def _certificate(self) -> x509.Certificate | None:
        sslobj = self.writer.get_extra_info("ssl_object")
        if sslobj is None:
            return None
        der = sslobj.getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der) if der else None

    async def _accept(self, c: Connect) -> bool:
        """Authenticate, admit, open the core session and send CONNACK."""
        self.version = c.protocol_level
        v5 = self.version == MQTT_5
        props = c.properties
        if v5:
            self.problem_info = props.request_problem_information != 0
            self.client_max_packet = props.maximum_packet_size
            if props.receive_maximum is not None:
                self.client_receive_max = min(props.receive_maximum, OUTBOUND_INFLIGHT)
            if props.authentication_method is not None:
                return await self._refuse(V3_NOT_AUTHORIZED, RC_BAD_AUTH_METHOD,
                                          "enhanced authentication is not supported",
                                          "bad_auth_method")
        client_id = c.client_id.lower()
        try:
            cert = self._certificate()
        except ValueError:
            cert = None
        if cert is not None:
            try:
                device_id = await self.hub.provision_certificate([cert], ip=self.peer_ip)
            except Refused as exc:
                return await self._refuse(V3_NOT_AUTHORIZED, RC_NOT_AUTHORIZED, exc.reason,
                                          "certificate_refused")
            device_id = device_id.lower()
            self.device_id = device_id
            if client_id and client_id != device_id:
                return await self._refuse(
                    V3_IDENTIFIER_REJECTED, RC_CLIENT_ID_INVALID,
                    "the client identifier must be the certificate's device ID (or empty)",
                    "client_id")
            if c.username is not None and c.username.lower() != device_id:
                return await self._refuse(V3_BAD_CREDENTIALS, RC_BAD_CREDENTIALS,
                                          "the user name must be the device ID",
                                          "bad_credentials")
        else:
            if not topics.is_device_id(client_id):
                return await self._refuse(
                    V3_IDENTIFIER_REJECTED, RC_CLIENT_ID_INVALID,
                    "the client identifier must be the device ID (24 hexadecimal characters)",
                    "client_id")
            device_id = self.device_id = client_id
            if c.username is not None and c.username.lower() != device_id:
                return await self._refuse(V3_BAD_CREDENTIALS, RC_BAD_CREDENTIALS,
                                          "the user name must be the device ID",
                                          "bad_credentials")
            try:
                password = (c.password or b"").decode("utf-8")
            except UnicodeDecodeError:
                password = ""
            if not password or not await self.hub.authenticate_secret(device_id, password):
                return await self._refuse(V3_BAD_CREDENTIALS, RC_BAD_CREDENTIALS,
                                          "wrong device ID or MQTT secret", "bad_credentials")
        if c.will is not None:
            will = c.will
            if v5 and will.qos > 1:
                return await self._refuse(V3_NOT_AUTHORIZED, RC_QOS_NOT_SUPPORTED,
                                          "QoS 2 is not supported", "will")
            if v5 and will.retain:
                return await self._refuse(V3_NOT_AUTHORIZED, RC_RETAIN_NOT_SUPPORTED,
                                          "retained messages are not supported", "will")
            target = topics.parse_publish(device_id, will.topic)
            if target is None or target.kind != "event":
                return await self._refuse(
                    V3_NOT_AUTHORIZED, RC_NOT_AUTHORIZED,
                    f"a will may only be an event: {topics.events_topic(device_id, '{name}')}",
                    "will")
            try:
                check_event_name(target.arg)
            except Refused as exc:
                return await self._refuse(V3_NOT_AUTHORIZED, RC_TOPIC_NAME_INVALID,
                                          exc.reason, "will")
            expiry = will.properties.message_expiry_interval
            self.will = (target.arg, will.payload, 60 if expiry is None else expiry)
        cap = self.settings.mqtt_session_expiry_s
        if v5:
            self.connect_expiry = props.session_expiry_interval or 0
            expiry_s = min(self.connect_expiry, cap)
        else:
            expiry_s = 0 if c.clean_start else cap
        max_ka = self.settings.mqtt_max_keepalive_s
        self.keepalive = c.keep_alive if 0 < c.keep_alive <= max_ka else max_ka
        try:
            self.session = await self.hub.open(Hello(device_id, remote=self.peer_ip), self)
        except Refused as exc:
            if exc.code == "busy":
                return await self._refuse(V3_SERVER_UNAVAILABLE, RC_SERVER_BUSY, exc.reason,
                                          "busy")
            return await self._refuse(V3_NOT_AUTHORIZED, RC_NOT_AUTHORIZED, exc.reason, exc.code)
        SESSIONS.inc()
        state, present = self.server.claim_state(self, clean=c.clean_start, expiry_s=expiry_s)
        cprops = EMPTY
        if v5:
            cprops = Properties(
                session_expiry_interval=expiry_s if expiry_s != self.connect_expiry else None,
                receive_maximum=RECEIVE_MAXIMUM,
                maximum_qos=1,
                retain_available=0,
                maximum_packet_size=self.settings.mqtt_max_packet_bytes,
                assigned_client_identifier=None if c.client_id else device_id,
                server_keep_alive=self.keepalive if self.keepalive != c.keep_alive else None,
                subscription_identifier_available=0,
                shared_subscription_available=0,
            )
        if self.closing:  # kicked while opening (a newer connection already took over)
            return False
        self._send(Connack(present, 0, cprops))
        CONNECTS.labels("accepted").inc()
        self.connack_sent = True
        self.ready.set()
        if present:
            await self._resume(state)
        return True

    async def _resume(self, state: SessionState) -> None:
        """Re-apply the kept subscriptions to the new core session and resend what the
        device did not acknowledge."""
        session = self.session
        assert session is not None
        for prefix in list(state.inbox):
            try:
                await session.subscribe(prefix)
            except Refused:
                state.inbox.pop(prefix, None)
        for pid, out in list(state.inflight.items()):
            if not out.keep:
                del state.inflight[pid]
                continue
            self._send(Publish(out.topic, out.payload, 1, dup=True, packet_id=pid,
                               properties=out.properties))
        self._pump(state)
        await self._flush()

    # -- the read loop ----------------------------------------------------------------------------

    async def _loop(self, early: list[Packet]) -> None:
        self.acker = asyncio.get_running_loop().create_task(self._ack_loop(),
                                                            name=f"mqtt-acks-{self.device_id}")
        idle = self.keepalive * 1.5
        try:
            await self._handle_all(early)
            while not self.closing:
                try:
                    async with asyncio.timeout(idle):
                        data = await self.reader.read(READ_SIZE)
                except TimeoutError:
                    raise _Close("keep-alive timeout", RC_KEEP_ALIVE_TIMEOUT,
                                 cause="keepalive") from None
                except OSError:
                    data = b""
                if not data:
                    self._end("connection lost", will=True)
                    return
                if self.session is not None:
                    self.session.count_bytes(len(data))
                try:
                    packets = self.decoder.feed(data)
                except ProtocolError as exc:
                    await self._handle_all(cast(list[Packet], exc.decoded))
                    raise _Close(f"protocol error: {exc.message}", exc.reason_code) from None
                await self._handle_all(packets)
        except _Close as close:
            self._end(close.reason, will=close.will, cause=close.cause)
            if close.code is not None and self.version == MQTT_5:
                self._send(Disconnect(close.code, self._reason_props(close.reason)))
            self._close_transport()
        if self.end_reason is None:
            self._end("connection lost", will=True)

    async def _handle_all(self, packets: list[Packet]) -> None:
        session = self.session
        assert session is not None
        for p in packets:
            if self.closing:
                return
            session.heard()
            _IN[_kind(p)].inc()
            if isinstance(p, Publish):
                await self._on_publish(p)
            elif isinstance(p, Puback):
                self._on_puback(p.packet_id)
            elif isinstance(p, Pingreq):
                self._send(Pingresp())
            elif isinstance(p, Subscribe):
                await self._on_subscribe(p)
            elif isinstance(p, Unsubscribe):
                await self._on_unsubscribe(p)
            elif isinstance(p, Disconnect):
                self._on_disconnect(p)
            elif isinstance(p, Auth):
                raise _Close("protocol error: AUTH without enhanced authentication",
                             RC_PROTOCOL_ERROR)
            else:
                raise _Close(f"protocol error: unexpected {_kind(p).upper()}", RC_PROTOCOL_ERROR)
        await self._flush()

    def _on_disconnect(self, p: Disconnect) -> None:
        expiry = p.properties.session_expiry_interval
        if expiry is not None:
            if self.connect_expiry == 0 and expiry > 0:
                raise _Close("protocol error: session expiry set at DISCONNECT after 0",
                             RC_PROTOCOL_ERROR)
            if self.state is not None and self.state.owner is self:
                self.state.expiry_s = min(expiry, self.settings.mqtt_session_expiry_s)
        raise _Close("client disconnected", None, will=p.reason_code == RC_NORMAL_WITH_WILL,
                     cause="client")

    # -- device publishes -------------------------------------------------------------------------

    async def _ack(self, p: Publish, result: Awaitable[tuple[int, str | None]]) -> None:
        """Queue ``result`` for acknowledgement in arrival order (takes an in-flight slot;
        waiting for one is backpressure, not idleness)."""
        await self.slots.acquire()
        self.acks.put_nowait((p, result))

    @staticmethod
    def _done(code: int, reason: str | None = None) -> asyncio.Future[tuple[int, str | None]]:
        fut: asyncio.Future[tuple[int, str | None]] = \
            asyncio.get_running_loop().create_future()
        fut.set_result((code, reason))
        return fut

    async def _on_publish(self, p: Publish) -> None:
        v5 = self.version == MQTT_5
        if p.qos > 1:
            raise _Close("protocol error: QoS 2 is not supported", RC_QOS_NOT_SUPPORTED)
        if p.retain and v5:
            raise _Close("protocol error: retained messages are not supported",
                         RC_RETAIN_NOT_SUPPORTED)
        if p.properties.topic_alias is not None:
            raise _Close("protocol error: topic aliases are not supported",
                         RC_TOPIC_ALIAS_INVALID)
        target = topics.parse_publish(self.device_id, p.topic)
        if target is None:
            REFUSALS.labels("publish", "not_authorized").inc()
            reason = f"not authorized to publish on {p.topic[:100]!r}"
            if not v5:
                raise _Close(reason, None, cause="not_authorized")
            log.debug("device %s: %s", self.device_id, reason)
            if p.qos:
                await self._ack(p, self._done(RC_NOT_AUTHORIZED, reason))
            return
        if target.kind == "reply":
            code, why = self._on_reply(target.arg, p.payload)
            if p.qos:
                await self._ack(p, self._done(code, why))
            return
        if target.kind == "ota_status":
            code, why = self._on_ota_status(p.payload)
            if p.qos:
                await self._ack(p, self._done(code, why))
            return
        await self.slots.acquire()
        if target.kind == "event":
            # the hot path: validated now, acknowledged by the ack loop once committed
            result: Awaitable[Any] = self._publish_event(target.arg, p)
        else:
            result = asyncio.get_running_loop().create_task(self._process(target, p))
        self.acks.put_nowait((p, result))

    def _publish_event(self, name: str, p: Publish) -> Awaitable[Any]:
        session = self.session
        assert session is not None
        try:
            check_event_name(name)
        except Refused as exc:
            return self._done(RC_TOPIC_NAME_INVALID, exc.reason)
        expiry = p.properties.message_expiry_interval
        try:
            return session.publish_nowait(name, p.payload, ttl=60 if expiry is None else expiry)
        except Refused as exc:
            return self._done(PUBACK_CODES.get(exc.code, RC_IMPLEMENTATION), exc.reason)
        except Exception:
            log.exception("publish of %s on %r failed", self.device_id, p.topic)
            return self._done(RC_IMPLEMENTATION, "internal error")

    async def _process(self, target: topics.PublishTarget, p: Publish) -> tuple[int, str | None]:
        session = self.session
        assert session is not None
        try:
            async with self.control:
                if target.kind == "describe":
                    return await self._describe(session, p.payload)
                return await self._claim(session, p.payload)
        except Refused as exc:
            return PUBACK_CODES.get(exc.code, RC_IMPLEMENTATION), exc.reason
        except Exception:
            log.exception("publish of %s on %r failed", self.device_id, p.topic)
            return RC_IMPLEMENTATION, "internal error"

    async def _describe(self, session: DeviceSession, payload: bytes) -> tuple[int, str | None]:
        try:
            body = json.loads(payload)
        except ValueError:
            return RC_PAYLOAD_INVALID, "describe must be a JSON object"
        if not isinstance(body, dict):
            return RC_PAYLOAD_INVALID, "describe must be a JSON object"
        await session.describe(
            functions=body.get("functions"), variables=body.get("variables"),
            firmware_version=body.get("firmware_version"),
            system_version=body.get("system_version"),
            updates_enabled=body.get("updates_enabled"))
        return 0, None

    async def _claim(self, session: DeviceSession, payload: bytes) -> tuple[int, str | None]:
        try:
            code = payload.decode("utf-8").strip()
        except UnicodeDecodeError:
            return RC_PAYLOAD_INVALID, "the claim code must be text"
        if not code or len(code) > 256:
            return RC_PAYLOAD_INVALID, "the claim code must be 1 to 256 characters"
        if await session.present_claim_code(code):
            return 0, None
        return RC_NOT_AUTHORIZED, "the claim code is unknown, used or expired"

    def _on_reply(self, rid: str, payload: bytes) -> tuple[int, str | None]:
        fut = self.pending.get(rid)
        try:
            body = json.loads(payload)
        except ValueError:
            body = None
        if not isinstance(body, dict):
            if fut is not None and not fut.done():
                fut.set_exception(DeviceError("the device sent a malformed reply"))
            return RC_PAYLOAD_INVALID, "a reply must be a JSON object"
        if fut is not None and not fut.done():
            fut.set_result(body)
        return 0, None

    def _on_ota_status(self, payload: bytes) -> tuple[int, str | None]:
        """``devices/{id}/ota/status``: {"state": "downloading"|"applied"|"failed",
        "reason", "bytes"} for the transfer waiting in :meth:`deliver_firmware`."""
        try:
            body = json.loads(payload)
        except ValueError:
            body = None
        if not isinstance(body, dict) or body.get("state") not in OTA_STATES:
            return RC_PAYLOAD_INVALID, ("ota/status must be a JSON object with a state of "
                                        + ", ".join(OTA_STATES))
        sent = body.get("bytes")
        if sent is not None and (isinstance(sent, bool) or not isinstance(sent, int)
                                 or sent < 0):
            return RC_PAYLOAD_INVALID, "bytes must be a non-negative integer"
        reason = body.get("reason")
        if reason is not None and not isinstance(reason, str):
            return RC_PAYLOAD_INVALID, "reason must be text"
        if self.ota_status is not None:
            self.ota_status.put_nowait({"state": body["state"], "bytes": sent,
                                        "reason": (reason or "")[:300]})
        return 0, None

    async def _ack_loop(self) -> None:
        """Send PUBACKs in arrival order, each once its publish has been handled. Acks
        whose results are ready together go out in one write; nothing else waits for them
        (a PINGRESP is written at once even while an ack waits for its commit)."""
        acks = self.acks
        while True:
            item = await acks.get()
            if item is None:
                return
            p, result = item
            outcome = await self._outcome(result)
            self._corked = []
            try:
                self._acknowledge(p, outcome)
                while not acks.empty():
                    # peek (asyncio.Queue keeps its items in a deque): is the next one ready?
                    nxt = acks._queue[0]  # type: ignore[attr-defined]
                    if nxt is None or not (isinstance(nxt[1], asyncio.Future) and nxt[1].done()):
                        break
                    p, result = acks.get_nowait()  # type: ignore[misc]
                    self._acknowledge(p, await self._outcome(result))
            finally:
                self._uncork()
            await self._flush()

    async def _outcome(self, result: Awaitable[Any]) -> tuple[int, str | None, bool]:
        """(reason code, reason, stored) of a handled publish; frees its in-flight slot."""
        try:
            if isinstance(result, asyncio.Future) and result.done():
                outcome = result.result()
            else:
                outcome = await result
            code, reason = (0, None) if isinstance(outcome, int) else outcome
            return code, reason, True
        except Exception:  # not stored (database failure, shutdown): never acknowledged as ok
            return RC_IMPLEMENTATION, "the event could not be stored", False
        finally:
            self.slots.release()

    def _acknowledge(self, p: Publish, outcome: tuple[int, str | None, bool]) -> None:
        code, reason, stored = outcome
        if code >= 0x80:
            REFUSALS.labels("publish", hex(code)).inc()
        if not p.qos or p.packet_id is None or self.closing:
            return
        if self.version == MQTT_5:
            self._send(Puback(p.packet_id, code, self._reason_props(reason)))
        elif stored:
            self._send(Puback(p.packet_id))
        else:
            # 3.1.1 cannot refuse in a PUBACK: drop the connection, so the device sends the
            # unacknowledged publish again after it reconnects
            self._end("the event could not be stored", cause="store_failed")
            self._abort()

    # -- subscriptions ----------------------------------------------------------------------------

    async def _on_subscribe(self, p: Subscribe) -> None:
        session, state = self.session, self.state
        assert session is not None and state is not None
        v5 = self.version == MQTT_5
        if p.properties.subscription_identifiers:
            raise _Close("protocol error: subscription identifiers are not supported",
                         RC_SUB_IDS_NOT_SUPPORTED)
        codes: list[int] = []
        for sub in p.subscriptions:
            qos = min(sub.qos, 1)
            target = topics.parse_filter(self.device_id, sub.topic_filter)
            if target is None:
                REFUSALS.labels("subscribe", "not_authorized").inc()
                shared = sub.topic_filter.startswith("$share/")
                codes.append((RC_SHARED_NOT_SUPPORTED if shared else RC_NOT_AUTHORIZED)
                             if v5 else RC_UNSPECIFIED)
                continue
            if target.kind == "requests":
                state.requests_qos = qos
            elif target.kind == "ota":
                state.ota_qos = qos
            else:
                try:
                    await session.subscribe(target.arg)
                except Refused:
                    REFUSALS.labels("subscribe", "invalid").inc()
                    codes.append(RC_TOPIC_FILTER_INVALID if v5 else RC_UNSPECIFIED)
                    continue
                state.inbox[target.arg] = qos
            codes.append(qos)
        self._send(Suback(p.packet_id, tuple(codes)))

    async def _on_unsubscribe(self, p: Unsubscribe) -> None:
        session, state = self.session, self.state
        assert session is not None and state is not None
        codes: list[int] = []
        for f in p.topic_filters:
            target = topics.parse_filter(self.device_id, f)
            existed = False
            if target is None:
                codes.append(RC_NOT_AUTHORIZED)
                continue
            if target.kind == "requests":
                existed, state.requests_qos = state.requests_qos is not None, None
            elif target.kind == "ota":
                existed, state.ota_qos = state.ota_qos is not None, None
            else:
                existed = state.inbox.pop(target.arg, None) is not None
                if existed:
                    await session.unsubscribe(target.arg)
            codes.append(0 if existed else RC_NO_SUBSCRIPTION)
        self._send(Unsuback(p.packet_id, tuple(codes) if self.version == MQTT_5 else ()))

    # -- messages to the device -------------------------------------------------------------------

    def _on_puback(self, packet_id: int) -> None:
        state = self.state
        if state is None or state.owner is not self:
            return
        if state.inflight.pop(packet_id, None) is not None:
            self._pump(state)

    def _pump(self, state: SessionState) -> None:
        """Move queued QoS 1 messages into the in-flight window."""
        while state.queued and len(state.inflight) < self.client_receive_max and not self.closing:
            out = state.queued.popleft()
            out.packet_id = state.allocate_id()
            state.inflight[out.packet_id] = out
            self._send(Publish(out.topic, out.payload, 1, packet_id=out.packet_id,
                               properties=out.properties))

    async def _publish_out(self, topic: str, payload: bytes, qos: int, *,
                           properties: Properties = EMPTY, keep: bool = True) -> None:
        if self.closing:
            raise ConnectionError("the connection is closing")
        await self.ready.wait()
        if self.closing:
            raise ConnectionError("the connection is closing")
        state = self.state
        if qos == 0 or state is None:
            self._send(Publish(topic, payload, 0, properties=properties))
        else:
            state.queued.append(Outbound(topic, payload, properties, keep))
            if len(state.queued) > OUTBOUND_QUEUE:
                state.queued.popleft()
                state.dropped += 1
                DROPPED.inc()
            self._pump(state)
        await self._flush()

    async def _request(self, body: dict[str, Any]) -> dict[str, Any]:
        state = self.state
        if self.closing or state is None:
            raise DeviceError("the device is not connected")
        if state.requests_qos is None:
            raise DeviceError("the device does not accept requests")
        rid = secrets.token_hex(8)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self.pending[rid] = fut
        try:
            payload = json.dumps(body, separators=(",", ":")).encode()
            await self._publish_out(topics.request_topic(self.device_id, rid), payload,
                                    state.requests_qos, keep=False)
            return await fut
        except ConnectionError:
            raise DeviceError("the device is not connected") from None
        finally:
            self.pending.pop(rid, None)

    # DeviceLink

    async def call_function(self, name: str, arg: str) -> int:
        reply = await self._request({"kind": "function", "name": name, "arg": arg})
        if "error" in reply:
            raise DeviceError(str(reply["error"])[:200])
        if "return_value" not in reply:
            raise DeviceError("the reply has no return_value")
        value = reply["return_value"]
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                value = int(value, 10)
        return value  # type: ignore[no-any-return]  # the core checks it is an int32

    async def read_variable(self, name: str) -> Any:
        reply = await self._request({"kind": "variable", "name": name})
        if "error" in reply:
            raise DeviceError(str(reply["error"])[:200])
        if "result" not in reply:
            raise DeviceError("the reply has no result")
        return reply["result"]

    async def deliver_event(self, name: str, data: str | None, *, published_at: str,
                            ttl: int, coreid: str) -> None:
        state = self.state
        if state is None or self.closing:
            return
        if "+" in name or "#" in name:  # cannot be a topic name
            DROPPED.inc()
            return
        qos = max((q for p, q in state.inbox.items() if contract.name_matches(p, name)),
                  default=0)
        props = EMPTY
        if self.version == MQTT_5:
            props = Properties(user_properties=(("coreid", coreid),
                                                ("published_at", published_at)))
        await self._publish_out(topics.inbox_topic(self.device_id, name),
                                (data or "").encode("utf-8"), qos, properties=props)

    async def request_describe(self) -> None:
        state = self.state
        if state is None or state.requests_qos is None or self.closing:
            return
        rid = secrets.token_hex(8)
        await self._publish_out(topics.request_topic(self.device_id, rid), b'{"kind":"describe"}',
                                state.requests_qos, keep=False)

    async def deliver_firmware(self, image: FirmwareImage, *,
                               progress: FirmwareProgress | None = None) -> TransferResult:
        """Offer ``image`` on ``devices/{id}/ota/offer``; the device downloads it over HTTP
        and reports on ``ota/status`` until ``applied`` or ``failed``."""
        state = self.state
        if self.closing or state is None:
            return TransferResult(False, "the device is not connected", dropped=True)
        if state.ota_qos is None:
            return TransferResult(False, "The device does not take firmware updates (it is "
                                  "not subscribed to its ota/# topics)", retry=False)
        if self.ota_status is not None:
            return TransferResult(False, "another transfer is in progress")
        offer = {"version": image.version, "size": image.size, "sha256": image.sha256,
                 "signature": image.signature, "key_id": image.key_id, "url": image.url,
                 "chunk_size": image.chunk_size, "public_keys": list(image.public_keys)}
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.ota_status = queue
        sent = 0
        try:
            await self._publish_out(topics.ota_topic(self.device_id, "offer"),
                                    json.dumps(offer, separators=(",", ":")).encode(),
                                    state.ota_qos, keep=False)
            quiet = self.settings.firmware_transfer_timeout_s
            while True:
                getter = asyncio.ensure_future(queue.get())
                ended = asyncio.ensure_future(self.done.wait())
                try:
                    await asyncio.wait([getter, ended], timeout=quiet,
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    ended.cancel()
                    if not getter.done():
                        getter.cancel()
                if not getter.done() or getter.cancelled():
                    if self.closing or self.done.is_set():
                        return TransferResult(False, "the device disconnected during the "
                                              "transfer", sent, dropped=True)
                    return TransferResult(False, f"the device reported nothing for {quiet:g} s",
                                          sent)
                report = getter.result()
                if report["bytes"] is not None:
                    sent = max(sent, min(int(report["bytes"]), image.size))
                if report["state"] == "downloading":
                    if progress is not None:
                        progress(sent, image.size)
                elif report["state"] == "applied":
                    return TransferResult(True, "applied", image.size)
                else:
                    return TransferResult(False, report["reason"] or "the device reported "
                                          "a failure", sent)
        except ConnectionError:
            return TransferResult(False, "the device disconnected during the transfer", sent,
                                  dropped=True)
        finally:
            self.ota_status = None

    async def update_notice(self, kind: UpdateNotice, value: bool) -> None:
        """``devices/{id}/ota/pending`` ``{"pending": true}`` or ``.../ota/forced``."""
        state = self.state
        if state is None or state.ota_qos is None or self.closing:
            return
        body = json.dumps({kind: value}).encode()
        with contextlib.suppress(ConnectionError):
            await self._publish_out(topics.ota_topic(self.device_id, kind), body,
                                    state.ota_qos, keep=False)

    async def disconnect(self, reason: str) -> None:
        self.kicked = True
        lowered = reason.lower()
        taken_over = "replaced" in lowered
        self._end(reason, cause="taken_over" if taken_over else "kicked")
        if self.connack_sent and self.version == MQTT_5:
            code = (RC_SESSION_TAKEN_OVER if taken_over
                    else RC_SHUTTING_DOWN if "shutting down" in lowered else RC_ADMINISTRATIVE)
            self._send(Disconnect(code, self._reason_props(reason)))
        self._close_transport()


# --- the server and its listeners ---------------------------------------------------------------

class MqttListener:
    """One listening socket (plain or TLS). ``port`` is the bound port."""

    def __init__(self, server: MqttServer, name: str) -> None:
        self.server = server
        self.name = name
        self.tls = name == "tls"
        self.connections: set[Connection] = set()
        self.port = 0
        self.host = ""
        self._server: asyncio.Server | None = None

    async def _start(self, host: str, port: int) -> None:
        tls = self.server.tls_contexts() if self.tls else None
        self._server = await asyncio.start_server(
            self._on_client, host, port, ssl=tls.base if tls else None,
            ssl_handshake_timeout=self.server.settings.mqtt_connect_timeout_s if tls else None,
            limit=READ_SIZE, reuse_address=True,
            backlog=self.server.settings.device_listen_backlog)
        sock = self._server.sockets[0].getsockname()
        self.host, self.port = sock[0], sock[1]
        log.info("MQTT%s listening on %s:%d", "/TLS" if self.tls else "", self.host, self.port)

    async def _on_client(self, reader: asyncio.StreamReader,
                         writer: asyncio.StreamWriter) -> None:
        writer.transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
        await Connection(self.server, self, reader, writer).run()

    async def stop(self) -> None:
        """Stop accepting, end this listener's connections (reason: shutdown)."""
        if self._server is None:
            return
        srv, self._server = self._server, None
        await close_server(srv, self.connections)
        await self.server._detach(self)


class MqttServer:
    """The MQTT gateway of one node: listeners, connections and kept session state."""

    def __init__(self, hub: SessionHub, settings: Settings) -> None:
        self.hub = hub
        self.settings = settings
        self.connections: set[Connection] = set()
        self.sessions: dict[str, SessionState] = {}
        self.listeners: list[MqttListener] = []
        self.drain_timeout_s = 10.0  # a device that reads nothing for this long is dropped
        self._tls: TlsContexts | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def listen(self, host: str, port: int, *, tls: bool = False) -> MqttListener:
        """Open a listener (``port=0``: any free port; see ``.port``)."""
        if tls and self._tls is None:
            self._tls = TlsContexts(self.settings, self.hub)
            await self._tls.refresh()
            self._every(TLS_REFRESH_S, self._tls.refresh, "mqtt-tls-refresh")
        if not self._tasks or all(t.get_name() != "mqtt-sweep" for t in self._tasks):
            self._every(SWEEP_S, self._sweep, "mqtt-sweep")
        listener = MqttListener(self, "tls" if tls else "plain")
        await listener._start(host, port)
        self.listeners.append(listener)
        return listener

    def tls_contexts(self) -> TlsContexts:
        assert self._tls is not None
        return self._tls

    async def refresh_tls(self) -> bool:
        """Reload the product CAs now (also done every few seconds)."""
        return await self._tls.refresh() if self._tls is not None else False

    def _every(self, seconds: float, fn: Callable[[], Awaitable[Any]], name: str) -> None:
        async def loop() -> None:
            while True:
                await asyncio.sleep(seconds)
                try:
                    await fn()
                except Exception:
                    log.exception("%s failed", name)

        self._tasks.append(asyncio.get_running_loop().create_task(loop(), name=name))

    async def _detach(self, listener: MqttListener) -> None:
        if listener in self.listeners:
            self.listeners.remove(listener)
        if not self.listeners:
            for t in self._tasks:
                t.cancel()
            for t in self._tasks:
                with contextlib.suppress(asyncio.CancelledError):
                    await t
            self._tasks.clear()

    async def stop(self) -> None:
        for listener in list(self.listeners):
            await listener.stop()

    # -- session state --------------------------------------------------------------------------

    def claim_state(self, conn: Connection, *, clean: bool,
                    expiry_s: int) -> tuple[SessionState, bool]:
        """The MQTT session state for a new connection, and whether it was resumed."""
        device_id = conn.device_id
        state = self.sessions.get(device_id)
        if state is not None and state.owner is None and state.expires_at <= time.monotonic():
            state = None
        present = state is not None and not clean
        if state is None or clean:
            state = SessionState(device_id)
        assert state is not None
        state.owner = conn
        state.expiry_s = expiry_s
        self.sessions[device_id] = state
        conn.state = state
        return state, present

    def release_state(self, conn: Connection) -> None:
        """The connection ended: keep its state for the expiry interval, or forget it."""
        state = conn.state
        if state is None or state.owner is not conn:
            return
        state.owner = None
        for pid, out in list(state.inflight.items()):
            if not out.keep:
                del state.inflight[pid]
        state.queued = deque(o for o in state.queued if o.keep)
        if state.expiry_s > 0:
            state.expires_at = time.monotonic() + state.expiry_s
        elif self.sessions.get(state.device_id) is state:
            del self.sessions[state.device_id]

    async def _sweep(self) -> None:
        now = time.monotonic()
        for device_id, state in list(self.sessions.items()):
            if state.owner is None and state.expires_at <= now:
                del self.sessions[device_id]


async def start_mqtt_listeners(hub: SessionHub, settings: Settings, *,
                               host: str | None = None) -> list[MqttListener]:
    """Open the listeners the settings ask for: plain on ``mqtt_port`` and TLS on
    ``mqtt_tls_port`` (0 turns one off). They share one :class:`MqttServer`."""
    server = MqttServer(hub, settings)
    bind = host or settings.host
    listeners: list[MqttListener] = []
    try:
        if settings.mqtt_port:
            listeners.append(await server.listen(bind, settings.mqtt_port))
        if settings.mqtt_tls_port:
            listeners.append(await server.listen(bind, settings.mqtt_tls_port, tls=True))
    except BaseException:
        await server.stop()
        raise
    return listeners


__all__ = ["Connection", "MqttListener", "MqttServer", "SessionState", "start_mqtt_listeners"]
