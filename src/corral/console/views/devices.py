"""A product's devices: the list (search, filters, sort, pages), the Import dialog, bulk
actions and the quarantine. The device page is in :mod:`corral.console.views.device`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from corral.console import counts
from corral.console.forms import FormErrors, attempt, read_form, text, values
from corral.console.render import page, redirect
from corral.console.session import CSRF_FIELD, ConsoleProductGuard
from corral.db.session import TransactionRoute
from corral.devices import groups as group_rules
from corral.devices import importer
from corral.devices import service as devices
from corral.devices.access import product_device
from corral.devices.schemas import BatchChange, ProductDeviceChange
from corral.kit.body import from_body
from corral.kit.errors import BadRequest, CorralError
from corral.products.access import ProductCtx

router = APIRouter(route_class=TransactionRoute)

SORTS = {"lastConnection": "Last heard", "deviceName": "Name", "deviceId": "Device ID",
         "firmwareVersion": "Firmware"}
# the Sort select: "<sortAttr>:<sortDir>" (column headers link to the same values)
SORT_CHOICES = [("lastConnection:desc", "Last heard, newest first"),
                ("lastConnection:asc", "Last heard, oldest first"),
                ("deviceName:asc", "Name, A to Z"), ("deviceName:desc", "Name, Z to A"),
                ("deviceId:asc", "Device ID"),
                ("firmwareVersion:desc", "Firmware, newest first"),
                ("firmwareVersion:asc", "Firmware, oldest first")]
DEFAULT_SORT = "lastConnection:desc"
PER_PAGE = (25, 50, 100)
FILTER_KEYS = ("q", "group", "tag", "cohort", "fw", "status", "flag", "sort", "per_page")


def filters_of(params: Mapping[str, str]) -> dict[str, str]:
    """The list's filters as the console's query string names them (empty ones dropped)."""
    return {k: params[k].strip() for k in FILTER_KEYS if params.get(k, "").strip()}


def device_query(filters: Mapping[str, str], page_no: str | None) -> devices.DeviceQuery:
    """The console's query string in ``/v1``'s parameter names, parsed by the same
    :func:`devices.service.parse_device_query` (a bad value is refused the same way)."""
    params: dict[str, str] = {"page": page_no or "1"}
    if filters.get("q"):
        params["search"] = filters["q"]
    if filters.get("group"):
        params["groups"] = filters["group"]
    if filters.get("cohort"):
        params["cohort"] = filters["cohort"]
    if filters.get("tag"):
        params["tags"] = filters["tag"]  # comma-separated: devices carrying all of them
    if filters.get("fw"):
        params["firmwareVersion"] = filters["fw"]
    status = filters.get("status")
    if status in ("online", "offline"):
        params["online"] = "true" if status == "online" else "false"
    flag = filters.get("flag")
    if flag in ("quarantined", "development"):
        params[flag] = "true"
    attr, _, direction = filters.get("sort", DEFAULT_SORT).partition(":")
    params["sortAttr"], params["sortDir"] = attr, direction or "desc"
    params["per_page"] = filters.get("per_page", "25")
    if params["per_page"] not in {str(n) for n in PER_PAGE}:
        raise BadRequest("per_page must be 25, 50 or 100")
    q = devices.parse_device_query(params)
    q.count = False
    return q


def link(base: str, filters: Mapping[str, str], **changes: Any) -> str:
    """``base`` with the current filters, some changed (None drops one)."""
    merged = {**filters, **{k: v for k, v in changes.items()}}
    query = {k: v for k, v in merged.items() if v not in (None, "")}
    return f"{base}?{urlencode(query)}" if query else base


async def _list_page(request: Request, pc: ProductCtx, *, status: int = 200,
                     import_result: importer.ImportResult | None = None,
                     import_errors: FormErrors | None = None,
                     bulk_errors: FormErrors | None = None,
                     quarantine: bool = False) -> Response:
    base = f"/console/products/{pc.product.slug}/" + ("quarantine" if quarantine else "devices")
    filters = filters_of(request.query_params)
    if quarantine:
        filters = {k: v for k, v in filters.items() if k not in ("flag", "status")}
        filters["flag"] = "quarantined"
    problem = None
    try:
        q = device_query(filters, request.query_params.get("page"))
    except CorralError as exc:
        problem, filters = exc.description, ({"flag": "quarantined"} if quarantine else {})
        q = device_query(filters, "1")
    if "sort" in filters:  # "deviceName" sorts as "deviceName:desc": the page shows it so
        filters["sort"] = f"{q.sort_attr}:{q.sort_dir}"
    result = await devices.list_product_devices(pc.db, pc.product, q)
    bounded = counts.Count(0)
    if result.devices or q.page > 1:
        # the listing's own count when it took one (exact up to FEW_MATCHES >= CAP)
        n = result.counted if result.counted is not None else \
            await devices.count_product_devices(pc.db, pc.product, q, cap=counts.CAP)
        bounded = counts.Count(min(n, counts.CAP), exact=n <= counts.CAP)
    colors = await group_rules.group_colors(pc.db, pc.product)
    count_url = link(f"/console/products/{pc.product.slug}/devices/count", filters)
    return await page(
        request, "devices/list.html", status=status, product=pc.product, role=pc.role,
        title=("Quarantine · " if quarantine else "Devices · ") + pc.product.name,
        section="quarantine" if quarantine else "devices", result=result, q=q,
        filters=filters, total=bounded, base=base, link=link, sorts=SORTS,
        sort_choices=SORT_CHOICES, default_sort=DEFAULT_SORT, per_page=PER_PAGE,
        colors=colors, group_options=[(n, n) for n in colors], problem=problem, count_url=count_url, quarantine=quarantine,
        import_result=import_result, import_errors=import_errors or FormErrors(),
        bulk_errors=bulk_errors or FormErrors(),
        first=(q.page - 1) * q.per_page + 1)


@router.get("/console/products/{product}/devices", summary="Device list")
async def device_list(request: Request,
                      pc: ProductCtx = Depends(ConsoleProductGuard("devices:list"))) -> Response:
    """Search by ID, name or serial number; filter by group, firmware, status; sort; page."""
    return await _list_page(request, pc)


@router.get("/console/products/{product}/devices/count", summary="Exact device count (JSON)")
async def device_count(request: Request,
                       pc: ProductCtx = Depends(ConsoleProductGuard("devices:list"))
                       ) -> Response:
    """How many devices match the list's filters, exactly (the page shows a bounded count
    first and asks for this one)."""
    q = device_query(filters_of(request.query_params), "1")
    total = await devices.count_product_devices(pc.db, pc.product, q)
    return JSONResponse({"total": total}, headers={"Cache-Control": "no-store"})


@router.get("/console/products/{product}/quarantine", summary="Quarantine")
async def quarantine(request: Request,
                     pc: ProductCtx = Depends(ConsoleProductGuard("devices:list"))) -> Response:
    """Devices that connected without being imported, waiting to be approved or denied."""
    return await _list_page(request, pc, quarantine=True)


# --- import ---------------------------------------------------------------------------------

@router.get("/console/products/{product}/devices/import", summary="Import page")
async def import_page(request: Request,
                      pc: ProductCtx = Depends(ConsoleProductGuard("devices:import"))
                      ) -> Response:
    """The Import form on a page of its own (the device list opens it as a dialog)."""
    return await page(request, "devices/import.html", product=pc.product, role=pc.role,
                      title=f"Import devices · {pc.product.name}", section="devices",
                      import_result=None, import_errors=FormErrors())


@router.post("/console/products/{product}/devices/import", summary="Import devices")
async def import_devices(request: Request,
                         pc: ProductCtx = Depends(ConsoleProductGuard("devices:import"))
                         ) -> Response:
    """A .txt file of IDs (and/or pasted IDs) with the force checkbox, through the same
    reader and importer as ``POST /v1/products/{product}/devices``."""
    ctx = pc.ctx

    async def go() -> importer.ImportResult:
        wanted = await importer.read_import_request(request, ctx.settings,
                                                    ignore=frozenset({CSRF_FIELD}))
        return await importer.import_devices(pc.db, actor=ctx.me, ip=ctx.ip,
                                             product=pc.product, request=wanted)

    result, errors = await attempt(pc.db, ("file", "ids", "force"), go)
    if result is None and errors.general and not errors.fields:
        errors.fields["file"] = errors.general.pop(0)
    return await page(request, "devices/import.html", status=200 if result else 400,
                      product=pc.product, role=pc.role,
                      title=f"Import devices · {pc.product.name}", section="devices",
                      import_result=result, import_errors=errors)


# --- bulk actions ---------------------------------------------------------------------------

def _selected(form: dict[str, Any]) -> list[str]:
    ids = values(form, "device")
    if not ids:
        raise BadRequest("Select at least one device first", field="device")
    return ids


async def _bulk(request: Request, pc: ProductCtx,
                act: Callable[[dict[str, Any], list[str]], Awaitable[str]]) -> Response:
    form = await read_form(request)
    back = text(form, "back") or f"/console/products/{pc.product.slug}/devices"
    if not back.startswith(f"/console/products/{pc.product.slug}/"):
        back = f"/console/products/{pc.product.slug}/devices"

    async def go() -> str:
        return await act(form, _selected(form))

    message, errors = await attempt(pc.db, ("device", "group"), go)
    if message is None:
        return await _list_page(request, pc, status=400, bulk_errors=errors,
                                quarantine="/quarantine" in back)
    return redirect(back, flash=message)


async def _each(pc: ProductCtx, ids: list[str],
                fn: Callable[[Any], Awaitable[Any]]) -> int:
    for did in ids:
        await fn(await product_device(pc, did))
    return len(ids)


@router.post("/console/products/{product}/devices/bulk/groups", summary="Bulk: groups")
async def bulk_groups(request: Request,
                      pc: ProductCtx = Depends(ConsoleProductGuard("devices:update"))
                      ) -> Response:
    """Add the selected devices to a group, or take them out of it (``batch_update``)."""
    async def act(form: dict[str, Any], ids: list[str]) -> str:
        group = text(form, "group").strip()
        if not group:
            raise BadRequest("Name the group", field="group")
        verb = "remove" if text(form, "op") == "remove" else "add"
        await devices.batch_update(pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, product=pc.product,
                                   req=from_body(BatchChange, {
                                       "action": "groups", "devices": ids,
                                       "metadata": {verb: [group]}}))
        return (f"{len(ids)} device(s) added to {group}." if verb == "add"
                else f"{len(ids)} device(s) taken out of {group}.")

    return await _bulk(request, pc, act)


@router.post("/console/products/{product}/devices/bulk/development",
             summary="Bulk: development devices")
async def bulk_development(request: Request,
                           pc: ProductCtx = Depends(ConsoleProductGuard("devices:update"))
                           ) -> Response:
    """Mark (or unmark) the selected devices as development devices."""
    async def act(form: dict[str, Any], ids: list[str]) -> str:
        on = text(form, "value") != "false"
        n = await _each(pc, ids, lambda d: devices.update_device(
            pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, device=d,
            req=ProductDeviceChange(development=on), product=pc.product, role=pc.role))
        return f"{n} device(s) {'marked' if on else 'no longer marked'} as development devices."

    return await _bulk(request, pc, act)


@router.post("/console/products/{product}/devices/bulk/approve", summary="Bulk: approve")
async def bulk_approve(request: Request,
                       pc: ProductCtx = Depends(ConsoleProductGuard("devices:import"))
                       ) -> Response:
    """Approve quarantined devices (an import of their IDs, as Particle's console does)."""
    async def act(form: dict[str, Any], ids: list[str]) -> str:
        result = await importer.import_devices(pc.db, actor=pc.ctx.me, ip=pc.ctx.ip,
                                               product=pc.product,
                                               request=importer.ImportInput(entries=ids))
        return f"{len(result.updated)} device(s) approved."

    return await _bulk(request, pc, act)


@router.post("/console/products/{product}/devices/bulk/remove", summary="Bulk: remove")
async def bulk_remove(request: Request,
                      pc: ProductCtx = Depends(ConsoleProductGuard("devices:remove"))
                      ) -> Response:
    """Remove the selected devices from the product."""
    return await _bulk(request, pc, _removal(pc, deny=False))


@router.post("/console/products/{product}/devices/bulk/deny", summary="Bulk: deny")
async def bulk_deny(request: Request,
                    pc: ProductCtx = Depends(ConsoleProductGuard("devices:remove"))
                    ) -> Response:
    """Deny the selected devices: they are refused when they connect."""
    return await _bulk(request, pc, _removal(pc, deny=True))


def _removal(pc: ProductCtx, *, deny: bool
             ) -> Callable[[dict[str, Any], list[str]], Awaitable[str]]:
    """Remove or deny each selected device (``remove_product_device``, as ``DELETE /v1``)."""
    async def act(form: dict[str, Any], ids: list[str]) -> str:
        n = await _each(pc, ids, lambda d: devices.remove_product_device(
            pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, product=pc.product, device=d, deny=deny))
        return f"{n} device(s) denied." if deny else f"{n} device(s) removed from the product."

    return act
