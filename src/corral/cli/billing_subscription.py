"""``corral billing status --org ORG`` and ``corral billing invoices --org ORG [INVOICE]``
(over REST): an organization's
subscription and its invoices. Mounted on the ``corral billing`` app with :func:`register`."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from corral.cli.client import Json, api
from corral.cli.output import console, fields, print_json, table

Org = Annotated[str, typer.Option("--org", help="Organization id or slug.")]


def _money(cents: Any, currency: Any) -> str:
    if not isinstance(cents, int):
        return ""
    sign = "-" if cents < 0 else ""
    return f"{sign}{abs(cents) // 100:,}.{abs(cents) % 100:02d} {str(currency or '').upper()}"


def status(ctx: typer.Context, org: Org, as_json: Json = False) -> None:
    """The organization's plan and subscription (GET /v1/orgs/ORG/billing)."""
    body = api(ctx).call("GET", f"/v1/orgs/{org}/billing")
    if as_json:
        print_json(body)
        return
    billing = (body or {}).get("billing") or {}
    plan = billing.get("plan") or {}
    sub = billing.get("subscription")
    if not sub:
        console.print(f"Plan: {plan.get('code', '?')} (no subscription); "
                      f"{billing.get('team_members', '?')} team member(s).")
        return
    row = dict(sub)
    row["payment_method"] = (sub.get("payment_method") or {}).get("label") or "none"
    row["seat_price"] = _money(sub.get("seat_price_cents"), sub.get("currency"))
    upcoming = billing.get("upcoming")
    if upcoming:
        row["next_charge"] = (f"{_money(upcoming.get('estimated_total_cents'), upcoming.get('currency'))}"
                              f" on {upcoming.get('at')}")
    fields(f"Subscription of {org}", row, [
        "status", "plan", "interval", "next_interval", "seats", "seat_price", "blocks",
        "current_period_start", "current_period_end", "cancel_at_period_end",
        "next_retry_at", "retry_count", "locked_at", "payment_method", "next_charge"])
    for adj in billing.get("pending_adjustments") or []:
        console.print(f"pending: {adj.get('description')} "
                      f"{_money(adj.get('amount_cents'), sub.get('currency'))}")


def invoices(
    ctx: typer.Context, org: Org,
    invoice: Annotated[str | None, typer.Argument(
        help="Show this invoice (id or number) instead of the list.")] = None,
    text: Annotated[bool, typer.Option("--text", help="The invoice as plain text.")] = False,
    as_json: Json = False,
) -> None:
    """List invoices (GET /v1/orgs/ORG/invoices), or show one with its lines."""
    a = api(ctx)
    if invoice is not None:
        if text:
            typer.echo(a.send("GET", f"/v1/orgs/{org}/invoices/{invoice}",
                              params={"format": "text"}).text, nl=False)
            return
        body = a.call("GET", f"/v1/orgs/{org}/invoices/{invoice}")
        if as_json:
            print_json(body)
            return
        inv = (body or {}).get("invoice") or {}
        cur = inv.get("currency")
        table(f"Invoice {inv.get('number')} ({inv.get('status')})",
              ["kind", "description", "quantity", "amount"],
              [(ln.get("kind"), ln.get("description"), ln.get("quantity"),
                _money(ln.get("amount_cents"), cur)) for ln in inv.get("lines") or []]
              + [("", "Total", "", _money(inv.get("total_cents"), cur))])
        return
    body = a.call("GET", f"/v1/orgs/{org}/invoices", params={"per_page": 100})
    if as_json:
        print_json(body)
        return
    rows = (body or {}).get("invoices") or []
    table(f"Invoices of {org}", ["number", "period", "reason", "status", "total"],
          [(i.get("number"), f"{(i.get('period_start') or '')[:10]} to "
            f"{(i.get('period_end') or '')[:10]}", i.get("reason"), i.get("status"),
            _money(i.get("total_cents"), i.get("currency"))) for i in rows])


def register(app: typer.Typer) -> None:
    """Add ``status`` and ``invoices`` to the ``corral billing`` Typer app."""
    app.command("status")(status)
    app.command("invoices")(invoices)
