"""Billing tables: one subscription per organization, its invoices with line items, the
payment attempts (charges) made for them, and adjustments waiting for the next invoice.

Money is integer cents with an ISO 4217 currency code (lowercase, as Stripe spells it)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import ForeignKey, Index, String, Text
from sqlalchemy.orm import Mapped, mapped_column

from corral.db.base import Base, Timestamps

# subscription statuses; LOCKED and INACTIVE shut the organization's API (billing excepted)
INCOMPLETE = "incomplete"  # the first charge has not succeeded yet (the org stays on its plan)
ACTIVE = "active"
PAST_DUE = "past_due"  # a renewal charge failed; retries are scheduled, access continues
LOCKED = "locked"  # the last retry failed
CANCELED = "canceled"  # canceled, access until the end of the paid period
INACTIVE = "inactive"  # canceled and the period has ended
STATUSES = (INCOMPLETE, ACTIVE, PAST_DUE, LOCKED, CANCELED, INACTIVE)
SHUT = frozenset({LOCKED, INACTIVE})


class Subscription(Timestamps, Base):
    __tablename__ = "billing_subscriptions"
    __table_args__ = (Index("ix_billing_subscriptions_status", "status"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    org_id: Mapped[int] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"), unique=True)
    plan_code: Mapped[str] = mapped_column(String(20))  # basic | enterprise
    interval: Mapped[str] = mapped_column(String(5))  # month | year
    next_interval: Mapped[str | None] = mapped_column(String(5))  # from the next renewal on
    currency: Mapped[str] = mapped_column(String(3))
    base_price_cents: Mapped[int] = mapped_column(default=0)  # per month
    seat_price_cents: Mapped[int] = mapped_column(default=0)  # per member per month
    block_price_cents: Mapped[int] = mapped_column(default=0)  # per block per month
    seats: Mapped[int] = mapped_column(default=1)  # members billed for the current period
    blocks: Mapped[int] = mapped_column(default=0)  # blocks billed for the current period
    status: Mapped[str] = mapped_column(String(12))
    cycle_anchor: Mapped[dt.datetime | None]  # periods are whole intervals from this instant
    current_period_start: Mapped[dt.datetime | None]
    current_period_end: Mapped[dt.datetime | None]
    cancel_at_period_end: Mapped[bool] = mapped_column(default=False)
    canceled_at: Mapped[dt.datetime | None]
    provider: Mapped[str] = mapped_column(String(20))
    customer_ref: Mapped[str | None] = mapped_column(String(100))
    payment_method_ref: Mapped[str | None] = mapped_column(String(100))
    payment_method_label: Mapped[str | None] = mapped_column(String(100))
    retry_count: Mapped[int] = mapped_column(default=0)
    next_retry_at: Mapped[dt.datetime | None]
    locked_at: Mapped[dt.datetime | None]
    # plan setting: while locked/inactive, do the organization's devices pause?
    pause_devices_when_locked: Mapped[bool] = mapped_column(default=False)


class Invoice(Timestamps, Base):
    __tablename__ = "billing_invoices"
    __table_args__ = (Index("ix_billing_invoices_org_created", "org_id", "created_at"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"))
    subscription_id: Mapped[int] = mapped_column(
        ForeignKey("billing_subscriptions.id", ondelete="CASCADE"), index=True)
    number: Mapped[str] = mapped_column(String(30), unique=True)
    # subscribe | renewal | reactivation | statement (the monthly bill, billing.statements)
    reason: Mapped[str] = mapped_column(String(20))
    # open | paid | uncollectible | void; a statement: paid | issued (it collects nothing)
    status: Mapped[str] = mapped_column(String(14))
    currency: Mapped[str] = mapped_column(String(3))
    total_cents: Mapped[int] = mapped_column(default=0)
    period_start: Mapped[dt.datetime]
    period_end: Mapped[dt.datetime]
    issued_at: Mapped[dt.datetime]
    paid_at: Mapped[dt.datetime | None]


class InvoiceLine(Base):
    __tablename__ = "billing_invoice_lines"

    id: Mapped[int] = mapped_column(primary_key=True)
    invoice_id: Mapped[int] = mapped_column(
        ForeignKey("billing_invoices.id", ondelete="CASCADE"), index=True)
    # plan | members | blocks | adjustment | credit_carried
    kind: Mapped[str] = mapped_column(String(20))
    description: Mapped[str] = mapped_column(String(300))
    quantity: Mapped[int] = mapped_column(default=1)
    unit_amount_cents: Mapped[int] = mapped_column(default=0)
    amount_cents: Mapped[int] = mapped_column(default=0)


class Charge(Base):
    """One payment attempt for an invoice. Written as ``pending`` and committed before the
    provider is called, so a crash between the two is retried with the same idempotency key
    (the provider then answers with the first result instead of charging twice)."""

    __tablename__ = "billing_charges"

    id: Mapped[int] = mapped_column(primary_key=True)
    invoice_id: Mapped[int] = mapped_column(
        ForeignKey("billing_invoices.id", ondelete="CASCADE"), index=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"),
                                        index=True)
    attempt: Mapped[int]  # 1 = first attempt, 2.. = retries
    amount_cents: Mapped[int]
    currency: Mapped[str] = mapped_column(String(3))
    provider: Mapped[str] = mapped_column(String(20))
    idempotency_key: Mapped[str] = mapped_column(String(100), unique=True)
    status: Mapped[str] = mapped_column(String(12))  # pending | succeeded | declined | error
    provider_ref: Mapped[str | None] = mapped_column(String(100))
    decline_code: Mapped[str | None] = mapped_column(String(60))
    message: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[dt.datetime]
    finished_at: Mapped[dt.datetime | None]


class Adjustment(Base):
    """A prorated credit (negative) or debit (positive) waiting for the next invoice;
    ``invoice_id`` is set when an invoice takes it up."""

    __tablename__ = "billing_adjustments"
    __table_args__ = (Index("ix_billing_adjustments_pending", "subscription_id", "invoice_id"),)

    id: Mapped[int] = mapped_column(primary_key=True)
    org_id: Mapped[int] = mapped_column(ForeignKey("organizations.id", ondelete="CASCADE"),
                                        index=True)
    subscription_id: Mapped[int] = mapped_column(
        ForeignKey("billing_subscriptions.id", ondelete="CASCADE"))
    kind: Mapped[str] = mapped_column(String(20))  # members | blocks | plan | credit
    description: Mapped[str] = mapped_column(String(300))
    amount_cents: Mapped[int]
    details: Mapped[dict[str, Any]] = mapped_column(default=dict)
    created_at: Mapped[dt.datetime]
    invoice_id: Mapped[int | None] = mapped_column(
        ForeignKey("billing_invoices.id", ondelete="SET NULL"))
