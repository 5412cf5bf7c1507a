"""The console's Fleet health page: a product's health over a chosen range (last hour, day,
week, 30 days; one firmware version, one device group or one Device OS version), with
server-rendered SVG charts of devices online, events received and data operations, from the
same rollups as
``/v1/products/:product/fleet/health``."""

from __future__ import annotations

import dataclasses
import datetime as dt
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response
from sqlalchemy import select

from corral.console.forms import FormErrors, attempt, checked, read_form
from corral.console.nav import NavItem, add_org_page, add_product_page
from corral.console.render import page, redirect
from corral.console.session import ConsoleOrgGuard, ConsoleProductGuard
from corral.db.session import TransactionRoute
from corral.devices.models import DeviceGroup
from corral.fleet import alerts, metrics
from corral.fleet.health import org_health, product_health, with_filters
from corral.fleet.models import FleetAlertRule
from corral.fleet.schemas import AlertRuleChange, AlertRuleCreate
from corral.kit import clock
from corral.kit.body import from_body
from corral.kit.errors import CorralError
from corral.kit.ids import path_id
from corral.locations import service as locations
from corral.orgs.access import OrgCtx
from corral.products.access import ProductCtx
from corral.products.models import Product

router = APIRouter(route_class=TransactionRoute)

RANGES = {"hour": (dt.timedelta(hours=1), 60), "day": (dt.timedelta(days=1), 900),
          "week": (dt.timedelta(days=7), 3600 * 6), "month": (dt.timedelta(days=30), 86_400)}
CHART_H, BAR_W, BAR_GAP = 120, 8, 2
MAX_GROUPS = 500  # offered in the group filter (by name)

add_product_page(NavItem("fleet", "Fleet health", "/fleet", "fleet:get", "pulse"),
                 before="logs")
add_org_page(NavItem("fleet", "Fleet health", "/fleet", "fleet:get", "pulse"), before="logs")


def chart(points: list[dict[str, Any]], key: str, unit: str) -> dict[str, Any]:
    """Bars of ``key`` per bucket, for a server-rendered SVG."""
    values = [int(p.get(key, 0)) for p in points]
    top = max(values, default=0) or 1
    bars = []
    for i, (p, v) in enumerate(zip(points, values, strict=True)):
        h = 0 if v == 0 else max(2, round(CHART_H * v / top))
        bars.append({"x": i * (BAR_W + BAR_GAP), "y": CHART_H - h, "h": h,
                     "title": f"{p['time']}: {v:,} {unit}"})
    return {"bars": bars, "width": max(1, len(points) * (BAR_W + BAR_GAP) - BAR_GAP),
            "height": CHART_H, "bar_w": BAR_W, "top": max(values, default=0),
            "total": sum(values), "unit": unit,
            "first": points[0]["time"] if points else "",
            "last": points[-1]["time"] if points else ""}


@dataclasses.dataclass
class PageFilters:
    """The Fleet health pages' range and filters, as the query string gave them."""

    chosen: str  # a key of RANGES
    fw: str  # the firmware version as typed ("" when it is no version)
    group: str
    os_version: str
    window: metrics.Window

    @classmethod
    def of(cls, request: Request) -> PageFilters:
        """A version the API would refuse shows every version; 0: devices that never said."""
        chosen = request.query_params.get("range", "day")
        chosen = chosen if chosen in RANGES else "day"
        span, bucket = RANGES[chosen]
        fw_raw = (request.query_params.get("fw") or "").strip()
        firmware = 0 if fw_raw == "0" else path_id(fw_raw)
        now = clock.now()
        return cls(chosen, fw_raw if firmware is not None else "",
                   (request.query_params.get("group") or "").strip()[:64],
                   (request.query_params.get("os") or "").strip()[:32],
                   metrics.Window(now - span, now, bucket, firmware))

    def form(self) -> dict[str, Any]:
        """What the filter form shows."""
        return {"chosen": self.chosen, "ranges": list(RANGES), "fw": self.fw,
                "group": self.group, "os_version": self.os_version}


