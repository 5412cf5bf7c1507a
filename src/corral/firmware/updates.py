"""Per-device update state, for the delivery engine (OTA over the Particle and MQTT
transports). The engine asks :func:`plan_update` what a device should get when it connects,
records the attempt with :func:`begin_update`, and moves it with :func:`mark_sending`,
:func:`record_progress`, :func:`mark_deferred`, :func:`mark_applied` and
:func:`mark_failed`. Like every service, these never commit; the caller's transaction does.

Transitions (anything else is a 409 ``Conflict``)::

    pending  -> sending | deferred | failed | cancelled
    sending  -> sending (a retry or resume) | deferred | applied | failed | cancelled
    deferred -> sending | failed | cancelled
    applied, failed, cancelled: final

Finishing an update of a rollout checks the rollout's failure threshold (it may pause).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from corral.devices.models import Device
from corral.firmware.models import OPEN_STATES, DeviceUpdate, ProductFirmware
from corral.firmware.resolver import targets_for
from corral.firmware.storage import blob_path
from corral.kit import clock
from corral.kit.errors import Conflict, NotFound
from corral.rollouts.service import check_failure_threshold
from corral.settings import Settings

ALLOWED: dict[str, frozenset[str]] = {
    "pending": frozenset({"sending", "deferred", "failed", "cancelled"}),
    "sending": frozenset({"sending", "deferred", "applied", "failed", "cancelled"}),
    "deferred": frozenset({"sending", "failed", "cancelled"}),
}
MAX_REASON = 500


@dataclass(frozen=True)
class UpdatePlan:
    """What a device should be sent now (the engine still honours the device's own
    "updates disabled" flag unless ``forced``)."""

    device_id: str
    firmware_id: int
    version: int
    from_version: int | None
    size: int
    sha256: str
    path: Path
    signature: bytes | None
    signing_key_id: str | None
    source: str  # locked | cohort | group | default
    rollout_id: int | None
    forced: bool  # firmware_updates_forced: override the device's disable
    intelligent: bool


async def plan_update(db: AsyncSession, settings: Settings, device_id: str) -> UpdatePlan | None:
    """The update ``device_id`` should get now under the precedence rules, or None: no
    target, already running it, the firmware is gone, or its rollout is paused."""
    device = await db.get(Device, device_id.lower())
    if device is None or device.product_id is None or device.quarantined or device.denied:
        return None
    target = (await targets_for(db, device.product_id, [device.id])).get(device.id)
    if target is None or target.version is None or target.held:
        return None
    if device.firmware_version == target.version:
        return None
    fw = (await db.execute(select(ProductFirmware).where(
        ProductFirmware.product_id == device.product_id,
        ProductFirmware.version == target.version))).scalar_one_or_none()
    if fw is None:
        return None
    return UpdatePlan(device_id=device.id, firmware_id=fw.id, version=fw.version,
                      from_version=device.firmware_version, size=fw.size, sha256=fw.sha256,
                      path=blob_path(settings, fw.sha256), signature=fw.signature,
                      signing_key_id=fw.signing_key_id, source=target.source,
                      rollout_id=target.rollout_id, forced=device.firmware_updates_forced,
                      intelligent=fw.intelligent)


async def open_update(db: AsyncSession, device_id: str) -> DeviceUpdate | None:
    """The device's update that has not ended yet, if any (the newest)."""
    return (await db.execute(select(DeviceUpdate).where(
        DeviceUpdate.device_id == device_id.lower(), DeviceUpdate.state.in_(OPEN_STATES))
        .order_by(DeviceUpdate.id.desc()).limit(1))).scalar_one_or_none()


async def begin_update(db: AsyncSession, *, device_id: str, product_id: int,
                       fw: ProductFirmware, trigger: str, rollout_id: int | None,
                       from_version: int | None, transport: str | None = None
                       ) -> DeviceUpdate:
    """Record that ``device_id`` is to get ``fw`` (``pending``). An open update of the same
    firmware is reused; an open one of another firmware is cancelled."""
    did = device_id.lower()
    now = clock.now()
    for u in (await db.execute(select(DeviceUpdate).where(
            DeviceUpdate.device_id == did, DeviceUpdate.state.in_(OPEN_STATES))
            .order_by(DeviceUpdate.id))).scalars():
        if u.firmware_id == fw.id:
            # updated_at stays: a failed attempt's retry backoff counts from it
            u.trigger = trigger if trigger == "flash" else u.trigger
            u.rollout_id = rollout_id if rollout_id is not None else u.rollout_id
            await db.flush()
            return u
        u.state, u.reason = "cancelled", f"Superseded by an update to version {fw.version}"
        u.finished_at = u.updated_at = now
    u = DeviceUpdate(device_id=did, product_id=product_id, firmware_id=fw.id,
                     rollout_id=rollout_id, target_version=fw.version,
                     from_version=from_version, trigger=trigger, state="pending",
                     transport=transport, created_at=now, updated_at=now)
    db.add(u)
    await db.flush()
    return u


async def _load(db: AsyncSession, update_id: int) -> DeviceUpdate:
    u = await db.get(DeviceUpdate, update_id)
    if u is None:
        raise NotFound(f"Update {update_id} not found", code="update_not_found")
    return u


