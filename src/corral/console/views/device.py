"""The device page: presence, identity, functions and variables, live events, firmware and
why, groups, notes, owner, credentials; and every action on one device.

One page for two ways in: ``/console/products/{product}/devices/{id}`` for the product's team
(``ProductGuard``), ``/console/devices/{id}`` for the device's owner or the customer it is
claimed to (``DeviceGuard``). An action both may take is one function with a route on each
path; what a viewer may do follows their role or their relation to the device, and the
service refuses anything else.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy.ext.asyncio import AsyncSession

from corral.auth.policy import Role, role_allows
from corral.console.forms import FormErrors, attempt, checked, read_form, text, values
from corral.console.render import page, redirect
from corral.console.session import ConsoleDeviceGuard, ConsoleProductGuard
from corral.console.views import device_vitals
from corral.console.views.home import PLATFORM_NAMES
from corral.console.views.logs import history
from corral.db.session import TransactionRoute
from corral.devices import claims, credentials, importer
from corral.devices import groups as group_rules
from corral.devices import service as devices
from corral.devices.access import CUSTOMER_DEVICE_PERMISSIONS, DeviceCtx, product_device
from corral.devices.models import Device
from corral.devices.schemas import DeviceChange, ProductDeviceChange
from corral.firmware import service as firmware
from corral.firmware.updates import device_updates
from corral.fleet.vitals_api import ask as ask_for_vitals
from corral.kit.body import from_body, validate
from corral.kit.errors import BadRequest, CorralError
from corral.products.access import ProductCtx
from corral.products.models import Product
from corral.sessions import api as calls
from corral.sessions.schemas import FunctionCall

router = APIRouter(route_class=TransactionRoute)

@dataclass
class Firmware:
    """What the device runs, what it should run, and the precedence rule that says so."""

    running: int | None
    target: int | None
    source: str  # development | locked | group | default | none
    rollout_id: int | None
    held: bool
    reason: str


@dataclass
class Results:
    """What an action on the page produced, shown when the page renders again."""

    errors: dict[str, FormErrors] = field(default_factory=dict)
    call: dict[str, Any] | None = None  # {"function", "arg", "value" | "error"}
    variables: dict[str, Any] = field(default_factory=dict)  # name -> value | {"error"}
    secret: str | None = None  # a new MQTT secret, shown once
    form: dict[str, Any] = field(default_factory=dict)  # submitted values to show again

    def on(self, name: str) -> FormErrors:
        return self.errors.get(name, FormErrors())


@dataclass
class Target:
    """Who is looking at the device, and through which path."""

    ctx: Any
    device: Device
    product: Product | None
    role: Role | None
    via: str  # product | owner | customer

    @property
    def db(self) -> AsyncSession:
        db: AsyncSession = self.ctx.db
        return db

    @property
    def base(self) -> str:
        if self.via == "product" and self.product is not None:
            return f"/console/products/{self.product.slug}/devices/{self.device.id}"
        return f"/console/devices/{self.device.id}"

    def may(self, permission: str) -> bool:
        if self.via == "owner":
            return True
        if self.via == "customer":
            return permission in CUSTOMER_DEVICE_PERMISSIONS
        return self.role is not None and role_allows(self.role, permission)


def _from_product(pc: ProductCtx, device: Device) -> Target:
    return Target(pc.ctx, device, pc.product, pc.role, "product")


def _from_device(dc: DeviceCtx) -> Target:
    return Target(dc.ctx, dc.device, dc.product, dc.role, dc.via)


async def firmware_facts(db: AsyncSession, product: Product, device: Device) -> Firmware:
    from corral.firmware.resolver import targets_for

    t = (await targets_for(db, product.id, [device.id])).get(device.id)
    if t is None:
        return Firmware(device.firmware_version, None, "none", None, False, "")
    reasons = {
        "development": "A development device: no firmware is sent to it automatically.",
        "locked": f"Locked to v{t.version} on this device.",
        "cohort": f"v{t.version} is released to its cohort (a cohort's release wins over "
                  "group releases and the product default).",
        "group": f"v{t.version} is released to one of its groups (the highest group "
                 "release wins over the product default).",
        "default": f"v{t.version} is the product's default release.",
        "none": "No release targets it: no group release and no product default.",
    }
    reason = reasons[t.source]
    if t.rollout_id is not None:
        reason += f" Part of phased rollout #{t.rollout_id}" + (
            " (paused: the update waits)." if t.held else ".")
    return Firmware(device.firmware_version, t.version, t.source, t.rollout_id, t.held, reason)


def _event_scope(t: Target) -> dict[str, Any]:
    """Stored events the viewer may see: a product member all of the device's; an owner or
    a customer those from while it was theirs (as ``GET /v1/devices/{id}/event_log``)."""
    me = t.ctx.subject
    if t.via == "owner":
        return {"owner_user_id": me.user_id}
    if t.via == "customer":
        return {"customer_id": me.customer_id}
    return {}


async def render(request: Request, t: Target, results: Results | None = None, *,
                 status: int = 200) -> Response:
    results = results or Results()
    db, device, product = t.db, t.device, t.product
    owner = (await devices.owner_names(db, [device])).get(device.id)
    groups: list[str] = []
    colors: dict[str, str] = {}
    dynamic: set[str] = set()
    fw = None
    versions: list[Any] = []
    updates: list[Any] = []
    if product is not None and t.via == "product":
        groups = (await group_rules.group_names_for(db, [device.id], product.id)
                  ).get(device.id, [])
        colors = await group_rules.group_colors(db, product)
        dynamic = await group_rules.dynamic_group_names(db, product)
        fw = await firmware_facts(db, product, device)
        versions = await firmware.product_firmware(db, product)
        updates = await device_updates(db, device.id, limit=5)
    rows, more, names = await history(db, {"device": device.id}, None, **_event_scope(t))
    health = None
    if t.may("devices.diagnostics:get"):
        health = await device_vitals.panel(db, device.id, request.query_params.get("vitals"))
    stream = f"{t.base}/events/stream"
    return await page(
        request, "devices/device.html", status=status,
        product=product if t.via == "product" else None, role=t.role,
        title=f"{device.name or device.id}", section="devices", device=device, owner=owner,
        groups=groups, dynamic=dynamic, colors=colors, fw=fw, versions=versions, updates=updates, via=t.via,
        base=t.base, may=t.may, results=results, platforms=PLATFORM_NAMES,
        credentials=credentials.credentials_json(device), vitals=health,
        # the live events panel (logs/_live.html)
        rows=rows, names=names, more=None, older=None, filters={}, stream=stream,
        device_base=None, live=True, log_title="Events",
        headers={"Cache-Control": "no-store"})


async def _act(request: Request, t: Target, form_name: str, fields: tuple[str, ...],
               action: Callable[[dict[str, Any]], Awaitable[str | None]]) -> Response:
    """Run one action of the page: a flash and back to the page, or the page again with the
    error next to the form's field (nothing written)."""
    form = await read_form(request)
    message, errors = await attempt(t.db, fields, lambda: action(form))
    if errors:
        results = Results(errors={form_name: errors},
                          form={k: v for k, v in form.items() if isinstance(v, str)})
        return await render(request, t, results, status=400)
    return redirect(t.base, flash=message or "Saved.")


