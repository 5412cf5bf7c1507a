"""Integrations (webhooks, MQTT forwarding), their outbox, deliveries and delivery log.

The path of one event to a customer's system:

1. the event writer commits the event rows of a batch together with ONE
   ``integration_outbox`` row naming the batch's id range (:mod:`corral.events.outbox`);
2. the dispatcher (:mod:`corral.integrations.tasks`) turns outbox rows into one
   ``integration_deliveries`` row per (integration, matching event) and deletes the outbox
   rows, in one transaction;
3. a delivery lane per integration sends due deliveries, and the recorder writes each
   attempt's outcome (the delivery's status, an ``integration_attempts`` log row, the
   integration's health) in batches.

Nothing is acknowledged to anyone along the way, so a crash between any two steps repeats
work (the same delivery, with the same idempotency id) and loses none.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from sqlalchemy import BigInteger, ForeignKey, Index, Integer, String, Text, UniqueConstraint, func
from sqlalchemy.orm import Mapped, mapped_column

from corral.db.base import Base, Timestamps

# BIGINT on PostgreSQL; SQLite only auto-increments an INTEGER PRIMARY KEY
BigId = BigInteger().with_variant(Integer(), "sqlite")


class Integration(Timestamps, Base):
    """One integration of a user's sandbox, a product or an organization (exactly one of
    ``owner_user_id``, ``product_id``, ``org_id`` says which). ``settings`` holds the
    type's configuration in Particle's field names, secrets included (the API masks them)."""

    __tablename__ = "integrations"
    __table_args__ = (
        Index("ix_integrations_owner", "owner_user_id"),
        Index("ix_integrations_product", "product_id"),
        Index("ix_integrations_org", "org_id"),
    )

    id: Mapped[str] = mapped_column(String(24), primary_key=True)  # 24 hex, like Particle's
    owner_user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="CASCADE"))
    product_id: Mapped[int | None] = mapped_column(
        ForeignKey("products.id", ondelete="CASCADE"))
    org_id: Mapped[int | None] = mapped_column(
        ForeignKey("organizations.id", ondelete="CASCADE"))
    integration_type: Mapped[str] = mapped_column(String(32))  # Webhook | MQTT
    name: Mapped[str | None] = mapped_column(String(200))
    event: Mapped[str] = mapped_column(String(64))  # the event-name prefix that triggers it
    device_id: Mapped[str | None] = mapped_column(String(24))  # only this device, if set
    settings: Mapped[dict[str, Any]] = mapped_column(default=dict)
    signing_secret: Mapped[str] = mapped_column(String(100))
    disabled: Mapped[bool] = mapped_column(default=False)
    # why it is disabled when corral disabled it (a target that kept failing); None when
    # the user did, or it is enabled
    disabled_reason: Mapped[str | None] = mapped_column(String(300))
    disabled_at: Mapped[dt.datetime | None]
    created_by: Mapped[int | None] = mapped_column(ForeignKey("users.id", ondelete="SET NULL"))
    # health, kept by the delivery worker
    consecutive_failures: Mapped[int] = mapped_column(default=0)
    failing_since: Mapped[dt.datetime | None]
    last_success_at: Mapped[dt.datetime | None]
    last_failure_at: Mapped[dt.datetime | None]


class IntegrationOutbox(Base):
    """One row per event-writer batch that stored events an integration may want: the
    batch's id range. Written in the batch's transaction; deleted by the dispatcher once the
    range is turned into deliveries. A range may also cover another node's events (ids from
    a shared sequence interleave); deliveries are unique per (integration, event), so an
    event seen twice is delivered once."""

    __tablename__ = "integration_outbox"

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    first_event_id: Mapped[int] = mapped_column(BigInteger)
    last_event_id: Mapped[int] = mapped_column(BigInteger)
    created_at: Mapped[dt.datetime] = mapped_column(server_default=func.now())


class Delivery(Base):
    """One event to deliver to one integration. ``status``: ``pending`` (due at
    ``next_attempt_at``), ``success``, ``failed`` (attempts used up, or refused for good) or
    ``skipped`` (not attempted: the integration was disabled). The idempotency id a target
    sees is derived from (integration, event), so every attempt and every redelivery of the
    same event carries the same one."""

    __tablename__ = "integration_deliveries"
    __table_args__ = (
        UniqueConstraint("integration_id", "event_id", name="uq_integration_deliveries_event"),
        Index("ix_integration_deliveries_due", "integration_id", "status", "next_attempt_at"),
        Index("ix_integration_deliveries_pending", "status", "integration_id"),
        Index("ix_integration_deliveries_product_done", "product_id", "finished_at"),
        Index("ix_integration_deliveries_done", "integration_id", "finished_at"),
        Index("ix_integration_deliveries_created", "created_at"),
    )

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    integration_id: Mapped[str] = mapped_column(
        ForeignKey("integrations.id", ondelete="CASCADE"))
    event_id: Mapped[int] = mapped_column(BigInteger)  # no FK: events are pruned on their own
    product_id: Mapped[int | None] = mapped_column(Integer)  # the event's (metrics)
    device_id: Mapped[str | None] = mapped_column(String(24))
    status: Mapped[str] = mapped_column(String(10), default="pending")
    attempts: Mapped[int] = mapped_column(default=0)
    next_attempt_at: Mapped[dt.datetime]
    created_at: Mapped[dt.datetime]
    finished_at: Mapped[dt.datetime | None]
    last_status_code: Mapped[int | None]
    last_error: Mapped[str | None] = mapped_column(String(500))


class Attempt(Base):
    """The delivery log: one row per request sent (or refused before sending), with what
    was sent and what came back, cut to excerpts. Pruned per integration."""

    __tablename__ = "integration_attempts"
    __table_args__ = (Index("ix_integration_attempts_integration", "integration_id", "id"),)

    id: Mapped[int] = mapped_column(BigId, primary_key=True, autoincrement=True)
    integration_id: Mapped[str] = mapped_column(
        ForeignKey("integrations.id", ondelete="CASCADE"))
    delivery_id: Mapped[int | None] = mapped_column(BigInteger)  # None: a test request
    event_id: Mapped[int | None] = mapped_column(BigInteger)
    at: Mapped[dt.datetime]
    outcome: Mapped[str] = mapped_column(String(10))  # success | retry | failed | test
    status_code: Mapped[int | None]
    latency_ms: Mapped[int | None]
    request: Mapped[str | None] = mapped_column(Text)  # method, URL, headers, body excerpt
    response: Mapped[str | None] = mapped_column(Text)  # status line and body excerpt
    error: Mapped[str | None] = mapped_column(String(500))
