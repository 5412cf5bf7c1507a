"""One MQTT device connection, its reading half (the writing half is :mod:`.link`).

A connection authenticates (MQTT secret, or a TLS client certificate from a product CA), opens
a :class:`~corral.sessions.session.DeviceSession` and translates packets to session calls; the
connection itself is the session's :class:`~corral.sessions.link.DeviceLink`.

Per connection, one task reads and dispatches packets in order. Device publishes run as
tasks started in arrival order (so the event writer batches their commits) and are
acknowledged in that same order by an acker task, each PUBACK only after its commit. At
most ``RECEIVE_MAXIMUM`` publishes are in flight; beyond that the reader stops reading
(backpressure), without counting that wait against the keep-alive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable
from typing import Any, Final, Protocol, cast

from cryptography import x509

from corral.kit.text import bounded_loads
from corral.sessions.core import SessionHub
from corral.sessions.link import (
    DeviceError,
    Hello,
    Refused,
    check_event_name,
)
from corral.sessions.session import DeviceSession
from corral.settings import Settings
from corral.transports.mqtt import topics
from corral.transports.mqtt.codec import (
    MQTT_5,
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
)
from corral.transports.mqtt.link import OUTBOUND_INFLIGHT, MqttLink, SessionState
from corral.transports.mqtt.metrics import (
    CLOSES,
    CONNECTIONS,
    CONNECTS,
    RECEIVED,
    REFUSALS,
    SESSIONS,
    packet_kind,
)
from corral.transports.mqtt.properties import (
    EMPTY,
    UNSUPPORTED_PROTOCOL_VERSION,
    Properties,
    ProtocolError,
)
from corral.transports.mqtt.reasons import (
    PUBACK_CODES,
    RC_BAD_AUTH_METHOD,
    RC_BAD_CREDENTIALS,
    RC_CLIENT_ID_INVALID,
    RC_IMPLEMENTATION,
    RC_KEEP_ALIVE_TIMEOUT,
    RC_NO_SUBSCRIPTION,
    RC_NORMAL_WITH_WILL,
    RC_NOT_AUTHORIZED,
    RC_PAYLOAD_INVALID,
    RC_PROTOCOL_ERROR,
    RC_QOS_NOT_SUPPORTED,
    RC_RETAIN_NOT_SUPPORTED,
    RC_SERVER_BUSY,
    RC_SERVER_UNAVAILABLE,
    RC_SHARED_NOT_SUPPORTED,
    RC_SHUTTING_DOWN,
    RC_SUB_IDS_NOT_SUPPORTED,
    RC_TOPIC_ALIAS_INVALID,
    RC_TOPIC_FILTER_INVALID,
    RC_TOPIC_NAME_INVALID,
    RC_UNSPECIFIED,
    V3_BAD_CREDENTIALS,
    V3_IDENTIFIER_REJECTED,
    V3_NOT_AUTHORIZED,
    V3_SERVER_UNAVAILABLE,
)

log = logging.getLogger("corral.mqtt")

RECEIVE_MAXIMUM: Final = 64  # device publishes in flight per connection (advertised in v5)
READ_SIZE: Final = 65_536
OTA_STATES: Final = ("downloading", "applied", "failed")


class _Close(Exception):
    """End the connection: ``code`` is the v5 DISCONNECT reason (None: no DISCONNECT)."""

    def __init__(self, reason: str, code: int | None = None, *, will: bool = True,
                 cause: str = "protocol") -> None:
        super().__init__(reason)
        self.reason, self.code, self.will, self.cause = reason, code, will, cause


# --- one connection ---------------------------------------------------------------------------

class Gateway(Protocol):
    """What a connection needs of its node's MQTT server (:class:`~.server.MqttServer`)."""

    @property
    def hub(self) -> SessionHub: ...
    @property
    def settings(self) -> Settings: ...
    @property
    def drain_timeout_s(self) -> float: ...
    @property
    def connections(self) -> set[Connection]: ...

    def claim_state(self, conn: Connection, *, clean: bool,
                    expiry_s: int) -> tuple[SessionState, bool]: ...

    def release_state(self, conn: Connection) -> None: ...


class Listening(Protocol):
    """What a connection needs of the listener that accepted it."""

    @property
    def name(self) -> str: ...
    @property
    def connections(self) -> set[Connection]: ...