def _move(u: DeviceUpdate, state: str, now: dt.datetime) -> None:
    if state not in ALLOWED.get(u.state, frozenset()):
        raise Conflict(f"Update {u.id} is {u.state}; it cannot become {state}",
                       code="invalid_transition")
    u.state = state
    u.updated_at = now


async def mark_sending(db: AsyncSession, update_id: int, *, transport: str | None = None,
                       bytes_sent: int | None = None) -> DeviceUpdate:
    """The transfer starts (or restarts: each start from pending/deferred or a retry while
    sending counts as an attempt; a resume passes the ``bytes_sent`` it resumes from)."""
    u = await _load(db, update_id)
    now = clock.now()
    _move(u, "sending", now)
    u.attempts += 1
    u.started_at = u.started_at or now
    u.reason = None
    if transport is not None:
        u.transport = transport
    u.bytes_sent = max(0, bytes_sent) if bytes_sent is not None else 0
    await db.flush()
    return u


async def record_progress(db: AsyncSession, update_id: int, bytes_sent: int) -> DeviceUpdate:
    u = await _load(db, update_id)
    if u.state != "sending":
        raise Conflict(f"Update {u.id} is {u.state}, not sending", code="invalid_transition")
    u.bytes_sent = max(u.bytes_sent, bytes_sent)
    u.updated_at = clock.now()
    await db.flush()
    return u


async def mark_deferred(db: AsyncSession, update_id: int, reason: str) -> DeviceUpdate:
    """The device postponed the update (updates disabled, busy); it stays open."""
    u = await _load(db, update_id)
    _move(u, "deferred", clock.now())
    u.reason = reason[:MAX_REASON]
    await db.flush()
    return u


async def mark_applied(db: AsyncSession, update_id: int) -> DeviceUpdate:
    """The device runs the new version now (it came back reporting it); the device's
    ``firmware_version`` is set to match."""
    u = await _load(db, update_id)
    now = clock.now()
    _move(u, "applied", now)
    u.finished_at = now
    u.reason = None
    device = await db.get(Device, u.device_id)
    if device is not None:
        device.firmware_version = u.target_version
    await db.flush()
    await _after_finish(db, u)
    return u


async def mark_failed(db: AsyncSession, update_id: int, reason: str) -> DeviceUpdate:
    """The update failed (transfer error, bad image, or the device came back running its
    old version); ``reason`` says why."""
    u = await _load(db, update_id)
    now = clock.now()
    _move(u, "failed", now)
    u.finished_at = now
    u.reason = (reason or "unknown")[:MAX_REASON]
    await db.flush()
    await _after_finish(db, u)
    return u


async def _after_finish(db: AsyncSession, u: DeviceUpdate) -> None:
    if u.rollout_id is not None:
        await check_failure_threshold(db, u.rollout_id)


async def device_updates(db: AsyncSession, device_id: str, limit: int = 20) -> list[DeviceUpdate]:
    """The device's updates, newest first."""
    return list((await db.execute(select(DeviceUpdate).where(
        DeviceUpdate.device_id == device_id.lower()).order_by(DeviceUpdate.id.desc())
        .limit(limit))).scalars())


def update_json(u: DeviceUpdate) -> dict[str, object]:
    return {"id": u.id, "device_id": u.device_id, "firmware_id": u.firmware_id,
            "binary_id": u.binary_id, "rollout_id": u.rollout_id, "version": u.target_version,
            "from_version": u.from_version, "trigger": u.trigger, "state": u.state,
            "reason": u.reason, "attempts": u.attempts, "bytes_sent": u.bytes_sent,
            "transport": u.transport, "created_at": clock.iso(u.created_at),
            "started_at": clock.iso(u.started_at), "finished_at": clock.iso(u.finished_at),
            "updated_at": clock.iso(u.updated_at)}


async def outcomes_by_release(db: AsyncSession, product_id: int, *,
                              since: dt.datetime | None = None,
                              devices: Any = None) -> list[dict[str, object]]:
    """Per target version: how many updates were applied, failed, or are still open (fleet
    health's update success rate), newest version first. ``since``: updates created from
    then on; ``devices``: a subquery of device IDs, only their updates."""
    q = (select(DeviceUpdate.target_version, DeviceUpdate.state, func.count())
         .where(DeviceUpdate.product_id == product_id, DeviceUpdate.firmware_id.is_not(None)))
    if since is not None:
        q = q.where(DeviceUpdate.created_at >= since)
    if devices is not None:
        q = q.where(DeviceUpdate.device_id.in_(devices))
    rows = (await db.execute(q.group_by(DeviceUpdate.target_version,
                                        DeviceUpdate.state))).all()
    by: dict[int, dict[str, int]] = {}
    for version, state, n in rows:
        slot = by.setdefault(int(version), {"applied": 0, "failed": 0, "open": 0})
        key = state if state in ("applied", "failed") else (
            "open" if state in OPEN_STATES else None)
        if key is not None:
            slot[key] += int(n)
    out: list[dict[str, object]] = []
    for version in sorted(by, reverse=True):
        s = by[version]
        done = s["applied"] + s["failed"]
        out.append({"version": version, **s,
                    "success_rate": None if not done else round(s["applied"] / done, 4)})
    return out
