"""Releasing product firmware: the release itself, its impact preview (a dry run over every
device's target), and one device's firmware lock with its "flash now" intent.

A release may start a rollout (:mod:`corral.rollouts.service`); devices whose target moves
get their stale updates cancelled, and an intelligent release records updates
(:mod:`corral.firmware.updates`) for the online devices that now target the version.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

from sqlalchemy import delete, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from corral.audit import service as audit
from corral.auth.policy import Role, role_allows
from corral.auth.subject import Subject
from corral.devices import groups as group_rules
from corral.devices.lookup import device_names
from corral.devices.models import Device, DeviceGroup
from corral.devices.schemas import ProductDeviceChange
from corral.firmware.models import OPEN_STATES, DeviceUpdate, FirmwareGroupRelease, ProductFirmware
from corral.firmware.resolver import (
    DeviceFacts,
    ProductTargets,
    ReleaseSet,
    Target,
    device_facts,
    finish_count_gates,
    load_releases,
    resolve,
)
from corral.firmware.schemas import ImpactQuery, Release
from corral.firmware.service import firmware_view, flush_or_conflict, get_firmware
from corral.firmware.signals import UpdateIntent, announce_release, request_updates
from corral.firmware.updates import begin_update
from corral.kit import clock
from corral.kit.errors import BadRequest, Forbidden
from corral.kit.responses import paging
from corral.products.models import Product
from corral.rollouts.schemas import RolloutShares
from corral.rollouts.service import start_rollout, trial_gate


async def group_ids_by_name(db: AsyncSession, product: Product, names: list[str]) -> dict[str, int]:
    """Group name -> id; 400 naming the groups the product does not have."""
    if not names:
        return {}
    found = {n: int(i) for i, n in (await db.execute(select(DeviceGroup.id, DeviceGroup.name)
                                                      .where(DeviceGroup.product_id == product.id,
                                                             DeviceGroup.name.in_(names)))).all()}
    missing = [n for n in names if n not in found]
    if missing:
        raise BadRequest(f"The product has no group(s) {', '.join(missing[:20])}",
                         code="group_not_found")
    return found


def after_release(releases: ReleaseSet, fw: ProductFirmware, product_default: bool,
                  group_ids: set[int], gate_change: Any = None) -> ReleaseSet:
    """``releases`` as they are once ``fw`` is released to exactly ``group_ids`` (and as the
    product default or not): the release is absolute for this firmware."""
    default = releases.default_version
    if product_default:
        default = fw.version
    elif default == fw.version:
        default = None
    groups = {g: v for g, v in releases.group_versions.items()
              if v != fw.version and g not in group_ids}
    groups.update({g: fw.version for g in group_ids})
    gates = dict(releases.gates)
    if gate_change is not None:
        gates[fw.version] = gate_change
    # a cohort's release is set on the cohort, not by this release: it stays
    return ReleaseSet(default_version=default, group_versions=groups, gates=gates,
                      cohort_versions=releases.cohort_versions)


def replaced_by(releases: ReleaseSet, fw: ProductFirmware, product_default: bool,
                group_ids: set[int]) -> tuple[int | None, dict[int, int]]:
    """What releasing ``fw`` replaces: the previous default version (if it takes the
    default over) and each group's previous release."""
    default = releases.default_version
    fallback_default = default if product_default and default != fw.version else None
    fallback_groups = {g: v for g, v in releases.group_versions.items()
                       if g in group_ids and v != fw.version}
    return fallback_default, fallback_groups


@dataclass
class Change:
    device: DeviceFacts
    before: Target
    after: Target


def _resolve_all(devices: list[DeviceFacts], pt: ProductTargets,
                 releases: ReleaseSet) -> dict[str, Target]:
    rs = finish_count_gates(replace(pt, releases=releases), devices) if pt.counts else releases
    return {d.id: resolve(d, rs) for d in devices}


async def simulate(db: AsyncSession, product: Product, fw: ProductFirmware,
                   product_default: bool, groups: list[str],
                   rollout: RolloutShares | None = None
                   ) -> tuple[list[DeviceFacts], dict[str, Target], dict[str, Target]]:
    """Every device of the product with its target before and after releasing ``fw``."""
    ids = await group_ids_by_name(db, product, groups)
    pt = await load_releases(db, product.id)
    devices = await device_facts(db, product.id, also_groups=set(ids.values()))
    before = _resolve_all(devices, pt, pt.releases)
    gate = None
    pt_after = pt
    if rollout is not None:
        fallback_default, fallback_groups = replaced_by(pt.releases, fw, product_default,
                                                        set(ids.values()))
        gate, count = trial_gate(fw, rollout, fallback_default=fallback_default,
                                 fallback_groups=fallback_groups)
        counts = dict(pt.counts)
        if count is None:
            counts.pop(fw.version, None)
        else:
            counts[fw.version] = count
        pt_after = replace(pt, counts=counts)
    after_rs = after_release(pt.releases, fw, product_default, set(ids.values()), gate)
    after = _resolve_all(devices, pt_after, after_rs)
    return devices, before, after