# --- the page -------------------------------------------------------------------------------

@router.get("/console/products/{product}/devices/{device_id}", summary="Device page")
async def product_device_page(device_id: str, request: Request,
                              pc: ProductCtx = Depends(ConsoleProductGuard("devices:get"))
                              ) -> Response:
    """A device of the product, for its team."""
    return await render(request, _from_product(pc, await product_device(pc, device_id)))


@router.get("/console/devices/{device_id}", summary="My device's page")
async def own_device_page(request: Request,
                          dc: DeviceCtx = Depends(ConsoleDeviceGuard("devices:get"))
                          ) -> Response:
    """A device I own, or one claimed to me as a customer (a product's team member is sent to
    the product's page of it)."""
    if dc.via == "product" and dc.product is not None:
        return redirect(f"/console/products/{dc.product.slug}/devices/{dc.device.id}")
    return await render(request, _from_device(dc))


# --- vitals ---------------------------------------------------------------------------------

async def _refresh_vitals(request: Request, t: Target) -> Response:
    async def go(_form: dict[str, Any]) -> str:
        await ask_for_vitals(t.ctx, t.device)
        return "The device was asked for fresh vitals: they show here when it answers."

    return await _act(request, t, "vitals", (), go)


@router.post("/console/products/{product}/devices/{device_id}/vitals",
             summary="Refresh vitals")
async def product_refresh_vitals(
        device_id: str, request: Request,
        pc: ProductCtx = Depends(ConsoleProductGuard("devices.diagnostics:update"))
) -> Response:
    """Ask the device for fresh vitals (as ``POST /v1/diagnostics/:id/update``)."""
    return await _refresh_vitals(request, _from_product(pc, await product_device(pc, device_id)))