@router.get("/console/products/{product}/fleet", summary="Fleet health")
async def fleet_page(request: Request, pc: ProductCtx = Depends(ConsoleProductGuard("fleet:get"))
                     ) -> Response:
    """Devices online, events, calls, firmware, updates, vitals, troubled devices, alerts
    (of the devices the filters select: a firmware version, a group or a Device OS
    version; a filter the API would refuse is named on the page, which shows all)."""
    pf = PageFilters.of(request)
    group, os_version, w = pf.group, pf.os_version, pf.window
    filter_error = None
    try:
        w = await with_filters(pc.db, pc.product.id, w, group=group, os_version=os_version)
    except CorralError as exc:
        filter_error, group, os_version = exc.description, "", ""
    groups = (await pc.db.execute(select(DeviceGroup.name).where(
        DeviceGroup.product_id == pc.product.id).order_by(DeviceGroup.name)
        .limit(MAX_GROUPS))).scalars().all()
    facts = await product_health(pc.db, pc.product.id, w)
    online = (await metrics.series(pc.db, pc.product.id, "online", w))["online"]
    events = (await metrics.series(pc.db, pc.product.id, "events", w))["events"]
    ops = (await metrics.series(pc.db, pc.product.id, "data_operations", w))["data_operations"]
    rules = (await pc.db.execute(select(FleetAlertRule).where(
        FleetAlertRule.product_id == pc.product.id).order_by(FleetAlertRule.id))).scalars()
    return await page(request, "fleet/health.html", product=pc.product, role=pc.role,
                      title=f"Fleet health · {pc.product.name}", section="fleet",
                      facts=facts, **{**pf.form(), "group": group, "os_version": os_version},
                      groups=groups, filter_error=filter_error,
                      online_chart=chart(online, "count", "devices online"),
                      events_chart=chart(events, "received", "events"),
                      ops_chart=chart(ops, "count", "data operations"),
                      rules=[alerts.rule_json(r) for r in rules])


@router.get("/console/orgs/{org}/fleet", summary="Fleet health of the organization")
async def org_fleet_page(request: Request, oc: OrgCtx = Depends(ConsoleOrgGuard("fleet:get"))
                         ) -> Response:
    """Every product of the organization (at most 200) and their sum over a range, of the
    devices the filters select (a firmware version, a group by name in each product, or a
    Device OS version), as ``/v1/orgs/:org/fleet/health``; a filter the API would refuse
    is named on the page, which shows all."""
    pf = PageFilters.of(request)
    group, os_version, filter_error = pf.group, pf.os_version, None
    try:
        facts = await org_health(oc.db, oc.org.id, pf.window, group=group or None,
                                 os_version=os_version or None)
    except CorralError as exc:
        filter_error, group, os_version = exc.description, "", ""
        facts = await org_health(oc.db, oc.org.id, pf.window)
    groups = (await oc.db.execute(
        select(DeviceGroup.name).distinct()
        .where(DeviceGroup.product_id.in_(select(Product.id).where(
            Product.org_id == oc.org.id)))
        .order_by(DeviceGroup.name).limit(MAX_GROUPS))).scalars().all()
    query = urlencode({"range": pf.chosen, "fw": pf.fw, "group": group, "os": os_version})
    return await page(request, "fleet/org.html", org=oc.org, role=oc.role,
                      title=f"Fleet health · {oc.org.name}", section="fleet", facts=facts,
                      **{**pf.form(), "group": group, "os_version": os_version},
                      groups=groups, filter_error=filter_error, query=query)


MAP_W, MAP_H = 720, 360  # an equirectangular world: 2 px per degree
MAP_POINTS = 10_000


@router.get("/console/products/{product}/fleet/map", summary="Fleet locations")
async def fleet_map(request: Request,
                    pc: ProductCtx = Depends(ConsoleProductGuard("locations:get"))) -> Response:
    """The last known point of every located device on a server-rendered SVG world map."""
    rows, total = await locations.latest_per_device(pc.db, pc.product.id, page=1,
                                                    per_page=MAP_POINTS)
    points = [{"x": round((p.lon + 180) * MAP_W / 360, 2),
               "y": round((90 - p.lat) * MAP_H / 180, 2),
               "online": bool(d.online) if d else False,
               "title": f"{(d.name if d and d.name else p.device_id)}: {p.lat:.5f}, "
                        f"{p.lon:.5f} ({clock.iso(clock.aware(p.at))})",
               "device_id": p.device_id} for p, d in rows]
    return await page(request, "fleet/map.html", product=pc.product, role=pc.role,
                      title=f"Fleet locations · {pc.product.name}", section="fleet",
                      points=points, total=total, width=MAP_W, height=MAP_H,
                      shown=len(points))


