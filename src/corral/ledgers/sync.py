"""The ledger sync engine: brings connected devices the cloud-to-device ledgers they lack,
records what they applied, and takes their device-to-cloud writes (docs/mqtt.md "Ledgers").

One per node, next to the session hub (it is the hub's :class:`LedgerPort`):

* a device subscribes to ``devices/{id}/ledgers/#`` (or resumes a session that had) ->
  every cloud-to-device ledger that reaches it whose version it has not acknowledged is
  sent; a ``ledgers/sync`` says what it holds instead (a device that lost its storage sends
  ``{"have": {}}`` and gets everything);
* an instance of a cloud-to-device ledger changes (any node, :mod:`corral.ledgers.signals`
  on the bus after commit) -> the devices of this node it may reach are synced again;
* ``ledgers/{name}/applied`` records the version the device applied (never lowering it);
* ``ledgers/{name}/set`` writes the device's own device-to-cloud instance (a new version,
  checked against the ledger's limit and schema, audited as the device).

A device's version of a ledger is its own sequence (:class:`LedgerDeviceState`): it rises
by one whenever the instances its document is merged from change, so it never goes down,
also across a move to another product. Documents are sent after the state commits. Ledger
traffic is not metered (like firmware). Particle devices are not synced: Device OS's ledger
messages are not in ``../shared/reference`` (docs/particle-udp.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from corral.auth.subject import Subject
from corral.bus.base import Bus, Message, Subscription
from corral.db.session import commit
from corral.devices.models import Device
from corral.kit import clock
from corral.kit.errors import CorralError, PayloadTooLarge
from corral.ledgers import schemas as S
from corral.ledgers import service
from corral.ledgers.signals import SUBJECT
from corral.ledgers.sync_models import LedgerDeviceState
from corral.orgs.models import Organization
from corral.sessions.core import SessionHub
from corral.sessions.link import Refused
from corral.sessions.session import DeviceSession

log = logging.getLogger("corral.ledgers.sync")

MAX_RUNS = 16  # devices synced at once per node (a product-wide change reaches many)


def device_actor(device_id: str) -> Subject:
    """Who a device's own write is recorded as (``updated_by``, the audit log)."""
    return Subject(kind="device", token_id=0, client=f"device:{device_id}")


