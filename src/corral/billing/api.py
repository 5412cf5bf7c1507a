"""/v1/orgs/{org}/billing and /v1/orgs/{org}/invoices: the subscription, its payment method,
cancel/reactivate, and invoices. Only Owners and Administrators (``orgs.billing:*``)."""

from __future__ import annotations

import csv
import io
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from corral.billing import service
from corral.billing.models import ACTIVE
from corral.billing.providers import PaymentProvider
from corral.kit import clock
from corral.kit.body import as_int, as_str, read_body
from corral.kit.errors import BadRequest
from corral.kit.responses import ok, paging
from corral.metering import plans
from corral.orgs.access import OrgCtx, OrgGuard

router = APIRouter(tags=["billing"])


def _provider(oc: OrgCtx) -> PaymentProvider:
    provider: PaymentProvider = oc.ctx.runtime.payments
    return provider


async def _billing_json(oc: OrgCtx) -> dict[str, Any]:
    sub = await service.get_subscription(oc.db, oc.org.id)
    effective = await plans.effective_plan(oc.db, oc.org.id)
    out: dict[str, Any] = {
        "organization": {"id": oc.org.id, "slug": oc.org.slug, "name": oc.org.name},
        "plan": plans.effective_json(effective),
        "subscription": service.subscription_json(sub) if sub else None,
        "team_members": await service.count_members(oc.db, oc.org.id),
        "upcoming": None, "pending_adjustments": [],
    }
    if sub is None:
        return out
    pending = await service.pending_adjustments(oc.db, sub)
    out["pending_adjustments"] = [
        {"kind": a.kind, "description": a.description, "amount_cents": a.amount_cents,
         "created_at": clock.iso(a.created_at)} for a in pending]
    if sub.status == ACTIVE and sub.current_period_end is not None:
        # what the next renewal would charge at today's terms (members counted now)
        plan = await plans.get_plan(oc.db, sub.plan_code)
        lines = service.period_lines(sub, plan.name)
        members = out["team_members"]
        total = sum(line.amount_cents for line in lines) + sum(a.amount_cents for a in pending)
        total += (members - sub.seats) * sub.seat_price_cents * service.MONTHS[sub.interval]
        out["upcoming"] = {"at": clock.iso(sub.current_period_end),
                           "estimated_total_cents": max(0, total),
                           "currency": sub.currency}
    return out


def _declined(outcome: service.Outcome) -> JSONResponse:
    """402 with the provider's reason; the request's transaction still commits (the
    attempt is recorded)."""
    assert outcome.result is not None
    err = service.PaymentDeclined(
        outcome.result.message or "The payment was declined",
        code="payment_failed" if outcome.result.status == "error" else "payment_declined",
        decline_code=outcome.result.decline_code,
        subscription=service.subscription_json(outcome.sub),
        invoice=service.invoice_json(outcome.invoice) if outcome.invoice else None)
    return JSONResponse(err.body(), status_code=err.status)


@router.get("/v1/orgs/{org}/billing", summary="Get the organization's billing")
async def get_billing(oc: OrgCtx = Depends(OrgGuard("orgs.billing:get"))) -> dict[str, Any]:
    """Plan, subscription (status, period, members, blocks, payment method) and the next
    charge as estimated today."""
    return ok(billing=await _billing_json(oc))


@router.put("/v1/orgs/{org}/billing", summary="Subscribe or change the subscription",
            response_model=None)
async def put_billing(request: Request, oc: OrgCtx = Depends(OrgGuard("orgs.billing:update"))
                      ) -> dict[str, Any] | JSONResponse:
    """Without a subscription: subscribe (`plan`, `interval` month|year, `blocks`,
    `payment_method`; the first period is charged now). Otherwise change `payment_method`,
    `plan` or `blocks` (prorated on the next invoice), `interval` (from the next renewal) or
    `pause_devices_when_locked`. A declined charge answers 402."""
    body = await read_body(request)
    allowed = {"plan", "interval", "blocks", "payment_method", "pause_devices_when_locked"}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise BadRequest(f"Unknown field(s): {', '.join(unknown)}; allowed: "
                         f"{', '.join(sorted(allowed))}", code="invalid_request")
    outcome = await service.update(oc.db, oc.ctx.settings, _provider(oc), org=oc.org,
                                   actor=oc.ctx.me, ip=oc.ctx.ip, body=body, now=clock.now())
    if outcome.declined:
        return _declined(outcome)
    return ok(billing=await _billing_json(oc))


