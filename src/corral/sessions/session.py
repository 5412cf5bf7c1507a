"""One connected device: :class:`DeviceSession`, what a transport calls for it (``describe``,
``publish``, ``subscribe``, ``heard``, ``close``) and what the API asks of it through the bus
(function calls, variable reads, control ops). The :class:`~corral.sessions.core.SessionHub`
opens and closes sessions; everything a session does is the same for every transport.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import json
import logging
import uuid
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from corral.bus.base import Bus, Message, Subscription
from corral.devices import claims as claim_rules
from corral.devices import presence
from corral.events.writer import EventWriter, NewEvent, WriterStopped
from corral.kit import clock
from corral.kit.text import bounded_loads, strict_loads
from corral.metering import sims
from corral.metering.ledger import Kind, Usage, uncounted_name
from corral.sessions import contract
from corral.sessions.link import (
    INT32,
    VARIABLE_TYPES,
    CommunicationGate,
    DeviceError,
    DeviceFacts,
    DeviceLink,
    Hello,
    Refused,
    TokenBucket,
    check_event_name,
    check_member_name,
    coerce_variable,
)
from corral.settings import Settings

log = logging.getLogger("corral.sessions")

CELLULAR_BATCH = 16 * 1024  # bytes of cellular traffic per usage increment
VITALS_EVENT = "spark/device/diagnostics/update"
VITALS_MAX_BYTES = 4096
VITALS_RATE_PER_S, VITALS_BURST = 1 / 10, 3  # vitals reports a device may send
LEDGER_MAX_BYTES = 16 * 1024  # a ledger document a device writes (Particle's synced limit)
LEDGER_SYNC_MAX = 64  # ledgers a device may list in one sync


class SessionObserver(Protocol):
    """Something that follows sessions (the firmware delivery engine). Called on the event
    loop; must not block (spawn tasks for work)."""

    def opened(self, session: DeviceSession, hello: Hello) -> None: ...

    def described(self, session: DeviceSession, *, firmware_version: int | None,
                  updates_enabled: bool | None) -> None: ...

    def control(self, session: DeviceSession, body: dict[str, Any]) -> None:
        """A control op the core does not handle itself (e.g. ``firmware``)."""
        ...


class LedgerPort(Protocol):
    """Where a device's ledger traffic goes (the ledger sync engine,
    :mod:`corral.ledgers.sync`). Called on the event loop; ``wanted`` must not block."""

    def wanted(self, session: DeviceSession, have: dict[str, int] | None) -> None:
        """The device takes cloud-to-device ledgers: send what it lacks. ``have`` (from a
        sync) is what it holds, name -> version; None: what it last acknowledged."""
        ...

    async def applied(self, session: DeviceSession, name: str, version: int) -> None:
        """The device applied ``version`` of ledger ``name``."""
        ...

    async def written(self, session: DeviceSession, name: str, data: dict[str, Any], *,
                      merge: bool) -> None:
        """The device wrote its device-to-cloud ledger ``name`` (raise :class:`Refused`)."""
        ...


class SessionHost(Protocol):
    """What a session needs of the hub that opened it (:class:`corral.sessions.core.SessionHub`):
    the session module stays below the hub, which imports it."""

    settings: Settings
    sessionmaker: async_sessionmaker[AsyncSession]
    bus: Bus
    writer: EventWriter
    gate: CommunicationGate
    heard: dict[str, dt.datetime]
    discarded: int
    observers: list[SessionObserver]
    ledgers: LedgerPort | None
    call_results: list[Callable[[str, int | None, str, Any], None]]

    async def record_cellular(self, device_id: str, iccid: str | None) -> bool: ...

    async def _kick(self, session: DeviceSession, reason: str, *,
                    replaced: bool = False) -> None: ...

    def _forget(self, session: DeviceSession) -> None: ...

    async def _facts(self, db: AsyncSession, device_id: str) -> DeviceFacts | None: ...


def _reply_error(status: int, error: str, description: str) -> dict[str, Any]:
    return {"ok": False, "status": status, "error": error, "error_description": description}


# --- the session ----------------------------------------------------------------------------

def _json_object(payload: bytes, what: str, limit: int) -> dict[str, Any]:
    if len(payload) > limit:
        raise Refused("too_large", f"{what} is at most {limit} bytes")
    try:
        body = bounded_loads(payload)
    except (ValueError, UnicodeDecodeError):
        body = None
    if not isinstance(body, dict):
        raise Refused("invalid", f"{what} must be a JSON object")
    return body


class DeviceSession:
    """One connected device on this node."""

    def __init__(self, hub: SessionHost, facts: DeviceFacts, link: DeviceLink, *,
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
        self.firmware_version: int | None = None  # what the device runs (Hello, describe)
        self.vitals_bucket = TokenBucket(VITALS_RATE_PER_S, VITALS_BURST)

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
                       updates_enabled: bool | None = None, iccid: str | None = None,
                       cellular: bool | None = None) -> None:
        """The device says what it offers. Omitted parts keep their previous values.
        ``iccid`` (its SIM) makes it cellular; ``cellular`` alone says so without a SIM."""
        self._check_open()
        cfg = self.hub.settings
        if iccid is not None or cellular is not None:
            await self._cellular(iccid, cellular)
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
            self.firmware_version = firmware_version
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

    async def _cellular(self, iccid: Any, cellular: Any) -> None:
        """Record the SIM (or that it is cellular) when it differs from what is stored; a
        deactivated SIM closes the session."""
        if cellular is not None and not isinstance(cellular, bool):
            raise Refused("invalid", "cellular must be true or false")
        if iccid is not None:
            if not sims.is_iccid(iccid):
                raise Refused("invalid", "iccid must be 18 to 22 digits")
            iccid = iccid.strip().upper()
        facts = self.facts
        if not ((iccid is not None and (iccid != facts.iccid or not facts.cellular))
                or (cellular and not facts.cellular)):
            return
        off = await self.hub.record_cellular(self.device_id, iccid)
        self.facts.cellular, self.facts.iccid = True, iccid or facts.iccid
        if off:
            await self.hub._kick(self, sims.DEACTIVATED_REASON)
            raise Refused("denied", sims.DEACTIVATED_REASON)

    async def vitals(self, data: str | bytes) -> int:
        """The device reports its vitals (a JSON object of at most 4 KiB): stored as its
        event ``spark/device/diagnostics/update`` (never a data operation; the fleet domain
        keeps the payload). At most one report per 10 s on average (bursts of 3); returns
        the event id once committed. Raises :class:`Refused` (``invalid``,
        ``too_large``, ``rate_limited``, ``closed``, ``busy``)."""
        self._check_open()
        self.heard()
        raw = data.encode("utf-8") if isinstance(data, str) else data
        if len(raw) > VITALS_MAX_BYTES:
            raise Refused("too_large", f"Vitals are at most {VITALS_MAX_BYTES} bytes")
        try:
            doc = strict_loads(raw)
        except (ValueError, UnicodeDecodeError, RecursionError):
            doc = None
        if not isinstance(doc, dict):
            raise Refused("invalid", "Vitals must be a JSON object")
        if not self.vitals_bucket.take():
            raise Refused("rate_limited", "Too many vitals reports; this one was discarded")
        text = json.dumps(doc, separators=(",", ":"))
        try:
            return await self.hub.writer.write(self._event(VITALS_EVENT, text))
        except WriterStopped:
            raise Refused("busy", "The server is shutting down") from None

    # -- ledgers (docs/mqtt.md "Ledgers") -------------------------------------------------------

    def _ledger_port(self) -> LedgerPort:
        self._check_open()
        port = self.hub.ledgers
        if port is None:
            raise Refused("invalid", "This server does not serve ledgers")
        return port

    def ledgers_wanted(self, have: dict[str, int] | None = None) -> None:
        """The device subscribed to its ledgers (or resumed a session that had): the cloud
        sends every cloud-to-device ledger it has not acknowledged."""
        port = self.hub.ledgers
        if port is not None and not self.closed:
            port.wanted(self, have)

    async def ledger_sync(self, payload: bytes) -> None:
        """``{"have": {"name": version, ...}}``: what the device holds (``{}`` after losing
        its storage); the cloud sends every ledger whose version differs."""
        port = self._ledger_port()
        body = _json_object(payload, "A ledger sync", 4096)
        have = body.get("have", {})
        if not isinstance(have, dict) or len(have) > LEDGER_SYNC_MAX or not all(
                isinstance(k, str) and type(v) is int for k, v in have.items()):
            raise Refused("invalid", 'A ledger sync is {"have": {"<ledger>": <version>, ...}} '
                          f"(at most {LEDGER_SYNC_MAX} ledgers)")
        self.heard()
        port.wanted(self, have)

    async def ledger_applied(self, name: str, payload: bytes) -> None:
        """``{"version": N}``: the device applied version N of cloud-to-device ledger
        ``name``."""
        port = self._ledger_port()
        version = _json_object(payload, "A ledger acknowledgement", 256).get("version")
        if type(version) is not int or version < 1:
            raise Refused("invalid", 'A ledger acknowledgement is {"version": <the version>}')
        self.heard()
        await port.applied(self, name, version)

    async def ledger_set(self, name: str, payload: bytes) -> None:
        """``{"data": {...}, "set_mode": "Replace" | "Merge"}``: the device writes its
        device-to-cloud ledger ``name`` (a new version; refused when it does not validate)."""
        port = self._ledger_port()
        body = _json_object(payload, "A ledger write", LEDGER_MAX_BYTES + 256)
        data, mode = body.get("data"), body.get("set_mode", "Replace")
        if not isinstance(data, dict) or mode not in ("Replace", "Merge"):
            raise Refused("invalid", 'A ledger write is {"data": {...}, "set_mode": '
                          '"Replace" | "Merge"}')
        self.heard()
        await port.written(self, name, data, merge=mode == "Merge")

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
                        private=private, published_at=at or clock.now(), counted=counted,
                        firmware_version=self.firmware_version)

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
        elif op == "diagnostics":
            with contextlib.suppress(Exception):
                await self.link.request_vitals()
        elif isinstance(body, dict):
            for observer in self.hub.observers:
                observer.control(self, body)

    async def _on_request(self, msg: Message) -> None:
        if msg.reply is None:
            return
        try:
            body = msg.json()  # once, for the answer and the call-result hooks
        except ValueError:
            body = None
        self._requests.add(msg)
        try:
            reply = await self._answer(body)
        except Exception:  # never leave the caller waiting for its timeout
            log.exception("request to %s failed", self.device_id)
            reply = _reply_error(502, "device_error", "The request to the device failed")
        finally:
            self._requests.discard(msg)
        if self.hub.call_results:  # counted before the caller has its answer, so a caller
            self._count_call(body, reply)  # that then reads fleet metrics finds its call
        with contextlib.suppress(Exception):
            await msg.respond(reply)

    def _count_call(self, body: Any, reply: dict[str, Any]) -> None:
        """Tell the call-result hooks (fleet rollups) how a call or read ended: success,
        failure (the device failed), timeout (it did not answer in time) or offline; a caller's mistake (an unknown
        name, a bad argument) or a paused account is not counted."""
        if reply.get("ok") is True:
            outcome = "success"
        elif reply.get("error") == "device_offline":
            outcome = "offline"
        elif reply.get("error") == "timed_out":
            outcome = "timeout"
        elif reply.get("error") == "device_error":
            outcome = "failure"
        else:
            return
        kind = body.get("kind") if isinstance(body, dict) else None
        if not isinstance(kind, str):  # (a request without one was answered 400 anyway)
            return
        for hook in self.hub.call_results:
            try:
                hook(self.device_id, self.facts.product_id, kind, outcome)
            except Exception:
                log.exception("call-result hook failed")

    async def _answer(self, body: Any) -> dict[str, Any]:
        """The reply to a request whose payload decoded to ``body`` (None: not JSON)."""
        try:
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
            await self.hub.writer.count(self._usage("function", size), now=True)
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
            await self.hub.writer.count(self._usage("variable", size), now=True)
            self.heard()
            return {"ok": True, "result": value, "type": vtype}
        return _reply_error(400, "invalid_request", f"Unknown request kind {kind!r}")


