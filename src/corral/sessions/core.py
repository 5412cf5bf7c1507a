"""The device-session core: one implementation of "a device is connected" for every transport.

A transport (MQTT, Particle TCP, ...) authenticates the device through the hub, opens a
:class:`~corral.sessions.session.DeviceSession` with a :class:`DeviceLink` (its way of sending things to the device),
then translates frames to session calls (``describe``, ``publish``, ``subscribe``, ``heard``,
``close``) and session calls back to frames (the link's ``call_function``, ``read_variable``,
``deliver_event``, ``disconnect``). Everything else (presence, validation, rate limits,
storage, fan-out, metering, the function/variable request path from the API) lives here and
is the same for every transport.

What the two sides exchange (:class:`Hello`, :class:`DeviceLink`, firmware images, refusals,
the checks on names and values) is in :mod:`corral.sessions.link`. Transports never import
domain packages; what they need from them goes through the hub.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from collections.abc import Callable, Sequence
from typing import Any, Literal

from cryptography import x509
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from corral.bus.base import Bus
from corral.devices import credentials, presence
from corral.devices import service as devices
from corral.devices.models import Device
from corral.events.writer import EventWriter, WriterStopped
from corral.kit import clock
from corral.metering import sims
from corral.metering.models import Sim
from corral.products.models import Product
from corral.sessions import contract
from corral.sessions.link import (
    CommunicationGate,
    DeviceFacts,
    DeviceLink,
    Hello,
    OpenGate,
    Refused,
)
from corral.sessions.lookup import DeviceRows
from corral.sessions.session import DeviceSession, LedgerPort, SessionObserver
from corral.settings import Settings

log = logging.getLogger("corral.sessions")

# --- the hub --------------------------------------------------------------------------------

class SessionHub:
    """All device sessions of this node, and what transports need from the domains."""

    def __init__(self, settings: Settings, sessionmaker: async_sessionmaker[AsyncSession],
                 bus: Bus, writer: EventWriter, *, gate: CommunicationGate | None = None,
                 reset_presence: bool = True, node_id: str | None = None) -> None:
        self.settings = settings
        self.sessionmaker = sessionmaker
        self._rows = DeviceRows(sessionmaker.kw["bind"], _FACTS)
        self.bus = bus
        self.writer = writer
        self.gate: CommunicationGate = gate or OpenGate()
        self.reset_presence = reset_presence
        self.node_id = node_id  # scaled out: recorded as the holder of each session it opens
        self.sessions: dict[str, DeviceSession] = {}
        self.heard: dict[str, dt.datetime] = {}  # device -> when last heard, not yet written
        self.discarded = 0
        self.opened = 0
        self.refused = 0
        self.observers: list[SessionObserver] = []  # e.g. the firmware delivery engine
        self.ledgers: LedgerPort | None = None  # the ledger sync engine, when one runs
        # (device_id, product_id, kind, outcome) of each call or read this node answered
        self.call_results: list[Callable[[str, int | None, str, Any], None]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._stopping = False

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the presence flusher. With ``reset_presence`` (single node: this node held
        every session), devices left online by a previous run are marked offline."""
        if self.reset_presence:
            now = clock.now()
            async with self.sessionmaker() as db:
                await db.execute(update(Device).where(Device.online).values(
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

    async def drop_all(self, reason: str) -> None:
        """Close every session of this node (the devices reconnect); the node keeps
        running. Used when the cluster declared this node dead while it was stalled."""
        sessions = list(self.sessions.values())
        for s in sessions:
            with contextlib.suppress(Exception):
                await s.link.disconnect(reason)
        await asyncio.gather(*(s.close(reason) for s in sessions), return_exceptions=True)

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
        """Does ``secret`` match the device's MQTT secret? (A denied device with its right
        secret passes here; :meth:`open` then refuses it as not authorized.)"""
        async with self.sessionmaker() as db:
            return await credentials.verify_mqtt_secret(db, device_id, secret,
                                                        denied_ok=True) is not None

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

    async def check_device_key(self, device_id: str, key: credentials.PublicKey
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

    async def pin_device_key(self, device_id: str, key: credentials.PublicKey) -> bool:
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
        if decision == "accepted" and row is not None and row.sim_off is not None:
            decision, reason = "denied", sims.DEACTIVATED_REASON
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
        session.firmware_version = hello.firmware_version
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
                                 system_version=hello.system_version, node=self.node_id)
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

    async def record_cellular(self, device_id: str, iccid: str | None) -> bool:
        """Store that the device is cellular, with its SIM ``iccid`` when it reported one;
        True when that SIM is deactivated."""
        async with self.sessionmaker() as db:
            device = await db.get(Device, device_id)
            if device is None:
                return False
            off = False
            if iccid is not None:
                off = (await sims.attach(db, device, iccid)).deactivated_at is not None
            else:
                device.cellular = True
            await db.commit()
        return off

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
            # a SIM whose row is gone (released) is not held: reported again, it is recorded
            cellular=bool(row.cellular), iccid=row.iccid if row.sim_iccid is not None else None,
        )
        return facts, list(row.functions or []), dict(row.variables or {})


# what a connection needs of its device: key, admission state, tenancy, limits, last describe
_FACTS = (
    select(Device.id, Device.product_id, Device.owner_user_id, Device.customer_id,
           Device.development, Device.platform_id, Device.functions, Device.variables,
           Device.quarantined, Device.denied, Device.public_key_der, Device.cellular,
           Device.first_online_at, Product.org_id, Product.settings, Device.iccid,
           Sim.iccid.label("sim_iccid"), Sim.deactivated_at.label("sim_off"))
    .outerjoin(Product, Product.id == Device.product_id)
    .outerjoin(Sim, Sim.iccid == Device.iccid)
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


__all__ = ["DeviceSession", "SessionHub", "SessionObserver", "publish_after_commit"]
