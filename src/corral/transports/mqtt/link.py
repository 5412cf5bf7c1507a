"""The writing half of an MQTT device connection, and the session core's link to the device.

:class:`MqttLink` sends packets (corked into one write where many go out together, with
backpressure: a device that does not read is dropped), keeps the QoS 1 window of the
device's kept session state (:class:`SessionState`), and implements
:class:`~corral.sessions.link.DeviceLink`: function calls and variable reads as requests,
event deliveries, firmware offers, update notices and the server-side disconnect.
:class:`~corral.transports.mqtt.connection.Connection` adds the reading half.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

from corral.sessions import contract
from corral.sessions.link import (
    DeviceError,
    FirmwareImage,
    FirmwareProgress,
    TransferResult,
    UpdateNotice,
)
from corral.sessions.session import DeviceSession
from corral.settings import Settings
from corral.transports.mqtt import topics
from corral.transports.mqtt.codec import MQTT_5, MQTT_311, Disconnect, Packet, Publish, encode
from corral.transports.mqtt.metrics import DROPPED, SENT, packet_kind
from corral.transports.mqtt.properties import EMPTY, Properties
from corral.transports.mqtt.reasons import (
    RC_ADMINISTRATIVE,
    RC_SESSION_TAKEN_OVER,
    RC_SHUTTING_DOWN,
)

OUTBOUND_INFLIGHT: Final = 32  # unacknowledged QoS 1 messages to a device
OUTBOUND_QUEUE: Final = 1000  # further QoS 1 messages waiting for the window (oldest dropped)
WRITE_BUFFER_HIGH: Final = 256 * 1024  # above this, writers wait for the device to read


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
    ledgers_qos: int | None = None
    inbox: dict[str, int] = field(default_factory=dict)  # prefix -> granted QoS
    inflight: dict[int, Outbound] = field(default_factory=dict)
    queued: deque[Outbound] = field(default_factory=deque)
    next_id: int = 0
    owner: MqttLink | None = None
    expires_at: float = 0.0
    dropped: int = 0

    def allocate_id(self) -> int:
        while True:
            self.next_id = self.next_id % 0xFFFF + 1
            if self.next_id not in self.inflight:
                return self.next_id


# --- the writing half ---------------------------------------------------------------------------

class MqttLink:
    """Writes to one connected device; the session core's link to it."""

    transport = "mqtt"

    def __init__(self, settings: Settings, writer: asyncio.StreamWriter,
                 drain_timeout_s: Callable[[], float]) -> None:
        self.settings = settings
        self.writer = writer
        self._drain_timeout_s = drain_timeout_s  # the server's, read when a write waits
        self.version = MQTT_311
        self.device_id = ""
        self.session: DeviceSession | None = None
        self.state: SessionState | None = None
        self.client_max_packet: int | None = None
        self.client_receive_max = OUTBOUND_INFLIGHT
        self.problem_info = True
        self.closing = False  # nothing more is written
        self.kicked = False  # the hub ends the core session (it called disconnect)
        self.end_reason: str | None = None
        self.end_cause = "lost"
        self.send_will = False
        self.connack_sent = False
        self.ready = asyncio.Event()  # CONNACK sent, or the connection is closing
        self.pending: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._corked: list[bytes] | None = None  # packets gathered for one write
        # firmware: the device's ota/status reports while a transfer waits for them
        self.ota_status: asyncio.Queue[dict[str, Any]] | None = None
        self.done = asyncio.Event()

    # -- lifecycle ------------------------------------------------------------------------------

    def _end(self, reason: str, *, will: bool = False, cause: str = "lost") -> None:
        """Record why the connection ends (the first reason wins)."""
        if self.end_reason is None:
            self.end_reason, self.send_will, self.end_cause = reason, will, cause

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
        SENT[packet_kind(packet)].inc()
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
            async with asyncio.timeout(self._drain_timeout_s()):
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

    async def request_vitals(self) -> None:
        state = self.state
        if state is None or state.requests_qos is None or self.closing:
            return
        rid = secrets.token_hex(8)
        await self._publish_out(topics.request_topic(self.device_id, rid),
                                b'{"kind":"diagnostics"}', state.requests_qos, keep=False)

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

    async def deliver_ledger(self, name: str, document: dict[str, Any]) -> bool:
        """``devices/{id}/ledgers/{name}``: a cloud-to-device ledger's document. False when
        the device does not take ledgers (not subscribed) or is gone."""
        state = self.state
        if state is None or state.ledgers_qos is None or self.closing:
            return False
        body = json.dumps(document, separators=(",", ":")).encode()
        try:
            await self._publish_out(topics.ledger_topic(self.device_id, name), body,
                                    state.ledgers_qos, keep=True)
        except ConnectionError:
            return False
        return True

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
