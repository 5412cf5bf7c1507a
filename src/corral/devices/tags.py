"""Device tags: free-form labels a product team puts on its devices to organise and filter them.

A device's tags live twice, always written together in one transaction by this module: the
``devices.tags`` JSON column (the copy every device answer shows, read with the row) and
the ``device_tags(device_id, tag)`` table indexed on ``(tag, device_id)``, which the tag
filter reads (a JSON column cannot be indexed usefully on SQLite). Writers of
``devices.tags`` other than this module: none but JITP's insert of a new device, which
calls :func:`add_rows` in the same transaction.

Rules: a tag is 1-100 characters (surrounding spaces trimmed), case kept; a device carries at
most ``MAX_TAGS`` (50) tags; repeats are dropped, order of first appearance kept. A device
keeps its tags when it leaves or changes product (they are its own labels, like its name).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import bindparam, delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.sql.elements import ColumnElement

from corral.audit import service as audit
from corral.auth.subject import Subject
from corral.devices.models import Device, DeviceTag
from corral.kit import clock
from corral.kit.errors import BadRequest
from corral.products.models import Product
from corral.products.schemas import MAX_TAG_LEN, MAX_TAGS

CHUNK = 5000


def clean_tags(tags: Sequence[Any] | None, *, field: str = "tags",
               limit: int | None = MAX_TAGS) -> list[str]:
    """Trimmed, checked, without repeats; 400 naming ``field`` otherwise."""
    out: list[str] = []
    for t in tags or ():
        if not isinstance(t, str) or not t.strip() or len(t.strip()) > MAX_TAG_LEN:
            raise BadRequest(f"{field} must be non-empty strings of at most {MAX_TAG_LEN} "
                             "characters", code="invalid_request")
        if t.strip() not in out:
            out.append(t.strip())
    if limit is not None and len(out) > limit:
        raise BadRequest(f"{field}: a device carries at most {limit} tags",
                         code="invalid_request")
    return out


def all_of(tags: Sequence[str], *, per_device: bool = False) -> list[ColumnElement[bool]]:
    """Conditions on ``Device`` for "carries every one of ``tags``". Few carriers: one
    indexed ``(tag, device_id)`` lookup per tag collects them. Many (``per_device``): each
    device a sort index walks is probed on the ``(device_id, tag)`` key instead, so a page
    needs a few probes rather than collecting a million carriers."""
    if per_device:
        return [select(DeviceTag.device_id).where(DeviceTag.device_id == Device.id,
                                                  DeviceTag.tag == t).exists()
                for t in dict.fromkeys(tags)]
    return [Device.id.in_(select(DeviceTag.device_id).where(DeviceTag.tag == t))
            for t in dict.fromkeys(tags)]


async def carried_by_many(db: AsyncSession, tags: Sequence[str], many: int) -> bool:
    """Whether every tag of ``tags`` is carried by more than ``many`` devices (counted on
    the ``(tag, device_id)`` index, stopping there)."""
    for t in dict.fromkeys(tags):
        inner = select(DeviceTag.device_id).where(DeviceTag.tag == t).limit(many + 1).subquery()
        if int((await db.execute(select(func.count()).select_from(inner))).scalar_one()) <= many:
            return False
    return bool(tags)


def any_of(tags: Sequence[str]) -> ColumnElement[bool]:
    """A condition on ``Device`` for "carries at least one of ``tags``"."""
    return Device.id.in_(select(DeviceTag.device_id).where(DeviceTag.tag.in_(list(tags))))


async def add_rows(db: AsyncSession, device_id: str, tags: Sequence[str]) -> None:
    """Index the tags of a device just inserted with ``tags`` in its column."""
    if tags:
        await db.execute(insert(DeviceTag), [{"device_id": device_id, "tag": t}
                                             for t in dict.fromkeys(tags)])


async def set_device_tags(db: AsyncSession, device: Device, tags: list[str]) -> list[str]:
    """Make the device's tags exactly ``tags`` (already cleaned), column and index."""
    current = set((await db.execute(select(DeviceTag.tag).where(
        DeviceTag.device_id == device.id))).scalars())
    gone = current - set(tags)
    if gone:
        await db.execute(delete(DeviceTag).where(
            DeviceTag.device_id == device.id, DeviceTag.tag.in_(sorted(gone)))
            .execution_options(synchronize_session=False))
    new = [t for t in tags if t not in current]
    if new:
        await db.execute(insert(DeviceTag), [{"device_id": device.id, "tag": t} for t in new])
    device.tags = list(tags)
    return list(tags)


async def batch_tags(db: AsyncSession, *, actor: Subject, ip: str, product: Product,
                     device_ids: list[str], add: list[str], remove: list[str]) -> None:
    """Add ``add`` to and take ``remove`` from every device of ``device_ids`` (all in
    ``product``, checked by the caller). Checked first, written after: a device that would
    end with more than ``MAX_TAGS`` tags refuses the whole batch."""
    current: dict[str, list[str]] = {}
    for i in range(0, len(device_ids), CHUNK):
        current.update({d: list(t or []) for d, t in await db.execute(
            select(Device.id, Device.tags).where(Device.id.in_(device_ids[i:i + CHUNK])))})
    dropped = set(remove)
    wanted: dict[str, list[str]] = {}
    for did in device_ids:
        have = current.get(did, [])
        now = [t for t in have if t not in dropped] + [t for t in add if t not in have]
        if now != have:
            wanted[did] = now
    over = [d for d, t in wanted.items() if len(t) > MAX_TAGS]
    if over:
        raise BadRequest(f"{len(over)} device(s) would carry more than {MAX_TAGS} tags",
                         code="invalid_request", deviceIds=over[:1000])
    changed = sorted(wanted)
    stamp = clock.now()
    rows = [{"did": d, "tags": wanted[d], "at": stamp} for d in changed]
    stmt = (update(Device.__table__)  # type: ignore[arg-type]
            .where(Device.__table__.c.id == bindparam("did"))
            .values(tags=bindparam("tags"), updated_at=bindparam("at")))
    for i in range(0, len(rows), CHUNK):
        chunk = changed[i:i + CHUNK]
        await db.execute(stmt.execution_options(synchronize_session=False), rows[i:i + CHUNK])
        if remove:
            await db.execute(delete(DeviceTag).where(
                DeviceTag.device_id.in_(chunk), DeviceTag.tag.in_(remove))
                .execution_options(synchronize_session=False))
        new = [{"device_id": d, "tag": t} for d in chunk for t in add
               if t not in current.get(d, []) and t not in dropped]
        if new:
            await db.execute(insert(DeviceTag), new)
    # rows this session holds show the new tags (no lazy reloads in async)
    for d in changed:
        loaded = db.identity_map.get(db.identity_key(Device, d))
        if loaded is not None:
            await db.refresh(loaded)
    audit.record(db, actor=actor, ip=ip, action="devices.tags_updated", org_id=product.org_id,
                 product_id=product.id, target_type="product", target_id=product.id,
                 details={"devices": len(device_ids), "changed": len(changed), "add": add,
                          "remove": remove})