class Connection(MqttLink):
    """One device connection: reads and dispatches its packets (CONNECT, publishes,
    subscriptions); :class:`MqttLink` writes to it."""

    def __init__(self, server: Gateway, listener: Listening,
                 reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        super().__init__(server.settings, writer, lambda: server.drain_timeout_s)
        self.server = server
        self.listener = listener
        self.hub = server.hub
        self.reader = reader
        peer = writer.get_extra_info("peername")
        self.peer_ip: str | None = peer[0] if isinstance(peer, tuple) and peer else None
        self.decoder = Decoder(max_packet_size=server.settings.mqtt_max_packet_bytes)
        self.keepalive = server.settings.mqtt_max_keepalive_s
        self.will: tuple[str, bytes, int] | None = None  # event name, data, ttl
        self.connect_expiry = 0  # the session expiry the CONNECT asked for (v5)
        # publishes waiting for their acknowledgement, in arrival order; the awaitable gives
        # an event id (stored: success) or a (reason code, reason) pair
        self.acks: asyncio.Queue[tuple[Publish, Awaitable[Any]] | None] = asyncio.Queue()
        self.slots = asyncio.Semaphore(RECEIVE_MAXIMUM)
        self.acker: asyncio.Task[None] | None = None
        self.control = asyncio.Lock()  # describe and claim run one at a time, in order
        self.task: asyncio.Task[None] | None = None

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
                        RECEIVED["connect"].inc()
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
        if state.ledgers_qos is not None:
            session.ledgers_wanted()
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
            RECEIVED[packet_kind(p)].inc()
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
                raise _Close(f"protocol error: unexpected {packet_kind(p).upper()}", RC_PROTOCOL_ERROR)
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
        if target.kind in ("ledger_applied", "ledger_set", "ledger_sync"):
            ledger = asyncio.get_running_loop().create_task(self._ledger(target, p.payload))
            self.acks.put_nowait((p, ledger))
            return
        if target.kind == "event":
            # the hot path: validated now, acknowledged by the ack loop once committed
            result: Awaitable[Any] = self._publish_event(target.arg, p)
        elif target.kind == "diagnostics":
            result = asyncio.get_running_loop().create_task(self._vitals(p.payload))
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

    async def _ledger(self, target: topics.PublishTarget,
                      payload: bytes) -> tuple[int, str | None]:
        """``devices/{id}/ledgers/...``: a sync, an acknowledgement or a device's write
        (acknowledged once handled; a write once committed)."""
        session = self.session
        assert session is not None
        try:
            if target.kind == "ledger_sync":
                await session.ledger_sync(payload)
            elif target.kind == "ledger_applied":
                await session.ledger_applied(target.arg, payload)
            else:
                await session.ledger_set(target.arg, payload)
        except Refused as exc:
            return PUBACK_CODES.get(exc.code, RC_IMPLEMENTATION), exc.reason
        except Exception:
            log.exception("ledger message of %s on %s not handled", self.device_id, target)
            return RC_IMPLEMENTATION, "internal error"
        return 0, None

    async def _vitals(self, payload: bytes) -> tuple[int, str | None]:
        """``devices/{id}/diagnostics``: the device's vitals (acknowledged once stored)."""
        session = self.session
        assert session is not None
        try:
            await session.vitals(payload)
        except Refused as exc:
            return PUBACK_CODES.get(exc.code, RC_IMPLEMENTATION), exc.reason
        except Exception:
            log.exception("vitals of %s not stored", self.device_id)
            return RC_IMPLEMENTATION, "internal error"
        return 0, None

    async def _describe(self, session: DeviceSession, payload: bytes) -> tuple[int, str | None]:
        try:
            body = bounded_loads(payload)
        except ValueError:
            return RC_PAYLOAD_INVALID, "describe must be a JSON object"
        if not isinstance(body, dict):
            return RC_PAYLOAD_INVALID, "describe must be a JSON object"
        await session.describe(
            functions=body.get("functions"), variables=body.get("variables"),
            firmware_version=body.get("firmware_version"),
            system_version=body.get("system_version"),
            updates_enabled=body.get("updates_enabled"), iccid=body.get("iccid"),
            cellular=body.get("cellular"))
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
            body = bounded_loads(payload)
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
            body = bounded_loads(payload)
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
            elif target.kind == "ledgers":
                state.ledgers_qos = qos
                session.ledgers_wanted()
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
            elif target.kind == "ledgers":
                existed, state.ledgers_qos = state.ledgers_qos is not None, None
            else:
                existed = state.inbox.pop(target.arg, None) is not None
                if existed:
                    await session.unsubscribe(target.arg)
            codes.append(0 if existed else RC_NO_SUBSCRIPTION)
        self._send(Unsuback(p.packet_id, tuple(codes) if self.version == MQTT_5 else ()))
