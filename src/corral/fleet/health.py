"""A product's fleet health over a window (what ``GET .../fleet/health``, the console's Fleet
health page and ``corral fleet health`` show) and the window's device filters (a group by
name, a Device OS version): the rules the routes and the console share."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from corral.devices.groups import GROUP_NAME_RE, dynamic_condition
from corral.devices.models import DeviceGroup
from corral.firmware.updates import outcomes_by_release
from corral.fleet import metrics
from corral.kit import clock
from corral.kit.errors import BadRequest, NotFound

OS_VERSION_RE = re.compile(r"^[0-9A-Za-z.+_-]{1,32}$")


def checked_filters(group: str | None, os_version: str | None
                    ) -> tuple[str | None, str | None]:
    """The group name and Device OS version of a request, stripped and checked (400
    ``bad_request`` naming what is wrong; both at once are refused); empty: None."""
    group = group.strip() if group else None
    os_version = os_version.strip() if os_version else None
    if group and os_version:
        raise BadRequest("device_group and device_os_version cannot be combined (either "
                         "one can be combined with product_fw)", code="bad_request")
    if group and not GROUP_NAME_RE.match(group):
        raise BadRequest("device_group must be a group name: 1-64 lowercase letters, "
                         "digits, '-' or '_'", code="bad_request")
    if os_version and not OS_VERSION_RE.match(os_version):
        raise BadRequest("device_os_version must be a Device OS version such as 6.2.0 "
                         "(1 to 32 letters, digits, '.', '+', '-' or '_')",
                         code="bad_request")
    return group or None, os_version or None


async def with_filters(db: AsyncSession, product_id: int, w: metrics.Window, *,
                       group: str | None, os_version: str | None) -> metrics.Window:
    """``w`` filtered by a device group of the product (by name; 404 ``group_not_found``
    when it has none of that name; a dynamic group filters by its query) or by a Device OS
    version (400 when it is none); empty values filter nothing."""
    group, os_version = checked_filters(group, os_version)
    if group:
        g = (await db.execute(select(DeviceGroup).where(
            DeviceGroup.product_id == product_id, DeviceGroup.name == group))
             ).scalar_one_or_none()
        if g is None:
            raise NotFound(f"Group {group} not found", code="group_not_found")
        if g.query is not None:
            return dataclasses.replace(w, group_id=g.id,
                                       members=await dynamic_condition(db, product_id, g))
        return dataclasses.replace(w, group_id=g.id)
    if os_version:
        return dataclasses.replace(w, os_version=os_version)
    return w


DYNAMIC_UNFILTERED = ["devices.online_max", "connections", "events", "data_operations",
                      "functions", "variables", "timeout_rate",
                      "error_rate", "offline_rate"]


def _unfiltered(w: metrics.Window) -> list[str]:
    """The parts of the summary the window's filters do not narrow."""
    if w.members is not None:
        return list(DYNAMIC_UNFILTERED)
    return ["connections.reasons"] if w.firmware is not None else []


def call_counts(t: dict[str, int]) -> tuple[int, int, int]:
    """(calls, failed, timed out) of rollup totals: function calls and variable reads;
    failed counts the device's failures and its timeouts (offline is no error)."""
    calls = sum(t[f"{k}_{o}"] for k in ("fn", "var") for o in metrics.OUTCOMES)
    timeouts = t["fn_timeout"] + t["var_timeout"]
    return calls, t["fn_failure"] + t["var_failure"] + timeouts, timeouts


async def product_health(db: AsyncSession, product_id: int, w: metrics.Window
                         ) -> dict[str, Any]:
    """The fleet-health summary of a product over ``w`` (also what the console and the CLI
    show). Filtered (firmware version, group, Device OS version): every part counts only
    the selected devices, but the disconnect reasons are not counted per firmware version
    (with ``product_fw`` they are the whole product's, or the group's / Device OS
    version's). A dynamic group has no history: the devices, firmware, update outcomes,
    vitals and top lists are its devices' now; the counters over the window (connections,
    events, calls, ``online_max``) stay the product's (or the firmware version's), and
    ``filter.unfiltered`` names them."""
    online, total, firmware, as_of = await metrics.device_counts(db, product_id, w)
    t = await metrics.totals(db, product_id, w)
    calls, failed, timeouts = call_counts(t)
    return {
        "product_id": product_id,
        "start_date": clock.iso(w.start), "end_date": clock.iso(w.end),
        "filter": {"product_fw": w.firmware, "device_group_id": w.group_id,
                   "device_os_version": w.os_version,
                   "unfiltered": _unfiltered(w)},
        "devices": {"total": total, "online": online, "online_max": t["online_max"],
                    "as_of": clock.iso(as_of) if as_of else None},
        "connections": {"connects": t["connects"], "disconnects": t["disconnects"],
                        "reasons": await metrics.disconnect_reasons(db, product_id, w)},
        "events": {"received": t["events"]},
        "data_operations": t["data_ops"],
        "functions": {k: t[f"fn_{k}"] for k in metrics.OUTCOMES},
        "variables": {k: t[f"var_{k}"] for k in metrics.OUTCOMES},
        "error_rate": None if not calls else round(failed / calls, 4),
        "timeout_rate": None if not calls else round(timeouts / calls, 4),
        "offline_rate": None if not calls else round(
            (t["fn_offline"] + t["var_offline"]) / calls, 4),
        "firmware": firmware,
        "updates": await outcomes_by_release(db, product_id, since=w.start,
                                             devices=metrics.devices_of(product_id, w)),
        "vitals": await metrics.vitals_aggregates(db, product_id, w),
        "top": await metrics.troubled_devices(db, product_id, w),
    }


