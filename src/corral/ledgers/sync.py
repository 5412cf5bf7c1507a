"""The ledger sync engine: brings connected devices the cloud-to-device ledgers they lack,
records what they applied, and takes their device-to-cloud writes (docs/mqtt.md "Ledgers").

One per node, next to the session hub (it is the hub's :class:`LedgerPort`). Work is
batched: devices to sync wait in one queue that a single task drains up to 500 at a time (a
few queries and one commit per batch, however many devices a product-wide change reaches),
and acknowledgements are written together every 50 ms.

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
from collections import defaultdict
from typing import Any

from sqlalchemy import and_, bindparam, or_, select
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
from corral.ledgers.models import LedgerDefinition, LedgerInstance
from corral.ledgers.signals import SUBJECT
from corral.ledgers.sync_models import LedgerDeviceState
from corral.orgs.models import Organization
from corral.sessions.core import SessionHub
from corral.sessions.link import Refused
from corral.sessions.session import DeviceSession

log = logging.getLogger("corral.ledgers.sync")

BATCH = 500  # devices planned in one transaction
ACK_FLUSH_S = 0.05  # acknowledgements are written together this often
Planned = list[tuple[DeviceSession, str, dict[str, Any]]]


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
        self.sent = 0  # documents handed to devices
        self._takers: dict[str, DeviceSession] = {}  # devices that take ledgers
        self._pending: dict[str, tuple[DeviceSession, dict[str, int] | None]] = {}
        self._acks: list[tuple[dict[str, Any], asyncio.Future[None]]] = []
        self._worker: asyncio.Task[None] | None = None
        self._acker: asyncio.Task[None] | None = None
        self._sends: set[asyncio.Task[Any]] = set()
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
        tasks = [t for t in (self._worker, self._acker) if t is not None] + list(self._sends)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._worker = self._acker = None
        self._pending.clear()
        for _, done in self._acks:
            done.cancel()
        self._acks.clear()

    async def idle(self, within: float = 30.0) -> None:
        """Wait until nothing is queued, planned or being sent (tests, bench)."""
        async with asyncio.timeout(within):
            while True:
                busy = [t for t in (self._worker, self._acker) if t is not None
                        and not t.done()] + list(self._sends)
                if not busy and not self._pending:
                    return
                await asyncio.gather(*busy, return_exceptions=True)
                await asyncio.sleep(0)

    # -- LedgerPort --------------------------------------------------------------------------

    def wanted(self, session: DeviceSession, have: dict[str, int] | None) -> None:
        self._takers[session.device_id] = session
        self._schedule(session, have)

    async def applied(self, session: DeviceSession, name: str, version: int) -> None:
        """Returns once the acknowledgement is committed (with the others of its 50 ms)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._acks.append(({"d": session.device_id, "n": name, "v": version,
                            "at": clock.now()}, done))
        if self._acker is None or self._acker.done():
            self._acker = loop.create_task(self._write_acks(), name="ledger-acks")
        await done

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
                    or level == S.OWNER):  # the plan finds whether the org's ledger reaches it
                self._schedule(session, None)

    # -- the queue -----------------------------------------------------------------------------

    def _schedule(self, session: DeviceSession, have: dict[str, int] | None) -> None:
        if session.closed:
            return
        prev = self._pending.get(session.device_id)
        # an explicit "have" is kept over a later plain change
        if have is None and prev is not None and prev[0] is session:
            have = prev[1]
        self._pending[session.device_id] = (session, have)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.get_running_loop().create_task(self._drain(),
                                                                  name="ledger-sync")

    async def _drain(self) -> None:
        while self._pending:
            batch = []
            for did in list(self._pending)[:BATCH]:
                session, have = self._pending.pop(did)
                if not session.closed:
                    batch.append((session, have))
            if not batch:
                continue
            try:
                planned = await self._plan(batch)
                if planned is None:  # another writer got there first: plan again once
                    planned = await self._plan(batch) or []
            except Exception:
                log.exception("ledger sync of %d devices failed", len(batch))
                continue
            if planned:
                task = asyncio.get_running_loop().create_task(self._send(planned))
                self._sends.add(task)
                task.add_done_callback(self._sends.discard)

    async def _send(self, planned: Planned) -> None:
        async def one(session: DeviceSession, name: str, doc: dict[str, Any]) -> None:
            if not session.closed and await session.link.deliver_ledger(name, doc):
                self.sent += 1

        await asyncio.gather(*(one(*p) for p in planned), return_exceptions=True)

    async def _plan(self, batch: list[tuple[DeviceSession, dict[str, int] | None]]
                    ) -> Planned | None:
        """Bring the devices' states up to date (committed) and return the documents they
        lack; None when a concurrent writer made the commit fail."""
        out: Planned = []
        ids = [s.device_id for s, _ in batch]
        async with self.sessionmaker() as db:
            devices = {d.id: d for d in (await db.execute(
                select(Device).where(Device.id.in_(ids)))).scalars()}
            org_of = await service.orgs_of_devices(db, list(devices.values()))
            orgs = set(org_of.values())
            if not orgs:
                return out
            ledgers = list((await db.execute(select(LedgerDefinition).where(
                LedgerDefinition.org_id.in_(orgs), LedgerDefinition.archived_at.is_(None),
                LedgerDefinition.direction == S.CLOUD_TO_DEVICE)
                .order_by(LedgerDefinition.name))).scalars())
            if not ledgers:
                return out
            by_org: dict[int, list[LedgerDefinition]] = defaultdict(list)
            for ledger in ledgers:
                by_org[ledger.org_id].append(ledger)
            lids = [ledger.id for ledger in ledgers]
            products = {str(d.product_id) for d in devices.values() if d.product_id is not None}
            rows: dict[int, dict[tuple[str, str], LedgerInstance]] = defaultdict(dict)
            for inst in (await db.execute(select(LedgerInstance).where(
                    LedgerInstance.ledger_id.in_(lids), or_(
                        and_(LedgerInstance.level == S.OWNER,
                             LedgerInstance.scope_key.in_([str(o) for o in orgs])),
                        and_(LedgerInstance.level == S.PRODUCT,
                             LedgerInstance.scope_key.in_(products)),
                        and_(LedgerInstance.level == S.DEVICE,
                             LedgerInstance.scope_key.in_(ids)))))).scalars():
                rows[inst.ledger_id][(inst.level, inst.scope_key)] = inst
            states = {(st.device_id, st.ledger_id): st for st in (await db.execute(
                select(LedgerDeviceState).where(LedgerDeviceState.device_id.in_(ids),
                                                LedgerDeviceState.ledger_id.in_(lids))
            )).scalars()}
            now = clock.now()
            for session, have in batch:
                device = devices.get(session.device_id)
                if device is None or device.id not in org_of:
                    continue
                for ledger in by_org[org_of[device.id]]:
                    data, versions = service.merge_levels(service.levels_for(ledger, device),
                                                          rows[ledger.id])
                    if not any(versions):
                        continue  # never written at any level: nothing to hold
                    source = ".".join(map(str, versions))
                    st = states.get((device.id, ledger.id))
                    if st is None:
                        st = states[(device.id, ledger.id)] = LedgerDeviceState(
                            device_id=device.id, ledger_id=ledger.id, version=0, source="")
                        db.add(st)
                    if st.source != source:
                        st.version, st.source = st.version + 1, source
                    held = have.get(ledger.name) if have is not None else st.applied_version
                    if held != st.version:
                        st.sent_at = now
                        out.append((session, ledger.name, {
                            "name": ledger.name, "version": st.version, "scope": ledger.scope,
                            "data": data}))
            try:
                await commit(db)
            except (IntegrityError, CorralError):
                log.info("ledger states of %d devices changed meanwhile", len(batch))
                return None
        return out

    # -- acknowledgements ------------------------------------------------------------------------

    async def _write_acks(self) -> None:
        """Write the acknowledgements gathered meanwhile in one transaction (never lowering
        ``applied_version``, never above what was sent), until none are left."""
        state = LedgerDeviceState.__table__
        stmt = state.update().where(
            state.c.device_id == bindparam("d"),
            state.c.ledger_id.in_(select(LedgerDefinition.id).where(
                LedgerDefinition.name == bindparam("n"),
                LedgerDefinition.direction == S.CLOUD_TO_DEVICE)),
            state.c.version >= bindparam("v"),
            or_(state.c.applied_version.is_(None), state.c.applied_version < bindparam("v")),
        ).values(applied_version=bindparam("v"), applied_at=bindparam("at"))
        while self._acks:
            await asyncio.sleep(ACK_FLUSH_S)
            acks, self._acks = self._acks, []
            try:
                async with self.sessionmaker() as db:
                    await db.execute(stmt, [params for params, _ in acks])
                    await commit(db)
            except Exception as exc:
                log.exception("%d ledger acknowledgements not written", len(acks))
                for _, done in acks:
                    if not done.done():
                        done.set_exception(Refused("busy", f"not recorded: {exc!r}"[:200]))
                continue
            for _, done in acks:
                if not done.done():
                    done.set_result(None)