class LedgerSync:
    """One node's ledger sync (started by the web Runtime next to the session hub)."""

    def __init__(self, sessionmaker: async_sessionmaker[AsyncSession], hub: SessionHub,
                 bus: Bus) -> None:
        self.sessionmaker = sessionmaker
        self.hub = hub
        self.bus = bus
        self.slots = asyncio.Semaphore(MAX_RUNS)
        self.sent = 0  # documents handed to devices
        self._takers: dict[str, DeviceSession] = {}  # devices that take ledgers
        self._runs: dict[str, asyncio.Task[None]] = {}
        self._again: dict[str, tuple[DeviceSession, dict[str, int] | None]] = {}
        self._sub: Subscription | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        self.hub.ledgers = self
        self._sub = await self.bus.subscribe(SUBJECT, self._on_changed)

    async def stop(self) -> None:
        if self.hub.ledgers is self:
            self.hub.ledgers = None
        if self._sub is not None:
            with contextlib.suppress(Exception):
                await self._sub.unsubscribe()
            self._sub = None
        runs = list(self._runs.values())
        for t in runs:
            t.cancel()
        await asyncio.gather(*runs, return_exceptions=True)
        self._runs.clear()
        self._again.clear()

    async def idle(self, within: float = 30.0) -> None:
        """Wait until no sync is in progress (tests)."""
        async with asyncio.timeout(within):
            while self._runs:
                await asyncio.gather(*self._runs.values(), return_exceptions=True)

    # -- LedgerPort --------------------------------------------------------------------------

    def wanted(self, session: DeviceSession, have: dict[str, int] | None) -> None:
        self._takers[session.device_id] = session
        self._schedule(session, have)

    async def applied(self, session: DeviceSession, name: str, version: int) -> None:
        async with self.sessionmaker() as db:
            ledger_id = await self._ledger_id(db, session.device_id, name)
            if ledger_id is None:
                return  # not a ledger of this device (any more): nothing to record
            await db.execute(update(LedgerDeviceState).where(
                LedgerDeviceState.device_id == session.device_id,
                LedgerDeviceState.ledger_id == ledger_id,
                LedgerDeviceState.version >= version,
                (LedgerDeviceState.applied_version.is_(None))
                | (LedgerDeviceState.applied_version < version),
            ).values(applied_version=version, applied_at=clock.now()))
            await commit(db)

    async def written(self, session: DeviceSession, name: str, data: dict[str, Any], *,
                      merge: bool) -> None:
        did = session.device_id
        async with self.sessionmaker() as db:
            device = await db.get(Device, did)
            ledger = None
            if device is not None:
                ledger = next((d for d in await service.definitions_for_device(
                    db, device, S.DEVICE_TO_CLOUD) if d.name == name), None)
            if device is None or ledger is None or ledger.scope != S.DEVICE:
                raise Refused("forbidden", f"{name!r} is not a device-to-cloud ledger of "
                              "this device")
            org = await db.get(Organization, ledger.org_id)
            assert org is not None
            ref = service.ScopeRef(S.DEVICE, did, did, device.name, device.product_id)
            try:
                await service.set_instance(db, org, ledger, ref, data,
                                           S.MERGE if merge else S.REPLACE,
                                           actor=device_actor(did), ip="")
                await commit(db)
            except service.SchemaViolation as exc:
                where = "; ".join(f"{v['path']}: {v['message']}" for v in exc.violations[:5])
                raise Refused("invalid", f"Invalid Schema: {where}"[:500]) from None
            except PayloadTooLarge as exc:
                raise Refused("too_large", exc.description) from None
            except CorralError as exc:
                raise Refused("invalid", exc.description) from None

    # -- changes from the API (any node) -----------------------------------------------------

    async def _on_changed(self, msg: Message) -> None:
        try:
            body = msg.json()
            level, key = str(body["level"]), str(body["key"])
        except (ValueError, KeyError, TypeError, AttributeError):
            return
        for did, session in list(self._takers.items()):
            if session.closed or self.hub.sessions.get(did) is not session:
                self._takers.pop(did, None)
                continue
            facts = session.facts
            if ((level == S.DEVICE and did == key)
                    or (level == S.PRODUCT and str(facts.product_id) == key)
                    or level == S.OWNER):  # the run finds whether the org's ledger reaches it
                self._schedule(session, None)

    # -- runs ----------------------------------------------------------------------------------

    def _schedule(self, session: DeviceSession, have: dict[str, int] | None) -> None:
        did = session.device_id
        if session.closed:
            return
        if did in self._runs:
            prev = self._again.get(did)
            # an explicit "have" is kept over a later plain change
            self._again[did] = (session, have if have is not None else
                                (prev[1] if prev is not None else None))
            return
        task = asyncio.get_running_loop().create_task(self._run(session, have),
                                                      name=f"ledgers-{did}")
        self._runs[did] = task
        task.add_done_callback(lambda t, d=did: self._ran(d, t))

    def _ran(self, did: str, task: asyncio.Task[None]) -> None:
        if self._runs.get(did) is task:
            del self._runs[did]
        if not task.cancelled() and task.exception() is not None:
            log.error("ledger sync of %s failed", did, exc_info=task.exception())
        again = self._again.pop(did, None)
        if again is not None and not task.cancelled():
            self._schedule(*again)

    async def _run(self, session: DeviceSession, have: dict[str, int] | None) -> None:
        async with self.slots:
            if session.closed:
                return
            out = await self._plan(session.device_id, have)
        for name, doc in out:
            if session.closed:
                return
            if await session.link.deliver_ledger(name, doc):
                self.sent += 1

    async def _plan(self, did: str, have: dict[str, int] | None
                    ) -> list[tuple[str, dict[str, Any]]]:
        """Bring the device's states up to date (committed) and return the documents it
        lacks."""
        out: list[tuple[str, dict[str, Any]]] = []
        async with self.sessionmaker() as db:
            device = await db.get(Device, did)
            if device is None:
                return out
            ledgers = await service.definitions_for_device(db, device, S.CLOUD_TO_DEVICE)
            if not ledgers:
                return out
            states = {s.ledger_id: s for s in (await db.execute(select(LedgerDeviceState).where(
                LedgerDeviceState.device_id == did))).scalars()}
            now = clock.now()
            for ledger in ledgers:
                data, versions = await service.effective_for_device(db, device, ledger)
                if not any(versions):
                    continue  # never written at any level: nothing to hold
                source = ".".join(map(str, versions))
                st = states.get(ledger.id)
                if st is None:
                    st = LedgerDeviceState(device_id=did, ledger_id=ledger.id, version=0,
                                           source="")
                    db.add(st)
                if st.source != source:
                    st.version, st.source = st.version + 1, source
                held = have.get(ledger.name) if have is not None else st.applied_version
                if held != st.version:
                    st.sent_at = now
                    out.append((ledger.name, {"name": ledger.name, "version": st.version,
                                              "scope": ledger.scope, "data": data}))
            try:
                await commit(db)
            except (IntegrityError, CorralError):  # another node synced it meanwhile
                log.info("ledger states of %s changed meanwhile; synced next time", did)
                return []
        return out

    async def _ledger_id(self, db: AsyncSession, did: str, name: str) -> int | None:
        device = await db.get(Device, did)
        if device is None:
            return None
        for ledger in await service.definitions_for_device(db, device, S.CLOUD_TO_DEVICE):
            if ledger.name == name:
                return ledger.id
        return None
