"""Cohort rules: a product's named, exclusive device segments, each optionally with its own
firmware release.

A device is in at most one cohort (moving it into one takes it out of the other). A cohort's
name follows the group-name rule (lowercase letters, digits, ``-``, ``_``; 1-64). Giving a
cohort a release (``firmware_version``: an uploaded version of the product) needs the
``firmware:release`` permission, as releasing to a group does; its devices then target that
version ahead of their groups' releases (:mod:`corral.firmware.resolver`) and get it as a
standard release does (when they next connect). Deleting a cohort frees its devices.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, func, insert, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from corral.audit import service as audit
from corral.auth.policy import Role
from corral.auth.subject import Subject
from corral.cohorts.schemas import CohortChange, CohortCreate, CohortDevices
from corral.devices.access import is_device_id
from corral.devices.cohort_models import Cohort, CohortMember
from corral.devices.groups import clean_group_name
from corral.devices.service import may_mark_development, require_in_product
from corral.firmware.models import ProductFirmware
from corral.kit import clock
from corral.kit.errors import BadRequest, Conflict, Forbidden, NotFound
from corral.products.models import Product

CHUNK = 5000


def cohort_json(c: Cohort, version: int | None, device_count: int) -> dict[str, Any]:
    return {"id": c.id, "name": c.name, "description": c.description,
            "firmware_version": version, "device_count": device_count,
            "created_at": clock.iso(c.created_at), "updated_at": clock.iso(c.updated_at)}


async def _counts(db: AsyncSession, cohort_ids: list[int]) -> dict[int, int]:
    if not cohort_ids:
        return {}
    return {int(c): int(n) for c, n in await db.execute(
        select(CohortMember.cohort_id, func.count()).where(
            CohortMember.cohort_id.in_(cohort_ids)).group_by(CohortMember.cohort_id))}


async def _versions(db: AsyncSession, cohorts: list[Cohort]) -> dict[int, int]:
    """Firmware id -> version, for the cohorts' releases."""
    ids = sorted({c.firmware_id for c in cohorts if c.firmware_id is not None})
    if not ids:
        return {}
    return {int(i): int(v) for i, v in await db.execute(
        select(ProductFirmware.id, ProductFirmware.version).where(ProductFirmware.id.in_(ids)))}


async def views(db: AsyncSession, cohorts: list[Cohort]) -> list[dict[str, Any]]:
    counts = await _counts(db, [c.id for c in cohorts])
    versions = await _versions(db, cohorts)
    return [cohort_json(c, versions.get(c.firmware_id) if c.firmware_id else None,
                        counts.get(c.id, 0)) for c in cohorts]


async def view(db: AsyncSession, cohort: Cohort) -> dict[str, Any]:
    return (await views(db, [cohort]))[0]


async def list_cohorts(db: AsyncSession, product: Product) -> list[Cohort]:
    return list((await db.execute(select(Cohort).where(Cohort.product_id == product.id)
                                  .order_by(Cohort.name))).scalars())


async def get_cohort(db: AsyncSession, product: Product, name: str) -> Cohort:
    row = (await db.execute(select(Cohort).where(
        Cohort.product_id == product.id, Cohort.name == name))).scalar_one_or_none()
    if row is None:
        raise NotFound("Cohort not found", code="cohort_not_found")
    return row


async def _name_free(db: AsyncSession, product: Product, name: str) -> None:
    if (await db.execute(select(Cohort.id).where(
            Cohort.product_id == product.id, Cohort.name == name))).first():
        raise Conflict(f"A cohort named {name!r} already exists", code="cohort_exists")


async def _flush(db: AsyncSession, name: str) -> None:
    try:
        await db.flush()
    except IntegrityError as exc:  # a concurrent request took the name first
        raise Conflict(f"A cohort named {name!r} already exists", code="cohort_exists") from exc


async def _release(db: AsyncSession, actor: Subject, role: Role | None, product: Product,
                   version: int | None) -> int | None:
    """The firmware id of the cohort's new release (None ends it); 403 without
    ``firmware:release``, 400 for a version the product has not uploaded."""
    if not may_mark_development(actor, role):
        raise Forbidden("Releasing firmware to a cohort needs the firmware:release permission",
                        code="forbidden", required="firmware:release")
    if version is None:
        return None
    fid = (await db.execute(select(ProductFirmware.id).where(
        ProductFirmware.product_id == product.id, ProductFirmware.version == version))).scalar()
    if fid is None:
        raise BadRequest(f"The product has no firmware version {version}",
                         code="firmware_not_found")
    return int(fid)


async def create_cohort(db: AsyncSession, *, actor: Subject, ip: str, product: Product,
                        role: Role | None, req: CohortCreate) -> Cohort:
    name = clean_group_name(req.name)
    firmware_id = (await _release(db, actor, role, product, req.firmware_version)
                   if req.sent("firmware_version") else None)
    await _name_free(db, product, name)
    c = Cohort(product_id=product.id, name=name, description=req.description,
               firmware_id=firmware_id)
    db.add(c)
    await _flush(db, name)
    audit.record(db, actor=actor, ip=ip, action="cohort.created", org_id=product.org_id,
                 product_id=product.id, target_type="cohort", target_id=name,
                 details={"firmware_version": req.firmware_version})
    return c


