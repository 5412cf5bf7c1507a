"""The firmware delivery engine: brings connected devices to the firmware the precedence
rules give them, over whichever transport they use.

It follows the session hub as a :class:`~corral.sessions.session.SessionObserver`:

* a device connects (Particle: its Hello carries its version; MQTT: its first describe
  does) -> standard releases ("update a device when it next connects");
* a ``firmware`` control op on ``device.<id>.control`` (intelligent release, lock + flash)
  -> the device's node updates it at once;
* an intelligent release announced on ``firmware.released`` -> devices of that product that
  connected in the last :data:`RECHECK_S` seconds and were checked on connect are checked
  again. The release sends intents only to devices stored as online when it read them, and a
  device's online state is stored in the event writer's next batch; a device whose connect
  check ran before the release committed, and whose online state was not yet stored when the
  release read it, would otherwise wait for its next connect;
* a describe that changes ``updates_enabled`` (Particle: the device's
  ``particle/device/updates/enabled`` event) -> a deferred update goes ahead.

For one device, one run at a time. A run asks :func:`~corral.firmware.updates.plan_update`;
a device with updates disabled gets the update ``deferred`` (unless forced) and is told an
update is pending; otherwise the update moves to ``sending`` and the transport transfers it
(``DeviceLink.deliver_firmware``), at most ``firmware_max_transfers`` at once per node.

``bytes_sent == size`` means the device holds the whole image and accepted it; it reboots and
reconnects. On that connect the update is ``applied`` when the device reports the target
version, ``failed`` ("came back on version N") when it reports another. A transfer cut by a
disconnect stays ``sending`` with fewer bytes and is retried on the next connect, after a
backoff (``firmware_retry_backoff_s``, doubling per attempt); a transfer the device refuses is
retried in the same session after the backoff; after ``firmware_max_attempts`` attempts the
update is ``failed``. A device whose last update to a firmware failed is not retried on
connect (a new release, a flash or an intelligent release start again).

A binary flashed to one device (:mod:`corral.firmware.flash`, an update with ``binary_id``)
goes first and the same way, unsigned; it is ``applied`` when the device comes back on its
PRODUCT_VERSION, or, for a binary without one, when it comes back after taking the whole
image (there is nothing else to tell it by).

Events (cloud-sourced, in the device's stream, never metered): ``spark/flash/status``
``started`` | ``success`` | ``failed``; ``particle/device/updates/pending`` and
``particle/device/updates/forced``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
from dataclasses import dataclass
from typing import Any

from sqlalchemy import exists, select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from corral.bus.base import Message, Subscription
from corral.devices.cohort_models import Cohort, CohortMember
from corral.devices.models import Device
from corral.firmware import links, signing, updates
from corral.firmware.models import (
    OPEN_STATES,
    DeviceBinary,
    DeviceUpdate,
    FirmwareGroupRelease,
    ProductFirmware,
    SigningKey,
)
from corral.firmware.signals import RELEASED
from corral.firmware.storage import blob_path
from corral.kit import clock
from corral.sessions.core import SessionHub
from corral.sessions.link import FirmwareImage, Hello, TransferResult
from corral.sessions.lookup import DeviceRows
from corral.sessions.session import DeviceSession
from corral.settings import Settings

log = logging.getLogger("corral.firmware.delivery")

FLASH_STATUS = "spark/flash/status"
UPDATES_PENDING = "particle/device/updates/pending"
UPDATES_FORCED = "particle/device/updates/forced"
TRIGGERS = {"binary", "flash", "intelligent", "lock", "release"}
RECHECK_S = 60.0  # how far back an intelligent release looks for connects it may have missed


@dataclass(frozen=True)
class _Step:
    """What a run does next: transfer ``image`` for ``update_id``, or wait ``delay`` s."""

    update_id: int = 0
    image: FirmwareImage | None = None
    delay: float = 0.0


def backoff_s(settings: Settings, attempts: int) -> float:
    """How long after its ``attempts``-th attempt an update is tried again."""
    if attempts <= 0:
        return 0.0
    base = settings.firmware_retry_backoff_s
    return float(min(settings.firmware_retry_backoff_max_s, base * 2 ** (attempts - 1)))


def _aware(when: dt.datetime) -> dt.datetime:
    return when if when.tzinfo is not None else when.replace(tzinfo=dt.UTC)


class FirmwareDelivery:
    """One node's delivery engine (started by the web Runtime next to the session hub)."""

    def __init__(self, settings: Settings, sessionmaker: async_sessionmaker[AsyncSession],
                 hub: SessionHub) -> None:
        self.settings = settings
        self.sessionmaker = sessionmaker
        self.hub = hub
        self.base_url: str | None = None  # download links' base; default: the public URL
        self.slots = asyncio.Semaphore(settings.firmware_max_transfers)
        self.transfers = 0  # in progress now
        self.peak_transfers = 0
        self.completed = 0  # transfers that ended ok (the device has the image)
        self._runs: dict[str, asyncio.Task[None]] = {}
        self._again: dict[str, tuple[DeviceSession, str]] = {}
        self._checked: dict[str, str] = {}  # device -> the session id its connect was checked in
        self._delivered: dict[str, str] = {}  # device -> the session that got a whole image
        self._tasks: set[asyncio.Task[Any]] = set()
        self._released_sub: Subscription | None = None
        # on connect, one coalesced read says whether there can be anything to do at all
        self._connect_rows = DeviceRows(sessionmaker.kw["bind"], _CONNECT_CHECK)

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        if self not in self.hub.observers:
            self.hub.observers.append(self)
        if self._released_sub is None:
            self._released_sub = await self.hub.bus.subscribe(RELEASED, self._on_released)

    async def stop(self) -> None:
        with contextlib.suppress(ValueError):
            self.hub.observers.remove(self)
        sub, self._released_sub = self._released_sub, None
        if sub is not None:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        tasks = [*self._runs.values(), *self._tasks]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._runs.clear()
        self._again.clear()

    async def idle(self, within: float = 30.0) -> None:
        """Wait until no run is in progress (tests, bench)."""
        async with asyncio.timeout(within):
            while self._runs or self._tasks:
                await asyncio.gather(*self._runs.values(), *self._tasks,
                                     return_exceptions=True)

    # -- SessionObserver ---------------------------------------------------------------------

    def opened(self, session: DeviceSession, hello: Hello) -> None:
        self._delivered.pop(session.device_id, None)
        if hello.firmware_version is not None:  # Particle: the Hello says what it runs
            self._checked[session.device_id] = session.id
            self.check(session, "connect")

    def described(self, session: DeviceSession, *, firmware_version: int | None,
                  updates_enabled: bool | None) -> None:
        first = self._checked.get(session.device_id) != session.id
        if first or firmware_version is not None or updates_enabled is not None:
            self._checked[session.device_id] = session.id
            self.check(session, "connect")

    def control(self, session: DeviceSession, body: dict[str, Any]) -> None:
        if body.get("op") == "firmware":
            trigger = body.get("trigger")
            self.check(session, trigger if trigger in TRIGGERS else "flash")

    async def _on_released(self, msg: Message) -> None:
        try:
            body = msg.json()
            product_id = int(body["product_id"])
        except (ValueError, TypeError, KeyError):
            log.warning("a firmware.released message without a product: %r", msg.data[:200])
            return
        self.released(product_id)

    def released(self, product_id: int) -> int:
        """An intelligent release of ``product_id`` committed: check again this node's
        devices of that product that connected in the last :data:`RECHECK_S` seconds and
        whose connect check has started (one not yet checked sees the release when it is).
        A device that already got the release's intent has its update open, and the check
        finds it so. How many were checked."""
        since = clock.now() - dt.timedelta(seconds=RECHECK_S)
        n = 0
        for session in list(self.hub.sessions.values()):
            if (session.facts.product_id == product_id and not session.closed
                    and self._checked.get(session.device_id) == session.id
                    and _aware(session.handshake_at) >= since):
                self.check(session, "intelligent")
                n += 1
        return n

    # -- runs ----------------------------------------------------------------------------------

    def check(self, session: DeviceSession, trigger: str) -> None:
        """Look at ``session``'s device now (a run is started, or queued behind the
        running one)."""
        did = session.device_id
        if session.closed:
            return
        if did in self._runs:
            self._again[did] = (session, trigger)
            return
        task = asyncio.get_running_loop().create_task(self._run(session, trigger),
                                                      name=f"firmware-{did}")
        self._runs[did] = task
        task.add_done_callback(lambda t, d=did: self._ran(d, t))

    def _ran(self, did: str, task: asyncio.Task[None]) -> None:
        if self._runs.get(did) is task:
            del self._runs[did]
        if not task.cancelled() and task.exception() is not None:
            log.error("firmware delivery to %s failed", did, exc_info=task.exception())
        again = self._again.pop(did, None)
        if again is not None and not task.cancelled():
            self.check(*again)

    async def _run(self, session: DeviceSession, trigger: str) -> None:
        # each attempt takes at most two passes (a backoff wait, a transfer)
        for _ in range(2 * self.settings.firmware_max_attempts + 2):
            if session.closed:
                return
            step = await self._prepare(session, trigger)
            if step is None:
                return
            if step.image is None:
                await asyncio.sleep(step.delay)
                continue
            result = await self._transfer(session, step)
            if await self._finish(session, step, result):
                return

    async def _prepare(self, session: DeviceSession, trigger: str) -> _Step | None:
        """Decide, record, commit; what to transfer (None: nothing to do now)."""
        did = session.device_id
        cfg = self.settings
        if trigger == "connect" and not _may_have_work(await self._connect_rows.get(did)):
            return None  # no open update, no lock, and its product has released nothing
        notes: list[tuple[str, str]] = []  # events to emit after the commit
        pending = False
        async with self.sessionmaker() as db:
            device = await db.get(Device, did)
            if device is None:
                return None
            reported = device.firmware_version
            u = await updates.open_update(db, did)
            if self._delivered.get(did) == session.id:
                return None  # it holds the new image and is about to restart
            if u is not None and u.state == "sending":
                size, versioned = await _delivered_size(db, u)
                whole = u.bytes_sent >= size
                # a binary is judged only once it was taken whole (the device may have run
                # that version before it was flashed)
                if versioned and reported == u.target_version and (
                        whole or u.binary_id is None):
                    await updates.mark_applied(db, u.id)
                    await db.commit()
                    return None
                if whole:  # it had the whole image and restarted
                    if versioned:  # on another version
                        await updates.mark_failed(
                            db, u.id, f"The device came back on version {reported}")
                        await db.commit()
                        await self._emit(session, [(FLASH_STATUS, "failed")])
                    else:  # a binary without a version: its restart is all there is to see
                        await updates.mark_applied(db, u.id)
                        await db.commit()
                    return None
            payload: ProductFirmware | DeviceBinary | None
            if u is not None and u.binary_id is not None:
                # a binary flashed to this device goes first (it was asked for now)
                payload = await db.get(DeviceBinary, u.binary_id)
                forced_by_plan = device.firmware_updates_forced
                if payload is None:
                    await updates.mark_failed(db, u.id, "The binary is no longer stored")
                    await db.commit()
                    return None
            else:
                if device.product_id is None:
                    return None
                plan = await updates.plan_update(db, cfg, did)
                if plan is None:
                    return None
                if trigger == "connect" and (u is None or u.firmware_id != plan.firmware_id):
                    last = (await db.execute(select(DeviceUpdate.state).where(
                        DeviceUpdate.device_id == did,
                        DeviceUpdate.firmware_id == plan.firmware_id)
                        .order_by(DeviceUpdate.id.desc()).limit(1))).scalar_one_or_none()
                    if last == "failed":
                        return None
                payload = await db.get(ProductFirmware, plan.firmware_id)
                if payload is None:
                    return None
                forced_by_plan = plan.forced
                u = await updates.begin_update(
                    db, device_id=did, product_id=device.product_id, fw=payload,
                    trigger="release" if trigger == "connect" else trigger,
                    rollout_id=plan.rollout_id, from_version=reported,
                    transport=session.link.transport)
            if not device.firmware_updates_enabled and not forced_by_plan:
                pending = True  # told on every connect: the device may have forgotten
                if u.state != "deferred":
                    await updates.mark_deferred(db, u.id, "The device has firmware updates "
                                                          "disabled")
                    notes.append((UPDATES_PENDING, "true"))
                await db.commit()
            elif u.attempts >= cfg.firmware_max_attempts:
                await updates.mark_failed(db, u.id, f"Gave up after {u.attempts} attempts: "
                                          f"{u.reason or 'the transfer did not finish'}")
                await db.commit()
                notes.append((FLASH_STATUS, "failed"))
            else:
                wait = backoff_s(cfg, u.attempts) - max(
                    0.0, (clock.now() - _aware(u.updated_at)).total_seconds())
                if u.attempts and wait > 0:
                    await db.commit()
                    return _Step(delay=wait)
                image = await self._image(db, payload, u, did)
                forced = not device.firmware_updates_enabled
                if forced:
                    notes.append((UPDATES_FORCED, "true"))
                await updates.mark_sending(db, u.id, transport=session.link.transport)
                await db.commit()
                await self._emit(session, notes)
                if forced:  # the device applies it although it has updates disabled
                    with contextlib.suppress(Exception):
                        await session.link.update_notice("forced", True)
                return _Step(update_id=u.id, image=image)
        await self._emit(session, notes)
        if pending:
            with contextlib.suppress(Exception):
                await session.link.update_notice("pending", True)
        return None

    async def _image(self, db: AsyncSession, payload: ProductFirmware | DeviceBinary,
                     u: DeviceUpdate, did: str) -> FirmwareImage:
        base = (self.base_url or self.settings.resolved_public_url()).rstrip("/")
        if isinstance(payload, DeviceBinary):  # unsigned: it belongs to no product's keys
            token = links.make_token(self.settings, device_id=did, firmware_id=0,
                                     update_id=u.id)
            return FirmwareImage(
                version=u.target_version, size=payload.size, sha256=payload.sha256,
                path=blob_path(self.settings, payload.sha256),
                url=f"{base}/v1/firmware/downloads/{token}",
                chunk_size=self.settings.firmware_download_chunk_bytes)
        fw = payload
        keys = (await db.execute(select(SigningKey.public_key).where(
            SigningKey.product_id == fw.product_id, SigningKey.revoked_at.is_(None))
            .order_by(SigningKey.id))).scalars()
        token = links.make_token(self.settings, device_id=did, firmware_id=fw.id,
                                 update_id=u.id)
        return FirmwareImage(
            version=fw.version, size=fw.size, sha256=fw.sha256,
            path=blob_path(self.settings, fw.sha256),
            url=f"{base}/v1/firmware/downloads/{token}",
            signature=signing.b64(fw.signature) if fw.signature else None,
            key_id=fw.signing_key_id, public_keys=tuple(signing.b64(k) for k in keys),
            chunk_size=self.settings.firmware_download_chunk_bytes)

    async def _transfer(self, session: DeviceSession, step: _Step) -> TransferResult:
        assert step.image is not None
        await self._emit(session, [(FLASH_STATUS, "started")])
        size = step.image.size
        every = max(1, size // 4)  # progress is recorded at most every quarter
        state: dict[str, Any] = {"next": every, "task": None}

        def progress(sent: int, total: int) -> None:
            task = state["task"]
            if sent < state["next"] or sent >= size or (task is not None and not task.done()):
                return
            state["next"] = sent + every
            state["task"] = asyncio.get_running_loop().create_task(
                self._progress(step.update_id, sent))

        async with self.slots:
            self.transfers += 1
            self.peak_transfers = max(self.peak_transfers, self.transfers)
            try:
                return await session.link.deliver_firmware(step.image, progress=progress)
            except Exception as exc:  # a transport bug must not leave the update hanging
                log.exception("firmware transfer to %s failed", session.device_id)
                return TransferResult(False, f"internal error: {exc!r}"[:200],
                                      dropped=session.closed)
            finally:
                self.transfers -= 1
                if state["task"] is not None:  # its write lands before the outcome's
                    await asyncio.gather(state["task"], return_exceptions=True)

    async def _progress(self, update_id: int, sent: int) -> None:
        try:
            async with self.sessionmaker() as db:
                await updates.record_progress(db, update_id, sent)
                await db.commit()
        except Exception as exc:
            log.debug("progress of update %s not recorded: %r", update_id, exc)

    async def _finish(self, session: DeviceSession, step: _Step, result: TransferResult
                      ) -> bool:
        """Record how the transfer went; True when the run is over, False to try again."""
        assert step.image is not None
        size = step.image.size
        async with self.sessionmaker() as db:
            u = await db.get(DeviceUpdate, step.update_id)
            if u is None or u.state != "sending":
                return True  # cancelled meanwhile (the target moved)
            now = clock.now()
            if result.ok:
                self.completed += 1
                self._delivered[session.device_id] = session.id
                u.bytes_sent = size
                u.reason = (f"Transferred; the device restarts on version "
                            f"{u.target_version}")
                u.updated_at = now
                await db.commit()
                await self._emit(session, [(FLASH_STATUS, "success")])
                return True
            # never "complete" unless the device accepted the whole image
            u.bytes_sent = min(max(u.bytes_sent, result.bytes_sent), max(0, size - 1))
            u.reason = result.reason[:updates.MAX_REASON]
            u.updated_at = now
            over = True
            if not (result.dropped or session.closed):
                if not result.retry:
                    await updates.mark_failed(db, u.id, result.reason)
                elif u.attempts >= self.settings.firmware_max_attempts:
                    await updates.mark_failed(db, u.id, f"Gave up after {u.attempts} attempts: "
                                              f"{result.reason}")
                else:
                    over = False  # refused or broken in this session: again after a backoff
            await db.commit()
        await self._emit(session, [(FLASH_STATUS, "failed")])
        return over

    async def _emit(self, session: DeviceSession, notes: list[tuple[str, str]]) -> None:
        for name, data in notes:
            try:
                await session.system_event(name, data)
            except Exception as exc:
                log.info("event %s of %s not stored: %r", name, session.device_id, exc)


__all__ = ["FLASH_STATUS", "UPDATES_FORCED", "UPDATES_PENDING", "FirmwareDelivery",
           "backoff_s"]


# Whether a connecting device can have firmware work at all: an update still open, a lock,
# or a release in its product (a product default or a group release; rollouts are always
# one of these). Read for a storm of connects in a few coalesced queries, where the full
# check (an ORM session, the resolver) cost ~5 ms of CPU per connect.
_CONNECT_CHECK = select(
    Device.id, Device.product_id, Device.desired_firmware_version,
    exists().where(DeviceUpdate.device_id == Device.id,
                   DeviceUpdate.state.in_(OPEN_STATES)).label("open_update"),
    exists().where(ProductFirmware.product_id == Device.product_id,
                   ProductFirmware.product_default.is_(True)).label("has_default"),
    exists().where(FirmwareGroupRelease.product_id == Device.product_id
                   ).label("has_group_release"),
    exists().where(CohortMember.device_id == Device.id, Cohort.id == CohortMember.cohort_id,
                   Cohort.firmware_id.is_not(None)).label("has_cohort_release"),
)


def _may_have_work(row: Any) -> bool:
    if row is None:
        return False
    if row.open_update:  # product firmware, or a binary flashed to this device
        return True
    if row.product_id is None:
        return False
    return bool(row.desired_firmware_version is not None or row.has_default
                or row.has_group_release or row.has_cohort_release)


async def _delivered_size(db: AsyncSession, u: DeviceUpdate) -> tuple[int, bool]:
    """The size of what ``u`` delivers, and whether the device's reported version tells
    whether it runs it (product firmware, or a binary with a PRODUCT_VERSION)."""
    if u.binary_id is not None:
        b = await db.get(DeviceBinary, u.binary_id)
        return (b.size if b is not None else 0,
                b is not None and b.product_version is not None)
    fw = await db.get(ProductFirmware, u.firmware_id) if u.firmware_id is not None else None
    return (fw.size if fw is not None else 0), True
