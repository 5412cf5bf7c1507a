"""SIM cards: Particle's ``/v1/sims`` and product ``sims`` routes, on the ``sims`` table.

A SIM (by ICCID) is held by a product (imported with ``POST /v1/products/:p/sims``, or
reported by one of the product's devices) or by a user (reported by one of the user's own
devices, in no product). A device reports its ICCID in its describe (Particle: the system
describe's ``iccid``; MQTT: ``iccid`` in ``describe``): :func:`attach` records it and makes
the device cellular (its session bytes count towards the plan's cellular pool).

``deactivate`` opens an interval in ``sim_deactivations`` and marks the SIM row;
``reactivate`` (or ``activate``) closes it. A deactivated SIM's device is disconnected on
whichever node holds its session and refused while the SIM stays deactivated (the session
core reads ``sims.deactivated_at`` with the device's row). Billing reads the intervals: a
device whose SIM was deactivated for an entire month is not billable that month
(:func:`corral.metering.usage.billable_condition`).

Cellular data per SIM and day comes from :class:`~corral.metering.models.SimUsageDay`, the
metering tick's month-to-date readings of the device's ``cellular_bytes``.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Sequence
from typing import Any

from sqlalchemy import ColumnElement, and_, func, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from corral.devices import signals
from corral.devices.models import Device
from corral.kit import clock
from corral.kit.errors import BadRequest, Conflict, NotFound
from corral.metering.models import Sim, SimDeactivation, SimUsageDay, UsageCounter
from corral.metering.plans import MB, add_months, month_start
from corral.metering.usage import sim_deactivated

ICCID_RE = re.compile(r"^[0-9]{18,22}[Ff]?$")
ACTIONS = ("activate", "deactivate", "reactivate")
MAX_IMPORT = 1000  # ICCIDs per import request
MAX_ECHO = 40  # characters of an invalid entry echoed back
DEACTIVATED_REASON = "The device's SIM card is deactivated"


def is_iccid(value: Any) -> bool:
    return isinstance(value, str) and ICCID_RE.match(value.strip()) is not None


def parse_iccid(value: str) -> str:
    iccid = value.strip().upper()
    if not ICCID_RE.match(iccid):
        raise BadRequest("An ICCID is 18 to 22 digits", code="invalid_iccid")
    return iccid


def product_scope(product_id: int) -> ColumnElement[bool]:
    return Sim.product_id == product_id


def user_scope(user_id: int) -> ColumnElement[bool]:
    return and_(Sim.owner_user_id == user_id, Sim.product_id.is_(None))


async def find(db: AsyncSession, iccid: str, scope: ColumnElement[bool]) -> Sim:
    """The SIM ``iccid`` in ``scope``, or 404 (a SIM of someone else is not found either)."""
    sim = (await db.execute(select(Sim).where(Sim.iccid == parse_iccid(iccid), scope))
           ).scalar_one_or_none()
    if sim is None:
        raise NotFound("SIM not found", code="not_found")
    return sim


def sim_json(sim: Sim, device_name: str | None) -> dict[str, Any]:
    off = sim.deactivated_at
    return {"_id": sim.iccid, "iccid": sim.iccid,
            "status": "inactive_user_deactivated" if off else "active",
            "activations_count": sim.activations_count,
            "base_country_code": None, "carrier": None, "mb_limit": None,
            "product_id": sim.product_id, "owner_user_id": sim.owner_user_id,
            "last_device_id": sim.last_device_id, "last_device_name": device_name,
            "deactivated_at": clock.iso(off) if off else None,
            "created_at": clock.iso(sim.created_at), "updated_at": clock.iso(sim.updated_at)}


async def _names(db: AsyncSession, device_ids: Sequence[str | None]) -> dict[str, str | None]:
    ids = sorted({d for d in device_ids if d})
    if not ids:
        return {}
    rows = (await db.execute(select(Device.id, Device.name).where(Device.id.in_(ids)))).all()
    return {r[0]: r[1] for r in rows}


async def one_json(db: AsyncSession, sim: Sim) -> dict[str, Any]:
    names = await _names(db, [sim.last_device_id])
    return sim_json(sim, names.get(sim.last_device_id or ""))


async def listing(db: AsyncSession, scope: ColumnElement[bool], *, page: int, per_page: int,
                  iccid: str | None = None, device_id: str | None = None,
                  device_name: str | None = None) -> tuple[list[dict[str, Any]], int]:
    """One page of the SIMs in ``scope`` (ICCID order) and how many there are; ``iccid``
    (a prefix), ``device_id`` and ``device_name`` (its last device's) narrow it."""
    cond: list[ColumnElement[bool]] = [scope]
    if iccid:
        cond.append(Sim.iccid.startswith(iccid.strip().upper(), autoescape=True))
    if device_id:
        cond.append(Sim.last_device_id == device_id.strip().lower())
    if device_name:
        cond.append(Sim.last_device_id.in_(select(Device.id).where(
            Device.name == device_name.strip())))
    total = int((await db.execute(select(func.count()).select_from(Sim).where(*cond)))
                .scalar_one())
    rows = list((await db.execute(select(Sim).where(*cond).order_by(Sim.iccid)
                                  .offset((page - 1) * per_page).limit(per_page))).scalars())
    names = await _names(db, [s.last_device_id for s in rows])
    return [sim_json(s, names.get(s.last_device_id or "")) for s in rows], total


async def apply_action(db: AsyncSession, sim: Sim, action: Any) -> dict[str, Any]:
    """Run ``action`` on the SIM (no commit); its state afterwards. Deactivating closes the
    session of every device using the SIM (after commit, on whichever node holds it)."""
    if action not in ACTIONS:
        raise BadRequest("action must be one of activate, deactivate, reactivate",
                         code="invalid_action")
    off = await sim_deactivated(db, sim.iccid)
    now = clock.now()
    if action == "deactivate":
        if off is not None:
            raise Conflict("The SIM is already deactivated", code="sim_deactivated")
        db.add(SimDeactivation(iccid=sim.iccid, deactivated_at=now))
        sim.deactivated_at = now
        for device_id in await _devices_of(db, sim.iccid):
            signals.disconnect(db, device_id, DEACTIVATED_REASON)
    else:
        if off is None:
            raise Conflict("The SIM is already active", code="sim_active")
        off.reactivated_at = now
        sim.deactivated_at = None
        sim.activations_count += 1
    sim.updated_at = now
    await db.flush()
    return await one_json(db, sim)


async def _devices_of(db: AsyncSession, iccid: str) -> list[str]:
    return list((await db.execute(select(Device.id).where(Device.iccid == iccid))).scalars())


async def release(db: AsyncSession, sim: Sim) -> None:
    """Release the SIM from its product or owner (no commit): the row goes, so another
    account may import it. Its deactivation history stays (billing reads it); a device
    that reports it again makes it a SIM of that device's product or owner."""
    await db.delete(sim)
    await db.flush()


def _insert(db: AsyncSession) -> Any:
    return postgresql.insert if db.get_bind().dialect.name == "postgresql" else sqlite.insert


def read_entries(sims: Any, upload: bytes | str | None) -> list[str]:
    """The ICCIDs of an import: ``sims`` (a list, or one string of ICCIDs separated by
    commas or white space) and the uploaded file's (one per line, or separated likewise)."""
    entries: list[str] = []
    if isinstance(sims, str):
        entries += re.split(r"[,\s]+", sims)
    elif isinstance(sims, list):
        for item in sims:
            if not isinstance(item, str):
                raise BadRequest("sims must be a list of ICCID strings", code="invalid_request")
            entries.append(item)
    if upload:
        if isinstance(upload, bytes):
            if b"\x00" in upload:
                raise BadRequest("The file is not a text file; upload one ICCID per line",
                                 code="invalid_file")
            try:
                upload = upload.decode("utf-8").removeprefix("\ufeff")
            except UnicodeDecodeError:
                raise BadRequest("The file is not UTF-8 text; upload one ICCID per line",
                                 code="invalid_file") from None
        entries += re.split(r"[,\s]+", upload)
    entries = [e.strip() for e in entries if e.strip()]
    if not entries:
        raise BadRequest("Send sims (a list of ICCIDs) or a file of ICCIDs",
                         code="invalid_request")
    if len(entries) > MAX_IMPORT:
        raise BadRequest(f"At most {MAX_IMPORT} ICCIDs per request (got {len(entries)})",
                         code="too_many_sims")
    return entries


async def import_sims(db: AsyncSession, product_id: int, entries: Sequence[str]
                      ) -> dict[str, list[str]]:
    """Import ICCIDs into the product (no commit): which were ``imported``, which the
    product already had (``existing``), which another product or user holds (``taken``:
    release them there first) and which are no ICCID (``invalid``)."""
    valid: dict[str, None] = {}
    invalid: dict[str, None] = {}
    for e in entries:
        if is_iccid(e):
            valid[e.upper()] = None
        else:
            invalid[e if len(e) <= MAX_ECHO else e[:MAX_ECHO] + "..."] = None
    held = {r[0]: r[1] for r in (await db.execute(select(Sim.iccid, Sim.product_id).where(
        Sim.iccid.in_(list(valid))))).all()} if valid else {}
    new = [i for i in valid if i not in held]
    if new:
        now = clock.now()
        off = await _open_intervals(db, new)
        stmt = _insert(db)(Sim).values([
            {"iccid": i, "product_id": product_id, "owner_user_id": None,
             "last_device_id": None, "activations_count": 1, "deactivated_at": off.get(i),
             "created_at": now, "updated_at": now} for i in new])
        await db.execute(stmt.on_conflict_do_nothing(index_elements=["iccid"]))
        # a device of the product that already reported one of them
        await db.execute(update(Sim).where(Sim.iccid.in_(new)).values(
            last_device_id=select(func.min(Device.id)).where(
                Device.iccid == Sim.iccid, Device.product_id == product_id)
            .scalar_subquery()).execution_options(synchronize_session=False))
    return {"imported": new,
            "existing": [i for i in valid if held.get(i, -1) == product_id],
            "taken": [i for i in valid if i in held and held[i] != product_id],
            "invalid": list(invalid)}


async def _open_intervals(db: AsyncSession, iccids: Sequence[str]) -> dict[str, dt.datetime]:
    rows = (await db.execute(select(SimDeactivation.iccid,
                                    func.max(SimDeactivation.deactivated_at)).where(
        SimDeactivation.iccid.in_(list(iccids)), SimDeactivation.reactivated_at.is_(None))
        .group_by(SimDeactivation.iccid))).all()
    return {r[0]: r[1] for r in rows}


async def attach(db: AsyncSession, device: Device, iccid: str) -> Sim:
    """``device`` reports the SIM ``iccid`` (no commit): the device is cellular with that
    ICCID, and the SIM exists (a new one held by the device's product, or its owner). A SIM
    someone else holds keeps its holder (and does not learn about this device)."""
    iccid = parse_iccid(iccid)
    now = clock.now()
    device.iccid, device.cellular = iccid, True
    sim = await db.get(Sim, iccid)
    if sim is None:
        off = (await _open_intervals(db, [iccid])).get(iccid)
        await db.execute(_insert(db)(Sim).values(
            iccid=iccid, product_id=device.product_id,
            owner_user_id=None if device.product_id is not None else device.owner_user_id,
            last_device_id=device.id, activations_count=1, deactivated_at=off,
            created_at=now, updated_at=now).on_conflict_do_nothing(index_elements=["iccid"]))
        sim = await db.get(Sim, iccid)
        assert sim is not None
    elif _holds(sim, device) and sim.last_device_id != device.id:
        sim.last_device_id, sim.updated_at = device.id, now
    await db.flush()
    return sim


def _holds(sim: Sim, device: Device) -> bool:
    if device.product_id is not None:
        return sim.product_id == device.product_id
    return sim.product_id is None and sim.owner_user_id == device.owner_user_id


# --- cellular data per day ----------------------------------------------------------------

async def month_readings(db: AsyncSession, month: dt.date) -> dict[str, int]:
    """ICCID -> its devices' folded ``cellular_bytes`` in ``month`` (SIMs that used any)."""
    rows = (await db.execute(select(Device.iccid, func.sum(UsageCounter.cellular_bytes))
                             .join(Device, Device.id == UsageCounter.device_id)
                             .where(UsageCounter.period == month_start(month),
                                    UsageCounter.cellular_bytes > 0,
                                    Device.iccid.isnot(None))
                             .group_by(Device.iccid))).all()
    return {str(r[0]): int(r[1] or 0) for r in rows}  # iccid IS NOT NULL above


async def record_days(db: AsyncSession, day: dt.date, readings: dict[str, int]) -> None:
    """Store ``ICCID -> month-to-date bytes`` as ``day``'s reading (no commit)."""
    if not readings:
        return
    ins = _insert(db)
    rows = [{"iccid": i, "day": day, "cellular_bytes": b} for i, b in sorted(readings.items())]
    for n in range(0, len(rows), 500):
        stmt = ins(SimUsageDay).values(rows[n:n + 500])
        await db.execute(stmt.on_conflict_do_update(
            index_elements=["iccid", "day"],
            set_={"cellular_bytes": stmt.excluded.cellular_bytes}))


def _mb(n: int) -> float:
    return round(n / MB, 3)


async def usage_by_day(db: AsyncSession, iccids: Sequence[str], month: dt.date,
                       until: dt.date) -> tuple[list[dict[str, Any]], int]:
    """Particle's ``usage_by_day`` of ``iccids`` together in ``month`` (up to ``until``):
    ``[{date, mbs_used, mbs_used_cumulative}]`` and the month's total bytes."""
    start = month_start(month)
    end = min(add_months(start, 1) - dt.timedelta(days=1), until)
    per_day: dict[dt.date, int] = {}
    total = 0
    for i in range(0, len(iccids), 500):
        rows = (await db.execute(select(SimUsageDay).where(
            SimUsageDay.iccid.in_(list(iccids[i:i + 500])), SimUsageDay.day >= start,
            SimUsageDay.day <= end).order_by(SimUsageDay.iccid, SimUsageDay.day))).scalars()
        prev: dict[str, int] = {}
        for r in rows:
            used = max(0, r.cellular_bytes - prev.get(r.iccid, 0))
            prev[r.iccid] = r.cellular_bytes
            per_day[r.day] = per_day.get(r.day, 0) + used
        total += sum(prev.values())
    out: list[dict[str, Any]] = []
    cumulative = 0
    day = start
    while day <= end:
        used = per_day.get(day, 0)
        cumulative += used
        out.append({"date": day.isoformat(), "mbs_used": _mb(used),
                    "mbs_used_cumulative": _mb(cumulative)})
        day += dt.timedelta(days=1)
    return out, total


async def sim_data_usage(db: AsyncSession, sim: Sim) -> dict[str, Any]:
    today = clock.now().date()
    days, total = await usage_by_day(db, [sim.iccid], today, today)
    return {"iccid": sim.iccid, "total_mbs_used": _mb(total), "usage_by_day": days}


async def fleet_data_usage(db: AsyncSession, product_id: int) -> dict[str, Any]:
    today = clock.now().date()
    iccids = list((await db.execute(select(Sim.iccid).where(Sim.product_id == product_id)
                                    .order_by(Sim.iccid))).scalars())
    active = int((await db.execute(select(func.count()).select_from(Sim).where(
        Sim.product_id == product_id, Sim.deactivated_at.is_(None)))).scalar_one())
    days, total = await usage_by_day(db, iccids, today, today)
    return {"total_mbs_used": _mb(total), "total_active_sim_cards": active,
            "usage_by_day": days}


__all__ = [
    "apply_action",
    "attach",
    "find",
    "fleet_data_usage",
    "import_sims",
    "listing",
    "month_readings",
    "one_json",
    "parse_iccid",
    "product_scope",
    "read_entries",
    "record_days",
    "release",
    "sim_data_usage",
    "sim_json",
    "user_scope",
]
