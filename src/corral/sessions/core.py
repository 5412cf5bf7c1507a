"""The device-session core: one implementation of "a device is connected" for every transport.

A transport (MQTT, Particle TCP, ...) authenticates the device through the hub, opens a
:class:`DeviceSession` with a :class:`DeviceLink` (its way of sending things to the device),
then translates frames to session calls (``describe``, ``publish``, ``subscribe``, ``heard``,
``close``) and session calls back to frames (the link's ``call_function``, ``read_variable``,
``deliver_event``, ``disconnect``). Everything else (presence, validation, rate limits,
storage, fan-out, metering, the function/variable request path from the API) lives here and
is the same for every transport.

Transports never import domain packages; what they need from them goes through the hub.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import logging
import math
import re
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal, Protocol

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from corral.bus.base import Bus, Message, Subscription
from corral.devices import claims as claim_rules
from corral.devices import credentials, presence
from corral.devices import service as devices
from corral.devices.models import Device
from corral.events.writer import EventWriter, NewEvent, WriterStopped
from corral.kit import clock
from corral.metering.ledger import Kind, Usage, uncounted_name
from corral.products.models import Product
from corral.sessions import contract
from corral.sessions.lookup import DeviceRows
from corral.settings import Settings

log = logging.getLogger("corral.sessions")

VARIABLE_TYPES = {"bool": "bool", "boolean": "bool", "int": "int32", "int32": "int32",
                  "integer": "int32", "double": "double", "float": "double", "number": "double",
                  "string": "string", "str": "string"}
NAME_RE = re.compile(r"^[\x21-\x7e]{1,64}$")  # printable ASCII, no spaces
INT32 = (-(2**31), 2**31 - 1)
CELLULAR_BATCH = 16 * 1024  # bytes of cellular traffic per usage increment


# --- values ---------------------------------------------------------------------------------

class Refused(Exception):
    """The core refuses something a device asked for. ``code`` is machine-readable:
    ``bad_credentials``, ``unknown_device``, ``unknown_product``, ``wrong_product``,
    ``quarantined``, ``denied``, ``invalid``, ``too_large``, ``rate_limited``, ``paused``,
    ``closed``, ``busy``."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"{code}: {reason}")
        self.code = code
        self.reason = reason


class DeviceError(Exception):
    """The device answered a request with an error (``text`` is what it said)."""

    def __init__(self, text: str) -> None:
        super().__init__(text)
        self.text = text


@dataclasses.dataclass(frozen=True, slots=True)
class Hello:
    """What a transport learned when the device connected."""

    device_id: str
    product_id: int | None = None  # a Particle device names its product; MQTT: the device's
    platform_id: int | None = None
    firmware_version: int | None = None
    system_version: str | None = None
    remote: str | None = None  # peer IP address


@dataclasses.dataclass(slots=True)
class DeviceFacts:
    """Tenancy and limits of a connected device (refreshed on ``control`` ``refresh``)."""

    device_id: str
    product_id: int | None
    org_id: int | None
    owner_user_id: int | None
    customer_id: int | None
    development: bool
    platform_id: int
    event_data_max: int
    rate_per_s: float
    rate_burst: int
    cellular: bool = False  # its session traffic counts towards the cellular allowance


@dataclasses.dataclass(frozen=True, slots=True)
class FirmwareImage:
    """A firmware update as a transport sends it: Particle streams the file at ``path`` over
    OTA; MQTT offers ``url`` (a short-lived download) with the rest as facts to check."""

    version: int
    size: int
    sha256: str  # hex
    path: Path
    url: str | None = None
    signature: str | None = None  # base64 Ed25519 signature (corral.firmware.signing)
    key_id: str | None = None
    public_keys: tuple[str, ...] = ()  # base64, the product's active signing keys
    chunk_size: int = 1_048_576  # MQTT: the Range size a device should ask for


@dataclasses.dataclass(frozen=True, slots=True)
class TransferResult:
    """How a firmware transfer ended. ``dropped``: the connection ended during it (the
    update is retried when the device reconnects). ``retry`` False: trying again cannot
    help (the device does not take firmware updates at all)."""

    ok: bool
    reason: str
    bytes_sent: int = 0
    dropped: bool = False
    retry: bool = True


FirmwareProgress = Callable[[int, int], Any]  # (bytes sent, total)


class SessionObserver(Protocol):
    """Something that follows sessions (the firmware delivery engine). Called on the event
    loop; must not block (spawn tasks for work)."""

    def opened(self, session: DeviceSession, hello: Hello) -> None: ...

    def described(self, session: DeviceSession, *, firmware_version: int | None,
                  updates_enabled: bool | None) -> None: ...

    def control(self, session: DeviceSession, body: dict[str, Any]) -> None:
        """A control op the core does not handle itself (e.g. ``firmware``)."""
        ...


UpdateNotice = Literal["pending", "forced"]


