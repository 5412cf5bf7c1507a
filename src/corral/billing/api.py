"""/v1/orgs/{org}/billing and /v1/orgs/{org}/invoices: the subscription, its payment method,
cancel/reactivate, and invoices. Only Owners and Administrators (``orgs.billing:*``)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from corral.billing import invoices, service, subscriptions
from corral.billing.providers import PaymentProvider
from corral.billing.schemas import (
    BillingAnswer,
    BillingChange,
    InvoiceAnswer,
    InvoiceFormat,
    InvoicePage,
    InvoicesAnswer,
    Reactivation,
)
from corral.db.session import TransactionRoute
from corral.kit import clock
from corral.kit.body import body, query
from corral.kit.responses import answers, ok, paging
from corral.orgs.access import OrgCtx, OrgGuard

router = APIRouter(tags=["billing"], route_class=TransactionRoute)


def _provider(oc: OrgCtx) -> PaymentProvider:
    provider: PaymentProvider = oc.ctx.runtime.payments
    return provider


async def _billing_json(oc: OrgCtx) -> dict[str, Any]:
    return await subscriptions.overview(oc.db, oc.org)


def _declined(outcome: service.Outcome) -> JSONResponse:
    """402 with the provider's reason; the request's transaction still commits (the
    attempt is recorded)."""
    assert outcome.result is not None
    err = service.PaymentDeclined(
        outcome.result.message or "The payment was declined",
        code="payment_failed" if outcome.result.status == "error" else "payment_declined",
        decline_code=outcome.result.decline_code,
        subscription=subscriptions.subscription_json(outcome.sub),
        invoice=invoices.invoice_json(outcome.invoice) if outcome.invoice else None)
    return JSONResponse(err.body(), status_code=err.status)


@router.get("/v1/orgs/{org}/billing", summary="Get the organization's billing",
            responses=answers(BillingAnswer))
async def get_billing(oc: OrgCtx = Depends(OrgGuard("orgs.billing:get"))) -> dict[str, Any]:
    """Plan, subscription (status, period, members, blocks, payment method) and the next
    charge as estimated today."""
    return ok(billing=await _billing_json(oc))


@router.put("/v1/orgs/{org}/billing", summary="Subscribe or change the subscription",
            response_model=None, responses=answers(BillingAnswer, 409))
async def put_billing(oc: OrgCtx = Depends(OrgGuard("orgs.billing:update")),
                      req: BillingChange = body(BillingChange)) -> dict[str, Any] | JSONResponse:
    """Without a subscription: subscribe (`plan`, `interval` month|year, `blocks`,
    `payment_method`; the first period is charged now). Otherwise change `payment_method`,
    `plan` or `blocks` (prorated on the next invoice), `interval` (from the next renewal) or
    `pause_devices_when_locked`. A declined charge answers 402."""
    outcome = await service.update(oc.db, oc.ctx.settings, _provider(oc), org=oc.org,
                                   actor=oc.ctx.me, ip=oc.ctx.ip, req=req, now=clock.now())
    if outcome.declined:
        return _declined(outcome)
    return ok(billing=await _billing_json(oc))


@router.post("/v1/orgs/{org}/billing/cancel", summary="Cancel the subscription",
             responses=answers(BillingAnswer, 409))
async def cancel(oc: OrgCtx = Depends(OrgGuard("orgs.billing:update"))) -> dict[str, Any]:
    """Access continues until the end of the paid period; then the organization is
    inactive (its data is kept)."""
    await service.cancel(oc.db, oc.ctx.settings, org=oc.org, actor=oc.ctx.me, ip=oc.ctx.ip,
                         now=clock.now())
    return ok(billing=await _billing_json(oc))


@router.post("/v1/orgs/{org}/billing/reactivate", summary="Reactivate the subscription",
             response_model=None, responses=answers(BillingAnswer, 409))
async def reactivate(oc: OrgCtx = Depends(OrgGuard("orgs.billing:update")),
                     req: Reactivation = body(Reactivation)) -> dict[str, Any] | JSONResponse:
    """Cancelled within the period: resume on the same cycle. Locked or inactive: charge
    now (optionally with a new `payment_method`) and start a new cycle. Past due: pay the
    open invoice now. A declined charge answers 402."""
    outcome = await service.reactivate(oc.db, oc.ctx.settings, _provider(oc), org=oc.org,
                                       actor=oc.ctx.me, ip=oc.ctx.ip,
                                       payment_method=req.payment_method,
                                       now=clock.now())
    if outcome.declined:
        return _declined(outcome)
    return ok(billing=await _billing_json(oc))


@router.get("/v1/orgs/{org}/invoices", summary="List invoices",
            responses=answers(InvoicesAnswer))
async def list_invoices(oc: OrgCtx = Depends(OrgGuard("orgs.billing:get")),
                        q: InvoicePage = query(InvoicePage)) -> dict[str, Any]:
    """The organization's invoices, newest first (`page`, `per_page` up to 100)."""
    page, per_page = q.page, q.per_page
    rows, total = await invoices.list_invoices(oc.db, oc.org.id, page=page, per_page=per_page)
    return ok(invoices=[invoices.invoice_json(i) for i in rows],
              meta=paging(page, per_page, total))


@router.get("/v1/orgs/{org}/invoices/{invoice}", summary="Get an invoice", response_model=None,
            responses={200: {"model": InvoiceAnswer, "description": "The invoice", "content": {
                "text/plain": {"schema": {"type": "string"}},
                "text/csv": {"schema": {"type": "string"}}}}})
async def get_invoice(invoice: str, oc: OrgCtx = Depends(OrgGuard("orgs.billing:get")),
                      q: InvoiceFormat = query(InvoiceFormat)) -> dict[str, Any] | Response:
    """One invoice (by id or number) with its line items and payment attempts;
    `format=text` renders it as plain text, `format=csv` its lines as CSV."""
    fmt = q.format
    inv = await invoices.get_invoice(oc.db, oc.org.id, invoice)
    lines = await invoices.invoice_lines(oc.db, inv.id)
    if fmt == "text":
        return PlainTextResponse(invoices.invoice_text(inv, lines, oc.org))
    if fmt == "csv":
        return Response(invoices.invoice_csv(inv, lines), media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition":
                                 f'attachment; filename="{inv.number}.csv"'})
    charges = await invoices.invoice_charges(oc.db, inv.id)
    return ok(invoice=invoices.invoice_json(inv, lines, charges))