async def update_cohort(db: AsyncSession, *, actor: Subject, ip: str, product: Product,
                        role: Role | None, name: str, req: CohortChange) -> Cohort:
    """Rename, describe, or change the cohort's release (at least one)."""
    c = await get_cohort(db, product, name)
    if not req.model_fields_set:
        raise BadRequest("Nothing to update: send name, description or firmware_version",
                         code="invalid_request")
    changed: dict[str, Any] = {}
    if req.sent("name"):
        new = clean_group_name(req.name)
        if new != c.name:
            await _name_free(db, product, new)
            changed["name"] = {"from": c.name, "to": new}
            c.name = new
    if req.sent("description"):
        c.description = req.description
        changed["description"] = True
    if req.sent("firmware_version"):
        c.firmware_id = await _release(db, actor, role, product, req.firmware_version)
        changed["firmware_version"] = req.firmware_version
    c.updated_at = clock.now()
    await _flush(db, c.name)
    if "firmware_version" in changed:
        await _cancel_stale(db, product, await _member_ids(db, c.id))
    audit.record(db, actor=actor, ip=ip, action="cohort.updated", org_id=product.org_id,
                 product_id=product.id, target_type="cohort", target_id=c.name, details=changed)
    return c


async def delete_cohort(db: AsyncSession, *, actor: Subject, ip: str, product: Product,
                        name: str) -> None:
    c = await get_cohort(db, product, name)
    members = await _member_ids(db, c.id)
    await db.execute(delete(CohortMember).where(CohortMember.cohort_id == c.id)
                     .execution_options(synchronize_session=False))
    await db.delete(c)
    await db.flush()
    await _cancel_stale(db, product, members)
    audit.record(db, actor=actor, ip=ip, action="cohort.deleted", org_id=product.org_id,
                 product_id=product.id, target_type="cohort", target_id=name,
                 details={"devices": len(members)})


async def _member_ids(db: AsyncSession, cohort_id: int) -> list[str]:
    return list((await db.execute(select(CohortMember.device_id).where(
        CohortMember.cohort_id == cohort_id))).scalars())


async def _cancel_stale(db: AsyncSession, product: Product, device_ids: list[str]) -> None:
    """Open updates of these devices towards a target they no longer have end cancelled."""
    if not device_ids:
        return
    from corral.firmware.releases import cancel_stale_updates
    from corral.firmware.resolver import targets_for

    targets = await targets_for(db, product.id, device_ids)
    await cancel_stale_updates(db, [(d, t.version) for d, t in targets.items()])


def _ids(raw: list[str] | None, field: str) -> list[str]:
    bad = [d for d in raw or () if not is_device_id(d)]
    if bad:
        raise BadRequest(f"{field} must be device IDs (24 hex characters)",
                         code="invalid_request", invalidDeviceIds=bad[:100])
    return list(dict.fromkeys(d.lower() for d in raw or ()))


async def move_devices(db: AsyncSession, *, actor: Subject, ip: str, product: Product,
                       name: str, req: CohortDevices) -> dict[str, Any]:
    """``add``: into this cohort (out of any other); ``remove``: out of it. Every device
    must be in the product, else nothing changes."""
    c = await get_cohort(db, product, name)
    add, remove = _ids(req.add, "add"), _ids(req.remove, "remove")
    if not add and not remove:
        raise BadRequest("Send devices to add or remove", code="invalid_request")
    both = sorted(set(add) & set(remove))
    if both:
        raise BadRequest("Devices both added and removed", code="invalid_request",
                         deviceIds=both[:100])
    wanted = add + remove
    await require_in_product(db, product, wanted)
    removed = 0
    for i in range(0, len(remove), CHUNK):
        res = await db.execute(delete(CohortMember).where(
            CohortMember.cohort_id == c.id, CohortMember.device_id.in_(remove[i:i + CHUNK]))
            .execution_options(synchronize_session=False))
        removed += int(res.rowcount or 0)  # type: ignore[attr-defined]
    added = 0
    for i in range(0, len(add), CHUNK):
        chunk = add[i:i + CHUNK]
        already = set((await db.execute(select(CohortMember.device_id).where(
            CohortMember.cohort_id == c.id, CohortMember.device_id.in_(chunk)))).scalars())
        moving = [d for d in chunk if d not in already]
        if moving:  # out of whichever cohort holds them, then in
            await db.execute(delete(CohortMember).where(CohortMember.device_id.in_(moving))
                             .execution_options(synchronize_session=False))
            await db.execute(insert(CohortMember),
                             [{"device_id": d, "cohort_id": c.id} for d in moving])
            added += len(moving)
    await db.flush()
    await _cancel_stale(db, product, wanted)
    audit.record(db, actor=actor, ip=ip, action="cohort.devices_moved", org_id=product.org_id,
                 product_id=product.id, target_type="cohort", target_id=c.name,
                 details={"added": added, "removed": removed})
    count = (await _counts(db, [c.id])).get(c.id, 0)
    return {"ok": True, "added": added, "removed": removed, "device_count": count}
