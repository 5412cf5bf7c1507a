"""Request and answer models of an organization's billing (subscription and invoices)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, ConfigDict, Field

from corral.kit.body import Flag, Int, RequestModel
from corral.kit.responses import Answer, OkAnswer, Paging

MAX_BLOCKS = 100_000


class BillingChange(RequestModel):
    """PUT billing: subscribe (no subscription yet) or change what is sent."""

    model_config = ConfigDict(extra="forbid")
    ERROR_CODES = {"plan": "invalid_plan", "blocks": "invalid_plan",
                   "payment_method": "invalid_payment_method"}

    plan: str | None = Field(None, max_length=50, description="A self-service plan's code")
    interval: str | None = Field(None, max_length=10, description="month or year")
    blocks: Int | None = Field(None, ge=0, le=MAX_BLOCKS)
    payment_method: str | None = Field(
        None, max_length=100, description="A payment method token from the payment provider")
    pause_devices_when_locked: Flag | None = None


class Reactivation(RequestModel):
    ERROR_CODES = {"payment_method": "invalid_payment_method"}

    payment_method: str | None = Field(None, max_length=100)


class InvoicePage(RequestModel):
    page: Int = Field(1, ge=1, le=1_000_000)
    per_page: Int = Field(25, ge=1, le=100)


def _lower(value: Any) -> Any:
    return value.lower() if isinstance(value, str) else value


class InvoiceFormat(RequestModel):
    format: Annotated[Literal["json", "text", "csv"], BeforeValidator(_lower)] = Field(
        "json", description="json, text (the invoice as plain text) or csv (its lines)")


class Subscription(Answer):
    status: str
    plan: str
    interval: str
    currency: str
    seats: int
    blocks: int
    current_period_start: str | None
    current_period_end: str | None
    cancel_at_period_end: bool
    payment_method: dict[str, Any] | None


class Billing(Answer):
    organization: dict[str, Any]
    plan: dict[str, Any]
    subscription: Subscription | None
    team_members: int
    upcoming: dict[str, Any] | None
    pending_adjustments: list[dict[str, Any]]


class BillingAnswer(OkAnswer):
    billing: Billing


class Invoice(Answer):
    id: int
    number: str
    reason: str
    status: str
    currency: str
    total_cents: int
    period_start: str | None
    period_end: str | None
    issued_at: str | None
    paid_at: str | None


class InvoiceAnswer(OkAnswer):
    invoice: Invoice


class InvoicesAnswer(OkAnswer):
    invoices: list[Invoice]
    meta: Paging