@router.post("/console/devices/{device_id}/vitals", summary="Refresh vitals (my device)")
async def own_refresh_vitals(
        request: Request,
        dc: DeviceCtx = Depends(ConsoleDeviceGuard("devices.diagnostics:update"))) -> Response:
    """Ask my device for fresh vitals."""
    return await _refresh_vitals(request, _from_device(dc))


# --- functions and variables (the same session request as /v1) -----------------------------

def _wants_json(request: Request) -> bool:
    return "application/json" in request.headers.get("accept", "")


async def _call(request: Request, t: Target) -> Response:
    form = await read_form(request)
    name, arg = text(form, "function"), text(form, "arg")
    outcome: dict[str, Any] = {"function": name, "arg": arg}
    try:
        calls.check_name(name, "function")
        if name not in (t.device.functions or []):
            raise BadRequest(f"The device has no function {name!r}")
        reply = await calls.device_request(t.ctx, t.device.id, {
            "kind": "function", "name": name, "arg": validate(FunctionCall, {"arg": arg}).argument()})
        outcome["value"] = reply.get("return_value")
    except CorralError as exc:
        outcome["error"] = exc.description
    if _wants_json(request):
        return JSONResponse({"ok": "error" not in outcome, **outcome},
                            headers={"Cache-Control": "no-store"})
    return await render(request, t, Results(call=outcome),
                        status=200 if "error" not in outcome else 400)


async def _variable(request: Request, t: Target, name: str) -> Response:
    outcome: dict[str, Any] = {}
    try:
        calls.check_name(name, "variable")
        reply = await calls.device_request(t.ctx, t.device.id,
                                           {"kind": "variable", "name": name})
        outcome["value"] = reply.get("result")
    except CorralError as exc:
        outcome["error"] = exc.description
    if _wants_json(request):
        return JSONResponse({"ok": "error" not in outcome, "name": name, **outcome},
                            headers={"Cache-Control": "no-store"})
    return await render(request, t, Results(variables={name: outcome}))


@router.post("/console/products/{product}/devices/{device_id}/functions",
             summary="Call a function")
async def product_call(device_id: str, request: Request,
                       pc: ProductCtx = Depends(ConsoleProductGuard("devices.function:call"))
                       ) -> Response:
    """Call one of the device's functions with an argument; the return value is shown."""
    return await _call(request, _from_product(pc, await product_device(pc, device_id)))


@router.post("/console/devices/{device_id}/functions", summary="Call a function (my device)")
async def own_call(request: Request,
                   dc: DeviceCtx = Depends(ConsoleDeviceGuard("devices.function:call"))
                   ) -> Response:
    """Call one of my device's functions."""
    return await _call(request, _from_device(dc))


@router.get("/console/products/{product}/devices/{device_id}/variables/{name}",
            summary="Read a variable")
async def product_variable(device_id: str, name: str, request: Request,
                           pc: ProductCtx = Depends(ConsoleProductGuard("devices.variable:get"))
                           ) -> Response:
    """Read the variable now (the page's script refreshes it in place)."""
    return await _variable(request, _from_product(pc, await product_device(pc, device_id)),
                           name)


@router.get("/console/devices/{device_id}/variables/{name}", summary="Read a variable (mine)")
async def own_variable(name: str, request: Request,
                       dc: DeviceCtx = Depends(ConsoleDeviceGuard("devices.variable:get"))
                       ) -> Response:
    """Read my device's variable now."""
    return await _variable(request, _from_device(dc), name)


# --- name and notes, MQTT secret, unclaim (both ways in) ------------------------------------

async def _edit(request: Request, t: Target) -> Response:
    async def go(form: dict[str, Any]) -> str:
        body: dict[str, Any] = {"notes": text(form, "notes")}
        if text(form, "name").strip() or t.device.name:
            body["name"] = text(form, "name").strip()
        await devices.update_device(t.db, actor=t.ctx.me, ip=t.ctx.ip, device=t.device,
                                    req=from_body(ProductDeviceChange if t.via == "product"
                                                  else DeviceChange, body),
                                    product=t.product, role=t.role)
        return "Device saved."

    return await _act(request, t, "edit", ("name", "notes"), go)


@router.post("/console/products/{product}/devices/{device_id}/edit", summary="Rename")
async def product_edit(device_id: str, request: Request,
                       pc: ProductCtx = Depends(ConsoleProductGuard("devices:update"))
                       ) -> Response:
    """Change the device's name and notes."""
    return await _edit(request, _from_product(pc, await product_device(pc, device_id)))


