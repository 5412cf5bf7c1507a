"""Invoices as the API and the CLI show them: reading an organization's invoices, their
lines and payment attempts, and rendering them as JSON or plain text."""

from __future__ import annotations

import csv
import io
from collections.abc import Sequence
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession

from corral.billing.models import Charge, Invoice, InvoiceLine
from corral.billing.terms import line_json, money
from corral.kit import clock
from corral.kit.errors import NotFound
from corral.kit.ids import path_id
from corral.orgs.models import Organization


async def list_invoices(db: AsyncSession, org_id: int, *, page: int = 1, per_page: int = 25
                        ) -> tuple[list[Invoice], int]:
    total = (await db.execute(select(func.count(Invoice.id)).where(
        Invoice.org_id == org_id))).scalar_one()
    rows = (await db.execute(select(Invoice).where(Invoice.org_id == org_id)
                             .order_by(Invoice.id.desc())
                             .offset((page - 1) * per_page).limit(per_page))).scalars()
    return list(rows), int(total)


async def get_invoice(db: AsyncSession, org_id: int, key: str) -> Invoice:
    """By id or number, within the organization (another org's invoice does not exist)."""
    q = select(Invoice).where(Invoice.org_id == org_id)
    iid = path_id(key)
    q = q.where(Invoice.id == iid) if iid is not None else q.where(Invoice.number == key.upper())
    inv = (await db.execute(q)).scalar_one_or_none()
    if inv is None:
        raise NotFound("Invoice not found")
    return inv


async def invoice_lines(db: AsyncSession, invoice_id: int) -> list[InvoiceLine]:
    return list((await db.execute(select(InvoiceLine).where(
        InvoiceLine.invoice_id == invoice_id).order_by(InvoiceLine.id))).scalars())


async def invoice_charges(db: AsyncSession, invoice_id: int) -> list[Charge]:
    return list((await db.execute(select(Charge).where(
        Charge.invoice_id == invoice_id).order_by(Charge.id))).scalars())


def invoice_json(inv: Invoice, lines: Sequence[InvoiceLine] | None = None,
                 charges: Sequence[Charge] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": inv.id, "number": inv.number, "reason": inv.reason, "status": inv.status,
        "currency": inv.currency, "total_cents": inv.total_cents,
        "period_start": clock.iso(inv.period_start), "period_end": clock.iso(inv.period_end),
        "issued_at": clock.iso(inv.issued_at), "paid_at": clock.iso(inv.paid_at),
    }
    if lines is not None:
        out["lines"] = [line_json(line) for line in lines]
    if charges is not None:
        out["payments"] = [{
            "attempt": c.attempt, "status": c.status, "amount_cents": c.amount_cents,
            "decline_code": c.decline_code, "message": c.message,
            "at": clock.iso(c.finished_at or c.created_at)} for c in charges]
    return out


def invoice_text(inv: Invoice, lines: Sequence[InvoiceLine], org: Organization) -> str:
    """A plain-text rendering of an invoice."""
    day = "%Y-%m-%d"
    title = f"Invoice {inv.number}"
    if inv.reason == "statement":
        title += f" (monthly statement, {inv.period_start:%B %Y})"
    out = [title, f"Organization: {org.name} ({org.slug})",
           f"Issued: {inv.issued_at.strftime(day)}",
           f"Period: {inv.period_start.strftime(day)} to {inv.period_end.strftime(day)}",
           f"Status: {inv.status}", ""]
    # a statement's usage lines carry numbers, not money: listed after the total
    usage_lines = [line for line in lines if line.kind in ("usage", "usage_total")]
    lines = [line for line in lines if line.kind not in ("usage", "usage_total")]
    width = max([len(line.description) for line in lines] + [20])
    for line in lines:
        qty = f"{line.quantity} x " if line.quantity != 1 else ""
        out.append(f"{line.description:<{width}}  {qty:>8}{money(line.amount_cents, inv.currency):>16}")
    out += ["-" * (width + 26), f"{'Total':<{width}}  {'':>8}{money(inv.total_cents, inv.currency):>16}"]
    if usage_lines:
        out += ["", "Usage:"] + [f"  {line.description}" for line in usage_lines]
    return "\n".join(out) + "\n"


def invoice_csv(inv: Invoice, lines: Sequence[InvoiceLine]) -> str:
    """The invoice's lines as CSV, with a total row."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["invoice", "kind", "description", "quantity", "unit_amount_cents",
                "amount_cents", "currency"])
    for line in lines:
        w.writerow([inv.number, line.kind, line.description, line.quantity,
                    line.unit_amount_cents, line.amount_cents, inv.currency])
    w.writerow([inv.number, "total", "Total", "", "", inv.total_cents, inv.currency])
    return buf.getvalue()