def impact_json(version: int, devices: list[DeviceFacts],
                after: dict[str, Target]) -> dict[str, Any]:
    """Particle's impact shape: devices that would be updated to ``version``, by the
    version they run now (``null``: not known yet)."""
    by_version: Counter[int | None] = Counter(
        d.firmware_version for d in devices
        if after[d.id].version == version and d.firmware_version != version)
    rows = sorted(by_version.items(), key=lambda kv: (kv[0] is None, -(kv[0] or 0)))
    return {"devices": {"firmware_update": {
        "total": sum(by_version.values()),
        "by_version": [{"version": v, "total": n} for v, n in rows]}}}


async def impact(db: AsyncSession, product: Product, q: ImpactQuery) -> dict[str, Any]:
    """``GET /impact``: what releasing ``firmware_version`` (to ``groups``, as the
    ``product_default``) would update."""
    fw = await get_firmware(db, product, q.firmware_version)
    groups = group_rules.clean_group_names(q.groups)
    devices, _before, after = await simulate(db, product, fw, q.product_default, groups)
    return impact_json(fw.version, devices, after)


def _target_json(t: Target) -> dict[str, Any]:
    return {"version": t.version, "source": t.source, "rollout_id": t.rollout_id,
            "held": t.held}


async def release(db: AsyncSession, *, actor: Subject, ip: str, product: Product,
                  req: Release, page: int = 1, per_page: int = 100) -> dict[str, Any]:
    """``PUT /firmware/release``. With ``dry_run`` nothing is written: the answer lists the
    devices whose target would change (paged) and the impact."""
    groups = group_rules.clean_group_names(req.groups)
    fw = await get_firmware(db, product, req.version)
    devices, before, after = await simulate(db, product, fw, req.product_default, groups,
                                            req.rollout)
    changes = [Change(d, before[d.id], after[d.id]) for d in devices
               if before[d.id] != after[d.id]]
    if req.dry_run:
        start = (page - 1) * per_page
        shown = changes[start:start + per_page]
        names = await device_names(db, [c.device.id for c in shown])
        return {"ok": True, "dry_run": True, "version": fw.version,
                "impact": impact_json(fw.version, devices, after),
                "devices": [{"id": c.device.id, "name": names.get(c.device.id),
                             "firmware_version": c.device.firmware_version,
                             "development": c.device.development,
                             "desired_firmware_version": c.device.desired_version,
                             "before": _target_json(c.before), "after": _target_json(c.after)}
                            for c in shown],
                "meta": paging(page, per_page, len(changes))}

    ids = await group_ids_by_name(db, product, groups)
    pt = await load_releases(db, product.id)
    fallback_default, fallback_groups = replaced_by(pt.releases, fw, req.product_default,
                                                    set(ids.values()))
    now = clock.now()
    if req.product_default:
        for other in (await db.execute(select(ProductFirmware).where(
                ProductFirmware.product_id == product.id, ProductFirmware.product_default,
                ProductFirmware.id != fw.id))).scalars():
            other.product_default = False
            other.updated_at = now
    fw.product_default = req.product_default
    # the release is absolute for this firmware, and a group has one release at a time
    replaced = [FirmwareGroupRelease.firmware_id == fw.id]
    if ids:
        replaced.append(FirmwareGroupRelease.group_id.in_(list(ids.values())))
    await db.execute(delete(FirmwareGroupRelease).where(
        FirmwareGroupRelease.product_id == product.id, or_(*replaced))
        .execution_options(synchronize_session=False))
    db.add_all([FirmwareGroupRelease(group_id=gid, product_id=product.id, firmware_id=fw.id,
                                     released_at=now) for gid in ids.values()])
    fw.intelligent = req.intelligent
    if fw.released_at is None and (req.product_default or ids):
        fw.released_at = now
        fw.released_by = actor.username or actor.client
    fw.updated_at = now
    await flush_or_conflict(db, "Another release changed these groups meanwhile; try again",
                            "conflict")
    rollout_id = None
    if req.rollout is not None:
        rollout_id = (await start_rollout(db, actor=actor, ip=ip, product=product, fw=fw, req=req.rollout,
                            fallback_default=fallback_default, fallback_groups=fallback_groups)
                      ).id
    await cancel_stale_updates(db, [(c.device.id, c.after.version) for c in changes])
    if req.intelligent:
        await _intelligent_intents(db, product, fw, devices, after, rollout_id)
        announce_release(db, product.id, fw.id)  # for devices connecting meanwhile
    audit.record(db, actor=actor, ip=ip, action="firmware.released", org_id=product.org_id,
                 product_id=product.id, target_type="firmware", target_id=fw.version,
                 details={"product_default": req.product_default, "groups": sorted(ids),
                          "intelligent": req.intelligent,
                          "rollout": (req.rollout.model_dump(exclude_unset=True)
                                      if req.rollout else None),
                          "devices_retargeted": len(changes)})
    return await firmware_view(db, product, fw)