class DeviceLink(Protocol):
    """How the core reaches one connected device (implemented by each transport)."""

    transport: str  # "mqtt" | "particle" | ...

    async def call_function(self, name: str, arg: str) -> int:
        """Run a function on the device; its int32 result. Raise :class:`DeviceError` if the
        device reports a failure. The core applies the timeout (by cancelling)."""
        ...

    async def read_variable(self, name: str) -> Any:
        """Read a variable's current value (bool, int, float or str)."""
        ...

    async def deliver_event(self, name: str, data: str | None, *, published_at: str,
                            ttl: int, coreid: str) -> None:
        """Send an event the device subscribed to."""
        ...

    async def request_describe(self) -> None:
        """Ask the device to describe itself again (it answers through ``describe``)."""
        ...

    async def disconnect(self, reason: str) -> None:
        """Close the connection from the server side (kicked, shut down). Must not call
        back into :meth:`DeviceSession.close` synchronously with a different reason."""
        ...

    async def deliver_firmware(self, image: FirmwareImage, *,
                               progress: FirmwareProgress | None = None) -> TransferResult:
        """Transfer ``image`` to the device (Particle: OTA chunks; MQTT: an offer the device
        downloads). Ok once the device has the whole image and will apply it (it reboots
        and reconnects on the new version). Never raises for device-side failures."""
        ...

    async def update_notice(self, kind: UpdateNotice, value: bool) -> None:
        """Tell a device with updates disabled that an update waits for it (``pending``),
        or that the next one is forced and to be applied anyway (``forced``,
        ``firmware_updates_forced``)."""
        ...


class CommunicationGate(Protocol):
    """The seam where billing decides whether device traffic is allowed right now.

    Returns ``None`` to allow, or a human-readable reason to refuse (for example "The
    organization's data operations for this month are used up"). Called for every
    publish, delivery, function call and variable read, on the ingest hot path, so it is
    synchronous: an implementation answers from state it keeps current in the background
    (for example usage totals refreshed on a timer and on threshold events)."""

    def refuse(self, facts: DeviceFacts, kind: Kind) -> str | None: ...

    def refuse_connect(self, facts: DeviceFacts) -> str | None:
        """A device that has never been online connects: ``None`` admits it, else why not
        (the plan's device cap)."""
        ...


class OpenGate:
    """The default gate: everything is allowed."""

    def refuse(self, facts: DeviceFacts, kind: Kind) -> str | None:
        return None

    def refuse_connect(self, facts: DeviceFacts) -> str | None:
        return None


class TokenBucket:
    """``rate`` tokens per second, holding at most ``burst``; time from the injected clock."""

    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = rate, burst
        self.tokens = float(burst)
        self.updated = clock.now()

    def take(self, now: dt.datetime | None = None) -> bool:
        now = now or clock.now()
        elapsed = max(0.0, (now - self.updated).total_seconds())
        self.updated = now
        self.tokens = min(float(self.burst), self.tokens + elapsed * self.rate)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False


# --- validation -----------------------------------------------------------------------------

def check_event_name(name: Any, *, system: bool = False) -> str:
    if not isinstance(name, str) or NAME_RE.fullmatch(name) is None:
        raise Refused("invalid", "Event names are 1 to 64 printable ASCII characters, no spaces")
    if not system and name.lower().startswith(("spark", "particle")):
        raise Refused("invalid", "Event names starting with 'spark' or 'particle' are reserved")
    return name


def check_member_name(name: Any, what: str) -> str:
    if not isinstance(name, str) or not 1 <= len(name) <= 64 or not name.isprintable():
        raise Refused("invalid", f"{what} names are 1 to 64 printable characters")
    return name


def coerce_variable(value: Any, vtype: str) -> Any:
    """A device's variable value as its described type (Particle's JSON result)."""
    if vtype == "bool":
        if isinstance(value, bool):
            return value
        if isinstance(value, (int, float)) and value in (0, 1):
            return bool(value)
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
    elif vtype == "int32":
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, int) and INT32[0] <= value <= INT32[1]:
            return value
        if isinstance(value, float) and value.is_integer() and INT32[0] <= value <= INT32[1]:
            return int(value)
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return coerce_variable(int(value, 10), vtype)
    elif vtype == "double":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            f = float(value)
            if math.isfinite(f):
                return f
        if isinstance(value, str):
            with contextlib.suppress(ValueError):
                return coerce_variable(float(value), vtype)
    elif vtype == "string":
        if isinstance(value, str):
            return value
        if isinstance(value, (int, float, bool)):
            return str(value)
    raise DeviceError(f"the device sent a value that is not a {vtype}")


def _reply_error(status: int, error: str, description: str) -> dict[str, Any]:
    return {"ok": False, "status": status, "error": error, "error_description": description}


# --- the session ----------------------------------------------------------------------------