@router.post("/console/devices/{device_id}/edit", summary="Rename (my device)")
async def own_edit(request: Request,
                   dc: DeviceCtx = Depends(ConsoleDeviceGuard("devices:update"))) -> Response:
    """Change my device's name and notes."""
    return await _edit(request, _from_device(dc))


async def _rotate(request: Request, t: Target) -> Response:
    await read_form(request)
    secret, errors = await attempt(t.db, (), lambda: credentials.rotate_mqtt_secret(
        t.db, actor=t.ctx.me, ip=t.ctx.ip, device=t.device))
    if secret is None:
        return await render(request, t, Results(errors={"secret": errors}), status=400)
    return await render(request, t, Results(secret=secret))


@router.post("/console/products/{product}/devices/{device_id}/mqtt-secret",
             summary="Rotate the MQTT secret")
async def product_rotate(device_id: str, request: Request,
                         pc: ProductCtx = Depends(ConsoleProductGuard("devices.keys:update"))
                         ) -> Response:
    """A new MQTT secret, shown once on the page that answers; the old one stops working."""
    return await _rotate(request, _from_product(pc, await product_device(pc, device_id)))


@router.post("/console/devices/{device_id}/mqtt-secret", summary="Rotate my device's secret")
async def own_rotate(request: Request,
                     dc: DeviceCtx = Depends(ConsoleDeviceGuard("devices.keys:update"))
                     ) -> Response:
    """A new MQTT secret for my device, shown once."""
    return await _rotate(request, _from_device(dc))


async def _unclaim(request: Request, t: Target) -> Response:
    async def go(_form: dict[str, Any]) -> str:
        await claims.unclaim_device(t.db, actor=t.ctx.me, device=t.device, ip=t.ctx.ip)
        return "Device unclaimed."

    if t.via == "product":
        return await _act(request, t, "claim", (), go)
    # an owner or customer no longer reaches the device afterwards: back to their list
    form = await read_form(request)
    _, errors = await attempt(t.db, (), lambda: go(form))
    if errors:
        return await render(request, t, Results(errors={"claim": errors}), status=400)
    return redirect("/console/devices", flash="Device unclaimed.")


@router.post("/console/products/{product}/devices/{device_id}/unclaim", summary="Unclaim")
async def product_unclaim(device_id: str, request: Request,
                          pc: ProductCtx = Depends(ConsoleProductGuard("devices:update"))
                          ) -> Response:
    """Release the device from its owner or customer; it stays in the product."""
    return await _unclaim(request, _from_product(pc, await product_device(pc, device_id)))


@router.post("/console/devices/{device_id}/unclaim", summary="Unclaim my device")
async def own_unclaim(request: Request,
                      dc: DeviceCtx = Depends(ConsoleDeviceGuard("devices:update"))
                      ) -> Response:
    """Give my device up."""
    return await _unclaim(request, _from_device(dc))


# --- the product's actions on its device ---------------------------------------------------

@router.post("/console/products/{product}/devices/{device_id}/claim", summary="Claim to me")
async def claim(device_id: str, request: Request,
                pc: ProductCtx = Depends(ConsoleProductGuard("devices:update"))) -> Response:
    """Claim the device to myself (``claims.claim_device``, as ``POST /v1/devices``)."""
    t = _from_product(pc, await product_device(pc, device_id))

    async def go(_form: dict[str, Any]) -> str:
        await claims.claim_device(t.db, actor=t.ctx.me, device_id=t.device.id, ip=t.ctx.ip)
        return "The device is claimed to you."

    return await _act(request, t, "claim", (), go)


@router.post("/console/products/{product}/devices/{device_id}/groups", summary="Set groups")
async def set_groups(device_id: str, request: Request,
                     pc: ProductCtx = Depends(ConsoleProductGuard("devices:update"))
                     ) -> Response:
    """Make the device's groups exactly the checked ones (plus a new one, created)."""
    t = _from_product(pc, await product_device(pc, device_id))

    async def go(form: dict[str, Any]) -> str:
        names = values(form, "group")
        new = text(form, "new_group").strip()
        if new:
            names.append(new)
        await devices.update_device(t.db, actor=t.ctx.me, ip=t.ctx.ip, device=t.device,
                                    req=from_body(ProductDeviceChange, {"groups": names}),
                                    product=t.product, role=t.role)
        return "Groups saved."

    return await _act(request, t, "groups", ("groups", "new_group"), go)


