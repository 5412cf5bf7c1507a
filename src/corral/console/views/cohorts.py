"""A product's cohorts in the console: the list with each cohort's release and device count,
create, edit (name, description, release), delete. Each action calls the service ``/v1``
calls."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from corral.cohorts import service as cohorts
from corral.cohorts.schemas import CohortChange, CohortCreate
from corral.console.forms import FormErrors, attempt, read_form, text
from corral.console.render import page, redirect
from corral.console.session import ConsoleProductGuard
from corral.db.session import TransactionRoute
from corral.firmware import service as firmware
from corral.kit.body import from_body
from corral.products.access import ProductCtx

router = APIRouter(route_class=TransactionRoute)
FIELDS = ("name", "description", "firmware_version")


def _base(pc: ProductCtx) -> str:
    return f"/console/products/{pc.product.slug}"


async def _page(request: Request, pc: ProductCtx, *, status: int = 200,
                errors: FormErrors | None = None, editing: str | None = None,
                form: dict[str, str] | None = None) -> Response:
    rows = await cohorts.views(pc.db, await cohorts.list_cohorts(pc.db, pc.product))
    versions = [fw.version for fw in await firmware.product_firmware(pc.db, pc.product)]
    return await page(request, "manage/cohorts.html", status=status, product=pc.product,
                      role=pc.role, title=f"Cohorts · {pc.product.name}", section="cohorts",
                      cohorts=rows, versions=versions, errors=errors or FormErrors(),
                      editing=editing, form=form or {}, base=_base(pc))


def _body(form: dict[str, Any]) -> dict[str, Any]:
    """The form in /v1's names; an empty release select means no release."""
    return {"name": text(form, "name").strip(), "description": text(form, "description"),
            "firmware_version": text(form, "firmware_version") or None}


@router.get("/console/products/{product}/cohorts", summary="Cohorts")
async def cohort_list(request: Request,
                      pc: ProductCtx = Depends(ConsoleProductGuard("cohorts:list"))) -> Response:
    """The product's cohorts with their releases and device counts."""
    return await _page(request, pc)


@router.post("/console/products/{product}/cohorts", summary="Create a cohort")
async def create_cohort(request: Request,
                        pc: ProductCtx = Depends(ConsoleProductGuard("cohorts:create"))
                        ) -> Response:
    """A cohort: name, description, and optionally its release."""
    form = await read_form(request)
    body = _body(form)
    if body["firmware_version"] is None:
        del body["firmware_version"]  # no release: no firmware:release needed
    c, errors = await attempt(pc.db, FIELDS, lambda: cohorts.create_cohort(
        pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, product=pc.product, role=pc.role,
        req=from_body(CohortCreate, body)))
    if c is None:
        return await _page(request, pc, status=400, errors=errors, form=_body(form))
    return redirect(f"{_base(pc)}/cohorts", flash=f"Cohort {c.name} created.")


@router.post("/console/products/{product}/cohorts/{name}", summary="Edit a cohort")
async def edit_cohort(name: str, request: Request,
                      pc: ProductCtx = Depends(ConsoleProductGuard("cohorts:update"))
                      ) -> Response:
    """Rename, describe, or change the cohort's release (only when it changed)."""
    form = await read_form(request)
    body = _body(form)
    current = await cohorts.view(pc.db, await cohorts.get_cohort(pc.db, pc.product, name))
    if body["firmware_version"] == (str(current["firmware_version"])
                                    if current["firmware_version"] else None):
        del body["firmware_version"]  # unchanged: no firmware:release needed
    c, errors = await attempt(pc.db, FIELDS, lambda: cohorts.update_cohort(
        pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, product=pc.product, role=pc.role, name=name,
        req=from_body(CohortChange, body)))
    if c is None:
        return await _page(request, pc, status=400, errors=errors, editing=name,
                           form=_body(form))
    return redirect(f"{_base(pc)}/cohorts", flash=f"Cohort {c.name} saved.")


@router.post("/console/products/{product}/cohorts/{name}/delete", summary="Delete a cohort")
async def delete_cohort(name: str, request: Request,
                        pc: ProductCtx = Depends(ConsoleProductGuard("cohorts:remove"))
                        ) -> Response:
    """Delete the cohort; its devices are then in none."""
    await read_form(request)
    _, errors = await attempt(pc.db, (), lambda: cohorts.delete_cohort(
        pc.db, actor=pc.ctx.me, ip=pc.ctx.ip, product=pc.product, name=name))
    if errors:
        return await _page(request, pc, status=400, errors=errors)
    return redirect(f"{_base(pc)}/cohorts", flash=f"Cohort {name} deleted.")