class DeviceSession:
    """One connected device on this node."""

    def __init__(self, hub: SessionHub, facts: DeviceFacts, link: DeviceLink, *,
                 handshake_at: dt.datetime, functions: list[str],
                 variables: dict[str, str]) -> None:
        self.id = uuid.uuid4().hex
        self.hub = hub
        self.facts = facts
        self.link = link
        self.handshake_at = handshake_at
        self.functions = list(functions)
        self.variables = dict(variables)
        self.prefixes: set[str] = set()
        self.bucket = TokenBucket(facts.rate_per_s, facts.rate_burst)
        self.discarded = 0
        self.closed = False
        self.close_reason: str | None = None
        self._subs: list[Subscription] = []
        self._requests: set[Message] = set()  # being answered (answered on close, too)
        self._event_sub: Subscription | None = None
        self._event_pattern: str | None = None
        self.unmetered_bytes = 0  # cellular session traffic not yet handed to the writer

    @property
    def device_id(self) -> str:
        return self.facts.device_id

    def __repr__(self) -> str:
        return f"<DeviceSession {self.device_id} {self.link.transport} {self.id[:8]}>"

    # -- from the device ---------------------------------------------------------------------

    def count_bytes(self, n: int) -> None:
        """A transport read or wrote ``n`` bytes of this session (cellular devices only:
        batched into usage increments of at least ``CELLULAR_BATCH`` bytes)."""
        if self.facts.cellular:
            self.unmetered_bytes += n
            if self.unmetered_bytes >= CELLULAR_BATCH:
                self.flush_bytes()

    def flush_bytes(self) -> None:
        """Hand the counted cellular bytes to the event writer (also on close and timer)."""
        n, self.unmetered_bytes = self.unmetered_bytes, 0
        if n:
            try:
                fut = self.hub.writer.write_nowait(None, self._usage("cellular", n))
                fut.add_done_callback(lambda f: f.cancelled() or f.exception())
            except (asyncio.QueueFull, WriterStopped):
                self.unmetered_bytes += n

    def heard(self) -> None:
        """Any traffic from the device (``last_heard`` is written in batches)."""
        if not self.closed:
            self.hub.heard[self.device_id] = clock.now()

    async def describe(self, *, functions: Sequence[str] | None = None,
                       variables: dict[str, str] | None = None,
                       firmware_version: int | None = None, system_version: str | None = None,
                       updates_enabled: bool | None = None) -> None:
        """The device says what it offers. Omitted parts keep their previous values."""
        self._check_open()
        cfg = self.hub.settings
        values: dict[str, Any] = {}
        if functions is not None:
            if not isinstance(functions, (list, tuple)) or len(functions) > cfg.max_functions:
                raise Refused("invalid", f"at most {cfg.max_functions} functions")
            fns = list(dict.fromkeys(check_member_name(f, "Function") for f in functions))
            values["functions"] = fns
        if variables is not None:
            if not isinstance(variables, dict) or len(variables) > cfg.max_variables:
                raise Refused("invalid", f"at most {cfg.max_variables} variables")
            vs: dict[str, str] = {}
            for name, vtype in variables.items():
                check_member_name(name, "Variable")
                t = VARIABLE_TYPES.get(str(vtype).lower()) if isinstance(vtype, str) else None
                if t is None:
                    raise Refused("invalid", f"variable {name!r}: the type must be one of "
                                             "bool, int32, double, string")
                vs[name] = t
            values["variables"] = vs
        if firmware_version is not None:
            if isinstance(firmware_version, bool) or not isinstance(firmware_version, int) \
                    or not 0 <= firmware_version <= 2**31 - 1:
                raise Refused("invalid", "firmware_version must be a non-negative integer")
            values["firmware_version"] = firmware_version
        if system_version is not None:
            if not isinstance(system_version, str) or not 1 <= len(system_version) <= 32:
                raise Refused("invalid", "system_version must be text of 1 to 32 characters")
            values["system_firmware_version"] = system_version
        if updates_enabled is not None:
            if not isinstance(updates_enabled, bool):
                raise Refused("invalid", "updates_enabled must be true or false")
            values["firmware_updates_enabled"] = updates_enabled
        self.heard()
        if not values:
            return
        # the live session answers for what the device declared at once; whoever sees the
        # stored description can call it
        self.functions = values.get("functions", self.functions)
        self.variables = values.get("variables", self.variables)
        # stored through the writer's batches (a reconnect storm describes thousands of
        # devices at once), in order after this session's presence change
        await self.hub.writer.write(None, change=presence.Described(
            self.device_id, functions=values.get("functions"),
            variables=values.get("variables"),
            firmware_version=values.get("firmware_version"),
            system_version=values.get("system_firmware_version"),
            updates_enabled=values.get("firmware_updates_enabled")))
        for observer in self.hub.observers:
            observer.described(self, firmware_version=values.get("firmware_version"),
                               updates_enabled=values.get("firmware_updates_enabled"))

    async def system_event(self, name: str, data: str | None) -> None:
        """Store a cloud-sourced system event of this device (``spark/flash/status``,
        ``particle/device/updates/...``): in its stream, never metered."""
        await self.hub.writer.write(self._event(name, data, source="cloud"))

    async def publish(self, name: str, data: str | bytes | None, *, ttl: int = 60,
                      private: bool = True, system: bool = False) -> int:
        """Store and fan out an event from the device; returns its id once committed.

        ``system=True`` is for transports translating protocol-level system events (such a
        name may start with ``spark``/``particle``; it is never rate-limited or counted).
        Raises :class:`Refused` (``invalid``, ``too_large``, ``rate_limited``, ``paused``,
        ``closed``, ``busy``); a rate-limited event is discarded and counted."""
        fut = self.publish_nowait(name, data, ttl=ttl, private=private, system=system)
        try:
            return await fut
        except WriterStopped:
            raise Refused("busy", "The server is shutting down") from None

    def publish_nowait(self, name: str, data: str | bytes | None, *, ttl: int = 60,
                       private: bool = True, system: bool = False) -> asyncio.Future[int]:
        """:meth:`publish` for transports that pipeline: validates at once (raising
        :class:`Refused`) and returns a future that resolves with the event id after the
        commit (or fails, and then the publish must not be acknowledged)."""
        row = self._prepare(name, data, ttl=ttl, private=private, system=system)
        writer = self.hub.writer
        try:
            return writer.write_nowait(row)
        except WriterStopped:
            raise Refused("busy", "The server is shutting down") from None
        except asyncio.QueueFull:  # saturated: queue once there is room (backpressure)
            async def later() -> int:
                return await (await writer.submit(row))

            return asyncio.ensure_future(later())

    def _prepare(self, name: str, data: str | bytes | None, *, ttl: int, private: bool,
                 system: bool) -> NewEvent:
        self._check_open()
        self.heard()
        check_event_name(name, system=system)
        if isinstance(data, bytes):
            try:
                data = data.decode("utf-8")
            except UnicodeDecodeError:
                raise Refused("invalid", "Event data must be UTF-8 text") from None
        size = len(data.encode("utf-8")) if data else 0
        if data is not None and "\x00" in data:
            raise Refused("invalid", "Event data must not contain NUL characters")
        if size > self.facts.event_data_max:
            raise Refused("too_large",
                          f"Event data is {size} bytes; the limit is {self.facts.event_data_max}")
        if isinstance(ttl, bool) or not isinstance(ttl, int) or not 0 <= ttl <= 2**31 - 1:
            ttl = 60
        counted = not system and not uncounted_name(name)
        if counted:
            reason = self.hub.gate.refuse(self.facts, "publish")
            if reason:
                raise Refused("paused", reason)
        now = clock.now()
        if not system and not self.bucket.take(now):
            self.discarded += 1
            self.hub.discarded += 1
            self._count_nowait("discarded", size)
            raise Refused("rate_limited", "Too many events; this one was discarded")
        # a counted publish's usage is recorded by the event writer with its row
        return self._event(name, data or None, ttl=ttl, private=private, at=now,
                           counted=counted)

    async def subscribe(self, prefix: str) -> None:
        """Receive events (in the device's scope) whose names start with ``prefix`` (``""``:
        all). Idempotent.

        Events named ``spark*``/``particle*`` (the cloud's system events, such as other
        devices' ``spark/status``) are never delivered to devices, so a subscription to such
        a prefix (Device OS subscribes to ``spark`` and ``particle`` on every connect) is
        recorded but costs nothing: it joins no fan-out. Without this, each connect in a
        product would wake every connected device of the product (quadratic storms)."""
        self._check_open()
        if not isinstance(prefix, str) or len(prefix) > 64 or (prefix and not prefix.isprintable()):
            raise Refused("invalid", "A subscription prefix is at most 64 printable characters")
        self.prefixes.add(prefix)
        await self._ensure_event_sub()

    def _fanout_prefixes(self) -> bool:
        return any(not uncounted_name(p) or not p for p in self.prefixes)

    async def unsubscribe(self, prefix: str) -> None:
        self.prefixes.discard(prefix)
        if not self._fanout_prefixes() and self._event_sub is not None:
            sub, self._event_sub, self._event_pattern = self._event_sub, None, None
            await sub.unsubscribe()

    async def present_claim_code(self, code: str) -> bool:
        """The device presents a claim code; True when it is now claimed by the code's
        creator (tenancy is refreshed)."""
        self._check_open()
        async with self.hub.sessionmaker() as db:
            result = await claim_rules.redeem_claim_code(db, device_id=self.device_id, code=code)
            await db.commit()
        if not result.ok:
            log.info("device %s presented an unusable claim code: %s", self.device_id,
                     result.reason)
            return False
        await self.refresh()
        return True

    async def close(self, reason: str, *, replaced: bool = False) -> None:
        """The connection ended (idempotent). Marks the device offline (unless a newer
        session replaced this one) and publishes ``spark/status`` ``offline``."""
        if self.closed:
            return
        self.closed = True
        self.close_reason = reason
        self.flush_bytes()
        self.hub._forget(self)
        self.hub.heard.pop(self.device_id, None)  # the offline change sets last_heard
        # callers of requests in flight learn now, not at their timeout (unsubscribing below
        # cancels the handlers that would have answered them)
        for msg in list(self._requests):
            with contextlib.suppress(Exception):
                await msg.respond(_reply_error(404, "device_offline",
                                               "The device disconnected during the request"))
        self._requests.clear()
        for sub in [*self._subs, *([self._event_sub] if self._event_sub else [])]:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        self._subs.clear()
        self._event_sub = None
        log.info("device %s offline (%s): %s", self.device_id, self.link.transport, reason)
        if replaced:
            return
        now = clock.now()
        change = presence.Offline(self.device_id, now, self.handshake_at, reason)
        try:
            await self.hub.writer.write(self._event("spark/status", "offline", source="cloud",
                                                    at=now), change=change)
        except WriterStopped:
            pass
        except Exception:
            log.exception("could not record device %s going offline", self.device_id)

    # -- internals ---------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.closed:
            raise Refused("closed", "The session is closed")

    def _event(self, name: str, data: str | None, *, ttl: int = 60, private: bool = True,
               source: str = "device", at: dt.datetime | None = None,
               counted: bool = False) -> NewEvent:
        f = self.facts
        return NewEvent(name=name, data=data, ttl=ttl, source=source, device_id=f.device_id,
                        product_id=f.product_id, org_id=f.org_id,
                        owner_user_id=f.owner_user_id, customer_id=f.customer_id,
                        private=private, published_at=at or clock.now(), counted=counted)

    def _usage(self, kind: Kind, size: int, *, at: dt.datetime | None = None) -> Usage:
        f = self.facts
        return Usage(device_id=f.device_id, kind=kind, product_id=f.product_id,
                     org_id=f.org_id, owner_user_id=f.owner_user_id, payload_bytes=size,
                     at=at or clock.now())

    def _count_nowait(self, kind: Kind, size: int) -> None:
        try:
            fut = self.hub.writer.write_nowait(None, self._usage(kind, size))
            fut.add_done_callback(lambda f: f.cancelled() or f.exception())
        except (asyncio.QueueFull, WriterStopped):
            pass

    async def _attach(self) -> None:
        bus = self.hub.bus
        self._subs.append(await bus.subscribe(contract.request_subject(self.device_id),
                                              self._on_request))
        self._subs.append(await bus.subscribe(contract.control_subject(self.device_id),
                                              self._on_control))

    def _scope_pattern(self) -> str:
        f = self.facts
        if f.product_id is not None:
            return contract.stream_pattern(product_id=f.product_id)
        if f.owner_user_id is not None:
            return contract.stream_pattern(owner_user_id=f.owner_user_id)
        if f.customer_id is not None:
            return contract.stream_pattern(customer_id=f.customer_id)
        return contract.stream_pattern(device_id=f.device_id)

    async def _ensure_event_sub(self) -> None:
        if not self._fanout_prefixes() or self.closed:
            return
        pattern = self._scope_pattern()
        if self._event_sub is not None and self._event_pattern == pattern:
            return
        old = self._event_sub
        self._event_sub = await self.hub.bus.subscribe(pattern, self._on_event)
        self._event_pattern = pattern
        if old is not None:
            await old.unsubscribe()

    async def refresh(self) -> None:
        """Reload tenancy (claimed, unclaimed, moved) and re-scope subscriptions."""
        async with self.hub.sessionmaker() as db:
            facts = await self.hub._facts(db, self.device_id)
        if facts is None:
            await self.hub._kick(self, "The device was removed")
            return
        self.facts = facts
        self.bucket.rate, self.bucket.burst = facts.rate_per_s, facts.rate_burst
        await self._ensure_event_sub()

    async def _on_event(self, msg: Message) -> None:
        if self.closed:
            return
        try:
            ev = msg.json()
            name = ev["name"]
        except (ValueError, KeyError, TypeError):
            return
        if uncounted_name(name):  # the cloud's system events are not for devices
            return
        if not any(contract.name_matches(p, name) for p in self.prefixes):
            return
        data = ev.get("data")
        size = len(data.encode("utf-8")) if isinstance(data, str) else 0
        if self.hub.gate.refuse(self.facts, "delivery"):
            return
        try:
            await self.hub.writer.count(self._usage("delivery", size))
        except Exception:
            log.warning("delivery to %s not counted; not delivered", self.device_id)
            return
        try:
            await self.link.deliver_event(name, data, published_at=ev.get("published_at", ""),
                                          ttl=int(ev.get("ttl", 60)),
                                          coreid=str(ev.get("coreid", "")))
        except Exception as exc:
            log.info("delivery to %s failed: %r", self.device_id, exc)

    async def _on_control(self, msg: Message) -> None:
        try:
            body = msg.json()
            op = body.get("op")
        except (ValueError, AttributeError):
            return
        if op == "kick" and body.get("session") != self.id:
            await self.hub._kick(self, "Replaced by a newer connection of the same device",
                                 replaced=True)
        elif op == "refresh":
            await self.refresh()
        elif op == "disconnect":
            await self.hub._kick(self, str(body.get("reason") or "Disconnected by the cloud"))
        elif op == "describe":
            with contextlib.suppress(Exception):
                await self.link.request_describe()
        elif isinstance(body, dict):
            for observer in self.hub.observers:
                observer.control(self, body)

    async def _on_request(self, msg: Message) -> None:
        if msg.reply is None:
            return
        self._requests.add(msg)
        try:
            reply = await self._answer(msg)
        except Exception:  # never leave the caller waiting for its timeout
            log.exception("request to %s failed", self.device_id)
            reply = _reply_error(502, "device_error", "The request to the device failed")
        finally:
            self._requests.discard(msg)
        with contextlib.suppress(Exception):
            await msg.respond(reply)

    async def _answer(self, msg: Message) -> dict[str, Any]:
        try:
            body = msg.json()
            kind, name = body["kind"], body["name"]
            timeout = float(body.get("timeout") or self.hub.settings.device_call_timeout_s)
        except (ValueError, KeyError, TypeError):
            return _reply_error(400, "invalid_request", "Malformed request")
        if self.closed:
            return _reply_error(404, "device_offline", "Device is not connected")
        timeout = max(0.05, min(timeout, 300.0))
        if kind == "function":
            if name not in self.functions:
                return _reply_error(404, "not_found", f"Function {name} not found")
            arg = body.get("arg") or ""
            if not isinstance(arg, str):
                return _reply_error(400, "invalid_request", "arg must be text")
            size = len(arg.encode("utf-8"))
            if size > self.hub.settings.function_arg_max_bytes:
                return _reply_error(400, "invalid_request", "arg is longer than "
                                    f"{self.hub.settings.function_arg_max_bytes} bytes")
            reason = self.hub.gate.refuse(self.facts, "function")
            if reason:
                return _reply_error(403, "communication_paused", reason)
            try:
                async with asyncio.timeout(timeout):
                    value = await self.link.call_function(name, arg)
            except TimeoutError:
                return _reply_error(408, "timed_out", "Timed out.")
            except DeviceError as exc:
                return _reply_error(400, "device_error", f"Function {name} failed: {exc.text}")
            if isinstance(value, bool) or not isinstance(value, int) \
                    or not INT32[0] <= value <= INT32[1]:
                return _reply_error(502, "device_error",
                                    f"Function {name} returned a value that is not an int32")
            await self.hub.writer.count(self._usage("function", size))
            self.heard()
            return {"ok": True, "return_value": value}
        if kind == "variable":
            vtype = self.variables.get(name)
            if vtype is None:
                return _reply_error(404, "not_found", "Variable not found")
            reason = self.hub.gate.refuse(self.facts, "variable")
            if reason:
                return _reply_error(403, "communication_paused", reason)
            try:
                async with asyncio.timeout(timeout):
                    raw = await self.link.read_variable(name)
                value = coerce_variable(raw, vtype)
            except TimeoutError:
                return _reply_error(408, "timed_out", "Timed out.")
            except DeviceError as exc:
                return _reply_error(502, "device_error",
                                    f"Variable {name} could not be read: {exc.text}")
            size = len(str(value).encode("utf-8"))
            await self.hub.writer.count(self._usage("variable", size))
            self.heard()
            return {"ok": True, "result": value, "type": vtype}
        return _reply_error(400, "invalid_request", f"Unknown request kind {kind!r}")


