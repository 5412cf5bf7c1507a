"""``Device``: a corral device over MQTT (3.1.1 or 5), on asyncio streams.

Built on corral's sans-IO MQTT codec, so thousands of devices can share one event loop
(the fleet simulator does). The topics are the device contract in ``docs/mqtt.md``:

* ``devices/{id}/events/{name}``: :meth:`Device.publish`
* ``devices/{id}/describe``: sent after every connect and whenever functions, variables or
  describe facts change
* ``devices/{id}/requests/+`` -> ``devices/{id}/replies/{request_id}``: function calls and
  variable reads are answered by the registered handlers
* ``devices/{id}/inbox/{prefix}``: :meth:`Device.subscribe` (Particle-style name prefixes)
* ``devices/{id}/ota/#``: :meth:`Device.on_ota`
* ``devices/{id}/ledgers/#``: :meth:`Device.ledger` (:mod:`corral.device.ledgers`)
* ``devices/{id}/claim``: :meth:`Device.claim`

Handlers may be plain functions or coroutine functions. Plain ones run on the event loop,
so they must be quick; put slow work in ``async def`` handlers.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import random
import re
import ssl
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, Final, TypeAlias, TypeVar, cast

from corral.device.backoff import Backoff
from corral.device.connection import Connection, Dial, open_connection
from corral.device.errors import (
    ConnectError,
    NotConnected,
    PublishRefused,
    SubscribeRefused,
    reason_name,
)
from corral.device.ledgers import Ledger, LedgerBook
from corral.device.members import (
    INT32,
    MAX_MEMBERS,
    VARIABLE_TYPES,
    VariableType,
    check_event_name,
    check_member,
    variable_value,
)
from corral.transports.mqtt.codec import Disconnect, Packet, Puback, Publish
from corral.transports.mqtt.properties import EMPTY, Properties, ProtocolError

FIRST_VITALS_WITHIN_S = 300.0

log = logging.getLogger("corral.device")

FunctionHandler: TypeAlias = Callable[[str], int | Awaitable[int]]
VariableGetter: TypeAlias = Callable[[], Any]
EventHandler: TypeAlias = Callable[[str, str], Awaitable[None] | None]
OtaHandler: TypeAlias = Callable[[str, bytes], Awaitable[None] | None]
ConnectHandler: TypeAlias = Callable[[], Awaitable[None] | None]
DisconnectHandler: TypeAlias = Callable[[str], Awaitable[None] | None]
F = TypeVar("F", bound=Callable[..., Any])

DEVICE_ID_RE: Final = re.compile(r"^[0-9a-fA-F]{24}$")
STABLE_AFTER_S: Final = 10.0  # a connection this old counts as a success: backoff resets


def _utf8(payload: bytes) -> str:
    return payload.decode("utf-8", errors="replace")


async def _call(fn: Callable[..., Any], *args: Any) -> Any:
    """Call a sync or async handler."""
    result = fn(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


class Device:
    """A device connected to corral over MQTT. See the module docstring and
    ``docs/device-sdk.md``.

    ``secret`` is the device's MQTT secret; leave it out when ``client_cert`` (a PEM file,
    or a ``(cert, key)`` pair of files) authenticates the device over TLS. ``tls`` is the
    :class:`ssl.SSLContext` to connect with (``client_cert`` is loaded into it; without
    ``tls`` a default context is made for a client certificate). ``protocol`` is the MQTT
    protocol level: 5 (MQTT 5) or 4 (3.1.1). ``connect_limit`` is a semaphore shared by
    many devices to bound how many connect at the same moment.
    """

    def __init__(
        self,
        device_id: str,
        secret: str | None = None,
        host: str = "127.0.0.1",
        port: int = 1883,
        *,
        tls: ssl.SSLContext | None = None,
        client_cert: str | os.PathLike[str] | tuple[str | os.PathLike[str],
                                                    str | os.PathLike[str]] | None = None,
        server_hostname: str | None = None,
        protocol: int = 5,
        keepalive: int = 60,
        clean_session: bool = True,
        session_expiry: int = 3600,
        connect_timeout: float = 10.0,
        ack_timeout: float = 30.0,
        ping_timeout: float | None = None,
        reconnect_initial: float = 1.0,
        reconnect_max: float = 60.0,
        max_packet_size: int = 262_144,
        subscription_qos: int = 1,
        connect_limit: asyncio.Semaphore | None = None,
        ledger_store: str | os.PathLike[str] | None = None,
    ) -> None:
        if not isinstance(device_id, str) or not DEVICE_ID_RE.fullmatch(device_id):
            raise ValueError(f"a device ID is 24 hexadecimal characters, not {device_id!r}")
        if protocol not in (4, 5):
            raise ValueError("protocol is 5 (MQTT 5) or 4 (MQTT 3.1.1)")
        if not 0 <= keepalive <= 0xFFFF:
            raise ValueError("keepalive is 0 to 65535 seconds")
        if subscription_qos not in (0, 1):
            raise ValueError("subscription_qos is 0 or 1")
        if secret is None and client_cert is None:
            raise ValueError("give the device's MQTT secret or a client certificate")
        self.device_id = device_id.lower()
        self.secret = secret
        self.host = host
        self.port = port
        if client_cert is not None:
            tls = tls or ssl.create_default_context()
            if isinstance(client_cert, tuple):
                tls.load_cert_chain(client_cert[0], client_cert[1])
            else:
                tls.load_cert_chain(client_cert)
        self.tls = tls
        self.server_hostname = server_hostname
        self.protocol = protocol
        self.keepalive = keepalive
        self.clean_session = clean_session
        self.session_expiry = session_expiry
        self.connect_timeout = connect_timeout
        self.ack_timeout = ack_timeout
        self.ping_timeout = ping_timeout
        self.max_packet_size = max_packet_size
        self.subscription_qos = subscription_qos
        self.backoff = Backoff(reconnect_initial, reconnect_max)
        self._connect_limit = connect_limit

        self._functions: dict[str, FunctionHandler] = {}
        self._variables: dict[str, tuple[VariableType, VariableGetter]] = {}
        self._subscriptions: dict[str, list[EventHandler]] = {}
        self._ota: OtaHandler | None = None
        self._ledgers = LedgerBook(self._send_ledger, ledger_store)
        self._facts: dict[str, Any] = {}
        self._vitals: Callable[[], Any] | None = None
        self._vitals_every: float | None = None
        self._on_connect: list[ConnectHandler] = []
        self._on_disconnect: list[DisconnectHandler] = []

        self._conn: Connection | None = None
        self._connect_lock = asyncio.Lock()
        self._closing = False
        self._stop: asyncio.Event | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self._ready = asyncio.Event()  # set while a connection is up and set up
        self.session_present = False  # from the last CONNACK
        self.connects = 0  # successful connections so far
        self.last_disconnect_reason: str | None = None

    def __repr__(self) -> str:
        state = "connected" if self.connected else "disconnected"
        return f"<Device {self.device_id} {self.host}:{self.port} {state}>"

    # --- what the device offers -------------------------------------------------------------

    def function(self, name: str) -> Callable[[F], F]:
        """Register a cloud-callable function (decorator): ``handler(arg: str) -> int``."""
        check_member(name, "Function")

        def register(handler: F) -> F:
            if name not in self._functions and len(self._functions) >= MAX_MEMBERS:
                raise ValueError(f"at most {MAX_MEMBERS} functions")
            self._functions[name] = handler
            self._changed()
            return handler

        return register

    def variable(self, name: str, vtype: VariableType | type, getter: VariableGetter) -> None:
        """Register a cloud-readable variable of type ``bool``, ``int32``, ``double`` or
        ``string`` (or the Python types ``bool``, ``int``, ``float``, ``str``); ``getter()``
        (sync or async) returns its current value."""
        check_member(name, "Variable")
        t = VARIABLE_TYPES.get(vtype.lower() if isinstance(vtype, str) else vtype)
        if t is None:
            raise ValueError(f"variable type must be bool, int32, double or string, not {vtype!r}")
        if name not in self._variables and len(self._variables) >= MAX_MEMBERS:
            raise ValueError(f"at most {MAX_MEMBERS} variables")
        self._variables[name] = (t, getter)
        self._changed()

    def describe(self, *, firmware_version: int | None = None,
                 system_version: str | None = None, updates_enabled: bool | None = None,
                 iccid: str | None = None, cellular: bool | None = None,
                 **extra: Any) -> None:
        """Facts sent with the describe message besides functions and variables. A cellular
        device gives its SIM's ``iccid`` (or ``cellular=True`` without one): its traffic
        then counts towards the plan's cellular data."""
        facts = {"firmware_version": firmware_version, "system_version": system_version,
                 "updates_enabled": updates_enabled, "iccid": iccid, "cellular": cellular,
                 **extra}
        for key, value in facts.items():
            if key in ("functions", "variables"):
                raise ValueError(f"{key} are described from the registered handlers")
            if value is not None:
                self._facts[key] = value
        self._changed()

    def describe_payload(self) -> dict[str, Any]:
        """The JSON this device sends on ``devices/{id}/describe``."""
        return {"functions": list(self._functions),
                "variables": {name: t for name, (t, _g) in self._variables.items()},
                **self._facts}

    def subscribe(self, prefix: str, handler: EventHandler) -> None:
        """Call ``handler(name, data)`` for every event in the device's scope whose name
        starts with ``prefix`` (``""``: all events), as Particle's ``subscribe`` does."""
        if not isinstance(prefix, str) or len(prefix) > 64 or "+" in prefix or "#" in prefix \
                or (prefix and not prefix.isprintable()):
            raise ValueError(f"a prefix is at most 64 printable characters without + or #: "
                             f"{prefix!r}")
        new = prefix not in self._subscriptions
        self._subscriptions.setdefault(prefix, []).append(handler)
        conn = self._conn
        if new and conn is not None and not conn.done.is_set():
            self._in_background(self._subscribe(conn, [self._inbox_filter(prefix)]),
                                f"subscribe {prefix!r}")

    def unsubscribe(self, prefix: str) -> None:
        """Stop receiving the events of ``prefix`` (all its handlers)."""
        if self._subscriptions.pop(prefix, None) is None:
            return
        conn = self._conn
        if conn is not None and not conn.done.is_set():
            self._in_background(conn.unsubscribe(self._inbox_filter(prefix)),
                                f"unsubscribe {prefix!r}")

    def on_ota(self, handler: OtaHandler) -> OtaHandler:
        """Receive firmware-update messages: ``handler(subtopic, payload)`` for each message on
        ``devices/{id}/ota/{subtopic}`` (reserved by the contract for firmware updates)."""
        self._ota = handler
        conn = self._conn
        if conn is not None and not conn.done.is_set():
            self._in_background(self._subscribe(conn, [self._topic("ota/#")]), "subscribe ota")
        return handler

    def ledger(self, name: str) -> Ledger:
        """The ledger ``name`` (Particle's ``Particle.ledger``): its document as the cloud
        last sent it (``get()``, ``on_change``, ``wait``), or this device's own
        device-to-cloud document (``set``). ``ledger_store`` (a file) keeps the documents
        across restarts."""
        first = not self._ledgers.wanted
        led = self._ledgers.ledger(name)
        conn = self._conn
        if first and conn is not None and self.connected:
            self._in_background(self._sync_ledgers(conn, subscribe=True), "ledgers")
        return led

    def on_ledger(self, handler: Callable[[Ledger], Any]) -> Callable[[Ledger], Any]:
        """Call ``handler(ledger)`` for every cloud-to-device ledger the cloud sends a new
        version of, whatever its name (the device takes ledgers from now on)."""
        first = not self._ledgers.wanted
        self._ledgers.wanted = True
        self._ledgers.listeners.append(handler)
        conn = self._conn
        if first and conn is not None and self.connected:
            self._in_background(self._sync_ledgers(conn, subscribe=True), "ledgers")
        return handler

    def on_connect(self, handler: ConnectHandler) -> ConnectHandler:
        """Call ``handler()`` after each successful connect (subscriptions and describe done)."""
        self._on_connect.append(handler)
        return handler

    def on_disconnect(self, handler: DisconnectHandler) -> DisconnectHandler:
        """Call ``handler(reason)`` each time an established connection ends."""
        self._on_disconnect.append(handler)
        return handler

    # --- connection ---------------------------------------------------------------------------

    @property
    def connected(self) -> bool:
        conn = self._conn
        return conn is not None and not conn.done.is_set()

    async def connect(self) -> None:
        """Make one connection attempt: connect, subscribe, describe. Returns once the
        device is ready; raises :class:`ConnectError` when refused or unreachable."""
        async with self._connect_lock:
            if self.connected:
                return
            self._closing = False
            limit = self._connect_limit or contextlib.nullcontext()
            async with limit:
                conn = await self._open()
            try:
                async with asyncio.timeout(self.connect_timeout):
                    await self._setup(conn)
            except (NotConnected, TimeoutError, OSError, SubscribeRefused) as exc:
                conn.lose(f"set-up failed: {exc!r}")
                await self._wait_finished(conn)
                raise ConnectError(f"connection set-up failed: {exc!r}") from exc
            if self._closing:  # close() was called meanwhile: it wins
                await self._disconnect(conn)
                raise ConnectError("closed while connecting")
            conn.ready = True
            self._ready.set()
            self.connects += 1
        for handler in list(self._on_connect):
            try:
                await _call(handler)
            except Exception:
                log.exception("device %s: on_connect handler failed", self.device_id)

    async def run_forever(self) -> None:
        """Stay connected until :meth:`close`: connect, and reconnect whenever the connection
        ends, after a delay that grows exponentially (with jitter, capped at
        ``reconnect_max``) and resets once a connection has lasted ``STABLE_AFTER_S``.
        Raises :class:`ConnectError` for a permanent refusal (a wrong secret, say)."""
        self._closing = False
        self._stop = stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        try:
            while not stop.is_set():
                if not self.connected:
                    try:
                        await self.connect()
                    except ConnectError as exc:
                        if exc.permanent:
                            raise
                        delay = self.backoff.next()
                        log.info("device %s: %s; retrying in %.1f s", self.device_id, exc, delay)
                        with contextlib.suppress(TimeoutError):
                            await asyncio.wait_for(stop.wait(), delay)
                        continue
                conn = self._conn
                if conn is None:
                    continue
                waiters = [asyncio.ensure_future(stop.wait()),
                           asyncio.ensure_future(conn.finished.wait())]
                try:
                    await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
                finally:
                    for w in waiters:
                        w.cancel()
                if stop.is_set():
                    break
                if loop.time() - conn.opened_at >= STABLE_AFTER_S:
                    self.backoff.reset()
                delay = self.backoff.next()
                log.info("device %s: disconnected (%s); reconnecting in %.1f s",
                         self.device_id, conn.reason, delay)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), delay)
        finally:
            if self._stop is stop:
                self._stop = None

    async def wait_connected(self) -> None:
        """Wait until the device is connected and set up (for use with :meth:`run_forever`;
        bound it with ``asyncio.timeout``)."""
        await self._ready.wait()

    async def close(self) -> None:
        """Disconnect cleanly (MQTT DISCONNECT) and stop :meth:`run_forever`."""
        self._closing = True
        if self._stop is not None:
            self._stop.set()
        for task in list(self._background):
            task.cancel()
        conn = self._conn
        if conn is not None:
            await self._disconnect(conn)

    async def _disconnect(self, conn: Connection) -> None:
        """Send DISCONNECT, close the socket, wait for the clean-up."""
        if not conn.done.is_set():
            conn.reason = "closed by the device"
            with contextlib.suppress(Exception):
                conn.send(Disconnect())
                conn.writer.close()  # flushes the DISCONNECT first
                async with asyncio.timeout(1.0):
                    await conn.writer.wait_closed()
            conn.lose(conn.reason)
        await self._wait_finished(conn)

    async def __aenter__(self) -> Device:
        await self.connect()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        await self.close()

    # --- device -> cloud ----------------------------------------------------------------------

    async def publish(self, name: str, data: str | bytes = "", *, qos: int = 1,
                      ttl: int | None = None) -> None:
        """Publish the event ``name``. With QoS 1 this returns once the server acknowledged it,
        which corral does after the event is committed; :class:`PublishRefused` carries the
        reason (MQTT 5 only; a 3.1.1 server closes the connection instead, which raises
        :class:`NotConnected`). ``ttl`` (MQTT 5 message expiry) sets the event's ttl."""
        check_event_name(name)
        if qos not in (0, 1):
            raise ValueError("qos is 0 or 1 (corral does not support QoS 2)")
        if ttl is not None and not 0 < ttl <= 0xFFFFFFFF:
            raise ValueError("ttl is 1 to 4294967295 seconds")
        payload = data.encode("utf-8") if isinstance(data, str) else bytes(data)
        conn = self._require()
        props = EMPTY
        if ttl is not None and conn.version == 5:
            props = Properties(message_expiry_interval=ttl)
        await conn.publish(self._topic(f"events/{name}"), payload, qos, props)

    async def claim(self, code: str) -> None:
        """Present a claim code (``POST /v1/device_claims``); the server claims the device to
        whoever created it. Returns once the server acknowledged the message."""
        if not isinstance(code, str) or not code:
            raise ValueError("a claim code is non-empty text")
        await self._require().publish(self._topic("claim"), code.encode("utf-8"), 1)

    async def send_ota_status(self, state: str, *, reason: str | None = None,
                              bytes_received: int | None = None) -> None:
        """Report a firmware update's progress on ``devices/{id}/ota/status``: ``state`` is
        ``downloading``, ``applied`` or ``failed`` (see :mod:`corral.device.ota`)."""
        if state not in ("downloading", "applied", "failed"):
            raise ValueError("state is downloading, applied or failed")
        body: dict[str, Any] = {"state": state}
        if reason is not None:
            body["reason"] = reason[:300]
        if bytes_received is not None:
            body["bytes"] = bytes_received
        await self._require().publish(self._topic("ota/status"),
                            json.dumps(body).encode("utf-8"), 1)

    async def reconnect(self) -> None:
        """Disconnect cleanly and connect again at once (a device restarting, e.g. after
        applying a firmware update; it describes itself again on the new connection)."""
        conn = self._conn
        if conn is not None:
            await self._disconnect(conn)
        await self.connect()

    def vitals(self, getter: Callable[[], dict[str, Any]], *,
               every: float | None = None) -> None:
        """Report vitals (Particle's diagnostics shape, e.g. ``{"device": {"network":
        {"signal": {"rssi": -60}}, "system": {"uptime": 12, "memory": {"used": 1,
        "total": 2}}}}``) from ``getter()``: when the cloud asks (``POST
        /v1/diagnostics/:id/update``) and, with ``every`` (seconds, at least 10), once within
        the first 5 minutes of each connection (at a random moment) and then that often.
        Takes effect at the next connect."""
        if every is not None and every < 10:
            raise ValueError("every is at least 10 seconds (the cloud keeps 1 per 10 s)")
        self._vitals = getter
        self._vitals_every = every

    async def send_vitals(self, doc: dict[str, Any] | None = None) -> None:
        """Send vitals now: ``doc``, or what the registered getter returns."""
        conn = self._require()
        await self._send_vitals(conn, doc)

    async def _send_vitals(self, conn: Connection, doc: dict[str, Any] | None = None) -> None:
        if doc is None:
            if self._vitals is None:
                raise ValueError("no vitals: register a getter with vitals() or pass a dict")
            doc = await _call(self._vitals)
        await conn.publish(self._topic("diagnostics"),
                            json.dumps(doc, separators=(",", ":")).encode("utf-8"), 1)

    async def _vitals_loop(self, conn: Connection, every: float) -> None:
        # the first report at a random point of the first minutes after connecting (a fleet
        # reconnecting at once does not report at once), then every ``every`` seconds
        wait = random.uniform(0.0, min(every, FIRST_VITALS_WITHIN_S))
        while True:
            await asyncio.sleep(wait)
            wait = every
            try:
                await self._send_vitals(conn)
            except (NotConnected, TimeoutError):
                return
            except Exception as exc:
                log.warning("device %s: vitals not sent: %r", self.device_id, exc)

    async def send_describe(self) -> None:
        """Send the describe message now (it is sent on connect and after changes anyway)."""
        conn = self._require()
        await conn.publish(self._topic("describe"),
                            json.dumps(self.describe_payload()).encode("utf-8"), 1)

    # --- internals: connecting ----------------------------------------------------------------

    def _topic(self, rest: str) -> str:
        return f"devices/{self.device_id}/{rest}"

    def _inbox_filter(self, prefix: str) -> str:
        return self._topic(f"inbox/{prefix}" if prefix else "inbox/#")

    def _require(self) -> Connection:
        conn = self._conn
        if conn is None or conn.done.is_set():
            raise NotConnected(f"device {self.device_id} is not connected")
        return conn

    async def _open(self) -> Connection:
        """TCP (+TLS), CONNECT, CONNACK; then the connection's read and ping tasks."""
        conn, early = await open_connection(Dial(
            self.device_id, self.secret, self.host, self.port, self.tls, self.server_hostname,
            self.protocol, self.keepalive, self.clean_session, self.session_expiry,
            self.connect_timeout, self.max_packet_size, self.ack_timeout))
        self.session_present = conn.session_present
        self._conn = conn
        conn.spawn(self._read_loop(conn, early), f"mqtt-read-{self.device_id}")
        if conn.keepalive:
            conn.spawn(conn.keepalive_loop(self.ping_timeout), f"mqtt-ping-{self.device_id}")
        return conn

    async def _setup(self, conn: Connection) -> None:
        """Subscribe to requests, inbox prefixes and OTA; then describe."""
        filters = [self._topic("requests/+")]
        filters += [self._inbox_filter(p) for p in self._subscriptions]
        if self._ota is not None:
            filters.append(self._topic("ota/#"))
        if self._ledgers.wanted:
            filters.append(self._topic("ledgers/#"))
        await self._subscribe(conn, filters, strict=True)
        if self._ledgers.wanted:
            await self._sync_ledgers(conn, subscribe=False)
        await conn.publish(self._topic("describe"),
                            json.dumps(self.describe_payload()).encode("utf-8"), 1)
        if self._vitals is not None and self._vitals_every:
            conn.spawn(self._vitals_loop(conn, self._vitals_every),
                       f"mqtt-vitals-{self.device_id}")

    async def _cleanup(self, conn: Connection) -> None:
        """After a connection died (run by its read loop): stop its other tasks, forget it,
        tell the disconnect handlers."""
        try:
            current = asyncio.current_task()
            tasks = [t for t in conn.tasks if t is not current]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self._conn is conn:
                self._conn = None
                self._ready.clear()
            self.last_disconnect_reason = conn.reason
            if conn.ready:
                log.info("device %s: disconnected: %s", self.device_id, conn.reason)
                for handler in list(self._on_disconnect):
                    try:
                        await _call(handler, conn.reason)
                    except Exception:
                        log.exception("device %s: on_disconnect handler failed",
                                      self.device_id)
        finally:
            conn.finished.set()

    async def _wait_finished(self, conn: Connection) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5.0):
                await conn.finished.wait()

    def _in_background(self, coro: Awaitable[Any], what: str) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)

        def done(t: asyncio.Task[Any]) -> None:
            self._background.discard(t)
            if not t.cancelled() and t.exception() is not None:
                log.warning("device %s: %s failed: %s", self.device_id, what, t.exception())

        task.add_done_callback(done)

    def _changed(self) -> None:
        """Functions, variables or facts changed: re-describe if connected."""
        conn = self._conn
        if conn is not None and not conn.done.is_set() and self.connects:
            self._in_background(conn.publish(self._topic("describe"),
                json.dumps(self.describe_payload()).encode("utf-8"), 1), "describe")

    # --- internals: packets -------------------------------------------------------------------

    async def _subscribe(self, conn: Connection, filters: list[str], *, strict: bool = False) -> None:
        codes = await conn.subscribe(filters, self.subscription_qos)
        for f, code in zip(filters, codes, strict=False):
            if code >= 0x80:
                # only the request topic is essential; a refused prefix is reported
                if strict and f == self._topic("requests/+"):
                    raise SubscribeRefused(f, code)
                log.warning("device %s: %s", self.device_id, SubscribeRefused(f, code))

    async def _read_loop(self, conn: Connection, early: list[Packet]) -> None:
        """Read and dispatch packets until the connection dies; then clean it up."""
        loop = asyncio.get_running_loop()
        reason = "connection lost"
        try:
            for packet in early:
                self._dispatch(conn, packet)
            while not conn.done.is_set():
                data = await conn.reader.read(65536)
                if not data:
                    reason = "the server closed the connection"
                    break
                packets = conn.decoder.feed(data)
                conn.last_rx = loop.time()
                for packet in packets:
                    self._dispatch(conn, packet)
        except ProtocolError as exc:
            reason = f"protocol error from the server: {exc.message}"
        except (ConnectionError, OSError) as exc:
            reason = f"connection lost: {exc!r}"
        except asyncio.CancelledError:
            reason = "cancelled"
            raise
        finally:
            conn.lose(reason)  # keeps an earlier, more precise reason
            await self._cleanup(conn)

    def _dispatch(self, conn: Connection, packet: Packet) -> None:
        if conn.done.is_set():
            return
        if isinstance(packet, Publish):
            if packet.qos == 1 and packet.packet_id is not None:
                conn.send(Puback(packet.packet_id))
            self._incoming(conn, packet)
        elif conn.settle(packet):
            pass
        elif isinstance(packet, Disconnect):
            text = reason_name(packet.reason_code)
            if packet.properties.reason_string:
                text += f": {packet.properties.reason_string}"
            conn.lose(f"disconnected by the server ({text})")
        else:  # CONNACK again, PUBREC/PUBREL/PUBCOMP (we never use QoS 2), AUTH
            conn.lose(f"unexpected {type(packet).__name__} from the server")

    def _incoming(self, conn: Connection, p: Publish) -> None:
        prefix = f"devices/{self.device_id}/"
        if not p.topic.startswith(prefix):
            log.warning("device %s: message on foreign topic %s ignored", self.device_id,
                        p.topic)
            return
        kind, _, rest = p.topic[len(prefix):].partition("/")
        if kind == "requests" and rest:
            conn.spawn(self._answer(conn, rest, p.payload), f"request-{rest}")
        elif kind == "inbox" and rest:
            data = _utf8(p.payload)
            for sub_prefix, handlers in list(self._subscriptions.items()):
                if rest.startswith(sub_prefix):
                    for handler in list(handlers):
                        conn.spawn(self._deliver(handler, rest, data), f"event-{rest}")
        elif kind == "ota" and self._ota is not None:
            conn.spawn(self._run_ota(self._ota, rest, p.payload), f"ota-{rest}")
        elif kind == "ledgers" and rest and "/" not in rest:
            conn.spawn(self._ledger_message(rest, p.payload), f"ledger-{rest}")
        else:
            log.info("device %s: message on %s ignored", self.device_id, p.topic)

    async def _sync_ledgers(self, conn: Connection, *, subscribe: bool) -> None:
        """Subscribe to ``ledgers/#`` (when asked) and say what this device holds."""
        if subscribe:
            await self._subscribe(conn, [self._topic("ledgers/#")])
        await conn.publish(self._topic("ledgers/sync"),
                            json.dumps({"have": self._ledgers.have()}).encode(), 1)

    async def _send_ledger(self, rest: str, body: dict[str, Any]) -> None:
        await self._require().publish(self._topic(f"ledgers/{rest}"),
                            json.dumps(body, separators=(",", ":")).encode(), 1)

    async def _ledger_message(self, name: str, payload: bytes) -> None:
        try:
            await self._ledgers.received(name, payload)
        except (NotConnected, PublishRefused) as exc:
            log.info("device %s: ledger %s not acknowledged: %s", self.device_id, name, exc)

    async def _deliver(self, handler: EventHandler, name: str, data: str) -> None:
        try:
            await _call(handler, name, data)
        except Exception:
            log.exception("device %s: event handler for %s failed", self.device_id, name)

    async def _run_ota(self, handler: OtaHandler, subtopic: str, payload: bytes) -> None:
        try:
            await _call(handler, subtopic, payload)
        except Exception:
            log.exception("device %s: OTA handler failed", self.device_id)

    async def _answer(self, conn: Connection, request_id: str, payload: bytes) -> None:
        """Answer one cloud request on ``replies/{request_id}``."""
        try:
            request = json.loads(payload)
            kind = request.get("kind")
        except (ValueError, AttributeError):
            log.warning("device %s: malformed request %s ignored", self.device_id, request_id)
            return
        if kind == "describe":
            with contextlib.suppress(NotConnected, TimeoutError):
                await conn.publish(self._topic("describe"),
                                    json.dumps(self.describe_payload()).encode("utf-8"), 1)
            return
        if kind == "diagnostics":
            if self._vitals is not None:
                with contextlib.suppress(NotConnected, TimeoutError):
                    await self._send_vitals(conn)
            return
        reply: dict[str, Any]
        name = request.get("name")
        try:
            if kind == "function":
                reply = {"return_value": await self._run_function(name, request.get("arg"))}
            elif kind == "variable":
                reply = {"result": await self._read_variable(name)}
            else:
                reply = {"error": f"unknown request kind {kind!r}"}
        except Exception as exc:
            log.info("device %s: %s %r failed: %r", self.device_id, kind, name, exc)
            reply = {"error": str(exc) or type(exc).__name__}
        with contextlib.suppress(NotConnected, TimeoutError):
            await conn.publish(self._topic(f"replies/{request_id}"),
                                json.dumps(reply).encode("utf-8"), 1)

    async def _run_function(self, name: Any, arg: Any) -> int:
        handler = self._functions.get(name) if isinstance(name, str) else None
        if handler is None:
            raise LookupError(f"unknown function {name!r}")
        value = await _call(cast(Callable[..., Any], handler),
                            arg if isinstance(arg, str) else "")
        if isinstance(value, bool):
            value = int(value)
        if not isinstance(value, int) or not INT32[0] <= value <= INT32[1]:
            raise ValueError(f"function {name} returned {value!r}, not a 32-bit integer")
        return value

    async def _read_variable(self, name: Any) -> bool | int | float | str:
        entry = self._variables.get(name) if isinstance(name, str) else None
        if entry is None:
            raise LookupError(f"unknown variable {name!r}")
        vtype, getter = entry
        return variable_value(await _call(getter), vtype)


__all__ = ["Device", "EventHandler", "FunctionHandler", "OtaHandler", "VariableGetter"]
