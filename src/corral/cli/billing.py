"""``corral billing``: an organization's usage against its plan (over REST).

``corral billing usage --org ORG [--period YYYY-MM]`` prints the month's data operations,
cellular data and billable devices against the plan's allowances, then one row per product.
The subscription commands (``status``, ``invoices``) are mounted on the same app from
:mod:`corral.cli.billing_subscription`.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from corral.cli.client import Json, api
from corral.cli.output import console, print_json, table

billing_app = typer.Typer(help="Billing: usage against the plan, subscription, invoices.",
                          no_args_is_help=True)


def _n(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.2f}"
    return f"{value:,}" if isinstance(value, int) else str(value)


def _pct(value: Any) -> str:
    return "-" if value is None else f"{value:.1f} %"


@billing_app.command("usage")
def usage(
    ctx: typer.Context,
    org: Annotated[str, typer.Option("--org", help="Organization id or slug.")],
    period: Annotated[str | None, typer.Option(
        help="Month as YYYY-MM (default: this month).")] = None,
    as_json: Json = False,
) -> None:
    """An organization's usage and allowances (GET /v1/orgs/ORG/usage)."""
    params = {"period": period} if period else None
    body = api(ctx).call("GET", f"/v1/orgs/{org}/usage", params=params) or {}
    if as_json:
        print_json(body)
        return
    plan = body.get("plan") or {}
    used = body.get("usage") or {}
    pool = body.get("pool_usage") or {}
    allowance = body.get("allowance") or {}
    pct = body.get("percent") or {}
    per = body.get("period") or {}
    name = (body.get("org") or {}).get("name", org)
    title = (f"{name}: {per.get('month', '?')} on the {plan.get('code', '?')} plan"
             + (f" ({plan.get('blocks')} blocks)" if plan.get("blocks") else "")
             + (f", pooled yearly from {per.get('pool_start')}" if per.get("pooling") == "year"
                else ""))
    table(title, ["", "used", "allowance", "used %"], [
        ("data operations", _n(pool.get("data_operations")),
         _n(allowance.get("data_operations")), _pct(pct.get("data_operations"))),
        ("cellular data (MB)", _n(pool.get("cellular_mb")), _n(allowance.get("cellular_mb")),
         _pct(pct.get("cellular_data"))),
        ("billable devices", _n(used.get("billable_devices")), _n(allowance.get("devices")),
         _pct(pct.get("devices"))),
    ])
    products = body.get("products") or []
    if products:
        table("Products", ["id", "product", "billable devices", "data operations",
                           "published", "delivered", "functions", "variables", "cellular MB"],
              [(p.get("id"), p.get("slug"), _n(p.get("billable_devices")),
                _n(p.get("data_operations")), _n(p.get("events_published")),
                _n(p.get("events_delivered")), _n(p.get("function_calls")),
                _n(p.get("variable_reads")), _n(p.get("cellular_mb"))) for p in products])
    if body.get("paused"):
        console.print(f"[bold red]Device communication is paused:[/] {body.get('pause_reason')}",
                      highlight=False)