@router.post("/console/products/{product}/devices/{device_id}/tags", summary="Set tags")
async def set_tags(device_id: str, request: Request,
                   pc: ProductCtx = Depends(ConsoleProductGuard("devices:update"))
                   ) -> Response:
    """Make the device's tags exactly the ones typed (separated by commas)."""
    t = _from_product(pc, await product_device(pc, device_id))

    async def go(form: dict[str, Any]) -> str:
        await devices.update_device(t.db, actor=t.ctx.me, ip=t.ctx.ip, device=t.device,
                                    req=from_body(ProductDeviceChange,
                                                  {"tags": text(form, "tags")}),
                                    product=t.product, role=t.role)
        return "Tags saved."

    return await _act(request, t, "tags", ("tags",), go)


@router.post("/console/products/{product}/devices/{device_id}/development",
             summary="Development device")
async def development(device_id: str, request: Request,
                      pc: ProductCtx = Depends(ConsoleProductGuard("firmware:release"))
                      ) -> Response:
    """Mark or unmark a development device (exempt from releases)."""
    t = _from_product(pc, await product_device(pc, device_id))

    async def go(form: dict[str, Any]) -> str:
        on = text(form, "value") == "true"
        await devices.update_device(t.db, actor=t.ctx.me, ip=t.ctx.ip, device=t.device,
                                    req=ProductDeviceChange(development=on),
                                    product=t.product, role=t.role)
        return "Marked as a development device." if on else "No longer a development device."

    return await _act(request, t, "state", (), go)


@router.post("/console/products/{product}/devices/{device_id}/firmware",
             summary="Lock firmware / flash")
async def lock_firmware(device_id: str, request: Request,
                        pc: ProductCtx = Depends(ConsoleProductGuard("firmware:release"))
                        ) -> Response:
    """Lock the device to a version (or unlock it), and optionally flash it now."""
    t = _from_product(pc, await product_device(pc, device_id))

    async def go(form: dict[str, Any]) -> str:
        version = text(form, "version")
        flash = checked(form, "flash")
        body: dict[str, Any] = {"desired_firmware_version": version or None}
        if flash:
            body["flash"] = True
        await devices.update_device(t.db, actor=t.ctx.me, ip=t.ctx.ip, device=t.device,
                                    req=from_body(ProductDeviceChange, body),
                                    product=t.product, role=t.role)
        if not version:
            return "Firmware unlocked: the release rules decide again."
        return f"Locked to v{version}" + (" and flashing now." if flash else ".")

    return await _act(request, t, "firmware", ("version", "desired_firmware_version", "flash"),
                      go)


@router.post("/console/products/{product}/devices/{device_id}/approve", summary="Approve")
async def approve(device_id: str, request: Request,
                  pc: ProductCtx = Depends(ConsoleProductGuard("devices:import"))) -> Response:
    """Let a quarantined (or denied) device in (an import of its ID)."""
    t = _from_product(pc, await product_device(pc, device_id))

    async def go(_form: dict[str, Any]) -> str:
        await importer.import_devices(t.db, actor=t.ctx.me, ip=t.ctx.ip, product=pc.product,
                                      request=importer.ImportInput(entries=[t.device.id]))
        return "Device approved."

    return await _act(request, t, "state", (), go)


async def _remove(request: Request, pc: ProductCtx, device_id: str, deny: bool) -> Response:
    t = _from_product(pc, await product_device(pc, device_id))
    await read_form(request)
    done, errors = await attempt(t.db, (), lambda: devices.remove_product_device(
        t.db, actor=t.ctx.me, ip=t.ctx.ip, product=pc.product, device=t.device, deny=deny))
    if errors:
        return await render(request, t, Results(errors={"state": errors}), status=400)
    if deny:
        return redirect(t.base, flash="Device denied: it is refused when it connects.")
    return redirect(f"/console/products/{pc.product.slug}/devices",
                    flash=f"Device {device_id} removed from the product.")


@router.post("/console/products/{product}/devices/{device_id}/remove", summary="Remove")
async def remove(device_id: str, request: Request,
                 pc: ProductCtx = Depends(ConsoleProductGuard("devices:remove"))) -> Response:
    """Take the device out of the product."""
    return await _remove(request, pc, device_id, deny=False)


@router.post("/console/products/{product}/devices/{device_id}/deny", summary="Deny")
async def deny(device_id: str, request: Request,
               pc: ProductCtx = Depends(ConsoleProductGuard("devices:remove"))) -> Response:
    """Deny the device: it is refused when it connects."""
    return await _remove(request, pc, device_id, deny=True)
