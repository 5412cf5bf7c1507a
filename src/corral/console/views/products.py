"""A product's overview and settings (rename, describe, quarantine, event limits, delete)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from corral.console import counts
from corral.console.forms import FormErrors, attempt, checked, read_form, text
from corral.console.render import page, redirect
from corral.console.session import ConsoleProductGuard
from corral.console.views.home import PLATFORM_NAMES, PLATFORMS
from corral.db.session import TransactionRoute
from corral.events import service as events
from corral.products import service as products
from corral.products.access import ProductCtx
from corral.products.schemas import ProductChange

router = APIRouter(route_class=TransactionRoute)


@router.get("/console/products/{product}", summary="Product overview")
async def overview(request: Request,
                   pc: ProductCtx = Depends(ConsoleProductGuard("products:get"))) -> Response:
    """How many devices, how many online, what waits in quarantine, the latest events."""
    summary = await counts.product_summary(pc.db, pc.product.id)
    recent = await events.query_events(pc.db, product_id=pc.product.id, limit=8)
    return await page(request, "products/overview.html", product=pc.product, role=pc.role,
                      title=pc.product.name, section="overview", summary=summary,
                      recent=recent, platforms=PLATFORM_NAMES)


@router.get("/console/products/{product}/stats", summary="Exact product counts (JSON)")
async def stats(pc: ProductCtx = Depends(ConsoleProductGuard("devices:list"))) -> Response:
    """The overview's counts, exact (its script replaces the bounded ones with these)."""
    return JSONResponse(await counts.product_stats(pc.db, pc.product.id),
                        headers={"Cache-Control": "no-store"})


SETTINGS_FIELDS = ("name", "description", "tags", "platform_id", "quarantine",
                   "event_data_max_bytes", "event_rate_per_s", "event_rate_burst")


def _settings_form(pc: ProductCtx) -> dict[str, Any]:
    p = pc.product
    s = p.settings or {}
    return {"name": p.name, "description": p.description or "", "tags": ", ".join(p.tags or []),
            "platform_id": str(p.platform_id), "quarantine": s.get("quarantine", True),
            "event_data_max_bytes": s.get("event_data_max_bytes", ""),
            "event_rate_per_s": s.get("event_rate_per_s", ""),
            "event_rate_burst": s.get("event_rate_burst", "")}


async def _settings_page(request: Request, pc: ProductCtx, *, form: dict[str, Any],
                         errors: FormErrors, status: int = 200,
                         delete_errors: FormErrors | None = None) -> Response:
    defaults = pc.ctx.settings
    return await page(request, "products/settings.html", status=status, product=pc.product,
                      role=pc.role, title=f"Settings · {pc.product.name}", section="settings",
                      form=form, errors=errors, delete_errors=delete_errors or FormErrors(),
                      platforms=PLATFORMS, defaults=defaults)


@router.get("/console/products/{product}/settings", summary="Product settings")
async def settings_page(request: Request,
                        pc: ProductCtx = Depends(ConsoleProductGuard("products:get"))
                        ) -> Response:
    """The product's settings form (read-only without ``products:update``)."""
    return await _settings_page(request, pc, form=_settings_form(pc), errors=FormErrors())


@router.post("/console/products/{product}/settings", summary="Save product settings")
async def save_settings(request: Request,
                        pc: ProductCtx = Depends(ConsoleProductGuard("products:update"))
                        ) -> Response:
    """``products.service.update_product`` with the form's fields (as ``PUT /v1``)."""
    form = await read_form(request)
    fields: dict[str, Any] = {k: text(form, k) for k in SETTINGS_FIELDS}
    fields["quarantine"] = checked(form, "quarantine")
    limits = {k: fields[k] for k in ("event_data_max_bytes", "event_rate_per_s",
                                     "event_rate_burst") if fields[k].strip()}
    change = {"name": fields["name"], "description": fields["description"],
              "tags": fields["tags"], "platform_id": fields["platform_id"],
              "settings": {"quarantine": fields["quarantine"], **limits}}
    pv, errors = await attempt(pc.db, SETTINGS_FIELDS, lambda: products.update_product(
        pc.db, actor=pc.ctx.me, product=pc.product, ip=pc.ctx.ip,
        req=ProductChange.model_validate(change)))
    if pv is None:
        _settings_errors(errors)
        return await _settings_page(request, pc, form=fields, errors=errors, status=400)
    return redirect(f"/console/products/{pv.product.slug}/settings", flash="Settings saved.")


def _settings_errors(errors: FormErrors) -> None:
    """``settings.event_rate_per_s must ...`` belongs next to that field."""
    for msg in list(errors.general):
        for key in ("event_data_max_bytes", "event_rate_per_s", "event_rate_burst",
                    "quarantine"):
            if f"settings.{key}" in msg or msg.startswith(key):
                errors.fields.setdefault(key, msg)
                errors.general.remove(msg)
                break


@router.post("/console/products/{product}/delete", summary="Delete a product")
async def delete(request: Request,
                 pc: ProductCtx = Depends(ConsoleProductGuard("products:remove"))) -> Response:
    """Delete the product (refused while devices remain; the reason is shown)."""
    form = await read_form(request)
    org_id = pc.product.org_id
    name = pc.product.name

    async def go() -> bool:
        if text(form, "confirm").strip() != pc.product.slug:
            from corral.kit.errors import BadRequest

            raise BadRequest(f"Type the product's slug ({pc.product.slug}) to confirm",
                             field="confirm")
        await products.delete_product(pc.db, actor=pc.ctx.me, product=pc.product, ip=pc.ctx.ip)
        return True

    done, errors = await attempt(pc.db, ("confirm",), go)
    if done is None:
        return await _settings_page(request, pc, form=_settings_form(pc), errors=FormErrors(),
                                    delete_errors=errors, status=400)
    return redirect(f"/console/orgs/{org_id}", flash=f"Product {name} deleted.")
