"""/v1 fleet health routes: Particle's product metrics series, corral's fleet-health summary
and the fleet's last known locations. Everything here reads rollups and indexed counts,
never the events table."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from sqlalchemy import select

from corral.db.session import TransactionRoute
from corral.fleet import alerts, health, metrics
from corral.fleet.models import FleetAlertRule
from corral.fleet.schemas import (
    AlertRuleAnswer,
    AlertRuleChange,
    AlertRuleCreate,
    AlertRules,
    DataOperationsSeries,
    EventsSeries,
    FleetHealth,
    FleetLocations,
    FleetMetricsQuery,
    FunctionsSeries,
    OnlineSeries,
    OrgFleetHealth,
    OrgHealthQuery,
    VariablesSeries,
)
from corral.kit.body import body, query
from corral.kit.errors import BadRequest
from corral.kit.responses import OkAnswer, answers
from corral.locations import service as locations
from corral.orgs.access import OrgCtx, OrgGuard
from corral.products.access import ProductCtx, ProductGuard

router = APIRouter(tags=["fleet health"], route_class=TransactionRoute)

FLEET = "fleet:get"
MAX_LOCATIONS = 10_000


async def _window(pc: ProductCtx, q: FleetMetricsQuery) -> metrics.Window:
    w = window_of(q.model_dump(exclude_none=True), pc.ctx.settings.fleet_minute_retention_days)
    return await health.with_filters(pc.db, pc.product.id, w, group=q.device_group,
                                     os_version=q.device_os_version)


def window_of(params: Any, minute_days: int) -> metrics.Window:
    """The window of a query (400 ``bad_request`` naming what is wrong)."""
    try:
        return metrics.parse_window(params, minute_days=minute_days)
    except ValueError as exc:
        raise BadRequest(str(exc), code="bad_request") from None


async def _series(pc: ProductCtx, q: FleetMetricsQuery, metric: str) -> dict[str, Any]:
    w = await _window(pc, q)
    if w.members is not None:
        raise BadRequest(f"device_group {q.device_group} is a dynamic group: its devices "
                         "change with its query and no history of them is kept, so series "
                         "cannot be filtered by it (the health summary can)",
                         code="bad_request")
    return await metrics.series(pc.db, pc.product.id, metric, w)


@router.get("/v1/products/{product}/metrics/online", summary="Devices online over time",
            responses=answers(OnlineSeries))
async def metrics_online(pc: ProductCtx = Depends(ProductGuard(FLEET)),
                         q: FleetMetricsQuery = query(FleetMetricsQuery)) -> dict[str, Any]:
    """`{"online": [{"time", "count"}]}`: the most devices online at once per bucket
    (`start_date`, `end_date`, `bucket_size` seconds (900), `product_fw`, `device_group`
    or `device_os_version`)."""
    return await _series(pc, q, "online")


@router.get("/v1/products/{product}/metrics/events", summary="Events received over time",
            responses=answers(EventsSeries))
async def metrics_events(pc: ProductCtx = Depends(ProductGuard(FLEET)),
                         q: FleetMetricsQuery = query(FleetMetricsQuery)) -> dict[str, Any]:
    """`{"events": [{"time", "received"}]}`: device events stored per bucket (the cloud's
    `spark*`/`particle*` system events excluded)."""
    return await _series(pc, q, "events")


@router.get("/v1/products/{product}/metrics/functions", summary="Function calls over time",
            responses=answers(FunctionsSeries))
async def metrics_functions(pc: ProductCtx = Depends(ProductGuard(FLEET)),
                            q: FleetMetricsQuery = query(FleetMetricsQuery)) -> dict[str, Any]:
    """`{"functions": [{"time", "success", "failure", "offline"}]}` (zero counts left out;
    a timeout counts as a failure)."""
    return await _series(pc, q, "functions")


@router.get("/v1/products/{product}/metrics/variables", summary="Variable reads over time",
            responses=answers(VariablesSeries))
async def metrics_variables(pc: ProductCtx = Depends(ProductGuard(FLEET)),
                            q: FleetMetricsQuery = query(FleetMetricsQuery)) -> dict[str, Any]:
    """`{"variables": [{"time", "success", "failure", "offline"}]}` (zero counts left out;
    a timeout counts as a failure)."""
    return await _series(pc, q, "variables")


@router.get("/v1/products/{product}/metrics/data_operations",
            summary="Data operations over time", responses=answers(DataOperationsSeries))
async def metrics_data_operations(pc: ProductCtx = Depends(ProductGuard(FLEET)),
                                  q: FleetMetricsQuery = query(FleetMetricsQuery)
                                  ) -> dict[str, Any]:
    """corral's own: `{"data_operations": [{"time", "count"}]}`: data operations per bucket
    (publishes, deliveries to the devices, function calls and variable reads that usage
    counted), from the rollups."""
    return await _series(pc, q, "data_operations")




@router.get("/v1/products/{product}/fleet/health", summary="A product's fleet health",
            responses=answers(FleetHealth))
async def fleet_health(pc: ProductCtx = Depends(ProductGuard(FLEET)),
                       q: FleetMetricsQuery = query(FleetMetricsQuery)) -> dict[str, Any]:
    """Devices online now (and the most at once in the range), connects and disconnects,
    events, function and variable outcomes with the error rate, firmware distribution,
    update success per release, vitals (median and worst) and the devices with the most
    disconnects and errors (`start_date`, `end_date`, default the last day; filters:
    `product_fw`, and `device_group` or `device_os_version`; `filter` says which applied
    and which parts stay product-wide)."""
    return await health.product_health(pc.db, pc.product.id, await _window(pc, q))


@router.get("/v1/orgs/{org}/fleet/health", summary="An organization's fleet health",
            responses=answers(OrgFleetHealth))
async def org_fleet_health(oc: OrgCtx = Depends(OrgGuard(FLEET)),
                           q: OrgHealthQuery = query(OrgHealthQuery)) -> dict[str, Any]:
    """Per product of the organization (at most 200, by name) and summed: devices, online
    now and most at once, connects and disconnects, events, call outcomes and the error
    rate (`start_date`, `end_date`, default the last day; filters: `product_fw`, and
    `device_group` (each product's group of that name; products without one are left out)
    or `device_os_version`)."""
    w = window_of(q.model_dump(exclude_none=True), oc.ctx.settings.fleet_minute_retention_days)
    return await health.org_health(oc.db, oc.org.id, w, group=q.device_group,
                                   os_version=q.device_os_version)


@router.get("/v1/products/{product}/fleet_locations", summary="The fleet's last locations",
            responses=answers(FleetLocations))
async def fleet_locations(pc: ProductCtx = Depends(ProductGuard("locations:get"))
                          ) -> dict[str, Any]:
    """The last known point of every located device (at most 10,000, newest first), for a
    map: `{"locations": [{"device_id", "device_name", "online", "last_heard", "geometry",
    "timestamps", ...}], "meta": {"total"}}`."""
    rows, total = await locations.latest_per_device(pc.db, pc.product.id, page=1,
                                                    per_page=MAX_LOCATIONS)
    return {"locations": [locations.point_json(p, d) for p, d in rows],
            "meta": {"total": total}}



# --- alert rules ------------------------------------------------------------------------------

MANAGE = "fleet:manage"


@router.get("/v1/products/{product}/fleet/alerts", summary="A product's alert rules",
            responses=answers(AlertRules))
async def list_alerts(pc: ProductCtx = Depends(ProductGuard(FLEET))) -> dict[str, Any]:
    """`{"alerts": [{"id", "name", "kind", "threshold", "window_s", "enabled", "active",
    "active_since", "last_value", "devices", "created_at"}]}`."""
    rules = (await pc.db.execute(select(FleetAlertRule).where(
        FleetAlertRule.product_id == pc.product.id).order_by(FleetAlertRule.id))).scalars()
    return {"alerts": [alerts.rule_json(r) for r in rules]}


@router.post("/v1/products/{product}/fleet/alerts", status_code=201,
             summary="Create an alert rule", responses=answers(AlertRuleAnswer, status=201))
async def create_alert(pc: ProductCtx = Depends(ProductGuard(MANAGE)),
                       req: AlertRuleCreate = body(AlertRuleCreate)) -> dict[str, Any]:
    """`kind` (`online_below` | `error_rate_above` | `silent_longer`), `threshold`,
    `window_s` (error rate, 900), `name`. At most 50 rules per product."""
    rule = await alerts.create_rule(pc.db, pc.product.id, req)
    return {"ok": True, "alert": alerts.rule_json(rule)}


@router.put("/v1/products/{product}/fleet/alerts/{alert_id}", summary="Change an alert rule",
            responses=answers(AlertRuleAnswer))
async def update_alert(alert_id: str, pc: ProductCtx = Depends(ProductGuard(MANAGE)),
                       req: AlertRuleChange = body(AlertRuleChange)) -> dict[str, Any]:
    """Any of `name`, `threshold`, `window_s`, `enabled` (the kind stays)."""
    rule = alerts.update_rule(await alerts.get_rule(pc.db, pc.product.id, alert_id), req)
    await pc.db.flush()
    return {"ok": True, "alert": alerts.rule_json(rule)}


@router.delete("/v1/products/{product}/fleet/alerts/{alert_id}", summary="Delete an alert rule",
               responses=answers(OkAnswer))
async def delete_alert(alert_id: str,
                       pc: ProductCtx = Depends(ProductGuard(MANAGE))) -> dict[str, Any]:
    """Removes the rule (an active alert ends without a cleared event)."""
    await pc.db.delete(await alerts.get_rule(pc.db, pc.product.id, alert_id))
    await pc.db.flush()
    return {"ok": True}