@router.post("/v1/orgs/{org}/billing/cancel", summary="Cancel the subscription")
async def cancel(oc: OrgCtx = Depends(OrgGuard("orgs.billing:update"))) -> dict[str, Any]:
    """Access continues until the end of the paid period; then the organization is
    inactive (its data is kept)."""
    await service.cancel(oc.db, oc.ctx.settings, org=oc.org, actor=oc.ctx.me, ip=oc.ctx.ip,
                         now=clock.now())
    return ok(billing=await _billing_json(oc))


@router.post("/v1/orgs/{org}/billing/reactivate", summary="Reactivate the subscription",
             response_model=None)
async def reactivate(request: Request,
                     oc: OrgCtx = Depends(OrgGuard("orgs.billing:update"))
                     ) -> dict[str, Any] | JSONResponse:
    """Cancelled within the period: resume on the same cycle. Locked or inactive: charge
    now (optionally with a new `payment_method`) and start a new cycle. Past due: pay the
    open invoice now. A declined charge answers 402."""
    body = await read_body(request)
    method = as_str(body.get("payment_method"), field="payment_method", max_len=100)
    outcome = await service.reactivate(oc.db, oc.ctx.settings, _provider(oc), org=oc.org,
                                       actor=oc.ctx.me, ip=oc.ctx.ip, payment_method=method,
                                       now=clock.now())
    if outcome.declined:
        return _declined(outcome)
    return ok(billing=await _billing_json(oc))


@router.get("/v1/orgs/{org}/invoices", summary="List invoices")
async def list_invoices(request: Request,
                        oc: OrgCtx = Depends(OrgGuard("orgs.billing:get"))) -> dict[str, Any]:
    """The organization's invoices, newest first (`page`, `per_page` up to 100)."""
    page = as_int(request.query_params.get("page"), field="page", lo=1, hi=1_000_000,
                  default=1) or 1
    per_page = as_int(request.query_params.get("per_page"), field="per_page", lo=1, hi=100,
                      default=25) or 25
    rows, total = await service.list_invoices(oc.db, oc.org.id, page=page, per_page=per_page)
    return ok(invoices=[service.invoice_json(i) for i in rows],
              meta=paging(page, per_page, total))


@router.get("/v1/orgs/{org}/invoices/{invoice}", summary="Get an invoice", response_model=None)
async def get_invoice(invoice: str, request: Request,
                      oc: OrgCtx = Depends(OrgGuard("orgs.billing:get"))
                      ) -> dict[str, Any] | Response:
    """One invoice (by id or number) with its line items and payment attempts;
    `format=text` renders it as plain text, `format=csv` its lines as CSV."""
    fmt = (request.query_params.get("format") or "json").lower()
    if fmt not in ("json", "text", "csv"):
        raise BadRequest("format must be json, text or csv", code="invalid_request")
    inv = await service.get_invoice(oc.db, oc.org.id, invoice)
    lines = await service.invoice_lines(oc.db, inv.id)
    if fmt == "text":
        return PlainTextResponse(service.invoice_text(inv, lines, oc.org))
    if fmt == "csv":
        buf = io.StringIO()
        w = csv.writer(buf, lineterminator="\n")
        w.writerow(["invoice", "kind", "description", "quantity", "unit_amount_cents",
                    "amount_cents", "currency"])
        for line in lines:
            w.writerow([inv.number, line.kind, line.description, line.quantity,
                        line.unit_amount_cents, line.amount_cents, inv.currency])
        w.writerow([inv.number, "total", "Total", "", "", inv.total_cents, inv.currency])
        return Response(buf.getvalue(), media_type="text/csv; charset=utf-8", headers={
            "Content-Disposition": f'attachment; filename="{inv.number}.csv"'})
    charges = await service.invoice_charges(oc.db, inv.id)
    return ok(invoice=service.invoice_json(inv, lines, charges))