# --- the hub --------------------------------------------------------------------------------

class SessionHub:
    """All device sessions of this node, and what transports need from the domains."""

    def __init__(self, settings: Settings, sessionmaker: async_sessionmaker[AsyncSession],
                 bus: Bus, writer: EventWriter, *, gate: CommunicationGate | None = None,
                 reset_presence: bool = True) -> None:
        self.settings = settings
        self.sessionmaker = sessionmaker
        self._rows = DeviceRows(sessionmaker.kw["bind"], _FACTS)
        self.bus = bus
        self.writer = writer
        self.gate: CommunicationGate = gate or OpenGate()
        self.reset_presence = reset_presence
        self.sessions: dict[str, DeviceSession] = {}
        self.heard: dict[str, dt.datetime] = {}  # device -> when last heard, not yet written
        self.discarded = 0
        self.opened = 0
        self.refused = 0
        self.observers: list[SessionObserver] = []  # e.g. the firmware delivery engine
        self._flusher: asyncio.Task[None] | None = None
        self._stopping = False

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the presence flusher. With ``reset_presence`` (single node: this node held
        every session), devices left online by a previous run are marked offline."""
        if self.reset_presence:
            now = clock.now()
            async with self.sessionmaker() as db:
                await db.execute(update(Device).where(Device.online.is_(True)).values(
                    online=False, last_disconnect_at=now,
                    last_disconnect_reason="The server restarted")
                    .execution_options(synchronize_session=False))
                await db.commit()
        self._stopping = False
        self._flusher = asyncio.get_running_loop().create_task(self._flush_loop(),
                                                               name="presence-flusher")

    async def stop(self) -> None:
        """Close every session (reason: shutdown), then flush presence."""
        self._stopping = True
        sessions = list(self.sessions.values())
        for s in sessions:
            with contextlib.suppress(Exception):
                await s.link.disconnect("The server is shutting down")
        await asyncio.gather(*(s.close("The server is shutting down") for s in sessions),
                             return_exceptions=True)
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        await self.flush_presence()

    async def _flush_loop(self) -> None:
        while True:
            await asyncio.sleep(self.settings.presence_flush_s)
            try:
                await self.flush_presence()
            except Exception:
                log.exception("presence flush failed")

    async def flush_presence(self) -> None:
        if not self.heard:
            return
        heard, self.heard = self.heard, {}
        async with self.sessionmaker() as db:
            await devices.touch_each(db, heard)
            await db.commit()

    # -- authentication (transports call these) ------------------------------------------------

    async def authenticate_secret(self, device_id: str, secret: str) -> bool:
        """Does ``secret`` match the device's MQTT secret?"""
        async with self.sessionmaker() as db:
            return await credentials.verify_mqtt_secret(db, device_id, secret) is not None

    async def provision_certificate(self, chain: list[x509.Certificate], *,
                                    ip: str | None = None) -> str:
        """A device presented a client certificate: the device ID it stands for (provisioned
        just in time when the product's CA allows). Raises :class:`Refused`."""
        async with self.sessionmaker() as db:
            result = await credentials.provision_from_certificate(db, chain, ip=ip)
            device_id = result.device.id if result.device is not None else None
            await db.commit()
        if not result.accepted or not device_id:
            raise Refused("bad_credentials", result.reason or "The certificate is not accepted")
        return device_id

    async def ca_certificates(self) -> list[x509.Certificate]:
        """Every active product CA (what a TLS listener trusts for client certificates)."""
        async with self.sessionmaker() as db:
            return await credentials.active_ca_certificates(db)

    async def check_device_key(self, device_id: str, key: rsa.RSAPublicKey
                               ) -> Literal["registered", "unknown", "refused"]:
        """May a device present ``key`` in a key-based handshake? A known device must present
        its registered key (a known device without one is refused: register it with
        ``POST /v1/provisioning/:id``); an unknown device may go on, and admission on its
        Hello decides (its key is then pinned: :meth:`pin_device_key`)."""
        row = await self._rows.get(device_id)  # coalesced with concurrent handshakes' reads
        if row is None:
            return "unknown"
        # stored keys are canonical SubjectPublicKeyInfo DER (credentials.spki_der)
        if not row.denied and row.public_key_der == credentials.spki_der(key):
            return "registered"
        return "refused"

    async def pin_device_key(self, device_id: str, key: rsa.RSAPublicKey) -> bool:
        """Record the key a first-time device used (trust on first use), if it has none."""
        async with self.sessionmaker() as db:
            pinned = await credentials.pin_public_key(db, device_id, key)
            await db.commit()
        return pinned

    # -- sessions ------------------------------------------------------------------------------

    async def open(self, hello: Hello, link: DeviceLink) -> DeviceSession:
        """Admit an authenticated device and make it online. Raises :class:`Refused`
        (``unknown_device``, ``unknown_product``, ``wrong_product``, ``quarantined``,
        ``denied``, ``device_limit``, ``busy``)."""
        if self._stopping:
            raise Refused("busy", "The server is shutting down")
        now = clock.now()
        did = hello.device_id.lower()
        # the usual case, a device its product knows, is decided on one read with no ORM
        # session; anything that needs a write (a new device, a move) goes through admit()
        row = await self._rows.get(did)
        quick = None if row is None else devices.admission_without_writes(
            row.product_id, denied=row.denied, quarantined=row.quarantined,
            claimed_product_id=hello.product_id)
        if quick is None:
            async with self.sessionmaker() as db:
                adm = await devices.admit(db, device_id=hello.device_id,
                                          product_id=hello.product_id,
                                          platform_id=hello.platform_id)
                if adm.accepted:
                    row = (await db.execute(_FACTS.where(Device.id == did))).one_or_none()
                await db.commit()  # admit may have created or moved the device
            quick = (adm.decision, adm.reason)
        decision, reason = quick
        if decision != "accepted" or row is None:
            self.refused += 1
            log.info("device %s refused: %s (%s)", hello.device_id, decision, reason)
            raise Refused(decision, reason)
        facts, functions, variables = self._facts_of(row)
        if row.first_online_at is None:  # never online before: the plan's device cap
            cap = self.gate.refuse_connect(facts)
            if cap:
                self.refused += 1
                log.info("device %s refused: device_limit (%s)", hello.device_id, cap)
                raise Refused("device_limit", cap)
        session = DeviceSession(self, facts, link, handshake_at=now, functions=functions,
                                variables=variables)
        old = self.sessions.get(did)
        self.sessions[did] = session
        if old is not None:
            await self._kick(old, "Replaced by a newer connection of the same device",
                             replaced=True)
        await session._attach()
        # sessions of this device on other nodes close themselves
        await self.bus.publish(contract.control_subject(did), {"op": "kick", "session": session.id})
        self.opened += 1
        # online: the presence change commits with the spark/status event, in the writer's
        # next batch (a connection storm is a few transactions, not one per device)
        change = presence.Online(did, now, ip=hello.remote, transport=link.transport,
                                 firmware_version=hello.firmware_version,
                                 system_version=hello.system_version)
        try:
            await self.writer.write(session._event("spark/status", "online", source="cloud",
                                                   at=now), change=change)
        except WriterStopped:
            pass
        except Exception:
            await session.close("The server could not record the connection")
            raise
        log.info("device %s online (%s) from %s", did, link.transport, hello.remote)
        for observer in self.observers:
            observer.opened(session, hello)
        return session

    async def _kick(self, session: DeviceSession, reason: str, *, replaced: bool = False) -> None:
        with contextlib.suppress(Exception):
            await session.link.disconnect(reason)
        await session.close(reason, replaced=replaced)

    def _forget(self, session: DeviceSession) -> None:
        if self.sessions.get(session.device_id) is session:
            del self.sessions[session.device_id]

    async def _facts(self, db: AsyncSession, device_id: str) -> DeviceFacts | None:
        loaded = await self._load(db, device_id)
        return loaded[0] if loaded else None

    async def _load(self, db: AsyncSession, device_id: str
                    ) -> tuple[DeviceFacts, list[str], dict[str, str]] | None:
        """The device's facts and what it last described, in one query."""
        row = (await db.execute(_FACTS.where(Device.id == device_id.lower()))).one_or_none()
        return None if row is None else self._facts_of(row)

    def _facts_of(self, row: Any) -> tuple[DeviceFacts, list[str], dict[str, str]]:
        cfg = self.settings
        ps: dict[str, Any] = row.settings or {}
        facts = DeviceFacts(
            device_id=row.id, product_id=row.product_id, org_id=row.org_id,
            owner_user_id=row.owner_user_id, customer_id=row.customer_id,
            development=row.development, platform_id=row.platform_id,
            event_data_max=int(ps.get("event_data_max_bytes") or cfg.event_data_max_bytes),
            rate_per_s=float(ps.get("event_rate_per_s") or cfg.event_rate_per_s),
            rate_burst=int(ps.get("event_rate_burst") or cfg.event_rate_burst),
            cellular=bool(row.cellular),
        )
        return facts, list(row.functions or []), dict(row.variables or {})


