"""An organization's Billing & usage page (Administrators and Owners, seed 004): the plan,
subscription, members and blocks; this period's data operations and cellular data against
the plan with a chart per day and the 70/90/100 % warning; billable devices; invoices; the
usage CSV downloads; subscribe, change blocks, change the payment method, cancel and
re-activate through the configured payment provider. Each action calls the service
``/v1/orgs/{org}/billing`` calls."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import PlainTextResponse, Response

from corral.billing import invoices, locks, service, subscriptions
from corral.billing.models import ACTIVE, CANCELED, INCOMPLETE, PAST_DUE, SHUT
from corral.billing.providers import PaymentProvider
from corral.billing.schemas import BillingChange
from corral.console.errors import inactive_if_shut, inactive_page
from corral.console.forms import FormErrors, attempt, read_form, text
from corral.console.render import page, redirect
from corral.console.session import ConsoleOrgGuard
from corral.db.session import TransactionRoute
from corral.kit import clock
from corral.kit.body import validate
from corral.kit.errors import BadRequest
from corral.metering import alerts, daily, plans, reports, usage
from corral.orgs.access import OrgCtx

router = APIRouter(route_class=TransactionRoute)
INVOICES_SHOWN = 12
CHART_H = 120
BAR_W, BAR_GAP = 18, 6
FIELDS = ("plan", "interval", "blocks", "payment_method")


def _base(oc: OrgCtx) -> str:
    return f"/console/orgs/{oc.org.slug}/billing"


def _provider(oc: OrgCtx) -> PaymentProvider:
    provider: PaymentProvider = oc.ctx.runtime.payments
    return provider


def chart(days: list[daily.Day], value: str, unit: str, slots: int) -> dict[str, Any]:
    """Bars of one metric per day (``value``: ``data_operations`` | ``cellular_bytes``) for
    a server-rendered SVG as wide as ``slots`` days (the month: days to come stay empty)."""
    values = [getattr(d, value) for d in days]
    if value == "cellular_bytes":
        values = [round(v / plans.MB, 2) for v in values]
    highest = max(values, default=0)
    top = highest or 1
    bars = []
    for i, (d, v) in enumerate(zip(days, values, strict=True)):
        h = 0 if v == 0 else max(2, round(CHART_H * v / top))
        bars.append({"x": i * (BAR_W + BAR_GAP), "y": CHART_H - h, "h": h,
                     "title": f"{d.day.isoformat()}: {v:,} {unit}"
                              + ("" if d.recorded else " (no reading)")})
    return {"bars": bars, "width": max(1, max(slots, len(days)) * (BAR_W + BAR_GAP) - BAR_GAP),
            "height": CHART_H, "bar_w": BAR_W, "top": highest, "total": sum(values),
            "unit": unit,
            "first": days[0].day.isoformat() if days else "",
            "last": days[-1].day.isoformat() if days else ""}


def warning(report: dict[str, Any]) -> dict[str, Any] | None:
    """The highest 70/90/100 % threshold reached in the allowance period, and by what."""
    worst: dict[str, Any] | None = None
    plan, pool, allow = report["plan"], report["pool_usage"], report["allowance"]
    for metric, used, allowance in (
            ("data operations", pool["data_operations"], allow["data_operations"]),
            ("cellular data", pool["cellular_bytes"],
             (allow["cellular_mb"] or 0) * plans.MB)):
        if not allowance:
            continue
        crossed = alerts.crossed(int(used), int(allowance))
        if crossed and (worst is None or crossed[-1] > worst["threshold"]):
            worst = {"threshold": crossed[-1], "metric": metric,
                     "percent": round(100 * used / allowance, 1)}
    if worst is not None:
        worst["pauses"] = bool(plan.get("pause_at_limit"))
    return worst


async def usage_warning(db: Any, org: Any) -> dict[str, Any] | None:
    """The banner of :func:`warning` for the current allowance period (the organization's
    overview shows it to those who see billing), from the usage totals alone."""
    plan = await plans.effective_plan(db, org.id)
    scope = await usage.scope_of(db, org)
    start, end = plan.period_bounds(plans.month_start(clock.now().date()))
    pool = await usage.totals(db, scope, start, end)
    return warning({"plan": {"pause_at_limit": plan.pause_at_limit},
                    "pool_usage": {"data_operations": usage.metric_ops(pool, plan),
                                   "cellular_bytes": pool["cellular_bytes"]},
                    "allowance": reports.allowance(plan)})


async def _page(request: Request, oc: OrgCtx, *, status: int = 200,
                errors: FormErrors | None = None, form: dict[str, str] | None = None,
                which: str = "") -> Response:
    db = oc.db
    today = clock.now().date()
    month = usage.parse_period(request.query_params.get("period"), today)
    overview = await subscriptions.overview(db, oc.org)
    report = await reports.org_usage(db, oc.org, month,
                                     reports.pause_reason(oc.ctx.runtime, oc.org.id))
    plan = await plans.effective_plan(db, oc.org.id)
    days = await daily.per_day(db, oc.org.id, month, plan, until=today)
    slots = (plans.add_months(month, 1) - month).days
    rows, total_invoices = await invoices.list_invoices(db, oc.org.id, page=1,
                                                        per_page=INVOICES_SHOWN)
    every = await plans.list_plans(db)
    offered = [p for p in every if p.self_service and p.block_price_cents > 0]
    plan_name = {p.code: p.name for p in every}.get(plan.plan_code, plan.plan_code.title())
    sub = overview["subscription"]
    status_now = sub["status"] if sub else None
    months = [plans.add_months(plans.month_start(today), -i) for i in range(12)]
    return await page(
        request, "billing/billing.html", status=status, org=oc.org, role=oc.role,
        title=f"Billing & usage · {oc.org.name}", section="billing", base=_base(oc),
        overview=overview, report=report, sub=sub, status_now=status_now,
        subscribed=status_now not in (None, INCOMPLETE),
        can_cancel=status_now in (ACTIVE, PAST_DUE),
        can_reactivate=status_now in (CANCELED, PAST_DUE, *SHUT),
        ops_chart=chart(days, "data_operations", "data operations", slots),
        cell_chart=chart(days, "cellular_bytes", "MB", slots),
        warn=warning(report) if month == plans.month_start(today) else None,
        invoices=rows, total_invoices=total_invoices, plans=offered, plan_name=plan_name,
        month=month.strftime("%Y-%m"), months=[m.strftime("%Y-%m") for m in months],
        current=month == plans.month_start(today),
        errors=errors or FormErrors(), form=form or {}, which=which)


@router.get("/console/orgs/{org}/billing", summary="Billing & usage")
async def billing(request: Request,
                  oc: OrgCtx = Depends(ConsoleOrgGuard("orgs.billing:get"))) -> Response:
    """Plan, subscription, usage against the plan (per day), invoices, downloads. A locked
    or inactive organization shows only the "Inactive subscription" page."""
    return await inactive_if_shut(request, oc) or await _page(request, oc)


def _declined_errors(outcome: service.Outcome) -> FormErrors:
    assert outcome.result is not None
    reason = outcome.result.message or "The payment was declined"
    code = outcome.result.decline_code
    return FormErrors(fields={"payment_method": reason + (f" ({code})" if code else "")})


@router.post("/console/orgs/{org}/billing", summary="Subscribe or change the subscription")
async def change(request: Request,
                 oc: OrgCtx = Depends(ConsoleOrgGuard("orgs.billing:update"))) -> Response:
    """Without a subscription: subscribe (the first period is charged now). Otherwise the
    fields sent change the subscription: blocks, plan, interval, payment method."""
    form = await read_form(request)
    body = {k: text(form, k).strip() for k in FIELDS if text(form, k).strip()}
    which = text(form, "which") or "change"
    if not body:
        errors = FormErrors(general=["Nothing to change: fill in a field"])
        return await _page(request, oc, status=400, errors=errors, form=body, which=which)
    outcome, errors = await attempt(oc.db, FIELDS, lambda: service.update(
        oc.db, oc.ctx.settings, _provider(oc), org=oc.org, actor=oc.ctx.me, ip=oc.ctx.ip,
        req=validate(BillingChange, body), now=clock.now()))
    if outcome is None:
        return await _page(request, oc, status=400, errors=errors, form=body, which=which)
    if outcome.declined:  # the attempt is recorded (committed), as the API does
        return await _page(request, oc, status=402, errors=_declined_errors(outcome),
                           form=body, which=which)
    return redirect(_base(oc), flash="Subscribed." if which == "subscribe"
                    else "Subscription updated.")


@router.post("/console/orgs/{org}/billing/cancel", summary="Cancel the subscription")
async def cancel(request: Request,
                 oc: OrgCtx = Depends(ConsoleOrgGuard("orgs.billing:update"))) -> Response:
    """Access continues until the end of the paid period; then the organization is
    inactive (its data is kept)."""
    done, errors = await attempt(oc.db, (), lambda: service.cancel(
        oc.db, oc.ctx.settings, org=oc.org, actor=oc.ctx.me, ip=oc.ctx.ip, now=clock.now()))
    if done is None:
        return await _page(request, oc, status=400, errors=errors, which="cancel")
    until = clock.iso(done.current_period_end) if done.status == CANCELED else None
    return redirect(_base(oc), flash="Subscription cancelled" + (
        f"; access continues until {until[:10]}." if until else "."))


@router.post("/console/orgs/{org}/billing/reactivate", summary="Re-activate the subscription")
async def reactivate(request: Request,
                     oc: OrgCtx = Depends(ConsoleOrgGuard("orgs.billing:update"))) -> Response:
    """Cancelled within the period: resume on the same cycle. Locked or inactive: charge now
    (optionally with a new payment method) and start a new cycle. Past due: pay now."""
    form = await read_form(request)
    method = text(form, "payment_method").strip() or None
    outcome, errors = await attempt(oc.db, ("payment_method",), lambda: service.reactivate(
        oc.db, oc.ctx.settings, _provider(oc), org=oc.org, actor=oc.ctx.me, ip=oc.ctx.ip,
        payment_method=method, now=clock.now()))
    if outcome is not None and outcome.declined:
        errors = _declined_errors(outcome)
    if outcome is None or outcome.declined:
        status = 402 if outcome is not None else 400
        shut = (await locks.shut_statuses(oc.db, (oc.org.id,))).get(oc.org.id)
        if shut is not None:  # only the Inactive page is shown
            return await inactive_page(request, oc.org, shut, oc.role, http_status=status,
                                       errors=errors)
        return await _page(request, oc, status=status, errors=errors,
                           form={"payment_method": method or ""}, which="reactivate")
    return redirect(_base(oc), flash="Subscription re-activated.")


@router.get("/console/orgs/{org}/billing/usage.csv", summary="Download usage as CSV")
async def usage_csv(request: Request,
                    oc: OrgCtx = Depends(ConsoleOrgGuard("orgs.billing:get"))) -> Response:
    """``kind=devices`` (default) or ``products``, for ``period`` (YYYY-MM)."""
    kind = request.query_params.get("kind") or "devices"
    if kind not in reports.KINDS:
        raise BadRequest("kind must be devices or products", field="kind")
    month = usage.parse_period(request.query_params.get("period"), clock.now().date())
    rows = (await reports.device_rows(oc.db, oc.org, month) if kind == "devices"
            else await reports.product_rows(oc.db, oc.org, month))
    return reports.csv_download(rows, reports.KINDS[kind],
                                reports.filename(oc.org, month, kind))


@router.get("/console/orgs/{org}/billing/invoices/{invoice}", summary="An invoice")
async def invoice(invoice: str, request: Request,
                  oc: OrgCtx = Depends(ConsoleOrgGuard("orgs.billing:get"))) -> Response:
    """One invoice as text (``format=csv``: its lines as a CSV download)."""
    inv = await invoices.get_invoice(oc.db, oc.org.id, invoice)
    lines = await invoices.invoice_lines(oc.db, inv.id)
    if request.query_params.get("format") == "csv":
        return Response(invoices.invoice_csv(inv, lines), media_type="text/csv; charset=utf-8",
                        headers={"Content-Disposition":
                                 f'attachment; filename="{inv.number}.csv"'})
    if request.query_params.get("format") == "text":
        return PlainTextResponse(invoices.invoice_text(inv, lines, oc.org), headers={
            "Content-Disposition": f'attachment; filename="{inv.number}.txt"'})
    return await page(request, "billing/invoice.html", org=oc.org, role=oc.role,
                      title=f"Invoice {inv.number} · {oc.org.name}", section="billing",
                      inv=inv, text=invoices.invoice_text(inv, lines, oc.org), base=_base(oc),
                      charges=await invoices.invoice_charges(oc.db, inv.id))