MAX_ORG_PRODUCTS = 200
# a product row's counters over the window that a dynamic group does not narrow (it has no
# segment rollups: they stay the product's, or the firmware version's)
ORG_DYNAMIC_UNFILTERED = ("online_max", "connects", "disconnects", "events",
                          "data_operations", "calls", "failed_calls", "timed_out_calls",
                          "error_rate", "timeout_rate")
ORG_SUMMED = ("devices", "online", "online_max", "connects", "disconnects", "events",
              "data_operations", "calls", "failed_calls", "timed_out_calls")


async def org_health(db: AsyncSession, org_id: int, w: metrics.Window, *,
                     group: str | None = None, os_version: str | None = None
                     ) -> dict[str, Any]:
    """An organization's fleet health over ``w``: per product (at most
    ``MAX_ORG_PRODUCTS``, by name) and summed. The filters apply to every product: the
    window's firmware version, a Device OS version, or a device group by name (each
    product's group of that name; products without one are left out, and when none has
    one the answer is 404 ``group_not_found``). A product's dynamic group of that name
    filters by its query, as :func:`with_filters` does: its ``devices`` and ``online`` are
    the devices matching it now, its counters over the window stay the product's and the
    row's ``unfiltered`` names them."""
    from corral.products.models import Product

    group, os_version = checked_filters(group, os_version)
    products = (await db.execute(select(Product).where(Product.org_id == org_id)
                                 .order_by(Product.name).limit(MAX_ORG_PRODUCTS))).scalars()
    groups: dict[int, DeviceGroup] = {}
    if group:
        groups = {g.product_id: g for g in (await db.execute(
            select(DeviceGroup).where(
                DeviceGroup.name == group,
                DeviceGroup.product_id.in_(select(Product.id).where(
                    Product.org_id == org_id))))).scalars()}
        if not groups:
            raise NotFound(f"Group {group} not found", code="group_not_found")
    rows = []
    sums: dict[str, int] = dict.fromkeys(ORG_SUMMED, 0)
    for p in products:
        pw = dataclasses.replace(w, os_version=os_version)
        if group:
            g = groups.get(p.id)
            if g is None:
                continue
            pw = dataclasses.replace(pw, group_id=g.id, members=None if g.query is None
                                     else await dynamic_condition(db, p.id, g))
        online, total, _fw, as_of = await metrics.device_counts(db, p.id, pw)
        t = await metrics.totals(db, p.id, pw)
        calls, failed, timeouts = call_counts(t)
        row: dict[str, Any] = {
            "product_id": p.id, "slug": p.slug, "name": p.name, "devices": total,
            "online": online, "as_of": clock.iso(as_of) if as_of else None,
            "online_max": t["online_max"], "connects": t["connects"], "disconnects": t["disconnects"],
            "events": t["events"], "data_operations": t["data_ops"], "calls": calls,
            "failed_calls": failed, "timed_out_calls": timeouts,
            "error_rate": None if not calls else round(failed / calls, 4),
            "timeout_rate": None if not calls else round(timeouts / calls, 4),
            "unfiltered": list(ORG_DYNAMIC_UNFILTERED) if pw.members is not None else []}
        rows.append(row)
        for k in ORG_SUMMED:
            sums[k] += int(row[k])  # online_max: the sum of each's most
    calls = sums["calls"]
    return {"org_id": org_id, "start_date": clock.iso(w.start), "end_date": clock.iso(w.end),
            "filter": {"product_fw": w.firmware, "device_group": group,
                       "device_os_version": os_version},
            "products": rows,
            "total": {**sums, "error_rate": None if not calls
                      else round(sums["failed_calls"] / calls, 4),
                      "timeout_rate": None if not calls
                      else round(sums["timed_out_calls"] / calls, 4)}}