# --- alert rules ------------------------------------------------------------------------------

RULE_FIELDS = ("kind", "threshold", "window_s", "name", "enabled")
KIND_TEXT = {"online_below": "Devices online below (devices)",
             "error_rate_above": "Failed calls above (percent, over the window)",
             "silent_longer": "A device silent longer than (seconds)"}


async def _rules_page(request: Request, pc: ProductCtx, *, errors: dict[str, FormErrors]
                      | None = None, form: dict[str, Any] | None = None, editing: int | None = None,
                      status: int = 200) -> Response:
    rules = (await pc.db.execute(select(FleetAlertRule).where(
        FleetAlertRule.product_id == pc.product.id).order_by(FleetAlertRule.id))).scalars()
    return await page(request, "fleet/alerts.html", status=status, product=pc.product,
                      role=pc.role, title=f"Alert rules · {pc.product.name}", section="fleet",
                      rules=[alerts.rule_json(r) for r in rules], kinds=KIND_TEXT,
                      errors=errors or {}, form=form or {}, editing=editing,
                      most=alerts.MAX_RULES, headers={"Cache-Control": "no-store"})


@router.get("/console/products/{product}/fleet/alerts", summary="Alert rules")
async def alert_rules(request: Request, pc: ProductCtx = Depends(ConsoleProductGuard("fleet:get"))
                      ) -> Response:
    """The product's threshold rules with their state; a form to add, change or delete them
    for roles with ``fleet:manage``."""
    return await _rules_page(request, pc)


async def _rule_form(request: Request, pc: ProductCtx, form_name: str, editing: int | None,
                     action: Any) -> Response:
    form = await read_form(request)
    done, errors = await attempt(pc.db, RULE_FIELDS, lambda: action(form))
    if errors:
        return await _rules_page(request, pc, errors={form_name: errors}, editing=editing,
                                 form={k: v for k, v in form.items() if isinstance(v, str)},
                                 status=400)
    return redirect(f"/console/products/{pc.product.slug}/fleet/alerts", flash=done)


@router.post("/console/products/{product}/fleet/alerts", summary="Add an alert rule")
async def add_alert_rule(request: Request,
                         pc: ProductCtx = Depends(ConsoleProductGuard("fleet:manage"))
                         ) -> Response:
    """As ``POST /v1/products/:product/fleet/alerts`` (the same model and checks)."""
    async def go(form: dict[str, Any]) -> str:
        req = from_body(AlertRuleCreate, {k: v for k, v in form.items() if k in RULE_FIELDS})
        rule = await alerts.create_rule(pc.db, pc.product.id, req)
        return f"Alert rule \u201c{rule.name}\u201d added."

    return await _rule_form(request, pc, "new", None, go)


@router.post("/console/products/{product}/fleet/alerts/{alert_id}", summary="Change an alert rule")
async def change_alert_rule(alert_id: str, request: Request,
                            pc: ProductCtx = Depends(ConsoleProductGuard("fleet:manage"))
                            ) -> Response:
    """As ``PUT /v1/products/:product/fleet/alerts/:id``; the checkbox says ``enabled``."""
    rule = await alerts.get_rule(pc.db, pc.product.id, alert_id)

    async def go(form: dict[str, Any]) -> str:
        fields = {k: v for k, v in form.items() if k in RULE_FIELDS}
        fields["enabled"] = checked(form, "enabled")
        alerts.update_rule(rule, from_body(AlertRuleChange, fields))
        await pc.db.flush()
        return f"Alert rule \u201c{rule.name}\u201d saved."

    return await _rule_form(request, pc, f"rule-{rule.id}", rule.id, go)


@router.post("/console/products/{product}/fleet/alerts/{alert_id}/delete",
             summary="Delete an alert rule")
async def delete_alert_rule(alert_id: str, request: Request,
                            pc: ProductCtx = Depends(ConsoleProductGuard("fleet:manage"))
                            ) -> Response:
    """As ``DELETE /v1/products/:product/fleet/alerts/:id``."""
    rule = await alerts.get_rule(pc.db, pc.product.id, alert_id)
    name = rule.name

    async def go(_form: dict[str, Any]) -> str:
        await pc.db.delete(rule)
        await pc.db.flush()
        return f"Alert rule \u201c{name}\u201d deleted."

    return await _rule_form(request, pc, f"rule-{rule.id}", rule.id, go)