# what a connection needs of its device: key, admission state, tenancy, limits, last describe
_FACTS = (
    select(Device.id, Device.product_id, Device.owner_user_id, Device.customer_id,
           Device.development, Device.platform_id, Device.functions, Device.variables,
           Device.quarantined, Device.denied, Device.public_key_der, Device.cellular,
           Device.first_online_at, Product.org_id, Product.settings)
    .outerjoin(Product, Product.id == Device.product_id)
)


async def publish_after_commit(bus: Bus, events: Sequence[Any]) -> None:
    """The event writer's after-commit hook: fan committed events out on the bus."""
    interested = getattr(bus, "interested", None)  # in-process: skip events nobody watches
    for e in events:
        try:
            subject = contract.event_subject(
                org_id=e.org_id, product_id=e.product_id, owner_user_id=e.owner_user_id,
                customer_id=e.customer_id, device_id=e.device_id)
            if interested is not None and not interested(subject):
                continue
            await bus.publish(subject, contract.event_payload(e))
        except Exception:
            log.exception("event %s not fanned out", getattr(e, "id", "?"))


__all__ = ["CommunicationGate", "DeviceError", "DeviceFacts", "DeviceLink", "DeviceSession",
           "FirmwareImage", "FirmwareProgress", "Hello", "OpenGate", "Refused", "SessionHub",
           "SessionObserver", "TokenBucket", "TransferResult", "UpdateNotice", "check_event_name",
           "coerce_variable", "publish_after_commit"]