async def cancel_stale_updates(db: AsyncSession, changed: list[tuple[str, int | None]]) -> None:
    """Open updates of devices whose target moved elsewhere end as ``cancelled``."""
    if not changed:
        return
    wanted = dict(changed)
    ids = sorted(wanted)
    now = clock.now()
    for i in range(0, len(ids), 5000):
        for u in (await db.execute(select(DeviceUpdate).where(
                DeviceUpdate.device_id.in_(ids[i:i + 5000]),
                DeviceUpdate.state.in_(OPEN_STATES),
                DeviceUpdate.trigger.in_(("release", "intelligent"))))).scalars():
            if u.target_version != wanted.get(u.device_id):
                u.state, u.reason = "cancelled", "The device's release target changed"
                u.finished_at = u.updated_at = now
    await db.flush()


async def _intelligent_intents(db: AsyncSession, product: Product, fw: ProductFirmware,
                               devices: list[DeviceFacts], after: dict[str, Target],
                               rollout_id: int | None) -> None:
    """Intelligent release: online devices that now target ``fw`` and do not run it get an
    update recorded and a "flash now" intent (offline ones update when they connect).
    ``after`` was resolved before the release's own rollout existed (its trial gate has id 0):
    those devices' updates name ``rollout_id``, the rollout just started."""
    wanted = [d for d in devices if after[d.id].version == fw.version
              and not after[d.id].held and d.firmware_version != fw.version]
    if not wanted:
        return
    ids = [d.id for d in wanted]
    online: set[str] = set()
    for i in range(0, len(ids), 5000):
        online.update((await db.execute(select(Device.id).where(
            Device.id.in_(ids[i:i + 5000]), Device.online))).scalars())
    intents = []
    for d in wanted:
        if d.id not in online:
            continue
        u = await begin_update(db, device_id=d.id, product_id=product.id, fw=fw,
                               trigger="intelligent",
                               rollout_id=(rollout_id if after[d.id].rollout_id == 0
                                           else after[d.id].rollout_id),
                               from_version=d.firmware_version)
        intents.append(UpdateIntent(device_id=d.id, version=fw.version, firmware_id=fw.id,
                                    update_id=u.id, trigger="intelligent"))
    request_updates(db, intents)


# --- locking one device (PUT /v1/products/:product/devices/:id) --------------------------------

@dataclass
class LockRequest:
    set_version: bool  # desired_firmware_version was sent
    version: int | None
    flash: bool
    firmware: ProductFirmware | None


def may_release(subject: Subject, role: Role | None) -> bool:
    if role is not None:
        return role_allows(role, "firmware:release")
    return "firmware:release" in subject.scopes


async def parse_lock(db: AsyncSession, *, actor: Subject, role: Role | None, product: Product,
                     device: Device, req: ProductDeviceChange) -> LockRequest:
    """Validate ``desired_firmware_version`` (a version of the product, or ``null``) and
    ``flash``; nothing changes yet."""
    if not may_release(actor, role):
        raise Forbidden("Locking device firmware needs the firmware:release permission",
                        code="forbidden", required="firmware:release")
    set_version = req.sent("desired_firmware_version")
    version = req.desired_firmware_version
    flash = bool(req.flash)
    if not set_version:
        version = device.desired_firmware_version
    fw = await get_firmware(db, product, version) if version is not None else None
    if flash and fw is None:
        raise BadRequest("flash needs a firmware version: send desired_firmware_version",
                         code="invalid_request")
    return LockRequest(set_version=set_version, version=version, flash=flash, firmware=fw)


async def apply_lock(db: AsyncSession, *, actor: Subject, ip: str, product: Product,
                     device: Device, req: LockRequest) -> dict[str, Any]:
    """Store the lock; with ``flash`` record an update and send a "flash now" intent."""
    out: dict[str, Any] = {}
    if req.set_version:
        device.desired_firmware_version = req.version
        out["desired_firmware_version"] = req.version
        await cancel_stale_updates(db, [(device.id, req.version)])
    if req.flash:
        assert req.firmware is not None
        u = await begin_update(db, device_id=device.id, product_id=product.id, fw=req.firmware,
                               trigger="flash", rollout_id=None,
                               from_version=device.firmware_version)
        request_updates(db, [UpdateIntent(device_id=device.id, version=req.firmware.version,
                                          firmware_id=req.firmware.id, update_id=u.id,
                                          trigger="flash")])
        out["flash"] = True
    audit.record(db, actor=actor, ip=ip,
                 action="device.firmware_locked" if req.version is not None
                 else "device.firmware_unlocked",
                 org_id=product.org_id, product_id=product.id, target_type="device",
                 target_id=device.id, details={"version": req.version, "flash": req.flash})
    return out
